//! The facwatch gateway: poll -> buffer -> forward.
//!
//! - [`poll`]: one task per bus (a serial port, a serial device server, a
//!   Modbus TCP endpoint) reads its meters one request at a time at aligned
//!   virtual times, backing off from meters that do not answer, and turns
//!   every slot of every meter into a `Sample`;
//! - [`buffer`]: one batcher cuts samples into batches and commits them,
//!   with the samples of the open batch, to the redb buffer once per commit
//!   interval, before anything tries to send them; the buffer is bounded
//!   in bytes and age, and counts what its limits drop;
//! - `forward`: batches go to the ingest over MQTT and
//!   leave the buffer only when the ingest acks them (DESIGN.md,
//!   "Delivery").
//!
//! With `[metrics] listen`, `run` binds the metrics listener before polling
//! starts (a bind error stops the gateway) and serves Prometheus text on
//! `GET /metrics` from [`Stats`] until it returns (`metrics`).
//!
//! [`probe`] reads one meter once over the same code path as polling, for
//! installers (`facwatch-gateway probe`).
//!
//! Logs: every line of a running gateway names `site` and `gateway`, and a
//! line about a meter also `meter` and, when the meter measures a facility
//! of a line, `line` ([`Settings::meter_lines`]). Our own lines carry them
//! as event fields. The libraries that log on our behalf (tokio-modbus
//! while reading a meter, rumqttc in the MQTT event loop) run inside a
//! span carrying the same names (`poll`, `mqtt`); redb and axum are built
//! without logging. No span wraps our own lines, so the text format does
//! not print the names twice.
//!
//! [`run`] wires the stages together. A buffer file that cannot be opened
//! (corrupt, truncated, a newer format) is moved aside, logged as an error
//! and replaced by a fresh one: the box keeps polling. Shutdown order:
//! polling stops first, the batcher commits its partial batch into the
//! buffer, then the forwarder says goodbye to the broker. Nothing buffered
//! is lost by a shutdown; the next run sends it. A power cut loses the
//! samples taken in the last commit interval plus those still queued for
//! the batcher.

pub mod buffer;
pub mod config;
mod forward;
mod metrics;
pub mod poll;
pub mod probe;
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use buffer::{AckApplied, Buffer, BufferError, BufferLimits, BufferMeta, MovedAside, WhenFull};
pub use config::{MqttCredentials, MqttSettings, Settings};
pub use forward::pace::{ReplayPace, DEFAULT_REPLAY_PACE};
pub use metrics::MetricsError;
pub use tls::{TlsFiles, TlsSettings};

/// Live counters, for metrics and for tests to watch progress.
#[derive(Debug, Default)]
pub struct Stats {
    /// Samples ever committed to the buffer (lifetime, from its meta),
    /// including those of the open batch.
    pub samples_produced: AtomicU64,
    /// Batches stored in the buffer during this run.
    pub batches_appended: AtomicU64,
    /// Batches published for the first time during this run.
    pub batches_sent: AtomicU64,
    /// Batches published again (reconnect or ack timeout).
    pub batches_resent: AtomicU64,
    /// Highest seq the ingest has acked.
    pub acked_seq: AtomicU64,
    /// Batches in the buffer waiting for an ack.
    pub buffer_batches: AtomicU64,
    /// Encoded bytes of those batches (redb's overhead not included).
    pub buffer_bytes: AtomicU64,
    /// Oldest sample time (virtual Unix ms) of the first batch waiting for
    /// an ack; 0 when none waits.
    pub oldest_unacked_sample_ms: AtomicU64,
    /// Samples the buffer's limits dropped (lifetime, from its meta).
    pub samples_dropped: AtomicU64,
    /// Unusable buffer files moved aside and replaced during this run.
    pub buffer_recoveries: AtomicU64,
    /// Batches the ingest's acks deleted from the buffer during this run.
    pub batches_acked: AtomicU64,
    /// Poll counters per meter, in the order meters were first counted
    /// (site-file order); read with [`Stats::polls`] and
    /// [`Stats::polls_by_meter`].
    meter_polls: Mutex<Vec<(String, Arc<MeterPolls>)>>,
    /// Where the metrics endpoint listens, set once it is bound (before
    /// polling starts); unset without `[metrics]`. Tells callers that asked
    /// for port 0 which port they got.
    pub metrics_address: OnceLock<SocketAddr>,
}

/// What the poll slots of one meter yielded during this run: every slot
/// adds one to exactly one counter, so a moment's reading of them is always
/// a whole number of slots, each counted once.
#[derive(Debug, Default)]
pub(crate) struct MeterPolls {
    pub(crate) ok: AtomicU64,
    pub(crate) timeout: AtomicU64,
    pub(crate) exception: AtomicU64,
    pub(crate) decode: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    pub(crate) backed_off: AtomicU64,
}

impl MeterPolls {
    fn load(&self) -> PollCounts {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PollCounts {
            ok: load(&self.ok),
            timeout: load(&self.timeout),
            exception: load(&self.exception),
            decode: load(&self.decode),
            unreachable: load(&self.unreachable),
            backed_off: load(&self.backed_off),
        }
    }
}

