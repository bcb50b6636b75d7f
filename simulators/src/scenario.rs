//! The scenario file: what the simulated plant does over a span of virtual
//! time (see `deploy/stenter-plant.scenario.toml`).
//!
//! Two stages, as everywhere in facwatch: `raw` serde structs that refuse
//! unknown keys, then [`Scenario`], built only after every reference is
//! checked. Invariants of a [`Scenario`]:
//! - it holds the validated [`Site`] its `site_file` names, and every line,
//!   facility and meter it mentions exists in that site;
//! - `start_ms < end_ms`, `time_scale` is finite and positive;
//! - every shift covers at least one line and is not empty
//!   (`production_end < production_start` means it runs past midnight);
//!   leads and lags are at most 12 hours;
//! - every fault window is non-empty and overlaps the scenario's span;
//! - a `slow_reply` delay is below the timeout of every meter it names
//!   (the gateway still takes the answer) and a `late_reply` delay is
//!   above it (the answer arrives after the gateway gave up), both at most
//!   [`MAX_REPLY_DELAY_MS`];
//! - a `treatment_late` (`treatment_early`) window holds at least one
//!   production start (end) of every line it names, each such line has a
//!   treatment facility, and the offset is positive and shorter than every
//!   shift it changes;
//! - a `low_load` fraction is in (0, 1.5]; an `energy_backwards` drop is in
//!   (0, [`MAX_ENERGY_DROP_KWH`]], so no counter reads below zero;
//! - a fault carries only the keys of its kind;
//! - facility overrides name distinct facilities and hold sane numbers;
//! - no two meters of the site share one TCP endpoint and unit id (the
//!   site file checks it: a real RS-485 bus could not tell them apart).
//!
//! Errors name the file, the key (as a dotted path) and the problem.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, TimeZone};
use chrono_tz::Tz;
use facwatch_proto::site::{parse_toml, read_toml, ConfigError, Role, Site};

/// A validated scenario: the site it drives and what happens when.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub site: Site,
    /// Seeds every random-looking quantity (noise, voltages, initial
    /// counters): equal seeds give equal readings.
    pub seed: u64,
    /// Virtual time (Unix ms) the clock starts at.
    pub start_ms: i64,
    /// Virtual time (Unix ms) the scenario ends at.
    pub end_ms: i64,
    /// Virtual seconds per wall-clock second.
    pub time_scale: f64,
    pub shifts: Vec<Shift>,
    pub faults: Vec<Fault>,
    pub facility_overrides: Vec<FacilityOverride>,
}

/// A daily production window of some lines, in the site's local time.
#[derive(Debug, Clone, PartialEq)]
pub struct Shift {
    pub lines: Vec<String>,
    pub production_start: NaiveTime,
    /// Earlier than `production_start`: the shift ends the next day.
    pub production_end: NaiveTime,
    /// Treatment starts this long before production.
    pub treatment_lead: Duration,
    /// Treatment stops this long after production.
    pub treatment_lag: Duration,
}

/// A half-open span of virtual time `[from_ms, until_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_ms: i64,
    pub until_ms: i64,
}

impl Window {
    pub fn contains(&self, at_ms: i64) -> bool {
        self.from_ms <= at_ms && at_ms < self.until_ms
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub window: Window,
    pub effect: FaultEffect,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FaultEffect {
    /// The facilities draw their off level (stopped, tripped).
    FacilityOff { facilities: Vec<String> },
    /// The meters do not answer at all.
    MeterSilent { meters: Vec<String> },
    /// The meters answer every request with this Modbus exception code.
    ModbusException { meters: Vec<String>, code: u8 },
    /// The meters answer correctly, `delay` (wall clock) after the request,
    /// within their timeout.
    SlowReply {
        meters: Vec<String>,
        delay: Duration,
    },
    /// The meters answer `delay` (wall clock) after the request, beyond
    /// their timeout: the answer arrives when the gateway has given up.
    LateReply {
        meters: Vec<String>,
        delay: Duration,
    },
    /// The meters answer with a corrupted CRC (RTU); on Modbus TCP, which
    /// has no CRC, they do not answer.
    BadCrc { meters: Vec<String> },
    /// At every production start of the lines inside the window, their
    /// treatment facilities are off from `lead` before it until `late`
    /// after it: treatment starts `late` after production (R2).
    TreatmentLate { lines: Vec<String>, late: Duration },
    /// At every production end of the lines inside the window, their
    /// treatment facilities are off from `early` before it until `lag`
    /// after it: treatment stops `early` before production (R3).
    TreatmentEarly { lines: Vec<String>, early: Duration },
    /// While running, the facilities draw `fraction` of their rated power
    /// instead of their running fraction (R4). The first listed of
    /// overlapping `low_load` faults wins.
    LowLoad {
        facilities: Vec<String>,
        fraction: f64,
    },
    /// The meters read, all values alike, what they read at the window's
    /// start (R7, frozen value); afterwards they read true again.
    FrozenValue { meters: Vec<String> },
    /// The meters' energy counters read `drop_kwh` less inside the window
    /// (R7, energy going backwards at `from`); at `until` they read true
    /// again. Overlapping drops add up.
    EnergyBackwards { meters: Vec<String>, drop_kwh: f64 },
}

/// The largest `drop_kwh` of an `energy_backwards` fault: every simulated
/// counter starts at 1000 kWh or more, so it never reads below zero.
pub const MAX_ENERGY_DROP_KWH: f64 = 1000.0;

/// Which end of a production window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShiftEdge {
    Start,
    End,
}

/// How a meter's faults change its answers at one instant. Several faults
/// may overlap; [`MeterFaults::default`] is a healthy meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeterFaults {
    /// No answer at all; wins over everything else (a meter that does not
    /// answer cannot answer late or with an exception).
    pub silent: bool,
    /// Answer every request with this exception code (the first such fault
    /// in the file wins).
    pub exception: Option<u8>,
    /// Corrupt the answer's CRC (RTU) or send nothing (Modbus TCP).
    pub bad_crc: bool,
    /// Wall-clock wait before answering: the longest of the overlapping
    /// `slow_reply` and `late_reply` delays, zero without them.
    pub delay: Duration,
}

/// The longest `delay_ms` of a `slow_reply` or `late_reply` fault.
pub const MAX_REPLY_DELAY_MS: u64 = 60_000;

