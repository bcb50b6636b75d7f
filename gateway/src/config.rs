//! The gateway's own config file (`gateway.toml`), read in two stages: raw
//! serde structs that refuse unknown keys, then [`Settings`], built only after
//! every value is checked. The default file ships in the binary
//! (`gateway.default.toml`, printed by `print-default-config`).
//!
//! Invariants of a [`Settings`]:
//! - `gateway` is a gateway of the site file, and `meters` are exactly its
//!   meters (at least one), in site-file order;
//! - `window_batches >= 1`, `ack_timeout > 0`, the MQTT keep-alive is 0 or
//!   1..=65535 s (what MQTT 3.1.1 can carry);
//! - MQTT credentials are a username and a password (given inline or in a
//!   `password_file`), both or neither; the password is never logged nor
//!   printed (`Debug` shows `***`);
//! - `key` was read from `gateway_key_file`, a file private to its owner
//!   (mode 0600 or stricter), and seals every batch; `Debug` shows only its
//!   fingerprint;
//! - `[mqtt.tls]`, when present, was read and checked (CA, optional client
//!   certificate and private key) when the settings were built;
//! - the buffer holds at least [`MIN_MAX_BYTES`], and commits every
//!   10..=10000 ms ([`COMMIT_INTERVAL_RANGE_MS`]);
//! - `metrics_listen`, when set, is a socket address (`IP:PORT`; port 0
//!   picks a free port);
//! - relative paths (`site_file`, `buffer.path`, key and TLS files) are
//!   resolved against the
//!   directory of the config file, not the working directory.
//!
//! Every error is a [`ConfigError`] naming the file, the key and the problem.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::seal::GatewayKey;
use facwatch_proto::secret;
use facwatch_proto::site::{self, ConfigError, Gateway, Meter, Site};

use crate::buffer::{BufferLimits, WhenFull, MIN_MAX_BYTES};
use crate::forward::pace::{ReplayPace, DEFAULT_REPLAY_PACE};
use crate::tls::{TlsFiles, TlsSettings};

/// The default config, shipped inside the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../gateway.default.toml");

/// Default number of batches sent but not yet acked by the ingest.
pub const DEFAULT_WINDOW_BATCHES: u32 = 16;

/// Default wall-clock time without ack progress before resending.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_millis(5000);

/// Default wall-clock time between two commits of buffered samples.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(1000);

/// Accepted `[buffer] commit_interval_ms`.
pub const COMMIT_INTERVAL_RANGE_MS: std::ops::RangeInclusive<u64> = 10..=10_000;

/// Validated gateway settings. Fields are public so tests and the demo can
/// adjust them after [`Settings::new`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub site_id: String,
    pub gateway: Gateway,
    /// This gateway's meters, in site-file order.
    pub meters: Vec<Meter>,
    /// Meter id -> id of the line whose facility the meter measures, for
    /// logs. A meter measuring no facility has no entry. (The site file
    /// lets a meter measure at most one facility.)
    pub meter_lines: HashMap<String, String>,
    pub mqtt: MqttSettings,
    /// Seals every batch and opens every ack ([`facwatch_proto::seal`]);
    /// the ingest holds the same key for this gateway.
    pub key: GatewayKey,
    /// The redb file holding unacked batches.
    pub buffer_path: PathBuf,
    /// Size and age bounds of the buffer, and what goes when it is full.
    pub buffer_limits: BufferLimits,
    /// Wall-clock time between two commits of buffered samples: a power cut
    /// loses at most the samples of one interval plus those queued.
    pub commit_interval: Duration,
    /// Most batches sent and not yet acked by the ingest.
    pub window_batches: u32,
    /// Wall-clock time without ack progress after which the unacked batches
    /// are sent again.
    pub ack_timeout: Duration,
    /// Pace of every publish (backlog replay and live alike).
    pub replay: ReplayPace,
    pub clock: Clock,
    /// When set, polling stops at this virtual time (exclusive: a poll slot
    /// at exactly this time is not polled) and `run` returns once every
    /// batch is acked.
    pub poll_until_ms: Option<i64>,
    /// Where to serve Prometheus metrics (`[metrics] listen`); `None` serves
    /// none.
    pub metrics_listen: Option<SocketAddr>,
}

/// How to reach the MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Zero disables keep-alive pings.
    pub keep_alive: Duration,
    /// Username and password for a broker that wants them (Mosquitto with
    /// `allow_anonymous false`, or the ingest's embedded broker).
    pub credentials: Option<MqttCredentials>,
    /// TLS to the broker; `None` is plain TCP.
    pub tls: Option<TlsSettings>,
}

/// A broker login. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for MqttCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttCredentials")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

