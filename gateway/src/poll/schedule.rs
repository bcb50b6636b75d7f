//! When to poll, and whom: the pure scheduling decisions of one bus.
//!
//! Slots are virtual times aligned to multiples of the poll interval
//! ([`next_slot`]). At each slot the bus takes its meters in turn
//! ([`BusSchedule::turns`]); the async bus task only carries out the turns
//! and reports each poll's quality back ([`BusSchedule::record`]).
//!
//! Invariants:
//! - slots strictly increase, and a slot that overran its interval skips
//!   the slots it missed instead of polling in a burst to catch up;
//! - every meter has exactly one turn per slot the bus reaches, so each
//!   meter yields one sample per slot: a poll, or a skip while it backs off;
//! - a meter whose poll failed without a usable answer (timeout, exception,
//!   unreachable) is skipped for 1, 2, 4, ... slots, at most
//!   [`MAX_BACKOFF_SLOTS`] and at most [`MAX_BACKOFF`] of virtual time, and
//!   is then asked once, without retries: a silent meter costs its bus at
//!   most one timeout per backoff period;
//! - whatever the slot count says, a failing meter is not asked again
//!   before [`BUS_SHARE_OF_FAILURES`] times the bus time its failed poll
//!   took has passed, so a meter that does not answer holds at most that
//!   share of its bus's time even when its timeout is long against the poll
//!   interval (a short interval, or a simulated clock running fast);
//! - in a slot, meters that answered their last poll go first and failing
//!   ones last (each group in bus order), so a failing meter's timeout can
//!   only delay meters that are failing too;
//! - an answer that does not decode (the meter is there, its values are
//!   not sane) ends the backoff like a good reading: it costs no timeout.

use std::time::Duration;

use facwatch_proto::wire::Quality;

/// Most consecutive slots a failing meter is skipped.
pub(crate) const MAX_BACKOFF_SLOTS: u32 = 32;

/// Most virtual time a failing meter is skipped, so that a meter that
/// comes back is read again within this much data time even with a long
/// poll interval.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A failing meter's polls may take at most one part in this many of its
/// bus's time.
pub(crate) const BUS_SHARE_OF_FAILURES: i64 = 4;

/// The next slot to poll at, given the current virtual time and the slot
/// polled last (if any): the first multiple of `interval_ms` at or after
/// `now_ms`, but never before `last + interval_ms`.
pub(crate) fn next_slot(now_ms: i64, interval_ms: i64, last: Option<i64>) -> i64 {
    let interval_ms = interval_ms.max(1);
    let aligned = now_ms.div_euclid(interval_ms) * interval_ms;
    let at_or_after_now = if aligned == now_ms {
        aligned
    } else {
        aligned + interval_ms
    };
    match last {
        Some(last) => at_or_after_now.max(last + interval_ms),
        None => at_or_after_now,
    }
}

/// What the bus does for one meter (an index into the bus's meters) in
/// one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Ask the meter; up to `attempts` requests per read after timeouts.
    Poll { meter: usize, attempts: u32 },
    /// Do not ask: the meter is backing off. Its sample is `Offline`.
    Skip { meter: usize },
}

#[derive(Debug, Clone, Copy)]
struct MeterState {
    retries: u32,
    /// Failed polls in a row.
    failures: u32,
    /// Slots before this virtual time are skipped.
    skip_until_ms: i64,
}

/// Backoff state of the meters of one bus, in bus order.
#[derive(Debug, Clone)]
pub(crate) struct BusSchedule {
    interval_ms: i64,
    max_skipped_slots: u32,
    meters: Vec<MeterState>,
}

impl BusSchedule {
    /// A schedule for meters with the given retries (extra attempts after a
    /// timeout within one poll), all due at the first slot.
    pub(crate) fn new(interval: Duration, retries: impl IntoIterator<Item = u32>) -> BusSchedule {
        let interval_ms = (interval.as_millis() as i64).max(1);
        let cap_by_time = (MAX_BACKOFF.as_millis() as i64 / interval_ms).clamp(1, i64::MAX);
        BusSchedule {
            interval_ms,
            max_skipped_slots: MAX_BACKOFF_SLOTS
                .min(u32::try_from(cap_by_time).unwrap_or(u32::MAX)),
            meters: retries
                .into_iter()
                .map(|retries| MeterState {
                    retries,
                    failures: 0,
                    skip_until_ms: i64::MIN,
                })
                .collect(),
        }
    }

    pub(crate) fn interval_ms(&self) -> i64 {
        self.interval_ms
    }