/// Poll slots by what they yielded (see `sample::PollOutcome`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollCounts {
    /// Values read.
    pub ok: u64,
    /// No answer within the Modbus timeout.
    pub timeout: u64,
    /// A Modbus exception.
    pub exception: u64,
    /// An answer that did not decode.
    pub decode: u64,
    /// No link to the meter (connect failed, link dropped).
    pub unreachable: u64,
    /// Not asked: the meter was backing off after failures.
    pub backed_off: u64,
}

impl PollCounts {
    /// Meter asked, no values: timeouts, exceptions, decode errors and
    /// unreachable.
    pub fn failed(&self) -> u64 {
        self.timeout + self.exception + self.decode + self.unreachable
    }

    /// Meter not asked (backing off).
    pub fn skipped(&self) -> u64 {
        self.backed_off
    }

    /// Every slot.
    pub fn total(&self) -> u64 {
        self.ok + self.failed() + self.skipped()
    }

    fn add(self, other: PollCounts) -> PollCounts {
        PollCounts {
            ok: self.ok + other.ok,
            timeout: self.timeout + other.timeout,
            exception: self.exception + other.exception,
            decode: self.decode + other.decode,
            unreachable: self.unreachable + other.unreachable,
            backed_off: self.backed_off + other.backed_off,
        }
    }
}

impl Stats {
    /// The poll counters of meter `id`, made at zero on first use. `run`
    /// makes them for every meter before the metrics endpoint answers, so
    /// every meter's series exist from the first scrape.
    pub(crate) fn meter_polls(&self, id: &str) -> Arc<MeterPolls> {
        let mut meters = self
            .meter_polls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, polls)) = meters.iter().find(|(meter, _)| meter == id) {
            return Arc::clone(polls);
        }
        let polls = Arc::new(MeterPolls::default());
        meters.push((id.to_string(), Arc::clone(&polls)));
        polls
    }

    /// Each meter's poll counts, in site-file order.
    pub fn polls_by_meter(&self) -> Vec<(String, PollCounts)> {
        self.meter_polls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(meter, polls)| (meter.clone(), polls.load()))
            .collect()
    }

    /// Poll counts summed over the meters.
    pub fn polls(&self) -> PollCounts {
        self.polls_by_meter()
            .into_iter()
            .fold(PollCounts::default(), |sum, (_, counts)| sum.add(counts))
    }

    /// Copies the buffer's depth, age and counters.
    pub(crate) fn record_buffer(&self, meta: &BufferMeta) {
        self.samples_produced
            .store(meta.samples_produced, Ordering::Relaxed);
        self.acked_seq.store(meta.acked_seq, Ordering::Relaxed);
        self.buffer_batches.store(meta.batches, Ordering::Relaxed);
        self.buffer_bytes.store(meta.bytes, Ordering::Relaxed);
        self.oldest_unacked_sample_ms.store(
            meta.oldest_sample_ms.map_or(0, |t| t.max(0) as u64),
            Ordering::Relaxed,
        );
        self.samples_dropped
            .store(meta.samples_dropped, Ordering::Relaxed);
    }
}

