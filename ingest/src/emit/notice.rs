//! Human notices: which event changes become one, which are summarised, and
//! the JSON every webhook receives. Pure: no I/O, no clock (wall time is
//! passed in).
//!
//! Rules:
//! - An event change is noticed once per phase: `close` when the change
//!   closed it (also for an event new and already closed: one notice, not
//!   two), else `open` when it is new; a widened open event is not noticed.
//! - A phase is **historical** when its data lags wall time by more than
//!   the lag: for `close` the event's end, for `open` the newest sample of
//!   the batch that opened it. A historical phase is not sent; an event
//!   first seen in a historical phase is counted in its gateway's pending
//!   [`ReplaySummary`] instead. (A historical open whose close arrives live
//!   is sent at close.)
//! - Every notice has an idempotency key `<id>:<phase>`: the event id, the
//!   summary id (hash of gateway and span) or the alert id (hash of
//!   gateway, kind and time), so a receiver can drop repeats.

use std::collections::BTreeMap;

use chrono::{SecondsFormat, TimeZone};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::detect::Event;

/// A notice as queued for the webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notice {
    /// `Idempotency-Key`: `<id>:<phase>`.
    pub(crate) key: String,
    /// The JSON body.
    pub(crate) body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Open,
    Close,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Open => "open",
            Phase::Close => "close",
        }
    }
}

/// What to do with one event change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// No notice (a widened open event).
    Silent,
    /// Send now.
    Live(Phase),
    /// Found in a replay: summarise (count it when `first_seen`).
    Historical { first_seen: bool },
}

/// Decides the notice of a change (see the module doc). `data_time_ms` is
/// the newest sample of the batch that produced the change.
pub(crate) fn route(
    event: &Event,
    opened: bool,
    closed: bool,
    data_time_ms: i64,
    wall_now_ms: i64,
    lag_ms: i64,
) -> Route {
    let (phase, time_ms) = if closed {
        (Phase::Close, event.end_ms.unwrap_or(data_time_ms))
    } else if opened {
        (Phase::Open, data_time_ms)
    } else {
        return Route::Silent;
    };
    if wall_now_ms - time_ms > lag_ms {
        Route::Historical { first_seen: opened }
    } else {
        Route::Live(phase)
    }
}

/// The notice of a live event phase: the event JSON (as on MQTT) plus
/// `"phase"`.
pub(crate) fn event_notice(event: &Event, phase: Phase, tz: chrono_tz::Tz) -> Notice {
    let mut json = event.to_json(tz);
    if let Some(fields) = json.as_object_mut() {
        fields.insert("phase".into(), phase.as_str().into());
    }
    Notice {
        key: format!("{}:{}", event.id, phase.as_str()),
        body: serde_json::to_vec(&json).expect("JSON values serialize"),
    }
}

/// The historical events of one gateway's replay not yet summarised.
/// Persisted (JSON) in the store with the events it counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReplaySummary {
    pub(crate) site: String,
    pub(crate) site_name: String,
    pub(crate) gateway: String,
    /// IANA name of the site's time zone.
    pub(crate) time_zone: String,
    /// Events by rule ("R1" -> 3).
    pub(crate) by_rule: BTreeMap<String, u64>,
    /// Earliest start and latest end (or start) of the counted events.
    pub(crate) start_ms: i64,
    pub(crate) end_ms: i64,
}

impl ReplaySummary {
    pub(crate) fn new(site: &facwatch_proto::site::Site, gateway: &str) -> ReplaySummary {
        ReplaySummary {
            site: site.id.clone(),
            site_name: site.name.clone(),
            gateway: gateway.to_string(),
            time_zone: site.time_zone.name().to_string(),
            by_rule: BTreeMap::new(),
            start_ms: i64::MAX,
            end_ms: i64::MIN,
        }
    }

    pub(crate) fn count(&mut self, event: &Event) {
        *self
            .by_rule
            .entry(event.rule.as_str().to_string())
            .or_default() += 1;
        self.start_ms = self.start_ms.min(event.start_ms);
        self.end_ms = self
            .end_ms
            .max(event.end_ms.unwrap_or(event.start_ms))
            .max(event.start_ms);
    }

    pub(crate) fn total(&self) -> u64 {
        self.by_rule.values().sum()
    }

    pub(crate) fn id(&self) -> String {
        short_hash(&[
            self.site.as_bytes(),
            self.gateway.as_bytes(),
            &self.start_ms.to_be_bytes(),
            &self.end_ms.to_be_bytes(),
        ])
    }

    fn tz(&self) -> chrono_tz::Tz {
        self.time_zone.parse().unwrap_or(chrono_tz::UTC)
    }

