//! In-process throughput of the apply path without MQTT: payloads of the
//! stenter plant decoded and applied through [`Applier`] in groups (one
//! store transaction each), as the apply task does.
//!
//! `cargo test -p facwatch-ingest --release --lib -- --ignored --nocapture apply_throughput`
//! with `BENCH_BATCHES` (default 1,000), `BENCH_POLLS` (polls of the 10
//! meters per batch, default 100: 1,000 samples) and `BENCH_GROUP` (batches
//! per group, default [`MAX_GROUP_BATCHES`]); `BENCH_INFLUX=1` also
//! queues every applied batch in the InfluxDB outbox, and measures the
//! writer's rendering of it as line protocol alone.

use std::sync::Arc;
use std::time::Instant;

use facwatch_proto::site::Site;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};

use crate::detect::{DataLoss, GatewayDetector};
use crate::receive::apply::{Applier, Received, MAX_GROUP_BATCHES};
use crate::store::Store;

pub(crate) const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");
const METERS: [(&str, f32); 10] = [
    ("l1-stenter", 110.0),
    ("l1-spray-pump", 4.8),
    ("l1-condenser", 6.5),
    ("l1-hv-esp", 4.0),
    ("l1-main-fan", 17.0),
    ("l2-stenter", 110.0),
    ("l2-spray-pump", 4.8),
    ("l2-condenser", 6.5),
    ("l2-hv-esp", 4.0),
    ("l2-main-fan", 17.0),
];

/// Batch `seq` (from 1) of a plant: `polls` polls of 10 meters every 30 s;
/// production runs 20 h of each day, and the fan of line 1 stops for
/// 20 min every 3 h (an R1 interval).
pub(crate) fn plant_batch(seq: u64, polls: u64) -> Batch {
    let start = 1_670_860_800_000i64;
    let mut samples = Vec::with_capacity((polls * 10) as usize);
    for p in 0..polls {
        let k = (seq - 1) * polls + p;
        let t = start + k as i64 * 30_000;
        let minute_of_day = (k / 2) % 1440;
        let producing = (120..1320).contains(&minute_of_day);
        let fan_off = (k / 2) % 180 < 20;
        for (i, (meter, rated)) in METERS.iter().enumerate() {
            let mut power = *rated * (1.0 + ((k as f32 * 0.37 + i as f32).sin() * 0.03));
            if meter.ends_with("stenter") && !producing {
                power = 8.0;
            }
            if *meter == "l1-main-fan" && fan_off {
                power = 0.0;
            }
            samples.push(Sample {
                meter: (*meter).into(),
                time_ms: t + i as i64 * 7,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(power),
                    energy_kwh: Some(1000.0 + k as f64 * 0.5),
                    voltage_v: vec![229.5, 230.1, 228.7],
                    current_a: vec![power * 1.6; 3],
                    power_factor: Some(0.85),
                },
            });
        }
    }
    Batch {
        gateway: "gw-01".into(),
        seq,
        dropped_before: 0,
        samples,
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn apply_throughput() {
    let batches = env("BENCH_BATCHES", 1000);
    let polls = env("BENCH_POLLS", 100);
    let group_size = env("BENCH_GROUP", MAX_GROUP_BATCHES as u64) as usize;
    let site = Site::from_toml(SITE, "stenter-plant.site.toml").unwrap();
    let payloads: Vec<Vec<u8>> = (1..=batches)
        .map(|seq| plant_batch(seq, polls).encode())
        .collect();
    let samples = batches * polls * 10;

    // The detector on its own, without a store.
    let decoded: Vec<Batch> = payloads.iter().map(|p| Batch::decode(p).unwrap()).collect();
    let mut detector = GatewayDetector::new(Arc::new(site.clone()), "gw-01");
    let started = Instant::now();
    let mut versions = 0;
    for batch in &decoded {
        versions += detector
            .apply_batch(&batch.samples, DataLoss::default(), 0)
            .len();
    }
    let detect_secs = started.elapsed().as_secs_f64();
    let snapshot_bytes = detector.snapshot().len();
    drop(decoded);

    // The whole path: decode a group, apply it through the applier.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("ingest.redb")).unwrap());
    let mut applier = Applier::new(std::slice::from_ref(&site), store.clone(), Vec::new()).unwrap();
    let influx = env("BENCH_INFLUX", 0) == 1;
    if influx {
        let rendering = crate::emit::influx::Rendering {
            precision: crate::config::Precision::Milliseconds,
            readings: true,
            events: true,
            max_lines: 5000,
        };
        let mut renderer = crate::emit::influx::Renderer::new(std::slice::from_ref(&site));
        let started = Instant::now();
        let mut bytes = 0;
        for payload in &payloads {
            let batch = Batch::decode(payload).unwrap();
            let mut out = Vec::new();
            renderer.render_batch(&batch, rendering.precision, &mut out);
            bytes += out.len();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "  decode + render alone (the writer's work): {secs:.3} s ({:.0} ns/sample), {:.0} bytes/line",
            secs * 1e9 / samples as f64,
            bytes as f64 / samples as f64
        );
        applier = applier.with_influx(rendering);
    }
    let (mut decode_secs, mut apply_secs, mut groups) = (0.0, 0.0, 0);
    // As the apply task has them: decoded, with the payload they came in.
    let payloads: Vec<bytes::Bytes> = payloads.into_iter().map(bytes::Bytes::from).collect();
    for chunk in payloads.chunks(group_size) {
        let started = Instant::now();
        let group: Vec<Received> = chunk
            .iter()
            .map(|p| Received {
                batch: Batch::decode(p).unwrap(),
                payload: Some(p.clone()),
            })
            .collect();
        let decoded = Instant::now();
        let outcome = applier.prepare_received(group).apply(0, 15 * 60 * 1000);
        applier.install(&outcome);
        outcome.committed.expect("group committed");
        decode_secs += (decoded - started).as_secs_f64();
        apply_secs += decoded.elapsed().as_secs_f64();
        groups += 1;
    }
    let secs = decode_secs + apply_secs;
    assert_eq!(store.last_seq("gw-01").unwrap(), Some(batches));
    assert_eq!(store.samples_applied("gw-01").unwrap(), samples);
    let per_sample = |secs: f64| secs * 1e9 / samples as f64;
    println!(
        "{batches} batches of {} samples, {groups} groups of up to {group_size}: {samples} samples in {secs:.3} s = {:.0} samples/s",
        polls * 10,
        samples as f64 / secs
    );
    println!(
        "  decode {decode_secs:.3} s ({:.0} ns/sample); apply {apply_secs:.3} s ({:.0} ns/sample, {:.2} ms/group), of which detector alone {detect_secs:.3} s ({:.0} ns/sample); {versions} event versions, {} events stored; snapshot {snapshot_bytes} bytes",
        per_sample(decode_secs),
        per_sample(apply_secs),
        apply_secs * 1e3 / groups as f64,
        per_sample(detect_secs),
        store.events().unwrap().len()
    );
}
