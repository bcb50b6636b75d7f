//! `facwatch-gateway probe` against pymodbus, a Modbus server we did not
//! write: for every built-in profile, known values are encoded with the
//! profile's own table into a register image, pymodbus serves the image, and
//! the probe must print the known values back (within the resolution of the
//! register type), over Modbus TCP and over Modbus RTU on a socat pty pair.
//!
//! The encoding side is facwatch's, so this alone would not catch a table
//! that is wrong the same way in both directions (the proto unit tests pin
//! the tables to the vendors' addresses and hand-made words); what it does
//! catch is everything between the table and the values: framing, unit ids,
//! function codes, block reads, word order on a foreign stack, CT/PT ratios
//! passed on the command line, and the probe's JSON.
//!
//! Needs `python3` with pymodbus (~=3.16 with pyserial) and `socat`, and
//! the workspace binaries built: `.ci/run` provides all three. Run with
//! `cargo test -p facwatch --features interop --test interop_probe`.
#![cfg(feature = "interop")]

mod interop;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use facwatch_proto::profile::{FunctionCode, Profile, ProfileName, Quantity, Ratios, ValueType};
use facwatch_proto::wire::Values;
use interop::{
    free_port, multiplier, pty_pair, run, script, workspace_binary, Pipe, Process, READY_TIMEOUT,
};
use serde_json::{json, Value};

/// The values every simulated meter holds. Each is a whole number of the
/// coarsest integer step used below (0.2 V, 0.2 A, 0.04 kW, 0.4 kWh with
/// ADL400's ratios), so integer registers hold them exactly too.
fn known_values() -> Values {
    Values {
        power_kw: Some(8.24),
        energy_kwh: Some(12_345.6),
        voltage_v: vec![230.2, 229.8, 231.4],
        current_a: vec![12.4, 11.8, 12.6],
        power_factor: Some(0.87),
    }
}

/// One meter served by pymodbus: its profile, unit id and ratios.
struct Meter {
    profile: ProfileName,
    unit: u8,
    ratios: Ratios,
}

/// One meter of every built-in profile, units 11..=16; the two that report
/// secondary-side values sit behind transformers.
fn meters() -> Vec<Meter> {
    ProfileName::ALL
        .into_iter()
        .zip(11u8..)
        .map(|(profile, unit)| Meter {
            profile,
            unit,
            ratios: match profile {
                ProfileName::Dtsu666 => Ratios { ct: 40.0, pt: 1.0 },
                ProfileName::Adl400 => Ratios { ct: 20.0, pt: 2.0 },
                _ => Ratios::default(),
            },
        })
        .collect()
}

/// The pymodbus register image (see `tests/interop/pymodbus_meters.py`).
fn register_image(meters: &[Meter]) -> Value {
    let mut units = serde_json::Map::new();
    for meter in meters {
        let mut holding = BTreeMap::new();
        let mut input = BTreeMap::new();
        for (function, address, word) in
            Profile::builtin(meter.profile).encode(&known_values(), meter.ratios)
        {
            let table = match function {
                FunctionCode::ReadHoldingRegisters => &mut holding,
                FunctionCode::ReadInputRegisters => &mut input,
            };
            table.insert(address.to_string(), word);
        }
        units.insert(
            meter.unit.to_string(),
            json!({ "holding": holding, "input": input }),
        );
    }
    json!({ "units": units })
}

/// Starts pymodbus serving `image` with `transport` arguments (`tcp PORT`
/// or `rtu DEVICE BAUD`) and waits for its READY line.
fn start_pymodbus(dir: &Path, meters: &[Meter], transport: &[String]) -> Process {
    let image = dir.join("image.json");
    std::fs::write(&image, register_image(meters).to_string()).expect("writing the image");
    let mut command = Command::new("python3");
    command
        .arg(script("pymodbus_meters.py"))
        .arg(&image)
        .args(transport);
    let mut pymodbus = Process::spawn("pymodbus", command);
    pymodbus.wait_for_line(Pipe::Stdout, READY_TIMEOUT, |l| l.trim() == "READY");
    pymodbus
}

/// Runs `facwatch-gateway probe ... --json` for `meter` over `transport`
/// and returns its JSON.
fn probe(meter: &Meter, transport: &[String]) -> Value {
    let mut command = Command::new(workspace_binary("facwatch-gateway"));
    command
        .arg("probe")
        .args(["--profile", meter.profile.as_str()])
        .args(transport)
        .args(["--unit", &meter.unit.to_string()])
        .args(["--timeout-ms", "2000", "--json"]);
    if meter.ratios != Ratios::default() {
        command
            .args(["--ct", &meter.ratios.ct.to_string()])
            .args(["--pt", &meter.ratios.pt.to_string()]);
    }
    let what = format!("probe of {} (unit {})", meter.profile.as_str(), meter.unit);
    let finished = run("facwatch-gateway probe", command).expect_success(&what);
    serde_json::from_str(finished.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{what} did not print one JSON object ({e}):\n{}",
            finished.stdout
        )
    })
}

/// How far a decoded value may be from the known one: half a step of an
/// integer register (it rounds), or a few f32 ulps of a float register.
fn tolerance(profile: &Profile, quantity: Quantity, ratios: Ratios, expected: f64) -> f64 {
    let field = profile
        .fields
        .iter()
        .find(|f| f.quantity == quantity)
        .expect("asked only for quantities the profile has");
    let step = multiplier(field, ratios);
    match field.value_type {
        ValueType::F32 | ValueType::F64 => 4.0 * f64::from(f32::EPSILON) * expected.abs(),
        _ => 0.5 * step.abs() + 1e-9,
    }
}

