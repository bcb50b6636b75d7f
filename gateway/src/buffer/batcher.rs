//! Cuts the stream of samples into batches and commits them to the buffer
//! in groups.
//!
//! Rules ([`BatchCutter`], pure):
//! - Batches cover windows of `batch_interval` of virtual time aligned to
//!   multiples of it, by sample time. The first sample of a later window
//!   closes the current batch. A late sample (earlier window than the open
//!   batch) joins the open batch rather than reopening a closed one.
//! - A batch is also closed before a sample would push its encoded size
//!   (by a safe upper bound) over `MAX_BATCH_BYTES / 2`, leaving headroom
//!   below the limit the ingest enforces.
//! - Samples inside a batch are ordered by sample time (stable).
//!
//! Commit groups ([`GroupBuilder`], pure; the buffer's module docs give the
//! on-disk side): every `commit_interval` of wall time the async shell
//! commits one transaction holding every batch closed since the last
//! commit and the samples of the open batch that arrived since then. An
//! interval in which nothing arrived commits nothing. The shell is the only
//! writer of samples; on shutdown it closes the open batch and commits it.
//!
//! What a power cut loses: the samples taken since the last commit (at most
//! one commit interval) plus those still queued for the batcher.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::wire::{Sample, MAX_BATCH_BYTES};
use tokio::sync::{mpsc, watch};

use super::store::CommitGroup;
use super::{Buffer, BufferError};
use crate::Stats;

/// Largest encoded batch the gateway cuts.
pub(crate) const BATCH_SIZE_LIMIT: usize = MAX_BATCH_BYTES / 2;

/// Most bytes a postcard varint of a u64 takes.
const VARINT_MAX: usize = 10;

/// An upper bound on the encoded size of a batch header for `gateway`
/// (version byte, gateway, seq, dropped_before, sample count).
fn header_bound(gateway: &str) -> usize {
    1 + VARINT_MAX + gateway.len() + 3 * VARINT_MAX
}

/// An upper bound on the encoded size of one sample.
pub(crate) fn sample_bound(sample: &Sample) -> usize {
    let values = &sample.values;
    VARINT_MAX + sample.meter.len() // meter
        + VARINT_MAX // time_ms
        + 2 * VARINT_MAX // quality tag and exception code
        + 1 + 4 // power_kw
        + 1 + 8 // energy_kwh
        + VARINT_MAX + 4 * values.voltage_v.len()
        + VARINT_MAX + 4 * values.current_a.len()
        + 1 + 4 // power_factor
}

/// Pure batch-cutting state: feed samples, get closed batches' samples.
#[derive(Debug)]
pub(crate) struct BatchCutter {
    interval_ms: i64,
    size_limit: usize,
    header: usize,
    open: Vec<Sample>,
    open_window: i64,
    open_size: usize,
}

impl BatchCutter {
    pub(crate) fn new(gateway: &str, batch_interval: Duration, size_limit: usize) -> BatchCutter {
        let header = header_bound(gateway);
        BatchCutter {
            interval_ms: (batch_interval.as_millis() as i64).max(1),
            size_limit,
            header,
            open: Vec::new(),
            open_window: i64::MIN,
            open_size: header,
        }
    }

    /// Adds a sample; returns the samples of the batch this closed, if any.
    pub(crate) fn push(&mut self, sample: Sample) -> Option<Vec<Sample>> {
        let window = sample.time_ms.div_euclid(self.interval_ms);
        let size = sample_bound(&sample);
        let closed = if !self.open.is_empty()
            && (window > self.open_window || self.open_size + size > self.size_limit)
        {
            self.finish()
        } else {
            None
        };
        self.open_window = self.open_window.max(window);
        self.open_size += size;
        self.open.push(sample);
        closed
    }

    /// Closes the open batch, if it has samples.
    pub(crate) fn finish(&mut self) -> Option<Vec<Sample>> {
        if self.open.is_empty() {
            return None;
        }
        self.open_size = self.header;
        let mut samples = std::mem::take(&mut self.open);
        samples.sort_by_key(|s| s.time_ms);
        Some(samples)
    }
}

/// Samples gathered between two commits (pure).
#[derive(Debug)]
pub(crate) struct GroupBuilder {
    cutter: BatchCutter,
    /// Batches closed since the last commit.
    closed: Vec<Vec<Sample>>,
    /// Samples of the open batch already committed (to `pending`).
    open_committed: usize,
    arrived: bool,
}

/// What to commit now.
#[derive(Debug, PartialEq)]
pub(crate) struct Group {
    pub(crate) closed: Vec<Vec<Sample>>,
    pub(crate) open: Vec<Sample>,
}

impl GroupBuilder {
    pub(crate) fn new(cutter: BatchCutter) -> GroupBuilder {
        GroupBuilder {
            cutter,
            closed: Vec::new(),
            open_committed: 0,
            arrived: false,
        }
    }

