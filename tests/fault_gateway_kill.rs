//! Fault test with real processes: the gateway is killed with SIGKILL ten
//! times at random moments while it polls the simulated plant and forwards
//! to the ingest, and restarted on the same buffer each time.
//!
//! - Every sample committed before a kill arrives exactly once: the
//!   restarted gateway reports (log field `samples_produced`) what its
//!   buffer holds as committed, and at the end the ingest has applied
//!   exactly as many samples as the gateway ever committed.
//! - What a kill loses is at most what was not yet committed: a watcher
//!   subscribed to the batch topic sees every sample delivered; the slots
//!   polled before a kill that no delivered sample covers are the samples
//!   lost, printed, and bounded by one commit interval (plus the sample
//!   queue) of polling per kill.
//!
//! Run the seed printed on stdout again with `FACWATCH_FAULT_SEED=...`.

#![cfg(feature = "interop")]

mod fault;
mod interop;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::Duration;

use facwatch_proto::topics;
use facwatch_proto::wire::Batch;
use fault::{
    at, at_ms, field_u64, start_gateway, start_ingest, wait_for_log, wall_now_ms, Broker, Dice,
    GatewayConfig, Plant, GATEWAY,
};
use interop::{free_port, READY_TIMEOUT};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const TIME_SCALE: f64 = 600.0;
const KILLS: usize = 10;
const POLL_INTERVAL_MS: i64 = 30_000;
const METERS: u64 = 10;
/// The gateway's default commit interval.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Subscribes to the gateway's batch topic and sends every batch seen
/// (resends included) to the returned channel.
fn watch_batches(port: u16, key: facwatch_proto::seal::GatewayKey) -> mpsc::Receiver<Batch> {
    let mut options = MqttOptions::new("fault-test-watcher", "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(options, 64);
    client
        .subscribe(topics::batch(GATEWAY), QoS::AtLeastOnce)
        .unwrap();
    let (subscribed_tx, subscribed) = mpsc::channel();
    let (batches_tx, batches) = mpsc::channel();
    std::thread::spawn(move || {
        let _client = client;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let batch =
                        Batch::decode(open_batch(&key, &publish.payload)).expect("a gateway batch");
                    if batches_tx.send(batch).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // The ingest (and its broker) is stopped at the end.
                Err(_) => return,
            }
        }
    });
    subscribed
        .recv_timeout(READY_TIMEOUT)
        .expect("the watcher subscribed");
    batches
}

