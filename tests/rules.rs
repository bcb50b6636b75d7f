//! Scenario tests of the detection rules: each scenario under
//! `deploy/scenarios/` is a simulated day of the demo plant with one
//! violation injected; the simulator's plant model and fault schedule give
//! the samples the gateway would take (`facwatch::plant_samples`), fed to
//! the ingest's detector in one-minute batches as the gateway cuts them.
//! Each test asserts the exact events of its day: rule, line, start, end,
//! facilities. Boundary pairs: a condition one poll shorter than its
//! minimum duration gives no event, the minimum gives one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use facwatch::plant_samples;
use facwatch_ingest::detect::{DataLoss, Event, EventStatus, GatewayDetector, Rule};
use facwatch_sim::Scenario;

const GATEWAY: &str = "gw-01";

/// 2022-12-13 `h:m:s` (+08:00), Unix ms.
fn at(h: i64, m: i64, s: i64) -> i64 {
    1_670_860_800_000 + ((h * 60 + m) * 60 + s) * 1000
}

/// Every event of the scenario's day, last version of each, by start.
fn events_of(scenario_file: &str) -> Vec<Event> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/scenarios")
        .join(scenario_file);
    let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{scenario_file}: {e}"));
    let samples = plant_samples::samples(&scenario, GATEWAY, scenario.start_ms, scenario.end_ms);
    let mut detector = GatewayDetector::new(Arc::new(scenario.site.clone()), GATEWAY);
    // Replayed long after: wall time a day after the scenario.
    let wall_now = scenario.end_ms + 86_400_000;
    let mut events = BTreeMap::new();
    // Ten meters every 30 s: 20 samples per one-minute batch.
    for batch in samples.chunks(20) {
        for event in detector.apply_batch(batch, DataLoss::default(), wall_now) {
            events.insert(event.id.clone(), event);
        }
    }
    let mut events: Vec<Event> = events.into_values().collect();
    events.sort_by_key(|e| (e.start_ms, e.line.clone()));
    events
}

/// (rule, line, start, end, facilities) of closed events.
type Summary = (Rule, String, i64, i64, Vec<String>);

fn summary(events: &[Event]) -> Vec<Summary> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e.status, EventStatus::Closed, "{e:#?}");
            (
                e.rule,
                e.line.clone(),
                e.start_ms,
                e.end_ms.expect("closed"),
                e.facilities.clone(),
            )
        })
        .collect()
}

fn expect(rule: Rule, line: &str, start: i64, end: i64, facilities: &[&str]) -> Summary {
    (
        rule,
        line.to_string(),
        start,
        end,
        facilities.iter().map(|f| f.to_string()).collect(),
    )
}

fn assert_events(scenario_file: &str, expected: &[Summary]) {
    let events = events_of(scenario_file);
    assert_eq!(
        summary(&events),
        expected,
        "{scenario_file}: {:#?}",
        events.iter().map(|e| &e.notice_en).collect::<Vec<_>>()
    );
}

const L1_TREATMENT: [&str; 4] = ["l1-condenser", "l1-hv-esp", "l1-main-fan", "l1-spray-pump"];

#[test]
fn r1_treatment_stopped_while_production_runs() {
    assert_events(
        "r1-treatment-stopped.scenario.toml",
        &[expect(
            Rule::R1,
            "line2",
            at(9, 15, 0),
            at(9, 40, 0),
            &["l2-hv-esp", "l2-main-fan"],
        )],
    );
}

#[test]
fn r1_boundary_one_poll_short_of_ten_minutes_gives_nothing_ten_give_one() {
    assert_events("r1-boundary-short.scenario.toml", &[]);
    assert_events(
        "r1-boundary-exact.scenario.toml",
        &[expect(
            Rule::R1,
            "line2",
            at(9, 15, 0),
            at(9, 25, 0),
            &["l2-main-fan"],
        )],
    );
}

#[test]
fn r2_treatment_started_after_production() {
    assert_events(
        "r2-treatment-late.scenario.toml",
        &[expect(
            Rule::R2,
            "line1",
            at(7, 0, 0),
            at(7, 8, 0),
            &L1_TREATMENT,
        )],
    );
}

