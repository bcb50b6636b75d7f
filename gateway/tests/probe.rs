//! `facwatch-gateway probe` as an installer runs it: the built binary
//! against fake meters (a DTSU666 behind a Modbus TCP server, an SDM630
//! behind a serial device server speaking RTU over TCP), checking exact
//! values, exit codes and messages.

mod common;

use std::collections::HashMap;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::{image, words, FakeServer, Framing, Reply, Request};
use facwatch_proto::profile::{ProfileName, Ratios};
use facwatch_proto::wire::Values;
use serde_json::json;

const DTSU_UNIT: u8 = 1;
const SDM_UNIT: u8 = 3;
const REFUSING_UNIT: u8 = 4;
const SILENT_UNIT: u8 = 9;

/// A stenter's meter: CT 40 on a 380 V line. All values survive the
/// register encoding exactly.
fn dtsu_values() -> Values {
    Values {
        power_kw: Some(17.5),
        energy_kwh: Some(1234.5),
        voltage_v: vec![230.0, 231.5, 229.0],
        current_a: vec![25.25, 25.5, 24.75],
        power_factor: Some(0.86),
    }
}

fn sdm_values() -> Values {
    Values {
        power_kw: Some(4.25),
        energy_kwh: Some(98765.5),
        voltage_v: vec![228.5, 229.0, 230.25],
        current_a: vec![7.5, 7.25, 7.0],
        power_factor: Some(0.875),
    }
}

const DTSU_RATIOS: Ratios = Ratios { ct: 40.0, pt: 1.0 };

/// Serves `profile` showing `values` at `unit`; REFUSING_UNIT answers
/// exception 2, every other unit stays silent.
async fn fake(
    framing: Framing,
    profile: ProfileName,
    unit: u8,
    values: Values,
    ratios: Ratios,
) -> FakeServer {
    let image: HashMap<(u8, u16), u16> = image(profile, &values, ratios);
    FakeServer::start(
        framing,
        Arc::new(move |request: &Request| match request.unit {
            u if u == unit => Reply::Words(words(&image, request)),
            REFUSING_UNIT => Reply::Exception(2),
            _ => Reply::Silent,
        }),
    )
    .await
}

async fn probe(args: Vec<String>) -> Output {
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_facwatch-gateway"))
            .arg("probe")
            .args(args)
            .output()
            .unwrap()
    });
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("probe finished within 30 s")
        .unwrap()
}

