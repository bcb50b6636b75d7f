//! The plant-behaviour fault kinds (`treatment_late`, `treatment_early`,
//! `low_load`, `frozen_value`, `energy_backwards`), driven by the scenario
//! files under `deploy/scenarios/`: each is compared poll by poll with the
//! same scenario without its faults, so a test sees every value a fault
//! changes, and only those.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;
use crate::scenario::tests::{demo_ms, deploy_site};
use facwatch_proto::site::Site;

const POLL_MS: i64 = 30_000;

fn scenario_file(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/scenarios")
        .join(format!("{name}.scenario.toml"));
    Scenario::load(&path).unwrap()
}

/// The plant of `scenario` and of the same scenario without faults.
fn faulted_and_healthy(scenario: &Scenario) -> (Plant, Plant) {
    let mut healthy = scenario.clone();
    healthy.faults.clear();
    (Plant::new(scenario), Plant::new(&healthy))
}

/// Local time of day `HH:MM:SS` of a demo-day instant.
fn hms(at_ms: i64) -> String {
    let seconds = (at_ms - demo_ms("00:00:00")).div_euclid(1000);
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60
    )
}

/// Per meter, the spans `[first differing poll, first equal poll)` of the
/// day on which `read` differs between the two plants.
fn changed_spans(
    faulted: &Plant,
    healthy: &Plant,
    site: &Site,
    read: impl Fn(&Values) -> Vec<u32>,
) -> BTreeMap<String, Vec<(String, String)>> {
    let start = demo_ms("00:00:00");
    let mut changed = BTreeMap::new();
    for meter in &site.meters {
        let mut spans = Vec::new();
        let mut open: Option<i64> = None;
        for poll in 0..=(MS_PER_DAY / POLL_MS) {
            let at = start + poll * POLL_MS;
            let differs = read(&faulted.values(&meter.id, at).unwrap())
                != read(&healthy.values(&meter.id, at).unwrap());
            match (differs, open) {
                (true, None) => open = Some(at),
                (false, Some(from)) => {
                    spans.push((hms(from), hms(at)));
                    open = None;
                }
                _ => {}
            }
        }
        if !spans.is_empty() {
            changed.insert(meter.id.clone(), spans);
        }
    }
    changed
}

fn power_bits(v: &Values) -> Vec<u32> {
    vec![v.power_kw.unwrap().to_bits()]
}

/// Every register except the energy counter.
fn instantaneous_bits(v: &Values) -> Vec<u32> {
    let mut bits = vec![
        v.power_kw.unwrap().to_bits(),
        v.power_factor.unwrap().to_bits(),
    ];
    bits.extend(v.voltage_v.iter().chain(&v.current_a).map(|x| x.to_bits()));
    bits
}

fn energy_bits(v: &Values) -> Vec<u32> {
    vec![(v.energy_kwh.unwrap() as f32).to_bits()]
}

fn spans(list: &[(&str, &[(&str, &str)])]) -> BTreeMap<String, Vec<(String, String)>> {
    list.iter()
        .map(|(meter, spans)| {
            let spans = spans
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            (meter.to_string(), spans)
        })
        .collect()
}

fn energy(plant: &Plant, meter: &str, at_ms: i64) -> f64 {
    plant.values(meter, at_ms).unwrap().energy_kwh.unwrap()
}

/// The energy a facility used over the demo day, kWh.
fn day_energy(plant: &Plant, meter: &str) -> f64 {
    let start = demo_ms("00:00:00");
    energy(plant, meter, start + MS_PER_DAY) - energy(plant, meter, start)
}

/// Every meter's counter, read every 29 s over the day and every ms
/// around the given instants, never decreases (and its f32 register
/// neither), except at the instants listed in `drops`.
fn assert_energy_monotone(plant: &Plant, site: &Site, around: &[&str], drops: &[(&str, &str)]) {
    let start = demo_ms("00:00:00");
    // Every 29 s: off the poll grid, so every phase of it over the day.
    let mut times: Vec<i64> = (0..=MS_PER_DAY / 29_000)
        .map(|i| start + i * 29_000)
        .collect();
    for at in around {
        times.extend((-1_000..1_000).map(|d| demo_ms(at) + d));
    }
    times.sort_unstable();
    for meter in &site.meters {
        let mut previous = (f64::MIN, f32::MIN);
        for &at in &times {
            let e = energy(plant, &meter.id, at);
            let allowed = drops
                .iter()
                .any(|(m, when)| *m == meter.id && demo_ms(when) == at);
            if !allowed {
                assert!(
                    e >= previous.0,
                    "{} at {}: {e} < {}",
                    meter.id,
                    hms(at),
                    previous.0
                );
                assert!(e as f32 >= previous.1, "{} at {}", meter.id, hms(at));
            }
            previous = (e, e as f32);
        }
    }
}

