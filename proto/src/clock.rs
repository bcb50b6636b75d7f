//! The clock that stamps samples and schedules polls.
//!
//! In the field it is the wall clock. For simulation it runs `scale` times
//! faster from a chosen virtual start, so a plant day passes in a minute. The
//! simulator and the gateway must agree on it even as separate processes, so
//! it is defined by plain numbers both can be given: the virtual time at a
//! wall-clock anchor (Unix ms) and the scale.
//!
//! Invariant: virtual time is a pure function of wall time, monotonic as long
//! as the wall clock is; `scale == 1` and `virtual == anchor` is the real
//! clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    /// Virtual time (Unix ms) at the anchor.
    virtual_at_anchor_ms: i64,
    /// Wall time (Unix ms) of the anchor.
    anchor_wall_ms: i64,
    scale: f64,
}

impl Clock {
    /// The wall clock itself.
    pub fn real() -> Clock {
        Clock {
            virtual_at_anchor_ms: 0,
            anchor_wall_ms: 0,
            scale: 1.0,
        }
    }

    /// A clock that reads `virtual_at_anchor_ms` when the wall clock reads
    /// `anchor_wall_ms`, and runs `scale` times faster than it. `scale` must
    /// be finite and positive (checked by the config that supplies it).
    pub fn simulated(virtual_at_anchor_ms: i64, anchor_wall_ms: i64, scale: f64) -> Clock {
        assert!(
            scale.is_finite() && scale > 0.0,
            "clock scale must be positive"
        );
        Clock {
            virtual_at_anchor_ms,
            anchor_wall_ms,
            scale,
        }
    }

    /// A simulated clock starting at `virtual_start_ms` now.
    pub fn starting_now(virtual_start_ms: i64, scale: f64) -> Clock {
        Clock::simulated(virtual_start_ms, wall_now_ms(), scale)
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The anchor's wall time, to hand the same clock to another process.
    pub fn anchor_wall_ms(&self) -> i64 {
        self.anchor_wall_ms
    }

    /// Current virtual time, Unix ms.
    pub fn now_ms(&self) -> i64 {
        self.virtual_at(wall_now_ms())
    }

    fn virtual_at(&self, wall_ms: i64) -> i64 {
        let elapsed = (wall_ms - self.anchor_wall_ms) as f64;
        self.virtual_at_anchor_ms + (elapsed * self.scale).round() as i64
    }

    /// Wall-clock time to wait from now until the clock reads `virtual_ms`
    /// (zero if it already has).
    pub fn wall_until(&self, virtual_ms: i64) -> Duration {
        let wall_target = self.anchor_wall_ms as f64
            + (virtual_ms - self.virtual_at_anchor_ms) as f64 / self.scale;
        let wait_ms = wall_target - wall_now_ms() as f64;
        if wait_ms <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(wait_ms / 1000.0)
        }
    }

    /// The wall-clock length of a span of virtual time.
    pub fn wall_duration(&self, virtual_span: Duration) -> Duration {
        virtual_span.div_f64(self.scale)
    }
}

pub fn wall_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_clock_runs_scale_times_faster() {
        let clock = Clock::simulated(1_000_000, 500, 600.0);
        assert_eq!(clock.virtual_at(500), 1_000_000);
        assert_eq!(clock.virtual_at(1_500), 1_000_000 + 600_000);
        assert_eq!(
            clock.wall_duration(Duration::from_secs(600)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn real_clock_reads_wall_time() {
        let clock = Clock::real();
        let before = wall_now_ms();
        let now = clock.now_ms();
        assert!(now >= before && now <= wall_now_ms());
    }

    #[test]
    fn waiting_for_the_past_is_zero() {
        let clock = Clock::starting_now(0, 10.0);
        assert_eq!(clock.wall_until(-5_000), Duration::ZERO);
        assert!(clock.wall_until(10_000) <= Duration::from_secs(1));
        assert!(clock.wall_until(10_000) > Duration::from_millis(900));
    }
}
