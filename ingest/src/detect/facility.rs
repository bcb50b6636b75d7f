//! The state of one facility, derived from its meter's samples.
//!
//! - Running at or above the start threshold, stopped below the stop
//!   threshold; between the two the state holds (hysteresis).
//! - A change needs `debounce` consecutive readings beyond the threshold and
//!   takes effect at the time of the first of them, so an interval starts
//!   when its condition started, not when it was confirmed.
//! - Unknown until the first valid reading, and again once no valid reading
//!   has come for the stale span; a gap is unknown, never stopped. From
//!   unknown, the first valid reading sets the state at once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Unknown,
    Running,
    Stopped,
    /// Running but below its low-load fraction of rated (R4). Only shown
    /// by status displays; the hysteresis knows running and stopped.
    LowLoad,
}

/// Thresholds and timing of one facility, from the site file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) start_kw: f64,
    pub(crate) stop_kw: f64,
    pub(crate) debounce: u32,
    pub(crate) stale_after_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FacilityState {
    pub(crate) state: State,
    /// When `state` took effect (sample time, ms).
    pub(crate) since_ms: i64,
    /// Time of the last valid reading.
    pub(crate) last_valid_ms: Option<i64>,
    pub(crate) last_power_kw: Option<f32>,
    /// Readings pointing at another state, not yet enough to change.
    candidate: Option<Candidate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Candidate {
    state: State,
    first_ms: i64,
    count: u32,
}

/// A state change and the time it took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) to: State,
    pub(crate) at_ms: i64,
}

impl Default for FacilityState {
    fn default() -> Self {
        FacilityState {
            state: State::Unknown,
            since_ms: i64::MIN,
            last_valid_ms: None,
            last_power_kw: None,
            candidate: None,
        }
    }
}

impl FacilityState {
    /// Time of the first reading of a change not yet confirmed by the
    /// debounce, if one is pending.
    pub(crate) fn pending_since(&self) -> Option<i64> {
        self.candidate.as_ref().map(|c| c.first_ms)
    }

    /// Applies one reading: `power_kw` is `None` for a sample without a valid
    /// power value (timeout, exception, ...), which changes nothing by
    /// itself; only [`FacilityState::expire`] turns silence into unknown.
    pub(crate) fn observe(
        &mut self,
        time_ms: i64,
        power_kw: Option<f32>,
        limits: &Limits,
    ) -> Option<Transition> {
        let power = f64::from(power_kw?);
        self.last_valid_ms = Some(time_ms);
        self.last_power_kw = power_kw;
        let reading = if power >= limits.start_kw {
            State::Running
        } else if power < limits.stop_kw {
            State::Stopped
        } else if self.state == State::Unknown {
            // Between the thresholds with no history: it is drawing more
            // than a stopped facility may, so it is not stopped.
            State::Running
        } else {
            self.state
        };
        if reading == self.state {
            self.candidate = None;
            return None;
        }
        if self.state == State::Unknown {
            return Some(self.set(reading, time_ms));
        }
        let candidate = match self.candidate.take() {
            Some(c) if c.state == reading => Candidate {
                count: c.count + 1,
                ..c
            },
            _ => Candidate {
                state: reading,
                first_ms: time_ms,
                count: 1,
            },
        };
        if candidate.count >= limits.debounce {
            Some(self.set(reading, candidate.first_ms))
        } else {
            self.candidate = Some(candidate);
            None
        }
    }

    /// Turns the state unknown if no valid reading came within the stale
    /// span before `now_ms`; the change takes effect when the span ran out.
    pub(crate) fn expire(&mut self, now_ms: i64, limits: &Limits) -> Option<Transition> {
        if self.state == State::Unknown {
            return None;
        }
        let deadline = self.last_valid_ms? + limits.stale_after_ms;
        (now_ms > deadline).then(|| self.set(State::Unknown, deadline))
    }

    fn set(&mut self, to: State, at_ms: i64) -> Transition {
        self.state = to;
        self.since_ms = at_ms;
        self.candidate = None;
        Transition { to, at_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        start_kw: 10.0,
        stop_kw: 8.0,
        debounce: 2,
        stale_after_ms: 90_000,
    };

    fn run(readings: &[(i64, Option<f32>)]) -> (FacilityState, Vec<Transition>) {
        let mut f = FacilityState::default();
        let mut transitions = Vec::new();
        for &(t, p) in readings {
            transitions.extend(f.expire(t, &LIMITS));
            transitions.extend(f.observe(t, p, &LIMITS));
        }
        (f, transitions)
    }

    fn at(to: State, at_ms: i64) -> Transition {
        Transition { to, at_ms }
    }

    #[test]
    fn first_valid_reading_sets_the_state_at_once() {
        let (f, t) = run(&[(0, None), (30, Some(12.0))]);
        assert_eq!(f.state, State::Running);
        assert_eq!(t, vec![at(State::Running, 30)]);
    }

    #[test]
    fn stop_is_debounced_and_backdated_to_the_first_low_reading() {
        let (f, t) = run(&[(0, Some(12.0)), (30, Some(1.0)), (60, Some(1.0))]);
        assert_eq!(f.state, State::Stopped);
        assert_eq!(t, vec![at(State::Running, 0), at(State::Stopped, 30)]);
    }

    #[test]
    fn a_single_low_reading_is_ignored() {
        let (f, t) = run(&[
            (0, Some(12.0)),
            (30, Some(1.0)),
            (60, Some(12.0)),
            (90, Some(1.0)),
        ]);
        assert_eq!(f.state, State::Running);
        assert_eq!(t, vec![at(State::Running, 0)]);
    }

    #[test]
    fn readings_between_thresholds_hold_the_state() {
        let (f, _) = run(&[
            (0, Some(12.0)),
            (30, Some(9.0)),
            (60, Some(9.0)),
            (90, Some(9.0)),
        ]);
        assert_eq!(f.state, State::Running);
        let (f, _) = run(&[(0, Some(1.0)), (30, Some(9.0)), (60, Some(9.0))]);
        assert_eq!(f.state, State::Stopped);
    }

    #[test]
    fn silence_becomes_unknown_when_the_stale_span_runs_out_never_stopped() {
        let readings = [
            (0, Some(12.0)),
            (30_000, None),
            (60_000, None),
            (90_000, None),
            (120_000, None),
        ];
        let (f, t) = run(&readings);
        assert_eq!(f.state, State::Unknown);
        assert_eq!(t, vec![at(State::Running, 0), at(State::Unknown, 90_000)]);
        let mut f = FacilityState::default();
        f.observe(0, Some(12.0), &LIMITS);
        assert_eq!(f.expire(90_000, &LIMITS), None);
        assert_eq!(f.expire(90_001, &LIMITS), Some(at(State::Unknown, 90_000)));
    }
}
