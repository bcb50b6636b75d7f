//! The ingest's delivery contract over a real (embedded) broker: acks,
//! duplicates, rejects, restarts, acks on every connection, and the R5
//! event for data a gateway discarded. Each test runs its own broker on port 0
//! and its own store; every wait is on a message or a counter, bounded by
//! [`LIMIT`].

mod sealing;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use facwatch_ingest::broker::{start_embedded, EmbeddedBroker, MAX_PACKET_BYTES};
use facwatch_ingest::detect::Rule;
use facwatch_ingest::{MqttSettings, Settings, Stats, StatsSnapshot, Store};
use facwatch_proto::seal::{seal, GatewayKey, Purpose, MAX_SEALED_BATCH_BYTES};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

const SITE: &str = r#"
[site]
id = "plant"
time_zone = "Asia/Shanghai"

[[gateways]]
id = "gw-a"

[[gateways]]
id = "gw-b"

[[meters]]
id = "a-stenter"
gateway = "gw-a"
profile = "dtsu666"
tcp = "127.0.0.1:5020"
unit = 1

[[meters]]
id = "a-fan"
gateway = "gw-a"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 2

[[meters]]
id = "b-stenter"
gateway = "gw-b"
profile = "dtsu666"
tcp = "127.0.0.1:5021"
unit = 1

[[meters]]
id = "b-fan"
gateway = "gw-b"
profile = "sdm630"
tcp = "127.0.0.1:5021"
unit = 2

[[lines]]
id = "line-a"

[[lines.facilities]]
id = "a-stenter"
kind = "stenter"
meter = "a-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "a-fan"
kind = "main_fan"
meter = "a-fan"
rated_kw = 22
start_threshold_kw = 4

[[lines]]
id = "line-b"

[[lines.facilities]]
id = "b-stenter"
kind = "stenter"
meter = "b-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "b-fan"
kind = "main_fan"
meter = "b-fan"
rated_kw = 22
start_threshold_kw = 4
"#;

/// A broker, a site file on disk and a store path: what every test needs.
struct World {
    broker: EmbeddedBroker,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plant.site.toml"), SITE).unwrap();
        World { broker, dir }
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("ingest.redb")
    }

    fn settings(&self, broker: &EmbeddedBroker) -> Settings {
        let site = Site::load(&self.dir.path().join("plant.site.toml")).unwrap();
        Settings::new(
            vec![site.clone()],
            sealing::keys([&site]),
            self.store_path(),
            MqttSettings {
                host: broker.addr.ip().to_string(),
                port: broker.addr.port(),
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap()
    }

    /// Starts `run` and waits until its batch subscription is confirmed.
    async fn start_ingest(&self) -> Ingest {
        self.start_ingest_on(&self.broker).await
    }

    /// Starts `run` connected to `broker`.
    async fn start_ingest_on(&self, broker: &EmbeddedBroker) -> Ingest {
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(facwatch_ingest::run(
            self.settings(broker),
            stats.clone(),
            shutdown.clone(),
        ));
        timeout(LIMIT, stats.wait_until(|s| s.broker_subscriptions >= 1))
            .await
            .expect("ingest subscribed to batches");
        Ingest {
            stats,
            shutdown,
            task,
        }
    }

    fn open_store(&self) -> Store {
        Store::open(&self.store_path()).unwrap()
    }
}

struct Ingest {
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), facwatch_ingest::IngestError>>,
}

impl Ingest {
    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(LIMIT, self.task)
            .await
            .expect("run returned after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// A plain MQTT client standing in for gateways and the platform.
struct Peer {
    client: AsyncClient,
    events: mpsc::Receiver<PeerEvent>,
}

enum PeerEvent {
    Subscribed,
    Message(Publish),
}

impl Peer {
    async fn connect(broker: &EmbeddedBroker, client_id: &str) -> Peer {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.addr.port());
        options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, events) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => PeerEvent::Subscribed,
                    Ok(Event::Incoming(Incoming::Publish(p))) => PeerEvent::Message(p),
                    Ok(_) => continue,
                    Err(_) => return,
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        Peer { client, events }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match timeout(LIMIT, self.events.recv()).await.expect("suback") {
                Some(PeerEvent::Subscribed) => return,
                Some(PeerEvent::Message(_)) => continue,
                None => panic!("peer connection ended"),
            }
        }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    async fn send_batch(&self, batch: &Batch) {
        self.publish(&topics::batch(&batch.gateway), sealing::sealed(batch))
            .await;
    }

