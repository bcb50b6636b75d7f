//! A real Mosquitto for the ingest's external-broker tests: its own port,
//! config, password file and data directory, killed when dropped.
//! Needs `mosquitto` and `mosquitto_passwd` on PATH (.ci/run installs them).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions};

pub(crate) const USER: &str = "facwatch";
pub(crate) const PASSWORD: &str = "s3cret-pw";

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Mosquitto {
    pub(crate) port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with `allow_anonymous false` and one login
    /// ([`USER`], [`PASSWORD`]), and waits until that login is accepted.
    pub(crate) async fn start() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let passwords = dir.path().join("passwords");
        let status = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(&passwords)
            .args([USER, PASSWORD])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success(), "mosquitto_passwd failed");
        set_mode_600(&passwords);
        // A free port, found by binding and releasing it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let mut config = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence true\npersistence_location {}/\nmax_packet_size 300000\n",
            passwords.display(),
            data.display()
        );
        if is_root() {
            config.push_str("user root\n");
        }
        let config_path = dir.path().join("mosquitto.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let mosquitto = Mosquitto {
            port,
            child,
            _dir: dir,
        };
        mosquitto.wait_until_ready().await;
        mosquitto
    }

    async fn wait_until_ready(&self) {
        let started = Instant::now();
        loop {
            let mut options = MqttOptions::new("probe", "127.0.0.1", self.port);
            options.set_credentials(USER, PASSWORD);
            let (_client, mut eventloop) = AsyncClient::new(options, 1);
            let connected = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
            if let Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) = connected {
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "mosquitto did not accept a login on port {} within {READY_TIMEOUT:?}",
                self.port
            );
            // Mosquitto gives no readiness signal; retry the login itself.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn set_mode_600(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
