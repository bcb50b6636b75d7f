//! The ack/resend bookkeeping of delivery (DESIGN.md, "Delivery"), as a
//! plain state machine: methods take what happened and change the state or
//! return a decision; no I/O (rumqttc's `state.rs` style).
//!
//! Seqs: `acked` is the highest seq the ingest acked, `gone_through` the
//! highest seq the buffer's limits dropped unacked, `floor` the larger of
//! the two, `last_appended` the highest seq in the buffer, `next_to_send`
//! the next seq to publish. The batches `floor+1 .. next_to_send` are in
//! flight.
//!
//! Invariants:
//! - Nothing is sent while disconnected or before the buffer is synced with
//!   the ingest (its first ack), and at most `window` batches are in
//!   flight.
//! - Batches are published in seq order. Every (re)start of sending begins
//!   at `floor + 1`: on connect, and when no ack progress came within the
//!   ack timeout. So the ingest always sees `acked + 1` (or, after drops,
//!   the first batch that survived them, carrying their count) before
//!   anything later.
//! - Only an ack from the ingest advances `acked`; acks never move it back.
//!   A sync ([`ForwardState::resync`]) replaces the whole position: the
//!   buffer may have renumbered its batches.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct ForwardState {
    window: u64,
    ack_timeout: Duration,
    acked: u64,
    /// Highest seq the buffer dropped without an ack (its limits).
    gone_through: u64,
    last_appended: u64,
    next_to_send: u64,
    /// Highest seq ever published, to tell first sends from resends.
    highest_sent: u64,
    connected: bool,
    /// Whether the buffer's numbering follows the ingest's.
    synced: bool,
    /// When the in-flight batches count as lost; `None` when nothing is in
    /// flight.
    ack_deadline: Option<Instant>,
}

/// Whether a publish is the batch's first or a repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendKind {
    First,
    Resend,
}

/// What an ack from the ingest means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckOutcome {
    /// At or below what was already acked: nothing to do.
    Stale,
    /// Batches up to `seq` may be deleted.
    Released { seq: u64 },
}

impl ForwardState {
    /// State after opening a buffer whose ack is `acked` and whose newest
    /// batch is `last_appended`. Starts disconnected.
    pub(crate) fn new(
        acked: u64,
        last_appended: u64,
        synced: bool,
        window: u32,
        ack_timeout: Duration,
    ) -> ForwardState {
        ForwardState {
            window: u64::from(window.max(1)),
            ack_timeout,
            acked,
            gone_through: acked,
            last_appended: last_appended.max(acked),
            next_to_send: acked + 1,
            highest_sent: acked,
            connected: false,
            synced,
            ack_deadline: None,
        }
    }

    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    pub(crate) fn last_appended(&self) -> u64 {
        self.last_appended
    }