    async fn next_message(&mut self) -> Publish {
        loop {
            match timeout(LIMIT, self.events.recv())
                .await
                .expect("a message within the limit")
            {
                Some(PeerEvent::Message(p)) => return p,
                Some(PeerEvent::Subscribed) => continue,
                None => panic!("peer connection ended"),
            }
        }
    }

    /// The next message, which must be an ack: (gateway topic, seq, retained).
    async fn next_ack(&mut self) -> (String, u64, bool) {
        let message = self.next_message().await;
        let gateway = sealing::gateway_of_ack_topic(&message.topic);
        let ack = sealing::open_ack(gateway, &message.payload)
            .expect("an ack sealed with its gateway's key");
        (message.topic, ack.seq, message.retain)
    }

    /// The next `n` acks, sorted by topic: (gateway topic, seq).
    async fn next_acks(&mut self, n: usize) -> Vec<(String, u64)> {
        let mut acks = Vec::new();
        for _ in 0..n {
            let (topic, seq, _) = self.next_ack().await;
            acks.push((topic, seq));
        }
        acks.sort();
        acks
    }

    /// Reads the acks the ingest publishes for both gateways when it
    /// connects, and checks their seqs.
    async fn expect_connect_acks(&mut self, gw_a: u64, gw_b: u64) {
        assert_eq!(
            self.next_acks(2).await,
            vec![(ack_topic("gw-a"), gw_a), (ack_topic("gw-b"), gw_b)]
        );
    }
}

fn batch(gateway: &str, seq: u64, samples: usize) -> Batch {
    let meter = if gateway == "gw-a" { "a-fan" } else { "b-fan" };
    Batch {
        gateway: gateway.into(),
        seq,
        dropped_before: 0,
        samples: (0..samples)
            .map(|i| Sample {
                meter: meter.into(),
                time_ms: 1_670_911_380_000 + (seq as i64 * 100 + i as i64) * 30_000,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(10.0),
                    ..Values::default()
                },
            })
            .collect(),
    }
}

fn ack_topic(gateway: &str) -> String {
    topics::ack(gateway)
}

async fn gateway_peer(world: &World, id: &str) -> Peer {
    let mut peer = Peer::connect(&world.broker, id).await;
    peer.subscribe("facwatch/v1/+/ack").await;
    peer
}

