//! What both ends of each facwatch wire agree on. No tokio, no sockets:
//!
//! - [`wire`] and [`topics`]: the MQTT batch format between gateway and
//!   ingest (versioned postcard, golden-bytes tested);
//! - [`profile`]: meter register maps and decoding, between meter (or
//!   simulator) and gateway, and the RTU framing ([`rtu`]);
//! - [`site`]: the site file all three programs read;
//! - [`clock`]: the (possibly simulated) clock that simulator and gateway
//!   share.

pub mod clock;
pub mod profile;
pub mod rtu;
pub mod site;
pub mod topics;
pub mod wire;
