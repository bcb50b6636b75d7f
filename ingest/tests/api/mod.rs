//! A running ingest fed real batches, for the HTTP API tests (`http.rs`,
//! `openapi.rs`), and a one-gateway site ([`ONE_GATEWAY_SITE`], also for
//! `influx.rs`): embedded broker on port 0, API on port 0, the batches
//! published over MQTT as a gateway would, every wait on a counter bounded
//! by [`LIMIT`].
//!
//! The plant: gateway `gw-a` reads line `line-a`, `gw-b` reads `line-b`,
//! `gw-c` reads `line-c` and never sends. From 14:00 (Asia/Shanghai) on
//! 2022-12-13, every 30 s for 12 minutes: both stenters draw 100 kW, line
//! A's fan 0 kW (stopped: R1 opens after its 10 minutes and stays open),
//! line B's fan 6 kW (running, below 40 % of its 22 kW rated: low load; R4
//! needs 15 minutes so does not open). Then every meter of gw-a times out
//! for 2 minutes: the whole-gateway R5 opens at 14:12 and line A's
//! facilities turn unknown (their last readings stay). gw-b's first batch
//! says it discarded 3 samples before it: a closed R5 at 14:00. The
//! ingest's clock stands just after the data, so the events are live and
//! their notices go to the webhook `ops`, whose URL refuses connections:
//! they stay in its outbox.

// Each test crate that includes this module uses part of it.
#![allow(dead_code)]

use super::sealing;
use std::sync::Arc;
use std::time::Duration;

use facwatch_ingest::broker::{start_embedded, EmbeddedBroker, MAX_PACKET_BYTES};
use facwatch_ingest::{HttpSettings, MqttSettings, Settings, Stats, WebhookSettings};
use facwatch_proto::clock::Clock;
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// One gateway, `gw-b`, reading line `line-b`: a stenter and its fan.
pub(crate) const ONE_GATEWAY_SITE: &str = r#"
[site]
id = "plant"
name = "Plant"
time_zone = "Asia/Shanghai"

[[gateways]]
id = "gw-b"

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
id = "line-b"
name = "Line B"

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

pub(crate) const LIMIT: Duration = Duration::from_secs(20);

/// 2022-12-13T14:00:00+08:00, the first sample.
pub(crate) const T0_MS: i64 = 1_670_911_200_000;
const POLL_MS: i64 = 30_000;
/// Valid samples per meter: 14:00 to 14:12 every 30 s.
const POLLS: i64 = 25;
/// The first batch holds the polls before this one.
const SPLIT: i64 = 11;
/// Polls after the valid ones at which every meter timed out.
const SILENT_POLLS: i64 = 4;

pub(crate) const PLANT: &str = r#"
[site]
id = "plant"
name = "Plant"
time_zone = "Asia/Shanghai"

[[gateways]]
id = "gw-a"

[[gateways]]
id = "gw-b"

[[gateways]]
id = "gw-c"

[[meters]]
id = "a-stenter"
gateway = "gw-a"
profile = "dtsu666"
tcp = "127.0.0.1:5021"
unit = 1

[[meters]]
id = "a-fan"
gateway = "gw-a"
profile = "sdm630"
tcp = "127.0.0.1:5021"
unit = 2

[[meters]]
id = "b-stenter"
gateway = "gw-b"
profile = "dtsu666"
tcp = "127.0.0.1:5021"
unit = 3

[[meters]]
id = "b-fan"
gateway = "gw-b"
profile = "sdm630"
tcp = "127.0.0.1:5021"
unit = 4

[[meters]]
id = "c-boiler"
gateway = "gw-c"
profile = "dtsu666"
tcp = "127.0.0.1:5022"
unit = 1

[[meters]]
id = "c-fan"
gateway = "gw-c"
profile = "sdm630"
tcp = "127.0.0.1:5022"
unit = 2

[[lines]]
id = "line-a"
name = "Line A"

[[lines.facilities]]
id = "a-stenter"
name = "Stenter A"
kind = "stenter"
meter = "a-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "a-fan"
name = "Main fan A"
kind = "main_fan"
meter = "a-fan"
rated_kw = 22
start_threshold_kw = 4

[[lines]]
id = "line-b"
name = "Line B"

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

[[lines]]
id = "line-c"
name = "Line C"

[[lines.facilities]]
id = "c-boiler"
kind = "boiler"
meter = "c-boiler"
rated_kw = 200
start_threshold_kw = 10

[[lines.facilities]]
id = "c-fan"
kind = "main_fan"
meter = "c-fan"
rated_kw = 15
start_threshold_kw = 3
"#;

/// The power each meter reads all along, by gateway.
const POWER: [(&str, [(&str, f32); 2]); 2] = [
    ("gw-a", [("a-stenter", 100.0), ("a-fan", 0.0)]),
    ("gw-b", [("b-stenter", 100.0), ("b-fan", 6.0)]),
];

/// Batch `seq` of `gateway` with its meters' samples at `polls`: valid
/// before [`POLLS`], timeouts from there on.
fn batch(gateway: &str, seq: u64, polls: std::ops::Range<i64>, dropped_before: u64) -> Batch {
    let meters = POWER
        .iter()
        .find(|(g, _)| *g == gateway)
        .map(|(_, meters)| meters)
        .expect("a gateway that sends");
    Batch {
        gateway: gateway.into(),
        seq,
        dropped_before,
        samples: polls
            .flat_map(|i| {
                let valid = i < POLLS;
                meters.iter().map(move |(meter, kw)| Sample {
                    meter: (*meter).into(),
                    time_ms: T0_MS + i * POLL_MS,
                    quality: if valid { Quality::Ok } else { Quality::Timeout },
                    values: Values {
                        power_kw: valid.then_some(*kw),
                        ..Values::default()
                    },
                })
            })
            .collect(),
    }
}

