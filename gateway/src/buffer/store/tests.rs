use super::*;
use facwatch_proto::wire::{Quality, Values};

/// Large enough never to drop anything.
const ROOMY: BufferLimits = BufferLimits {
    max_bytes: u64::MAX,
    max_age: None,
    when_full: WhenFull::DropOldest,
};

fn sample(time_ms: i64) -> Sample {
    Sample {
        meter: "m".into(),
        time_ms,
        quality: Quality::Timeout,
        values: Values::default(),
    }
}

/// A batch of `samples` samples taken at `t0`, `t0 + 1`, ... ms.
fn batch_at(t0: i64, samples: usize) -> Batch {
    Batch {
        gateway: "gw".into(),
        seq: 0,
        dropped_before: 0,
        samples: (0..samples as i64).map(|i| sample(t0 + i)).collect(),
    }
}

fn batch(samples: usize) -> Batch {
    batch_at(0, samples)
}

/// Encoded length of `batch(samples)` once stored with a one-byte seq and
/// `dropped_before`.
fn stored_len(samples: usize) -> u64 {
    let mut b = batch(samples);
    b.seq = 1;
    b.encode().len() as u64
}

fn open(dir: &tempfile::TempDir, limits: BufferLimits) -> Buffer {
    Buffer::open(&dir.path().join("b.redb"), limits).unwrap()
}

fn stored(buffer: &Buffer) -> Vec<Batch> {
    buffer
        .range_from(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|(seq, bytes)| {
            let batch = Batch::decode(&bytes).unwrap();
            assert_eq!(batch.seq, seq);
            batch
        })
        .collect()
}

fn seqs(buffer: &Buffer) -> Vec<u64> {
    stored(buffer).iter().map(|b| b.seq).collect()
}

/// Checks the `bytes` counter against the stored batches.
fn assert_bytes_counted(buffer: &Buffer) {
    let sum: u64 = buffer
        .range_from(0, 10_000)
        .unwrap()
        .iter()
        .map(|(_, b)| b.len() as u64)
        .sum();
    assert_eq!(buffer.meta().unwrap().bytes, sum);
}

#[test]
fn append_assigns_consecutive_seqs_from_one_and_stores_wire_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    let mut first = batch_at(5_000, 2);
    assert_eq!(buffer.append(&mut first, 0).unwrap(), Some(1));
    assert_eq!(first.seq, 1);
    assert_eq!(buffer.append(&mut batch(3), 0).unwrap(), Some(2));
    let bytes = buffer.range_from(1, 1).unwrap();
    assert_eq!(bytes, vec![(1, first.encode())]);
    assert_eq!(Batch::decode(&bytes[0].1).unwrap(), first);
    assert_eq!(
        buffer.meta().unwrap(),
        BufferMeta {
            next_seq: 3,
            acked_seq: 0,
            samples_produced: 5,
            batches: 2,
            bytes: first.encode().len() as u64 + stored_len(3),
            samples_dropped: 0,
            oldest_sample_ms: Some(5_000),
            synced: false,
        }
    );
}

#[test]
fn reopened_buffer_keeps_batches_and_continues_numbering() {
    let dir = tempfile::tempdir().unwrap();
    {
        let buffer = open(&dir, ROOMY);
        buffer.append(&mut batch(1), 0).unwrap();
        buffer.append(&mut batch(1), 0).unwrap();
        buffer.sync_with_ingest(0).unwrap();
        buffer.ack(1).unwrap();
    }
    let buffer = open(&dir, ROOMY);
    assert_eq!(seqs(&buffer), vec![2]);
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(3));
    let meta = buffer.meta().unwrap();
    assert_eq!(
        (meta.acked_seq, meta.samples_produced, meta.synced),
        (1, 3, true)
    );
    assert_bytes_counted(&buffer);
}

