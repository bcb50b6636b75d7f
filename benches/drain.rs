//! Benchmark: drain a backlog of 1,000,000 samples from the gateway's
//! buffer through an MQTT broker into the ingest, with acks, as separate
//! processes of the release binaries: once through the ingest's embedded
//! broker, once through a Mosquitto of its own. Reports, per broker, the
//! median over the runs of the drain rate (samples/s from the gateway's
//! start to its exit, which waits for the last ack), the gateway's peak
//! RSS while the whole backlog is buffered, and the buffer's disk bytes per
//! sample.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench --bench drain
//! cargo bench --bench drain -- --runs 5 --samples 200000 --window 64
//! ```
//!
//! The backlog is the demo plant (10 meters) polled every second for
//! 27.8 hours, cut into one-minute batches of 600 samples, written straight
//! into a gateway buffer file through the gateway's own `Buffer` (so it is
//! exactly what a gateway that lost its uplink for a day holds). Each run
//! drains a fresh copy into a fresh ingest store.

#[path = "../tests/fault/mod.rs"]
mod fault;
#[path = "../tests/interop/mod.rs"]
mod interop;

use std::path::Path;
use std::time::{Duration, Instant};

use facwatch_gateway::{Buffer, BufferLimits};
use facwatch_proto::wire::{Batch, Quality, Sample};
use facwatch_sim::plant::Plant as PlantModel;
use fault::{
    at, at_ms, start_ingest, start_replay_only_gateway, Broker, GatewayConfig, Plant,
    REPLAY_ONLY_UNTIL,
};
use interop::{free_port, Process};

const POLL_MS: i64 = 1_000;
const BATCH_MS: i64 = 60_000;
const USER: &str = "facwatch";
const PASSWORD: &str = "bench-pass";

struct Options {
    runs: usize,
    samples: u64,
    /// `[forward] window_batches`; `None`: the gateway's default.
    window: Option<u32>,
}

fn options() -> Options {
    let mut options = Options {
        runs: 3,
        samples: 1_000_000,
        window: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => options.runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--samples" => {
                options.samples = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--samples N")
            }
            "--window" => options.window = args.next().and_then(|v| v.parse().ok()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    options
}

/// What the backlog holds.
struct Backlog {
    samples: u64,
    batches: u64,
    /// The batches' encoded (wire) bytes.
    encoded_bytes: u64,
    /// The redb file's size.
    file_bytes: u64,
}

fn write_backlog(path: &Path, samples: u64) -> Backlog {
    let scenario = facwatch::builtin_scenario().expect("the built-in scenario");
    let model = PlantModel::new(&scenario);
    let meters: Vec<String> = scenario.site.meters.iter().map(|m| m.id.clone()).collect();
    let buffer = Buffer::open(path, BufferLimits::default()).expect("opening the backlog buffer");
    let mut time = at_ms(0, 0);
    let mut written = 0u64;
    let mut batches = 0u64;
    while written < samples {
        let mut batch = Batch {
            gateway: fault::GATEWAY.to_string(),
            seq: 0,
            dropped_before: 0,
            samples: Vec::new(),
        };
        let batch_end = time + BATCH_MS;
        while time < batch_end && written < samples {
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
            }
            time += POLL_MS;
        }
        buffer
            .append(&mut batch, time)
            .expect("appending to the backlog")
            .expect("the backlog fits the default limits");
        batches += 1;
    }
    let meta = buffer.meta().expect("buffer meta");
    assert_eq!(meta.samples_produced, samples);
    drop(buffer);
    Backlog {
        samples,
        batches,
        encoded_bytes: meta.bytes,
        file_bytes: std::fs::metadata(path).expect("backlog file").len(),
    }
}

/// Highest resident set size seen while sampling `/proc/PID/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

struct Run {
    seconds: f64,
    peak_rss_kib: u64,
}