fn store_facts(path: &Path, gateway: &str) -> (Option<u64>, u64) {
    let store = Store::open(path).unwrap();
    (
        store.last_seq(gateway).unwrap(),
        store.samples_applied(gateway).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_retained_and_duplicates_are_reacked_not_applied_twice() {
    timeout(LIMIT * 3, async {
        let world = World::new();
        let ingest = world.start_ingest().await;
        let mut gateway = gateway_peer(&world, "gw-a-test").await;
        gateway.expect_connect_acks(0, 0).await;

        gateway.send_batch(&batch("gw-a", 1, 3)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 1, false));
        gateway.send_batch(&batch("gw-a", 2, 2)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 2, false));

        // The gateway missed the acks and resends: both are re-acked with
        // the last applied seq and not applied again.
        gateway.send_batch(&batch("gw-a", 2, 2)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 2, false));
        gateway.send_batch(&batch("gw-a", 1, 3)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 2, false));

        let stats = ingest.stats();
        assert_eq!(stats.batches_applied, 2);
        assert_eq!(stats.samples_applied, 5);
        assert_eq!(stats.batches_duplicate, 2);
        assert_eq!(stats.sequence_gaps, 0);

        // A gateway that (re)connects later finds its ack retained.
        let mut late = Peer::connect(&world.broker, "gw-a-late").await;
        late.subscribe(&ack_topic("gw-a")).await;
        assert_eq!(late.next_ack().await, (ack_topic("gw-a"), 2, true));

        ingest.stop().await;
        assert_eq!(store_facts(&world.store_path(), "gw-a"), (Some(2), 5));
        assert_eq!(store_facts(&world.store_path(), "gw-b"), (None, 0));
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_rejected_by_reason_while_good_batches_flow() {
    timeout(LIMIT * 3, async {
        let world = World::new();
        let ingest = world.start_ingest().await;
        let mut peer = gateway_peer(&world, "mixed-test").await;
        peer.expect_connect_acks(0, 0).await;

        peer.send_batch(&batch("gw-a", 1, 2)).await;
        assert_eq!(peer.next_ack().await, (ack_topic("gw-a"), 1, false));

        let good_b = sealing::sealed(&batch("gw-b", 1, 4));
        let gw_b_topic = topics::batch("gw-b");
        let as_gw_b = |message: &[u8]| seal(&sealing::key("gw-b"), Purpose::Batch, message);
        let body_b = batch("gw-b", 1, 4).encode();
        let mut version_2 = body_b.clone();
        version_2[0] = 2;
        // Not sealed with gw-b's key: garbage, a truncated sealed batch,
        // gw-a's real batch on gw-b's topic, gw-b's batch sealed with
        // another key (a forgery). None of them is decoded.
        peer.publish(&gw_b_topic, vec![0xFF; 40]).await;
        peer.publish(&gw_b_topic, good_b[..good_b.len() - 3].to_vec())
            .await;
        peer.publish(&gw_b_topic, sealing::sealed(&batch("gw-a", 2, 1)))
            .await;
        let forged = seal(&GatewayKey::from_bytes([0x66; 32]), Purpose::Batch, &body_b);
        peer.publish(&gw_b_topic, forged).await;
        // Sealed with gw-b's key but not a batch of gw-b: a newer version,
        // a truncated body, a batch naming gw-a.
        peer.publish(&gw_b_topic, as_gw_b(&version_2)).await;
        peer.publish(&gw_b_topic, as_gw_b(&body_b[..body_b.len() - 3]))
            .await;
        peer.publish(&gw_b_topic, as_gw_b(&batch("gw-a", 2, 1).encode()))
            .await;
        // Larger than any sealed batch (yet within the broker's packet
        // limit): refused unread.
        peer.publish(&gw_b_topic, vec![0; MAX_SEALED_BATCH_BYTES + 1])
            .await;
        // Gateways no site has (the second is not even a gateway topic).
        peer.publish(
            &topics::batch("gw-zzz"),
            sealing::sealed(&batch("gw-zzz", 1, 1)),
        )
        .await;
        peer.publish("facwatch/v1/events/batch", good_b.clone())
            .await;

        // The good gateway keeps flowing, and gw-b's real batch still
        // applies. Whether they share a group with the rejects or each other
        // depends on timing; the acks come in the order of the batches.
        peer.send_batch(&batch("gw-a", 2, 3)).await;
        peer.publish(&gw_b_topic, good_b).await;
        assert_eq!(peer.next_ack().await, (ack_topic("gw-a"), 2, false));
        assert_eq!(peer.next_ack().await, (ack_topic("gw-b"), 1, false));

        // Counted just after being queued: the last may be counted only
        // after its message arrived.
        timeout(LIMIT, ingest.stats.wait_until(|s| s.acks_published >= 5))
            .await
            .expect("acks counted");
        let stats = ingest.stats();
        assert!((2..=3).contains(&stats.groups_committed), "{stats:?}");
        assert_eq!(
            stats,
            StatsSnapshot {
                batches_applied: 3,
                samples_applied: 2 + 3 + 4,
                rejected_too_large: 1,
                rejected_bad_mac: 4,
                rejected_decode: 2,
                rejected_unknown_gateway: 2,
                rejected_gateway_mismatch: 1,
                broker_subscriptions: 1,
                // Two on connecting, one per applied batch.
                acks_published: 2 + 3,
                // gw-a's batches lie 50 minutes apart in data time: when its
                // data resumes at batch 2, the detector records the
                // whole-gateway data interruption (R5, opened and closed,
                // long past: historical).
                events_opened: 1,
                events_closed: 1,
                events_opened_by_rule: [0, 0, 0, 0, 1, 0, 0],
                events_closed_by_rule: [0, 0, 0, 0, 1, 0, 0],
                data_interruptions: 1,
                notices_historical: 1,
                groups_committed: stats.groups_committed,
                ..StatsSnapshot::default()
            }
        );
        ingest.stop().await;
        assert_eq!(store_facts(&world.store_path(), "gw-a"), (Some(2), 5));
        assert_eq!(store_facts(&world.store_path(), "gw-b"), (Some(1), 4));
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_of_run() {
    timeout(LIMIT * 3, async {
        let world = World::new();
        let first = world.start_ingest().await;
        let mut gateway = gateway_peer(&world, "restart-test").await;
        gateway.expect_connect_acks(0, 0).await;
        gateway.send_batch(&batch("gw-a", 1, 3)).await;
        gateway.send_batch(&batch("gw-a", 2, 2)).await;
        // One ack per group: 1 then 2, or only 2.
        let mut ack = gateway.next_ack().await;
        if ack.1 == 1 {
            ack = gateway.next_ack().await;
        }
        assert_eq!(ack, (ack_topic("gw-a"), 2, false));
        first.stop().await;

        // The store is closed when run returns; it holds the applied state.
        assert_eq!(store_facts(&world.store_path(), "gw-a"), (Some(2), 5));

        let second = world.start_ingest().await;
        gateway.expect_connect_acks(2, 0).await;
        // A resend from before the restart is still a duplicate.
        gateway.send_batch(&batch("gw-a", 2, 2)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 2, false));
        gateway.send_batch(&batch("gw-a", 3, 1)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 3, false));
        // Batches 4 and 5 went astray but the gateway still has them: 6 is
        // not applied, and last_seq is acked again to ask for a resend.
        gateway.send_batch(&batch("gw-a", 6, 4)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 3, false));
        // The gateway discarded 4 and 5 (7 samples): 6 is applied with a
        // recorded gap.
        let mut after_drop = batch("gw-a", 6, 4);
        after_drop.dropped_before = 7;
        gateway.send_batch(&after_drop).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-a"), 6, false));

        let stats = second.stats();
        assert_eq!(
            (
                stats.batches_applied,
                stats.samples_applied,
                stats.batches_duplicate,
                stats.batches_out_of_order,
                stats.sequence_gaps,
                stats.data_interruptions,
            ),
            // Two interruptions: the data-time gap before batch 3, and the
            // discarded batches before 6 (which replaces the data-time gap
            // event of the same start).
            (2, 5, 1, 1, 1, 2)
        );
        second.stop().await;

        let store = world.open_store();
        assert_eq!(store.last_seq("gw-a").unwrap(), Some(6));
        let counters = store.counters("gw-a").unwrap();
        assert_eq!(counters.batches_applied, 4);
        assert_eq!(counters.samples_applied, 3 + 2 + 1 + 4);
        assert_eq!(counters.sequence_gaps, 1);
        assert_eq!(counters.batches_missing, 2);
        assert_eq!(counters.samples_dropped_by_gateway, 7);
        // The delivery layer's interruption carries the gateway's count.
        let losses: Vec<(Rule, u64)> = store
            .events()
            .unwrap()
            .iter()
            .filter_map(|e| e.data_loss.as_ref().map(|l| (e.rule, l.samples_dropped)))
            .collect();
        assert_eq!(losses, vec![(Rule::R5, 7)]);
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_retrying_an_unreachable_broker_and_stops_on_shutdown() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
    let settings = Settings::new(
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
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(facwatch_ingest::run(
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    // Three failures: the first retry waits 100 ms, the second 200 ms.
    timeout(
        LIMIT,
        stats.wait_until(|s| s.broker_connection_failures >= 3),
    )
    .await
    .expect("connection attempts are retried");
    shutdown.cancel();
    timeout(LIMIT, task)
        .await
        .expect("run returned after shutdown")
        .unwrap()
        .unwrap();
    // The store was closed on the way out.
    Store::open(&dir.path().join("ingest.redb")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_publishes_a_retained_ack_for_every_gateway() {
    timeout(LIMIT * 3, async {
        let world = World::new();
        let first = world.start_ingest().await;
        // A fresh store: ack 0 for both, so fresh gateways start sending.
        let mut late = Peer::connect(&world.broker, "late-1").await;
        late.subscribe("facwatch/v1/+/ack").await;
        late.expect_connect_acks(0, 0).await;
        late.send_batch(&batch("gw-a", 1, 3)).await;
        assert_eq!(late.next_ack().await, (ack_topic("gw-a"), 1, false));
        late.send_batch(&batch("gw-a", 2, 2)).await;
        assert_eq!(late.next_ack().await, (ack_topic("gw-a"), 2, false));
        first.stop().await;

        // A broker that lost every retained message (here: a new one).
        let forgetful = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let second = world.start_ingest_on(&forgetful).await;
        let mut seen = Peer::connect(&forgetful, "late-2").await;
        seen.subscribe("facwatch/v1/+/ack").await;
        seen.expect_connect_acks(2, 0).await;
        // Both acks are retained: a subscriber after them gets them too.
        let mut later = Peer::connect(&forgetful, "late-3").await;
        later.subscribe("facwatch/v1/+/ack").await;
        let mut retained = vec![later.next_ack().await, later.next_ack().await];
        retained.sort();
        assert_eq!(
            retained,
            vec![(ack_topic("gw-a"), 2, true), (ack_topic("gw-b"), 0, true)]
        );
        timeout(LIMIT, second.stats.wait_until(|s| s.acks_published >= 2))
            .await
            .expect("acks counted");
        assert_eq!(second.stats().acks_published, 2);
        second.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_discarded_by_the_gateway_become_an_r5_event_on_the_events_topic() {
    timeout(LIMIT * 3, async {
        let world = World::new();
        let ingest = world.start_ingest().await;
        let mut platform = Peer::connect(&world.broker, "platform").await;
        platform.subscribe(&topics::events("plant")).await;
        let mut gateway = gateway_peer(&world, "r5-test").await;
        gateway.expect_connect_acks(0, 0).await;

        gateway.send_batch(&batch("gw-b", 1, 2)).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-b"), 1, false));
        // Batches 2..=4 and 1,234 samples were discarded by the gateway.
        let mut after_loss = batch("gw-b", 5, 1);
        after_loss.dropped_before = 1234;
        gateway.send_batch(&after_loss).await;
        assert_eq!(gateway.next_ack().await, (ack_topic("gw-b"), 5, false));

        let message = platform.next_message().await;
        assert_eq!(message.topic, "facwatch/v1/events/plant");
        let json: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        // Newest sample of batch 1: (100 + 1) polls after the base time;
        // oldest of batch 5: 500 polls after it. Times in Asia/Shanghai.
        assert_eq!(json["rule"], "R5");
        assert_eq!(json["gateway"], "gw-b");
        assert_eq!(json["line"], "*");
        assert_eq!(json["status"], "closed");
        assert_eq!(json["start"], "2022-12-13T14:53:30+08:00");
        assert_eq!(json["end"], "2022-12-13T18:13:00+08:00");
        assert_eq!(json["samples_dropped"], 1234);
        assert_eq!(json["batches_missing"], 3);
        assert_eq!(
            json["facilities"],
            serde_json::json!(["b-fan", "b-stenter"])
        );

        let stats = ingest.stats();
        assert_eq!(
            (
                stats.data_interruptions,
                stats.events_opened,
                stats.events_closed
            ),
            (1, 1, 1)
        );
        ingest.stop().await;
        let store = world.open_store();
        let events = store.events().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(json, events[0].to_json("Asia/Shanghai".parse().unwrap()));
    })
    .await
    .expect("test finished in time");
}
