//! The state file of a user-consented grant: refresh token, access token,
//! expiries and scopes, so a restart needs no new consent.
//!
//! Written atomically (temp file in the same directory, fsync, rename,
//! fsync of the directory) with mode 0600: a crash at any point leaves
//! either the old file or the new one, never a mix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

const FORMAT_VERSION: u32 = 1;

/// Tokens and facts of one consent.
#[derive(Debug, Clone)]
pub struct GrantState {
    /// The client the tokens were issued to; a different one cannot use them.
    pub client_id: String,
    /// Scopes Coupa granted, space-separated.
    pub scope: String,
    pub refresh_token: Secret,
    /// When Coupa issued the refresh token (its lifetime counts from here).
    pub refresh_token_issued_at: SystemTime,
    pub access_token: Option<Secret>,
    pub access_token_expires_at: Option<SystemTime>,
}

/// Two states are the same when they are stored the same. The file (and the
/// cluster state) keeps whole seconds while memory keeps nanoseconds, so a
/// state just saved must equal itself read back; otherwise every renewal
/// looks like a new consent on disk and its rejected token is served again.
impl PartialEq for GrantState {
    fn eq(&self, other: &Self) -> bool {
        let GrantState {
            client_id,
            scope,
            refresh_token,
            refresh_token_issued_at,
            access_token,
            access_token_expires_at,
        } = self;
        *client_id == other.client_id
            && *scope == other.scope
            && *refresh_token == other.refresh_token
            && unix(*refresh_token_issued_at) == unix(other.refresh_token_issued_at)
            && *access_token == other.access_token
            && access_token_expires_at.map(unix) == other.access_token_expires_at.map(unix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("cannot read state file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file as written: versioned, times in Unix seconds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileV1 {
    version: u32,
    client_id: String,
    scope: String,
    refresh_token: String,
    refresh_token_issued_at: u64,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    access_token_expires_at: Option<u64>,
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Reads and checks a state file.
pub fn load(path: &Path) -> Result<GrantState, StateFileError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StateFileError::Missing(path.to_owned()),
        _ => StateFileError::Unreadable {
            path: path.to_owned(),
            source,
        },
    })?;
    decode(&bytes).map_err(|reason| StateFileError::Corrupt {
        path: path.to_owned(),
        reason,
    })
}

/// A state as the file (and the cluster state) holds it; the error says
/// what is wrong, never a value.
pub fn decode(bytes: &[u8]) -> Result<GrantState, String> {
    // serde_json names the line and column, never the value.
    let file: StateFileV1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} is not {FORMAT_VERSION}",
            file.version
        ));
    }
    if file.refresh_token.is_empty() {
        return Err("refresh_token is empty".to_owned());
    }
    Ok(GrantState {
        client_id: file.client_id,
        scope: file.scope,
        refresh_token: Secret::new(file.refresh_token),
        refresh_token_issued_at: from_unix(file.refresh_token_issued_at),
        access_token: file.access_token.filter(|t| !t.is_empty()).map(Secret::new),
        access_token_expires_at: file.access_token_expires_at.map(from_unix),
    })
}

/// The state in the file's format.
pub fn encode(state: &GrantState) -> Vec<u8> {
    let file = StateFileV1 {
        version: FORMAT_VERSION,
        client_id: state.client_id.clone(),
        scope: state.scope.clone(),
        refresh_token: state.refresh_token.expose().to_owned(),
        refresh_token_issued_at: unix(state.refresh_token_issued_at),
        access_token: state.access_token.as_ref().map(|t| t.expose().to_owned()),
        access_token_expires_at: state.access_token_expires_at.map(unix),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Replaces the state file atomically, creating it with mode 0600.
pub fn save(path: &Path, state: &GrantState) -> Result<(), StateFileError> {
    let write_error = |source| StateFileError::Write {
        path: path.to_owned(),
        source,
    };
    let staged = stage(path, &encode(state)).map_err(write_error)?;
    commit(&staged, path).map_err(write_error)
}

/// The temp file beside `path`: same directory, so the rename is atomic.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to the temp file and flushes them to disk.
fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let temp = temp_path(path);
    // A leftover from a crash may have other permissions; start afresh.
    let _ = std::fs::remove_file(&temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(temp),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Moves the staged file into place and makes the rename durable.
fn commit(staged: &Path, path: &Path) -> std::io::Result<()> {
    if let Err(e) = std::fs::rename(staged, path) {
        let _ = std::fs::remove_file(staged);
        return Err(e);
    }
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(refresh: &str) -> GrantState {
        GrantState {
            client_id: "client".into(),
            scope: "core.invoice.read offline_access".into(),
            refresh_token: Secret::new(refresh),
            refresh_token_issued_at: from_unix(1_700_000_000),
            access_token: Some(Secret::new("access")),
            access_token_expires_at: Some(from_unix(1_700_086_399)),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "coupa-proxy-state-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trips_with_mode_0600() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("grant.json");
        save(&path, &state("r1")).unwrap();
        assert_eq!(load(&path).unwrap(), state("r1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        // Replacing keeps the mode even if the old file was wider.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            save(&path, &state("r2")).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_saved_with_sub_second_times_equals_itself_read_back() {
        let dir = temp_dir("precision");
        let path = dir.join("grant.json");
        let now = SystemTime::now();
        let mut held = state("r1");
        held.refresh_token_issued_at = now;
        held.access_token_expires_at = Some(now + Duration::from_millis(86_399_123));
        save(&path, &held).unwrap();
        assert_eq!(load(&path).unwrap(), held);
        // A real change is still one.
        let mut rotated = held.clone();
        rotated.access_token_expires_at = Some(now + Duration::from_secs(90_000));
        assert_ne!(load(&path).unwrap(), rotated);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_crash_between_write_and_rename_leaves_the_old_file() {
        let dir = temp_dir("crash");
        let path = dir.join("grant.json");
        save(&path, &state("old")).unwrap();
        // The process dies after staging the new state, before the rename:
        // the temp file is there, the state file is untouched.
        let staged = stage(&path, b"{\"version\": 1, \"client_id\": \"cl").unwrap();
        assert!(staged.exists());
        assert_eq!(load(&path).unwrap().refresh_token.expose(), "old");
        // The next write replaces the leftover and succeeds.
        save(&path, &state("new")).unwrap();
        assert_eq!(load(&path).unwrap().refresh_token.expose(), "new");
        assert!(!staged.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn readers_never_see_a_partial_file() {
        let dir = temp_dir("readers");
        let path = dir.join("grant.json");
        save(&path, &state(&"x".repeat(200_000))).unwrap();
        let writer_path = path.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..100 {
                save(&writer_path, &state(&format!("{i}").repeat(200_000))).unwrap();
            }
        });
        while !writer.is_finished() {
            load(&path).expect("a reader saw a partial or missing file");
        }
        writer.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_never_the_token() {
        let dir = temp_dir("errors");
        let path = dir.join("grant.json");
        let missing = load(&path).unwrap_err().to_string();
        assert!(missing.contains("grant.json") && missing.contains("does not exist"));
        std::fs::write(&path, "{\"version\": 1, \"refresh_token\": \"SECRET-R\"").unwrap();
        let corrupt = load(&path).unwrap_err().to_string();
        assert!(corrupt.contains("corrupt"), "{corrupt}");
        assert!(!corrupt.contains("SECRET-R"), "{corrupt}");
        let debug = format!("{:?}", state("SECRET-R"));
        assert!(!debug.contains("SECRET-R"), "{debug}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
