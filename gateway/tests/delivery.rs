//! The gateway end to end against real peers in process: a tokio-modbus TCP
//! server serving one SDM630 meter and one unit that never answers, an
//! embedded rumqttd broker, and a fake ingest that, like the real one,
//! publishes its position as a retained ack on every connect, then decodes
//! batches, applies them in seq order and publishes retained acks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use facwatch_gateway::{
    Buffer, BufferLimits, MqttCredentials, MqttSettings, Report, Settings, Stats,
};
use facwatch_proto::clock::{wall_now_ms, Clock};
use facwatch_proto::profile::{Profile, ProfileName, Ratios, ReadLimits, ReadResult};
use facwatch_proto::seal::{open, seal, GatewayKey, Purpose};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Ack, Batch, LinkState, Quality, Status, Values};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

/// The key the gateway and the fake ingest share.
const KEY: GatewayKey = GatewayKey::from_bytes([7; 32]);

const GOOD_UNIT: u8 = 1;
const SILENT_UNIT: u8 = 2;
/// 2022-12-13T00:00:00+08:00, a multiple of every poll interval used here.
const START_MS: i64 = 1_670_860_800_000;
const POLL_INTERVAL_MS: i64 = 10_000;
/// Virtual time runs 10x: one poll interval is one wall second.
const TIME_SCALE: f64 = 10.0;

// ---- Modbus: one SDM630 and one unit that never answers ----

fn good_meter_values() -> Values {
    Values {
        power_kw: Some(17.5),
        energy_kwh: Some(1234.5),
        voltage_v: vec![230.0, 231.0, 229.5],
        current_a: vec![25.0, 25.5, 24.75],
        power_factor: Some(0.86),
    }
}

#[derive(Clone)]
struct Meters {
    registers: Arc<HashMap<u16, u16>>,
}

