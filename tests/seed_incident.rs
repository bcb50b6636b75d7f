//! The demo plant end to end: simulated meters on port 0, gateway and
//! ingest in process over the embedded broker.

mod common;

use common::*;
use facwatch::pipeline::Progress;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_incident_becomes_exactly_one_27_minute_r1_event_and_the_silent_meter_one_r5() {
    let (outcome, progress) = run_plant(None).await;
    assert_exactly_the_seed_incident(&outcome);
    assert_every_sample_applied_once(&outcome);
    // Seen live: they closed within minutes of data time, not in a replay.
    assert!(outcome.events.iter().all(|e| !e.historical));
    // The platform saw each event close on MQTT with the same id, once.
    let published: Vec<_> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::Closed(json) => Some(json["id"].as_str().unwrap().to_string()),
            _ => None,
        })
        .collect();
    let mut ids: Vec<_> = outcome.events.iter().map(|e| e.id.clone()).collect();
    let mut published_sorted = published.clone();
    ids.sort();
    published_sorted.sort();
    assert_eq!(published_sorted, ids, "{published:?}");
}
