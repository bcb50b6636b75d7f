//! The InfluxDB output against a scripted `/api/v2/write` receiver (axum on
//! 127.0.0.1:0), with a real ingest and its embedded broker: every reading
//! and event change arrives once, in order, through retried and refused
//! writes; a full outbox stops the ingest from applying and acking until
//! the server takes the backlog. Every wait is on a counter or a message,
//! bounded by [`LIMIT`].

mod api;
mod sealing;

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use facwatch_ingest::broker::{start_embedded, EmbeddedBroker, MAX_PACKET_BYTES};
use facwatch_ingest::{InfluxSettings, MqttSettings, Settings, Stats, Store};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

/// 2022-12-13 14:00 in Asia/Shanghai.
const T0_MS: i64 = 1_670_911_200_000;
const POLL_MS: i64 = 30_000;

/// `samples` polls of both meters from poll `first` on, stenter running
/// and fan too (no rule fires).
fn batch(seq: u64, first: i64, polls: i64, dropped_before: u64) -> Batch {
    let mut samples = Vec::new();
    for poll in first..first + polls {
        for (meter, kw) in [("b-stenter", 110.5), ("b-fan", 18.25)] {
            samples.push(Sample {
                meter: meter.into(),
                time_ms: T0_MS + poll * POLL_MS,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(kw),
                    energy_kwh: Some(1000.0 + poll as f64),
                    voltage_v: vec![230.5, 229.75, 231.0],
                    current_a: vec![160.25, 161.0, 159.5],
                    power_factor: Some(0.85),
                },
            });
        }
    }
    Batch {
        gateway: "gw-b".into(),
        seq,
        dropped_before,
        samples,
    }
}

/// What the receiver answers, in order; after the script, 204.
#[derive(Clone, Copy)]
enum Answer {
    Status(u16, Option<&'static str>, &'static str),
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    query: String,
    authorization: Option<String>,
    encoding: Option<String>,
    body: String,
    answered: u16,
}

#[derive(Clone)]
struct Receiver {
    script: Arc<Mutex<VecDeque<Answer>>>,
    /// While set, every request is answered 503 (an outage).
    down: Arc<std::sync::atomic::AtomicBool>,
    seen: mpsc::UnboundedSender<Seen>,
}

async fn write(
    State(receiver): State<Receiver>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    let encoding = header("content-encoding");
    let body = if encoding.as_deref() == Some("gzip") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .expect("a gzip body");
        text
    } else {
        String::from_utf8(body.to_vec()).unwrap()
    };
    let answer = if receiver.down.load(std::sync::atomic::Ordering::SeqCst) {
        Answer::Status(503, None, "down")
    } else {
        receiver
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::Status(204, None, ""))
    };
    let Answer::Status(status, retry_after, text) = answer;
    let _ = receiver.seen.send(Seen {
        query: query.unwrap_or_default(),
        authorization: header("authorization"),
        encoding,
        body,
        answered: status,
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), text).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.parse().unwrap());
    }
    response
}

/// The receiver's base URL and what it saw.
async fn receiver(script: Vec<Answer>) -> (reqwest::Url, Receiver, mpsc::UnboundedReceiver<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/influx/", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Receiver {
        script: Arc::new(Mutex::new(script.into())),
        down: Default::default(),
        seen: tx,
    };
    let app = axum::Router::new()
        .route("/influx/api/v2/write", axum::routing::post(write))
        .with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state, rx)
}

struct Running {
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), facwatch_ingest::IngestError>>,
}

fn start(broker: &EmbeddedBroker, store: &std::path::Path, influx: InfluxSettings) -> Running {
    let site = Site::from_toml(api::ONE_GATEWAY_SITE, "plant.site.toml").unwrap();
    let mut settings = Settings::new(
        vec![site.clone()],
        sealing::keys([&site]),
        store,
        MqttSettings {
            host: broker.addr.ip().to_string(),
            port: broker.addr.port(),
            client_id: "facwatch-ingest".into(),
        },
    )
    .unwrap();
    settings.influxdb = Some(influx);
    let stats = Arc::new(Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(facwatch_ingest::run(
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    Running {
        stats,
        shutdown,
        task,
    }
}

/// A stand-in gateway: publishes batches and reports the acks it gets.
async fn gateway(broker: &EmbeddedBroker) -> (AsyncClient, mpsc::UnboundedReceiver<u64>) {
    let mut options = MqttOptions::new("gw-b-test", "127.0.0.1", broker.addr.port());
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Incoming::Publish(p)) = event {
                if let Some(ack) =
                    sealing::open_ack(sealing::gateway_of_ack_topic(&p.topic), &p.payload)
                {
                    let _ = tx.send(ack.seq);
                }
            }
        }
    });
    client
        .subscribe(topics::ack("gw-b"), QoS::AtLeastOnce)
        .await
        .unwrap();
    (client, rx)
}

