//! Meter profiles: where a meter model keeps each quantity, how it is encoded
//! and how it is scaled. The gateway decodes with these tables and the
//! simulators encode with the same tables, so both ends of the Modbus wire
//! agree by construction; the unit tests pin each table to the vendor's
//! documented addresses and to hand-made register words, so an error in a
//! table cannot hide behind that symmetry.
//!
//! Invariants:
//! - A profile's [`Profile::reads`] cover every field address, each read at
//!   most [`MAX_REGISTERS_PER_READ`] registers.
//! - [`Profile::decode`] returns primary-side engineering units (kW, kWh, V,
//!   A) and rejects NaN or infinite values as [`ProfileError::NotFinite`]
//!   instead of passing them on.

use serde::{Deserialize, Serialize};

use crate::wire::Values;

/// Modbus allows at most 125 registers in one read.
pub const MAX_REGISTERS_PER_READ: u16 = 125;

/// The built-in meter models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// CHINT DTSU666, three-phase, FC03, float ABCD, secondary-side values.
    Dtsu666,
    /// Eastron SDM630, three-phase, FC04, float ABCD, engineering units.
    Sdm630,
}

impl ProfileName {
    pub const ALL: [ProfileName; 2] = [ProfileName::Dtsu666, ProfileName::Sdm630];

    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::Dtsu666 => "dtsu666",
            ProfileName::Sdm630 => "sdm630",
        }
    }

    pub fn profile(self) -> &'static Profile {
        match self {
            ProfileName::Dtsu666 => &DTSU666,
            ProfileName::Sdm630 => &SDM630,
        }
    }
}

impl std::str::FromStr for ProfileName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProfileName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = ProfileName::ALL.iter().map(|p| p.as_str()).collect();
                format!("unknown meter profile `{s}` (known: {})", known.join(", "))
            })
    }
}

/// Modbus read function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionCode {
    /// FC03.
    ReadHoldingRegisters,
    /// FC04.
    ReadInputRegisters,
}

impl FunctionCode {
    pub fn code(self) -> u8 {
        match self {
            FunctionCode::ReadHoldingRegisters => 3,
            FunctionCode::ReadInputRegisters => 4,
        }
    }
}

/// One Modbus read request a poll of the meter makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterRead {
    pub function: FunctionCode,
    pub address: u16,
    pub count: u16,
}

/// Instrument transformer ratios of one installed meter (primary/secondary),
/// from the site file. Meters that report primary values ignore them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    pub ct: f64,
    pub pt: f64,
}

