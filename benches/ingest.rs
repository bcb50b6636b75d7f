//! Benchmark: the ingest's throughput from the broker to committed events
//! and InfluxDB outbox, next to `mosquitto_sub` alone draining the same
//! stream from the same broker.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench --bench ingest
//! cargo bench --bench ingest -- --runs 5 --samples 1000000 --batch-samples 600
//! ```
//!
//! One Mosquitto (login, persistence on, unlimited queues) holds two
//! persistent sessions subscribed at QoS 1 to the gateway's batch topic:
//! the release `facwatch-ingest`'s (external broker mode, `[influxdb]`
//! configured) and a `mosquitto_sub -c`'s. Both are offline while a
//! publisher puts the stream on the topic: the demo plant (10 meters)
//! polled every second, cut into batches of `--batch-samples` samples, as a
//! gateway would send them, so the broker queues the same messages for
//! both. Then each drains its queue in turn (the order alternates run by
//! run, so machine noise hits both alike):
//!
//! - `mosquitto_sub -C <batches>`: from its start to its exit after the
//!   last message (payloads to /dev/null);
//! - the ingest, on a fresh store: from its start until its `/metrics`
//!   shows every sample applied, so every batch's detector state, events
//!   and InfluxDB lines committed. Its InfluxDB URL points at a closed
//!   port: the writer's failing requests back off (up to a minute), so the
//!   figure is the ingest's work up to its outbox, as the issue asks, not
//!   a server's write speed.
//!
//! Reports the medians of both rates and their ratio.

#[path = "../tests/fault/mod.rs"]
mod fault;
#[path = "../tests/interop/mod.rs"]
mod interop;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use facwatch_proto::seal::{GatewayKey, Purpose};
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample};
use facwatch_sim::plant::Plant as PlantModel;
use fault::{at_ms, start_ingest, Broker, Mosquitto, Plant, GATEWAY};
use interop::{free_port, http, Process};

const POLL_MS: i64 = 1_000;
const USER: &str = "facwatch";
const PASSWORD: &str = "bench-pass";
const SUB_CLIENT: &str = "bench-mosquitto-sub";
const LIMIT: Duration = Duration::from_secs(600);

struct Options {
    runs: usize,
    samples: u64,
    batch_samples: usize,
    /// Without `[influxdb]` (for comparison).
    no_influx: bool,
}

fn options() -> Options {
    let mut options = Options {
        runs: 3,
        samples: 1_000_000,
        batch_samples: 600,
        no_influx: false,
    };
    let mut args = std::env::args().skip(1);
    let number = |v: Option<String>, flag: &str| -> u64 {
        v.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} N"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => options.runs = number(args.next(), "--runs") as usize,
            "--samples" => options.samples = number(args.next(), "--samples"),
            "--batch-samples" => {
                options.batch_samples = number(args.next(), "--batch-samples") as usize
            }
            "--no-influx" => options.no_influx = true,
            // cargo bench passes --bench.
            _ => {}
        }
    }
    options
}

/// The stream: batches sealed with `key` as the gateway sends them, seq
/// 1, 2, ...
fn stream(samples: u64, batch_samples: usize, key: &GatewayKey) -> Vec<Vec<u8>> {
    let seal = |batch: &Batch| facwatch_proto::seal::seal(key, Purpose::Batch, &batch.encode());
    let scenario = facwatch::builtin_scenario().expect("the built-in scenario");
    let model = PlantModel::new(&scenario);
    let meters: Vec<String> = scenario.site.meters.iter().map(|m| m.id.clone()).collect();
    let mut batches = Vec::new();
    let mut batch = Batch {
        gateway: GATEWAY.to_string(),
        seq: 1,
        dropped_before: 0,
        samples: Vec::with_capacity(batch_samples),
    };
    let mut time = at_ms(0, 0);
    let mut written = 0;
    while written < samples {
        for meter in &meters {
            if written == samples {
                break;
            }
            batch.samples.push(Sample {
                meter: meter.clone(),
                time_ms: time,
                quality: Quality::Ok,
                values: model.values(meter, time).expect("a meter of the site"),
            });
            written += 1;
            if batch.samples.len() == batch_samples {
                batches.push(seal(&batch));
                batch.seq += 1;
                batch.samples.clear();
            }
        }
        time += POLL_MS;
    }
    if !batch.samples.is_empty() {
        batches.push(seal(&batch));
    }
    batches
}

