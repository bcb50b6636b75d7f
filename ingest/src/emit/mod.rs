//! What the ingest sends out after a group of batches is committed: the
//! acks (queued by `receive`) and, for every event whose stored version
//! changed, one log line and one MQTT message (the event's JSON, QoS 1, not
//! retained) on `facwatch/v1/events/{site}`.
//!
//! Everything here happens after the store commit, so it is best effort by
//! design: the store is the record. [`Publisher`] waits at most
//! [`PUBLISH_WAIT`] for room in the MQTT client's request queue, then drops
//! the message and counts it (`Stats::publishes_dropped`). That bound keeps
//! the apply task from waiting forever on a queue that only the connection
//! task drains, while the connection task may itself wait on the apply task.
//! A dropped ack costs a resend by the gateway; a dropped event message is
//! still in the store.
//!
//! Human notices are not best effort: [`notice`] decides them, the store
//! queues them in the commit that makes them true, and [`webhook`] senders
//! deliver them. On MQTT, every event is published (a historical one with
//! `"historical": true`); replay summaries and connectivity alerts go to
//! `facwatch/v1/alerts/{site}` ([`topics::alerts`]). The log gets one INFO
//! line per live event change, summary and cleared alert, a WARN line per
//! raised alert, and a DEBUG line per historical event change.
//!
//! InfluxDB ([`influx`]) is like the webhooks: its lines are queued in the
//! store in the commit that applies their batches, and a writer task sends
//! them.

mod http_send;
pub(crate) mod influx;
pub(crate) mod notice;
pub(crate) mod webhook;

use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::site::Site;
use facwatch_proto::topics;
use rumqttc::{AsyncClient, QoS};
use tracing::{info, warn};

use crate::detect::Event;
use crate::stats::Stats;
use crate::store::EventChange;
use notice::{Alert, AlertKind, ReplaySummary};

/// Longest wait for room in the MQTT client's request queue.
pub(crate) const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// Queues publishes on the shared MQTT client with a bounded wait.
#[derive(Clone)]
pub(crate) struct Publisher {
    client: AsyncClient,
    stats: Arc<Stats>,
}

impl Publisher {
    pub(crate) fn new(client: AsyncClient, stats: Arc<Stats>) -> Publisher {
        Publisher { client, stats }
    }

    /// Queues one QoS 1 publish. Returns whether it was queued (queued is
    /// not delivered: rumqttc may still lose it on a reconnect).
    pub(crate) async fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> bool {
        let queued = tokio::time::timeout(
            PUBLISH_WAIT,
            self.client
                .publish(topic.as_str(), QoS::AtLeastOnce, retain, payload),
        )
        .await;
        match queued {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                warn!(topic, error = %error, "MQTT client is gone; message dropped.");
                self.stats.add(|s| &s.publishes_dropped, 1);
                false
            }
            Err(_) => {
                warn!(
                    topic,
                    waited_ms = PUBLISH_WAIT.as_millis() as u64,
                    "MQTT client stayed busy; message dropped."
                );
                self.stats.add(|s| &s.publishes_dropped, 1);
                false
            }
        }
    }
}

/// Logs and publishes one changed event of `site`.
pub(crate) async fn emit(publisher: &Publisher, site: &Site, change: &EventChange) {
    let event: &Event = &change.event;
    let historical = event.historical || change.historical_notice;
    if historical {
        tracing::debug!(
            site = %event.site,
            gateway = %event.gateway,
            line = %event.line,
            rule = ?event.rule,
            status = ?event.status,
            "Historical event (summarised): {}",
            event.notice_en
        );
    } else {
        info!(
            site = %event.site,
            gateway = %event.gateway,
            line = %event.line,
            rule = ?event.rule,
            status = ?event.status,
            facilities = ?event.facilities,
            historical,
            "{}",
            event.notice_en
        );
    }
    let mut json = event.to_json(site.time_zone);
    if let Some(fields) = json.as_object_mut() {
        fields.insert("historical".into(), historical.into());
    }
    let payload = match serde_json::to_vec(&json) {
        Ok(payload) => payload,
        Err(error) => {
            warn!(site = %site.id, event = %event.id, error = %error, "Event did not serialize.");
            return;
        }
    };
    publisher
        .publish(topics::events(&site.id), false, payload)
        .await;
}

/// Logs (INFO) and publishes a completed replay summary.
pub(crate) async fn emit_summary(publisher: &Publisher, summary: &ReplaySummary) {
    info!(
        site = %summary.site,
        gateway = %summary.gateway,
        events = summary.total(),
        by_rule = ?summary.by_rule,
        "{}",
        summary.text_en()
    );
    publish_json(publisher, &summary.site, &summary.to_json()).await;
}

/// Logs (WARN when raised, INFO when cleared) and publishes an alert.
pub(crate) async fn emit_alert(publisher: &Publisher, alert: &Alert) {
    let json = alert.to_json();
    let text = json["notice"]["en"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    match alert.kind {
        AlertKind::GatewaySilent => {
            warn!(site = %alert.site, gateway = %alert.gateway, kind = alert.kind.as_str(), "{text}")
        }
        AlertKind::GatewayBack => {
            info!(site = %alert.site, gateway = %alert.gateway, kind = alert.kind.as_str(), "{text}")
        }
    }
    publish_json(publisher, &alert.site, &json).await;
}

async fn publish_json(publisher: &Publisher, site: &str, json: &serde_json::Value) {
    match serde_json::to_vec(json) {
        Ok(payload) => {
            publisher
                .publish(topics::alerts(site), false, payload)
                .await;
        }
        Err(error) => warn!(site, error = %error, "Alert did not serialize."),
    }
}
