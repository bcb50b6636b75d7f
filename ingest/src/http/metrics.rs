//! Prometheus text exposition of the ingest: a pure renderer of a
//! [`StatsSnapshot`] and the outbox depths (InfluxDB, webhooks) read from
//! the store.
//!
//! Every counter is named after its `Stats` field with the
//! `facwatch_ingest_` prefix and the `_total` suffix, except the three
//! reject counters (one family, label `reason`) and the event counters (one
//! family, labels `change` and `rule`: every rule R1-R7 always has both
//! series, so a rate over a rule that never fired is 0, not absent). The
//! gauges: `facwatch_ingest_influx_outbox_lines` and `_bytes` (one series
//! each, none without `[influxdb]`) and
//! `facwatch_ingest_webhook_outbox_depth` (a series per configured
//! webhook). The output is deterministic: families in a fixed
//! order, each with `# HELP` and `# TYPE` lines, series in label order.

use std::fmt::Write;

use crate::detect::Rule;
use crate::{InfluxOutboxDepth, StatsSnapshot};

/// One metric family: name (without prefix, and for counters without
/// `_total`), type, help, samples as (labels, value).
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<(String, u64)>,
}

/// A counter family before it becomes a [`Family`]: name, help, samples.
type Counter = (&'static str, &'static str, Vec<(String, u64)>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// Notices waiting in one webhook's on-disk outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxDepth {
    pub(crate) webhook: String,
    pub(crate) notices: u64,
}