#[test]
fn killing_the_gateway_ten_times_loses_only_uncommitted_samples_and_duplicates_none() {
    let plant = Plant::new();
    let mut dice = Dice::new("killing_the_gateway");
    let port = free_port();
    let broker = Broker::Embedded { port };
    let store = plant.path("ingest.redb");
    let mut ingest = start_ingest(&plant.ingest_config("gwkill", &store, &broker), &broker);
    let watched = watch_batches(port, plant.key());

    // The virtual day reads 12:59 now: polling starts at 13:00 and ends
    // at 17:00 (24 s of wall time).
    let anchor = wall_now_ms() - ((at_ms(12, 59) - at_ms(0, 0)) as f64 / TIME_SCALE) as i64;
    let virtual_now = || at_ms(0, 0) + ((wall_now_ms() - anchor) as f64 * TIME_SCALE) as i64;
    let _sim = plant.simulator(anchor, TIME_SCALE);
    let config = plant.gateway_config(
        "gwkill",
        &GatewayConfig {
            mqtt_port: port,
            credentials: None,
            buffer: plant.path("gw.buffer.redb"),
            buffer_extra: String::new(),
            forward_extra: String::new(),
            time_scale: TIME_SCALE,
            until: at(17, 0),
        },
    );

    // (virtual time the run's gateway was up, virtual time it was killed)
    let mut runs = Vec::new();
    let mut committed_at_kills = Vec::new();
    let mut gateway = start_gateway(&config, anchor);
    wait_for_log(&mut gateway, "Gateway starting.", READY_TIMEOUT);
    let mut up = virtual_now();
    for _ in 0..KILLS {
        std::thread::sleep(dice.between(Duration::from_millis(400), Duration::from_millis(2400)));
        assert!(gateway.exited().is_none(), "the gateway stopped on its own");
        gateway.kill_hard();
        runs.push((up, virtual_now()));
        gateway = start_gateway(&config, anchor);
        let starting = wait_for_log(&mut gateway, "Gateway starting.", READY_TIMEOUT);
        up = virtual_now();
        committed_at_kills.push(field_u64(&starting, "samples_produced"));
    }
    let status = gateway.wait_for_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "gateway exited with {status}:\n{}",
        gateway.stderr()
    );
    let stopped = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    let produced = field_u64(&stopped, "samples_produced");
    let status = ingest.terminate(Duration::from_secs(20));
    assert!(status.success(), "ingest exited with {status}");

    // Exactly once: the ingest applied every committed sample, no more.
    let applied = facwatch_ingest::Store::open(&store)
        .unwrap()
        .samples_applied(GATEWAY)
        .unwrap();
    assert_eq!(applied, produced, "committed {produced}, applied {applied}");
    // Committed counts only grow, kill after kill.
    assert!(
        committed_at_kills.windows(2).all(|w| w[0] <= w[1]),
        "{committed_at_kills:?}"
    );

    // Delivered samples by meter, resends folded (the same seq is the
    // same batch).
    let mut seqs = BTreeSet::new();
    let mut delivered: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut delivered_count = 0u64;
    while let Ok(batch) = watched.recv_timeout(Duration::from_millis(500)) {
        if !seqs.insert(batch.seq) {
            continue;
        }
        for sample in batch.samples {
            delivered_count += 1;
            let fresh = delivered
                .entry(sample.meter.clone())
                .or_default()
                .insert(sample.time_ms);
            assert!(
                fresh,
                "sample {} at {} delivered twice",
                sample.meter, sample.time_ms
            );
        }
    }
    assert_eq!(delivered_count, produced, "the watcher saw every batch");
    assert_eq!(delivered.len() as u64, METERS);

    // Lost: slots of a killed run whose poll had certainly been made (it
    // started a poll interval before the kill) and that no delivered
    // sample covers, after the last sample delivered before the kill.
    // Slots while no gateway ran were never polled: not lost.
    let mut lost = 0u64;
    for &(up, kill) in &runs {
        for times in delivered.values() {
            let from = times
                .range(..kill)
                .next_back()
                .copied()
                .unwrap_or(up)
                .max(up);
            let mut slot = (from / POLL_INTERVAL_MS + 1) * POLL_INTERVAL_MS;
            while slot + POLL_INTERVAL_MS <= kill {
                if !times.contains(&slot) {
                    lost += 1;
                }
                slot += POLL_INTERVAL_MS;
            }
        }
    }
    // Per kill and meter: one commit interval of polls, the two polls a
    // batch-queue may hold, and the poll in progress.
    let polls_per_commit =
        (COMMIT_INTERVAL.as_secs_f64() * TIME_SCALE / (POLL_INTERVAL_MS as f64 / 1000.0)).ceil();
    let bound = KILLS as u64 * METERS * (polls_per_commit as u64 + 3);
    println!(
        "{KILLS} kills: samples committed at each kill {committed_at_kills:?}; \
         produced {produced}, applied {applied}; samples lost (polled, never committed): {lost} \
         (bound {bound}: {polls_per_commit} polls per {COMMIT_INTERVAL:?} commit interval at {TIME_SCALE}x)"
    );
    assert!(lost <= bound, "{lost} samples lost, more than {bound}");
}

/// The batch inside a payload the gateway sealed with `key`.
fn open_batch<'a>(key: &facwatch_proto::seal::GatewayKey, payload: &'a [u8]) -> &'a [u8] {
    use facwatch_proto::seal::{open, Purpose};
    open(key, Purpose::Batch, payload).expect("the gateway's batches are sealed with its key")
}
