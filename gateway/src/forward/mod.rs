//! Stage three of the gateway: forwarding buffered batches to the ingest
//! with the end-to-end ack protocol (DESIGN.md, "Delivery").
//!
//! [`state::ForwardState`] decides what to send and when to resend;
//! [`pace::Pacer`] paces every publish; [`link`] owns the MQTT connection;
//! this module moves data between them and the buffer. Invariants:
//! - Batches are read from the buffer and published in seq order; the
//!   buffer deletes a batch only when the ingest's `Ack { seq }` arrives on
//!   `facwatch/v1/{gw}/ack`, never on a broker PUBACK.
//! - A buffer not yet synced with the ingest publishes nothing until the
//!   first ack (the ingest publishes a retained `Ack { last_seq or 0 }` for
//!   every gateway of its sites on every connect), then syncs: the buffer
//!   renumbers its batches after the ingest's seq if needed, and this
//!   module re-reads its position from the buffer. An ack beyond every
//!   stored batch is a sync too.
//! - When several acks wait, only the highest is applied (one buffer
//!   transaction).
//! - On every ConnAck the gateway re-subscribes to its ack topic (QoS 1),
//!   publishes a retained `Status` online (its last will is the retained
//!   offline status) and resends from `acked + 1`.
//! - While a backlog exists (more batches held than one window, or any
//!   held while the broker is unreachable) one INFO line every 60 s of
//!   wall time reports depth, oldest unacked age, acked seq and rate.

pub(crate) mod link;
pub(crate) mod pace;
pub(crate) mod state;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use facwatch_proto::clock::Clock;
use facwatch_proto::seal::{self, GatewayKey, Purpose};
use facwatch_proto::topics;
use facwatch_proto::wire::{LinkState, Status};
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::buffer::{AckApplied, Buffer, BufferError};
use crate::config::MqttSettings;
use crate::Stats;
use link::{LinkEvent, Publisher, Refused};
use pace::{Pacer, ReplayPace};
use state::{AckOutcome, ForwardState, SendKind};

/// Room for the MQTT fixed header, topic and packet id around a sealed
/// batch.
const MAX_PACKET_BYTES: usize = seal::MAX_SEALED_BATCH_BYTES + 4 * 1024;

/// How long a closing forwarder waits for its offline status and
/// disconnect to be written.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Link events not yet handled by the forwarder; when full the driver waits
/// (`Block`), which only delays reading from the broker.
const LINK_EVENT_CAPACITY: usize = 64;

