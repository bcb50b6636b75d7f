//! The samples a gateway polling a simulated plant takes, computed straight
//! from the simulator's plant model and fault schedule: no Modbus, no MQTT,
//! no clock. A simulated day takes milliseconds, so detector scenario tests
//! and property tests can run many of them.
//!
//! Invariants:
//! - one sample per meter of the gateway per poll slot (multiples of the
//!   gateway's poll interval in `[from_ms, until_ms)`), in slot order, meters
//!   in site-file order, as a gateway that never backs off would take them;
//! - quality as the gateway would record it: a silent meter, a bad CRC or a
//!   reply later than the meter's timeout is `Timeout`, a Modbus exception
//!   is `Exception(code)`, otherwise `Ok` with the plant's values at the
//!   slot time.
//!
//! What this does not model: the gateway's backoff (a failing meter's
//! skipped slots read `Offline` in a real run) and values rounded through
//! 32-bit registers. The end-to-end tests cover the real path.

use facwatch_proto::wire::{Quality, Sample, Values};
use facwatch_sim::{Plant, Scenario};

/// Every sample of `gateway`'s meters in `[from_ms, until_ms)`.
pub fn samples(scenario: &Scenario, gateway: &str, from_ms: i64, until_ms: i64) -> Vec<Sample> {
    let Some(interval_ms) = scenario
        .site
        .gateways
        .iter()
        .find(|g| g.id == gateway)
        .map(|g| (g.poll_interval.as_millis() as i64).max(1))
    else {
        return Vec::new();
    };
    let plant = Plant::new(scenario);
    let meters: Vec<_> = scenario
        .site
        .meters
        .iter()
        .filter(|m| m.gateway == gateway)
        .collect();
    let mut out = Vec::new();
    let mut slot = from_ms.div_euclid(interval_ms) * interval_ms;
    if slot < from_ms {
        slot += interval_ms;
    }
    while slot < until_ms {
        for meter in &meters {
            let faults = scenario.meter_faults(&meter.id, slot);
            let (quality, values) =
                if faults.silent || faults.bad_crc || faults.delay >= meter.timeout {
                    (Quality::Timeout, Values::default())
                } else if let Some(code) = faults.exception {
                    (Quality::Exception(code), Values::default())
                } else {
                    match plant.values(&meter.id, slot) {
                        Some(values) => (Quality::Ok, values),
                        None => (Quality::DecodeError, Values::default()),
                    }
                };
            out.push(Sample {
                meter: meter.id.clone(),
                time_ms: slot,
                quality,
                values,
            });
        }
        slot += interval_ms;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2022-12-13 `h:m` (+08:00), Unix ms.
    fn hm(h: i64, m: i64) -> i64 {
        1_670_860_800_000 + (h * 60 + m) * 60_000
    }

    #[test]
    fn one_sample_per_meter_per_slot_with_the_faults_of_the_scenario() {
        let scenario = crate::builtin_scenario().unwrap();
        // Line 2's main fan meter is silent from 16:00 to 16:20.
        let samples = samples(&scenario, "gw-01", hm(15, 59), hm(16, 1));
        // Slots 15:59:00, 15:59:30, 16:00:00, 16:00:30; ten meters each.
        assert_eq!(samples.len(), 40);
        assert_eq!(samples[0].time_ms, hm(15, 59));
        assert_eq!(samples[39].time_ms, hm(16, 0) + 30_000);
        let fan: Vec<(i64, Quality)> = samples
            .iter()
            .filter(|s| s.meter == "l2-main-fan")
            .map(|s| (s.time_ms, s.quality))
            .collect();
        assert_eq!(
            fan,
            [
                (hm(15, 59), Quality::Ok),
                (hm(15, 59) + 30_000, Quality::Ok),
                (hm(16, 0), Quality::Timeout),
                (hm(16, 0) + 30_000, Quality::Timeout),
            ]
        );
        let stenter = samples.iter().find(|s| s.meter == "l1-stenter").unwrap();
        assert_eq!(
            stenter.values,
            Plant::new(&scenario)
                .values("l1-stenter", hm(15, 59))
                .unwrap()
        );
    }

    #[test]
    fn an_unknown_gateway_has_no_samples() {
        let scenario = crate::builtin_scenario().unwrap();
        assert!(samples(&scenario, "gw-99", hm(0, 0), hm(1, 0)).is_empty());
    }
}
