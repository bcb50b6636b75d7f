//! The gateway's Prometheus endpoint (`[metrics] listen`): `GET /metrics`
//! in the text exposition format 0.0.4, `GET /healthz` answering `ok`.
//!
//! Invariants:
//! - [`render`] is a pure function of a [`StatsSnapshot`], the labels and
//!   the virtual time: the server only takes the snapshot and reads the
//!   clock, so the text is tested exactly without a socket;
//! - every series carries `site` and `gateway` labels, escaped as the
//!   format asks (`\\`, `\"`, `\n`);
//! - `facwatch_gateway_polls_total` partitions polls: `ok` yielded values,
//!   `failed` asked the meter and got no values, `skipped` did not ask a
//!   meter that is backing off; the three add up to every poll slot;
//! - `facwatch_gateway_poll_errors_total{meter,kind}` partitions the slots
//!   without values by meter and kind: summed over meters, `timeout +
//!   exception + decode + unreachable` is `polls_total{result="failed"}`
//!   and `backed_off` is `polls_total{result="skipped"}`. Both families
//!   are rendered from one reading of the per-meter counters, so the sums
//!   hold in every scrape, not only once polling is at rest. Every meter of
//!   the gateway has all five kinds from the first scrape (zeros
//!   included): the series are bounded by the site file's meters;
//! - the listener is bound by [`bind`] before polling starts, and the
//!   server stops when its token is cancelled (at the end of `run`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use facwatch_proto::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::{PollCounts, Stats};

/// `Content-Type` of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A moment's copy of [`Stats`], what [`render`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StatsSnapshot {
    /// Per meter, in site-file order.
    pub(crate) polls: Vec<(String, PollCounts)>,
    pub(crate) batches_appended: u64,
    pub(crate) batches_sent: u64,
    pub(crate) batches_resent: u64,
    pub(crate) batches_acked: u64,
    pub(crate) samples_dropped: u64,
    pub(crate) buffer_recoveries: u64,
    pub(crate) buffer_batches: u64,
    pub(crate) buffer_bytes: u64,
    /// Virtual Unix ms; 0 when nothing waits for an ack.
    pub(crate) oldest_unacked_sample_ms: u64,
    pub(crate) acked_seq: u64,
}

impl StatsSnapshot {
    pub(crate) fn of(stats: &Stats) -> StatsSnapshot {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            polls: stats.polls_by_meter(),
            batches_appended: load(&stats.batches_appended),
            batches_sent: load(&stats.batches_sent),
            batches_resent: load(&stats.batches_resent),
            batches_acked: load(&stats.batches_acked),
            samples_dropped: load(&stats.samples_dropped),
            buffer_recoveries: load(&stats.buffer_recoveries),
            buffer_batches: load(&stats.buffer_batches),
            buffer_bytes: load(&stats.buffer_bytes),
            oldest_unacked_sample_ms: load(&stats.oldest_unacked_sample_ms),
            acked_seq: load(&stats.acked_seq),
        }
    }
}

/// Which gateway the series describe.
#[derive(Debug, Clone)]
pub(crate) struct Labels {
    pub(crate) site: String,
    pub(crate) gateway: String,
}

