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
//! Rules: R1-R7 (see each rule's function and the ingest report for the
//! exact semantics). R2 and R3 are judged when an R1 condition clears short
//! of R1's minimum duration (late start / early stop); beyond it R1 owns
//! the stop. R5 has three sources: a whole-gateway gap in data time, one
//! meter silent while others report (id hashes `{line}/{facility}`), and
//! samples the delivery layer reports lost ([`DataLoss`]). R7 events are
//! per meter too. Facilities in a maintenance window take part in no rule.

mod facility;
mod interval;
mod notice;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::site::{Facility, Line, Role, Site};
use facwatch_proto::wire::Sample;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use facility::State;
use facility::{FacilityState, Limits, Transition};
use interval::{Change, Condition, Durations, Phase};

/// Version byte of a persisted [`GatewayDetector`] snapshot and of a stored
/// [`Event`]. Snapshots of version 2 (no newest sample time) and events of
/// version 1 (no data loss, rules by variant index) are still read.
const SNAPSHOT_VERSION: u8 = 4;
const SNAPSHOT_VERSION_3: u8 = 3;
const SNAPSHOT_VERSION_2: u8 = 2;
const EVENT_VERSION: u8 = 3;
const EVENT_VERSION_2: u8 = 2;
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
    /// Treatment started late after production started.
    R2,
    /// Treatment stopped early, before production stopped.
    R3,
    /// Low-load (idling) treatment while production runs.
    R4,
    /// Data interruption: a whole gateway silent in data time, one meter
    /// silent while others report, or samples the gateway discarded.
    R5,
    /// Production running inside a declared restriction window.
    R6,
    /// Frozen power value or an energy counter going backwards.
    R7,
}

impl Rule {
    /// Every rule, in number order (`ALL[n - 1]` is Rn).
    pub const ALL: [Rule; 7] = [
        Rule::R1,
        Rule::R2,
        Rule::R3,
        Rule::R4,
        Rule::R5,
        Rule::R6,
        Rule::R7,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::R1 => "R1",
            Rule::R2 => "R2",
            Rule::R3 => "R3",
            Rule::R4 => "R4",
            Rule::R5 => "R5",
            Rule::R6 => "R6",
            Rule::R7 => "R7",
        }
    }
}

impl From<Rule> for u8 {
    fn from(rule: Rule) -> u8 {
        match rule {
            Rule::R1 => 1,
            Rule::R2 => 2,
            Rule::R3 => 3,
            Rule::R4 => 4,
            Rule::R5 => 5,
            Rule::R6 => 6,
            Rule::R7 => 7,
        }
    }
}

impl TryFrom<u8> for Rule {
    type Error = String;

    fn try_from(number: u8) -> Result<Rule, String> {
        match number {
            1 => Ok(Rule::R1),
            2 => Ok(Rule::R2),
            3 => Ok(Rule::R3),
            4 => Ok(Rule::R4),
            5 => Ok(Rule::R5),
            6 => Ok(Rule::R6),
            7 => Ok(Rule::R7),
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

/// Power seen of one facility during an interval (valid samples only).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerEvidence {
    pub min_kw: f32,
    pub avg_kw: f32,
    pub max_kw: f32,
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
    /// Power of each involved facility and of the line's production
    /// during the interval (so far, while open), by facility id.
    pub evidence: BTreeMap<String, PowerEvidence>,
}

/// A stored event of version 2 (before evidence).
#[derive(Deserialize)]
struct EventV2 {
    id: String,
    site: String,
    gateway: String,
    line: String,
    rule: Rule,
    status: EventStatus,
    start_ms: i64,
    end_ms: Option<i64>,
    facilities: Vec<String>,
    historical: bool,
    notice_en: String,
    notice_zh: String,
    data_loss: Option<DataLoss>,
}

impl From<EventV2> for Event {
    fn from(old: EventV2) -> Event {
        Event {
            id: old.id,
            site: old.site,
            gateway: old.gateway,
            line: old.line,
            rule: old.rule,
            status: old.status,
            start_ms: old.start_ms,
            end_ms: old.end_ms,
            facilities: old.facilities,
            historical: old.historical,
            notice_en: old.notice_en,
            notice_zh: old.notice_zh,
            data_loss: old.data_loss,
            evidence: BTreeMap::new(),
        }
    }
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
            evidence: BTreeMap::new(),
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

/// One facility as a status display shows it, from
/// [`GatewayDetector::facility_statuses`].
#[derive(Debug, Clone, PartialEq)]
pub struct FacilityStatus {
    pub line: String,
    pub facility: String,
    /// [`State::LowLoad`] for a running facility below its R4 fraction.
    pub state: State,
    /// Power of the last valid reading; `None` before the first.
    pub last_power_kw: Option<f32>,
    /// Sample time of that reading, ms UTC. It stays when the facility
    /// turns unknown (it says since when the data is missing).
    pub last_sample_ms: Option<i64>,
}

/// Detector state of all lines read by one gateway. Cloning it is cheap
/// (the site and the meter index are shared): the ingest applies batches
/// to a clone and keeps it only once the store has committed.
#[derive(Debug, Clone)]
pub struct GatewayDetector {
    site: Arc<Site>,
    gateway: String,
    /// Fixed for the detector's life: the meter index, the site's line of
    /// each entry of `lines`, the gateway's poll interval, the windows.
    layout: Arc<Layout>,
    /// Time of the newest sample of any meter the gateway delivered.
    newest_sample_ms: Option<i64>,
    gateway_state: GatewayState,
    lines: Vec<LineState>,
}

/// Gateway-wide R5 state (data time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct GatewayState {
    /// Time of the newest valid sample of any meter.
    newest_valid_ms: Option<i64>,
    /// When valid data last resumed after a gateway-wide gap (or first
    /// came): a meter is missing only if silent since then.
    resumed_ms: Option<i64>,
    /// An open whole-gateway R5 event starts at `newest_valid_ms`.
    gap_open: bool,
}

#[derive(Debug)]
struct Layout {
    /// meter id -> (line index, facility index) in `lines`.
    meters: HashMap<String, (usize, usize)>,
    /// Index in `site.lines` of each entry of `lines`.
    site_lines: Vec<usize>,
    poll_ms: i64,
    /// Per entry of `lines`: declared restriction windows `[from, until)`.
    restrictions: Vec<Vec<(i64, i64)>>,
    /// Per entry of `lines`, per facility: maintenance windows.
    maintenance: Vec<Vec<Vec<(i64, i64)>>>,
}

fn inside(windows: &[(i64, i64)], t: i64) -> bool {
    windows.iter().any(|&(from, until)| from <= t && t < until)
}

/// What is persisted of one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LineState {
    line: String,
    /// Latest sample time seen on the line.
    clock_ms: Option<i64>,
    /// Parallel to the site's facilities of this line, by id.
    facilities: Vec<(String, FacilityState)>,
    /// Parallel to `facilities`: R5 (one meter) and R7 state.
    meters: Vec<MeterTrack>,
    r1: Track,
    /// Whether the current R1 condition started with production starting
    /// (treatment already stopped) rather than treatment stopping: decides
    /// between R2 and R3 when it clears short of R1's minimum.
    r1_started_by_production: bool,
    r4: Track,
    r6: Track,
}

/// One rule's interval on a line, with its evidence so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Track {
    holds: bool,
    /// Since when the condition has been unknown (a gap in the data of a
    /// facility it depends on), if it is.
    unknown_since: Option<i64>,
    phase: Phase,
    /// Power of each facility of the line while the interval (or its
    /// pending start) holds; parallel to `LineState::facilities`.
    power: Vec<PowerAcc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct PowerAcc {
    min_kw: f32,
    max_kw: f32,
    sum_kw: f64,
    count: u32,
}

impl Default for PowerAcc {
    fn default() -> Self {
        PowerAcc {
            min_kw: f32::INFINITY,
            max_kw: f32::NEG_INFINITY,
            sum_kw: 0.0,
            count: 0,
        }
    }
}

impl PowerAcc {
    fn add(&mut self, kw: f32) {
        self.min_kw = self.min_kw.min(kw);
        self.max_kw = self.max_kw.max(kw);
        self.sum_kw += f64::from(kw);
        self.count += 1;
    }

