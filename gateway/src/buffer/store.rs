//! The on-disk batch buffer (redb). Every sample is written here before it
//! is sent, and every batch stays until the ingest acks it or the buffer's
//! limits drop it (counted).
//!
//! On-disk format 2, one redb file with four tables:
//!
//! ```text
//! batches:     u64 seq -> bytes   the batch exactly as sent on the wire
//!                                 (facwatch_proto::wire: version byte + postcard)
//! batch_index: u64 seq -> (u32 encoded_len, u32 samples, i64 oldest_sample_ms)
//!                                 one row per held batch, so depth in bytes
//!                                 and age need no decoding
//! pending:     u64 n   -> bytes   samples of the still-open batch, one chunk
//!                                 per commit group, each a wire `Batch` with
//!                                 seq 0 (its gateway names the gateway)
//! meta:        &str    -> u64     "format"           = 2 (this layout)
//!                                 "next_seq"         seq the next stored batch gets
//!                                 "acked_seq"        highest seq the ingest acked
//!                                 "samples_produced" samples ever committed
//!                                                    (pending ones included)
//!                                 "bytes"            sum of held batches' encoded_len
//!                                 "samples_dropped"  samples ever dropped by the limits
//!                                 "dropped_pending"  dropped samples no stored batch
//!                                                    carries yet
//!                                 "pending_samples"  samples in `pending`
//!                                 "synced"           1 once the numbering follows the
//!                                                    ingest's (see below)
//! ```
//!
//! A format-1 file (batches + meta) is migrated on open in one transaction:
//! the index is built by decoding its batches. A format newer than this
//! build is refused by name.
//!
//! Invariants:
//! - Held seqs are contiguous: batches leave only from the front (acks and
//!   drops of the oldest). Seqs increase by one per stored batch, across
//!   restarts, and are assigned inside the storing transaction.
//! - Deletion rule: a batch is deleted by an ack covering it (never by a
//!   broker PUBACK or a restart), or by the limits, which count every
//!   sample they drop in `samples_dropped` and in the `dropped_before` of a
//!   later batch, so the ingest records the loss:
//!   - `drop_oldest` (default): the oldest held batches are deleted until
//!     the new one fits in `max_bytes`, and their samples are added to the
//!     `dropped_before` of the first batch that survives them (rewritten in
//!     the same transaction; usually the batch being stored). The ingest
//!     sees a seq gap and `dropped_before > 0`.
//!   - `drop_newest`: a batch that does not fit is not stored and gets no
//!     seq; its samples wait in `dropped_pending` and the next stored batch
//!     carries them. The ingest sees no seq gap, only the count.
//!   - Age (both policies): every store first deletes the oldest held
//!     batches whose oldest sample is older than `now - max_age`, counted
//!     the same way; a batch that is itself too old is not stored.
//!   - The limit is on encoded batch bytes (`bytes`), not on the file:
//!     redb's pages and free space come on top. To keep the check cheap a
//!     drop reserves 9 bytes for the growth of the carrier's
//!     `dropped_before` varint.
//!   - A dropped batch may have been sent already. If the ingest applied
//!     it, the count it records over-states the loss by that batch's
//!     samples; otherwise it sees the gap.
//! - Sync: a buffer created fresh (or migrated without any ack) does not
//!   know which seqs the ingest already has; it is `synced = false` and the
//!   forwarder sends nothing until the ingest's retained ack arrives.
//!   [`Buffer::sync_with_ingest`] then renumbers the held batches to
//!   `ack_seq + 1 ..` if any held seq is `<= ack_seq` (re-encoding their
//!   `seq`; renumbering only ever moves seqs up), and sets `acked_seq`,
//!   `next_seq` and `synced` in one transaction. An ack beyond every stored
//!   batch does the same on a synced buffer.
//! - Commit groups: the batcher commits, once per commit interval, one
//!   transaction holding every batch closed since the last one and the new
//!   samples of the open batch (into `pending`). When the open batch closes
//!   it leaves `pending` and enters `batches` in the same transaction. On
//!   open, samples left in `pending` (a crash or power cut) are stored at
//!   once as one batch with their real sample times.
//! - Every write is one redb transaction, committed with fsync before the
//!   call returns. So a power cut loses only samples not yet committed:
//!   those taken in the last commit interval plus those still queued for
//!   the batcher.

