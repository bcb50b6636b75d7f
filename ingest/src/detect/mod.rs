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
//!   (`facility`); R1 needs a production facility known to be running
//!   and a critical treatment facility known to be stopped.
//! - Event id = hash(site, line, rule, start): writing an event again (a
//!   widened or closed version) replaces it, never duplicates it. An event
//!   about a whole gateway has the line [`ALL_LINES`] and the id
//!   hash(site, `{gateway}/*`, rule, start) (ids never contain `/`, so it
//!   cannot collide with a line's).
//! - The snapshot holds everything detection depends on, including the time
//!   of the newest sample the gateway delivered (the start of the next data
//!   interruption): restoring it and applying the rest yields the events of
//!   one uninterrupted pass.
//!
//! Rules implemented so far: R1 (treatment stopped while production runs)
//! and the delivery part of R5 (samples the gateway discarded, reported by
//! the delivery layer as [`DataLoss`]; see [`GatewayDetector::apply_batch`]).

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
/// [`Event`]. Snapshots of version 2 (no newest sample time) and events of
/// version 1 (no data loss, rules by variant index) are still read.
const SNAPSHOT_VERSION: u8 = 3;
const SNAPSHOT_VERSION_2: u8 = 2;
const EVENT_VERSION: u8 = 2;
const EVENT_VERSION_1: u8 = 1;

/// The `line` of an event about every line a gateway reads (R5 for a whole
/// gateway); its `gateway` field says which gateway.
pub const ALL_LINES: &str = "*";

/// A closed interval whose end lies more than this behind wall time was
/// found in a replay: it is marked historical.
const HISTORICAL_LAG_MS: i64 = 15 * 60 * 1000;

/// The rules facwatch evaluates (DOMAIN.md). Stored as their number (R5 is
/// 5), so variants can be added in any order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Rule {
    /// Treatment stopped while production runs.
    R1,
    /// Data interruption. So far: samples the gateway discarded (its buffer
    /// was full), reported with the batch after them.
    R5,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::R1 => "R1",
            Rule::R5 => "R5",
        }
    }
}

impl From<Rule> for u8 {
    fn from(rule: Rule) -> u8 {
        match rule {
            Rule::R1 => 1,
            Rule::R5 => 5,
        }
    }
}

impl TryFrom<u8> for Rule {
    type Error = String;

    fn try_from(number: u8) -> Result<Rule, String> {
        match number {
            1 => Ok(Rule::R1),
            5 => Ok(Rule::R5),
            other => Err(format!("unknown rule R{other}")),
        }
    }
}

/// Data the delivery layer knows is lost before a batch: the gateway
/// discarded samples (`dropped_before`), possibly whole batches (a gap in
/// `seq`). It cannot be recovered; it becomes an R5 event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLoss {
    /// Samples the gateway discarded (the batch's `dropped_before`).
    pub samples_dropped: u64,
    /// Sequence numbers skipped between the previous batch and this one.
    pub batches_missing: u64,
}

impl DataLoss {
    pub fn is_none(&self) -> bool {
        self.samples_dropped == 0 && self.batches_missing == 0
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
    /// For R5 from the delivery layer: what was lost.
    pub data_loss: Option<DataLoss>,
}

/// A stored event of version 1 (before R5): rules by variant index.
#[derive(Deserialize)]
struct EventV1 {
    id: String,
    site: String,
    gateway: String,
    line: String,
    rule: RuleV1,
    status: EventStatus,
    start_ms: i64,
    end_ms: Option<i64>,
    facilities: Vec<String>,
    historical: bool,
    notice_en: String,
    notice_zh: String,
}

#[derive(Deserialize)]
enum RuleV1 {
    R1,
}

impl From<EventV1> for Event {
    fn from(old: EventV1) -> Event {
        Event {
            id: old.id,
            site: old.site,
            gateway: old.gateway,
            line: old.line,
            rule: match old.rule {
                RuleV1::R1 => Rule::R1,
            },
            status: old.status,
            start_ms: old.start_ms,
            end_ms: old.end_ms,
            facilities: old.facilities,
            historical: old.historical,
            notice_en: old.notice_en,
            notice_zh: old.notice_zh,
            data_loss: None,
        }
    }
}

/// A persisted detector state or stored event that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct SnapshotError {
    what: &'static str,
    reason: String,
}

/// Detector state of all lines read by one gateway. Cloning it is cheap
/// (the site and the meter index are shared): the ingest applies batches
/// to a clone and keeps it only once the store has committed.
#[derive(Debug, Clone)]
pub struct GatewayDetector {
    site: Arc<Site>,
    gateway: String,
    /// Fixed for the detector's life: the meter index, the site's line of
    /// each entry of `lines`, the gateway's poll interval.
    layout: Arc<Layout>,
    /// Time of the newest sample of any meter the gateway delivered.
    newest_sample_ms: Option<i64>,
    lines: Vec<LineState>,
}