/// The exposition text of `stats` at virtual time `now_ms`.
pub(crate) fn render(stats: &StatsSnapshot, labels: &Labels, now_ms: i64) -> String {
    let base = format!(
        "site=\"{}\",gateway=\"{}\"",
        escape(&labels.site),
        escape(&labels.gateway)
    );
    let mut out = String::with_capacity(2048);
    let mut family = |name: &str, kind: &str, help: &str, series: &[(String, String)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (extra, value) in series {
            out.push_str(&format!("{name}{{{base}{extra}}} {value}\n"));
        }
    };
    let one = |value: u64| [(String::new(), value.to_string())];

    let polls = stats
        .polls
        .iter()
        .fold(PollCounts::default(), |sum, (_, counts)| sum.add(*counts));
    family(
        "facwatch_gateway_polls_total",
        "counter",
        "Poll slots by result: ok (values read), failed (meter asked, no values), skipped (meter backing off, not asked).",
        &[
            (",result=\"ok\"".into(), polls.ok.to_string()),
            (",result=\"failed\"".into(), polls.failed().to_string()),
            (",result=\"skipped\"".into(), polls.skipped().to_string()),
        ],
    );
    let errors: Vec<(String, String)> = stats
        .polls
        .iter()
        .flat_map(|(meter, counts)| {
            let meter = escape(meter);
            [
                ("timeout", counts.timeout),
                ("exception", counts.exception),
                ("decode", counts.decode),
                ("unreachable", counts.unreachable),
                ("backed_off", counts.backed_off),
            ]
            .map(|(kind, value)| {
                (
                    format!(",meter=\"{meter}\",kind=\"{kind}\""),
                    value.to_string(),
                )
            })
        })
        .collect();
    family(
        "facwatch_gateway_poll_errors_total",
        "counter",
        "Poll slots without values, by meter and kind: timeout (no answer in time), exception (Modbus exception), decode (answer did not decode), unreachable (no link), backed_off (not asked while backing off).",
        &errors,
    );
    family(
        "facwatch_gateway_batches_appended_total",
        "counter",
        "Batches stored in the buffer during this run.",
        &one(stats.batches_appended),
    );
    family(
        "facwatch_gateway_batches_sent_total",
        "counter",
        "Batches published to the ingest for the first time during this run.",
        &one(stats.batches_sent),
    );
    family(
        "facwatch_gateway_batches_resent_total",
        "counter",
        "Batches published again after a reconnect or an ack timeout during this run.",
        &one(stats.batches_resent),
    );
    family(
        "facwatch_gateway_batches_acked_total",
        "counter",
        "Batches the ingest's acks removed from the buffer during this run.",
        &one(stats.batches_acked),
    );
    family(
        "facwatch_gateway_samples_dropped_total",
        "counter",
        "Samples the buffer's size and age limits dropped (lifetime of the buffer file).",
        &one(stats.samples_dropped),
    );
    family(
        "facwatch_gateway_buffer_recoveries_total",
        "counter",
        "Unusable buffer files moved aside and replaced during this run.",
        &one(stats.buffer_recoveries),
    );
    family(
        "facwatch_gateway_buffer_batches",
        "gauge",
        "Batches in the buffer waiting for the ingest's ack.",
        &one(stats.buffer_batches),
    );
    family(
        "facwatch_gateway_buffer_bytes",
        "gauge",
        "Encoded bytes of the batches waiting for an ack (the file's overhead not included).",
        &one(stats.buffer_bytes),
    );
    family(
        "facwatch_gateway_oldest_unacked_sample_age_seconds",
        "gauge",
        "Age by the gateway's clock of the oldest sample waiting for an ack; 0 when none waits.",
        &[(
            String::new(),
            unacked_age_secs(stats.oldest_unacked_sample_ms, now_ms),
        )],
    );
    family(
        "facwatch_gateway_acked_seq",
        "gauge",
        "Highest batch seq the ingest has acked.",
        &one(stats.acked_seq),
    );
    out
}

/// Seconds from `oldest_ms` to `now_ms`, never negative; "0" when nothing
/// waits (`oldest_ms == 0`).
fn unacked_age_secs(oldest_ms: u64, now_ms: i64) -> String {
    if oldest_ms == 0 {
        return "0".into();
    }
    let age_ms = (i128::from(now_ms) - i128::from(oldest_ms)).max(0);
    (age_ms as f64 / 1000.0).to_string()
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Binds the metrics listener; the error names the address.
pub(crate) async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics server failed: {0}")]
    Serve(std::io::Error),
}

