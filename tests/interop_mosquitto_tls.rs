//! The gateway's TLS (`[mqtt.tls]`, [`facwatch_gateway::TlsSettings`])
//! against a real Mosquitto that asks every client for a certificate
//! (`require_certificate true`, the certificate's common name as the
//! username): with the client certificate of the broker's CA the gateway
//! gets in and its messages go through; without one, or with one from
//! another CA, Mosquitto refuses the handshake; and a broker certificate
//! from a CA the gateway does not trust is refused by the gateway.
//!
//! Needs `mosquitto` (.ci/run installs it). Run with
//! `cargo test -p facwatch --features interop --test interop_mosquitto_tls`.
#![cfg(feature = "interop")]

mod interop;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use facwatch::pki::{self, Pki};
use facwatch_gateway::{TlsFiles, TlsSettings};
use interop::{free_port, is_root, Process, READY_TIMEOUT};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);

/// Mosquitto with one TLS listener that wants a client certificate of
/// `pki`'s CA, killed when dropped.
struct Broker {
    port: u16,
    _process: Process,
}

fn start_mosquitto(dir: &Path, pki: &Pki) -> Broker {
    let port = free_port();
    let mut config = format!(
        "listener {port} 127.0.0.1\n\
         cafile {}\ncertfile {}\nkeyfile {}\n\
         require_certificate true\nuse_identity_as_username true\n\
         allow_anonymous false\npersistence false\n",
        pki.ca_file.display(),
        pki.broker_cert_file.display(),
        pki.broker_key_file.display(),
    );
    if is_root() {
        config.push_str("user root\n");
    }
    let config_path = dir.join("mosquitto.conf");
    std::fs::write(&config_path, config).unwrap();
    let mut command = Command::new("mosquitto");
    command.arg("-c").arg(&config_path);
    let mut process = Process::spawn("mosquitto", command);
    process.wait_for_tcp(([127, 0, 0, 1], port).into(), READY_TIMEOUT);
    Broker {
        port,
        _process: process,
    }
}

/// The MQTT options the gateway would use for `[mqtt.tls]` with `ca` and
/// the client certificate of `client` (or none).
fn gateway_options(broker: &Broker, id: &str, ca: &Pki, client: Option<&Pki>) -> MqttOptions {
    let tls = TlsSettings::load(TlsFiles {
        ca_file: ca.ca_file.clone(),
        client: client.map(|c| (c.client_cert_file.clone(), c.client_key_file.clone())),
    })
    .unwrap();
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.port);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls.client_config(),
    )));
    options
}

/// The first answer of the connection: a ConnAck's code, or the error.
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
            Err(e) => return Err(format!("{e:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_admits_the_gateway_by_its_client_certificate_only() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki::create(&dir.path().join("ours"), "ours").unwrap();
    let theirs = pki::create(&dir.path().join("theirs"), "theirs").unwrap();
    let broker = start_mosquitto(dir.path(), &ours);

    // With our client certificate: in, and a message goes round.
    let (client, mut eventloop) =
        AsyncClient::new(gateway_options(&broker, "gw-01", &ours, Some(&ours)), 8);
    client
        .subscribe("facwatch/v1/gw-01/ack", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "facwatch/v1/gw-01/ack",
            QoS::AtLeastOnce,
            false,
            b"through".to_vec(),
        )
        .await
        .unwrap();
    let received = timeout(LIMIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return p.payload.to_vec(),
                Ok(_) => continue,
                Err(e) => panic!("the gateway with its certificate was refused: {e:?}"),
            }
        }
    })
    .await
    .expect("the message back in time");
    assert_eq!(received, b"through");

    // Without a client certificate, and with one of another CA: the
    // handshake fails, Mosquitto never reads a CONNECT.
    for (id, client, alert) in [
        ("no-cert", None, "AlertReceived(CertificateRequired)"),
        ("other-ca-cert", Some(&theirs), "AlertReceived(UnknownCA)"),
    ] {
        let answer = first_answer(gateway_options(&broker, id, &ours, client)).await;
        let error = answer.expect_err(&format!("{id} got in"));
        assert!(error.contains(alert), "{id}: {error}");
    }

    // A broker certificate of a CA the gateway does not trust: the gateway
    // refuses it, whatever client certificate it has.
    let answer = first_answer(gateway_options(&broker, "wrong-ca", &theirs, Some(&ours))).await;
    let error = answer.expect_err("a broker of an untrusted CA was accepted");
    assert!(error.contains("UnknownIssuer"), "{error}");
}
