//! Prometheus text exposition of [`StatsSnapshot`]: a pure renderer.
//!
//! Every counter is named after its `Stats` field with the
//! `facwatch_ingest_` prefix and the `_total` suffix, except the three
//! reject counters (one family, label `reason`) and the event counters (one
//! family, label `change`). The output is deterministic: families in a
//! fixed order, each with `# HELP` and `# TYPE` lines.

use std::fmt::Write;

use crate::StatsSnapshot;

/// One counter family: name (without prefix and `_total`), help, samples
/// as (labels, value).
type Family = (&'static str, &'static str, Vec<(&'static str, u64)>);

/// Renders `s` in the Prometheus text format (version 0.0.4).
pub(crate) fn render(s: &StatsSnapshot) -> String {
    let one = |v: u64| vec![("", v)];
    let families: Vec<Family> = vec![
        (
            "batches_applied",
            "Batches applied (new seq, committed).",
            one(s.batches_applied),
        ),
        (
            "samples_applied",
            "Samples in applied batches.",
            one(s.samples_applied),
        ),
        (
            "batches_duplicate",
            "Batches with seq <= last_seq: ignored and re-acked.",
            one(s.batches_duplicate),
        ),
        (
            "sequence_gaps",
            "Applied batches whose seq skipped at least one number.",
            one(s.sequence_gaps),
        ),
        (
            "batches_out_of_order",
            "Batches past an undeclared gap: ignored, re-acked.",
            one(s.batches_out_of_order),
        ),
        (
            "batches_rejected",
            "Batches rejected, by reason.",
            vec![
                ("reason=\"decode\"", s.rejected_decode),
                ("reason=\"unknown_gateway\"", s.rejected_unknown_gateway),
                ("reason=\"gateway_mismatch\"", s.rejected_gateway_mismatch),
            ],
        ),
        (
            "apply_failures",
            "Batches whose detector run or store commit failed (not acked).",
            one(s.apply_failures),
        ),
        (
            "events",
            "Event changes: opened (seen for the first time) and closed.",
            vec![
                ("change=\"opened\"", s.events_opened),
                ("change=\"closed\"", s.events_closed),
            ],
        ),
        (
            "data_interruptions",
            "R5 events for samples a gateway discarded.",
            one(s.data_interruptions),
        ),
        (
            "groups_committed",
            "Store transactions that applied batches.",
            one(s.groups_committed),
        ),
        (
            "acks_published",
            "Acks queued for the broker.",
            one(s.acks_published),
        ),
        (
            "publishes_dropped",
            "Acks and event messages dropped because the MQTT client stayed busy.",
            one(s.publishes_dropped),
        ),
        (
            "broker_subscriptions",
            "Batch subscriptions the broker confirmed.",
            one(s.broker_subscriptions),
        ),
        (
            "broker_connection_failures",
            "Failed connection attempts and lost connections to the broker.",
            one(s.broker_connection_failures),
        ),
        (
            "webhook_queued",
            "Notices queued for webhooks (one per webhook per notice).",
            one(s.webhook_queued),
        ),
        (
            "webhook_sent",
            "Notices a webhook answered with 2xx.",
            one(s.webhook_sent),
        ),
        (
            "webhook_retries",
            "Webhook POSTs that failed in a way worth retrying.",
            one(s.webhook_retries),
        ),
        (
            "webhook_dropped_full",
            "Oldest notices dropped because a webhook's outbox was full.",
            one(s.webhook_dropped_full),
        ),
        (
            "webhook_dropped_refused",
            "Notices a webhook refused with a 4xx other than 429.",
            one(s.webhook_dropped_refused),
        ),
        (
            "notices_historical",
            "Event changes found in a replay: summarised, not sent one by one.",
            one(s.notices_historical),
        ),
        (
            "replay_summaries",
            "Replay summaries completed.",
            one(s.replay_summaries),
        ),
        (
            "alerts_raised",
            "gateway_silent alerts raised.",
            one(s.alerts_raised),
        ),
        (
            "alerts_cleared",
            "gateway_back: silent gateways that sent a batch again.",
            one(s.alerts_cleared),
        ),
    ];
    let mut text = String::new();
    for (name, help, samples) in families {
        let name = format!("facwatch_ingest_{name}_total");
        // Writing to a String cannot fail.
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} counter");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(text, "{name} {value}");
            } else {
                let _ = writeln!(text, "{name}{{{labels}}} {value}");
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_with_help_type_and_labels() {
        let snapshot = StatsSnapshot {
            batches_applied: 3,
            samples_applied: 90,
            rejected_decode: 1,
            rejected_gateway_mismatch: 2,
            events_opened: 4,
            events_closed: 5,
            webhook_sent: 6,
            alerts_cleared: 7,
            ..StatsSnapshot::default()
        };
        let text = render(&snapshot);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            vec![
                "facwatch_ingest_batches_applied_total 3",
                "facwatch_ingest_samples_applied_total 90",
                "facwatch_ingest_batches_duplicate_total 0",
                "facwatch_ingest_sequence_gaps_total 0",
                "facwatch_ingest_batches_out_of_order_total 0",
                "facwatch_ingest_batches_rejected_total{reason=\"decode\"} 1",
                "facwatch_ingest_batches_rejected_total{reason=\"unknown_gateway\"} 0",
                "facwatch_ingest_batches_rejected_total{reason=\"gateway_mismatch\"} 2",
                "facwatch_ingest_apply_failures_total 0",
                "facwatch_ingest_events_total{change=\"opened\"} 4",
                "facwatch_ingest_events_total{change=\"closed\"} 5",
                "facwatch_ingest_data_interruptions_total 0",
                "facwatch_ingest_groups_committed_total 0",
                "facwatch_ingest_acks_published_total 0",
                "facwatch_ingest_publishes_dropped_total 0",
                "facwatch_ingest_broker_subscriptions_total 0",
                "facwatch_ingest_broker_connection_failures_total 0",
                "facwatch_ingest_webhook_queued_total 0",
                "facwatch_ingest_webhook_sent_total 6",
                "facwatch_ingest_webhook_retries_total 0",
                "facwatch_ingest_webhook_dropped_full_total 0",
                "facwatch_ingest_webhook_dropped_refused_total 0",
                "facwatch_ingest_notices_historical_total 0",
                "facwatch_ingest_replay_summaries_total 0",
                "facwatch_ingest_alerts_raised_total 0",
                "facwatch_ingest_alerts_cleared_total 7",
            ]
        );
        assert!(text.starts_with(
            "# HELP facwatch_ingest_batches_applied_total Batches applied (new seq, committed).\n\
             # TYPE facwatch_ingest_batches_applied_total counter\n\
             facwatch_ingest_batches_applied_total 3\n"
        ));
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 23);
    }
}