async fn publish(client: &AsyncClient, batch: &Batch) {
    client
        .publish(
            topics::batch("gw-b"),
            QoS::AtLeastOnce,
            false,
            sealing::sealed(batch),
        )
        .await
        .unwrap();
}

/// Waits for an ack of at least `seq`.
async fn acked(acks: &mut mpsc::UnboundedReceiver<u64>, seq: u64) {
    timeout(LIMIT, async {
        while acks.recv().await.expect("acks flow") < seq {}
    })
    .await
    .unwrap_or_else(|_| panic!("ack {seq} in time"));
}

fn settings(url: reqwest::Url) -> InfluxSettings {
    let mut influx = InfluxSettings::new(url, "facwatch org", "readings");
    influx.token = Some("s3cret-token".into());
    influx.max_lines_per_write = 50;
    influx.backoff_initial = Duration::from_millis(20);
    influx.backoff_max = Duration::from_millis(100);
    influx.timeout = Duration::from_secs(5);
    influx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_and_event_change_reaches_influxdb_once_and_in_order() {
    timeout(LIMIT * 3, async {
        // A 503 with Retry-After, a 429 (backoff), then a refusal of the
        // request that got through, then acceptance.
        let (url, _, mut seen) = receiver(vec![
            Answer::Status(503, Some("0"), "busy"),
            Answer::Status(429, None, "slow down"),
            Answer::Status(
                400,
                None,
                r#"{"code":"invalid","message":"unable to parse line 2: bad timestamp"}"#,
            ),
        ])
        .await;
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ingest = start(&broker, &dir.path().join("ingest.redb"), settings(url));
        timeout(LIMIT, ingest.stats.wait_until(|s| s.broker_subscriptions >= 1))
            .await
            .expect("subscribed");
        let (client, mut acks) = gateway(&broker).await;

        // 3 batches of 20 polls (40 samples each); the third declares 7
        // samples the gateway dropped: one R5 event, opened and closed by
        // the same batch.
        let batches = [batch(1, 0, 20, 0), batch(2, 20, 20, 0), batch(4, 40, 20, 7)];
        for b in &batches {
            publish(&client, b).await;
            acked(&mut acks, b.seq).await;
        }
        let samples: u64 = batches.iter().map(|b| b.samples.len() as u64).sum();
        let lines = samples + 1;
        timeout(
            LIMIT,
            ingest
                .stats
                .wait_until(|s| s.influx_lines_written + s.influx_lines_refused == lines),
        )
        .await
        .expect("every line written or refused");

        let mut requests = Vec::new();
        while let Ok(request) = seen.try_recv() {
            requests.push(request);
        }
        let answers: Vec<u16> = requests.iter().map(|r| r.answered).collect();
        assert_eq!(&answers[..3], &[503, 429, 400]);
        assert!(answers[3..].iter().all(|a| *a == 204), "{answers:?}");
        for request in &requests {
            assert_eq!(request.query, "org=facwatch+org&bucket=readings&precision=ms");
            assert_eq!(request.authorization.as_deref(), Some("Token s3cret-token"));
            assert_eq!(request.encoding.as_deref(), Some("gzip"));
            assert!(request.body.lines().count() <= 50);
        }
        // The retried request is the same request until it is answered.
        assert_eq!(requests[0].body, requests[1].body);
        assert_eq!(requests[1].body, requests[2].body);
        let refused = requests[2].body.lines().count() as u64;
        let stats = ingest.stats.snapshot();
        assert_eq!(stats.influx_lines_refused, refused);
        assert_eq!(stats.influx_lines_written, lines - refused);
        assert_eq!(stats.influx_lines_queued, lines);
        assert_eq!(stats.influx_write_errors, 3);

        // Everything written, once, in the order applied: the refused
        // request's lines and then the accepted ones are the whole stream.
        let mut stream: Vec<&str> = requests[2].body.lines().collect();
        for request in &requests[3..] {
            stream.extend(request.body.lines());
        }
        assert_eq!(stream.len() as u64, lines);
        assert_eq!(
            stream[0],
            "reading,facility=b-stenter,gateway=gw-b,line=line-b,meter=b-stenter,quality=ok,site=plant \
             ok=true,power_kw=110.5,energy_kwh=1000,voltage_a_v=230.5,voltage_b_v=229.75,voltage_c_v=231,\
             current_a_a=160.25,current_b_a=161,current_c_a=159.5,power_factor=0.85 1670911200000"
        );
        let readings: Vec<(String, i64)> = stream
            .iter()
            .filter(|l| l.starts_with("reading,"))
            .map(|l| {
                let meter = l.split("meter=").nth(1).unwrap().split(',').next().unwrap();
                let time = l.rsplit_once(' ').unwrap().1.parse().unwrap();
                (meter.to_string(), time)
            })
            .collect();
        let produced: Vec<(String, i64)> = batches
            .iter()
            .flat_map(|b| b.samples.iter().map(|s| (s.meter.clone(), s.time_ms)))
            .collect();
        assert_eq!(readings, produced);
        ingest.shutdown.cancel();
        ingest.task.await.unwrap().unwrap();
        let store = Store::open(&dir.path().join("ingest.redb")).unwrap();
        assert_eq!(store.influx_outbox_bytes(), 0);
        assert_eq!(store.influx_outbox_depth().unwrap().lines, 0);
        // The event comes after the readings of its batch, keyed by its
        // start (the last sample before the loss).
        let events = store.events().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            stream.last().copied().unwrap(),
            format!(
                "event,gateway=gw-b,line=*,rule=R5,site=plant open=false,duration_secs=30i,\
                 samples_dropped=7i,batches_missing=1i,facilities=2i,historical=true,\
                 id=\"{}\" 1670912370000",
                events[0].id
            )
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_stops_acking_until_influxdb_takes_the_backlog() {
    timeout(LIMIT * 3, async {
        let (url, receiver, _seen) = receiver(Vec::new()).await;
        receiver
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut influx = settings(url);
        // The outbox holds the applied batches themselves: the first two
        // fill it.
        influx.max_outbox_bytes =
            (batch(1, 0, 20, 0).encode().len() + batch(2, 20, 20, 0).encode().len()) as u64;
        let ingest = start(&broker, &dir.path().join("ingest.redb"), influx);
        timeout(
            LIMIT,
            ingest.stats.wait_until(|s| s.broker_subscriptions >= 1),
        )
        .await
        .expect("subscribed");
        let (client, mut acks) = gateway(&broker).await;

        publish(&client, &batch(1, 0, 20, 0)).await;
        acked(&mut acks, 1).await;
        publish(&client, &batch(2, 20, 20, 0)).await;
        acked(&mut acks, 2).await;
        // Full now: the next batch is held back, neither applied nor acked.
        publish(&client, &batch(3, 40, 20, 0)).await;
        timeout(LIMIT, ingest.stats.wait_until(|s| s.batches_deferred == 1))
            .await
            .expect("batch 3 deferred");
        let stats = ingest.stats.snapshot();
        assert_eq!(stats.batches_applied, 2);
        assert_eq!(stats.influx_lines_queued, 80);
        assert!(stats.influx_write_errors >= 1, "the writer tried");
        assert!(acks.try_recv().is_err(), "no ack for batch 3");

        // The server is back: the outbox drains, and the gateway's resend
        // of batch 3 is applied and acked.
        receiver
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        timeout(
            LIMIT,
            ingest.stats.wait_until(|s| s.influx_lines_written == 80),
        )
        .await
        .expect("backlog written");
        publish(&client, &batch(3, 40, 20, 0)).await;
        acked(&mut acks, 3).await;
        timeout(
            LIMIT,
            ingest.stats.wait_until(|s| s.influx_lines_written == 120),
        )
        .await
        .expect("batch 3 written");
        let stats = ingest.stats.snapshot();
        assert_eq!(
            (
                stats.batches_applied,
                stats.batches_deferred,
                stats.influx_lines_refused
            ),
            (3, 1, 0)
        );
        ingest.shutdown.cancel();
        ingest.task.await.unwrap().unwrap();
    })
    .await
    .expect("bounded");
}
