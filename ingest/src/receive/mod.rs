//! Receiving batches from the gateways over MQTT and applying each exactly
//! once.
//!
//! Two tasks joined by a bounded channel of [`BATCH_QUEUE`] messages
//! ([`Inbound`]) holding at most [`QUEUED_KIB`] KiB of payload (each batch
//! carries a permit of that budget until its group is applied): [`connection`] owns the rumqttc event loop (poll,
//! reconnect, subscribe, forward), [`apply`] decodes, deduplicates, runs the
//! detector, commits to the store in groups, acks and emits. The apply task
//! is the only writer of the store, so batches of one gateway are applied
//! in the order they arrive.

pub(crate) mod apply;
pub(crate) mod connection;
#[cfg(test)]
mod properties;
mod reject;

use std::time::Duration;

use rumqttc::{MqttOptions, NetworkOptions, Publish};
use tokio::sync::OwnedSemaphorePermit;

use crate::broker::MAX_PACKET_BYTES;
use crate::config::Settings;

/// Messages received but not yet handled: as many batches as one group may
/// take ([`apply::MAX_GROUP_BATCHES`]). When full, the connection task waits
/// (no batch is ever dropped here).
pub(crate) const BATCH_QUEUE: usize = apply::MAX_GROUP_BATCHES;

/// Payload KiB received and not yet applied (queued, or in the group being
/// applied): two groups' worth of [`apply::MAX_GROUP_BYTES`]. At the bound
/// the connection task waits, as when the channel is full.
pub(crate) const QUEUED_KIB: usize = 2 * apply::MAX_GROUP_BYTES / 1024;

/// The permits of `payload_len` bytes (at least one, so a queue of empty
/// payloads is bounded too).
pub(crate) fn kib(payload_len: usize) -> u32 {
    payload_len.div_ceil(1024).max(1) as u32
}

/// Requests (acks, events, subscriptions) queued for the connection task.
pub(crate) const REQUEST_QUEUE: usize = 1024;

const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// What the connection task hands the apply task, in the order it happened.
pub(crate) enum Inbound {
    /// A publish on a batch topic, with its share of [`QUEUED_KIB`].
    Batch(Publish, OwnedSemaphorePermit),
    /// The client (re)connected to the broker: every gateway is acked.
    Connected,
}

/// Client options: packets up to [`MAX_PACKET_BYTES`] both ways (rumqttc's
/// default is 10 KiB); a clean or persistent session and credentials as the
/// settings say (see `config`).
pub(crate) fn mqtt_options(settings: &Settings) -> MqttOptions {
    let mqtt = &settings.mqtt;
    let mut options = MqttOptions::new(mqtt.client_id.clone(), mqtt.host.clone(), mqtt.port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(!settings.mqtt_persistent_session)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if let Some(credentials) = &settings.mqtt_credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    options
}

/// Socket options: TCP_NODELAY, so an ack (a few bytes) leaves at once
/// instead of waiting for the peer's delayed TCP ACK (Nagle), which cost
/// about 40 ms per ack in a measured round trip.
pub(crate) fn network_options() -> NetworkOptions {
    let mut options = NetworkOptions::new();
    options.set_tcp_nodelay(true);
    options
}