impl Meters {
    fn words(&self, address: u16, count: u16) -> Vec<u16> {
        (u32::from(address)..u32::from(address) + u32::from(count))
            .map(|a| {
                u16::try_from(a)
                    .ok()
                    .and_then(|a| self.registers.get(&a))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// What the gateway must decode from this meter.
    fn expected_values(&self) -> Values {
        let profile = Profile::builtin(ProfileName::Sdm630);
        let results: Vec<_> = profile
            .reads(ReadLimits::default())
            .into_iter()
            .map(|read| ReadResult {
                function: read.function,
                address: read.address,
                words: self.words(read.address, read.count),
            })
            .collect();
        profile.decode(&results, Ratios::default()).unwrap()
    }
}

impl tokio_modbus::server::Service for Meters {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        std::future::ready(match (request.slave, request.request) {
            (GOOD_UNIT, Request::ReadInputRegisters(address, count)) => Ok(Some(
                Response::ReadInputRegisters(self.words(address, count)),
            )),
            (GOOD_UNIT, _) => Err(ExceptionCode::IllegalFunction),
            // Any other unit never answers.
            _ => Ok(None),
        })
    }
}

async fn start_modbus_server() -> (SocketAddr, Meters) {
    let registers =
        Profile::builtin(ProfileName::Sdm630).encode(&good_meter_values(), Ratios::default());
    let meters = Meters {
        registers: Arc::new(registers.into_iter().map(|(_, a, w)| (a, w)).collect()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let service = meters.clone();
    tokio::spawn(async move {
        let on_connected = move |stream, socket_address| {
            let service = service.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, socket_address, |_| {
                    Ok(Some(service.clone()))
                })
            }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    (address, meters)
}

// ---- MQTT: an embedded rumqttd ----

/// Starts rumqttd on a free port (its `start` blocks: own thread, never
/// stopped) and waits until it accepts connections.
async fn start_broker() -> u16 {
    start_broker_with_logins(None).await
}

/// [`start_broker`], accepting only the given `username -> password`
/// logins when some are given.
async fn start_broker_with_logins(logins: Option<HashMap<String, String>>) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = rumqttd::ServerSettings {
        name: "v4-test".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: logins,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    port
}

// ---- The fake ingest ----

#[derive(Debug, Default, Clone)]
struct IngestLog {
    /// Every batch received, in arrival order.
    received: Vec<Batch>,
    /// When each of `received` arrived.
    received_at: Vec<std::time::Instant>,
    /// Batches applied, each exactly once, in seq order.
    applied: Vec<Batch>,
    /// Seqs that arrived while the ingest was up but after a missing one.
    gaps: Vec<u64>,
    statuses: Vec<LinkState>,
    subscribed: bool,
}

impl IngestLog {
    fn receipts_of(&self, seq: u64) -> usize {
        self.received.iter().filter(|b| b.seq == seq).count()
    }
}

/// How the fake ingest behaves.
#[derive(Debug, Clone, Copy)]
enum Availability {
    AlwaysUp,
    /// Applies and acks batches up to `seq`, then drops every later batch
    /// unapplied and unacked, until `seq + 1` arrives a second time (a
    /// resend); from that receipt on it is up again.
    DownAfter {
        seq: u64,
    },
}

/// Publishes the ingest's position for `gateway` as a retained ack, as the
/// ingest does on every connect: a gateway with a fresh buffer sends
/// nothing before it has seen it. Queued without blocking (the caller may
/// be the task polling the event loop).
fn announce_position(client: &AsyncClient, gateway: &str, last_seq: u64) {
    client
        .try_publish(
            topics::ack(gateway),
            QoS::AtLeastOnce,
            true,
            seal(&KEY, Purpose::Ack, &Ack { seq: last_seq }.encode()),
        )
        .unwrap();
}

/// Subscribes to the batch and status topics of `gateway`, announces
/// `last_seq` (the seq the ingest already holds) on every connect, and
/// applies batches like the ingest: `seq == last + 1` is applied and acked
/// (retained), `seq <= last` is a duplicate, anything later is a gap.
async fn start_fake_ingest(
    port: u16,
    gateway: &str,
    availability: Availability,
    last_seq: u64,
) -> watch::Receiver<IngestLog> {
    start_fake_ingest_with_login(port, gateway, availability, last_seq, None).await
}

/// [`start_fake_ingest`] logging in as `(username, password)`.
async fn start_fake_ingest_with_login(
    port: u16,
    gateway: &str,
    availability: Availability,
    last_seq: u64,
    login: Option<(&str, &str)>,
) -> watch::Receiver<IngestLog> {
    let mut options = MqttOptions::new(format!("fake-ingest-{gateway}"), "127.0.0.1", port);
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    client
        .subscribe(topics::batch(gateway), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe(topics::status(gateway), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (log_tx, log_rx) = watch::channel(IngestLog::default());
    let ack_topic = topics::ack(gateway);
    let batch_topic = topics::batch(gateway);
    let gateway = gateway.to_string();
    tokio::spawn(async move {
        let mut last = last_seq;
        let mut suback = 0;
        let mut up = true;
        let mut down_after = match availability {
            Availability::AlwaysUp => None,
            Availability::DownAfter { seq } => Some(seq),
        };
        loop {
            let publish = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    announce_position(&client, &gateway, last);
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    suback += 1;
                    log_tx.send_modify(|log| log.subscribed = suback == 2);
                    continue;
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => publish,
                Ok(_) => continue,
                Err(_) => return,
            };
            if publish.topic != batch_topic {
                let status = Status::decode(&publish.payload).unwrap();
                log_tx.send_modify(|log| log.statuses.push(status.state));
                continue;
            }
            let batch =
                Batch::decode(open(&KEY, Purpose::Batch, &publish.payload).unwrap()).unwrap();
            let seq = batch.seq;
            if let Some(limit) = down_after {
                if up && seq > limit {
                    up = false;
                }
                let resent = log_tx.borrow().receipts_of(limit + 1) >= 1;
                if !up && seq == limit + 1 && resent {
                    up = true;
                    down_after = None;
                }
            }
            log_tx.send_modify(|log| {
                log.received.push(batch.clone());
                log.received_at.push(std::time::Instant::now());
                if !up {
                    return;
                }
                if seq == last + 1 {
                    last = seq;
                    log.applied.push(batch);
                } else if seq > last + 1 {
                    log.gaps.push(seq);
                }
            });
            if up {
                // The polling task must not await: queue without blocking.
                client
                    .try_publish(
                        &ack_topic,
                        QoS::AtLeastOnce,
                        true,
                        seal(&KEY, Purpose::Ack, &Ack { seq: last }.encode()),
                    )
                    .unwrap();
            }
        }
    });
    let mut log = log_rx.clone();
    log.wait_for(|log| log.subscribed).await.unwrap();
    log_rx
}

// ---- The gateway under test ----

fn site(gateway: &str, modbus: SocketAddr, batch_interval_secs: u64) -> Site {
    let text = format!(
        r#"
[site]
id = "test-site"

[[gateways]]
id = "{gateway}"
poll_interval_secs = {poll}
modbus_timeout_ms = 200
batch_interval_secs = {batch_interval_secs}

[[meters]]
id = "good"
gateway = "{gateway}"
profile = "sdm630"
tcp = "{modbus}"
unit = {GOOD_UNIT}

[[meters]]
id = "silent"
gateway = "{gateway}"
profile = "sdm630"
tcp = "{modbus}"
unit = {SILENT_UNIT}

[[lines]]
id = "line1"

[[lines.facilities]]
id = "stenter"
kind = "stenter"
meter = "good"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "fan"
kind = "main_fan"
meter = "silent"
rated_kw = 22
start_threshold_kw = 4
"#,
        poll = POLL_INTERVAL_MS / 1000,
    );
    Site::from_toml(&text, "test.site.toml").unwrap()
}

/// Settings whose clock reaches `START_MS` one wall second from now (ample
/// time for the gateway to start, even on a busy machine), so the first
/// poll slot is exactly `START_MS`, and which poll `slots` slots.
fn settings(site: &Site, gateway: &str, broker_port: u16, buffer: &Path, slots: i64) -> Settings {
    let clock = Clock::simulated(START_MS, wall_now_ms() + 1000, TIME_SCALE);
    let mqtt = MqttSettings::new("127.0.0.1", broker_port, gateway);
    let mut settings = Settings::new(site, gateway, mqtt, KEY, buffer, clock).unwrap();
    settings.poll_until_ms = Some(START_MS + slots * POLL_INTERVAL_MS);
    settings
}

async fn run_gateway(settings: Settings, stats: Arc<Stats>) -> Report {
    tokio::time::timeout(
        Duration::from_secs(60),
        facwatch_gateway::run(settings, stats, CancellationToken::new()),
    )
    .await
    .expect("gateway finished in time")
    .expect("gateway ran without error")
}

/// The poll slot (0-based, from `START_MS`) a sample time belongs to,
/// checking that the sample was taken early in its slot.
fn slot_of(time_ms: i64) -> i64 {
    let offset = time_ms - START_MS;
    assert!(
        offset >= 0 && offset % POLL_INTERVAL_MS < POLL_INTERVAL_MS / 2,
        "sample at {offset} ms is not near a poll slot"
    );
    offset / POLL_INTERVAL_MS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poll_slot_reaches_the_ingest_in_seq_order_and_the_buffer_empties() {
    let gateway = "gw-order";
    let (modbus, meters) = start_modbus_server().await;
    let broker = start_broker().await;
    let mut ingest = start_fake_ingest(broker, gateway, Availability::AlwaysUp, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer_path = dir.path().join("buffer.redb");
    // Two slots per batch, four slots.
    let site = site(gateway, modbus, 2 * POLL_INTERVAL_MS as u64 / 1000);
    let stats = Arc::new(Stats::default());

    let report = run_gateway(
        settings(&site, gateway, broker, &buffer_path, 4),
        stats.clone(),
    )
    .await;

    assert_eq!(
        report,
        Report {
            samples_produced: 8,
            acked_seq: 2
        }
    );
    let log = ingest
        .wait_for(|log| log.statuses.last() == Some(&LinkState::Offline))
        .await
        .unwrap()
        .clone();
    assert_eq!(log.statuses.first(), Some(&LinkState::Online));
    assert!(log.gaps.is_empty(), "gaps: {:?}", log.gaps);
    let seqs: Vec<u64> = log.applied.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, vec![1, 2]);

    let expected = meters.expected_values();
    assert_eq!(expected.power_kw, Some(17.5));
    for (batch, slots) in log.applied.iter().zip([[0, 1], [2, 3]]) {
        assert_eq!(batch.gateway, gateway);
        assert_eq!(batch.dropped_before, 0);
        for meter in ["good", "silent"] {
            let samples: Vec<_> = batch.samples.iter().filter(|s| s.meter == meter).collect();
            let got: Vec<i64> = samples.iter().map(|s| slot_of(s.time_ms)).collect();
            assert_eq!(got, slots, "{meter} in batch {}", batch.seq);
            for sample in samples {
                if meter == "good" {
                    assert_eq!(sample.quality, Quality::Ok);
                    assert_eq!(sample.values, expected);
                } else {
                    assert!(
                        matches!(sample.quality, Quality::Timeout | Quality::Offline),
                        "{sample:?}"
                    );
                    assert_eq!(sample.values, Values::default());
                }
            }
        }
    }

    let polls = stats.polls();
    assert_eq!((polls.ok, polls.failed() + polls.skipped()), (4, 4));
    assert_eq!(stats.batches_appended.load(Ordering::Relaxed), 2);
    assert_eq!(stats.batches_sent.load(Ordering::Relaxed), 2);
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), 2);
    assert_eq!(stats.acked_seq.load(Ordering::Relaxed), 2);
    assert_eq!(stats.buffer_batches.load(Ordering::Relaxed), 0);
    let buffer = Buffer::open(&buffer_path, BufferLimits::default()).unwrap();
    assert!(buffer.range_from(0, 100).unwrap().is_empty());
    let meta = buffer.meta().unwrap();
    assert_eq!((meta.next_seq, meta.acked_seq, meta.batches), (3, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_acks_bring_a_resend_from_acked_plus_one_without_skipping_a_seq() {
    let gateway = "gw-resend";
    let (modbus, _meters) = start_modbus_server().await;
    let broker = start_broker().await;
    let mut ingest =
        start_fake_ingest(broker, gateway, Availability::DownAfter { seq: 1 }, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer_path = dir.path().join("buffer.redb");
    // One slot per batch, six slots.
    let site = site(gateway, modbus, POLL_INTERVAL_MS as u64 / 1000);
    let mut settings = settings(&site, gateway, broker, &buffer_path, 6);
    settings.ack_timeout = Duration::from_millis(300);
    let stats = Arc::new(Stats::default());

    let report = run_gateway(settings, stats.clone()).await;

    assert_eq!(
        report,
        Report {
            samples_produced: 12,
            acked_seq: 6
        }
    );
    let log = ingest
        .wait_for(|log| log.statuses.last() == Some(&LinkState::Offline))
        .await
        .unwrap()
        .clone();
    // Batch 2 went unacked, so it came again: the resend started at
    // acked + 1, and the ingest, back up from that receipt, never saw a
    // later seq before an earlier one.
    assert!(log.receipts_of(2) >= 2, "{:?}", seqs_received(&log));
    assert!(log.gaps.is_empty(), "gaps: {:?}", log.gaps);
    let applied: Vec<u64> = log.applied.iter().map(|b| b.seq).collect();
    assert_eq!(applied, vec![1, 2, 3, 4, 5, 6]);
    for (batch, slot) in log.applied.iter().zip(0..) {
        let slots: Vec<_> = batch.samples.iter().map(|s| slot_of(s.time_ms)).collect();
        assert_eq!(slots, vec![slot, slot], "batch {}", batch.seq);
    }
    assert!(stats.batches_resent.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.batches_sent.load(Ordering::Relaxed), 6);
    // Resends and repeated acks delete nothing twice.
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), 6);
    assert_eq!(stats.buffer_batches.load(Ordering::Relaxed), 0);
    let meta = Buffer::open(&buffer_path, BufferLimits::default())
        .unwrap()
        .meta()
        .unwrap();
    assert_eq!((meta.acked_seq, meta.batches), (6, 0));
}

fn seqs_received(log: &IngestLog) -> Vec<u64> {
    log.received.iter().map(|b| b.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_buffer_is_renumbered_after_the_ingests_last_seq_and_nothing_is_acked_away() {
    // A replaced disk: the ingest already applied 500 batches of this
    // gateway; the new buffer holds three batches numbered 1..3 that the
    // ingest has never seen.
    let gateway = "gw-fresh";
    let (modbus, _meters) = start_modbus_server().await;
    let broker = start_broker().await;
    let mut ingest = start_fake_ingest(broker, gateway, Availability::AlwaysUp, 500).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer_path = dir.path().join("buffer.redb");
    let early: Vec<Batch> = (0..3)
        .map(|i| {
            let mut batch = Batch {
                gateway: gateway.into(),
                seq: 0,
                dropped_before: 0,
                samples: vec![facwatch_proto::wire::Sample {
                    meter: "good".into(),
                    time_ms: START_MS - 30_000 + i * POLL_INTERVAL_MS,
                    quality: Quality::Timeout,
                    values: Values::default(),
                }],
            };
            let buffer = Buffer::open(&buffer_path, BufferLimits::default()).unwrap();
            assert_eq!(
                buffer.append(&mut batch, START_MS).unwrap(),
                Some(i as u64 + 1)
            );
            batch
        })
        .collect();
    let site = site(gateway, modbus, POLL_INTERVAL_MS as u64 / 1000);
    let stats = Arc::new(Stats::default());

    let report = run_gateway(
        settings(&site, gateway, broker, &buffer_path, 2),
        stats.clone(),
    )
    .await;

    assert_eq!(
        report,
        Report {
            samples_produced: 3 + 4,
            acked_seq: 505
        }
    );
    let log = ingest
        .wait_for(|log| log.statuses.last() == Some(&LinkState::Offline))
        .await
        .unwrap()
        .clone();
    // Nothing went out under the old numbering (it would have been taken
    // for duplicates and acked away).
    assert!(
        log.received.iter().all(|b| b.seq > 500),
        "{:?}",
        seqs_received(&log)
    );
    assert!(log.gaps.is_empty(), "gaps: {:?}", log.gaps);
    let applied: Vec<u64> = log.applied.iter().map(|b| b.seq).collect();
    assert_eq!(applied, vec![501, 502, 503, 504, 505]);
    for (sent, kept) in log.applied.iter().zip(&early) {
        assert_eq!(sent.samples, kept.samples);
    }
    // The sync at 500 renumbered; only the five acks after it deleted.
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), 5);
    let meta = Buffer::open(&buffer_path, BufferLimits::default())
        .unwrap()
        .meta()
        .unwrap();
    assert_eq!(
        (meta.acked_seq, meta.next_seq, meta.batches, meta.synced),
        (505, 506, 0, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_wants_a_login_gets_the_gateways_credentials() {
    let gateway = "gw-login";
    let (modbus, _meters) = start_modbus_server().await;
    let broker = start_broker_with_logins(Some(HashMap::from([
        ("gw-01".to_string(), "gateway-secret".to_string()),
        ("ingest".to_string(), "ingest-secret".to_string()),
    ])))
    .await;
    let mut ingest = start_fake_ingest_with_login(
        broker,
        gateway,
        Availability::AlwaysUp,
        0,
        Some(("ingest", "ingest-secret")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let site = site(gateway, modbus, POLL_INTERVAL_MS as u64 / 1000);
    let mut settings = settings(&site, gateway, broker, &dir.path().join("b.redb"), 2);
    settings.mqtt.credentials = Some(MqttCredentials {
        username: "gw-01".into(),
        password: "gateway-secret".into(),
    });

    let report = run_gateway(settings, Arc::new(Stats::default())).await;

    assert_eq!(report.acked_seq, 2);
    let log = ingest
        .wait_for(|log| log.statuses.last() == Some(&LinkState::Offline))
        .await
        .unwrap()
        .clone();
    let applied: Vec<u64> = log.applied.iter().map(|b| b.seq).collect();
    assert_eq!(applied, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_file_of_garbage_is_moved_aside_and_the_gateway_keeps_going() {
    let gateway = "gw-garbage";
    let (modbus, _meters) = start_modbus_server().await;
    let broker = start_broker().await;
    let mut ingest = start_fake_ingest(broker, gateway, Availability::AlwaysUp, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer_path = dir.path().join("buffer.redb");
    let garbage = vec![0xA5u8; 64 * 1024];
    std::fs::write(&buffer_path, &garbage).unwrap();
    let site = site(gateway, modbus, POLL_INTERVAL_MS as u64 / 1000);
    let stats = Arc::new(Stats::default());

    let report = run_gateway(
        settings(&site, gateway, broker, &buffer_path, 2),
        stats.clone(),
    )
    .await;

    assert_eq!(stats.buffer_recoveries.load(Ordering::Relaxed), 1);
    assert_eq!(
        report,
        Report {
            samples_produced: 4,
            acked_seq: 2
        }
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("buffer.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), garbage);
    let log = ingest
        .wait_for(|log| log.statuses.last() == Some(&LinkState::Offline))
        .await
        .unwrap()
        .clone();
    let applied: Vec<u64> = log.applied.iter().map(|b| b.seq).collect();
    assert_eq!(applied, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_replayed_at_the_configured_pace_with_live_data_behind_it() {
    let gateway = "gw-paced";
    let (modbus, _meters) = start_modbus_server().await;
    let broker = start_broker().await;
    let mut ingest = start_fake_ingest(broker, gateway, Availability::AlwaysUp, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer_path = dir.path().join("buffer.redb");
    {
        let buffer = Buffer::open(&buffer_path, BufferLimits::default()).unwrap();
        for i in 0..20 {
            let mut batch = Batch {
                gateway: gateway.into(),
                seq: 0,
                dropped_before: 0,
                samples: vec![facwatch_proto::wire::Sample {
                    meter: "good".into(),
                    time_ms: START_MS - 3_600_000 + i * 60_000,
                    quality: Quality::Timeout,
                    values: Values::default(),
                }],
            };
            buffer.append(&mut batch, START_MS).unwrap();
        }
    }
    let site = site(gateway, modbus, POLL_INTERVAL_MS as u64 / 1000);
    let mut settings = settings(&site, gateway, broker, &buffer_path, 1);
    settings.replay = facwatch_gateway::ReplayPace {
        batches_per_sec: 10,
        bytes_per_sec: 0,
    };

    let report = run_gateway(settings, Arc::new(Stats::default())).await;

    assert_eq!(report.acked_seq, 21);
    let log = ingest
        .wait_for(|log| log.statuses.last() == Some(&LinkState::Offline))
        .await
        .unwrap()
        .clone();
    let applied: Vec<u64> = log.applied.iter().map(|b| b.seq).collect();
    assert_eq!(applied, (1..=21).collect::<Vec<_>>());
    // Twenty-one publishes at 10/s: the last goes 2 s after the first at
    // the earliest (unpaced they would all go within milliseconds).
    let first = log.received_at[0];
    let last = *log.received_at.last().unwrap();
    assert_eq!(log.received.len(), 21, "{:?}", seqs_received(&log));
    assert!(
        last - first >= Duration::from_millis(1_950),
        "{:?}",
        last - first
    );
}
