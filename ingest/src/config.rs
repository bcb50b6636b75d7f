//! The ingest's configuration file (`ingest.toml`, default in
//! `ingest.default.toml`), in two stages: `raw` serde structs that refuse
//! unknown keys, then [`Settings`].
//!
//! Invariants of a [`Settings`]:
//! - at least one site; site ids are unique and every gateway id belongs to
//!   exactly one site, so a batch topic names at most one site;
//! - the MQTT client id is a valid id ([`validate_id`]);
//! - `mqtt.host`/`mqtt.port` are where the ingest connects: the broker's own
//!   address in external mode, the `listen` address in embedded mode (the
//!   caller that starts the embedded broker replaces the port when `listen`
//!   asks for port 0);
//! - credentials only with an external broker, username and password both
//!   or neither; the password never appears in `Debug` output or logs;
//! - the session is persistent (clean_session = false) with an external
//!   broker, which then queues QoS 1 batches while the ingest is away, and
//!   clean with the embedded one (rumqttd keeps nothing anyway);
//! - webhook names are unique ids (they key the on-disk outbox), urls are
//!   http(s) with a host, every duration and `max_queue` is positive and
//!   `backoff_max_ms >= backoff_initial_ms`; an auth header has a valid name
//!   and value, and its value never appears in `Debug` output or logs.
//!
//! - every gateway of every site has a key ([`GatewayKey`]), read from
//!   `keys_dir/<gateway>.key`, a file private to its owner; `Debug` shows
//!   only key fingerprints;
//! - the embedded broker's TLS key file is private to its owner, its
//!   certificate and key load, and its logins are argon2 PHC hashes
//!   ([`Logins`]); an embedded broker listening on anything but a loopback
//!   address has both TLS and logins (an open broker on a network would let
//!   anyone in);
//! - `[http]` is optional; when present, `listen` is a socket address and
//!   the bearer token, if any, was read from a private file and is 32 to
//!   1024 visible ASCII characters (never in `Debug` output or logs).
//! - `[influxdb]` is optional; when present, `url` is an http(s) base URL
//!   without query or user info, `org` and `bucket` are non-empty, the
//!   token is visible ASCII (and never appears in `Debug` output or logs),
//!   `max_lines_per_write` is 1..=100000, `max_outbox_bytes` at least
//!   1 MiB, and the backoff is ordered as for webhooks.
//!
//! - each secret of the file (`mqtt.password`, `influxdb.token`, a
//!   webhook's `header_value`) is given inline or as `<key>_file`, never
//!   both; such a file, like every key file, is private to its owner.
//!
//! Every error is a [`ConfigError`] naming the file, the key and the problem;
//! paths in the file are relative to the file.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::seal::GatewayKey;
use facwatch_proto::secret;
use facwatch_proto::site::{read_toml, validate_id, ConfigError, Site};

pub use crate::broker::auth::Logins;

/// The commented default configuration, as shipped.
pub const DEFAULT_CONFIG: &str = include_str!("../ingest.default.toml");

/// Suffix of the site files read from `sites_dir`.
pub const SITE_FILE_SUFFIX: &str = ".site.toml";

const DEFAULT_CLIENT_ID: &str = "facwatch-ingest";
const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

/// Validated ingest settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sites: Vec<Site>,
    /// Gateway id -> its key; every gateway of `sites` has one.
    pub keys: HashMap<String, GatewayKey>,
    pub store_path: PathBuf,
    pub broker: BrokerMode,
    /// TLS and logins of the embedded broker (unused with an external one).
    pub broker_security: BrokerSecurity,
    pub mqtt: MqttSettings,
    /// What "now" is for the historical flag of events: the wall clock in
    /// the field, the simulation's clock in a simulated world.
    pub clock: Clock,
    /// Login at the broker (`[mqtt] username`/`password`, external mode).
    pub mqtt_credentials: Option<Credentials>,
    /// Connect with clean_session = false, so the broker keeps the batch
    /// subscription and queues batches while the ingest is down. `load`
    /// sets it for an external broker; `Settings::new` leaves it off.
    pub mqtt_persistent_session: bool,
    /// `[notices]`: the historical lag, replay summaries, the silence alert.
    pub notices: NoticeSettings,
    /// `[[webhooks]]`: HTTP endpoints every notice is POSTed to.
    pub webhooks: Vec<WebhookSettings>,
    /// `[http]`: where the HTTP API listens; `None` serves no API.
    pub http: Option<HttpSettings>,
    /// `[influxdb]`: where readings and events are written as line
    /// protocol; `None` writes none.
    pub influxdb: Option<InfluxSettings>,
}

/// Timestamp precision of the line protocol written to InfluxDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Seconds,
    Milliseconds,
    Microseconds,
    Nanoseconds,
}

