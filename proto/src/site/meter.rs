//! `[[meters]]` of the site file: how a meter is reached (transport, unit
//! id, serial line), what it speaks (built-in profile or a `generic`
//! register map) and how hard to try (timeout, retries, read coalescing).
//!
//! Invariants of a validated [`Meter`]: exactly one transport; serial line
//! settings only where a serial line exists; a `generic` profile has at
//! least a power register and every register's unit fits its quantity.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::profile::{
    Field, FunctionCode, Parity, Profile, ProfileName, Quantity, RatioUse, Ratios, ReadLimits,
    ValueType, WordOrder, MAX_REGISTERS_PER_READ,
};

/// A validated meter.
#[derive(Debug, Clone, PartialEq)]
pub struct Meter {
    pub id: String,
    pub gateway: String,
    pub profile: Profile,
    pub transport: Transport,
    pub unit: u8,
    pub ratios: Ratios,
    pub read_limits: ReadLimits,
    /// Limit on each request to this meter (wall clock).
    pub timeout: Duration,
    /// Extra attempts after a timeout within one poll.
    pub retries: u32,
}

/// How the gateway reaches a meter. Meters with the same [`Transport::bus`]
/// share one line: one request at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Modbus TCP (a meter with Ethernet, or a Modbus TCP device server).
    Tcp(SocketAddr),
    /// Modbus RTU frames over a TCP socket (a transparent serial device
    /// server); `baud` is the remote RS-485 line's.
    RtuOverTcp { address: SocketAddr, baud: u32 },
    /// Modbus RTU on a local serial port (RS-485 adapter).
    Serial(SerialLine),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    pub path: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl Transport {
    /// Names the shared line: meters with equal keys are polled one
    /// request at a time.
    pub fn bus(&self) -> String {
        match self {
            Transport::Tcp(a) => format!("tcp://{a}"),
            Transport::RtuOverTcp { address, .. } => format!("rtu-over-tcp://{address}"),
            Transport::Serial(line) => format!("serial://{}", line.path),
        }
    }

    /// Silence required between two RTU frames: 3.5 character times at the
    /// line's baud rate (11 bits a character), fixed at 1.75 ms above
    /// 19200 baud as the Modbus serial line guide says. Zero for TCP.
    pub fn inter_frame_silence(&self) -> Duration {
        let baud = match self {
            Transport::Tcp(_) => return Duration::ZERO,
            Transport::RtuOverTcp { baud, .. } => *baud,
            Transport::Serial(line) => line.baud,
        };
        if baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            Duration::from_secs_f64(3.5 * 11.0 / f64::from(baud.max(1)))
        }
    }
}

/// `[[meters]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MeterSection {
    id: String,
    gateway: String,
    profile: String,
    tcp: Option<String>,
    rtu_over_tcp: Option<String>,
    serial: Option<String>,
    baud: Option<u32>,
    parity: Option<Parity>,
    data_bits: Option<u8>,
    stop_bits: Option<u8>,
    unit: u8,
    #[serde(default = "one")]
    ct_ratio: f64,
    #[serde(default = "one")]
    pt_ratio: f64,
    timeout_ms: Option<u64>,
    #[serde(default = "default_retries")]
    retries: u32,
    max_registers_per_read: Option<u16>,
    max_gap_registers: Option<u16>,
    #[serde(default)]
    registers: Vec<RegisterSection>,
}

fn one() -> f64 {
    1.0
}

fn default_retries() -> u32 {
    1
}

/// `[[meters.registers]]` of a `generic` meter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterSection {
    quantity: String,
    /// 1-based phase, for voltage and current.
    phase: Option<u8>,
    address: u16,
    #[serde(default = "default_function")]
    function: u8,
    #[serde(rename = "type", default = "default_type")]
    value_type: String,
    #[serde(default = "default_word_order")]
    word_order: String,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    offset: f64,
    unit: Option<String>,
}

fn default_function() -> u8 {
    3
}
fn default_type() -> String {
    "f32".into()
}
fn default_word_order() -> String {
    "ABCD".into()
}

