//! Fault test with real processes: a gateway whose uplink is down all day
//! fills its buffer's `max_bytes` (1 MiB, the smallest allowed). It drops
//! the oldest batches and counts them; when the uplink returns, the ingest
//! applies what is left and records the loss as one R5 data-interruption
//! event carrying exactly the gateway's count.

#![cfg(feature = "interop")]

mod fault;
mod interop;

use std::time::Duration;

use facwatch_ingest::detect::{EventStatus, Rule};
use fault::{
    at, field_u64, start_gateway, start_ingest, start_replay_only_gateway, wait_for_log,
    wall_now_ms, Broker, GatewayConfig, Plant, GATEWAY, REPLAY_ONLY_UNTIL,
};
use interop::free_port;

/// A day in 36 s: slow enough for a debug build to poll every slot.
const TIME_SCALE: f64 = 2_400.0;
const MAX_BYTES: u64 = 1024 * 1024;

#[test]
fn a_full_buffer_drops_the_oldest_and_the_ingest_shows_the_gap_with_its_count() {
    let plant = Plant::new();
    let buffer = plant.path("gw.buffer.redb");
    let limits = format!("max_bytes = {MAX_BYTES}\nwhen_full = \"drop_oldest\"\n");

    // A day of polling with no broker: ~28,800 samples, more than 1 MiB.
    let anchor = wall_now_ms() + 300;
    let sim = plant.simulator(anchor, TIME_SCALE);
    let offline = plant.gateway_config(
        "offline",
        &GatewayConfig {
            mqtt_port: free_port(),
            credentials: None,
            buffer: buffer.clone(),
            buffer_extra: limits.clone(),
            forward_extra: String::new(),
            time_scale: TIME_SCALE,
            until: at(24, 0),
        },
    );
    let mut gateway = start_gateway(&offline, anchor);
    wait_for_log(
        &mut gateway,
        "Polling reached its end time.",
        Duration::from_secs(60),
    );
    assert!(gateway.terminate(Duration::from_secs(20)).success());
    drop(sim);
    let offline_end = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    let produced = field_u64(&offline_end, "samples_produced");
    let dropped = field_u64(&offline_end, "samples_dropped");
    println!("offline day: {produced} samples committed, {dropped} dropped at {MAX_BYTES} bytes");
    assert!(dropped > 0, "the buffer never filled: {offline_end:?}");
    assert!(dropped < produced);

    // The uplink returns: an ingest, and the gateway replays what it kept.
    let port = free_port();
    let broker = Broker::Embedded { port };
    let store = plant.path("ingest.redb");
    let mut ingest = start_ingest(&plant.ingest_config("full", &store, &broker), &broker);
    let online = plant.gateway_config(
        "online",
        &GatewayConfig {
            mqtt_port: port,
            credentials: None,
            buffer,
            buffer_extra: limits,
            forward_extra: "replay_batches_per_sec = 0\nreplay_bytes_per_sec = 0\n".into(),
            time_scale: 1.0,
            until: at(REPLAY_ONLY_UNTIL.0, REPLAY_ONLY_UNTIL.1),
        },
    );
    let mut gateway = start_replay_only_gateway(&online);
    let status = gateway.wait_for_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "gateway exited with {status}:\n{}",
        gateway.stderr()
    );
    let online_end = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    assert_eq!(field_u64(&online_end, "samples_dropped"), dropped);
    assert!(ingest.terminate(Duration::from_secs(20)).success());

    let store = facwatch_ingest::Store::open(&store).unwrap();
    assert_eq!(store.samples_applied(GATEWAY).unwrap(), produced - dropped);
    let events = store.events().unwrap();
    // The loss the gateway reported; the day's other R5 events are its
    // meters' own interruptions (the scenario's silent fan meter).
    let gaps: Vec<_> = events
        .iter()
        .filter(|e| e.rule == Rule::R5 && e.data_loss.is_some())
        .collect();
    assert_eq!(gaps.len(), 1, "{events:#?}");
    let gap = gaps[0];
    assert_eq!(gap.status, EventStatus::Closed);
    assert_eq!(gap.gateway, GATEWAY);
    let loss = gap
        .data_loss
        .as_ref()
        .expect("an R5 event carries its loss");
    assert_eq!(loss.samples_dropped, dropped, "{gap:#?}");
    assert!(
        gap.notice_en.contains(&group_thousands(dropped)),
        "the notice names the count: {}",
        gap.notice_en
    );
}

/// `1234567` -> `1,234,567`, as the notices write counts.
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