/// Scenario-specific load of one facility; `None` keeps the default of its
/// kind.
#[derive(Debug, Clone, PartialEq)]
pub struct FacilityOverride {
    pub facility: String,
    /// Running draw as a fraction of the rated power.
    pub running_fraction: Option<f64>,
    /// Draw when not running (idle production, standby treatment), kW.
    pub idle_kw: Option<f64>,
    /// Noise amplitude, percent of the draw.
    pub noise_pct: Option<f64>,
    /// Fixed power factor instead of the default 0.80-0.88.
    pub power_factor: Option<f64>,
}

const MAX_LEAD_OR_LAG_MINS: u32 = 12 * 60;

impl Scenario {
    /// Loads a scenario file and the site file it names (relative to the
    /// scenario file's directory).
    pub fn load(path: &Path) -> Result<Scenario, ConfigError> {
        let (raw, file) = read_toml::<raw::ScenarioFile>(path)?;
        let site_path = path
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .join(&raw.site_file);
        let site = Site::load(&site_path).map_err(|e| {
            if e.key.is_none() && e.problem.starts_with("cannot read") {
                // Say where the path came from, not only that it is missing.
                ConfigError::new(&file, "site_file", format!("{}: {}", e.file, e.problem))
            } else {
                e
            }
        })?;
        Scenario::validate(raw, &file, site)
    }

    /// Parses and validates scenario text for an already loaded `site`;
    /// `file` names the text in errors. Its `site_file` key is only checked
    /// for presence.
    pub fn from_toml(text: &str, file: &str, site: Site) -> Result<Scenario, ConfigError> {
        Scenario::validate(parse_toml(text, file)?, file, site)
    }

    /// The faults a meter shows at virtual time `at_ms` (see
    /// [`MeterFaults`] for how overlapping faults combine).
    pub fn meter_faults(&self, meter: &str, at_ms: i64) -> MeterFaults {
        let mut found = MeterFaults::default();
        let names = |meters: &[String]| meters.iter().any(|m| m == meter);
        for fault in self.faults.iter().filter(|f| f.window.contains(at_ms)) {
            match &fault.effect {
                FaultEffect::FacilityOff { .. }
                | FaultEffect::TreatmentLate { .. }
                | FaultEffect::TreatmentEarly { .. }
                | FaultEffect::LowLoad { .. }
                | FaultEffect::FrozenValue { .. }
                | FaultEffect::EnergyBackwards { .. } => {}
                FaultEffect::MeterSilent { meters } => found.silent |= names(meters),
                FaultEffect::ModbusException { meters, code } => {
                    if found.exception.is_none() && names(meters) {
                        found.exception = Some(*code);
                    }
                }
                FaultEffect::SlowReply { meters, delay }
                | FaultEffect::LateReply { meters, delay } => {
                    if names(meters) {
                        found.delay = found.delay.max(*delay);
                    }
                }
                FaultEffect::BadCrc { meters } => found.bad_crc |= names(meters),
            }
        }
        found
    }

