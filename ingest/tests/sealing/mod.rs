//! Keys for the ingest tests: every gateway gets a key derived from its id,
//! batches are sealed with it as a gateway seals them, acks opened with it
//! as a gateway opens them.
#![allow(dead_code)] // Each test file uses its own part.

use std::collections::HashMap;

use facwatch_proto::seal::{self, GatewayKey, Purpose};
use facwatch_proto::site::Site;
use facwatch_proto::wire::{Ack, Batch};
use sha2::{Digest, Sha256};

/// The test key of `gateway`.
pub(crate) fn key(gateway: &str) -> GatewayKey {
    GatewayKey::from_bytes(Sha256::digest(format!("facwatch test key {gateway}")).into())
}

/// A key for every gateway of `sites`.
pub(crate) fn keys<'a>(sites: impl IntoIterator<Item = &'a Site>) -> HashMap<String, GatewayKey> {
    sites
        .into_iter()
        .flat_map(|site| &site.gateways)
        .map(|g| (g.id.clone(), key(&g.id)))
        .collect()
}

/// `batch` as its gateway publishes it.
pub(crate) fn sealed(batch: &Batch) -> Vec<u8> {
    seal::seal(&key(&batch.gateway), Purpose::Batch, &batch.encode())
}

/// The ack in `payload` if `gateway`'s key opens it.
pub(crate) fn open_ack(gateway: &str, payload: &[u8]) -> Option<Ack> {
    let message = seal::open(&key(gateway), Purpose::Ack, payload).ok()?;
    Ack::decode(message).ok()
}

/// The gateway of an ack topic (`facwatch/v1/{gw}/ack`).
pub(crate) fn gateway_of_ack_topic(topic: &str) -> &str {
    topic.split('/').nth(2).unwrap_or_default()
}
