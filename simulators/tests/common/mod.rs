//! A small plant for the integration tests: meters of any profile on any
//! transport, the first measuring a 150 kW stenter that runs from 07:00 to
//! 22:00, the others 150 kW treatment facilities running with it, served on ephemeral ports (serial buses on a pty pair opened
//! here), read with tokio-modbus clients and decoded with the proto
//! profiles, as the gateway does.
#![allow(dead_code)] // each test file uses a part

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use facwatch_proto::clock::{wall_now_ms, Clock};
use facwatch_proto::profile::{FunctionCode, Quantity, RatioUse, ReadResult, ValueType};
use facwatch_proto::site::{Meter, Site, Transport};
use facwatch_proto::wire::Values;
use facwatch_sim::{bind, serve, Plant, Scenario, SimError};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_modbus::client::{rtu, tcp, Context, Reader};
use tokio_modbus::prelude::Slave;
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

pub(crate) const TEST_LIMIT: Duration = Duration::from_secs(30);
/// The virtual time the tests' clocks start at, inside the shift.
pub(crate) const START: &str = "2022-12-13T10:00:00+08:00";

pub(crate) async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("test took too long")
}

/// `tcp = ...` and friends for the site file.
pub(crate) const TCP: &str = "tcp = \"127.0.0.1:0\"";
pub(crate) const RTU_OVER_TCP: &str = "rtu_over_tcp = \"127.0.0.1:0\"\nbaud = 9600";

/// A serial bus on one end of a pty pair; the test talks on the other.
pub(crate) struct Pty {
    /// The end the test (the gateway's side) uses.
    pub(crate) master: SerialStream,
    /// Held open so the pty lives; the simulator opens it again by path.
    _slave: SerialStream,
    pub(crate) path: String,
}

impl Pty {
    pub(crate) fn open() -> Pty {
        let (master, slave) = SerialStream::pair().expect("cannot open a pty pair");
        let path = slave.name().expect("the pty has a path");
        Pty {
            master,
            _slave: slave,
            path,
        }
    }

    /// The transport lines of a meter on this bus.
    pub(crate) fn transport(&self) -> String {
        format!("serial = \"{}\"\nbaud = 9600\nparity = \"none\"", self.path)
    }
}

/// A generic register map: every type and word order class once, FC03 and
/// FC04 mixed.
pub(crate) const GENERIC_REGISTERS: &str = r#"
[[meters.registers]]
quantity = "power"
address = 100
type = "i32"
word_order = "CDAB"
unit = "W"

[[meters.registers]]
quantity = "energy"
address = 104
type = "f64"
word_order = "DCBA"
unit = "kWh"

[[meters.registers]]
quantity = "voltage"
phase = 1
address = 0
function = 4
type = "u16"
scale = 0.1
unit = "V"

[[meters.registers]]
quantity = "current"
phase = 1
address = 2
function = 4
type = "f32"
word_order = "BADC"
unit = "A"
"#;

/// One meter of the test site.
pub(crate) struct TestMeter {
    pub(crate) id: String,
    /// A built-in profile name or `generic` (with [`GENERIC_REGISTERS`]).
    pub(crate) profile: &'static str,
    /// Transport lines, e.g. [`TCP`].
    pub(crate) transport: String,
    pub(crate) unit: u8,
    /// More lines of the `[[meters]]` table, e.g. `timeout_ms = 100`.
    pub(crate) extra: String,
}

impl TestMeter {
    pub(crate) fn new(id: &str, profile: &'static str, transport: &str, unit: u8) -> TestMeter {
        TestMeter {
            id: id.into(),
            profile,
            transport: transport.into(),
            unit,
            extra: String::new(),
        }
    }

    pub(crate) fn with(mut self, extra: &str) -> TestMeter {
        self.extra = extra.into();
        self
    }
}

/// CT and PT ratios per profile: secondary-side models behind
/// transformers, so the ratios are exercised.
fn ratios(profile: &str) -> (f64, f64) {
    match profile {
        "dtsu666" => (40.0, 1.0),
        "adl400" => (20.0, 2.0),
        _ => (1.0, 1.0),
    }
}

