//! Arbitrary and mutated input against every decoder of facwatch-proto, in
//! the normal test suite (the fuzz targets in `fuzz/` go further, but need
//! libFuzzer; these run on every `cargo test`).
//!
//! What every test here holds a decoder to:
//! - it returns an error or a value, never panics;
//! - a decoded wire message re-encodes to bytes that decode to the same
//!   message (compared as bytes: a batch may carry NaN, and `NaN != NaN`);
//! - `seal::open` refuses exactly by length or tag;
//! - a site file that validates yields meters whose profiles read within
//!   the register space and decode complete results to finite values;
//! - `rtu::parse_read_request` accepts exactly 8-byte frames with their CRC.
//!
//! Besides raw random bytes, the strategies mutate real input (an encoded
//! batch, the site files in `deploy/`) by flipping, inserting and deleting
//! bytes, which gets far deeper into postcard and TOML than noise does.
//! Case counts keep the whole file to a few seconds in a debug build.

use facwatch_proto::profile::{
    FunctionCode, Profile, ProfileError, ProfileName, Quantity, Ratios, ReadLimits, ReadResult,
    RegisterRead, MAX_REGISTERS_PER_READ,
};
use facwatch_proto::rtu::{self, FrameError, ReadRequest};
use facwatch_proto::seal::{self, GatewayKey, OpenError, Purpose, TAG_LEN};
use facwatch_proto::site::Site;
use facwatch_proto::wire::{
    Ack, Batch, DecodeError, LinkState, Quality, Sample, Status, Values, WIRE_VERSION,
};
use proptest::prelude::*;

const KEY: GatewayKey = GatewayKey::from_bytes([0x42; 32]);

const SITE_FILES: [&str; 3] = [
    include_str!("../../deploy/stenter-plant.site.toml"),
    include_str!("../../deploy/field-buses.site.example.toml"),
    include_str!("../../deploy/scenarios/r6-restricted.site.toml"),
];

fn real_batch() -> Batch {
    let sample = |meter: &str, quality, values| Sample {
        meter: meter.into(),
        time_ms: 1_670_911_380_000,
        quality,
        values,
    };
    Batch {
        gateway: "gw-01".into(),
        seq: 4711,
        dropped_before: 3,
        samples: vec![
            sample(
                "m-stenter",
                Quality::Ok,
                Values {
                    power_kw: Some(120.5),
                    energy_kwh: Some(98_765.25),
                    voltage_v: vec![230.1, 229.9, 231.0],
                    current_a: vec![180.0, 179.5, 181.25],
                    power_factor: Some(0.93),
                },
            ),
            sample("m-fan", Quality::Exception(2), Values::default()),
            sample("m-pump", Quality::Timeout, Values::default()),
            sample("m-esp", Quality::Offline, Values::default()),
        ],
    }
}

/// One edit of a byte string; positions wrap around its length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
    ];
    prop::collection::vec(one, 1..6)
}

fn mutate(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in mutations {
        match *m {
            Mutation::Insert { at, byte } => out.insert(at % (out.len() + 1), byte),
            _ if out.is_empty() => {}
            Mutation::Flip { at, bit } => {
                let n = out.len();
                out[at % n] ^= 1 << bit;
            }
            Mutation::Set { at, byte } => {
                let n = out.len();
                out[at % n] = byte;
            }
            Mutation::Delete { at } => {
                let n = out.len();
                out.remove(at % n);
            }
        }
    }
    out
}

/// Decodes `bytes` with `decode`; a success must survive a round trip.
fn round_trip<T: Clone + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    decode: fn(&[u8]) -> Result<T, DecodeError>,
    encode: fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    let Ok(value) = decode(bytes) else {
        return Ok(());
    };
    let encoded = encode(&value);
    prop_assert_eq!(encoded[0], WIRE_VERSION);
    prop_assert!(encoded.len() <= bytes.len());
    let again = decode(&encoded).expect("a re-encoded message decodes");
    prop_assert_eq!(encode(&again), encoded);
    if value.clone() == value {
        prop_assert_eq!(&again, &value);
    }
    Ok(())
}

