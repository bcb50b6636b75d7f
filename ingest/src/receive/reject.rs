//! Rejected batches: their reasons, and a log that cannot be flooded.
//!
//! A misbehaving or hostile publisher can send any number of bad payloads;
//! each is counted, but at most one line per (gateway, reason) is logged per
//! [`LOG_WINDOW`], and that line says how many were suppressed before it.
//! The table of recent keys is bounded: past [`MAX_KEYS`] keys, entries whose
//! window has passed are forgotten.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

pub(crate) const LOG_WINDOW: Duration = Duration::from_secs(10);
const MAX_KEYS: usize = 4096;
/// Gateway names taken from topics are cut to this length for logs and keys.
const MAX_NAME_CHARS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RejectReason {
    TooLarge,
    BadMac,
    Decode,
    UnknownGateway,
    GatewayMismatch,
}

impl RejectReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::BadMac => "bad_mac",
            RejectReason::Decode => "decode",
            RejectReason::UnknownGateway => "unknown_gateway",
            RejectReason::GatewayMismatch => "gateway_mismatch",
        }
    }
}

/// Decides which rejections get a log line.
#[derive(Debug, Default)]
pub(crate) struct RejectLog {
    windows: HashMap<(String, RejectReason), Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
}

impl RejectLog {
    /// Records a rejection at `now`. Returns `Some(suppressed)` when this one
    /// should be logged (with the count suppressed since the last line for
    /// the same key), `None` when it is suppressed.
    pub(crate) fn record(
        &mut self,
        gateway: &str,
        reason: RejectReason,
        now: Instant,
    ) -> Option<u64> {
        let key = (short_name(gateway), reason);
        if let Some(window) = self.windows.get_mut(&key) {
            if now.duration_since(window.started) < LOG_WINDOW {
                window.suppressed += 1;
                return None;
            }
            let suppressed = window.suppressed;
            *window = Window {
                started: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if self.windows.len() >= MAX_KEYS {
            self.windows
                .retain(|_, w| now.duration_since(w.started) < LOG_WINDOW);
        }
        self.windows.insert(
            key,
            Window {
                started: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// `name` cut to [`MAX_NAME_CHARS`] characters.
pub(crate) fn short_name(name: &str) -> String {
    name.chars().take(MAX_NAME_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_gateway_and_reason_per_window_with_suppressed_count() {
        let mut log = RejectLog::default();
        let t0 = Instant::now();
        let decode = RejectReason::Decode;
        assert_eq!(log.record("gw-a", decode, t0), Some(0));
        assert_eq!(
            log.record("gw-a", decode, t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            log.record("gw-a", decode, t0 + Duration::from_secs(9)),
            None
        );
        // Other keys have their own windows.
        assert_eq!(log.record("gw-b", decode, t0), Some(0));
        assert_eq!(
            log.record("gw-a", RejectReason::GatewayMismatch, t0),
            Some(0)
        );
        // The next line after the window reports the two suppressed.
        assert_eq!(log.record("gw-a", decode, t0 + LOG_WINDOW), Some(2));
        assert_eq!(log.record("gw-a", decode, t0 + LOG_WINDOW), None);
    }

    #[test]
    fn the_key_table_stays_bounded() {
        let mut log = RejectLog::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            log.record(&format!("gw-{i}"), RejectReason::UnknownGateway, t0);
        }
        let later = t0 + LOG_WINDOW;
        assert_eq!(
            log.record("gw-new", RejectReason::UnknownGateway, later),
            Some(0)
        );
        assert_eq!(log.windows.len(), 1);
    }

    #[test]
    fn long_names_are_cut() {
        assert_eq!(short_name(&"x".repeat(500)).len(), MAX_NAME_CHARS);
    }
}