// redb's own error is large; it only travels the cold error path inside
// this module, and leaves it boxed in `BufferError`.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use facwatch_proto::wire::{Batch, Sample, MAX_BATCH_BYTES};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
/// `seq -> (encoded_len, samples, oldest_sample_ms)`.
const INDEX: TableDefinition<u64, (u32, u32, i64)> = TableDefinition::new("batch_index");
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT: u64 = 2;
const KEY_FORMAT: &str = "format";
/// redb page cache of the buffer.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

const KEY_NEXT_SEQ: &str = "next_seq";
const KEY_ACKED_SEQ: &str = "acked_seq";
const KEY_SAMPLES: &str = "samples_produced";
const KEY_BYTES: &str = "bytes";
const KEY_SAMPLES_DROPPED: &str = "samples_dropped";
const KEY_DROPPED_PENDING: &str = "dropped_pending";
const KEY_PENDING_SAMPLES: &str = "pending_samples";
const KEY_SYNCED: &str = "synced";

/// Most bytes the `dropped_before` varint of a batch can grow by when a
/// drop is added to it (10-byte varint minus the 1-byte one).
const DROPPED_BEFORE_GROWTH_MAX: u64 = 9;

/// Default [`BufferLimits::max_bytes`]: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Smallest [`BufferLimits::max_bytes`] accepted by the config: 1 MiB, four
/// times the largest batch.
pub const MIN_MAX_BYTES: u64 = 1024 * 1024;
/// Default [`BufferLimits::max_age`]: 30 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a full buffer gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest held batches until the new one fits (default).
    DropOldest,
    /// Do not store the new batch.
    DropNewest,
}

/// Bounds on what the buffer holds; see the module docs for how drops are
/// counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Most encoded batch bytes held (redb's overhead comes on top).
    pub max_bytes: u64,
    /// Batches whose oldest sample is older than this (by the gateway's
    /// clock) are dropped; `None`: no age limit.
    pub max_age: Option<Duration>,
    pub when_full: WhenFull,
}

impl Default for BufferLimits {
    /// 1 GiB, 30 days, drop the oldest.
    fn default() -> BufferLimits {
        BufferLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_age: Some(DEFAULT_MAX_AGE),
            when_full: WhenFull::DropOldest,
        }
    }
}

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
    #[error("buffer {path}: cannot create its directory: {cause}")]
    Directory {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "buffer {path}: on-disk format {found} is not a format this build reads (1 or {FORMAT})"
    )]
    UnknownFormat { path: PathBuf, found: u64 },
    #[error("buffer {path}: corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("buffer {path}: batch of {len} bytes exceeds the limit of {MAX_BATCH_BYTES} bytes")]
    BatchTooLarge { path: PathBuf, len: usize },
    #[error("buffer {path}: cannot move it aside to {to}: {cause}")]
    MoveAside {
        path: PathBuf,
        to: PathBuf,
        cause: std::io::Error,
    },
}

impl BufferError {
    /// True when the file's content is unusable (corrupt, truncated, not a
    /// redb file, a format this build does not read). False for everything
    /// that says nothing about the content: the file in use by another
    /// process, a full disk, a failing device, a missing permission.
    /// Moving a sound buffer aside would leave its batches unsent.
    pub fn is_unusable_file(&self) -> bool {
        match self {
            BufferError::Storage { cause, .. } => match cause.as_ref() {
                redb::Error::Corrupted(_)
                | redb::Error::UpgradeRequired(_)
                | redb::Error::TableTypeMismatch { .. }
                | redb::Error::TableIsMultimap(_)
                | redb::Error::TableIsNotMultimap(_)
                | redb::Error::TypeDefinitionChanged { .. } => true,
                // What redb reports for a bad magic number or a short file.
                redb::Error::Io(e) => matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ),
                _ => false,
            },
            BufferError::UnknownFormat { .. } | BufferError::Corrupt { .. } => true,
            BufferError::Directory { .. }
            | BufferError::BatchTooLarge { .. }
            | BufferError::MoveAside { .. } => false,
        }
    }
}