/// Compares the probe's JSON with the known values for every quantity the
/// profile has; returns the mismatches as text.
fn mismatches(meter: &Meter, got: &Value) -> Vec<String> {
    let profile = Profile::builtin(meter.profile);
    let known = known_values();
    let has = |q: fn(Quantity) -> bool| profile.fields.iter().any(|f| q(f.quantity));
    let phases =
        |q: fn(Quantity) -> Option<u8>| profile.fields.iter().filter_map(|f| q(f.quantity)).count();
    let mut expected: Vec<(String, Quantity, f64)> = Vec::new();
    expected.push((
        "power_kw".into(),
        Quantity::Power,
        f64::from(known.power_kw.unwrap()),
    ));
    if has(|q| q == Quantity::Energy) {
        expected.push((
            "energy_kwh".into(),
            Quantity::Energy,
            known.energy_kwh.unwrap(),
        ));
    }
    if has(|q| q == Quantity::PowerFactor) {
        expected.push((
            "power_factor".into(),
            Quantity::PowerFactor,
            f64::from(known.power_factor.unwrap()),
        ));
    }
    let voltages = phases(|q| match q {
        Quantity::Voltage(p) => Some(p),
        _ => None,
    });
    let currents = phases(|q| match q {
        Quantity::Current(p) => Some(p),
        _ => None,
    });
    for phase in 0..voltages {
        expected.push((
            format!("voltage_v/{phase}"),
            Quantity::Voltage(phase as u8),
            f64::from(known.voltage_v[phase]),
        ));
    }
    for phase in 0..currents {
        expected.push((
            format!("current_a/{phase}"),
            Quantity::Current(phase as u8),
            f64::from(known.current_a[phase]),
        ));
    }

    let mut problems = Vec::new();
    for (key, present) in [
        ("energy_kwh", has(|q| q == Quantity::Energy)),
        ("power_factor", has(|q| q == Quantity::PowerFactor)),
    ] {
        if !present && got.get(key).is_some_and(|v| !v.is_null()) {
            problems.push(format!(
                "`{key}` printed, but the profile has no such register"
            ));
        }
    }
    for (key, array_len) in [("voltage_v", voltages), ("current_a", currents)] {
        let len = got.get(key).and_then(Value::as_array).map(Vec::len);
        if len != Some(array_len) {
            problems.push(format!(
                "`{key}` should have {array_len} phases, got {len:?}"
            ));
        }
    }
    for (key, quantity, want) in expected {
        let pointer = format!("/{key}");
        let Some(value) = got.pointer(&pointer).and_then(Value::as_f64) else {
            problems.push(format!("`{key}` missing or not a number"));
            continue;
        };
        let allowed = tolerance(&profile, quantity, meter.ratios, want);
        if (value - want).abs() > allowed {
            problems.push(format!("`{key}` = {value}, expected {want} ± {allowed}"));
        }
    }
    problems
        .into_iter()
        .map(|p| {
            format!(
                "{} (unit {}): {p}; probe printed {got}",
                meter.profile.as_str(),
                meter.unit
            )
        })
        .collect()
}

/// Probes every meter over `transport` and asserts no mismatches.
fn probe_all(meters: &[Meter], transport: &[String]) {
    let mut problems = Vec::new();
    for meter in meters {
        problems.extend(mismatches(meter, &probe(meter, transport)));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn probe_reads_every_profile_from_pymodbus_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let meters = meters();
    let port = free_port();
    let _pymodbus = start_pymodbus(dir.path(), &meters, &["tcp".into(), port.to_string()]);
    probe_all(&meters, &["--tcp".into(), format!("127.0.0.1:{port}")]);
}

#[test]
fn probe_reads_every_profile_from_pymodbus_over_rtu_on_a_pty() {
    let dir = tempfile::tempdir().unwrap();
    let meters = meters();
    let pty = pty_pair(dir.path());
    let _pymodbus = start_pymodbus(
        dir.path(),
        &meters,
        &["rtu".into(), pty.a.display().to_string(), "9600".into()],
    );
    probe_all(
        &meters,
        &[
            "--serial".into(),
            pty.b.display().to_string(),
            "--baud".into(),
            "9600".into(),
            "--parity".into(),
            "none".into(),
        ],
    );
}

#[test]
fn the_register_image_holds_each_profiles_words_at_their_addresses() {
    // Pins the image format the script reads: DTSU666's power at 0x2012 in
    // the holding table, as f32 ABCD of 8.24 kW / (0.0001 * CT 40) = 2060.0.
    let image = register_image(&meters());
    let words = 2060.0f32.to_bits();
    assert_eq!(image["units"]["11"]["holding"]["8210"], json!(words >> 16));
    assert_eq!(
        image["units"]["11"]["holding"]["8211"],
        json!(words & 0xFFFF)
    );
    assert_eq!(image["units"]["11"]["input"], json!({}));
    // SDM630 (unit 15) answers FC04 only.
    assert_eq!(image["units"]["15"]["holding"], json!({}));
    assert!(image["units"]["15"]["input"]["52"].is_u64());
}