    fn validate(raw: raw::ScenarioFile, file: &str, site: Site) -> Result<Scenario, ConfigError> {
        let err = |key: String, problem: String| ConfigError::new(file, key, problem);
        if raw.site_file.trim().is_empty() {
            return Err(err("site_file".into(), "must name the site file".into()));
        }

        let start_ms = timestamp_ms(&raw.start, "start", file)?;
        let end_ms = timestamp_ms(&raw.end, "end", file)?;
        if end_ms <= start_ms {
            return Err(err(
                "end".into(),
                format!("must be after start ({})", time_text(&raw.start)),
            ));
        }
        if !(raw.time_scale.is_finite() && raw.time_scale > 0.0) {
            return Err(err(
                "time_scale".into(),
                format!("{} must be a positive number", raw.time_scale),
            ));
        }

        let facility_exists = |id: &str| {
            site.lines
                .iter()
                .any(|l| l.facilities.iter().any(|f| f.id == id))
        };
        let meter_exists = |id: &str| site.meters.iter().any(|m| m.id == id);
        let line_exists = |id: &str| site.lines.iter().any(|l| l.id == id);

        let mut shifts = Vec::new();
        for (i, s) in raw.shifts.iter().enumerate() {
            let key = |k: &str| format!("shifts[{i}].{k}");
            check_names(
                &s.lines,
                line_exists,
                "line",
                &key("lines"),
                &raw.site_file,
                file,
            )?;
            let production_start =
                time_of_day(&s.production_start, &key("production_start"), file)?;
            let production_end = time_of_day(&s.production_end, &key("production_end"), file)?;
            if production_start == production_end {
                return Err(err(
                    key("production_end"),
                    "equals production_start; a shift needs a length".into(),
                ));
            }
            for (name, mins) in [
                ("treatment_lead_mins", s.treatment_lead_mins),
                ("treatment_lag_mins", s.treatment_lag_mins),
            ] {
                if mins > MAX_LEAD_OR_LAG_MINS {
                    return Err(err(
                        key(name),
                        format!("{mins} is more than {MAX_LEAD_OR_LAG_MINS} minutes"),
                    ));
                }
            }
            shifts.push(Shift {
                lines: s.lines.clone(),
                production_start,
                production_end,
                treatment_lead: Duration::from_secs(u64::from(s.treatment_lead_mins) * 60),
                treatment_lag: Duration::from_secs(u64::from(s.treatment_lag_mins) * 60),
            });
        }

        let mut faults = Vec::new();
        for (i, f) in raw.faults.iter().enumerate() {
            let key = |k: &str| format!("faults[{i}].{k}");
            let from_ms = timestamp_ms(&f.from, &key("from"), file)?;
            let until_ms = timestamp_ms(&f.until, &key("until"), file)?;
            if until_ms <= from_ms {
                return Err(err(key("until"), "must be after from".into()));
            }
            if until_ms <= start_ms || from_ms >= end_ms {
                return Err(err(
                    key("from"),
                    "the fault window lies outside the scenario's start..end".into(),
                ));
            }
            let kind = f.kind;
            // Every optional key, in the order a misplaced one is reported.
            let given = [
                ("facilities", f.facilities.is_some()),
                ("meters", f.meters.is_some()),
                ("lines", f.lines.is_some()),
                ("code", f.code.is_some()),
                ("delay_ms", f.delay_ms.is_some()),
                ("late_secs", f.late_secs.is_some()),
                ("early_secs", f.early_secs.is_some()),
                ("fraction", f.fraction.is_some()),
                ("drop_kwh", f.drop_kwh.is_some()),
            ];
            if let Some((name, _)) = given
                .iter()
                .find(|(name, present)| *present && !kind.takes(name))
            {
                return Err(err(
                    key(name),
                    format!("does not apply to kind = \"{}\"", kind.as_str()),
                ));
            }
            let required = |name: &str, hint: &str| {
                err(
                    key(name),
                    format!("is required for kind = \"{}\"{hint}", kind.as_str()),
                )
            };
            let names = |list: &Option<Vec<String>>,
                         name: &str,
                         what: &str,
                         exists: &dyn Fn(&str) -> bool| {
                let list = list.clone().ok_or_else(|| required(name, ""))?;
                check_names(&list, exists, what, &key(name), &raw.site_file, file)?;
                Ok::<_, ConfigError>(list)
            };
            let meters = || names(&f.meters, "meters", "meter", &meter_exists);
            let facilities = || names(&f.facilities, "facilities", "facility", &facility_exists);
            let window = Window { from_ms, until_ms };
            let effect = match kind {
                raw::FaultKind::FacilityOff => FaultEffect::FacilityOff {
                    facilities: facilities()?,
                },
                raw::FaultKind::MeterSilent => FaultEffect::MeterSilent { meters: meters()? },
                raw::FaultKind::BadCrc => FaultEffect::BadCrc { meters: meters()? },
                raw::FaultKind::FrozenValue => FaultEffect::FrozenValue { meters: meters()? },
                raw::FaultKind::ModbusException => {
                    let meters = meters()?;
                    let code = match f.code {
                        Some(0) => {
                            return Err(err(
                                key("code"),
                                "0 is not a Modbus exception code (1..=255)".into(),
                            ))
                        }
                        Some(code) => code,
                        None => return Err(required("code", " (e.g. 4, server device failure)")),
                    };
                    FaultEffect::ModbusException { meters, code }
                }
                raw::FaultKind::SlowReply | raw::FaultKind::LateReply => {
                    let meters = meters()?;
                    let late = kind == raw::FaultKind::LateReply;
                    let delay = reply_delay(f.delay_ms, late, &meters, &site)
                        .map_err(|problem| err(key("delay_ms"), problem))?;
                    if late {
                        FaultEffect::LateReply { meters, delay }
                    } else {
                        FaultEffect::SlowReply { meters, delay }
                    }
                }
                raw::FaultKind::TreatmentLate | raw::FaultKind::TreatmentEarly => {
                    let late = kind == raw::FaultKind::TreatmentLate;
                    let lines = names(&f.lines, "lines", "line", &line_exists)?;
                    let (secs_key, secs) = if late {
                        ("late_secs", f.late_secs)
                    } else {
                        ("early_secs", f.early_secs)
                    };
                    let edge = if late {
                        ShiftEdge::Start
                    } else {
                        ShiftEdge::End
                    };
                    let secs = secs.ok_or_else(|| {
                        required(
                            secs_key,
                            if late {
                                " (seconds after production starts)"
                            } else {
                                " (seconds before production stops)"
                            },
                        )
                    })?;
                    let offset = shift_offset(secs, &lines, edge, window, &shifts, &site).map_err(
                        |(on_window, problem)| {
                            err(key(if on_window { "from" } else { secs_key }), problem)
                        },
                    )?;
                    if late {
                        FaultEffect::TreatmentLate {
                            lines,
                            late: offset,
                        }
                    } else {
                        FaultEffect::TreatmentEarly {
                            lines,
                            early: offset,
                        }
                    }
                }
                raw::FaultKind::LowLoad => {
                    let facilities = facilities()?;
                    let fraction = f
                        .fraction
                        .ok_or_else(|| required("fraction", " (of rated_kw, e.g. 0.3)"))?;
                    if !(fraction.is_finite() && fraction > 0.0 && fraction <= 1.5) {
                        return Err(err(
                            key("fraction"),
                            format!("{fraction} is outside (0, 1.5]"),
                        ));
                    }
                    FaultEffect::LowLoad {
                        facilities,
                        fraction,
                    }
                }
                raw::FaultKind::EnergyBackwards => {
                    let meters = meters()?;
                    let drop_kwh = f
                        .drop_kwh
                        .ok_or_else(|| required("drop_kwh", " (kWh the counter loses)"))?;
                    if !(drop_kwh.is_finite() && drop_kwh > 0.0 && drop_kwh <= MAX_ENERGY_DROP_KWH)
                    {
                        return Err(err(
                            key("drop_kwh"),
                            format!("{drop_kwh} is outside (0, {MAX_ENERGY_DROP_KWH}]"),
                        ));
                    }
                    FaultEffect::EnergyBackwards { meters, drop_kwh }
                }
            };
            faults.push(Fault {
                window: Window { from_ms, until_ms },
                effect,
            });
        }

        let mut facility_overrides = Vec::new();
        let mut overridden = HashSet::new();
        for (i, o) in raw.facilities.iter().enumerate() {
            let key = |k: &str| format!("facilities[{i}].{k}");
            if !facility_exists(&o.id) {
                return Err(err(
                    key("id"),
                    format!(
                        "facility `{}` is not defined in site file `{}`",
                        o.id, raw.site_file
                    ),
                ));
            }
            if !overridden.insert(o.id.clone()) {
                return Err(err(
                    key("id"),
                    format!("facility `{}` is overridden twice", o.id),
                ));
            }
            let in_range =
                |value: Option<f64>, name: &str, low: f64, high: f64, low_open: bool| match value {
                    Some(v)
                        if !(v.is_finite()
                            && v <= high
                            && (v > low || (!low_open && v == low))) =>
                    {
                        let bracket = if low_open { "(" } else { "[" };
                        Err(err(
                            key(name),
                            format!("{v} is outside {bracket}{low}, {high}]"),
                        ))
                    }
                    _ => Ok(value),
                };
            facility_overrides.push(FacilityOverride {
                facility: o.id.clone(),
                running_fraction: in_range(o.running_fraction, "running_fraction", 0.0, 1.5, true)?,
                idle_kw: in_range(o.idle_kw, "idle_kw", 0.0, 1.0e6, false)?,
                noise_pct: in_range(o.noise_pct, "noise_pct", 0.0, 50.0, false)?,
                power_factor: in_range(o.power_factor, "power_factor", 0.0, 1.0, true)?,
            });
        }

        Ok(Scenario {
            site,
            seed: raw.seed,
            start_ms,
            end_ms,
            time_scale: raw.time_scale,
            shifts,
            faults,
            facility_overrides,
        })
    }
}

