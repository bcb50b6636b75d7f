//! Process-lifetime counters of the ingest, shared with whoever started it
//! (the binary, the demo, tests).
//!
//! Counters only grow. They are plain atomics so readers never block the
//! apply path; every increment made by the ingest also wakes
//! [`Stats::wait_until`], so tests and the demo wait on the counters
//! themselves instead of sleeping. Persistent per-gateway counters live in
//! the store ([`crate::store::Store::counters`]); these reset with the
//! process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::detect::Rule;

/// Number of rules, the length of the per-rule counters.
const RULES: usize = Rule::ALL.len();

#[derive(Debug, Default)]
pub struct Stats {
    /// Batches applied (new `seq`, committed).
    pub batches_applied: AtomicU64,
    /// Samples in applied batches.
    pub samples_applied: AtomicU64,
    /// Batches with `seq <= last_seq`: ignored and re-acked.
    pub batches_duplicate: AtomicU64,
    /// Applied batches whose `seq` skipped at least one number (the gateway
    /// declared discarded data).
    pub sequence_gaps: AtomicU64,
    /// Batches past a gap the gateway did not declare: ignored, re-acked
    /// with `last_seq` so the gateway resends the missing ones.
    pub batches_out_of_order: AtomicU64,
    /// Payloads over the size of a sealed batch, refused unread.
    pub rejected_too_large: AtomicU64,
    /// Payloads whose tag is not the topic gateway's key's (forged,
    /// altered, or sealed with another key): never decoded.
    pub rejected_bad_mac: AtomicU64,
    /// Sealed payloads that did not decode as a batch.
    pub rejected_decode: AtomicU64,
    /// Batches on the topic of a gateway no loaded site has.
    pub rejected_unknown_gateway: AtomicU64,
    /// Batches whose payload names another gateway than their topic.
    pub rejected_gateway_mismatch: AtomicU64,
    /// Batches whose detector run or store commit failed (not acked; the
    /// gateway resends).
    pub apply_failures: AtomicU64,
    /// Events seen for the first time.
    pub events_opened: AtomicU64,
    /// Events that reached status closed.
    pub events_closed: AtomicU64,
    /// `events_opened` by rule, see [`Stats::count_event_change`].
    events_opened_by_rule: [AtomicU64; RULES],
    /// `events_closed` by rule.
    events_closed_by_rule: [AtomicU64; RULES],
    /// R5 events for samples a gateway discarded (also in `events_opened`).
    pub data_interruptions: AtomicU64,
    /// Store transactions that applied batches (a group of one or more).
    pub groups_committed: AtomicU64,
    /// Acks queued for the broker: one per gateway per group, and one per
    /// gateway on every connection.
    pub acks_published: AtomicU64,
    /// CONNECTs with a login the embedded broker refused (unknown user or
    /// wrong password; one without a login is refused by rumqttd itself,
    /// uncounted).
    pub logins_refused: AtomicU64,
    /// TLS connections to the embedded broker that failed their handshake
    /// (untrusted or no certificate, timeout, not TLS) or found it full.
    pub tls_handshakes_failed: AtomicU64,
    /// HTTP API requests refused for a missing or wrong bearer token.
    pub api_unauthorized: AtomicU64,
    /// Acks and event messages dropped because the MQTT client stayed busy
    /// (a dropped ack only delays the gateway until it resends).
    pub publishes_dropped: AtomicU64,
    /// Batch subscriptions the broker confirmed (one per connection).
    pub broker_subscriptions: AtomicU64,
    /// Failed connection attempts and lost connections to the broker.
    pub broker_connection_failures: AtomicU64,
    /// Notices queued for webhooks (one per webhook per notice).
    pub webhook_queued: AtomicU64,
    /// Notices a webhook answered with 2xx.
    pub webhook_sent: AtomicU64,
    /// POSTs that failed in a way worth retrying (connection, timeout, 429, 5xx).
    pub webhook_retries: AtomicU64,
    /// Oldest notices dropped because a webhook's outbox was full.
    pub webhook_dropped_full: AtomicU64,
    /// Notices a webhook refused with a 4xx other than 429: dropped.
    pub webhook_dropped_refused: AtomicU64,
    /// Event changes found in a replay: summarised, not sent one by one.
    pub notices_historical: AtomicU64,
    /// Replay summaries completed.
    pub replay_summaries: AtomicU64,
    /// `gateway_silent` alerts raised.
    pub alerts_raised: AtomicU64,
    /// `gateway_back`: silent gateways that sent a batch again.
    pub alerts_cleared: AtomicU64,
    /// Lines queued in the InfluxDB outbox (readings and event changes).
    pub influx_lines_queued: AtomicU64,
    /// Lines InfluxDB accepted (2xx).
    pub influx_lines_written: AtomicU64,
    /// Write requests InfluxDB accepted.
    pub influx_requests: AtomicU64,
    /// Lines of writes refused with a 4xx other than 408/429: dropped.
    pub influx_lines_refused: AtomicU64,
    /// Write requests that failed: refused, or to be retried (connection,
    /// timeout, 408, 429, 5xx).
    pub influx_write_errors: AtomicU64,
    /// Batches not applied (nor acked) because the InfluxDB outbox was full;
    /// their gateways send them again.
    pub batches_deferred: AtomicU64,
    /// The webhook counters by webhook name.
    webhooks: Mutex<BTreeMap<String, WebhookSnapshot>>,
    /// Whether the batch subscription is confirmed on the current broker
    /// connection (false again when the connection is lost).
    broker_subscribed: AtomicBool,
    /// Where the HTTP API listens, once bound (`[http] listen` may ask for
    /// port 0).
    http_addr: Mutex<Option<SocketAddr>>,
    changed: Notify,
}