pub(crate) fn site_toml(meters: &[TestMeter]) -> String {
    let mut site = String::from(
        "[site]\nid = \"sim-test\"\nname = \"Simulator test plant\"\ntime_zone = \"Asia/Shanghai\"\n\n\
         [[gateways]]\nid = \"gw-01\"\nmodbus_timeout_ms = 250\n\n",
    );
    for m in meters {
        let (ct, pt) = ratios(m.profile);
        write!(
            site,
            "[[meters]]\nid = \"{}\"\ngateway = \"gw-01\"\nprofile = \"{}\"\n{}\nunit = {}\n\
             ct_ratio = {ct}\npt_ratio = {pt}\n{}\n",
            m.id, m.profile, m.transport, m.unit, m.extra
        )
        .unwrap();
        if m.profile == "generic" {
            site.push_str(GENERIC_REGISTERS);
        }
        site.push('\n');
    }
    site.push_str("[[lines]]\nid = \"line1\"\nname = \"Line 1\"\n\n");
    for (i, m) in meters.iter().enumerate() {
        write!(
            site,
            "[[lines.facilities]]\nid = \"f-{id}\"\nkind = \"{kind}\"\n\
             meter = \"{id}\"\nrated_kw = 150\nstart_threshold_kw = 20\n\n",
            id = m.id,
            kind = if i == 0 { "stenter" } else { "treatment" },
        )
        .unwrap();
    }
    site
}

/// A scenario from [`START`] with the line producing, and `faults`
/// (`[[faults]]` tables without their window, separated by `----`), each
/// from [`START`] for two hours.
pub(crate) fn scenario_toml(faults: &str) -> String {
    let mut scenario = format!(
        "site_file = \"site.toml\"\nseed = 7\nstart = \"{START}\"\n\
         end = \"2022-12-14T00:00:00+08:00\"\ntime_scale = 1\n\n\
         [[shifts]]\nlines = [\"line1\"]\nproduction_start = \"07:00\"\n\
         production_end = \"22:00\"\ntreatment_lead_mins = 10\ntreatment_lag_mins = 20\n"
    );
    for fault in faults.split("----").filter(|f| !f.trim().is_empty()) {
        write!(
            scenario,
            "\n[[faults]]\n{}\nfrom = \"{START}\"\nuntil = \"2022-12-13T12:00:00+08:00\"\n",
            fault.trim()
        )
        .unwrap();
    }
    scenario
}

pub(crate) fn start_ms() -> i64 {
    DateTime::parse_from_rfc3339(START)
        .unwrap()
        .timestamp_millis()
}

pub(crate) struct Running {
    /// The site with the addresses rewritten to the bound ports.
    pub(crate) site: Site,
    pub(crate) plant: Plant,
    pub(crate) clock: Clock,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SimError>>,
}

/// Serves `meters` with `faults` (see [`scenario_toml`]), the clock at
/// [`START`] now, at real speed.
pub(crate) async fn start(meters: &[TestMeter], faults: &str) -> Running {
    let site = Site::from_toml(&site_toml(meters), "site.toml").unwrap();
    let scenario = Scenario::from_toml(&scenario_toml(faults), "scenario.toml", site).unwrap();
    let plant = Plant::new(&scenario);
    let (endpoints, site) = bind(&scenario.site, true).await.unwrap();
    let clock = Clock::simulated(start_ms(), wall_now_ms(), 1.0);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(
        Arc::new(scenario),
        clock,
        endpoints,
        shutdown.clone(),
    ));
    Running {
        site,
        plant,
        clock,
        shutdown,
        task,
    }
}

impl Running {
    pub(crate) fn meter(&self, id: &str) -> &Meter {
        self.site.meter(id).unwrap()
    }

    pub(crate) fn address(&self, id: &str) -> SocketAddr {
        match self.meter(id).transport {
            Transport::Tcp(address) | Transport::RtuOverTcp { address, .. } => address,
            ref other => panic!("{id} is not on TCP: {other:?}"),
        }
    }

