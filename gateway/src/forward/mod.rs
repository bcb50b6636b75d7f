//! Stage three of the gateway: forwarding buffered batches to the ingest
//! with the end-to-end ack protocol (DESIGN.md, "Delivery").
//!
//! [`state::ForwardState`] decides what to send and when to resend;
//! [`link`] owns the MQTT connection; this module moves data between them
//! and the buffer. Invariants:
//! - Batches are read from the buffer and published in seq order; the
//!   buffer deletes a batch only when the ingest's `Ack { seq }` arrives on
//!   `facwatch/v1/{gw}/ack`, never on a broker PUBACK.
//! - On every ConnAck the gateway re-subscribes to its ack topic (QoS 1),
//!   publishes a retained `Status` online (its last will is the retained
//!   offline status) and resends from `acked + 1`.

pub(crate) mod link;
pub(crate) mod state;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use facwatch_proto::topics;
use facwatch_proto::wire::{LinkState, Status, MAX_BATCH_BYTES};
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};
use crate::config::MqttSettings;
use crate::Stats;
use link::{LinkEvent, Publisher, Refused};
use state::{AckOutcome, ForwardState, SendKind};

/// Room for the MQTT fixed header, topic and packet id around a batch.
const MAX_PACKET_BYTES: usize = MAX_BATCH_BYTES + 4 * 1024;

/// How long a closing forwarder waits for its offline status and
/// disconnect to be written.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Link events not yet handled by the forwarder; when full the driver waits
/// (`Block`), which only delays reading from the broker.
const LINK_EVENT_CAPACITY: usize = 64;

#[derive(Debug, Clone)]
pub(crate) struct ForwardPlan {
    pub(crate) site: String,
    pub(crate) gateway: String,
    pub(crate) mqtt: MqttSettings,
    pub(crate) window_batches: u32,
    pub(crate) ack_timeout: Duration,
}

struct Topics {
    batch: String,
    ack: String,
    status: String,
}

fn status_payload(gateway: &str, state: LinkState) -> Vec<u8> {
    Status {
        gateway: gateway.to_string(),
        state,
    }
    .encode()
}

fn mqtt_options(plan: &ForwardPlan, status_topic: &str) -> MqttOptions {
    let mqtt = &plan.mqtt;
    let mut options = MqttOptions::new(mqtt.client_id.clone(), mqtt.host.clone(), mqtt.port);
    options
        .set_keep_alive(mqtt.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_inflight(u16::try_from(plan.window_batches.saturating_add(4)).unwrap_or(u16::MAX))
        .set_last_will(LastWill::new(
            status_topic,
            status_payload(&plan.gateway, LinkState::Offline),
            QoS::AtLeastOnce,
            true,
        ));
    options
}

async fn blocking<T: Send + 'static>(
    buffer: &Arc<Buffer>,
    call: impl FnOnce(&Buffer) -> Result<T, BufferError> + Send + 'static,
) -> Result<T, BufferError> {
    let buffer = Arc::clone(buffer);
    tokio::task::spawn_blocking(move || call(&buffer))
        .await
        .expect("buffer calls do not panic")
}