impl Default for Ratios {
    fn default() -> Self {
        Ratios { ct: 1.0, pt: 1.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quantity {
    PowerTotal,
    EnergyImport,
    Voltage(usize),
    Current(usize),
    PowerFactor,
}

/// How a raw register value becomes an engineering value:
/// `raw * factor * (ct if times_ct) * (pt if times_pt)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scale {
    factor: f64,
    times_ct: bool,
    times_pt: bool,
}

impl Scale {
    const fn fixed(factor: f64) -> Scale {
        Scale {
            factor,
            times_ct: false,
            times_pt: false,
        }
    }

    fn multiplier(&self, ratios: Ratios) -> f64 {
        let mut m = self.factor;
        if self.times_ct {
            m *= ratios.ct;
        }
        if self.times_pt {
            m *= ratios.pt;
        }
        m
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Field {
    quantity: Quantity,
    /// First of the two registers holding a big-endian (ABCD) f32.
    address: u16,
    scale: Scale,
}

/// The register map of one meter model.
#[derive(Debug)]
pub struct Profile {
    pub name: ProfileName,
    pub function: FunctionCode,
    fields: &'static [Field],
    reads: &'static [(u16, u16)],
}

/// Why registers did not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("register {address:#06x} was not in any read block")]
    MissingRegister { address: u16 },
    #[error("read block at {address:#06x} returned {got} registers, expected {expected}")]
    ShortRead {
        address: u16,
        got: usize,
        expected: u16,
    },
    #[error("register {address:#06x} holds a non-finite value")]
    NotFinite { address: u16 },
}

// CHINT DTSU666: U = raw * PT * 0.1 V, I = raw * CT * 0.001 A,
// P = raw * PT * CT * 0.1 W (so * 0.0001 for kW), PF = raw * 0.001.
// Energy registers hold kWh; vendors and emulators disagree on whether they
// are primary or secondary side, so they are taken as-is (primary).
const DTSU_U: Scale = Scale {
    factor: 0.1,
    times_ct: false,
    times_pt: true,
};
const DTSU_I: Scale = Scale {
    factor: 0.001,
    times_ct: true,
    times_pt: false,
};
const DTSU_P_KW: Scale = Scale {
    factor: 0.0001,
    times_ct: true,
    times_pt: true,
};

static DTSU666_FIELDS: [Field; 9] = [
    Field {
        quantity: Quantity::Voltage(0),
        address: 0x2006,
        scale: DTSU_U,
    },
    Field {
        quantity: Quantity::Voltage(1),
        address: 0x2008,
        scale: DTSU_U,
    },
    Field {
        quantity: Quantity::Voltage(2),
        address: 0x200A,
        scale: DTSU_U,
    },
    Field {
        quantity: Quantity::Current(0),
        address: 0x200C,
        scale: DTSU_I,
    },
    Field {
        quantity: Quantity::Current(1),
        address: 0x200E,
        scale: DTSU_I,
    },
    Field {
        quantity: Quantity::Current(2),
        address: 0x2010,
        scale: DTSU_I,
    },
    Field {
        quantity: Quantity::PowerTotal,
        address: 0x2012,
        scale: DTSU_P_KW,
    },
    Field {
        quantity: Quantity::PowerFactor,
        address: 0x202A,
        scale: Scale::fixed(0.001),
    },
    Field {
        quantity: Quantity::EnergyImport,
        address: 0x401E,
        scale: Scale::fixed(1.0),
    },
];

static DTSU666: Profile = Profile {
    name: ProfileName::Dtsu666,
    function: FunctionCode::ReadHoldingRegisters,
    fields: &DTSU666_FIELDS,
    // Uab..PFt in one read, the import energy in another.
    reads: &[(0x2000, 0x2C), (0x401E, 2)],
};

static SDM630_FIELDS: [Field; 9] = [
    Field {
        quantity: Quantity::Voltage(0),
        address: 0x00,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::Voltage(1),
        address: 0x02,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::Voltage(2),
        address: 0x04,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::Current(0),
        address: 0x06,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::Current(1),
        address: 0x08,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::Current(2),
        address: 0x0A,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::PowerTotal,
        address: 0x34,
        scale: Scale::fixed(0.001),
    },
    Field {
        quantity: Quantity::PowerFactor,
        address: 0x3E,
        scale: Scale::fixed(1.0),
    },
    Field {
        quantity: Quantity::EnergyImport,
        address: 0x48,
        scale: Scale::fixed(1.0),
    },
];

static SDM630: Profile = Profile {
    name: ProfileName::Sdm630,
    function: FunctionCode::ReadInputRegisters,
    fields: &SDM630_FIELDS,
    // Voltages through import energy in one read of 74 registers.
    reads: &[(0x00, 0x4A)],
};

/// Register words returned by one [`RegisterRead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    pub address: u16,
    pub words: Vec<u16>,
}

impl Profile {
    /// The reads one poll makes, in order.
    pub fn reads(&self) -> impl Iterator<Item = RegisterRead> + '_ {
        self.reads.iter().map(|&(address, count)| RegisterRead {
            function: self.function,
            address,
            count,
        })
    }

    /// Decodes the results of [`Profile::reads`] (same order) into values.
    pub fn decode(&self, results: &[ReadResult], ratios: Ratios) -> Result<Values, ProfileError> {
        for (read, result) in self.reads().zip(results) {
            if result.words.len() != usize::from(read.count) {
                return Err(ProfileError::ShortRead {
                    address: read.address,
                    got: result.words.len(),
                    expected: read.count,
                });
            }
        }
        let mut values = Values {
            voltage_v: vec![0.0; 3],
            current_a: vec![0.0; 3],
            ..Values::default()
        };
        for field in self.fields {
            let raw = f64::from(read_f32_abcd(results, field.address)?);
            let value = raw * field.scale.multiplier(ratios);
            if !value.is_finite() {
                return Err(ProfileError::NotFinite {
                    address: field.address,
                });
            }
            match field.quantity {
                Quantity::PowerTotal => values.power_kw = Some(value as f32),
                Quantity::EnergyImport => values.energy_kwh = Some(value),
                Quantity::Voltage(phase) => values.voltage_v[phase] = value as f32,
                Quantity::Current(phase) => values.current_a[phase] = value as f32,
                Quantity::PowerFactor => values.power_factor = Some(value as f32),
            }
        }
        Ok(values)
    }

    /// The register words a meter of this model shows for `values`: the
    /// inverse of [`Profile::decode`], for simulators. Returns
    /// `(address, word)` pairs.
    pub fn encode(&self, values: &Values, ratios: Ratios) -> Vec<(u16, u16)> {
        let mut words = Vec::with_capacity(self.fields.len() * 2);
        for field in self.fields {
            let value = match field.quantity {
                Quantity::PowerTotal => values.power_kw.map(f64::from),
                Quantity::EnergyImport => values.energy_kwh,
                Quantity::Voltage(phase) => values.voltage_v.get(phase).map(|&v| f64::from(v)),
                Quantity::Current(phase) => values.current_a.get(phase).map(|&v| f64::from(v)),
                Quantity::PowerFactor => values.power_factor.map(f64::from),
            }
            .unwrap_or(0.0);
            let raw = (value / field.scale.multiplier(ratios)) as f32;
            let bits = raw.to_bits();
            words.push((field.address, (bits >> 16) as u16));
            words.push((field.address + 1, bits as u16));
        }
        words
    }
}

fn register(results: &[ReadResult], address: u16) -> Result<u16, ProfileError> {
    results
        .iter()
        .find_map(|r| {
            let offset = usize::from(address.checked_sub(r.address)?);
            r.words.get(offset).copied()
        })
        .ok_or(ProfileError::MissingRegister { address })
}

fn read_f32_abcd(results: &[ReadResult], address: u16) -> Result<f32, ProfileError> {
    let high = register(results, address)?;
    let low = register(results, address + 1)?;
    Ok(f32::from_bits((u32::from(high) << 16) | u32::from(low)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(profile: &Profile, words: &[(u16, u16)]) -> Vec<ReadResult> {
        profile
            .reads()
            .map(|read| ReadResult {
                address: read.address,
                words: (read.address..read.address + read.count)
                    .map(|a| words.iter().find(|(w, _)| *w == a).map_or(0, |(_, v)| *v))
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn reads_cover_every_field_within_the_modbus_limit() {
        for name in ProfileName::ALL {
            let profile = name.profile();
            for read in profile.reads() {
                assert!(read.count <= MAX_REGISTERS_PER_READ, "{name:?} {read:?}");
            }
            for field in profile.fields {
                for address in [field.address, field.address + 1] {
                    assert!(
                        profile
                            .reads()
                            .any(|r| address >= r.address && address < r.address + r.count),
                        "{name:?} register {address:#x} not read"
                    );
                }
            }
        }
    }

    #[test]
    fn dtsu666_reads_holding_registers_at_the_documented_addresses() {
        let reads: Vec<_> = DTSU666.reads().collect();
        assert_eq!(reads[0].function.code(), 3);
        // The DOMAIN.md example frame `01 03 20 12 00 02` reads Pt at 0x2012.
        assert!(DTSU666_FIELDS
            .iter()
            .any(|f| f.quantity == Quantity::PowerTotal && f.address == 0x2012));
        assert!(DTSU666_FIELDS
            .iter()
            .any(|f| f.quantity == Quantity::EnergyImport && f.address == 0x401E));
    }

    #[test]
    fn dtsu666_scales_secondary_values_by_ct_and_pt() {
        // Raw secondary-side floats: 2250.0 voltage * PT 1 * 0.1 = 225 V;
        // 1000.0 current * CT 40 * 0.001 = 40 A; 2000.0 power * PT 1 * CT 40
        // * 0.1 W = 8 kW; 864.0 PF * 0.001 = 0.864.
        let words = [
            (0x2006, 0x450C),
            (0x2007, 0xA000),
            (0x200C, 0x447A), // 1000.0 raw current: 1000 * 40 * 0.001 = 40 A
            (0x200D, 0x0000),
            (0x2012, 0x44FA),
            (0x2013, 0x0000),
            (0x202A, 0x4458), // 864.0 raw PF: 0.864
            (0x202B, 0x0000),
            (0x401E, 0x4640), // 12288.0 kWh
            (0x401F, 0x0000),
        ];
        let ratios = Ratios { ct: 40.0, pt: 1.0 };
        let values = DTSU666.decode(&image(&DTSU666, &words), ratios).unwrap();
        assert_eq!(values.power_kw, Some(8.0));
        assert_eq!(values.voltage_v[0], 225.0);
        assert_eq!(values.current_a[0], 40.0);
        assert_eq!(values.power_factor, Some(0.864));
        assert_eq!(values.energy_kwh, Some(12288.0));
    }

    #[test]
    fn sdm630_reads_input_registers_in_engineering_units() {
        assert_eq!(SDM630.reads().next().unwrap().function.code(), 4);
        let words = [
            (0x00, 0x4366), // 230.0 V
            (0x01, 0x0000),
            (0x34, 0x45FA), // 8000.0 W = 8 kW
            (0x35, 0x0000),
            (0x3E, 0x3F40), // 0.75
            (0x3F, 0x0000),
            (0x48, 0x4120), // 10.0 kWh
            (0x49, 0x0000),
        ];
        // Ratios do not apply to a meter that reports primary values.
        let ratios = Ratios { ct: 40.0, pt: 10.0 };
        let values = SDM630.decode(&image(&SDM630, &words), ratios).unwrap();
        assert_eq!(values.power_kw, Some(8.0));
        assert_eq!(values.voltage_v[0], 230.0);
        assert_eq!(values.power_factor, Some(0.75));
        assert_eq!(values.energy_kwh, Some(10.0));
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let values = Values {
            power_kw: Some(17.5),
            energy_kwh: Some(1234.5),
            voltage_v: vec![221.0, 224.5, 226.0],
            current_a: vec![30.5, 31.0, 29.75],
            power_factor: Some(0.85),
        };
        for name in ProfileName::ALL {
            let profile = name.profile();
            let ratios = Ratios { ct: 40.0, pt: 1.0 };
            let decoded = profile
                .decode(&image(profile, &profile.encode(&values, ratios)), ratios)
                .unwrap();
            let close = |a: f32, b: f32| (a - b).abs() < 1e-3 * b.abs().max(1.0);
            assert!(
                close(decoded.power_kw.unwrap(), 17.5),
                "{name:?} {decoded:?}"
            );
            assert!(
                close(decoded.power_factor.unwrap(), 0.85),
                "{name:?} {decoded:?}"
            );
            assert!(
                (decoded.energy_kwh.unwrap() - 1234.5).abs() < 0.1,
                "{name:?}"
            );
            for (got, want) in decoded.voltage_v.iter().zip(&values.voltage_v) {
                assert!(close(*got, *want), "{name:?} {decoded:?}");
            }
            for (got, want) in decoded.current_a.iter().zip(&values.current_a) {
                assert!(close(*got, *want), "{name:?} {decoded:?}");
            }
        }
    }

    #[test]
    fn nan_register_is_a_decode_error() {
        let words = [(0x34, 0x7FC0), (0x35, 0x0000)];
        assert_eq!(
            SDM630.decode(&image(&SDM630, &words), Ratios::default()),
            Err(ProfileError::NotFinite { address: 0x34 })
        );
    }

    #[test]
    fn short_read_is_a_decode_error() {
        let results = vec![ReadResult {
            address: 0,
            words: vec![0; 10],
        }];
        assert!(matches!(
            SDM630.decode(&results, Ratios::default()),
            Err(ProfileError::ShortRead { got: 10, .. })
        ));
    }

    #[test]
    fn unknown_profile_name_lists_the_known_ones() {
        let err = "dtsu999".parse::<ProfileName>().unwrap_err();
        assert!(err.contains("dtsu999") && err.contains("sdm630"), "{err}");
    }
}
