//! The plant model: what each meter of a scenario's site reads at a virtual
//! instant. Pure and synchronous; the Modbus servers only ask it.
//!
//! A facility is either running or not:
//! - a production facility runs inside its line's shift windows;
//! - a treatment facility runs from `production_start - lead` to
//!   `production_end + lag` of the same shifts;
//! - a `facility_off` fault forces it off inside its window;
//! - a `treatment_late` fault forces a line's treatment off from `lead`
//!   before a production start until `late` after it, a `treatment_early`
//!   fault from `early` before a production end until `lag` after it.
//!
//! Running it draws `rated_kw * running_fraction` (`rated_kw * fraction`
//! inside a `low_load` fault), otherwise its off level (idle production,
//! standby or tripped treatment); defaults by kind, per DOMAIN.md,
//! overridable per facility in the scenario.
//!
//! Meter faults that change readings, not the facility: inside a
//! `frozen_value` window a meter reads (every register) what it read at the
//! window start; inside an `energy_backwards` window its counter reads
//! `drop_kwh` less. [`Plant::is_running`] tells the facility's truth.
//!
//! Invariants:
//! - Deterministic: [`Plant::values`] is a function of (seed, meter, virtual
//!   time) only. Noise, power factor jitter and voltages come from a hash of
//!   the seed, the meter id and the virtual *second*, so reads within one
//!   second agree.
//! - Instantaneous power is the noiseless level times `1 ± noise`; currents
//!   satisfy `I = P * 1000 / (3 * U_phase * PF)` per phase.
//! - The energy counter is the exact integral of the noiseless level from
//!   the scenario start (plus a seeded initial reading), computed from
//!   integer milliseconds of running (at each level) and not-running time,
//!   so it never decreases as virtual time increases, except where an
//!   `energy_backwards` window starts (it steps back by `drop_kwh`) and
//!   where a `frozen_value` window holds it still (it steps forward to the
//!   true reading at the window's end).

use std::collections::HashMap;

use chrono::{NaiveDate, NaiveTime, TimeZone};
use chrono_tz::Tz;
use facwatch_proto::site::{Facility, FacilityKind, Role};
use facwatch_proto::wire::Values;

use crate::scenario::{local_ms, shift_edges, FaultEffect, Scenario, ShiftEdge, Window};

const MS_PER_HOUR: f64 = 3_600_000.0;
const MS_PER_DAY: i64 = 86_400_000;
const DEFAULT_NOISE_PCT: f64 = 3.0;
/// Power factor: a per-meter base in [0.81, 0.87] plus at most 0.01 of
/// jitter per second, so readings stay within [0.80, 0.88].
const PF_BASE_LOW: f64 = 0.81;
const PF_BASE_SPAN: f64 = 0.06;
const PF_JITTER: f64 = 0.01;
/// Phase voltage: a per-meter base in [220, 230] V with ±2 % per phase and
/// second.
const VOLTAGE_BASE_LOW: f64 = 220.0;
const VOLTAGE_BASE_SPAN: f64 = 10.0;
const VOLTAGE_JITTER: f64 = 0.02;

/// Default running fraction of rated power and off level (kW) of a kind.
fn default_load(kind: FacilityKind) -> (f64, f64) {
    match kind {
        FacilityKind::Stenter => (0.75, 8.0),
        FacilityKind::Boiler => (0.70, 2.0),
        FacilityKind::Production => (0.70, 1.0),
        FacilityKind::MainFan => (0.80, 0.02),
        FacilityKind::Condenser => (0.85, 0.02),
        // 5 kW of a 10 kW supply: inside DOMAIN.md's 1-8 kW, and above R4's
        // 0.4 x rated with the default noise, so a healthy day is not
        // low-load.
        FacilityKind::HvEsp => (0.50, 0.05),
        FacilityKind::SprayPump => (0.90, 0.02),
        FacilityKind::Treatment => (0.80, 0.02),
    }
}

