//! File shape → runtime model: every value checked, each table destructured
//! exhaustively so that a new key cannot be silently ignored. The `[oauth]`
//! tables have their own room, [`super::credentials`].

use std::path::Path;

use http::uri::{Authority, Scheme};
use http::HeaderValue;

use super::credentials::validate_credentials;
use super::file::*;
use super::values::{parse_endpoint, read_ca_file};
use super::*;
use crate::encode::parse_sha256;
use crate::secret::Secret;

impl FileConfig {
    /// Checks every value and builds the runtime model. Destructures each
    /// table completely so that a new key cannot be silently ignored.
    pub fn validate(self, base_dir: &Path) -> Result<Config, ConfigError> {
        let FileConfig {
            listen,
            coupa,
            oauth,
            integration,
            admin,
            reload,
            runtime,
            cluster,
            insight,
        } = self;
        let InsightFile { idle_warning } = insight;
        if idle_warning.is_zero() {
            return Err(invalid("insight.idle_warning", "must be more than 0"));
        }
        let ReloadFile { watch_interval } = reload;
        let RuntimeFile {
            flavor,
            worker_threads,
        } = runtime;
        if worker_threads == Some(0) {
            return Err(invalid("runtime.worker_threads", "must be at least 1"));
        }
        if worker_threads.is_some() && flavor != RuntimeFlavor::MultiThread {
            return Err(invalid(
                "runtime.worker_threads",
                "only applies to flavor = \"multi_thread\"",
            ));
        }
        let ListenFile {
            address: listen_address,
            shutdown_grace,
            header_read_timeout,
            max_header_bytes,
            max_connections,
            release_idle_buffers_above,
            body_read_timeout,
            allow_unauthenticated,
            tls,
        } = listen;
        let tls = tls.map(|t| {
            let ListenTlsFile {
                cert_file,
                key_file,
                client_ca_file,
            } = t;
            ListenTls {
                cert_file: base_dir.join(cert_file),
                key_file: base_dir.join(key_file),
                client_ca_file: client_ca_file.map(|p| base_dir.join(p)),
            }
        });
        if let Some(t) = &tls {
            crate::tls::load_certified_key(&t.cert_file, &t.key_file)
                .map_err(|e| invalid("listen.tls", e.to_string()))?;
        }
        // Client certificates authenticate clients as well as legacy keys do.
        let mutual_tls = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        let CoupaFile {
            base_url,
            ca_file,
            accept,
            connect_timeout,
            pool_idle_timeout,
            response_header_timeout,
            idle_timeout,
            replay_body_limit,
            http_version,
            max_connections: upstream_max_connections,
            rate_limit,
        } = coupa;
        let AdminFile {
            address: admin_address,
        } = admin;
        let base = parse_endpoint("coupa.base_url", &base_url)?;
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid(
                "coupa.base_url",
                "must not have a query or fragment; give the instance URL, e.g. https://acme.coupahost.com",
            ));
        }
        let scheme = if base.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let host = base.host_str().unwrap_or_default();
        let authority_text = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority: Authority = authority_text
            .parse()
            .map_err(|e| invalid("coupa.base_url", format!("bad host: {e}")))?;
        let path_prefix = base.path().trim_end_matches('/').to_owned();
        let base_url = base_url.trim_end_matches('/').to_owned();

        let (ca_file, extra_roots) = match ca_file {
            None => (None, Vec::new()),
            Some(path) => {
                let path = base_dir.join(path);
                let roots = read_ca_file(&path)?;
                (Some(path), roots)
            }
        };

        let accept = HeaderValue::from_str(accept.trim())
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid("coupa.accept", "must be a non-empty header value"))?;

        let credentials = validate_credentials(&oauth, base_dir, &base_url)?;
        let integrations = validate_integrations(integration, &credentials)?;
        if integrations.is_empty() {
            if !credentials.iter().any(|c| c.name == DEFAULT_CREDENTIAL) && credentials.len() > 1 {
                return Err(invalid(
                    "integration",
                    "several credentials but no [[integration]] to choose between them: add integrations, or name one credential \"default\"",
                ));
            }
            if !listen_address.ip().is_loopback() && !allow_unauthenticated && !mutual_tls {
                return Err(invalid(
                    "listen.address",
                    format!(
                        "{listen_address} is reachable from other machines, and with no [[integration]] anyone who can connect gets a Coupa token; \
                         add [[integration]] tables (coupa-auth-proxy hash-key), bind 127.0.0.1, or set listen.allow_unauthenticated = true"
                    ),
                ));
            }
        }
        for (key, value) in [
            ("coupa.connect_timeout", connect_timeout),
            ("coupa.response_header_timeout", response_header_timeout),
            ("coupa.idle_timeout", idle_timeout),
            ("listen.header_read_timeout", header_read_timeout),
            ("listen.body_read_timeout", body_read_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be positive"));
            }
        }
        // hyper cannot read a request head into less than 8 KiB.
        if max_header_bytes < 8192 {
            return Err(invalid(
                "listen.max_header_bytes",
                format!("must be at least 8192, got {max_header_bytes}"),
            ));
        }
        if max_connections == 0 {
            return Err(invalid("listen.max_connections", "must be positive"));
        }
        if upstream_max_connections == 0 {
            return Err(invalid("coupa.max_connections", "must be positive"));
        }
        let rate_limit = match rate_limit {
            None => None,
            Some(RateLimitFile {
                per_second,
                burst,
                max_queue,
            }) => {
                if !(per_second.is_finite() && per_second > 0.0) {
                    return Err(invalid(
                        "coupa.rate_limit.per_second",
                        format!("must be a positive number, got {per_second}"),
                    ));
                }
                if burst == 0 {
                    return Err(invalid("coupa.rate_limit.burst", "must be at least 1"));
                }
                Some(RateLimit {
                    per_second,
                    burst,
                    max_queue,
                })
            }
        };

        Ok(Config {
            listen: Listen {
                address: listen_address,
                shutdown_grace,
                header_read_timeout,
                max_header_bytes,
                max_connections,
                release_idle_buffers_above,
                body_read_timeout,
                allow_unauthenticated,
                tls,
            },
            coupa: Coupa {
                base_url,
                scheme,
                authority,
                path_prefix,
                ca_file,
                extra_roots,
                accept,
                connect_timeout,
                pool_idle_timeout,
                response_header_timeout,
                idle_timeout,
                replay_body_limit,
                http_version,
                max_connections: upstream_max_connections,
                rate_limit,
            },
            credentials,
            integrations,
            admin: Admin {
                address: admin_address,
            },
            watch_interval: (!watch_interval.is_zero()).then_some(watch_interval),
            runtime: Runtime {
                flavor,
                worker_threads,
            },
            cluster: cluster.map(|c| validate_cluster(c, base_dir)).transpose()?,
            insight: Insight { idle_warning },
        })
    }
}