/// What a finished run leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Samples ever appended to this buffer (lifetime).
    pub samples_produced: u64,
    /// Highest seq the ingest has acked.
    pub acked_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("{task} task failed: {reason}")]
    Task { task: &'static str, reason: String },
    #[error(transparent)]
    Poll(#[from] poll::PollError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// How long a stopping gateway lets open metrics requests finish.
const METRICS_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Samples waiting for the batcher, per meter, beyond two batch intervals'
/// worth. The queue holds two whole batches of polls so that a slow fsync
/// (a batch commit on a busy disk) never delays a poll, which would shift
/// sample times. When full, meter tasks wait (`Block`): the disk has
/// stalled for longer than a batch interval.
const SAMPLES_PER_METER_QUEUED: usize = 8;

fn sample_queue_capacity(settings: &Settings) -> usize {
    let polls_per_batch = settings
        .gateway
        .batch_interval
        .as_millis()
        .div_ceil(settings.gateway.poll_interval.as_millis().max(1))
        as usize;
    settings.meters.len().max(1) * (2 * polls_per_batch + SAMPLES_PER_METER_QUEUED)
}

/// Runs the gateway until `shutdown` is cancelled, or, with
/// `settings.poll_until_ms`, until polling has reached that virtual time and
/// the ingest has acked every batch.
pub async fn run(
    settings: Settings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<Report, GatewayError> {
    let path = settings.buffer_path.clone();
    let limits = settings.buffer_limits;
    // redb logs while it opens (and repairs) the file: in a span naming the
    // site and gateway, as every line about them does.
    let span =
        tracing::error_span!("buffer", site = %settings.site_id, gateway = %settings.gateway.id);
    let (buffer, moved_aside) = tokio::task::spawn_blocking(move || {
        span.in_scope(|| Buffer::open_or_move_aside(&path, limits))
    })
    .await
    .map_err(|e| task_failed("buffer open", e))??;
    if let Some(moved) = moved_aside {
        stats.buffer_recoveries.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            site = %settings.site_id,
            gateway = %settings.gateway.id,
            buffer = %moved.from.display(),
            moved_to = %moved.to.display(),
            cause = %moved.cause,
            "The buffer file could not be used; moved it aside and started a fresh buffer. Its batches were not sent: keep the moved file for recovery."
        );
    }
    let buffer = Arc::new(buffer);
    let meta = buffer.meta()?;
    stats.record_buffer(&meta);
    tracing::info!(
        site = %settings.site_id,
        gateway = %settings.gateway.id,
        meters = settings.meters.len(),
        buffer = %settings.buffer_path.display(),
        next_seq = meta.next_seq,
        acked_seq = meta.acked_seq,
        buffered_batches = meta.batches,
        buffered_bytes = meta.bytes,
        samples_produced = meta.samples_produced,
        samples_dropped = meta.samples_dropped,
        synced = meta.synced,
        "Gateway starting."
    );

    // Every meter's poll series exist, at zero, from the first scrape.
    for meter in &settings.meters {
        stats.meter_polls(&meter.id);
    }

    // Bound before polling starts: a taken port stops the gateway here.
    // Stopped when `run` returns, however it returns.
    let stop_metrics = CancellationToken::new();
    let _stop_metrics_on_return = stop_metrics.clone().drop_guard();
    let metrics_server = match settings.metrics_listen {
        None => None,
        Some(address) => {
            let listener = metrics::bind(address).await?;
            let bound = listener
                .local_addr()
                .map_err(|source| MetricsError::Bind { address, source })?;
            let _ = stats.metrics_address.set(bound);
            tracing::info!(
                site = %settings.site_id,
                gateway = %settings.gateway.id,
                address = %bound,
                "Serving metrics on /metrics."
            );
            Some(tokio::spawn(metrics::serve(
                listener,
                Arc::clone(&stats),
                metrics::Labels {
                    site: settings.site_id.clone(),
                    gateway: settings.gateway.id.clone(),
                },
                settings.clock,
                stop_metrics.clone(),
            )))
        }
    };

    // Cancelled by the caller, or by a failing stage to stop the others.
    let abort = shutdown.child_token();
    let stop_polling = abort.child_token();

    let (sample_tx, sample_rx) = mpsc::channel(sample_queue_capacity(&settings));
    let polls = tokio::spawn(poll::run(
        poll::PollSettings::of(&settings),
        sample_tx,
        Arc::clone(&stats),
        stop_polling.clone(),
    ));

    let (appended_tx, appended_rx) = watch::channel(meta.next_seq - 1);
    let batcher = tokio::spawn({
        let batcher = buffer::batcher::run(
            buffer::batcher::BatcherPlan {
                site: settings.site_id.clone(),
                gateway: settings.gateway.id.clone(),
                batch_interval: settings.gateway.batch_interval,
                commit_interval: settings.commit_interval,
                clock: settings.clock,
            },
            Arc::clone(&buffer),
            sample_rx,
            appended_tx,
            Arc::clone(&stats),
        );
        let abort = abort.clone();
        async move {
            let result = batcher.await;
            if result.is_err() {
                abort.cancel();
            }
            result
        }
    });
    let forwarder = forward::run(
        forward::ForwardPlan {
            site: settings.site_id.clone(),
            gateway: settings.gateway.id.clone(),
            mqtt: settings.mqtt.clone(),
            key: settings.key.clone(),
            window_batches: settings.window_batches,
            ack_timeout: settings.ack_timeout,
            replay: settings.replay,
            clock: settings.clock,
        },
        Arc::clone(&buffer),
        appended_rx,
        Arc::clone(&stats),
        abort.clone(),
    )
    .await;

    // The forwarder is done: everything acked, shut down, or failed.
    stop_polling.cancel();
    polls.await.map_err(|e| task_failed("poll", e))??;
    let batched = batcher.await.map_err(|e| task_failed("batcher", e))?;
    forwarder?;
    batched?;

    stop_metrics.cancel();
    if let Some(mut server) = metrics_server {
        match tokio::time::timeout(METRICS_CLOSE_GRACE, &mut server).await {
            Ok(joined) => joined.map_err(|e| task_failed("metrics", e))??,
            Err(_) => server.abort(),
        }
    }

    let meta = buffer.meta()?;
    tracing::info!(
        site = %settings.site_id,
        gateway = %settings.gateway.id,
        samples_produced = meta.samples_produced,
        acked_seq = meta.acked_seq,
        buffered_batches = meta.batches,
        samples_dropped = meta.samples_dropped,
        "Gateway stopped."
    );
    Ok(Report {
        samples_produced: meta.samples_produced,
        acked_seq: meta.acked_seq,
    })
}

fn task_failed(task: &'static str, error: tokio::task::JoinError) -> GatewayError {
    GatewayError::Task {
        task,
        reason: error.to_string(),
    }
}