#[test]
fn treatment_late_delays_only_that_lines_treatment_at_that_start() {
    let scenario = scenario_file("r2-treatment-late");
    let (faulted, healthy) = faulted_and_healthy(&scenario);
    // Treatment of line 1 would run from 06:50; it is off until 07:08.
    let late: &[(&str, &str)] = &[("06:50:00", "07:08:00")];
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, power_bits),
        spans(&[
            ("l1-condenser", late),
            ("l1-hv-esp", late),
            ("l1-main-fan", late),
            ("l1-spray-pump", late),
        ])
    );
    for facility in ["l1-condenser", "l1-hv-esp", "l1-main-fan", "l1-spray-pump"] {
        for (at, running) in [
            ("06:49:59", false),
            ("07:00:00", false),
            ("07:07:59", false),
            ("07:08:00", true),
            ("11:49:59", true),
            ("12:20:00", true), // the afternoon start keeps its lead
        ] {
            assert_eq!(
                faulted.is_running(facility, demo_ms(at)),
                Some(running),
                "{facility} {at}"
            );
        }
    }
    assert_eq!(
        faulted.is_running("l1-stenter", demo_ms("07:00:00")),
        Some(true)
    );
    // The counter integrates what was drawn: 18 minutes at the off level
    // instead of the running one.
    let lost_h = 18.0 / 60.0;
    let expected = day_energy(&healthy, "l1-main-fan") - lost_h * (22.0 * 0.8 - 0.02);
    assert!((day_energy(&faulted, "l1-main-fan") - expected).abs() < 1e-9);
    assert_energy_monotone(&faulted, &scenario.site, &["07:08:00"], &[]);
}

#[test]
fn treatment_early_stops_only_that_lines_treatment_at_that_end() {
    let scenario = scenario_file("r3-treatment-early");
    let (faulted, healthy) = faulted_and_healthy(&scenario);
    // Treatment of line 1 would run until 11:50; it stops at 11:22.
    let early: &[(&str, &str)] = &[("11:22:00", "11:50:00")];
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, power_bits),
        spans(&[
            ("l1-condenser", early),
            ("l1-hv-esp", early),
            ("l1-main-fan", early),
            ("l1-spray-pump", early),
        ])
    );
    assert_eq!(
        faulted.is_running("l1-main-fan", demo_ms("11:21:59")),
        Some(true)
    );
    assert_eq!(
        faulted.is_running("l1-main-fan", demo_ms("11:22:00")),
        Some(false)
    );
    assert_eq!(
        faulted.is_running("l1-stenter", demo_ms("11:29:59")),
        Some(true)
    );
    assert_eq!(
        faulted.is_running("l1-main-fan", demo_ms("22:19:59")),
        Some(true)
    );
    assert_energy_monotone(&faulted, &scenario.site, &["11:22:00"], &[]);
}

#[test]
fn boundary_offsets_move_the_edge_by_the_given_seconds() {
    for (name, facility, edge, running_after) in [
        ("r2-boundary-short", "l1-condenser", "07:04:30", true),
        ("r2-boundary-exact", "l1-condenser", "07:05:30", true),
        ("r3-boundary-short", "l1-hv-esp", "11:25:30", false),
        ("r3-boundary-exact", "l1-hv-esp", "11:24:30", false),
    ] {
        let plant = Plant::new(&scenario_file(name));
        let before = demo_ms(edge) - 1;
        assert_eq!(
            plant.is_running(facility, before),
            Some(!running_after),
            "{name}"
        );
        assert_eq!(
            plant.is_running(facility, demo_ms(edge)),
            Some(running_after),
            "{name}"
        );
    }
}

