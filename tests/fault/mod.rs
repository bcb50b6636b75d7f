//! Shared by the fault tests (`tests/fault_*.rs`, feature `interop`): the
//! demo plant run as separate processes of the built binaries
//! (`facwatch-sim`, `facwatch-gateway`, `facwatch-ingest`) and, where a test
//! asks for it, a real Mosquitto, so that tests can kill and restart them.
//!
//! Invariants (beyond those of `interop`'s [`Process`]):
//! - every plant lives in its own temp dir: its site file (copied from
//!   `deploy/` with the meter endpoints moved to free ports), configs,
//!   buffers, stores and broker data;
//! - processes log JSON (`--log-format json`), so tests read facts (counts,
//!   seqs) from log fields, never from message wording alone;
//! - a killed process's files are read only after it was reaped.

// Each fault test binary includes this module and uses a different part.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::interop::{free_port, is_root, workspace_binary, Pipe, Process, READY_TIMEOUT};

/// The gateway of the demo plant.
pub(crate) const GATEWAY: &str = "gw-01";

/// 2022-12-13 `h:m` in the plant's time zone (+08:00), RFC 3339, for
/// configs.
pub(crate) fn at(h: u32, m: u32) -> String {
    let (day, h) = if h >= 24 { (14, h - 24) } else { (13, h) };
    format!("2022-12-{day}T{h:02}:{m:02}:00+08:00")
}

/// 2022-12-13 `h:m` (+08:00) as Unix ms.
pub(crate) fn at_ms(h: i64, m: i64) -> i64 {
    1_670_860_800_000 + (h * 60 + m) * 60_000
}

pub(crate) fn wall_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the wall clock is after 1970")
        .as_millis() as i64
}

/// A small deterministic random source (xorshift64*), seeded from the
/// environment (`FACWATCH_FAULT_SEED`) or the clock, so that a failing
/// run's kill moments can be replayed: the seed is printed.
pub(crate) struct Dice(u64);

impl Dice {
    pub(crate) fn new(test: &str) -> Dice {
        let seed = std::env::var("FACWATCH_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| wall_now_ms() as u64);
        println!("{test}: FACWATCH_FAULT_SEED={seed}");
        Dice(seed.max(1))
    }

    /// A duration uniformly in `low..high`.
    pub(crate) fn between(&mut self, low: Duration, high: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = (high - low).as_micros() as u64;
        low + Duration::from_micros(x % span.max(1))
    }
}

/// The demo plant's files in a temp dir.
pub(crate) struct Plant {
    pub(crate) dir: tempfile::TempDir,
    /// Holds the site file (the ingest's `sites_dir`) and the scenario.
    pub(crate) sites: PathBuf,
    pub(crate) site_file: PathBuf,
    pub(crate) scenario: PathBuf,
    /// The ingest's `keys_dir`, with the gateway's key, made by
    /// `facwatch-ingest gateway-key` as an installer would.
    pub(crate) keys: PathBuf,
}

impl Plant {
    /// Copies the demo's site file and scenario, moving the two Modbus TCP
    /// endpoints to free ports.
    pub(crate) fn new() -> Plant {
        let dir = tempfile::tempdir().expect("temp dir");
        let sites = dir.path().join("sites");
        std::fs::create_dir(&sites).expect("sites dir");
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut site = std::fs::read_to_string(deploy.join("stenter-plant.site.toml"))
            .expect("deploy/stenter-plant.site.toml");
        for configured in ["127.0.0.1:15021", "127.0.0.1:15022"] {
            assert!(site.contains(configured), "the demo site uses {configured}");
            site = site.replace(configured, &format!("127.0.0.1:{}", free_port()));
        }
        let site_file = sites.join("stenter-plant.site.toml");
        std::fs::write(&site_file, site).expect("writing the site file");
        let scenario = sites.join("stenter-plant.scenario.toml");
        std::fs::copy(deploy.join("stenter-plant.scenario.toml"), &scenario)
            .expect("copying the scenario");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        let made = Command::new(workspace_binary("facwatch-ingest"))
            .arg("gateway-key")
            .arg("--out")
            .arg(keys.join(format!("{GATEWAY}.key")))
            .output()
            .expect("running facwatch-ingest gateway-key");
        assert!(made.status.success(), "gateway-key: {made:?}");
        Plant {
            dir,
            sites,
            site_file,
            scenario,
            keys,
        }
    }

