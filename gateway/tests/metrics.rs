//! The gateway's metrics endpoint from outside: a real `run` with
//! `[metrics]` on 127.0.0.1:0, asked over a plain TCP socket in HTTP/1.1.
//! The broker is unreachable on purpose: batches stay in the buffer, so
//! every counter has a value known in advance. The meters fail in every
//! way a poll can (one each): no answer, a Modbus exception, an answer that
//! does not decode, and a device server nobody listens on.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{image, words, FakeServer, Framing, Reply};
use facwatch_gateway::{GatewayError, MetricsError, MqttSettings, Settings, Stats};
use facwatch_proto::clock::{wall_now_ms, Clock};
use facwatch_proto::profile::{ProfileName, Ratios};
use facwatch_proto::seal::GatewayKey;
use facwatch_proto::site::Site;
use facwatch_proto::wire::Values;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const GOOD_UNIT: u8 = 1;
const SILENT_UNIT: u8 = 2;
const REFUSING_UNIT: u8 = 3;
const GARBLED_UNIT: u8 = 4;
/// 2022-12-13T00:00:00+08:00, a multiple of the poll and batch intervals.
const START_MS: i64 = 1_670_860_800_000;
const POLL_INTERVAL_MS: i64 = 10_000;
/// One poll interval is one wall second.
const TIME_SCALE: f64 = 10.0;
const SLOTS: i64 = 4;
const LABELS: &str = "site=\"metrics-site\",gateway=\"gw-metrics\"";

/// `modbus` serves the meters `good`, `silent`, `refusing` and `garbled`;
/// nothing listens at `absent`.
fn site(modbus: SocketAddr, absent: SocketAddr) -> Site {
    let text = format!(
        r#"
[site]
id = "metrics-site"

[[gateways]]
id = "gw-metrics"
poll_interval_secs = {poll}
modbus_timeout_ms = 200
batch_interval_secs = {batch}

[[meters]]
id = "good"
gateway = "gw-metrics"
profile = "sdm630"
tcp = "{modbus}"
unit = {GOOD_UNIT}

[[meters]]
id = "silent"
gateway = "gw-metrics"
profile = "sdm630"
tcp = "{modbus}"
unit = {SILENT_UNIT}

[[meters]]
id = "refusing"
gateway = "gw-metrics"
profile = "sdm630"
tcp = "{modbus}"
unit = {REFUSING_UNIT}

[[meters]]
id = "garbled"
gateway = "gw-metrics"
profile = "sdm630"
tcp = "{modbus}"
unit = {GARBLED_UNIT}

[[meters]]
id = "absent"
gateway = "gw-metrics"
profile = "sdm630"
tcp = "{absent}"
unit = 1

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
        batch = 2 * POLL_INTERVAL_MS / 1000,
    );
    Site::from_toml(&text, "metrics.site.toml").unwrap()
}