    fn evidence(&self) -> Option<PowerEvidence> {
        (self.count > 0).then(|| PowerEvidence {
            min_kw: self.min_kw,
            avg_kw: (self.sum_kw / f64::from(self.count)) as f32,
            max_kw: self.max_kw,
        })
    }
}

/// Per-meter state of R5 (one meter missing) and R7.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct MeterTrack {
    /// An open R5 event for this meter, started at this time.
    missing_since: Option<i64>,
    /// Bits of the power value repeated since `frozen_since_ms`.
    frozen_bits: u32,
    frozen_since_ms: Option<i64>,
    /// Time of the last reading of the run; a run never spans a gap longer
    /// than the stale span.
    frozen_last_ms: Option<i64>,
    frozen_open: bool,
    frozen_power: PowerAcc,
    last_energy_kwh: Option<f64>,
}

/// Snapshot of version 3: lines before R2-R7.
#[derive(Deserialize)]
struct LineStateV3 {
    line: String,
    clock_ms: Option<i64>,
    facilities: Vec<(String, FacilityState)>,
    r1_holds: bool,
    r1_unknown_since: Option<i64>,
    r1: Phase,
}

impl From<LineStateV3> for LineState {
    fn from(old: LineStateV3) -> LineState {
        let n = old.facilities.len();
        LineState {
            line: old.line,
            clock_ms: old.clock_ms,
            meters: vec![MeterTrack::default(); n],
            facilities: old.facilities,
            r1: Track {
                holds: old.r1_holds,
                unknown_since: old.r1_unknown_since,
                phase: old.r1,
                power: vec![PowerAcc::default(); n],
            },
            r1_started_by_production: false,
            r4: Track::empty(n),
            r6: Track::empty(n),
        }
    }
}

impl Track {
    fn empty(facilities: usize) -> Track {
        Track {
            power: vec![PowerAcc::default(); facilities],
            ..Track::default()
        }
    }
}

/// What a rule's check says about the line now, before the bookkeeping
/// of when it started or stopped.
enum Verdict {
    Holds {
        since_ms: i64,
        involved: BTreeSet<String>,
    },
    Clear,
    Unknown,
}

impl Track {
    /// Turns a verdict into a [`Condition`]: a clear after a gap ends when
    /// the condition was last known to hold; a clear after holding ends at
    /// `changed_at` (when the change that cleared it took effect).
    fn condition(&mut self, verdict: Verdict, now_ms: i64, changed_at: i64) -> Condition {
        let condition = match verdict {
            Verdict::Holds { since_ms, involved } => Condition::Holds { since_ms, involved },
            Verdict::Clear => Condition::Clear {
                since_ms: match self.unknown_since {
                    Some(since) => since,
                    None if self.holds => changed_at,
                    None => now_ms,
                },
            },
            Verdict::Unknown => Condition::Unknown {
                since_ms: self.unknown_since.unwrap_or(changed_at),
            },
        };
        self.holds = matches!(condition, Condition::Holds { .. });
        self.unknown_since = match condition {
            Condition::Unknown { since_ms } => Some(since_ms),
            _ => None,
        };
        condition
    }

