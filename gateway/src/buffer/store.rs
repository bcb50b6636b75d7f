//! The on-disk batch buffer (redb). Every batch is written here before it is
//! sent, and stays until the ingest acks it.
//!
//! On-disk format, one redb file with two tables:
//!
//! ```text
//! batches: u64 seq -> bytes   the batch exactly as sent on the wire
//!                             (facwatch_proto::wire: version byte + postcard)
//! meta:    &str     -> u64    "format"           = 1 (this layout)
//!                             "next_seq"         seq the next append gets
//!                             "acked_seq"        highest seq the ingest acked
//!                             "samples_produced" samples ever appended
//! ```
//!
//! Invariants:
//! - Seqs start at 1 and increase by one per append, across restarts; a
//!   batch keeps its seq until deleted (never renumbered). The seq is
//!   assigned inside the append's write transaction.
//! - Deletion rule: batches are deleted only by [`Buffer::ack`], which
//!   removes every batch `<= seq` and records `acked_seq` in the same
//!   transaction. Nothing else (a broker PUBACK, a restart) deletes.
//! - Every write is one redb transaction, committed with fsync before the
//!   call returns; a power cut loses nothing that was acknowledged to the
//!   caller.

// redb's own error is large; it only travels the cold error path inside
// this module, and leaves it boxed in `BufferError`.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use facwatch_proto::wire::{Batch, MAX_BATCH_BYTES};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT: u64 = 1;
const KEY_FORMAT: &str = "format";
/// redb page cache of the buffer.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

const KEY_NEXT_SEQ: &str = "next_seq";
const KEY_ACKED_SEQ: &str = "acked_seq";
const KEY_SAMPLES: &str = "samples_produced";

/// Why the buffer could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    // The cause is part of the message, so it is not also a `source`
    // (which would print it twice in an error chain).
    #[error("buffer {path}: {cause}")]
    Storage {
        path: PathBuf,
        cause: Box<redb::Error>,
    },
    #[error("buffer {path}: on-disk format {found} is not the format {FORMAT} this build reads")]
    UnknownFormat { path: PathBuf, found: u64 },
    #[error("buffer {path}: batch of {len} bytes exceeds the limit of {MAX_BATCH_BYTES} bytes")]
    BatchTooLarge { path: PathBuf, len: usize },
}

/// The counters kept beside the batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferMeta {
    /// Seq the next appended batch gets.
    pub next_seq: u64,
    /// Highest seq the ingest has acked (0: none yet).
    pub acked_seq: u64,
    /// Samples appended over the buffer's lifetime.
    pub samples_produced: u64,
    /// Batches currently held (appended, not yet acked).
    pub batches: u64,
}

/// The batch buffer. Calls block on disk I/O: from async code, call them
/// through `spawn_blocking`.
pub struct Buffer {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("path", &self.path).finish()
    }
}

