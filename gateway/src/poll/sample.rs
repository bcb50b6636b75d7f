//! What one poll of one meter yields, as a [`Sample`], and when a change of
//! a meter's health is worth a log line.
//!
//! Mapping (see `Quality` in facwatch_proto::wire):
//! values decoded -> `Ok`; no answer in time -> `Timeout`; a Modbus
//! exception -> `Exception(code)`; an answer that does not decode (bad
//! registers, mismatched frame) -> `DecodeError`; no connection (refused,
//! reset, connect timeout) -> `Offline`; not asked because the meter is
//! backing off after failures -> `Offline`. Values are empty unless `Ok`.

use facwatch_proto::profile::ReadResult;
use facwatch_proto::site::Meter;
use facwatch_proto::wire::{Quality, Sample, Values};

use super::link::ReadFailure;

/// The result of one poll, before it becomes a sample.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PollOutcome {
    Read(Values),
    /// A request got no answer within the Modbus timeout.
    Timeout,
    /// The meter refused the request (Modbus exception code).
    Exception(u8),
    /// The meter answered with something that did not decode.
    Garbled(String),
    /// The meter could not be reached (connect failed, link dropped).
    Unreachable(String),
    /// The meter was not asked in this slot: it is backing off.
    BackedOff,
}

impl PollOutcome {
    /// The outcome of reading `meter`'s registers: decoded values, or why
    /// there are none.
    pub(crate) fn of_reads(
        meter: &Meter,
        reads: Result<Vec<ReadResult>, ReadFailure>,
    ) -> PollOutcome {
        match reads {
            Ok(results) => match meter.profile.decode(&results, meter.ratios) {
                Ok(values) => PollOutcome::Read(values),
                Err(e) => PollOutcome::Garbled(e.to_string()),
            },
            Err(ReadFailure::Timeout { .. }) => PollOutcome::Timeout,
            Err(ReadFailure::Exception { code, .. }) => PollOutcome::Exception(code),
            Err(ReadFailure::Unreachable(why)) => PollOutcome::Unreachable(why),
            Err(ReadFailure::Garbled(why)) => PollOutcome::Garbled(why),
        }
    }

    pub(crate) fn quality(&self) -> Quality {
        match self {
            PollOutcome::Read(_) => Quality::Ok,
            PollOutcome::Timeout => Quality::Timeout,
            PollOutcome::Exception(code) => Quality::Exception(*code),
            PollOutcome::Garbled(_) => Quality::DecodeError,
            PollOutcome::Unreachable(_) | PollOutcome::BackedOff => Quality::Offline,
        }
    }

    /// Why the poll failed, for logs; empty for a successful read.
    pub(crate) fn detail(&self) -> String {
        match self {
            PollOutcome::Read(_) => String::new(),
            PollOutcome::Timeout => "no answer within the Modbus timeout".into(),
            PollOutcome::Exception(code) => {
                format!("Modbus exception {code} ({})", exception_name(*code))
            }
            PollOutcome::BackedOff => "not asked: backing off after failed polls".into(),
            PollOutcome::Garbled(why) | PollOutcome::Unreachable(why) => why.clone(),
        }
    }

    /// The sample of meter `meter` whose request started at `time_ms`.
    pub(crate) fn into_sample(self, meter: &str, time_ms: i64) -> Sample {
        let quality = self.quality();
        let values = match self {
            PollOutcome::Read(values) => values,
            _ => Values::default(),
        };
        Sample {
            meter: meter.to_string(),
            time_ms,
            quality,
            values,
        }
    }
}

/// The Modbus specification's name of an exception code.
pub(crate) fn exception_name(code: u8) -> &'static str {
    match code {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "server device failure",
        5 => "acknowledge",
        6 => "server device busy",
        8 => "memory parity error",
        10 => "gateway path unavailable",
        11 => "gateway target device failed to respond",
        _ => "not a standard exception code",
    }
}

/// A change in a meter's health worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HealthChange {
    /// The meter stopped giving readings, or fails in a new way.
    Failing(Quality),
    /// The meter gives readings again after failing.
    Recovered,
}

/// Compares the quality of this poll with the previous one (None before the
/// first poll). Logging only changes keeps a silent meter to one line, not
/// one per poll.
pub(crate) fn health_change(previous: Option<Quality>, current: Quality) -> Option<HealthChange> {
    match (previous, current) {
        (Some(prev), cur) if prev == cur => None,
        (None, Quality::Ok) => None,
        (Some(_), Quality::Ok) => Some(HealthChange::Recovered),
        (_, failing) => Some(HealthChange::Failing(failing)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_maps_to_its_quality_with_values_only_when_ok() {
        let values = Values {
            power_kw: Some(3.5),
            ..Values::default()
        };
        let cases = [
            (PollOutcome::Read(values.clone()), Quality::Ok, values),
            (PollOutcome::Timeout, Quality::Timeout, Values::default()),
            (
                PollOutcome::Exception(4),
                Quality::Exception(4),
                Values::default(),
            ),
            (
                PollOutcome::Garbled("x".into()),
                Quality::DecodeError,
                Values::default(),
            ),
            (
                PollOutcome::Unreachable("refused".into()),
                Quality::Offline,
                Values::default(),
            ),
            (PollOutcome::BackedOff, Quality::Offline, Values::default()),
        ];
        for (outcome, quality, values) in cases {
            assert_eq!(
                outcome.into_sample("m1", 42),
                Sample {
                    meter: "m1".into(),
                    time_ms: 42,
                    quality,
                    values
                }
            );
        }
    }

    #[test]
    fn exceptions_are_named() {
        assert_eq!(
            PollOutcome::Exception(2).detail(),
            "Modbus exception 2 (illegal data address)"
        );
        assert_eq!(
            exception_name(11),
            "gateway target device failed to respond"
        );
        assert_eq!(exception_name(99), "not a standard exception code");
    }

    #[test]
    fn health_is_logged_once_per_change() {
        use HealthChange::*;
        let table = [
            (None, Quality::Ok, None),
            (None, Quality::Timeout, Some(Failing(Quality::Timeout))),
            (Some(Quality::Ok), Quality::Ok, None),
            (
                Some(Quality::Ok),
                Quality::Offline,
                Some(Failing(Quality::Offline)),
            ),
            (Some(Quality::Offline), Quality::Offline, None),
            (
                Some(Quality::Offline),
                Quality::Timeout,
                Some(Failing(Quality::Timeout)),
            ),
            (
                Some(Quality::Exception(2)),
                Quality::Exception(4),
                Some(Failing(Quality::Exception(4))),
            ),
            (Some(Quality::Timeout), Quality::Ok, Some(Recovered)),
        ];
        for (previous, current, expected) in table {
            assert_eq!(
                health_change(previous, current),
                expected,
                "{previous:?} -> {current:?}"
            );
        }
    }
}
