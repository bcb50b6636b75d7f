//! The facwatch gateway: poll -> buffer -> forward.
//!
//! - [`poll`]: one task per bus (a serial port, a serial device server, a
//!   Modbus TCP endpoint) reads its meters one request at a time at aligned
//!   virtual times, backing off from meters that do not answer, and turns
//!   every slot of every meter into a `Sample`;
//! - [`buffer`]: one batcher cuts samples into batches and appends each to
//!   the redb buffer before anything tries to send it;
//! - `forward`: batches go to the ingest over MQTT and
//!   leave the buffer only when the ingest acks them (DESIGN.md,
//!   "Delivery").
//!
//! [`probe`] reads one meter once over the same code path as polling, for
//! installers (`facwatch-gateway probe`).
//!
//! [`run`] wires the stages together. Shutdown order: polling stops first,
//! the batcher flushes its partial batch into the buffer, then the
//! forwarder says goodbye to the broker. Nothing buffered is lost by a
//! shutdown; the next run sends it.

pub mod buffer;
pub mod config;
mod forward;
pub mod poll;
pub mod probe;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use buffer::{Buffer, BufferError};
pub use config::{MqttSettings, Settings};

/// Live counters, for metrics and for tests to watch progress.
#[derive(Debug, Default)]
pub struct Stats {
    /// Samples ever appended to the buffer (lifetime, from its meta).
    pub samples_produced: AtomicU64,
    /// Batches appended during this run.
    pub batches_appended: AtomicU64,
    /// Batches published for the first time during this run.
    pub batches_sent: AtomicU64,
    /// Batches published again (reconnect or ack timeout).
    pub batches_resent: AtomicU64,
    /// Highest seq the ingest has acked.
    pub acked_seq: AtomicU64,
    /// Batches in the buffer waiting for an ack.
    pub buffered_batches: AtomicU64,
    /// Polls that yielded values.
    pub polls_ok: AtomicU64,
    /// Polls that did not (timeout, exception, decode error, offline),
    /// including slots in which a meter was not asked (`polls_skipped`).
    pub polls_failed: AtomicU64,
    /// Of `polls_failed`: slots in which a meter backing off after failures
    /// was not asked (each still yields an `Offline` sample).
    pub polls_skipped: AtomicU64,
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
}

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
    let buffer = Arc::new(
        tokio::task::spawn_blocking(move || Buffer::open(&path))
            .await
            .map_err(|e| task_failed("buffer open", e))??,
    );
    let meta = buffer.meta()?;
    stats
        .samples_produced
        .store(meta.samples_produced, Ordering::Relaxed);
    tracing::info!(
        site = %settings.site_id,
        gateway = %settings.gateway.id,
        meters = settings.meters.len(),
        buffer = %settings.buffer_path.display(),
        next_seq = meta.next_seq,
        acked_seq = meta.acked_seq,
        buffered_batches = meta.batches,
        "Gateway starting."
    );

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
            settings.gateway.id.clone(),
            settings.gateway.batch_interval,
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
            window_batches: settings.window_batches,
            ack_timeout: settings.ack_timeout,
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

    let meta = buffer.meta()?;
    tracing::info!(
        site = %settings.site_id,
        gateway = %settings.gateway.id,
        samples_produced = meta.samples_produced,
        acked_seq = meta.acked_seq,
        buffered_batches = meta.batches,
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
