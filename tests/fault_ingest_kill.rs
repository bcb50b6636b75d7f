//! Fault test with real processes: the ingest is killed with SIGKILL ten
//! times, at random moments, while a gateway replays a 24-hour backlog
//! into it. The store must end exactly as after an uninterrupted replay of
//! the same backlog: the same events, every sample applied once.
//!
//! The backlog is made the way a site makes one: the simulator and the
//! gateway run a whole day (at 2,400x) with no broker reachable, so every
//! batch stays in the gateway's buffer. The buffer file is then copied, and
//! each copy is drained by its own ingest: once without faults, once with
//! the kills. Run the seed printed on stdout again with
//! `FACWATCH_FAULT_SEED=...`.

#![cfg(feature = "interop")]

mod fault;
mod interop;

use std::path::Path;
use std::time::Duration;

use facwatch_ingest::detect::Event;
use fault::{
    at, field_u64, start_gateway, start_ingest, start_replay_only_gateway, wait_for_log,
    wall_now_ms, Broker, Dice, GatewayConfig, Plant, GATEWAY, REPLAY_ONLY_UNTIL,
};
use interop::free_port;

/// Virtual seconds per wall second while the backlog is made: a day in
/// 36 s, slow enough for a debug build to poll every 30 s slot (a 12.5 ms
/// slot holds five Modbus polls per bus).
const BACKLOG_TIME_SCALE: f64 = 2_400.0;
/// Replay pace: the day's 1,440 one-minute batches take about 24 s, long
/// enough for ten kills.
const REPLAY: &str = "replay_batches_per_sec = 60\nreplay_bytes_per_sec = 0\n";
const KILLS: usize = 10;

/// What a drained store holds.
#[derive(Debug)]
struct Drained {
    events: Vec<Event>,
    samples_applied: u64,
    samples_produced: u64,
    last_seq: Option<u64>,
}

/// Polls a whole simulated day into `buffer` with no broker reachable, and
/// returns how many samples the gateway committed.
fn make_backlog(plant: &Plant, buffer: &Path) -> u64 {
    let anchor = wall_now_ms() + 300;
    let _sim = plant.simulator(anchor, BACKLOG_TIME_SCALE);
    let config = plant.gateway_config(
        "backlog",
        &GatewayConfig {
            // Nothing listens here: the broker is "down" all day.
            mqtt_port: free_port(),
            credentials: None,
            buffer: buffer.to_path_buf(),
            buffer_extra: String::new(),
            forward_extra: String::new(),
            time_scale: BACKLOG_TIME_SCALE,
            until: at(24, 0),
        },
    );
    let mut gateway = start_gateway(&config, anchor);
    wait_for_log(
        &mut gateway,
        "Polling reached its end time.",
        Duration::from_secs(60),
    );
    let status = gateway.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "gateway exited with {status}:\n{}",
        gateway.stderr()
    );
    let stopped = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    assert_eq!(field_u64(&stopped, "acked_seq"), 0, "nothing can be acked");
    field_u64(&stopped, "samples_produced")
}

/// Replays `buffer` into a fresh ingest (embedded broker), killing the
/// ingest `kills` times at random moments, then stops both and reads the
/// store.
fn drain(plant: &Plant, name: &str, buffer: &Path, kills: usize, dice: &mut Dice) -> Drained {
    let port = free_port();
    let broker = Broker::Embedded { port };
    let store = plant.path(&format!("{name}.ingest.redb"));
    let ingest_config = plant.ingest_config(name, &store, &broker);
    let mut ingest = start_ingest(&ingest_config, &broker);
    let gateway_config = plant.gateway_config(
        name,
        &GatewayConfig {
            mqtt_port: port,
            credentials: None,
            buffer: buffer.to_path_buf(),
            buffer_extra: String::new(),
            forward_extra: REPLAY.to_string(),
            time_scale: 1.0,
            until: at(REPLAY_ONLY_UNTIL.0, REPLAY_ONLY_UNTIL.1),
        },
    );
    let mut gateway = start_replay_only_gateway(&gateway_config);
    for kill in 1..=kills {
        std::thread::sleep(dice.between(Duration::from_millis(300), Duration::from_millis(1500)));
        assert!(
            gateway.exited().is_none(),
            "the replay finished before kill {kill}: the test no longer kills during a replay"
        );
        ingest.kill_hard();
        ingest = start_ingest(&ingest_config, &broker);
    }
    let status = gateway.wait_for_exit(Duration::from_secs(180));
    assert!(
        status.success(),
        "gateway exited with {status}:\n{}",
        gateway.stderr()
    );
    let stopped = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    let status = ingest.terminate(Duration::from_secs(20));
    assert!(status.success(), "ingest exited with {status}");

    let store = facwatch_ingest::Store::open(&store).expect("opening the ingest's store");
    Drained {
        events: store.events().expect("events"),
        samples_applied: store.samples_applied(GATEWAY).expect("samples applied"),
        samples_produced: field_u64(&stopped, "samples_produced"),
        last_seq: store.last_seq(GATEWAY).expect("last seq"),
    }
}

#[test]
fn killing_the_ingest_ten_times_during_a_24_hour_replay_changes_nothing() {
    let plant = Plant::new();
    let backlog = plant.path("backlog.redb");
    let produced = make_backlog(&plant, &backlog);
    // A day of 10 meters every 30 s is 28,800 slots; a debug build on a
    // loaded machine misses a few percent of them (27,835 here), never most.
    assert!(
        produced > 20_000,
        "the backlog holds only {produced} samples"
    );
    let calm_buffer = plant.path("calm.buffer.redb");
    let killed_buffer = plant.path("killed.buffer.redb");
    std::fs::copy(&backlog, &calm_buffer).unwrap();
    std::fs::copy(&backlog, &killed_buffer).unwrap();

    let mut dice = Dice::new("killing_the_ingest");
    let calm = drain(&plant, "calm", &calm_buffer, 0, &mut dice);
    let killed = drain(&plant, "killed", &killed_buffer, KILLS, &mut dice);

    println!(
        "backlog: {produced} samples; uninterrupted: {} applied, {} events; with {KILLS} kills: {} applied, {} events",
        calm.samples_applied,
        calm.events.len(),
        killed.samples_applied,
        killed.events.len()
    );
    for run in [&calm, &killed] {
        assert_eq!(run.samples_produced, produced, "{run:?}");
        assert_eq!(run.samples_applied, produced, "{run:?}");
    }
    assert_eq!(killed.last_seq, calm.last_seq);
    // The day holds the seed incident (R1 on line 1 at 14:03), so there is
    // something to compare.
    assert!(
        calm.events.iter().any(|e| e.line == "line1"),
        "{:#?}",
        calm.events
    );
    assert_eq!(killed.events, calm.events);
}