fn drain_once(
    plant: &Plant,
    backlog: &Path,
    run: usize,
    mosquitto: Option<u16>,
    window: Option<u32>,
) -> Run {
    let name = format!("{}-{run}", if mosquitto.is_some() { "mosq" } else { "emb" });
    let buffer = plant.path(&format!("{name}.buffer.redb"));
    std::fs::copy(backlog, &buffer).expect("copying the backlog");
    let (broker, port) = match mosquitto {
        Some(port) => (
            Broker::External {
                port,
                credentials: Some((USER.into(), PASSWORD.into())),
            },
            port,
        ),
        None => {
            let port = free_port();
            (Broker::Embedded { port }, port)
        }
    };
    let store = plant.path(&format!("{name}.ingest.redb"));
    let mut ingest = start_ingest(&plant.ingest_config(&name, &store, &broker), &broker);
    let config = plant.gateway_config(
        &name,
        &GatewayConfig {
            mqtt_port: port,
            credentials: mosquitto.map(|_| (USER.into(), PASSWORD.into())),
            buffer: buffer.clone(),
            buffer_extra: String::new(),
            forward_extra: format!(
                "replay_batches_per_sec = 0\nreplay_bytes_per_sec = 0\n{}",
                window.map_or(String::new(), |w| format!("window_batches = {w}\n"))
            ),
            time_scale: 1.0,
            until: at(REPLAY_ONLY_UNTIL.0, REPLAY_ONLY_UNTIL.1),
        },
    );
    let started = Instant::now();
    let mut gateway: Process = start_replay_only_gateway(&config);
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = rss_kib(gateway.pid()) {
            peak = peak.max(kib);
        }
        if let Some(status) = gateway.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the drain took over 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "gateway: {status}\n{}", gateway.stderr());
    let status = ingest.terminate(Duration::from_secs(30));
    assert!(status.success(), "ingest: {status}");
    let applied = facwatch_ingest::Store::open(&store)
        .expect("the ingest store")
        .samples_applied(fault::GATEWAY)
        .expect("samples applied");
    let expected = facwatch_gateway::Buffer::open(backlog, BufferLimits::default())
        .and_then(|b| b.meta())
        .expect("backlog meta")
        .samples_produced;
    assert_eq!(applied, expected, "every buffered sample applied once");
    let _ = std::fs::remove_file(&buffer);
    let _ = std::fs::remove_file(&store);
    Run {
        seconds,
        peak_rss_kib: peak,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let options = options();
    let plant = Plant::new();
    let backlog = plant.path("backlog.redb");
    let began = Instant::now();
    let written = write_backlog(&backlog, options.samples);
    let samples = written.samples;
    println!(
        "backlog: {samples} samples in {} batches (written in {:.1} s); buffer file {} bytes = {:.1} bytes/sample on disk, {:.1} bytes/sample encoded",
        written.batches,
        began.elapsed().as_secs_f64(),
        written.file_bytes,
        written.file_bytes as f64 / samples as f64,
        written.encoded_bytes as f64 / samples as f64,
    );

    let mut mosquitto = fault::Mosquitto::start(plant.dir.path(), USER, PASSWORD);
    let mut results: Vec<(&str, Vec<Run>)> =
        vec![("embedded rumqttd", Vec::new()), ("mosquitto", Vec::new())];
    // Interleaved, so machine noise hits both brokers alike.
    for run in 0..options.runs {
        let embedded = drain_once(&plant, &backlog, run, None, options.window);
        let external = drain_once(&plant, &backlog, run, Some(mosquitto.port), options.window);
        for (result, (label, runs)) in [embedded, external].into_iter().zip(results.iter_mut()) {
            println!(
                "run {run} {label}: {:.2} s, {:.0} samples/s, gateway peak RSS {:.1} MB",
                result.seconds,
                samples as f64 / result.seconds,
                result.peak_rss_kib as f64 / 1024.0
            );
            runs.push(result);
        }
    }
    mosquitto.stop();
    println!("\nmedians over {} runs of {samples} samples:", options.runs);
    println!("| broker | drain s | samples/s | gateway peak RSS MB |");
    println!("|---|---:|---:|---:|");
    for (label, runs) in &results {
        let seconds = median(runs.iter().map(|r| r.seconds).collect());
        let rss = median(
            runs.iter()
                .map(|r| r.peak_rss_kib as f64 / 1024.0)
                .collect(),
        );
        println!(
            "| {label} | {seconds:.2} | {:.0} | {rss:.1} |",
            samples as f64 / seconds
        );
    }
}