fn validate_integrations(
    files: Vec<IntegrationFile>,
    credentials: &[Credential],
) -> Result<Vec<Integration>, ConfigError> {
    let mut integrations: Vec<Integration> = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let IntegrationFile {
            name,
            api_key_sha256,
            oauth_client_id,
            oauth_client_secret_sha256,
            credential,
        } = file;
        let key = format!("integration[{i}]");
        if name.trim().is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        let hash = api_key_sha256
            .map(|hex| {
                parse_sha256(&hex).ok_or_else(|| {
                    invalid(
                        format!("{key}.api_key_sha256"),
                        "must be 64 hex digits: the SHA-256 of the legacy key (coupa-auth-proxy hash-key prints it)",
                    )
                })
            })
            .transpose()?;
        let local_client = match (oauth_client_id, oauth_client_secret_sha256) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    format!("{key}.oauth_client_secret_sha256"),
                    "is needed with oauth_client_id: the SHA-256 of the secret the tool sends (coupa-auth-proxy hash-key prints it)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    format!("{key}.oauth_client_id"),
                    "is needed with oauth_client_secret_sha256",
                ))
            }
            (Some(client_id), Some(secret)) => {
                if client_id.is_empty()
                    || client_id.chars().any(|c| c.is_control() || c == ' ')
                {
                    return Err(invalid(
                        format!("{key}.oauth_client_id"),
                        "must be non-empty, without spaces or control characters",
                    ));
                }
                let secret_sha256 = parse_sha256(&secret).ok_or_else(|| {
                    invalid(
                        format!("{key}.oauth_client_secret_sha256"),
                        "must be 64 hex digits: the SHA-256 of the local client secret (coupa-auth-proxy hash-key prints it)",
                    )
                })?;
                Some(LocalClient {
                    client_id,
                    secret_sha256,
                })
            }
        };
        if hash.is_none() && local_client.is_none() {
            return Err(invalid(
                key,
                "needs api_key_sha256 (a tool sending X-COUPA-API-KEY) or oauth_client_id with oauth_client_secret_sha256 (a tool fetching its own token), or both",
            ));
        }
        let credential_index = credentials
            .iter()
            .position(|c| c.name == credential)
            .ok_or_else(|| {
                let known: Vec<&str> = credentials.iter().map(|c| c.name.as_str()).collect();
                invalid(
                    format!("{key}.credential"),
                    format!(
                        "no credential named {credential:?} (known: {})",
                        known.join(", ")
                    ),
                )
            })?;
        if let Some(other) = integrations.iter().find(|o| o.name == name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} is used twice", other.name),
            ));
        }
        if let Some(other) = integrations
            .iter()
            .find(|o| hash.is_some() && o.api_key_sha256 == hash)
        {
            return Err(invalid(
                format!("{key}.api_key_sha256"),
                format!(
                    "same key as integration {:?}: each integration needs its own key",
                    other.name
                ),
            ));
        }
        if let Some(client) = &local_client {
            if let Some(other) = integrations.iter().find(|o| {
                o.local_client
                    .as_ref()
                    .is_some_and(|c| c.client_id == client.client_id)
            }) {
                return Err(invalid(
                    format!("{key}.oauth_client_id"),
                    format!(
                        "{:?} is already integration {:?}'s",
                        client.client_id, other.name
                    ),
                ));
            }
        }
        integrations.push(Integration {
            name,
            api_key_sha256: hash,
            local_client,
            credential: credential_index,
        });
    }
    Ok(integrations)
}