/// The simulated plant of one scenario.
#[derive(Debug, Clone)]
pub struct Plant {
    seed: u64,
    origin_ms: i64,
    time_zone: Tz,
    meters: Vec<MeterModel>,
    by_meter: HashMap<String, usize>,
    by_facility: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
struct MeterModel {
    key: u64,
    load: Option<FacilityLoad>,
    /// `frozen_value` windows: inside one, the meter reads what it read at
    /// the window's start.
    frozen: Vec<Window>,
    /// `energy_backwards` windows and the kWh the counter loses in each.
    energy_drops: Vec<(Window, f64)>,
    base_voltage: f64,
    base_power_factor: f64,
    initial_kwh: f64,
}

#[derive(Debug, Clone)]
struct FacilityLoad {
    facility: String,
    rated_kw: f64,
    running_kw: f64,
    off_kw: f64,
    noise: f64,
    power_factor: Option<f64>,
    start_threshold_kw: f64,
    stop_threshold_kw: f64,
    schedule: Vec<DailyWindow>,
    forced_off: Vec<Window>,
    /// `low_load` faults as disjoint spans (a later fault loses where an
    /// earlier one overlaps it), each with its fraction of rated power.
    low_load: Vec<LowLoadSpans>,
}

#[derive(Debug, Clone)]
struct LowLoadSpans {
    spans: Vec<(i64, i64)>,
    fraction: f64,
    /// Index of the fault in the scenario, for messages.
    fault: usize,
}

/// A window that repeats every local day: from `start - before` to `end +
/// after` (the next day's `end` when `end <= start`).
#[derive(Debug, Clone, Copy)]
struct DailyWindow {
    start: NaiveTime,
    end: NaiveTime,
    before_ms: i64,
    after_ms: i64,
}

impl Plant {
    pub fn new(scenario: &Scenario) -> Plant {
        let site = &scenario.site;
        let seed = scenario.seed;
        let mut meters = Vec::with_capacity(site.meters.len());
        let mut by_meter = HashMap::new();
        let mut by_facility = HashMap::new();
        for meter in &site.meters {
            let key = fnv1a(&meter.id);
            let load = site.lines.iter().find_map(|line| {
                let facility = line.facilities.iter().find(|f| f.meter == meter.id)?;
                let overrides = scenario
                    .facility_overrides
                    .iter()
                    .find(|o| o.facility == facility.id);
                let (fraction, off_kw) = default_load(facility.kind);
                let fraction = overrides
                    .and_then(|o| o.running_fraction)
                    .unwrap_or(fraction);
                let schedule = scenario
                    .shifts
                    .iter()
                    .filter(|s| s.lines.contains(&line.id))
                    .map(|s| {
                        let (before, after) = match facility.role() {
                            Role::Production => (0, 0),
                            Role::Treatment => (
                                s.treatment_lead.as_millis() as i64,
                                s.treatment_lag.as_millis() as i64,
                            ),
                        };
                        DailyWindow {
                            start: s.production_start,
                            end: s.production_end,
                            before_ms: before,
                            after_ms: after,
                        }
                    })
                    .collect();
                let forced_off = forced_off_windows(scenario, &line.id, facility);
                let mut low_load = Vec::new();
                let mut earlier = Vec::new();
                for (index, fault) in scenario.faults.iter().enumerate() {
                    if let FaultEffect::LowLoad {
                        facilities,
                        fraction,
                    } = &fault.effect
                    {
                        if facilities.contains(&facility.id) {
                            low_load.push(LowLoadSpans {
                                spans: subtract(
                                    vec![(fault.window.from_ms, fault.window.until_ms)],
                                    &earlier,
                                ),
                                fraction: *fraction,
                                fault: index,
                            });
                            earlier.push(fault.window);
                        }
                    }
                }
                Some(FacilityLoad {
                    facility: facility.id.clone(),
                    rated_kw: facility.rated_kw,
                    running_kw: facility.rated_kw * fraction,
                    off_kw: overrides.and_then(|o| o.idle_kw).unwrap_or(off_kw),
                    noise: overrides
                        .and_then(|o| o.noise_pct)
                        .unwrap_or(DEFAULT_NOISE_PCT)
                        / 100.0,
                    power_factor: overrides.and_then(|o| o.power_factor),
                    start_threshold_kw: facility.start_threshold_kw,
                    stop_threshold_kw: facility.stop_threshold_kw,
                    schedule,
                    forced_off,
                    low_load,
                })
            });
            if let Some(load) = &load {
                by_facility.insert(load.facility.clone(), meters.len());
            }
            by_meter.insert(meter.id.clone(), meters.len());
            let frozen = scenario
                .faults
                .iter()
                .filter(|f| matches!(&f.effect, FaultEffect::FrozenValue { meters } if meters.contains(&meter.id)))
                .map(|f| f.window)
                .collect();
            let energy_drops = scenario
                .faults
                .iter()
                .filter_map(|f| match &f.effect {
                    FaultEffect::EnergyBackwards { meters, drop_kwh }
                        if meters.contains(&meter.id) =>
                    {
                        Some((f.window, *drop_kwh))
                    }
                    _ => None,
                })
                .collect();
            meters.push(MeterModel {
                key,
                load,
                frozen,
                energy_drops,
                base_voltage: VOLTAGE_BASE_LOW + VOLTAGE_BASE_SPAN * fixed_unit(seed, key, 1),
                base_power_factor: PF_BASE_LOW + PF_BASE_SPAN * fixed_unit(seed, key, 2),
                // A meter in service shows some history, not zero.
                initial_kwh: (1_000.0 + 49_000.0 * fixed_unit(seed, key, 3)).round(),
            });
        }
        Plant {
            seed,
            origin_ms: scenario.start_ms,
            time_zone: site.time_zone,
            meters,
            by_meter,
            by_facility,
        }
    }

