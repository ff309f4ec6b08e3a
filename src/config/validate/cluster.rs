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
        sentinel_username,
        sentinel_password_file,
        encryption_key_file,
        fallback_share,
    } = file;
    let redis_url = redis_url.trim();
    let (shown_url, inline_password, mut sentinel) = if redis_url.contains("+sentinel://") {
        let (sentinel, password, shown) = sentinel_url(redis_url)?;
        (shown, password, Some(sentinel))
    } else {
        let (shown, password) = direct_url(redis_url)?;
        (shown, password, None)
    };
    match &mut sentinel {
        Some(sentinel) => {
            sentinel.sentinel_username = sentinel_username.filter(|u| !u.is_empty());
            sentinel.sentinel_password = sentinel_password_file
                .map(|path| read_password(base_dir, "cluster.sentinel_password_file", &path))
                .transpose()?;
        }
        None => {
            let given = [
                ("cluster.sentinel_username", sentinel_username.is_some()),
                (
                    "cluster.sentinel_password_file",
                    sentinel_password_file.is_some(),
                ),
            ];
            if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    *key,
                    "is the sentinels' login: it needs a redis+sentinel:// (or rediss+sentinel://) cluster.redis_url",
                ));
            }
        }
    }
    let password = match (inline_password, password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "cluster.password_file",
                "the password is in cluster.redis_url already; give it one way",
            ))
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(path)) => Some(read_password(base_dir, "cluster.password_file", &path)?),
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
        redis_url: shown_url,
        password,
        sentinel,
        key_prefix,
        encryption_key: Secret::new(text.trim()),
        encryption_key_file: key_path,
        fallback_share,
    })
}

