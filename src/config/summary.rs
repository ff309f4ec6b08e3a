//! The redacted summary `check` prints: one row per key, table by table,
//! secrets shown only as where they come from.

use std::time::Duration;

use super::{
    Admin, ClientAuth, Config, Coupa, Credential, Grant, Insight, Listen, OAuth, RatePolicy,
    Runtime, RuntimeFlavor, SecretSource, Telemetry, DEFAULT_CREDENTIAL,
};

impl Config {
    /// A human-readable summary with every secret redacted, for `check`.
    pub fn summary(&self) -> String {
        self.summary_rows()
            .iter()
            .map(|(key, value)| format!("{key:<31}{value}\n"))
            .collect()
    }

    /// The summary as (key, value) rows, table by table, in the order
    /// `check` prints them.
    pub fn summary_rows(&self) -> Vec<(String, String)> {
        // Every field named (no `..`): a new key does not compile without a
        // row here.
        let Config {
            listen: _,
            coupa: _,
            credentials: _,
            integrations: _,
            admin:
                Admin {
                    address: _,
                    status_password_sha256: _,
                },
            watch_interval: _,
            runtime:
                Runtime {
                    flavor: _,
                    worker_threads: _,
                },
            cluster: _,
            insight: Insight { idle_warning: _ },
            telemetry:
                Telemetry {
                    otlp_traces_url: _,
                    refused_lines_per_second: _,
                },
        } = self;
        let mut rows = self.listen_rows();
        rows.extend(self.coupa_rows());
        for credential in &self.credentials {
            rows.extend(self.credential_rows(credential));
        }
        rows.extend(self.integration_rows());
        rows.push(("insight.idle_warning".into(), d(self.insight.idle_warning)));
        rows.push(("admin.address".into(), self.admin.address.to_string()));
        rows.push((
            "admin.status_password_sha256".into(),
            if self.admin.status_password_sha256.is_some() {
                "set: off loopback the status page asks for it (HTTP Basic)".into()
            } else {
                "not set: off loopback the status page is closed".into()
            },
        ));
        rows.push((
            "reload.watch_interval".into(),
            self.watch_interval
                .map(d)
                .unwrap_or_else(|| "off (SIGHUP only)".into()),
        ));
        rows.extend(self.cluster_rows());
        rows.push(("runtime.flavor".into(), self.runtime_flavor()));
        rows.push((
            "telemetry.otlp_endpoint".into(),
            self.telemetry
                .otlp_traces_url
                .as_ref()
                .map(|url| format!("spans posted to {url}"))
                .unwrap_or_else(|| "not set: no traces".into()),
        ));
        rows.push((
            "telemetry.refused_lines_per_second".into(),
            match self.telemetry.refused_lines_per_second {
                Some(rate) => format!(
                    "{rate}/s: access lines of refused requests past it are left out (counted)"
                ),
                None => "0: every access line is written".into(),
            },
        ));
        rows
    }

    /// The prefix of a credential's keys: `oauth` for the one default
    /// credential, else `oauth.<name>`.
    pub fn credential_key_prefix(&self, name: &str) -> String {
        if self.credentials.len() == 1 && name == DEFAULT_CREDENTIAL {
            "oauth".to_owned()
        } else {
            format!("oauth.{name}")
        }
    }