    /// Adds a valid reading of facility `fi` to the evidence while an
    /// interval is pending or open; forgets it once idle.
    fn record(&mut self, fi: usize, kw: Option<f32>) {
        match self.phase {
            Phase::Idle { .. } => {
                if self.power.iter().any(|p| p.count > 0) {
                    self.power.iter_mut().for_each(|p| *p = PowerAcc::default());
                }
            }
            Phase::Clearing { .. } => {}
            Phase::Pending { .. } | Phase::Open { .. } => {
                if let (Some(acc), Some(kw)) = (self.power.get_mut(fi), kw) {
                    acc.add(kw);
                }
            }
        }
    }
}

/// A change of one rule on one line (or one meter of it), before it is
/// rendered as an [`Event`].
struct Found {
    rule: Rule,
    /// Index in `lines`.
    line: usize,
    /// For events about one meter (R5 one meter, R7): its facility index;
    /// the id then hashes `{line}/{facility}`.
    meter: Option<usize>,
    change: Change,
    evidence: BTreeMap<String, PowerEvidence>,
}

impl GatewayDetector {
    pub fn new(site: Arc<Site>, gateway: &str) -> GatewayDetector {
        GatewayDetector::with_lines(site, gateway, Vec::new())
    }

    /// Restores from a [`GatewayDetector::snapshot`]. Lines and facilities
    /// are matched by id, so a changed site file keeps what still applies
    /// and starts new ones unknown. Snapshots of versions 2 and 3 (R1 only)
    /// restore with R2-R7 starting idle.
    pub fn restore(
        site: Arc<Site>,
        gateway: &str,
        snapshot: &[u8],
    ) -> Result<GatewayDetector, SnapshotError> {
        const WHAT: &str = "detector snapshot";
        let (newest_sample_ms, gateway_state, saved) = match snapshot.first() {
            Some(&SNAPSHOT_VERSION_2) => {
                // Before the newest sample time was kept: the lines' clocks
                // are the newest samples of the meters they know.
                let saved: Vec<LineStateV3> = decode_versioned(snapshot, SNAPSHOT_VERSION_2, WHAT)?;
                let newest = saved.iter().filter_map(|l| l.clock_ms).max();
                (
                    newest,
                    None,
                    saved.into_iter().map(LineState::from).collect(),
                )
            }
            Some(&SNAPSHOT_VERSION_3) => {
                let (newest, saved): (Option<i64>, Vec<LineStateV3>) =
                    decode_versioned(snapshot, SNAPSHOT_VERSION_3, WHAT)?;
                (
                    newest,
                    None,
                    saved.into_iter().map(LineState::from).collect(),
                )
            }
            _ => {
                let (newest, gateway_state, saved): (Option<i64>, GatewayState, Vec<LineState>) =
                    decode_versioned(snapshot, SNAPSHOT_VERSION, WHAT)?;
                (newest, Some(gateway_state), saved)
            }
        };
        let mut detector = GatewayDetector::with_lines(site, gateway, saved);
        detector.newest_sample_ms = newest_sample_ms;
        detector.gateway_state = gateway_state.unwrap_or(GatewayState {
            // Older snapshots: the newest sample stands in for the newest
            // valid one.
            newest_valid_ms: newest_sample_ms,
            resumed_ms: newest_sample_ms,
            gap_open: false,
        });
        Ok(detector)
    }

