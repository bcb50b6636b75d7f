//! 100,000 hostile payloads on batch topics while the real gateway runs:
//! the ingest stays up, counts every one as rejected (by reason, exactly),
//! and the gateway's events are those of a clean run.
//!
//! The intruder holds a valid broker login (the platform's: the worst case
//! short of a stolen gateway key) and publishes, from a deterministic
//! generator:
//! - random bytes on the real gateway's topic (`bad_mac`);
//! - the gateway's real sealed batches, captured from the broker, with
//!   bytes flipped, cut or appended (`bad_mac`);
//! - forgeries: well-formed batches of the real gateway, seq far ahead,
//!   every treatment meter at 0 kW while production runs (an R1 if it were
//!   believed), sealed with a key that is not the gateway's (`bad_mac`);
//! - random bytes on topics of gateways no site has (`unknown_gateway`);
//! - payloads larger than any sealed batch (`too_large`);
//!
//! and, besides the 100,000, replays of the captured real batches, which
//! are not rejected but ignored by seq (counted as duplicates).

#[allow(dead_code)] // The default plant run is not used here.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{assert_every_sample_applied_once, assert_exactly_the_seed_incident, hm};
use facwatch::pipeline::{self, BrokerAccess, Options, Outcome, Progress};
use facwatch_ingest::detect::Event;
use facwatch_ingest::{Stats, StatsSnapshot};
use facwatch_proto::seal::{seal, GatewayKey, Purpose, MAX_SEALED_BATCH_BYTES};
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, Event as MqttEvent, Packet, QoS};
use tokio::sync::{mpsc, Mutex};

const GATEWAY: &str = "gw-01";
const HOSTILE: u64 = 100_000;
const OVERSIZED: u64 = 50;
const UNKNOWN_GATEWAY: u64 = 5_000;
const FORGED: u64 = 5_000;
/// Payloads sent before waiting for the ingest to have counted them: well
/// within what the broker keeps for a slow subscriber.
const CHUNK: u64 = 1_000;
const REPLAYS_PER_CHUNK: usize = 2;
/// Real batches captured before the attack, to mutate and replay.
const CAPTURED: usize = 4;

/// The counts the intruder ends with.
#[derive(Debug, Default)]
struct Sent {
    random: u64,
    mutated: u64,
    forged: u64,
    unknown_gateway: u64,
    oversized: u64,
    replays: u64,
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn rejected_total(s: &StatsSnapshot) -> u64 {
    s.rejected_too_large
        + s.rejected_bad_mac
        + s.rejected_decode
        + s.rejected_unknown_gateway
        + s.rejected_gateway_mismatch
}

/// A batch of the real gateway that says line 1 produces while all its
/// treatment is off: believed, it would open an R1.
fn forged_batch(seq: u64, time_ms: i64) -> Batch {
    let sample = |meter: &str, kw: f32| Sample {
        meter: meter.into(),
        time_ms,
        quality: Quality::Ok,
        values: Values {
            power_kw: Some(kw),
            ..Values::default()
        },
    };
    Batch {
        gateway: GATEWAY.into(),
        seq,
        dropped_before: 0,
        samples: vec![
            sample("l1-stenter", 180.0),
            sample("l1-condenser", 0.0),
            sample("l1-main-fan", 0.0),
            sample("l1-hv-esp", 0.0),
        ],
    }
}

async fn intrude(access: BrokerAccess, stats: Arc<Stats>) -> Sent {
    let (client, mut eventloop) = AsyncClient::new(access.mqtt_options("intruder"), 256);
    // The gateway's first real batches, captured before the intruder
    // publishes anything on the topic (after that it would hear itself).
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let capturing = Arc::new(AtomicBool::new(true));
    let (captured_tx, mut captured_rx) = mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = mpsc::channel(1);
    {
        let captured = captured.clone();
        let capturing = capturing.clone();
        tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(event) => event,
                    Err(e) => panic!("the intruder's connection failed: {e}"),
                };
                match event {
                    MqttEvent::Incoming(Packet::SubAck(_)) => {
                        let _ = subscribed_tx.try_send(());
                    }
                    MqttEvent::Incoming(Packet::Publish(p))
                        if p.topic == topics::batch(GATEWAY)
                            && capturing.load(Ordering::SeqCst) =>
                    {
                        captured.lock().await.push(p.payload.to_vec());
                        let _ = captured_tx.send(());
                    }
                    _ => {}
                }
            }
        });
    }
    client
        .subscribe(topics::batch(GATEWAY), QoS::AtMostOnce)
        .await
        .unwrap();
    subscribed.recv().await.expect("subscribed");
    for _ in 0..CAPTURED {
        captured_rx.recv().await.expect("a real batch");
    }
    capturing.store(false, Ordering::SeqCst);
    let captured: Vec<Vec<u8>> = captured.lock().await.clone();

    let mut rng = Rng(0x5eed_f00d_dead_beef);
    let wrong_key = GatewayKey::from_bytes([0x13; 32]);
    let topic = topics::batch(GATEWAY);
    let mut sent = Sent::default();
    let mut hostile = 0;
    while hostile < HOSTILE {
        let chunk_end = (hostile + CHUNK).min(HOSTILE);
        while hostile < chunk_end {
            let real = captured[rng.below(captured.len() as u64) as usize].clone();
            let (topic, payload) = match hostile % 20 {
                _ if hostile < OVERSIZED => {
                    sent.oversized += 1;
                    let len = MAX_SEALED_BATCH_BYTES + 1 + rng.below(512) as usize;
                    (topic.clone(), rng.bytes(len))
                }
                0 if sent.unknown_gateway < UNKNOWN_GATEWAY => {
                    sent.unknown_gateway += 1;
                    let gateway = format!("gw-evil-{}", rng.below(1000));
                    let len = rng.below(2048) as usize;
                    (topics::batch(&gateway), rng.bytes(len))
                }
                1 if sent.forged < FORGED => {
                    sent.forged += 1;
                    let batch = forged_batch(1_000_000 + hostile, hm(14, 0) + hostile as i64);
                    (
                        topic.clone(),
                        seal(&wrong_key, Purpose::Batch, &batch.encode()),
                    )
                }
                2..=9 => {
                    sent.mutated += 1;
                    let mut payload = real;
                    match rng.below(3) {
                        0 => {
                            // Flip one bit: never a no-op.
                            let at = rng.below(payload.len() as u64) as usize;
                            payload[at] ^= 1 << rng.below(8);
                        }
                        1 => payload.truncate(rng.below(payload.len() as u64) as usize),
                        _ => {
                            let extra = 1 + rng.below(64) as usize;
                            payload.extend(rng.bytes(extra));
                        }
                    }
                    (topic.clone(), payload)
                }
                _ => {
                    sent.random += 1;
                    let len = rng.below(2048) as usize;
                    (topic.clone(), rng.bytes(len))
                }
            };
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            hostile += 1;
        }
        // Replays of real batches the ingest has already applied.
        for payload in captured.iter().take(REPLAYS_PER_CHUNK).cloned() {
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            sent.replays += 1;
        }
        // Wait until the ingest has counted this chunk: the broker keeps
        // a bounded log for its subscribers.
        let counted = hostile;
        tokio::time::timeout(
            Duration::from_secs(60),
            stats.wait_until(|s| rejected_total(s) >= counted),
        )
        .await
        .unwrap_or_else(|_| panic!("the ingest counted {counted} rejects within 60 s"));
    }
    let _ = client.disconnect().await;
    sent
}

