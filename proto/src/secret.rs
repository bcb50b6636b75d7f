//! Files that hold secrets (gateway keys, TLS private keys, passwords):
//! read only if nobody but the owner can read them.
//!
//! Invariants:
//! - On Unix a secret file whose mode grants any permission to the group or
//!   to others (`mode & 0o077 != 0`) is refused, as OpenSSH refuses such
//!   private keys; the error says which mode it found and how to fix it.
//!   The check follows symlinks (it is the file read that must be private).
//! - Errors name the file and the problem, never the content.
//! - A new secret file is created with mode 0600 and never replaces an
//!   existing file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::seal::{GatewayKey, KeyFormatError};
use crate::site::ConfigError;

/// Why a secret file was not used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: mode {mode:04o} lets others read this secret; \
         make it private to its owner (chmod 600 {path})"
    )]
    NotPrivate { path: String, mode: u32 },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("{path}: cannot create: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
}

/// The bytes of a secret file that only its owner may read.
pub fn read_private(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let shown = path.display().to_string();
    let read = |source| SecretFileError::Read {
        path: shown.clone(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read)?;
    check_private(&shown, &metadata)?;
    std::fs::read(path).map_err(read)
}

#[cfg(unix)]
fn check_private(path: &str, metadata: &std::fs::Metadata) -> Result<(), SecretFileError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::NotPrivate {
            path: path.to_string(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &str, _metadata: &std::fs::Metadata) -> Result<(), SecretFileError> {
    Ok(())
}

/// A private text file (e.g. a password file) without its trailing line
/// break.
pub fn read_private_text(path: &Path) -> Result<String, SecretFileError> {
    let bytes = read_private(path)?;
    let text = String::from_utf8(bytes).map_err(|_| SecretFileError::Invalid {
        path: path.display().to_string(),
        problem: "is not UTF-8 text".into(),
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// A secret of a config file given inline as `key` or in a file as
/// `<key>_file` (relative to `base`, the config file's folder; private to
/// its owner; one line), not both. Errors name `file` and `<key>_file`.
pub fn inline_or_file(
    inline: Option<&String>,
    path: Option<&PathBuf>,
    base: &Path,
    file: &str,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    let key_file = format!("{key}_file");
    match (inline, path) {
        (None, None) => Ok(None),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => read_private_text(&base.join(path))
            .map(Some)
            .map_err(|e| ConfigError::new(file, &key_file, e.to_string())),
        (Some(_), Some(_)) => Err(ConfigError::new(
            file,
            &key_file,
            format!("give {key} or {key_file}, not both"),
        )),
    }
}

/// A gateway key file: 64 hex digits, private to its owner.
pub fn read_gateway_key(path: &Path) -> Result<GatewayKey, SecretFileError> {
    let text = read_private_text(path)?;
    GatewayKey::from_hex(&text).map_err(|e: KeyFormatError| SecretFileError::Invalid {
        path: path.display().to_string(),
        problem: format!("not a gateway key: {e}"),
    })
}

/// Writes `contents` to a new file at `path`, mode 0600; refuses to replace
/// an existing file.
pub fn create_private(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let create = |source| SecretFileError::Create {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(create)?;
    file.write_all(contents).map_err(create)?;
    file.sync_all().map_err(create)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_readable_by_group_or_others_is_refused_with_its_mode_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = GatewayKey::from_bytes([0x5a; 32]);
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o610] {
            let path = write_with_mode(dir.path(), "gw.key", &key.to_hex_line(), mode);
            let err = read_gateway_key(&path).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, SecretFileError::NotPrivate { mode: m, .. } if m == mode),
                "{text}"
            );
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(text.contains("chmod 600"), "{text}");
            assert!(!text.contains("5a5a"), "{text}");
        }
        for mode in [0o600, 0o400] {
            let path = write_with_mode(dir.path(), "gw.key", &key.to_hex_line(), mode);
            assert_eq!(read_gateway_key(&path).unwrap(), key);
        }
    }

    #[test]
    fn a_malformed_key_names_the_file_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_with_mode(dir.path(), "gw.key", "hunter2-hunter2", 0o600);
        let text = read_gateway_key(&path).unwrap_err().to_string();
        assert!(
            text.contains("gw.key") && text.contains("hex digits"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn created_secrets_are_private_and_never_replace_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.key");
        create_private(&path, b"first").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            create_private(&path, b"second"),
            Err(SecretFileError::Create { .. })
        ));
        assert_eq!(read_private_text(&path).unwrap(), "first");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = read_private(Path::new("/nonexistent/dir/gw.key")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("/nonexistent/dir/gw.key: cannot read"));
    }
}
