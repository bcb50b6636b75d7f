//! A throwaway certificate authority for the demo and the tests: a CA, a
//! broker certificate it signed for `localhost` and 127.0.0.1, and a client
//! certificate for a gateway (for brokers that ask for one), written as
//! PEM files the way an installer would lay them out (the private keys
//! private to their owner).
//!
//! Nothing here is for production: the CA's key is thrown away with the
//! directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use facwatch_proto::secret;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// The files of one throwaway PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate the gateway trusts.
    pub ca_file: PathBuf,
    /// The broker's certificate (for `localhost` and 127.0.0.1), signed by
    /// the CA, and its private key.
    pub broker_cert_file: PathBuf,
    pub broker_key_file: PathBuf,
    /// A client certificate (common name `{name} gateway`), signed by the
    /// CA, and its private key.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
}

/// Makes a CA named `name`, a broker and a client certificate in `dir`.
pub fn create(dir: &Path, name: &str) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;

    let broker_key = KeyPair::generate()?;
    let mut broker_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    broker_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} broker"));
    let broker = broker_params.signed_by(&broker_key, &ca, &ca_key)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} gateway"));
    let client = client_params.signed_by(&client_key, &ca, &ca_key)?;

    let pki = Pki {
        ca_file: dir.join("ca.pem"),
        broker_cert_file: dir.join("broker.pem"),
        broker_key_file: dir.join("broker.key"),
        client_cert_file: dir.join("client.pem"),
        client_key_file: dir.join("client.key"),
    };
    std::fs::write(&pki.ca_file, ca.pem())?;
    std::fs::write(&pki.broker_cert_file, broker.pem())?;
    secret::create_private(&pki.broker_key_file, broker_key.serialize_pem().as_bytes())?;
    std::fs::write(&pki.client_cert_file, client.pem())?;
    secret::create_private(&pki.client_key_file, client_key.serialize_pem().as_bytes())?;
    Ok(pki)
}
