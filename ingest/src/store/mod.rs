//! The ingest's durable state, one redb file.
//!
//! Tables:
//!
//! | table      | key              | value                                   |
//! |------------|------------------|-----------------------------------------|
//! | `meta`     | name             | u64 (`format` = [`STORE_FORMAT`])       |
//! | `last_seq` | gateway          | u64, the last applied batch             |
//! | `detector` | gateway          | bytes, `GatewayDetector::snapshot`      |
//! | `events`   | event id         | bytes, `Event::encode`                  |
//! | `counters` | (gateway, name)  | u64, see [`GatewayCounters`]            |
//! | `outbox`   | (webhook, n)     | (idempotency key, JSON body) of a notice |
//! | `outbox_next` | webhook       | u64, the `n` of the next notice         |
//! | `replay`   | gateway          | JSON, the pending replay summary        |
//! | `alerts`   | gateway          | i64, silent since (ms), while raised    |
//! | `influx_outbox` | n           | (precision, lines, line protocol), see `influx` |
//!
//! **Notices commit with what they tell.** The webhook notices of the event
//! changes of a group, and the replay summaries those changes add to or
//! complete, are written in the group's transaction; an alert's notice in
//! the transaction that records the alert. A webhook's notices are numbered
//! by `outbox_next` and only ever removed from the head (sent, refused, or
//! dropped as the oldest when the webhook has `max_queue` notices), so they
//! form one contiguous run `head..next` and are sent in that order. A crash
//! after a commit loses no notice; one sent but not yet removed is sent again
//! with the same idempotency key.
//!
//! **Points commit with what they record**, in the same way: a group's
//! applied batches (their readings) and the InfluxDB lines of its event
//! changes are appended to `influx_outbox` in the group's transaction (see
//! `influx`).
//!
//! **Invariant: the `last_seq`, the detector state, the events and the
//! counters of a batch commit together, in one write transaction
//! (`Store::commit_group`), and the ingest acks a batch only after that
//! transaction has committed.** A transaction holds a *group* of batches
//! (those queued together, of one or more gateways), and then the state
//! after the group's last batch of each gateway: after any crash the store
//! holds all of a group's effects or none, the acks sent cover only committed
//! batches, and the gateways resend exactly the batches whose effects are
//! missing. A gateway's `last_seq` and detector state always describe the
//! same point of its stream.
//!
//! An event is upserted by id, so writing the same event twice is a no-op
//! (and is reported as no change). Within a group, the events are written in
//! the order the batches produced them, so each version is compared with the
//! one before it, as if every batch had its own transaction.
//!
//! redb locks the file: only one `Store` may be open per file at a time
//! (the ingest's `run` drops its store before returning, so the demo and
//! tests open the file after it).

mod influx;

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};

use facwatch_proto::site::Site;
use redb::{Database, ReadableTable, TableDefinition};

use crate::detect::{Event, EventStatus, SnapshotError};
use crate::emit::influx::{self as influx_lines, Pending, Rendering};
use crate::emit::notice::{self, Notice, ReplaySummary, Route};

pub(crate) use influx::InfluxHead;
pub use influx::InfluxOutboxDepth;

/// Version of the table layout above; a store of another format is refused.
pub const STORE_FORMAT: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("last_seq");
const DETECTOR: TableDefinition<&str, &[u8]> = TableDefinition::new("detector");
const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
const COUNTERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counters");
const OUTBOX: TableDefinition<(&str, u64), (&str, &[u8])> = TableDefinition::new("outbox");
const OUTBOX_NEXT: TableDefinition<&str, u64> = TableDefinition::new("outbox_next");
const REPLAY: TableDefinition<&str, &[u8]> = TableDefinition::new("replay");
const ALERTS: TableDefinition<&str, i64> = TableDefinition::new("alerts");

