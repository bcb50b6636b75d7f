//! Paced replay: a token bucket in front of every publish (first sends and
//! resends alike), so a site returning with days of backlog does not flood
//! the ingest. Live batches queue behind the backlog and go in seq order.
//!
//! The bucket holds one publish: a publish of `n` bytes costs
//! `max(1 / batches_per_sec, n / bytes_per_sec)` of time, and the next one
//! may go when that time has passed since the later of the previous one's
//! slot and its actual start. So `k` publishes at `r` batches/s occupy
//! exactly `k / r` seconds. A rate of 0 is unlimited.

use std::time::Duration;

use tokio::time::Instant;

/// Replay rates; 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayPace {
    pub batches_per_sec: u32,
    pub bytes_per_sec: u64,
}

impl ReplayPace {
    /// No pacing at all.
    pub const UNLIMITED: ReplayPace = ReplayPace {
        batches_per_sec: 0,
        bytes_per_sec: 0,
    };
}

/// Default replay pace: 20 batches/s and 2 MiB/s.
pub const DEFAULT_REPLAY_PACE: ReplayPace = ReplayPace {
    batches_per_sec: 20,
    bytes_per_sec: 2 * 1024 * 1024,
};

#[derive(Debug)]
pub(crate) struct Pacer {
    pace: ReplayPace,
    /// When the next publish may go; `None`: now.
    next_free: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(pace: ReplayPace) -> Pacer {
        Pacer {
            pace,
            next_free: None,
        }
    }

    pub(crate) fn is_unlimited(&self) -> bool {
        self.pace == ReplayPace::UNLIMITED
    }

    /// When the next publish may go, if that is later than `now`.
    pub(crate) fn wait_until(&self, now: Instant) -> Option<Instant> {
        self.next_free.filter(|&at| at > now)
    }

    /// A publish of `bytes` went at `now`.
    pub(crate) fn on_sent(&mut self, now: Instant, bytes: usize) {
        let start = self.next_free.map_or(now, |at| at.max(now));
        let cost = self.cost(bytes);
        self.next_free = (!cost.is_zero()).then(|| start + cost);
    }

    fn cost(&self, bytes: usize) -> Duration {
        let per_batch = match self.pace.batches_per_sec {
            0 => Duration::ZERO,
            rate => Duration::from_secs(1) / rate,
        };
        let per_bytes = match self.pace.bytes_per_sec {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(bytes as f64 / rate as f64),
        };
        per_batch.max(per_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes `batches` of `bytes` each as fast as `pacer` allows,
    /// sleeping on tokio's (paused) clock; returns when each went, from the
    /// start.
    async fn drain(pacer: &mut Pacer, batches: usize, bytes: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut sent_at = Vec::new();
        for _ in 0..batches {
            if let Some(at) = pacer.wait_until(Instant::now()) {
                tokio::time::sleep_until(at).await;
            }
            pacer.on_sent(Instant::now(), bytes);
            sent_at.push(Instant::now() - start);
        }
        sent_at
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_batches_at_ten_per_second_take_exactly_ten_seconds() {
        let mut pacer = Pacer::new(ReplayPace {
            batches_per_sec: 10,
            bytes_per_sec: 0,
        });
        let start = Instant::now();
        let sent_at = drain(&mut pacer, 100, 10_000).await;
        let expected: Vec<Duration> = (0..100).map(|k| Duration::from_millis(100 * k)).collect();
        assert_eq!(sent_at, expected);
        // The hundredth batch's slot ends at 10 s: the next may go then.
        assert_eq!(
            pacer.wait_until(Instant::now()),
            Some(start + Duration::from_secs(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_rate_paces_large_batches() {
        let mut pacer = Pacer::new(ReplayPace {
            batches_per_sec: 20,
            bytes_per_sec: 1000,
        });
        // 250 bytes at 1000 B/s cost 250 ms, more than 1/20 s.
        let sent_at = drain(&mut pacer, 4, 250).await;
        assert_eq!(
            sent_at,
            [0, 250, 500, 750].map(Duration::from_millis).to_vec()
        );
        // 10 bytes cost 10 ms by bytes: the batch rate (50 ms) rules.
        let start = Instant::now();
        tokio::time::sleep_until(pacer.wait_until(start).unwrap()).await;
        let sent_at = drain(&mut pacer, 3, 10).await;
        assert_eq!(sent_at, [0, 50, 100].map(Duration::from_millis).to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let mut pacer = Pacer::new(ReplayPace::UNLIMITED);
        assert!(pacer.is_unlimited());
        let sent_at = drain(&mut pacer, 1000, 200_000).await;
        assert!(sent_at.iter().all(|t| t.is_zero()));
        assert_eq!(pacer.wait_until(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pacer_does_not_bank_a_burst() {
        let mut pacer = Pacer::new(ReplayPace {
            batches_per_sec: 10,
            bytes_per_sec: 0,
        });
        pacer.on_sent(Instant::now(), 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let sent_at = drain(&mut pacer, 3, 1).await;
        assert_eq!(sent_at, [0, 100, 200].map(Duration::from_millis).to_vec());
    }
}
