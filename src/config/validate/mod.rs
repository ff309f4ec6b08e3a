//! File shape → runtime model: every value checked, each table destructured
//! exhaustively so that a new key cannot be silently ignored. One
//! conversion per table; the rules that span tables stay in
//! [`FileConfig::validate`]. The `[oauth]` tables have their own room,
//! [`super::credentials`].

mod cluster;
mod integrations;

use std::path::{Path, PathBuf};

use http::uri::{Authority, Scheme};

use super::credentials::validate_credentials;
use super::file::*;
use super::values::{parse_endpoint, read_ca_file};
use super::*;
use crate::encode::parse_sha256;
use cluster::validate_cluster;
use integrations::validate_integrations;

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
            telemetry,
        } = self;
        let InsightFile { idle_warning } = insight;
        if idle_warning.is_zero() {
            return Err(invalid("insight.idle_warning", "must be more than 0"));
        }
        let ReloadFile { watch_interval } = reload;
        let AdminFile {
            address: admin_address,
            status_password_sha256,
        } = admin;
        let status_password_sha256 = status_password_sha256
            .map(|hex| {
                parse_sha256(&hex).ok_or_else(|| {
                    invalid(
                        "admin.status_password_sha256",
                        "must be 64 hex digits: the SHA-256 of the status page's password (coupa-auth-proxy hash-key prints it)",
                    )
                })
            })
            .transpose()?;
        let listen = validate_listen(listen, base_dir)?;
        let coupa = validate_coupa(coupa, base_dir)?;
        let mut credentials = validate_credentials(&oauth, base_dir, &coupa.base_url)?;
        for credential in &mut credentials {
            credential.oauth.egress_proxy = coupa.egress_proxy.clone();
        }
        let integrations = validate_integrations(
            integration,
            &credentials,
            coupa.max_connections,
            coupa.rate_limit.as_ref(),
        )?;
        if integrations.is_empty() {
            if !credentials.iter().any(|c| c.name == DEFAULT_CREDENTIAL) && credentials.len() > 1 {
                return Err(invalid(
                    "integration",
                    "several credentials but no [[integration]] to choose between them: add integrations, or name one credential \"default\"",
                ));
            }
            // Client certificates authenticate clients as well as legacy keys do.
            let mutual_tls = listen
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca_file.is_some());
            let address = listen.address;
            if !address.ip().is_loopback() && !listen.allow_unauthenticated && !mutual_tls {
                return Err(invalid(
                    "listen.address",
                    format!(
                        "{address} is reachable from other machines, and with no [[integration]] anyone who can connect gets a Coupa token; \
                         add [[integration]] tables (coupa-auth-proxy hash-key), bind 127.0.0.1, or set listen.allow_unauthenticated = true"
                    ),
                ));
            }
        }
        Ok(Config {
            listen,
            coupa,
            credentials,
            integrations,
            admin: Admin {
                address: admin_address,
                status_password_sha256,
            },
            watch_interval: (!watch_interval.is_zero()).then_some(watch_interval),
            runtime: validate_runtime(runtime)?,
            cluster: cluster.map(|c| validate_cluster(c, base_dir)).transpose()?,
            insight: Insight { idle_warning },
            telemetry: validate_telemetry(telemetry)?,
        })
    }
}

