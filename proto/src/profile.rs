//! Meter profiles: where a meter model keeps each quantity, how it is
//! encoded (type, word order) and how it is scaled. The gateway decodes with
//! these tables and the simulators encode with the same tables, so both
//! ends of the Modbus wire agree by construction; the unit tests pin each
//! built-in table to the vendor's documented addresses and to hand-made
//! register words, so an error in a table cannot hide behind that symmetry.
//!
//! A profile is a list of [`Field`]s. Built-in ones come from
//! [`Profile::builtin`]; a `generic` one is written in the site file.
//!
//! Invariants:
//! - [`Profile::reads`] covers every register of every field, coalescing
//!   fields of one function code into as few reads as the limits allow
//!   (each read at most [`ReadLimits::max_registers`] <=
//!   [`MAX_REGISTERS_PER_READ`], skipping at most `max_gap` unused
//!   registers between fields), because serial buses are slow.
//! - [`Profile::decode`] returns primary-side engineering units (kW, kWh, V,
//!   A) and rejects NaN or infinite values as [`ProfileError::NotFinite`]
//!   instead of passing them on, including values that are finite as `f64`
//!   but beyond the range of the `f32` that [`Values`] keeps them in (a
//!   large float register times a transformer ratio).
//! - [`Profile::encode`] is the inverse of `decode` (up to the type's
//!   resolution), for simulators.

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
    /// CHINT DDSU666, single-phase, FC04, float, engineering units.
    Ddsu666,
    /// Acrel ADL400, three-phase, FC03, integers, secondary side, 8E1.
    Adl400,
    /// Acrel ADW300, three-phase, FC03, integers.
    Adw300,
    /// Eastron SDM630, three-phase, FC04, float, engineering units.
    Sdm630,
    /// Eastron SDM120, single-phase, FC04, float, 2400 baud by default.
    Sdm120,
}

impl ProfileName {
    pub const ALL: [ProfileName; 6] = [
        ProfileName::Dtsu666,
        ProfileName::Ddsu666,
        ProfileName::Adl400,
        ProfileName::Adw300,
        ProfileName::Sdm630,
        ProfileName::Sdm120,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::Dtsu666 => "dtsu666",
            ProfileName::Ddsu666 => "ddsu666",
            ProfileName::Adl400 => "adl400",
            ProfileName::Adw300 => "adw300",
            ProfileName::Sdm630 => "sdm630",
            ProfileName::Sdm120 => "sdm120",
        }
    }

    /// The serial line settings the meter ships with.
    pub fn default_serial(self) -> (u32, Parity) {
        match self {
            ProfileName::Sdm120 => (2400, Parity::None),
            ProfileName::Adl400 => (9600, Parity::Even),
            _ => (9600, Parity::None),
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
                format!(
                    "unknown meter profile `{s}` (known: {}, generic)",
                    known.join(", ")
                )
            })
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Modbus read function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

    pub fn from_code(code: u8) -> Option<FunctionCode> {
        match code {
            3 => Some(FunctionCode::ReadHoldingRegisters),
            4 => Some(FunctionCode::ReadInputRegisters),
            _ => None,
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

/// Register words returned by one [`RegisterRead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    pub function: FunctionCode,
    pub address: u16,
    pub words: Vec<u16>,
}

/// How reads are coalesced for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most registers in one request (at most 125; some meters take fewer).
    pub max_registers: u16,
    /// Most unused registers read between two fields to save a request.
    pub max_gap: u16,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_registers: MAX_REGISTERS_PER_READ,
            max_gap: 16,
        }
    }
}

/// Instrument transformer ratios of one installed meter (primary/secondary),
/// from the site file. Fields that report primary values ignore them.
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

/// What a field measures. Phases are 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantity {
    /// Total active power, kW.
    Power,
    /// Imported active energy, kWh.
    Energy,
    /// Phase voltage, V.
    Voltage(u8),
    /// Phase current, A.
    Current(u8),
    PowerFactor,
}

/// The encoding of a value in consecutive registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
}

impl ValueType {
    pub fn registers(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::F64 => 4,
        }
    }
}

impl std::str::FromStr for ValueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "u16" => ValueType::U16,
            "i16" => ValueType::I16,
            "u32" => ValueType::U32,
            "i32" => ValueType::I32,
            "f32" => ValueType::F32,
            "f64" => ValueType::F64,
            _ => return Err(format!("unknown type `{s}` (u16, i16, u32, i32, f32, f64)")),
        })
    }
}

