//! What both ends of each facwatch wire agree on. No tokio, no sockets:
//!
//! - [`wire`] and [`topics`]: the MQTT batch format between gateway and
//!   ingest (versioned postcard, golden-bytes tested), [`seal`]ed with the
//!   gateway's key (HMAC-SHA256);
//! - [`secret`]: key and password files only their owner may read;
//! - [`profile`]: meter register maps and decoding, between meter (or
//!   simulator) and gateway, and the RTU framing ([`rtu`]);
//! - [`site`]: the site file all three programs read;
//! - [`clock`]: the (possibly simulated) clock that simulator and gateway
//!   share.

pub mod clock;
pub mod profile;
pub mod rtu;
pub mod seal;
pub mod secret;
pub mod site;
pub mod topics;
pub mod wire;
