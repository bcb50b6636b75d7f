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
//! - **Its own TLS is not used**: rumqttd 0.20 performs each TLS handshake
//!   inline in its accept loop, without a timeout (and re-reads the key
//!   files for every connection), so one client that opens a TCP
//!   connection and sends nothing stops every later client from
//!   connecting. TLS is therefore terminated here ([`tls`]): each
//!   connection gets its own task and a handshake deadline, and is then
//!   relayed to rumqttd's plain listener on a loopback port.
//!
//! Sizes are set in code: payloads up to [`MAX_PACKET_BYTES`] (a full batch
//! plus topic and header), commit-log segments of 4 MiB x 4 per topic filter
//! (rumqttd's sample config allows about 1 GiB per filter).
//!
//! Security ([`start_secured`]): with logins, every CONNECT is checked by
//! [`auth`]; the ingest itself logs in with a password made up at start.
//! rumqttd itself only ever listens on a loopback address: with TLS it
//! listens on a loopback port of its own, and without TLS the config allows
//! only a loopback `listen`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::Arc;

use facwatch_proto::seal::MAX_SEALED_BATCH_BYTES;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::{connect_host, BrokerSecurity, BrokerTls, Credentials};
use crate::Stats;

pub(crate) mod auth;
mod tls;

pub use auth::hash_password;

/// Largest MQTT packet (remaining length: topic, packet id, payload) that
/// the embedded broker and the ingest's client accept: a full sealed batch
/// plus 1 KiB for topic and header. rumqttd refuses (disconnects) a client
/// that sends a larger one.
pub const MAX_PACKET_BYTES: usize = MAX_SEALED_BATCH_BYTES + 1024;

/// How long [`start_embedded`] waits for the listener to accept an MQTT
/// connection.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_CLIENT_ID: &str = "facwatch-broker-probe";

/// A running embedded broker. It runs until the process exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedBroker {
    /// The address clients connect to (the real port when port 0 was asked
    /// for); TLS when configured.
    pub addr: SocketAddr,
    /// Where the ingest itself connects: rumqttd's plain listener (`addr`
    /// itself without TLS).
    pub internal: SocketAddr,
    /// The ingest's own login, when logins are on.
    pub internal_login: Option<Credentials>,
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
    #[error("embedded broker: cannot make up the ingest's own login: {0}")]
    Random(getrandom::Error),
    #[error("embedded broker: TLS: {0}")]
    Tls(String),
    #[error("embedded broker: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts rumqttd on `listen` in its own thread, open to anyone (no TLS,
/// no logins: tests and the demo, on loopback), and returns once it accepts
/// MQTT connections. Port 0 picks a free port (found by binding and
/// releasing it, so another process could in principle take it first).
/// Blocks the calling thread for at most a few seconds.
pub fn start_embedded(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    start_secured(
        listen,
        &BrokerSecurity::default(),
        Arc::new(Stats::default()),
    )
}

/// Starts the broker with `security`'s TLS and logins (see the module
/// docs); refused logins are counted in `stats`.
pub fn start_secured(
    listen: SocketAddr,
    security: &BrokerSecurity,
    stats: Arc<Stats>,
) -> Result<EmbeddedBroker, BrokerError> {
    // rumqttd's own listener: `listen` itself, or a loopback port behind
    // the TLS front.
    let plain = match &security.tls {
        None => free_addr(listen)?,
        Some(_) => free_addr(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0))?,
    };
    let internal_login = if security.logins.is_empty() {
        None
    } else {
        Some(auth::internal_login().map_err(BrokerError::Random)?)
    };
    let gate = internal_login.as_ref().map(|internal| {
        Arc::new(auth::Gate::new(
            security.logins.clone(),
            internal.clone(),
            stats.clone(),
        ))
    });

    let config = broker_config(plain, gate);
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(error) = broker.start() {
                tracing::error!(error = %error, "Embedded MQTT broker failed.");
            }
        })
        .map_err(BrokerError::Thread)?;
    wait_until_ready(plain, internal_login.as_ref(), &thread)?;

    let addr = match &security.tls {
        None => plain,
        Some(files) => tls::start_front(listen, files, plain, stats)?,
    };
    tracing::info!(
        addr = %addr,
        tls = security.tls.is_some(),
        logins = !security.logins.is_empty(),
        "Embedded MQTT broker is listening."
    );
    Ok(EmbeddedBroker {
        addr,
        internal: plain,
        internal_login,
    })
}

/// `listen`, or a free port on its address for port 0.
fn free_addr(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let probe = TcpListener::bind((listen.ip(), 0)).map_err(|source| BrokerError::FreePort {
        ip: listen.ip(),
        source,
    })?;
    probe.local_addr().map_err(|source| BrokerError::FreePort {
        ip: listen.ip(),
        source,
    })
}

/// Checks the TLS files of the config: they must load as a server
/// certificate chain and matching private key, the key file private.
pub(crate) fn check_tls_files(files: &BrokerTls) -> Result<(), String> {
    tls::server_config(files).map(|_| ())
}

fn broker_config(listen: SocketAddr, gate: Option<Arc<auth::Gate>>) -> Config {
    let mut server = ServerSettings {
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
    if let Some(gate) = gate {
        server
            .connections
            .set_auth_handler(move |client_id, username, password| {
                let gate = gate.clone();
                async move {
                    // argon2 is slow by design: off the broker's threads.
                    tokio::task::spawn_blocking(move || {
                        gate.admit(&client_id, &username, &password)
                    })
                    .await
                    .unwrap_or(false)
                }
            });
    }
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
fn wait_until_ready(
    addr: SocketAddr,
    login: Option<&Credentials>,
    thread: &JoinHandle<()>,
) -> Result<(), BrokerError> {
    let target = SocketAddr::new(connect_host(addr.ip()), addr.port());
    let started = Instant::now();
    loop {
        let last_error = match probe(target, login) {
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

/// One MQTT CONNECT / CONNACK exchange, with `login` when given.
fn probe(addr: SocketAddr, login: Option<&Credentials>) -> std::io::Result<()> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let field = |bytes: &[u8]| {
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    };
    // v3.1.1, clean session (and username + password), keep alive 10 s.
    let flags = if login.is_some() { 0xC2 } else { 0x02 };
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x0A];
    body.extend(field(PROBE_CLIENT_ID.as_bytes()));
    if let Some(login) = login {
        body.extend(field(login.username.as_bytes()));
        body.extend(field(login.password.as_bytes()));
    }
    let mut connect = vec![0x10];
    let mut remaining = body.len();
    loop {
        // MQTT's variable-length integer: 7 bits a byte, high bit "more".
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        connect.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
    connect.extend(body);
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
        assert_eq!(broker.internal, broker.addr);
        assert_eq!(broker.internal_login, None);
        probe(broker.addr, None).unwrap();
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
