//! TLS to the MQTT broker (`[mqtt.tls]`): rustls with the ring provider.
//!
//! Invariants:
//! - The broker's certificate must chain to the CA certificates of
//!   `ca_file`, and only to them: the system's roots are not used, so a
//!   certificate from any other CA is refused. Its name is checked against
//!   `mqtt.host` (a DNS name or an IP address in its subjectAltName).
//! - TLS 1.2 and 1.3 only, rustls's safe defaults.
//! - A client certificate (`cert_file` and `key_file`, both or neither) is
//!   presented when the broker asks; the key file must be private to its
//!   owner ([`facwatch_proto::secret`]).
//! - Everything is read and checked when the settings are built, so a bad
//!   file stops the gateway at start with an error naming it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use facwatch_proto::secret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The files of `[mqtt.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and its private key.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// A checked TLS setup: the files and the rustls config built from them.
#[derive(Clone)]
pub struct TlsSettings {
    pub files: TlsFiles,
    pub(crate) config: Arc<ClientConfig>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &TlsSettings) -> bool {
        self.files == other.files
    }
}

impl Eq for TlsSettings {}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// The rustls client config (for other MQTT clients that should trust
    /// exactly what the gateway trusts: tests, the demo's platform view).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Reads and checks the files; the error names the file and what is
    /// wrong with it.
    pub fn load(files: TlsFiles) -> Result<TlsSettings, String> {
        let roots = read_roots(&files.ca_file)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let config = match &files.client {
            None => builder.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let chain = read_certificates(cert_file)?;
                let key = read_private_key(key_file)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{}: unusable client key: {e}", key_file.display()))?
            }
        };
        Ok(TlsSettings {
            files,
            config: Arc::new(config),
        })
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{shown}: holds no PEM certificate"));
    }
    Ok(certificates)
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = secret::read_private(path).map_err(|e| e.to_string())?;
    // The parser's error could quote the file; say only what kind it is.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!(
            "{}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}