/// Publishes `batches` at QoS 1 and returns once the broker acked them all
/// (so they are queued for every offline session).
fn publish(port: u16, batches: &[Vec<u8>]) {
    use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new("bench-publisher", "127.0.0.1", port);
    options.set_credentials(USER, PASSWORD);
    options.set_max_packet_size(4 << 20, 4 << 20);
    options.set_inflight(100);
    let (client, mut connection) = Client::new(options, 256);
    let topic = topics::batch(GATEWAY);
    let batches = batches.to_vec();
    let total = batches.len();
    let publisher = std::thread::spawn(move || {
        for payload in batches {
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .expect("queue a publish");
        }
        client
    });
    let mut acked = 0;
    let started = Instant::now();
    for event in connection.iter() {
        match event.expect("the publisher's connection") {
            Event::Incoming(Packet::PubAck(_)) => {
                acked += 1;
                if acked == total {
                    break;
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => break,
            _ => {}
        }
        assert!(started.elapsed() < LIMIT, "publishing took too long");
    }
    let client = publisher.join().expect("publisher thread");
    let _ = client.disconnect();
}

fn mosquitto_sub(port: u16, count: usize) -> Command {
    let mut command = Command::new("mosquitto_sub");
    command.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-u",
        USER,
        "-P",
        PASSWORD,
        "-c",
        "-i",
        SUB_CLIENT,
        "-q",
        "1",
        "-t",
        &topics::batch(GATEWAY),
        "-C",
        &count.to_string(),
    ]);
    command
}

/// `mosquitto_sub` draining its queue of `count` messages: seconds.
fn drain_with_mosquitto_sub(port: u16, count: usize) -> f64 {
    let started = Instant::now();
    let out = mosquitto_sub(port, count)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running mosquitto_sub (apt-get install mosquitto-clients)");
    let seconds = started.elapsed().as_secs_f64();
    assert!(out.success(), "mosquitto_sub: {out}");
    seconds
}