    /// "R1 ×3, R5 ×1" style list, in rule order.
    fn rules_text(&self) -> String {
        self.by_rule
            .iter()
            .map(|(rule, n)| format!("{rule} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn text_en(&self) -> String {
        format!(
            "{}: gateway {} delivered buffered data; {} historical event(s) between {} and {} ({}). They are stored; no individual alarms were sent.",
            self.site_name,
            self.gateway,
            self.total(),
            minute(self.start_ms, self.tz()),
            minute(self.end_ms, self.tz()),
            self.rules_text()
        )
    }

    pub(crate) fn text_zh(&self) -> String {
        format!(
            "{}：网关{}补传缓存数据，{}至{}期间共{}条历史事件（{}），已入库，未逐条告警。",
            self.site_name,
            self.gateway,
            minute(self.start_ms, self.tz()),
            minute(self.end_ms, self.tz()),
            self.total(),
            self.rules_text()
        )
    }

    /// The JSON of the summary (webhook body with `phase`, MQTT alert
    /// without).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "replay_summary",
            "id": self.id(),
            "site": self.site,
            "gateway": self.gateway,
            "count": self.total(),
            "by_rule": self.by_rule,
            "start": rfc3339(self.start_ms, self.tz()),
            "end": rfc3339(self.end_ms, self.tz()),
            "historical": true,
            "notice": { "en": self.text_en(), "zh": self.text_zh() },
        })
    }

    pub(crate) fn notice(&self) -> Notice {
        with_phase(self.to_json(), format!("{}:summary", self.id()), "summary")
    }
}

/// A connectivity alert: not an event, never stored as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alert {
    pub(crate) kind: AlertKind,
    pub(crate) site: String,
    pub(crate) gateway: String,
    /// Wall time of the gateway's last batch (or of the ingest's start when
    /// it sent none since), ms UTC.
    pub(crate) since_ms: i64,
    /// When the alert was raised or cleared, ms UTC.
    pub(crate) at_ms: i64,
    pub(crate) time_zone: chrono_tz::Tz,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AlertKind {
    GatewaySilent,
    GatewayBack,
}

impl AlertKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AlertKind::GatewaySilent => "gateway_silent",
            AlertKind::GatewayBack => "gateway_back",
        }
    }
}

impl Alert {
    pub(crate) fn id(&self) -> String {
        short_hash(&[
            self.kind.as_str().as_bytes(),
            self.gateway.as_bytes(),
            &self.since_ms.to_be_bytes(),
        ])
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let since = rfc3339(self.since_ms, self.time_zone);
        let at = rfc3339(self.at_ms, self.time_zone);
        let (en, zh) = match self.kind {
            AlertKind::GatewaySilent => (
                format!("Gateway {} has sent no data since {since}.", self.gateway),
                format!("网关{}自{since}起未上传数据。", self.gateway),
            ),
            AlertKind::GatewayBack => (
                format!(
                    "Gateway {} is sending data again (silent since {since}).",
                    self.gateway
                ),
                format!("网关{}已恢复上传数据（自{since}起中断）。", self.gateway),
            ),
        };
        serde_json::json!({
            "kind": self.kind.as_str(),
            "id": self.id(),
            "site": self.site,
            "gateway": self.gateway,
            "since": since,
            "at": at,
            "notice": { "en": en, "zh": zh },
        })
    }

    pub(crate) fn notice(&self) -> Notice {
        with_phase(self.to_json(), format!("{}:alert", self.id()), "alert")
    }
}

fn with_phase(mut json: serde_json::Value, key: String, phase: &str) -> Notice {
    if let Some(fields) = json.as_object_mut() {
        fields.insert("phase".into(), phase.into());
    }
    Notice {
        key,
        body: serde_json::to_vec(&json).expect("JSON values serialize"),
    }
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
        hash.update([0]);
    }
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn local(ms: i64, tz: chrono_tz::Tz) -> chrono::DateTime<chrono_tz::Tz> {
    tz.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(|| tz.timestamp_millis_opt(0).single().expect("epoch exists"))
}

/// RFC 3339 with the zone's offset, like the event JSON.
pub(crate) fn rfc3339(ms: i64, tz: chrono_tz::Tz) -> String {
    let format = if ms % 1000 == 0 {
        SecondsFormat::Secs
    } else {
        SecondsFormat::Millis
    };
    local(ms, tz).to_rfc3339_opts(format, false)
}