    pub(crate) fn push(&mut self, sample: Sample) {
        self.arrived = true;
        if let Some(closed) = self.cutter.push(sample) {
            self.closed.push(closed);
            // The sample just pushed opened a new batch.
            self.open_committed = 0;
        }
    }

    /// The group to commit now, if anything arrived since the last one;
    /// from then on its samples count as committed.
    pub(crate) fn take(&mut self) -> Option<Group> {
        if !std::mem::take(&mut self.arrived) {
            return None;
        }
        let open = self.cutter.open[self.open_committed..].to_vec();
        self.open_committed = self.cutter.open.len();
        Some(Group {
            closed: std::mem::take(&mut self.closed),
            open,
        })
    }

    /// Closes the open batch: the last group.
    pub(crate) fn finish(&mut self) -> Option<Group> {
        if let Some(rest) = self.cutter.finish() {
            self.closed.push(rest);
            self.arrived = true;
        }
        self.open_committed = 0;
        self.take()
    }
}

/// How the batcher is set up.
#[derive(Debug, Clone)]
pub(crate) struct BatcherPlan {
    /// Site id, for logs.
    pub(crate) site: String,
    pub(crate) gateway: String,
    pub(crate) batch_interval: Duration,
    pub(crate) commit_interval: Duration,
    /// Measures the age limit.
    pub(crate) clock: Clock,
}

/// Receives samples until every sender is gone, commits a group every
/// commit interval, closes and commits the open batch at the end, and
/// publishes the seq of the newest stored batch on `appended`.
pub(crate) async fn run(
    plan: BatcherPlan,
    buffer: Arc<Buffer>,
    mut samples: mpsc::Receiver<Sample>,
    appended: watch::Sender<u64>,
    stats: Arc<Stats>,
) -> Result<(), BufferError> {
    let cutter = BatchCutter::new(&plan.gateway, plan.batch_interval, BATCH_SIZE_LIMIT);
    let mut builder = GroupBuilder::new(cutter);
    let mut commits = tokio::time::interval(plan.commit_interval);
    commits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    commits.tick().await;
    loop {
        tokio::select! {
            sample = samples.recv() => match sample {
                Some(sample) => builder.push(sample),
                None => break,
            },
            _ = commits.tick() => {
                if let Some(group) = builder.take() {
                    commit(&plan, group, &buffer, &appended, &stats).await?;
                }
            }
        }
    }
    if let Some(group) = builder.finish() {
        commit(&plan, group, &buffer, &appended, &stats).await?;
    }
    Ok(())
}

