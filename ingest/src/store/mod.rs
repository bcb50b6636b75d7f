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

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::detect::{Event, EventStatus, SnapshotError};

/// Version of the table layout above; a store of another format is refused.
pub const STORE_FORMAT: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("last_seq");
const DETECTOR: TableDefinition<&str, &[u8]> = TableDefinition::new("detector");
const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
const COUNTERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counters");

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
}

/// An event whose stored version changed with a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventChange {
    pub(crate) event: Event,
    /// Not stored before this batch.
    pub(crate) opened: bool,
    /// Closed by this batch (it was open, or new and already closed).
    pub(crate) closed: bool,
}

pub struct Store {
    db: Database,
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
        }
        tx.commit().map_err(|e| open_error(e.into()))?;
        Ok(Store {
            db,
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
    /// counters, and `events` in the order they were produced. Returns the
    /// events whose stored version changed, in that order. On an error
    /// nothing is written.
    pub(crate) fn commit_group(
        &self,
        gateways: &[GatewayCommit<'_>],
        events: &[Event],
    ) -> Result<Vec<EventChange>, StoreError> {
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
        let mut changes = Vec::new();
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
            for event in events {
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
                changes.push(EventChange {
                    event: event.clone(),
                    opened: previous.is_none(),
                    closed: event.status == EventStatus::Closed && was_closed != Some(true),
                });
            }
        }
        tx.commit().map_err(db)?;
        Ok(changes)
    }

    /// Makes the next [`Store::commit_group`] fail without writing.
    #[cfg(test)]
    pub(crate) fn fail_next_commit(&self) {
        self.fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
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
        }
    }

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
                    .commit_group(&[applied("gw-a", 1, 3, b"s1")], &[])
                    .unwrap(),
                vec![]
            );
            let mut third = applied("gw-a", 3, 2, b"s3");
            third.counters.sequence_gaps = 1;
            third.counters.batches_missing = 1;
            third.counters.samples_dropped_by_gateway = 7;
            // One transaction for two gateways.
            store
                .commit_group(&[third, applied("gw-c", 9, 4, b"c9")], &[])
                .unwrap();
            // A failed commit writes nothing.
            store.fail_next_commit();
            assert!(store
                .commit_group(&[applied("gw-a", 4, 1, b"s4")], &[])
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