/// The delay of a `slow_reply` (`late` false) or `late_reply` fault on
/// `meters`: given, at most [`MAX_REPLY_DELAY_MS`], and below (slow) or
/// above (late) every meter's timeout. The error is the problem only.
fn reply_delay(
    delay_ms: Option<u64>,
    late: bool,
    meters: &[String],
    site: &Site,
) -> Result<Duration, String> {
    let kind = if late { "late_reply" } else { "slow_reply" };
    let ms = delay_ms.ok_or_else(|| {
        format!("is required for kind = \"{kind}\" (wall-clock milliseconds before the answer)")
    })?;
    if !(1..=MAX_REPLY_DELAY_MS).contains(&ms) {
        return Err(format!("{ms} is outside 1..={MAX_REPLY_DELAY_MS}"));
    }
    for meter in meters.iter().filter_map(|id| site.meter(id)) {
        let timeout_ms = meter.timeout.as_millis();
        if late && u128::from(ms) <= timeout_ms {
            return Err(format!(
                "{ms} ms does not exceed meter `{}`'s timeout of {timeout_ms} ms, so the gateway still takes the answer (that is kind = \"slow_reply\")",
                meter.id
            ));
        }
        if !late && u128::from(ms) >= timeout_ms {
            return Err(format!(
                "{ms} ms is not below meter `{}`'s timeout of {timeout_ms} ms, so the gateway gives up first (that is kind = \"late_reply\")",
                meter.id
            ));
        }
    }
    Ok(Duration::from_millis(ms))
}

/// Unix ms of a local wall time; a time skipped by a DST change is taken
/// an hour later, an ambiguous one at its first occurrence.
pub(crate) fn local_ms(time_zone: Tz, date: NaiveDate, time: NaiveTime) -> Option<i64> {
    let naive = date.and_time(time);
    time_zone
        .from_local_datetime(&naive)
        .earliest()
        .or_else(|| {
            time_zone
                .from_local_datetime(&(naive + TimeDelta::hours(1)))
                .earliest()
        })
        .map(|t| t.timestamp_millis())
}

/// Every production start (or end) of `line`'s shifts inside `window`, as
/// (Unix ms, index into `shifts`), in time order.
pub(crate) fn shift_edges(
    shifts: &[Shift],
    time_zone: Tz,
    line: &str,
    window: Window,
    edge: ShiftEdge,
) -> Vec<(i64, usize)> {
    const DAY_MS: i64 = 86_400_000;
    let local_date = |at_ms: i64| {
        time_zone
            .timestamp_millis_opt(at_ms)
            .single()
            .map(|t| t.date_naive())
    };
    let (Some(first), Some(last)) = (
        local_date(window.from_ms.saturating_sub(2 * DAY_MS)),
        local_date(window.until_ms.saturating_add(DAY_MS)),
    ) else {
        return Vec::new();
    };
    let mut edges = Vec::new();
    for (index, shift) in shifts.iter().enumerate() {
        if !shift.lines.iter().any(|l| l == line) {
            continue;
        }
        for date in first.iter_days().take_while(|d| *d <= last) {
            let at = match edge {
                ShiftEdge::Start => local_ms(time_zone, date, shift.production_start),
                ShiftEdge::End if shift.production_end <= shift.production_start => date
                    .succ_opt()
                    .and_then(|next| local_ms(time_zone, next, shift.production_end)),
                ShiftEdge::End => local_ms(time_zone, date, shift.production_end),
            };
            if let Some(at) = at.filter(|at| window.contains(*at)) {
                edges.push((at, index));
            }
        }
    }
    edges.sort_unstable();
    edges.dedup();
    edges
}

/// The offset of a `treatment_late` (`edge` Start) or `treatment_early`
/// (End) fault: every line has treatment and a shift edge inside the
/// window, and `secs` is positive and shorter than each shift it changes.
/// The error says whether it concerns the window (`true`) or `secs`.
fn shift_offset(
    secs: u64,
    lines: &[String],
    edge: ShiftEdge,
    window: Window,
    shifts: &[Shift],
    site: &Site,
) -> Result<Duration, (bool, String)> {
    let what = match edge {
        ShiftEdge::Start => "production start",
        ShiftEdge::End => "production end",
    };
    for line in lines {
        let has_treatment = site
            .lines
            .iter()
            .any(|l| l.id == *line && l.facilities.iter().any(|f| f.role() == Role::Treatment));
        if !has_treatment {
            return Err((false, format!("line `{line}` has no treatment facility")));
        }
        let edges = shift_edges(shifts, site.time_zone, line, window, edge);
        if edges.is_empty() {
            return Err((
                true,
                format!("the window from..until contains no {what} of line `{line}`"),
            ));
        }
        if secs == 0 {
            return Err((false, "0 must be a positive number of seconds".into()));
        }
        for (_, index) in edges {
            let shift = &shifts[index];
            let length_secs = (shift.production_end - shift.production_start)
                .num_seconds()
                .rem_euclid(86_400) as u64;
            if secs >= length_secs {
                return Err((
                    false,
                    format!(
                        "{secs} s is not shorter than line `{line}`'s shift {}-{} ({length_secs} s); that is treatment stopped all shift (kind = \"facility_off\")",
                        shift.production_start.format("%H:%M"),
                        shift.production_end.format("%H:%M"),
                    ),
                ));
            }
        }
    }
    Ok(Duration::from_secs(secs))
}

/// Every name in `names` must exist; the list must not be empty.
fn check_names(
    names: &[String],
    exists: impl Fn(&str) -> bool,
    what: &str,
    key: &str,
    site_file: &str,
    file: &str,
) -> Result<(), ConfigError> {
    if names.is_empty() {
        return Err(ConfigError::new(
            file,
            key,
            format!("needs at least one {what}"),
        ));
    }
    match names.iter().find(|n| !exists(n)) {
        Some(missing) => Err(ConfigError::new(
            file,
            key,
            format!("{what} `{missing}` is not defined in site file `{site_file}`"),
        )),
        None => Ok(()),
    }
}

