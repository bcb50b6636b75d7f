//! Register maps pinned to DOMAIN.md and to hand-made register words.

use super::*;
use crate::rtu;

/// Lays `words` out as the results of the profile's reads (unset
/// registers read 0).
fn image(profile: &Profile, words: &[(FunctionCode, u16, u16)]) -> Vec<ReadResult> {
    profile
        .reads(ReadLimits::default())
        .into_iter()
        .map(|read| ReadResult {
            function: read.function,
            address: read.address,
            words: (read.address..read.address + read.count)
                .map(|a| {
                    words
                        .iter()
                        .find(|(f, w, _)| *f == read.function && *w == a)
                        .map_or(0, |(_, _, v)| *v)
                })
                .collect(),
        })
        .collect()
}

fn decode(name: ProfileName, words: &[(u16, u16)], ratios: Ratios) -> Values {
    let profile = Profile::builtin(name);
    let function = profile.fields[0].function;
    let words: Vec<_> = words.iter().map(|&(a, w)| (function, a, w)).collect();
    profile.decode(&image(&profile, &words), ratios).unwrap()
}

fn power_field(name: ProfileName) -> Field {
    *Profile::builtin(name)
        .fields
        .iter()
        .find(|f| f.quantity == Quantity::Power)
        .unwrap()
}

#[test]
fn power_reads_match_the_example_frames_in_domain_md() {
    let frame = |name: ProfileName| {
        let f = power_field(name);
        rtu::read_request(
            1,
            RegisterRead {
                function: f.function,
                address: f.address,
                count: f.value_type.registers(),
            },
        )
    };
    assert_eq!(
        frame(ProfileName::Dtsu666),
        [0x01, 0x03, 0x20, 0x12, 0x00, 0x02, 0x6F, 0xCE]
    );
    assert_eq!(
        frame(ProfileName::Sdm630),
        [0x01, 0x04, 0x00, 0x34, 0x00, 0x02, 0x30, 0x05]
    );
    assert_eq!(
        frame(ProfileName::Adl400),
        [0x01, 0x03, 0x01, 0x6A, 0x00, 0x02, 0xE5, 0xEB]
    );
}

#[test]
fn reads_cover_every_field_within_the_limits() {
    for limits in [
        ReadLimits::default(),
        ReadLimits {
            max_registers: 8,
            max_gap: 0,
        },
    ] {
        for name in ProfileName::ALL {
            let profile = Profile::builtin(name);
            let reads = profile.reads(limits);
            for read in &reads {
                assert!(
                    read.count <= limits.max_registers.max(4),
                    "{name:?} {read:?}"
                );
            }
            for field in &profile.fields {
                for address in field.address..field.address + field.value_type.registers() {
                    assert!(
                        reads.iter().any(|r| r.function == field.function
                            && address >= r.address
                            && address < r.address + r.count),
                        "{name:?} register {address:#x} not read"
                    );
                }
            }
        }
    }
}