    fn listen_rows(&self) -> Vec<(String, String)> {
        let l = &self.listen;
        // Every field named (no `..`): a new key does not compile
        // without a row here.
        let Listen {
            address: _,
            shutdown_grace: _,
            drain_delay: _,
            header_read_timeout: _,
            keepalive_timeout: _,
            max_header_bytes: _,
            max_connections: _,
            release_idle_buffers_above: _,
            body_read_timeout: _,
            min_body_rate: _,
            min_rate_grace: _,
            max_body_time: _,
            min_response_rate: _,
            allow_unauthenticated: _,
            tls: _,
            intercept: _,
        } = l;
        vec![
            ("listen.address".into(), l.address.to_string()),
            ("listen.shutdown_grace".into(), d(l.shutdown_grace)),
            ("listen.drain_delay".into(), d(l.drain_delay)),
            (
                "listen.header_read_timeout".into(),
                d(l.header_read_timeout),
            ),
            (
                "listen.max_header_bytes".into(),
                l.max_header_bytes.to_string(),
            ),
            (
                "listen.max_connections".into(),
                l.max_connections.to_string(),
            ),
            (
                "listen.release_idle_buffers_above".into(),
                l.release_idle_buffers_above.to_string(),
            ),
            ("listen.keepalive_timeout".into(), d(l.keepalive_timeout)),
            ("listen.body_read_timeout".into(), d(l.body_read_timeout)),
            (
                "listen.min_body_rate".into(),
                match l.min_body_rate {
                    0 => "off".to_owned(),
                    rate => format!("{rate} bytes/s after {}", d(l.min_rate_grace)),
                },
            ),
            ("listen.max_body_time".into(), d(l.max_body_time)),
            (
                "listen.min_response_rate".into(),
                match l.min_response_rate {
                    0 => "off".to_owned(),
                    rate => format!("{rate} bytes/s after {}", d(l.min_rate_grace)),
                },
            ),
            (
                "listen.allow_unauthenticated".into(),
                l.allow_unauthenticated.to_string(),
            ),
            (
                "listen.intercept".into(),
                match &l.intercept {
                    None => "off (CONNECT is refused with 405)".into(),
                    Some(i) => format!(
                        "CONNECT to the instance only, CA {} (key {}, contents never shown)",
                        i.ca_cert_file.display(),
                        i.ca_key_file.display()
                    ),
                },
            ),
            (
                "listen.tls".into(),
                match &l.tls {
                    None => "off (plain HTTP)".into(),
                    Some(t) => format!(
                        "cert {}, key {}, client certificates {}",
                        t.cert_file.display(),
                        t.key_file.display(),
                        t.client_ca_file
                            .as_ref()
                            .map(|p| format!("required ({})", p.display()))
                            .unwrap_or_else(|| "not required".into())
                    ),
                },
            ),
        ]
    }

    fn coupa_rows(&self) -> Vec<(String, String)> {
        let c = &self.coupa;
        // Every field named (no `..`): a new key does not compile
        // without a row here.
        let Coupa {
            base_url: _,
            scheme: _,
            authority: _,
            path_prefix: _,
            ca_file: _,
            extra_roots: _,
            accept: _,
            connect_timeout: _,
            pool_idle_timeout: _,
            keep_warm: _,
            response_header_timeout: _,
            idle_timeout: _,
            replay_body_limit: _,
            response_buffer: _,
            response_spool_limit: _,
            spool_dir: _,
            http_version: _,
            max_connections: _,
            connection_wait_timeout: _,
            token_wait_timeout: _,
            resend_429_within: _,
            rate_limit: _,
            egress_proxy: _,
        } = c;
        let ca = c
            .ca_file
            .as_ref()
            .map(|p| format!("{} ({} certificates)", p.display(), c.extra_roots.len()))
            .unwrap_or_else(|| "none (public roots only)".to_owned());
        let rate = c
            .rate_limit
            .map(|r| {
                format!(
                    "{}/s, burst {}, queue {}",
                    r.per_second, r.burst, r.max_queue
                )
            })
            .unwrap_or_else(|| "off".to_owned());
        vec![
            ("coupa.base_url".into(), c.base_url.clone()),
            ("coupa.ca_file".into(), ca),
            (
                "coupa.accept".into(),
                c.accept.to_str().unwrap_or("?").to_owned(),
            ),
            ("coupa.connect_timeout".into(), d(c.connect_timeout)),
            (
                "coupa.response_header_timeout".into(),
                d(c.response_header_timeout),
            ),
            ("coupa.idle_timeout".into(), d(c.idle_timeout)),
            ("coupa.pool_idle_timeout".into(), d(c.pool_idle_timeout)),
            ("coupa.keep_warm".into(), c.keep_warm.to_string()),
            (
                "coupa.replay_body_limit".into(),
                format!("{} bytes", c.replay_body_limit),
            ),
            (
                "coupa.response_buffer".into(),
                match c.response_buffer {
                    0 => "off (answers stream at the client's pace)".to_owned(),
                    bytes => format!("{bytes} bytes in memory per answer"),
                },
            ),
            (
                "coupa.response_spool_limit".into(),
                match c.response_spool_limit {
                    0 => "off (no temp files)".to_owned(),
                    bytes => format!("{bytes} bytes per answer in {}", c.spool_dir.display()),
                },
            ),
            ("coupa.http_version".into(), c.http_version.as_str().into()),
            (
                "coupa.max_connections".into(),
                format!("{} (HTTP/1.1)", c.max_connections),
            ),
            (
                "coupa.connection_wait_timeout".into(),
                d(c.connection_wait_timeout),
            ),
            ("coupa.token_wait_timeout".into(), d(c.token_wait_timeout)),
            ("coupa.resend_429_within".into(), d(c.resend_429_within)),
            ("coupa.rate_limit".into(), rate),
            (
                "coupa.egress_proxy".into(),
                match &c.egress_proxy {
                    None => {
                        "none: connections to Coupa go direct (HTTP_PROXY/HTTPS_PROXY are ignored)"
                            .into()
                    }
                    Some(p) => format!(
                        "{}{}, both hops tunnelled with CONNECT",
                        p.url,
                        p.username
                            .as_ref()
                            .map(|u| format!(" as {u} (password <redacted>)"))
                            .unwrap_or_default()
                    ),
                },
            ),
        ]
    }

