//! facwatch ingest: receives batches from the gateways over MQTT, applies
//! each exactly once, detects abnormal intervals in data time, stores the
//! events and emits them.
//!
//! Stages, one module each: `receive` (MQTT in, dedup, apply),
//! [`detect`] (pure detector), [`store`] (redb), `emit` (log, MQTT and
//! webhooks out; one sender task per webhook, fed by the store's outbox;
//! one InfluxDB writer, fed by its own outbox).
//! [`broker`] runs the embedded MQTT broker; [`config`] reads `ingest.toml`.
//!
//! The delivery invariant (DESIGN.md "Delivery"): a batch's `last_seq`,
//! detector state and events commit in one store transaction (shared by the
//! batches that were queued together, see `receive::apply`), and its ack is
//! published only after that commit.

pub mod broker;
pub mod config;
pub mod detect;
mod emit;
mod http;
mod receive;
mod stats;
pub mod store;

#[cfg(test)]
mod bench;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::AsyncClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{
    BrokerMode, BrokerSecurity, BrokerTls, Credentials, HttpSettings, InfluxSettings, Logins,
    MqttSettings, NoticeSettings, Precision, Settings, WebhookSettings,
};
pub use stats::{Stats, StatsSnapshot, WebhookSnapshot};
pub use store::{InfluxOutboxDepth, Store, StoreError};

use crate::detect::SnapshotError;
use crate::emit::Publisher;
use crate::receive::apply::{Applier, ApplyTask};

/// How long `run` waits, after the last batch, for the MQTT client to send
/// what it has queued and disconnect.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gateway `{gateway}`: stored {source}")]
    Snapshot {
        gateway: String,
        source: SnapshotError,
    },
    #[error("MQTT connection task failed: {0}")]
    Connection(tokio::task::JoinError),
    #[error("cannot listen for the HTTP API on {addr}: {source}")]
    HttpBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("InfluxDB: cannot build the HTTP client: {0}")]
    InfluxClient(reqwest::Error),
    #[error("webhook `{name}`: cannot build the HTTP client: {source}")]
    WebhookClient {
        name: String,
        source: reqwest::Error,
    },
}