/// The counters kept beside the batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferMeta {
    /// Seq the next stored batch gets.
    pub next_seq: u64,
    /// Highest seq the ingest has acked (0: none yet).
    pub acked_seq: u64,
    /// Samples committed over the buffer's lifetime, including those of
    /// the open batch (`pending`) and those later dropped: after a crash,
    /// exactly the samples that were durable.
    pub samples_produced: u64,
    /// Batches currently held (stored, not yet acked or dropped).
    pub batches: u64,
    /// Sum of the held batches' encoded lengths.
    pub bytes: u64,
    /// Samples dropped by the limits over the buffer's lifetime.
    pub samples_dropped: u64,
    /// Oldest sample time of the first held batch (batches are in time
    /// order, up to late samples); `None` when nothing is held.
    pub oldest_sample_ms: Option<i64>,
    /// Whether the numbering follows the ingest's (an ack was received).
    pub synced: bool,
}

/// What applying an ack or a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckApplied {
    /// True when the ack was taken as the ingest's position (a buffer not
    /// yet synced, or an ack beyond every stored batch): the held batches
    /// may have new seqs.
    pub synced_now: bool,
    /// Held batches given new seqs.
    pub renumbered: u64,
    /// Held batches the ack deleted (covered by it); 0 for a sync, which
    /// renumbers instead of deleting.
    pub released: u64,
    /// The buffer after the ack, read in the same transaction.
    pub meta: BufferMeta,
}

/// A buffer file that could not be used and was moved aside.
#[derive(Debug)]
pub struct MovedAside {
    pub from: PathBuf,
    pub to: PathBuf,
    /// Why it could not be used.
    pub cause: BufferError,
}

/// One commit group (see the module docs).
#[derive(Debug)]
pub(crate) struct CommitGroup<'a> {
    pub(crate) gateway: &'a str,
    /// Batches closed since the last commit, oldest first. The first one
    /// holds every sample now in `pending`.
    pub(crate) closed: Vec<Vec<Sample>>,
    /// Samples of the open batch that arrived since the last commit.
    pub(crate) open: &'a [Sample],
}

/// The batch buffer. Calls block on disk I/O: from async code, call them
/// through `spawn_blocking`.
pub struct Buffer {
    db: Database,
    path: PathBuf,
    limits: BufferLimits,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish()
    }
}

/// An error inside a transaction, before it is given the file's path.
enum Failure {
    Redb(redb::Error),
    TooLarge(usize),
    Corrupt(String),
}

macro_rules! failure_from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Failure {
                Failure::Redb(e.into())
            }
        }
    )*};
}
failure_from_redb!(
    redb::Error,
    redb::TableError,
    redb::StorageError,
    redb::TransactionError,
    redb::CommitError
);

/// One row of the batch index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexRow {
    encoded_len: u32,
    samples: u32,
    oldest_sample_ms: i64,
}

impl IndexRow {
    fn of(batch: &Batch, encoded_len: usize) -> IndexRow {
        IndexRow {
            encoded_len: encoded_len as u32,
            samples: batch.samples.len() as u32,
            oldest_sample_ms: oldest_sample_ms(batch),
        }
    }

    fn value(self) -> (u32, u32, i64) {
        (self.encoded_len, self.samples, self.oldest_sample_ms)
    }
}

/// `i64::MAX` for a batch without samples (it never ages out).
fn oldest_sample_ms(batch: &Batch) -> i64 {
    batch
        .samples
        .iter()
        .map(|s| s.time_ms)
        .min()
        .unwrap_or(i64::MAX)
}

/// The meta table's counters, loaded at the start of a write transaction
/// and stored at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    next_seq: u64,
    acked_seq: u64,
    samples_produced: u64,
    bytes: u64,
    samples_dropped: u64,
    dropped_pending: u64,
    pending_samples: u64,
    synced: bool,
}

impl Counters {
    fn fresh() -> Counters {
        Counters {
            next_seq: 1,
            acked_seq: 0,
            samples_produced: 0,
            bytes: 0,
            samples_dropped: 0,
            dropped_pending: 0,
            pending_samples: 0,
            synced: false,
        }
    }

