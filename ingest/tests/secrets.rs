//! No secret in any log line: the built `facwatch-ingest`, configured with
//! every secret it knows (a gateway key made by `gateway-key`, a broker
//! login hashed by `hash-password`, a TLS private key, an HTTP bearer token,
//! a webhook header and a secret in the webhook's URL, an InfluxDB token read from a file),
//! logging at debug level as JSON, from start to a SIGTERM stop. On the way
//! it is given what makes software print secrets: a wrong password, a batch
//! sealed with a forged key, a wrong bearer token, and webhook and InfluxDB
//! endpoints that refuse connections, so their errors are logged. Every one
//! of these leaves the line it should (named by its message), and no line
//! holds a secret, nor any run of 64 hex digits (the shape of a key).
//!
//! Also: a private file that others can read (key, TLS key, tokens) stops
//! `check-config` with exit code 2 and an error naming the file and the fix.

mod api;
mod sealing;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::seal::{self, GatewayKey, Purpose};
use facwatch_proto::topics;
use facwatch_proto::wire::{Ack, Batch, Quality, Sample, Values};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

const INGEST: &str = env!("CARGO_BIN_EXE_facwatch-ingest");
const GATEWAY: &str = "gw-b";
/// Everything waited for is there within this on a slow machine.
const WAIT: Duration = Duration::from_secs(60);

const PASSWORD: &str = "gw-b-password-never-logged-41";
const WRONG_PASSWORD: &str = "a-wrong-password-never-logged-97";
const HTTP_TOKEN: &str = "http-token-never-logged-0123456789abcdef";
const WRONG_TOKEN: &str = "wrong-http-token-never-logged-fedcba9876543210";
const WEBHOOK_HEADER_SECRET: &str = "webhook-header-never-logged-5c1e";
const WEBHOOK_URL_SECRET: &str = "webhook-url-secret-never-logged-77aa";
const INFLUX_TOKEN: &str = "influx-token-never-logged-9d2b";

/// The secrets of one run, as they appear in files and on the wire.
struct Secrets {
    key_hex: String,
    forged_key_hex: String,
    password_hash: String,
    tls_key_pem: String,
}

impl Secrets {
    /// Every string no log line may contain.
    fn all(&self) -> Vec<(&'static str, String)> {
        let mut all = vec![
            ("password", PASSWORD.to_string()),
            ("wrong password", WRONG_PASSWORD.to_string()),
            ("http token", HTTP_TOKEN.to_string()),
            ("wrong http token", WRONG_TOKEN.to_string()),
            ("webhook header", WEBHOOK_HEADER_SECRET.to_string()),
            ("webhook url secret", WEBHOOK_URL_SECRET.to_string()),
            ("influx token", INFLUX_TOKEN.to_string()),
            ("gateway key", self.key_hex.clone()),
            ("forged key", self.forged_key_hex.clone()),
            ("password hash", self.password_hash.clone()),
        ];
        // The hash's salt and digest on their own (the last two fields).
        for part in self.password_hash.rsplit('$').take(2) {
            all.push(("password hash part", part.to_string()));
        }
        // Each line of the PEM body is 64 base64 characters of the key.
        for line in self.tls_key_pem.lines().filter(|l| !l.starts_with("-----")) {
            if line.len() >= 16 {
                all.push(("tls key", line.to_string()));
            }
        }
        all
    }
}

