//! The embedded broker's TLS front: rustls (ring provider) terminating TLS
//! on the public address and relaying each connection to rumqttd's plain
//! loopback listener.
//!
//! Invariants:
//! - Every connection is handled in a task of its own; a handshake that has
//!   not completed within [`HANDSHAKE_TIMEOUT`] is dropped, so a client
//!   that connects and says nothing holds up nobody else.
//! - At most [`MAX_CONNECTIONS`] connections are open at once (rumqttd's
//!   own bound); past it a new TCP connection is closed at once.
//! - The certificate chain and key are read once, at start; the key file
//!   must be private to its owner.
//! - Failed handshakes are counted ([`Stats::tls_handshakes_failed`]) and
//!   logged at most once per [`LOG_WINDOW`], with the count suppressed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facwatch_proto::secret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::BrokerError;
use crate::config::BrokerTls;
use crate::Stats;

/// A TLS handshake must complete within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open TLS connections at most (rumqttd's `max_connections`).
const MAX_CONNECTIONS: usize = 1024;
/// At most one line about failed handshakes per this long.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The rustls server config of `files`; the error names the file.
pub(super) fn server_config(files: &BrokerTls) -> Result<Arc<ServerConfig>, String> {
    let cert_shown = files.cert_file.display();
    let pem =
        std::fs::read(&files.cert_file).map_err(|e| format!("{cert_shown}: cannot read: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_shown}: not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_shown}: holds no PEM certificate"));
    }
    let key_pem = secret::read_private(&files.key_file).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        format!(
            "{}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            files.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "{} and {} do not make a usable certificate and key: {e}",
                files.cert_file.display(),
                files.key_file.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// Binds `listen` and relays TLS connections to `plain` from a thread of
/// its own; returns the bound address.
pub(super) fn start_front(
    listen: SocketAddr,
    files: &BrokerTls,
    plain: SocketAddr,
    stats: Arc<Stats>,
) -> Result<SocketAddr, BrokerError> {
    let acceptor = TlsAcceptor::from(server_config(files).map_err(BrokerError::Tls)?);
    let listener = std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    let bind_error = |source| BrokerError::Bind {
        addr: listen,
        source,
    };
    let addr = listener.local_addr().map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mqtt-tls")
        .enable_all()
        .build()
        .map_err(BrokerError::Thread)?;
    std::thread::Builder::new()
        .name("mqtt-tls-accept".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, acceptor, plain, stats).await,
                    Err(e) => tracing::error!(error = %e, "MQTT TLS listener failed."),
                }
            })
        })
        .map_err(BrokerError::Thread)?;
    Ok(addr)
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, plain: SocketAddr, stats: Arc<Stats>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let failures = Arc::new(FailureLog::default());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "MQTT TLS accept failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            failures.note(&stats, peer, "too many connections");
            continue;
        };
        let acceptor = acceptor.clone();
        let stats = stats.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return failures.note(&stats, peer, &e.to_string()),
                Err(_) => return failures.note(&stats, peer, "handshake timed out"),
            };
            let Ok(mut broker) = TcpStream::connect(plain).await else {
                return failures.note(&stats, peer, "embedded broker unreachable");
            };
            let _ = broker.set_nodelay(true);
            // Either side closing ends both; errors are the peer's business.
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
        });
    }
}

#[derive(Default)]
struct FailureLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl FailureLog {
    fn note(&self, stats: &Stats, peer: SocketAddr, error: &str) {
        stats.add(|s| &s.tls_handshakes_failed, 1);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if state
            .0
            .is_some_and(|at| now.duration_since(at) < LOG_WINDOW)
        {
            state.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut state.1);
        state.0 = Some(now);
        drop(state);
        tracing::warn!(%peer, error, suppressed, "MQTT TLS connection refused.");
    }
}