    fn load(meta: &impl ReadableTable<&'static str, u64>) -> Result<Counters, Failure> {
        let get = |key: &str, default: u64| -> Result<u64, Failure> {
            Ok(meta.get(key)?.map_or(default, |v| v.value()))
        };
        Ok(Counters {
            next_seq: get(KEY_NEXT_SEQ, 1)?,
            acked_seq: get(KEY_ACKED_SEQ, 0)?,
            samples_produced: get(KEY_SAMPLES, 0)?,
            bytes: get(KEY_BYTES, 0)?,
            samples_dropped: get(KEY_SAMPLES_DROPPED, 0)?,
            dropped_pending: get(KEY_DROPPED_PENDING, 0)?,
            pending_samples: get(KEY_PENDING_SAMPLES, 0)?,
            synced: get(KEY_SYNCED, 0)? != 0,
        })
    }

    fn store(&self, meta: &mut redb::Table<'_, &'static str, u64>) -> Result<(), Failure> {
        meta.insert(KEY_FORMAT, FORMAT)?;
        meta.insert(KEY_NEXT_SEQ, self.next_seq)?;
        meta.insert(KEY_ACKED_SEQ, self.acked_seq)?;
        meta.insert(KEY_SAMPLES, self.samples_produced)?;
        meta.insert(KEY_BYTES, self.bytes)?;
        meta.insert(KEY_SAMPLES_DROPPED, self.samples_dropped)?;
        meta.insert(KEY_DROPPED_PENDING, self.dropped_pending)?;
        meta.insert(KEY_PENDING_SAMPLES, self.pending_samples)?;
        meta.insert(KEY_SYNCED, u64::from(self.synced))?;
        Ok(())
    }
}