/// Byte order of a multi-register value, named by where the bytes of the
/// big-endian value `A B C D` land in the registers as read:
/// `ABCD` big-endian, high word first (the Modbus norm); `CDAB` low word
/// first; `BADC` bytes swapped within each word; `DCBA` little-endian. For
/// 64-bit values the same pattern applies to four words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WordOrder {
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl std::str::FromStr for WordOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ABCD" => WordOrder::Abcd,
            "CDAB" => WordOrder::Cdab,
            "BADC" => WordOrder::Badc,
            "DCBA" => WordOrder::Dcba,
            _ => return Err(format!("unknown word order `{s}` (ABCD, CDAB, BADC, DCBA)")),
        })
    }
}

/// Which transformer ratios multiply a field (meters that report
/// secondary-side values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RatioUse {
    None,
    Ct,
    Pt,
    CtPt,
}

/// One quantity in a meter's registers:
/// `value = raw * scale * ratios + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    pub quantity: Quantity,
    pub function: FunctionCode,
    pub address: u16,
    pub value_type: ValueType,
    pub word_order: WordOrder,
    pub scale: f64,
    pub offset: f64,
    pub ratios: RatioUse,
}

impl Field {
    fn multiplier(&self, ratios: Ratios) -> f64 {
        self.scale
            * match self.ratios {
                RatioUse::None => 1.0,
                RatioUse::Ct => ratios.ct,
                RatioUse::Pt => ratios.pt,
                RatioUse::CtPt => ratios.ct * ratios.pt,
            }
    }

    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.value_type.registers())
    }
}

/// The register map of one meter: a built-in model or a generic map from
/// the site file.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// `dtsu666`, ..., or `generic`.
    pub name: String,
    pub fields: Vec<Field>,
}

/// Why registers did not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("register {address:#06x} (FC{function:02}) was not in any read block")]
    MissingRegister { function: u8, address: u16 },
    #[error("read block at {address:#06x} returned {got} registers, expected {expected}")]
    ShortRead {
        address: u16,
        got: usize,
        expected: u16,
    },
    #[error("register {address:#06x} decodes to NaN, infinity or a value too large to send")]
    NotFinite { address: u16 },
}

const fn field(
    quantity: Quantity,
    function: FunctionCode,
    address: u16,
    value_type: ValueType,
    scale: f64,
    ratios: RatioUse,
) -> Field {
    Field {
        quantity,
        function,
        address,
        value_type,
        word_order: WordOrder::Abcd,
        scale,
        offset: 0.0,
        ratios,
    }
}

