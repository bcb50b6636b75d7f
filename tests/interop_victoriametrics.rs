//! Interop with a real `/api/v2/write` server: VictoriaMetrics (Debian's
//! `victoria-metrics`, installed by .ci/run), on a free port with its own
//! data directory. The demo plant's day runs as processes (simulator,
//! gateway, ingest with its embedded broker) at 1440x; the ingest writes
//! readings and events to VictoriaMetrics, which is stopped for a simulated
//! 90 minutes (13:30-15:00, across the seed incident) and started again.
//! Read back through VictoriaMetrics' export API, the points are exactly
//! the samples the gateway produced (captured from the broker), each once,
//! and one `event` point per event change the ingest queued.

#![cfg(feature = "interop")]

mod fault;
mod interop;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality};
use fault::{
    at, at_ms, field_u64, start_gateway, start_ingest, wait_for_log, wall_now_ms, Broker,
    GatewayConfig, Plant, GATEWAY,
};
use interop::{free_port, http, Process, READY_TIMEOUT};
use serde_json::Value;

const TIME_SCALE: f64 = 1440.0;

/// One exported series: its labels and its points (timestamp ms, value).
type Series = (BTreeMap<String, String>, Vec<(i64, f64)>);

/// A VictoriaMetrics of its own: data directory in the test's temp dir, a
/// port kept across restarts.
struct VictoriaMetrics {
    address: SocketAddr,
    data: PathBuf,
    process: Option<Process>,
}

impl VictoriaMetrics {
    fn start(dir: &Path) -> VictoriaMetrics {
        let mut vm = VictoriaMetrics {
            address: ([127, 0, 0, 1], free_port()).into(),
            data: dir.join("victoria-metrics"),
            process: None,
        };
        vm.restart();
        vm
    }