impl MqttSettings {
    /// Broker at `host:port` with the default client id of `gateway_id` and
    /// a 30 s keep-alive.
    pub fn new(host: impl Into<String>, port: u16, gateway_id: &str) -> MqttSettings {
        MqttSettings {
            host: host.into(),
            port,
            client_id: default_client_id(gateway_id),
            keep_alive: Duration::from_secs(raw::DEFAULT_KEEP_ALIVE_SECS),
            credentials: None,
            tls: None,
        }
    }
}

fn default_client_id(gateway_id: &str) -> String {
    format!("facwatch-gw-{gateway_id}")
}

impl Settings {
    /// Settings for `gateway_id` of `site`, sealing with `key`, with
    /// defaults for everything
    /// else: real-time polling forever, a window of
    /// [`DEFAULT_WINDOW_BATCHES`], an ack timeout of [`DEFAULT_ACK_TIMEOUT`],
    /// [`BufferLimits::default`], commits every
    /// [`DEFAULT_COMMIT_INTERVAL`], replay at [`DEFAULT_REPLAY_PACE`], no
    /// metrics endpoint.
    pub fn new(
        site: &Site,
        gateway_id: &str,
        mqtt: MqttSettings,
        key: GatewayKey,
        buffer_path: impl Into<PathBuf>,
        clock: Clock,
    ) -> Result<Settings, ConfigError> {
        let (gateway, meters) = gateway_of(site, gateway_id, &format!("site `{}`", site.id))?;
        Ok(Settings {
            site_id: site.id.clone(),
            gateway,
            meter_lines: meter_lines(site, &meters),
            meters,
            mqtt,
            key,
            buffer_path: buffer_path.into(),
            buffer_limits: BufferLimits::default(),
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            window_batches: DEFAULT_WINDOW_BATCHES,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            replay: DEFAULT_REPLAY_PACE,
            clock,
            poll_until_ms: None,
            metrics_listen: None,
        })
    }

    /// Loads and validates a config file and the site file it names.
    /// `clock_anchor_wall_ms` is the wall time (Unix ms) at which a simulated
    /// clock reads `[clock] start`; it is ignored without a `[clock]`
    /// section.
    pub fn load(path: &Path, clock_anchor_wall_ms: i64) -> Result<Settings, ConfigError> {
        let (raw, file) = site::read_toml::<raw::ConfigFile>(path)?;
        let base = path.parent().unwrap_or(Path::new(""));
        Settings::validate(raw, &file, base, clock_anchor_wall_ms)
    }

    /// Parses and validates config text; `file` names it in errors and
    /// relative paths are resolved against `base`.
    pub fn from_toml(
        text: &str,
        file: &str,
        base: &Path,
        clock_anchor_wall_ms: i64,
    ) -> Result<Settings, ConfigError> {
        let raw = site::parse_toml::<raw::ConfigFile>(text, file)?;
        Settings::validate(raw, file, base, clock_anchor_wall_ms)
    }