    fn with_lines(site: Arc<Site>, gateway: &str, mut saved: Vec<LineState>) -> GatewayDetector {
        let mut meters = HashMap::new();
        let mut site_lines = Vec::new();
        let mut restrictions = Vec::new();
        let mut maintenance = Vec::new();
        let mut lines = Vec::new();
        for (site_index, line) in site.lines.iter().enumerate() {
            if site.gateway_of_line(line) != gateway {
                continue;
            }
            site_lines.push(site_index);
            restrictions.push(
                site.restrictions
                    .iter()
                    .filter(|r| r.lines.contains(&line.id))
                    .map(|r| (r.from_ms, r.until_ms))
                    .collect(),
            );
            maintenance.push(
                line.facilities
                    .iter()
                    .map(|f| {
                        site.maintenance
                            .iter()
                            .filter(|m| m.facilities.contains(&f.id))
                            .map(|m| (m.from_ms, m.until_ms))
                            .collect()
                    })
                    .collect(),
            );
            let old = saved
                .iter()
                .position(|s| s.line == line.id)
                .map(|i| saved.swap_remove(i));
            let index = lines.len();
            let n = line.facilities.len();
            // Position of each current facility in the saved state.
            let old_index: Vec<Option<usize>> = line
                .facilities
                .iter()
                .map(|f| {
                    old.as_ref()
                        .and_then(|o| o.facilities.iter().position(|(id, _)| *id == f.id))
                })
                .collect();
            let facilities = line
                .facilities
                .iter()
                .enumerate()
                .map(|(fi, f)| {
                    meters.insert(f.meter.clone(), (index, fi));
                    let state = old_index[fi]
                        .and_then(|i| old.as_ref().map(|o| o.facilities[i].1.clone()))
                        .unwrap_or_default();
                    (f.id.clone(), state)
                })
                .collect();
            let pick = |old: Option<&Vec<PowerAcc>>| -> Vec<PowerAcc> {
                old_index
                    .iter()
                    .map(|i| {
                        i.and_then(|i| old.and_then(|o| o.get(i).copied()))
                            .unwrap_or_default()
                    })
                    .collect()
            };
            let track = |old: Option<&Track>| match old {
                Some(t) => Track {
                    power: pick(Some(&t.power)),
                    ..t.clone()
                },
                None => Track::empty(n),
            };
            lines.push(LineState {
                line: line.id.clone(),
                clock_ms: old.as_ref().and_then(|o| o.clock_ms),
                facilities,
                meters: old_index
                    .iter()
                    .map(|i| {
                        i.and_then(|i| old.as_ref().and_then(|o| o.meters.get(i).cloned()))
                            .unwrap_or_default()
                    })
                    .collect(),
                r1: track(old.as_ref().map(|o| &o.r1)),
                r1_started_by_production: old.as_ref().is_some_and(|o| o.r1_started_by_production),
                r4: track(old.as_ref().map(|o| &o.r4)),
                r6: track(old.as_ref().map(|o| &o.r6)),
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
                restrictions,
                maintenance,
            }),
            newest_sample_ms: None,
            gateway_state: GatewayState::default(),
            lines,
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        encode_versioned(
            SNAPSHOT_VERSION,
            &(self.newest_sample_ms, &self.gateway_state, &self.lines),
        )
    }

    /// Time of the newest sample the gateway delivered, if any.
    pub fn newest_sample_ms(&self) -> Option<i64> {
        self.newest_sample_ms
    }

    /// The current state of every facility this gateway reads, for status
    /// displays: (line id, facility id, state, last power). A running
    /// facility below its R4 low-load fraction of rated shows
    /// [`State::LowLoad`].
    pub fn facility_states(&self) -> Vec<(String, String, State, Option<f32>)> {
        self.facility_statuses()
            .into_iter()
            .map(|f| (f.line, f.facility, f.state, f.last_power_kw))
            .collect()
    }

    /// What [`GatewayDetector::facility_states`] gives, with the time of
    /// each facility's last valid reading (the one its last power comes
    /// from), in site-file order of lines and facilities.
    pub fn facility_statuses(&self) -> Vec<FacilityStatus> {
        self.lines
            .iter()
            .zip(&self.layout.site_lines)
            .flat_map(|(l, &si)| {
                let cfg = &self.site.lines[si];
                l.facilities
                    .iter()
                    .zip(&cfg.facilities)
                    .map(|((id, f), c)| {
                        let state = if f.state == State::Running && low_load(c, f) {
                            State::LowLoad
                        } else {
                            f.state
                        };
                        FacilityStatus {
                            line: l.line.clone(),
                            facility: id.clone(),
                            state,
                            last_power_kw: f.last_power_kw,
                            last_sample_ms: f.last_valid_ms,
                        }
                    })
            })
            .collect()
    }

    /// Applies one batch: first the data lost before it (an R5 event, see
    /// [`GatewayDetector::data_interruption`]), then its samples
    /// ([`GatewayDetector::apply`]). A data-time gap event of the whole
    /// gateway with the same start is the same interruption: the delivery
    /// layer's event, which says what was lost, replaces it.
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
        let first_id = events.first().map(|e| e.id.clone());
        events.extend(
            self.apply(samples, wall_now_ms)
                .into_iter()
                .filter(|e| Some(&e.id) != first_id.as_ref()),
        );
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
            facilities: self.all_facilities(),
            historical: wall_now_ms - end_ms > HISTORICAL_LAG_MS,
            notice_en: notice.en,
            notice_zh: notice.zh,
            data_loss: Some(loss),
            evidence: BTreeMap::new(),
        }
    }

    fn all_facilities(&self) -> Vec<String> {
        let facilities: BTreeSet<String> = self
            .layout
            .site_lines
            .iter()
            .flat_map(|&i| self.site.lines[i].facilities.iter().map(|f| f.id.clone()))
            .collect();
        facilities.into_iter().collect()
    }

    /// Applies samples in order; returns every event opened, widened or
    /// closed by them, the latest version of each once. Samples of meters
    /// that measure no facility of this gateway are ignored (but count as
    /// data the gateway delivered).
    pub fn apply(&mut self, samples: &[Sample], wall_now_ms: i64) -> Vec<Event> {
        let mut events: Vec<Event> = Vec::new();
        let mut push = |event: Event| match events.iter_mut().find(|e| e.id == event.id) {
            Some(existing) => *existing = event,
            None => events.push(event),
        };
        let layout = self.layout.clone();
        let mut found = Vec::new();
        for sample in samples {
            self.newest_sample_ms = Some(
                self.newest_sample_ms
                    .map_or(sample.time_ms, |t| t.max(sample.time_ms)),
            );
            let power = valid_power(sample);
            if let Some(event) = self.gateway_gap(sample.time_ms, power.is_some(), wall_now_ms) {
                push(event);
            }
            let Some(&(li, fi)) = layout.meters.get(&sample.meter) else {
                continue;
            };
            self.step(li, fi, sample, power, &mut found);
            for f in found.drain(..) {
                push(self.event(f, wall_now_ms));
            }
        }
        events
    }

    /// R5 for the whole gateway, in data time: no valid sample of any
    /// meter for more than `gap_polls` polls. Opens when a sample (of any
    /// quality) shows the gap is that long, closes with the next valid
    /// sample; a gap only seen when data resumes opens and closes at once.
    fn gateway_gap(&mut self, time_ms: i64, valid: bool, wall_now_ms: i64) -> Option<Event> {
        let gap_ms = self.layout.poll_ms * i64::from(self.site.rules.r5.gap_polls);
        let g = &mut self.gateway_state;
        let Some(last) = g.newest_valid_ms else {
            if valid {
                g.newest_valid_ms = Some(time_ms);
                g.resumed_ms = Some(time_ms);
            }
            return None;
        };
        let long = time_ms - last > gap_ms;
        let change = if valid {
            let change = (long || g.gap_open).then(|| Change::Closed {
                start_ms: last,
                end_ms: time_ms.max(last),
                facilities: BTreeSet::new(),
            });
            if long || g.gap_open {
                g.resumed_ms = Some(time_ms);
            }
            g.gap_open = false;
            g.newest_valid_ms = Some(last.max(time_ms));
            change
        } else if long && !g.gap_open {
            g.gap_open = true;
            Some(Change::Opened {
                start_ms: last,
                facilities: BTreeSet::new(),
            })
        } else {
            None
        };
        change.map(|change| self.gateway_event(change, wall_now_ms))
    }

    fn gateway_event(&self, change: Change, wall_now_ms: i64) -> Event {
        let (status, start_ms, end_ms) = match change {
            Change::Closed {
                start_ms, end_ms, ..
            } => (EventStatus::Closed, start_ms, Some(end_ms)),
            Change::Opened { start_ms, .. } | Change::Widened { start_ms, .. } => {
                (EventStatus::Open, start_ms, None)
            }
        };
        let until = end_ms.unwrap_or_else(|| self.newest_sample_ms.unwrap_or(start_ms));
        let notice = notice::render_gateway_gap(
            &self.site,
            &self.gateway,
            start_ms,
            until,
            end_ms.is_some(),
        );
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
            status,
            start_ms,
            end_ms,
            facilities: self.all_facilities(),
            historical: end_ms.is_some_and(|end| wall_now_ms - end > HISTORICAL_LAG_MS),
            notice_en: notice.en,
            notice_zh: notice.zh,
            data_loss: None,
            evidence: BTreeMap::new(),
        }
    }

    fn step(
        &mut self,
        li: usize,
        fi: usize,
        sample: &Sample,
        power: Option<f32>,
        found: &mut Vec<Found>,
    ) {
        let site = &self.site;
        let layout = &*self.layout;
        let cfg = &site.lines[layout.site_lines[li]];
        let rules = &cfg.rules;
        let poll_ms = layout.poll_ms;
        let limits = |f: &facwatch_proto::site::Facility| Limits {
            start_kw: f.start_threshold_kw,
            stop_kw: f.stop_threshold_kw,
            debounce: rules.debounce_samples,
            stale_after_ms: poll_ms * i64::from(rules.stale_after_polls),
        };
        let resumed_ms = self.gateway_state.resumed_ms;
        let line = &mut self.lines[li];
        // Event time: the line's clock never runs backwards, so a sample
        // stamped slightly before one already seen counts at the clock.
        let previous_ms = line.clock_ms;
        let now_ms = previous_ms.map_or(sample.time_ms, |c| c.max(sample.time_ms));
        line.clock_ms = Some(now_ms);
        let maintenance = &layout.maintenance[li];
        let active = |fi: usize| !inside(&maintenance[fi], now_ms);

        let mut transitions: Vec<Transition> = Vec::new();
        transitions.extend(line.facilities[fi].1.observe(
            now_ms,
            power,
            &limits(&cfg.facilities[fi]),
        ));
        for (state, f) in line.facilities.iter_mut().zip(&cfg.facilities) {
            transitions.extend(state.1.expire(now_ms, &limits(f)));
        }
        let changed_at = transitions.iter().map(|t| t.at_ms).max().unwrap_or(now_ms);
        // Interval::advance: the states are settled up to the first reading
        // of any change still pending its debounce.
        let settled_ms = line
            .facilities
            .iter()
            .filter_map(|f| f.1.pending_since())
            .min()
            .map_or(now_ms, |pending| pending.min(now_ms));

        // Per meter: R5 (one meter missing while others report), R7.
        let gap_ms = poll_ms * i64::from(rules.r5.gap_polls);
        if power.is_some() {
            if let Some(start_ms) = line.meters[fi].missing_since.take() {
                found.push(meter_found(
                    Rule::R5,
                    li,
                    fi,
                    Change::Closed {
                        start_ms,
                        end_ms: now_ms.max(start_ms),
                        facilities: BTreeSet::new(),
                    },
                ));
            }
            for (fj, (state, track)) in line
                .facilities
                .iter()
                .zip(line.meters.iter_mut())
                .enumerate()
            {
                if fj == fi || track.missing_since.is_some() || !active(fj) {
                    continue;
                }
                // A meter that never delivered a valid reading is a
                // commissioning matter, not an interruption.
                let Some(last_valid) = state.1.last_valid_ms else {
                    continue;
                };
                let base = resumed_ms.map_or(last_valid, |r| last_valid.max(r));
                if now_ms - base > gap_ms {
                    track.missing_since = Some(base);
                    found.push(meter_found(
                        Rule::R5,
                        li,
                        fj,
                        Change::Opened {
                            start_ms: base,
                            facilities: BTreeSet::new(),
                        },
                    ));
                }
            }
        }
        let stale_after_ms = poll_ms * i64::from(rules.stale_after_polls);
        frozen_and_counter(
            line,
            cfg,
            li,
            fi,
            sample,
            power,
            now_ms,
            active(fi),
            stale_after_ms,
            found,
        );

        // R1, and R2 / R3 when its condition clears short of R1's minimum.
        let verdict = r1_verdict(cfg, line, &active);
        if let Verdict::Holds { since_ms, .. } = &verdict {
            if !line.r1.holds {
                let production_since = running_since(cfg, line, &active, Role::Production, false);
                line.r1_started_by_production = production_since == Some(*since_ms);
            }
        }
        let production_off = !matches!(r1_verdict_production(cfg, line, &active), Some(true));
        let r1_min = rules.r1.min_duration.as_millis() as i64;
        let pending = match &line.r1.phase {
            Phase::Pending {
                start_ms,
                facilities,
            } => Some((*start_ms, facilities.clone())),
            _ => None,
        };
        let condition = line.r1.condition(verdict, now_ms, changed_at);
        if let (Some((start_ms, facilities)), Condition::Clear { since_ms }) = (pending, &condition)
        {
            let end_ms = (*since_ms).clamp(start_ms, now_ms);
            let held = end_ms - start_ms;
            let (rule, limit) = if line.r1_started_by_production && !production_off {
                (Rule::R2, rules.r2.late_after)
            } else if !line.r1_started_by_production && production_off {
                (Rule::R3, rules.r3.after)
            } else {
                (Rule::R1, Duration::MAX)
            };
            if rule != Rule::R1 && held > limit.as_millis() as i64 && held < r1_min {
                let evidence = evidence_of(cfg, &line.r1, &facilities);
                found.push(Found {
                    rule,
                    line: li,
                    meter: None,
                    change: Change::Closed {
                        start_ms,
                        end_ms,
                        facilities,
                    },
                    evidence,
                });
            }
        }
        let d = durations(&rules.r1);
        advance(
            &mut line.r1,
            cfg,
            li,
            Rule::R1,
            now_ms,
            settled_ms,
            condition,
            d,
            found,
        );

        // R4: low-load treatment while production produces.
        let verdict = r4_verdict(cfg, line, &active, now_ms);
        let condition = line.r4.condition(verdict, now_ms, now_ms);
        let d = Durations {
            min_ms: rules.r4.min_duration.as_millis() as i64,
            clear_ms: rules.r4.clear_duration.as_millis() as i64,
        };
        advance(
            &mut line.r4,
            cfg,
            li,
            Rule::R4,
            now_ms,
            settled_ms,
            condition,
            d,
            found,
        );

        // R6: production inside a restriction window.
        let windows = &layout.restrictions[li];
        if !windows.is_empty() || line.r6.phase != Phase::default() {
            let window_since = windows
                .iter()
                .filter(|&&(from, until)| from <= now_ms && now_ms < until)
                .map(|&(from, _)| from)
                .min();
            // A window that ended since the previous sample ends the hold.
            let ended = windows
                .iter()
                .map(|&(_, until)| until)
                .filter(|&until| previous_ms.is_some_and(|p| p < until) && until <= now_ms)
                .max();
            let running = running_since(cfg, line, &active, Role::Production, false);
            let verdict = match (window_since, running) {
                (Some(w), Some(p)) => Verdict::Holds {
                    since_ms: w.max(p),
                    involved: involved(cfg, line, &active, |f, s| {
                        f.role() == Role::Production && s.state == State::Running
                    }),
                },
                (None, _) => Verdict::Clear,
                (Some(_), None) if all_known(cfg, line, &active, Role::Production) => {
                    Verdict::Clear
                }
                (Some(_), None) => Verdict::Unknown,
            };
            let changed = match ended {
                Some(until) if window_since.is_none() => until,
                _ => changed_at,
            };
            let condition = line.r6.condition(verdict, now_ms, changed);
            let d = durations(&rules.r6);
            advance(
                &mut line.r6,
                cfg,
                li,
                Rule::R6,
                now_ms,
                settled_ms,
                condition,
                d,
                found,
            );
        }

        // Evidence: this reading counts for every interval pending or open.
        for track in [&mut line.r1, &mut line.r4, &mut line.r6] {
            track.record(fi, power);
        }
    }

    fn event(&self, found: Found, wall_now_ms: i64) -> Event {
        let line_id = &self.lines[found.line].line;
        let line = &self.site.lines[self.layout.site_lines[found.line]];
        let (status, start_ms, end_ms, facilities) = match found.change {
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
        let mut facilities: Vec<String> = facilities.into_iter().collect();
        let id_line = match found.meter {
            Some(fi) => {
                let id = &line.facilities[fi].id;
                facilities = vec![id.clone()];
                format!("{line_id}/{id}")
            }
            None => line_id.clone(),
        };
        let now_in_data = self.lines[found.line].clock_ms.unwrap_or(start_ms);
        let notice = notice::render(
            &self.site,
            line,
            found.rule,
            start_ms,
            end_ms.unwrap_or(now_in_data),
            end_ms.is_some(),
            &facilities,
        );
        Event {
            id: event_id(&self.site.id, &id_line, found.rule, start_ms),
            site: self.site.id.clone(),
            gateway: self.gateway.clone(),
            line: line_id.clone(),
            rule: found.rule,
            status,
            start_ms,
            end_ms,
            facilities,
            historical: end_ms.is_some_and(|end| wall_now_ms - end > HISTORICAL_LAG_MS),
            notice_en: notice.en,
            notice_zh: notice.zh,
            data_loss: None,
            evidence: found.evidence,
        }
    }
}