fn minute(ms: i64, tz: chrono_tz::Tz) -> String {
    local(ms, tz).format("%Y-%m-%d %H:%M").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{EventStatus, Rule};

    const NINE_AM_MS: i64 = 1_670_893_200_000;
    const MINUTE_MS: i64 = 60_000;
    const LAG_MS: i64 = 15 * MINUTE_MS;

    fn event(start_ms: i64, end_ms: Option<i64>) -> Event {
        Event {
            id: "e1".into(),
            site: "plant".into(),
            gateway: "gw-a".into(),
            line: "line-a".into(),
            rule: Rule::R1,
            status: if end_ms.is_some() {
                EventStatus::Closed
            } else {
                EventStatus::Open
            },
            start_ms,
            end_ms,
            facilities: vec!["a-fan".into()],
            historical: false,
            notice_en: "en".into(),
            notice_zh: "zh".into(),
            data_loss: None,
            evidence: Default::default(),
        }
    }

    #[test]
    fn routes_follow_the_phase_and_the_lag_behind_wall_time() {
        let now = NINE_AM_MS + 60 * MINUTE_MS;
        let open = event(NINE_AM_MS, None);
        let closed = event(NINE_AM_MS, Some(now - LAG_MS));
        let old_close = event(NINE_AM_MS, Some(now - LAG_MS - 1));
        assert_eq!(
            route(&open, true, false, now - LAG_MS, now, LAG_MS),
            Route::Live(Phase::Open)
        );
        assert_eq!(
            route(&open, true, false, now - LAG_MS - 1, now, LAG_MS),
            Route::Historical { first_seen: true }
        );
        assert_eq!(route(&open, false, false, now, now, LAG_MS), Route::Silent);
        assert_eq!(
            route(&closed, true, true, now, now, LAG_MS),
            Route::Live(Phase::Close)
        );
        assert_eq!(
            route(&old_close, false, true, now, now, LAG_MS),
            Route::Historical { first_seen: false }
        );
    }

    #[test]
    fn an_event_notice_is_the_event_json_with_its_phase_and_key() {
        let notice = event_notice(
            &event(NINE_AM_MS, Some(NINE_AM_MS + 27 * MINUTE_MS)),
            Phase::Close,
            chrono_tz::Asia::Shanghai,
        );
        assert_eq!(notice.key, "e1:close");
        let json: serde_json::Value = serde_json::from_slice(&notice.body).unwrap();
        assert_eq!(json["phase"], "close");
        assert_eq!(json["start"], "2022-12-13T09:00:00+08:00");
        assert_eq!(json["duration_secs"], 27 * 60);
    }

    #[test]
    fn a_summary_counts_by_rule_and_spans_its_events() {
        let site = facwatch_proto::site::Site::from_toml(
            include_str!("../../../deploy/stenter-plant.site.toml"),
            "x.site.toml",
        )
        .unwrap();
        let mut summary = ReplaySummary::new(&site, "gw-01");
        summary.count(&event(NINE_AM_MS, Some(NINE_AM_MS + 10 * MINUTE_MS)));
        summary.count(&event(NINE_AM_MS + 60 * MINUTE_MS, None));
        let mut r5 = event(NINE_AM_MS - 30 * MINUTE_MS, Some(NINE_AM_MS));
        r5.rule = Rule::R5;
        summary.count(&r5);
        assert_eq!(summary.total(), 3);
        let json = summary.to_json();
        assert_eq!(json["by_rule"], serde_json::json!({"R1": 2, "R5": 1}));
        assert_eq!(json["start"], "2022-12-13T08:30:00+08:00");
        assert_eq!(json["end"], "2022-12-13T10:00:00+08:00");
        assert_eq!(
            json["notice"]["en"],
            format!("{}: gateway gw-01 delivered buffered data; 3 historical event(s) between 2022-12-13 08:30 and 2022-12-13 10:00 (R1 x2, R5 x1). They are stored; no individual alarms were sent.", site.name)
        );
        assert_eq!(
            json["notice"]["zh"],
            format!("{}：网关gw-01补传缓存数据，2022-12-13 08:30至2022-12-13 10:00期间共3条历史事件（R1 x2, R5 x1），已入库，未逐条告警。", site.name)
        );
        let notice = summary.notice();
        assert_eq!(notice.key, format!("{}:summary", summary.id()));
    }

    #[test]
    fn alert_json_names_kind_gateway_and_since() {
        let alert = Alert {
            kind: AlertKind::GatewaySilent,
            site: "plant".into(),
            gateway: "gw-a".into(),
            since_ms: NINE_AM_MS,
            at_ms: NINE_AM_MS + 5 * MINUTE_MS,
            time_zone: chrono_tz::Asia::Shanghai,
        };
        let json = alert.to_json();
        assert_eq!(json["kind"], "gateway_silent");
        assert_eq!(json["gateway"], "gw-a");
        assert_eq!(json["since"], "2022-12-13T09:00:00+08:00");
        let back = Alert {
            kind: AlertKind::GatewayBack,
            ..alert.clone()
        };
        assert_ne!(back.id(), alert.id());
        assert!(alert.notice().key.ends_with(":alert"));
    }
}