/// A time as written, TOML string or date-time alike.
fn time_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        other => other.to_string(),
    }
}

/// RFC 3339 with an offset, as a TOML string or an offset date-time.
fn timestamp_ms(value: &toml::Value, key: &str, file: &str) -> Result<i64, ConfigError> {
    if !matches!(value, toml::Value::String(_) | toml::Value::Datetime(_)) {
        return Err(ConfigError::new(
            file,
            key,
            format!(
                "expected an RFC 3339 time string, found a {}",
                value.type_str()
            ),
        ));
    }
    let text = time_text(value);
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ConfigError::new(
                file,
                key,
                format!(
                    "`{text}` is not an RFC 3339 time with offset (e.g. 2022-12-13T07:00:00+08:00): {e}"
                ),
            )
        })
}

fn time_of_day(text: &str, key: &str, file: &str) -> Result<NaiveTime, ConfigError> {
    let valid = text.len() == 5 && text.as_bytes()[2] == b':';
    NaiveTime::parse_from_str(text, "%H:%M")
        .ok()
        .filter(|_| valid)
        .ok_or_else(|| {
            ConfigError::new(
                file,
                key,
                format!("`{text}` is not a time of day HH:MM (e.g. 07:00)"),
            )
        })
}

/// The scenario file as written; see `deploy/stenter-plant.scenario.toml`.
mod raw {
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct ScenarioFile {
        pub(super) site_file: String,
        pub(super) seed: u64,
        pub(super) start: toml::Value,
        pub(super) end: toml::Value,
        #[serde(default = "real_time")]
        pub(super) time_scale: f64,
        #[serde(default)]
        pub(super) shifts: Vec<ShiftSection>,
        #[serde(default)]
        pub(super) faults: Vec<FaultSection>,
        #[serde(default)]
        pub(super) facilities: Vec<FacilitySection>,
    }

    fn real_time() -> f64 {
        1.0
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct ShiftSection {
        pub(super) lines: Vec<String>,
        pub(super) production_start: String,
        pub(super) production_end: String,
        pub(super) treatment_lead_mins: u32,
        pub(super) treatment_lag_mins: u32,
    }

    #[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum FaultKind {
        FacilityOff,
        MeterSilent,
        ModbusException,
        SlowReply,
        LateReply,
        BadCrc,
        TreatmentLate,
        TreatmentEarly,
        LowLoad,
        FrozenValue,
        EnergyBackwards,
    }

    impl FaultKind {
        pub(super) fn as_str(self) -> &'static str {
            match self {
                FaultKind::FacilityOff => "facility_off",
                FaultKind::MeterSilent => "meter_silent",
                FaultKind::ModbusException => "modbus_exception",
                FaultKind::SlowReply => "slow_reply",
                FaultKind::LateReply => "late_reply",
                FaultKind::BadCrc => "bad_crc",
                FaultKind::TreatmentLate => "treatment_late",
                FaultKind::TreatmentEarly => "treatment_early",
                FaultKind::LowLoad => "low_load",
                FaultKind::FrozenValue => "frozen_value",
                FaultKind::EnergyBackwards => "energy_backwards",
            }
        }

