//! Sealed payloads: what a gateway and the ingest put on the MQTT wire so
//! that nobody without the gateway's key can write as that gateway.
//!
//! Every batch a gateway publishes, and every ack the ingest sends it, is
//! the encoded message ([`crate::wire`]) followed by an HMAC-SHA256 tag over
//! exactly those bytes, keyed with the gateway's [`GatewayKey`]:
//!
//! ```text
//! +-------------------------------+-----------------------------+
//! | encoded message (wire::*)     | HMAC-SHA256(key, message)   |
//! +-------------------------------+-----------------------------+
//!                                   TAG_LEN = 32 bytes
//! ```
//!
//! Invariants:
//! - [`open`] checks the tag before anything looks at the message: a
//!   payload that fails it is never decoded, so nothing an outsider writes
//!   reaches a decoder behind it. The comparison is constant-time.
//! - Batch and ack tags are domain-separated ([`Purpose`]): the first tag
//!   byte fed to the MAC is the purpose, so an ack can never be replayed as
//!   a batch of the same gateway or the other way round.
//! - The tag binds the message bytes only; which gateway a message is for
//!   comes from the key the reader chose (by topic). The reader still
//!   checks that the decoded message names the same gateway.
//! - A [`GatewayKey`] never shows its bytes: `Debug` prints a fingerprint
//!   (the first 4 bytes of SHA-256 of the key), which is safe to log and
//!   lets an installer check that both ends hold the same key.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Bytes of the tag at the end of a sealed payload.
pub const TAG_LEN: usize = 32;

/// Largest sealed batch payload: a batch at [`crate::wire::MAX_BATCH_BYTES`]
/// and its tag.
pub const MAX_SEALED_BATCH_BYTES: usize = crate::wire::MAX_BATCH_BYTES + TAG_LEN;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;

/// A gateway's secret, shared by the gateway and the ingest only.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayKey([u8; KEY_LEN]);

impl GatewayKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> GatewayKey {
        GatewayKey(bytes)
    }

    /// A new key from the operating system's random source.
    pub fn generate() -> Result<GatewayKey, getrandom::Error> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::getrandom(&mut bytes)?;
        Ok(GatewayKey(bytes))
    }

    /// Parses the text of a key file: exactly 64 hex digits, surrounding
    /// white space ignored. The error never repeats the text.
    pub fn from_hex(text: &str) -> Result<GatewayKey, KeyFormatError> {
        let text = text.trim();
        if text.len() != 2 * KEY_LEN {
            return Err(KeyFormatError::Length { found: text.len() });
        }
        let mut bytes = [0u8; KEY_LEN];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let high = hex_digit(pair[0]).ok_or(KeyFormatError::NotHex { at: 2 * i })?;
            let low = hex_digit(pair[1]).ok_or(KeyFormatError::NotHex { at: 2 * i + 1 })?;
            bytes[i] = high << 4 | low;
        }
        Ok(GatewayKey(bytes))
    }

    /// The key as a key file holds it: 64 lower-case hex digits and a
    /// newline.
    pub fn to_hex_line(&self) -> String {
        let mut text: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        text.push('\n');
        text
    }

    /// 8 hex digits that identify the key without revealing it.
    pub fn fingerprint(&self) -> String {
        Sha256::digest(self.0)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn mac(&self, purpose: Purpose) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(&[purpose as u8]);
        mac
    }
}

impl std::fmt::Debug for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatewayKey(fingerprint {})", self.fingerprint())
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why the text of a key file is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("a key is {} hex digits, found {found} characters", 2 * KEY_LEN)]
    Length { found: usize },
    #[error("character {at} is not a hex digit")]
    NotHex { at: usize },
}

/// What a sealed payload is, fed to the MAC first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// Gateway -> ingest, on the batch topic.
    Batch = b'B',
    /// Ingest -> gateway, on the ack topic.
    Ack = b'A',
}

/// `message` followed by its tag.
pub fn seal(key: &GatewayKey, purpose: Purpose, message: &[u8]) -> Vec<u8> {
    let mut mac = key.mac(purpose);
    mac.update(message);
    let mut sealed = Vec::with_capacity(message.len() + TAG_LEN);
    sealed.extend_from_slice(message);
    sealed.extend_from_slice(&mac.finalize().into_bytes());
    sealed
}

