//! Oracles shared by the fuzz targets: what must hold whenever a decoder of
//! facwatch-proto accepts its input. A target feeds bytes to a decoder and,
//! when it succeeds, hands the result to one of these checks; a broken
//! invariant is a panic, which libFuzzer reports as a crash.
//!
//! The invariants checked, each from the module docs in proto:
//! - wire: a decoded message re-encodes to bytes that decode to the same
//!   message and re-encode identically (compared as bytes, because a batch
//!   may carry NaN and `NaN != NaN`), and the re-encoding is never longer
//!   than the input it came from;
//! - profile: `reads` stays within its limits and the 16-bit register
//!   space, covers every register of every field, and is ordered; `decode`
//!   of complete results never reports a missing register, and whatever it
//!   returns as `Ok` is finite.

use std::fmt::Debug;

use facwatch_proto::profile::{
    FunctionCode, Profile, Quantity, Ratios, ReadLimits, ReadResult, RegisterRead,
    MAX_REGISTERS_PER_READ,
};
use facwatch_proto::seal::GatewayKey;
use facwatch_proto::wire::{Ack, Batch, DecodeError, Status, WIRE_VERSION};

/// The key every sealed seed and every target uses. Fixed, so a crashing
/// input reproduces.
pub const KEY: GatewayKey = GatewayKey::from_bytes([0x5a; 32]);

/// The three wire messages, so one round-trip check serves them all.
pub trait Message: Sized + Clone + PartialEq + Debug {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError>;
}

macro_rules! message {
    ($($t:ty),*) => {$(
        impl Message for $t {
            fn encode(&self) -> Vec<u8> {
                <$t>::encode(self)
            }
            fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
                <$t>::decode(bytes)
            }
        }
    )*};
}
message!(Batch, Ack, Status);

/// Decodes `bytes` as `M`; if that succeeds, checks the round trip and
/// returns the message.
pub fn round_trip<M: Message>(bytes: &[u8]) -> Option<M> {
    let value = M::decode(bytes).ok()?;
    let encoded = value.encode();
    assert_eq!(encoded.first(), Some(&WIRE_VERSION));
    assert!(
        encoded.len() <= bytes.len(),
        "re-encoding of {} bytes is {} bytes long",
        bytes.len(),
        encoded.len()
    );
    let again =
        M::decode(&encoded).unwrap_or_else(|e| panic!("re-encoded {value:?} does not decode: {e}"));
    assert_eq!(again.encode(), encoded, "second encoding differs");
    // Without NaN inside, the values themselves compare equal too.
    if value.clone() == value {
        assert_eq!(again, value);
    }
    Some(value)
}

/// `profile.reads(limits)`, checked against the invariants of `reads`.
pub fn checked_reads(profile: &Profile, limits: ReadLimits) -> Vec<RegisterRead> {
    let reads = profile.reads(limits);
    let max = limits.max_registers.clamp(4, MAX_REGISTERS_PER_READ);
    for r in &reads {
        assert!(
            (1..=max).contains(&r.count),
            "{r:?} outside 1..={max} registers"
        );
        assert!(
            u32::from(r.address) + u32::from(r.count) <= 0x1_0000,
            "{r:?} runs past register 65535"
        );
    }
    assert!(
        reads
            .windows(2)
            .all(|w| (w[0].function, w[0].address) <= (w[1].function, w[1].address)),
        "reads out of order: {reads:?}"
    );
    for f in &profile.fields {
        let end = u32::from(f.address) + u32::from(f.value_type.registers());
        assert!(
            reads.iter().any(|r| r.function == f.function
                && r.address <= f.address
                && end <= u32::from(r.address) + u32::from(r.count)),
            "{f:?} is in no read of {reads:?}"
        );
    }
    reads
}

/// The results a meter would return for `reads`, words taken from `word`.
pub fn results_for(reads: &[RegisterRead], mut word: impl FnMut() -> u16) -> Vec<ReadResult> {
    reads
        .iter()
        .map(|r| ReadResult {
            function: r.function,
            address: r.address,
            words: (0..r.count).map(|_| word()).collect(),
        })
        .collect()
}

/// Decodes `results` with `profile`; `complete` says that they answer all
/// of the profile's reads.
pub fn checked_decode(profile: &Profile, results: &[ReadResult], ratios: Ratios, complete: bool) {
    use facwatch_proto::profile::ProfileError;
    match profile.decode(results, ratios) {
        Ok(values) => {
            let has = |q: Quantity| profile.fields.iter().any(|f| f.quantity == q);
            assert_eq!(values.power_kw.is_some(), has(Quantity::Power));
            assert_eq!(values.energy_kwh.is_some(), has(Quantity::Energy));
            assert_eq!(values.power_factor.is_some(), has(Quantity::PowerFactor));
            let finite = values.power_kw.into_iter().all(f32::is_finite)
                && values.energy_kwh.into_iter().all(f64::is_finite)
                && values.power_factor.into_iter().all(f32::is_finite)
                && values.voltage_v.iter().all(|v| v.is_finite())
                && values.current_a.iter().all(|v| v.is_finite());
            assert!(
                finite,
                "decode passed on a non-finite value: {values:?} from {results:?} with {ratios:?}"
            );
        }
        Err(ProfileError::MissingRegister { function, address }) => {
            assert!(
                !complete,
                "register {address:#06x} (FC{function:02}) missing from complete results"
            );
            assert!(FunctionCode::from_code(function).is_some());
        }
        Err(ProfileError::ShortRead { .. }) => assert!(!complete),
        Err(ProfileError::NotFinite { address }) => assert!(
            profile.fields.iter().any(|f| f.address == address),
            "NotFinite names {address:#06x}, no field's address"
        ),
    }
}

