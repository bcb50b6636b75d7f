//! What the ingest sends out after a group of batches is committed: the
//! acks (queued by `receive`) and, for every event whose stored version
//! changed, one log line and one MQTT message (the event's JSON, QoS 1, not
//! retained) on `facwatch/v1/events/{site}`.
//!
//! Everything here happens after the store commit, so it is best effort by
//! design: the store is the record. **The apply task never waits for the
//! MQTT client**: [`Publisher`] hands a message to rumqttc's request queue
//! only if it has room (`try_publish`). The queue drains only while the
//! connection task polls the event loop, and that task may itself wait for
//! the apply task (the batch channel), so waiting here could stall both;
//! and rumqttc takes no request while its outgoing QoS 1 window (100
//! publishes) waits for the broker's PUBACKs, which Mosquitto was seen to
//! hold back for seconds while it streamed a persistent session's backlog
//! of 80,000 batches. An ack that finds the queue full waits in
//! [`LateAcks`] (only the newest per gateway: acks are cumulative) and a
//! task of its own hands it over when there is room, in order with any
//! later ack of that gateway. An event or alert message that finds the
//! queue full is dropped and counted (`Stats::publishes_dropped`); it is
//! still in the store and the HTTP API.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use facwatch_proto::seal::{self, GatewayKey, Purpose};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::Ack;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::detect::Event;
use crate::stats::Stats;
use crate::store::EventChange;
use notice::{Alert, AlertKind, ReplaySummary};

/// Hands messages to the shared MQTT client without waiting (module doc).
#[derive(Clone)]
pub(crate) struct Publisher {
    client: AsyncClient,
    stats: Arc<Stats>,
    late: Arc<LateAcks>,
    /// Acks are sealed with their gateway's key.
    keys: Arc<HashMap<String, GatewayKey>>,
}

/// Acks that found the request queue full: the newest seq per gateway.
#[derive(Default)]
pub(crate) struct LateAcks {
    pending: Mutex<BTreeMap<String, u64>>,
    changed: Notify,
}

impl Publisher {
    pub(crate) fn new(
        client: AsyncClient,
        stats: Arc<Stats>,
        keys: Arc<HashMap<String, GatewayKey>>,
    ) -> Publisher {
        Publisher {
            client,
            stats,
            late: Arc::default(),
            keys,
        }
    }

    /// `Ack { seq }` sealed with `gateway`'s key; `None` for a gateway
    /// without one (never acked: it cannot have sent an accepted batch).
    fn sealed_ack(&self, gateway: &str, seq: u64) -> Option<Vec<u8>> {
        let key = self.keys.get(gateway)?;
        Some(seal::seal(key, Purpose::Ack, &Ack { seq }.encode()))
    }

    /// Queues the retained `Ack { seq }` of `gateway`, now if the request
    /// queue has room, else as soon as it has (after any ack of the
    /// gateway still waiting).
    pub(crate) fn ack(&self, gateway: &str, seq: u64) {
        let mut pending = self.late.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = pending.get_mut(gateway) {
            *waiting = (*waiting).max(seq);
            return;
        }
        let Some(payload) = self.sealed_ack(gateway, seq) else {
            return;
        };
        let queued = self
            .client
            .try_publish(topics::ack(gateway), QoS::AtLeastOnce, true, payload);
        match queued {
            Ok(()) => self.stats.add(|s| &s.acks_published, 1),
            Err(_) => {
                pending.insert(gateway.to_string(), seq);
                drop(pending);
                self.late.changed.notify_one();
            }
        }
    }

    /// Queues one QoS 1 publish if the request queue has room; else drops
    /// it (counted). Returns whether it was queued (queued is not
    /// delivered: rumqttc may still lose it on a reconnect).
    pub(crate) fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> bool {
        match self
            .client
            .try_publish(topic.as_str(), QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => true,
            Err(error) => {
                warn!(topic, error = %error, "MQTT client is busy or gone; message dropped.");
                self.stats.add(|s| &s.publishes_dropped, 1);
                false
            }
        }
    }