#[test]
fn low_load_lowers_the_running_draw_inside_its_window_only() {
    let scenario = scenario_file("r4-low-load");
    let (faulted, healthy) = faulted_and_healthy(&scenario);
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, instantaneous_bits),
        spans(&[("l1-main-fan", &[("15:00:00", "15:40:00")])])
    );
    let power = |at: &str| {
        f64::from(
            faulted
                .values("l1-main-fan", demo_ms(at))
                .unwrap()
                .power_kw
                .unwrap(),
        )
    };
    for at in ["15:00:00", "15:20:00", "15:39:59"] {
        let p = power(at);
        assert!((p - 6.6).abs() <= 6.6 * 0.03 + 1e-5, "{at}: {p}");
        // Running (above the 4 kW start threshold), but below 0.4 x rated.
        assert_eq!(faulted.is_running("l1-main-fan", demo_ms(at)), Some(true));
        assert!((4.0..0.4 * 22.0).contains(&p), "{at}: {p}");
    }
    for at in ["14:59:59", "15:40:00"] {
        let p = power(at);
        assert!((p - 17.6).abs() <= 17.6 * 0.03 + 1e-5, "{at}: {p}");
    }
    // 40 minutes at 6.6 kW instead of 17.6 kW.
    let expected = day_energy(&healthy, "l1-main-fan") - 40.0 / 60.0 * (17.6 - 6.6);
    assert!((day_energy(&faulted, "l1-main-fan") - expected).abs() < 1e-9);
    assert_energy_monotone(&faulted, &scenario.site, &["15:00:00", "15:40:00"], &[]);
    assert_eq!(faulted.threshold_problems(), Vec::<String>::new());
}

#[test]
fn overlapping_low_load_faults_the_first_wins_and_thresholds_are_checked() {
    let text = crate::scenario::tests::DEPLOY_SCENARIO.to_string()
        + "
[[faults]]
kind = \"low_load\"
facilities = [\"l2-main-fan\"]
fraction = 0.3
from = \"2022-12-13T15:00:00+08:00\"
until = \"2022-12-13T15:30:00+08:00\"

[[faults]]
kind = \"low_load\"
facilities = [\"l2-main-fan\", \"l2-condenser\"]
fraction = 0.1
from = \"2022-12-13T15:20:00+08:00\"
until = \"2022-12-13T15:40:00+08:00\"
";
    let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
    let plant = Plant::new(&scenario);
    let level = |meter: &str, at: &str| {
        let p = f64::from(plant.values(meter, demo_ms(at)).unwrap().power_kw.unwrap());
        [22.0 * 0.3, 22.0 * 0.1, 17.6, 7.5 * 0.1, 7.5 * 0.85]
            .into_iter()
            .find(|level| (p - level).abs() <= level * 0.03 + 1e-5)
    };
    assert_eq!(level("l2-main-fan", "15:25:00"), Some(22.0 * 0.3));
    assert_eq!(level("l2-main-fan", "15:30:00"), Some(22.0 * 0.1));
    assert_eq!(level("l2-main-fan", "15:40:00"), Some(17.6));
    assert_eq!(level("l2-condenser", "15:25:00"), Some(7.5 * 0.1));
    // The counter integrates the same levels: 30 min at 6.6 kW (the first
    // fault) and 10 min at 2.2 kW (what the second adds) instead of 40 min
    // at 17.6 kW.
    let mut healthy = scenario.clone();
    healthy.faults.truncate(3);
    let healthy = Plant::new(&healthy);
    let expected =
        day_energy(&healthy, "l2-main-fan") - 40.0 / 60.0 * 17.6 + 0.5 * 6.6 + 10.0 / 60.0 * 2.2;
    assert!((day_energy(&plant, "l2-main-fan") - expected).abs() < 1e-9);
    // 2.2 kW may fall below the fan's 4 kW start threshold; 0.75 kW below
    // the condenser's 1.5 kW.
    assert_eq!(
        plant.threshold_problems(),
        vec![
            "facility `l2-condenser` may run at 0.728 kW under low_load faults[4], below its start threshold 1.5 kW",
            "facility `l2-main-fan` may run at 2.134 kW under low_load faults[4], below its start threshold 4 kW",
        ]
    );
}

#[test]
fn frozen_value_repeats_the_whole_reading_of_the_window_start() {
    let scenario = scenario_file("r7-frozen-value");
    let (faulted, healthy) = faulted_and_healthy(&scenario);
    // Power, PF, voltages and currents differ from 15:00:30 (the 15:00:00
    // reading is the true one) until 16:30; the counter stands still.
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, instantaneous_bits),
        spans(&[("l1-main-fan", &[("15:00:30", "16:30:00")])])
    );
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, energy_bits),
        spans(&[("l1-main-fan", &[("15:00:30", "16:30:00")])])
    );
    let first = faulted.values("l1-main-fan", demo_ms("15:00:00")).unwrap();
    assert_eq!(
        first,
        healthy.values("l1-main-fan", demo_ms("15:00:00")).unwrap()
    );
    assert!(first.power_kw.unwrap() > 17.0);
    for at in (demo_ms("15:00:00")..demo_ms("16:30:00")).step_by(POLL_MS as usize / 7) {
        assert_eq!(
            faulted.values("l1-main-fan", at).unwrap(),
            first,
            "{}",
            hms(at)
        );
    }
    // The fan really keeps running; afterwards the meter reads true again.
    assert_eq!(
        faulted.is_running("l1-main-fan", demo_ms("15:30:00")),
        Some(true)
    );
    assert_eq!(
        faulted.values("l1-main-fan", demo_ms("16:30:00")),
        healthy.values("l1-main-fan", demo_ms("16:30:00"))
    );
    assert_energy_monotone(&faulted, &scenario.site, &["15:00:00", "16:30:00"], &[]);
}