#[test]
fn r2_boundary() {
    assert_events("r2-boundary-short.scenario.toml", &[]);
    assert_events(
        "r2-boundary-exact.scenario.toml",
        &[expect(
            Rule::R2,
            "line1",
            at(7, 0, 0),
            at(7, 5, 30),
            &L1_TREATMENT,
        )],
    );
}

#[test]
fn r3_treatment_stopped_before_production() {
    assert_events(
        "r3-treatment-early.scenario.toml",
        &[expect(
            Rule::R3,
            "line1",
            at(11, 22, 0),
            at(11, 30, 0),
            &L1_TREATMENT,
        )],
    );
}

#[test]
fn r3_boundary() {
    assert_events("r3-boundary-short.scenario.toml", &[]);
    assert_events(
        "r3-boundary-exact.scenario.toml",
        &[expect(
            Rule::R3,
            "line1",
            at(11, 24, 30),
            at(11, 30, 0),
            &L1_TREATMENT,
        )],
    );
}

#[test]
fn r4_low_load_treatment() {
    assert_events(
        "r4-low-load.scenario.toml",
        &[expect(
            Rule::R4,
            "line1",
            at(15, 0, 0),
            at(15, 40, 0),
            &["l1-main-fan"],
        )],
    );
}

#[test]
fn r4_boundary() {
    assert_events("r4-boundary-short.scenario.toml", &[]);
    assert_events(
        "r4-boundary-exact.scenario.toml",
        &[expect(
            Rule::R4,
            "line1",
            at(15, 0, 0),
            at(15, 15, 0),
            &["l1-main-fan"],
        )],
    );
}

#[test]
fn r5_one_meter_silent() {
    assert_events(
        "r5-meter-silent.scenario.toml",
        &[expect(
            Rule::R5,
            "line2",
            at(15, 59, 30), // the meter's last reading; 16:20 its next
            at(16, 20, 0),
            &["l2-condenser"],
        )],
    );
}

#[test]
fn r7_frozen_power_value() {
    assert_events(
        "r7-frozen-value.scenario.toml",
        &[expect(
            Rule::R7,
            "line1",
            at(15, 0, 0),
            at(16, 30, 0),
            &["l1-main-fan"],
        )],
    );
}

#[test]
fn r7_frozen_boundary() {
    assert_events("r7-frozen-boundary-short.scenario.toml", &[]);
    assert_events(
        "r7-frozen-boundary-exact.scenario.toml",
        &[expect(
            Rule::R7,
            "line1",
            at(15, 0, 0),
            at(16, 0, 0),
            &["l1-main-fan"],
        )],
    );
}

#[test]
fn r6_production_inside_a_restriction_window() {
    // Line 1 produces through the whole window; line 2 is not restricted.
    assert_events(
        "r6-restriction.scenario.toml",
        &[expect(
            Rule::R6,
            "line1",
            at(13, 0, 0),
            at(15, 0, 0),
            &["l1-stenter"],
        )],
    );
}

#[test]
fn r5_whole_gateway_silent() {
    // Every meter silent 16:00-16:20: one interruption of the whole gateway
    // (line `*`), from the last reading to the next, not one per meter.
    let all = [
        "l1-condenser",
        "l1-hv-esp",
        "l1-main-fan",
        "l1-spray-pump",
        "l1-stenter",
        "l2-condenser",
        "l2-hv-esp",
        "l2-main-fan",
        "l2-spray-pump",
        "l2-stenter",
    ];
    assert_events(
        "r5-gateway-silent.scenario.toml",
        &[expect(Rule::R5, "*", at(15, 59, 30), at(16, 20, 0), &all)],
    );
}

#[test]
fn r7_energy_counter_going_backwards() {
    // A point event at the reading that went backwards.
    assert_events(
        "r7-energy-backwards.scenario.toml",
        &[expect(
            Rule::R7,
            "line2",
            at(10, 0, 0),
            at(10, 0, 0),
            &["l2-stenter"],
        )],
    );
}