#[derive(Clone)]
struct Endpoint {
    stats: Arc<Stats>,
    labels: Arc<Labels>,
    clock: Clock,
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` is
/// cancelled.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<Stats>,
    labels: Labels,
    clock: Clock,
    stop: CancellationToken,
) -> Result<(), MetricsError> {
    let endpoint = Endpoint {
        stats,
        labels: Arc::new(labels),
        clock,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(endpoint);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .map_err(MetricsError::Serve)
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let text = render(
        &StatsSnapshot::of(&endpoint.stats),
        &endpoint.labels,
        endpoint.clock.now_ms(),
    );
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels {
            site: "tx-dyeing".into(),
            gateway: "gw-01".into(),
        }
    }

    #[test]
    fn every_series_is_rendered_with_help_type_and_labels() {
        let stats = StatsSnapshot {
            polls: vec![
                (
                    "stenter".into(),
                    PollCounts {
                        ok: 38,
                        timeout: 1,
                        exception: 0,
                        decode: 2,
                        unreachable: 0,
                        backed_off: 0,
                    },
                ),
                (
                    "fan".into(),
                    PollCounts {
                        ok: 2,
                        timeout: 0,
                        exception: 1,
                        decode: 0,
                        unreachable: 0,
                        backed_off: 3,
                    },
                ),
            ],
            batches_appended: 5,
            batches_sent: 4,
            batches_resent: 2,
            batches_acked: 3,
            samples_dropped: 9,
            buffer_recoveries: 1,
            buffer_batches: 3,
            buffer_bytes: 1234,
            oldest_unacked_sample_ms: 1_670_860_800_000,
            acked_seq: 17,
        };
        let text = render(&stats, &labels(), 1_670_860_812_500);
        let l = "site=\"tx-dyeing\",gateway=\"gw-01\"";
        let expected = format!(
            "\
# HELP facwatch_gateway_polls_total Poll slots by result: ok (values read), failed (meter asked, no values), skipped (meter backing off, not asked).
# TYPE facwatch_gateway_polls_total counter
facwatch_gateway_polls_total{{{l},result=\"ok\"}} 40
facwatch_gateway_polls_total{{{l},result=\"failed\"}} 4
facwatch_gateway_polls_total{{{l},result=\"skipped\"}} 3
# HELP facwatch_gateway_poll_errors_total Poll slots without values, by meter and kind: timeout (no answer in time), exception (Modbus exception), decode (answer did not decode), unreachable (no link), backed_off (not asked while backing off).
# TYPE facwatch_gateway_poll_errors_total counter
facwatch_gateway_poll_errors_total{{{l},meter=\"stenter\",kind=\"timeout\"}} 1
facwatch_gateway_poll_errors_total{{{l},meter=\"stenter\",kind=\"exception\"}} 0
facwatch_gateway_poll_errors_total{{{l},meter=\"stenter\",kind=\"decode\"}} 2
facwatch_gateway_poll_errors_total{{{l},meter=\"stenter\",kind=\"unreachable\"}} 0
facwatch_gateway_poll_errors_total{{{l},meter=\"stenter\",kind=\"backed_off\"}} 0
facwatch_gateway_poll_errors_total{{{l},meter=\"fan\",kind=\"timeout\"}} 0
facwatch_gateway_poll_errors_total{{{l},meter=\"fan\",kind=\"exception\"}} 1
facwatch_gateway_poll_errors_total{{{l},meter=\"fan\",kind=\"decode\"}} 0
facwatch_gateway_poll_errors_total{{{l},meter=\"fan\",kind=\"unreachable\"}} 0
facwatch_gateway_poll_errors_total{{{l},meter=\"fan\",kind=\"backed_off\"}} 3
# HELP facwatch_gateway_batches_appended_total Batches stored in the buffer during this run.
# TYPE facwatch_gateway_batches_appended_total counter
facwatch_gateway_batches_appended_total{{{l}}} 5
# HELP facwatch_gateway_batches_sent_total Batches published to the ingest for the first time during this run.
# TYPE facwatch_gateway_batches_sent_total counter
facwatch_gateway_batches_sent_total{{{l}}} 4
# HELP facwatch_gateway_batches_resent_total Batches published again after a reconnect or an ack timeout during this run.
# TYPE facwatch_gateway_batches_resent_total counter
facwatch_gateway_batches_resent_total{{{l}}} 2
# HELP facwatch_gateway_batches_acked_total Batches the ingest's acks removed from the buffer during this run.
# TYPE facwatch_gateway_batches_acked_total counter
facwatch_gateway_batches_acked_total{{{l}}} 3
# HELP facwatch_gateway_samples_dropped_total Samples the buffer's size and age limits dropped (lifetime of the buffer file).
# TYPE facwatch_gateway_samples_dropped_total counter
facwatch_gateway_samples_dropped_total{{{l}}} 9
# HELP facwatch_gateway_buffer_recoveries_total Unusable buffer files moved aside and replaced during this run.
# TYPE facwatch_gateway_buffer_recoveries_total counter
facwatch_gateway_buffer_recoveries_total{{{l}}} 1
# HELP facwatch_gateway_buffer_batches Batches in the buffer waiting for the ingest's ack.
# TYPE facwatch_gateway_buffer_batches gauge
facwatch_gateway_buffer_batches{{{l}}} 3
# HELP facwatch_gateway_buffer_bytes Encoded bytes of the batches waiting for an ack (the file's overhead not included).
# TYPE facwatch_gateway_buffer_bytes gauge
facwatch_gateway_buffer_bytes{{{l}}} 1234
# HELP facwatch_gateway_oldest_unacked_sample_age_seconds Age by the gateway's clock of the oldest sample waiting for an ack; 0 when none waits.
# TYPE facwatch_gateway_oldest_unacked_sample_age_seconds gauge
facwatch_gateway_oldest_unacked_sample_age_seconds{{{l}}} 12.5
# HELP facwatch_gateway_acked_seq Highest batch seq the ingest has acked.
# TYPE facwatch_gateway_acked_seq gauge
facwatch_gateway_acked_seq{{{l}}} 17
"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn an_empty_buffer_has_age_zero_and_a_clock_behind_the_sample_never_goes_negative() {
        let age_line = |oldest_ms, now_ms| {
            let stats = StatsSnapshot {
                oldest_unacked_sample_ms: oldest_ms,
                ..StatsSnapshot::default()
            };
            render(&stats, &labels(), now_ms)
                .lines()
                .find(|l| l.starts_with("facwatch_gateway_oldest_unacked_sample_age_seconds{"))
                .unwrap()
                .rsplit_once(' ')
                .unwrap()
                .1
                .to_string()
        };
        assert_eq!(age_line(0, 1_670_860_800_000), "0");
        assert_eq!(age_line(1_670_860_800_000, 1_670_860_799_000), "0");
        assert_eq!(age_line(1_670_860_800_000, 1_670_860_800_001), "0.001");
        assert_eq!(age_line(1_670_860_800_000, 1_670_860_860_000), "60");
    }

    #[test]
    fn label_values_are_escaped() {
        let labels = Labels {
            site: "a\"b\\c\nd".into(),
            gateway: "gw".into(),
        };
        let text = render(&StatsSnapshot::default(), &labels, 0);
        assert!(
            text.contains(
                "facwatch_gateway_acked_seq{site=\"a\\\"b\\\\c\\nd\",gateway=\"gw\"} 0\n"
            ),
            "{text}"
        );
    }

    /// The values of `family` in `text`, by the labels after `site` and
    /// `gateway`.
    fn series(text: &str, family: &str) -> Vec<(String, u64)> {
        let prefix = format!("{family}{{site=\"tx-dyeing\",gateway=\"gw-01\"");
        text.lines()
            .filter_map(|line| {
                let (labels, value) = line.strip_prefix(&prefix)?.rsplit_once("} ")?;
                Some((
                    labels.trim_start_matches(',').to_string(),
                    value.parse().ok()?,
                ))
            })
            .collect()
    }

    #[test]
    fn poll_errors_by_kind_partition_the_failed_and_skipped_polls() {
        let counts = |ok, timeout, exception, decode, unreachable, backed_off| PollCounts {
            ok,
            timeout,
            exception,
            decode,
            unreachable,
            backed_off,
        };
        let stats = StatsSnapshot {
            polls: vec![
                ("a".into(), counts(7, 1, 2, 3, 4, 5)),
                ("b".into(), counts(1, 10, 20, 30, 40, 50)),
                ("c".into(), counts(0, 0, 0, 0, 0, 0)),
            ],
            ..StatsSnapshot::default()
        };
        let text = render(&stats, &labels(), 0);
        assert_eq!(
            series(&text, "facwatch_gateway_polls_total"),
            vec![
                ("result=\"ok\"".to_string(), 8),
                ("result=\"failed\"".to_string(), 110),
                ("result=\"skipped\"".to_string(), 55),
            ]
        );
        let errors = series(&text, "facwatch_gateway_poll_errors_total");
        assert_eq!(
            errors.len(),
            3 * 5,
            "every meter has every kind: {errors:?}"
        );
        let sum = |kinds: &[&str]| -> u64 {
            errors
                .iter()
                .filter(|(labels, _)| {
                    kinds
                        .iter()
                        .any(|k| labels.ends_with(&format!("kind=\"{k}\"")))
                })
                .map(|(_, v)| v)
                .sum()
        };
        assert_eq!(sum(&["timeout", "exception", "decode", "unreachable"]), 110);
        assert_eq!(sum(&["backed_off"]), 55);
        assert!(errors.contains(&("meter=\"b\",kind=\"unreachable\"".to_string(), 40)));
        assert!(errors.contains(&("meter=\"c\",kind=\"timeout\"".to_string(), 0)));
    }

    #[test]
    fn a_gateway_with_no_meter_counted_yet_has_zero_polls_and_no_error_series() {
        let text = render(&StatsSnapshot::default(), &labels(), 0);
        assert_eq!(
            series(&text, "facwatch_gateway_polls_total"),
            vec![
                ("result=\"ok\"".to_string(), 0),
                ("result=\"failed\"".to_string(), 0),
                ("result=\"skipped\"".to_string(), 0),
            ]
        );
        assert!(series(&text, "facwatch_gateway_poll_errors_total").is_empty());
        assert!(text.contains("# TYPE facwatch_gateway_poll_errors_total counter\n"));
    }

    #[test]
    fn meter_label_values_are_escaped() {
        let stats = StatsSnapshot {
            polls: vec![("m\"1".into(), PollCounts::default())],
            ..StatsSnapshot::default()
        };
        let text = render(&stats, &labels(), 0);
        assert!(
            text.contains("meter=\"m\\\"1\",kind=\"timeout\"} 0\n"),
            "{text}"
        );
    }
}
