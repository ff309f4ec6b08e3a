//! `[cluster]`: the shared state's Redis, its key prefix and sealing key.

use std::path::Path;

use super::super::file::*;
use super::super::*;
use crate::secret::Secret;

/// `[cluster]`: a Redis URL (the password, if any, kept apart as a
/// secret), a key prefix, the sealing key, the fallback share.
pub(super) fn validate_cluster(file: ClusterFile, base_dir: &Path) -> Result<Cluster, ConfigError> {
    use base64::Engine as _;
    let ClusterFile {
        redis_url,
        key_prefix,
        password_file,
        encryption_key_file,
        fallback_share,
    } = file;
    let mut url = url::Url::parse(redis_url.trim())
        .map_err(|e| invalid("cluster.redis_url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "redis" | "rediss") || url.host().is_none() {
        return Err(invalid(
            "cluster.redis_url",
            "use redis://HOST:PORT/DB, or rediss:// for TLS",
        ));
    }
    // RFC 3986 escapes: a `+` in the user-info is a plus, not a space.
    let inline_password = url
        .password()
        .map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|p| !p.is_empty());
    let _ = url.set_password(None);
    let password = match (inline_password, password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "cluster.password_file",
                "the password is in cluster.redis_url already; give it one way",
            ))
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(path)) => {
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "cluster.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(Secret::new(text.trim_end_matches(['\r', '\n'])))
        }
        (None, None) => None,
    };
    if key_prefix.is_empty() || key_prefix.contains(char::is_whitespace) {
        return Err(invalid(
            "cluster.key_prefix",
            "must be non-empty, without spaces",
        ));
    }
    let key_path = encryption_key_file.map(|p| base_dir.join(p)).ok_or_else(|| {
        invalid(
            "cluster.encryption_key_file",
            "missing: tokens are stored sealed; make a key with `head -c 32 /dev/urandom | base64 > key` and name the file here",
        )
    })?;
    let text = std::fs::read_to_string(&key_path).map_err(|e| {
        invalid(
            "cluster.encryption_key_file",
            format!("cannot read {}: {e}", key_path.display()),
        )
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            invalid(
                "cluster.encryption_key_file",
                format!(
                    "{} must hold 32 random bytes, base64-encoded (head -c 32 /dev/urandom | base64)",
                    key_path.display()
                ),
            )
        })?;
    if !(fallback_share > 0.0 && fallback_share <= 1.0) {
        return Err(invalid(
            "cluster.fallback_share",
            format!("must be more than 0 and at most 1, got {fallback_share}"),
        ));
    }
    Ok(Cluster {
        redis_url: url.to_string(),
        password,
        key_prefix,
        encryption_key: Secret::new(text.trim()),
        encryption_key_file: key_path,
        fallback_share,
    })
}

#[cfg(test)]
mod cluster_tests {
    use crate::config::test_support::*;

    fn with_cluster(table: &str) -> String {
        format!("{MINIMAL}\n[cluster]\n{table}\n")
    }

    #[test]
    fn cluster_settings_are_checked_and_the_key_is_never_shown() {
        let dir = std::env::temp_dir().join(format!("cluster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.key");
        std::fs::write(&good, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
        let short = dir.join("short.key");
        std::fs::write(&short, "c2hvcnQ=\n").unwrap();
        let key = |path: &std::path::Path| format!("encryption_key_file = \"{}\"", path.display());

        let config = load(&with_cluster(&format!(
            "redis_url = \"redis://:hunter2@127.0.0.1:6379/0\"\n{}",
            key(&good)
        )))
        .unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(cluster.password.as_ref().unwrap().expose(), "hunter2");
        assert_eq!(cluster.key_prefix, "coupa-auth-proxy");
        assert_eq!(cluster.fallback_share, 0.5);
        let shown = format!("{}{config:?}", config.summary());
        assert!(
            !shown.contains("hunter2") && !shown.contains("MDEyMzQ1"),
            "{shown}"
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());

        // User-info escapes are RFC 3986's: `+` stays a plus.
        let escaped = load(&with_cluster(&format!(
            "redis_url = \"redis://:a+b%40c@127.0.0.1:6379/0\"\n{}",
            key(&good)
        )))
        .unwrap();
        let password = escaped.cluster.unwrap().password.unwrap();
        assert_eq!(password.expose(), "a+b@c");

        let remote = load(&with_cluster(&format!(
            "redis_url = \"redis://valkey:6379/0\"\n{}",
            key(&good)
        )))
        .unwrap();
        assert!(remote.warnings().iter().any(|w| w.contains("rediss://")));

        for (table, fragment) in [
            (
                "redis_url = \"http://x\"".to_owned() + "\n" + &key(&good),
                "cluster.redis_url",
            ),
            (
                "redis_url = \"redis://x:1\"".to_owned(),
                "cluster.encryption_key_file: missing",
            ),
            (
                "redis_url = \"redis://x:1\"\n".to_owned() + &key(&short),
                "32 random bytes",
            ),
            (
                "redis_url = \"redis://x:1\"\nfallback_share = 0\n".to_owned() + &key(&good),
                "cluster.fallback_share",
            ),
        ] {
            let error = error_of(&with_cluster(&table));
            assert!(error.contains(fragment), "{table}: {error}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