    /// The gateway's key, as both ends read it.
    pub(crate) fn key(&self) -> facwatch_proto::seal::GatewayKey {
        facwatch_proto::secret::read_gateway_key(&self.keys.join(format!("{GATEWAY}.key")))
            .expect("the gateway key")
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the simulated meters, their clock reading the scenario start
    /// (00:00) at `anchor_ms` and running `time_scale` times faster; returns
    /// once both buses are bound.
    pub(crate) fn simulator(&self, anchor_ms: i64, time_scale: f64) -> Process {
        let mut command = Command::new(workspace_binary("facwatch-sim"));
        command
            .arg("--scenario")
            .arg(&self.scenario)
            .arg("--clock-anchor-unix-ms")
            .arg(anchor_ms.to_string())
            .arg("--time-scale")
            .arg(time_scale.to_string())
            .arg("--print-endpoints")
            .arg("--log-format")
            .arg("json");
        let mut sim = Process::spawn("facwatch-sim", command);
        for _ in 0..2 {
            sim.wait_for_line(Pipe::Stdout, READY_TIMEOUT, |l| l.starts_with("tcp://"));
        }
        sim
    }

    /// Writes a gateway config and returns its path.
    pub(crate) fn gateway_config(&self, name: &str, config: &GatewayConfig) -> PathBuf {
        let mut text = format!(
            "site_file = {site:?}\ngateway_id = {GATEWAY:?}\ngateway_key_file = {key:?}\n\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"facwatch-gw-{name}\"\nkeep_alive_secs = 5\n",
            site = self.site_file,
            key = self.keys.join(format!("{GATEWAY}.key")),
            port = config.mqtt_port,
        );
        if let Some((user, password)) = &config.credentials {
            writeln!(text, "username = {user:?}\npassword = {password:?}").unwrap();
        }
        writeln!(
            text,
            "\n[buffer]\npath = {:?}\n{}\n[forward]\n{}",
            config.buffer, config.buffer_extra, config.forward_extra
        )
        .unwrap();
        writeln!(
            text,
            "[clock]\nstart = {:?}\ntime_scale = {}\nuntil = {:?}",
            at(0, 0),
            config.time_scale,
            config.until
        )
        .unwrap();
        let path = self.path(&format!("{name}.gateway.toml"));
        std::fs::write(&path, text).expect("writing the gateway config");
        path
    }

    /// Writes an ingest config and returns its path.
    pub(crate) fn ingest_config(&self, name: &str, store: &Path, broker: &Broker) -> PathBuf {
        self.ingest_config_with(name, store, broker, "")
    }

    /// [`Plant::ingest_config`] with `extra` (TOML tables) at its end.
    pub(crate) fn ingest_config_with(
        &self,
        name: &str,
        store: &Path,
        broker: &Broker,
        extra: &str,
    ) -> PathBuf {
        let mut text = format!(
            "sites_dir = {:?}\nkeys_dir = {:?}\nstore_path = {store:?}\n\n[broker]\n",
            self.sites, self.keys
        );
        match broker {
            Broker::Embedded { port } => {
                writeln!(text, "mode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"").unwrap()
            }
            Broker::External { port, .. } => writeln!(
                text,
                "mode = \"external\"\nhost = \"127.0.0.1\"\nport = {port}"
            )
            .unwrap(),
        }
        writeln!(text, "\n[mqtt]\nclient_id = \"facwatch-ingest-{name}\"").unwrap();
        if let Broker::External {
            credentials: Some((user, password)),
            ..
        } = broker
        {
            writeln!(text, "username = {user:?}\npassword = {password:?}").unwrap();
        }
        text.push_str(extra);
        let path = self.path(&format!("{name}.ingest.toml"));
        std::fs::write(&path, text).expect("writing the ingest config");
        path
    }
}

/// What a test sets in a gateway config.
pub(crate) struct GatewayConfig {
    pub(crate) mqtt_port: u16,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) buffer: PathBuf,
    /// Extra lines of the `[buffer]` section.
    pub(crate) buffer_extra: String,
    /// Lines of the `[forward]` section.
    pub(crate) forward_extra: String,
    pub(crate) time_scale: f64,
    /// RFC 3339 virtual time at which polling stops; the gateway exits once
    /// the ingest acked everything.
    pub(crate) until: String,
}

/// Where the ingest finds its broker.
pub(crate) enum Broker {
    Embedded {
        port: u16,
    },
    External {
        port: u16,
        credentials: Option<(String, String)>,
    },
}

/// Starts `facwatch-gateway` with a clock anchored at `anchor_ms`.
pub(crate) fn start_gateway(config: &Path, anchor_ms: i64) -> Process {
    let mut command = Command::new(workspace_binary("facwatch-gateway"));
    command
        .arg("--config")
        .arg(config)
        .arg("--clock-anchor-unix-ms")
        .arg(anchor_ms.to_string())
        .arg("--log-format")
        .arg("json");
    Process::spawn("facwatch-gateway", command)
}

/// `until` for a gateway that only replays its buffer (run at `time_scale`
/// 1 and started by [`start_replay_only_gateway`]): polling ends at 00:01,
/// and its clock already reads 00:02 when it starts, so it polls nothing.
pub(crate) const REPLAY_ONLY_UNTIL: (u32, u32) = (0, 1);

/// Starts a gateway configured with [`REPLAY_ONLY_UNTIL`]: it sends its
/// buffer, polls no meter, and exits once the ingest acked everything.
pub(crate) fn start_replay_only_gateway(config: &Path) -> Process {
    start_gateway(config, wall_now_ms() - 120_000)
}

/// Starts `facwatch-ingest`; with an embedded broker, returns once it
/// accepts connections.
pub(crate) fn start_ingest(config: &Path, broker: &Broker) -> Process {
    let mut command = Command::new(workspace_binary("facwatch-ingest"));
    command
        .arg("--config")
        .arg(config)
        .arg("--log-format")
        .arg("json")
        // Every event change is logged; those found in a replay (all of a
        // simulated 2022 day, judged on the wall clock) at debug.
        .env("RUST_LOG", "info,facwatch_ingest::emit=debug");
    let mut ingest = Process::spawn("facwatch-ingest", command);
    if let Broker::Embedded { port } = broker {
        ingest.wait_for_tcp(([127, 0, 0, 1], *port).into(), READY_TIMEOUT);
    }
    ingest
}

/// The `fields` object of a JSON log line whose message is `message`.
pub(crate) fn log_fields(line: &str, message: &str) -> Option<serde_json::Map<String, Value>> {
    let value: Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?.as_object()?;
    (fields.get("message")?.as_str()? == message).then(|| fields.clone())
}

/// Waits for the JSON log line with `message` on stderr and returns its
/// fields.
pub(crate) fn wait_for_log(
    process: &mut Process,
    message: &str,
    timeout: Duration,
) -> serde_json::Map<String, Value> {
    let line = process.wait_for_line(Pipe::Stderr, timeout, |l| log_fields(l, message).is_some());
    log_fields(&line, message).expect("matched above")
}

/// A u64 field of a log line, panicking with the line if absent.
pub(crate) fn field_u64(fields: &serde_json::Map<String, Value>, key: &str) -> u64 {
    fields
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("log field `{key}` missing or not a number in {fields:?}"))
}

/// A Mosquitto broker of its own: config, password file and persistence
/// directory in `dir`, listening on `port` (kept across restarts so clients
/// reconnect to the same address).
pub(crate) struct Mosquitto {
    pub(crate) port: u16,
    config: PathBuf,
    process: Option<Process>,
}

impl Mosquitto {
    /// Writes the config (one loopback listener, no anonymous access,
    /// `user`/`password` in a password file, persistence on) and starts it.
    pub(crate) fn start(dir: &Path, user: &str, password: &str) -> Mosquitto {
        Mosquitto::start_with(dir, user, password, "")
    }