        /// Whether `key` (besides kind, from, until) belongs to this kind.
        pub(super) fn takes(self, key: &str) -> bool {
            let keys: &[&str] = match self {
                FaultKind::FacilityOff => &["facilities"],
                FaultKind::MeterSilent | FaultKind::BadCrc | FaultKind::FrozenValue => &["meters"],
                FaultKind::ModbusException => &["meters", "code"],
                FaultKind::SlowReply | FaultKind::LateReply => &["meters", "delay_ms"],
                FaultKind::TreatmentLate => &["lines", "late_secs"],
                FaultKind::TreatmentEarly => &["lines", "early_secs"],
                FaultKind::LowLoad => &["facilities", "fraction"],
                FaultKind::EnergyBackwards => &["meters", "drop_kwh"],
            };
            keys.contains(&key)
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct FaultSection {
        pub(super) kind: FaultKind,
        pub(super) facilities: Option<Vec<String>>,
        pub(super) meters: Option<Vec<String>>,
        pub(super) code: Option<u8>,
        pub(super) delay_ms: Option<u64>,
        pub(super) lines: Option<Vec<String>>,
        pub(super) late_secs: Option<u64>,
        pub(super) early_secs: Option<u64>,
        pub(super) fraction: Option<f64>,
        pub(super) drop_kwh: Option<f64>,
        pub(super) from: toml::Value,
        pub(super) until: toml::Value,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct FacilitySection {
        pub(super) id: String,
        pub(super) running_fraction: Option<f64>,
        pub(super) idle_kw: Option<f64>,
        pub(super) noise_pct: Option<f64>,
        pub(super) power_factor: Option<f64>,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const DEPLOY_SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");
    pub(crate) const DEPLOY_SCENARIO: &str =
        include_str!("../../deploy/stenter-plant.scenario.toml");

    pub(crate) fn deploy_site() -> Site {
        Site::from_toml(DEPLOY_SITE, "stenter-plant.site.toml").unwrap()
    }

    pub(crate) fn deploy_scenario() -> Scenario {
        Scenario::from_toml(
            DEPLOY_SCENARIO,
            "stenter-plant.scenario.toml",
            deploy_site(),
        )
        .unwrap()
    }

    /// Unix ms of a local time on the demo day (Asia/Shanghai, +08:00).
    pub(crate) fn demo_ms(hh_mm_ss: &str) -> i64 {
        DateTime::parse_from_rfc3339(&format!("2022-12-13T{hh_mm_ss}+08:00"))
            .unwrap()
            .timestamp_millis()
    }

    fn error_of(text: &str) -> String {
        Scenario::from_toml(text, "s.toml", deploy_site())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn deploy_scenario_is_valid() {
        let scenario = deploy_scenario();
        assert_eq!(scenario.seed, 20221213);
        assert_eq!(scenario.start_ms, demo_ms("00:00:00"));
        assert_eq!(scenario.end_ms, demo_ms("00:00:00") + 86_400_000);
        assert_eq!(scenario.time_scale, 1440.0);
        assert_eq!(scenario.shifts.len(), 2);
        let first = &scenario.shifts[0];
        assert_eq!(
            first.production_start,
            NaiveTime::from_hms_opt(7, 0, 0).unwrap()
        );
        assert_eq!(
            first.production_end,
            NaiveTime::from_hms_opt(11, 30, 0).unwrap()
        );
        assert_eq!(first.treatment_lead, Duration::from_secs(600));
        assert_eq!(first.treatment_lag, Duration::from_secs(1200));
        assert_eq!(scenario.faults.len(), 3);
        assert_eq!(
            scenario.faults[0].window,
            Window {
                from_ms: demo_ms("14:03:00"),
                until_ms: demo_ms("14:30:00")
            }
        );
        assert_eq!(
            scenario.faults[2].effect,
            FaultEffect::ModbusException {
                meters: vec!["l2-spray-pump".into()],
                code: 4
            }
        );
    }

    #[test]
    fn meter_faults_apply_only_inside_their_window() {
        let scenario = deploy_scenario();
        let healthy = MeterFaults::default();
        let silent = MeterFaults {
            silent: true,
            ..healthy
        };
        assert_eq!(
            scenario.meter_faults("l2-main-fan", demo_ms("15:59:59")),
            healthy
        );
        assert_eq!(
            scenario.meter_faults("l2-main-fan", demo_ms("16:00:00")),
            silent
        );
        assert_eq!(
            scenario.meter_faults("l2-main-fan", demo_ms("16:20:00")),
            healthy
        );
        assert_eq!(
            scenario.meter_faults("l1-main-fan", demo_ms("16:10:00")),
            healthy
        );
        assert_eq!(
            scenario.meter_faults("l2-spray-pump", demo_ms("18:04:59")),
            MeterFaults {
                exception: Some(4),
                ..healthy
            }
        );
        // facility_off changes the power drawn, not how the meter answers.
        assert_eq!(
            scenario.meter_faults("l1-condenser", demo_ms("14:10:00")),
            healthy
        );
    }

    /// The deploy scenario with `faults` appended (separated by `----`),
    /// each in the window 16:00-16:20.
    pub(crate) fn with_faults(faults: &str) -> String {
        let window = "from = \"2022-12-13T16:00:00+08:00\"\nuntil = \"2022-12-13T16:20:00+08:00\"";
        faults
            .split("----")
            .map(|fault| format!("\n[[faults]]\n{}\n{window}\n", fault.trim()))
            .fold(DEPLOY_SCENARIO.to_string(), |text, fault| text + &fault)
    }

    #[test]
    fn overlapping_reply_faults_combine() {
        // l1-stenter's timeout is the gateway's modbus_timeout_ms, 250 ms.
        let text = with_faults(
            "kind = \"slow_reply\"\nmeters = [\"l1-stenter\", \"l1-main-fan\"]\ndelay_ms = 100
            ----
            kind = \"late_reply\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 900
            ----
            kind = \"bad_crc\"\nmeters = [\"l1-stenter\"]
            ----
            kind = \"modbus_exception\"\nmeters = [\"l1-main-fan\"]\ncode = 6",
        );
        let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
        assert_eq!(
            scenario.faults[3].effect,
            FaultEffect::SlowReply {
                meters: vec!["l1-stenter".into(), "l1-main-fan".into()],
                delay: Duration::from_millis(100)
            }
        );
        assert_eq!(
            scenario.faults[4].effect,
            FaultEffect::LateReply {
                meters: vec!["l1-stenter".into()],
                delay: Duration::from_millis(900)
            }
        );
        assert_eq!(
            scenario.faults[5].effect,
            FaultEffect::BadCrc {
                meters: vec!["l1-stenter".into()]
            }
        );
        let at = demo_ms("16:10:00");
        assert_eq!(
            scenario.meter_faults("l1-stenter", at),
            MeterFaults {
                silent: false,
                exception: None,
                bad_crc: true,
                delay: Duration::from_millis(900),
            }
        );
        assert_eq!(
            scenario.meter_faults("l1-main-fan", at),
            MeterFaults {
                silent: false,
                exception: Some(6),
                bad_crc: false,
                delay: Duration::from_millis(100),
            }
        );
        assert_eq!(
            scenario.meter_faults("l1-main-fan", demo_ms("16:20:00")),
            MeterFaults::default()
        );
    }

    #[test]
    fn reply_delays_must_fit_the_meters_timeouts() {
        let error = |fault: &str| error_of(&with_faults(fault));
        assert_eq!(
            error("kind = \"slow_reply\"\nmeters = [\"l1-stenter\"]"),
            "s.toml: faults[3].delay_ms: is required for kind = \"slow_reply\" (wall-clock milliseconds before the answer)"
        );
        assert_eq!(
            error("kind = \"slow_reply\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 250"),
            "s.toml: faults[3].delay_ms: 250 ms is not below meter `l1-stenter`'s timeout of 250 ms, so the gateway gives up first (that is kind = \"late_reply\")"
        );
        assert_eq!(
            error("kind = \"late_reply\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 250"),
            "s.toml: faults[3].delay_ms: 250 ms does not exceed meter `l1-stenter`'s timeout of 250 ms, so the gateway still takes the answer (that is kind = \"slow_reply\")"
        );
        assert_eq!(
            error("kind = \"late_reply\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 60001"),
            "s.toml: faults[3].delay_ms: 60001 is outside 1..=60000"
        );
        assert_eq!(
            error("kind = \"slow_reply\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 0"),
            "s.toml: faults[3].delay_ms: 0 is outside 1..=60000"
        );
        assert_eq!(
            error("kind = \"bad_crc\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 10"),
            "s.toml: faults[3].delay_ms: does not apply to kind = \"bad_crc\""
        );
        assert_eq!(
            error("kind = \"meter_silent\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 10"),
            "s.toml: faults[3].delay_ms: does not apply to kind = \"meter_silent\""
        );
        assert_eq!(
            error("kind = \"late_reply\"\nmeters = [\"l1-stenter\"]\ndelay_ms = 900\ncode = 4"),
            "s.toml: faults[3].code: does not apply to kind = \"late_reply\""
        );
        assert_eq!(
            error("kind = \"facility_off\"\nfacilities = [\"l1-stenter\"]\ndelay_ms = 9"),
            "s.toml: faults[3].delay_ms: does not apply to kind = \"facility_off\""
        );
        assert_eq!(
            error("kind = \"bad_crc\""),
            "s.toml: faults[3].meters: is required for kind = \"bad_crc\""
        );
    }

    #[test]
    fn unknown_facility_in_a_fault_is_named_with_its_key() {
        let text = DEPLOY_SCENARIO.replace("\"l1-hv-esp\"]", "\"l1-hv-epp\"]");
        assert_eq!(
            error_of(&text),
            "s.toml: faults[0].facilities: facility `l1-hv-epp` is not defined in site file `stenter-plant.site.toml`"
        );
    }

    #[test]
    fn unknown_meter_and_line_are_named_with_their_keys() {
        let text = DEPLOY_SCENARIO.replace("meters = [\"l2-main-fan\"]", "meters = [\"l9\"]");
        assert_eq!(
            error_of(&text),
            "s.toml: faults[1].meters: meter `l9` is not defined in site file `stenter-plant.site.toml`"
        );
        let text = DEPLOY_SCENARIO.replacen("[\"line1\", \"line2\"]", "[\"line1\", \"line3\"]", 1);
        assert_eq!(
            error_of(&text),
            "s.toml: shifts[0].lines: line `line3` is not defined in site file `stenter-plant.site.toml`"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = DEPLOY_SCENARIO.replace("seed = ", "speed = 3\nseed = ");
        let err = error_of(&text);
        assert!(
            err.starts_with("s.toml: ") && err.contains("unknown field `speed`"),
            "{err}"
        );
        let text = DEPLOY_SCENARIO.replace("code = 4", "code = 4\nrepeat = true");
        assert!(error_of(&text).contains("unknown field `repeat`"));
    }

    #[test]
    fn fault_fields_must_fit_the_kind() {
        let text = DEPLOY_SCENARIO.replace("code = 4", "");
        assert_eq!(
            error_of(&text),
            "s.toml: faults[2].code: is required for kind = \"modbus_exception\" (e.g. 4, server device failure)"
        );
        let text = DEPLOY_SCENARIO.replace(
            "meters = [\"l2-main-fan\"]",
            "meters = [\"l2-main-fan\"]\ncode = 2",
        );
        assert_eq!(
            error_of(&text),
            "s.toml: faults[1].code: does not apply to kind = \"meter_silent\""
        );
        let text = DEPLOY_SCENARIO.replace("kind = \"meter_silent\"", "kind = \"meter_lost\"");
        let err = error_of(&text);
        assert!(err.contains("unknown variant `meter_lost`"), "{err}");
        let text = DEPLOY_SCENARIO.replace("code = 4 ", "code = 0 ");
        assert_eq!(
            error_of(&text),
            "s.toml: faults[2].code: 0 is not a Modbus exception code (1..=255)"
        );
    }

    #[test]
    fn bad_times_are_named() {
        let text = DEPLOY_SCENARIO.replace("\"07:00\"", "\"7am\"");
        assert_eq!(
            error_of(&text),
            "s.toml: shifts[0].production_start: `7am` is not a time of day HH:MM (e.g. 07:00)"
        );
        let text = DEPLOY_SCENARIO.replace("\"11:30\"", "\"07:00\"");
        assert_eq!(
            error_of(&text),
            "s.toml: shifts[0].production_end: equals production_start; a shift needs a length"
        );
        let text =
            DEPLOY_SCENARIO.replace("2022-12-14T00:00:00+08:00", "2022-12-12T00:00:00+08:00");
        assert_eq!(
            error_of(&text),
            "s.toml: end: must be after start (2022-12-13T00:00:00+08:00)"
        );
        let text =
            DEPLOY_SCENARIO.replace("\"2022-12-13T14:30:00+08:00\"", "\"2022-12-13T14:30:00\"");
        let err = error_of(&text);
        assert!(
            err.starts_with("s.toml: faults[0].until: `2022-12-13T14:30:00` is not an RFC 3339"),
            "{err}"
        );
        let text =
            DEPLOY_SCENARIO.replace("2022-12-13T18:05:00+08:00", "2022-12-13T17:05:00+08:00");
        assert_eq!(
            error_of(&text),
            "s.toml: faults[2].until: must be after from"
        );
        let text = DEPLOY_SCENARIO.replace("time_scale = 1440", "time_scale = 0");
        assert_eq!(
            error_of(&text),
            "s.toml: time_scale: 0 must be a positive number"
        );
    }

    #[test]
    fn unquoted_toml_datetimes_are_accepted() {
        let text = DEPLOY_SCENARIO.replace(
            "start = \"2022-12-13T00:00:00+08:00\"",
            "start = 2022-12-13T00:00:00+08:00",
        );
        let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
        assert_eq!(scenario.start_ms, demo_ms("00:00:00"));
    }

    #[test]
    fn facility_overrides_are_checked() {
        let with = |section: &str| format!("{DEPLOY_SCENARIO}\n[[facilities]]\n{section}\n");
        let scenario = Scenario::from_toml(
            &with("id = \"l1-main-fan\"\nrunning_fraction = 0.3\nnoise_pct = 2"),
            "s.toml",
            deploy_site(),
        )
        .unwrap();
        assert_eq!(
            scenario.facility_overrides,
            vec![FacilityOverride {
                facility: "l1-main-fan".into(),
                running_fraction: Some(0.3),
                idle_kw: None,
                noise_pct: Some(2.0),
                power_factor: None,
            }]
        );
        assert_eq!(
            error_of(&with("id = \"fan\"")),
            "s.toml: facilities[0].id: facility `fan` is not defined in site file `stenter-plant.site.toml`"
        );
        assert_eq!(
            error_of(&with("id = \"l1-main-fan\"\npower_factor = 1.2")),
            "s.toml: facilities[0].power_factor: 1.2 is outside (0, 1]"
        );
        assert_eq!(
            error_of(&with("id = \"l1-main-fan\"\nidle_kw = -1")),
            "s.toml: facilities[0].idle_kw: -1 is outside [0, 1000000]"
        );
    }

    #[test]
    fn load_reads_the_site_file_next_to_the_scenario() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stenter-plant.site.toml"), DEPLOY_SITE).unwrap();
        let path = dir.path().join("plant.scenario.toml");
        std::fs::write(&path, DEPLOY_SCENARIO).unwrap();
        let scenario = Scenario::load(&path).unwrap();
        assert_eq!(scenario.site.id, "tx-dyeing");

        std::fs::write(
            &path,
            DEPLOY_SCENARIO.replace("stenter-plant.site.toml", "nope.toml"),
        )
        .unwrap();
        let err = Scenario::load(&path).unwrap_err();
        assert_eq!(err.file, path.display().to_string());
        assert_eq!(err.key.as_deref(), Some("site_file"));
        assert!(err.problem.contains("nope.toml: cannot read"), "{err}");
    }

    #[test]
    fn plant_fault_kinds_are_parsed_with_their_keys() {
        let text = with_faults(
            "kind = \"low_load\"\nfacilities = [\"l1-main-fan\"]\nfraction = 0.3
            ----
            kind = \"frozen_value\"\nmeters = [\"l2-stenter\"]
            ----
            kind = \"energy_backwards\"\nmeters = [\"l2-stenter\"]\ndrop_kwh = 12.5",
        ) + "
[[faults]]
kind = \"treatment_late\"
lines = [\"line1\"]
late_secs = 480
from = \"2022-12-13T12:00:00+08:00\"
until = \"2022-12-13T13:00:00+08:00\"

[[faults]]
kind = \"treatment_early\"
lines = [\"line2\", \"line1\"]
early_secs = 60
from = \"2022-12-13T21:00:00+08:00\"
until = \"2022-12-13T23:00:00+08:00\"
";
        let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
        let effects: Vec<&FaultEffect> = scenario.faults[3..].iter().map(|f| &f.effect).collect();
        assert_eq!(
            effects,
            [
                &FaultEffect::LowLoad {
                    facilities: vec!["l1-main-fan".into()],
                    fraction: 0.3
                },
                &FaultEffect::FrozenValue {
                    meters: vec!["l2-stenter".into()]
                },
                &FaultEffect::EnergyBackwards {
                    meters: vec!["l2-stenter".into()],
                    drop_kwh: 12.5
                },
                &FaultEffect::TreatmentLate {
                    lines: vec!["line1".into()],
                    late: Duration::from_secs(480)
                },
                &FaultEffect::TreatmentEarly {
                    lines: vec!["line2".into(), "line1".into()],
                    early: Duration::from_secs(60)
                },
            ]
        );
        // They change readings, not how a meter answers.
        assert_eq!(
            scenario.meter_faults("l2-stenter", demo_ms("16:10:00")),
            MeterFaults::default()
        );
    }

    #[test]
    fn plant_fault_kinds_refuse_bad_values_naming_the_key() {
        let error = |fault: &str| error_of(&with_faults(fault));
        assert_eq!(
            error("kind = \"treatment_late\"\nlines = [\"line1\"]"),
            "s.toml: faults[3].late_secs: is required for kind = \"treatment_late\" (seconds after production starts)"
        );
        // 16:00-16:20 holds no production start or end.
        assert_eq!(
            error("kind = \"treatment_late\"\nlines = [\"line1\"]\nlate_secs = 60"),
            "s.toml: faults[3].from: the window from..until contains no production start of line `line1`"
        );
        assert_eq!(
            error("kind = \"treatment_early\"\nlines = [\"line2\"]\nearly_secs = 60"),
            "s.toml: faults[3].from: the window from..until contains no production end of line `line2`"
        );
        let morning = |fault: &str| {
            error_of(&with_faults(fault).replace("T16:00:00+08:00", "T06:00:00+08:00"))
        };
        assert_eq!(
            morning("kind = \"treatment_late\"\nlines = [\"line1\"]\nlate_secs = 16200"),
            "s.toml: faults[3].late_secs: 16200 s is not shorter than line `line1`'s shift 07:00-11:30 (16200 s); that is treatment stopped all shift (kind = \"facility_off\")"
        );
        assert_eq!(
            morning("kind = \"treatment_late\"\nlines = [\"line1\"]\nlate_secs = 0"),
            "s.toml: faults[3].late_secs: 0 must be a positive number of seconds"
        );
        assert_eq!(
            morning("kind = \"treatment_late\"\nlines = [\"line7\"]\nlate_secs = 60"),
            "s.toml: faults[3].lines: line `line7` is not defined in site file `stenter-plant.site.toml`"
        );
        assert_eq!(
            morning("kind = \"treatment_late\"\nlines = [\"line1\"]\nearly_secs = 60"),
            "s.toml: faults[3].early_secs: does not apply to kind = \"treatment_late\""
        );
        assert_eq!(
            error("kind = \"facility_off\"\nfacilities = [\"l1-main-fan\"]\nlines = [\"line1\"]"),
            "s.toml: faults[3].lines: does not apply to kind = \"facility_off\""
        );
        assert_eq!(
            error("kind = \"low_load\"\nfacilities = [\"l1-main-fan\"]"),
            "s.toml: faults[3].fraction: is required for kind = \"low_load\" (of rated_kw, e.g. 0.3)"
        );
        assert_eq!(
            error("kind = \"low_load\"\nfacilities = [\"l1-main-fan\"]\nfraction = 0"),
            "s.toml: faults[3].fraction: 0 is outside (0, 1.5]"
        );
        assert_eq!(
            error("kind = \"low_load\"\nmeters = [\"l1-main-fan\"]\nfraction = 0.3"),
            "s.toml: faults[3].meters: does not apply to kind = \"low_load\""
        );
        assert_eq!(
            error("kind = \"frozen_value\"\nmeters = [\"l1-main-fan\"]\nfraction = 0.3"),
            "s.toml: faults[3].fraction: does not apply to kind = \"frozen_value\""
        );
        assert_eq!(
            error("kind = \"energy_backwards\"\nmeters = [\"l1-main-fan\"]"),
            "s.toml: faults[3].drop_kwh: is required for kind = \"energy_backwards\" (kWh the counter loses)"
        );
        assert_eq!(
            error("kind = \"energy_backwards\"\nmeters = [\"l1-main-fan\"]\ndrop_kwh = 1000.5"),
            "s.toml: faults[3].drop_kwh: 1000.5 is outside (0, 1000]"
        );
        assert_eq!(
            error("kind = \"energy_backwards\"\nfacilities = [\"l1-main-fan\"]\ndrop_kwh = 1"),
            "s.toml: faults[3].facilities: does not apply to kind = \"energy_backwards\""
        );
    }
}
