//! mbpoll (libmodbus), a Modbus client we did not write, reads our
//! simulator: `facwatch-sim` serves meters of several profiles over Modbus
//! TCP and over Modbus RTU on one end of a socat pty pair, and every read
//! block of every meter must hold, word for word, what the meter's profile
//! encodes for the plant's values; the power register, decoded by mbpoll
//! itself (big-endian float or 32-bit integer), must equal the plant's
//! power.
//!
//! The plant's values are known exactly because the scenario's clock is
//! frozen: `time_scale = 0.001` and the clock anchored at the simulator's
//! start keep virtual time within the scenario's first second for 1000 s of
//! wall time, and the plant's readings are a function of (seed, meter,
//! virtual second) (`facwatch_sim::plant`), so [`Plant::values`] at the
//! scenario start is what the simulator serves.
//!
//! Needs `mbpoll` and `socat` and the workspace binaries built: `.ci/run`
//! provides them. Run with
//! `cargo test -p facwatch --features interop --test interop_mbpoll`.
#![cfg(feature = "interop")]

mod interop;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use facwatch_proto::clock::wall_now_ms;
use facwatch_proto::profile::{FunctionCode, Quantity, ValueType};
use facwatch_proto::site::Meter;
use facwatch_sim::{Plant, Scenario};
use interop::{free_port, multiplier, pty_pair, run, workspace_binary, Process, READY_TIMEOUT};

/// A simulated meter and the facility it measures.
struct SimMeter {
    profile: &'static str,
    unit: u8,
    /// `ct_ratio` and `pt_ratio` in the site file.
    ratios: (f64, f64),
    facility_kind: &'static str,
    rated_kw: f64,
}

/// Meters of all six profiles; the first measures the line's production.
const TCP_METERS: [SimMeter; 6] = [
    meter("dtsu666", 11, (40.0, 1.0), "stenter", 150.0),
    meter("ddsu666", 12, (1.0, 1.0), "spray_pump", 5.5),
    meter("adl400", 13, (20.0, 2.0), "main_fan", 22.0),
    meter("adw300", 14, (1.0, 1.0), "condenser", 7.5),
    meter("sdm630", 15, (1.0, 1.0), "hv_esp", 10.0),
    meter("sdm120", 16, (1.0, 1.0), "treatment", 3.0),
];

/// Four meters on one RS-485 bus: floats and integers, FC03 and FC04.
const SERIAL_METERS: [SimMeter; 4] = [
    meter("dtsu666", 1, (40.0, 1.0), "stenter", 150.0),
    meter("sdm630", 2, (1.0, 1.0), "main_fan", 22.0),
    meter("adl400", 3, (20.0, 1.0), "condenser", 7.5),
    meter("sdm120", 4, (1.0, 1.0), "spray_pump", 5.5),
];

const fn meter(
    profile: &'static str,
    unit: u8,
    ratios: (f64, f64),
    facility_kind: &'static str,
    rated_kw: f64,
) -> SimMeter {
    SimMeter {
        profile,
        unit,
        ratios,
        facility_kind,
        rated_kw,
    }
}

/// The site file: `transport` is the meters' transport lines (e.g.
/// `tcp = "127.0.0.1:1502"`); one line whose shift runs at the scenario
/// start, so every facility draws its running load.
fn site_toml(meters: &[SimMeter], transport: &str) -> String {
    let mut site = String::from(
        "[site]\nid = \"interop\"\ntime_zone = \"Asia/Shanghai\"\n\n\
         [[gateways]]\nid = \"gw-01\"\n\n",
    );
    for m in meters {
        let (ct, pt) = m.ratios;
        write!(
            site,
            "[[meters]]\nid = \"m-{p}-{u}\"\ngateway = \"gw-01\"\nprofile = \"{p}\"\n\
             {transport}\nunit = {u}\nct_ratio = {ct}\npt_ratio = {pt}\n\n",
            p = m.profile,
            u = m.unit,
        )
        .unwrap();
    }
    site.push_str("[[lines]]\nid = \"line1\"\n\n");
    for m in meters {
        write!(
            site,
            "[[lines.facilities]]\nid = \"f-{p}-{u}\"\nkind = \"{k}\"\nmeter = \"m-{p}-{u}\"\n\
             rated_kw = {r:?}\nstart_threshold_kw = {t:?}\n\n",
            p = m.profile,
            u = m.unit,
            k = m.facility_kind,
            r = m.rated_kw,
            t = m.rated_kw / 10.0,
        )
        .unwrap();
    }
    site
}