#[test]
fn ack_deletes_every_batch_up_to_seq_and_seqs_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    for _ in 0..5 {
        buffer.append(&mut batch(1), 0).unwrap();
    }
    buffer.sync_with_ingest(0).unwrap();
    let applied = buffer.ack(3).unwrap();
    assert!(!applied.synced_now);
    assert_eq!(applied.released, 3);
    assert_eq!(applied.meta.batches, 2);
    assert_eq!(applied.meta.bytes, 2 * stored_len(1));
    assert_eq!(seqs(&buffer), vec![4, 5]);
    // A stale ack changes nothing.
    let stale = buffer.ack(2).unwrap();
    assert_eq!((stale.released, stale.meta), (0, applied.meta));
    assert_eq!(buffer.meta().unwrap().acked_seq, 3);
    let applied = buffer.ack(5).unwrap();
    assert_eq!(applied.released, 2);
    assert_eq!((applied.meta.batches, applied.meta.bytes), (0, 0));
    assert_eq!(applied.meta.oldest_sample_ms, None);
    assert!(seqs(&buffer).is_empty());
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(6));
    assert_eq!(buffer.range_from(0, 10).unwrap()[0].0, 6);
}

#[test]
fn range_from_respects_start_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    for _ in 0..5 {
        buffer.append(&mut batch(1), 0).unwrap();
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
fn a_fresh_buffer_synced_with_an_ingest_at_500_renumbers_its_batches_to_501() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    let before: Vec<Batch> = (0..3)
        .map(|i| {
            let mut b = batch_at(i * 100, 2 + i as usize);
            buffer.append(&mut b, 0).unwrap();
            b
        })
        .collect();
    assert!(!buffer.meta().unwrap().synced);

    let applied = buffer.sync_with_ingest(500).unwrap();

    assert!(applied.synced_now);
    assert_eq!(applied.renumbered, 3);
    let after = stored(&buffer);
    assert_eq!(
        after.iter().map(|b| b.seq).collect::<Vec<_>>(),
        vec![501, 502, 503]
    );
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new.samples, old.samples);
        assert_eq!(new.dropped_before, old.dropped_before);
    }
    let meta = buffer.meta().unwrap();
    assert_eq!(
        (meta.acked_seq, meta.next_seq, meta.synced),
        (500, 504, true)
    );
    assert_eq!(meta.batches, 3);
    // Seq 501.. takes two varint bytes instead of one.
    assert_eq!(
        meta.bytes,
        before
            .iter()
            .map(|b| b.encode().len() as u64 + 1)
            .sum::<u64>()
    );
    assert_bytes_counted(&buffer);
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(504));
}

#[test]
fn a_fresh_buffer_synced_with_a_new_ingest_keeps_its_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    for _ in 0..3 {
        buffer.append(&mut batch(1), 0).unwrap();
    }
    let applied = buffer.ack(0).unwrap();
    assert!(applied.synced_now);
    assert_eq!(applied.renumbered, 0);
    assert_eq!(seqs(&buffer), vec![1, 2, 3]);
    let meta = buffer.meta().unwrap();
    assert_eq!((meta.acked_seq, meta.next_seq, meta.synced), (0, 4, true));
    // From now on acks release as usual.
    let applied = buffer.ack(2).unwrap();
    assert!(!applied.synced_now);
    assert_eq!(seqs(&buffer), vec![3]);
}

#[test]
fn an_ack_beyond_every_stored_batch_renumbers_instead_of_deleting() {
    // Regression: the ack used to delete every unacked batch (silent loss).
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    buffer.sync_with_ingest(0).unwrap();
    buffer.append(&mut batch(1), 0).unwrap();
    buffer.append(&mut batch(2), 0).unwrap();
    let applied = buffer.ack(500).unwrap();
    assert!(applied.synced_now);
    assert_eq!((applied.renumbered, applied.released), (2, 0));
    assert_eq!(seqs(&buffer), vec![501, 502]);
    assert_eq!(stored(&buffer)[1].samples.len(), 2);
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(503));
}

#[test]
fn an_ack_beyond_an_empty_buffer_moves_numbering_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    buffer.sync_with_ingest(0).unwrap();
    buffer.append(&mut batch(1), 0).unwrap();
    buffer.ack(1).unwrap();
    let applied = buffer.ack(500).unwrap();
    assert_eq!((applied.synced_now, applied.renumbered), (true, 0));
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(501));
}