    /// Hands the late acks to the client as it makes room, until `stop`;
    /// then those still waiting, within `last_wait` each.
    pub(crate) async fn send_late_acks(self, stop: CancellationToken, last_wait: Duration) {
        loop {
            let stopping = tokio::select! {
                _ = self.late.changed.notified() => false,
                _ = stop.cancelled() => true,
            };
            loop {
                // The oldest waiting gateway first; the lock is not held
                // while waiting for the client.
                let next = {
                    let pending = self.late.pending.lock().unwrap_or_else(|e| e.into_inner());
                    pending.iter().next().map(|(g, s)| (g.clone(), *s))
                };
                let Some((gateway, seq)) = next else { break };
                let Some(payload) = self.sealed_ack(&gateway, seq) else {
                    // Not queued by `ack` (no key): nothing to send.
                    let mut pending = self.late.pending.lock().unwrap_or_else(|e| e.into_inner());
                    pending.remove(&gateway);
                    continue;
                };
                let publish =
                    self.client
                        .publish(topics::ack(&gateway), QoS::AtLeastOnce, true, payload);
                let queued = if stopping {
                    matches!(tokio::time::timeout(last_wait, publish).await, Ok(Ok(())))
                } else {
                    publish.await.is_ok()
                };
                {
                    let mut pending = self.late.pending.lock().unwrap_or_else(|e| e.into_inner());
                    // A newer ack that arrived meanwhile stays, for the next
                    // round.
                    if pending.get(&gateway) == Some(&seq) {
                        pending.remove(&gateway);
                    }
                }
                if queued {
                    self.stats.add(|s| &s.acks_published, 1);
                } else if stopping {
                    // The gateway resends; the ingest acks it on its next
                    // connection.
                    debug!(gateway, seq, "Ack not sent before stopping.");
                } else {
                    // The client is gone: nothing more can be sent.
                    return;
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// Logs and publishes one changed event of `site`.
pub(crate) fn emit(publisher: &Publisher, site: &Site, change: &EventChange) {
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
    publisher.publish(topics::events(&site.id), false, payload);
}

/// Logs (INFO) and publishes a completed replay summary.
pub(crate) fn emit_summary(publisher: &Publisher, summary: &ReplaySummary) {
    info!(
        site = %summary.site,
        gateway = %summary.gateway,
        events = summary.total(),
        by_rule = ?summary.by_rule,
        "{}",
        summary.text_en()
    );
    publish_json(publisher, &summary.site, &summary.to_json());
}

/// Logs (WARN when raised, INFO when cleared) and publishes an alert.
pub(crate) fn emit_alert(publisher: &Publisher, alert: &Alert) {
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
    publish_json(publisher, &alert.site, &json);
}

fn publish_json(publisher: &Publisher, site: &str, json: &serde_json::Value) {
    match serde_json::to_vec(json) {
        Ok(payload) => {
            publisher.publish(topics::alerts(site), false, payload);
        }
        Err(error) => warn!(site, error = %error, "Alert did not serialize."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::start_embedded;
    use rumqttc::{Event, Incoming, MqttOptions};
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const LIMIT: Duration = Duration::from_secs(20);

    fn test_key(gateway: &str) -> GatewayKey {
        GatewayKey::from_bytes([gateway.len() as u8 + gateway.as_bytes()[3]; 32])
    }

    /// Regression: the apply task waited up to 5 s for room in rumqttc's
    /// request queue for every ack while Mosquitto held PUBACKs back during
    /// a persistent session's backlog (80,000 batches took 62 s). Acks
    /// never wait now; those that find the queue full go out later, the
    /// newest per gateway, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_never_wait_for_a_full_request_queue_and_the_newest_go_out_in_order() {
        timeout(LIMIT, async {
            let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
            let port = broker.addr.port();

            // A gateway-side subscriber to every ack.
            let (sub, mut sub_loop) =
                AsyncClient::new(MqttOptions::new("acks-watcher", "127.0.0.1", port), 16);
            let (seen_tx, mut seen) = mpsc::unbounded_channel();
            let (ready_tx, ready) = tokio::sync::oneshot::channel();
            sub.subscribe("facwatch/v1/+/ack", QoS::AtLeastOnce)
                .await
                .unwrap();
            tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                while let Ok(event) = sub_loop.poll().await {
                    match event {
                        Event::Incoming(Incoming::SubAck(_)) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Event::Incoming(Incoming::Publish(p)) => {
                            let key = test_key(p.topic.split('/').nth(2).unwrap());
                            let ack = seal::open(&key, Purpose::Ack, &p.payload).unwrap();
                            let seq = Ack::decode(ack).unwrap().seq;
                            let _ = seen_tx.send((p.topic.clone(), seq));
                        }
                        _ => {}
                    }
                }
            });
            ready.await.unwrap();

            // The ingest's client, its event loop not polled yet: a request
            // queue of 2 that nothing drains.
            let (client, mut eventloop) =
                AsyncClient::new(MqttOptions::new("ingest-under-test", "127.0.0.1", port), 2);
            let stats = Arc::new(Stats::default());
            let keys = ["gw-a", "gw-b"].map(|gw| (gw.to_string(), test_key(gw)));
            let publisher = Publisher::new(client, stats.clone(), Arc::new(keys.into()));
            for (gateway, seq) in [
                ("gw-a", 1),
                ("gw-a", 2),
                ("gw-a", 3),
                ("gw-a", 4),
                ("gw-b", 7),
            ] {
                // Synchronous: it cannot wait.
                publisher.ack(gateway, seq);
            }
            assert_eq!(stats.snapshot().acks_published, 2);

            let stop = CancellationToken::new();
            let late = tokio::spawn(publisher.clone().send_late_acks(stop.clone(), LIMIT));
            tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            let mut got = Vec::new();
            while got.len() < 4 {
                got.push(seen.recv().await.unwrap());
            }
            let ack = |gateway: &str, seq| (topics::ack(gateway), seq);
            // gw-a's 3 was superseded by its 4 while both waited.
            assert_eq!(
                got,
                [
                    ack("gw-a", 1),
                    ack("gw-a", 2),
                    ack("gw-a", 4),
                    ack("gw-b", 7)
                ]
            );
            stats.wait_until(|s| s.acks_published == 4).await;
            stop.cancel();
            late.await.unwrap();
            assert!(seen.try_recv().is_err(), "no other ack");
        })
        .await
        .expect("bounded");
    }
}
