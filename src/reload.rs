//! Live reload: on SIGHUP, or when the config file or a client secret file
//! changes on disk, the file is read and validated again and what can
//! change safely under traffic is applied at once:
//! - client secrets (used from each credential's next token fetch),
//! - a credential's `client_id`, `scopes`, `token_url`, `client_auth`: a
//!   new token is fetched at once, and the current one serves until the new
//!   one is active (scopes are part of the token request, so a token script
//!   would break here; the proxy does not),
//! - the `[[integration]]` list with its key hashes,
//! - the inbound TLS certificate.
//!
//! A file that does not validate changes nothing: the running
//! configuration stays and the log says why. Other changes (addresses,
//! timeouts, scopes, credentials added or removed) are named in a warning
//! and take effect after a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::background::Background;
use crate::config::{
    Admin, Cluster, Config, Coupa, Grant, Insight, Listen, OAuth, Runtime, SecretSource, Telemetry,
};
use crate::proxy::Proxy;
use crate::tls::ReloadingCert;
use crate::token::client::ClientParams;
use crate::token::TokenStore;

/// What identifies a file's version without reading it.
type Stamp = Option<(SystemTime, u64)>;

/// What the reloader needs to hand each credential its new parameters.
pub type CredentialHandles = Vec<(Arc<ArcSwap<ClientParams>>, Arc<TokenStore>)>;

pub struct Reloader {
    pub path: PathBuf,
    /// The configuration the process started with: the reference for what
    /// needs a restart.
    pub startup: Config,
    /// Each credential's token request parameters and token store, in
    /// `startup.credentials` order.
    pub credentials: CredentialHandles,
    pub proxy: Proxy,
    /// The inbound TLS certificate, re-read with the rest.
    pub cert: Option<Arc<ReloadingCert>>,
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

impl Reloader {
    /// Starts watching. SIGHUP is claimed before this returns, so from then
    /// on it reloads instead of ending the process.
    pub fn spawn(self, background: &Background) {
        #[cfg(unix)]
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| warn!(error = %e, "cannot listen for SIGHUP; file changes still reload"))
            .ok();
        #[cfg(not(unix))]
        let hangup = None;
        background.spawn(|stop| self.run(hangup, stop));
    }