/// The power of a sample if it is valid (quality ok, a finite value).
fn valid_power(sample: &Sample) -> Option<f32> {
    sample
        .values
        .power_kw
        .filter(|p| p.is_finite() && sample.quality == facwatch_proto::wire::Quality::Ok)
}

fn durations(settings: &facwatch_proto::site::R1Settings) -> Durations {
    Durations {
        min_ms: settings.min_duration.as_millis() as i64,
        clear_ms: settings.clear_duration.as_millis() as i64,
    }
}

fn meter_found(rule: Rule, li: usize, fi: usize, change: Change) -> Found {
    Found {
        rule,
        line: li,
        meter: Some(fi),
        change,
        evidence: BTreeMap::new(),
    }
}

/// Advances a line rule's interval and reports its changes with evidence.
#[allow(clippy::too_many_arguments)]
fn advance(
    track: &mut Track,
    cfg: &Line,
    li: usize,
    rule: Rule,
    now_ms: i64,
    settled_ms: i64,
    condition: Condition,
    d: Durations,
    found: &mut Vec<Found>,
) {
    for change in track.phase.advance(now_ms, settled_ms, condition, d) {
        let facilities = match &change {
            Change::Opened { facilities, .. }
            | Change::Widened { facilities, .. }
            | Change::Closed { facilities, .. } => facilities,
        };
        let evidence = evidence_of(cfg, track, facilities);
        found.push(Found {
            rule,
            line: li,
            meter: None,
            change,
            evidence,
        });
    }
}