impl Buffer {
    /// Opens the buffer at `path`, creating it and its directory if
    /// missing. A file another process has open is an error.
    pub fn open(path: &Path) -> Result<Buffer, BufferError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BufferError::Storage {
                path: path.to_path_buf(),
                cause: Box::new(redb::Error::Io(e)),
            })?;
        }
        // redb's default page cache is 1 GiB and keeps every written page:
        // during a long outage the buffer would grow the process by
        // hundreds of MB. A box on a factory floor gets a small cache.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| BufferError::Storage {
                path: path.to_path_buf(),
                cause: Box::new(e.into()),
            })?;
        let buffer = Buffer {
            db,
            path: path.to_path_buf(),
        };
        // An initialized file is only read: no commit, no fsync.
        let found = buffer.read(|tx| match tx.open_table(META) {
            Ok(meta) => get(&meta, KEY_FORMAT),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        })?;
        match found {
            Some(FORMAT) => Ok(buffer),
            Some(found) => Err(BufferError::UnknownFormat {
                path: path.to_path_buf(),
                found,
            }),
            None => {
                buffer.write(|tx| {
                    tx.open_table(BATCHES)?;
                    let mut meta = tx.open_table(META)?;
                    meta.insert(KEY_FORMAT, FORMAT)?;
                    meta.insert(KEY_NEXT_SEQ, 1)?;
                    meta.insert(KEY_ACKED_SEQ, 0)?;
                    meta.insert(KEY_SAMPLES, 0)?;
                    Ok(())
                })?;
                Ok(buffer)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `batch`, setting its `seq` to the next one, in one committed
    /// transaction. Returns the seq and the number of batches now held.
    pub fn append(&self, batch: &mut Batch) -> Result<(u64, u64), BufferError> {
        let mut too_large = None;
        let result = self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let seq = get(&meta, KEY_NEXT_SEQ)?.unwrap_or(1);
            batch.seq = seq;
            let bytes = batch.encode();
            if bytes.len() > MAX_BATCH_BYTES {
                too_large = Some(bytes.len());
                return Ok(None);
            }
            let mut batches = tx.open_table(BATCHES)?;
            batches.insert(seq, bytes.as_slice())?;
            let samples = get(&meta, KEY_SAMPLES)?.unwrap_or(0);
            meta.insert(KEY_NEXT_SEQ, seq + 1)?;
            meta.insert(KEY_SAMPLES, samples + batch.samples.len() as u64)?;
            Ok(Some((seq, batches.len()?)))
        })?;
        match (result, too_large) {
            (Some(done), _) => Ok(done),
            (None, len) => Err(BufferError::BatchTooLarge {
                path: self.path.clone(),
                len: len.unwrap_or(0),
            }),
        }
    }

    /// Up to `limit` batches with seq `>= seq`, in seq order, as their wire
    /// bytes.
    pub fn range_from(&self, seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, BufferError> {
        self.read(|tx| {
            let batches = tx.open_table(BATCHES)?;
            let mut out = Vec::new();
            for entry in batches.range(seq..)?.take(limit) {
                let (key, value) = entry?;
                out.push((key.value(), value.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Records that the ingest holds every batch `<= seq`: deletes them and
    /// stores `acked_seq`, in one committed transaction. An ack at or below
    /// the recorded one changes nothing. An ack beyond every appended batch
    /// (the ingest knows this gateway from an earlier buffer) also moves
    /// `next_seq` past it, so new batches are not ignored as duplicates.
    /// Returns the number of batches still held.
    pub fn ack(&self, seq: u64) -> Result<u64, BufferError> {
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let mut batches = tx.open_table(BATCHES)?;
            if seq <= get(&meta, KEY_ACKED_SEQ)?.unwrap_or(0) {
                return Ok(batches.len()?);
            }
            batches.retain_in(..=seq, |_, _| false)?;
            meta.insert(KEY_ACKED_SEQ, seq)?;
            if get(&meta, KEY_NEXT_SEQ)?.unwrap_or(1) <= seq {
                meta.insert(KEY_NEXT_SEQ, seq + 1)?;
            }
            Ok(batches.len()?)
        })
    }

    pub fn meta(&self) -> Result<BufferMeta, BufferError> {
        self.read(|tx| {
            let meta = tx.open_table(META)?;
            let batches = tx.open_table(BATCHES)?;
            Ok(BufferMeta {
                next_seq: get(&meta, KEY_NEXT_SEQ)?.unwrap_or(1),
                acked_seq: get(&meta, KEY_ACKED_SEQ)?.unwrap_or(0),
                samples_produced: get(&meta, KEY_SAMPLES)?.unwrap_or(0),
                batches: batches.len()?,
            })
        })
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, BufferError> {
        let run = || -> Result<T, redb::Error> {
            let tx = self.db.begin_write()?;
            let value = body(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        run().map_err(|source| self.storage(source))
    }

    fn read<T>(
        &self,
        body: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, BufferError> {
        let run = || -> Result<T, redb::Error> {
            let tx = self.db.begin_read()?;
            body(&tx)
        };
        run().map_err(|source| self.storage(source))
    }

    fn storage(&self, source: redb::Error) -> BufferError {
        BufferError::Storage {
            path: self.path.clone(),
            cause: Box::new(source),
        }
    }
}

fn get(
    table: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<Option<u64>, redb::Error> {
    Ok(table.get(key)?.map(|v| v.value()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use facwatch_proto::wire::{Quality, Sample, Values};

    fn batch(samples: usize) -> Batch {
        Batch {
            gateway: "gw".into(),
            seq: 0,
            dropped_before: 0,
            samples: (0..samples)
                .map(|i| Sample {
                    meter: "m".into(),
                    time_ms: i as i64,
                    quality: Quality::Timeout,
                    values: Values::default(),
                })
                .collect(),
        }
    }

    fn seqs(buffer: &Buffer) -> Vec<u64> {
        buffer
            .range_from(0, 100)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    #[test]
    fn append_assigns_consecutive_seqs_from_one_and_stores_wire_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&dir.path().join("b.redb")).unwrap();
        let mut first = batch(2);
        assert_eq!(buffer.append(&mut first).unwrap(), (1, 1));
        assert_eq!(first.seq, 1);
        assert_eq!(buffer.append(&mut batch(3)).unwrap(), (2, 2));
        let stored = buffer.range_from(1, 1).unwrap();
        assert_eq!(stored, vec![(1, first.encode())]);
        assert_eq!(Batch::decode(&stored[0].1).unwrap(), first);
        assert_eq!(
            buffer.meta().unwrap(),
            BufferMeta {
                next_seq: 3,
                acked_seq: 0,
                samples_produced: 5,
                batches: 2
            }
        );
    }

    #[test]
    fn reopened_buffer_keeps_batches_and_continues_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.redb");
        {
            let buffer = Buffer::open(&path).unwrap();
            buffer.append(&mut batch(1)).unwrap();
            buffer.append(&mut batch(1)).unwrap();
            buffer.ack(1).unwrap();
        }
        let buffer = Buffer::open(&path).unwrap();
        assert_eq!(seqs(&buffer), vec![2]);
        assert_eq!(buffer.append(&mut batch(1)).unwrap(), (3, 2));
        let meta = buffer.meta().unwrap();
        assert_eq!((meta.acked_seq, meta.samples_produced), (1, 3));
    }

    #[test]
    fn ack_deletes_every_batch_up_to_seq_and_seqs_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&dir.path().join("b.redb")).unwrap();
        for _ in 0..5 {
            buffer.append(&mut batch(1)).unwrap();
        }
        assert_eq!(buffer.ack(3).unwrap(), 2);
        assert_eq!(seqs(&buffer), vec![4, 5]);
        // A stale ack changes nothing.
        assert_eq!(buffer.ack(2).unwrap(), 2);
        assert_eq!(buffer.meta().unwrap().acked_seq, 3);
        assert_eq!(buffer.ack(5).unwrap(), 0);
        assert!(seqs(&buffer).is_empty());
        assert_eq!(buffer.append(&mut batch(1)).unwrap(), (6, 1));
        assert_eq!(buffer.range_from(0, 10).unwrap()[0].0, 6);
    }

    #[test]
    fn range_from_respects_start_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&dir.path().join("b.redb")).unwrap();
        for _ in 0..5 {
            buffer.append(&mut batch(1)).unwrap();
        }
        let got: Vec<u64> = buffer
            .range_from(2, 2)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(got, vec![2, 3]);
        assert!(buffer.range_from(6, 10).unwrap().is_empty());
    }

    #[test]
    fn ack_beyond_every_appended_batch_moves_numbering_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&dir.path().join("b.redb")).unwrap();
        buffer.append(&mut batch(1)).unwrap();
        assert_eq!(buffer.ack(500).unwrap(), 0);
        assert_eq!(buffer.append(&mut batch(1)).unwrap(), (501, 1));
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.redb");
        let _first = Buffer::open(&path).unwrap();
        let err = Buffer::open(&path).unwrap_err();
        assert!(err.to_string().contains("b.redb"), "{err}");
    }

    #[test]
    fn unknown_on_disk_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.redb");
        {
            let buffer = Buffer::open(&path).unwrap();
            buffer
                .write(|tx| {
                    tx.open_table(META)?.insert(KEY_FORMAT, 2)?;
                    Ok(())
                })
                .unwrap();
        }
        let err = Buffer::open(&path).unwrap_err();
        assert!(
            matches!(err, BufferError::UnknownFormat { found: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn oversized_batch_is_refused_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(&dir.path().join("b.redb")).unwrap();
        let mut huge = batch(0);
        huge.gateway = "g".repeat(MAX_BATCH_BYTES);
        assert!(matches!(
            buffer.append(&mut huge),
            Err(BufferError::BatchTooLarge { .. })
        ));
        assert_eq!(buffer.meta().unwrap().next_seq, 1);
    }
}
