//! Every scenario file under `deploy/scenarios/` loads (with the site file
//! it names), injects exactly one violation, and keeps every facility's
//! draw on the right side of its thresholds.

use std::path::PathBuf;

use facwatch_sim::{Plant, Scenario};

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/scenarios")
}

#[test]
fn every_rule_scenario_loads_with_one_violation_and_clean_thresholds() {
    let mut names: Vec<String> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".scenario.toml"))
        .collect();
    names.sort();
    for name in &names {
        let scenario =
            Scenario::load(&scenarios_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(scenario.site.id, "tx-dyeing", "{name}");
        assert_eq!(scenario.end_ms - scenario.start_ms, 86_400_000, "{name}");
        // R6's violation is declared in the site file, not injected.
        let faults = usize::from(!name.starts_with("r6-"));
        assert_eq!(scenario.faults.len(), faults, "{name}");
        assert_eq!(
            Plant::new(&scenario).threshold_problems(),
            Vec::<String>::new(),
            "{name}"
        );
    }
    let expected = [
        "r1-boundary-exact",
        "r1-boundary-short",
        "r1-treatment-stopped",
        "r2-boundary-exact",
        "r2-boundary-short",
        "r2-treatment-late",
        "r3-boundary-exact",
        "r3-boundary-short",
        "r3-treatment-early",
        "r4-boundary-exact",
        "r4-boundary-short",
        "r4-low-load",
        "r5-gateway-silent",
        "r5-meter-silent",
        "r6-restriction",
        "r7-energy-backwards",
        "r7-frozen-boundary-exact",
        "r7-frozen-boundary-short",
        "r7-frozen-value",
    ]
    .map(|n| format!("{n}.scenario.toml"));
    assert_eq!(names, expected);
}

#[test]
fn gateway_silence_lists_every_meter_of_the_gateway() {
    let scenario =
        Scenario::load(&scenarios_dir().join("r5-gateway-silent.scenario.toml")).unwrap();
    let at = scenario.faults[0].window.from_ms;
    for meter in &scenario.site.meters {
        assert!(scenario.meter_faults(&meter.id, at).silent, "{}", meter.id);
        assert!(
            !scenario.meter_faults(&meter.id, at - 1).silent,
            "{}",
            meter.id
        );
    }
}
