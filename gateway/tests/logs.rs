//! `facwatch-gateway --log-format json` as a log collector reads it: the
//! built binary against meters that give no readings (a device server
//! nobody listens on, and a serial device server answering every request
//! with a frame whose CRC is wrong, which the Modbus stack itself logs),
//! with the MQTT broker unreachable, from start to a SIGTERM stop. Every
//! line must say which site and gateway it is about, and a line about a
//! meter also which line the meter belongs to, wherever it comes from: our
//! code (`fields`) or a library running in one of our spans (`span`).

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use facwatch_proto::rtu;
use serde_json::{Map, Value};

/// Secrets in the config: never in a log line.
const PASSWORD: &str = "pw-never-logged-7f3a";
const KEY: facwatch_proto::seal::GatewayKey =
    facwatch_proto::seal::GatewayKey::from_bytes([0xc3; 32]);

const SITE: &str = "logs-site";
const GATEWAY: &str = "gw-logs";

/// Meters and the line each belongs to.
const METERS: [(&str, Option<&str>); 5] = [
    ("l1-stenter", Some("line1")),
    ("l1-fan", Some("line1")),
    ("l2-stenter", Some("line2")),
    ("l2-esp", Some("line2")),
    ("spare", None),
];

/// Everything the test waits for is there within this, on a slow machine.
const WAIT: Duration = Duration::from_secs(30);

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A serial device server (RTU over TCP) that answers every read request
/// with a well-formed frame whose CRC is wrong, as noise on an RS-485 line
/// would. Serves until the test process ends.
fn start_noisy_device_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut request = [0u8; 8];
                while stream.read_exact(&mut request).is_ok() {
                    let Ok(request) = rtu::parse_read_request(&request) else {
                        return;
                    };
                    let mut frame = vec![request.unit, request.function, 2, 0x12, 0x34];
                    let crc = rtu::crc16(&frame) ^ 0xffff;
                    frame.extend_from_slice(&crc.to_le_bytes());
                    if stream.write_all(&frame).is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

fn site_file(absent: SocketAddr, noisy: SocketAddr) -> String {
    format!(
        r#"
[site]
id = "{SITE}"

[[gateways]]
id = "{GATEWAY}"
poll_interval_secs = 10
modbus_timeout_ms = 200
batch_interval_secs = 20

[[meters]]
id = "l1-stenter"
gateway = "{GATEWAY}"
profile = "sdm630"
tcp = "{absent}"
unit = 1

[[meters]]
id = "l1-fan"
gateway = "{GATEWAY}"
profile = "sdm630"
tcp = "{absent}"
unit = 2

[[meters]]
id = "l2-stenter"
gateway = "{GATEWAY}"
profile = "sdm630"
rtu_over_tcp = "{noisy}"
unit = 1

[[meters]]
id = "l2-esp"
gateway = "{GATEWAY}"
profile = "sdm630"
rtu_over_tcp = "{noisy}"
unit = 2

[[meters]]
id = "spare"
gateway = "{GATEWAY}"
profile = "sdm630"
tcp = "{absent}"
unit = 3

[[lines]]
id = "line1"

[[lines.facilities]]
id = "stenter-1"
kind = "stenter"
meter = "l1-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "fan-1"
kind = "main_fan"
meter = "l1-fan"
rated_kw = 22
start_threshold_kw = 4

[[lines]]
id = "line2"

[[lines.facilities]]
id = "stenter-2"
kind = "stenter"
meter = "l2-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "esp-2"
kind = "hv_esp"
meter = "l2-esp"
rated_kw = 30
start_threshold_kw = 5
"#
    )
}

fn gateway_config(broker_port: u16) -> String {
    format!(
        r#"
site_file = "site.toml"
gateway_id = "{GATEWAY}"
gateway_key_file = "gateway.key"

[mqtt]
host = "127.0.0.1"
port = {broker_port}
username = "{GATEWAY}"
password = "{PASSWORD}"

[buffer]
path = "buffer.redb"

# One poll interval is one wall second.
[clock]
start = "2022-12-13T00:00:00+08:00"
time_scale = 10
"#
    )
}

/// The gateway process, killed if the test fails before stopping it.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One stderr line, parsed.
struct Line {
    text: String,
    json: Map<String, Value>,
}

impl Line {
    /// `key` from the event's own fields or, failing that, from the span
    /// it was logged in.
    fn get(&self, key: &str) -> Option<&str> {
        ["fields", "span"]
            .iter()
            .filter_map(|part| self.json.get(*part)?.as_object()?.get(key))
            .find_map(Value::as_str)
    }

    fn message(&self) -> &str {
        self.get("message").unwrap_or("")
    }

    fn target(&self) -> &str {
        self.json
            .get("target")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// Reads stderr lines (parsed as they come) until `done` holds of the
/// lines so far or `deadline` passes; returns whether `done` held.
fn read_until(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<Line>,
    deadline: Instant,
    done: impl Fn(&[Line]) -> bool,
) -> bool {
    while !done(seen) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        match lines.recv_timeout(left) {
            Ok(text) => {
                let json = match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(json)) => json,
                    _ => panic!("not a JSON object: {text}"),
                };
                seen.push(Line { text, json });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => return false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return done(seen),
        }
    }
    true
}

fn failing(lines: &[Line]) -> BTreeSet<&str> {
    lines
        .iter()
        .filter(|l| l.message() == "Meter gives no readings; backing off.")
        .filter_map(|l| l.get("meter"))
        .collect()
}

fn has(lines: &[Line], message: &str) -> bool {
    lines.iter().any(|l| l.message() == message)
}

#[test]
fn every_json_line_names_site_and_gateway_and_a_meters_line_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let absent = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let noisy = start_noisy_device_server();
    std::fs::write(dir.path().join("site.toml"), site_file(absent, noisy)).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, gateway_config(closed_port())).unwrap();
    facwatch_proto::secret::create_private(
        &dir.path().join("gateway.key"),
        KEY.to_hex_line().as_bytes(),
    )
    .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_facwatch-gateway"))
        .arg("--config")
        .arg(&config)
        .args(["--log-format", "json"])
        // Debug too: lines nobody reads by default must be attributable
        // when someone turns them on.
        // redb's debug lines (one per transaction) are its internals; its
        // info and warnings (opening, repairing the file) are about the
        // gateway's buffer and must carry the names.
        .env("RUST_LOG", "debug,redb=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    let mut gateway = Gateway(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    // Running: every meter has failed once, the Modbus stack has logged a
    // frame it could not decode, and the broker is known to be down.
    let mut seen = Vec::new();
    let running = read_until(&lines, &mut seen, Instant::now() + WAIT, |seen| {
        failing(seen).len() == METERS.len()
            && seen.iter().any(|l| l.target().starts_with("tokio_modbus"))
            && has(seen, "MQTT broker unreachable; retrying.")
    });
    assert!(running, "gave up waiting; lines so far:\n{}", texts(&seen));

    // Stopping: SIGTERM, then every line up to the exit.
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopped = read_until(&lines, &mut seen, Instant::now() + WAIT, |seen| {
        has(seen, "Gateway exited.")
    });
    assert!(stopped, "no exit line; lines:\n{}", texts(&seen));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    read_until(&lines, &mut seen, Instant::now() + WAIT, |_| false);

    // Debug lines included, no line shows a secret.
    let key_hex = KEY.to_hex_line();
    for line in &seen {
        assert!(!line.text.contains(PASSWORD), "{}", line.text);
        assert!(!line.text.contains(key_hex.trim()), "{}", line.text);
    }

    for line in &seen {
        assert_eq!(line.get("site"), Some(SITE), "{}", line.text);
        assert_eq!(line.get("gateway"), Some(GATEWAY), "{}", line.text);
        if let Some(meter) = line.get("meter") {
            let (_, expected) = METERS
                .iter()
                .find(|(id, _)| *id == meter)
                .unwrap_or_else(|| panic!("unknown meter in {}", line.text));
            assert_eq!(line.get("line"), *expected, "{}", line.text);
        }
    }
    // What the run had to say, each line from where it is said.
    for message in [
        "Gateway starting.",
        "Polling bus.",
        "MQTT broker unreachable; retrying.",
        "Shutting down: stop polling, flush, close.",
        "Gateway stopped.",
        "Gateway exited.",
    ] {
        assert!(has(&seen, message), "no `{message}` in:\n{}", texts(&seen));
    }
    assert_eq!(
        failing(&seen),
        METERS.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>()
    );
    // The Modbus stack's own lines name the meter read (from the span).
    let stack: BTreeSet<&str> = seen
        .iter()
        .filter(|l| l.target().starts_with("tokio_modbus"))
        .filter_map(|l| l.get("meter"))
        .collect();
    assert!(
        !stack.is_empty() && stack.is_subset(&BTreeSet::from(["l2-stenter", "l2-esp"])),
        "{stack:?}"
    );
}

fn texts(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}