impl Precision {
    /// The `precision` query parameter of `/api/v2/write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Seconds => "s",
            Precision::Milliseconds => "ms",
            Precision::Microseconds => "us",
            Precision::Nanoseconds => "ns",
        }
    }

    /// Unix milliseconds in this precision (seconds truncate).
    pub fn from_unix_ms(self, ms: i64) -> i64 {
        match self {
            Precision::Seconds => ms.div_euclid(1000),
            Precision::Milliseconds => ms,
            Precision::Microseconds => ms.saturating_mul(1_000),
            Precision::Nanoseconds => ms.saturating_mul(1_000_000),
        }
    }

    /// The inverse of [`Precision::as_str`].
    pub fn parse(text: &str) -> Option<Precision> {
        [
            Precision::Seconds,
            Precision::Milliseconds,
            Precision::Microseconds,
            Precision::Nanoseconds,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// The InfluxDB writer (`[influxdb]`). `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct InfluxSettings {
    /// Base URL of the server; `/api/v2/write` is appended to its path.
    pub url: reqwest::Url,
    pub org: String,
    pub bucket: String,
    /// Sent as `Authorization: Token <token>`; none without.
    pub token: Option<String>,
    pub precision: Precision,
    /// Compress request bodies (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// Write one `reading` point per sample.
    pub readings: bool,
    /// Write one `event` point per event change.
    pub events: bool,
    /// Most lines in one write request.
    pub max_lines_per_write: usize,
    /// Bound of the on-disk outbox (bytes of the queued batches, about 64
    /// a sample, and event lines). While it holds
    /// this much the ingest applies no batch (and so acks none).
    pub max_outbox_bytes: u64,
    /// Bound on one write request (connect, send, response).
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl InfluxSettings {
    /// Settings with the defaults of `ingest.default.toml` for `url`, `org`
    /// and `bucket` (tests, the demo).
    pub fn new(url: reqwest::Url, org: &str, bucket: &str) -> InfluxSettings {
        InfluxSettings {
            url,
            org: org.to_string(),
            bucket: bucket.to_string(),
            token: None,
            precision: Precision::Milliseconds,
            gzip: true,
            readings: true,
            events: true,
            max_lines_per_write: DEFAULT_INFLUX_MAX_LINES,
            max_outbox_bytes: DEFAULT_INFLUX_MAX_OUTBOX_BYTES,
            timeout: Duration::from_millis(DEFAULT_WEBHOOK_TIMEOUT_MS),
            backoff_initial: Duration::from_millis(DEFAULT_BACKOFF_INITIAL_MS),
            backoff_max: Duration::from_millis(DEFAULT_INFLUX_BACKOFF_MAX_MS),
        }
    }

    /// The write endpoint with `org`, `bucket` and `precision`.
    pub(crate) fn write_url(&self, precision: Precision) -> reqwest::Url {
        let mut url = self.url.clone();
        let path = format!("{}/api/v2/write", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url.query_pairs_mut()
            .clear()
            .append_pair("org", &self.org)
            .append_pair("bucket", &self.bucket)
            .append_pair("precision", precision.as_str());
        url
    }
}

impl std::fmt::Debug for InfluxSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfluxSettings")
            .field("url", &redacted_url(&self.url))
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("precision", &self.precision)
            .field("gzip", &self.gzip)
            .field("readings", &self.readings)
            .field("events", &self.events)
            .field("max_lines_per_write", &self.max_lines_per_write)
            .field("max_outbox_bytes", &self.max_outbox_bytes)
            .field("timeout", &self.timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// The HTTP API (`[http]`). `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Address to bind; port 0 picks a free port
    /// ([`crate::Stats::http_addr`] tells which).
    pub listen: SocketAddr,
    /// When set, every route but `/healthz` and `/readyz` wants
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl HttpSettings {
    /// The API on `listen`, without a token.
    pub fn open(listen: SocketAddr) -> HttpSettings {
        HttpSettings {
            listen,
            token: None,
        }
    }
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Shortest and longest accepted bearer token.
const TOKEN_CHARS: std::ops::RangeInclusive<usize> = 32..=1024;

/// TLS and logins of the embedded broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerSecurity {
    /// Serve MQTT over TLS with this certificate chain and key (PEM).
    pub tls: Option<BrokerTls>,
    /// Who may connect; empty lets anyone in (loopback only).
    pub logins: Logins,
}

/// The embedded broker's certificate chain and private key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// When notices are live, summarised or raised (`[notices]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoticeSettings {
    /// An event change whose data lags wall time by more than this was found
    /// in a replay: its notices are summarised, not sent one by one.
    pub historical_lag: Duration,
    /// A replay's summary goes out after this long without further
    /// historical events, if no live batch has flushed it before.
    pub replay_quiet: Duration,
    /// A gateway that sent no batch for this long raises `gateway_silent`.
    pub silent_after: Duration,
}

impl Default for NoticeSettings {
    fn default() -> NoticeSettings {
        NoticeSettings {
            historical_lag: Duration::from_secs(DEFAULT_HISTORICAL_LAG_SECS),
            replay_quiet: Duration::from_secs(DEFAULT_REPLAY_QUIET_SECS),
            silent_after: Duration::from_secs(DEFAULT_SILENT_AFTER_SECS),
        }
    }
}

const DEFAULT_HISTORICAL_LAG_SECS: u64 = 15 * 60;
const DEFAULT_REPLAY_QUIET_SECS: u64 = 60;
const DEFAULT_SILENT_AFTER_SECS: u64 = 300;
const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_WEBHOOK_MAX_QUEUE: u64 = 10_000;
const DEFAULT_BACKOFF_INITIAL_MS: u64 = 1_000;
const DEFAULT_BACKOFF_MAX_MS: u64 = 300_000;
const DEFAULT_INFLUX_MAX_LINES: usize = 5_000;
const DEFAULT_INFLUX_MAX_OUTBOX_BYTES: u64 = 256 * 1024 * 1024;
const DEFAULT_INFLUX_BACKOFF_MAX_MS: u64 = 60_000;
/// InfluxDB's own default limit on a request body is 25 MB; 100,000 lines
/// of readings stay well below it.
const MAX_INFLUX_LINES: usize = 100_000;

/// One `[[webhooks]]` entry. `Debug` hides the header value.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Names the webhook's outbox and its log lines and counters.
    pub name: String,
    pub url: reqwest::Url,
    /// Bound on one POST (connect, send, response).
    pub timeout: Duration,
    /// An extra header sent with every POST (e.g. `Authorization`).
    pub header: Option<(String, String)>,
    /// Notices kept on disk; when full the oldest is dropped.
    pub max_queue: u64,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("name", &self.name)
            .field("url", &redacted_url(&self.url))
            .field("timeout", &self.timeout)
            .field(
                "header",
                &self.header.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .field("max_queue", &self.max_queue)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// `url` without user info, query or fragment (they may carry secrets), for
/// logs.
pub(crate) fn redacted_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// A username and password for the broker. `Debug` shows the username only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where the MQTT broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerMode {
    /// The caller starts the embedded broker on `listen` before `run`.
    Embedded { listen: SocketAddr },
    /// A broker run elsewhere, at `mqtt.host`/`mqtt.port`.
    External,
}

/// How the ingest connects to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
}

impl Settings {
    /// Settings without a file (tests, demo): the broker is external to the
    /// ingest (the caller runs it, e.g. the embedded one on port 0).
    pub fn new(
        sites: Vec<Site>,
        keys: HashMap<String, GatewayKey>,
        store_path: impl Into<PathBuf>,
        mqtt: MqttSettings,
    ) -> Result<Settings, ConfigError> {
        const FILE: &str = "<settings>";
        validate_id(&mqtt.client_id).map_err(|p| ConfigError::new(FILE, "mqtt.client_id", p))?;
        let named: Vec<(String, Site)> = sites
            .into_iter()
            .map(|site| (format!("site `{}`", site.id), site))
            .collect();
        check_unique_ids(&named, FILE)?;
        for site in named.iter().map(|(_, site)| site) {
            for gateway in &site.gateways {
                if !keys.contains_key(&gateway.id) {
                    return Err(ConfigError::new(
                        FILE,
                        "keys",
                        format!("gateway `{}` of site `{}` has no key", gateway.id, site.id),
                    ));
                }
            }
        }
        Ok(Settings {
            sites: named.into_iter().map(|(_, site)| site).collect(),
            keys,
            store_path: store_path.into(),
            broker: BrokerMode::External,
            broker_security: BrokerSecurity::default(),
            mqtt,
            clock: Clock::real(),
            mqtt_credentials: None,
            mqtt_persistent_session: false,
            notices: NoticeSettings::default(),
            webhooks: Vec::new(),
            http: None,
            influxdb: None,
        })
    }

    /// Loads `ingest.toml` and every site file in its `sites_dir`.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let (raw, file) = read_toml::<raw::Config>(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::validate(raw, &file, base)
    }

    fn validate(raw: raw::Config, file: &str, base: &Path) -> Result<Settings, ConfigError> {
        let sites_dir = base.join(&raw.sites_dir);
        let sites = load_sites(&sites_dir, file)?;
        check_unique_ids(&sites, file)?;

        if raw.store_path.as_os_str().is_empty() {
            return Err(ConfigError::new(file, "store_path", "must not be empty"));
        }
        let store_path = base.join(&raw.store_path);

        let client_id = raw
            .mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| DEFAULT_CLIENT_ID.to_string());
        validate_id(&client_id).map_err(|p| ConfigError::new(file, "mqtt.client_id", p))?;

        let keys_dir = base.join(&raw.keys_dir);
        let mut keys = HashMap::new();
        for (_, site) in &sites {
            for gateway in &site.gateways {
                let path = keys_dir.join(format!("{}.key", gateway.id));
                let key = secret::read_gateway_key(&path).map_err(|e| {
                    ConfigError::new(
                        file,
                        "keys_dir",
                        format!("key of gateway `{}` (site `{}`): {e}", gateway.id, site.id),
                    )
                })?;
                keys.insert(gateway.id.clone(), key);
            }
        }

        let (broker, host, port) = broker_of(&raw.broker, file)?;
        let broker_security = broker_security_of(&raw.broker, broker, base, file)?;
        let mqtt_credentials = credentials_of(&raw.mqtt, broker, base, file)?;
        let notices = notices_of(&raw.notices, file)?;
        let webhooks = webhooks_of(&raw.webhooks, base, file)?;
        let http = raw
            .http
            .as_ref()
            .map(|h| http_of(h, base, file))
            .transpose()?;
        let influxdb = raw
            .influxdb
            .as_ref()
            .map(|i| influx_of(i, base, file))
            .transpose()?;
        Ok(Settings {
            sites: sites.into_iter().map(|(_, site)| site).collect(),
            keys,
            store_path,
            broker,
            broker_security,
            mqtt: MqttSettings {
                host,
                port,
                client_id,
            },
            clock: Clock::real(),
            mqtt_credentials,
            mqtt_persistent_session: broker == BrokerMode::External,
            notices,
            webhooks,
            http,
            influxdb,
        })
    }

    /// The site that has gateway `gateway`, if any.
    pub fn site_of_gateway(&self, gateway: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.gateway(gateway).is_some())
    }
}

