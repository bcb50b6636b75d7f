//! The InfluxDB outbox: line protocol waiting for the writer.
//!
//! Table `influx_outbox`: key n (u64, from 0, contiguous from the head),
//! value (kind, line count, data): kind is 4 x content (0 line protocol,
//! 1 encoded batches, see `emit::influx::Content`) + precision (0 s,
//! 1 ms, 2 us, 3 ns); bytes and lines count what is stored (a batch's
//! lines are its samples). Entries are appended by
//! `Store::commit_group` in the transaction that applies their batches,
//! and removed only from the head, after the server took them (or refused
//! them for good). `meta["influx_outbox_bytes"]` and
//! `meta["influx_outbox_lines"]` are the sums of the texts' lengths and
//! line counts, updated in the same transactions; [`Store`] mirrors it in an
//! atomic (each commit adds what it appended, each removal subtracts what
//! it took, after committing), read without a transaction by the apply
//! task before each group.

use std::sync::atomic::Ordering;

use redb::{ReadableTable, TableDefinition};

use super::{db, Store, StoreError, META};
use crate::config::Precision;
use crate::emit::influx::{Content, Pending};

pub(super) const INFLUX_OUTBOX: TableDefinition<u64, (u8, u32, &[u8])> =
    TableDefinition::new("influx_outbox");
pub(super) const OUTBOX_BYTES: &str = "influx_outbox_bytes";
pub(super) const OUTBOX_LINES: &str = "influx_outbox_lines";

fn kind(content: Content, precision: Precision) -> u8 {
    let content = match content {
        Content::Lines => 0,
        Content::Batches => 1,
    };
    let precision = match precision {
        Precision::Seconds => 0,
        Precision::Milliseconds => 1,
        Precision::Microseconds => 2,
        Precision::Nanoseconds => 3,
    };
    content * 4 + precision
}

fn kind_of(code: u8) -> Option<(Content, Precision)> {
    let content = match code / 4 {
        0 => Content::Lines,
        1 => Content::Batches,
        _ => return None,
    };
    let precision = match code % 4 {
        0 => Precision::Seconds,
        1 => Precision::Milliseconds,
        2 => Precision::Microseconds,
        _ => Precision::Nanoseconds,
    };
    Some((content, precision))
}

/// One write request's worth of the outbox's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfluxHead {
    /// The last entry it holds (the first is the head).
    pub(crate) last: u64,
    pub(crate) precision: Precision,
    pub(crate) lines: u64,
    /// The entries' contents, in order.
    pub(crate) entries: Vec<(Content, Vec<u8>)>,
}

/// What the outbox holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InfluxOutboxDepth {
    pub lines: u64,
    pub bytes: u64,
}

/// Adds `lines` and `bytes` (negative to take away) to the stored sums.
fn add_to_sums(tx: &redb::WriteTransaction, lines: i64, bytes: i64) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(db)?;
    for (key, delta) in [(OUTBOX_LINES, lines), (OUTBOX_BYTES, bytes)] {
        let before = meta.get(key).map_err(db)?.map_or(0, |v| v.value());
        meta.insert(key, before.saturating_add_signed(delta))
            .map_err(db)?;
    }
    Ok(())
}

/// Appends `pending` (of `precision`) to the outbox inside `tx`; returns
/// the bytes added.
pub(super) fn append(
    tx: &redb::WriteTransaction,
    pending: &Pending,
    precision: Precision,
) -> Result<u64, StoreError> {
    let entries: Vec<_> = pending.entries.iter().filter(|e| e.lines > 0).collect();
    if entries.is_empty() {
        return Ok(0);
    }
    let mut table = tx.open_table(INFLUX_OUTBOX).map_err(db)?;
    let next = table
        .last()
        .map_err(db)?
        .map_or(0, |(key, _)| key.value() + 1);
    let (mut lines, mut added) = (0u64, 0u64);
    for (key, entry) in (next..).zip(entries) {
        let kind = kind(entry.content, precision);
        table
            .insert(key, (kind, entry.lines, entry.data.as_slice()))
            .map_err(db)?;
        lines += u64::from(entry.lines);
        added += entry.data.len() as u64;
    }
    add_to_sums(tx, lines as i64, added as i64)?;
    Ok(added)
}

/// The outbox's byte count as stored (at open).
pub(super) fn stored_bytes(tx: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let meta = tx.open_table(META).map_err(db)?;
    let bytes = meta.get(OUTBOX_BYTES).map_err(db)?.map_or(0, |v| v.value());
    Ok(bytes)
}

impl Store {
    /// Bytes in the outbox (committed state).
    pub fn influx_outbox_bytes(&self) -> u64 {
        self.influx_bytes.load(Ordering::Acquire).max(0) as u64
    }