    /// [`Mosquitto::start`] with `extra` lines at the end of its config.
    pub(crate) fn start_with(dir: &Path, user: &str, password: &str, extra: &str) -> Mosquitto {
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).expect("mosquitto dir");
        let passwords = data.join("passwd");
        let made = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(&passwords)
            .arg(user)
            .arg(password)
            .output()
            .expect("running mosquitto_passwd (.ci/run installs mosquitto)");
        assert!(made.status.success(), "mosquitto_passwd: {made:?}");
        let port = free_port();
        let mut config = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence true\npersistence_location {}/\n",
            passwords.display(),
            data.display()
        );
        // Mosquitto refuses to run as root unless told which user to be.
        if std::env::var("USER").as_deref() == Ok("root") || is_root() {
            config.push_str("user root\n");
        }
        config.push_str(extra);
        let config_path = data.join("mosquitto.conf");
        std::fs::write(&config_path, config).expect("writing mosquitto.conf");
        let mut broker = Mosquitto {
            port,
            config: config_path,
            process: None,
        };
        broker.restart();
        broker
    }

    /// Starts the broker (again) on its port, with its persisted state.
    pub(crate) fn restart(&mut self) {
        assert!(self.process.is_none(), "mosquitto is already running");
        let mut command = Command::new("mosquitto");
        command.arg("-c").arg(&self.config);
        let mut process = Process::spawn("mosquitto", command);
        process.wait_for_tcp(([127, 0, 0, 1], self.port).into(), READY_TIMEOUT);
        self.process = Some(process);
    }

    /// Stops the broker gracefully (it saves its persistence file).
    pub(crate) fn stop(&mut self) {
        let mut process = self.process.take().expect("mosquitto is running");
        let status = process.terminate(READY_TIMEOUT);
        assert!(status.success(), "mosquitto exited with {status}");
    }
}