/// The counters of [`Stats`] at one moment, for assertions and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub batches_applied: u64,
    pub samples_applied: u64,
    pub batches_duplicate: u64,
    pub sequence_gaps: u64,
    pub batches_out_of_order: u64,
    pub rejected_too_large: u64,
    pub rejected_bad_mac: u64,
    pub rejected_decode: u64,
    pub rejected_unknown_gateway: u64,
    pub rejected_gateway_mismatch: u64,
    pub apply_failures: u64,
    pub events_opened: u64,
    pub events_closed: u64,
    /// Events opened by rule: `[n - 1]` counts Rn (see [`Rule::ALL`]).
    pub events_opened_by_rule: [u64; RULES],
    /// Events closed by rule, indexed as `events_opened_by_rule`.
    pub events_closed_by_rule: [u64; RULES],
    pub data_interruptions: u64,
    pub groups_committed: u64,
    pub acks_published: u64,
    pub logins_refused: u64,
    pub tls_handshakes_failed: u64,
    pub api_unauthorized: u64,
    pub publishes_dropped: u64,
    pub broker_subscriptions: u64,
    pub broker_connection_failures: u64,
    pub webhook_queued: u64,
    pub webhook_sent: u64,
    pub webhook_retries: u64,
    pub webhook_dropped_full: u64,
    pub webhook_dropped_refused: u64,
    pub notices_historical: u64,
    pub replay_summaries: u64,
    pub alerts_raised: u64,
    pub alerts_cleared: u64,
    pub influx_lines_queued: u64,
    pub influx_lines_written: u64,
    pub influx_requests: u64,
    pub influx_lines_refused: u64,
    pub influx_write_errors: u64,
    pub batches_deferred: u64,
}

/// The counters of one webhook (also summed in [`StatsSnapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookSnapshot {
    pub queued: u64,
    pub sent: u64,
    pub retries: u64,
    pub dropped_full: u64,
    pub dropped_refused: u64,
}