/// A Modbus TCP server whose unit 1 is an SDM630, unit 3 answers every
/// request with exception 2 (illegal data address), unit 4 with one
/// register whatever was asked, and whose other units never answer.
async fn start_meters() -> FakeServer {
    let values = Values {
        power_kw: Some(17.5),
        energy_kwh: Some(1234.5),
        voltage_v: vec![230.0, 231.0, 229.5],
        current_a: vec![25.0, 25.5, 24.75],
        power_factor: Some(0.86),
    };
    let registers = image(ProfileName::Sdm630, &values, Ratios::default());
    FakeServer::start(
        Framing::Tcp,
        Arc::new(move |request| match request.unit {
            GOOD_UNIT => Reply::Words(words(&registers, request)),
            REFUSING_UNIT => Reply::Exception(2),
            GARBLED_UNIT => Reply::Words(vec![0]),
            _ => Reply::Silent,
        }),
    )
    .await
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings whose clock reaches `START_MS` one wall second from now and
/// which poll `SLOTS` slots, with the broker unreachable.
fn settings(modbus: SocketAddr, buffer: &std::path::Path, metrics: SocketAddr) -> Settings {
    let clock = Clock::simulated(START_MS, wall_now_ms() + 1000, TIME_SCALE);
    let mqtt = MqttSettings::new("127.0.0.1", closed_port(), "gw-metrics");
    let absent = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let mut settings = Settings::new(
        &site(modbus, absent),
        "gw-metrics",
        mqtt,
        GatewayKey::from_bytes([9; 32]),
        buffer,
        clock,
    )
    .unwrap();
    settings.poll_until_ms = Some(START_MS + SLOTS * POLL_INTERVAL_MS);
    settings.metrics_listen = Some(metrics);
    settings
}

/// `GET path` over a fresh connection: (status line, body).
async fn get(address: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    let status = head.lines().next().unwrap().to_string();
    if path == "/metrics" {
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
    }
    (status, body.to_string())
}

/// Checks `done` every 10 ms until it holds.
async fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The meters of the site, in site-file order.
const METERS: [&str; 5] = ["good", "silent", "refusing", "garbled", "absent"];

/// The kinds of `facwatch_gateway_poll_errors_total`, in rendering order.
const KINDS: [&str; 5] = [
    "timeout",
    "exception",
    "decode",
    "unreachable",
    "backed_off",
];

/// The series of `meter`'s poll errors of `kind`.
fn error_series(meter: &str, kind: &str) -> String {
    format!("facwatch_gateway_poll_errors_total{{{LABELS},meter=\"{meter}\",kind=\"{kind}\"}}")
}

/// The value of the series `name{labels}` in an exposition text.
fn value_of<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_runs_counters_and_stop_with_the_gateway() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let meters = start_meters().await;
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let gateway = tokio::spawn(facwatch_gateway::run(
            settings(
                meters.address,
                &dir.path().join("buffer.redb"),
                "127.0.0.1:0".parse().unwrap(),
            ),
            Arc::clone(&stats),
            shutdown.clone(),
        ));

        wait_until(|| stats.metrics_address.get().is_some()).await;
        let address = *stats.metrics_address.get().unwrap();
        assert_eq!(address.ip().to_string(), "127.0.0.1");
        assert_ne!(address.port(), 0);

        // Bound before the first poll: the endpoint answers at once, with
        // nothing counted yet, and every meter's error series already there.
        let (status, body) = get(address, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            value_of(
                &body,
                &format!("facwatch_gateway_polls_total{{{LABELS},result=\"ok\"}}")
            ),
            Some("0")
        );
        for meter in METERS {
            for kind in KINDS {
                assert_eq!(
                    value_of(&body, &error_series(meter, kind)),
                    Some("0"),
                    "{meter} {kind} in:\n{body}"
                );
            }
        }
        assert_eq!(
            get(address, "/healthz").await,
            ("HTTP/1.1 200 OK".into(), "ok".into())
        );

        // Polling ends after SLOTS slots; the batcher then closes its last
        // batch. Nothing is sent: the broker is unreachable.
        wait_until(|| stats.batches_appended.load(Ordering::Relaxed) == 2).await;
        let (_, body) = get(address, "/metrics").await;

        let polls = stats.polls();
        assert_eq!(polls.total(), 5 * SLOTS as u64, "five meters, every slot");
        // A meter that fails without a usable answer (silent, refusing,
        // absent) is asked in slot 0, skipped in slot 1 (backoff 1), asked
        // in slot 2, skipped in slot 3 (backoff 2, cut by the end). An
        // answer that does not decode ends no backoff: asked every slot.
        let by_meter = stats.polls_by_meter();
        let expected: [(&str, [u64; 6]); 5] = [
            // ok, timeout, exception, decode, unreachable, backed_off
            ("good", [4, 0, 0, 0, 0, 0]),
            ("silent", [0, 2, 0, 0, 0, 2]),
            ("refusing", [0, 0, 2, 0, 0, 2]),
            ("garbled", [0, 0, 0, 4, 0, 0]),
            ("absent", [0, 0, 0, 0, 2, 2]),
        ];
        let got: Vec<(&str, [u64; 6])> = by_meter
            .iter()
            .map(|(meter, c)| {
                (
                    meter.as_str(),
                    [
                        c.ok,
                        c.timeout,
                        c.exception,
                        c.decode,
                        c.unreachable,
                        c.backed_off,
                    ],
                )
            })
            .collect();
        assert_eq!(got, expected, "site-file order, exact counts");
        assert_eq!((polls.ok, polls.failed(), polls.skipped()), (4, 10, 6));
        let bytes = stats.buffer_bytes.load(Ordering::Relaxed);
        assert!(bytes > 0);
        let mut expected_lines = Vec::new();
        for (meter, counts) in expected {
            for (kind, value) in KINDS.iter().zip(&counts[1..]) {
                expected_lines.push(format!("{} {value}", error_series(meter, kind)));
            }
        }
        // The families partition the same slots: the errors of every kind
        // but backed_off add up to `failed`, backed_off to `skipped`.
        let sum_of = |kinds: &[&str]| -> u64 {
            METERS
                .iter()
                .flat_map(|meter| kinds.iter().map(move |kind| error_series(meter, kind)))
                .map(|series| value_of(&body, &series).unwrap().parse::<u64>().unwrap())
                .sum()
        };
        assert_eq!(sum_of(&KINDS[..4]), 10);
        assert_eq!(sum_of(&KINDS[4..]), 6);
        for line in expected_lines.into_iter().chain([
            format!("facwatch_gateway_polls_total{{{LABELS},result=\"ok\"}} 4"),
            format!("facwatch_gateway_polls_total{{{LABELS},result=\"failed\"}} 10"),
            format!("facwatch_gateway_polls_total{{{LABELS},result=\"skipped\"}} 6"),
            format!("facwatch_gateway_batches_appended_total{{{LABELS}}} 2"),
            format!("facwatch_gateway_batches_sent_total{{{LABELS}}} 0"),
            format!("facwatch_gateway_batches_resent_total{{{LABELS}}} 0"),
            format!("facwatch_gateway_batches_acked_total{{{LABELS}}} 0"),
            format!("facwatch_gateway_samples_dropped_total{{{LABELS}}} 0"),
            format!("facwatch_gateway_buffer_recoveries_total{{{LABELS}}} 0"),
            format!("facwatch_gateway_buffer_batches{{{LABELS}}} 2"),
            format!("facwatch_gateway_buffer_bytes{{{LABELS}}} {bytes}"),
            format!("facwatch_gateway_acked_seq{{{LABELS}}} 0"),
            "# TYPE facwatch_gateway_polls_total counter".to_string(),
            "# TYPE facwatch_gateway_poll_errors_total counter".to_string(),
            "# TYPE facwatch_gateway_batches_acked_total counter".to_string(),
            "# TYPE facwatch_gateway_buffer_batches gauge".to_string(),
        ]) {
            assert!(
                body.lines().any(|l| l == line),
                "missing `{line}` in:\n{body}"
            );
        }
        // The oldest unacked sample is slot 0's; the virtual clock is past
        // the last slot (40 s) and, on any machine, well short of an hour.
        let age: f64 = value_of(
            &body,
            &format!("facwatch_gateway_oldest_unacked_sample_age_seconds{{{LABELS}}}"),
        )
        .unwrap()
        .parse()
        .unwrap();
        assert!((30.0..3600.0).contains(&age), "age {age}");

        shutdown.cancel();
        let report = gateway.await.unwrap().unwrap();
        assert_eq!(report.acked_seq, 0);
        let refused = tokio::net::TcpStream::connect(address).await;
        assert!(refused.is_err(), "metrics still served after shutdown");
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn a_taken_metrics_port_stops_the_gateway_before_it_polls() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let meters = start_meters().await;
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let stats = Arc::new(Stats::default());

        let error = facwatch_gateway::run(
            settings(meters.address, &dir.path().join("buffer.redb"), address),
            Arc::clone(&stats),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();

        assert!(
            matches!(&error, GatewayError::Metrics(MetricsError::Bind { address: a, .. }) if *a == address),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen for metrics on {address}: ")),
            "{error}"
        );
        assert!(meters.log().is_empty(), "polled before failing");
        assert_eq!(stats.metrics_address.get(), None);
    })
    .await
    .expect("test finished in time");
}