/// A day from 10:00, production 07:00-22:00, with the clock nearly frozen.
const SCENARIO: &str = r#"
site_file = "site.toml"
seed = 20221213
start = "2022-12-13T10:00:00+08:00"
end = "2022-12-14T00:00:00+08:00"
time_scale = 0.001

[[shifts]]
lines = ["line1"]
production_start = "07:00"
production_end = "22:00"
treatment_lead_mins = 10
treatment_lag_mins = 20
"#;

/// Writes the site and scenario into `dir`; returns the scenario's path.
fn write_scenario(dir: &Path, meters: &[SimMeter], transport: &str) -> PathBuf {
    std::fs::write(dir.join("site.toml"), site_toml(meters, transport)).unwrap();
    let path = dir.join("scenario.toml");
    std::fs::write(&path, SCENARIO).unwrap();
    path
}

/// Starts `facwatch-sim` on `scenario`, its clock anchored now.
fn start_simulator(scenario: &Path) -> Process {
    let mut command = Command::new(workspace_binary("facwatch-sim"));
    command
        .arg("--scenario")
        .arg(scenario)
        .arg("--clock-anchor-unix-ms")
        .arg(wall_now_ms().to_string());
    Process::spawn("facwatch-sim", command)
}

/// How mbpoll reaches the simulator: mode flags, then the host or device
/// (mbpoll takes it after the options).
struct Connection {
    flags: Vec<&'static str>,
    port: Option<u16>,
    target: PathBuf,
}

/// One mbpoll read: `data_type` is table 3 (input) or 4 (holding) with an
/// optional `:hex`, `:float` or `:int` suffix; PDU addresses (`-0`),
/// big-endian word order (`-B`), one poll (`-1`). Returns `(address, first
/// token of the value)` per printed value.
fn mbpoll(
    connection: &Connection,
    unit: u8,
    address: u16,
    count: u16,
    data_type: &str,
) -> Vec<(u16, String)> {
    let mut command = Command::new("mbpoll");
    command.args(&connection.flags);
    if let Some(port) = connection.port {
        command.args(["-p", &port.to_string()]);
    }
    command
        .args(["-a", &unit.to_string()])
        .args(["-0", "-r", &address.to_string()])
        .args(["-c", &count.to_string()])
        .args(["-t", data_type, "-B", "-1", "-o", "2"])
        .arg(&connection.target);
    let what = format!("{command:?}");
    let finished = run("mbpoll", command).expect_success(&what);
    // Values print as `[ADDRESS]: \tVALUE`, 16-bit ones as `65535 (-1)`.
    let values: Vec<(u16, String)> = finished
        .stdout
        .lines()
        .filter_map(|line| {
            let (address, value) = line.strip_prefix('[')?.split_once("]:")?;
            let value = value.split_whitespace().next()?;
            Some((address.parse().ok()?, value.to_string()))
        })
        .collect();
    assert!(
        !values.is_empty(),
        "{what} printed no values:\n{}",
        finished.stdout
    );
    values
}

/// `4` for FC03, `3` for FC04 (mbpoll's table names).
fn table(function: FunctionCode) -> &'static str {
    match function {
        FunctionCode::ReadHoldingRegisters => "4",
        FunctionCode::ReadInputRegisters => "3",
    }
}

