//! `facwatch-gateway probe`: reads one meter once and shows what the
//! gateway would make of it, for installers checking wiring, unit ids, byte
//! order and CT/PT ratios.
//!
//! Invariant: a probe reads over exactly the code path of polling
//! ([`crate::poll`]'s link and read functions, the profile's coalesced
//! reads and decoding), once, without retries; so what the probe shows is
//! what the gateway will send.

use std::fmt::Write as _;
use std::time::Duration;

use facwatch_proto::profile::{Profile, ProfileName, Ratios, ReadLimits, ReadResult};
use facwatch_proto::site::{Meter, Transport};
use facwatch_proto::wire::Values;
use serde::Serialize;

use crate::poll::link::{self, BusLink, ReadFailure};
use crate::poll::sample::exception_name;

/// The meter to probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTarget {
    pub profile: ProfileName,
    pub transport: Transport,
    pub unit: u8,
    pub ratios: Ratios,
    /// Limit on the connect/open and on each request.
    pub timeout: Duration,
}

/// What one probe read.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReading {
    pub profile: ProfileName,
    pub unit: u8,
    /// The bus the meter was read on, e.g. `tcp://10.0.0.5:502`.
    pub bus: String,
    /// The raw register words, one entry per request.
    pub reads: Vec<ReadResult>,
    pub values: Values,
}

/// Why a probe did not read values. Each message is one line naming the
/// meter and the failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeError {
    #[error("unit {unit} on {bus} did not answer FC{function:02} at {address:#06x} within {timeout_ms} ms")]
    Timeout {
        unit: u8,
        bus: String,
        function: u8,
        address: u16,
        timeout_ms: u128,
    },
    #[error("unit {unit} on {bus} refused FC{function:02} at {address:#06x}: Modbus exception {code} ({name})")]
    Exception {
        unit: u8,
        bus: String,
        function: u8,
        address: u16,
        code: u8,
        name: &'static str,
    },
    #[error("{0}")]
    Unreachable(String),
    #[error("unit {unit} on {bus} answered with a garbled frame: {reason}")]
    Garbled {
        unit: u8,
        bus: String,
        reason: String,
    },
    #[error("unit {unit} on {bus}: the registers do not decode as {profile}: {reason}")]
    Decode {
        unit: u8,
        bus: String,
        profile: &'static str,
        reason: String,
    },
}

/// Reads `target` once.
pub async fn probe(target: &ProbeTarget) -> Result<ProbeReading, ProbeError> {
    let profile = Profile::builtin(target.profile);
    let meter = Meter {
        id: "probe".into(),
        gateway: "probe".into(),
        profile,
        transport: target.transport.clone(),
        unit: target.unit,
        ratios: target.ratios,
        read_limits: ReadLimits::default(),
        timeout: target.timeout,
        retries: 0,
    };
    let mut link = BusLink::new(meter.transport.clone());
    let bus = link.bus();
    let unit = target.unit;
    let reads = link::read_meter(&mut link, &meter, 1)
        .await
        .map_err(|failure| match failure {
            ReadFailure::Timeout { read, after } => ProbeError::Timeout {
                unit,
                bus: bus.clone(),
                function: read.function.code(),
                address: read.address,
                timeout_ms: after.as_millis(),
            },
            ReadFailure::Exception { read, code } => ProbeError::Exception {
                unit,
                bus: bus.clone(),
                function: read.function.code(),
                address: read.address,
                code,
                name: exception_name(code),
            },
            ReadFailure::Unreachable(why) => ProbeError::Unreachable(why),
            ReadFailure::Garbled(reason) => ProbeError::Garbled {
                unit,
                bus: bus.clone(),
                reason,
            },
        })?;
    let values = meter
        .profile
        .decode(&reads, meter.ratios)
        .map_err(|e| ProbeError::Decode {
            unit,
            bus: bus.clone(),
            profile: target.profile.as_str(),
            reason: e.to_string(),
        })?;
    Ok(ProbeReading {
        profile: target.profile,
        unit,
        bus,
        reads,
        values,
    })
}

/// The JSON form: what the profile provides, nothing it does not.
#[derive(Serialize)]
struct ProbeJson<'a> {
    profile: &'static str,
    unit: u8,
    power_kw: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    energy_kwh: Option<f64>,
    #[serde(skip_serializing_if = "<[f32]>::is_empty")]
    voltage_v: &'a [f32],
    #[serde(skip_serializing_if = "<[f32]>::is_empty")]
    current_a: &'a [f32],
    #[serde(skip_serializing_if = "Option::is_none")]
    power_factor: Option<f32>,
}