    fn validate(
        raw: raw::ConfigFile,
        file: &str,
        base: &Path,
        clock_anchor_wall_ms: i64,
    ) -> Result<Settings, ConfigError> {
        let err = |key: &str, problem: String| ConfigError::new(file, key, problem);

        let site_path = base.join(&raw.site_file);
        let site = Site::load(&site_path)?;
        let site_file_name = site_path.display().to_string();
        let (gateway, meters) = gateway_of(
            &site,
            &raw.gateway_id,
            &format!("site file {site_file_name}"),
        )
        .map_err(|e| err("gateway_id", e.problem))?;

        let mqtt = &raw.mqtt;
        if mqtt.host.trim().is_empty() {
            return Err(err("mqtt.host", "must not be empty".into()));
        }
        if mqtt.port == 0 {
            return Err(err("mqtt.port", "must be 1..=65535".into()));
        }
        if mqtt.keep_alive_secs > u64::from(u16::MAX) {
            return Err(err(
                "mqtt.keep_alive_secs",
                format!(
                    "{} exceeds the MQTT limit of 65535 seconds",
                    mqtt.keep_alive_secs
                ),
            ));
        }
        let client_id = match &mqtt.client_id {
            Some(id) if id.is_empty() => {
                return Err(err("mqtt.client_id", "must not be empty".into()))
            }
            Some(id) => id.clone(),
            None => default_client_id(&gateway.id),
        };

        let password = secret::inline_or_file(
            mqtt.password.as_ref(),
            mqtt.password_file.as_ref(),
            base,
            file,
            "mqtt.password",
        )?;
        let credentials = match (&mqtt.username, password) {
            (None, None) => None,
            (Some(username), Some(password)) => {
                if username.is_empty() {
                    return Err(err("mqtt.username", "must not be empty".into()));
                }
                Some(MqttCredentials {
                    username: username.clone(),
                    password,
                })
            }
            (Some(_), None) => {
                return Err(err(
                    "mqtt.password",
                    "is required when mqtt.username is set".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "mqtt.username",
                    "is required when mqtt.password is set".into(),
                ))
            }
        };
        let tls = match &mqtt.tls {
            None => None,
            Some(tls) => {
                let client = match (&tls.cert_file, &tls.key_file) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => Some((base.join(cert), base.join(key))),
                    (Some(_), None) => {
                        return Err(err(
                            "mqtt.tls.key_file",
                            "is required when mqtt.tls.cert_file is set".into(),
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(err(
                            "mqtt.tls.cert_file",
                            "is required when mqtt.tls.key_file is set".into(),
                        ))
                    }
                };
                let files = TlsFiles {
                    ca_file: base.join(&tls.ca_file),
                    client,
                };
                Some(TlsSettings::load(files).map_err(|p| err("mqtt.tls", p))?)
            }
        };
        let key = secret::read_gateway_key(&base.join(&raw.gateway_key_file))
            .map_err(|e| err("gateway_key_file", e.to_string()))?;

        let buffer = &raw.buffer;
        if buffer.path.as_os_str().is_empty() {
            return Err(err("buffer.path", "must not be empty".into()));
        }
        if buffer.max_bytes < MIN_MAX_BYTES {
            return Err(err(
                "buffer.max_bytes",
                format!(
                    "{} is below the minimum of {MIN_MAX_BYTES} (1 MiB)",
                    buffer.max_bytes
                ),
            ));
        }
        if !COMMIT_INTERVAL_RANGE_MS.contains(&buffer.commit_interval_ms) {
            return Err(err(
                "buffer.commit_interval_ms",
                format!(
                    "{} is outside {}..={}",
                    buffer.commit_interval_ms,
                    COMMIT_INTERVAL_RANGE_MS.start(),
                    COMMIT_INTERVAL_RANGE_MS.end()
                ),
            ));
        }
        let buffer_limits = BufferLimits {
            max_bytes: buffer.max_bytes,
            max_age: (buffer.max_age_secs > 0).then(|| Duration::from_secs(buffer.max_age_secs)),
            when_full: match buffer.when_full {
                raw::WhenFull::DropOldest => WhenFull::DropOldest,
                raw::WhenFull::DropNewest => WhenFull::DropNewest,
            },
        };
        if raw.forward.window_batches == 0 {
            return Err(err(
                "forward.window_batches",
                "must be greater than 0".into(),
            ));
        }
        if raw.forward.ack_timeout_ms == 0 {
            return Err(err(
                "forward.ack_timeout_ms",
                "must be greater than 0".into(),
            ));
        }

        let (clock, poll_until_ms) = match &raw.clock {
            None => (Clock::real(), None),
            Some(c) => {
                let start = rfc3339_ms(&c.start).map_err(|p| err("clock.start", p))?;
                if !(c.time_scale.is_finite() && c.time_scale > 0.0) {
                    return Err(err(
                        "clock.time_scale",
                        format!("{} must be a positive number", c.time_scale),
                    ));
                }
                let until = match &c.until {
                    None => None,
                    Some(text) => {
                        let until = rfc3339_ms(text).map_err(|p| err("clock.until", p))?;
                        if until <= start {
                            return Err(err(
                                "clock.until",
                                format!("`{text}` must be after clock.start `{}`", c.start),
                            ));
                        }
                        Some(until)
                    }
                };
                (
                    Clock::simulated(start, clock_anchor_wall_ms, c.time_scale),
                    until,
                )
            }
        };

        let metrics_listen = match &raw.metrics {
            None => None,
            Some(metrics) => Some(metrics.listen.parse::<SocketAddr>().map_err(|_| {
                err(
                    "metrics.listen",
                    format!(
                        "`{}` is not a socket address (IP:PORT, e.g. 127.0.0.1:9101)",
                        metrics.listen
                    ),
                )
            })?),
        };

        Ok(Settings {
            site_id: site.id.clone(),
            gateway,
            meter_lines: meter_lines(&site, &meters),
            meters,
            mqtt: MqttSettings {
                host: mqtt.host.clone(),
                port: mqtt.port,
                client_id,
                keep_alive: Duration::from_secs(mqtt.keep_alive_secs),
                credentials,
                tls,
            },
            key,
            buffer_path: base.join(&raw.buffer.path),
            buffer_limits,
            commit_interval: Duration::from_millis(raw.buffer.commit_interval_ms),
            window_batches: raw.forward.window_batches,
            ack_timeout: Duration::from_millis(raw.forward.ack_timeout_ms),
            replay: ReplayPace {
                batches_per_sec: raw.forward.replay_batches_per_sec,
                bytes_per_sec: raw.forward.replay_bytes_per_sec,
            },
            clock,
            poll_until_ms,
            metrics_listen,
        })
    }
}

/// The gateway `gateway_id` of `site` and its meters. `site_name` describes
/// where the site came from, for the error.
fn gateway_of(
    site: &Site,
    gateway_id: &str,
    site_name: &str,
) -> Result<(Gateway, Vec<Meter>), ConfigError> {
    let Some(gateway) = site.gateway(gateway_id) else {
        let known: Vec<_> = site.gateways.iter().map(|g| g.id.as_str()).collect();
        return Err(ConfigError::new(
            site_name,
            "gateway_id",
            format!(
                "gateway `{gateway_id}` is not defined in {site_name} (known: {})",
                known.join(", ")
            ),
        ));
    };
    let meters: Vec<Meter> = site
        .meters
        .iter()
        .filter(|m| m.gateway == gateway.id)
        .cloned()
        .collect();
    if meters.is_empty() {
        return Err(ConfigError::new(
            site_name,
            "gateway_id",
            format!("gateway `{gateway_id}` reads no meters in {site_name}"),
        ));
    }
    Ok((gateway.clone(), meters))
}

/// The line of each of `meters` that measures a facility of one.
fn meter_lines(site: &Site, meters: &[Meter]) -> HashMap<String, String> {
    site.lines
        .iter()
        .flat_map(|line| line.facilities.iter().map(move |f| (&f.meter, &line.id)))
        .filter(|(meter, _)| meters.iter().any(|m| &m.id == *meter))
        .map(|(meter, line)| (meter.clone(), line.clone()))
        .collect()
}

fn rfc3339_ms(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!("`{text}` is not an RFC 3339 time ({e}), e.g. 2022-12-13T00:00:00+08:00")
        })
}

