//! Site-file text through `Site::from_toml`, the one way a gateway, the
//! ingest and the simulator get a `Site`. When a file validates, every
//! meter's profile (built-in or `generic`, written in the file) is put
//! through what a poll does with it: `reads` under the meter's own and
//! several other limits, `decode` of complete synthetic results (words
//! from the input's bytes, all zeros, all ones) and the simulator's
//! `encode`. Also the accessors that rely on validation (`gateway_of_line`
//! expects its meter to exist).
#![no_main]

use facwatch_fuzz::{exercise_profile, LIMITS};
use facwatch_proto::site::Site;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(site) = Site::from_toml(text, "fuzz.site.toml") else {
        return;
    };
    for line in &site.lines {
        let gateway = site.gateway_of_line(line);
        assert!(site.gateway(gateway).is_some());
    }
    for meter in &site.meters {
        let _ = meter.transport.bus();
        let _ = meter.transport.inter_frame_silence();
        let mut limits = LIMITS.to_vec();
        limits.push(meter.read_limits);
        let mut bytes = data.iter().cycle();
        let mut from_input = || {
            let hi = bytes.next().copied().unwrap_or(0);
            let lo = bytes.next().copied().unwrap_or(0);
            u16::from_be_bytes([hi, lo])
        };
        exercise_profile(&meter.profile, meter.ratios, &limits, &mut from_input);
        exercise_profile(&meter.profile, meter.ratios, &limits[..1], || 0);
        exercise_profile(&meter.profile, meter.ratios, &limits[..1], || u16::MAX);
    }
});