fn http_of(raw: &raw::Http, base: &Path, file: &str) -> Result<HttpSettings, ConfigError> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        ConfigError::new(
            file,
            "http.listen",
            format!(
                "`{}` is not an IP:PORT socket address (e.g. 127.0.0.1:8080)",
                raw.listen
            ),
        )
    })?;
    let token = match &raw.token_file {
        None => None,
        Some(path) => {
            let token = secret::read_private_text(&base.join(path))
                .map_err(|e| ConfigError::new(file, "http.token_file", e.to_string()))?;
            let visible = token.bytes().all(|b| b.is_ascii_graphic());
            if !visible || !TOKEN_CHARS.contains(&token.len()) {
                // The token is a secret: say what is wrong, not what it is.
                return Err(ConfigError::new(
                    file,
                    "http.token_file",
                    format!(
                        "the token must be {} to {} visible ASCII characters on one line (e.g. `openssl rand -hex 32`)",
                        TOKEN_CHARS.start(),
                        TOKEN_CHARS.end()
                    ),
                ));
            }
            Some(token)
        }
    };
    Ok(HttpSettings { listen, token })
}

fn broker_security_of(
    raw: &raw::Broker,
    broker: BrokerMode,
    base: &Path,
    file: &str,
) -> Result<BrokerSecurity, ConfigError> {
    let BrokerMode::Embedded { listen } = broker else {
        for (key, set) in [
            ("tls_cert_file", raw.tls_cert_file.is_some()),
            ("tls_key_file", raw.tls_key_file.is_some()),
            ("logins", !raw.logins.is_empty()),
        ] {
            if set {
                return Err(ConfigError::new(
                    file,
                    format!("broker.{key}"),
                    "is not used with mode = \"external\" (configure the external broker itself); remove it",
                ));
            }
        }
        return Ok(BrokerSecurity::default());
    };
    let tls = match (&raw.tls_cert_file, &raw.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let tls = BrokerTls {
                cert_file: base.join(cert),
                key_file: base.join(key),
            };
            crate::broker::check_tls_files(&tls)
                .map_err(|problem| ConfigError::new(file, "broker.tls_key_file", problem))?;
            Some(tls)
        }
        (Some(_), None) => {
            return Err(ConfigError::new(
                file,
                "broker.tls_key_file",
                "is required when broker.tls_cert_file is set",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                file,
                "broker.tls_cert_file",
                "is required when broker.tls_key_file is set",
            ))
        }
    };
    let mut logins = Logins::default();
    for (username, hash) in &raw.logins {
        logins.insert(username, hash).map_err(|problem| {
            ConfigError::new(file, format!("broker.logins.{username}"), problem)
        })?;
    }
    if !listen.ip().is_loopback() && (tls.is_none() || logins.is_empty()) {
        return Err(ConfigError::new(
            file,
            "broker.listen",
            format!(
                "{listen} is not a loopback address: an embedded broker reachable from a network needs TLS (tls_cert_file, tls_key_file) and logins ([broker.logins])"
            ),
        ));
    }
    Ok(BrokerSecurity { tls, logins })
}

