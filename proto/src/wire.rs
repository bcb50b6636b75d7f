//! The MQTT wire format between gateway and ingest.
//!
//! Every payload is one version byte followed by a postcard body:
//!
//! ```text
//! +---------+---------------------------+
//! | version | postcard(Batch|Ack|Status) |
//! +---------+---------------------------+
//! ```
//!
//! postcard is not self-describing, so the version byte is the only thing that
//! lets a reader know what follows. Invariants:
//!
//! - A reader accepts exactly [`WIRE_VERSION`]; any other first byte is
//!   [`DecodeError::UnsupportedVersion`], never a guess.
//! - Decoding never panics and never reads past its input: garbage,
//!   truncation and trailing bytes are all errors.
//! - Field order is the encoding. Adding a field means a new version; the
//!   golden-bytes tests below fail on any accidental change.
//! - No `skip_serializing_if`, `flatten` or untagged enums anywhere here.

use serde::{Deserialize, Serialize};

/// The only payload version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// Upper bound on an encoded batch, shared by the gateway (which cuts batches
/// below it) and the ingest (which refuses anything larger before decoding).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A group of samples from one gateway, the unit of delivery and of acking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Gateway id; must equal the `{gw}` of the topic it was published on.
    pub gateway: String,
    /// Increases by exactly one per batch over the gateway's lifetime.
    pub seq: u64,
    /// Samples the gateway had to discard since the previous batch.
    pub dropped_before: u64,
    /// Samples in the order they were taken.
    pub samples: Vec<Sample>,
}

/// One reading of one meter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Meter id from the site file.
    pub meter: String,
    /// Acquisition time: the start of the Modbus request, ms since the Unix
    /// epoch (UTC).
    pub time_ms: i64,
    /// Whether the reading succeeded; `values` is empty unless `Ok`.
    pub quality: Quality,
    pub values: Values,
}

/// Outcome of one poll of one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Quality {
    Ok,
    /// The meter did not answer within the timeout.
    Timeout,
    /// The meter answered with a Modbus exception (the code).
    Exception(u8),
    /// The meter answered but the registers did not decode to sane values.
    DecodeError,
    /// The meter could not even be connected to.
    Offline,
}

impl Quality {
    /// Short stable name, for logs and metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Quality::Ok => "ok",
            Quality::Timeout => "timeout",
            Quality::Exception(_) => "exception",
            Quality::DecodeError => "decode_error",
            Quality::Offline => "offline",
        }
    }
}

/// Decoded electrical values, primary side, engineering units. A quantity the
/// meter profile does not provide is `None` (or empty for per-phase lists).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Values {
    /// Total active power, kW.
    pub power_kw: Option<f32>,
    /// Imported active energy counter, kWh.
    pub energy_kwh: Option<f64>,
    /// Phase voltages (line to neutral), V.
    pub voltage_v: Vec<f32>,
    /// Phase currents, A.
    pub current_a: Vec<f32>,
    /// Total power factor.
    pub power_factor: Option<f32>,
}

/// Sent by the ingest after it has durably applied every batch up to `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
}

/// A gateway's retained presence message; the offline variant is its last
/// will.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub gateway: String,
    pub state: LinkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    Online,
    Offline,
}

/// Why a payload could not be decoded. Each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("unsupported payload version {found} (this build reads version {WIRE_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("payload of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed {what} body: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{count} trailing bytes after the {what} body")]
    TrailingBytes { what: &'static str, count: usize },
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![WIRE_VERSION];
    // Serializing owned strings, vectors and numbers into a Vec cannot fail.
    postcard::to_extend(value, out).expect("postcard encodes plain data into a Vec")
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed {
        what,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            count: rest.len(),
        });
    }
    Ok(value)
}

impl Batch {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a batch, refusing payloads over [`MAX_BATCH_BYTES`] before
    /// looking inside them.
    pub fn decode(bytes: &[u8]) -> Result<Batch, DecodeError> {
        if bytes.len() > MAX_BATCH_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                limit: MAX_BATCH_BYTES,
            });
        }
        decode(bytes, "batch")
    }
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Ack, DecodeError> {
        decode(bytes, "ack")
    }
}