fn args(text: &str) -> Vec<String> {
    text.split_whitespace().map(String::from).collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_a_dtsu666_over_tcp_as_exact_json() {
    let server = fake(
        Framing::Tcp,
        ProfileName::Dtsu666,
        DTSU_UNIT,
        dtsu_values(),
        DTSU_RATIOS,
    )
    .await;
    let output = probe(args(&format!(
        "--profile dtsu666 --tcp {} --unit {DTSU_UNIT} --ct 40 --pt 1 --json",
        server.address
    )))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    let got: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        got,
        json!({
            "profile": "dtsu666",
            "unit": 1,
            "power_kw": 17.5,
            "energy_kwh": 1234.5,
            "voltage_v": [230.0, 231.5, 229.0],
            "current_a": [25.25, 25.5, 24.75],
            "power_factor": 0.86,
        })
    );
    // The same code path as polling: three coalesced reads, FC03.
    let reads: Vec<(u8, u8, u16, u16)> = server
        .log()
        .iter()
        .map(|l| {
            (
                l.request.unit,
                l.request.function,
                l.request.address,
                l.request.count,
            )
        })
        .collect();
    assert_eq!(
        reads,
        vec![(1, 3, 0x2006, 14), (1, 3, 0x202A, 2), (1, 3, 0x401E, 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_an_sdm630_over_rtu_over_tcp_as_exact_json() {
    let server = fake(
        Framing::RtuOverTcp,
        ProfileName::Sdm630,
        SDM_UNIT,
        sdm_values(),
        Ratios::default(),
    )
    .await;
    let output = probe(args(&format!(
        "--profile sdm630 --rtu-over-tcp {} --baud 9600 --unit {SDM_UNIT} --json",
        server.address
    )))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let got: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        got,
        json!({
            "profile": "sdm630",
            "unit": 3,
            "power_kw": 4.25,
            "energy_kwh": 98765.5,
            "voltage_v": [228.5, 229.0, 230.25],
            "current_a": [7.5, 7.25, 7.0],
            "power_factor": 0.875,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_without_json_shows_the_raw_registers_in_hex() {
    let server = fake(
        Framing::RtuOverTcp,
        ProfileName::Sdm630,
        SDM_UNIT,
        sdm_values(),
        Ratios::default(),
    )
    .await;
    let output = probe(args(&format!(
        "--profile sdm630 --rtu-over-tcp {} --unit {SDM_UNIT}",
        server.address
    )))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    // 228.5 V is 0x43648000 as an ABCD float; 4250 W is 0x4584D000.
    assert!(
        text.contains(&format!(
            "sdm630 unit 3 on rtu-over-tcp://{}\n",
            server.address
        )),
        "{text}"
    );
    assert!(text.contains("  FC04 0x0000  4364 8000 "), "{text}");
    assert!(text.contains("  FC04 0x0034  4584 D000 "), "{text}");
    assert!(text.contains("  power_kw      4.25\n"), "{text}");
    assert!(
        text.contains("  voltage_v     228.5  229  230.25\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_silent_unit_exits_1_naming_the_timeout() {
    let server = fake(
        Framing::Tcp,
        ProfileName::Dtsu666,
        DTSU_UNIT,
        dtsu_values(),
        DTSU_RATIOS,
    )
    .await;
    let output = probe(args(&format!(
        "--profile dtsu666 --tcp {} --unit {SILENT_UNIT} --timeout-ms 300 --json",
        server.address
    )))
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        format!(
            "error: unit 9 on tcp://{} did not answer FC03 at 0x2006 within 300 ms\n",
            server.address
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_refusing_unit_exits_1_naming_the_exception() {
    let server = fake(
        Framing::RtuOverTcp,
        ProfileName::Sdm630,
        SDM_UNIT,
        sdm_values(),
        Ratios::default(),
    )
    .await;
    let output = probe(args(&format!(
        "--profile sdm630 --rtu-over-tcp {} --unit {REFUSING_UNIT} --json",
        server.address
    )))
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        format!(
            "error: unit 4 on rtu-over-tcp://{} refused FC04 at 0x0000: Modbus exception 2 (illegal data address)\n",
            server.address
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_closed_port_exits_1_naming_the_address() {
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = probe(args(&format!("--profile sdm120 --tcp {address} --unit 1"))).await;
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.starts_with(&format!("error: cannot connect to {address}: ")),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_refuses_bad_arguments_with_exit_2() {
    let cases = [
        (
            "--profile generic --tcp 127.0.0.1:502 --unit 1",
            "error: --profile generic needs a register map from a site file",
        ),
        (
            "--profile dtsu667 --tcp 127.0.0.1:502 --unit 1",
            "error: --profile: unknown meter profile `dtsu667`",
        ),
        (
            "--profile dtsu666 --tcp 127.0.0.1:502 --unit 1 --baud 9600",
            "error: --baud applies only to --serial and --rtu-over-tcp",
        ),
        (
            "--profile dtsu666 --tcp 127.0.0.1:502 --unit 1 --ct 0",
            "error: --ct 0 must be a positive number",
        ),
        (
            "--profile dtsu666 --tcp 127.0.0.1 --unit 1",
            "error: --tcp `127.0.0.1` is not HOST:PORT",
        ),
        (
            "--profile dtsu666 --unit 1",
            "error: the following required arguments",
        ),
        (
            "--profile dtsu666 --tcp 127.0.0.1:502 --unit 0",
            "error: invalid value '0' for '--unit <N>'",
        ),
    ];
    for (line, expected) in cases {
        let output = probe(args(line)).await;
        assert_eq!(output.status.code(), Some(2), "{line}");
        let message = stderr(&output);
        assert!(message.starts_with(expected), "{line}: {message}");
    }
}