/// `[telemetry]`. Plain `http://` is allowed anywhere: a collector is
/// usually a sidecar or a cluster service spoken to in plain HTTP, and
/// spans carry no secret.
fn validate_telemetry(file: TelemetryFile) -> Result<Telemetry, ConfigError> {
    const KEY: &str = "telemetry.otlp_endpoint";
    let TelemetryFile {
        otlp_endpoint,
        refused_lines_per_second,
    } = file;
    let refused_lines_per_second = std::num::NonZeroU32::new(refused_lines_per_second);
    let Some(text) = otlp_endpoint.filter(|t| !t.trim().is_empty()) else {
        return Ok(Telemetry {
            otlp_traces_url: None,
            refused_lines_per_second,
        });
    };
    let url = url::Url::parse(text.trim())
        .map_err(|e| invalid(KEY, format!("{text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            KEY,
            format!("{text:?}: must be an http:// or https:// URL with a host, the collector's OTLP/HTTP base (such as http://127.0.0.1:4318)"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(invalid(
            KEY,
            "must not carry a query, a fragment or credentials",
        ));
    }
    // The OTLP spec's signal path, below whatever path the base has.
    let traces = format!("{}/v1/traces", url.as_str().trim_end_matches('/'));
    let otlp_traces_url = url::Url::parse(&traces).map_err(|e| invalid(KEY, e.to_string()))?;
    Ok(Telemetry {
        otlp_traces_url: Some(otlp_traces_url),
        refused_lines_per_second,
    })
}

fn validate_runtime(file: RuntimeFile) -> Result<Runtime, ConfigError> {
    let RuntimeFile {
        flavor,
        worker_threads,
    } = file;
    if worker_threads == Some(0) {
        return Err(invalid("runtime.worker_threads", "must be at least 1"));
    }
    if worker_threads.is_some() && flavor != RuntimeFlavor::MultiThread {
        return Err(invalid(
            "runtime.worker_threads",
            "only applies to flavor = \"multi_thread\"",
        ));
    }
    Ok(Runtime {
        flavor,
        worker_threads,
    })
}

/// `[listen]` and `[listen.tls]`: the client side.
fn validate_listen(file: ListenFile, base_dir: &Path) -> Result<Listen, ConfigError> {
    let ListenFile {
        address,
        shutdown_grace,
        drain_delay,
        header_read_timeout,
        keepalive_timeout,
        max_header_bytes,
        max_connections,
        release_idle_buffers_above,
        body_read_timeout,
        min_body_rate,
        min_rate_grace,
        max_body_time,
        min_response_rate,
        allow_unauthenticated,
        tls,
        intercept,
    } = file;
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
    positive(&[
        ("listen.header_read_timeout", header_read_timeout),
        ("listen.keepalive_timeout", keepalive_timeout),
        ("listen.body_read_timeout", body_read_timeout),
        ("listen.max_body_time", max_body_time),
    ])?;
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
    Ok(Listen {
        address,
        shutdown_grace,
        drain_delay,
        header_read_timeout,
        keepalive_timeout,
        max_header_bytes,
        max_connections,
        release_idle_buffers_above,
        body_read_timeout,
        min_body_rate,
        min_rate_grace,
        max_body_time,
        min_response_rate,
        allow_unauthenticated,
        tls,
        intercept: intercept
            .map(|i| {
                let intercept = ListenIntercept {
                    ca_cert_file: base_dir.join(i.ca_cert_file),
                    ca_key_file: base_dir.join(i.ca_key_file),
                };
                crate::intercept::LocalCa::load(&intercept.ca_cert_file, &intercept.ca_key_file)
                    .map_err(|e| invalid("listen.intercept", e.to_string()))?;
                Ok::<_, ConfigError>(intercept)
            })
            .transpose()?,
    })
}

/// `[coupa]` and `[coupa.rate_limit]`: the instance and the way to it.
fn validate_coupa(file: CoupaFile, base_dir: &Path) -> Result<Coupa, ConfigError> {
    let CoupaFile {
        base_url,
        ca_file,
        accept,
        connect_timeout,
        pool_idle_timeout,
        keep_warm,
        response_header_timeout,
        idle_timeout,
        replay_body_limit,
        response_buffer,
        response_spool_limit,
        spool_dir,
        http_version,
        max_connections,
        connection_wait_timeout,
        token_wait_timeout,
        resend_429_within,
        rate_limit,
        egress_proxy,
    } = file;
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
    let (ca_file, extra_roots) = match ca_file {
        None => (None, Vec::new()),
        Some(path) => {
            let path = base_dir.join(path);
            let roots = read_ca_file(&path)?;
            (Some(path), roots)
        }
    };
    let accept = integrations::media_type("coupa.accept", &accept)?;
    positive(&[
        ("coupa.connect_timeout", connect_timeout),
        ("coupa.response_header_timeout", response_header_timeout),
        ("coupa.idle_timeout", idle_timeout),
        ("coupa.connection_wait_timeout", connection_wait_timeout),
    ])?;
    if max_connections == 0 {
        return Err(invalid("coupa.max_connections", "must be positive"));
    }
    Ok(Coupa {
        path_prefix: base.path().trim_end_matches('/').to_owned(),
        base_url: base_url.trim_end_matches('/').to_owned(),
        scheme,
        authority,
        ca_file,
        extra_roots,
        accept,
        connect_timeout,
        pool_idle_timeout,
        keep_warm,
        response_header_timeout,
        idle_timeout,
        replay_body_limit,
        response_buffer,
        response_spool_limit,
        spool_dir: spool_directory(spool_dir, base_dir)?,
        http_version,
        max_connections,
        connection_wait_timeout,
        token_wait_timeout,
        resend_429_within,
        rate_limit: rate_limit.map(validate_rate_limit).transpose()?,
        egress_proxy: egress_proxy
            .map(|file| validate_egress_proxy(file, base_dir))
            .transpose()?,
    })
}

/// `[coupa.egress_proxy]`: an `http://host:port` proxy, and a login given
/// whole (username and password file) or not at all.
fn validate_egress_proxy(
    file: EgressProxyFile,
    base_dir: &Path,
) -> Result<EgressProxy, ConfigError> {
    let EgressProxyFile {
        url,
        username,
        password_file,
    } = file;
    let key = "coupa.egress_proxy.url";
    let parsed = url::Url::parse(url.trim()).map_err(|e| {
        invalid(
            key,
            format!("not a URL ({e}); e.g. http://proxy.corp.example:3128"),
        )
    })?;
    if parsed.scheme() != "http" {
        return Err(invalid(
            key,
            format!("{} is not supported: give the proxy's http:// address (requests to Coupa stay TLS end to end inside the tunnel)", parsed.scheme()),
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            key,
            "must not carry a login: set coupa.egress_proxy.username and password_file",
        ));
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid(key, "has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port().unwrap_or(80);
    let password = match (&username, password_file.as_ref()) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "coupa.egress_proxy.password_file",
                "is needed with username",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "coupa.egress_proxy.username",
                "is needed with password_file",
            ))
        }
        (Some(_), Some(path)) => {
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "coupa.egress_proxy.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(crate::secret::Secret::new(
                text.trim_end_matches(['\r', '\n']),
            ))
        }
    };
    Ok(EgressProxy {
        url: format!("http://{}:{port}", parsed.host_str().unwrap_or(&host)),
        host,
        port,
        username,
        password,
        password_file: password_file.map(|p| base_dir.join(p)),
    })
}

