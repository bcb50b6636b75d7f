//! What the demo prints: progress while the day runs (a bar on a terminal,
//! plain lines otherwise), each closed event's notice, and a summary.

use std::io::Write;

use chrono::TimeZone;
use facwatch_ingest::detect::EventStatus;

use crate::pipeline::{Outcome, Progress};

/// Formats a virtual time in the site's zone as `YYYY-MM-DD HH:MM`.
pub fn local_minute(ms: i64, tz: chrono_tz::Tz) -> String {
    tz.timestamp_millis_opt(ms).single().map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M").to_string(),
    )
}

/// Renders progress to stderr.
pub struct ProgressView {
    terminal: bool,
    from_ms: i64,
    until_ms: i64,
    tz: chrono_tz::Tz,
    last_plain_hour: Option<i64>,
}

impl ProgressView {
    pub fn new(terminal: bool, from_ms: i64, until_ms: i64, tz: chrono_tz::Tz) -> ProgressView {
        ProgressView {
            terminal,
            from_ms,
            until_ms,
            tz,
            last_plain_hour: None,
        }
    }

    pub fn show(&mut self, progress: &Progress) {
        let mut err = std::io::stderr().lock();
        match progress {
            Progress::Tick {
                now_ms,
                samples_produced,
                samples_applied,
                events_closed,
            } => {
                let done = ((now_ms - self.from_ms) as f64 / (self.until_ms - self.from_ms) as f64)
                    .clamp(0.0, 1.0);
                let clock = local_minute(*now_ms, self.tz);
                if self.terminal {
                    let width = 30;
                    let filled = (done * width as f64) as usize;
                    let _ = write!(
                        err,
                        "\r[{}{}] {clock}  samples {samples_produced} taken, {samples_applied} applied  events {events_closed} ",
                        "#".repeat(filled),
                        ".".repeat(width - filled),
                    );
                } else {
                    let hour = (now_ms - self.from_ms) / 3_600_000;
                    if self.last_plain_hour != Some(hour) {
                        self.last_plain_hour = Some(hour);
                        let _ = writeln!(
                            err,
                            "{clock}  samples {samples_produced} taken, {samples_applied} applied  events {events_closed}"
                        );
                    }
                }
            }
            Progress::Broker { access, .. } => {
                self.clear_line(&mut err);
                let _ = writeln!(
                    err,
                    "MQTT over TLS on {} (logins for the gateway and the platform; batches sealed with the gateway's key)",
                    access.addr
                );
            }
            Progress::Ingest { running, now_ms } => {
                self.clear_line(&mut err);
                let what = if *running { "started again" } else { "stopped" };
                let _ = writeln!(err, "ingest {what} at {}", local_minute(*now_ms, self.tz));
            }
            Progress::Closed(_) => {}
        }
    }

    /// Clears the bar so another line can be printed.
    pub fn clear_line(&self, err: &mut impl Write) {
        if self.terminal {
            let _ = write!(err, "\r{:100}\r", "");
        }
    }
}

/// The summary table printed after the run.
pub fn summary(outcome: &Outcome) -> String {
    let tz = outcome.site.time_zone;
    let mut out = String::new();
    out.push_str(&format!(
        "\n{} ({}): {} event(s)\n",
        outcome.site.name,
        outcome.site.id,
        outcome.events.len()
    ));
    out.push_str(&format!(
        "{:<8} {:<5} {:<7} {:<17} {:>9}  {}\n",
        "line", "rule", "status", "start", "minutes", "facilities"
    ));
    for event in &outcome.events {
        let minutes = event
            .duration_secs()
            .map_or_else(|| "-".to_string(), |s| format!("{:.1}", s as f64 / 60.0));
        let status = match event.status {
            EventStatus::Open => "open",
            EventStatus::Closed => "closed",
        };
        out.push_str(&format!(
            "{:<8} {:<5} {:<7} {:<17} {:>9}  {}\n",
            event.line,
            event.rule.as_str(),
            status,
            local_minute(event.start_ms, tz),
            minutes,
            event.facilities.join(", ")
        ));
    }
    out.push_str(&format!(
        "\nsamples taken by the gateway: {}, applied by the ingest: {} (in {} batches); wall time {:.1} s\n",
        outcome.samples_produced,
        outcome.samples_applied,
        outcome.batches_applied,
        outcome.wall.as_secs_f64()
    ));
    out
}