/// Why a sealed payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("payload of {len} bytes is shorter than its {TAG_LEN}-byte tag")]
    Short { len: usize },
    #[error("the tag does not match (wrong key, or the payload was altered)")]
    BadTag,
}

/// The message of a sealed payload, if its tag is `key`'s for `purpose`.
pub fn open<'a>(
    key: &GatewayKey,
    purpose: Purpose,
    sealed: &'a [u8],
) -> Result<&'a [u8], OpenError> {
    let Some(split) = sealed.len().checked_sub(TAG_LEN) else {
        return Err(OpenError::Short { len: sealed.len() });
    };
    let (message, tag) = sealed.split_at(split);
    let mut mac = key.mac(purpose);
    mac.update(message);
    mac.verify_slice(tag).map_err(|_| OpenError::BadTag)?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> GatewayKey {
        GatewayKey::from_bytes([byte; KEY_LEN])
    }

    #[test]
    fn the_tag_is_hmac_sha256_over_purpose_and_message() {
        // The purpose byte is the first byte of the MAC's data: the tag of
        // "what do ya want for nothing?" as a batch is the plain HMAC of
        // "Bwhat do ya want for nothing?".
        let key = key(0x0b);
        let sealed = seal(&key, Purpose::Batch, b"what do ya want for nothing?");
        let mut reference = <Hmac<Sha256> as Mac>::new_from_slice(&[0x0b; 32]).unwrap();
        reference.update(b"Bwhat do ya want for nothing?");
        let expected = reference.finalize().into_bytes();
        assert_eq!(&sealed[..28], b"what do ya want for nothing?");
        assert_eq!(&sealed[28..], expected.as_slice());
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_test_case_2() {
        // Guards the crate wiring itself: the published vector.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn open_returns_the_message_under_the_same_key_and_purpose() {
        let sealed = seal(&key(1), Purpose::Ack, b"\x01\x05");
        assert_eq!(open(&key(1), Purpose::Ack, &sealed), Ok(&b"\x01\x05"[..]));
    }

    #[test]
    fn another_key_another_purpose_or_any_flipped_bit_is_refused() {
        let sealed = seal(&key(1), Purpose::Batch, b"batch bytes");
        assert_eq!(
            open(&key(2), Purpose::Batch, &sealed),
            Err(OpenError::BadTag)
        );
        assert_eq!(open(&key(1), Purpose::Ack, &sealed), Err(OpenError::BadTag));
        for bit in 0..sealed.len() * 8 {
            let mut altered = sealed.clone();
            altered[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                open(&key(1), Purpose::Batch, &altered),
                Err(OpenError::BadTag),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn short_payloads_are_refused_and_an_empty_message_is_fine() {
        assert_eq!(
            open(&key(1), Purpose::Batch, &[0; 31]),
            Err(OpenError::Short { len: 31 })
        );
        let sealed = seal(&key(1), Purpose::Batch, b"");
        assert_eq!(sealed.len(), TAG_LEN);
        assert_eq!(open(&key(1), Purpose::Batch, &sealed), Ok(&b""[..]));
    }

    #[test]
    fn key_files_are_64_hex_digits_and_errors_do_not_repeat_them() {
        let key = GatewayKey::from_bytes(std::array::from_fn(|i| i as u8 * 7));
        let line = key.to_hex_line();
        assert_eq!(line.len(), 65);
        assert_eq!(GatewayKey::from_hex(&line), Ok(key.clone()));
        assert_eq!(
            GatewayKey::from_hex(&format!("  {}  ", line.to_uppercase())),
            Ok(key)
        );
        assert_eq!(
            GatewayKey::from_hex("abc"),
            Err(KeyFormatError::Length { found: 3 })
        );
        let secretish = format!("{}zz", "a".repeat(62));
        let err = GatewayKey::from_hex(&secretish).unwrap_err();
        assert_eq!(err, KeyFormatError::NotHex { at: 62 });
        assert!(!err.to_string().contains("aaaa"), "{err}");
    }

    #[test]
    fn debug_shows_a_fingerprint_not_the_key() {
        let key = key(0xab);
        let shown = format!("{key:?}");
        assert_eq!(
            shown,
            format!("GatewayKey(fingerprint {})", key.fingerprint())
        );
        assert!(!shown.contains("abab"), "{shown}");
        assert_eq!(key.fingerprint().len(), 8);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            GatewayKey::generate().unwrap(),
            GatewayKey::generate().unwrap()
        );
    }
}