async fn run(intruder: bool) -> (Outcome, Option<Sent>) {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        window: Some((hm(13, 0), hm(17, 0))),
        time_scale: Some(300.0),
        ..Options::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let scenario = facwatch::builtin_scenario().unwrap();
    let listen = async {
        while let Some(progress) = rx.recv().await {
            if let Progress::Broker {
                access,
                ingest_stats,
            } = progress
            {
                if intruder {
                    return Some(tokio::spawn(intrude(access, ingest_stats)));
                }
                return None;
            }
        }
        None
    };
    // 4 virtual hours at 300x are 48 s of wall time.
    let bounded = tokio::time::timeout(Duration::from_secs(240), async {
        let (outcome, handle) =
            tokio::join!(pipeline::run(scenario, dir.path(), options, tx), listen);
        let sent = match handle {
            Some(handle) => Some(handle.await.expect("the intruder ran")),
            None => None,
        };
        (outcome.expect("the pipeline ran"), sent)
    });
    bounded.await.expect("finished within 240 s")
}

/// What must be equal between two runs: poll times differ by scheduling,
/// so times are compared to the 30 s poll interval.
/// Rule, line, status, facilities, start and end poll interval.
type Shape = (String, String, String, Vec<String>, i64, Option<i64>);

fn shape(events: &[Event]) -> Vec<Shape> {
    events
        .iter()
        .map(|e| {
            (
                format!("{:?}", e.rule),
                e.line.clone(),
                format!("{:?}", e.status),
                e.facilities.clone(),
                e.start_ms / 30_000,
                e.end_ms.map(|t| t / 30_000),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_hostile_payloads_change_nothing() {
    let (clean, _) = run(false).await;
    assert_exactly_the_seed_incident(&clean);

    let (attacked, sent) = run(true).await;
    let sent = sent.expect("the intruder's counts");
    assert_exactly_the_seed_incident(&attacked);
    assert_every_sample_applied_once(&attacked);
    assert_eq!(shape(&attacked.events), shape(&clean.events));

    let stats = attacked.ingest_stats.snapshot();
    eprintln!("sent: {sent:?}\ningest: {stats:?}");
    let bad_mac = sent.random + sent.mutated + sent.forged;
    assert_eq!(
        bad_mac + sent.unknown_gateway + sent.oversized,
        HOSTILE,
        "{sent:?}"
    );
    assert!(sent.mutated > 10_000 && sent.replays > 100, "{sent:?}");
    assert_eq!(
        (
            stats.rejected_too_large,
            stats.rejected_bad_mac,
            stats.rejected_unknown_gateway,
            stats.rejected_decode,
            stats.rejected_gateway_mismatch,
        ),
        (sent.oversized, bad_mac, sent.unknown_gateway, 0, 0),
        "{sent:?}"
    );
    // Every replay was seen and ignored by seq (the gateway's own resends
    // are duplicates too).
    assert!(
        stats.batches_duplicate >= sent.replays,
        "{stats:?} {sent:?}"
    );
    assert_eq!(stats.batches_applied, attacked.batches_applied);
}
