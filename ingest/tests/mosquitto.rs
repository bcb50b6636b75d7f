//! The ingest against a real Mosquitto with `allow_anonymous false`: it logs
//! in, keeps a persistent session so batches published while it is down
//! wait at the broker, and keeps retrying a refused login. Needs Mosquitto:
//! `cargo test -p facwatch-ingest --test mosquitto -- --ignored`.

mod common;
mod sealing;

use std::sync::Arc;
use std::time::Duration;

use common::{Mosquitto, PASSWORD, USER};
use facwatch_ingest::broker::MAX_PACKET_BYTES;
use facwatch_ingest::{Credentials, MqttSettings, Settings, Stats, Store};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);
const GATEWAY: &str = "gw-01";

const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");

fn settings(broker: &Mosquitto, store: &std::path::Path, password: &str) -> Settings {
    let site = Site::from_toml(SITE, "stenter-plant.site.toml").unwrap();
    let mut settings = Settings::new(
        vec![site.clone()],
        sealing::keys([&site]),
        store,
        MqttSettings {
            host: "127.0.0.1".into(),
            port: broker.port,
            client_id: "facwatch-ingest".into(),
        },
    )
    .unwrap();
    settings.mqtt_credentials = Some(Credentials {
        username: USER.into(),
        password: password.into(),
    });
    settings.mqtt_persistent_session = true;
    settings
}

struct Ingest {
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), facwatch_ingest::IngestError>>,
}

fn start(settings: Settings) -> Ingest {
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(facwatch_ingest::run(
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    Ingest {
        stats,
        shutdown,
        task,
    }
}

impl Ingest {
    async fn stop(self) {
        self.shutdown.cancel();
        timeout(LIMIT, self.task)
            .await
            .expect("run returned after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// A gateway stand-in logged in to Mosquitto, subscribed to the acks.
struct Gateway {
    client: AsyncClient,
    messages: mpsc::Receiver<Publish>,
}

impl Gateway {
    async fn connect(broker: &Mosquitto) -> Gateway {
        let mut options = MqttOptions::new("gateway-stand-in", "127.0.0.1", broker.port);
        options
            .set_credentials(USER, PASSWORD)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let (tx, messages) = mpsc::channel(64);
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if tx.send(p).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .subscribe(topics::ack(GATEWAY), QoS::AtLeastOnce)
            .await
            .unwrap();
        timeout(LIMIT, subscribed).await.unwrap().unwrap();
        Gateway { client, messages }
    }

    async fn send(&self, seq: u64) {
        let batch = Batch {
            gateway: GATEWAY.into(),
            seq,
            dropped_before: 0,
            samples: vec![Sample {
                meter: "l1-stenter".into(),
                time_ms: 1_670_911_380_000 + seq as i64 * 30_000,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(100.0),
                    ..Values::default()
                },
            }],
        };
        self.client
            .publish(
                topics::batch(GATEWAY),
                QoS::AtLeastOnce,
                false,
                sealing::sealed(&batch),
            )
            .await
            .unwrap();
    }

    /// The next ack: (gateway topic, seq, retained).
    async fn next_ack(&mut self) -> (String, u64, bool) {
        let message = timeout(LIMIT, self.messages.recv())
            .await
            .expect("an ack within the limit")
            .expect("connection alive");
        let gateway = sealing::gateway_of_ack_topic(&message.topic);
        let ack = sealing::open_ack(gateway, &message.payload)
            .expect("an ack sealed with its gateway's key");
        (message.topic, ack.seq, message.retain)
    }

    /// The ack the ingest publishes for the site's gateway when it
    /// connects (retained or live, depending on who was first).
    async fn expect_connect_ack(&mut self, seq: u64) {
        let (topic, acked, _) = self.next_ack().await;
        assert_eq!((topic, acked), (topics::ack(GATEWAY), seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto on PATH: .ci/run runs it with --ignored"]
async fn batches_published_while_the_ingest_is_down_wait_in_its_persistent_session() {
    timeout(LIMIT * 3, async {
        let broker = Mosquitto::start().await;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("ingest.redb");

        let first = start(settings(&broker, &store, PASSWORD));
        timeout(
            LIMIT,
            first.stats.wait_until(|s| s.broker_subscriptions >= 1),
        )
        .await
        .expect("logged in and subscribed");
        let mut gateway = Gateway::connect(&broker).await;
        gateway.expect_connect_ack(0).await;
        gateway.send(1).await;
        assert_eq!(gateway.next_ack().await, (topics::ack(GATEWAY), 1, false));
        first.stop().await;

        // The ingest is down: Mosquitto keeps this for its session.
        gateway.send(2).await;

        let second = start(settings(&broker, &store, PASSWORD));
        gateway.expect_connect_ack(1).await;
        // Applied without the gateway resending it.
        assert_eq!(gateway.next_ack().await, (topics::ack(GATEWAY), 2, false));
        let stats = second.stats.snapshot();
        assert_eq!((stats.batches_applied, stats.batches_duplicate), (1, 0));
        second.stop().await;
        let store = Store::open(&store).unwrap();
        assert_eq!(store.last_seq(GATEWAY).unwrap(), Some(2));
        assert_eq!(store.samples_applied(GATEWAY).unwrap(), 2);
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto on PATH: .ci/run runs it with --ignored"]
async fn a_refused_login_is_retried_and_shutdown_still_stops_the_ingest() {
    timeout(LIMIT * 3, async {
        let broker = Mosquitto::start().await;
        let dir = tempfile::tempdir().unwrap();
        let ingest = start(settings(&broker, &dir.path().join("ingest.redb"), "wrong"));
        timeout(
            LIMIT,
            ingest
                .stats
                .wait_until(|s| s.broker_connection_failures >= 2),
        )
        .await
        .expect("the refused login is retried");
        assert_eq!(ingest.stats.snapshot().broker_subscriptions, 0);
        ingest.stop().await;
    })
    .await
    .expect("test finished in time");
}