/// `[cluster]`: a Redis URL (the password, if any, kept apart as a
/// secret), a key prefix, the sealing key, the fallback share.
fn validate_cluster(file: ClusterFile, base_dir: &Path) -> Result<Cluster, ConfigError> {
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
mod tests {
    use http::uri::Scheme;

    use super::super::test_support::*;

    /// Each (change to MINIMAL) gives an error naming all the fragments.
    #[test]
    fn errors_name_the_key_and_the_cause() {
        let cases: [(&str, &str, &[&str]); 4] = [
            ("[admin]", "[admin]\nadress = \"x\"", &["admin", "adress"]),
            (
                "COUPA_CLIENT_SECRET",
                "NOPE_NOT_SET",
                &["oauth.client_secret", "NOPE_NOT_SET"],
            ),
            (
                "client_secret = \"${COUPA_CLIENT_SECRET}\"\n",
                "",
                &["oauth.client_secret", "missing"],
            ),
            (
                "https://acme.coupahost.com",
                "http://acme.coupahost.com",
                &["coupa.base_url", "loopback"],
            ),
        ];
        for (from, to, fragments) in cases {
            let err = load(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            for fragment in fragments {
                assert!(err.contains(fragment), "{from:?} -> {to:?}: {err}");
            }
        }
    }

    #[test]
    fn plain_http_only_for_loopback() {
        for ok in [
            "http://127.0.0.1:1234",
            "http://localhost:9",
            "http://[::1]:80",
        ] {
            let text = MINIMAL.replace("https://acme.coupahost.com", ok);
            let config = load(&text).unwrap();
            assert_eq!(config.coupa.scheme, Scheme::HTTP, "{ok}");
        }
        let text = MINIMAL.replace(
            "scopes = [",
            "token_url = \"http://10.0.0.1/oauth2/token\"\nscopes = [",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("oauth.token_url"), "{err}");
    }

    #[test]
    fn named_credentials_and_integrations_are_checked() {
        let named = MINIMAL.replace("[oauth]", "[oauth.main]");
        let cases: [(String, &[&str]); 4] = [
            (
                format!("{named}\n[[integration]]\nname = \"a\"\napi_key_sha256 = \"abc\"\ncredential = \"main\"\n"),
                &["integration[0].api_key_sha256", "64 hex"],
            ),
            (
                format!("{named}\n[[integration]]\nname = \"a\"\napi_key_sha256 = \"{}\"\ncredential = \"other\"\n", "0".repeat(64)),
                &["integration[0].credential", "main"],
            ),
            (
                format!("{named}\n[[integration]]\nname = \"a\"\napi_key_sha256 = \"{h}\"\ncredential = \"main\"\n[[integration]]\nname = \"b\"\napi_key_sha256 = \"{h}\"\ncredential = \"main\"\n", h = "1".repeat(64)),
                &["integration[1].api_key_sha256", "same key"],
            ),
            (
                named.replace("client_id", "client_idd"),
                &["oauth.main", "client_idd"],
            ),
        ];
        for (text, fragments) in cases {
            let err = load(&text).unwrap_err().to_string();
            for fragment in fragments {
                assert!(err.contains(fragment), "{err}");
            }
        }
        // A single named credential without integrations serves everyone.
        let config = load(&named).unwrap();
        assert_eq!(config.credentials[config.default_credential()].name, "main");
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::super::test_support::*;

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