impl Profile {
    /// The register map of a built-in model (DOMAIN.md, "Meter register
    /// maps").
    pub fn builtin(name: ProfileName) -> Profile {
        use FunctionCode::{ReadHoldingRegisters as Fc3, ReadInputRegisters as Fc4};
        use Quantity::*;
        use RatioUse::{Ct, CtPt, Pt};
        use ValueType::{F32, I16, I32, U16, U32};
        let none = RatioUse::None;
        let fields = match name {
            // U = raw * PT * 0.1 V, I = raw * CT * 0.001 A, P = raw * PT *
            // CT * 0.1 W. Energy registers hold kWh; vendors and emulators
            // disagree on the side, so they are taken as primary.
            ProfileName::Dtsu666 => vec![
                field(Voltage(0), Fc3, 0x2006, F32, 0.1, Pt),
                field(Voltage(1), Fc3, 0x2008, F32, 0.1, Pt),
                field(Voltage(2), Fc3, 0x200A, F32, 0.1, Pt),
                field(Current(0), Fc3, 0x200C, F32, 0.001, Ct),
                field(Current(1), Fc3, 0x200E, F32, 0.001, Ct),
                field(Current(2), Fc3, 0x2010, F32, 0.001, Ct),
                field(Power, Fc3, 0x2012, F32, 0.0001, CtPt),
                field(PowerFactor, Fc3, 0x202A, F32, 0.001, none),
                field(Energy, Fc3, 0x401E, F32, 1.0, none),
            ],
            ProfileName::Ddsu666 => vec![
                field(Voltage(0), Fc4, 0x2000, F32, 1.0, none),
                field(Current(0), Fc4, 0x2002, F32, 1.0, none),
                field(Power, Fc4, 0x2004, F32, 1.0, none),
                field(PowerFactor, Fc4, 0x200A, F32, 1.0, none),
                field(Energy, Fc4, 0x4000, F32, 1.0, none),
            ],
            // Integer registers are secondary-side values.
            ProfileName::Adl400 => vec![
                field(Energy, Fc3, 0x000A, U32, 0.01, CtPt),
                field(Voltage(0), Fc3, 0x0061, U16, 0.1, Pt),
                field(Voltage(1), Fc3, 0x0062, U16, 0.1, Pt),
                field(Voltage(2), Fc3, 0x0063, U16, 0.1, Pt),
                field(Current(0), Fc3, 0x0064, U16, 0.01, Ct),
                field(Current(1), Fc3, 0x0065, U16, 0.01, Ct),
                field(Current(2), Fc3, 0x0066, U16, 0.01, Ct),
                field(Power, Fc3, 0x016A, I32, 0.001, CtPt),
                field(PowerFactor, Fc3, 0x017F, I16, 0.001, none),
            ],
            ProfileName::Adw300 => vec![
                field(Voltage(0), Fc3, 20, U16, 0.1, none),
                field(Voltage(1), Fc3, 21, U16, 0.1, none),
                field(Voltage(2), Fc3, 22, U16, 0.1, none),
                field(Current(0), Fc3, 26, U16, 0.01, none),
                field(Current(1), Fc3, 27, U16, 0.01, none),
                field(Current(2), Fc3, 28, U16, 0.01, none),
                field(Power, Fc3, 36, I32, 0.001, none),
                field(Energy, Fc3, 62, U32, 0.01, none),
            ],
            ProfileName::Sdm630 => vec![
                field(Voltage(0), Fc4, 0x00, F32, 1.0, none),
                field(Voltage(1), Fc4, 0x02, F32, 1.0, none),
                field(Voltage(2), Fc4, 0x04, F32, 1.0, none),
                field(Current(0), Fc4, 0x06, F32, 1.0, none),
                field(Current(1), Fc4, 0x08, F32, 1.0, none),
                field(Current(2), Fc4, 0x0A, F32, 1.0, none),
                field(Power, Fc4, 0x34, F32, 0.001, none),
                field(PowerFactor, Fc4, 0x3E, F32, 1.0, none),
                field(Energy, Fc4, 0x48, F32, 1.0, none),
            ],
            ProfileName::Sdm120 => vec![
                field(Voltage(0), Fc4, 0x00, F32, 1.0, none),
                field(Current(0), Fc4, 0x06, F32, 1.0, none),
                field(Power, Fc4, 0x0C, F32, 0.001, none),
                field(PowerFactor, Fc4, 0x1E, F32, 1.0, none),
                field(Energy, Fc4, 0x48, F32, 1.0, none),
            ],
        };
        Profile {
            name: name.as_str().to_string(),
            fields,
        }
    }

    /// The reads one poll makes, coalesced within `limits`, ordered by
    /// function code and address.
    pub fn reads(&self, limits: ReadLimits) -> Vec<RegisterRead> {
        let max_registers = u32::from(limits.max_registers.clamp(4, MAX_REGISTERS_PER_READ));
        let mut fields: Vec<&Field> = self.fields.iter().collect();
        fields.sort_by_key(|f| (f.function, f.address));
        let mut reads: Vec<RegisterRead> = Vec::new();
        for f in fields {
            if let Some(last) = reads.last_mut() {
                let last_end = u32::from(last.address) + u32::from(last.count);
                let gap = i64::from(f.address) - i64::from(last_end);
                let merged = f.end().max(last_end) - u32::from(last.address);
                if last.function == f.function
                    && gap <= i64::from(limits.max_gap)
                    && merged <= max_registers
                {
                    last.count = merged as u16;
                    continue;
                }
            }
            reads.push(RegisterRead {
                function: f.function,
                address: f.address,
                count: f.value_type.registers(),
            });
        }
        reads
    }

    /// Decodes the results of [`Profile::reads`] into values.
    pub fn decode(&self, results: &[ReadResult], ratios: Ratios) -> Result<Values, ProfileError> {
        let phases = |pick: fn(Quantity) -> Option<u8>| {
            self.fields
                .iter()
                .filter_map(|f| pick(f.quantity))
                .map(|p| usize::from(p) + 1)
                .max()
                .unwrap_or(0)
        };
        let mut values = Values {
            voltage_v: vec![
                0.0;
                phases(|q| match q {
                    Quantity::Voltage(p) => Some(p),
                    _ => None,
                })
            ],
            current_a: vec![
                0.0;
                phases(|q| match q {
                    Quantity::Current(p) => Some(p),
                    _ => None,
                })
            ],
            ..Values::default()
        };
        for field in &self.fields {
            let mut words = [0u16; 4];
            let n = usize::from(field.value_type.registers());
            for (i, word) in words[..n].iter_mut().enumerate() {
                *word = register(results, field.function, field.address + i as u16)?;
            }
            let value = raw_value(field.value_type, field.word_order, &words[..n])
                * field.multiplier(ratios)
                + field.offset;
            // Everything but energy travels as f32, where a finite f64 above
            // f32::MAX would arrive as infinity.
            let finite = match field.quantity {
                Quantity::Energy => value.is_finite(),
                _ => (value as f32).is_finite(),
            };
            if !finite {
                return Err(ProfileError::NotFinite {
                    address: field.address,
                });
            }
            match field.quantity {
                Quantity::Power => values.power_kw = Some(value as f32),
                Quantity::Energy => values.energy_kwh = Some(value),
                Quantity::Voltage(p) => values.voltage_v[usize::from(p)] = value as f32,
                Quantity::Current(p) => values.current_a[usize::from(p)] = value as f32,
                Quantity::PowerFactor => values.power_factor = Some(value as f32),
            }
        }
        Ok(values)
    }