impl Status {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Status, DecodeError> {
        decode(bytes, "status")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_batch() -> Batch {
        Batch {
            gateway: "gw1".into(),
            seq: 300,
            dropped_before: 2,
            samples: vec![
                Sample {
                    meter: "m1".into(),
                    time_ms: 1_670_911_380_000,
                    quality: Quality::Ok,
                    values: Values {
                        power_kw: Some(1.5),
                        energy_kwh: Some(2.0),
                        voltage_v: vec![220.0],
                        current_a: vec![],
                        power_factor: None,
                    },
                },
                Sample {
                    meter: "m2".into(),
                    time_ms: -1,
                    quality: Quality::Exception(2),
                    values: Values::default(),
                },
            ],
        }
    }

    #[test]
    fn batch_encoding_matches_golden_bytes() {
        #[rustfmt::skip]
        let golden: Vec<u8> = vec![
            0x01,                               // wire version
            0x03, b'g', b'w', b'1',             // gateway
            0xAC, 0x02,                         // seq 300 (varint)
            0x02,                               // dropped_before
            0x02,                               // two samples
            0x02, b'm', b'1',                   // meter
            0xC0, 0xA8, 0xA2, 0xA1, 0xA1, 0x61, // time_ms (zigzag varint)
            0x00,                               // Quality::Ok
            0x01, 0x00, 0x00, 0xC0, 0x3F,       // power_kw Some(1.5f32)
            0x01, 0, 0, 0, 0, 0, 0, 0x00, 0x40, // energy_kwh Some(2.0f64)
            0x01, 0x00, 0x00, 0x5C, 0x43,       // voltage_v [220.0]
            0x00,                               // current_a []
            0x00,                               // power_factor None
            0x02, b'm', b'2',                   // meter
            0x01,                               // time_ms -1 (zigzag)
            0x02, 0x02,                         // Quality::Exception(2)
            0x00, 0x00, 0x00, 0x00, 0x00,       // empty values
        ];
        assert_eq!(sample_batch().encode(), golden);
        assert_eq!(Batch::decode(&golden).unwrap(), sample_batch());
    }

    #[test]
    fn ack_and_status_encodings_match_golden_bytes() {
        assert_eq!(Ack { seq: 1 }.encode(), vec![0x01, 0x01]);
        assert_eq!(Ack::decode(&[0x01, 0x80, 0x01]).unwrap(), Ack { seq: 128 });
        let status = Status {
            gateway: "g".into(),
            state: LinkState::Offline,
        };
        assert_eq!(status.encode(), vec![0x01, 0x01, b'g', 0x01]);
        assert_eq!(Status::decode(&status.encode()).unwrap(), status);
    }

    #[test]
    fn empty_payload_is_an_error() {
        assert_eq!(Batch::decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn newer_version_is_refused_by_name() {
        let mut bytes = sample_batch().encode();
        bytes[0] = 2;
        let err = Batch::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion { found: 2 });
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn every_truncation_of_a_batch_is_an_error() {
        let bytes = sample_batch().encode();
        for len in 0..bytes.len() {
            assert!(
                Batch::decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = Ack { seq: 5 }.encode();
        bytes.push(0);
        assert_eq!(
            Ack::decode(&bytes),
            Err(DecodeError::TrailingBytes {
                what: "ack",
                count: 1
            })
        );
    }

    #[test]
    fn oversized_batch_is_refused_before_decoding() {
        let bytes = vec![WIRE_VERSION; MAX_BATCH_BYTES + 1];
        assert!(matches!(
            Batch::decode(&bytes),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic generator keeps this test reproducible.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32 * 8) & 0xFF) as u8)
                .collect();
            let _ = Batch::decode(&bytes);
            let _ = Ack::decode(&bytes);
            let _ = Status::decode(&bytes);
        }
    }
}
