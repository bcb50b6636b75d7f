//! The ingest stopped for two simulated hours that include the incident:
//! the gateway keeps polling and buffering, and after the restart the same
//! single event comes out with every sample applied exactly once.

mod common;

use common::*;
use facwatch::pipeline::Progress;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_down_for_two_hours_over_the_incident_yields_the_same_event() {
    let (outcome, progress) = run_plant(Some((hm(13, 30), hm(15, 30)))).await;
    let outage: Vec<bool> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::Ingest { running, .. } => Some(*running),
            _ => None,
        })
        .collect();
    assert_eq!(
        outage,
        vec![false, true],
        "the ingest was stopped and started again"
    );
    assert_exactly_the_seed_incident(&outcome);
    assert_every_sample_applied_once(&outcome);
    // The R1 event was found in the replay, long after it ended in data
    // time; the 16:00 interruption came live, after the replay.
    for event in &outcome.events {
        assert_eq!(
            event.historical,
            event.rule == facwatch_ingest::detect::Rule::R1,
            "{event:#?}"
        );
    }
}