    /// Lines and bytes in the outbox (committed state).
    pub fn influx_outbox_depth(&self) -> Result<InfluxOutboxDepth, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        let get = |key: &str| -> Result<u64, StoreError> {
            Ok(meta.get(key).map_err(db)?.map_or(0, |v| v.value()))
        };
        Ok(InfluxOutboxDepth {
            lines: get(OUTBOX_LINES)?,
            bytes: get(OUTBOX_BYTES)?,
        })
    }

    /// The head of the outbox as one request: entries of the head's
    /// precision, at least one, and more while the lines stay within
    /// `max_lines`. `None` when empty.
    pub(crate) fn influx_head(&self, max_lines: usize) -> Result<Option<InfluxHead>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(INFLUX_OUTBOX).map_err(db)?;
        let mut head: Option<InfluxHead> = None;
        for entry in table.iter().map_err(db)? {
            let (key, value) = entry.map_err(db)?;
            let (code, lines, data) = value.value();
            // An unknown kind was not written by this build; taken as line
            // protocol in ms rather than blocking the outbox (the server
            // refuses it if it is not).
            let (content, precision) =
                kind_of(code).unwrap_or((Content::Lines, Precision::Milliseconds));
            match &mut head {
                None => {
                    head = Some(InfluxHead {
                        last: key.value(),
                        precision,
                        lines: u64::from(lines),
                        entries: vec![(content, data.to_vec())],
                    })
                }
                Some(h) => {
                    if h.precision != precision || h.lines + u64::from(lines) > max_lines as u64 {
                        break;
                    }
                    h.last = key.value();
                    h.lines += u64::from(lines);
                    h.entries.push((content, data.to_vec()));
                }
            }
        }
        Ok(head)
    }

    /// Removes the entries up to `through` (written or refused).
    pub(crate) fn influx_remove(&self, through: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let removed = {
            let mut table = tx.open_table(INFLUX_OUTBOX).map_err(db)?;
            let (mut lines, mut removed) = (0u64, 0u64);
            let mut keys = Vec::new();
            for entry in table.range(..=through).map_err(db)? {
                let (key, value) = entry.map_err(db)?;
                keys.push(key.value());
                lines += u64::from(value.value().1);
                removed += value.value().2.len() as u64;
            }
            for key in keys {
                table.remove(key).map_err(db)?;
            }
            add_to_sums(&tx, -(lines as i64), -(removed as i64))?;
            removed
        };
        tx.commit().map_err(db)?;
        self.influx_bytes
            .fetch_sub(removed as i64, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::influx::Entry;

    fn chunks(texts: &[&str]) -> Pending {
        Pending {
            entries: texts
                .iter()
                .map(|t| Entry {
                    content: Content::Lines,
                    lines: t.lines().count() as u32,
                    data: t.as_bytes().to_vec(),
                })
                .collect(),
        }
    }

    fn append_now(store: &Store, texts: &[&str], precision: Precision) {
        let tx = store.db.begin_write().unwrap();
        let added = append(&tx, &chunks(texts), precision).unwrap();
        tx.commit().unwrap();
        store.influx_bytes.fetch_add(added as i64, Ordering::AcqRel);
    }

    #[test]
    fn the_head_joins_entries_of_one_precision_within_the_line_limit_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.redb");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.influx_head(10).unwrap(), None);
        append_now(&store, &["a 1\nb 2\n", "c 3\n"], Precision::Milliseconds);
        append_now(&store, &["d 4\ne 5\n"], Precision::Milliseconds);
        append_now(&store, &["f 6\n"], Precision::Seconds);
        assert_eq!(store.influx_outbox_bytes(), 24);
        assert_eq!(
            store.influx_outbox_depth().unwrap(),
            InfluxOutboxDepth {
                lines: 6,
                bytes: 24
            }
        );

        // Three lines fit, the fourth entry's two would not.
        let head = store.influx_head(4).unwrap().unwrap();
        assert_eq!(
            head,
            InfluxHead {
                last: 1,
                precision: Precision::Milliseconds,
                lines: 3,
                entries: vec![
                    (Content::Lines, b"a 1\nb 2\n".to_vec()),
                    (Content::Lines, b"c 3\n".to_vec())
                ],
            }
        );
        // An entry larger than the limit still goes, alone.
        assert_eq!(store.influx_head(1).unwrap().unwrap().lines, 2);
        store.influx_remove(head.last).unwrap();
        assert_eq!(store.influx_outbox_bytes(), 12);
        assert_eq!(
            store.influx_outbox_depth().unwrap(),
            InfluxOutboxDepth {
                lines: 3,
                bytes: 12
            }
        );

        // Another precision is another request.
        let head = store.influx_head(100).unwrap().unwrap();
        assert_eq!((head.last, head.lines), (2, 2));
        store.influx_remove(head.last).unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.influx_outbox_bytes(), 4);
        let head = store.influx_head(100).unwrap().unwrap();
        assert_eq!(
            (head.last, head.precision, head.entries),
            (
                3,
                Precision::Seconds,
                vec![(Content::Lines, b"f 6\n".to_vec())]
            )
        );
        // Numbering goes on after the last entry, never reusing a number
        // still in the outbox.
        append_now(&store, &["g 7\n"], Precision::Seconds);
        assert_eq!(store.influx_head(100).unwrap().unwrap().last, 4);
        store.influx_remove(4).unwrap();
        assert_eq!(
            store.influx_outbox_depth().unwrap(),
            InfluxOutboxDepth::default()
        );
        assert_eq!(store.influx_outbox_bytes(), 0);
    }
}