    /// Starts the server (again) with its data; returns once `/health`
    /// answers.
    fn restart(&mut self) {
        assert!(self.process.is_none(), "victoria-metrics is running");
        let mut command = Command::new("victoria-metrics");
        command
            .arg(format!("-storageDataPath={}", self.data.display()))
            .arg(format!("-httpListenAddr={}", self.address))
            // Without it, points older than a month (the 2022 day) are
            // dropped silently.
            .arg("-retentionPeriod=100y");
        let mut process = Process::spawn("victoria-metrics", command);
        process.wait_for_tcp(self.address, READY_TIMEOUT);
        let deadline = Instant::now() + READY_TIMEOUT;
        while http(self.address, "GET", "/health", "text/plain", b"")
            .map(|(status, _)| status)
            .unwrap_or(0)
            != 200
        {
            assert!(Instant::now() < deadline, "victoria-metrics never healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(process);
    }

    /// SIGTERM: VictoriaMetrics finishes the requests in flight and flushes.
    fn stop(&mut self) {
        let mut process = self.process.take().expect("victoria-metrics is running");
        let status = process.terminate(READY_TIMEOUT);
        assert!(status.success(), "victoria-metrics exited with {status}");
    }

    /// Every series matching `selector`, from the export API: (labels,
    /// [(timestamp ms, value)]).
    fn export(&self, selector: &str) -> Vec<Series> {
        let (status, _) = http(
            self.address,
            "GET",
            "/internal/force_flush",
            "text/plain",
            b"",
        )
        .expect("force_flush");
        assert_eq!(status, 200);
        let form = format!(
            "match[]={}&start=2022-12-01T00:00:00Z",
            percent_encode(selector)
        );
        let (status, body) = http(
            self.address,
            "POST",
            "/api/v1/export",
            "application/x-www-form-urlencoded",
            form.as_bytes(),
        )
        .expect("export");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .map(|line| {
                let series: Value = serde_json::from_str(line).expect("a JSON line");
                let labels = series["metric"]
                    .as_object()
                    .expect("metric labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let points = series["timestamps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(series["values"].as_array().unwrap())
                    .map(|(t, v)| (t.as_i64().unwrap(), v.as_f64().unwrap()))
                    .collect();
                (labels, points)
            })
            .collect()
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether `read` is `written` to the 12 significant decimal digits
/// VictoriaMetrics keeps (InfluxDB keeps the full f64): a counter of
/// 3103.000732421875 kWh reads back as 3103.00073242.
fn same_to_12_digits(read: f64, written: f64) -> bool {
    (read - written).abs() <= written.abs() * 1e-11
}

/// Sleeps until the shared virtual clock (00:00 at `anchor`) reads `h:m`.
fn wait_until_virtual(anchor: i64, h: i64, m: i64) {
    let wall = anchor + ((at_ms(h, m) - at_ms(0, 0)) as f64 / TIME_SCALE) as i64;
    let left = wall - wall_now_ms();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(left as u64));
    }
}

/// Subscribes to the gateway's batch topic on the embedded broker before
/// the gateway starts, and collects every batch it publishes (resends
/// included) until the returned receiver is drained.
fn capture_batches(
    port: u16,
    key: facwatch_proto::seal::GatewayKey,
) -> std::sync::mpsc::Receiver<Batch> {
    use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
    let mut options = MqttOptions::new("batch-capture", "127.0.0.1", port);
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = Client::new(options, 64);
    client
        .subscribe(topics::batch(GATEWAY), QoS::AtLeastOnce)
        .expect("queue the subscription");
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _client = client;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    let batch = Batch::decode(open_batch(&key, &publish.payload))
                        .expect("the gateway's batches decode");
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    subscribed
        .recv_timeout(READY_TIMEOUT)
        .expect("subscribed to the batch topic");
    rx
}

/// A counter or gauge from the ingest's `/metrics`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("`{name}` missing from /metrics:\n{text}"))
}

#[test]
fn a_day_of_readings_and_events_reaches_victoriametrics_exactly_once_across_its_restart() {
    let plant = Plant::new();
    let mut vm = VictoriaMetrics::start(plant.dir.path());
    let site = Site::from_toml(
        &std::fs::read_to_string(&plant.site_file).unwrap(),
        "stenter-plant.site.toml",
    )
    .unwrap();

    let broker = Broker::Embedded { port: free_port() };
    let Broker::Embedded { port: broker_port } = broker else {
        unreachable!()
    };
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let store = plant.path("ingest.redb");
    let extra = format!(
        "\n[http]\nlisten = \"{api}\"\n\n[influxdb]\nurl = \"http://{}\"\norg = \"facwatch\"\nbucket = \"facwatch\"\nprecision = \"ms\"\nbackoff_initial_ms = 100\nbackoff_max_ms = 500\n",
        vm.address
    );
    let config = plant.ingest_config_with("vm", &store, &broker, &extra);
    let mut ingest = start_ingest(&config, &broker);
    let captured = capture_batches(broker_port, plant.key());

    let anchor = wall_now_ms();
    let _sim = plant.simulator(anchor, TIME_SCALE);
    let gateway_config = plant.gateway_config(
        "vm",
        &GatewayConfig {
            mqtt_port: broker_port,
            credentials: None,
            buffer: plant.path("gw.buffer.redb"),
            buffer_extra: String::new(),
            forward_extra: String::new(),
            time_scale: TIME_SCALE,
            until: at(24, 0),
        },
    );
    let mut gateway = start_gateway(&gateway_config, anchor);

    wait_until_virtual(anchor, 13, 30);
    vm.stop();
    wait_until_virtual(anchor, 15, 0);
    vm.restart();

    let status = gateway.wait_for_exit(Duration::from_secs(180));
    assert!(status.success(), "gateway: {status}\n{}", gateway.stderr());
    let stopped = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    let produced = field_u64(&stopped, "samples_produced");

    // Every batch the gateway sent, once per seq (a resend is the same
    // batch).
    let mut batches: BTreeMap<u64, Batch> = BTreeMap::new();
    while let Ok(batch) = captured.try_recv() {
        if let Some(before) = batches.get(&batch.seq) {
            assert_eq!(before, &batch, "seq {} sent twice differently", batch.seq);
        }
        batches.insert(batch.seq, batch);
    }
    let samples: Vec<_> = batches.values().flat_map(|b| b.samples.iter()).collect();
    assert_eq!(samples.len() as u64, produced, "every sample was captured");

    // The ingest has written its whole outbox.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (status, text) = http(api, "GET", "/metrics", "text/plain", b"").expect("/metrics");
        assert_eq!(status, 200);
        let queued = metric(&text, "facwatch_ingest_influx_lines_queued_total");
        if metric(&text, "facwatch_ingest_samples_applied_total") == produced
            && metric(&text, "facwatch_ingest_influx_outbox_lines") == 0
            && queued > produced
        {
            break text;
        }
        assert!(Instant::now() < deadline, "outbox never drained:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let queued = metric(&metrics, "facwatch_ingest_influx_lines_queued_total");
    let written = metric(&metrics, "facwatch_ingest_influx_lines_written_total");
    let errors = metric(&metrics, "facwatch_ingest_influx_write_errors_total");
    assert_eq!(written, queued, "nothing refused");
    assert!(
        errors > 0,
        "the writes failed while VictoriaMetrics was down"
    );
    let status = ingest.terminate(Duration::from_secs(20));
    assert!(status.success(), "ingest: {status}");

    // Readings: for every field series, exactly the gateway's samples.
    let meters: BTreeMap<&str, (&str, &str)> = site
        .lines
        .iter()
        .flat_map(|l| {
            l.facilities
                .iter()
                .map(move |f| (f.meter.as_str(), (l.id.as_str(), f.id.as_str())))
        })
        .collect();
    let mut expected: BTreeMap<(String, String, String), Vec<(i64, f64)>> = BTreeMap::new();
    for sample in &samples {
        let quality = match sample.quality {
            Quality::Exception(_) => "exception",
            q => q.as_str(),
        };
        let key = |field: &str| {
            (
                format!("reading_{field}"),
                sample.meter.clone(),
                quality.to_string(),
            )
        };
        let ok = if sample.quality == Quality::Ok {
            1.0
        } else {
            0.0
        };
        expected
            .entry(key("ok"))
            .or_default()
            .push((sample.time_ms, ok));
        if let Some(kw) = sample.values.power_kw {
            expected
                .entry(key("power_kw"))
                .or_default()
                // Written as the f32's shortest decimal (0.85, not
                // 0.8500000238418579): read that back.
                .push((sample.time_ms, kw.to_string().parse().unwrap()));
        }
        if let Some(kwh) = sample.values.energy_kwh {
            expected
                .entry(key("energy_kwh"))
                .or_default()
                .push((sample.time_ms, kwh));
        }
    }
    let mut found: BTreeMap<(String, String, String), Vec<(i64, f64)>> = BTreeMap::new();
    for (labels, points) in vm.export(r#"{__name__=~"reading_(ok|power_kw|energy_kwh)"}"#) {
        let meter = &labels["meter"];
        let (line, facility) = meters[meter.as_str()];
        assert_eq!(
            (
                labels["site"].as_str(),
                labels["gateway"].as_str(),
                labels["line"].as_str(),
                labels["facility"].as_str()
            ),
            (site.id.as_str(), GATEWAY, line, facility)
        );
        let key = (
            labels["__name__"].clone(),
            meter.clone(),
            labels["quality"].clone(),
        );
        assert!(found.insert(key, points).is_none());
    }
    for points in expected.values_mut() {
        points.sort_by_key(|(t, _)| *t);
    }
    assert_eq!(found.len(), expected.len());
    for (key, want) in &expected {
        let got = found
            .get(key)
            .unwrap_or_else(|| panic!("no series {key:?}"));
        let first_difference = want
            .iter()
            .zip(got)
            .position(|(w, g)| w.0 != g.0 || !same_to_12_digits(g.1, w.1));
        assert!(
            got.len() == want.len() && first_difference.is_none(),
            "series {key:?}: {} points read back, {} produced; first difference at {first_difference:?}: read {:?}, produced {:?}",
            got.len(),
            want.len(),
            first_difference.map(|i| got[i]),
            first_difference.map(|i| want[i]),
        );
    }
    let points: usize = found.values().map(Vec::len).sum();

    // Events: one point per event change queued, at each event's start.
    let store = facwatch_ingest::Store::open(&store).unwrap();
    let events = store.events().unwrap();
    let event_series = vm.export(r#"{__name__="event_open"}"#);
    let event_points: usize = event_series.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(event_points as u64, queued - produced);
    let starts: BTreeSet<(String, String, i64)> = event_series
        .iter()
        .flat_map(|(labels, points)| {
            points
                .iter()
                .map(|(t, _)| (labels["line"].clone(), labels["rule"].clone(), *t))
        })
        .collect();
    let stored: BTreeSet<(String, String, i64)> = events
        .iter()
        .map(|e| (e.line.clone(), e.rule.as_str().to_string(), e.start_ms))
        .collect();
    assert_eq!(starts, stored);
    println!(
        "{} samples produced; {} reading points and {} event points in VictoriaMetrics for {} events; {} write errors while it was down",
        produced,
        points,
        event_points,
        events.len(),
        errors
    );
}

/// The batch inside a payload the gateway sealed with `key`.
fn open_batch<'a>(key: &facwatch_proto::seal::GatewayKey, payload: &'a [u8]) -> &'a [u8] {
    use facwatch_proto::seal::{open, Purpose};
    open(key, Purpose::Batch, payload).expect("the gateway's batches are sealed with its key")
}