    /// A tokio-modbus client for `id`: Modbus TCP, or RTU over a TCP
    /// connection, as its transport says.
    pub(crate) async fn connect(&self, id: &str) -> Context {
        let meter = self.meter(id);
        let slave = Slave(meter.unit);
        match meter.transport {
            Transport::Tcp(address) => tcp::connect_slave(address, slave).await.unwrap(),
            Transport::RtuOverTcp { address, .. } => {
                rtu::attach_slave(TcpStream::connect(address).await.unwrap(), slave)
            }
            ref other => panic!("{id} is not on TCP: {other:?}"),
        }
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Checks `values` read from `id` between virtual times `from_ms` and
    /// `to_ms` against the plant: power equal to the plant's at one second
    /// of that span, energy between the plant's at both ends, each within
    /// the resolution of its register.
    pub(crate) fn assert_read_from_plant(
        &self,
        id: &str,
        values: &Values,
        from_ms: i64,
        to_ms: i64,
    ) {
        let meter = self.meter(id);
        let power = f64::from(values.power_kw.expect("power"));
        let power_resolution = resolution(meter, Quantity::Power, power);
        let matches = (from_ms.div_euclid(1000)..=to_ms.div_euclid(1000)).any(|second| {
            let plant = self.plant.values(id, second * 1000).unwrap();
            (f64::from(plant.power_kw.unwrap()) - power).abs() <= power_resolution
        });
        let plant_power = self.plant.values(id, from_ms).unwrap().power_kw.unwrap();
        assert!(
            matches,
            "{id} ({}): {power} kW read, the plant drew {plant_power} kW (+- {power_resolution})",
            meter.profile.name
        );
        // Running: 150 kW * 0.75 (stenter) or 0.8 (treatment), 3 % noise.
        assert!((109.0..=124.0).contains(&power), "{id}: {power} kW");
        let energy = values.energy_kwh.expect("energy");
        let energy_resolution = resolution(meter, Quantity::Energy, energy);
        let low = self.plant.values(id, from_ms).unwrap().energy_kwh.unwrap();
        let high = self.plant.values(id, to_ms).unwrap().energy_kwh.unwrap();
        assert!(
            low - energy_resolution <= energy && energy <= high + energy_resolution,
            "{id}: {energy} kWh read, the plant counted {low}..{high} kWh"
        );
    }
}

/// How far a decoded value of `quantity` may be from the plant's: half a
/// step of an integer register, a few float rounding steps otherwise.
fn resolution(meter: &Meter, quantity: Quantity, value: f64) -> f64 {
    let field = meter
        .profile
        .fields
        .iter()
        .find(|f| f.quantity == quantity)
        .unwrap();
    let ratio = match field.ratios {
        RatioUse::None => 1.0,
        RatioUse::Ct => meter.ratios.ct,
        RatioUse::Pt => meter.ratios.pt,
        RatioUse::CtPt => meter.ratios.ct * meter.ratios.pt,
    };
    match field.value_type {
        ValueType::F32 | ValueType::F64 => value.abs() * 1e-6 + 1e-9,
        _ => (field.scale * ratio).abs() * 0.5 + value.abs() * 1e-6,
    }
}

/// One poll of `meter` as the gateway makes it: every read of its profile,
/// decoded with its ratios.
pub(crate) async fn poll(ctx: &mut Context, meter: &Meter) -> Values {
    let profile = &meter.profile;
    let mut results = Vec::new();
    for read in profile.reads(meter.read_limits) {
        let words = match read.function {
            FunctionCode::ReadHoldingRegisters => {
                ctx.read_holding_registers(read.address, read.count).await
            }
            FunctionCode::ReadInputRegisters => {
                ctx.read_input_registers(read.address, read.count).await
            }
        };
        results.push(ReadResult {
            function: read.function,
            address: read.address,
            words: words
                .unwrap_or_else(|e| panic!("{}: {read:?}: {e}", meter.id))
                .unwrap_or_else(|e| panic!("{}: {read:?}: exception {e}", meter.id)),
        });
    }
    profile.decode(&results, meter.ratios).unwrap()
}

/// The six built-in profiles and `generic`.
pub(crate) const PROFILES: [&str; 7] = [
    "dtsu666", "ddsu666", "adl400", "adw300", "sdm630", "sdm120", "generic",
];