const BATCHES_APPLIED: &str = "batches_applied";
const SAMPLES_APPLIED: &str = "samples_applied";
const SEQUENCE_GAPS: &str = "sequence_gaps";
const BATCHES_MISSING: &str = "batches_missing";
const SAMPLES_DROPPED_BY_GATEWAY: &str = "samples_dropped_by_gateway";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // Causes are part of the messages, so they are not also `source`s
    // (which would print them twice in an error chain).
    #[error("store {path}: {cause}")]
    Open {
        path: String,
        cause: Box<redb::Error>,
    },
    #[error("store {path}: format {found} is not the format {STORE_FORMAT} this build reads")]
    Format { path: String, found: u64 },
    #[error("store: {0}")]
    Database(Box<redb::Error>),
    #[error("store: event `{id}` does not decode: {cause}")]
    Event { id: String, cause: SnapshotError },
    #[error("store: replay summary of gateway `{gateway}` does not decode: {cause}")]
    Summary { gateway: String, cause: String },
}

/// redb page cache of the store.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

fn db(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(Box::new(error.into()))
}

/// Persistent per-gateway counters (they survive restarts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayCounters {
    pub batches_applied: u64,
    pub samples_applied: u64,
    /// Applied batches whose `seq` skipped numbers.
    pub sequence_gaps: u64,
    /// Sequence numbers skipped over all gaps.
    pub batches_missing: u64,
    /// Sum of the batches' `dropped_before` (samples the gateway discarded).
    pub samples_dropped_by_gateway: u64,
}

/// What a group of batches changed for one gateway, written by
/// [`Store::commit_group`].
pub(crate) struct GatewayCommit<'a> {
    pub(crate) gateway: &'a str,
    /// The last batch of the gateway applied in the group.
    pub(crate) last_seq: u64,
    /// The detector state after that batch.
    pub(crate) detector_snapshot: &'a [u8],
    /// Added to the stored counters.
    pub(crate) counters: GatewayCounters,
    /// The gateway's site (time zone and name of its notices).
    pub(crate) site: &'a Site,
    /// The newest sample the gateway delivered, after the group: when it is
    /// live, the gateway's pending replay summary is complete.
    pub(crate) newest_sample_ms: Option<i64>,
}

/// An event as a batch produced it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Produced {
    pub(crate) event: Event,
    /// The newest sample of the batch that produced it.
    pub(crate) data_time_ms: i64,
}

/// A webhook's outbox and its bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxLimit {
    pub(crate) webhook: String,
    pub(crate) max_queue: u64,
}

/// The InfluxDB output of a commit: the applied batches (their readings),
/// and how to render the event changes the commit finds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InfluxCommit<'a> {
    pub(crate) rendering: &'a Rendering,
    pub(crate) readings: &'a Pending,
}

/// What decides the notices of a commit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoticeContext<'a> {
    pub(crate) webhooks: &'a [OutboxLimit],
    pub(crate) wall_now_ms: i64,
    pub(crate) historical_lag_ms: i64,
}

/// What a commit queued for the webhooks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Queued {
    /// Notices queued, per webhook (the same for every webhook).
    pub(crate) notices: u64,
    /// Oldest notices dropped because an outbox was full: (webhook, count).
    pub(crate) dropped: Vec<(String, u64)>,
}

impl Queued {
    fn add(&mut self, other: Queued) {
        self.notices += other.notices;
        for (webhook, n) in other.dropped {
            match self.dropped.iter_mut().find(|(w, _)| *w == webhook) {
                Some((_, total)) => *total += n,
                None => self.dropped.push((webhook, n)),
            }
        }
    }
}

/// What [`Store::commit_group`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Committed {
    /// Events whose stored version changed, in the order produced.
    pub(crate) changes: Vec<EventChange>,
    /// Replay summaries completed (and queued) by this commit.
    pub(crate) summaries: Vec<ReplaySummary>,
    pub(crate) queued: Queued,
    /// Lines queued for InfluxDB, and their bytes.
    pub(crate) influx_lines: u64,
    pub(crate) influx_bytes_added: u64,
}

/// The first notice of a webhook's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuedNotice {
    pub(crate) number: u64,
    pub(crate) notice: Notice,
}

/// An event whose stored version changed with a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventChange {
    pub(crate) event: Event,
    /// Not stored before this batch.
    pub(crate) opened: bool,
    /// Closed by this batch (it was open, or new and already closed).
    pub(crate) closed: bool,
    /// Found in a replay: its notice is summarised, not sent.
    pub(crate) historical_notice: bool,
}

