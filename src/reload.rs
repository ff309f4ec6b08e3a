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
use crate::config::{Config, SecretSource};
use crate::proxy::Proxy;
use crate::tls::ReloadingCert;
use crate::token::client::ClientParams;
use crate::token::TokenStore;

/// What identifies a file's version without reading it.
type Stamp = Option<(SystemTime, u64)>;

pub struct Reloader {
    pub path: PathBuf,
    /// The configuration the process started with: the reference for what
    /// needs a restart.
    pub startup: Config,
    /// Each credential's token request parameters and token store, in
    /// `startup.credentials` order.
    pub credentials: Vec<(Arc<ArcSwap<ClientParams>>, Arc<TokenStore>)>,
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
            self.reload_cert();
            if let Some(applied) = self.reload() {
                current_files = applied;
            }
            stamps = self.stamps(&current_files);
        }
    }

    /// Modification time and size of the config, secret and certificate
    /// files.
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
        std::iter::once(self.path.as_path())
            .chain(secret_files)
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
            } else {
                info!(credential = %credential.name, "client secret changed; the next token fetch uses it");
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

/// Summary keys whose values differ, other than the ones reload applies.
fn changed_keys(running: &Config, new: &Config) -> Vec<String> {
    let live = |key: &str| {
        key.starts_with("integration")
            || [
                ".client_secret",
                ".client_id",
                ".scopes",
                ".token_url",
                ".client_auth",
            ]
            .iter()
            .any(|suffix| key.ends_with(suffix))
    };
    let old_rows = running.summary_rows();
    let new_rows = new.summary_rows();
    let mut keys: Vec<String> = new_rows
        .iter()
        .filter(|row| !live(&row.0) && !old_rows.contains(row))
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(
        old_rows
            .iter()
            .filter(|(key, _)| !live(key) && !new_rows.iter().any(|(k, _)| k == key))
            .map(|(key, _)| key.clone()),
    );
    keys
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
}