async fn commit(
    plan: &BatcherPlan,
    group: Group,
    buffer: &Arc<Buffer>,
    appended: &watch::Sender<u64>,
    stats: &Stats,
) -> Result<(), BufferError> {
    let buffer = Arc::clone(buffer);
    let gateway = plan.gateway.clone();
    let now_ms = plan.clock.now_ms();
    let (stored, meta) = tokio::task::spawn_blocking(move || {
        buffer.commit_group(
            CommitGroup {
                gateway: &gateway,
                closed: group.closed,
                open: &group.open,
            },
            now_ms,
        )
    })
    .await
    .expect("buffer commits do not panic")?;
    stats
        .batches_appended
        .fetch_add(stored.len() as u64, Ordering::Relaxed);
    stats.record_buffer(&meta);
    if let Some(&seq) = stored.last() {
        tracing::debug!(
            site = %plan.site,
            gateway = %plan.gateway,
            seq,
            "Committed batches to the buffer."
        );
        appended.send_replace(seq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use facwatch_proto::wire::{Batch, Quality, Values};

    fn sample(meter: &str, time_ms: i64) -> Sample {
        Sample {
            meter: meter.into(),
            time_ms,
            quality: Quality::Ok,
            values: Values {
                power_kw: Some(1.0),
                energy_kwh: Some(2.0),
                voltage_v: vec![230.0; 3],
                current_a: vec![10.0; 3],
                power_factor: Some(0.9),
            },
        }
    }

    fn times(samples: &[Sample]) -> Vec<i64> {
        samples.iter().map(|s| s.time_ms).collect()
    }

    #[test]
    fn first_sample_of_a_later_window_closes_the_batch() {
        let mut cutter = BatchCutter::new("gw", Duration::from_secs(60), BATCH_SIZE_LIMIT);
        assert_eq!(cutter.push(sample("a", 60_000)), None);
        assert_eq!(cutter.push(sample("b", 90_000)), None);
        assert_eq!(cutter.push(sample("a", 119_999)), None);
        let closed = cutter.push(sample("b", 120_000)).unwrap();
        assert_eq!(times(&closed), vec![60_000, 90_000, 119_999]);
        assert_eq!(times(&cutter.finish().unwrap()), vec![120_000]);
        assert_eq!(cutter.finish(), None);
    }

    #[test]
    fn late_sample_joins_the_open_batch_in_time_order() {
        let mut cutter = BatchCutter::new("gw", Duration::from_secs(60), BATCH_SIZE_LIMIT);
        cutter.push(sample("a", 0));
        cutter.push(sample("a", 61_000)).unwrap();
        assert_eq!(cutter.push(sample("slow", 59_000)), None);
        assert_eq!(cutter.push(sample("a", 62_000)), None);
        assert_eq!(
            times(&cutter.finish().unwrap()),
            vec![59_000, 61_000, 62_000]
        );
    }

    #[test]
    fn negative_times_fall_in_their_own_windows() {
        let mut cutter = BatchCutter::new("gw", Duration::from_secs(60), BATCH_SIZE_LIMIT);
        cutter.push(sample("a", -1));
        assert_eq!(times(&cutter.push(sample("a", 0)).unwrap()), vec![-1]);
    }

    #[test]
    fn batch_is_closed_before_it_would_exceed_the_size_limit() {
        let one = sample_bound(&sample("m", 0));
        let limit = header_bound("gw") + 3 * one;
        let mut cutter = BatchCutter::new("gw", Duration::from_secs(3600), limit);
        for t in 0..3 {
            assert_eq!(cutter.push(sample("m", t)), None);
        }
        assert_eq!(times(&cutter.push(sample("m", 3)).unwrap()), vec![0, 1, 2]);
        assert_eq!(times(&cutter.finish().unwrap()), vec![3]);
    }

    #[test]
    fn size_bound_is_never_below_the_encoded_size() {
        let mut samples = vec![sample("a-long-meter-name", i64::MIN), sample("b", i64::MAX)];
        samples.push(Sample {
            meter: "c".into(),
            time_ms: -5,
            quality: Quality::Exception(255),
            values: Values::default(),
        });
        let batch = Batch {
            gateway: "gw-01".into(),
            seq: u64::MAX,
            dropped_before: u64::MAX,
            samples: samples.clone(),
        };
        let bound = header_bound("gw-01") + samples.iter().map(sample_bound).sum::<usize>();
        assert!(batch.encode().len() <= bound);
    }

    #[test]
    fn a_full_cut_batch_encodes_within_half_the_wire_limit() {
        let mut cutter = BatchCutter::new("gw-01", Duration::from_secs(3600), BATCH_SIZE_LIMIT);
        let closed = (0..100_000)
            .find_map(|t| cutter.push(sample("l1-main-fan", t)))
            .unwrap();
        let batch = Batch {
            gateway: "gw-01".into(),
            seq: u64::MAX,
            dropped_before: 0,
            samples: closed,
        };
        let len = batch.encode().len();
        assert!(len <= MAX_BATCH_BYTES / 2, "{len}");
        assert!(len > MAX_BATCH_BYTES / 4, "{len}");
    }

    fn builder() -> GroupBuilder {
        GroupBuilder::new(BatchCutter::new(
            "gw",
            Duration::from_secs(60),
            BATCH_SIZE_LIMIT,
        ))
    }

    fn group_times(group: &Group) -> (Vec<Vec<i64>>, Vec<i64>) {
        (
            group.closed.iter().map(|b| times(b)).collect(),
            times(&group.open),
        )
    }

    #[test]
    fn a_group_holds_the_batches_closed_and_the_open_samples_not_yet_committed() {
        let mut builder = builder();
        assert_eq!(builder.take(), None, "nothing arrived: nothing to commit");
        builder.push(sample("a", 0));
        builder.push(sample("a", 10_000));
        let first = builder.take().unwrap();
        assert_eq!(group_times(&first), (vec![], vec![0, 10_000]));
        assert_eq!(builder.take(), None);

        builder.push(sample("a", 20_000));
        // Closes [0, 60 s); 60 s and 70 s open the next batch.
        builder.push(sample("a", 60_000));
        builder.push(sample("a", 70_000));
        let second = builder.take().unwrap();
        assert_eq!(
            group_times(&second),
            (vec![vec![0, 10_000, 20_000]], vec![60_000, 70_000])
        );

        builder.push(sample("a", 80_000));
        assert_eq!(
            group_times(&builder.take().unwrap()),
            (vec![], vec![80_000])
        );
        // Shutdown closes the open batch, all of whose samples are pending.
        assert_eq!(
            group_times(&builder.finish().unwrap()),
            (vec![vec![60_000, 70_000, 80_000]], vec![])
        );
        assert_eq!(builder.finish(), None);
    }

    #[test]
    fn a_batch_opened_and_closed_between_two_commits_is_committed_whole() {
        let mut builder = builder();
        builder.push(sample("a", 0));
        builder.take().unwrap();
        builder.push(sample("a", 60_000));
        builder.push(sample("a", 120_000));
        builder.push(sample("a", 130_000));
        assert_eq!(
            group_times(&builder.take().unwrap()),
            (vec![vec![0], vec![60_000]], vec![120_000, 130_000])
        );
    }
}