#[test]
fn a_second_open_of_the_same_file_is_refused_and_not_taken_for_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    let _first = Buffer::open(&path, ROOMY).unwrap();
    let err = Buffer::open(&path, ROOMY).unwrap_err();
    assert!(err.to_string().contains("b.redb"), "{err}");
    assert!(!err.is_unusable_file(), "{err}");
    let err = Buffer::open_or_move_aside(&path, ROOMY).unwrap_err();
    assert!(!err.is_unusable_file(), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_newer_on_disk_format_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    {
        let buffer = Buffer::open(&path, ROOMY).unwrap();
        buffer
            .write(|tx| {
                tx.open_table(META)?.insert(KEY_FORMAT, 3)?;
                Ok(())
            })
            .unwrap();
    }
    let err = Buffer::open(&path, ROOMY).unwrap_err();
    assert!(
        matches!(err, BufferError::UnknownFormat { found: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("on-disk format 3"), "{err}");
    assert!(err.is_unusable_file());
}

#[test]
fn oversized_batch_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    let mut huge = batch(0);
    huge.gateway = "g".repeat(MAX_BATCH_BYTES);
    assert!(matches!(
        buffer.append(&mut huge, 0),
        Err(BufferError::BatchTooLarge { .. })
    ));
    assert_eq!(buffer.meta().unwrap().next_seq, 1);
}

// ---- limits ----

#[test]
fn drop_oldest_deletes_the_oldest_batches_and_the_first_survivor_carries_their_count() {
    let dir = tempfile::tempdir().unwrap();
    let len = stored_len(10);
    // Room for three batches, plus the reserve for a grown dropped_before.
    let buffer = open(
        &dir,
        BufferLimits {
            max_bytes: 3 * len + DROPPED_BEFORE_GROWTH_MAX,
            max_age: None,
            when_full: WhenFull::DropOldest,
        },
    );
    for _ in 0..3 {
        buffer.append(&mut batch(10), 0).unwrap();
    }
    // The fourth does not fit: batch 1 goes, batch 2 is the first survivor.
    let mut fourth = batch(10);
    assert_eq!(buffer.append(&mut fourth, 0).unwrap(), Some(4));
    assert_eq!(fourth.dropped_before, 0);
    let held = stored(&buffer);
    assert_eq!(
        held.iter().map(|b| b.seq).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(
        held.iter().map(|b| b.dropped_before).collect::<Vec<_>>(),
        vec![10, 0, 0]
    );
    let meta = buffer.meta().unwrap();
    assert_eq!(
        (meta.samples_dropped, meta.samples_produced, meta.bytes),
        (10, 40, 3 * len)
    );
    assert_bytes_counted(&buffer);

    // A batch of 15 samples needs the room of two more: 2 and 3 go, and 4
    // carries their 20 plus the 10 that 2 carried for batch 1.
    let mut big = batch(15);
    assert_eq!(buffer.append(&mut big, 0).unwrap(), Some(5));
    let held = stored(&buffer);
    assert_eq!(held.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(
        held.iter().map(|b| b.dropped_before).collect::<Vec<_>>(),
        vec![30, 0]
    );
    assert_eq!(buffer.meta().unwrap().samples_dropped, 30);
    assert_bytes_counted(&buffer);
}

#[test]
fn drop_oldest_with_room_for_one_batch_makes_the_new_batch_carry_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let len = stored_len(10);
    let buffer = open(
        &dir,
        BufferLimits {
            max_bytes: len + DROPPED_BEFORE_GROWTH_MAX,
            max_age: None,
            when_full: WhenFull::DropOldest,
        },
    );
    for _ in 0..3 {
        buffer.append(&mut batch(10), 0).unwrap();
    }
    // Batch 2 carried batch 1's 10 when it was dropped in turn: 3 carries
    // every dropped sample, as many as samples_dropped counts.
    let held = stored(&buffer);
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].seq, held[0].dropped_before), (3, 20));
    let meta = buffer.meta().unwrap();
    assert_eq!((meta.samples_dropped, meta.batches), (20, 1));
}