/// Runs the ingest until `shutdown`: connects to the broker at
/// `settings.mqtt` (an embedded broker is started by the caller), receives
/// and applies batches. Then stops in order: stop receiving, finish the
/// batch being applied, close the store (the file can be opened again when
/// this returns), disconnect.
///
/// With `settings.http`, the HTTP API is bound first (its address is then in
/// [`Stats::http_addr`]), served from before the broker connection, and
/// stopped before this returns.
pub async fn run(
    settings: Settings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let http_listener =
        match &settings.http {
            Some(http) => Some(http::bind(http.listen, &stats).await.map_err(|source| {
                IngestError::HttpBind {
                    addr: http.listen,
                    source,
                }
            })?),
            None => None,
        };
    let store = Arc::new(Store::open(&settings.store_path)?);
    let (client, mut eventloop) =
        AsyncClient::new(receive::mqtt_options(&settings), receive::REQUEST_QUEUE);
    eventloop.set_network_options(receive::network_options());
    let keys = Arc::new(settings.keys.clone());
    let publisher = Publisher::new(client.clone(), stats.clone(), keys.clone());
    // Stopped after the apply task, so the acks of its last group go out.
    let stop_late_acks = CancellationToken::new();
    let late_acks = tokio::spawn(
        publisher
            .clone()
            .send_late_acks(stop_late_acks.clone(), DISCONNECT_WAIT),
    );
    let outbox_limits = settings
        .webhooks
        .iter()
        .map(|w| store::OutboxLimit {
            webhook: w.name.clone(),
            max_queue: w.max_queue,
        })
        .collect();
    let outbox_changed = Arc::new(tokio::sync::Notify::new());
    let mut senders = Vec::new();
    for webhook in &settings.webhooks {
        let sender = emit::webhook::Sender::new(webhook.clone()).map_err(|source| {
            IngestError::WebhookClient {
                name: webhook.name.clone(),
                source,
            }
        })?;
        senders.push(sender);
    }
    let influx_writer = match &settings.influxdb {
        None => None,
        Some(influx) => {
            Some(emit::influx::Writer::new(influx.clone()).map_err(IngestError::InfluxClient)?)
        }
    };
    let influx_changed = Arc::new(tokio::sync::Notify::new());
    let mut applier = Applier::new(&settings.sites, store.clone(), outbox_limits)?;
    if let Some(influx) = &settings.influxdb {
        applier = applier.with_influx(emit::influx::Rendering::of(influx));
    }
    let mut applier = ApplyTask::new(
        applier,
        publisher,
        keys,
        stats.clone(),
        settings.clock,
        settings.notices,
        outbox_changed.clone(),
    )?;
    if let Some(influx) = &settings.influxdb {
        applier = applier.with_influx(influx.max_outbox_bytes, influx_changed.clone());
    }
    // Senders stop on `shutdown` too; `run` waits for them, so the store is
    // closed when it returns.
    let senders: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            tokio::spawn(emit::webhook::run(
                sender,
                store.clone(),
                stats.clone(),
                outbox_changed.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    let influx_writer = influx_writer.map(|writer| {
        tokio::spawn(emit::influx::run(
            writer,
            emit::influx::Renderer::new(&settings.sites),
            store.clone(),
            stats.clone(),
            influx_changed.clone(),
            shutdown.clone(),
        ))
    });
    let http_server = http_listener.map(|listener| {
        let api = http::Api::new(store.clone(), stats.clone(), &settings);
        if let Ok(addr) = listener.local_addr() {
            info!(addr = %addr, "HTTP API listening.");
        }
        tokio::spawn(http::serve(listener, api, shutdown.clone()))
    });
    drop(store);
    info!(
        sites = settings.sites.len(),
        store = %settings.store_path.display(),
        host = %settings.mqtt.host,
        port = settings.mqtt.port,
        persistent_session = settings.mqtt_persistent_session,
        username = settings.mqtt_credentials.as_ref().map(|c| c.username.as_str()),
        "Ingest starting."
    );

    let (batch_tx, batch_rx) = mpsc::channel(receive::BATCH_QUEUE);
    let budget = Arc::new(tokio::sync::Semaphore::new(receive::QUEUED_KIB));
    let mut connection = tokio::spawn(receive::connection::run(
        eventloop,
        client.clone(),
        batch_tx,
        budget,
        stats,
        shutdown.clone(),
    ));

    // Returns after `shutdown`, with the group in progress finished. The
    // applier and the senders hold the other references to the store, so
    // the database is closed when they have returned.
    applier.run(batch_rx, shutdown.clone()).await;
    stop_late_acks.cancel();
    let mut late_acks = late_acks;
    if tokio::time::timeout(DISCONNECT_WAIT, &mut late_acks)
        .await
        .is_err()
    {
        // Unsent acks cost only resends: the gateways send those batches
        // again and the next run acks them.
        late_acks.abort();
    }
    for sender in senders {
        // A sender returns at once on shutdown (a blocking store call at
        // most finishes first).
        let _ = sender.await;
    }
    if let Some(writer) = influx_writer {
        // Like a webhook sender: a write in flight finishes (within the
        // InfluxDB timeout) so its outcome is recorded.
        let _ = writer.await;
    }
    if let Some(mut server) = http_server {
        // Graceful shutdown finishes the requests in flight; bounded, then
        // aborted, so the server's handle on the store is gone either way.
        if tokio::time::timeout(DISCONNECT_WAIT, &mut server)
            .await
            .is_err()
        {
            warn!("HTTP API did not stop in time; closing it.");
            server.abort();
            let _ = server.await;
        }
    }

    // The connection task is still polling: let it send the last ack and a
    // DISCONNECT, within a bound.
    let _ = tokio::time::timeout(DISCONNECT_WAIT, client.disconnect()).await;
    match tokio::time::timeout(DISCONNECT_WAIT, &mut connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => return Err(IngestError::Connection(e)),
        Ok(Err(_)) => {}
        Err(_) => {
            warn!("MQTT client did not disconnect in time; closing it.");
            connection.abort();
        }
    }
    info!("Ingest stopped.");
    Ok(())
}
