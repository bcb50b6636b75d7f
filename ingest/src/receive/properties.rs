//! Property test of delivery and detection together, through the real
//! apply path (seq rules, detector, one store transaction per group): for
//! generated plant histories, cutting the samples into arbitrary batches,
//! redelivering arbitrary suffixes of what was already sent (a gateway that
//! missed its acks), grouping deliveries arbitrarily, and restarting the
//! ingest (store closed and reopened, state restored from it) at arbitrary
//! points all leave exactly the events of one clean pass: one batch per
//! group, each delivered once, no restart.

use std::sync::Arc;

use facwatch_proto::site::Site;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use proptest::prelude::*;

use super::apply::Applier;
use crate::detect::Event;
use crate::store::Store;

const SITE: &str = r#"
[site]
id = "plant"
time_zone = "Asia/Shanghai"

[[gateways]]
id = "gw"
poll_interval_secs = 30

[[meters]]
id = "stenter"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 1

[[meters]]
id = "fan"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 2

[[meters]]
id = "pump"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 3

[[lines]]
id = "line"

[[lines.facilities]]
id = "stenter"
kind = "stenter"
meter = "stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "fan"
kind = "main_fan"
meter = "fan"
rated_kw = 22
start_threshold_kw = 4

[[lines.facilities]]
id = "pump"
kind = "spray_pump"
meter = "pump"
rated_kw = 5
start_threshold_kw = 1
"#;

/// 2022-12-13 06:00 (+08:00).
const START_MS: i64 = 1_670_882_400_000;
const POLL_MS: i64 = 30_000;
/// Wall time of every apply: a day later, so everything is historical alike.
const WALL_NOW_MS: i64 = START_MS + 86_400_000;

/// A stretch of the plant's history: how many polls, what each facility
/// draws (a level index into [`LEVELS`]; `None` = the meter is silent).
type Stretch = (i64, [Option<usize>; 3]);

/// kW levels per facility: off, low, normal.
const LEVELS: [[f32; 3]; 3] = [[0.5, 40.0, 120.0], [0.2, 5.0, 18.0], [0.1, 1.5, 4.5]];
const METERS: [&str; 3] = ["stenter", "fan", "pump"];

fn samples(history: &[Stretch]) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut slot = 0i64;
    for &(polls, levels) in history {
        for _ in 0..polls {
            for (m, level) in levels.iter().enumerate() {
                // A tiny wobble, so a running meter never reads a frozen value.
                let wobble = (slot % 7) as f32 * 0.01;
                out.push(Sample {
                    meter: METERS[m].into(),
                    time_ms: START_MS + slot * POLL_MS,
                    quality: if level.is_some() {
                        Quality::Ok
                    } else {
                        Quality::Timeout
                    },
                    values: Values {
                        power_kw: level.map(|l| LEVELS[m][l] + wobble),
                        ..Values::default()
                    },
                });
            }
            slot += 1;
        }
    }
    out
}

fn batches(samples: &[Sample], cuts: &[usize]) -> Vec<Batch> {
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(samples.len())).collect();
    bounds.extend([0, samples.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| Batch {
            gateway: "gw".into(),
            seq: i as u64 + 1,
            dropped_before: 0,
            samples: samples[w[0]..w[1]].to_vec(),
        })
        .collect()
}

/// What one step of the delivery does.
#[derive(Debug, Clone)]
enum Step {
    /// The next `n` new batches, in one group, after redelivering the last
    /// `resend` batches already sent.
    Send { n: usize, resend: usize },
    /// The ingest stops and starts again from its store.
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1..4usize, 0..4usize).prop_map(|(n, resend)| Step::Send { n, resend }),
        1 => Just(Step::Restart),
    ]
}

/// Delivers `batches` by `script` (then whatever is left, one per group)
/// into a fresh store; returns its events.
fn deliver(batches: &[Batch], script: &[Step]) -> Vec<Event> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.redb");
    let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
    let open = || {
        let store = Arc::new(Store::open(&path).unwrap());
        let applier = Applier::new(std::slice::from_ref(&site), store.clone(), Vec::new()).unwrap();
        (store, applier)
    };
    let (mut store, mut applier) = open();
    let mut sent = 0;
    let tail = std::iter::repeat_n(Step::Send { n: 1, resend: 0 }, batches.len());
    for step in script.iter().cloned().chain(tail) {
        if sent == batches.len() {
            break;
        }
        match step {
            Step::Restart => {
                drop(applier);
                drop(store);
                (store, applier) = open();
            }
            Step::Send { n, resend } => {
                let from = sent - resend.min(sent);
                let to = (sent + n).min(batches.len());
                let outcome = applier.apply_now(batches[from..to].to_vec(), WALL_NOW_MS);
                outcome.committed.as_ref().expect("the group commits");
                sent = to;
            }
        }
    }
    let mut events = store.events().unwrap();
    events.sort_by(|a, b| a.id.cmp(&b.id));
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn redelivery_grouping_and_restarts_never_change_the_events(
        history in prop::collection::vec(
            (1..80i64, prop::array::uniform3(prop::option::weighted(0.95, 0..3usize))),
            1..12,
        ),
        cuts in prop::collection::vec(0..3_000usize, 0..40),
        script in prop::collection::vec(step(), 0..40),
    ) {
        let samples = samples(&history);
        let batches = batches(&samples, &cuts);
        let clean = deliver(&batches, &[]);
        let rough = deliver(&batches, &script);
        prop_assert_eq!(rough, clean);
    }
}

/// The generator makes events: a fan off for 20 minutes while the stenter
/// runs gives R1, so the property compares real lists.
#[test]
fn a_history_with_a_long_stop_has_events() {
    let history = [
        (20, [Some(2), Some(2), Some(2)]),
        (40, [Some(2), Some(0), Some(2)]),
        (20, [Some(2), Some(2), Some(2)]),
    ];
    let samples = samples(&history);
    let events = deliver(&batches(&samples, &[]), &[]);
    assert!(
        events.iter().any(|e| e.facilities == ["fan"]),
        "{events:#?}"
    );
}
