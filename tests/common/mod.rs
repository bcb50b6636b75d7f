//! Shared by the end-to-end tests: the built-in plant over a window of its
//! day, and the exact assertions on the seed incident.

use std::time::Duration;

use facwatch::pipeline::{self, Options, Outcome, Progress};
use facwatch_ingest::detect::{EventStatus, Rule};
use tokio::sync::mpsc;

/// 2022-12-13 `h:m` in Asia/Shanghai (+08:00), Unix ms.
pub(crate) fn hm(h: i64, m: i64) -> i64 {
    1_670_860_800_000 + (h * 60 + m) * 60_000
}

/// Runs the built-in scenario from 13:00 to 17:00 (the seed incident on
/// line 1 at 14:03, line 2's fan meter silent from 16:00 to 16:20) at 600x,
/// collecting progress. (At 600x a 30 s poll slot is 50 ms of wall time, so
/// a busy machine's scheduling stalls stay well inside one poll interval.)
pub(crate) async fn run_plant(ingest_outage: Option<(i64, i64)>) -> (Outcome, Vec<Progress>) {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        window: Some((hm(13, 0), hm(17, 0))),
        time_scale: Some(600.0),
        ingest_outage,
        ..Options::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let scenario = facwatch::builtin_scenario().unwrap();
    let run = pipeline::run(scenario, dir.path(), options, tx);
    // 4 virtual hours at 600x is 24 s of wall time.
    let outcome = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the pipeline finished within 90 s")
        .expect("the pipeline ran");
    let mut progress = Vec::new();
    while let Ok(p) = rx.try_recv() {
        progress.push(p);
    }
    (outcome, progress)
}

/// Exactly two events. The seed incident: R1 on line 1, closed, from 14:03
/// for 27 minutes (within one 30 s poll interval), involving exactly the
/// condenser, the main fan and the HV ESP of line 1. And line 2's fan meter
/// silent from 16:00 to 16:20: a data interruption of that one meter (R5),
/// never an R1 (missing data is unknown, not stopped).
pub(crate) fn assert_exactly_the_seed_incident(outcome: &Outcome) {
    assert_eq!(outcome.events.len(), 2, "{:#?}", outcome.events);
    let silent = outcome
        .events
        .iter()
        .find(|e| e.rule == Rule::R5)
        .unwrap_or_else(|| panic!("no R5 event: {:#?}", outcome.events));
    assert_eq!(
        (silent.line.as_str(), silent.status, &silent.facilities[..]),
        (
            "line2",
            EventStatus::Closed,
            &["l2-main-fan".to_string()][..]
        ),
        "{silent:#?}"
    );
    // From the meter's last reading before 16:00 to its first after 16:20,
    // which comes when the gateway's backoff (1, 2, 4 ... 32 slots) next
    // asks the meter: at most 32 slots (16 minutes) after it answers again.
    assert!(
        (hm(15, 59)..=hm(16, 0)).contains(&silent.start_ms),
        "{silent:#?}"
    );
    let silent_end = silent.end_ms.expect("closed");
    assert!(
        (hm(16, 20)..=hm(16, 36) + 30_000).contains(&silent_end),
        "{silent:#?}"
    );
    let event = outcome
        .events
        .iter()
        .find(|e| e.rule == Rule::R1)
        .unwrap_or_else(|| panic!("no R1 event: {:#?}", outcome.events));
    assert_eq!(
        (
            event.rule,
            event.status,
            event.line.as_str(),
            event.site.as_str()
        ),
        (Rule::R1, EventStatus::Closed, "line1", "tx-dyeing")
    );
    assert_eq!(
        event.facilities,
        ["l1-condenser", "l1-hv-esp", "l1-main-fan"],
        "{event:#?}"
    );
    let start_within = hm(14, 3)..hm(14, 4);
    assert!(start_within.contains(&event.start_ms), "{event:#?}");
    let duration = event.duration_secs().expect("closed");
    assert!(
        (27 * 60 - 30..=27 * 60 + 30).contains(&duration),
        "{event:#?}"
    );
    let json = event.to_json(outcome.site.time_zone);
    assert!(
        json["start"]
            .as_str()
            .unwrap()
            .starts_with("2022-12-13T14:03:"),
        "{json}"
    );
    assert!(
        json["start"].as_str().unwrap().ends_with("+08:00"),
        "{json}"
    );
}

/// Every sample the gateway took was applied once; and it took nearly all
/// of the 4 h x 120 polls/h x 10 meters (slots can be skipped when the
/// machine is slow, never doubled).
pub(crate) fn assert_every_sample_applied_once(outcome: &Outcome) {
    assert_eq!(outcome.samples_applied, outcome.samples_produced);
    let slots = 4 * 120 * 10;
    assert!(
        outcome.samples_produced <= slots + 10,
        "{}",
        outcome.samples_produced
    );
    assert!(
        outcome.samples_produced >= slots * 9 / 10,
        "{}",
        outcome.samples_produced
    );
}