/// A per-webhook counter, for [`Stats::add_webhook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WebhookCounter {
    Queued,
    Sent,
    Retries,
    DroppedFull,
    DroppedRefused,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            batches_applied: get(&self.batches_applied),
            samples_applied: get(&self.samples_applied),
            batches_duplicate: get(&self.batches_duplicate),
            sequence_gaps: get(&self.sequence_gaps),
            batches_out_of_order: get(&self.batches_out_of_order),
            rejected_too_large: get(&self.rejected_too_large),
            rejected_bad_mac: get(&self.rejected_bad_mac),
            rejected_decode: get(&self.rejected_decode),
            rejected_unknown_gateway: get(&self.rejected_unknown_gateway),
            rejected_gateway_mismatch: get(&self.rejected_gateway_mismatch),
            apply_failures: get(&self.apply_failures),
            events_opened: get(&self.events_opened),
            events_closed: get(&self.events_closed),
            events_opened_by_rule: self.events_opened_by_rule.each_ref().map(get),
            events_closed_by_rule: self.events_closed_by_rule.each_ref().map(get),
            data_interruptions: get(&self.data_interruptions),
            groups_committed: get(&self.groups_committed),
            acks_published: get(&self.acks_published),
            logins_refused: get(&self.logins_refused),
            tls_handshakes_failed: get(&self.tls_handshakes_failed),
            api_unauthorized: get(&self.api_unauthorized),
            publishes_dropped: get(&self.publishes_dropped),
            broker_subscriptions: get(&self.broker_subscriptions),
            broker_connection_failures: get(&self.broker_connection_failures),
            webhook_queued: get(&self.webhook_queued),
            webhook_sent: get(&self.webhook_sent),
            webhook_retries: get(&self.webhook_retries),
            webhook_dropped_full: get(&self.webhook_dropped_full),
            webhook_dropped_refused: get(&self.webhook_dropped_refused),
            notices_historical: get(&self.notices_historical),
            replay_summaries: get(&self.replay_summaries),
            alerts_raised: get(&self.alerts_raised),
            alerts_cleared: get(&self.alerts_cleared),
            influx_lines_queued: get(&self.influx_lines_queued),
            influx_lines_written: get(&self.influx_lines_written),
            influx_requests: get(&self.influx_requests),
            influx_lines_refused: get(&self.influx_lines_refused),
            influx_write_errors: get(&self.influx_write_errors),
            batches_deferred: get(&self.batches_deferred),
        }
    }

    /// The counters of webhook `name` (zero for one that counted nothing).
    pub fn webhook(&self, name: &str) -> WebhookSnapshot {
        self.webhooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or_default()
    }

    /// Whether the batch subscription is confirmed on the current broker
    /// connection.
    pub fn broker_subscribed(&self) -> bool {
        self.broker_subscribed.load(Ordering::Relaxed)
    }

    pub(crate) fn set_broker_subscribed(&self, subscribed: bool) {
        self.broker_subscribed.store(subscribed, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// The address the HTTP API is bound to, `None` before it is bound or
    /// without `[http]`. Set before `run` connects to the broker.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_http_addr(&self, addr: SocketAddr) {
        *self.http_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        self.changed.notify_waiters();
    }

    /// Adds `n` to a counter of webhook `name` and to its total.
    pub(crate) fn add_webhook(&self, name: &str, counter: WebhookCounter, n: u64) {
        if n == 0 {
            return;
        }
        {
            let mut webhooks = self.webhooks.lock().unwrap_or_else(|e| e.into_inner());
            let entry = webhooks.entry(name.to_string()).or_default();
            match counter {
                WebhookCounter::Queued => entry.queued += n,
                WebhookCounter::Sent => entry.sent += n,
                WebhookCounter::Retries => entry.retries += n,
                WebhookCounter::DroppedFull => entry.dropped_full += n,
                WebhookCounter::DroppedRefused => entry.dropped_refused += n,
            }
        }
        self.add(
            |s| match counter {
                WebhookCounter::Queued => &s.webhook_queued,
                WebhookCounter::Sent => &s.webhook_sent,
                WebhookCounter::Retries => &s.webhook_retries,
                WebhookCounter::DroppedFull => &s.webhook_dropped_full,
                WebhookCounter::DroppedRefused => &s.webhook_dropped_refused,
            },
            n,
        );
    }

    /// Counts one event change by its rule: `opened` (stored for the first
    /// time) and `closed` (reached status closed) as in
    /// [`Stats::events_opened`] and [`Stats::events_closed`], which the
    /// caller counts itself. Both may be true (an event new and already
    /// closed); neither is a no-op.
    // Called by `receive::apply` where it counts `events_opened`; until
    // that call is wired in, only tests use it.
    pub(crate) fn count_event_change(&self, rule: Rule, opened: bool, closed: bool) {
        let i = usize::from(u8::from(rule)) - 1;
        if opened {
            self.events_opened_by_rule[i].fetch_add(1, Ordering::Relaxed);
        }
        if closed {
            self.events_closed_by_rule[i].fetch_add(1, Ordering::Relaxed);
        }
        if opened || closed {
            self.changed.notify_waiters();
        }
    }

    /// Waits until `condition` holds for the counters (checked now and after
    /// every change the ingest makes). Bound it with a timeout.
    pub async fn wait_until(&self, mut condition: impl FnMut(&StatsSnapshot) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Register before checking, so a change in between is not missed.
            changed.as_mut().enable();
            if condition(&self.snapshot()) {
                return;
            }
            changed.await;
        }
    }

    /// Adds `n` to `counter` (a field of `self`) and wakes waiters.
    pub(crate) fn add(&self, counter: impl Fn(&Stats) -> &AtomicU64, n: u64) {
        counter(self).fetch_add(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn wait_until_wakes_on_an_increment() {
        let stats = Arc::new(Stats::default());
        let waiter = {
            let stats = stats.clone();
            tokio::spawn(async move { stats.wait_until(|s| s.batches_applied == 2).await })
        };
        stats.add(|s| &s.batches_applied, 1);
        stats.add(|s| &s.batches_applied, 1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woke")
            .unwrap();
        assert_eq!(stats.snapshot().batches_applied, 2);
    }

    #[test]
    fn event_changes_count_by_rule_number() {
        let stats = Stats::default();
        stats.count_event_change(Rule::R1, true, false);
        stats.count_event_change(Rule::R1, false, true);
        stats.count_event_change(Rule::R5, true, true);
        stats.count_event_change(Rule::R7, true, false);
        stats.count_event_change(Rule::R7, false, false);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.events_opened_by_rule, [1, 0, 0, 0, 1, 0, 1]);
        assert_eq!(snapshot.events_closed_by_rule, [1, 0, 0, 0, 1, 0, 0]);
        // The totals are the caller's.
        assert_eq!((snapshot.events_opened, snapshot.events_closed), (0, 0));
    }
}