    fn credential_rows(&self, credential: &Credential) -> Vec<(String, String)> {
        let o = &credential.oauth;
        // Every field named (no `..`): a new key does not compile
        // without a row here.
        let OAuth {
            egress_proxy: _,
            client_id: _,
            client_secret: _,
            secret_source: _,
            scopes: _,
            token_url: _,
            client_auth: _,
            refresh_fraction: _,
            activation_delay: _,
            retry_initial: _,
            retry_max: _,
            request_timeout: _,
            rejected_token_cooldown: _,
            grant: _,
        } = o;
        let prefix = self.credential_key_prefix(&credential.name);
        let renew_after = Duration::from_secs((86_400.0_f64 * o.refresh_fraction).round() as u64);
        let mut rows = vec![
            (format!("{prefix}.client_id"), o.client_id.clone()),
            (
                format!("{prefix}.client_secret"),
                match o.secret_source {
                    SecretSource::None => "(none: public client, PKCE only)".to_owned(),
                    ref source => format!("<redacted> (from {source})"),
                },
            ),
            (
                format!("{prefix}.grant"),
                o.grant.kind().as_str().to_owned(),
            ),
            (format!("{prefix}.scopes"), o.scopes.join(" ")),
            (format!("{prefix}.token_url"), o.token_url.clone()),
            (
                format!("{prefix}.client_auth"),
                match o.client_auth {
                    ClientAuth::Body => "body",
                    ClientAuth::Basic => "basic",
                }
                .to_owned(),
            ),
            (
                format!("{prefix}.refresh_fraction"),
                format!(
                    "{} (renew after {} of a 24 h token)",
                    o.refresh_fraction,
                    d(renew_after)
                ),
            ),
            (format!("{prefix}.activation_delay"), d(o.activation_delay)),
            (
                format!("{prefix}.retry"),
                format!("{} .. {}", d(o.retry_initial), d(o.retry_max)),
            ),
            (
                format!("{prefix}.rejected_token_cooldown"),
                d(o.rejected_token_cooldown),
            ),
            (format!("{prefix}.request_timeout"), d(o.request_timeout)),
        ];
        match &o.grant {
            Grant::ClientCredentials => {}
            Grant::AuthorizationCode {
                authorize_url,
                redirect_uri,
                ..
            } => rows.extend([
                (format!("{prefix}.authorize_url"), authorize_url.clone()),
                (format!("{prefix}.redirect_uri"), redirect_uri.to_string()),
            ]),
            Grant::DeviceCode {
                device_authorization_url,
                ..
            } => rows.push((
                format!("{prefix}.device_authorization_url"),
                device_authorization_url.clone(),
            )),
        }
        if let Some(consent) = o.grant.consent() {
            rows.extend([
                (
                    format!("{prefix}.state_file"),
                    consent.state_file.display().to_string(),
                ),
                (
                    format!("{prefix}.refresh_token_lifetime"),
                    d(consent.refresh_token_lifetime),
                ),
            ]);
        }
        rows
    }