/// Evidence of an interval: its facilities and the line's production.
fn evidence_of(
    cfg: &Line,
    track: &Track,
    facilities: &BTreeSet<String>,
) -> BTreeMap<String, PowerEvidence> {
    cfg.facilities
        .iter()
        .zip(&track.power)
        .filter(|(f, _)| f.role() == Role::Production || facilities.contains(&f.id))
        .filter_map(|(f, acc)| acc.evidence().map(|e| (f.id.clone(), e)))
        .collect()
}

/// R7 for one reading: the same non-zero power for the frozen duration
/// opens an interval (from the first of the identical readings) that closes
/// with the first different valid reading; an energy reading below the
/// previous one is a point event. A facility in maintenance is skipped and
/// its frozen run forgotten (an open one closes at the reading).
#[allow(clippy::too_many_arguments)]
fn frozen_and_counter(
    line: &mut LineState,
    cfg: &Line,
    li: usize,
    fi: usize,
    sample: &Sample,
    power: Option<f32>,
    now_ms: i64,
    active: bool,
    stale_after_ms: i64,
    found: &mut Vec<Found>,
) {
    let track = &mut line.meters[fi];
    let frozen_ms = cfg.facilities[fi].rules.frozen_after.as_millis() as i64;
    let evidence = |acc: &PowerAcc| -> BTreeMap<String, PowerEvidence> {
        acc.evidence()
            .map(|e| (cfg.facilities[fi].id.clone(), e))
            .into_iter()
            .collect()
    };
    if let Some(kw) = power {
        let contiguous = track
            .frozen_last_ms
            .is_some_and(|last| now_ms - last <= stale_after_ms);
        track.frozen_last_ms = Some(now_ms);
        let same =
            contiguous && track.frozen_since_ms.is_some() && track.frozen_bits == kw.to_bits();
        if same && active {
            track.frozen_power.add(kw);
            let since = track.frozen_since_ms.unwrap_or(now_ms);
            if !track.frozen_open && now_ms - since >= frozen_ms {
                track.frozen_open = true;
                found.push(Found {
                    evidence: evidence(&track.frozen_power),
                    ..meter_found(
                        Rule::R7,
                        li,
                        fi,
                        Change::Opened {
                            start_ms: since,
                            facilities: BTreeSet::new(),
                        },
                    )
                });
            }
        } else {
            // The value was frozen from the run's first reading to this
            // first different one (like R1, whose condition ends at the
            // first reading that breaks it): a run that reached the
            // minimum only now opens and closes at once.
            let reached = contiguous
                && track
                    .frozen_since_ms
                    .is_some_and(|since| now_ms - since >= frozen_ms);
            if let (true, Some(since)) = (track.frozen_open || reached, track.frozen_since_ms) {
                found.push(Found {
                    evidence: evidence(&track.frozen_power),
                    ..meter_found(
                        Rule::R7,
                        li,
                        fi,
                        Change::Closed {
                            start_ms: since,
                            end_ms: now_ms,
                            facilities: BTreeSet::new(),
                        },
                    )
                });
            }
            track.frozen_open = false;
            track.frozen_power = PowerAcc::default();
            if kw != 0.0 && active {
                track.frozen_bits = kw.to_bits();
                track.frozen_since_ms = Some(now_ms);
                track.frozen_power.add(kw);
            } else {
                track.frozen_since_ms = None;
            }
        }
    }
    let energy = sample
        .values
        .energy_kwh
        .filter(|e| e.is_finite() && sample.quality == facwatch_proto::wire::Quality::Ok);
    if let Some(kwh) = energy {
        if let (Some(previous), true) = (track.last_energy_kwh, active) {
            if kwh < previous {
                found.push(meter_found(
                    Rule::R7,
                    li,
                    fi,
                    Change::Closed {
                        start_ms: now_ms,
                        end_ms: now_ms,
                        facilities: BTreeSet::new(),
                    },
                ));
            }
        }
        track.last_energy_kwh = Some(kwh);
    }
}