    #[cfg_attr(not(unix), allow(unused_mut))]
    async fn run(self, mut hangup: Hangup, shutdown: CancellationToken) {
        let watch = self.startup.watch_interval;
        let mut stamps = self.stamps(&self.startup);
        let mut current_files = self.startup.clone();
        loop {
            let sighup = async {
                #[cfg(unix)]
                if let Some(signal) = hangup.as_mut() {
                    signal.recv().await;
                    return;
                }
                std::future::pending::<()>().await
            };
            let tick = async {
                match watch {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sighup => {
                    info!(path = %self.path.display(), "SIGHUP: reloading the configuration");
                }
                _ = tick => {
                    if self.stamps(&current_files) == stamps {
                        continue;
                    }
                    info!(path = %self.path.display(), "configuration or secret file changed: reloading");
                }
            }
            crate::lifecycle::notify::reloading();
            self.reload_cert();
            if let Some(applied) = self.reload() {
                current_files = applied;
            }
            crate::lifecycle::notify::reloaded();
            stamps = self.stamps(&current_files);
        }
    }

    /// Modification time and size of the config, secret (client secrets,
    /// the egress proxy's password) and certificate files.
    fn stamps(&self, config: &Config) -> Vec<Stamp> {
        let stamp = |path: &Path| -> Stamp {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        let secret_files = config
            .credentials
            .iter()
            .filter_map(|c| match &c.oauth.secret_source {
                SecretSource::File(path) => Some(path.as_path()),
                SecretSource::Inline | SecretSource::None => None,
            });
        let egress_password = config
            .coupa
            .egress_proxy
            .as_ref()
            .and_then(|e| e.password_file.as_deref());
        std::iter::once(self.path.as_path())
            .chain(secret_files)
            .chain(egress_password)
            .chain(self.cert.iter().flat_map(|c| c.files()))
            .map(stamp)
            .collect()
    }

    /// New connections get the re-read certificate; open ones keep theirs.
    fn reload_cert(&self) {
        let Some(cert) = &self.cert else { return };
        match cert.reload() {
            Ok(true) => info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(err) => {
                error!(error = %err, "TLS certificate reload failed; the current certificate stays")
            }
        }
    }

    /// Reads, validates and applies; returns the new configuration if it
    /// was applied.
    fn reload(&self) -> Option<Config> {
        let new = match Config::load(&self.path) {
            Ok(config) => config,
            Err(err) => {
                error!(error = %err, "reload failed; the running configuration stays");
                return None;
            }
        };
        let names =
            |c: &Config| -> Vec<String> { c.credentials.iter().map(|c| c.name.clone()).collect() };
        if names(&new) != names(&self.startup) {
            error!(
                running = ?names(&self.startup),
                file = ?names(&new),
                "reload failed: credentials were added or removed, which needs a restart; the running configuration stays"
            );
            return None;
        }

        for (credential, (params, store)) in new.credentials.iter().zip(&self.credentials) {
            let old = params.load_full();
            let fresh = ClientParams::from(&credential.oauth);
            if *old == fresh {
                continue;
            }
            let request_changed = old.client_id != fresh.client_id
                || old.scope != fresh.scope
                || old.url != fresh.url
                || old.auth != fresh.auth;
            if request_changed && credential.oauth.grant.consent().is_some() {
                // A consent fixes client and scopes; a refresh cannot change them.
                warn!(
                    credential = %credential.name,
                    "client_id, scopes or token_url of a user-consented credential changed: run \
                     `coupa-auth-proxy authorize` for this credential, then restart; the running \
                     configuration stays"
                );
                continue;
            }
            params.store(Arc::new(fresh.clone()));
            if request_changed {
                info!(
                    credential = %credential.name,
                    old_scopes = %old.scope,
                    new_scopes = %fresh.scope,
                    client_id_changed = old.client_id != fresh.client_id,
                    token_url_changed = old.url != fresh.url,
                    "token request changed; fetching a new token now, the current one serves until it is active"
                );
                store.renew_soon();
            } else if old.secret != fresh.secret {
                info!(credential = %credential.name, "client secret changed; the next token fetch uses it");
            } else {
                info!(credential = %credential.name, "egress proxy login changed; new connections use it");
            }
        }
        self.proxy.reconfigure(&new);
        info!(
            integrations = new.integrations.len(),
            "configuration reloaded"
        );

        let restart_needed = changed_keys(&self.startup, &new);
        if !restart_needed.is_empty() {
            warn!(
                keys = %restart_needed.join(", "),
                "these changes take effect after a restart"
            );
        }
        Some(new)
    }
}

/// The keys whose values differ between the running and the new
/// configuration and that reload does not apply, compared by value (a CA
/// file's certificates and the cluster's secrets too, which the summary
/// shows only as their source). Named as `check` names them.
fn changed_keys(running: &Config, new: &Config) -> Vec<String> {
    // Every field of the configuration is named below (no `..`): a new
    // key does not compile until it is compared here (needs a restart) or
    // marked live where it is applied.
    let Config {
        listen: _,
        coupa: _,
        credentials: _,
        integrations: _, // live: Proxy::reconfigure
        admin: Admin {
            address: _,
            status_password_sha256: _,
        },
        watch_interval: _,
        runtime: Runtime {
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
    } = running;
    let mut keys = Vec::new();
    let mut differ = |key: &str, same: bool| {
        if !same {
            keys.push(key.to_owned());
        }
    };
    listen_changes(&running.listen, &new.listen, &mut differ);
    coupa_changes(&running.coupa, &new.coupa, &mut differ);
    // Same names in the same order (reload refuses otherwise); the token
    // request (client id and secret, scopes, URL, client auth) is live.
    for (a, b) in running.credentials.iter().zip(&new.credentials) {
        let prefix = running.credential_key_prefix(&a.name);
        credential_changes(&prefix, &a.oauth, &b.oauth, &mut differ);
    }
    differ(
        "insight.idle_warning",
        running.insight.idle_warning == new.insight.idle_warning,
    );
    differ("admin.address", running.admin.address == new.admin.address);
    differ(
        "admin.status_password_sha256",
        running.admin.status_password_sha256 == new.admin.status_password_sha256,
    );
    differ(
        "reload.watch_interval",
        running.watch_interval == new.watch_interval,
    );
    cluster_changes(running.cluster.as_ref(), new.cluster.as_ref(), &mut differ);
    differ("runtime.flavor", running.runtime == new.runtime);
    differ(
        "telemetry.otlp_endpoint",
        running.telemetry == new.telemetry,
    );
    keys
}

fn listen_changes(l: &Listen, m: &Listen, differ: &mut impl FnMut(&str, bool)) {
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
    differ("listen.address", l.address == m.address);
    differ(
        "listen.shutdown_grace",
        l.shutdown_grace == m.shutdown_grace,
    );
    differ("listen.drain_delay", l.drain_delay == m.drain_delay);
    differ(
        "listen.header_read_timeout",
        l.header_read_timeout == m.header_read_timeout,
    );
    differ(
        "listen.keepalive_timeout",
        l.keepalive_timeout == m.keepalive_timeout,
    );
    differ(
        "listen.max_header_bytes",
        l.max_header_bytes == m.max_header_bytes,
    );
    differ(
        "listen.max_connections",
        l.max_connections == m.max_connections,
    );
    differ(
        "listen.release_idle_buffers_above",
        l.release_idle_buffers_above == m.release_idle_buffers_above,
    );
    differ(
        "listen.body_read_timeout",
        l.body_read_timeout == m.body_read_timeout,
    );
    differ(
        "listen.min_body_rate",
        (l.min_body_rate, l.min_rate_grace) == (m.min_body_rate, m.min_rate_grace),
    );
    differ("listen.max_body_time", l.max_body_time == m.max_body_time);
    differ(
        "listen.min_response_rate",
        l.min_response_rate == m.min_response_rate,
    );
    differ(
        "listen.allow_unauthenticated",
        l.allow_unauthenticated == m.allow_unauthenticated,
    );
    // The certificate's contents reload live; where it is read from does not.
    differ("listen.tls", l.tls == m.tls);
    differ("listen.intercept", l.intercept == m.intercept);
}

fn coupa_changes(c: &Coupa, d: &Coupa, differ: &mut impl FnMut(&str, bool)) {
    let Coupa {
        base_url: _,
        scheme: _,      // from base_url
        authority: _,   // from base_url
        path_prefix: _, // from base_url
        ca_file: _,
        extra_roots: _, // from ca_file
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
        egress_proxy: _, // its login is live: UpstreamClient::set_egress
    } = c;
    differ("coupa.base_url", c.base_url == d.base_url);
    differ(
        "coupa.ca_file",
        c.ca_file == d.ca_file && c.extra_roots == d.extra_roots,
    );
    differ("coupa.accept", c.accept == d.accept);
    differ(
        "coupa.connect_timeout",
        c.connect_timeout == d.connect_timeout,
    );
    differ(
        "coupa.response_header_timeout",
        c.response_header_timeout == d.response_header_timeout,
    );
    differ("coupa.idle_timeout", c.idle_timeout == d.idle_timeout);
    differ(
        "coupa.pool_idle_timeout",
        c.pool_idle_timeout == d.pool_idle_timeout,
    );
    differ("coupa.keep_warm", c.keep_warm == d.keep_warm);
    differ(
        "coupa.replay_body_limit",
        c.replay_body_limit == d.replay_body_limit,
    );
    differ(
        "coupa.response_buffer",
        c.response_buffer == d.response_buffer,
    );
    differ(
        "coupa.response_spool_limit",
        (c.response_spool_limit, &c.spool_dir) == (d.response_spool_limit, &d.spool_dir),
    );
    differ("coupa.http_version", c.http_version == d.http_version);
    differ(
        "coupa.max_connections",
        c.max_connections == d.max_connections,
    );
    differ(
        "coupa.connection_wait_timeout",
        c.connection_wait_timeout == d.connection_wait_timeout,
    );
    differ(
        "coupa.token_wait_timeout",
        c.token_wait_timeout == d.token_wait_timeout,
    );
    differ(
        "coupa.resend_429_within",
        c.resend_429_within == d.resend_429_within,
    );
    differ("coupa.rate_limit", c.rate_limit == d.rate_limit);
    // Its password file is re-read and applied live; where it points is not.
    let route = |e: &Option<crate::config::EgressProxy>| {
        e.as_ref()
            .map(|e| (e.url.clone(), e.username.clone(), e.password_file.clone()))
    };
    differ(
        "coupa.egress_proxy",
        route(&c.egress_proxy) == route(&d.egress_proxy),
    );
}

fn credential_changes(prefix: &str, o: &OAuth, p: &OAuth, differ: &mut impl FnMut(&str, bool)) {
    let OAuth {
        egress_proxy: _,  // coupa.egress_proxy's
        client_id: _,     // live: the token request
        client_secret: _, // live
        secret_source: _, // live
        scopes: _,        // live
        token_url: _,     // live
        client_auth: _,   // live
        refresh_fraction: _,
        activation_delay: _,
        retry_initial: _,
        retry_max: _,
        request_timeout: _,
        rejected_token_cooldown: _,
        grant: _,
    } = o;
    let key = |name: &str| format!("{prefix}.{name}");
    differ(&key("grant"), o.grant.kind() == p.grant.kind());
    differ(
        &key("refresh_fraction"),
        o.refresh_fraction == p.refresh_fraction,
    );
    differ(
        &key("activation_delay"),
        o.activation_delay == p.activation_delay,
    );
    differ(
        &key("retry"),
        (o.retry_initial, o.retry_max) == (p.retry_initial, p.retry_max),
    );
    differ(
        &key("rejected_token_cooldown"),
        o.rejected_token_cooldown == p.rejected_token_cooldown,
    );
    // Built into the token client's HTTP client and the request path's
    // wait for a replacement token at start.
    differ(
        &key("request_timeout"),
        o.request_timeout == p.request_timeout,
    );
    match (&o.grant, &p.grant) {
        (
            Grant::AuthorizationCode {
                authorize_url: u,
                redirect_uri: r,
                ..
            },
            Grant::AuthorizationCode {
                authorize_url: v,
                redirect_uri: q,
                ..
            },
        ) => {
            differ(&key("authorize_url"), u == v);
            differ(&key("redirect_uri"), r == q);
        }
        (
            Grant::DeviceCode {
                device_authorization_url: u,
                ..
            },
            Grant::DeviceCode {
                device_authorization_url: v,
                ..
            },
        ) => differ(&key("device_authorization_url"), u == v),
        _ => {}
    }
    if let (Some(x), Some(y)) = (o.grant.consent(), p.grant.consent()) {
        differ(&key("state_file"), x.state_file == y.state_file);
        differ(
            &key("refresh_token_lifetime"),
            x.refresh_token_lifetime == y.refresh_token_lifetime,
        );
    }
}

fn cluster_changes(a: Option<&Cluster>, b: Option<&Cluster>, differ: &mut impl FnMut(&str, bool)) {
    match (a, b) {
        (Some(a), Some(b)) => {
            let Cluster {
                redis_url: _,
                password: _,
                sentinel: _,
                key_prefix: _,
                encryption_key: _,
                encryption_key_file: _,
                fallback_share: _,
            } = a;
            differ(
                "cluster.redis_url",
                (&a.redis_url, &a.password, &a.sentinel)
                    == (&b.redis_url, &b.password, &b.sentinel),
            );
            differ("cluster.key_prefix", a.key_prefix == b.key_prefix);
            differ(
                "cluster.encryption_key_file",
                (&a.encryption_key_file, &a.encryption_key)
                    == (&b.encryption_key_file, &b.encryption_key),
            );
            differ(
                "cluster.fallback_share",
                a.fallback_share == b.fallback_share,
            );
        }
        (a, b) => differ("cluster", a.is_none() == b.is_none()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_listen: &str, secret: &str) -> Config {
        let text = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n{extra_listen}\n[coupa]\nbase_url = \"https://x.example\"\n\
             [oauth]\nclient_id = \"c\"\nclient_secret = \"{secret}\"\nscopes = [\"core.common.read\"]\n"
        );
        Config::from_toml(&text, std::path::Path::new("."), |_| None).unwrap()
    }

    #[test]
    fn restart_needed_names_changed_keys_but_not_secrets() {
        let running = config("", "a");
        assert!(changed_keys(&running, &config("", "b")).is_empty());
        assert_eq!(
            changed_keys(&running, &config("shutdown_grace = \"5s\"", "a")),
            vec!["listen.shutdown_grace".to_owned()]
        );
    }

    /// A bug the exhaustive list above found: `request_timeout` is built
    /// into the token client at start, but a reload changing it applied
    /// nothing and said nothing.
    #[test]
    fn a_changed_request_timeout_needs_a_restart() {
        let running = config("", "a");
        let text = |timeout: &str| {
            format!(
                "[listen]\naddress = \"127.0.0.1:0\"\n[coupa]\nbase_url = \"https://x.example\"\n\
                 [oauth]\nclient_id = \"c\"\nclient_secret = \"a\"\nscopes = [\"core.common.read\"]\n{timeout}"
            )
        };
        let new = Config::from_toml(
            &text("request_timeout = \"5s\"\n"),
            std::path::Path::new("."),
            |_| None,
        )
        .unwrap();
        assert_eq!(
            changed_keys(&running, &new),
            vec!["oauth.request_timeout".to_owned()]
        );
    }

    #[test]
    fn a_changed_collector_needs_a_restart() {
        let running = config("", "a");
        let mut new = config("", "a");
        new.telemetry.otlp_traces_url = url::Url::parse("http://127.0.0.1:4318/v1/traces").ok();
        assert_eq!(
            changed_keys(&running, &new),
            vec!["telemetry.otlp_endpoint".to_owned()]
        );
    }

    #[test]
    fn changes_the_summary_hides_still_need_a_restart() {
        let dir = std::env::temp_dir().join(format!("reload-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("seal.key");
        let with_cluster = |password: &str, key: &str| {
            std::fs::write(&key_file, key).unwrap();
            config(
                &format!(
                    "[cluster]\nredis_url = \"redis://:{password}@127.0.0.1:6379/0\"\n\
                     encryption_key_file = \"{}\"\n",
                    key_file.display()
                ),
                "a",
            )
        };
        let running = with_cluster("one", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=");
        assert_eq!(running.summary(), {
            let other = with_cluster("two", "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=");
            other.summary()
        });
        let new = with_cluster("two", "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=");
        assert_eq!(
            changed_keys(&running, &new),
            vec![
                "cluster.redis_url".to_owned(),
                "cluster.encryption_key_file".to_owned()
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