#[test]
fn reads_coalesce_adjacent_fields_and_split_on_gaps_and_limits() {
    let reads = |name, limits| Profile::builtin(name).reads(limits);
    // SDM630: voltages and currents, then 40 unused registers (more than
    // the default gap of 16), then power through import energy.
    assert_eq!(
        reads(ProfileName::Sdm630, ReadLimits::default())
            .iter()
            .map(|r| (r.function.code(), r.address, r.count))
            .collect::<Vec<_>>(),
        vec![(4, 0x00, 0x0C), (4, 0x34, 0x16)]
    );
    // With a gap of 64 allowed: 0x00..0x49 in one read of 74 registers.
    let wide = ReadLimits {
        max_registers: 125,
        max_gap: 64,
    };
    assert_eq!(
        reads(ProfileName::Sdm630, wide),
        vec![RegisterRead {
            function: FunctionCode::ReadInputRegisters,
            address: 0,
            count: 0x4A
        }]
    );
    // DTSU666: 0x2006..0x202B (the PF at 0x202A is 24 registers past Pt,
    // more than the default gap of 16), and the energy far away.
    assert_eq!(
        reads(ProfileName::Dtsu666, ReadLimits::default())
            .iter()
            .map(|r| (r.address, r.count))
            .collect::<Vec<_>>(),
        vec![(0x2006, 0x0E), (0x202A, 2), (0x401E, 2)]
    );
    let wide_gap = ReadLimits {
        max_registers: 125,
        max_gap: 32,
    };
    assert_eq!(
        reads(ProfileName::Dtsu666, wide_gap)
            .iter()
            .map(|r| (r.address, r.count))
            .collect::<Vec<_>>(),
        vec![(0x2006, 0x26), (0x401E, 2)]
    );
    // A small per-device maximum splits the SDM630 block.
    let small = reads(
        ProfileName::Sdm630,
        ReadLimits {
            max_registers: 12,
            max_gap: 16,
        },
    );
    assert_eq!(
        small
            .iter()
            .map(|r| (r.address, r.count))
            .collect::<Vec<_>>(),
        vec![(0x00, 0x0C), (0x34, 0x0C), (0x48, 0x02)]
    );
}

#[test]
fn dtsu666_scales_secondary_values_by_ct_and_pt() {
    // Raw secondary-side floats: 2250.0 voltage * PT 1 * 0.1 = 225 V;
    // 1000.0 current * CT 40 * 0.001 = 40 A; 2000.0 power * PT 1 * CT 40
    // * 0.1 W = 8 kW; 864.0 PF * 0.001 = 0.864.
    let words = [
        (0x2006, 0x450C),
        (0x2007, 0xA000),
        (0x200C, 0x447A),
        (0x2012, 0x44FA),
        (0x202A, 0x4458),
        (0x401E, 0x4640), // 12288.0 kWh
    ];
    let values = decode(ProfileName::Dtsu666, &words, Ratios { ct: 40.0, pt: 1.0 });
    assert_eq!(values.power_kw, Some(8.0));
    assert_eq!(values.voltage_v[0], 225.0);
    assert_eq!(values.current_a[0], 40.0);
    assert_eq!(values.power_factor, Some(0.864));
    assert_eq!(values.energy_kwh, Some(12288.0));
    // A 10 kV / 100 V PT multiplies voltage and power by 100.
    let values = decode(
        ProfileName::Dtsu666,
        &words,
        Ratios {
            ct: 40.0,
            pt: 100.0,
        },
    );
    assert_eq!(values.voltage_v[0], 22_500.0);
    assert_eq!(values.power_kw, Some(800.0));
}

#[test]
fn ddsu666_reads_one_phase_in_engineering_units() {
    let words = [
        (0x2000, 0x4366), // 230.0 V
        (0x2002, 0x4120), // 10.0 A
        (0x2004, 0x4010), // 2.25 kW
        (0x200A, 0x3F40), // 0.75
        (0x4000, 0x447A), // 1000.0 kWh
    ];
    let values = decode(ProfileName::Ddsu666, &words, Ratios::default());
    assert_eq!(values.voltage_v, vec![230.0]);
    assert_eq!(values.current_a, vec![10.0]);
    assert_eq!(values.power_kw, Some(2.25));
    assert_eq!(values.power_factor, Some(0.75));
    assert_eq!(values.energy_kwh, Some(1000.0));
}

#[test]
fn adl400_reads_scaled_integers_on_the_secondary_side() {
    let words = [
        (0x000A, 0x0001), // u32 0x0001_86A0 = 100000 * 0.01 = 1000 kWh secondary
        (0x000B, 0x86A0),
        (0x0061, 2200),   // 220.0 V
        (0x0064, 500),    // 5.00 A
        (0x016A, 0xFFFF), // i32 -1500 * 0.001 = -1.5 kW (export)
        (0x016B, 0xFA24),
        (0x017F, 0xFCE0), // i16 -800 * 0.001 = -0.8
    ];
    let values = decode(ProfileName::Adl400, &words, Ratios { ct: 20.0, pt: 1.0 });
    assert_eq!(values.energy_kwh, Some(20_000.0));
    assert_eq!(values.voltage_v[0], 220.0);
    assert_eq!(values.current_a[0], 100.0);
    assert_eq!(values.power_kw, Some(-30.0));
    assert_eq!(values.power_factor, Some(-0.8));
}