    pub(crate) fn synced(&self) -> bool {
        self.synced
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    /// Below this every seq is acked or gone.
    fn floor(&self) -> u64 {
        self.acked.max(self.gone_through)
    }

    /// Batches published and not yet acked.
    pub(crate) fn in_flight(&self) -> u64 {
        self.next_to_send - self.floor() - 1
    }

    /// True when every appended batch is acked (or was dropped by the
    /// buffer's limits).
    pub(crate) fn all_acked(&self) -> bool {
        self.floor() >= self.last_appended
    }

    /// When [`ForwardState::on_tick`] must be called next, if anything is
    /// in flight.
    pub(crate) fn ack_deadline(&self) -> Option<Instant> {
        self.ack_deadline
    }

    /// A (new) broker connection: whatever was in flight on the old one is
    /// gone, so sending restarts at `floor + 1`.
    pub(crate) fn on_connected(&mut self) {
        self.connected = true;
        self.restart_from_floor();
    }

    pub(crate) fn on_disconnected(&mut self) {
        self.connected = false;
        self.restart_from_floor();
    }

    /// The buffer now holds batches up to `seq`.
    pub(crate) fn on_appended(&mut self, seq: u64) {
        self.last_appended = self.last_appended.max(seq);
    }

    /// The buffer was synced with the ingest at `acked` and holds batches
    /// up to `last_appended` (possibly renumbered): sending restarts at
    /// `acked + 1`; earlier publishes no longer count.
    pub(crate) fn resync(&mut self, acked: u64, last_appended: u64) {
        self.synced = true;
        self.acked = acked;
        self.gone_through = acked;
        self.last_appended = last_appended.max(acked);
        self.next_to_send = acked + 1;
        self.highest_sent = acked;
        self.ack_deadline = None;
    }

    /// The buffer holds no batch from the next one to send through
    /// `through`: its limits dropped them. Sending skips them.
    pub(crate) fn on_missing(&mut self, through: u64) {
        self.gone_through = self.gone_through.max(through);
        self.next_to_send = self.next_to_send.max(through + 1);
        if self.in_flight() == 0 {
            self.ack_deadline = None;
        }
    }

    /// The range to send now: `(first seq, most batches)`, or `None` when
    /// disconnected, not synced, the window is full or nothing is waiting.
    pub(crate) fn sendable(&self) -> Option<(u64, u64)> {
        let room = self.window.saturating_sub(self.in_flight());
        if !self.connected || !self.synced || room == 0 || self.next_to_send > self.last_appended {
            return None;
        }
        Some((
            self.next_to_send,
            room.min(self.last_appended - self.next_to_send + 1),
        ))
    }

    /// `seq` (at or after the start of [`ForwardState::sendable`]) was
    /// handed to the MQTT client at `now`.
    pub(crate) fn on_sent(&mut self, seq: u64, now: Instant) -> SendKind {
        debug_assert!(seq >= self.next_to_send, "sends go forward");
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + self.ack_timeout);
        }
        self.next_to_send = seq + 1;
        if seq <= self.highest_sent {
            SendKind::Resend
        } else {
            self.highest_sent = seq;
            SendKind::First
        }
    }

    /// The ingest acked every batch up to `seq` at `now` (an ack within
    /// the buffer's numbering; a sync goes through
    /// [`ForwardState::resync`]).
    pub(crate) fn on_ack(&mut self, seq: u64, now: Instant) -> AckOutcome {
        if seq <= self.acked {
            return AckOutcome::Stale;
        }
        self.acked = seq;
        self.last_appended = self.last_appended.max(seq);
        self.next_to_send = self.next_to_send.max(seq + 1);
        self.highest_sent = self.highest_sent.max(seq);
        self.ack_deadline = (self.in_flight() > 0).then(|| now + self.ack_timeout);
        AckOutcome::Released { seq }
    }

    /// Checks the ack deadline at `now`; returns true when it passed without
    /// progress and sending restarts at `floor + 1`.
    pub(crate) fn on_tick(&mut self, now: Instant) -> bool {
        match self.ack_deadline {
            Some(deadline) if now >= deadline => {
                self.restart_from_floor();
                true
            }
            _ => false,
        }
    }

    fn restart_from_floor(&mut self) {
        self.next_to_send = self.floor() + 1;
        self.ack_deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// Sends everything sendable at `now`; returns the seqs and kinds.
    fn send_all(state: &mut ForwardState, now: Instant) -> Vec<(u64, SendKind)> {
        let mut sent = Vec::new();
        while let Some((from, count)) = state.sendable() {
            for seq in from..from + count {
                sent.push((seq, state.on_sent(seq, now)));
            }
        }
        sent
    }

    fn seqs(sent: &[(u64, SendKind)]) -> Vec<u64> {
        sent.iter().map(|(s, _)| *s).collect()
    }

    fn connected(acked: u64, last_appended: u64, window: u32) -> ForwardState {
        let mut state = ForwardState::new(acked, last_appended, true, window, TIMEOUT);
        state.on_connected();
        state
    }

    #[test]
    fn nothing_is_sent_while_disconnected() {
        let mut state = ForwardState::new(0, 5, true, 16, TIMEOUT);
        assert_eq!(state.sendable(), None);
        state.on_connected();
        state.on_disconnected();
        assert_eq!(state.sendable(), None);
    }

    #[test]
    fn at_most_a_window_is_in_flight_and_acks_release_more() {
        let now = Instant::now();
        let mut state = connected(0, 10, 4);
        assert_eq!(seqs(&send_all(&mut state, now)), vec![1, 2, 3, 4]);
        assert_eq!(state.in_flight(), 4);
        assert_eq!(state.on_ack(2, now), AckOutcome::Released { seq: 2 });
        assert_eq!(seqs(&send_all(&mut state, now)), vec![5, 6]);
        assert_eq!(state.on_ack(10, now), AckOutcome::Released { seq: 10 });
        assert_eq!(state.on_ack(6, now), AckOutcome::Stale);
        assert!(state.all_acked());
        assert_eq!(state.ack_deadline(), None);
        assert_eq!(state.sendable(), None);
    }

    #[test]
    fn a_reconnect_resends_from_acked_plus_one() {
        let now = Instant::now();
        let mut state = connected(3, 8, 16);
        let first = send_all(&mut state, now);
        assert!(first.iter().all(|(_, kind)| *kind == SendKind::First));
        assert_eq!(seqs(&first), vec![4, 5, 6, 7, 8]);
        state.on_ack(5, now);
        state.on_disconnected();
        state.on_appended(9);
        state.on_connected();
        assert_eq!(
            send_all(&mut state, now),
            vec![
                (6, SendKind::Resend),
                (7, SendKind::Resend),
                (8, SendKind::Resend),
                (9, SendKind::First)
            ]
        );
    }

    #[test]
    fn no_ack_progress_within_the_timeout_resends_from_acked_plus_one() {
        let t0 = Instant::now();
        let mut state = connected(0, 3, 16);
        send_all(&mut state, t0);
        assert_eq!(state.ack_deadline(), Some(t0 + TIMEOUT));
        assert!(!state.on_tick(t0 + TIMEOUT - Duration::from_millis(1)));
        // Progress pushes the deadline out.
        state.on_ack(1, t0 + Duration::from_secs(4));
        assert!(!state.on_tick(t0 + TIMEOUT));
        let t1 = t0 + Duration::from_secs(4) + TIMEOUT;
        assert!(state.on_tick(t1));
        assert_eq!(
            send_all(&mut state, t1),
            vec![(2, SendKind::Resend), (3, SendKind::Resend)]
        );
        assert_eq!(state.ack_deadline(), Some(t1 + TIMEOUT));
    }

    #[test]
    fn nothing_in_flight_means_no_deadline_and_no_resend() {
        let now = Instant::now();
        let mut state = connected(0, 0, 16);
        assert_eq!(state.ack_deadline(), None);
        assert!(!state.on_tick(now + TIMEOUT * 10));
    }

    #[test]
    fn ack_from_an_earlier_connection_moves_sending_past_it() {
        // After a restart the retained ack may cover batches this run has
        // not sent yet.
        let now = Instant::now();
        let mut state = connected(2, 10, 16);
        assert_eq!(state.on_ack(7, now), AckOutcome::Released { seq: 7 });
        assert_eq!(seqs(&send_all(&mut state, now)), vec![8, 9, 10]);
    }

    #[test]
    fn nothing_is_sent_before_the_first_sync() {
        let now = Instant::now();
        let mut state = ForwardState::new(0, 3, false, 16, TIMEOUT);
        state.on_connected();
        assert_eq!(state.sendable(), None);
        // The ingest already holds 500: the buffer renumbered 1..3 to
        // 501..503.
        state.resync(500, 503);
        assert!(state.synced());
        assert_eq!(seqs(&send_all(&mut state, now)), vec![501, 502, 503]);
        assert_eq!(state.on_ack(503, now), AckOutcome::Released { seq: 503 });
        assert!(state.all_acked());
    }

    #[test]
    fn a_resync_drops_what_was_in_flight_and_restarts_after_the_ack() {
        let now = Instant::now();
        let mut state = connected(0, 4, 16);
        send_all(&mut state, now);
        state.resync(900, 904);
        assert_eq!(state.in_flight(), 0);
        assert_eq!(state.ack_deadline(), None);
        // Stale appends of the old numbering change nothing.
        state.on_appended(4);
        assert_eq!(
            send_all(&mut state, now),
            vec![
                (901, SendKind::First),
                (902, SendKind::First),
                (903, SendKind::First),
                (904, SendKind::First)
            ]
        );
    }

    #[test]
    fn batches_dropped_by_the_buffer_are_skipped_and_free_the_window() {
        let now = Instant::now();
        let mut state = connected(0, 30, 4);
        assert_eq!(seqs(&send_all(&mut state, now)), vec![1, 2, 3, 4]);
        // The limits dropped 1..=20 (in flight or not); 21 carries the count.
        assert!(state.on_tick(now + TIMEOUT));
        state.on_missing(20);
        assert_eq!(state.in_flight(), 0);
        assert_eq!(
            send_all(&mut state, now),
            vec![
                (21, SendKind::First),
                (22, SendKind::First),
                (23, SendKind::First),
                (24, SendKind::First)
            ]
        );
        // A reconnect resends from the first batch still held.
        state.on_disconnected();
        state.on_connected();
        assert_eq!(state.sendable(), Some((21, 4)));
        assert_eq!(state.acked(), 0);
        state.on_ack(30, now);
        assert!(state.all_acked());
    }

    #[test]
    fn everything_dropped_counts_as_done() {
        let mut state = connected(0, 5, 16);
        assert!(!state.all_acked());
        state.on_missing(5);
        assert!(state.all_acked());
        assert_eq!(state.sendable(), None);
    }

    #[test]
    fn missing_seqs_are_skipped_without_breaking_the_window() {
        let now = Instant::now();
        let mut state = connected(0, 5, 16);
        assert_eq!(state.sendable(), Some((1, 5)));
        state.on_sent(3, now);
        assert_eq!(state.sendable(), Some((4, 2)));
    }
}