#[derive(Debug)]
struct Layout {
    /// meter id -> (line index, facility index) in `lines`.
    meters: HashMap<String, (usize, usize)>,
    /// Index in `site.lines` of each entry of `lines`.
    site_lines: Vec<usize>,
    poll_ms: i64,
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
        const WHAT: &str = "detector snapshot";
        let (newest_sample_ms, saved) = match snapshot.first() {
            Some(&SNAPSHOT_VERSION_2) => {
                // Before the newest sample time was kept: the lines' clocks
                // are the newest samples of the meters they know.
                let saved: Vec<LineState> = decode_versioned(snapshot, SNAPSHOT_VERSION_2, WHAT)?;
                (saved.iter().filter_map(|l| l.clock_ms).max(), saved)
            }
            _ => decode_versioned(snapshot, SNAPSHOT_VERSION, WHAT)?,
        };
        let mut detector = GatewayDetector::with_lines(site, gateway, saved);
        detector.newest_sample_ms = newest_sample_ms;
        Ok(detector)
    }

    fn with_lines(site: Arc<Site>, gateway: &str, mut saved: Vec<LineState>) -> GatewayDetector {
        let mut meters = HashMap::new();
        let mut site_lines = Vec::new();
        let mut lines = Vec::new();
        for (site_index, line) in site.lines.iter().enumerate() {
            if site.gateway_of_line(line) != gateway {
                continue;
            }
            site_lines.push(site_index);
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
        let poll_ms = site
            .gateway(gateway)
            .map_or(30_000, |g| g.poll_interval.as_millis() as i64);
        GatewayDetector {
            site,
            gateway: gateway.to_string(),
            layout: Arc::new(Layout {
                meters,
                site_lines,
                poll_ms,
            }),
            newest_sample_ms: None,
            lines,
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        encode_versioned(SNAPSHOT_VERSION, &(self.newest_sample_ms, &self.lines))
    }

    /// Time of the newest sample the gateway delivered, if any.
    pub fn newest_sample_ms(&self) -> Option<i64> {
        self.newest_sample_ms
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

    /// Applies one batch: first the data lost before it (an R5 event, see
    /// [`GatewayDetector::data_interruption`]), then its samples
    /// ([`GatewayDetector::apply`]).
    pub fn apply_batch(
        &mut self,
        samples: &[Sample],
        loss: DataLoss,
        wall_now_ms: i64,
    ) -> Vec<Event> {
        let interruption = (!loss.is_none()).then(|| {
            let resumed_ms = samples.iter().map(|s| s.time_ms).min();
            self.data_interruption(loss, resumed_ms, wall_now_ms)
        });
        let mut events: Vec<Event> = interruption.into_iter().collect();
        events.extend(self.apply(samples, wall_now_ms));
        events
    }

    /// The R5 event for data the gateway lost before a batch whose oldest
    /// sample is at `resumed_ms`: closed at once, for every line of the
    /// gateway ([`ALL_LINES`], all its facilities), from the newest sample
    /// delivered before (or `resumed_ms` when there was none) to
    /// `resumed_ms` (or its start, for a batch without samples, or when the
    /// gateway's clock went back). Its id depends only on (site, gateway,
    /// rule, start), so applying the same batch again upserts it.
    pub fn data_interruption(
        &self,
        loss: DataLoss,
        resumed_ms: Option<i64>,
        wall_now_ms: i64,
    ) -> Event {
        let start_ms = self.newest_sample_ms.or(resumed_ms).unwrap_or(0);
        let end_ms = resumed_ms.unwrap_or(start_ms).max(start_ms);
        let facilities: BTreeSet<String> = self
            .layout
            .site_lines
            .iter()
            .flat_map(|&i| self.site.lines[i].facilities.iter().map(|f| f.id.clone()))
            .collect();
        let notice = notice::render_data_loss(&self.site, &self.gateway, start_ms, end_ms, loss);
        Event {
            id: event_id(
                &self.site.id,
                &format!("{}/{ALL_LINES}", self.gateway),
                Rule::R5,
                start_ms,
            ),
            site: self.site.id.clone(),
            gateway: self.gateway.clone(),
            line: ALL_LINES.to_string(),
            rule: Rule::R5,
            status: EventStatus::Closed,
            start_ms,
            end_ms: Some(end_ms),
            facilities: facilities.into_iter().collect(),
            historical: wall_now_ms - end_ms > HISTORICAL_LAG_MS,
            notice_en: notice.en,
            notice_zh: notice.zh,
            data_loss: Some(loss),
        }
    }

    /// Applies samples in order; returns every event opened, widened or
    /// closed by them, the latest version of each once. Samples of meters
    /// that measure no facility of this gateway are ignored (but count as
    /// data the gateway delivered).
    pub fn apply(&mut self, samples: &[Sample], wall_now_ms: i64) -> Vec<Event> {
        let mut events: Vec<Event> = Vec::new();
        let layout = self.layout.clone();
        for sample in samples {
            self.newest_sample_ms = Some(
                self.newest_sample_ms
                    .map_or(sample.time_ms, |t| t.max(sample.time_ms)),
            );
            let Some(&(li, fi)) = layout.meters.get(&sample.meter) else {
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
        let line_cfg = &site.lines[self.layout.site_lines[li]];
        let poll_ms = self.layout.poll_ms;
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
        let line = &self.site.lines[self.layout.site_lines[li]];
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
            data_loss: None,
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
        const WHAT: &str = "stored event";
        match bytes.first() {
            Some(&EVENT_VERSION_1) => {
                decode_versioned::<EventV1>(bytes, EVENT_VERSION_1, WHAT).map(Event::from)
            }
            _ => decode_versioned(bytes, EVENT_VERSION, WHAT),
        }
    }

    pub fn duration_secs(&self) -> Option<i64> {
        self.end_ms.map(|end| (end - self.start_ms) / 1000)
    }

    /// The JSON the platform sees (API, MQTT, demo), times RFC 3339 in the
    /// site's zone. An event with a [`DataLoss`] also has `samples_dropped`
    /// and `batches_missing`.
    pub fn to_json(&self, tz: chrono_tz::Tz) -> serde_json::Value {
        let mut json = serde_json::json!({
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
        });
        if let (Some(loss), Some(fields)) = (self.data_loss, json.as_object_mut()) {
            fields.insert("samples_dropped".into(), loss.samples_dropped.into());
            fields.insert("batches_missing".into(), loss.batches_missing.into());
        }
        json
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