/// Forwards batches until `stop` is cancelled, or, once `appended` is
/// closed (no more batches will come), until every batch is acked.
pub(crate) async fn run(
    plan: ForwardPlan,
    buffer: Arc<Buffer>,
    appended: watch::Receiver<u64>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<(), BufferError> {
    let topics = Topics {
        batch: topics::batch(&plan.gateway),
        ack: topics::ack(&plan.gateway),
        status: topics::status(&plan.gateway),
    };
    let meta = blocking(&buffer, Buffer::meta).await?;
    let state = ForwardState::new(
        meta.acked_seq,
        meta.next_seq - 1,
        plan.window_batches,
        plan.ack_timeout,
    );
    stats.acked_seq.store(meta.acked_seq, Ordering::Relaxed);
    stats
        .buffered_batches
        .store(meta.batches, Ordering::Relaxed);

    let capacity = (plan.window_batches as usize).saturating_mul(2) + 8;
    let (client, eventloop) = AsyncClient::new(mqtt_options(&plan, &topics.status), capacity);
    let (publisher, live) = link::publisher(client);
    let (events_tx, events) = mpsc::channel(LINK_EVENT_CAPACITY);
    let driver_stop = CancellationToken::new();
    let mut driver = tokio::spawn(link::drive(
        eventloop,
        live,
        topics.ack.clone(),
        events_tx,
        driver_stop.clone(),
    ));

    let mut forwarder = Forwarder {
        plan,
        topics,
        buffer,
        stats,
        state,
        publisher,
        generation: None,
        broker_down_logged: false,
    };
    let result = forwarder.forward(events, appended, &stop).await;

    // Close: a retained offline status, then a clean disconnect, given a
    // moment to be written; the driver is stopped either way.
    let mut driver_done = false;
    if let Some(generation) = forwarder.generation {
        let offline = status_payload(&forwarder.plan.gateway, LinkState::Offline);
        let _ = forwarder
            .publisher
            .publish(generation, &forwarder.topics.status, true, offline);
        let _ = forwarder.publisher.disconnect();
        driver_done = tokio::time::timeout(CLOSE_GRACE, &mut driver).await.is_ok();
    }
    if !driver_done {
        driver_stop.cancel();
        let _ = driver.await;
    }
    result
}

struct Forwarder {
    plan: ForwardPlan,
    topics: Topics,
    buffer: Arc<Buffer>,
    stats: Arc<Stats>,
    state: ForwardState,
    publisher: Publisher,
    /// The connection generation the state was last told about.
    generation: Option<u64>,
    broker_down_logged: bool,
}

impl Forwarder {
    async fn forward(
        &mut self,
        mut events: mpsc::Receiver<LinkEvent>,
        mut appended: watch::Receiver<u64>,
        stop: &CancellationToken,
    ) -> Result<(), BufferError> {
        let mut appends_open = true;
        self.state.on_appended(*appended.borrow_and_update());
        loop {
            self.pump().await?;
            if !appends_open && self.state.all_acked() {
                tracing::info!(
                    site = %self.plan.site,
                    gateway = %self.plan.gateway,
                    acked_seq = self.state.acked(),
                    "Every batch is acked."
                );
                return Ok(());
            }
            let deadline = self.state.ack_deadline();
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                event = events.recv() => match event {
                    Some(event) => self.on_link_event(event).await?,
                    // The driver only ends when told to.
                    None => return Ok(()),
                },
                changed = appended.changed(), if appends_open => {
                    if changed.is_err() {
                        appends_open = false;
                    }
                    self.state.on_appended(*appended.borrow_and_update());
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    let acked = self.state.acked();
                    if self.state.on_tick(Instant::now()) {
                        tracing::info!(
                            site = %self.plan.site,
                            gateway = %self.plan.gateway,
                            from_seq = acked + 1,
                            timeout_ms = self.plan.ack_timeout.as_millis() as u64,
                            "No ack from the ingest in time; resending."
                        );
                    }
                }
            }
        }
    }

    async fn on_link_event(&mut self, event: LinkEvent) -> Result<(), BufferError> {
        let site = &self.plan.site;
        let gateway = &self.plan.gateway;
        match event {
            LinkEvent::Connected { generation } => {
                tracing::info!(
                    %site, %gateway,
                    broker = %format!("{}:{}", self.plan.mqtt.host, self.plan.mqtt.port),
                    from_seq = self.state.acked() + 1,
                    "Connected to the MQTT broker; sending from the last ack."
                );
                self.broker_down_logged = false;
                self.generation = Some(generation);
                self.state.on_connected();
                // A refusal here means this connection is already gone; the
                // next ConnAck repeats both.
                let _ = self.publisher.subscribe(generation, &self.topics.ack);
                let online = status_payload(gateway, LinkState::Online);
                let _ = self
                    .publisher
                    .publish(generation, &self.topics.status, true, online);
            }
            LinkEvent::Disconnected { error, retry_in } => {
                if self.broker_down_logged {
                    tracing::debug!(%site, %gateway, %error, ?retry_in, "MQTT broker still unreachable.");
                } else {
                    tracing::warn!(%site, %gateway, %error, ?retry_in, "MQTT broker unreachable; retrying.");
                    self.broker_down_logged = true;
                }
                self.generation = None;
                self.state.on_disconnected();
            }
            LinkEvent::Ack { seq } => match self.state.on_ack(seq, Instant::now()) {
                AckOutcome::Stale => {}
                AckOutcome::Released { seq } => self.release(seq).await?,
                AckOutcome::BeyondAppended { seq } => {
                    tracing::warn!(
                        %site, %gateway, seq,
                        "The ingest acked a seq this buffer never held; numbering new batches after it."
                    );
                    self.release(seq).await?;
                }
            },
            LinkEvent::BadAck { error } => {
                tracing::warn!(%site, %gateway, %error, "Ignored a malformed ack.");
            }
        }
        Ok(())
    }

    async fn release(&mut self, seq: u64) -> Result<(), BufferError> {
        let held = blocking(&self.buffer, move |b| b.ack(seq)).await?;
        self.stats.acked_seq.store(seq, Ordering::Relaxed);
        self.stats.buffered_batches.store(held, Ordering::Relaxed);
        tracing::debug!(site = %self.plan.site, gateway = %self.plan.gateway, seq, held, "Ingest acked.");
        Ok(())
    }

    /// Publishes as much as the state allows now.
    async fn pump(&mut self) -> Result<(), BufferError> {
        let Some(generation) = self.generation else {
            return Ok(());
        };
        while let Some((from, count)) = self.state.sendable() {
            let last = from + count - 1;
            let batches =
                blocking(&self.buffer, move |b| b.range_from(from, count as usize)).await?;
            let batches: Vec<_> = batches
                .into_iter()
                .filter(|(seq, _)| *seq <= last)
                .collect();
            if batches.is_empty() {
                tracing::error!(
                    site = %self.plan.site, gateway = %self.plan.gateway, from, last,
                    "Batches to send are missing from the buffer."
                );
                return Ok(());
            }
            for (seq, bytes) in batches {
                match self
                    .publisher
                    .publish(generation, &self.topics.batch, false, bytes)
                {
                    Ok(()) => match self.state.on_sent(seq, Instant::now()) {
                        SendKind::First => {
                            self.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        SendKind::Resend => {
                            self.stats.batches_resent.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    // A Disconnected event is on its way; or the client's
                    // queue is full and the ack deadline brings us back.
                    Err(Refused::NotConnected | Refused::QueueFull) => return Ok(()),
                }
            }
        }
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}
