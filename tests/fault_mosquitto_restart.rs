//! Fault test with real processes: gateway and ingest talk through a real
//! Mosquitto (password required, persistence on), which is stopped for a
//! simulated hour (13:30-14:30, across the start of the seed incident) and
//! started again on the same port. Nothing may be lost and no event may be
//! produced twice: the store holds exactly the seed incident, the ingest
//! logs its opening and its closing once each, and every sample the gateway
//! committed was applied.

#![cfg(feature = "interop")]

mod fault;
mod interop;

use std::time::Duration;

use facwatch_ingest::detect::{EventStatus, Rule};
use fault::{
    at, at_ms, field_u64, start_gateway, start_ingest, wait_for_log, wall_now_ms, Broker,
    GatewayConfig, Mosquitto, Plant, GATEWAY,
};

const TIME_SCALE: f64 = 600.0;
const USER: &str = "facwatch";
const PASSWORD: &str = "mosquitto-test-pass";

/// Sleeps until the shared virtual clock (00:00 at `anchor`) reads `h:m`.
fn wait_until_virtual(anchor: i64, h: i64, m: i64) {
    let wall = anchor + ((at_ms(h, m) - at_ms(0, 0)) as f64 / TIME_SCALE) as i64;
    let left = wall - wall_now_ms();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(left as u64));
    }
}

#[test]
fn a_mosquitto_stopped_for_a_simulated_hour_loses_nothing_and_duplicates_no_event() {
    let plant = Plant::new();
    let mut mosquitto = Mosquitto::start(plant.dir.path(), USER, PASSWORD);
    let credentials = Some((USER.to_string(), PASSWORD.to_string()));

    // The virtual day reads 12:59 now, so polling starts at 13:00.
    let anchor = wall_now_ms() - ((at_ms(12, 59) - at_ms(0, 0)) as f64 / TIME_SCALE) as i64;
    let _sim = plant.simulator(anchor, TIME_SCALE);
    let broker = Broker::External {
        port: mosquitto.port,
        credentials: credentials.clone(),
    };
    let store = plant.path("ingest.redb");
    let mut ingest = start_ingest(&plant.ingest_config("mosq", &store, &broker), &broker);
    let config = plant.gateway_config(
        "mosq",
        &GatewayConfig {
            mqtt_port: mosquitto.port,
            credentials,
            buffer: plant.path("gw.buffer.redb"),
            buffer_extra: String::new(),
            forward_extra: String::new(),
            time_scale: TIME_SCALE,
            until: at(17, 0),
        },
    );
    let mut gateway = start_gateway(&config, anchor);

    wait_until_virtual(anchor, 13, 30);
    mosquitto.stop();
    wait_until_virtual(anchor, 14, 30);
    mosquitto.restart();

    // 17:00 is 6 s of wall time after 14:00; then the backlog drains.
    let status = gateway.wait_for_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "gateway exited with {status}:\n{}",
        gateway.stderr()
    );
    let stopped = wait_for_log(&mut gateway, "Gateway stopped.", Duration::from_secs(5));
    let status = ingest.terminate(Duration::from_secs(20));
    assert!(status.success(), "ingest exited with {status}");

    let store = facwatch_ingest::Store::open(&store).expect("opening the store");
    let produced = field_u64(&stopped, "samples_produced");
    let applied = store.samples_applied(GATEWAY).unwrap();
    println!("samples produced {produced}, applied {applied}");
    assert_eq!(applied, produced);
    // 13:00-17:00, 10 meters every 30 s.
    assert!(produced > 4_000, "only {produced} samples were produced");

    // The seed incident is the day's only R1. (Line 2's fan meter is
    // silent 16:00-16:20: R5 data interruptions, on line 2 only.)
    let events = store.events().unwrap();
    assert!(
        events
            .iter()
            .all(|e| e.rule == Rule::R1 || (e.rule == Rule::R5 && e.line == "line2")),
        "{events:#?}"
    );
    let r1: Vec<_> = events.iter().filter(|e| e.rule == Rule::R1).collect();
    assert_eq!(r1.len(), 1, "{events:#?}");
    let event = r1[0];
    assert_eq!(
        (event.rule, event.status, event.line.as_str()),
        (Rule::R1, EventStatus::Closed, "line1")
    );
    assert_eq!(
        event.facilities,
        ["l1-condenser", "l1-hv-esp", "l1-main-fan"]
    );
    let end = event.end_ms.expect("closed");
    // 14:03 for 27 minutes, within one 30 s poll interval each way.
    assert!(
        (event.start_ms - at_ms(14, 3)).abs() <= 30_000,
        "{event:#?}"
    );
    assert!(
        (end - event.start_ms - 27 * 60_000).abs() <= 30_000,
        "{event:#?}"
    );

    // One log line per change of the event: opened once, closed once.
    let mut changes: Vec<(String, String)> = Vec::new();
    for line in ingest.stderr().lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &value["fields"];
        if fields["rule"] == "R1" {
            changes.push((
                fields["line"].as_str().unwrap_or("").to_string(),
                fields["status"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    assert_eq!(
        changes,
        [
            ("line1".to_string(), "Open".to_string()),
            ("line1".to_string(), "Closed".to_string())
        ]
    );
}