#[test]
fn drop_newest_refuses_the_batch_and_the_next_stored_one_carries_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let len = stored_len(10);
    let buffer = open(
        &dir,
        BufferLimits {
            max_bytes: 2 * len + 5,
            max_age: None,
            when_full: WhenFull::DropNewest,
        },
    );
    assert_eq!(buffer.append(&mut batch(10), 0).unwrap(), Some(1));
    assert_eq!(buffer.append(&mut batch(10), 0).unwrap(), Some(2));
    let mut third = batch(7);
    assert_eq!(buffer.append(&mut third, 0).unwrap(), None);
    assert_eq!(buffer.append(&mut batch(8), 0).unwrap(), None);
    assert_eq!((third.seq, third.dropped_before), (0, 0));
    let meta = buffer.meta().unwrap();
    assert_eq!(
        (
            meta.next_seq,
            meta.samples_dropped,
            meta.samples_produced,
            meta.batches
        ),
        (3, 15, 35, 2)
    );
    // Room again: the next stored batch gets the next seq (no gap) and the
    // count of everything dropped since batch 2.
    buffer.sync_with_ingest(0).unwrap();
    buffer.ack(2).unwrap();
    let mut next = batch(10);
    assert_eq!(buffer.append(&mut next, 0).unwrap(), Some(3));
    assert_eq!(next.dropped_before, 15);
    assert_eq!(stored(&buffer), vec![next.clone()]);
    // The count is carried once.
    let mut after = batch(1);
    buffer.append(&mut after, 0).unwrap();
    assert_eq!(after.dropped_before, 0);
    assert_bytes_counted(&buffer);
}

#[test]
fn the_age_limit_drops_old_batches_by_the_gateways_clock() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(
        &dir,
        BufferLimits {
            max_bytes: u64::MAX,
            max_age: Some(Duration::from_secs(60)),
            when_full: WhenFull::DropNewest,
        },
    );
    // Simulated clock readings are passed in as `now_ms`.
    buffer.append(&mut batch_at(0, 4), 1_000).unwrap();
    buffer.append(&mut batch_at(30_000, 5), 31_000).unwrap();
    assert_eq!(buffer.meta().unwrap().oldest_sample_ms, Some(0));
    // At 65 s the cutoff is 5 s: batch 1 (oldest sample 0) goes, batch 2
    // survives and carries its 4 samples.
    assert_eq!(
        buffer.append(&mut batch_at(64_000, 3), 65_000).unwrap(),
        Some(3)
    );
    let held = stored(&buffer);
    assert_eq!(held.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(held[0].dropped_before, 4);
    assert_eq!(buffer.meta().unwrap().oldest_sample_ms, Some(30_000));
    // A batch already too old when stored is dropped too; the next stored
    // batch carries its count.
    assert_eq!(
        buffer.append(&mut batch_at(1_000, 6), 65_000).unwrap(),
        None
    );
    let mut next = batch_at(65_000, 1);
    assert_eq!(buffer.append(&mut next, 65_000).unwrap(), Some(4));
    assert_eq!(next.dropped_before, 6);
    let meta = buffer.meta().unwrap();
    assert_eq!((meta.samples_dropped, meta.samples_produced), (10, 19));
    assert_bytes_counted(&buffer);
}

#[test]
fn without_an_age_limit_old_batches_stay() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(
        &dir,
        BufferLimits {
            max_age: None,
            ..ROOMY
        },
    );
    buffer.append(&mut batch_at(0, 1), 0).unwrap();
    buffer.append(&mut batch_at(0, 1), i64::MAX).unwrap();
    assert_eq!(seqs(&buffer), vec![1, 2]);
}

// ---- format 1 ----

/// Writes a format-1 file as the previous build did.
fn write_format_1(path: &Path, batches: &[Batch], acked_seq: u64) {
    let db = Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut table = tx.open_table(BATCHES).unwrap();
        for b in batches {
            table.insert(b.seq, b.encode().as_slice()).unwrap();
        }
        let mut meta = tx.open_table(META).unwrap();
        meta.insert(KEY_FORMAT, 1).unwrap();
        meta.insert(KEY_NEXT_SEQ, batches.last().map_or(1, |b| b.seq + 1))
            .unwrap();
        meta.insert(KEY_ACKED_SEQ, acked_seq).unwrap();
        meta.insert(KEY_SAMPLES, 30).unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn a_format_1_buffer_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    let old: Vec<Batch> = [(4, 7_000, 3), (5, 9_000, 2)]
        .into_iter()
        .map(|(seq, t0, n)| Batch {
            seq,
            ..batch_at(t0, n)
        })
        .collect();
    write_format_1(&path, &old, 3);

    let buffer = Buffer::open(&path, ROOMY).unwrap();

    assert_eq!(stored(&buffer), old);
    assert_eq!(
        buffer.meta().unwrap(),
        BufferMeta {
            next_seq: 6,
            acked_seq: 3,
            samples_produced: 30,
            batches: 2,
            bytes: old.iter().map(|b| b.encode().len() as u64).sum(),
            samples_dropped: 0,
            oldest_sample_ms: Some(7_000),
            // It was acked: its numbering follows the ingest's.
            synced: true,
        }
    );
    let format = buffer
        .read(|tx| Ok(tx.open_table(META)?.get(KEY_FORMAT)?.map(|v| v.value())))
        .unwrap();
    assert_eq!(format, Some(2));
    drop(buffer);
    // Migrated once: a second open finds format 2.
    let buffer = Buffer::open(&path, ROOMY).unwrap();
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(6));
}

