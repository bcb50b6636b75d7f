//! The task that owns the rumqttc `EventLoop`.
//!
//! It polls the event loop all the time (rumqttc only makes progress, sends
//! queued publishes and pings while polled), and never publishes itself: the
//! apply task queues acks and events through the `AsyncClient`, this task
//! sends them. On every ConnAck it tells the apply task (which then acks
//! every gateway) and subscribes to the batch filter again (a clean session
//! has lost it; a persistent one keeps it, and subscribing again is
//! harmless). After an error it waits with exponential backoff
//! ([`BACKOFF_MIN`]..[`BACKOFF_MAX`]) and polls again, which reconnects.
//!
//! Incoming batch publishes go to the apply task through a bounded channel,
//! with the connection notices in order between them.
//! When it is full this task waits (the broker then buffers, and TCP pushes
//! back on it); it never drops a batch, because a dropped batch followed by
//! an applied later one would be a gap. This cannot deadlock with the apply
//! task, because the apply task never waits for the client's request queue
//! (see `emit::Publisher`).
//!
//! Shutdown: when `shutdown` fires the task stops forwarding batches but
//! keeps polling, so the ack of the batch being applied still goes out; it
//! ends when the client's DISCONNECT has been sent or the connection fails.

use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::topics;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, Outgoing, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Inbound;
use crate::stats::Stats;

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    mut eventloop: EventLoop,
    client: AsyncClient,
    batches: mpsc::Sender<Inbound>,
    budget: Arc<Semaphore>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let (host, port) = eventloop.mqtt_options.broker_address();
    let mut batches = Some(batches);
    let mut backoff = BACKOFF_MIN;
    let mut failures: u64 = 0;
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if batches.is_some() => {
                // Stop receiving; keep polling to send what is queued.
                batches = None;
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(connack))) => {
                info!(
                    host = %host,
                    port,
                    session_present = connack.session_present,
                    "Connected to the MQTT broker."
                );
                backoff = BACKOFF_MIN;
                failures = 0;
                // Queued from another task: this one must keep polling.
                let client = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client
                        .subscribe(topics::BATCH_FILTER, QoS::AtLeastOnce)
                        .await
                    {
                        warn!(error = %e, "Could not queue the batch subscription.");
                    }
                });
                // After the subscription is queued: this may wait for room.
                forward(&mut batches, Inbound::Connected, &shutdown).await;
            }
            Ok(Event::Incoming(Incoming::SubAck(suback))) => {
                if suback
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    debug!(filter = topics::BATCH_FILTER, "Subscribed.");
                    stats.set_broker_subscribed(true);
                    stats.add(|s| &s.broker_subscriptions, 1);
                } else {
                    warn!(
                        filter = topics::BATCH_FILTER,
                        codes = ?suback.return_codes,
                        "The broker refused the batch subscription."
                    );
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                let permit = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        batches = None;
                        continue;
                    }
                    permit = budget.clone().acquire_many_owned(super::kib(publish.payload.len())) => permit,
                };
                // The semaphore is never closed.
                let Ok(permit) = permit else { continue };
                forward(&mut batches, Inbound::Batch(publish, permit), &shutdown).await;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!("Disconnected from the MQTT broker.");
                return;
            }
            Ok(_) => {}
            Err(error) => {
                if batches.is_none() {
                    return;
                }
                failures += 1;
                stats.set_broker_subscribed(false);
                stats.add(|s| &s.broker_connection_failures, 1);
                warn!(
                    host = %host,
                    port,
                    error = %error,
                    failures,
                    retry_in_ms = backoff.as_millis() as u64,
                    "MQTT connection failed; reconnecting."
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sends `message` to the apply task, waiting for room; stops forwarding
/// (sets `batches` to `None`) on shutdown or when the apply task has ended.
async fn forward(
    batches: &mut Option<mpsc::Sender<Inbound>>,
    message: Inbound,
    shutdown: &CancellationToken,
) {
    let Some(sender) = batches else { return };
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => *batches = None,
        sent = sender.send(message) => {
            if sent.is_err() {
                // The apply task has ended: nothing more to forward.
                *batches = None;
            }
        }
    }
}
