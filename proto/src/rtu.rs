//! Modbus RTU framing: the CRC-16 and the frames of the read functions
//! facwatch uses (FC03, FC04). Pure functions over bytes, shared by the
//! simulators' RTU servers and by tests that pin frames to the vendors'
//! examples.
//!
//! Frame layout: `unit | function | payload | crc_lo crc_hi`, the CRC being
//! the standard Modbus CRC-16 (poly 0xA001 reflected, init 0xFFFF) over
//! everything before it, sent low byte first.

use crate::profile::{FunctionCode, RegisterRead};

/// The Modbus CRC-16 of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb != 0 {
                crc ^= 0xA001;
            }
        }
    }
    crc
}

fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// Whether a frame's last two bytes are the CRC of the rest.
pub fn crc_ok(frame: &[u8]) -> bool {
    frame.len() >= 4 && {
        let (body, crc) = frame.split_at(frame.len() - 2);
        crc16(body).to_le_bytes() == [crc[0], crc[1]]
    }
}

/// The request frame of a register read.
pub fn read_request(unit: u8, read: RegisterRead) -> Vec<u8> {
    let mut frame = vec![unit, read.function.code()];
    frame.extend_from_slice(&read.address.to_be_bytes());
    frame.extend_from_slice(&read.count.to_be_bytes());
    with_crc(frame)
}

/// A read request taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub unit: u8,
    /// The function code as sent (not necessarily 3 or 4).
    pub function: u8,
    pub address: u16,
    pub count: u16,
}

/// Why bytes are not a read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is not 8 bytes long")]
    Length(usize),
    #[error("CRC mismatch")]
    Crc,
}

/// Parses an 8-byte request frame (`unit fc addr count crc`).
pub fn parse_read_request(frame: &[u8]) -> Result<ReadRequest, FrameError> {
    if frame.len() != 8 {
        return Err(FrameError::Length(frame.len()));
    }
    if !crc_ok(frame) {
        return Err(FrameError::Crc);
    }
    Ok(ReadRequest {
        unit: frame[0],
        function: frame[1],
        address: u16::from_be_bytes([frame[2], frame[3]]),
        count: u16::from_be_bytes([frame[4], frame[5]]),
    })
}

/// The response frame carrying `words` for a read.
pub fn read_response(unit: u8, function: FunctionCode, words: &[u16]) -> Vec<u8> {
    let mut frame = vec![unit, function.code(), (words.len() * 2) as u8];
    for w in words {
        frame.extend_from_slice(&w.to_be_bytes());
    }
    with_crc(frame)
}

/// The exception response to a request with function code `function`.
pub fn exception_response(unit: u8, function: u8, code: u8) -> Vec<u8> {
    with_crc(vec![unit, function | 0x80, code])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_modbus_reference() {
        // Reference request from the Modbus over serial line guide.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        assert!(crc_ok(&[0x01, 0x03, 0x20, 0x12, 0x00, 0x02, 0x6F, 0xCE]));
        assert!(!crc_ok(&[0x01, 0x03, 0x20, 0x12, 0x00, 0x02, 0x6F, 0xCF]));
    }

    #[test]
    fn request_round_trips() {
        let read = RegisterRead {
            function: FunctionCode::ReadInputRegisters,
            address: 0x34,
            count: 2,
        };
        let frame = read_request(1, read);
        assert_eq!(frame, [0x01, 0x04, 0x00, 0x34, 0x00, 0x02, 0x30, 0x05]);
        assert_eq!(
            parse_read_request(&frame),
            Ok(ReadRequest {
                unit: 1,
                function: 4,
                address: 0x34,
                count: 2
            })
        );
        assert_eq!(parse_read_request(&frame[..7]), Err(FrameError::Length(7)));
        let mut bad = frame.clone();
        bad[3] ^= 1;
        assert_eq!(parse_read_request(&bad), Err(FrameError::Crc));
    }

    #[test]
    fn responses_carry_a_valid_crc() {
        let frame = read_response(2, FunctionCode::ReadHoldingRegisters, &[0x4366, 0x0000]);
        assert_eq!(&frame[..7], &[0x02, 0x03, 0x04, 0x43, 0x66, 0x00, 0x00]);
        assert!(crc_ok(&frame));
        let frame = exception_response(2, 4, 2);
        assert_eq!(&frame[..3], &[0x02, 0x84, 0x02]);
        assert!(crc_ok(&frame));
    }
}