#[test]
fn a_format_1_buffer_never_acked_waits_for_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    write_format_1(&path, &[Batch { seq: 1, ..batch(1) }], 0);
    assert!(!Buffer::open(&path, ROOMY).unwrap().meta().unwrap().synced);
}

#[test]
fn a_format_1_buffer_with_an_undecodable_batch_is_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    write_format_1(&path, &[], 0);
    {
        let db = Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(BATCHES)
            .unwrap()
            .insert(1, [9u8, 9, 9].as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let err = Buffer::open(&path, ROOMY).unwrap_err();
    assert!(err.to_string().contains("format-1 batch 1"), "{err}");
    assert!(err.is_unusable_file());
}

// ---- commit groups ----

fn samples(times: std::ops::Range<i64>) -> Vec<Sample> {
    times.map(sample).collect()
}

fn group<'a>(closed: Vec<Vec<Sample>>, open: &'a [Sample]) -> CommitGroup<'a> {
    CommitGroup {
        gateway: "gw",
        closed,
        open,
    }
}

#[test]
fn samples_of_the_open_batch_survive_a_crash_and_come_back_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    {
        let buffer = open(&dir, ROOMY);
        let (stored, meta) = buffer
            .commit_group(group(vec![], &samples(0..3)), 0)
            .unwrap();
        assert!(stored.is_empty());
        assert_eq!((meta.samples_produced, meta.batches), (3, 0));
        let (_, meta) = buffer
            .commit_group(group(vec![], &samples(3..5)), 0)
            .unwrap();
        assert_eq!(meta.samples_produced, 5);
        // Dropped without closing the open batch: what a crash leaves.
    }
    let buffer = open(&dir, ROOMY);
    let held = stored(&buffer);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].seq, 1);
    assert_eq!(held[0].gateway, "gw");
    assert_eq!(held[0].samples, samples(0..5));
    let meta = buffer.meta().unwrap();
    assert_eq!((meta.samples_produced, meta.next_seq), (5, 2));
    // Recovered once.
    drop(buffer);
    assert_eq!(seqs(&open(&dir, ROOMY)), vec![1]);
}

#[test]
fn a_closing_batch_moves_from_pending_into_batches_in_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open(&dir, ROOMY);
    buffer
        .commit_group(group(vec![], &samples(0..3)), 0)
        .unwrap();
    // Batch [0..4) closed (3 of its samples were pending), a second one
    // [4..6) opened and closed within the interval, [6..7) is open.
    let (stored_seqs, meta) = buffer
        .commit_group(group(vec![samples(0..4), samples(4..6)], &samples(6..7)), 0)
        .unwrap();
    assert_eq!(stored_seqs, vec![1, 2]);
    assert_eq!((meta.samples_produced, meta.batches), (7, 2));
    let held = stored(&buffer);
    assert_eq!(held[0].samples, samples(0..4));
    assert_eq!(held[1].samples, samples(4..6));
    drop(buffer);
    // Only the open batch's sample was pending.
    let buffer = open(&dir, ROOMY);
    let held = stored(&buffer);
    assert_eq!(held.len(), 3);
    assert_eq!(held[2].samples, samples(6..7));
    assert_eq!(buffer.meta().unwrap().samples_produced, 7);
}

#[test]
fn pending_samples_come_back_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let buffer = open(&dir, ROOMY);
        buffer
            .commit_group(group(vec![], &samples(5..7)), 0)
            .unwrap();
        // A late sample from an earlier window joined the open batch.
        buffer.commit_group(group(vec![], &[sample(1)]), 0).unwrap();
    }
    let buffer = open(&dir, ROOMY);
    assert_eq!(
        stored(&buffer)[0].samples,
        vec![sample(1), sample(5), sample(6)]
    );
}