fn influx_of(raw: &raw::Influx, base: &Path, file: &str) -> Result<InfluxSettings, ConfigError> {
    let key = |name: &str| format!("influxdb.{name}");
    let url = reqwest::Url::parse(&raw.url)
        .map_err(|e| ConfigError::new(file, key("url"), format!("is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::new(
            file,
            key("url"),
            "must be an http:// or https:// URL with a host",
        ));
    }
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            file,
            key("url"),
            "must be the server's base URL, without query or user info (org, bucket and token have keys of their own)",
        ));
    }
    let mut settings = InfluxSettings::new(url, &raw.org, &raw.bucket);
    for (name, value) in [("org", &raw.org), ("bucket", &raw.bucket)] {
        if value.trim().is_empty() {
            return Err(ConfigError::new(file, key(name), "must not be empty"));
        }
    }
    let token = secret::inline_or_file(
        raw.token.as_ref(),
        raw.token_file.as_ref(),
        base,
        file,
        "influxdb.token",
    )?;
    if let Some(token) = token {
        if token.is_empty() || reqwest::header::HeaderValue::from_str(&token).is_err() {
            // The token is a secret: do not echo it.
            return Err(ConfigError::new(
                file,
                key("token"),
                "must be non-empty visible ASCII",
            ));
        }
        settings.token = Some(token);
    }
    if let Some(text) = &raw.precision {
        settings.precision = Precision::parse(text).ok_or_else(|| {
            ConfigError::new(
                file,
                key("precision"),
                format!("`{text}` is not one of s, ms, us, ns"),
            )
        })?;
    }
    settings.gzip = raw.gzip.unwrap_or(settings.gzip);
    settings.readings = raw.readings.unwrap_or(settings.readings);
    settings.events = raw.events.unwrap_or(settings.events);
    if let Some(lines) = raw.max_lines_per_write {
        if !(1..=MAX_INFLUX_LINES).contains(&lines) {
            return Err(ConfigError::new(
                file,
                key("max_lines_per_write"),
                format!("{lines} is outside 1..={MAX_INFLUX_LINES}"),
            ));
        }
        settings.max_lines_per_write = lines;
    }
    if let Some(bytes) = raw.max_outbox_bytes {
        if bytes < MIN_INFLUX_OUTBOX_BYTES {
            return Err(ConfigError::new(
                file,
                key("max_outbox_bytes"),
                format!("{bytes} is below the minimum of {MIN_INFLUX_OUTBOX_BYTES} (1 MiB)"),
            ));
        }
        settings.max_outbox_bytes = bytes;
    }
    let millis = |value: Option<u64>, default: Duration, name: &str| match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(file, key(name), "must be at least 1")),
        Some(ms) => Ok(Duration::from_millis(ms)),
    };
    settings.timeout = millis(raw.timeout_ms, settings.timeout, "timeout_ms")?;
    settings.backoff_initial = millis(
        raw.backoff_initial_ms,
        settings.backoff_initial,
        "backoff_initial_ms",
    )?;
    settings.backoff_max = millis(raw.backoff_max_ms, settings.backoff_max, "backoff_max_ms")?;
    if settings.backoff_max < settings.backoff_initial {
        return Err(ConfigError::new(
            file,
            key("backoff_max_ms"),
            "must not be less than backoff_initial_ms",
        ));
    }
    Ok(settings)
}

/// The smallest `influxdb.max_outbox_bytes`: room for a few groups.
const MIN_INFLUX_OUTBOX_BYTES: u64 = 1024 * 1024;

fn broker_of(raw: &raw::Broker, file: &str) -> Result<(BrokerMode, String, u16), ConfigError> {
    let unused = |key: &str, mode: &str| {
        ConfigError::new(
            file,
            format!("broker.{key}"),
            format!("is not used with mode = \"{mode}\"; remove it"),
        )
    };
    match raw.mode {
        raw::Mode::Embedded => {
            if raw.host.is_some() {
                return Err(unused("host", "embedded"));
            }
            if raw.port.is_some() {
                return Err(unused("port", "embedded"));
            }
            let text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
            let listen: SocketAddr = text.parse().map_err(|_| {
                ConfigError::new(
                    file,
                    "broker.listen",
                    format!("`{text}` is not an IP:PORT socket address (e.g. 127.0.0.1:1883)"),
                )
            })?;
            Ok((
                BrokerMode::Embedded { listen },
                connect_host(listen.ip()).to_string(),
                listen.port(),
            ))
        }
        raw::Mode::External => {
            if raw.listen.is_some() {
                return Err(unused("listen", "external"));
            }
            let host = raw.host.clone().ok_or_else(|| {
                ConfigError::new(file, "broker.host", "is required with mode = \"external\"")
            })?;
            if host.trim().is_empty() {
                return Err(ConfigError::new(file, "broker.host", "must not be empty"));
            }
            let port = raw.port.unwrap_or(1883);
            if port == 0 {
                return Err(ConfigError::new(file, "broker.port", "must not be 0"));
            }
            Ok((BrokerMode::External, host, port))
        }
    }
}

fn credentials_of(
    raw: &raw::Mqtt,
    broker: BrokerMode,
    base: &Path,
    file: &str,
) -> Result<Option<Credentials>, ConfigError> {
    let password = secret::inline_or_file(
        raw.password.as_ref(),
        raw.password_file.as_ref(),
        base,
        file,
        "mqtt.password",
    )?;
    let (username, password) = match (&raw.username, &password) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ConfigError::new(
                file,
                "mqtt.password",
                "is required when mqtt.username is set",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                file,
                "mqtt.username",
                "is required when mqtt.password is set",
            ))
        }
        (Some(username), Some(password)) => (username, password),
    };
    if let BrokerMode::Embedded { .. } = broker {
        return Err(ConfigError::new(
            file,
            "mqtt.username",
            "is not used with broker.mode = \"embedded\" (the ingest logs in to its own broker by itself; gateway logins go in [broker.logins]); remove mqtt.username and mqtt.password",
        ));
    }
    if username.is_empty() {
        return Err(ConfigError::new(file, "mqtt.username", "must not be empty"));
    }
    Ok(Some(Credentials {
        username: username.clone(),
        password: password.clone(),
    }))
}

fn positive_secs(
    value: Option<u64>,
    default: u64,
    key: &str,
    file: &str,
) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(file, key, "must be at least 1")),
        secs => Ok(Duration::from_secs(secs)),
    }
}

fn notices_of(raw: &raw::Notices, file: &str) -> Result<NoticeSettings, ConfigError> {
    Ok(NoticeSettings {
        historical_lag: positive_secs(
            raw.historical_lag_secs,
            DEFAULT_HISTORICAL_LAG_SECS,
            "notices.historical_lag_secs",
            file,
        )?,
        replay_quiet: positive_secs(
            raw.replay_quiet_secs,
            DEFAULT_REPLAY_QUIET_SECS,
            "notices.replay_quiet_secs",
            file,
        )?,
        silent_after: positive_secs(
            raw.silent_after_secs,
            DEFAULT_SILENT_AFTER_SECS,
            "notices.silent_after_secs",
            file,
        )?,
    })
}