/// Every wire decoder on `bytes`: errors are fine, successes round-trip.
fn all_wire_decoders(bytes: &[u8]) -> Result<(), TestCaseError> {
    round_trip(bytes, Batch::decode, Batch::encode)?;
    round_trip(bytes, Ack::decode, Ack::encode)?;
    round_trip(bytes, Status::decode, Status::encode)
}

/// What a poll does with a profile: reads within limits covering every
/// field, complete results decoded to finite values or `NotFinite`.
fn exercise_profile(profile: &Profile, ratios: Ratios, limits: ReadLimits, words: &[u16]) {
    let reads = profile.reads(limits);
    let max = limits.max_registers.clamp(4, MAX_REGISTERS_PER_READ);
    for r in &reads {
        assert!((1..=max).contains(&r.count), "{r:?}");
        assert!(
            u32::from(r.address) + u32::from(r.count) <= 0x1_0000,
            "{r:?}"
        );
    }
    for f in &profile.fields {
        let end = u32::from(f.address) + u32::from(f.value_type.registers());
        assert!(
            reads.iter().any(|r| r.function == f.function
                && r.address <= f.address
                && end <= u32::from(r.address) + u32::from(r.count)),
            "{f:?} in no read of {reads:?}"
        );
    }
    let mut word = words.iter().copied().cycle().chain(std::iter::repeat(0));
    let results: Vec<ReadResult> = reads
        .iter()
        .map(|r| ReadResult {
            function: r.function,
            address: r.address,
            words: (&mut word).take(usize::from(r.count)).collect(),
        })
        .collect();
    match profile.decode(&results, ratios) {
        Ok(values) => {
            assert_finite(&values);
            let _ = profile.encode(&values, ratios);
        }
        Err(ProfileError::NotFinite { address }) => {
            assert!(profile.fields.iter().any(|f| f.address == address))
        }
        Err(e) => panic!("complete results of {reads:?} did not decode: {e}"),
    }
}

fn assert_finite(values: &Values) {
    assert!(
        values.power_kw.into_iter().all(f32::is_finite)
            && values.energy_kwh.into_iter().all(f64::is_finite)
            && values.power_factor.into_iter().all(f32::is_finite)
            && values.voltage_v.iter().all(|v| v.is_finite())
            && values.current_a.iter().all(|v| v.is_finite()),
        "decode passed on a non-finite value: {values:?}"
    );
}

/// Parses `text` as a site file; when it validates, exercises every meter.
fn check_site(text: &str, words: &[u16]) -> Option<Site> {
    let site = Site::from_toml(text, "prop.site.toml").ok()?;
    for line in &site.lines {
        assert!(site.gateway(site.gateway_of_line(line)).is_some());
    }
    for meter in &site.meters {
        for limits in [meter.read_limits, ReadLimits::default()] {
            exercise_profile(&meter.profile, meter.ratios, limits, words);
        }
    }
    Some(site)
}

fn ratios() -> impl Strategy<Value = Ratios> {
    let ratio = prop_oneof![0.01f64..1000.0, any::<f64>()];
    (ratio.clone(), ratio).prop_map(|(ct, pt)| Ratios { ct, pt })
}

fn results() -> impl Strategy<Value = Vec<ReadResult>> {
    let result = (
        any::<bool>(),
        prop_oneof![any::<u16>(), 0x2000u16..0x2040, 0u16..0x80],
        prop::collection::vec(any::<u16>(), 0..130),
    )
        .prop_map(|(holding, address, words)| ReadResult {
            function: if holding {
                FunctionCode::ReadHoldingRegisters
            } else {
                FunctionCode::ReadInputRegisters
            },
            address,
            words,
        });
    prop::collection::vec(result, 0..6)
}

