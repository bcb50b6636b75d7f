//! Notices end to end over a real (embedded) broker and a local HTTP
//! receiver: live event notices reach the webhook through a failure and an
//! ingest restart, a replay is summarised once, and silent gateways raise
//! and clear connectivity alerts that survive a restart. Every wait is on a
//! message or a counter, bounded by [`LIMIT`].

mod sealing;
use std::sync::Arc;
use std::time::Duration;

use facwatch_ingest::broker::{start_embedded, EmbeddedBroker, MAX_PACKET_BYTES};
use facwatch_ingest::{MqttSettings, Settings, Stats, WebhookSettings};
use facwatch_proto::clock::Clock;
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

/// "Now" for the ingest's clock: 2022-12-13 20:03 in Asia/Shanghai.
const NOW_MS: i64 = 1_670_933_000_000;
const MINUTE_MS: i64 = 60_000;

const SITE: &str = r#"
[site]
id = "plant"
time_zone = "Asia/Shanghai"

# The samples here are minutes to hours apart: the data-time gaps between
# them would be R5 interruptions of their own. This test is about the
# notices of the delivery layer's R5, so data-time gaps are judged only
# after a very long silence.
[rules.r5]
gap_polls = 1000000

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

/// One POST as the receiver saw it: (Idempotency-Key, JSON body, status
/// answered).
type Seen = (String, serde_json::Value, u16);