/// Running but below its low-load fraction of rated (treatment, R4).
fn low_load(f: &Facility, s: &FacilityState) -> bool {
    f.role() == Role::Treatment
        && s.last_power_kw
            .is_some_and(|p| f64::from(p) < f.rules.low_load_fraction * f.rated_kw)
}

/// Running above its producing fraction of rated (production, R4).
fn producing(f: &Facility, s: &FacilityState) -> bool {
    s.state == State::Running
        && s.last_power_kw
            .is_some_and(|p| f64::from(p) > f.rules.producing_fraction * f.rated_kw)
}

/// Earliest `since` of active facilities of `role` running (`critical`:
/// only critical ones, for treatment).
fn running_since(
    cfg: &Line,
    line: &LineState,
    active: &dyn Fn(usize) -> bool,
    role: Role,
    critical: bool,
) -> Option<i64> {
    cfg.facilities
        .iter()
        .zip(&line.facilities)
        .enumerate()
        .filter(|(i, (f, (_, s)))| {
            active(*i) && f.role() == role && (!critical || f.critical) && s.state == State::Running
        })
        .map(|(_, (_, (_, s)))| s.since_ms)
        .min()
}

fn all_known(cfg: &Line, line: &LineState, active: &dyn Fn(usize) -> bool, role: Role) -> bool {
    cfg.facilities
        .iter()
        .zip(&line.facilities)
        .enumerate()
        .filter(|(i, (f, _))| active(*i) && f.role() == role)
        .all(|(_, (_, (_, s)))| s.state != State::Unknown)
}