fn webhooks_of(
    raw: &[raw::Webhook],
    base: &Path,
    file: &str,
) -> Result<Vec<WebhookSettings>, ConfigError> {
    let mut webhooks: Vec<WebhookSettings> = Vec::new();
    for (i, hook) in raw.iter().enumerate() {
        let key = |name: &str| format!("webhooks[{i}].{name}");
        validate_id(&hook.name).map_err(|p| ConfigError::new(file, key("name"), p))?;
        if webhooks.iter().any(|w| w.name == hook.name) {
            return Err(ConfigError::new(
                file,
                key("name"),
                format!("webhook name `{}` is already used", hook.name),
            ));
        }
        let url = reqwest::Url::parse(&hook.url)
            .map_err(|e| ConfigError::new(file, key("url"), format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError::new(
                file,
                key("url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        let header_value = secret::inline_or_file(
            hook.header_value.as_ref(),
            hook.header_value_file.as_ref(),
            base,
            file,
            &key("header_value"),
        )?;
        let header = match (&hook.header_name, header_value) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    file,
                    key("header_value"),
                    "is required when header_name is set",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    file,
                    key("header_name"),
                    "is required when header_value is set",
                ))
            }
            (Some(name), Some(value)) => {
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(ConfigError::new(
                        file,
                        key("header_name"),
                        format!("`{name}` is not a valid HTTP header name"),
                    ));
                }
                if reqwest::header::HeaderValue::from_str(&value).is_err() {
                    // The value is a secret: do not echo it.
                    return Err(ConfigError::new(
                        file,
                        key("header_value"),
                        "is not a valid HTTP header value (visible ASCII only)",
                    ));
                }
                Some((name.clone(), value))
            }
        };
        let millis = |value: Option<u64>, default: u64, name: &str| match value.unwrap_or(default) {
            0 => Err(ConfigError::new(file, key(name), "must be at least 1")),
            ms => Ok(Duration::from_millis(ms)),
        };
        let timeout = millis(hook.timeout_ms, DEFAULT_WEBHOOK_TIMEOUT_MS, "timeout_ms")?;
        let backoff_initial = millis(
            hook.backoff_initial_ms,
            DEFAULT_BACKOFF_INITIAL_MS,
            "backoff_initial_ms",
        )?;
        let backoff_max = millis(
            hook.backoff_max_ms,
            DEFAULT_BACKOFF_MAX_MS,
            "backoff_max_ms",
        )?;
        if backoff_max < backoff_initial {
            return Err(ConfigError::new(
                file,
                key("backoff_max_ms"),
                "must not be less than backoff_initial_ms",
            ));
        }
        let max_queue = hook.max_queue.unwrap_or(DEFAULT_WEBHOOK_MAX_QUEUE);
        if max_queue == 0 {
            return Err(ConfigError::new(
                file,
                key("max_queue"),
                "must be at least 1",
            ));
        }
        webhooks.push(WebhookSettings {
            name: hook.name.clone(),
            url,
            timeout,
            header,
            max_queue,
            backoff_initial,
            backoff_max,
        });
    }
    Ok(webhooks)
}

/// The address a local client uses to reach a listener bound to `ip`.
pub(crate) fn connect_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Loads every `*.site.toml` in `dir`, sorted by file name, each paired with
/// its file name for error messages.
fn load_sites(dir: &Path, file: &str) -> Result<Vec<(String, Site)>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ConfigError::new(
            file,
            "sites_dir",
            format!("cannot read directory {}: {e}", dir.display()),
        )
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            ConfigError::new(
                file,
                "sites_dir",
                format!("cannot list directory {}: {e}", dir.display()),
            )
        })?;
        let path = entry.path();
        let is_site_file = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(SITE_FILE_SUFFIX));
        if is_site_file && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(ConfigError::new(
            file,
            "sites_dir",
            format!("no *{SITE_FILE_SUFFIX} files in {}", dir.display()),
        ));
    }
    paths
        .iter()
        .map(|path| Ok((path.display().to_string(), Site::load(path)?)))
        .collect()
}

/// Site ids unique, and every gateway id in one site only. `sites` pairs
/// each site with the name of its file (or a description of it).
fn check_unique_ids(sites: &[(String, Site)], file: &str) -> Result<(), ConfigError> {
    if sites.is_empty() {
        return Err(ConfigError::new(
            file,
            "sites",
            "at least one site is required",
        ));
    }
    let mut site_ids: HashMap<&str, &str> = HashMap::new();
    let mut gateway_ids: HashMap<&str, &str> = HashMap::new();
    for (name, site) in sites {
        if let Some(first) = site_ids.insert(&site.id, name) {
            return Err(ConfigError::new(
                name,
                "site.id",
                format!("site id `{}` is already used by {first}", site.id),
            ));
        }
        for (i, gateway) in site.gateways.iter().enumerate() {
            if let Some(first) = gateway_ids.insert(&gateway.id, name) {
                return Err(ConfigError::new(
                    name,
                    format!("gateways[{i}].id"),
                    format!("gateway id `{}` is already used by {first}", gateway.id),
                ));
            }
        }
    }
    Ok(())
}

