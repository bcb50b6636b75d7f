//! Bytes as the ingest receives them from MQTT, and as both ends decode
//! acks and status messages.
//!
//! Each input goes through:
//! - `seal::open` with the fixed key, as a batch and as an ack; the
//!   message of a payload that opens is decoded as what its purpose says.
//!   Mutated inputs almost never carry a valid tag, which is the point of
//!   the seal: this part checks that `open` refuses by length or tag and
//!   returns exactly the bytes before the tag;
//! - `seal` then `open` of the input as a message: always the same bytes
//!   back, and never under the other purpose;
//! - `Batch::decode`, `Ack::decode` and `Status::decode` directly, each
//!   decoded value round-tripped (see `facwatch_fuzz::round_trip`).
#![no_main]

use facwatch_fuzz::{round_trip, KEY};
use facwatch_proto::seal::{self, OpenError, Purpose, TAG_LEN};
use facwatch_proto::wire::{Ack, Batch, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for purpose in [Purpose::Batch, Purpose::Ack] {
        match seal::open(&KEY, purpose, data) {
            Ok(message) => {
                assert_eq!(message, &data[..data.len() - TAG_LEN]);
                match purpose {
                    Purpose::Batch => drop(round_trip::<Batch>(message)),
                    Purpose::Ack => drop(round_trip::<Ack>(message)),
                }
            }
            Err(OpenError::Short { len }) => {
                assert_eq!(len, data.len());
                assert!(len < TAG_LEN);
            }
            Err(OpenError::BadTag) => assert!(data.len() >= TAG_LEN),
        }
        let sealed = seal::seal(&KEY, purpose, data);
        assert_eq!(seal::open(&KEY, purpose, &sealed), Ok(data));
        let other = match purpose {
            Purpose::Batch => Purpose::Ack,
            Purpose::Ack => Purpose::Batch,
        };
        assert_eq!(seal::open(&KEY, other, &sealed), Err(OpenError::BadTag));
    }
    let _ = round_trip::<Batch>(data);
    let _ = round_trip::<Ack>(data);
    let _ = round_trip::<Status>(data);
});