/// Reads every block and the power register of `meter` with mbpoll and
/// compares them with what the simulator must serve at the scenario start;
/// returns the mismatches as text.
fn check_meter(
    connection: &Connection,
    meter: &Meter,
    plant: &Plant,
    start_ms: i64,
) -> Vec<String> {
    let values = plant
        .values(&meter.id, start_ms)
        .expect("the plant models every meter of its site");
    let words: HashMap<(FunctionCode, u16), u16> = meter
        .profile
        .encode(&values, meter.ratios)
        .into_iter()
        .map(|(function, address, word)| ((function, address), word))
        .collect();
    let mut problems = Vec::new();
    let name = format!("{} (unit {})", meter.id, meter.unit);

    // Word for word, each block the gateway would read. Registers of a
    // block the profile does not model read 0.
    for read in meter.profile.reads(meter.read_limits) {
        let hex = format!("{}:hex", table(read.function));
        let got = mbpoll(connection, meter.unit, read.address, read.count, &hex);
        let expected: Vec<(u16, String)> = (read.address..read.address + read.count)
            .map(|a| {
                let word = words.get(&(read.function, a)).copied().unwrap_or(0);
                (a, format!("0x{word:04X}"))
            })
            .collect();
        if got != expected {
            problems.push(format!(
                "{name}: FC{:02} block at {}: mbpoll read {got:?}, expected {expected:?}",
                read.function.code(),
                read.address
            ));
        }
    }

    // The power register decoded by libmodbus/mbpoll, not by us.
    let power = meter
        .profile
        .fields
        .iter()
        .find(|f| f.quantity == Quantity::Power)
        .expect("every profile has power");
    let (suffix, count) = match power.value_type {
        ValueType::F32 => ("float", 1),
        ValueType::I32 | ValueType::U32 => ("int", 1),
        ValueType::U16 | ValueType::I16 | ValueType::F64 => {
            unreachable!("no built-in profile keeps power in {:?}", power.value_type)
        }
    };
    let data_type = format!("{}:{suffix}", table(power.function));
    let got = mbpoll(connection, meter.unit, power.address, count, &data_type);
    let expected_kw = f64::from(values.power_kw.expect("the plant gives power"));
    let step = multiplier(power, meter.ratios);
    // mbpoll prints floats with 6 significant digits; integers round to
    // half a step.
    let allowed = match power.value_type {
        ValueType::F32 => 1e-5 * expected_kw.abs(),
        _ => 0.5 * step.abs() + 1e-9,
    };
    match got.first().map(|(_, v)| v.parse::<f64>()) {
        Some(Ok(raw)) if (raw * step - expected_kw).abs() <= allowed => {}
        _ => problems.push(format!(
            "{name}: power register {} as {data_type}: mbpoll read {got:?} (x {step}), expected {expected_kw} kW ± {allowed}",
            power.address
        )),
    }
    problems
}

fn check_all(connection: &Connection, scenario: &Scenario) {
    let plant = Plant::new(scenario);
    let mut problems = Vec::new();
    for meter in &scenario.site.meters {
        problems.extend(check_meter(connection, meter, &plant, scenario.start_ms));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn mbpoll_reads_the_simulated_meters_of_every_profile_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = write_scenario(
        dir.path(),
        &TCP_METERS,
        &format!("tcp = \"127.0.0.1:{port}\""),
    );
    let scenario = Scenario::load(&path).expect("the test's scenario is valid");
    let mut simulator = start_simulator(&path);
    simulator.wait_for_tcp(([127, 0, 0, 1], port).into(), READY_TIMEOUT);
    let connection = Connection {
        flags: vec!["-m", "tcp"],
        port: Some(port),
        target: PathBuf::from("127.0.0.1"),
    };
    check_all(&connection, &scenario);
}

#[test]
fn mbpoll_reads_the_simulated_meters_over_rtu_on_a_pty() {
    let dir = tempfile::tempdir().unwrap();
    let pty = pty_pair(dir.path());
    let path = write_scenario(
        dir.path(),
        &SERIAL_METERS,
        &format!(
            "serial = \"{}\"\nbaud = 9600\nparity = \"none\"",
            pty.a.display()
        ),
    );
    let scenario = Scenario::load(&path).expect("the test's scenario is valid");
    let mut simulator = start_simulator(&path);
    simulator.wait_until_open(&pty.a, READY_TIMEOUT);
    let connection = Connection {
        flags: vec![
            "-m", "rtu", "-b", "9600", "-P", "none", "-d", "8", "-s", "1",
        ],
        port: None,
        target: pty.b.clone(),
    };
    check_all(&connection, &scenario);
}
