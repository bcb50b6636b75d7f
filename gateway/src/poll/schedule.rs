//! When to poll: virtual times aligned to multiples of the poll interval.
//!
//! Invariant: slots strictly increase, and a poll that overran its interval
//! skips the slots it missed instead of polling in a burst to catch up.

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
}
