//! The `facwatch-sim` binary as an operator runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");
const SCENARIO: &str = include_str!("../../deploy/stenter-plant.scenario.toml");
const LIMIT: Duration = Duration::from_secs(20);

fn sim() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_facwatch-sim"));
    command.env("RUST_LOG", "info");
    command
}

/// Writes the demo site (its endpoints moved to ephemeral ports) and
/// `scenario` into `dir`; returns the scenario's path.
fn write_plant(dir: &Path, scenario: &str) -> PathBuf {
    let site = SITE
        .replace("127.0.0.1:15021", "127.0.0.1:0")
        .replace("127.0.0.1:15022", "127.0.0.2:0");
    std::fs::write(dir.join("stenter-plant.site.toml"), site).unwrap();
    let path = dir.join("plant.scenario.toml");
    std::fs::write(&path, scenario).unwrap();
    path
}

/// Runs to completion within [`LIMIT`].
fn run(command: &mut Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("facwatch-sim did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn check_config_accepts_the_demo_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_plant(dir.path(), SCENARIO);
    let out = run(sim().arg("check-config").arg("--scenario").arg(&path));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok: site `tx-dyeing`, 10 meters, 2 shifts, 3 faults\n"
    );
}

#[test]
fn config_error_is_one_line_naming_file_and_key_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_plant(
        dir.path(),
        &SCENARIO.replace("\"l1-hv-esp\"]", "\"l1-esp\"]"),
    );
    let out = run(sim().arg("check-config").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{}: faults[0].facilities: facility `l1-esp` is not defined in site file `stenter-plant.site.toml`\n",
            path.display()
        )
    );

    let out = run(&mut sim());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "command line: --scenario: is required (a scenario TOML file)\n"
    );

    let path = write_plant(dir.path(), SCENARIO);
    let out = run(sim().arg("--scenario").arg(&path).arg("--time-scale=0"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "command line: --time-scale: 0 must be a positive number\n"
    );
}

#[test]
fn print_default_config_prints_the_shipped_scenario() {
    let out = run(sim().arg("print-default-config"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        include_str!("../default.scenario.toml")
    );
}

#[test]
fn simulator_stops_by_itself_when_the_scenario_ends() {
    let dir = tempfile::tempdir().unwrap();
    // One virtual hour at 36 000 x: a tenth of a wall second.
    let scenario = SCENARIO
        .replace("2022-12-14T00:00:00+08:00", "2022-12-13T01:00:00+08:00")
        .replace("time_scale = 1440", "time_scale = 36000")
        .split("[[faults]]")
        .next()
        .unwrap()
        .to_string();
    let path = write_plant(dir.path(), &scenario);
    let out = run(sim()
        .arg("--scenario")
        .arg(&path)
        .args(["--log-format", "json"]));
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("\"virtual_start_unix_ms\":1670860800000"),
        "{log}"
    );
    assert!(log.contains("\"time_scale\":36000.0"), "{log}");
    assert!(log.contains("The scenario has ended; stopping."), "{log}");
    assert_eq!(log.matches("Serving simulated meters.").count(), 2, "{log}");
}

#[test]
fn sigterm_stops_the_simulator_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_plant(dir.path(), SCENARIO);
    let mut child = sim()
        .arg("--scenario")
        .arg(&path)
        .args(["--time-scale", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + LIMIT;
    let mut serving = 0;
    while serving < 2 {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the simulator did not start serving");
        serving += usize::from(line.contains("Serving simulated meters."));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        rest.push_str(&line);
        rest.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{rest}");
    assert!(
        rest.contains("Stopping on signal.") && rest.contains("SIGTERM"),
        "{rest}"
    );
    assert!(rest.contains("Stopped."), "{rest}");
}

#[test]
fn print_endpoints_names_every_bus_where_it_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_plant(dir.path(), SCENARIO);
    // Line 2 behind a transparent serial device server instead.
    let site_path = dir.path().join("stenter-plant.site.toml");
    let site = std::fs::read_to_string(&site_path)
        .unwrap()
        .replace("tcp = \"127.0.0.2:0\"", "rtu_over_tcp = \"127.0.0.1:0\"");
    std::fs::write(&site_path, site).unwrap();
    let mut child = sim()
        .arg("--scenario")
        .arg(&path)
        .args(["--time-scale", "1", "--print-endpoints"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + LIMIT;
    let next_line = || {
        lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("no endpoint line")
    };
    let (tcp, rtu_over_tcp) = (next_line(), next_line());
    let fields = |line: &str| -> Vec<String> { line.split(' ').map(str::to_string).collect() };
    let tcp = fields(&tcp);
    assert!(
        tcp[0].starts_with("tcp://127.0.0.1:") && tcp[0] != "tcp://127.0.0.1:0",
        "{tcp:?}"
    );
    assert_eq!(tcp[1], "tcp://127.0.0.1:0");
    assert_eq!(
        tcp[2],
        "1=l1-stenter,2=l1-spray-pump,3=l1-condenser,4=l1-hv-esp,5=l1-main-fan"
    );
    let rtu = fields(&rtu_over_tcp);
    assert_eq!(rtu[1], "rtu-over-tcp://127.0.0.1:0");
    assert_eq!(
        rtu[2],
        "1=l2-stenter,2=l2-spray-pump,3=l2-condenser,4=l2-hv-esp,5=l2-main-fan"
    );
    // The printed address serves RTU frames: DOMAIN.md's DTSU666 request.
    let address = rtu[0].strip_prefix("rtu-over-tcp://").unwrap();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream
        .write_all(&[0x01, 0x03, 0x20, 0x12, 0x00, 0x02, 0x6F, 0xCE])
        .unwrap();
    let mut reply = [0u8; 9];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..3], [0x01, 0x03, 0x04]);
    assert!(facwatch_proto::rtu::crc_ok(&reply), "{reply:02X?}");
    child.kill().unwrap();
    child.wait().unwrap();
}