#[test]
fn adw300_reads_watts_and_hundredths_of_kwh() {
    let words = [
        (20, 2301),   // 230.1 V
        (26, 1234),   // 12.34 A
        (36, 0x0000), // i32 7500 W = 7.5 kW
        (37, 0x1D4C),
        (62, 0x0001), // u32 123456 * 0.01 = 1234.56 kWh
        (63, 0xE240),
    ];
    let values = decode(ProfileName::Adw300, &words, Ratios { ct: 40.0, pt: 1.0 });
    assert!((values.voltage_v[0] - 230.1).abs() < 1e-4);
    assert!((values.current_a[0] - 12.34).abs() < 1e-4);
    assert_eq!(values.power_kw, Some(7.5));
    assert!((values.energy_kwh.unwrap() - 1234.56).abs() < 1e-9);
    assert_eq!(values.power_factor, None);
}

#[test]
fn sdm630_reads_input_registers_in_engineering_units() {
    let words = [
        (0x00, 0x4366), // 230.0 V
        (0x34, 0x45FA), // 8000.0 W = 8 kW
        (0x3E, 0x3F40), // 0.75
        (0x48, 0x4120), // 10.0 kWh
    ];
    // Ratios do not apply to a meter that reports primary values.
    let values = decode(ProfileName::Sdm630, &words, Ratios { ct: 40.0, pt: 10.0 });
    assert_eq!(values.power_kw, Some(8.0));
    assert_eq!(values.voltage_v[0], 230.0);
    assert_eq!(values.power_factor, Some(0.75));
    assert_eq!(values.energy_kwh, Some(10.0));
}

#[test]
fn sdm120_reads_one_phase() {
    let words = [
        (0x00, 0x4366),
        (0x06, 0x4120),
        (0x0C, 0x4510),
        (0x1E, 0x3F80),
        (0x48, 0x4120),
    ];
    let values = decode(ProfileName::Sdm120, &words, Ratios::default());
    assert_eq!(values.voltage_v, vec![230.0]);
    assert_eq!(values.current_a, vec![10.0]);
    assert_eq!(values.power_kw, Some(2.304)); // 2304.0 W
    assert_eq!(values.power_factor, Some(1.0));
    assert_eq!(values.energy_kwh, Some(10.0));
}

fn generic(value_type: ValueType, word_order: WordOrder) -> Profile {
    Profile {
        name: "generic".into(),
        fields: vec![Field {
            quantity: Quantity::Power,
            function: FunctionCode::ReadHoldingRegisters,
            address: 100,
            value_type,
            word_order,
            scale: 1.0,
            offset: 0.0,
            ratios: RatioUse::None,
        }],
    }
}

fn decode_generic(value_type: ValueType, word_order: WordOrder, words: &[u16]) -> f32 {
    let results = [ReadResult {
        function: FunctionCode::ReadHoldingRegisters,
        address: 100,
        words: words.to_vec(),
    }];
    generic(value_type, word_order)
        .decode(&results, Ratios::default())
        .unwrap()
        .power_kw
        .unwrap()
}

#[test]
fn all_four_word_orders_of_a_float() {
    // 8.5f32 = 0x4108_0000: bytes A=41 B=08 C=00 D=00.
    assert_eq!(
        decode_generic(ValueType::F32, WordOrder::Abcd, &[0x4108, 0x0000]),
        8.5
    );
    assert_eq!(
        decode_generic(ValueType::F32, WordOrder::Cdab, &[0x0000, 0x4108]),
        8.5
    );
    assert_eq!(
        decode_generic(ValueType::F32, WordOrder::Badc, &[0x0841, 0x0000]),
        8.5
    );
    assert_eq!(
        decode_generic(ValueType::F32, WordOrder::Dcba, &[0x0000, 0x0841]),
        8.5
    );
}

