//! End-to-end drain throughput of the ingest through a broker: a stand-in
//! gateway publishes a backlog of batches of the stenter plant with a window
//! of batches in flight past the last ack, resending nothing, and waits for
//! the ack of the last one. Not a test: run with
//! `cargo test -p facwatch-ingest --release --test throughput -- --ignored --nocapture`
//! and `BENCH_BATCHES` (default 1,000), `BENCH_POLLS` (polls of the 10
//! meters per batch, default 100: 1,000 samples), `BENCH_WINDOW` (default
//! 16), `BENCH_BROKER=mosquitto` (a real Mosquitto with a login and a
//! persistent ingest session instead of the embedded broker),
//! `BENCH_PEER_NODELAY=1` (TCP_NODELAY on the stand-in gateway's socket).
//!
//! The stand-in never resends, so the window must fit in the broker's
//! buffers: the embedded broker keeps 16 MiB per topic filter (about 250
//! batches of 1,000 samples), Mosquitto 1,000 queued messages.

mod common;
mod sealing;

use std::sync::Arc;
use std::time::{Duration, Instant};

use facwatch_ingest::broker::{start_embedded, MAX_PACKET_BYTES};
use facwatch_ingest::{Credentials, MqttSettings, Settings, Stats, Store};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");
const LIMIT: Duration = Duration::from_secs(600);

const METERS: [(&str, f32); 10] = [
    ("l1-stenter", 110.0),
    ("l1-spray-pump", 4.8),
    ("l1-condenser", 6.5),
    ("l1-hv-esp", 4.0),
    ("l1-main-fan", 17.0),
    ("l2-stenter", 110.0),
    ("l2-spray-pump", 4.8),
    ("l2-condenser", 6.5),
    ("l2-hv-esp", 4.0),
    ("l2-main-fan", 17.0),
];

/// Batch `seq` (from 1): 100 polls of 10 meters every 30 s; production runs
/// 20 h a day and the fan of line 1 stops for 20 min every 3 h.
fn plant_batch(seq: u64, polls: u64) -> Batch {
    let start = 1_670_860_800_000i64;
    let mut samples = Vec::with_capacity(1000);
    for p in 0..polls {
        let k = (seq - 1) * polls + p;
        let t = start + k as i64 * 30_000;
        let minute_of_day = (k / 2) % 1440;
        let producing = (120..1320).contains(&minute_of_day);
        let fan_off = (k / 2) % 180 < 20;
        for (i, (meter, rated)) in METERS.iter().enumerate() {
            let mut power = *rated * (1.0 + (k as f32 * 0.37 + i as f32).sin() * 0.03);
            if meter.ends_with("stenter") && !producing {
                power = 8.0;
            }
            if *meter == "l1-main-fan" && fan_off {
                power = 0.0;
            }
            samples.push(Sample {
                meter: (*meter).into(),
                time_ms: t + i as i64 * 7,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(power),
                    energy_kwh: Some(1000.0 + k as f64 * 0.5),
                    voltage_v: vec![229.5, 230.1, 228.7],
                    current_a: vec![power * 1.6; 3],
                    power_factor: Some(0.85),
                },
            });
        }
    }
    Batch {
        gateway: "gw-01".into(),
        seq,
        dropped_before: 0,
        samples,
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn drain_throughput_through_a_broker() {
    let batches = env("BENCH_BATCHES", 1000);
    let window = env("BENCH_WINDOW", 16);
    let mosquitto = match std::env::var("BENCH_BROKER").as_deref() {
        Ok("mosquitto") => Some(common::Mosquitto::start().await),
        _ => None,
    };
    let (broker_name, port) = match &mosquitto {
        Some(m) => ("mosquitto", m.port),
        None => (
            "embedded broker",
            start_embedded("127.0.0.1:0".parse().unwrap())
                .unwrap()
                .addr
                .port(),
        ),
    };
    let dir = tempfile::tempdir().unwrap();
    let site = Site::from_toml(SITE, "stenter-plant.site.toml").unwrap();
    let mut settings = Settings::new(
        vec![site.clone()],
        sealing::keys([&site]),
        dir.path().join("ingest.redb"),
        MqttSettings {
            host: "127.0.0.1".into(),
            port,
            client_id: "facwatch-ingest".into(),
        },
    )
    .unwrap();
    if mosquitto.is_some() {
        settings.mqtt_credentials = Some(Credentials {
            username: common::USER.into(),
            password: common::PASSWORD.into(),
        });
        settings.mqtt_persistent_session = true;
    }
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let ingest = tokio::spawn(facwatch_ingest::run(
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    timeout(LIMIT, stats.wait_until(|s| s.broker_subscriptions >= 1))
        .await
        .unwrap();

    let polls = env("BENCH_POLLS", 100);
    let payloads: Vec<Vec<u8>> = (1..=batches)
        .map(|s| sealing::sealed(&plant_batch(s, polls)))
        .collect();
    let bytes: usize = payloads.iter().map(Vec::len).sum();

    let mut options = MqttOptions::new("bench-gateway", "127.0.0.1", port);
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if mosquitto.is_some() {
        options.set_credentials(common::USER, common::PASSWORD);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    if std::env::var("BENCH_PEER_NODELAY").is_ok() {
        let mut n = eventloop.network_options();
        n.set_tcp_nodelay(true);
        eventloop.set_network_options(n);
    }
    let (acked_tx, mut acked) = watch::channel(0u64);
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut sub_tx = Some(sub_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    if let Some(tx) = sub_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if let Some(ack) =
                        sealing::open_ack(sealing::gateway_of_ack_topic(&p.topic), &p.payload)
                    {
                        acked_tx.send_if_modified(|a| {
                            let newer = ack.seq > *a;
                            *a = (*a).max(ack.seq);
                            newer
                        });
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client
        .subscribe(topics::ack("gw-01"), QoS::AtLeastOnce)
        .await
        .unwrap();
    timeout(LIMIT, sub_rx).await.unwrap().unwrap();

    let started = Instant::now();
    timeout(LIMIT, async {
        let topic = topics::batch("gw-01");
        for (i, payload) in payloads.into_iter().enumerate() {
            let seq = i as u64 + 1;
            // At most `window` batches beyond the last ack.
            acked
                .wait_for(|a| seq <= *a + window)
                .await
                .expect("ack watcher alive");
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        acked.wait_for(|a| *a >= batches).await.unwrap();
    })
    .await
    .expect("backlog drained in time");
    let secs = started.elapsed().as_secs_f64();
    let samples = batches * polls * 10;
    let ingest_stats = stats.snapshot();
    println!(
        "end to end, {broker_name}, window {window}: {batches} batches of {} samples ({:.1} MB), {samples} samples in {secs:.2} s = {:.0} samples/s; ingest: {} store transactions, {} acks",
        polls * 10,
        bytes as f64 / 1e6,
        samples as f64 / secs,
        ingest_stats.groups_committed,
        ingest_stats.acks_published,
    );

    shutdown.cancel();
    timeout(LIMIT, ingest).await.unwrap().unwrap().unwrap();
    let store = Store::open(&dir.path().join("ingest.redb")).unwrap();
    assert_eq!(store.last_seq("gw-01").unwrap(), Some(batches));
    assert_eq!(store.samples_applied("gw-01").unwrap(), samples);
}