/// A running ingest with its API, fed the plant's batches.
pub(crate) struct FedIngest {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    pub(crate) stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), facwatch_ingest::IngestError>>,
    _broker: EmbeddedBroker,
    _dir: tempfile::TempDir,
}

impl FedIngest {
    /// Starts the ingest and waits until it applied every batch and
    /// queued the notices of their events.
    pub(crate) async fn start() -> FedIngest {
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (stats, shutdown, task) = run(&broker, &dir).await;
        let mut options = MqttOptions::new("gateways-test", "127.0.0.1", broker.addr.port());
        options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (gateway, mut eventloop) = AsyncClient::new(options, 16);
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        for b in [
            batch("gw-a", 1, 0..SPLIT, 0),
            batch("gw-a", 2, SPLIT..POLLS, 0),
            batch("gw-a", 3, POLLS..POLLS + SILENT_POLLS, 0),
            batch("gw-b", 1, 0..POLLS, 3),
        ] {
            gateway
                .publish(
                    topics::batch(&b.gateway),
                    QoS::AtLeastOnce,
                    false,
                    sealing::sealed(&b),
                )
                .await
                .unwrap();
        }
        timeout(
            LIMIT,
            stats.wait_until(|s| {
                s.batches_applied == 4 && s.events_opened == 3 && s.webhook_queued == 3
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("batches applied: {:?}", stats.snapshot()));
        gateway.disconnect().await.unwrap();
        FedIngest::new(broker, dir, stats, shutdown, task)
    }

    /// Stops the ingest and starts a new one on the same store (nothing
    /// fed this time).
    pub(crate) async fn restart(self) -> FedIngest {
        let FedIngest {
            shutdown,
            task,
            _broker: broker,
            _dir: dir,
            ..
        } = self;
        shutdown.cancel();
        timeout(LIMIT, task)
            .await
            .expect("run returned")
            .unwrap()
            .unwrap();
        let (stats, shutdown, task) = run(&broker, &dir).await;
        FedIngest::new(broker, dir, stats, shutdown, task)
    }

    fn new(
        broker: EmbeddedBroker,
        dir: tempfile::TempDir,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
        task: JoinHandle<Result<(), facwatch_ingest::IngestError>>,
    ) -> FedIngest {
        let addr = stats
            .http_addr()
            .expect("bound before the broker connection");
        FedIngest {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            stats,
            shutdown,
            task,
            _broker: broker,
            _dir: dir,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        get(&self.client, &self.base, path).await
    }

    pub(crate) async fn get_json(&self, path: &str) -> (u16, Value) {
        get_json(&self.client, &self.base, path).await
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        timeout(LIMIT, self.task)
            .await
            .expect("run returned")
            .unwrap()
            .unwrap();
    }
}

/// Runs an ingest on `broker` with its store in `dir`, until it is
/// subscribed to batches.
async fn run(
    broker: &EmbeddedBroker,
    dir: &tempfile::TempDir,
) -> (
    Arc<Stats>,
    CancellationToken,
    JoinHandle<Result<(), facwatch_ingest::IngestError>>,
) {
    let site = Site::from_toml(PLANT, "plant.site.toml").unwrap();
    let mut settings = Settings::new(
        vec![site.clone()],
        sealing::keys([&site]),
        dir.path().join("ingest.redb"),
        MqttSettings {
            host: broker.addr.ip().to_string(),
            port: broker.addr.port(),
            client_id: "facwatch-ingest".into(),
        },
    )
    .unwrap();
    settings.http = Some(HttpSettings::open("127.0.0.1:0".parse().unwrap()));
    // Just after the last sample: the events are live, not historical.
    settings.clock = Clock::starting_now(T0_MS + (POLLS + SILENT_POLLS) * POLL_MS, 1.0);
    settings.notices.silent_after = Duration::from_secs(3600);
    // A port nothing listens on: bound, then released.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    settings.webhooks = vec![WebhookSettings {
        name: "ops".into(),
        url: format!("http://{refused}/hook").parse().unwrap(),
        timeout: Duration::from_secs(5),
        header: None,
        max_queue: 100,
        // One failed POST, then no retry within any test's time.
        backoff_initial: Duration::from_secs(3600),
        backoff_max: Duration::from_secs(3600),
    }];
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(facwatch_ingest::run(
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    timeout(LIMIT, stats.wait_until(|s| s.broker_subscriptions >= 1))
        .await
        .expect("ingest subscribed to batches");
    (stats, shutdown, task)
}

/// GET `path` on the API: (status, body).
pub(crate) async fn get(client: &reqwest::Client, base: &str, path: &str) -> (u16, String) {
    let response = timeout(LIMIT, client.get(format!("{base}{path}")).send())
        .await
        .expect("response in time")
        .expect("response");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

pub(crate) async fn get_json(client: &reqwest::Client, base: &str, path: &str) -> (u16, Value) {
    let (status, body) = get(client, base, path).await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path}: {status} `{body}` is not JSON: {e}"));
    (status, json)
}