pub struct Store {
    db: Database,
    /// `meta["influx_outbox_bytes"]`, kept by adding what each commit
    /// appended and subtracting what each removal took, after the commit:
    /// the sum is exact once both are done, whatever their order (see
    /// `influx`).
    influx_bytes: AtomicI64,
    /// Test seam: the next commit fails before writing anything.
    #[cfg(test)]
    fail_next_commit: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens the store at `path`, creating it (and its tables) if needed.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let name = path.display().to_string();
        let open_error = |cause: redb::Error| StoreError::Open {
            path: name.clone(),
            cause: Box::new(cause),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_error(redb::Error::Io(e)))?;
        }
        // redb's default page cache is 1 GiB and keeps every written page;
        // bound it so memory does not grow with the store.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_error(e.into()))?;
        let tx = db.begin_write().map_err(|e| open_error(e.into()))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| open_error(e.into()))?;
            let found = meta
                .get("format")
                .map_err(|e| open_error(e.into()))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", STORE_FORMAT)
                        .map_err(|e| open_error(e.into()))?;
                }
                Some(STORE_FORMAT) => {}
                Some(found) => return Err(StoreError::Format { path: name, found }),
            }
            tx.open_table(LAST_SEQ).map_err(|e| open_error(e.into()))?;
            tx.open_table(DETECTOR).map_err(|e| open_error(e.into()))?;
            tx.open_table(EVENTS).map_err(|e| open_error(e.into()))?;
            tx.open_table(COUNTERS).map_err(|e| open_error(e.into()))?;
            tx.open_table(OUTBOX).map_err(|e| open_error(e.into()))?;
            tx.open_table(OUTBOX_NEXT)
                .map_err(|e| open_error(e.into()))?;
            tx.open_table(REPLAY).map_err(|e| open_error(e.into()))?;
            tx.open_table(ALERTS).map_err(|e| open_error(e.into()))?;
            tx.open_table(influx::INFLUX_OUTBOX)
                .map_err(|e| open_error(e.into()))?;
        }
        let influx_bytes = influx::stored_bytes(&tx)?;
        tx.commit().map_err(|e| open_error(e.into()))?;
        Ok(Store {
            db,
            influx_bytes: AtomicI64::new(influx_bytes as i64),
            #[cfg(test)]
            fail_next_commit: Default::default(),
        })
    }

    /// Every stored event, by start time (then id).
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(EVENTS).map_err(db)?;
        let mut events = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (id, bytes) = entry.map_err(db)?;
            let event = Event::decode(bytes.value()).map_err(|cause| StoreError::Event {
                id: id.value().to_string(),
                cause,
            })?;
            events.push(event);
        }
        events.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
        Ok(events)
    }

    /// The last batch applied for `gateway`, `None` before the first.
    pub fn last_seq(&self, gateway: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(LAST_SEQ).map_err(db)?;
        let value = table.get(gateway).map_err(db)?.map(|v| v.value());
        Ok(value)
    }

    /// Samples applied for `gateway` over the store's lifetime.
    pub fn samples_applied(&self, gateway: &str) -> Result<u64, StoreError> {
        Ok(self.counters(gateway)?.samples_applied)
    }

    pub fn counters(&self, gateway: &str) -> Result<GatewayCounters, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(COUNTERS).map_err(db)?;
        let get = |name: &str| -> Result<u64, StoreError> {
            Ok(table
                .get((gateway, name))
                .map_err(db)?
                .map_or(0, |v| v.value()))
        };
        Ok(GatewayCounters {
            batches_applied: get(BATCHES_APPLIED)?,
            samples_applied: get(SAMPLES_APPLIED)?,
            sequence_gaps: get(SEQUENCE_GAPS)?,
            batches_missing: get(BATCHES_MISSING)?,
            samples_dropped_by_gateway: get(SAMPLES_DROPPED_BY_GATEWAY)?,
        })
    }

    /// The detector state saved with the gateway's last applied batch.
    pub(crate) fn detector_snapshot(&self, gateway: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(DETECTOR).map_err(db)?;
        let value = table.get(gateway).map_err(db)?.map(|v| v.value().to_vec());
        Ok(value)
    }

    /// Writes everything a group of batches changes in one transaction (see
    /// the module doc): per gateway its `last_seq`, detector snapshot and
    /// counters; `events` in the order they were produced; the notices of
    /// the changed events (live ones to every webhook's outbox, historical
    /// ones into their gateway's pending replay summary); and the replay
    /// summaries that a live gateway completes; with `influx`, the lines of
    /// the readings and of the changed events. On an error nothing is
    /// written.
    pub(crate) fn commit_group(
        &self,
        gateways: &[GatewayCommit<'_>],
        events: &[Produced],
        notices: NoticeContext<'_>,
        influx: Option<InfluxCommit<'_>>,
    ) -> Result<Committed, StoreError> {
        #[cfg(test)]
        if self
            .fail_next_commit
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(db(redb::StorageError::Io(std::io::Error::other(
                "injected commit failure",
            ))));
        }
        let tx = self.db.begin_write().map_err(db)?;
        let mut committed = Committed::default();
        {
            let mut last_seq = tx.open_table(LAST_SEQ).map_err(db)?;
            let mut detector = tx.open_table(DETECTOR).map_err(db)?;
            let mut counters = tx.open_table(COUNTERS).map_err(db)?;
            for update in gateways {
                let gateway = update.gateway;
                last_seq.insert(gateway, update.last_seq).map_err(db)?;
                detector
                    .insert(gateway, update.detector_snapshot)
                    .map_err(db)?;
                let add = update.counters;
                for (name, add) in [
                    (BATCHES_APPLIED, add.batches_applied),
                    (SAMPLES_APPLIED, add.samples_applied),
                    (SEQUENCE_GAPS, add.sequence_gaps),
                    (BATCHES_MISSING, add.batches_missing),
                    (SAMPLES_DROPPED_BY_GATEWAY, add.samples_dropped_by_gateway),
                ] {
                    if add == 0 {
                        continue;
                    }
                    let old = counters
                        .get((gateway, name))
                        .map_err(db)?
                        .map_or(0, |v| v.value());
                    counters
                        .insert((gateway, name), old.saturating_add(add))
                        .map_err(db)?;
                }
            }

            let mut stored = tx.open_table(EVENTS).map_err(db)?;
            let mut outbox = Outbox::open(&tx, notices.webhooks)?;
            let mut event_lines = Pending::default();
            let mut replay = tx.open_table(REPLAY).map_err(db)?;
            for Produced {
                event,
                data_time_ms,
            } in events
            {
                let bytes = event.encode();
                let previous = stored
                    .insert(event.id.as_str(), bytes.as_slice())
                    .map_err(db)?
                    .map(|old| old.value().to_vec());
                if previous.as_deref() == Some(bytes.as_slice()) {
                    continue;
                }
                let was_closed = previous
                    .as_deref()
                    .and_then(|old| Event::decode(old).ok())
                    .map(|old| old.status == EventStatus::Closed);
                let opened = previous.is_none();
                let closed = event.status == EventStatus::Closed && was_closed != Some(true);
                let route = notice::route(
                    event,
                    opened,
                    closed,
                    *data_time_ms,
                    notices.wall_now_ms,
                    notices.historical_lag_ms,
                );
                let site = gateways
                    .iter()
                    .find(|g| g.gateway == event.gateway)
                    .map(|g| g.site);
                match (route, site) {
                    (Route::Live(phase), Some(site)) => {
                        let notice = notice::event_notice(event, phase, site.time_zone);
                        committed.queued.add(outbox.push(&notice)?);
                    }
                    (Route::Historical { first_seen: true }, Some(site)) => {
                        let mut summary = read_summary(&replay, &event.gateway)?
                            .unwrap_or_else(|| ReplaySummary::new(site, &event.gateway));
                        summary.count(event);
                        let json = serde_json::to_vec(&summary).expect("summaries serialize");
                        replay
                            .insert(event.gateway.as_str(), json.as_slice())
                            .map_err(db)?;
                    }
                    _ => {}
                }
                if let Some(InfluxCommit { rendering, .. }) = influx {
                    if rendering.events {
                        influx_lines::push_event(&mut event_lines, rendering, event);
                    }
                }
                committed.changes.push(EventChange {
                    event: event.clone(),
                    opened,
                    closed,
                    historical_notice: matches!(route, Route::Historical { .. }),
                });
            }

            // A gateway whose data is live again has finished its replay.
            for update in gateways {
                let live = update.newest_sample_ms.is_some_and(|newest| {
                    notices.wall_now_ms - newest <= notices.historical_lag_ms
                });
                if !live {
                    continue;
                }
                if let Some(summary) = read_summary(&replay, update.gateway)? {
                    replay.remove(update.gateway).map_err(db)?;
                    committed.queued.add(outbox.push(&summary.notice())?);
                    committed.summaries.push(summary);
                }
            }

            if let Some(InfluxCommit {
                rendering,
                readings,
            }) = influx
            {
                let mut added = influx::append(&tx, readings, rendering.precision)?;
                added += influx::append(&tx, &event_lines, rendering.precision)?;
                committed.influx_lines = readings.lines() + event_lines.lines();
                committed.influx_bytes_added = added;
            }
        }
        tx.commit().map_err(db)?;
        if committed.influx_bytes_added > 0 {
            self.influx_bytes
                .fetch_add(committed.influx_bytes_added as i64, Ordering::AcqRel);
        }
        Ok(committed)
    }

    /// Gateways with a pending replay summary.
    pub(crate) fn pending_summaries(&self) -> Result<Vec<ReplaySummary>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(REPLAY).map_err(db)?;
        let mut summaries = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (gateway, bytes) = entry.map_err(db)?;
            summaries.push(decode_summary(gateway.value(), bytes.value())?);
        }
        Ok(summaries)
    }

    /// Completes the pending replay summary of `gateway`, if any: removes it
    /// and queues its notice, in one transaction.
    pub(crate) fn flush_summary(
        &self,
        gateway: &str,
        webhooks: &[OutboxLimit],
    ) -> Result<Option<(ReplaySummary, Queued)>, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let flushed = {
            let mut replay = tx.open_table(REPLAY).map_err(db)?;
            match read_summary(&replay, gateway)? {
                None => None,
                Some(summary) => {
                    replay.remove(gateway).map_err(db)?;
                    let queued = Outbox::open(&tx, webhooks)?.push(&summary.notice())?;
                    Some((summary, queued))
                }
            }
        };
        tx.commit().map_err(db)?;
        Ok(flushed)
    }

    /// Raised connectivity alerts: (gateway, silent since ms).
    pub(crate) fn alerts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(ALERTS).map_err(db)?;
        let mut alerts = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (gateway, since) = entry.map_err(db)?;
            alerts.push((gateway.value().to_string(), since.value()));
        }
        Ok(alerts)
    }

    /// Records (`Some(since_ms)`) or clears (`None`) the alert of `gateway`
    /// and queues `notice`, in one transaction.
    pub(crate) fn set_alert(
        &self,
        gateway: &str,
        since_ms: Option<i64>,
        notice: &Notice,
        webhooks: &[OutboxLimit],
    ) -> Result<Queued, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let queued = {
            let mut alerts = tx.open_table(ALERTS).map_err(db)?;
            match since_ms {
                Some(since) => alerts.insert(gateway, since).map_err(db)?,
                None => alerts.remove(gateway).map_err(db)?,
            };
            Outbox::open(&tx, webhooks)?.push(notice)?
        };
        tx.commit().map_err(db)?;
        Ok(queued)
    }

    /// The oldest notice queued for `webhook`.
    pub(crate) fn outbox_head(&self, webhook: &str) -> Result<Option<QueuedNotice>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(OUTBOX).map_err(db)?;
        let mut range = table
            .range((webhook, 0)..=(webhook, u64::MAX))
            .map_err(db)?;
        match range.next() {
            None => Ok(None),
            Some(entry) => {
                let (key, value) = entry.map_err(db)?;
                let (idempotency_key, body) = value.value();
                Ok(Some(QueuedNotice {
                    number: key.value().1,
                    notice: Notice {
                        key: idempotency_key.to_string(),
                        body: body.to_vec(),
                    },
                }))
            }
        }
    }

    /// Removes notice `number` of `webhook` (sent or refused). Returns
    /// whether it was still there (it may have been dropped as the oldest).
    pub(crate) fn outbox_remove(&self, webhook: &str, number: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let removed = tx
            .open_table(OUTBOX)
            .map_err(db)?
            .remove((webhook, number))
            .map_err(db)?
            .is_some();
        tx.commit().map_err(db)?;
        Ok(removed)
    }

    /// Queues `notice` for every webhook of `webhooks` (tests).
    #[cfg(test)]
    pub(crate) fn enqueue(
        &self,
        notice: &Notice,
        webhooks: &[OutboxLimit],
    ) -> Result<Queued, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let queued = Outbox::open(&tx, webhooks)?.push(notice)?;
        tx.commit().map_err(db)?;
        Ok(queued)
    }

    /// Notices queued for webhook `webhook` and not yet delivered.
    pub fn outbox_len(&self, webhook: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(OUTBOX).map_err(db)?;
        let count = table
            .range((webhook, 0)..=(webhook, u64::MAX))
            .map_err(db)?
            .count();
        Ok(count as u64)
    }

    /// Makes the next [`Store::commit_group`] fail without writing.
    #[cfg(test)]
    pub(crate) fn fail_next_commit(&self) {
        self.fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn read_summary(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    gateway: &str,
) -> Result<Option<ReplaySummary>, StoreError> {
    match table.get(gateway).map_err(db)? {
        None => Ok(None),
        Some(bytes) => decode_summary(gateway, bytes.value()).map(Some),
    }
}

fn decode_summary(gateway: &str, bytes: &[u8]) -> Result<ReplaySummary, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Summary {
        gateway: gateway.to_string(),
        cause: e.to_string(),
    })
}