    /// What `meter` reads at virtual time `at_ms`; `None` for a meter the
    /// site does not define. A meter that measures no facility reads zero
    /// load.
    pub fn values(&self, meter: &str, at_ms: i64) -> Option<Values> {
        let model = &self.meters[*self.by_meter.get(meter)?];
        // A frozen meter repeats the reading of its (earliest) window start.
        let read_at = model
            .frozen
            .iter()
            .filter(|w| w.contains(at_ms))
            .map(|w| w.from_ms)
            .min()
            .unwrap_or(at_ms);
        let mut values = self.true_values(model, read_at);
        let lost_kwh: f64 = model
            .energy_drops
            .iter()
            .filter(|(w, _)| w.contains(at_ms))
            .map(|(_, kwh)| kwh)
            .sum();
        if lost_kwh > 0.0 {
            values.energy_kwh = values.energy_kwh.map(|e| e - lost_kwh);
        }
        Some(values)
    }

    /// What the meter of `model` reads at `at_ms` without meter faults.
    fn true_values(&self, model: &MeterModel, at_ms: i64) -> Values {
        let second = at_ms.div_euclid(1000);
        let jitter = |channel: u64| 2.0 * second_unit(self.seed, model.key, second, channel) - 1.0;

        let (power_kw, power_factor) = match &model.load {
            Some(load) => {
                let level = if self.load_running(load, at_ms) {
                    load.running_level_kw(at_ms)
                } else {
                    load.off_kw
                };
                let pf = load
                    .power_factor
                    .unwrap_or(model.base_power_factor + PF_JITTER * jitter(1));
                (level * (1.0 + load.noise * jitter(0)), pf)
            }
            None => (0.0, model.base_power_factor + PF_JITTER * jitter(1)),
        };
        let voltage_v: Vec<f64> = (0..3)
            .map(|phase| model.base_voltage * (1.0 + VOLTAGE_JITTER * jitter(2 + phase)))
            .collect();
        let current_a = voltage_v
            .iter()
            .map(|u| (power_kw * 1000.0 / (3.0 * u * power_factor)) as f32)
            .collect();
        Values {
            power_kw: Some(power_kw as f32),
            energy_kwh: Some(self.energy_kwh(model, at_ms)),
            voltage_v: voltage_v.into_iter().map(|u| u as f32).collect(),
            current_a,
            power_factor: Some(power_factor as f32),
        }
    }