#[test]
fn all_four_word_orders_of_integers() {
    // 0x0102_0304 = 16909060.
    let n = 16_909_060.0;
    assert_eq!(
        decode_generic(ValueType::U32, WordOrder::Abcd, &[0x0102, 0x0304]),
        n
    );
    assert_eq!(
        decode_generic(ValueType::U32, WordOrder::Cdab, &[0x0304, 0x0102]),
        n
    );
    assert_eq!(
        decode_generic(ValueType::U32, WordOrder::Badc, &[0x0201, 0x0403]),
        n
    );
    assert_eq!(
        decode_generic(ValueType::U32, WordOrder::Dcba, &[0x0403, 0x0201]),
        n
    );
    assert_eq!(
        decode_generic(ValueType::I32, WordOrder::Cdab, &[0xFFFE, 0xFFFF]),
        -2.0
    );
    assert_eq!(
        decode_generic(ValueType::I16, WordOrder::Abcd, &[0xFFFE]),
        -2.0
    );
    assert_eq!(
        decode_generic(ValueType::I16, WordOrder::Badc, &[0xFEFF]),
        -2.0
    );
    assert_eq!(
        decode_generic(ValueType::U16, WordOrder::Dcba, &[0x3412]),
        4660.0
    );
}

#[test]
fn all_four_word_orders_of_a_double() {
    // 8.5f64 = 0x4021_0000_0000_0000.
    let f64_abcd = [0x4021, 0, 0, 0];
    assert_eq!(
        decode_generic(ValueType::F64, WordOrder::Abcd, &f64_abcd),
        8.5
    );
    assert_eq!(
        decode_generic(ValueType::F64, WordOrder::Cdab, &[0, 0, 0, 0x4021]),
        8.5
    );
    assert_eq!(
        decode_generic(ValueType::F64, WordOrder::Badc, &[0x2140, 0, 0, 0]),
        8.5
    );
    assert_eq!(
        decode_generic(ValueType::F64, WordOrder::Dcba, &[0, 0, 0, 0x2140]),
        8.5
    );
}

#[test]
fn scale_and_offset_apply_after_decoding() {
    let mut profile = generic(ValueType::I16, WordOrder::Abcd);
    profile.fields[0].scale = 0.5;
    profile.fields[0].offset = -1.0;
    let results = [ReadResult {
        function: FunctionCode::ReadHoldingRegisters,
        address: 100,
        words: vec![10],
    }];
    let values = profile.decode(&results, Ratios::default()).unwrap();
    assert_eq!(values.power_kw, Some(4.0));
}

#[test]
fn encode_then_decode_round_trips_for_every_profile_and_order() {
    let values = Values {
        power_kw: Some(17.5),
        energy_kwh: Some(1234.5),
        voltage_v: vec![221.0, 224.5, 226.0],
        current_a: vec![30.5, 31.0, 29.75],
        power_factor: Some(0.85),
    };
    let ratios = Ratios { ct: 40.0, pt: 1.0 };
    let mut profiles: Vec<Profile> = ProfileName::ALL.into_iter().map(Profile::builtin).collect();
    for t in [
        ValueType::I32,
        ValueType::F32,
        ValueType::F64,
        ValueType::U32,
    ] {
        for o in [
            WordOrder::Abcd,
            WordOrder::Cdab,
            WordOrder::Badc,
            WordOrder::Dcba,
        ] {
            let mut p = generic(t, o);
            p.fields[0].scale = 0.001;
            profiles.push(p);
        }
    }
    for profile in profiles {
        let decoded = profile
            .decode(&image(&profile, &profile.encode(&values, ratios)), ratios)
            .unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 0.02 * b.abs().max(1.0);
        assert!(
            close(decoded.power_kw.unwrap(), 17.5),
            "{} {decoded:?}",
            profile.name
        );
        if let Some(pf) = decoded.power_factor {
            assert!(close(pf, 0.85), "{} {decoded:?}", profile.name);
        }
        if let Some(e) = decoded.energy_kwh {
            assert!((e - 1234.5).abs() < 0.5, "{} {decoded:?}", profile.name);
        }
        for (got, want) in decoded.voltage_v.iter().zip(&values.voltage_v) {
            assert!(close(*got, *want), "{} {decoded:?}", profile.name);
        }
        for (got, want) in decoded.current_a.iter().zip(&values.current_a) {
            assert!(close(*got, *want), "{} {decoded:?}", profile.name);
        }
    }
}