/// The outboxes of every webhook, inside one write transaction.
struct Outbox<'tx> {
    entries: redb::Table<'tx, (&'static str, u64), (&'static str, &'static [u8])>,
    next: redb::Table<'tx, &'static str, u64>,
    webhooks: &'tx [OutboxLimit],
}

impl<'tx> Outbox<'tx> {
    fn open(
        tx: &'tx redb::WriteTransaction,
        webhooks: &'tx [OutboxLimit],
    ) -> Result<Outbox<'tx>, StoreError> {
        Ok(Outbox {
            entries: tx.open_table(OUTBOX).map_err(db)?,
            next: tx.open_table(OUTBOX_NEXT).map_err(db)?,
            webhooks,
        })
    }

    /// Appends `notice` to every webhook's outbox, dropping the oldest
    /// notices of a full one.
    fn push(&mut self, notice: &Notice) -> Result<Queued, StoreError> {
        let mut queued = Queued::default();
        for limit in self.webhooks {
            let webhook = limit.webhook.as_str();
            let number = self.next.get(webhook).map_err(db)?.map_or(0, |v| v.value());
            self.entries
                .insert(
                    (webhook, number),
                    (notice.key.as_str(), notice.body.as_slice()),
                )
                .map_err(db)?;
            self.next.insert(webhook, number + 1).map_err(db)?;
            // Numbers are contiguous from the head (module doc).
            let head = self
                .entries
                .range((webhook, 0)..=(webhook, u64::MAX))
                .map_err(db)?
                .next()
                .map(|entry| entry.map(|(key, _)| key.value().1))
                .transpose()
                .map_err(db)?
                .unwrap_or(number);
            let len = number + 1 - head;
            let excess = len.saturating_sub(limit.max_queue);
            for dropped in head..head + excess {
                self.entries.remove((webhook, dropped)).map_err(db)?;
            }
            if excess > 0 {
                queued.dropped.push((webhook.to_string(), excess));
            }
        }
        queued.notices = u64::from(!self.webhooks.is_empty());
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied<'a>(
        gateway: &'a str,
        seq: u64,
        samples: u64,
        snapshot: &'a [u8],
    ) -> GatewayCommit<'a> {
        GatewayCommit {
            gateway,
            last_seq: seq,
            detector_snapshot: snapshot,
            counters: GatewayCounters {
                batches_applied: 1,
                samples_applied: samples,
                ..GatewayCounters::default()
            },
            site: test_site(),
            newest_sample_ms: None,
        }
    }

    fn test_site() -> &'static Site {
        static SITE: std::sync::OnceLock<Site> = std::sync::OnceLock::new();
        SITE.get_or_init(|| {
            Site::from_toml(
                include_str!("../../../deploy/stenter-plant.site.toml"),
                "stenter-plant.site.toml",
            )
            .unwrap()
        })
    }

    const NO_NOTICES: NoticeContext<'static> = NoticeContext {
        webhooks: &[],
        wall_now_ms: 0,
        historical_lag_ms: 0,
    };

    #[test]
    fn batch_effects_round_trip_through_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.redb");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.last_seq("gw-a").unwrap(), None);
            assert_eq!(store.detector_snapshot("gw-a").unwrap(), None);
            assert_eq!(store.counters("gw-a").unwrap(), GatewayCounters::default());

            assert_eq!(
                store
                    .commit_group(&[applied("gw-a", 1, 3, b"s1")], &[], NO_NOTICES, None)
                    .unwrap(),
                Committed::default()
            );
            let mut third = applied("gw-a", 3, 2, b"s3");
            third.counters.sequence_gaps = 1;
            third.counters.batches_missing = 1;
            third.counters.samples_dropped_by_gateway = 7;
            // One transaction for two gateways.
            store
                .commit_group(
                    &[third, applied("gw-c", 9, 4, b"c9")],
                    &[],
                    NO_NOTICES,
                    None,
                )
                .unwrap();
            // A failed commit writes nothing.
            store.fail_next_commit();
            assert!(store
                .commit_group(&[applied("gw-a", 4, 1, b"s4")], &[], NO_NOTICES, None)
                .is_err());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.last_seq("gw-a").unwrap(), Some(3));
        assert_eq!(store.last_seq("gw-b").unwrap(), None);
        assert_eq!(
            store.detector_snapshot("gw-a").unwrap().as_deref(),
            Some(&b"s3"[..])
        );
        assert_eq!(store.samples_applied("gw-a").unwrap(), 5);
        assert_eq!(
            store.counters("gw-a").unwrap(),
            GatewayCounters {
                batches_applied: 2,
                samples_applied: 5,
                sequence_gaps: 1,
                batches_missing: 1,
                samples_dropped_by_gateway: 7,
            }
        );
        assert_eq!(store.last_seq("gw-c").unwrap(), Some(9));
        assert_eq!(store.samples_applied("gw-c").unwrap(), 4);
        assert_eq!(store.events().unwrap(), vec![]);
    }

    fn notice(n: u32) -> Notice {
        Notice {
            key: format!("e{n}:open"),
            body: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    #[test]
    fn a_full_outbox_drops_its_oldest_notices_and_keeps_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.redb");
        let limits = [
            OutboxLimit {
                webhook: "small".into(),
                max_queue: 2,
            },
            OutboxLimit {
                webhook: "big".into(),
                max_queue: 10,
            },
        ];
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.outbox_head("small").unwrap(), None);
            for n in 0..2 {
                assert_eq!(
                    store.enqueue(&notice(n), &limits).unwrap(),
                    Queued {
                        notices: 1,
                        dropped: vec![]
                    }
                );
            }
            assert_eq!(
                store.enqueue(&notice(2), &limits).unwrap(),
                Queued {
                    notices: 1,
                    dropped: vec![("small".into(), 1)]
                }
            );
            // The sender removes the head; a removal of a dropped one is a no-op.
            assert!(!store.outbox_remove("small", 0).unwrap());
            assert!(store.outbox_remove("small", 1).unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.outbox_head("small").unwrap(),
            Some(QueuedNotice {
                number: 2,
                notice: notice(2)
            })
        );
        assert_eq!(store.outbox_len("small").unwrap(), 1);
        assert_eq!(store.outbox_len("big").unwrap(), 3);
        assert_eq!(store.outbox_head("big").unwrap().unwrap().notice, notice(0));
        // Numbering goes on after the outbox emptied.
        assert!(store.outbox_remove("small", 2).unwrap());
        store.enqueue(&notice(3), &limits).unwrap();
        assert_eq!(store.outbox_head("small").unwrap().unwrap().number, 3);
    }

    #[test]
    fn a_store_is_locked_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.redb");
        let store = Store::open(&path).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::Open { .. })));
        drop(store);
        Store::open(&path).unwrap();
    }

    #[test]
    fn a_store_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert("format", 99).unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(&path).err().unwrap();
        assert!(matches!(err, StoreError::Format { found: 99, .. }), "{err}");
    }
}