/// The longest run of hex digits in `text`.
fn longest_hex_run(text: &str) -> usize {
    let (mut longest, mut run) = (0, 0);
    for c in text.chars() {
        run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

fn write_private(path: &Path, contents: &str) {
    facwatch_proto::secret::create_private(path, contents.as_bytes()).unwrap();
}

/// `facwatch-ingest <args>` with `stdin`; its exit code, stdout and stderr.
fn run_ingest(args: &[&str], dir: &Path, stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(INGEST)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA, and a broker certificate for 127.0.0.1 signed by it, in `dir`.
/// Returns the CA certificate (DER) and the broker key's PEM.
fn make_tls(dir: &Path) -> (rustls::pki_types::CertificateDer<'static>, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let broker_key = KeyPair::generate().unwrap();
    let broker = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&broker_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("broker.pem"), broker.pem()).unwrap();
    let key_pem = broker_key.serialize_pem();
    write_private(&dir.join("broker.key"), &key_pem);
    (ca.der().clone(), key_pem)
}

/// Writes the whole configuration into `dir`: site, key, login, TLS, token,
/// webhook and InfluxDB. Returns the secrets and the CA to trust.
fn configure(dir: &Path) -> (Secrets, rustls::pki_types::CertificateDer<'static>) {
    std::fs::create_dir(dir.join("sites")).unwrap();
    std::fs::write(dir.join("sites/plant.site.toml"), api::ONE_GATEWAY_SITE).unwrap();
    std::fs::create_dir(dir.join("keys")).unwrap();
    let (code, stdout, stderr) = run_ingest(
        &["gateway-key", "--out", &format!("keys/{GATEWAY}.key")],
        dir,
        "",
    );
    assert_eq!(code, 0, "gateway-key: {stderr}");
    let key_file = dir.join(format!("keys/{GATEWAY}.key"));
    let key_hex = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "gateway-key wrote mode {mode:o}");
    let key = GatewayKey::from_hex(&key_hex).unwrap();
    // It prints the fingerprint, never the key.
    assert!(stdout.contains(&key.fingerprint()), "{stdout}");
    assert!(!stdout.contains(&key_hex) && !stderr.contains(&key_hex));

    let (code, hash, stderr) = run_ingest(&["hash-password"], dir, &format!("{PASSWORD}\n"));
    assert_eq!(code, 0, "hash-password: {stderr}");
    let password_hash = hash.trim().to_string();
    assert!(password_hash.starts_with("$argon2id$"), "{password_hash}");

    let (ca, tls_key_pem) = make_tls(dir);
    write_private(&dir.join("http-token"), &format!("{HTTP_TOKEN}\n"));
    // The InfluxDB token from a file, the webhook header inline: both ways.
    write_private(&dir.join("influx-token"), &format!("{INFLUX_TOKEN}\n"));
    let config = format!(
        r#"
sites_dir = "sites"
keys_dir = "keys"
store_path = "ingest.redb"

[broker]
mode = "embedded"
listen = "127.0.0.1:0"
tls_cert_file = "broker.pem"
tls_key_file = "broker.key"

[broker.logins]
{GATEWAY} = "{password_hash}"

[mqtt]
client_id = "facwatch-ingest"

[http]
listen = "127.0.0.1:0"
token_file = "http-token"

[[webhooks]]
name = "ops"
url = "http://127.0.0.1:{webhook_port}/hook?key={WEBHOOK_URL_SECRET}"
header_name = "Authorization"
header_value = "Bearer {WEBHOOK_HEADER_SECRET}"
backoff_initial_ms = 200

[influxdb]
url = "http://127.0.0.1:{influx_port}"
org = "facwatch"
bucket = "facwatch"
token_file = "influx-token"
backoff_initial_ms = 200
"#,
        webhook_port = closed_port(),
        influx_port = closed_port(),
    );
    std::fs::write(dir.join("ingest.toml"), config).unwrap();
    let forged = GatewayKey::from_bytes([0x5a; 32]);
    (
        Secrets {
            key_hex,
            forged_key_hex: forged.to_hex_line().trim().to_string(),
            password_hash,
            tls_key_pem,
        },
        ca,
    )
}

/// The ingest process with its stderr read line by line; killed if the
/// test fails before it stops.
struct Ingest {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ingest {
    fn start(dir: &Path) -> Ingest {
        let mut child = Command::new(INGEST)
            .args(["--config", "ingest.toml", "--log-format", "json"])
            .current_dir(dir)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ingest {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The fields of the first line (seen before or arriving within
    /// [`WAIT`]) whose message starts with `message`.
    async fn wait_for(&mut self, message: &str) -> Map<String, Value> {
        let deadline = Instant::now() + WAIT;
        let mut checked = 0;
        loop {
            for line in &self.seen[checked..] {
                let fields = fields(line);
                if fields["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(message)
                {
                    return fields;
                }
            }
            checked = self.seen.len();
            match timeout(deadline - Instant::now(), self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => panic!("the ingest exited before logging {message:?}"),
                Err(_) => panic!("no {message:?} within {WAIT:?}"),
            }
        }
    }

    /// Sends SIGTERM, waits for the exit and for the last line. Returns
    /// every line logged.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        loop {
            match timeout(deadline - Instant::now(), self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => break,
                Err(_) => panic!("the ingest did not stop within {WAIT:?} of SIGTERM"),
            }
        }
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "the ingest exited with {exit}");
        std::mem::take(&mut self.seen)
    }
}

/// A line's `fields`, with `message` among them; every line is JSON.
fn fields(line: &str) -> Map<String, Value> {
    let json: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
    json["fields"].as_object().cloned().unwrap_or_default()
}

fn addr_of(fields: &Map<String, Value>) -> SocketAddr {
    fields["addr"].as_str().unwrap().parse().unwrap()
}

fn mqtt_options(
    broker: SocketAddr,
    client_id: &str,
    password: &str,
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> MqttOptions {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    options.set_credentials(GATEWAY, password);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    options
}

/// Fifteen minutes up to a minute ago of a stenter at 100 kW with its fan
/// stopped: R1 opens (live, so its notice goes to the webhook).
fn live_batch(seq: u64) -> Batch {
    let now_ms = facwatch_proto::clock::wall_now_ms();
    let first = now_ms - 16 * 60_000;
    let mut samples = Vec::new();
    for poll in 0..30 {
        for (meter, kw) in [("b-stenter", 100.0), ("b-fan", 0.0)] {
            samples.push(Sample {
                meter: meter.into(),
                time_ms: first + poll * 30_000,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(kw),
                    ..Values::default()
                },
            });
        }
    }
    Batch {
        gateway: GATEWAY.into(),
        seq,
        dropped_before: 0,
        samples,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_from_start_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (secrets, ca) = configure(dir.path());
    let key = GatewayKey::from_hex(&secrets.key_hex).unwrap();
    let forged = GatewayKey::from_hex(&secrets.forged_key_hex).unwrap();

    let mut ingest = Ingest::start(dir.path());
    let broker = addr_of(&ingest.wait_for("Embedded MQTT broker is listening.").await);
    let http = addr_of(&ingest.wait_for("HTTP API listening.").await);

    // A wrong password: refused, and logged with the username only.
    let (_refused, mut refused_loop) =
        AsyncClient::new(mqtt_options(broker, "intruder", WRONG_PASSWORD, &ca), 4);
    let answer = timeout(WAIT, async {
        loop {
            match refused_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => continue,
                Err(ConnectionError::ConnectionRefused(code)) => return Ok(code),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("an answer to the wrong password");
    assert_ne!(answer, Ok(ConnectReturnCode::Success));
    let refusal = ingest.wait_for("MQTT login refused").await;
    assert_eq!(refusal["username"], GATEWAY);

    // The gateway: a real batch, acked; then one sealed with a forged key.
    let (client, mut eventloop) =
        AsyncClient::new(mqtt_options(broker, GATEWAY, PASSWORD, &ca), 16);
    client
        .subscribe(topics::ack(GATEWAY), QoS::AtLeastOnce)
        .await
        .unwrap();
    let real = live_batch(1);
    client
        .publish(
            topics::batch(GATEWAY),
            QoS::AtLeastOnce,
            false,
            seal::seal(&key, Purpose::Batch, &real.encode()),
        )
        .await
        .unwrap();
    let mut forged_batch = live_batch(2);
    forged_batch.samples.truncate(2);
    client
        .publish(
            topics::batch(GATEWAY),
            QoS::AtLeastOnce,
            false,
            seal::seal(&forged, Purpose::Batch, &forged_batch.encode()),
        )
        .await
        .unwrap();
    let ack = timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                // The retained ack of "nothing applied yet" may come first.
                let message = seal::open(&key, Purpose::Ack, &p.payload).unwrap();
                let ack = Ack::decode(message).unwrap();
                if ack.seq == 1 {
                    return ack;
                }
            }
        }
    })
    .await
    .expect("the real batch acked");
    assert_eq!(ack.seq, 1);
    let rejected = ingest.wait_for("Batch rejected").await;
    assert_eq!(rejected["gateway"], GATEWAY);
    assert_eq!(rejected["reason"], "bad_mac");

    // A wrong bearer token, then the right one.
    let http_client = reqwest::Client::new();
    let url = format!("http://{http}/api/v1/sites");
    let wrong = http_client
        .get(&url)
        .bearer_auth(WRONG_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = http_client
        .get(&url)
        .bearer_auth(HTTP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);

    // The event's notice, and the batch's lines, fail to go out: both
    // errors are logged.
    let webhook = ingest.wait_for("Webhook POST failed; retrying").await;
    assert_eq!(webhook["webhook"], "ops");
    ingest.wait_for("InfluxDB write failed; retrying").await;
    drop(eventloop);

    let lines = ingest.stop().await;
    let secrets = secrets.all();
    for line in &lines {
        fields(line);
        for (what, secret) in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "the {what} is in a log line: {line}"
            );
        }
        assert!(
            longest_hex_run(line) < 64,
            "a log line holds 64 hex digits in a row: {line}"
        );
    }
    // Debug level was on: the libraries talked too (rustls, hyper, rumqttd).
    assert!(lines.len() > 20, "only {} lines", lines.len());
}

#[test]
fn a_private_file_others_can_read_is_refused_by_name_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (_secrets, _ca) = configure(dir.path());
    let (code, stdout, stderr) =
        run_ingest(&["--config", "ingest.toml", "check-config"], dir.path(), "");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "ingest.toml: OK (1 sites, 1 gateways)");

    for file in [
        format!("keys/{GATEWAY}.key"),
        "broker.key".to_string(),
        "http-token".to_string(),
        "influx-token".to_string(),
    ] {
        let path = dir.path().join(&file);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, stdout, stderr) =
            run_ingest(&["--config", "ingest.toml", "check-config"], dir.path(), "");
        assert_eq!(code, 2, "{file} at 0644: {stdout}{stderr}");
        assert!(stderr.contains(&file), "{file} not named: {stderr}");
        assert!(
            stderr.contains("0644") && stderr.contains("chmod 600"),
            "{stderr}"
        );
        let content = std::fs::read_to_string(&path).unwrap();
        assert!(
            !stderr.contains(content.trim()),
            "the error shows the secret: {stderr}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}