/// Where answers beyond `coupa.response_buffer` are spooled: a directory
/// that exists when given, else the system's temp directory.
fn spool_directory(dir: Option<PathBuf>, base_dir: &Path) -> Result<PathBuf, ConfigError> {
    let Some(dir) = dir else {
        return Ok(std::env::temp_dir());
    };
    let dir = base_dir.join(dir);
    if !dir.is_dir() {
        return Err(invalid(
            "coupa.spool_dir",
            format!("{} is not a directory", dir.display()),
        ));
    }
    Ok(dir)
}

fn validate_rate_limit(file: RateLimitFile) -> Result<RateLimit, ConfigError> {
    let RateLimitFile {
        per_second,
        burst,
        max_queue,
    } = file;
    if !(per_second.is_finite() && per_second > 0.0) {
        return Err(invalid(
            "coupa.rate_limit.per_second",
            format!("must be a positive number, got {per_second}"),
        ));
    }
    if burst == 0 {
        return Err(invalid("coupa.rate_limit.burst", "must be at least 1"));
    }
    Ok(RateLimit {
        per_second,
        burst,
        max_queue,
    })
}

/// Each named duration must be more than zero.
fn positive(durations: &[(&str, std::time::Duration)]) -> Result<(), ConfigError> {
    match durations.iter().find(|(_, value)| value.is_zero()) {
        Some((key, _)) => Err(invalid(*key, "must be positive")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use http::uri::Scheme;

    use crate::config::test_support::*;

    /// An empty `[coupa.rate_limit]` is Coupa's rate with a burst four
    /// under Coupa's own 20 (the slack network jitter needs; docs/performance.md, What
    /// integrations feel).
    #[test]
    fn rate_limit_defaults_keep_slack_under_coupas_burst() {
        let config = load(&format!("{MINIMAL}\n[coupa.rate_limit]\n")).unwrap();
        let limit = config.coupa.rate_limit.expect("the table turns shaping on");
        assert_eq!(
            (limit.per_second, limit.burst, limit.max_queue),
            (25.0, 16, 100)
        );
        assert!(config.summary().contains("25/s, burst 16, queue 100"));
    }

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

    #[test]
    fn an_integrations_share_of_the_budget_is_checked() {
        let integration = |extra: &str| {
            format!(
                "\n[[integration]]\nname = \"batch\"\napi_key_sha256 = \"{}\"\n{extra}\n",
                "1".repeat(64)
            )
        };
        let shaped = |extra: &str| {
            format!(
                "{MINIMAL}\n[coupa.rate_limit]\nper_second = 25.0\n{}",
                integration(extra)
            )
        };
        let config = load(&shaped("weight = 3\nmax_queue = 500\nmax_per_second = 10")).unwrap();
        let rate = config.integrations[0].rate;
        assert_eq!(
            (rate.weight, rate.max_queue, rate.max_per_second),
            (3, Some(500), Some(10.0))
        );
        // `check` shows the integration's share.
        assert!(
            config
                .summary()
                .contains("rate weight 3, max_queue 500, max_per_second 10"),
            "{}",
            config.summary()
        );
        assert_eq!(
            load(&shaped("")).unwrap().integrations[0].rate,
            crate::config::RatePolicy::default()
        );
        let cases: [(String, &[&str]); 4] = [
            (
                shaped("weight = 0"),
                &["integration[0].weight", "at least 1"],
            ),
            (
                shaped("max_per_second = -1.0"),
                &["integration[0].max_per_second", "positive"],
            ),
            (
                format!("{MINIMAL}{}", integration("weight = 2")),
                &["integration[0].weight", "[coupa.rate_limit]"],
            ),
            (
                format!("{MINIMAL}{}", integration("max_per_second = 5.0")),
                &["integration[0].max_per_second", "[coupa.rate_limit]"],
            ),
        ];
        for (text, fragments) in cases {
            let err = load(&text).unwrap_err().to_string();
            for fragment in fragments {
                assert!(err.contains(fragment), "{err}");
            }
        }
    }

    #[test]
    fn an_otlp_endpoint_gets_the_traces_path_and_bad_ones_name_the_key() {
        let with =
            |endpoint: &str| format!("{MINIMAL}\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
        for (endpoint, url) in [
            (
                "http://otel-collector:4318",
                "http://otel-collector:4318/v1/traces",
            ),
            (
                "https://collector.example/otlp/",
                "https://collector.example/otlp/v1/traces",
            ),
        ] {
            let config = load(&with(endpoint)).unwrap();
            assert_eq!(config.telemetry.otlp_traces_url.unwrap().as_str(), url);
        }
        assert!(load(MINIMAL).unwrap().telemetry.otlp_traces_url.is_none());
        for bad in [
            "otel-collector:4318",
            "grpc://127.0.0.1:4317",
            "http://127.0.0.1:4318/?x=1",
            "http://user:pw@127.0.0.1:4318",
        ] {
            let err = error_of(&with(bad));
            assert!(err.starts_with("telemetry.otlp_endpoint:"), "{bad}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }
}