    /// Whether `facility` runs at `at_ms` (`None`: no such facility).
    pub fn is_running(&self, facility: &str, at_ms: i64) -> Option<bool> {
        let model = &self.meters[*self.by_facility.get(facility)?];
        let load = model.load.as_ref()?;
        Some(self.load_running(load, at_ms))
    }

    /// Facilities whose simulated draw, noise included, would not cross the
    /// site's thresholds: running below `start_threshold_kw` or off at or
    /// above `stop_threshold_kw`. Such a scenario cannot show clean states.
    pub fn threshold_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for load in self.meters.iter().filter_map(|m| m.load.as_ref()) {
            let lowest_running = load.running_kw * (1.0 - load.noise);
            if lowest_running < load.start_threshold_kw {
                problems.push(format!(
                    "facility `{}` may run at {lowest_running:.3} kW, below its start threshold {} kW",
                    load.facility, load.start_threshold_kw
                ));
            }
            for low in &load.low_load {
                let lowest = load.rated_kw * low.fraction * (1.0 - load.noise);
                if lowest < load.start_threshold_kw {
                    problems.push(format!(
                        "facility `{}` may run at {lowest:.3} kW under low_load faults[{}], below its start threshold {} kW",
                        load.facility, low.fault, load.start_threshold_kw
                    ));
                }
            }
            let highest_off = load.off_kw * (1.0 + load.noise);
            if highest_off >= load.stop_threshold_kw {
                problems.push(format!(
                    "facility `{}` may draw {highest_off:.3} kW when off, not below its stop threshold {} kW",
                    load.facility, load.stop_threshold_kw
                ));
            }
        }
        problems
    }

    fn load_running(&self, load: &FacilityLoad, at_ms: i64) -> bool {
        at_ms
            .checked_add(1)
            .is_some_and(|next| self.running_ms(load, at_ms, next) > 0)
    }

    fn energy_kwh(&self, model: &MeterModel, at_ms: i64) -> f64 {
        let Some(load) = &model.load else {
            return model.initial_kwh;
        };
        let until = at_ms.max(self.origin_ms);
        let running = self.running_spans(load, self.origin_ms, until);
        let running_ms: i64 = running.iter().map(|(s, e)| e - s).sum();
        let off_ms = until - self.origin_ms - running_ms;
        let mut normal_ms = running_ms;
        let mut kwh = model.initial_kwh + load.off_kw * off_ms as f64 / MS_PER_HOUR;
        for low in &load.low_load {
            let low_ms = overlap_ms(&running, &low.spans);
            normal_ms -= low_ms;
            kwh += load.rated_kw * low.fraction * low_ms as f64 / MS_PER_HOUR;
        }
        // Non-negative terms, each monotone in its own integer count (the
        // low-load spans are disjoint, so `normal_ms` is the running time
        // outside all of them).
        kwh + load.running_kw * normal_ms as f64 / MS_PER_HOUR
    }

    /// Milliseconds of `[from_ms, until_ms)` during which the facility runs.
    fn running_ms(&self, load: &FacilityLoad, from_ms: i64, until_ms: i64) -> i64 {
        self.running_spans(load, from_ms, until_ms)
            .iter()
            .map(|(s, e)| e - s)
            .sum()
    }

    /// The sorted, disjoint spans of `[from_ms, until_ms)` during which the
    /// facility runs.
    fn running_spans(&self, load: &FacilityLoad, from_ms: i64, until_ms: i64) -> Vec<(i64, i64)> {
        if until_ms <= from_ms {
            return Vec::new();
        }
        let mut spans = Vec::new();
        let (Some(first), Some(last)) = (
            self.local_date(from_ms.saturating_sub(2 * MS_PER_DAY)),
            self.local_date(until_ms.saturating_add(MS_PER_DAY)),
        ) else {
            return Vec::new();
        };
        for date in first.iter_days().take_while(|d| *d <= last) {
            for window in &load.schedule {
                let end_date = if window.end <= window.start {
                    date.succ_opt()
                } else {
                    Some(date)
                };
                let start = self.local_ms(date, window.start);
                let end = end_date.and_then(|d| self.local_ms(d, window.end));
                if let (Some(start), Some(end)) = (start, end) {
                    let start = (start - window.before_ms).max(from_ms);
                    let end = (end + window.after_ms).min(until_ms);
                    if start < end {
                        spans.push((start, end));
                    }
                }
            }
        }
        subtract(merge(spans), &load.forced_off)
    }