    /// The turns of `slot_ms`, in the order to take them: skips (they cost
    /// nothing), then meters that answered last time, then failing meters.
    pub(crate) fn turns(&self, slot_ms: i64) -> Vec<Turn> {
        let skips = self
            .meters
            .iter()
            .enumerate()
            .filter(|(_, m)| slot_ms < m.skip_until_ms)
            .map(|(meter, _)| Turn::Skip { meter });
        let due = |failing: bool| {
            self.meters
                .iter()
                .enumerate()
                .filter(move |(_, m)| slot_ms >= m.skip_until_ms && (m.failures > 0) == failing)
                .map(move |(meter, m)| Turn::Poll {
                    meter,
                    attempts: if failing { 1 } else { 1 + m.retries },
                })
        };
        skips.chain(due(false)).chain(due(true)).collect()
    }

    /// Records the quality of `meter`'s poll in `slot_ms`, which occupied
    /// the bus for `cost_ms` (virtual ms).
    pub(crate) fn record(&mut self, meter: usize, slot_ms: i64, quality: Quality, cost_ms: i64) {
        let max_skipped = self.max_skipped_slots;
        let interval_ms = self.interval_ms;
        let Some(state) = self.meters.get_mut(meter) else {
            return;
        };
        match quality {
            Quality::Ok | Quality::DecodeError => {
                state.failures = 0;
                state.skip_until_ms = i64::MIN;
            }
            Quality::Timeout | Quality::Offline | Quality::Exception(_) => {
                state.failures = state.failures.saturating_add(1);
                let skipped = skipped_slots(state.failures, max_skipped);
                let by_slots = (i64::from(skipped) + 1) * interval_ms;
                let by_bus_share = cost_ms.max(0).saturating_mul(BUS_SHARE_OF_FAILURES);
                state.skip_until_ms = slot_ms.saturating_add(by_slots.max(by_bus_share));
            }
        }
    }
}