/// Renders `s`, the InfluxDB outbox (`None` without `[influxdb]`) and the
/// webhook `outboxes` in the Prometheus text format (version 0.0.4).
pub(crate) fn render(
    s: &StatsSnapshot,
    influx: Option<InfluxOutboxDepth>,
    outboxes: &[OutboxDepth],
) -> String {
    let one = |v: u64| vec![(String::new(), v)];
    let counters: Vec<Counter> = vec![
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
                (r#"reason="too_large""#.to_string(), s.rejected_too_large),
                (r#"reason="bad_mac""#.to_string(), s.rejected_bad_mac),
                (r#"reason="decode""#.to_string(), s.rejected_decode),
                (
                    r#"reason="unknown_gateway""#.to_string(),
                    s.rejected_unknown_gateway,
                ),
                (
                    r#"reason="gateway_mismatch""#.to_string(),
                    s.rejected_gateway_mismatch,
                ),
            ],
        ),
        (
            "apply_failures",
            "Batches whose detector run or store commit failed (not acked).",
            one(s.apply_failures),
        ),
        (
            "events",
            "Event changes by rule: opened (stored for the first time) and closed.",
            event_changes(s),
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
            "mqtt_logins_refused",
            "CONNECTs with a login the embedded broker refused (unknown user or wrong password).",
            one(s.logins_refused),
        ),
        (
            "mqtt_tls_handshakes_failed",
            "TLS connections to the embedded broker that failed their handshake or found it full.",
            one(s.tls_handshakes_failed),
        ),
        (
            "http_unauthorized",
            "HTTP API requests refused for a missing or wrong bearer token.",
            one(s.api_unauthorized),
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
        (
            "batches_deferred",
            "Batches not applied nor acked because the InfluxDB outbox was full (the gateways resend them).",
            one(s.batches_deferred),
        ),
        (
            "influx_lines_queued",
            "Line protocol lines (readings and event changes) queued for InfluxDB.",
            one(s.influx_lines_queued),
        ),
        (
            "influx_lines_written",
            "Lines InfluxDB accepted.",
            one(s.influx_lines_written),
        ),
        (
            "influx_requests",
            "Write requests InfluxDB accepted.",
            one(s.influx_requests),
        ),
        (
            "influx_lines_refused",
            "Lines of writes InfluxDB refused with a 4xx other than 408 and 429 (dropped).",
            one(s.influx_lines_refused),
        ),
        (
            "influx_write_errors",
            "InfluxDB write requests that failed (refused, or retried after a connection error, timeout, 408, 429 or 5xx).",
            one(s.influx_write_errors),
        ),
    ];
    let mut families: Vec<Family> = counters
        .into_iter()
        .map(|(name, help, samples)| Family {
            name,
            kind: Kind::Counter,
            help,
            samples,
        })
        .collect();
    for (name, help, value) in [
        (
            "influx_outbox_lines",
            "Lines waiting in the on-disk InfluxDB outbox.",
            influx.map(|d| d.lines),
        ),
        (
            "influx_outbox_bytes",
            "Bytes waiting in the InfluxDB outbox: the applied batches (about 64 bytes a sample) and event lines; at max_outbox_bytes the ingest stops applying batches.",
            influx.map(|d| d.bytes),
        ),
    ] {
        families.push(Family {
            name,
            kind: Kind::Gauge,
            help,
            samples: value.map(|v| (String::new(), v)).into_iter().collect(),
        });
    }
    families.push(Family {
        name: "webhook_outbox_depth",
        kind: Kind::Gauge,
        help: "Notices in a webhook's on-disk outbox, not yet delivered.",
        samples: outboxes
            .iter()
            .map(|o| (format!("webhook=\"{}\"", escape(&o.webhook)), o.notices))
            .collect(),
    });
    let mut text = String::new();
    for family in families {
        let (name, kind) = match family.kind {
            Kind::Counter => (format!("facwatch_ingest_{}_total", family.name), "counter"),
            Kind::Gauge => (format!("facwatch_ingest_{}", family.name), "gauge"),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(text, "# HELP {name} {}", family.help);
        let _ = writeln!(text, "# TYPE {name} {kind}");
        for (labels, value) in family.samples {
            if labels.is_empty() {
                let _ = writeln!(text, "{name} {value}");
            } else {
                let _ = writeln!(text, "{name}{{{labels}}} {value}");
            }
        }
    }
    text
}

/// The 14 series of the event family: opened then closed, R1 to R7 each.
fn event_changes(s: &StatsSnapshot) -> Vec<(String, u64)> {
    [
        ("opened", &s.events_opened_by_rule),
        ("closed", &s.events_closed_by_rule),
    ]
    .into_iter()
    .flat_map(|(change, by_rule)| {
        Rule::ALL
            .iter()
            .zip(by_rule)
            .map(move |(rule, &n)| (format!("change=\"{change}\",rule=\"{}\"", rule.as_str()), n))
    })
    .collect()
}

/// A label value as the text format needs it: `\`, `"` and newlines
/// escaped (webhook names are plain ids, but the renderer does not rely on
/// the config's validation).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_type_and_labels() {
        let snapshot = StatsSnapshot {
            batches_applied: 3,
            samples_applied: 90,
            rejected_decode: 1,
            rejected_gateway_mismatch: 2,
            // The totals are not rendered: the family is by rule.
            events_opened: 4,
            events_closed: 5,
            events_opened_by_rule: [1, 0, 0, 0, 2, 0, 1],
            events_closed_by_rule: [1, 0, 0, 0, 3, 0, 1],
            webhook_sent: 6,
            alerts_cleared: 7,
            ..StatsSnapshot::default()
        };
        let outboxes = [
            OutboxDepth {
                webhook: "ops".into(),
                notices: 12,
            },
            OutboxDepth {
                webhook: "platform".into(),
                notices: 0,
            },
        ];
        let influx = InfluxOutboxDepth {
            lines: 40,
            bytes: 9000,
        };
        let text = render(&snapshot, Some(influx), &outboxes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            vec![
                "facwatch_ingest_batches_applied_total 3",
                "facwatch_ingest_samples_applied_total 90",
                "facwatch_ingest_batches_duplicate_total 0",
                "facwatch_ingest_sequence_gaps_total 0",
                "facwatch_ingest_batches_out_of_order_total 0",
                "facwatch_ingest_batches_rejected_total{reason=\"too_large\"} 0",
                "facwatch_ingest_batches_rejected_total{reason=\"bad_mac\"} 0",
                "facwatch_ingest_batches_rejected_total{reason=\"decode\"} 1",
                "facwatch_ingest_batches_rejected_total{reason=\"unknown_gateway\"} 0",
                "facwatch_ingest_batches_rejected_total{reason=\"gateway_mismatch\"} 2",
                "facwatch_ingest_apply_failures_total 0",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R1\"} 1",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R2\"} 0",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R3\"} 0",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R4\"} 0",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R5\"} 2",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R6\"} 0",
                "facwatch_ingest_events_total{change=\"opened\",rule=\"R7\"} 1",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R1\"} 1",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R2\"} 0",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R3\"} 0",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R4\"} 0",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R5\"} 3",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R6\"} 0",
                "facwatch_ingest_events_total{change=\"closed\",rule=\"R7\"} 1",
                "facwatch_ingest_data_interruptions_total 0",
                "facwatch_ingest_groups_committed_total 0",
                "facwatch_ingest_acks_published_total 0",
                "facwatch_ingest_mqtt_logins_refused_total 0",
                "facwatch_ingest_mqtt_tls_handshakes_failed_total 0",
                "facwatch_ingest_http_unauthorized_total 0",
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
                "facwatch_ingest_batches_deferred_total 0",
                "facwatch_ingest_influx_lines_queued_total 0",
                "facwatch_ingest_influx_lines_written_total 0",
                "facwatch_ingest_influx_requests_total 0",
                "facwatch_ingest_influx_lines_refused_total 0",
                "facwatch_ingest_influx_write_errors_total 0",
                "facwatch_ingest_influx_outbox_lines 40",
                "facwatch_ingest_influx_outbox_bytes 9000",
                "facwatch_ingest_webhook_outbox_depth{webhook=\"ops\"} 12",
                "facwatch_ingest_webhook_outbox_depth{webhook=\"platform\"} 0",
            ]
        );
        assert!(text.starts_with(
            "# HELP facwatch_ingest_batches_applied_total Batches applied (new seq, committed).\n\
             # TYPE facwatch_ingest_batches_applied_total counter\n\
             facwatch_ingest_batches_applied_total 3\n"
        ));
        assert!(text.ends_with(
            "# HELP facwatch_ingest_webhook_outbox_depth Notices in a webhook's on-disk outbox, not yet delivered.\n\
             # TYPE facwatch_ingest_webhook_outbox_depth gauge\n\
             facwatch_ingest_webhook_outbox_depth{webhook=\"ops\"} 12\n\
             facwatch_ingest_webhook_outbox_depth{webhook=\"platform\"} 0\n"
        ));
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        assert_eq!(types.len(), 35);
        assert_eq!(types.iter().filter(|l| l.ends_with(" counter")).count(), 32);
    }

    #[test]
    fn the_readme_lists_every_family_with_its_type() {
        let readme = include_str!("../../../README.md");
        let text = render(&StatsSnapshot::default(), None, &[]);
        for declared in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = declared.split_once(' ').unwrap();
            let row = readme
                .lines()
                .find(|l| {
                    l.strip_prefix("| `")
                        .and_then(|rest| rest.strip_prefix(name))
                        .is_some_and(|rest| rest.starts_with('`') || rest.starts_with('{'))
                })
                .unwrap_or_else(|| panic!("README has no row for {name}"));
            assert!(row.contains(&format!("` | {kind} | ")), "{row}");
        }
    }

    #[test]
    fn without_webhooks_the_gauge_family_has_no_series() {
        let text = render(&StatsSnapshot::default(), None, &[]);
        assert!(text.ends_with("# TYPE facwatch_ingest_webhook_outbox_depth gauge\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(
            &StatsSnapshot::default(),
            None,
            &[OutboxDepth {
                webhook: "a\"b\\c\nd".into(),
                notices: 1,
            }],
        );
        assert!(
            text.ends_with("facwatch_ingest_webhook_outbox_depth{webhook=\"a\\\"b\\\\c\\nd\"} 1\n")
        );
    }
}