/// A minimal HTTP/1.1 receiver on 127.0.0.1:0: answers the first
/// `failures` requests with 500, every other with 200.
async fn receiver(failures: usize) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (tx, answered) = (tx.clone(), answered.clone());
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                loop {
                    let mut key = String::new();
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        match socket.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            match name.to_ascii_lowercase().as_str() {
                                "idempotency-key" => key = value.trim().to_string(),
                                "content-length" => length = value.trim().parse().unwrap_or(0),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if socket.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let n = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let status = if n < failures { 500 } else { 200 };
                    let json = serde_json::from_slice(&body).unwrap_or_default();
                    let _ = tx.send((key, json, status));
                    let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if socket
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

async fn next_post(posts: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    timeout(LIMIT, posts.recv()).await.expect("a POST").unwrap()
}

struct World {
    broker: EmbeddedBroker,
    dir: tempfile::TempDir,
    webhook_url: String,
    silent_after: Duration,
}

impl World {
    fn new(webhook_url: String, silent_after: Duration) -> World {
        World {
            broker: start_embedded("127.0.0.1:0".parse().unwrap()).unwrap(),
            dir: tempfile::tempdir().unwrap(),
            webhook_url,
            silent_after,
        }
    }

    fn settings(&self) -> Settings {
        let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
        let mut settings = Settings::new(
            vec![site.clone()],
            sealing::keys([&site]),
            self.dir.path().join("ingest.redb"),
            MqttSettings {
                host: "127.0.0.1".into(),
                port: self.broker.addr.port(),
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap();
        settings.clock = Clock::starting_now(NOW_MS, 1.0);
        settings.notices.silent_after = self.silent_after;
        settings.webhooks = vec![WebhookSettings {
            name: "ops".into(),
            url: self.webhook_url.parse().unwrap(),
            timeout: Duration::from_secs(5),
            header: None,
            max_queue: 100,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
        }];
        settings
    }

    async fn start_ingest(&self) -> Ingest {
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(facwatch_ingest::run(
            self.settings(),
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
}

struct Ingest {
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), facwatch_ingest::IngestError>>,
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

/// A batch of one fan sample per time in `times_ms`.
fn batch(gateway: &str, seq: u64, dropped_before: u64, times_ms: &[i64]) -> Batch {
    let meter = if gateway == "gw-a" { "a-fan" } else { "b-fan" };
    Batch {
        gateway: gateway.into(),
        seq,
        dropped_before,
        samples: times_ms
            .iter()
            .map(|&time_ms| Sample {
                meter: meter.into(),
                time_ms,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(10.0),
                    ..Values::default()
                },
            })
            .collect(),
    }
}

/// The next message on the alerts topic, as JSON.
async fn next_json(peer: &mut Peer) -> serde_json::Value {
    let message = peer.next_message().await;
    serde_json::from_slice(&message.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_notices_survive_a_failing_webhook_and_a_restart_and_a_replay_is_summarised_once() {
    timeout(LIMIT * 3, async {
        let (url, mut posts) = receiver(1).await;
        let world = World::new(url, Duration::from_secs(3600));
        let ingest = world.start_ingest().await;
        let mut platform = Peer::connect(&world.broker, "platform").await;
        platform.subscribe("facwatch/v1/alerts/+").await;
        let gateway = Peer::connect(&world.broker, "gateways").await;

        // Live: gw-b lost data between 10 and 1 minutes ago.
        gateway
            .send_batch(&batch("gw-b", 1, 0, &[NOW_MS - 10 * MINUTE_MS]))
            .await;
        gateway
            .send_batch(&batch("gw-b", 3, 50, &[NOW_MS - MINUTE_MS]))
            .await;
        let (key, json, status) = next_post(&mut posts).await;
        assert_eq!(status, 500);
        let live_key = format!("{}:close", json["id"].as_str().unwrap());
        assert_eq!(key, live_key);
        assert_eq!(
            (
                &json["phase"],
                &json["rule"],
                &json["gateway"],
                &json["historical"]
            ),
            (&"close".into(), &"R5".into(), &"gw-b".into(), &false.into())
        );
        assert_eq!(json["start"], "2022-12-13T19:53:20+08:00");

        // The ingest restarts; the notice is still queued and goes through.
        ingest.stop().await;
        let ingest = world.start_ingest().await;
        let (key, json, status) = next_post(&mut posts).await;
        assert_eq!((key.as_str(), status), (live_key.as_str(), 200));
        assert_eq!(json["phase"], "close");

        // A replay of gw-a: a loss four hours ago is historical, no notice;
        // live data ends the replay and one summary goes out.
        for (seq, dropped, time) in [
            (1, 0, NOW_MS - 300 * MINUTE_MS),
            (3, 7, NOW_MS - 240 * MINUTE_MS),
            (4, 0, NOW_MS - 180 * MINUTE_MS),
        ] {
            gateway
                .send_batch(&batch("gw-a", seq, dropped, &[time]))
                .await;
        }
        timeout(
            LIMIT,
            ingest.stats.wait_until(|s| s.notices_historical == 1),
        )
        .await
        .unwrap();
        gateway
            .send_batch(&batch("gw-a", 5, 0, &[NOW_MS - MINUTE_MS / 2]))
            .await;
        let (key, json, status) = next_post(&mut posts).await;
        assert_eq!(status, 200);
        assert_eq!(key, format!("{}:summary", json["id"].as_str().unwrap()));
        assert_eq!(json["phase"], "summary");
        assert_eq!(json["kind"], "replay_summary");
        assert_eq!(json["gateway"], "gw-a");
        assert_eq!(json["count"], 1);
        assert_eq!(json["by_rule"], serde_json::json!({"R5": 1}));
        assert_eq!(json["start"], "2022-12-13T15:03:20+08:00");
        assert_eq!(json["end"], "2022-12-13T16:03:20+08:00");
        let mut on_mqtt = next_json(&mut platform).await;
        assert_eq!(on_mqtt["kind"], "replay_summary");
        on_mqtt["phase"] = "summary".into();
        assert_eq!(on_mqtt, json);

        // This instance sent the queued live notice and the summary.
        timeout(LIMIT, ingest.stats.wait_until(|s| s.webhook_sent == 2))
            .await
            .unwrap();
        let stats = ingest.stats.snapshot();
        assert_eq!(
            (
                stats.webhook_queued,
                stats.replay_summaries,
                stats.webhook_dropped_full
            ),
            (1, 1, 0)
        );
        ingest.stop().await;
        assert!(posts.try_recv().is_err(), "no other POST");
        let store = facwatch_ingest::Store::open(&world.dir.path().join("ingest.redb")).unwrap();
        assert_eq!(store.outbox_len("ops").unwrap(), 0);
        assert_eq!(store.events().unwrap().len(), 2);
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_raises_one_alert_across_restarts_and_clears_it_with_a_batch() {
    timeout(LIMIT * 3, async {
        let (url, mut posts) = receiver(0).await;
        let silent_after = Duration::from_millis(300);
        let world = World::new(url, silent_after);
        let mut platform = Peer::connect(&world.broker, "platform").await;
        platform.subscribe("facwatch/v1/alerts/+").await;
        let ingest = world.start_ingest().await;

        let mut raised = Vec::new();
        for _ in 0..2 {
            let json = next_json(&mut platform).await;
            assert_eq!(json["kind"], "gateway_silent");
            raised.push(json["gateway"].as_str().unwrap().to_string());
        }
        raised.sort();
        assert_eq!(raised, vec!["gw-a", "gw-b"]);
        let mut keys = Vec::new();
        for _ in 0..2 {
            let (key, json, status) = next_post(&mut posts).await;
            assert_eq!((json["phase"].as_str(), status), (Some("alert"), 200));
            assert_eq!(key, format!("{}:alert", json["id"].as_str().unwrap()));
            keys.push(key);
        }
        assert_ne!(keys[0], keys[1]);
        assert_eq!(ingest.stats.snapshot().alerts_raised, 2);
        ingest.stop().await;

        // Restarted: the alerts are stored, so none is raised again. (An
        // absence: waited for three times the setting.)
        let ingest = world.start_ingest().await;
        tokio::time::sleep(silent_after * 3).await;
        assert_eq!(ingest.stats.snapshot().alerts_raised, 0);

        let gateway = Peer::connect(&world.broker, "gateways").await;
        gateway
            .send_batch(&batch("gw-a", 1, 0, &[NOW_MS - MINUTE_MS]))
            .await;
        let json = next_json(&mut platform).await;
        assert_eq!(
            (json["kind"].as_str(), json["gateway"].as_str()),
            (Some("gateway_back"), Some("gw-a"))
        );
        let (_, posted, _) = next_post(&mut posts).await;
        assert_eq!(posted["kind"], "gateway_back");
        assert_eq!(posted["since"], json["since"]);
        let stats = ingest.stats.snapshot();
        assert_eq!((stats.alerts_raised, stats.alerts_cleared), (0, 1));
        ingest.stop().await;
        assert!(posts.try_recv().is_err(), "no other POST");
    })
    .await
    .expect("test finished in time");
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

    #[allow(dead_code)]
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
}