/// The config file as written; see `gateway.default.toml`.
mod raw {
    use std::path::PathBuf;

    use serde::Deserialize;

    pub(super) const DEFAULT_KEEP_ALIVE_SECS: u64 = 30;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct ConfigFile {
        pub(super) site_file: PathBuf,
        pub(super) gateway_id: String,
        pub(super) gateway_key_file: PathBuf,
        pub(super) mqtt: MqttSection,
        pub(super) buffer: BufferSection,
        #[serde(default)]
        pub(super) forward: ForwardSection,
        pub(super) clock: Option<ClockSection>,
        pub(super) metrics: Option<MetricsSection>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct MetricsSection {
        pub(super) listen: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct MqttSection {
        pub(super) host: String,
        #[serde(default = "default_port")]
        pub(super) port: u16,
        pub(super) client_id: Option<String>,
        #[serde(default = "default_keep_alive_secs")]
        pub(super) keep_alive_secs: u64,
        pub(super) username: Option<String>,
        pub(super) password: Option<String>,
        pub(super) password_file: Option<PathBuf>,
        pub(super) tls: Option<TlsSection>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct TlsSection {
        pub(super) ca_file: PathBuf,
        pub(super) cert_file: Option<PathBuf>,
        pub(super) key_file: Option<PathBuf>,
    }

    fn default_port() -> u16 {
        1883
    }
    fn default_keep_alive_secs() -> u64 {
        DEFAULT_KEEP_ALIVE_SECS
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct BufferSection {
        pub(super) path: PathBuf,
        #[serde(default = "default_max_bytes")]
        pub(super) max_bytes: u64,
        #[serde(default = "default_max_age_secs")]
        pub(super) max_age_secs: u64,
        #[serde(default)]
        pub(super) when_full: WhenFull,
        #[serde(default = "default_commit_interval_ms")]
        pub(super) commit_interval_ms: u64,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum WhenFull {
        #[default]
        DropOldest,
        DropNewest,
    }

    fn default_max_bytes() -> u64 {
        crate::buffer::DEFAULT_MAX_BYTES
    }
    fn default_max_age_secs() -> u64 {
        crate::buffer::DEFAULT_MAX_AGE.as_secs()
    }
    fn default_commit_interval_ms() -> u64 {
        super::DEFAULT_COMMIT_INTERVAL.as_millis() as u64
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct ForwardSection {
        #[serde(default = "default_window_batches")]
        pub(super) window_batches: u32,
        #[serde(default = "default_ack_timeout_ms")]
        pub(super) ack_timeout_ms: u64,
        #[serde(default = "default_replay_batches_per_sec")]
        pub(super) replay_batches_per_sec: u32,
        #[serde(default = "default_replay_bytes_per_sec")]
        pub(super) replay_bytes_per_sec: u64,
    }

    impl Default for ForwardSection {
        fn default() -> Self {
            ForwardSection {
                window_batches: default_window_batches(),
                ack_timeout_ms: default_ack_timeout_ms(),
                replay_batches_per_sec: default_replay_batches_per_sec(),
                replay_bytes_per_sec: default_replay_bytes_per_sec(),
            }
        }
    }

    fn default_replay_batches_per_sec() -> u32 {
        crate::forward::pace::DEFAULT_REPLAY_PACE.batches_per_sec
    }
    fn default_replay_bytes_per_sec() -> u64 {
        crate::forward::pace::DEFAULT_REPLAY_PACE.bytes_per_sec
    }

    fn default_window_batches() -> u32 {
        super::DEFAULT_WINDOW_BATCHES
    }
    fn default_ack_timeout_ms() -> u64 {
        super::DEFAULT_ACK_TIMEOUT.as_millis() as u64
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct ClockSection {
        pub(super) start: String,
        #[serde(default = "one")]
        pub(super) time_scale: f64,
        pub(super) until: Option<String>,
    }

    fn one() -> f64 {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");

    fn test_key() -> GatewayKey {
        GatewayKey::from_bytes([0x42; 32])
    }

    /// A private file under `dir`.
    fn write_private(dir: &Path, name: &str, contents: &[u8]) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        secret::create_private(&path, contents).unwrap();
    }

    /// A directory with the deploy site file and the gateway key under the
    /// names the default and the deploy config expect.
    fn site_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stenter-plant.site.toml"), SITE).unwrap();
        for name in ["gw-01.key", "keys/gw-01.key"] {
            write_private(dir.path(), name, test_key().to_hex_line().as_bytes());
        }
        dir
    }

    fn load(text: &str) -> Result<Settings, ConfigError> {
        let dir = site_dir();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(&path, 1_000)
    }

    #[test]
    fn default_config_loads_against_the_deploy_site_file() {
        let dir = site_dir();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, DEFAULT_CONFIG).unwrap();
        let settings = Settings::load(&path, 1_000).unwrap();
        assert_eq!(settings.site_id, "tx-dyeing");
        assert_eq!(settings.gateway.id, "gw-01");
        assert_eq!(settings.meters.len(), 10);
        assert_eq!(settings.meters[0].id, "l1-stenter");
        assert_eq!(
            settings.mqtt,
            MqttSettings {
                host: "127.0.0.1".into(),
                port: 1883,
                client_id: "facwatch-gw-gw-01".into(),
                keep_alive: Duration::from_secs(30),
                credentials: None,
                tls: None,
            }
        );
        assert_eq!(settings.key, test_key());
        assert_eq!(settings.buffer_path, dir.path().join("gw-01.buffer.redb"));
        assert_eq!(settings.window_batches, 16);
        assert_eq!(settings.ack_timeout, Duration::from_millis(5000));
        assert_eq!(settings.clock, Clock::real());
        assert_eq!(settings.poll_until_ms, None);
        assert_eq!(settings.metrics_listen, None);
        assert_eq!(
            settings.buffer_limits,
            BufferLimits {
                max_bytes: 1024 * 1024 * 1024,
                max_age: Some(Duration::from_secs(30 * 24 * 3600)),
                when_full: WhenFull::DropOldest,
            }
        );
        assert_eq!(settings.buffer_limits, BufferLimits::default());
        assert_eq!(settings.commit_interval, Duration::from_millis(1000));
        assert_eq!(
            settings.replay,
            ReplayPace {
                batches_per_sec: 20,
                bytes_per_sec: 2 * 1024 * 1024,
            }
        );
    }

    #[test]
    fn the_example_deploy_config_carries_the_default_buffer_keys() {
        let deploy = include_str!("../../deploy/gateway.toml");
        let settings = load(deploy).unwrap();
        let defaults = load(DEFAULT_CONFIG).unwrap();
        assert_eq!(settings.buffer_limits, defaults.buffer_limits);
        assert_eq!(settings.commit_interval, defaults.commit_interval);
        // Its simulated clock runs 1440x: ten times the default pace.
        assert_eq!(settings.replay.batches_per_sec, 200);
        assert_eq!(settings.replay.bytes_per_sec, defaults.replay.bytes_per_sec);
    }

    #[test]
    fn buffer_and_replay_keys_are_read() {
        let text = MINIMAL.replace(
            "[buffer]",
            "[forward]\nreplay_batches_per_sec = 0\nreplay_bytes_per_sec = 4096\n[buffer]\nmax_bytes = 1048576\nmax_age_secs = 0\nwhen_full = \"drop_newest\"\ncommit_interval_ms = 10",
        );
        let settings = load(&text).unwrap();
        assert_eq!(
            settings.buffer_limits,
            BufferLimits {
                max_bytes: 1024 * 1024,
                max_age: None,
                when_full: WhenFull::DropNewest,
            }
        );
        assert_eq!(settings.commit_interval, Duration::from_millis(10));
        assert_eq!(
            settings.replay,
            ReplayPace {
                batches_per_sec: 0,
                bytes_per_sec: 4096,
            }
        );
    }

    #[test]
    fn metrics_listen_is_read_and_documented_in_the_default_config() {
        let text = format!("{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9101\"\n");
        assert_eq!(
            load(&text).unwrap().metrics_listen,
            Some("127.0.0.1:9101".parse().unwrap())
        );
        let uncommented = DEFAULT_CONFIG
            .replace("# [metrics]", "[metrics]")
            .replace("# listen = ", "listen = ");
        assert_eq!(
            load(&uncommented).unwrap().metrics_listen,
            Some("127.0.0.1:9101".parse().unwrap())
        );
    }

    #[test]
    fn credentials_are_both_or_neither_and_the_password_is_never_shown() {
        let with = |lines: &str| MINIMAL.replace("[buffer]", &format!("{lines}\n[buffer]"));
        let settings = load(&with("username = \"gw\"\npassword = \"s3cret-pw\"")).unwrap();
        assert_eq!(
            settings.mqtt.credentials,
            Some(MqttCredentials {
                username: "gw".into(),
                password: "s3cret-pw".into(),
            })
        );
        let shown = format!("{settings:?}");
        assert!(shown.contains("username: \"gw\""), "{shown}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert_eq!(load(MINIMAL).unwrap().mqtt.credentials, None);

        let cases = [
            (
                with("username = \"gw\""),
                "mqtt.password: is required when mqtt.username is set",
            ),
            (
                with("password = \"s3cret-pw\""),
                "mqtt.username: is required when mqtt.password is set",
            ),
            (
                with("username = \"\"\npassword = \"s3cret-pw\""),
                "mqtt.username: must not be empty",
            ),
        ];
        for (text, expected) in cases {
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected `{expected}` in `{err}`");
            assert!(!err.contains("s3cret-pw"), "{err}");
        }
    }

    #[test]
    fn the_key_file_must_be_private_and_a_key_and_errors_never_show_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = site_dir();
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, MINIMAL).unwrap();
        let key_path = dir.path().join("gw-01.key");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Settings::load(&config, 0).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("gateway_key_file"));
        assert!(err.problem.contains("mode 0644"), "{err}");
        assert!(err.problem.contains("chmod 600"), "{err}");
        assert!(!err.to_string().contains("4242"), "{err}");

        std::fs::remove_file(&key_path).unwrap();
        write_private(dir.path(), "gw-01.key", b"not a key");
        let err = Settings::load(&config, 0).unwrap_err().to_string();
        assert!(
            err.contains("gateway_key_file") && err.contains("hex digits"),
            "{err}"
        );

        std::fs::remove_file(&key_path).unwrap();
        let err = Settings::load(&config, 0).unwrap_err().to_string();
        assert!(err.contains("gw-01.key: cannot read"), "{err}");

        let shown = format!("{:?}", load(MINIMAL).unwrap());
        assert!(shown.contains(&test_key().fingerprint()), "{shown}");
        assert!(!shown.contains("4242"), "{shown}");
    }

    #[test]
    fn the_password_may_come_from_a_private_file_but_not_from_both_places() {
        use std::os::unix::fs::PermissionsExt;
        let dir = site_dir();
        write_private(dir.path(), "mqtt-password", b"s3cret-pw\n");
        let config = dir.path().join("gateway.toml");
        let with = |lines: &str| MINIMAL.replace("[buffer]", &format!("{lines}\n[buffer]"));
        std::fs::write(
            &config,
            with("username = \"gw-01\"\npassword_file = \"mqtt-password\""),
        )
        .unwrap();
        let settings = Settings::load(&config, 0).unwrap();
        assert_eq!(
            settings.mqtt.credentials,
            Some(MqttCredentials {
                username: "gw-01".into(),
                password: "s3cret-pw".into(),
            })
        );
        std::fs::set_permissions(
            dir.path().join("mqtt-password"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = Settings::load(&config, 0).unwrap_err().to_string();
        assert!(
            err.contains("mqtt.password_file") && err.contains("0640"),
            "{err}"
        );
        assert!(!err.contains("s3cret-pw"), "{err}");

        std::fs::write(
            &config,
            with("username = \"gw-01\"\npassword = \"x\"\npassword_file = \"mqtt-password\""),
        )
        .unwrap();
        let err = Settings::load(&config, 0).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn tls_files_are_checked_at_load() {
        let dir = site_dir();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("not-pem"), "hello").unwrap();
        write_private(dir.path(), "client.key", ca_key.serialize_pem().as_bytes());
        std::fs::write(dir.path().join("open.key"), ca_key.serialize_pem()).unwrap();
        let config = dir.path().join("gateway.toml");
        let load_with = |tls: &str| {
            std::fs::write(&config, format!("{MINIMAL}[mqtt.tls]\n{tls}\n")).unwrap();
            Settings::load(&config, 0)
        };

        let settings = load_with("ca_file = \"ca.pem\"").unwrap();
        let tls = settings.mqtt.tls.expect("tls");
        assert_eq!(tls.files.ca_file, dir.path().join("ca.pem"));
        assert_eq!(tls.files.client, None);
        let settings = load_with(
            "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"",
        )
        .unwrap();
        assert!(settings.mqtt.tls.unwrap().files.client.is_some());

        let cases = [
            ("ca_file = \"missing.pem\"", "missing.pem: cannot read"),
            ("ca_file = \"not-pem\"", "not-pem: holds no PEM certificate"),
            (
                "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"",
                "mqtt.tls.key_file: is required when mqtt.tls.cert_file is set",
            ),
            (
                "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"open.key\"",
                "lets others read this secret",
            ),
            (
                "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"gw-01.key\"",
                "gw-01.key: holds no PEM private key",
            ),
        ];
        for (tls, expected) in cases {
            let err = load_with(tls).unwrap_err().to_string();
            assert!(err.contains(expected), "expected `{expected}` in `{err}`");
            assert!(err.contains("mqtt.tls"), "{err}");
        }
    }

    const MINIMAL: &str = r#"
site_file = "stenter-plant.site.toml"
gateway_id = "gw-01"
gateway_key_file = "gw-01.key"
[mqtt]
host = "broker.local"
[buffer]
path = "/var/lib/facwatch/buffer.redb"
"#;

    #[test]
    fn clock_section_makes_a_simulated_clock_anchored_at_the_given_wall_time() {
        let text = format!(
            "{MINIMAL}[clock]\nstart = \"2022-12-13T00:00:00+08:00\"\ntime_scale = 1440\nuntil = \"2022-12-14T00:00:00+08:00\"\n"
        );
        let settings = load(&text).unwrap();
        let start_ms = 1_670_860_800_000;
        assert_eq!(settings.clock, Clock::simulated(start_ms, 1_000, 1440.0));
        assert_eq!(settings.poll_until_ms, Some(start_ms + 86_400_000));
        assert_eq!(
            settings.buffer_path,
            PathBuf::from("/var/lib/facwatch/buffer.redb")
        );
    }

    #[test]
    fn unknown_gateway_is_named_with_key_and_file() {
        let err = load(&MINIMAL.replace("\"gw-01\"", "\"gw-09\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gateway.toml: gateway_id: gateway `gw-09` is not defined in site file "),
            "{err}"
        );
        assert!(
            err.contains("stenter-plant.site.toml (known: gw-01)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = load(&MINIMAL.replace("[buffer]", "[buffer]\nmax_size = 5"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.toml"), "{err}");
        assert!(err.contains("unknown field `max_size`"), "{err}");
    }

    #[test]
    fn bad_values_are_named_by_key() {
        let cases = [
            (MINIMAL.replace("[buffer]", "[forward]\nwindow_batches = 0\n[buffer]"), "forward.window_batches: must be greater than 0"),
            (MINIMAL.replace("[buffer]", "[forward]\nack_timeout_ms = 0\n[buffer]"), "forward.ack_timeout_ms: must be greater than 0"),
            (MINIMAL.replace("[buffer]", "keep_alive_secs = 70000\n[buffer]"), "mqtt.keep_alive_secs: 70000 exceeds"),
            (MINIMAL.replace("[buffer]", "client_id = \"\"\n[buffer]"), "mqtt.client_id: must not be empty"),
            (MINIMAL.replace("[buffer]", "[buffer]\nmax_bytes = 1048575"), "buffer.max_bytes: 1048575 is below the minimum of 1048576 (1 MiB)"),
            (MINIMAL.replace("[buffer]", "[buffer]\ncommit_interval_ms = 9"), "buffer.commit_interval_ms: 9 is outside 10..=10000"),
            (MINIMAL.replace("[buffer]", "[buffer]\ncommit_interval_ms = 10001"), "buffer.commit_interval_ms: 10001 is outside 10..=10000"),
            (MINIMAL.replace("[buffer]", "[buffer]\nwhen_full = \"block\""), "buffer.when_full: unknown variant `block`, expected `drop_oldest` or `drop_newest`"),
            (format!("{MINIMAL}[clock]\nstart = \"yesterday\"\n"), "clock.start: `yesterday` is not an RFC 3339 time"),
            (format!("{MINIMAL}[metrics]\nlisten = \"localhost:9101\"\n"), "metrics.listen: `localhost:9101` is not a socket address (IP:PORT, e.g. 127.0.0.1:9101)"),
            (format!("{MINIMAL}[metrics]\nlisten = \"127.0.0.1\"\n"), "metrics.listen: `127.0.0.1` is not a socket address"),
            (format!("{MINIMAL}[metrics]\nport = 9101\n"), "unknown field `port`"),
            (format!("{MINIMAL}[clock]\nstart = \"2022-12-13T00:00:00Z\"\ntime_scale = 0\n"), "clock.time_scale: 0 must be a positive number"),
            (format!("{MINIMAL}[clock]\nstart = \"2022-12-13T00:00:00Z\"\nuntil = \"2022-12-12T00:00:00Z\"\n"), "clock.until: `2022-12-12T00:00:00Z` must be after"),
        ];
        for (text, expected) in cases {
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected `{expected}` in `{err}`");
        }
    }

    #[test]
    fn missing_site_file_is_named() {
        let err = load(&MINIMAL.replace("stenter-plant.site.toml", "nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml: cannot read"), "{err}");
    }

    #[test]
    fn meter_lines_name_only_this_gateways_meters_that_measure_a_facility() {
        let meter = |id: &str, gateway: &str, port: u16, unit: u8| {
            format!(
                "[[meters]]\nid = \"{id}\"\ngateway = \"{gateway}\"\nprofile = \"sdm630\"\ntcp = \"127.0.0.1:{port}\"\nunit = {unit}\n\n"
            )
        };
        let line = |id: &str, stenter: &str, fan: &str| {
            format!(
                "[[lines]]\nid = \"{id}\"\n\n\
                 [[lines.facilities]]\nid = \"{stenter}\"\nkind = \"stenter\"\nmeter = \"{stenter}\"\nrated_kw = 150\nstart_threshold_kw = 20\n\n\
                 [[lines.facilities]]\nid = \"{fan}\"\nkind = \"main_fan\"\nmeter = \"{fan}\"\nrated_kw = 22\nstart_threshold_kw = 4\n\n"
            )
        };
        let text = [
            "[site]\nid = \"s\"\n\n[[gateways]]\nid = \"gw-a\"\n\n[[gateways]]\nid = \"gw-b\"\n\n"
                .to_string(),
            meter("a-stenter", "gw-a", 5020, 1),
            meter("a-fan", "gw-a", 5020, 2),
            meter("a-spare", "gw-a", 5020, 3),
            meter("b-stenter", "gw-b", 5021, 1),
            meter("b-fan", "gw-b", 5021, 2),
            line("la", "a-stenter", "a-fan"),
            line("lb", "b-stenter", "b-fan"),
        ]
        .concat();
        let site = Site::from_toml(&text, "s.toml").unwrap();
        let mqtt = MqttSettings::new("127.0.0.1", 1883, "gw-a");
        let settings =
            Settings::new(&site, "gw-a", mqtt, test_key(), "b.redb", Clock::real()).unwrap();
        assert_eq!(
            settings.meter_lines,
            HashMap::from([
                ("a-stenter".to_string(), "la".to_string()),
                ("a-fan".to_string(), "la".to_string()),
            ])
        );
    }

    #[test]
    fn new_picks_the_gateways_meters_and_defaults() {
        let site = Site::from_toml(SITE, "site.toml").unwrap();
        let mqtt = MqttSettings::new("127.0.0.1", 1883, "gw-01");
        let settings =
            Settings::new(&site, "gw-01", mqtt, test_key(), "b.redb", Clock::real()).unwrap();
        assert_eq!(settings.meters.len(), 10);
        assert_eq!(settings.window_batches, DEFAULT_WINDOW_BATCHES);
        assert_eq!(settings.meter_lines.len(), 10);
        assert_eq!(settings.meter_lines["l1-hv-esp"], "line1");
        assert_eq!(settings.meter_lines["l2-stenter"], "line2");
        assert_eq!(settings.mqtt.client_id, "facwatch-gw-gw-01");
        let err = Settings::new(
            &site,
            "gw-02",
            MqttSettings::new("h", 1, "gw-02"),
            test_key(),
            "b.redb",
            Clock::real(),
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("gateway_id"));
        assert!(err.problem.contains("gw-02"), "{err}");
    }
}