/// The file as written.
mod raw {
    use std::path::PathBuf;

    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Config {
        pub(super) sites_dir: PathBuf,
        #[serde(default = "default_keys_dir")]
        pub(super) keys_dir: PathBuf,
        pub(super) store_path: PathBuf,
        #[serde(default)]
        pub(super) broker: Broker,
        #[serde(default)]
        pub(super) mqtt: Mqtt,
        #[serde(default)]
        pub(super) notices: Notices,
        #[serde(default)]
        pub(super) webhooks: Vec<Webhook>,
        pub(super) http: Option<Http>,
        pub(super) influxdb: Option<Influx>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Influx {
        pub(super) url: String,
        pub(super) org: String,
        pub(super) bucket: String,
        pub(super) token: Option<String>,
        pub(super) token_file: Option<PathBuf>,
        pub(super) precision: Option<String>,
        pub(super) gzip: Option<bool>,
        pub(super) readings: Option<bool>,
        pub(super) events: Option<bool>,
        pub(super) max_lines_per_write: Option<usize>,
        pub(super) max_outbox_bytes: Option<u64>,
        pub(super) timeout_ms: Option<u64>,
        pub(super) backoff_initial_ms: Option<u64>,
        pub(super) backoff_max_ms: Option<u64>,
    }

    fn default_keys_dir() -> PathBuf {
        PathBuf::from("keys")
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Http {
        pub(super) listen: String,
        pub(super) token_file: Option<PathBuf>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Notices {
        pub(super) historical_lag_secs: Option<u64>,
        pub(super) replay_quiet_secs: Option<u64>,
        pub(super) silent_after_secs: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Webhook {
        pub(super) name: String,
        pub(super) url: String,
        pub(super) timeout_ms: Option<u64>,
        pub(super) header_name: Option<String>,
        pub(super) header_value: Option<String>,
        pub(super) header_value_file: Option<PathBuf>,
        pub(super) max_queue: Option<u64>,
        pub(super) backoff_initial_ms: Option<u64>,
        pub(super) backoff_max_ms: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum Mode {
        #[default]
        Embedded,
        External,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Broker {
        #[serde(default)]
        pub(super) mode: Mode,
        pub(super) listen: Option<String>,
        pub(super) host: Option<String>,
        pub(super) port: Option<u16>,
        pub(super) tls_cert_file: Option<PathBuf>,
        pub(super) tls_key_file: Option<PathBuf>,
        /// Username -> argon2 PHC hash of the password.
        #[serde(default)]
        pub(super) logins: std::collections::BTreeMap<String, String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Mqtt {
        pub(super) client_id: Option<String>,
        pub(super) username: Option<String>,
        pub(super) password: Option<String>,
        pub(super) password_file: Option<PathBuf>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");

    /// A config directory with `ingest.toml` and the given site files.
    /// A config directory with `ingest.toml`, the given site files, and a
    /// private key in `keys/` for every gateway of those that parse.
    fn config_dir(config: &str, sites: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ingest.toml"), config).unwrap();
        std::fs::create_dir(dir.path().join("sites")).unwrap();
        for (name, text) in sites {
            std::fs::write(dir.path().join("sites").join(name), text).unwrap();
        }
        write_keys(&dir.path().join("keys"), sites);
        dir
    }

    fn test_key(gateway: &str) -> GatewayKey {
        GatewayKey::from_bytes([gateway.len() as u8; 32])
    }

    fn write_keys(keys_dir: &Path, sites: &[(&str, &str)]) {
        std::fs::create_dir_all(keys_dir).unwrap();
        for (name, text) in sites {
            let Ok(site) = Site::from_toml(text, name) else {
                continue;
            };
            for gateway in &site.gateways {
                let path = keys_dir.join(format!("{}.key", gateway.id));
                if !path.exists() {
                    let line = test_key(&gateway.id).to_hex_line();
                    secret::create_private(&path, line.as_bytes()).unwrap();
                }
            }
        }
    }

    fn keys_of(site: &Site) -> HashMap<String, GatewayKey> {
        site.gateways
            .iter()
            .map(|g| (g.id.clone(), test_key(&g.id)))
            .collect()
    }

    fn load(dir: &tempfile::TempDir) -> Result<Settings, ConfigError> {
        Settings::load(&dir.path().join("ingest.toml"))
    }

    #[test]
    fn default_config_loads_with_the_deploy_site() {
        let dir = config_dir(DEFAULT_CONFIG, &[("plant.site.toml", SITE)]);
        let settings = load(&dir).unwrap();
        assert_eq!(settings.sites.len(), 1);
        assert_eq!(settings.sites[0].id, "tx-dyeing");
        assert_eq!(settings.store_path, dir.path().join("ingest.redb"));
        assert_eq!(
            settings.broker,
            BrokerMode::Embedded {
                listen: "127.0.0.1:1883".parse().unwrap()
            }
        );
        assert_eq!(
            settings.mqtt,
            MqttSettings {
                host: "127.0.0.1".into(),
                port: 1883,
                client_id: "facwatch-ingest".into()
            }
        );
        assert_eq!(settings.mqtt_credentials, None);
        assert!(!settings.mqtt_persistent_session);
        assert_eq!(settings.site_of_gateway("gw-01").unwrap().id, "tx-dyeing");
        assert!(settings.site_of_gateway("gw-99").is_none());
    }

    #[test]
    fn external_broker_mode_reads_host_and_port() {
        let config = r#"
sites_dir = "sites"
store_path = "state/ingest.redb"
[broker]
mode = "external"
host = "mqtt.example"
port = 8883
[mqtt]
client_id = "ingest-2"
"#;
        let dir = config_dir(config, &[("plant.site.toml", SITE)]);
        let settings = load(&dir).unwrap();
        assert_eq!(settings.broker, BrokerMode::External);
        assert_eq!(
            settings.mqtt,
            MqttSettings {
                host: "mqtt.example".into(),
                port: 8883,
                client_id: "ingest-2".into()
            }
        );
        assert_eq!(settings.mqtt_credentials, None);
        assert!(settings.mqtt_persistent_session);
    }

    const EXTERNAL: &str = r#"
sites_dir = "sites"
store_path = "ingest.redb"
[broker]
mode = "external"
host = "127.0.0.1"
[mqtt]
"#;

    #[test]
    fn external_broker_credentials_are_read_and_never_shown_by_debug() {
        let config = format!("{EXTERNAL}username = \"ingest\"\npassword = \"s3cret\"\n");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let settings = load(&dir).unwrap();
        assert_eq!(
            settings.mqtt_credentials,
            Some(Credentials {
                username: "ingest".into(),
                password: "s3cret".into()
            })
        );
        let shown = format!("{settings:?}");
        assert!(shown.contains("username: \"ingest\""), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn username_and_password_come_together() {
        for (extra, key, problem) in [
            (
                "username = \"ingest\"",
                "mqtt.password",
                "is required when mqtt.username is set",
            ),
            (
                "password = \"s3cret\"",
                "mqtt.username",
                "is required when mqtt.password is set",
            ),
            (
                "username = \"\"\npassword = \"s3cret\"",
                "mqtt.username",
                "must not be empty",
            ),
        ] {
            let dir = config_dir(
                &format!("{EXTERNAL}{extra}\n"),
                &[("plant.site.toml", SITE)],
            );
            let err = load(&dir).unwrap_err();
            assert_eq!(
                (err.key.as_deref(), err.problem.as_str()),
                (Some(key), problem)
            );
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn credentials_are_refused_with_the_embedded_broker() {
        let config = DEFAULT_CONFIG.replace(
            "client_id = \"facwatch-ingest\"",
            "client_id = \"facwatch-ingest\"\nusername = \"u\"\npassword = \"p\"",
        );
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("mqtt.username"));
        assert!(
            err.problem
                .starts_with("is not used with broker.mode = \"embedded\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_and_key() {
        let config = DEFAULT_CONFIG.replace("[mqtt]", "[mqtt]\nqos = 2");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("ingest.toml: "), "{err}");
        assert!(err.contains("unknown field `qos`"), "{err}");
    }

    #[test]
    fn missing_sites_dir_key_is_an_error() {
        let config = DEFAULT_CONFIG.replace("sites_dir = \"sites\"", "");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("missing field `sites_dir`"), "{err}");
    }

    #[test]
    fn sites_dir_that_does_not_exist_is_named() {
        let config = DEFAULT_CONFIG.replace("sites_dir = \"sites\"", "sites_dir = \"nope\"");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("sites_dir"));
        assert!(err.problem.starts_with("cannot read directory"), "{err}");
        assert!(err.file.ends_with("ingest.toml"), "{err}");
    }

    #[test]
    fn sites_dir_without_site_files_is_an_error() {
        let dir = config_dir(DEFAULT_CONFIG, &[("notes.txt", "hello")]);
        let err = load(&dir).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("sites_dir"));
        assert!(err.problem.starts_with("no *.site.toml files in"), "{err}");
    }

    #[test]
    fn duplicate_site_id_names_both_files() {
        let dir = config_dir(
            DEFAULT_CONFIG,
            &[
                ("a.site.toml", SITE),
                ("b.site.toml", &SITE.replace("\"gw-01\"", "\"gw-02\"")),
            ],
        );
        let err = load(&dir).unwrap_err();
        assert!(err.file.ends_with("b.site.toml"), "{err}");
        assert_eq!(err.key.as_deref(), Some("site.id"));
        assert!(
            err.problem
                .starts_with("site id `tx-dyeing` is already used by ")
                && err.problem.ends_with("a.site.toml"),
            "{err}"
        );
    }

    #[test]
    fn gateway_shared_by_two_sites_names_both_files() {
        let other = SITE.replace("id = \"tx-dyeing\"", "id = \"other-plant\"");
        let dir = config_dir(
            DEFAULT_CONFIG,
            &[("a.site.toml", SITE), ("b.site.toml", &other)],
        );
        let err = load(&dir).unwrap_err();
        assert!(err.file.ends_with("b.site.toml"), "{err}");
        assert_eq!(err.key.as_deref(), Some("gateways[0].id"));
        assert!(
            err.problem
                .starts_with("gateway id `gw-01` is already used by ")
                && err.problem.ends_with("a.site.toml"),
            "{err}"
        );
    }

    #[test]
    fn invalid_site_file_error_names_the_site_file() {
        let broken = SITE.replace("unit = 5", "unit = 5\nspeed = 9600");
        let dir = config_dir(DEFAULT_CONFIG, &[("plant.site.toml", &broken)]);
        let err = load(&dir).unwrap_err();
        assert!(err.file.ends_with("plant.site.toml"), "{err}");
        assert_eq!(err.key.as_deref(), Some("meters[4].speed"), "{err}");
        assert!(err.problem.contains("unknown field `speed`"), "{err}");
    }

    #[test]
    fn broker_keys_of_the_other_mode_are_refused() {
        let config = DEFAULT_CONFIG.replace("# host = \"127.0.0.1\"", "host = \"127.0.0.1\"");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "ingest.toml: broker.host: is not used with mode = \"embedded\"; remove it"
            ),
            "{err}"
        );
    }

    #[test]
    fn external_mode_requires_a_host() {
        let config = DEFAULT_CONFIG
            .replace("mode = \"embedded\"", "mode = \"external\"")
            .replace("listen = \"127.0.0.1:1883\"", "");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.host"));
        assert_eq!(err.problem, "is required with mode = \"external\"");
    }

    #[test]
    fn bad_listen_address_and_client_id_are_named() {
        let config = DEFAULT_CONFIG.replace("127.0.0.1:1883", "localhost");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        assert_eq!(
            load(&dir).unwrap_err().key.as_deref(),
            Some("broker.listen")
        );

        let config = DEFAULT_CONFIG.replace("\"facwatch-ingest\"", "\"a/b\"");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        assert_eq!(
            load(&dir).unwrap_err().key.as_deref(),
            Some("mqtt.client_id")
        );
    }

    #[test]
    fn webhooks_and_notice_settings_are_read_and_the_header_value_never_shown() {
        let config = format!(
            "{DEFAULT_CONFIG}\n[[webhooks]]\nname = \"ops\"\nurl = \"https://u:pw@alerts.example/hook?token=t\"\nheader_name = \"Authorization\"\nheader_value = \"Bearer s3cret\"\nmax_queue = 5\n"
        )
        .replace("silent_after_secs = 300", "silent_after_secs = 60");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let settings = load(&dir).unwrap();
        assert_eq!(
            settings.notices,
            NoticeSettings {
                historical_lag: Duration::from_secs(900),
                replay_quiet: Duration::from_secs(60),
                silent_after: Duration::from_secs(60),
            }
        );
        let hook = &settings.webhooks[0];
        assert_eq!(
            (
                hook.name.as_str(),
                hook.max_queue,
                hook.timeout,
                hook.backoff_max
            ),
            ("ops", 5, Duration::from_secs(10), Duration::from_secs(300))
        );
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw@") && !shown.contains("token"),
            "{shown}"
        );
        assert!(shown.contains("https://alerts.example/hook"), "{shown}");
    }

    #[test]
    fn bad_webhook_entries_are_named() {
        for (extra, key, problem) in [
            (
                "url = \"ftp://x/\"",
                "webhooks[0].url",
                "must be an http:// or https:// URL with a host",
            ),
            (
                "url = \"http://x/\"\nheader_name = \"A\"",
                "webhooks[0].header_value",
                "is required when header_name is set",
            ),
            (
                "url = \"http://x/\"\nbackoff_initial_ms = 10\nbackoff_max_ms = 5",
                "webhooks[0].backoff_max_ms",
                "must not be less than backoff_initial_ms",
            ),
            (
                "url = \"http://x/\"\nmax_queue = 0",
                "webhooks[0].max_queue",
                "must be at least 1",
            ),
            (
                "url = \"http://x/\"\nheader_name = \"A\"\nheader_value = \"s3cret\\n\"",
                "webhooks[0].header_value",
                "is not a valid HTTP header value (visible ASCII only)",
            ),
        ] {
            let config = format!("{DEFAULT_CONFIG}\n[[webhooks]]\nname = \"ops\"\n{extra}\n");
            let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
            let err = load(&dir).unwrap_err();
            assert_eq!(
                (err.key.as_deref(), err.problem.as_str()),
                (Some(key), problem),
                "{extra}"
            );
            assert!(!err.to_string().contains("s3cret"));
        }
        let config = DEFAULT_CONFIG.replace("silent_after_secs = 300", "silent_after_secs = 0");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        assert_eq!(
            load(&dir).unwrap_err().key.as_deref(),
            Some("notices.silent_after_secs")
        );
    }

    #[test]
    fn settings_new_refuses_duplicate_sites() {
        let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
        let mqtt = MqttSettings {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "ingest".into(),
        };
        let keys = keys_of(&site);
        let err = Settings::new(
            vec![site.clone(), site.clone()],
            keys.clone(),
            "x.redb",
            mqtt.clone(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "site `tx-dyeing`: site.id: site id `tx-dyeing` is already used by site `tx-dyeing`"
        );
        let err =
            Settings::new(vec![site.clone()], HashMap::new(), "x.redb", mqtt.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "<settings>: keys: gateway `gw-01` of site `tx-dyeing` has no key"
        );
        let settings = Settings::new(vec![site], keys, "x.redb", mqtt).unwrap();
        assert_eq!(settings.broker, BrokerMode::External);
    }

    #[test]
    fn http_listen_is_read_and_a_bad_one_is_named() {
        let dir = config_dir(DEFAULT_CONFIG, &[("plant.site.toml", SITE)]);
        assert_eq!(load(&dir).unwrap().http, None);

        let config = format!("{DEFAULT_CONFIG}\n[http]\nlisten = \"127.0.0.1:0\"\n");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        assert_eq!(
            load(&dir).unwrap().http,
            Some(HttpSettings::open("127.0.0.1:0".parse().unwrap()))
        );

        let config = format!("{DEFAULT_CONFIG}\n[http]\nlisten = \"localhost:8080\"\n");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        let err = load(&dir).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("http.listen"));
        assert_eq!(
            err.problem,
            "`localhost:8080` is not an IP:PORT socket address (e.g. 127.0.0.1:8080)"
        );

        let config = format!("{DEFAULT_CONFIG}\n[http]\nlisten = \"127.0.0.1:0\"\nport = 1\n");
        let dir = config_dir(&config, &[("plant.site.toml", SITE)]);
        assert!(load(&dir).unwrap_err().to_string().contains("port"));
    }

    #[test]
    fn influxdb_is_read_with_defaults_the_documented_example_parses_and_errors_are_named() {
        let with = |table: &str| {
            let dir = config_dir(
                &format!("{DEFAULT_CONFIG}\n{table}"),
                &[("plant.site.toml", SITE)],
            );
            load(&dir)
        };
        let minimal =
            "[influxdb]\nurl = \"http://127.0.0.1:8086/base/\"\norg = \"o\"\nbucket = \"b\"\n";
        let settings = with(minimal).unwrap().influxdb.unwrap();
        assert_eq!(
            settings,
            InfluxSettings::new("http://127.0.0.1:8086/base/".parse().unwrap(), "o", "b")
        );
        assert_eq!(
            settings.write_url(Precision::Milliseconds).as_str(),
            "http://127.0.0.1:8086/base/api/v2/write?org=o&bucket=b&precision=ms"
        );

        // The commented example in the default config, uncommented.
        let example: String = DEFAULT_CONFIG
            .split_once("# [influxdb]")
            .unwrap()
            .1
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let settings = with(&format!("[influxdb]{example}"))
            .unwrap()
            .influxdb
            .unwrap();
        assert_eq!(settings.token.as_deref(), Some("change-me"));
        assert_eq!(settings.max_outbox_bytes, 268_435_456);
        assert_eq!(settings.max_lines_per_write, 5000);
        assert_eq!(settings.backoff_max, Duration::from_secs(60));
        assert!(!format!("{settings:?}").contains("change-me"));

        let cases = [
            (
                "url = \"ftp://x\"",
                "influxdb.url",
                "must be an http:// or https:// URL with a host",
            ),
            (
                "url = \"http://u:p@x:8086\"",
                "influxdb.url",
                "must be the server's base URL",
            ),
            (
                "precision = \"m\"",
                "influxdb.precision",
                "`m` is not one of s, ms, us, ns",
            ),
            (
                "max_lines_per_write = 0",
                "influxdb.max_lines_per_write",
                "0 is outside 1..=100000",
            ),
            (
                "max_outbox_bytes = 1000",
                "influxdb.max_outbox_bytes",
                "1000 is below the minimum",
            ),
            (
                "backoff_initial_ms = 5000\nbackoff_max_ms = 10",
                "influxdb.backoff_max_ms",
                "must not be less than",
            ),
            (
                "token = \"\"",
                "influxdb.token",
                "must be non-empty visible ASCII",
            ),
            ("org = \" \"", "influxdb.org", "must not be empty"),
        ];
        for (line, key, problem) in cases {
            let name = line.split_once(' ').unwrap().0;
            let table: String = minimal
                .lines()
                .filter(|l| !l.starts_with(&format!("{name} ")))
                .chain([line])
                .collect::<Vec<_>>()
                .join("\n");
            let err = with(&table).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{line}");
            assert!(err.problem.starts_with(problem), "{line}: {}", err.problem);
        }
        let err = with(&format!("{minimal}colour = \"red\"\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn secrets_can_come_from_private_files_but_not_from_both_places_or_readable_files() {
        // One config per secret kind, each given as a file next to ingest.toml.
        let cases = [
            (
                format!("{EXTERNAL}username = \"ingest\"\npassword_file = \"secret\"\n"),
                "mqtt.password",
            ),
            (
                format!("{DEFAULT_CONFIG}\n[influxdb]\nurl = \"http://127.0.0.1:8086\"\norg = \"o\"\nbucket = \"b\"\ntoken_file = \"secret\"\n"),
                "influxdb.token",
            ),
            (
                format!("{DEFAULT_CONFIG}\n[[webhooks]]\nname = \"ops\"\nurl = \"https://alerts.example/hook\"\nheader_name = \"Authorization\"\nheader_value_file = \"secret\"\n"),
                "webhooks[0].header_value",
            ),
        ];
        for (config, key) in &cases {
            let dir = config_dir(config, &[("plant.site.toml", SITE)]);
            let secret_path = dir.path().join("secret");
            secret::create_private(&secret_path, b"Bearer s3cret-from-file\n").unwrap();
            let settings = load(&dir).unwrap();
            let read = match *key {
                "mqtt.password" => settings.mqtt_credentials.clone().unwrap().password,
                "influxdb.token" => settings.influxdb.clone().unwrap().token.unwrap(),
                _ => settings.webhooks[0].header.clone().unwrap().1,
            };
            assert_eq!(read, "Bearer s3cret-from-file", "{key}");
            assert!(!format!("{settings:?}").contains("s3cret"), "{key}");

            // Inline and from a file at once: which one would win is not
            // for the reader to guess.
            let last = key.rsplit('.').next().unwrap();
            let both = config.replace(
                &format!("{last}_file = \"secret\""),
                &format!("{last}_file = \"secret\"\n{last} = \"Bearer inline\""),
            );
            std::fs::write(dir.path().join("ingest.toml"), &both).unwrap();
            let err = load(&dir).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(format!("{key}_file").as_str()));
            assert!(
                err.problem
                    .contains(&format!("give {key} or {key}_file, not both")),
                "{err}"
            );

            // A file others can read is refused by name, secret unshown.
            std::fs::write(dir.path().join("ingest.toml"), config).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o644))
                    .unwrap();
                let err = load(&dir).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("{key}_file"))
                        && err.contains("secret")
                        && err.contains("0644")
                        && err.contains("chmod 600"),
                    "{err}"
                );
                assert!(!err.contains("s3cret"), "{err}");
            }
        }
    }

    #[test]
    fn the_deploy_example_loads_with_its_site_and_api() {
        // Beside its site file, with the key the README has one make.
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let dir = tempfile::tempdir().unwrap();
        let site_name = "stenter-plant.site.toml";
        std::fs::copy(deploy.join("ingest.toml"), dir.path().join("ingest.toml")).unwrap();
        std::fs::copy(deploy.join(site_name), dir.path().join(site_name)).unwrap();
        write_keys(&dir.path().join("keys"), &[(site_name, SITE)]);
        let settings = Settings::load(&dir.path().join("ingest.toml")).unwrap();
        assert_eq!(settings.sites.len(), 1);
        assert_eq!(settings.keys, keys_of(&settings.sites[0]));
        assert_eq!(
            settings.http,
            Some(HttpSettings::open("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(settings.influxdb, None);
    }
}