    fn integration_rows(&self) -> Vec<(String, String)> {
        if self.integrations.is_empty() {
            return vec![(
                "integration".into(),
                "none: every client gets the default credential's token".into(),
            )];
        }
        self.integrations
            .iter()
            .map(|integration| {
                (
                    format!("integration {:?}", integration.name),
                    format!(
                        "credential {}, max_concurrent {}, Accept when it sends none: {}{}{}{}",
                        self.credentials[integration.credential].name,
                        integration.max_concurrent,
                        match &integration.accept {
                            Some(accept) => accept.to_str().unwrap_or("?").to_owned(),
                            None => format!(
                                "{} (coupa.accept)",
                                self.coupa.accept.to_str().unwrap_or("?")
                            ),
                        },
                        if integration.api_key_sha256.is_some() {
                            ", legacy key (hash <redacted>)"
                        } else {
                            ""
                        },
                        match &integration.local_client {
                            Some(client) => format!(
                                ", local OAuth client {:?} (secret hash <redacted>)",
                                client.client_id
                            ),
                            None => String::new(),
                        },
                        self.rate_share_text(&integration.rate),
                    ),
                )
            })
            .collect()
    }

    /// An integration's place in the rate limit's queues, when shaped.
    fn rate_share_text(&self, rate: &RatePolicy) -> String {
        let Some(limit) = &self.coupa.rate_limit else {
            return String::new();
        };
        let mut text = format!(
            ", rate weight {}, max_queue {}",
            rate.weight,
            rate.max_queue.unwrap_or(limit.max_queue)
        );
        if let Some(ceiling) = rate.max_per_second {
            text.push_str(&format!(", max_per_second {ceiling}"));
        }
        text
    }

    fn cluster_rows(&self) -> Vec<(String, String)> {
        match &self.cluster {
            None => vec![(
                "cluster".into(),
                "off: this process keeps its own token and rate budget".into(),
            )],
            Some(cluster) => vec![
                (
                    "cluster.redis_url".into(),
                    format!(
                        "{}{}",
                        cluster.redis_url,
                        if cluster.password.is_some() {
                            " (password <redacted>)"
                        } else {
                            ""
                        }
                    ),
                ),
                ("cluster.key_prefix".into(), cluster.key_prefix.clone()),
                (
                    "cluster.encryption_key_file".into(),
                    format!(
                        "<redacted> (from {})",
                        cluster.encryption_key_file.display()
                    ),
                ),
                (
                    "cluster.fallback_share".into(),
                    cluster.fallback_share.to_string(),
                ),
            ],
        }
    }

    fn runtime_flavor(&self) -> String {
        match (self.runtime.flavor, self.runtime.worker_threads) {
            (RuntimeFlavor::Auto, _) => {
                "auto (current_thread on one usable CPU, else multi_thread)".into()
            }
            (RuntimeFlavor::CurrentThread, _) => "current_thread".into(),
            (RuntimeFlavor::MultiThread, Some(n)) => format!("multi_thread, {n} workers"),
            (RuntimeFlavor::MultiThread, None) => "multi_thread, a worker per CPU".into(),
        }
    }
}

fn d(v: Duration) -> String {
    humantime::format_duration(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn summary_redacts_secret() {
        let config = load(MINIMAL).unwrap();
        let summary = config.summary();
        assert!(!summary.contains("s3cr3t-value"));
        assert!(summary.contains("redacted"));
        assert!(!format!("{config:?}").contains("s3cr3t-value"));
    }
}
