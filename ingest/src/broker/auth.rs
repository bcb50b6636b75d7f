//! Logins at the embedded broker: usernames with argon2 password hashes
//! (PHC strings, `$argon2id$...`) from the ingest's config, and the
//! ingest's own login, made up at start.
//!
//! Invariants:
//! - A client is let in only with a username that has a hash and a
//!   password that verifies against it, or with the ingest's own login
//!   (compared in constant time). No login, no entry.
//! - Verifying runs on tokio's blocking pool (argon2 takes tens of
//!   milliseconds by design), never on the broker's network threads.
//! - Refusals of a CONNECT with a login are counted (rumqttd refuses one
//!   without a login before asking) ([`Stats::logins_refused`]); at most one line per
//!   [`LOG_WINDOW`] is logged, with the username (cut to 64 characters) and
//!   how many were refused since the last line. A password never appears
//!   in a log line, an error or `Debug` output.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::Credentials;
use crate::Stats;

/// At most one "login refused" line per this long.
const LOG_WINDOW: Duration = Duration::from_secs(10);
/// The ingest's own username at its embedded broker.
pub(crate) const INTERNAL_USERNAME: &str = "facwatch-ingest-internal";

/// Usernames and the argon2 hashes of their passwords. `Debug` shows the
/// usernames only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Logins {
    hashes: BTreeMap<String, String>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.hashes.keys()).finish()
    }
}

impl Logins {
    /// Checks that `hash` is an argon2 PHC string and adds it for
    /// `username`. The error says what is wrong without repeating the hash.
    pub fn insert(&mut self, username: &str, hash: &str) -> Result<(), String> {
        if username.is_empty() {
            return Err("a username must not be empty".into());
        }
        if username == INTERNAL_USERNAME {
            return Err(format!("`{INTERNAL_USERNAME}` is the ingest's own login"));
        }
        let parsed = PasswordHash::new(hash).map_err(|e| {
            format!("not a PHC password hash ({e}); make one with `facwatch-ingest hash-password`")
        })?;
        if !parsed.algorithm.as_str().starts_with("argon2") {
            return Err(format!(
                "hash algorithm `{}` is not argon2 (argon2id, argon2i or argon2d)",
                parsed.algorithm
            ));
        }
        self.hashes.insert(username.to_string(), hash.to_string());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `password` is `username`'s. Slow on purpose (argon2).
    pub fn verify(&self, username: &str, password: &str) -> bool {
        let Some(hash) = self.hashes.get(username) else {
            return false;
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    }
}

/// An argon2id PHC hash of `password` with a fresh salt and the argon2
/// crate's default cost (19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// A login for the ingest's own client: [`INTERNAL_USERNAME`] and 32
/// random bytes as hex.
pub(crate) fn internal_login() -> Result<Credentials, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(Credentials {
        username: INTERNAL_USERNAME.to_string(),
        password: bytes.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// What the broker's auth handler consults.
pub(crate) struct Gate {
    logins: Logins,
    internal: Credentials,
    stats: Arc<Stats>,
    log: Mutex<RefusalLog>,
}

#[derive(Default)]
struct RefusalLog {
    last_line: Option<Instant>,
    suppressed: u64,
}

impl Gate {
    pub(crate) fn new(logins: Logins, internal: Credentials, stats: Arc<Stats>) -> Gate {
        Gate {
            logins,
            internal,
            stats,
            log: Mutex::default(),
        }
    }

    /// Decides one CONNECT (run on the blocking pool).
    pub(crate) fn admit(&self, client_id: &str, username: &str, password: &str) -> bool {
        let admitted = if username == self.internal.username {
            constant_time_eq(password.as_bytes(), self.internal.password.as_bytes())
        } else {
            self.logins.verify(username, password)
        };
        if !admitted {
            self.stats.add(|s| &s.logins_refused, 1);
            self.log_refusal(client_id, username);
        }
        admitted
    }

    fn log_refusal(&self, client_id: &str, username: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if log
            .last_line
            .is_some_and(|at| now.duration_since(at) < LOG_WINDOW)
        {
            log.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last_line = Some(now);
        drop(log);
        tracing::warn!(
            username = cut(username),
            client_id = cut(client_id),
            suppressed,
            "MQTT login refused (unknown user or wrong password)."
        );
    }
}

fn cut(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Equal bytes, in a time that depends on the lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_password_verifies_and_nothing_else_does() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let mut logins = Logins::default();
        logins.insert("gw-01", &hash).unwrap();
        assert!(logins.verify("gw-01", "correct horse"));
        assert!(!logins.verify("gw-01", "correct horse "));
        assert!(!logins.verify("gw-02", "correct horse"));
        assert!(!logins.verify("", ""));
        assert_eq!(format!("{logins:?}"), r#"{"gw-01"}"#);
    }

    #[test]
    fn hashes_that_are_not_argon2_phc_strings_are_refused_by_name() {
        let mut logins = Logins::default();
        let err = logins.insert("gw-01", "hunter2").unwrap_err();
        assert!(err.contains("not a PHC password hash"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = logins
            .insert(
                "gw-01",
                "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            )
            .unwrap_err();
        assert!(err.contains("not argon2"), "{err}");
        let err = logins
            .insert(INTERNAL_USERNAME, &hash_password("x").unwrap())
            .unwrap_err();
        assert!(err.contains("own login"), "{err}");
        assert!(logins.is_empty());
    }

    #[test]
    fn the_gate_admits_the_internal_login_and_counts_refusals() {
        let stats = Arc::new(Stats::default());
        let mut logins = Logins::default();
        logins
            .insert("gw-01", &hash_password("pw").unwrap())
            .unwrap();
        let internal = internal_login().unwrap();
        assert_eq!(internal.password.len(), 64);
        let gate = Gate::new(logins, internal.clone(), stats.clone());
        assert!(gate.admit("c", "gw-01", "pw"));
        assert!(gate.admit("c", INTERNAL_USERNAME, &internal.password));
        assert!(!gate.admit("c", INTERNAL_USERNAME, "guess"));
        assert!(!gate.admit("c", "gw-01", "wrong"));
        assert!(!gate.admit("c", "nobody", "pw"));
        assert_eq!(stats.snapshot().logins_refused, 3);
    }
}