/// Everything a poll does with a profile: reads under each of `limits`,
/// complete results with words from `word`, decode, and the simulator's
/// encode of what was decoded.
pub fn exercise_profile(
    profile: &Profile,
    ratios: Ratios,
    limits: &[ReadLimits],
    mut word: impl FnMut() -> u16,
) {
    for &l in limits {
        let reads = checked_reads(profile, l);
        let results = results_for(&reads, &mut word);
        checked_decode(profile, &results, ratios, true);
        if let Ok(values) = profile.decode(&results, ratios) {
            let _ = profile.encode(&values, ratios);
        }
    }
}

/// Read limits worth trying on any profile: the defaults, the tightest,
/// the loosest and out-of-range ones that `reads` clamps.
pub const LIMITS: [ReadLimits; 5] = [
    ReadLimits {
        max_registers: MAX_REGISTERS_PER_READ,
        max_gap: 16,
    },
    ReadLimits {
        max_registers: 4,
        max_gap: 0,
    },
    ReadLimits {
        max_registers: MAX_REGISTERS_PER_READ,
        max_gap: u16::MAX,
    },
    ReadLimits {
        max_registers: 0,
        max_gap: 1,
    },
    ReadLimits {
        max_registers: u16::MAX,
        max_gap: 3,
    },
];

/// One `[[meters.registers]]` entry of a generic meter, written as TOML by
/// [`generic_site`].
#[derive(Debug, Clone, Copy, arbitrary::Arbitrary)]
pub struct GenericRegister {
    pub quantity: u8,
    pub phase: Option<u8>,
    pub address: u16,
    pub function: u8,
    pub value_type: u8,
    pub word_order: u8,
    pub scale: f64,
    pub offset: f64,
    pub unit: u8,
}

fn toml_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else {
        // Debug prints `inf`, `1e300`, `0.5`: all TOML floats.
        format!("{x:?}")
    }
}

/// A whole site file with one generic meter made of `registers`, so that
/// the fuzzers reach generic profiles the way a gateway does: through
/// `Site::from_toml` and its validation.
pub fn generic_site(registers: &[GenericRegister], ct_ratio: f64, pt_ratio: f64) -> String {
    const QUANTITIES: [&str; 6] = [
        "power",
        "energy",
        "voltage",
        "current",
        "power_factor",
        "reactive",
    ];
    const TYPES: [&str; 7] = ["u16", "i16", "u32", "i32", "f32", "f64", "f16"];
    const ORDERS: [&str; 5] = ["ABCD", "CDAB", "BADC", "DCBA", "abcd"];
    const UNITS: [Option<&str>; 9] = [
        None,
        Some("kW"),
        Some("W"),
        Some("kWh"),
        Some("Wh"),
        Some("MWh"),
        Some("V"),
        Some("A"),
        Some("mA"),
    ];
    let mut text = format!(
        "[site]\nid = \"fuzz\"\n\n[[gateways]]\nid = \"gw\"\n\n\
         [[meters]]\nid = \"t\"\ngateway = \"gw\"\nprofile = \"sdm630\"\n\
         tcp = \"127.0.0.1:502\"\nunit = 2\n\n\
         [[meters]]\nid = \"m\"\ngateway = \"gw\"\nprofile = \"generic\"\n\
         tcp = \"127.0.0.1:502\"\nunit = 1\nct_ratio = {}\npt_ratio = {}\n",
        toml_float(ct_ratio),
        toml_float(pt_ratio)
    );
    for r in registers {
        let pick = |i: u8, n: usize| usize::from(i) % n;
        text.push_str("\n[[meters.registers]]\n");
        text.push_str(&format!(
            "quantity = \"{}\"\n",
            QUANTITIES[pick(r.quantity, QUANTITIES.len())]
        ));
        if let Some(p) = r.phase {
            text.push_str(&format!("phase = {}\n", p % 5));
        }
        text.push_str(&format!(
            "address = {}\nfunction = {}\ntype = \"{}\"\nword_order = \"{}\"\nscale = {}\noffset = {}\n",
            r.address,
            r.function % 6,
            TYPES[pick(r.value_type, TYPES.len())],
            ORDERS[pick(r.word_order, ORDERS.len())],
            toml_float(r.scale),
            toml_float(r.offset),
        ));
        if let Some(unit) = UNITS[pick(r.unit, UNITS.len())] {
            text.push_str(&format!("unit = \"{unit}\"\n"));
        }
    }
    text.push_str(
        "\n[[lines]]\nid = \"l\"\n\n\
         [[lines.facilities]]\nid = \"p\"\nkind = \"stenter\"\nmeter = \"m\"\n\
         rated_kw = 100\nstart_threshold_kw = 10\n\n\
         [[lines.facilities]]\nid = \"f\"\nkind = \"main_fan\"\nmeter = \"t\"\n\
         rated_kw = 10\nstart_threshold_kw = 1\n",
    );
    text
}