/// A counter from the ingest's `/metrics`, `None` while it does not answer.
fn metric(api: SocketAddr, name: &str) -> Option<u64> {
    let (status, text) = http(api, "GET", "/metrics", "text/plain", b"").ok()?;
    (status == 200).then_some(())?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

struct IngestRun {
    seconds: f64,
    lines_queued: u64,
    /// Store transactions: how many batches shared one.
    groups: u64,
}

/// The ingest draining its session's queue into a fresh store.
fn drain_with_ingest(
    plant: &Plant,
    port: u16,
    run: usize,
    samples: u64,
    influx: bool,
) -> IngestRun {
    let (ingest, api) = ingest(plant, port, &format!("run-{run}"), influx);
    let mut ingest = ingest;
    let started = Instant::now();
    let mut reported = false;
    loop {
        if metric(api, "facwatch_ingest_samples_applied_total") == Some(samples) {
            break;
        }
        if !reported && started.elapsed() > Duration::from_secs(10) {
            reported = true;
            let (_, text) = http(api, "GET", "/metrics", "text/plain", b"").expect("/metrics");
            let counters: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
                .collect();
            eprintln!("stalled after 10 s: {counters:#?}\n{}", ingest.stderr());
        }
        assert!(
            started.elapsed() < LIMIT,
            "the ingest did not apply every sample:\n{}",
            ingest.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    let lines_queued = metric(api, "facwatch_ingest_influx_lines_queued_total").unwrap_or(0);
    let groups = metric(api, "facwatch_ingest_groups_committed_total").expect("groups committed");
    let status = ingest.terminate(Duration::from_secs(30));
    assert!(status.success(), "ingest: {status}");
    IngestRun {
        seconds,
        lines_queued,
        groups,
    }
}

/// Starts the ingest (persistent session `facwatch-ingest-bench`) on a
/// store named `store`; returns it and its HTTP API address.
fn ingest(plant: &Plant, port: u16, store: &str, influx: bool) -> (Process, SocketAddr) {
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut extra = format!("\n[http]\nlisten = \"{api}\"\n");
    if influx {
        extra.push_str(&format!(
            "\n[influxdb]\nurl = \"http://127.0.0.1:{}\"\norg = \"facwatch\"\nbucket = \"facwatch\"\nmax_outbox_bytes = 8589934592\n",
            free_port()
        ));
    }
    let broker = Broker::External {
        port,
        credentials: Some((USER.into(), PASSWORD.into())),
    };
    let config = plant.ingest_config_with(
        "bench",
        &plant.path(&format!("{store}.ingest.redb")),
        &broker,
        &extra,
    );
    (start_ingest(&config, &broker), api)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let options = options();
    let plant = Plant::new();
    let batches = stream(options.samples, options.batch_samples, &plant.key());
    let bytes: usize = batches.iter().map(Vec::len).sum();
    println!(
        "stream: {} samples in {} batches of {} samples, {bytes} bytes",
        options.samples,
        batches.len(),
        options.batch_samples
    );
    // Unlimited queues for offline persistent sessions (the default keeps
    // 1000 messages).
    let mut mosquitto = Mosquitto::start_with(
        plant.dir.path(),
        USER,
        PASSWORD,
        "max_queued_messages 0\nmax_queued_bytes 0\n",
    );
    let port = mosquitto.port;

    // Both sessions exist (and are offline) before the first publish.
    let (mut ingest, api) = ingest(&plant, port, "setup", false);
    let started = Instant::now();
    while http(api, "GET", "/readyz", "text/plain", b"")
        .map(|(s, _)| s)
        .ok()
        != Some(200)
    {
        assert!(started.elapsed() < LIMIT, "the ingest never subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ingest.terminate(Duration::from_secs(30)).success());
    let setup = mosquitto_sub(port, 1)
        .args(["-W", "1"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running mosquitto_sub");
    // Exits 27 on its timeout: nothing was queued yet.
    assert!(setup.code() == Some(27) || setup.success(), "{setup}");

    let mut sub_seconds = Vec::new();
    let mut ingest_seconds = Vec::new();
    for run in 0..options.runs {
        publish(port, &batches);
        let (sub, ingest) = if run % 2 == 0 {
            let sub = drain_with_mosquitto_sub(port, batches.len());
            let ingest = drain_with_ingest(&plant, port, run, options.samples, !options.no_influx);
            (sub, ingest)
        } else {
            let ingest = drain_with_ingest(&plant, port, run, options.samples, !options.no_influx);
            (drain_with_mosquitto_sub(port, batches.len()), ingest)
        };
        assert!(
            options.no_influx || ingest.lines_queued >= options.samples,
            "every sample queued for InfluxDB ({} lines)",
            ingest.lines_queued
        );
        println!(
            "run {run}: mosquitto_sub {sub:.3} s = {:.0} samples/s; ingest {:.3} s = {:.0} samples/s ({} InfluxDB lines queued, {} batches a transaction); ratio {:.2}",
            options.samples as f64 / sub,
            ingest.seconds,
            options.samples as f64 / ingest.seconds,
            ingest.lines_queued,
            batches.len() as u64 / ingest.groups.max(1),
            sub / ingest.seconds
        );
        sub_seconds.push(sub);
        ingest_seconds.push(ingest.seconds);
    }
    mosquitto.stop();
    let sub = median(sub_seconds);
    let ingest = median(ingest_seconds);
    println!(
        "\nmedians over {} runs of {} samples in batches of {}:",
        options.runs, options.samples, options.batch_samples
    );
    println!("| drained by | seconds | samples/s |");
    println!("|---|---:|---:|");
    println!(
        "| mosquitto_sub | {sub:.3} | {:.0} |",
        options.samples as f64 / sub
    );
    println!(
        "| facwatch-ingest (committed, InfluxDB outbox) | {ingest:.3} | {:.0} |",
        options.samples as f64 / ingest
    );
    println!("ingest / mosquitto_sub: {:.0} %", 100.0 * sub / ingest);
}
