//! The embedded broker against clients that should not get in: wrong and
//! missing passwords, a CA the client does not trust, a client that is not
//! TLS at all, and one that connects and says nothing (which must not hold
//! up anybody else). Each case with the counter that records it.

use std::sync::Arc;
use std::time::Duration;

use facwatch::pki;
use facwatch_gateway::{TlsFiles, TlsSettings};
use facwatch_ingest::broker::{hash_password, start_secured, EmbeddedBroker};
use facwatch_ingest::{BrokerSecurity, BrokerTls, Logins, Stats};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, TlsConfiguration,
    Transport,
};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "the right password";

fn logins() -> Logins {
    let mut logins = Logins::default();
    logins
        .insert("gw-01", &hash_password(PASSWORD).unwrap())
        .unwrap();
    logins
}

fn start(tls: Option<&pki::Pki>) -> (EmbeddedBroker, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let security = BrokerSecurity {
        tls: tls.map(|pki| BrokerTls {
            cert_file: pki.broker_cert_file.clone(),
            key_file: pki.broker_key_file.clone(),
        }),
        logins: logins(),
    };
    let broker = start_secured("127.0.0.1:0".parse().unwrap(), &security, stats.clone()).unwrap();
    (broker, stats)
}

fn options(
    broker: &EmbeddedBroker,
    id: &str,
    login: Option<&str>,
    ca: Option<&pki::Pki>,
) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.addr.port());
    if let Some(password) = login {
        options.set_credentials("gw-01", password);
    }
    if let Some(pki) = ca {
        let tls = TlsSettings::load(TlsFiles {
            ca_file: pki.ca_file.clone(),
            client: None,
        })
        .unwrap();
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.client_config(),
        )));
    }
    options
}

/// The first thing the connection says: a ConnAck's code, or the error.
async fn first_answer(options: MqttOptions) -> Result<ConnectReturnCode, String> {
    let (_client, mut eventloop) = AsyncClient::new(options, 4);
    loop {
        match timeout(LIMIT, eventloop.poll())
            .await
            .expect("an answer in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
            Ok(_) => continue,
            Err(ConnectionError::ConnectionRefused(code)) => return Ok(code),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_password_gets_in_and_refusals_are_counted() {
    let (broker, stats) = start(None);
    let ok = first_answer(options(&broker, "right", Some(PASSWORD), None)).await;
    assert_eq!(ok, Ok(ConnectReturnCode::Success));

    for (id, login) in [("wrong", Some("the wrong password")), ("none", None)] {
        let refused = first_answer(options(&broker, id, login, None)).await;
        assert_ne!(refused, Ok(ConnectReturnCode::Success), "{id} got in");
    }
    // A CONNECT without a login is refused by rumqttd before the login
    // check runs: only the wrong password is counted.
    timeout(LIMIT, stats.wait_until(|s| s.logins_refused == 1))
        .await
        .expect("the wrong password counted");
    assert_eq!(stats.snapshot().logins_refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_untrusted_ca_is_refused_and_the_trusted_one_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki::create(&dir.path().join("ours"), "ours").unwrap();
    let theirs = pki::create(&dir.path().join("theirs"), "theirs").unwrap();
    let (broker, stats) = start(Some(&ours));

    let ok = first_answer(options(&broker, "trusting", Some(PASSWORD), Some(&ours))).await;
    assert_eq!(ok, Ok(ConnectReturnCode::Success));

    let untrusted = first_answer(options(&broker, "other-ca", Some(PASSWORD), Some(&theirs))).await;
    let error = untrusted.expect_err("a broker certificate from an untrusted CA was accepted");
    assert!(error.contains("UnknownIssuer"), "{error}");

    // Plain MQTT to the TLS port: no handshake, no entry.
    let plain = first_answer(options(&broker, "plain", Some(PASSWORD), None)).await;
    assert_ne!(plain, Ok(ConnectReturnCode::Success));

    timeout(LIMIT, stats.wait_until(|s| s.tls_handshakes_failed == 2))
        .await
        .expect("both failed handshakes counted");
    // The login itself never failed: TLS refused them first.
    assert_eq!(stats.snapshot().logins_refused, 0);
}

/// rumqttd's own TLS makes each handshake in its accept loop: one client
/// that connects and says nothing blocks every later client. Behind the
/// TLS front it blocks nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_connects_and_says_nothing_holds_up_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::create(dir.path(), "silent").unwrap();
    let (broker, _stats) = start(Some(&pki));
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(broker.addr).await.unwrap());
    }
    // And one that sends half a ClientHello.
    let mut half = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();

    let ok = timeout(
        Duration::from_secs(5),
        first_answer(options(&broker, "after-silent", Some(PASSWORD), Some(&pki))),
    )
    .await
    .expect("connected while others hold handshakes open");
    assert_eq!(ok, Ok(ConnectReturnCode::Success));
    drop((silent, half));
}
