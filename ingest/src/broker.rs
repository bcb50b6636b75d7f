//! The embedded MQTT broker (rumqttd 0.20), for a one-binary deployment and
//! for tests.
//!
//! What rumqttd 0.20 does and does not do (checked in its source):
//! - It keeps everything in memory. Retained messages are supported (the
//!   last retained publish per topic is kept and sent to new subscribers
//!   with the retain flag; an empty payload clears it), which is what the
//!   ack topic relies on. A restart loses them; the delivery protocol makes
//!   that harmless (the gateway resends from `acked + 1`, the ingest
//!   re-acks).
//! - **It cannot be stopped.** `Broker::start` blocks on its server threads,
//!   which loop on `accept` forever, and there is no shutdown handle. The
//!   broker thread started here lives until the process exits; tests simply
//!   start one broker each on port 0.
//! - A listener that fails to bind only logs an error and ends its thread;
//!   [`start_embedded`] therefore waits until an MQTT client can actually
//!   connect, and reports a broker thread that ended as an error.
//! - Publishes to a topic nobody subscribes to are refused (connection
//!   dropped) unless `dynamic_filters` is on; it is on here.
//!
//! Sizes are set in code: payloads up to [`MAX_PACKET_BYTES`] (a full batch
//! plus topic and header), commit-log segments of 4 MiB x 4 per topic filter
//! (rumqttd's sample config allows about 1 GiB per filter).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use facwatch_proto::wire::MAX_BATCH_BYTES;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::connect_host;

/// Largest MQTT packet (remaining length: topic, packet id, payload) that
/// the embedded broker and the ingest's client accept: a full batch plus
/// 1 KiB for topic and header.
pub const MAX_PACKET_BYTES: usize = MAX_BATCH_BYTES + 1024;

/// How long [`start_embedded`] waits for the listener to accept an MQTT
/// connection.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_CLIENT_ID: &str = "facwatch-broker-probe";

/// A running embedded broker. It runs until the process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedBroker {
    /// The address it listens on (the real port when port 0 was asked for).
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: cannot find a free port on {ip}: {source}")]
    FreePort {
        ip: std::net::IpAddr,
        source: std::io::Error,
    },
    #[error("embedded broker: cannot start its thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "embedded broker on {addr} stopped while starting (is the address in use? see the log)"
    )]
    Stopped { addr: SocketAddr },
    #[error("embedded broker on {addr} did not accept an MQTT connection within {waited:?}: {last_error}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        last_error: String,
    },
}

/// Starts rumqttd on `listen` in its own thread and returns once it accepts
/// MQTT connections. Port 0 picks a free port (found by binding and releasing
/// it, so another process could in principle take it first). Blocks the
/// calling thread for at most a few seconds.
pub fn start_embedded(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    let addr = if listen.port() == 0 {
        let probe =
            TcpListener::bind((listen.ip(), 0)).map_err(|source| BrokerError::FreePort {
                ip: listen.ip(),
                source,
            })?;
        let addr = probe.local_addr().map_err(|source| BrokerError::FreePort {
            ip: listen.ip(),
            source,
        })?;
        drop(probe);
        addr
    } else {
        listen
    };

    let config = broker_config(addr);
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(error) = broker.start() {
                tracing::error!(error = %error, "Embedded MQTT broker failed.");
            }
        })
        .map_err(BrokerError::Thread)?;

    wait_until_ready(addr, &thread)?;
    tracing::info!(addr = %addr, "Embedded MQTT broker is listening.");
    Ok(EmbeddedBroker { addr })
}

fn broker_config(listen: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "facwatch-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PACKET_BYTES,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Connects with a minimal MQTT 3.1.1 client until the broker answers with a
/// CONNACK, or the broker thread ends, or [`READY_TIMEOUT`] passes.
fn wait_until_ready(addr: SocketAddr, thread: &JoinHandle<()>) -> Result<(), BrokerError> {
    let target = SocketAddr::new(connect_host(addr.ip()), addr.port());
    let started = Instant::now();
    loop {
        let last_error = match probe(target) {
            Ok(()) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if thread.is_finished() {
            return Err(BrokerError::Stopped { addr });
        }
        if started.elapsed() >= READY_TIMEOUT {
            return Err(BrokerError::NotReady {
                addr,
                waited: READY_TIMEOUT,
                last_error,
            });
        }
        // The listener binds on another thread and rumqttd offers no signal
        // when it has; retry the connection itself.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One MQTT CONNECT / CONNACK exchange.
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let client_id = PROBE_CLIENT_ID.as_bytes();
    let mut connect = vec![0x10, (12 + client_id.len()) as u8];
    connect.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T']); // protocol name
    connect.extend_from_slice(&[0x04, 0x02, 0x00, 0x0A]); // v3.1.1, clean session, keep alive 10 s
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id);
    stream.write_all(&connect)?;

    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!(
            "unexpected CONNACK {connack:02x?}"
        )));
    }
    // Closing without DISCONNECT: rumqttd 0.20 logs a spurious error
    // ("no-connection id N is already gone") after a clean DISCONNECT.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_starts_on_a_real_port_that_accepts_mqtt() {
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(broker.addr.port(), 0);
        probe(broker.addr).unwrap();
    }

    #[test]
    fn a_port_in_use_is_reported_not_hung() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = start_embedded(taken.local_addr().unwrap()).unwrap_err();
        // The port is held by a plain listener that never answers MQTT:
        // either rumqttd's bind failed (its thread ended) or the probe
        // reached the plain listener and timed out.
        assert!(
            matches!(
                err,
                BrokerError::Stopped { .. } | BrokerError::NotReady { .. }
            ),
            "{err}"
        );
    }
}