/// A site file whose second meter is generic, with one power register.
fn generic_site(address: u16, value_type: &str, word_order: &str, scale: f64) -> String {
    let mut text = SITE_FILES[0].to_string();
    text.push_str(&format!(
        "\n[[meters]]\nid = \"m-generic\"\ngateway = \"{}\"\nprofile = \"generic\"\n\
         tcp = \"127.0.0.1:1502\"\nunit = 9\n\n[[meters.registers]]\nquantity = \"power\"\n\
         address = {address}\ntype = \"{value_type}\"\nword_order = \"{word_order}\"\n\
         scale = {}\nunit = \"W\"\n",
        Site::from_toml(SITE_FILES[0], "x").unwrap().gateways[0].id,
        // Debug prints `inf`, `1e300` and `0.5`, all TOML; NaN is `nan`.
        if scale.is_nan() {
            "nan".to_string()
        } else {
            format!("{scale:?}")
        },
    ));
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_are_an_error_or_a_message_that_round_trips(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        all_wire_decoders(&bytes)?;
    }

    #[test]
    fn arbitrary_bodies_after_the_version_byte_are_an_error_or_round_trip(
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = vec![WIRE_VERSION];
        bytes.extend_from_slice(&body);
        all_wire_decoders(&bytes)?;
    }

    #[test]
    fn mutated_real_batches_are_an_error_or_round_trip(edits in mutations()) {
        let bytes = mutate(&real_batch().encode(), &edits);
        all_wire_decoders(&bytes)?;
    }

    #[test]
    fn open_refuses_arbitrary_bytes_by_length_or_tag(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        for purpose in [Purpose::Batch, Purpose::Ack] {
            let expected = if bytes.len() < TAG_LEN {
                OpenError::Short { len: bytes.len() }
            } else {
                OpenError::BadTag
            };
            prop_assert_eq!(seal::open(&KEY, purpose, &bytes), Err(expected));
        }
    }

    #[test]
    fn sealed_batches_open_intact_and_are_refused_once_mutated(edits in mutations()) {
        let batch = real_batch();
        let sealed = seal::seal(&KEY, Purpose::Batch, &batch.encode());
        let message = seal::open(&KEY, Purpose::Batch, &sealed).unwrap();
        prop_assert_eq!(Batch::decode(message), Ok(batch));
        let altered = mutate(&sealed, &edits);
        if altered != sealed {
            let expected = if altered.len() < TAG_LEN {
                OpenError::Short { len: altered.len() }
            } else {
                OpenError::BadTag
            };
            prop_assert_eq!(seal::open(&KEY, Purpose::Batch, &altered), Err(expected));
        }
    }

    #[test]
    fn arbitrary_text_is_refused_by_the_site_parser_without_panicking(
        text in prop_oneof![any::<String>(), "[\\[\\]a-z_.=\" 0-9\n#-]{0,300}"],
    ) {
        let _ = check_site(&text, &[]);
    }

    #[test]
    fn mutated_real_site_files_are_refused_or_every_meter_decodes(
        file in 0..SITE_FILES.len(),
        edits in mutations(),
        words in prop::collection::vec(any::<u16>(), 1..64),
    ) {
        let bytes = mutate(SITE_FILES[file].as_bytes(), &edits);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = check_site(text, &words);
        }
    }

    #[test]
    fn generic_registers_are_valid_exactly_when_they_fit_below_65536(
        address in prop_oneof![0xFFF8u16..=0xFFFF, any::<u16>()],
        value_type in prop::sample::select(vec![("u16", 1u32), ("i32", 2), ("f32", 2), ("f64", 4)]),
        word_order in prop::sample::select(vec!["ABCD", "CDAB", "BADC", "DCBA"]),
        scale in prop_oneof![Just(1.0), any::<f64>()],
        words in prop::collection::vec(any::<u16>(), 1..8),
    ) {
        let text = generic_site(address, value_type.0, word_order, scale);
        let fits = u32::from(address) + value_type.1 <= 0x1_0000;
        let scale_ok = scale.is_finite() && scale != 0.0;
        match check_site(&text, &words) {
            Some(site) => {
                prop_assert!(fits && scale_ok);
                let meter = site.meter("m-generic").unwrap();
                prop_assert_eq!(meter.profile.fields[0].address, address);
                prop_assert_eq!(meter.profile.fields[0].quantity, Quantity::Power);
            }
            None => {
                let err = Site::from_toml(&text, "prop.site.toml").unwrap_err();
                prop_assert!(!(fits && scale_ok), "{}", err);
                let key = err.key.unwrap();
                prop_assert!(key.ends_with("registers[0].address") || key.ends_with("registers[0].scale"), "{}", key);
            }
        }
    }

    #[test]
    fn only_8_byte_frames_with_their_crc_are_read_requests(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..16),
            prop::collection::vec(any::<u8>(), 8),
        ],
    ) {
        let parsed = rtu::parse_read_request(&bytes);
        if bytes.len() != 8 {
            prop_assert_eq!(parsed, Err(FrameError::Length(bytes.len())));
        } else if rtu::crc_ok(&bytes) {
            prop_assert!(parsed.is_ok());
        } else {
            prop_assert_eq!(parsed, Err(FrameError::Crc));
        }
    }

    #[test]
    fn every_request_frame_parses_back_to_its_fields(
        unit in any::<u8>(),
        holding in any::<bool>(),
        address in any::<u16>(),
        count in any::<u16>(),
    ) {
        let function = if holding {
            FunctionCode::ReadHoldingRegisters
        } else {
            FunctionCode::ReadInputRegisters
        };
        let frame = rtu::read_request(unit, RegisterRead { function, address, count });
        prop_assert_eq!(
            rtu::parse_read_request(&frame),
            Ok(ReadRequest { unit, function: function.code(), address, count })
        );
    }

    #[test]
    fn arbitrary_results_decode_to_finite_values_or_an_error(
        profile in prop::sample::select(ProfileName::ALL.to_vec()),
        ratios in ratios(),
        results in results(),
    ) {
        if let Ok(values) = Profile::builtin(profile).decode(&results, ratios) {
            assert_finite(&values);
        }
    }

    #[test]
    fn complete_results_with_arbitrary_words_decode_or_are_not_finite(
        profile in prop::sample::select(ProfileName::ALL.to_vec()),
        ratios in ratios(),
        max_registers in prop_oneof![Just(MAX_REGISTERS_PER_READ), any::<u16>()],
        max_gap in prop_oneof![Just(16u16), any::<u16>()],
        words in prop::collection::vec(any::<u16>(), 1..256),
    ) {
        let limits = ReadLimits { max_registers, max_gap };
        exercise_profile(&Profile::builtin(profile), ratios, limits, &words);
    }
}

/// Exact inputs: the regression the fuzzer found, through a whole site file
/// (generic f64 power register, so no ratio is needed to leave f32 range).
#[test]
fn generic_f64_power_beyond_f32_range_is_not_finite() {
    let site = Site::from_toml(&generic_site(0x0100, "f64", "ABCD", 1.0), "x").unwrap();
    let meter = site.meter("m-generic").unwrap();
    // 1e300 W as an ABCD f64: 0x7E37_E43C_8800_759C.
    let results = [ReadResult {
        function: FunctionCode::ReadHoldingRegisters,
        address: 0x0100,
        words: vec![0x7E37, 0xE43C, 0x8800, 0x759C],
    }];
    assert_eq!(
        meter.profile.decode(&results, meter.ratios),
        Err(ProfileError::NotFinite { address: 0x0100 })
    );
}

#[test]
fn the_real_inputs_themselves_decode() {
    let batch = real_batch();
    assert_eq!(Batch::decode(&batch.encode()), Ok(batch));
    for text in SITE_FILES {
        assert!(check_site(text, &[0x4366, 0]).is_some());
    }
    let status = Status {
        gateway: "gw-01".into(),
        state: LinkState::Online,
    };
    assert_eq!(Status::decode(&status.encode()), Ok(status));
}