    fn local_date(&self, at_ms: i64) -> Option<NaiveDate> {
        self.time_zone
            .timestamp_millis_opt(at_ms)
            .single()
            .map(|t| t.date_naive())
    }

    fn local_ms(&self, date: NaiveDate, time: NaiveTime) -> Option<i64> {
        local_ms(self.time_zone, date, time)
    }
}

impl FacilityLoad {
    /// The noiseless draw while running: its running level, or its
    /// fraction of rated power inside a `low_load` fault.
    fn running_level_kw(&self, at_ms: i64) -> f64 {
        self.low_load
            .iter()
            .find(|low| low.spans.iter().any(|(s, e)| *s <= at_ms && at_ms < *e))
            .map_or(self.running_kw, |low| self.rated_kw * low.fraction)
    }
}

/// Windows in which `facility` of `line` is forced off: its `facility_off`
/// faults and, for a treatment facility, what the line's `treatment_late`
/// and `treatment_early` faults take from the shifts' lead and lag.
fn forced_off_windows(scenario: &Scenario, line: &str, facility: &Facility) -> Vec<Window> {
    let treatment = facility.role() == Role::Treatment;
    let mut windows = Vec::new();
    for fault in &scenario.faults {
        let (edge, offset) = match &fault.effect {
            FaultEffect::FacilityOff { facilities } => {
                if facilities.contains(&facility.id) {
                    windows.push(fault.window);
                }
                continue;
            }
            FaultEffect::TreatmentLate { lines, late }
                if treatment && lines.iter().any(|l| l == line) =>
            {
                (ShiftEdge::Start, *late)
            }
            FaultEffect::TreatmentEarly { lines, early }
                if treatment && lines.iter().any(|l| l == line) =>
            {
                (ShiftEdge::End, *early)
            }
            _ => continue,
        };
        let offset_ms = offset.as_millis() as i64;
        let edges = shift_edges(
            &scenario.shifts,
            scenario.site.time_zone,
            line,
            fault.window,
            edge,
        );
        for (at_ms, index) in edges {
            let shift = &scenario.shifts[index];
            windows.push(match edge {
                ShiftEdge::Start => Window {
                    from_ms: at_ms - shift.treatment_lead.as_millis() as i64,
                    until_ms: at_ms + offset_ms,
                },
                ShiftEdge::End => Window {
                    from_ms: at_ms - offset_ms,
                    until_ms: at_ms + shift.treatment_lag.as_millis() as i64,
                },
            });
        }
    }
    windows
}

/// Milliseconds where two sorted lists of disjoint half-open spans overlap.
fn overlap_ms(a: &[(i64, i64)], b: &[(i64, i64)]) -> i64 {
    let mut total = 0;
    for (a_start, a_end) in a {
        for (b_start, b_end) in b {
            let start = (*a_start).max(*b_start);
            let end = (*a_end).min(*b_end);
            if start < end {
                total += end - start;
            }
        }
    }
    total
}