    /// The register words a meter of this model shows for `values`: the
    /// inverse of [`Profile::decode`], for simulators. Integer types round
    /// and saturate.
    pub fn encode(&self, values: &Values, ratios: Ratios) -> Vec<(FunctionCode, u16, u16)> {
        let mut out = Vec::new();
        for field in &self.fields {
            let value = match field.quantity {
                Quantity::Power => values.power_kw.map(f64::from),
                Quantity::Energy => values.energy_kwh,
                Quantity::Voltage(p) => values.voltage_v.get(usize::from(p)).map(|&v| f64::from(v)),
                Quantity::Current(p) => values.current_a.get(usize::from(p)).map(|&v| f64::from(v)),
                Quantity::PowerFactor => values.power_factor.map(f64::from),
            }
            .unwrap_or(0.0);
            let raw = (value - field.offset) / field.multiplier(ratios);
            for (i, word) in raw_words(field.value_type, field.word_order, raw)
                .into_iter()
                .enumerate()
            {
                out.push((field.function, field.address + i as u16, word));
            }
        }
        out
    }
}

fn register(
    results: &[ReadResult],
    function: FunctionCode,
    address: u16,
) -> Result<u16, ProfileError> {
    let missing = ProfileError::MissingRegister {
        function: function.code(),
        address,
    };
    for r in results.iter().filter(|r| r.function == function) {
        if let Some(offset) = address.checked_sub(r.address) {
            if let Some(word) = r.words.get(usize::from(offset)) {
                return Ok(*word);
            }
        }
    }
    Err(missing)
}

/// Puts the registers' bytes back into big-endian order.
fn big_endian_bytes(order: WordOrder, words: &[u16]) -> Vec<u8> {
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    match order {
        WordOrder::Abcd => {}
        WordOrder::Dcba => bytes.reverse(),
        WordOrder::Badc => bytes.chunks_mut(2).for_each(|c| c.swap(0, 1)),
        WordOrder::Cdab => {
            let mut swapped: Vec<u8> = bytes.chunks(2).rev().flatten().copied().collect();
            std::mem::swap(&mut bytes, &mut swapped);
        }
    }
    bytes
}

/// The inverse of [`big_endian_bytes`]: each order is its own inverse.
fn words_from_big_endian(order: WordOrder, bytes: &[u8]) -> Vec<u16> {
    let words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    big_endian_bytes(order, &words)
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

fn raw_value(value_type: ValueType, order: WordOrder, words: &[u16]) -> f64 {
    let b = big_endian_bytes(order, words);
    match value_type {
        ValueType::U16 => f64::from(u16::from_be_bytes([b[0], b[1]])),
        ValueType::I16 => f64::from(i16::from_be_bytes([b[0], b[1]])),
        ValueType::U32 => f64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::I32 => f64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::F32 => f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::F64 => f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
    }
}

fn raw_words(value_type: ValueType, order: WordOrder, raw: f64) -> Vec<u16> {
    let bytes: Vec<u8> = match value_type {
        // `as` rounds toward zero and saturates; round first.
        ValueType::U16 => (raw.round() as u16).to_be_bytes().to_vec(),
        ValueType::I16 => (raw.round() as i16).to_be_bytes().to_vec(),
        ValueType::U32 => (raw.round() as u32).to_be_bytes().to_vec(),
        ValueType::I32 => (raw.round() as i32).to_be_bytes().to_vec(),
        ValueType::F32 => (raw as f32).to_be_bytes().to_vec(),
        ValueType::F64 => raw.to_be_bytes().to_vec(),
    };
    words_from_big_endian(order, &bytes)
}

#[cfg(test)]
mod tests;
