//! Property tests of the detector: for generated plant histories (the demo
//! plant with random facilities stopped, meters silent, for random spans
//! of a day), splitting the sample stream into arbitrary batches and
//! restarting the detector from its persisted snapshot at arbitrary points
//! give exactly the event list of one uninterrupted pass.
//!
//! Redelivery of batches never reaches the detector: the ingest drops a
//! batch whose `seq` it has applied before it gets there (ingest's
//! delivery tests, and the fault tests that kill the ingest during a
//! replay). Here a restart re-feeds nothing: the snapshot is taken after a
//! batch, as the ingest persists it in the batch's transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use facwatch::plant_samples;
use facwatch_ingest::detect::{DataLoss, Event, GatewayDetector};
use facwatch_proto::wire::Sample;
use facwatch_sim::scenario::{Fault, FaultEffect, Window};
use facwatch_sim::Scenario;
use proptest::prelude::*;

const GATEWAY: &str = "gw-01";
/// 2022-12-13 00:00 (+08:00).
const DAY_MS: i64 = 1_670_860_800_000;
const MINUTE_MS: i64 = 60_000;

const FACILITIES: [&str; 10] = [
    "l1-stenter",
    "l1-spray-pump",
    "l1-condenser",
    "l1-hv-esp",
    "l1-main-fan",
    "l2-stenter",
    "l2-spray-pump",
    "l2-condenser",
    "l2-hv-esp",
    "l2-main-fan",
];

/// One generated disturbance: which facility or meter (index into
/// [`FACILITIES`]; meter ids equal facility ids in the demo site), from
/// which minute of 06:00-23:00, for how many minutes, and whether the
/// facility stops or its meter goes silent.
type Disturbance = (usize, i64, i64, bool);

fn history(disturbances: &[Disturbance]) -> Scenario {
    let mut scenario = facwatch::builtin_scenario().expect("the built-in scenario");
    scenario.faults = disturbances
        .iter()
        .map(|&(which, start_minute, minutes, stop)| {
            let name = vec![FACILITIES[which].to_string()];
            let from_ms = DAY_MS + (6 * 60 + start_minute) * MINUTE_MS;
            Fault {
                window: Window {
                    from_ms,
                    until_ms: from_ms + minutes * MINUTE_MS,
                },
                effect: if stop {
                    FaultEffect::FacilityOff { facilities: name }
                } else {
                    FaultEffect::MeterSilent { meters: name }
                },
            }
        })
        .collect();
    scenario
}

/// Feeds `samples` cut at `cuts` (sample indices), restarting the detector
/// from its snapshot after every batch listed in `restarts`; returns the
/// last version of every event.
fn detect(
    scenario: &Scenario,
    samples: &[Sample],
    cuts: &[usize],
    restarts: &[usize],
) -> BTreeMap<String, Event> {
    let site = Arc::new(scenario.site.clone());
    let mut detector = GatewayDetector::new(site.clone(), GATEWAY);
    let wall_now = DAY_MS + 2 * 86_400_000;
    let mut events = BTreeMap::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(samples.len())).collect();
    bounds.push(0);
    bounds.push(samples.len());
    bounds.sort_unstable();
    bounds.dedup();
    for (batch, pair) in bounds.windows(2).enumerate() {
        for event in detector.apply_batch(&samples[pair[0]..pair[1]], DataLoss::default(), wall_now)
        {
            events.insert(event.id.clone(), event);
        }
        if restarts.contains(&batch) {
            let snapshot = detector.snapshot();
            detector = GatewayDetector::restore(site.clone(), GATEWAY, &snapshot)
                .expect("a snapshot the detector wrote restores");
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn batching_and_restarts_never_change_the_events(
        disturbances in prop::collection::vec(
            (0..FACILITIES.len(), 0..(17 * 60i64), 1..90i64, any::<bool>()),
            0..6,
        ),
        cuts in prop::collection::vec(0..40_000usize, 0..60),
        restarts in prop::collection::vec(0..60usize, 0..8),
    ) {
        let scenario = history(&disturbances);
        let samples = plant_samples::samples(
            &scenario,
            GATEWAY,
            DAY_MS + 5 * 60 * MINUTE_MS,
            DAY_MS + 24 * 60 * MINUTE_MS,
        );
        // The reference: one-minute batches (20 samples), no restart.
        let one_minute: Vec<usize> = (0..samples.len()).step_by(20).collect();
        let reference = detect(&scenario, &samples, &one_minute, &[]);
        let varied = detect(&scenario, &samples, &cuts, &restarts);
        prop_assert_eq!(&varied, &reference);
    }
}

/// The generator makes events at all: a stopped condenser for 40 minutes
/// during production gives one (R1), so the property compares real lists.
#[test]
fn a_generated_history_with_a_long_stop_has_an_event() {
    // l1-condenser, from 14:00 (06:00 + 480 min), 40 minutes, stopped.
    let scenario = history(&[(2, 480, 40, true)]);
    let samples = plant_samples::samples(
        &scenario,
        GATEWAY,
        DAY_MS + 13 * 60 * MINUTE_MS,
        DAY_MS + 16 * 60 * MINUTE_MS,
    );
    let events = detect(&scenario, &samples, &[], &[]);
    assert!(
        events.values().any(|e| e.facilities == ["l1-condenser"]),
        "{events:#?}"
    );
}