/// Sorted, disjoint union of half-open spans.
fn merge(mut spans: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    spans.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// `spans` minus every window.
fn subtract(spans: Vec<(i64, i64)>, windows: &[Window]) -> Vec<(i64, i64)> {
    windows.iter().fold(spans, |spans, w| {
        let mut rest = Vec::with_capacity(spans.len() + 1);
        for (start, end) in spans {
            if w.until_ms <= start || end <= w.from_ms {
                rest.push((start, end));
                continue;
            }
            if start < w.from_ms {
                rest.push((start, w.from_ms));
            }
            if w.until_ms < end {
                rest.push((w.until_ms, end));
            }
        }
        rest
    })
}

/// 64-bit FNV-1a: a stable hash of meter ids (std's hasher may change
/// between Rust releases, and the readings must not).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn to_unit(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// A number in [0, 1) fixed per (seed, meter, channel).
fn fixed_unit(seed: u64, key: u64, channel: u64) -> f64 {
    to_unit(mix(
        mix(seed ^ mix(key)) ^ channel.wrapping_mul(0x1000_0000_01b3)
    ))
}

/// A number in [0, 1) per (seed, meter, virtual second, channel).
fn second_unit(seed: u64, key: u64, second: i64, channel: u64) -> f64 {
    to_unit(mix(
        mix(mix(seed ^ mix(key)) ^ second as u64) ^ channel.wrapping_add(0x51_7cc1)
    ))
}

#[cfg(test)]
#[path = "plant_fault_tests.rs"]
mod fault_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::{demo_ms, deploy_scenario, deploy_site, DEPLOY_SCENARIO};

    fn power(plant: &Plant, meter: &str, at: &str) -> f64 {
        f64::from(plant.values(meter, demo_ms(at)).unwrap().power_kw.unwrap())
    }

    fn energy(plant: &Plant, meter: &str, at_ms: i64) -> f64 {
        plant.values(meter, at_ms).unwrap().energy_kwh.unwrap()
    }

    /// `value` is within 3 % (the default noise) of `level`.
    fn near(value: f64, level: f64) -> bool {
        (value - level).abs() <= level * 0.03 + 1e-6
    }

    #[test]
    fn stenter_runs_inside_shifts_and_idles_between_them() {
        let plant = Plant::new(&deploy_scenario());
        for (at, running) in [
            ("06:59:59", false),
            ("07:00:00", true),
            ("11:29:59", true),
            ("11:30:00", false),
            ("12:29:59", false),
            ("12:30:00", true),
            ("21:59:59", true),
            ("22:00:00", false),
        ] {
            assert_eq!(
                plant.is_running("l1-stenter", demo_ms(at)),
                Some(running),
                "{at}"
            );
            let level = if running { 150.0 * 0.75 } else { 8.0 };
            let p = power(&plant, "l1-stenter", at);
            assert!(near(p, level), "{at}: {p} kW, expected about {level}");
        }
    }

    #[test]
    fn treatment_starts_lead_minutes_early_and_stops_lag_minutes_late() {
        let plant = Plant::new(&deploy_scenario());
        for (at, running) in [
            ("06:49:59", false),
            ("06:50:00", true),
            ("11:49:59", true),
            ("11:50:00", false),
            ("12:19:59", false),
            ("12:20:00", true),
            ("22:19:59", true),
            ("22:20:00", false),
        ] {
            assert_eq!(
                plant.is_running("l2-main-fan", demo_ms(at)),
                Some(running),
                "{at}"
            );
            let level = if running { 22.0 * 0.8 } else { 0.02 };
            let p = power(&plant, "l2-main-fan", at);
            assert!(near(p, level), "{at}: {p} kW, expected about {level}");
        }
    }

    #[test]
    fn facility_off_fault_stops_only_the_named_facilities_in_its_window() {
        let plant = Plant::new(&deploy_scenario());
        for facility in ["l1-condenser", "l1-main-fan", "l1-hv-esp"] {
            assert_eq!(plant.is_running(facility, demo_ms("14:02:59")), Some(true));
            assert_eq!(plant.is_running(facility, demo_ms("14:03:00")), Some(false));
            assert_eq!(plant.is_running(facility, demo_ms("14:29:59")), Some(false));
            assert_eq!(plant.is_running(facility, demo_ms("14:30:00")), Some(true));
        }
        assert!(near(power(&plant, "l1-hv-esp", "14:10:00"), 0.05));
        assert!(near(power(&plant, "l1-condenser", "14:10:00"), 0.02));
        // The stenter keeps producing, and line 2 is untouched.
        assert_eq!(
            plant.is_running("l1-stenter", demo_ms("14:10:00")),
            Some(true)
        );
        assert_eq!(
            plant.is_running("l1-spray-pump", demo_ms("14:10:00")),
            Some(true)
        );
        assert_eq!(
            plant.is_running("l2-condenser", demo_ms("14:10:00")),
            Some(true)
        );
        assert!(near(power(&plant, "l2-condenser", "14:10:00"), 7.5 * 0.85));
    }

    #[test]
    fn reads_within_one_virtual_second_agree() {
        let plant = Plant::new(&deploy_scenario());
        let at = demo_ms("09:00:00");
        let first = plant.values("l1-stenter", at).unwrap();
        let second = plant.values("l1-stenter", at + 999).unwrap();
        assert_eq!(first.power_kw, second.power_kw);
        assert_eq!(first.voltage_v, second.voltage_v);
        assert_eq!(first.power_factor, second.power_factor);
        // Only the energy counter moves within the second.
        assert!(second.energy_kwh.unwrap() > first.energy_kwh.unwrap());
        // Another plant with the same seed reads the same.
        assert_eq!(
            Plant::new(&deploy_scenario())
                .values("l1-stenter", at)
                .unwrap(),
            first
        );
        // The noise does change from second to second.
        let powers: std::collections::HashSet<u32> = (0..10)
            .map(|s| {
                plant
                    .values("l1-stenter", at + s * 1000)
                    .unwrap()
                    .power_kw
                    .unwrap()
                    .to_bits()
            })
            .collect();
        assert!(powers.len() > 5, "{powers:?}");
    }

    #[test]
    fn electrical_values_are_consistent_and_in_range() {
        let plant = Plant::new(&deploy_scenario());
        for meter in ["l1-stenter", "l1-hv-esp", "l2-spray-pump"] {
            for minute in (0..24 * 60).step_by(13) {
                let at = demo_ms("00:00:00") + minute * 60_000;
                let v = plant.values(meter, at).unwrap();
                let pf = v.power_factor.unwrap();
                assert!((0.80..=0.88).contains(&pf), "{meter} {pf}");
                for (u, i) in v.voltage_v.iter().zip(&v.current_a) {
                    assert!((220.0 * 0.98..=230.0 * 1.02).contains(u), "{meter} {u}");
                    let expected = v.power_kw.unwrap() * 1000.0 / (3.0 * u * pf);
                    assert!(
                        (i - expected).abs() <= expected * 1e-5,
                        "{meter} {i} {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn energy_integrates_the_noiseless_schedule_exactly() {
        let plant = Plant::new(&deploy_scenario());
        let start = demo_ms("00:00:00");
        let e0 = energy(&plant, "l1-stenter", start);
        // Idle 8 kW from midnight to 07:00.
        assert!((energy(&plant, "l1-stenter", demo_ms("07:00:00")) - e0 - 56.0).abs() < 1e-9);
        // The whole day: 14 h at 112.5 kW and 10 h idle at 8 kW.
        let day = energy(&plant, "l1-stenter", start + MS_PER_DAY) - e0;
        assert!((day - (14.0 * 112.5 + 10.0 * 8.0)).abs() < 1e-9, "{day}");
        // The condenser of line 1 loses 27 minutes of running to the fault:
        // 15 h scheduled (06:50-11:50 and 12:20-22:20).
        let e0 = energy(&plant, "l1-condenser", start);
        let day = energy(&plant, "l1-condenser", start + MS_PER_DAY) - e0;
        let running_h = 15.0 - 0.45;
        let expected = running_h * 6.375 + (24.0 - running_h) * 0.02;
        assert!((day - expected).abs() < 1e-9, "{day} {expected}");
        // Before the scenario starts the counter shows its initial reading.
        assert_eq!(energy(&plant, "l1-condenser", start - 3_600_000), e0);
    }

    #[test]
    fn energy_never_goes_backwards() {
        let plant = Plant::new(&deploy_scenario());
        let start = demo_ms("00:00:00");
        for meter in ["l1-stenter", "l1-condenser", "l2-main-fan"] {
            let mut previous = f64::MIN;
            let mut previous_f32 = f32::MIN;
            // Every 7 s over two days, plus every ms around a shift edge.
            let times = (0..2 * 86_400 / 7)
                .map(|i| start + i * 7_000)
                .chain((0..2_000).map(|i| demo_ms("06:59:59") + i));
            let mut times: Vec<i64> = times.collect();
            times.sort_unstable();
            for at in times {
                let e = energy(&plant, meter, at);
                assert!(e >= previous, "{meter} at {at}: {e} < {previous}");
                // The f32 a meter register holds is monotone too.
                assert!(e as f32 >= previous_f32);
                previous = e;
                previous_f32 = e as f32;
            }
        }
    }

    #[test]
    fn deploy_site_thresholds_separate_running_from_off() {
        let scenario = deploy_scenario();
        let plant = Plant::new(&scenario);
        assert_eq!(plant.threshold_problems(), Vec::<String>::new());
        // And by measurement: every sample of the day, noise included, is on
        // the right side of its facility's thresholds.
        for line in &scenario.site.lines {
            for facility in &line.facilities {
                for second in (0..86_400).step_by(37) {
                    let at = scenario.start_ms + second * 1000;
                    let p = f64::from(plant.values(&facility.meter, at).unwrap().power_kw.unwrap());
                    if plant.is_running(&facility.id, at).unwrap() {
                        assert!(p >= facility.start_threshold_kw, "{} {p}", facility.id);
                    } else {
                        assert!(p < facility.stop_threshold_kw, "{} {p}", facility.id);
                    }
                }
            }
        }
    }

    #[test]
    fn threshold_problems_name_the_facility() {
        let text = format!(
            "{DEPLOY_SCENARIO}\n[[facilities]]\nid = \"l1-hv-esp\"\nrunning_fraction = 0.05\nidle_kw = 0.6\nnoise_pct = 0\n"
        );
        let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
        assert_eq!(
            Plant::new(&scenario).threshold_problems(),
            vec![
                "facility `l1-hv-esp` may run at 0.500 kW, below its start threshold 0.8 kW",
                "facility `l1-hv-esp` may draw 0.600 kW when off, not below its stop threshold 0.5 kW",
            ]
        );
    }

    #[test]
    fn overnight_shift_runs_across_midnight() {
        let text = DEPLOY_SCENARIO
            .replacen("\"07:00\"", "\"22:00\"", 1)
            .replacen("\"11:30\"", "\"06:00\"", 1);
        let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
        let plant = Plant::new(&scenario);
        for (at, running) in [
            ("00:00:00", true), // the shift that began the evening before
            ("05:59:59", true),
            ("06:00:00", false),
            ("12:00:00", false), // before the second shift starts
            ("13:00:00", true),
            ("22:00:00", true),
            ("23:59:59", true),
        ] {
            assert_eq!(
                plant.is_running("l1-stenter", demo_ms(at)),
                Some(running),
                "{at}"
            );
        }
        // Treatment lag carries past the shift end the next morning.
        assert_eq!(
            plant.is_running("l1-main-fan", demo_ms("06:19:59")),
            Some(true)
        );
        assert_eq!(
            plant.is_running("l1-main-fan", demo_ms("06:20:00")),
            Some(false)
        );
    }

    #[test]
    fn unknown_meter_or_facility_has_no_values() {
        let plant = Plant::new(&deploy_scenario());
        assert_eq!(plant.values("nope", 0), None);
        assert_eq!(plant.is_running("nope", 0), None);
    }

    #[test]
    fn span_arithmetic() {
        assert_eq!(
            merge(vec![(5, 9), (0, 3), (3, 4), (8, 12)]),
            vec![(0, 4), (5, 12)]
        );
        let w = |from_ms, until_ms| Window { from_ms, until_ms };
        assert_eq!(
            subtract(vec![(0, 10), (20, 30)], &[w(5, 22), w(25, 26)]),
            vec![(0, 5), (22, 25), (26, 30)]
        );
        assert_eq!(subtract(vec![(0, 10)], &[w(0, 10)]), vec![]);
    }
}
