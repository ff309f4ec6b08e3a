//! `authorize` (a user's one-time consent) and `token` (one access token
//! on stdout).

use std::path::Path;
use std::sync::Arc;

use super::{choose_credential, config_failure, current_thread_runtime, Failure};
use crate::background::Background;
use crate::cluster::{Cluster, ClusterMetrics};
use crate::config::Config;
use crate::tls;
use crate::token::consent::authorize::AuthorizeError;
use crate::token::consent::SharedConsent;
use crate::token::refresher::TokenSource;
use crate::token::{CredentialSource, TokenClient, TokenRequest, TokenStore};

pub fn authorize(
    path: &Path,
    credential: Option<&str>,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    let config = Config::load(path).map_err(config_failure)?;
    let chosen = choose_credential(&config, credential)?;
    let tls = tls::client_config(&config.coupa.extra_roots).map_err(config_failure)?;
    let state = current_thread_runtime()?.block_on(async {
        let shared = match &config.cluster {
            Some(settings) => Some(SharedConsent::new(
                cli_cluster(settings, &config)?,
                &chosen.oauth,
            )),
            None => None,
        };
        crate::token::consent::authorize::authorize(chosen, tls, timeout, shared)
            .await
            .map_err(|e| match e {
                AuthorizeError::NotAUserGrant(_) => config_failure(e),
                other => other.into(),
            })
    })?;
    let consent = chosen.oauth.grant.consent();
    let refresh_until = consent.map(|c| state.refresh_token_issued_at + c.refresh_token_lifetime);
    let stored_in = match (&config.cluster, consent) {
        (Some(cluster), _) => format!("the cluster state ({}, sealed)", cluster.redis_url),
        (None, Some(c)) => format!("{} (mode 0600)", c.state_file.display()),
        (None, None) => String::new(),
    };
    eprintln!(
        "credential {}: consent stored in {stored_in}; granted scopes: {}",
        chosen.name, state.scope
    );
    if let Some(until) = refresh_until {
        eprintln!(
            "the refresh token lasts until about {}; `run` renews from it, and a running proxy \
             picks the new consent up at its next renewal",
            humantime::format_rfc3339_seconds(until)
        );
    }
    Ok(())
}

/// The cluster state for a one-shot subcommand (`authorize`, `token`).
/// Must be called inside the runtime.
fn cli_cluster(
    settings: &crate::config::Cluster,
    config: &Config,
) -> Result<Arc<Cluster>, Failure> {
    Cluster::start(
        settings,
        &config.coupa.base_url,
        ClusterMetrics::default(),
        &Background::new(),
    )
    .map_err(config_failure)
}

pub fn token(path: &Path, credential: Option<&str>, json: bool) -> Result<(), Failure> {
    let config = Config::load(path).map_err(config_failure)?;
    let chosen = choose_credential(&config, credential)?;
    let tls = tls::client_config(&config.coupa.extra_roots).map_err(config_failure)?;
    let runtime = current_thread_runtime()?;
    let (token, response) = if chosen.oauth.grant.consent().is_none() {
        let client = TokenClient::new(&chosen.oauth, tls)?;
        runtime
            .block_on(client.request(TokenRequest::ClientCredentials))
            .map(|(token, response)| (token, Some(response)))
    } else {
        // Renews from the state file (or the cluster state) like `run`,
        // persisting a rotated refresh token, so the proxies keep working.
        runtime.block_on(async {
            let cluster = match &config.cluster {
                Some(settings) => Some(cli_cluster(settings, &config)?),
                None => None,
            };
            let source = CredentialSource::new(
                chosen,
                tls,
                Some(path),
                Arc::new(TokenStore::new()),
                cluster.as_ref(),
            )
            .map_err(config_failure)?;
            Ok::<_, Failure>(source.fetch().await.map(|token| (token, None)))
        })?
    }
    .map_err(|e| anyhow::anyhow!("{}", e.explain()))?;
    // stdout carries the credential alone, so `$(coupa-auth-proxy token …)` works.
    match (json, response) {
        (true, Some(response)) => println!("{}", response.expose().trim()),
        (true, None) => println!(
            "{}",
            serde_json::json!({
                "access_token": token.access_token.expose(),
                "token_type": "bearer",
                "expires_in": token.expires_in.as_secs(),
                "scope": token.scope,
            })
        ),
        (false, _) => println!("{}", token.access_token.expose()),
    }
    let expires_at = std::time::SystemTime::now() + token.expires_in;
    eprintln!(
        "credential {}: token expires in {} (at {}); scopes: {}",
        chosen.name,
        humantime::format_duration(token.expires_in),
        humantime::format_rfc3339_seconds(expires_at),
        token.scope.as_deref().unwrap_or("(not stated)")
    );
    eprintln!("warning: the printed token is a credential; do not paste it into tickets or logs");
    Ok(())
}
