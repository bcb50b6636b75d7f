//! What a meter's Modbus response turns into on the gateway: register words
//! decoded by a profile. tokio-modbus does the framing; this is the part
//! facwatch writes. The input is read as
//! - a profile: one of the built-ins, or a `generic` one whose registers
//!   (addresses up to 0xFFFF, every type and word order, odd scales) are
//!   written into a site file and validated as the gateway would;
//! - transformer ratios (anything; the site file only lets finite
//!   positive ones through, but decode must not panic on others either);
//! - read results: either an arbitrary list (wrong function codes,
//!   overlapping, short, starting anywhere) or complete answers to the
//!   profile's own reads with arbitrary words.
//!
//! `Profile::decode` must return `Ok` with finite values or an error, never
//! panic (`facwatch_fuzz::checked_decode`). The raw input also goes through
//! `rtu::parse_read_request` and `rtu::crc_ok`: a frame that parses is
//! exactly the frame `rtu::read_request` builds from its fields.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use facwatch_fuzz::{checked_decode, checked_reads, generic_site, GenericRegister, LIMITS};
use facwatch_proto::profile::{
    FunctionCode, Profile, ProfileName, Ratios, ReadResult, RegisterRead,
};
use facwatch_proto::rtu;
use facwatch_proto::site::Site;
use libfuzzer_sys::fuzz_target;

fn profile(u: &mut Unstructured<'_>) -> arbitrary::Result<Option<(Profile, Ratios)>> {
    let choice = usize::from(u8::arbitrary(u)?) % (ProfileName::ALL.len() + 1);
    let ratios = Ratios {
        ct: f64::arbitrary(u)?,
        pt: f64::arbitrary(u)?,
    };
    if let Some(&name) = ProfileName::ALL.get(choice) {
        return Ok(Some((Profile::builtin(name), ratios)));
    }
    let registers: Vec<GenericRegister> = (0..1 + usize::from(u8::arbitrary(u)? % 5))
        .map(|_| GenericRegister::arbitrary(u))
        .collect::<arbitrary::Result<_>>()?;
    let text = generic_site(&registers, ratios.ct, ratios.pt);
    Ok(Site::from_toml(&text, "fuzz.site.toml").ok().map(|site| {
        let meter = site.meter("m").expect("the generic meter of generic_site");
        (meter.profile.clone(), meter.ratios)
    }))
}

fn arbitrary_results(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<ReadResult>> {
    let n = usize::from(u8::arbitrary(u)? % 8);
    (0..n)
        .map(|_| {
            let function = if bool::arbitrary(u)? {
                FunctionCode::ReadHoldingRegisters
            } else {
                FunctionCode::ReadInputRegisters
            };
            let address = u16::arbitrary(u)?;
            let len = usize::from(u8::arbitrary(u)? % 130);
            let words = (0..len)
                .map(|_| u16::arbitrary(u))
                .collect::<arbitrary::Result<_>>()?;
            Ok(ReadResult {
                function,
                address,
                words,
            })
        })
        .collect()
}

fn check_frame(data: &[u8]) {
    let parsed = rtu::parse_read_request(data);
    if data.len() == 8 {
        assert_eq!(parsed.is_ok(), rtu::crc_ok(data));
    }
    if let Ok(request) = parsed {
        if let Some(function) = FunctionCode::from_code(request.function) {
            let read = RegisterRead {
                function,
                address: request.address,
                count: request.count,
            };
            assert_eq!(rtu::read_request(request.unit, read), data);
        }
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let Some((profile, ratios)) = profile(&mut u)? else {
        return Ok(());
    };
    if bool::arbitrary(&mut u)? {
        let results = arbitrary_results(&mut u)?;
        checked_decode(&profile, &results, ratios, false);
    } else {
        let limits = LIMITS[usize::from(u8::arbitrary(&mut u)?) % LIMITS.len()];
        let reads = checked_reads(&profile, limits);
        let mut results = Vec::with_capacity(reads.len());
        for r in &reads {
            let words = (0..r.count)
                .map(|_| u16::arbitrary(&mut u))
                .collect::<arbitrary::Result<_>>()?;
            results.push(ReadResult {
                function: r.function,
                address: r.address,
                words,
            });
        }
        checked_decode(&profile, &results, ratios, true);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    check_frame(data);
    let _ = run(data);
});