/// The tables and counters of one write transaction.
struct Tables<'t> {
    batches: redb::Table<'t, u64, &'static [u8]>,
    index: redb::Table<'t, u64, (u32, u32, i64)>,
    pending: redb::Table<'t, u64, &'static [u8]>,
    counters: Counters,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t redb::WriteTransaction) -> Result<Tables<'t>, Failure> {
        let counters = Counters::load(&tx.open_table(META)?)?;
        Ok(Tables {
            batches: tx.open_table(BATCHES)?,
            index: tx.open_table(INDEX)?,
            pending: tx.open_table(PENDING)?,
            counters,
        })
    }

    /// Writes the counters back; the tables are written as they change.
    fn finish(self, tx: &redb::WriteTransaction) -> Result<(), Failure> {
        self.counters.store(&mut tx.open_table(META)?)
    }

    fn first_held(&self) -> Result<Option<(u64, IndexRow)>, Failure> {
        Ok(self.index.first()?.map(|(seq, row)| {
            let (encoded_len, samples, oldest_sample_ms) = row.value();
            (
                seq.value(),
                IndexRow {
                    encoded_len,
                    samples,
                    oldest_sample_ms,
                },
            )
        }))
    }

    fn insert_batch(&mut self, batch: &Batch, bytes: &[u8]) -> Result<(), Failure> {
        self.batches.insert(batch.seq, bytes)?;
        self.index
            .insert(batch.seq, IndexRow::of(batch, bytes.len()).value())?;
        self.counters.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Removes batch `seq` and its index row; returns the decoded batch.
    fn take_batch(&mut self, seq: u64) -> Result<Batch, Failure> {
        let bytes = match self.batches.remove(seq)? {
            Some(bytes) => bytes.value().to_vec(),
            None => {
                return Err(Failure::Corrupt(format!(
                    "batch {seq} is indexed but missing"
                )))
            }
        };
        if let Some(row) = self.index.remove(seq)? {
            self.counters.bytes = self.counters.bytes.saturating_sub(u64::from(row.value().0));
        }
        Batch::decode(&bytes).map_err(|e| Failure::Corrupt(format!("batch {seq}: {e}")))
    }

    /// Removes held batch `seq` (the limits dropped it). Returns the count
    /// its loss stands for: its own samples plus the `dropped_before` it
    /// carried for batches dropped earlier, which moves on to the next
    /// survivor (else the ingest would never learn of those).
    fn drop_held(&mut self, seq: u64, row: IndexRow) -> Result<u64, Failure> {
        let carried = self.take_batch(seq)?.dropped_before;
        self.counters.samples_dropped += u64::from(row.samples);
        Ok(u64::from(row.samples) + carried)
    }

    /// Adds `dropped` to the `dropped_before` of held batch `seq`.
    fn add_dropped_before(&mut self, seq: u64, dropped: u64) -> Result<(), Failure> {
        let mut batch = self.take_batch(seq)?;
        batch.dropped_before += dropped;
        self.insert_batch(&batch, &batch.encode())
    }

    /// Stores `batch` under the limits (module docs); returns its seq, or
    /// `None` when the limits dropped it. `now_ms` is `None` to skip the
    /// age limit. Checks the size before changing anything.
    fn store(
        &mut self,
        batch: &mut Batch,
        limits: &BufferLimits,
        now_ms: Option<i64>,
    ) -> Result<Option<u64>, Failure> {
        let own_dropped_before = batch.dropped_before;
        batch.seq = self.counters.next_seq;
        batch.dropped_before = own_dropped_before + self.counters.dropped_pending;
        let len = batch.encode().len();
        if len > MAX_BATCH_BYTES {
            batch.seq = 0;
            batch.dropped_before = own_dropped_before;
            return Err(Failure::TooLarge(len));
        }
        let len = len as u64;

        let cutoff = limits.max_age.zip(now_ms).map(|(age, now)| {
            now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
        });
        let mut dropped_now = 0;
        if let Some(cutoff) = cutoff {
            while let Some((seq, row)) = self.first_held()? {
                if row.oldest_sample_ms >= cutoff {
                    break;
                }
                dropped_now += self.drop_held(seq, row)?;
            }
        }
        let fits = |bytes: u64, dropped_now: u64| {
            let growth = if dropped_now > 0 {
                DROPPED_BEFORE_GROWTH_MAX
            } else {
                0
            };
            bytes + len + growth <= limits.max_bytes
        };
        let expired = cutoff.is_some_and(|cutoff| oldest_sample_ms(batch) < cutoff);
        let keep = !expired
            && match limits.when_full {
                WhenFull::DropOldest => {
                    while !fits(self.counters.bytes, dropped_now) {
                        let Some((seq, row)) = self.first_held()? else {
                            break;
                        };
                        dropped_now += self.drop_held(seq, row)?;
                    }
                    true
                }
                WhenFull::DropNewest => fits(self.counters.bytes, dropped_now),
            };

        // The first batch after the dropped ones carries their count.
        let survivor = self.first_held()?.map(|(seq, _)| seq);
        if dropped_now > 0 {
            match survivor {
                Some(seq) => self.add_dropped_before(seq, dropped_now)?,
                None if keep => batch.dropped_before += dropped_now,
                None => self.counters.dropped_pending += dropped_now,
            }
        }
        if !keep {
            batch.seq = 0;
            batch.dropped_before = own_dropped_before;
            let samples = batch.samples.len() as u64;
            self.counters.samples_dropped += samples;
            self.counters.dropped_pending += samples;
            return Ok(None);
        }
        self.counters.dropped_pending = 0;
        self.insert_batch(batch, &batch.encode())?;
        self.counters.next_seq += 1;
        Ok(Some(batch.seq))
    }

    /// Takes `ack_seq` as the ingest's position (module docs, "Sync").
    /// Returns the number of batches renumbered.
    fn sync(&mut self, ack_seq: u64) -> Result<u64, Failure> {
        let mut held = Vec::with_capacity(self.index.len()? as usize);
        for entry in self.index.iter()? {
            held.push(entry?.0.value());
        }
        let mut last_held = held.last().copied();
        let renumber = held.first().is_some_and(|&first| first <= ack_seq);
        if renumber {
            let shift = ack_seq + 1 - held[0];
            // From the newest down: every new seq is above every seq not
            // yet moved, so nothing is overwritten.
            for &seq in held.iter().rev() {
                let mut batch = self.take_batch(seq)?;
                batch.seq = seq + shift;
                self.insert_batch(&batch, &batch.encode())?;
            }
            last_held = last_held.map(|seq| seq + shift);
        }
        let counters = &mut self.counters;
        counters.acked_seq = ack_seq;
        counters.next_seq = last_held.unwrap_or(0).max(ack_seq) + 1;
        counters.synced = true;
        Ok(if renumber { held.len() as u64 } else { 0 })
    }

    /// Moves the samples of `pending` into one stored batch (more if one
    /// would be too large). Returns the seqs stored.
    fn store_pending(
        &mut self,
        limits: &BufferLimits,
        now_ms: Option<i64>,
    ) -> Result<Vec<u64>, Failure> {
        let mut chunks = Vec::new();
        for entry in self.pending.iter()? {
            let (n, bytes) = entry?;
            let chunk = Batch::decode(bytes.value())
                .map_err(|e| Failure::Corrupt(format!("pending chunk {}: {e}", n.value())))?;
            chunks.push(chunk);
        }
        self.pending.retain(|_, _| false)?;
        self.counters.pending_samples = 0;
        let Some(first) = chunks.first() else {
            return Ok(Vec::new());
        };
        let mut whole = Batch {
            gateway: first.gateway.clone(),
            seq: 0,
            dropped_before: 0,
            samples: chunks.iter().flat_map(|c| c.samples.clone()).collect(),
        };
        whole.samples.sort_by_key(|s| s.time_ms);
        let mut stored = Vec::new();
        match self.store(&mut whole, limits, now_ms) {
            Ok(seq) => stored.extend(seq),
            Err(Failure::TooLarge(_)) => {
                for mut chunk in chunks {
                    chunk.samples.sort_by_key(|s| s.time_ms);
                    stored.extend(self.store(&mut chunk, limits, now_ms)?);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(stored)
    }

    fn meta(&self) -> Result<BufferMeta, Failure> {
        let c = &self.counters;
        Ok(BufferMeta {
            next_seq: c.next_seq,
            acked_seq: c.acked_seq,
            samples_produced: c.samples_produced,
            batches: self.index.len()?,
            bytes: c.bytes,
            samples_dropped: c.samples_dropped,
            oldest_sample_ms: self
                .first_held()?
                .map(|(_, row)| row.oldest_sample_ms)
                .filter(|&t| t != i64::MAX),
            synced: c.synced,
        })
    }
}

impl Buffer {
    /// Opens the buffer at `path` with `limits`, creating it and its
    /// directory if missing, migrating a format-1 file, and storing samples
    /// left pending by a crash as one batch (byte limit applied, not the
    /// age limit). A file another process has open is an error.
    ///
    /// To read a buffer after its process died (e.g. how many samples were
    /// durable): `Buffer::open(path, BufferLimits::default())?.meta()?`.
    ///
    /// redb asserts rather than errs on some damaged files (a truncated
    /// one): a panic while opening is caught and reported as
    /// [`BufferError::Corrupt`] (the panic message also reaches stderr).
    pub fn open(path: &Path, limits: BufferLimits) -> Result<Buffer, BufferError> {
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Buffer::open_unguarded(path, limits)
        }));
        opened.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(BufferError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("the storage engine failed on this file: {message}"),
            })
        })
    }

    fn open_unguarded(path: &Path, limits: BufferLimits) -> Result<Buffer, BufferError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| BufferError::Directory {
                path: path.to_path_buf(),
                cause,
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
            limits,
        };
        let (found, pending_samples) = buffer.read(|tx| match tx.open_table(META) {
            Ok(meta) => Ok((
                meta.get(KEY_FORMAT)?.map(|v| v.value()),
                meta.get(KEY_PENDING_SAMPLES)?.map_or(0, |v| v.value()),
            )),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok((None, 0)),
            Err(e) => Err(e.into()),
        })?;
        match found {
            Some(FORMAT) => {}
            Some(1) => buffer.migrate_from_format_1()?,
            Some(found) => {
                return Err(BufferError::UnknownFormat {
                    path: path.to_path_buf(),
                    found,
                })
            }
            None => buffer.write(|tx| {
                Tables::open(tx)?;
                Counters::fresh().store(&mut tx.open_table(META)?)
            })?,
        }
        if pending_samples > 0 {
            buffer.write(|tx| {
                let mut tables = Tables::open(tx)?;
                tables.store_pending(&limits, None)?;
                tables.finish(tx)
            })?;
        }
        Ok(buffer)
    }

    /// [`Buffer::open`], but a file that is unusable
    /// ([`BufferError::is_unusable_file`]) is renamed to
    /// `<file>.corrupt-<UTC yyyymmddThhmmssZ>` (never deleted) and a fresh
    /// buffer is started in its place. The caller logs the move.
    pub fn open_or_move_aside(
        path: &Path,
        limits: BufferLimits,
    ) -> Result<(Buffer, Option<MovedAside>), BufferError> {
        let cause = match Buffer::open(path, limits) {
            Ok(buffer) => return Ok((buffer, None)),
            Err(e) if e.is_unusable_file() => e,
            Err(e) => return Err(e),
        };
        let to = aside_path(path, chrono::Utc::now());
        std::fs::rename(path, &to).map_err(|e| BufferError::MoveAside {
            path: path.to_path_buf(),
            to: to.clone(),
            cause: e,
        })?;
        let buffer = Buffer::open(path, limits)?;
        Ok((
            buffer,
            Some(MovedAside {
                from: path.to_path_buf(),
                to,
                cause,
            }),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limits(&self) -> BufferLimits {
        self.limits
    }

    /// Stores `batch` in one committed transaction under the limits, with
    /// the age limit measured at `now_ms` (the gateway's clock). Sets its
    /// `seq` and `dropped_before` to what was stored (seq 0 if nothing was)
    /// and counts its samples as produced. Returns its seq, or `None` when
    /// the limits dropped it (counted; see the module docs).
    pub fn append(&self, batch: &mut Batch, now_ms: i64) -> Result<Option<u64>, BufferError> {
        let limits = self.limits;
        self.write(|tx| {
            let mut tables = Tables::open(tx)?;
            let seq = tables.store(batch, &limits, Some(now_ms))?;
            tables.counters.samples_produced += batch.samples.len() as u64;
            tables.finish(tx)?;
            Ok(seq)
        })
    }

    /// Commits one group (module docs, "Commit groups") in one
    /// transaction. Returns the seqs stored and the buffer after it.
    pub(crate) fn commit_group(
        &self,
        group: CommitGroup<'_>,
        now_ms: i64,
    ) -> Result<(Vec<u64>, BufferMeta), BufferError> {
        let limits = self.limits;
        self.write(|tx| {
            let mut tables = Tables::open(tx)?;
            let mut arrived = group.open.len() as u64;
            if !group.closed.is_empty() {
                // The pending samples are the first closed batch's.
                tables.pending.retain(|_, _| false)?;
                let closed: u64 = group.closed.iter().map(|s| s.len() as u64).sum();
                arrived += closed.saturating_sub(tables.counters.pending_samples);
                tables.counters.pending_samples = 0;
            }
            let mut stored = Vec::new();
            for samples in group.closed {
                let mut batch = Batch {
                    gateway: group.gateway.to_string(),
                    seq: 0,
                    dropped_before: 0,
                    samples,
                };
                stored.extend(tables.store(&mut batch, &limits, Some(now_ms))?);
            }
            if !group.open.is_empty() {
                let chunk = Batch {
                    gateway: group.gateway.to_string(),
                    seq: 0,
                    dropped_before: 0,
                    samples: group.open.to_vec(),
                }
                .encode();
                let n = tables.pending.last()?.map_or(1, |(n, _)| n.value() + 1);
                tables.pending.insert(n, chunk.as_slice())?;
                tables.counters.pending_samples += group.open.len() as u64;
            }
            tables.counters.samples_produced += arrived;
            let meta = tables.meta()?;
            tables.finish(tx)?;
            Ok((stored, meta))
        })
    }

    /// Up to `limit` held batches with seq `>= seq`, in seq order, as their
    /// wire bytes.
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

    /// Applies an ack from the ingest in one committed transaction. On a
    /// synced buffer an ack at or below the recorded one changes nothing,
    /// and one within the stored batches deletes every batch `<= seq` and
    /// records `acked_seq`. An ack to a buffer not yet synced, or beyond
    /// every stored batch, is a [`Buffer::sync_with_ingest`].
    pub fn ack(&self, seq: u64) -> Result<AckApplied, BufferError> {
        self.write(|tx| {
            let mut tables = Tables::open(tx)?;
            let c = tables.counters;
            let mut applied = AckApplied {
                synced_now: false,
                renumbered: 0,
                released: 0,
                meta: tables.meta()?,
            };
            if !c.synced || seq >= c.next_seq {
                applied.synced_now = true;
                applied.renumbered = tables.sync(seq)?;
            } else if seq > c.acked_seq {
                // Only the acked rows are visited and deleted; pages
                // holding other batches are not rewritten.
                let mut released_bytes = 0;
                tables.index.retain_in(..=seq, |_, (encoded_len, _, _)| {
                    released_bytes += u64::from(encoded_len);
                    applied.released += 1;
                    false
                })?;
                tables.batches.retain_in(..=seq, |_, _| false)?;
                tables.counters.acked_seq = seq;
                tables.counters.bytes = tables.counters.bytes.saturating_sub(released_bytes);
            } else {
                return Ok(applied);
            }
            applied.meta = tables.meta()?;
            tables.finish(tx)?;
            Ok(applied)
        })
    }

    /// Takes `ack_seq` as the ingest's last applied seq, in one committed
    /// transaction: if any held seq is `<= ack_seq`, renumbers the held
    /// batches to `ack_seq + 1 ..` (re-encoding their `seq`); sets
    /// `acked_seq = ack_seq`, `next_seq` after the last held batch (or
    /// after `ack_seq`), and `synced`. Sending then starts at `ack_seq + 1`.
    pub fn sync_with_ingest(&self, ack_seq: u64) -> Result<AckApplied, BufferError> {
        self.write(|tx| {
            let mut tables = Tables::open(tx)?;
            let renumbered = tables.sync(ack_seq)?;
            let meta = tables.meta()?;
            tables.finish(tx)?;
            Ok(AckApplied {
                synced_now: true,
                renumbered,
                released: 0,
                meta,
            })
        })
    }

    pub fn meta(&self) -> Result<BufferMeta, BufferError> {
        self.read(|tx| {
            let counters = Counters::load(&tx.open_table(META)?)?;
            let index = tx.open_table(INDEX)?;
            let first = index.first()?.map(|(_, row)| row.value().2);
            Ok(BufferMeta {
                next_seq: counters.next_seq,
                acked_seq: counters.acked_seq,
                samples_produced: counters.samples_produced,
                batches: index.len()?,
                bytes: counters.bytes,
                samples_dropped: counters.samples_dropped,
                oldest_sample_ms: first.filter(|&t| t != i64::MAX),
                synced: counters.synced,
            })
        })
    }

    /// Format 1 -> 2 in one transaction: index every batch by decoding it.
    /// A buffer that was never acked is not synced (its seqs may be below
    /// the ingest's).
    fn migrate_from_format_1(&self) -> Result<(), BufferError> {
        self.write(|tx| {
            let mut tables = Tables::open(tx)?;
            let mut rows = Vec::new();
            for entry in tables.batches.iter()? {
                let (seq, bytes) = entry?;
                let (seq, bytes) = (seq.value(), bytes.value());
                let batch = Batch::decode(bytes)
                    .map_err(|e| Failure::Corrupt(format!("format-1 batch {seq}: {e}")))?;
                rows.push((seq, IndexRow::of(&batch, bytes.len())));
            }
            let mut bytes = 0;
            for (seq, row) in rows {
                tables.index.insert(seq, row.value())?;
                bytes += u64::from(row.encoded_len);
            }
            let c = &mut tables.counters;
            c.bytes = bytes;
            c.synced = c.acked_seq > 0;
            tables.finish(tx)
        })
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<T, Failure>,
    ) -> Result<T, BufferError> {
        let run = || -> Result<T, Failure> {
            let tx = self.db.begin_write()?;
            let value = body(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        run().map_err(|failure| self.error(failure))
    }

    fn read<T>(
        &self,
        body: impl FnOnce(&redb::ReadTransaction) -> Result<T, Failure>,
    ) -> Result<T, BufferError> {
        let run = || -> Result<T, Failure> {
            let tx = self.db.begin_read()?;
            body(&tx)
        };
        run().map_err(|failure| self.error(failure))
    }

    fn error(&self, failure: Failure) -> BufferError {
        let path = self.path.clone();
        match failure {
            Failure::Redb(cause) => BufferError::Storage {
                path,
                cause: Box::new(cause),
            },
            Failure::TooLarge(len) => BufferError::BatchTooLarge { path, len },
            Failure::Corrupt(detail) => BufferError::Corrupt { path, detail },
        }
    }
}

/// `<path>.corrupt-<UTC yyyymmddThhmmssZ>`, with `-2`, `-3`, ... appended
/// if that name is taken.
fn aside_path(path: &Path, now: chrono::DateTime<chrono::Utc>) -> PathBuf {
    let base = format!(
        "{}.corrupt-{}",
        path.display(),
        now.format("%Y%m%dT%H%M%SZ")
    );
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        n += 1;
        candidate = PathBuf::from(format!("{base}-{n}"));
    }
    candidate
}

#[cfg(test)]
mod tests;
