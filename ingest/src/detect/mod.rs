//! Detection of abnormal intervals, in event time.
//!
//! Pure and synchronous: samples in, event changes out; no clock is read
//! (the caller passes wall time for the historical flag only), no I/O. The
//! ingest persists [`GatewayDetector::snapshot`] in the same transaction as
//! the gateway's `last_seq` and the events, so after a restart detection
//! continues exactly where it stopped.
//!
//! Invariants:
//! - A line's clock is the latest acquisition time of its samples; arrival
//!   time never matters, so a replay yields the intervals a live run would.
//! - A gap in data makes facilities unknown, never stopped
//!   ([`facility`]); R1 needs a production facility known to be running
//!   and a critical treatment facility known to be stopped.
//! - Event id = hash(site, line, rule, start): writing an event again (a
//!   widened or closed version) replaces it, never duplicates it.
//!
//! Rules implemented so far: R1 (treatment stopped while production runs).

mod facility;
mod interval;
mod notice;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use facwatch_proto::site::{Role, Site};
use facwatch_proto::wire::Sample;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use facility::State;
use facility::{FacilityState, Limits, Transition};
use interval::{Change, Condition, Durations, Phase};

/// Version byte of a persisted [`GatewayDetector`] snapshot and of a stored
/// [`Event`].
const SNAPSHOT_VERSION: u8 = 2;
const EVENT_VERSION: u8 = 1;

/// A closed interval whose end lies more than this behind wall time was
/// found in a replay: it is marked historical.
const HISTORICAL_LAG_MS: i64 = 15 * 60 * 1000;

/// The rules facwatch evaluates (DOMAIN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// Treatment stopped while production runs.
    R1,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::R1 => "R1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventStatus {
    Open,
    Closed,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Open => "open",
            EventStatus::Closed => "closed",
        }
    }
}

/// An abnormal interval as the platform sees it (latest version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// hash(site, line, rule, start), hex.
    pub id: String,
    pub site: String,
    pub gateway: String,
    pub line: String,
    pub rule: Rule,
    pub status: EventStatus,
    /// Sample time at which the condition started, ms UTC.
    pub start_ms: i64,
    /// Sample time at which it stopped holding; `None` while open.
    pub end_ms: Option<i64>,
    /// Facility ids involved over the whole interval, sorted.
    pub facilities: Vec<String>,
    /// Closed long (in wall time) after it ended: found in a replay.
    pub historical: bool,
    pub notice_en: String,
    pub notice_zh: String,
}

/// A persisted detector state or stored event that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct SnapshotError {
    what: &'static str,
    reason: String,
}

/// Detector state of all lines read by one gateway.
#[derive(Debug, Clone)]
pub struct GatewayDetector {
    site: Arc<Site>,
    gateway: String,
    /// meter id -> (line index, facility index) in `site`.
    meters: HashMap<String, (usize, usize)>,
    lines: Vec<LineState>,
}

/// What is persisted of one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LineState {
    line: String,
    /// Latest sample time seen on the line.
    clock_ms: Option<i64>,
    /// Parallel to the site's facilities of this line, by id.
    facilities: Vec<(String, FacilityState)>,
    r1_holds: bool,
    /// Since when the R1 condition has been unknown (a gap in the data of a
    /// facility it depends on), if it is.
    r1_unknown_since: Option<i64>,
    r1: Phase,
}

impl GatewayDetector {
    pub fn new(site: Arc<Site>, gateway: &str) -> GatewayDetector {
        GatewayDetector::with_lines(site, gateway, Vec::new())
    }

    /// Restores from a [`GatewayDetector::snapshot`]. Lines and facilities
    /// are matched by id, so a changed site file keeps what still applies
    /// and starts new ones unknown.
    pub fn restore(
        site: Arc<Site>,
        gateway: &str,
        snapshot: &[u8],
    ) -> Result<GatewayDetector, SnapshotError> {
        let saved: Vec<LineState> =
            decode_versioned(snapshot, SNAPSHOT_VERSION, "detector snapshot")?;
        Ok(GatewayDetector::with_lines(site, gateway, saved))
    }

