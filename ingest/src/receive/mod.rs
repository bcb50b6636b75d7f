//! Receiving batches from the gateways over MQTT and applying each exactly
//! once.
//!
//! Two tasks joined by a bounded channel of [`BATCH_QUEUE`] publishes:
//! [`connection`] owns the rumqttc event loop (poll, reconnect, subscribe,
//! forward), [`apply`] decodes, deduplicates, runs the detector, commits to
//! the store, acks and emits. The apply task is the only writer of the
//! store, so batches of one gateway are applied in the order they arrive.

pub(crate) mod apply;
pub(crate) mod connection;
mod reject;

use std::time::Duration;

use rumqttc::MqttOptions;

use crate::broker::MAX_PACKET_BYTES;
use crate::config::MqttSettings;

/// Batches received but not yet applied. When full, the connection task
/// waits (no batch is ever dropped here).
pub(crate) const BATCH_QUEUE: usize = 32;

/// Requests (acks, events, subscriptions) queued for the connection task.
pub(crate) const REQUEST_QUEUE: usize = 1024;

const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Client options: clean session, packets up to [`MAX_PACKET_BYTES`] both
/// ways (rumqttc's default is 10 KiB).
pub(crate) fn mqtt_options(settings: &MqttSettings) -> MqttOptions {
    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    options
}