// ---- unusable files ----

fn aside_files(dir: &tempfile::TempDir) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".corrupt-"))
        .collect();
    found.sort();
    found
}

fn assert_aside_name(moved: &MovedAside) {
    let name = moved.to.file_name().unwrap().to_string_lossy().to_string();
    let stamp = name.strip_prefix("b.redb.corrupt-").unwrap();
    assert_eq!(stamp.len(), 16, "{name}");
    assert!(
        chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").is_ok(),
        "{name}"
    );
}

#[test]
fn a_file_of_garbage_is_moved_aside_and_a_fresh_buffer_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    assert!(Buffer::open(&path, ROOMY).unwrap_err().is_unusable_file());

    let (buffer, moved) = Buffer::open_or_move_aside(&path, ROOMY).unwrap();

    let moved = moved.expect("moved aside");
    assert_eq!(moved.from, path);
    assert_aside_name(&moved);
    assert_eq!(aside_files(&dir), vec![moved.to.clone()]);
    assert_eq!(std::fs::read(&moved.to).unwrap(), garbage);
    assert!(moved.cause.is_unusable_file());
    let meta = buffer.meta().unwrap();
    assert_eq!((meta.next_seq, meta.batches, meta.synced), (1, 0, false));
    assert_eq!(buffer.append(&mut batch(1), 0).unwrap(), Some(1));
}

#[test]
fn a_truncated_buffer_is_moved_aside_and_a_fresh_buffer_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    {
        let buffer = Buffer::open(&path, ROOMY).unwrap();
        for _ in 0..200 {
            buffer.append(&mut batch(50), 0).unwrap();
        }
    }
    let whole = std::fs::read(&path).unwrap();
    let truncated = &whole[..whole.len() / 3];
    std::fs::write(&path, truncated).unwrap();

    let (buffer, moved) = Buffer::open_or_move_aside(&path, ROOMY).unwrap();

    let moved = moved.expect("moved aside");
    assert_aside_name(&moved);
    assert_eq!(std::fs::read(&moved.to).unwrap(), truncated);
    assert_eq!(buffer.meta().unwrap().batches, 0);
}

#[test]
fn two_recoveries_in_the_same_second_keep_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    let now = chrono::Utc::now();
    let first = aside_path(&path, now);
    std::fs::write(&first, b"x").unwrap();
    let second = aside_path(&path, now);
    assert_eq!(second, PathBuf::from(format!("{}-2", first.display())));
}

#[test]
fn a_healthy_buffer_is_not_moved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    Buffer::open(&path, ROOMY)
        .unwrap()
        .append(&mut batch(1), 0)
        .unwrap();
    let (buffer, moved) = Buffer::open_or_move_aside(&path, ROOMY).unwrap();
    assert!(moved.is_none());
    assert_eq!(seqs(&buffer), vec![1]);
    assert!(aside_files(&dir).is_empty());
}

#[test]
fn only_errors_about_the_files_content_count_as_unusable() {
    let storage = |cause: redb::Error| BufferError::Storage {
        path: PathBuf::from("b.redb"),
        cause: Box::new(cause),
    };
    let io = |kind: std::io::ErrorKind| storage(redb::Error::Io(kind.into()));
    assert!(io(std::io::ErrorKind::InvalidData).is_unusable_file());
    assert!(io(std::io::ErrorKind::UnexpectedEof).is_unusable_file());
    assert!(storage(redb::Error::Corrupted("x".into())).is_unusable_file());
    assert!(storage(redb::Error::UpgradeRequired(1)).is_unusable_file());
    // A full disk or a failing device says nothing about the content.
    assert!(!io(std::io::ErrorKind::StorageFull).is_unusable_file());
    assert!(!io(std::io::ErrorKind::PermissionDenied).is_unusable_file());
    assert!(!io(std::io::ErrorKind::Other).is_unusable_file());
    assert!(!storage(redb::Error::DatabaseAlreadyOpen).is_unusable_file());
    assert!(!storage(redb::Error::PreviousIo).is_unusable_file());
}