fn involved(
    cfg: &Line,
    line: &LineState,
    active: &dyn Fn(usize) -> bool,
    pick: impl Fn(&Facility, &FacilityState) -> bool,
) -> BTreeSet<String> {
    cfg.facilities
        .iter()
        .zip(&line.facilities)
        .enumerate()
        .filter(|(i, (f, (_, s)))| active(*i) && pick(f, s))
        .map(|(_, (f, _))| f.id.clone())
        .collect()
}

/// Whether any active production facility runs: `None` when none runs
/// but some is unknown.
fn r1_verdict_production(
    cfg: &Line,
    line: &LineState,
    active: &dyn Fn(usize) -> bool,
) -> Option<bool> {
    if running_since(cfg, line, active, Role::Production, false).is_some() {
        Some(true)
    } else if all_known(cfg, line, active, Role::Production) {
        Some(false)
    } else {
        None
    }
}

/// R1: any production facility running and any critical treatment facility
/// stopped. Involved: every treatment facility stopped (critical or not).
/// It is clear when every production facility is known and none runs, or
/// every critical treatment facility is known and none is stopped;
/// otherwise, a gap in the data leaves it unknown. Facilities in
/// maintenance take no part.
fn r1_verdict(cfg: &Line, line: &LineState, active: &dyn Fn(usize) -> bool) -> Verdict {
    let states = || cfg.facilities.iter().zip(&line.facilities).enumerate();
    let critical =
        || states().filter(|(i, (f, _))| active(*i) && f.role() == Role::Treatment && f.critical);
    let running_since = running_since(cfg, line, active, Role::Production, false);
    let critical_stopped_since = critical()
        .filter(|(_, (_, (_, s)))| s.state == State::Stopped)
        .map(|(_, (_, (_, s)))| s.since_ms)
        .min();
    if let (Some(p), Some(t)) = (running_since, critical_stopped_since) {
        return Verdict::Holds {
            since_ms: p.max(t),
            involved: involved(cfg, line, active, |f, s| {
                f.role() == Role::Treatment && s.state == State::Stopped
            }),
        };
    }
    let clear = (running_since.is_none() && all_known(cfg, line, active, Role::Production))
        || (critical_stopped_since.is_none()
            && critical().all(|(_, (_, (_, s)))| s.state != State::Unknown));
    if clear {
        Verdict::Clear
    } else {
        Verdict::Unknown
    }
}

/// R4: any active production facility producing (running above its
/// producing fraction of rated) and any active treatment facility running
/// below its low-load fraction. Involved: the low-load treatment
/// facilities. The start is the sample that first showed it.
fn r4_verdict(
    cfg: &Line,
    line: &LineState,
    active: &dyn Fn(usize) -> bool,
    now_ms: i64,
) -> Verdict {
    let states = || cfg.facilities.iter().zip(&line.facilities).enumerate();
    let any_producing = states()
        .any(|(i, (f, (_, s)))| active(i) && f.role() == Role::Production && producing(f, s));
    let idling = involved(cfg, line, active, |f, s| {
        f.role() == Role::Treatment && s.state == State::Running && low_load(f, s)
    });
    if any_producing && !idling.is_empty() {
        return Verdict::Holds {
            since_ms: now_ms,
            involved: idling,
        };
    }
    let production_known = all_known(cfg, line, active, Role::Production);
    let treatment_known = all_known(cfg, line, active, Role::Treatment);
    if (!any_producing && production_known) || (idling.is_empty() && treatment_known) {
        Verdict::Clear
    } else {
        Verdict::Unknown
    }
}

/// A time as events show it: RFC 3339 with the zone's offset, seconds
/// unless the time has milliseconds (the one format of the API, MQTT and
/// logs).
pub(crate) fn rfc3339(ms: i64, tz: chrono_tz::Tz) -> String {
    notice::rfc3339(ms, tz)
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
            Some(&EVENT_VERSION_2) => {
                decode_versioned::<EventV2>(bytes, EVENT_VERSION_2, WHAT).map(Event::from)
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
            "evidence": self
                .evidence
                .iter()
                .map(|(facility, e)| {
                    let power = serde_json::json!({
                        "min_kw": kw_json(e.min_kw),
                        "avg_kw": kw_json(e.avg_kw),
                        "max_kw": kw_json(e.max_kw),
                    });
                    (facility.clone(), power)
                })
                .collect::<serde_json::Map<_, _>>(),
            "notice": { "zh": self.notice_zh, "en": self.notice_en },
        });
        if let (Some(loss), Some(fields)) = (self.data_loss, json.as_object_mut()) {
            fields.insert("samples_dropped".into(), loss.samples_dropped.into());
            fields.insert("batches_missing".into(), loss.batches_missing.into());
        }
        json
    }
}

/// A power in kW as JSON: the f32's shortest decimal (`9.7`, not
/// `9.699999809265137`), `null` if not finite.
pub(crate) fn kw_json(power: f32) -> serde_json::Value {
    power
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
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