/// Wall time between two backlog reports.
const BACKLOG_REPORT_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub(crate) struct ForwardPlan {
    pub(crate) site: String,
    pub(crate) gateway: String,
    pub(crate) mqtt: MqttSettings,
    /// Seals batches, opens acks.
    pub(crate) key: GatewayKey,
    pub(crate) window_batches: u32,
    pub(crate) ack_timeout: Duration,
    pub(crate) replay: ReplayPace,
    /// Ages samples for the backlog report.
    pub(crate) clock: Clock,
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
    if let Some(credentials) = &mqtt.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    if let Some(tls) = &mqtt.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.config.clone(),
        )));
    }
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
        meta.synced,
        plan.window_batches,
        plan.ack_timeout,
    );
    stats.record_buffer(&meta);

    let capacity = (plan.window_batches as usize).saturating_mul(2) + 8;
    let (client, eventloop) = AsyncClient::new(mqtt_options(&plan, &topics.status), capacity);
    let (publisher, live) = link::publisher(client);
    let (events_tx, events) = mpsc::channel(LINK_EVENT_CAPACITY);
    let driver_stop = CancellationToken::new();
    // rumqttc's own lines (through `log`: protocol errors, packet traces)
    // know no site: its event loop runs in this span. At ERROR level so
    // that no filter that lets such a line through disables its span.
    let mqtt_span = tracing::error_span!("mqtt", site = %plan.site, gateway = %plan.gateway);
    let mut driver = tokio::spawn(
        link::drive(
            eventloop,
            live,
            topics.ack.clone(),
            plan.key.clone(),
            events_tx,
            driver_stop.clone(),
        )
        .instrument(mqtt_span),
    );

    let mut forwarder = Forwarder {
        pacer: Pacer::new(plan.replay),
        plan,
        topics,
        buffer,
        stats,
        state,
        publisher,
        generation: None,
        broker_down_logged: false,
        acked_at_last_report: (meta.acked_seq, Instant::now()),
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
    pacer: Pacer,
    publisher: Publisher,
    /// The connection generation the state was last told about.
    generation: Option<u64>,
    broker_down_logged: bool,
    /// Acked seq and wall time of the last backlog report.
    acked_at_last_report: (u64, Instant),
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
        let mut reports = tokio::time::interval_at(
            tokio::time::Instant::now() + BACKLOG_REPORT_EVERY,
            BACKLOG_REPORT_EVERY,
        );
        reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let paced_until = self.pump().await?;
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
                    Some(event) => self.on_link_events(event, &mut events).await?,
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
                () = tokio::time::sleep_until(paced_until.unwrap_or_else(tokio::time::Instant::now)),
                    if paced_until.is_some() => {}
                _ = reports.tick() => self.report_backlog(),
            }
        }
    }

    /// Handles `first` and every event already waiting behind it; of a run
    /// of acks only the highest is applied.
    async fn on_link_events(
        &mut self,
        first: LinkEvent,
        events: &mut mpsc::Receiver<LinkEvent>,
    ) -> Result<(), BufferError> {
        let mut next = Some(first);
        while let Some(event) = next.take() {
            let LinkEvent::Ack { seq } = event else {
                self.on_link_event(event);
                next = events.try_recv().ok();
                continue;
            };
            let mut highest = seq;
            loop {
                match events.try_recv() {
                    Ok(LinkEvent::Ack { seq }) => highest = highest.max(seq),
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.on_ack(highest).await?;
        }
        Ok(())
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        let site = &self.plan.site;
        let gateway = &self.plan.gateway;
        match event {
            LinkEvent::Connected { generation } => {
                if self.state.synced() {
                    tracing::info!(
                        %site, %gateway,
                        broker = %format!("{}:{}", self.plan.mqtt.host, self.plan.mqtt.port),
                        from_seq = self.state.acked() + 1,
                        "Connected to the MQTT broker; sending from the last ack."
                    );
                } else {
                    tracing::info!(
                        %site, %gateway,
                        broker = %format!("{}:{}", self.plan.mqtt.host, self.plan.mqtt.port),
                        "Connected to the MQTT broker; waiting for the ingest's ack before sending from a fresh buffer."
                    );
                }
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
            LinkEvent::Ack { .. } => unreachable!("acks are handled by on_ack"),
            LinkEvent::BadAck { error } => {
                tracing::warn!(%site, %gateway, %error, "Ignored a payload on the ack topic that is not an ack sealed with this gateway's key.");
            }
        }
    }

    async fn on_ack(&mut self, seq: u64) -> Result<(), BufferError> {
        if self.state.synced() && seq <= self.state.acked() {
            return Ok(());
        }
        let applied = blocking(&self.buffer, move |b| b.ack(seq)).await?;
        let AckApplied {
            synced_now,
            renumbered,
            released,
            meta,
        } = applied;
        self.stats
            .batches_acked
            .fetch_add(released, Ordering::Relaxed);
        if synced_now {
            tracing::info!(
                site = %self.plan.site, gateway = %self.plan.gateway,
                ack_seq = seq, renumbered, next_seq = meta.next_seq,
                "Synced the buffer with the ingest; sending from its last seq."
            );
            self.state.resync(meta.acked_seq, meta.next_seq - 1);
        } else if let AckOutcome::Released { seq } = self.state.on_ack(seq, Instant::now()) {
            tracing::debug!(site = %self.plan.site, gateway = %self.plan.gateway, seq, held = meta.batches, "Ingest acked.");
        }
        self.stats.record_buffer(&meta);
        Ok(())
    }

    /// Publishes as much as the state and the pacer allow now. Returns when
    /// the pacer lets the next publish go, if it holds one back.
    async fn pump(&mut self) -> Result<Option<tokio::time::Instant>, BufferError> {
        let Some(generation) = self.generation else {
            return Ok(None);
        };
        while let Some((from, count)) = self.state.sendable() {
            if let Some(at) = self.pacer.wait_until(tokio::time::Instant::now()) {
                return Ok(Some(at));
            }
            // Paced: read only what may go now (one batch).
            let count = if self.pacer.is_unlimited() { count } else { 1 };
            let batches =
                blocking(&self.buffer, move |b| b.range_from(from, count as usize)).await?;
            // Held seqs are contiguous; anything before the first held one
            // (or everything, if none is held) was dropped by the limits.
            match batches.first() {
                None => {
                    self.state.on_missing(self.state.last_appended());
                    continue;
                }
                Some(&(first, _)) if first > from => {
                    self.state.on_missing(first - 1);
                    continue;
                }
                Some(_) => {}
            }
            for (seq, bytes) in batches {
                if seq >= from + count {
                    break;
                }
                let sealed = seal::seal(&self.plan.key, Purpose::Batch, &bytes);
                let len = sealed.len();
                match self
                    .publisher
                    .publish(generation, &self.topics.batch, false, sealed)
                {
                    Ok(()) => {
                        self.pacer.on_sent(tokio::time::Instant::now(), len);
                        match self.state.on_sent(seq, Instant::now()) {
                            SendKind::First => {
                                self.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                            }
                            SendKind::Resend => {
                                self.stats.batches_resent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    // A Disconnected event is on its way; or the client's
                    // queue is full and the ack deadline brings us back.
                    Err(Refused::NotConnected | Refused::QueueFull) => return Ok(None),
                }
            }
        }
        Ok(None)
    }

    /// One INFO line while a backlog exists.
    fn report_backlog(&mut self) {
        let held = self.stats.buffer_batches.load(Ordering::Relaxed);
        let backlog =
            held > u64::from(self.plan.window_batches) || (held > 0 && !self.state.connected());
        let (acked_then, then) = self.acked_at_last_report;
        let acked = self.state.acked();
        let now = Instant::now();
        self.acked_at_last_report = (acked, now);
        if !backlog {
            return;
        }
        let oldest_ms = self.stats.oldest_unacked_sample_ms.load(Ordering::Relaxed) as i64;
        let oldest_age_secs = if oldest_ms == 0 {
            0
        } else {
            (self.plan.clock.now_ms() - oldest_ms).max(0) / 1000
        };
        let elapsed = now.duration_since(then).as_secs_f64().max(f64::EPSILON);
        let acked_per_sec = acked.saturating_sub(acked_then) as f64 / elapsed;
        tracing::info!(
            site = %self.plan.site,
            gateway = %self.plan.gateway,
            buffered_batches = held,
            buffered_bytes = self.stats.buffer_bytes.load(Ordering::Relaxed),
            oldest_unacked_age_secs = oldest_age_secs,
            acked_seq = acked,
            acked_batches_per_sec = format!("{acked_per_sec:.1}"),
            connected = self.state.connected(),
            synced = self.state.synced(),
            "Backlog waiting for the ingest."
        );
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(credentials: Option<crate::MqttCredentials>) -> ForwardPlan {
        let mut mqtt = MqttSettings::new("127.0.0.1", 1883, "gw-01");
        mqtt.credentials = credentials;
        ForwardPlan {
            site: "s".into(),
            gateway: "gw-01".into(),
            mqtt,
            key: GatewayKey::from_bytes([1; 32]),
            window_batches: 16,
            ack_timeout: Duration::from_secs(5),
            replay: ReplayPace::UNLIMITED,
            clock: Clock::real(),
        }
    }

    #[test]
    fn credentials_go_into_the_connect_packet_and_only_when_given() {
        let with = mqtt_options(
            &plan(Some(crate::MqttCredentials {
                username: "gw-01".into(),
                password: "secret".into(),
            })),
            "status",
        );
        let login = with.credentials().expect("a login");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("gw-01", "secret")
        );
        assert!(mqtt_options(&plan(None), "status").credentials().is_none());
    }
}
