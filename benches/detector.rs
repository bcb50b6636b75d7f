//! Benchmark: the ingest's detector alone, in process, on one core: a day
//! of the demo plant (10 meters on 2 lines, polled every 30 s, with the
//! seed incident and a silent meter) from the simulator's plant model, fed
//! in one-minute batches, over and over. Reports the median samples/s of
//! the runs and the detector's snapshot size per line (what the ingest
//! stores with every batch group).
//!
//! ```sh
//! cargo bench --bench detector
//! cargo bench --bench detector -- --runs 9 --poll-secs 1
//! ```

use std::sync::Arc;
use std::time::Instant;

use facwatch_ingest::detect::{DataLoss, GatewayDetector};

fn main() {
    let mut runs = 5usize;
    let mut poll_secs = 30u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--poll-secs" => {
                poll_secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--poll-secs N")
            }
            _ => {} // cargo bench passes --bench
        }
    }
    let mut scenario = facwatch::builtin_scenario().expect("the built-in scenario");
    for gateway in &mut scenario.site.gateways {
        gateway.poll_interval = std::time::Duration::from_secs(poll_secs);
    }
    let samples =
        facwatch::plant_samples::samples(&scenario, "gw-01", scenario.start_ms, scenario.end_ms);
    let batch = (60 / poll_secs.max(1)).max(1) as usize * 10;
    let site = Arc::new(scenario.site.clone());
    let wall_now = scenario.end_ms + 86_400_000;
    // Enough passes over the day for about a second of work per run.
    let passes = (20_000_000 / samples.len()).max(1);

    let mut rates = Vec::new();
    let mut events = 0;
    let mut snapshot_bytes = 0;
    for run in 0..runs {
        let started = Instant::now();
        for _ in 0..passes {
            let mut detector = GatewayDetector::new(site.clone(), "gw-01");
            events = 0;
            for chunk in samples.chunks(batch) {
                events += detector
                    .apply_batch(chunk, DataLoss::default(), wall_now)
                    .len();
            }
            snapshot_bytes = detector.snapshot().len();
        }
        let rate = (passes * samples.len()) as f64 / started.elapsed().as_secs_f64();
        println!("run {run}: {rate:.0} samples/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    let lines = scenario.site.lines.len();
    println!(
        "detector, {} samples per day ({} meters, poll {poll_secs} s), {passes} days per run, {events} event changes per day:",
        samples.len(),
        scenario.site.meters.len()
    );
    println!(
        "median {:.0} samples/s over {runs} runs; snapshot {snapshot_bytes} bytes for {lines} lines = {} bytes per line",
        rates[rates.len() / 2],
        snapshot_bytes / lines.max(1)
    );
}