/// Validates one meter; `key(k)` names `meters[i].k`.
pub(super) fn validate(
    m: &MeterSection,
    default_timeout: Duration,
    file: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<Meter, ConfigError> {
    let err = |k: &str, problem: String| ConfigError::new(file, key(k), problem);
    let builtin = if m.profile == "generic" {
        None
    } else {
        Some(
            m.profile
                .parse::<ProfileName>()
                .map_err(|p| err("profile", p))?,
        )
    };
    let profile = match builtin {
        Some(name) => {
            if !m.registers.is_empty() {
                return Err(err(
                    "registers",
                    format!(
                        "only a `generic` meter has registers; `{}` has its own map",
                        m.profile
                    ),
                ));
            }
            Profile::builtin(name)
        }
        None => generic_profile(&m.registers, file, key)?,
    };
    let (default_baud, default_parity) =
        builtin.map_or((9600, Parity::None), |n| n.default_serial());

    let address = |k: &str, text: &str| -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|_| {
            err(
                k,
                format!("`{text}` is not a HOST:PORT socket address (e.g. 192.168.1.20:502)"),
            )
        })
    };
    let serial_only = |k: &str, set: bool| -> Result<(), ConfigError> {
        if set {
            return Err(err(k, "applies only to a meter on a `serial` port".into()));
        }
        Ok(())
    };
    let transport = match (&m.tcp, &m.rtu_over_tcp, &m.serial) {
        (Some(tcp), None, None) => {
            serial_only("baud", m.baud.is_some())?;
            serial_only("parity", m.parity.is_some())?;
            serial_only("data_bits", m.data_bits.is_some())?;
            serial_only("stop_bits", m.stop_bits.is_some())?;
            Transport::Tcp(address("tcp", tcp)?)
        }
        (None, Some(a), None) => {
            serial_only("parity", m.parity.is_some())?;
            serial_only("data_bits", m.data_bits.is_some())?;
            serial_only("stop_bits", m.stop_bits.is_some())?;
            Transport::RtuOverTcp {
                address: address("rtu_over_tcp", a)?,
                baud: baud(m.baud.unwrap_or(default_baud), file, &key("baud"))?,
            }
        }
        (None, None, Some(path)) => {
            if path.is_empty() {
                return Err(err(
                    "serial",
                    "must name a serial port, e.g. /dev/ttyUSB0".into(),
                ));
            }
            let data_bits = m.data_bits.unwrap_or(8);
            if !(7..=8).contains(&data_bits) {
                return Err(err("data_bits", format!("{data_bits} is not 7 or 8")));
            }
            let stop_bits = m.stop_bits.unwrap_or(1);
            if !(1..=2).contains(&stop_bits) {
                return Err(err("stop_bits", format!("{stop_bits} is not 1 or 2")));
            }
            Transport::Serial(SerialLine {
                path: path.clone(),
                baud: baud(m.baud.unwrap_or(default_baud), file, &key("baud"))?,
                parity: m.parity.unwrap_or(default_parity),
                data_bits,
                stop_bits,
            })
        }
        _ => {
            return Err(err(
                "tcp",
                "give exactly one of `tcp`, `rtu_over_tcp` and `serial`".into(),
            ))
        }
    };

    if m.unit == 0 || m.unit > 247 {
        return Err(err(
            "unit",
            format!("unit id {} is outside 1..=247", m.unit),
        ));
    }
    for (name, value) in [("ct_ratio", m.ct_ratio), ("pt_ratio", m.pt_ratio)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(err(name, format!("{value} must be a positive number")));
        }
    }
    let timeout = match m.timeout_ms {
        Some(0) => return Err(err("timeout_ms", "must be greater than 0".into())),
        Some(ms) => Duration::from_millis(ms),
        None => default_timeout,
    };
    if m.retries > 10 {
        return Err(err("retries", format!("{} is more than 10", m.retries)));
    }
    let defaults = ReadLimits::default();
    let max_registers = m.max_registers_per_read.unwrap_or(defaults.max_registers);
    if !(4..=MAX_REGISTERS_PER_READ).contains(&max_registers) {
        return Err(err(
            "max_registers_per_read",
            format!("{max_registers} is outside 4..={MAX_REGISTERS_PER_READ}"),
        ));
    }
    Ok(Meter {
        id: m.id.clone(),
        gateway: m.gateway.clone(),
        profile,
        transport,
        unit: m.unit,
        ratios: Ratios {
            ct: m.ct_ratio,
            pt: m.pt_ratio,
        },
        read_limits: ReadLimits {
            max_registers,
            max_gap: m.max_gap_registers.unwrap_or(defaults.max_gap),
        },
        timeout,
        retries: m.retries,
    })
}