/// A password file's first line (a trailing newline is not part of it).
fn read_password(base_dir: &Path, key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let path = base_dir.join(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

/// The user-info's password, decoded as RFC 3986 escapes (a `+` is a
/// plus, not a space); `None` when empty.
fn decoded_password(password: &str) -> Option<String> {
    Some(
        percent_encoding::percent_decode_str(password)
            .decode_utf8_lossy()
            .into_owned(),
    )
    .filter(|p| !p.is_empty())
}

/// `redis://` or `rediss://`: the URL as shown (no password) and the
/// password in it.
fn direct_url(text: &str) -> Result<(String, Option<String>), ConfigError> {
    let mut url = url::Url::parse(text)
        .map_err(|e| invalid("cluster.redis_url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "redis" | "rediss") || url.host().is_none() {
        return Err(invalid(
            "cluster.redis_url",
            "use redis://HOST:PORT/DB, rediss:// for TLS, or redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB] through Sentinel",
        ));
    }
    let password = url.password().and_then(decoded_password);
    let _ = url.set_password(None);
    Ok((url.to_string(), password))
}

/// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]`
/// (`rediss+sentinel://` for TLS): the sentinels, the master's name, the
/// database and the data nodes' login; the URL as shown (no password).
fn sentinel_url(text: &str) -> Result<(Sentinel, Option<String>, String), ConfigError> {
    const FORM: &str =
        "use redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB] (rediss+sentinel:// for TLS)";
    let bad = |why: &str| invalid("cluster.redis_url", format!("{why}; {FORM}"));
    let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let tls = match scheme {
        "redis+sentinel" => false,
        "rediss+sentinel" => true,
        _ => return Err(bad(&format!("unknown scheme {scheme:?}"))),
    };
    let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no master name"))?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((user, password)) => (user, decoded_password(password)),
            None => (info, None),
        },
        None => ("", None),
    };
    let username = percent_encoding::percent_decode_str(username)
        .decode_utf8_lossy()
        .into_owned();
    let mut nodes = Vec::new();
    for node in hosts.split(',') {
        let (host, port) = node
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .ok_or_else(|| bad(&format!("{node:?} is not HOST:PORT")))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("{node:?} has no valid port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        nodes.push((host.to_owned(), port));
    }
    let mut segments = path.trim_end_matches('/').split('/');
    let master = segments
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("no master name"))?;
    let db = match segments.next() {
        None => 0,
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or_else(|| bad(&format!("{db:?} is not a database number")))?,
    };
    if segments.next().is_some() {
        return Err(bad("nothing may follow the database number"));
    }
    let shown = format!(
        "{scheme}://{}{hosts}/{master}/{db}",
        if username.is_empty() {
            String::new()
        } else {
            format!(
                "{}@",
                userinfo.and_then(|i| i.split(':').next()).unwrap_or("")
            )
        }
    );
    let sentinel = Sentinel {
        nodes,
        master: master.to_owned(),
        db,
        tls,
        username: Some(username).filter(|u| !u.is_empty()),
        sentinel_username: None,
        sentinel_password: None,
    };
    Ok((sentinel, password, shown))
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

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_master_and_the_database() {
        let dir = std::env::temp_dir().join(format!("sentinel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("good.key");
        std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
        let sentinel_pass = dir.join("sentinel.pass");
        std::fs::write(&sentinel_pass, "s3ntinel-pass\n").unwrap();
        let table = |url: &str, extra: &str| {
            with_cluster(&format!(
                "redis_url = \"{url}\"\nencryption_key_file = \"{}\"\n{extra}",
                key.display()
            ))
        };

        let config = load(&table(
            "redis+sentinel://app:p%40ss@s1:26379,127.0.0.1:26380,[::1]:26381/mymaster/2",
            &format!(
                "sentinel_username = \"watcher\"\nsentinel_password_file = \"{}\"",
                sentinel_pass.display()
            ),
        ))
        .unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        let sentinel = cluster.sentinel.as_ref().unwrap();
        assert_eq!(
            sentinel.nodes,
            [
                ("s1".to_owned(), 26379),
                ("127.0.0.1".to_owned(), 26380),
                ("::1".to_owned(), 26381)
            ]
        );
        assert_eq!(sentinel.master, "mymaster");
        assert_eq!(sentinel.db, 2);
        assert!(!sentinel.tls);
        assert_eq!(sentinel.username.as_deref(), Some("app"));
        assert_eq!(cluster.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(sentinel.sentinel_username.as_deref(), Some("watcher"));
        assert_eq!(
            sentinel.sentinel_password.as_ref().unwrap().expose(),
            "s3ntinel-pass"
        );
        assert_eq!(
            cluster.redis_url,
            "redis+sentinel://app@s1:26379,127.0.0.1:26380,[::1]:26381/mymaster/2"
        );
        let shown = format!("{}{config:?}", config.summary());
        assert!(
            !shown.contains("p@ss") && !shown.contains("p%40ss") && !shown.contains("s3ntinel"),
            "{shown}"
        );
        // Plain to a remote sentinel: the same warning as redis://.
        assert!(config
            .warnings()
            .iter()
            .any(|w| w.contains("rediss+sentinel://")));

        let tls = load(&table("rediss+sentinel://127.0.0.1:26379/mymaster", "")).unwrap();
        let sentinel = tls.cluster.as_ref().unwrap().sentinel.clone().unwrap();
        assert!(sentinel.tls);
        assert_eq!((sentinel.db, sentinel.username), (0, None));
        assert!(tls.warnings().is_empty(), "{:?}", tls.warnings());

        for (url, extra, fragment) in [
            ("redis+sentinel://s1:26379", "", "no master name"),
            ("redis+sentinel://s1:26379/", "", "no master name"),
            ("redis+sentinel://s1/mymaster", "", "not HOST:PORT"),
            ("redis+sentinel://s1:x/mymaster", "", "no valid port"),
            (
                "redis+sentinel://s1:26379/mymaster/x",
                "",
                "not a database number",
            ),
            (
                "redis+sentinel://s1:26379/mymaster/0/1",
                "",
                "nothing may follow",
            ),
            (
                "redis+sentinal://s1:26379/mymaster",
                "",
                "redis+sentinel://HOST:PORT",
            ),
            (
                "redis://127.0.0.1:6379/0",
                "sentinel_username = \"watcher\"",
                "cluster.sentinel_username",
            ),
        ] {
            let error = error_of(&table(url, extra));
            assert!(
                error.contains("cluster.redis_url") || error.contains("cluster.sentinel"),
                "{url}: {error}"
            );
            assert!(error.contains(fragment), "{url}: {error}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