#[test]
fn nan_register_is_a_decode_error() {
    let profile = Profile::builtin(ProfileName::Sdm630);
    let words = [(FunctionCode::ReadInputRegisters, 0x34, 0x7FC0)];
    assert_eq!(
        profile.decode(&image(&profile, &words), Ratios::default()),
        Err(ProfileError::NotFinite { address: 0x34 })
    );
}

/// Regression, found by `fuzz/run modbus_response`: a float register times
/// a transformer ratio can be finite as f64 yet beyond f32::MAX, and
/// `decode` passed it on as an infinite voltage (`Values` keeps all but
/// energy as f32), breaking its "never infinite" invariant.
#[test]
fn value_beyond_f32_range_after_ratios_is_a_decode_error() {
    let profile = Profile::builtin(ProfileName::Dtsu666);
    let fc3 = FunctionCode::ReadHoldingRegisters;
    // The minimised fuzzer input: voltage 0x4539_0039 (2963.5 V secondary,
    // 296.35 after the 0.1 scale) with a PT ratio of -4.25e71.
    let ratios = Ratios {
        ct: 3.054898877903702e25,
        pt: -4.2525571461782306e71,
    };
    let words = [(fc3, 0x2006, 0x4539), (fc3, 0x2007, 0x0039)];
    assert_eq!(
        profile.decode(&image(&profile, &words), ratios),
        Err(ProfileError::NotFinite { address: 0x2006 })
    );
    // The same with a plausible ratio: f32::MAX in the register, PT 100.
    let ratios = Ratios { ct: 1.0, pt: 100.0 };
    let words = [(fc3, 0x2006, 0x7F7F), (fc3, 0x2007, 0xFFFF)];
    assert_eq!(
        profile.decode(&image(&profile, &words), ratios),
        Err(ProfileError::NotFinite { address: 0x2006 })
    );
    // Energy is kept as f64: the same magnitude there is a value.
    let words = [(fc3, 0x401E, 0x7F7F), (fc3, 0x401F, 0xFFFF)];
    let values = profile.decode(&image(&profile, &words), ratios).unwrap();
    assert_eq!(values.energy_kwh, Some(f64::from(f32::MAX)));
}

#[test]
fn missing_block_is_a_decode_error() {
    let profile = Profile::builtin(ProfileName::Sdm630);
    let results = vec![ReadResult {
        function: FunctionCode::ReadInputRegisters,
        address: 0,
        words: vec![0; 10],
    }];
    assert!(matches!(
        profile.decode(&results, Ratios::default()),
        Err(ProfileError::MissingRegister { function: 4, .. })
    ));
    // Right addresses, wrong function code: still missing.
    let results = vec![ReadResult {
        function: FunctionCode::ReadHoldingRegisters,
        address: 0,
        words: vec![0; 0x4A],
    }];
    assert!(profile.decode(&results, Ratios::default()).is_err());
}

#[test]
fn unknown_profile_name_lists_the_known_ones() {
    let err = "dtsu999".parse::<ProfileName>().unwrap_err();
    assert!(
        err.contains("dtsu999") && err.contains("sdm120") && err.contains("generic"),
        "{err}"
    );
}