pub(super) fn meter_id(m: &MeterSection) -> &str {
    &m.id
}

pub(super) fn meter_gateway(m: &MeterSection) -> &str {
    &m.gateway
}

fn baud(baud: u32, file: &str, key: &str) -> Result<u32, ConfigError> {
    if !(300..=921_600).contains(&baud) {
        return Err(ConfigError::new(
            file,
            key,
            format!("{baud} is outside 300..=921600"),
        ));
    }
    Ok(baud)
}

fn generic_profile(
    registers: &[RegisterSection],
    file: &str,
    meter_key: &dyn Fn(&str) -> String,
) -> Result<Profile, ConfigError> {
    let mut fields = Vec::new();
    for (i, r) in registers.iter().enumerate() {
        let key = |k: &str| meter_key(&format!("registers[{i}].{k}"));
        let err = |k: &str, problem: String| ConfigError::new(file, key(k), problem);
        let phase = match r.phase {
            None => 0,
            Some(p @ 1..=3) => p - 1,
            Some(p) => return Err(err("phase", format!("{p} is not 1, 2 or 3"))),
        };
        // (quantity, accepted units with their factor to facwatch's unit)
        let (quantity, units): (Quantity, &[(&str, f64)]) = match r.quantity.as_str() {
            "power" => (Quantity::Power, &[("kW", 1.0), ("W", 0.001)]),
            "energy" => (
                Quantity::Energy,
                &[("kWh", 1.0), ("Wh", 0.001), ("MWh", 1000.0)],
            ),
            "voltage" => (Quantity::Voltage(phase), &[("V", 1.0), ("kV", 1000.0)]),
            "current" => (Quantity::Current(phase), &[("A", 1.0), ("mA", 0.001)]),
            "power_factor" => (Quantity::PowerFactor, &[]),
            other => {
                return Err(err(
                    "quantity",
                    format!(
                    "unknown quantity `{other}` (power, energy, voltage, current, power_factor)"
                ),
                ))
            }
        };
        if r.phase.is_some() && !matches!(quantity, Quantity::Voltage(_) | Quantity::Current(_)) {
            return Err(err("phase", "applies only to voltage and current".into()));
        }
        let unit_factor = match (&r.unit, units.is_empty()) {
            (None, true) => 1.0,
            (Some(u), true) => {
                return Err(err(
                    "unit",
                    format!("a power factor has no unit, not `{u}`"),
                ))
            }
            (None, false) => {
                return Err(err(
                    "unit",
                    format!("required for {}: one of {}", r.quantity, names(units)),
                ))
            }
            (Some(u), false) => units
                .iter()
                .find(|(n, _)| n == u)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    err(
                        "unit",
                        format!(
                            "`{u}` is not a unit of {} (one of {})",
                            r.quantity,
                            names(units)
                        ),
                    )
                })?,
        };
        let function = FunctionCode::from_code(r.function)
            .ok_or_else(|| err("function", format!("{} is not 3 or 4", r.function)))?;
        let value_type: ValueType = r.value_type.parse().map_err(|p| err("type", p))?;
        let word_order: WordOrder = r.word_order.parse().map_err(|p| err("word_order", p))?;
        if u32::from(r.address) + u32::from(value_type.registers()) > 0x1_0000 {
            return Err(err(
                "address",
                format!("{} runs past register 65535", r.address),
            ));
        }
        if !(r.scale.is_finite() && r.scale != 0.0) {
            return Err(err(
                "scale",
                format!("{} must be a non-zero number", r.scale),
            ));
        }
        if !r.offset.is_finite() {
            return Err(err("offset", format!("{} must be a number", r.offset)));
        }
        if fields.iter().any(|f: &Field| f.quantity == quantity) {
            return Err(err("quantity", format!("{} is given twice", r.quantity)));
        }
        fields.push(Field {
            quantity,
            function,
            address: r.address,
            value_type,
            word_order,
            scale: r.scale * unit_factor,
            offset: r.offset * unit_factor,
            ratios: RatioUse::None,
        });
    }
    if !fields.iter().any(|f| f.quantity == Quantity::Power) {
        return Err(ConfigError::new(
            file,
            meter_key("registers"),
            "a generic meter needs a [[meters.registers]] with quantity = \"power\"",
        ));
    }
    Ok(Profile {
        name: "generic".into(),
        fields,
    })
}

fn names(units: &[(&str, f64)]) -> String {
    units.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}