impl ProbeReading {
    /// One JSON object, one line: `profile`, `unit`, `power_kw`, and where
    /// the profile has them `energy_kwh`, `voltage_v` and `current_a` (per
    /// phase), `power_factor`.
    pub fn to_json(&self) -> String {
        let json = ProbeJson {
            profile: self.profile.as_str(),
            unit: self.unit,
            power_kw: self.values.power_kw,
            energy_kwh: self.values.energy_kwh,
            voltage_v: &self.values.voltage_v,
            current_a: &self.values.current_a,
            power_factor: self.values.power_factor,
        };
        serde_json::to_string(&json).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A short table for people: the raw reads (function, address, words in
    /// hex) and the decoded values.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "{} unit {} on {}\n\nregisters read:\n",
            self.profile.as_str(),
            self.unit,
            self.bus
        );
        for read in &self.reads {
            for (i, chunk) in read.words.chunks(8).enumerate() {
                let address = u32::from(read.address) + 8 * i as u32;
                let words: Vec<String> = chunk.iter().map(|w| format!("{w:04X}")).collect();
                let _ = writeln!(
                    out,
                    "  FC{:02} {:#06x}  {}",
                    read.function.code(),
                    address,
                    words.join(" ")
                );
            }
        }
        out.push_str("\nvalues:\n");
        let v = &self.values;
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "  {name:<14}{value}");
        };
        if let Some(p) = v.power_kw {
            row("power_kw", p.to_string());
        }
        if let Some(e) = v.energy_kwh {
            row("energy_kwh", e.to_string());
        }
        let phases = |values: &[f32]| {
            values
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("  ")
        };
        if !v.voltage_v.is_empty() {
            row("voltage_v", phases(&v.voltage_v));
        }
        if !v.current_a.is_empty() {
            row("current_a", phases(&v.current_a));
        }
        if let Some(pf) = v.power_factor {
            row("power_factor", pf.to_string());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use facwatch_proto::profile::FunctionCode;

    use super::*;

    fn reading(profile: ProfileName, values: Values) -> ProbeReading {
        ProbeReading {
            profile,
            unit: 7,
            bus: "tcp://127.0.0.1:502".into(),
            reads: vec![ReadResult {
                function: FunctionCode::ReadInputRegisters,
                address: 0x34,
                words: (0..10).map(|i| 0x4100 + i).collect(),
            }],
            values,
        }
    }

    #[test]
    fn json_has_what_the_profile_provides_and_nothing_else() {
        let three_phase = Values {
            power_kw: Some(17.5),
            energy_kwh: Some(1234.5),
            voltage_v: vec![230.0, 231.5, 229.0],
            current_a: vec![25.0, 25.25, 24.5],
            power_factor: Some(0.86),
        };
        assert_eq!(
            reading(ProfileName::Sdm630, three_phase).to_json(),
            r#"{"profile":"sdm630","unit":7,"power_kw":17.5,"energy_kwh":1234.5,"voltage_v":[230.0,231.5,229.0],"current_a":[25.0,25.25,24.5],"power_factor":0.86}"#
        );
        let power_only = Values {
            power_kw: Some(-2.0),
            ..Values::default()
        };
        assert_eq!(
            reading(ProfileName::Adw300, power_only).to_json(),
            r#"{"profile":"adw300","unit":7,"power_kw":-2.0}"#
        );
    }

    #[test]
    fn table_shows_raw_words_in_hex_eight_per_line_and_the_values() {
        let values = Values {
            power_kw: Some(17.5),
            energy_kwh: None,
            voltage_v: vec![230.0],
            current_a: vec![],
            power_factor: Some(0.86),
        };
        assert_eq!(
            reading(ProfileName::Sdm120, values).to_table(),
            "sdm120 unit 7 on tcp://127.0.0.1:502\n\
             \n\
             registers read:\n\
             \x20 FC04 0x0034  4100 4101 4102 4103 4104 4105 4106 4107\n\
             \x20 FC04 0x003c  4108 4109\n\
             \n\
             values:\n\
             \x20 power_kw      17.5\n\
             \x20 voltage_v     230\n\
             \x20 power_factor  0.86\n"
        );
    }
}