#[test]
fn frozen_boundaries_end_half_a_poll_apart() {
    for (name, last_frozen, thawed) in [
        ("r7-frozen-boundary-short", "15:59:29", "15:59:30"),
        ("r7-frozen-boundary-exact", "15:59:59", "16:00:00"),
    ] {
        let plant = Plant::new(&scenario_file(name));
        let first = plant.values("l1-main-fan", demo_ms("15:00:00")).unwrap();
        assert_eq!(
            plant.values("l1-main-fan", demo_ms(last_frozen)).unwrap(),
            first,
            "{name}"
        );
        assert_ne!(
            plant
                .values("l1-main-fan", demo_ms(thawed))
                .unwrap()
                .power_kw,
            first.power_kw,
            "{name}"
        );
    }
}

#[test]
fn energy_backwards_lowers_only_the_counter_from_its_start() {
    let scenario = scenario_file("r7-energy-backwards");
    let (faulted, healthy) = faulted_and_healthy(&scenario);
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, instantaneous_bits),
        BTreeMap::new()
    );
    // The window runs to the scenario end: the counter never reads true
    // again within the day.
    assert_eq!(
        changed_spans(&faulted, &healthy, &scenario.site, energy_bits),
        spans(&[("l2-stenter", &[("10:00:00", "24:00:00")])])
    );
    for at in ["10:00:00", "10:00:30", "23:59:59"] {
        let drop = energy(&healthy, "l2-stenter", demo_ms(at))
            - energy(&faulted, "l2-stenter", demo_ms(at));
        assert!((drop - 50.0).abs() < 1e-9, "{at}: {drop}");
    }
    assert!(
        energy(&faulted, "l2-stenter", demo_ms("10:00:00"))
            < energy(&faulted, "l2-stenter", demo_ms("09:59:30"))
    );
    // The one allowed step back is at 10:00:00; the counter rises again after.
    assert_energy_monotone(
        &faulted,
        &scenario.site,
        &["10:00:00"],
        &[("l2-stenter", "10:00:00")],
    );
}

#[test]
fn energy_backwards_ends_with_a_step_forward_to_the_true_reading() {
    let text = crate::scenario::tests::with_faults(
        "kind = \"energy_backwards\"\nmeters = [\"l1-hv-esp\", \"l2-hv-esp\"]\ndrop_kwh = 2.5
        ----
        kind = \"energy_backwards\"\nmeters = [\"l1-hv-esp\"]\ndrop_kwh = 1",
    );
    let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
    let faulted = Plant::new(&scenario);
    let mut healthy = scenario.clone();
    healthy.faults.truncate(3); // the demo's own faults
    let healthy = Plant::new(&healthy);
    let drop = |meter: &str, at: &str| {
        energy(&healthy, meter, demo_ms(at)) - energy(&faulted, meter, demo_ms(at))
    };
    assert_eq!(drop("l1-hv-esp", "15:59:59"), 0.0);
    assert!(
        (drop("l1-hv-esp", "16:00:00") - 3.5).abs() < 1e-9,
        "overlapping drops add up"
    );
    assert!((drop("l2-hv-esp", "16:19:59") - 2.5).abs() < 1e-9);
    assert_eq!(drop("l1-hv-esp", "16:20:00"), 0.0);
}

#[test]
fn every_scenario_file_keeps_counters_monotone_outside_energy_backwards() {
    for name in [
        "r1-treatment-stopped",
        "r2-treatment-late",
        "r3-treatment-early",
        "r4-low-load",
        "r5-gateway-silent",
        "r7-frozen-value",
    ] {
        let scenario = scenario_file(name);
        assert_energy_monotone(&Plant::new(&scenario), &scenario.site, &[], &[]);
    }
}