    fn with_lines(site: Arc<Site>, gateway: &str, mut saved: Vec<LineState>) -> GatewayDetector {
        let mut meters = HashMap::new();
        let mut lines = Vec::new();
        for line in &site.lines {
            if site.gateway_of_line(line) != gateway {
                continue;
            }
            let old = saved
                .iter()
                .position(|s| s.line == line.id)
                .map(|i| saved.swap_remove(i));
            let index = lines.len();
            let facilities = line
                .facilities
                .iter()
                .enumerate()
                .map(|(fi, f)| {
                    meters.insert(f.meter.clone(), (index, fi));
                    let state = old
                        .as_ref()
                        .and_then(|o| o.facilities.iter().find(|(id, _)| *id == f.id))
                        .map(|(_, s)| s.clone())
                        .unwrap_or_default();
                    (f.id.clone(), state)
                })
                .collect();
            lines.push(LineState {
                line: line.id.clone(),
                clock_ms: old.as_ref().and_then(|o| o.clock_ms),
                facilities,
                r1_holds: old.as_ref().is_some_and(|o| o.r1_holds),
                r1_unknown_since: old.as_ref().and_then(|o| o.r1_unknown_since),
                r1: old.map(|o| o.r1).unwrap_or_default(),
            });
        }
        GatewayDetector {
            site,
            gateway: gateway.to_string(),
            meters,
            lines,
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        encode_versioned(SNAPSHOT_VERSION, &self.lines)
    }

    /// The current state of every facility this gateway reads, for status
    /// displays: (line id, facility id, state, last power).
    pub fn facility_states(&self) -> Vec<(String, String, State, Option<f32>)> {
        self.lines
            .iter()
            .flat_map(|l| {
                l.facilities
                    .iter()
                    .map(|(id, f)| (l.line.clone(), id.clone(), f.state, f.last_power_kw))
            })
            .collect()
    }

    /// Applies samples in order; returns every event opened, widened or
    /// closed by them, the latest version of each once. Samples of meters
    /// that measure no facility of this gateway are ignored.
    pub fn apply(&mut self, samples: &[Sample], wall_now_ms: i64) -> Vec<Event> {
        let mut events: Vec<Event> = Vec::new();
        for sample in samples {
            let Some(&(li, fi)) = self.meters.get(&sample.meter) else {
                continue;
            };
            for change in self.step(li, fi, sample) {
                let event = self.event(li, change, wall_now_ms);
                match events.iter_mut().find(|e| e.id == event.id) {
                    Some(existing) => *existing = event,
                    None => events.push(event),
                }
            }
        }
        events
    }

    fn step(&mut self, li: usize, fi: usize, sample: &Sample) -> Vec<Change> {
        let site = &self.site;
        let line_cfg = site
            .lines
            .iter()
            .find(|l| l.id == self.lines[li].line)
            .expect("line states are built from the site");
        let poll_ms = site
            .gateway(&self.gateway)
            .map_or(30_000, |g| g.poll_interval.as_millis() as i64);
        let limits = |f: &facwatch_proto::site::Facility| Limits {
            start_kw: f.start_threshold_kw,
            stop_kw: f.stop_threshold_kw,
            debounce: site.rules.debounce_samples,
            stale_after_ms: poll_ms * i64::from(site.rules.stale_after_polls),
        };
        let line = &mut self.lines[li];
        // Event time: the line's clock never runs backwards, so a sample
        // stamped slightly before one already seen counts at the clock.
        let now_ms = line
            .clock_ms
            .map_or(sample.time_ms, |c| c.max(sample.time_ms));
        line.clock_ms = Some(now_ms);

        let mut transitions: Vec<Transition> = Vec::new();
        let power = sample
            .values
            .power_kw
            .filter(|p| p.is_finite() && sample.quality == facwatch_proto::wire::Quality::Ok);
        transitions.extend(line.facilities[fi].1.observe(
            now_ms,
            power,
            &limits(&line_cfg.facilities[fi]),
        ));
        for (state, cfg) in line.facilities.iter_mut().zip(&line_cfg.facilities) {
            transitions.extend(state.1.expire(now_ms, &limits(cfg)));
        }

        let condition = r1_condition(line_cfg, line, now_ms, &transitions);
        line.r1_holds = matches!(condition, Condition::Holds { .. });
        line.r1_unknown_since = match condition {
            Condition::Unknown { since_ms } => Some(since_ms),
            _ => None,
        };
        let durations = Durations {
            min_ms: site.rules.r1.min_duration.as_millis() as i64,
            clear_ms: site.rules.r1.clear_duration.as_millis() as i64,
        };
        line.r1.advance(now_ms, condition, durations)
    }

    fn event(&self, li: usize, change: Change, wall_now_ms: i64) -> Event {
        let line_id = &self.lines[li].line;
        let line = self
            .site
            .lines
            .iter()
            .find(|l| &l.id == line_id)
            .expect("line states are built from the site");
        let (status, start_ms, end_ms, facilities) = match change {
            Change::Opened {
                start_ms,
                facilities,
            }
            | Change::Widened {
                start_ms,
                facilities,
            } => (EventStatus::Open, start_ms, None, facilities),
            Change::Closed {
                start_ms,
                end_ms,
                facilities,
            } => (EventStatus::Closed, start_ms, Some(end_ms), facilities),
        };
        let facilities: Vec<String> = facilities.into_iter().collect();
        let now_in_data = self.lines[li].clock_ms.unwrap_or(start_ms);
        let notice = notice::render(
            &self.site,
            line,
            Rule::R1,
            start_ms,
            end_ms.unwrap_or(now_in_data),
            end_ms.is_some(),
            &facilities,
        );
        Event {
            id: event_id(&self.site.id, line_id, Rule::R1, start_ms),
            site: self.site.id.clone(),
            gateway: self.gateway.clone(),
            line: line_id.clone(),
            rule: Rule::R1,
            status,
            start_ms,
            end_ms,
            facilities,
            historical: end_ms.is_some_and(|end| wall_now_ms - end > HISTORICAL_LAG_MS),
            notice_en: notice.en,
            notice_zh: notice.zh,
        }
    }
}

/// R1: any production facility running and any critical treatment facility
/// stopped. Involved: every treatment facility stopped (critical or not).
/// It is clear when every production facility is known and none runs, or
/// every critical treatment facility is known and none is stopped;
/// otherwise, a gap in the data leaves it unknown.
fn r1_condition(
    cfg: &facwatch_proto::site::Line,
    line: &LineState,
    now_ms: i64,
    transitions: &[Transition],
) -> Condition {
    let states = || cfg.facilities.iter().zip(&line.facilities);
    let production = || states().filter(|(f, _)| f.role() == Role::Production);
    let critical = || states().filter(|(f, _)| f.role() == Role::Treatment && f.critical);
    let running_since = production()
        .filter(|(_, (_, s))| s.state == State::Running)
        .map(|(_, (_, s))| s.since_ms)
        .min();
    let critical_stopped_since = critical()
        .filter(|(_, (_, s))| s.state == State::Stopped)
        .map(|(_, (_, s))| s.since_ms)
        .min();
    // When the latest change in this step took effect.
    let changed_at = transitions.iter().map(|t| t.at_ms).max().unwrap_or(now_ms);
    if let (Some(p), Some(t)) = (running_since, critical_stopped_since) {
        return Condition::Holds {
            since_ms: p.max(t),
            involved: states()
                .filter(|(f, (_, s))| f.role() == Role::Treatment && s.state == State::Stopped)
                .map(|(f, _)| f.id.clone())
                .collect::<BTreeSet<_>>(),
        };
    }
    let known = |(_, (_, s)): (&facwatch_proto::site::Facility, &(String, FacilityState))| {
        s.state != State::Unknown
    };
    let clear = (running_since.is_none() && production().all(known))
        || (critical_stopped_since.is_none() && critical().all(known));
    if clear {
        Condition::Clear {
            since_ms: match line.r1_unknown_since {
                // It was last known to hold when the data went missing.
                Some(since) => since,
                None if line.r1_holds => changed_at,
                None => now_ms,
            },
        }
    } else {
        Condition::Unknown {
            since_ms: line.r1_unknown_since.unwrap_or(changed_at),
        }
    }
}

pub(crate) fn event_id(site: &str, line: &str, rule: Rule, start_ms: i64) -> String {
    let mut hash = Sha256::new();
    for part in [site, line, rule.as_str()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.update(start_ms.to_be_bytes());
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Event {
    /// Versioned binary form for the store.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(EVENT_VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Event, SnapshotError> {
        decode_versioned(bytes, EVENT_VERSION, "stored event")
    }

    pub fn duration_secs(&self) -> Option<i64> {
        self.end_ms.map(|end| (end - self.start_ms) / 1000)
    }

    /// The JSON the platform sees (API, MQTT, demo), times RFC 3339 in the
    /// site's zone.
    pub fn to_json(&self, tz: chrono_tz::Tz) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "site": self.site,
            "gateway": self.gateway,
            "line": self.line,
            "rule": self.rule.as_str(),
            "status": self.status.as_str(),
            "start": notice::rfc3339(self.start_ms, tz),
            "end": self.end_ms.map(|e| notice::rfc3339(e, tz)),
            "duration_secs": self.duration_secs(),
            "facilities": self.facilities,
            "historical": self.historical,
            "notice": { "zh": self.notice_zh, "en": self.notice_en },
        })
    }
}

fn encode_versioned<T: Serialize + ?Sized>(version: u8, value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![version]).expect("postcard encodes plain data into a Vec")
}

fn decode_versioned<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    version: u8,
    what: &'static str,
) -> Result<T, SnapshotError> {
    match bytes.split_first() {
        Some((&v, body)) if v == version => postcard::from_bytes(body).map_err(|e| SnapshotError {
            what,
            reason: e.to_string(),
        }),
        Some((&v, _)) => Err(SnapshotError {
            what,
            reason: format!("unsupported version {v} (this build reads {version})"),
        }),
        None => Err(SnapshotError {
            what,
            reason: "empty".into(),
        }),
    }
}

#[cfg(test)]
mod tests;