/// Slots skipped after the `failures`-th failure in a row: 1, 2, 4, ...
/// up to `max`.
fn skipped_slots(failures: u32, max: u32) -> u32 {
    1u32.checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_slot_is_the_next_multiple_of_the_interval() {
        assert_eq!(next_slot(0, 30_000, None), 0);
        assert_eq!(next_slot(1, 30_000, None), 30_000);
        assert_eq!(next_slot(29_999, 30_000, None), 30_000);
        assert_eq!(next_slot(30_000, 30_000, None), 30_000);
        assert_eq!(next_slot(-1, 30_000, None), 0);
        assert_eq!(next_slot(-30_001, 30_000, None), -30_000);
    }

    #[test]
    fn a_poll_that_finished_in_time_takes_the_following_slot() {
        assert_eq!(next_slot(30_250, 30_000, Some(30_000)), 60_000);
        // Woken early or polled fast: still never the same slot twice.
        assert_eq!(next_slot(30_000, 30_000, Some(30_000)), 60_000);
        assert_eq!(next_slot(29_000, 30_000, Some(30_000)), 60_000);
    }

    #[test]
    fn an_overrun_skips_the_missed_slots() {
        // Polled at 30 s, finished at 95 s: 60 s and 90 s are skipped.
        assert_eq!(next_slot(95_000, 30_000, Some(30_000)), 120_000);
        // Finished exactly on a slot: that slot is still on time.
        assert_eq!(next_slot(90_000, 30_000, Some(30_000)), 90_000);
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn polls(turns: &[Turn]) -> Vec<usize> {
        turns
            .iter()
            .filter_map(|t| match t {
                Turn::Poll { meter, .. } => Some(*meter),
                Turn::Skip { .. } => None,
            })
            .collect()
    }

    /// Runs one meter that fails every poll for `slots` slots of 1 s and
    /// returns the slots (in seconds) at which it was asked.
    fn asked_while_failing(interval: Duration, slots: i64) -> Vec<i64> {
        let mut schedule = BusSchedule::new(interval, [0]);
        let interval_ms = schedule.interval_ms();
        let mut asked = Vec::new();
        for slot in 0..slots {
            let slot_ms = slot * interval_ms;
            for turn in schedule.turns(slot_ms) {
                if let Turn::Poll { meter, .. } = turn {
                    asked.push(slot);
                    schedule.record(meter, slot_ms, Quality::Timeout, 10);
                }
            }
        }
        asked
    }

    #[test]
    fn a_failing_meter_is_skipped_for_1_2_4_up_to_32_slots() {
        // Asked at 0; skipped 1 -> 2; skipped 2 -> 5; 4 -> 10; 8 -> 19;
        // 16 -> 36; 32 -> 69; 32 -> 102.
        assert_eq!(
            asked_while_failing(SECOND, 110),
            vec![0, 2, 5, 10, 19, 36, 69, 102]
        );
    }

    #[test]
    fn backoff_is_capped_at_five_minutes_of_data_time() {
        // 30 s interval: at most 10 slots skipped.
        let asked = asked_while_failing(Duration::from_secs(30), 60);
        assert_eq!(asked, vec![0, 2, 5, 10, 19, 30, 41, 52]);
        // An interval longer than the cap still skips one slot.
        let asked = asked_while_failing(Duration::from_secs(600), 6);
        assert_eq!(asked, vec![0, 2, 4]);
    }

    #[test]
    fn every_meter_has_one_turn_per_slot_and_skips_come_first() {
        let mut schedule = BusSchedule::new(SECOND, [1, 1, 1]);
        schedule.record(1, 0, Quality::Timeout, 10);
        assert_eq!(
            schedule.turns(1_000),
            vec![
                Turn::Skip { meter: 1 },
                Turn::Poll {
                    meter: 0,
                    attempts: 2
                },
                Turn::Poll {
                    meter: 2,
                    attempts: 2
                },
            ]
        );
    }

    #[test]
    fn failing_meters_go_last_and_get_no_retries() {
        let mut schedule = BusSchedule::new(SECOND, [2, 2, 2, 2]);
        schedule.record(0, 0, Quality::Timeout, 10);
        schedule.record(2, 0, Quality::Exception(2), 1);
        // Slot 2 s: both are due again, after the healthy ones.
        assert_eq!(
            schedule.turns(2_000),
            vec![
                Turn::Poll {
                    meter: 1,
                    attempts: 3
                },
                Turn::Poll {
                    meter: 3,
                    attempts: 3
                },
                Turn::Poll {
                    meter: 0,
                    attempts: 1
                },
                Turn::Poll {
                    meter: 2,
                    attempts: 1
                },
            ]
        );
    }

    #[test]
    fn a_good_or_undecodable_answer_ends_the_backoff() {
        for answer in [Quality::Ok, Quality::DecodeError] {
            let mut schedule = BusSchedule::new(SECOND, [1]);
            for slot in [0, 2_000, 5_000] {
                schedule.record(0, slot, Quality::Timeout, 10);
            }
            assert_eq!(schedule.turns(6_000), vec![Turn::Skip { meter: 0 }]);
            assert_eq!(polls(&schedule.turns(10_000)), vec![0]);
            schedule.record(0, 10_000, answer, 1);
            assert_eq!(
                schedule.turns(11_000),
                vec![Turn::Poll {
                    meter: 0,
                    attempts: 2
                }],
                "{answer:?}"
            );
        }
    }

    #[test]
    fn exceptions_and_unreachable_links_back_off_like_timeouts() {
        for failure in [Quality::Exception(4), Quality::Offline, Quality::Timeout] {
            let mut schedule = BusSchedule::new(SECOND, [0]);
            schedule.record(0, 0, failure, 10);
            assert_eq!(schedule.turns(1_000), vec![Turn::Skip { meter: 0 }]);
            assert_eq!(polls(&schedule.turns(2_000)), vec![0], "{failure:?}");
        }
    }

    #[test]
    fn backoff_counts_data_time_so_overrun_slots_also_count() {
        let mut schedule = BusSchedule::new(SECOND, [0, 0]);
        // Four failures: the fourth at 10 s skips 8 slots (11..=18 s).
        for slot in [0, 2_000, 5_000, 10_000] {
            schedule.record(0, slot, Quality::Timeout, 10);
        }
        // The bus overran and next reaches 17 s, then 19 s.
        assert_eq!(polls(&schedule.turns(17_000)), vec![1]);
        assert_eq!(polls(&schedule.turns(19_000)), vec![1, 0]);
    }

    #[test]
    fn a_failure_longer_than_the_slots_allow_backs_off_by_bus_share() {
        // 1 s slots, a poll that took 2.5 s: not again before 10 s, so the
        // meter holds at most a quarter of the bus.
        let mut schedule = BusSchedule::new(SECOND, [1, 0]);
        schedule.record(0, 0, Quality::Timeout, 2_500);
        assert_eq!(polls(&schedule.turns(9_000)), vec![1]);
        assert_eq!(polls(&schedule.turns(10_000)), vec![1, 0]);
        // Past the slot cap too: 30 s slots, a poll of 2 min.
        let mut schedule = BusSchedule::new(Duration::from_secs(30), [0]);
        for _ in 0..10 {
            schedule.record(0, 0, Quality::Timeout, 120_000);
        }
        assert_eq!(polls(&schedule.turns(450_000)), Vec::<usize>::new());
        assert_eq!(polls(&schedule.turns(480_000)), vec![0]);
    }

    #[test]
    fn an_unknown_meter_index_is_ignored() {
        let mut schedule = BusSchedule::new(SECOND, [0]);
        schedule.record(5, 0, Quality::Timeout, 10);
        assert_eq!(polls(&schedule.turns(1_000)), vec![0]);
    }
}
