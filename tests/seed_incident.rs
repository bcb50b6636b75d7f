//! The demo plant end to end: simulated meters on port 0, gateway and
//! ingest in process over the embedded broker.

mod common;

use common::*;
use facwatch::pipeline::Progress;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_incident_becomes_exactly_one_27_minute_r1_event() {
    let (outcome, progress) = run_plant(None).await;
    assert_exactly_the_seed_incident(&outcome);
    assert_every_sample_applied_once(&outcome);
    // Seen live: it closed within minutes of data time, not in a replay.
    assert!(!outcome.events[0].historical);
    // The platform saw the event on MQTT with the same id, once.
    let published: Vec<_> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::Closed(json) => Some(json["id"].as_str().unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(published, vec![outcome.events[0].id.clone()]);
}
