//! The MQTT connection: one task drives rumqttc's event loop all the time
//! and reports what matters (connected, disconnected, acks) over a channel;
//! the forwarder publishes through a [`Publisher`]. Known rumqttc traps and
//! how this module avoids them:
//!
//! - The polling task never awaits a publish (rumqtt #263/#1025): it only
//!   polls; the forwarder uses the non-blocking `try_*` calls.
//! - rumqttc has no reconnect backoff: after an error the driver waits with
//!   [`Backoff`] (100 ms doubling to 5 s) before polling again.
//! - A queued publish is not delivery, and rumqttc drops unacked publishes
//!   on a clean reconnect. Worse, a publish queued after the link broke but
//!   before the forwarder heard of it would go out first on the next
//!   connection, ahead of the resend from `acked + 1`, and the ingest would
//!   see a gap. So every connection gets a generation number; the driver
//!   clears it (under the same lock publishers take) before it empties
//!   rumqttc's queues, and [`Publisher`] refuses to queue for any generation
//!   but the live one. Whatever reaches a new connection was queued for it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use facwatch_proto::seal::{self, GatewayKey, Purpose};
use facwatch_proto::wire::Ack;
use rumqttc::{AsyncClient, ClientError, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The generation of the live connection; `None` while disconnected.
type Live = Arc<Mutex<Option<u64>>>;

fn lock(live: &Mutex<Option<u64>>) -> MutexGuard<'_, Option<u64>> {
    // The guarded value is a plain number: a poisoned lock is still sound.
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the driver reports to the forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// A ConnAck: connection `generation` is up (subscriptions are not).
    Connected { generation: u64 },
    /// The connection failed; the driver retries after `retry_in`.
    Disconnected { error: String, retry_in: Duration },
    /// An ack from the ingest.
    Ack { seq: u64 },
    /// A payload on the ack topic that is not an ack sealed with this
    /// gateway's key.
    BadAck { error: String },
}

/// Reconnect delays: `initial`, doubling up to `max`, back to `initial`
/// after a successful connect.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Why a publish was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not the live connection (or none is up).
    NotConnected,
    /// rumqttc's request queue is full.
    QueueFull,
}

/// Queues requests for one connection generation only.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    client: AsyncClient,
    live: Live,
}

impl Publisher {
    /// Queues a QoS 1 publish on connection `generation`.
    pub(crate) fn publish(
        &self,
        generation: u64,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), Refused> {
        let live = lock(&self.live);
        if *live != Some(generation) {
            return Err(Refused::NotConnected);
        }
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(refused)
    }

    /// Queues a QoS 1 subscription on connection `generation`.
    pub(crate) fn subscribe(&self, generation: u64, topic: &str) -> Result<(), Refused> {
        let live = lock(&self.live);
        if *live != Some(generation) {
            return Err(Refused::NotConnected);
        }
        self.client
            .try_subscribe(topic, QoS::AtLeastOnce)
            .map_err(refused)
    }

    /// Queues a clean disconnect (no last will).
    pub(crate) fn disconnect(&self) -> Result<(), Refused> {
        self.client.try_disconnect().map_err(refused)
    }
}

fn refused(_: ClientError) -> Refused {
    Refused::QueueFull
}

/// Splits a new rumqttc client into the publisher and the driver state.
pub(crate) fn publisher(client: AsyncClient) -> (Publisher, Live) {
    let live: Live = Arc::new(Mutex::new(None));
    (
        Publisher {
            client,
            live: Arc::clone(&live),
        },
        live,
    )
}

/// Polls `eventloop` until `stop` is cancelled or a requested disconnect
/// has been written. Reports to `events` while anyone listens.
pub(crate) async fn drive(
    mut eventloop: EventLoop,
    live: Live,
    ack_topic: String,
    key: GatewayKey,
    events: mpsc::Sender<LinkEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut generation = 0;
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                generation += 1;
                *lock(&live) = Some(generation);
                backoff.reset();
                LinkEvent::Connected { generation }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == ack_topic => {
                open_ack(&key, &publish.payload)
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                // Close the generation first, then empty rumqttc's queues:
                // anything queued for the dead connection is discarded
                // (the next ConnAck of a clean session drops it), and
                // nothing new can be queued until the next ConnAck.
                *lock(&live) = None;
                eventloop.clean();
                let retry_in = backoff.next_delay();
                // Nobody listening (the forwarder is closing) is fine.
                let _ = events
                    .send(LinkEvent::Disconnected {
                        error: e.to_string(),
                        retry_in,
                    })
                    .await;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry_in) => continue,
                }
            }
        };
        let _ = events.send(event).await;
    }
}

/// An ack counts only if the ingest sealed it with this gateway's key: a
/// forged ack would make the buffer delete batches the ingest never saw.
fn open_ack(key: &GatewayKey, payload: &[u8]) -> LinkEvent {
    let opened = seal::open(key, Purpose::Ack, payload)
        .map_err(|e| e.to_string())
        .and_then(|message| Ack::decode(message).map_err(|e| e.to_string()));
    match opened {
        Ok(ack) => LinkEvent::Ack { seq: ack.seq },
        Err(error) => LinkEvent::BadAck { error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_acks_sealed_with_the_gateway_key_count() {
        let key = GatewayKey::from_bytes([3; 32]);
        let ack = Ack { seq: 42 }.encode();
        assert_eq!(
            open_ack(&key, &seal::seal(&key, Purpose::Ack, &ack)),
            LinkEvent::Ack { seq: 42 }
        );
        let forged = seal::seal(&GatewayKey::from_bytes([4; 32]), Purpose::Ack, &ack);
        let as_batch = seal::seal(&key, Purpose::Batch, &ack);
        for payload in [forged, as_batch] {
            assert_eq!(
                open_ack(&key, &payload),
                LinkEvent::BadAck {
                    error: seal::OpenError::BadTag.to_string()
                }
            );
        }
        assert_eq!(
            open_ack(&key, &ack),
            LinkEvent::BadAck {
                error: seal::OpenError::Short { len: 2 }.to_string()
            }
        );
    }

    #[test]
    fn backoff_doubles_from_100_ms_to_5_s_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<u64> = (0..9)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
