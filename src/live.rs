//! `check --live`: proves a configuration against the real instance: a
//! token from each credential, then one cheap API call with it, and for
//! each failure the likely cause and the fix.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::{Config, Credential};
use crate::token::client::error_chain;
use crate::token::refresher::TokenSource;
use crate::token::{CredentialSource, TokenStore};

/// Coupa's cheapest call: one department, only its id fields.
pub const DEFAULT_LIVE_PATH: &str = "/api/departments?return_object=limited&limit=1";

/// The outcome of one credential's check.
pub struct CredentialReport {
    pub text: String,
    pub ok: bool,
}

/// Checks every credential; the report is human-readable.
pub async fn check(
    config: &Config,
    config_path: Option<&std::path::Path>,
    path: &str,
) -> Vec<CredentialReport> {
    let mut reports = Vec::new();
    for credential in &config.credentials {
        reports.push(check_credential(config, config_path, credential, path).await);
    }
    reports
}

async fn check_credential(
    config: &Config,
    config_path: Option<&std::path::Path>,
    credential: &Credential,
    path: &str,
) -> CredentialReport {
    let mut text = format!(
        "credential {} (client_id {})\n",
        credential.name, credential.oauth.client_id
    );
    let tls = match crate::tls::client_config(&config.coupa.extra_roots) {
        Ok(tls) => tls,
        Err(err) => return failed(text, format!("  tls         FAILED: {err}\n")),
    };
    // A user-consented credential renews from its state file, as `run` would.
    let store = std::sync::Arc::new(TokenStore::new());
    let client = match CredentialSource::new(credential, tls.clone(), config_path, store, None) {
        Ok(client) => client,
        Err(err) => return failed(text, format!("  token       FAILED: {err}\n")),
    };
    let token = match client.fetch().await {
        Ok(token) => token,
        Err(err) => return failed(text, format!("  token       FAILED: {}\n", err.explain())),
    };
    let _ = writeln!(
        text,
        "  token       ok: expires in {}, granted scopes: {}",
        humantime::format_duration(token.expires_in),
        token.scope.as_deref().unwrap_or("(not stated)")
    );
    // Coupa asks for a moment between issuing a token and using it.
    tokio::time::sleep(credential.oauth.activation_delay).await;

    let url = format!("{}{}", config.coupa.base_url, path);
    let http = match crate::egress::reqwest_builder(config.coupa.egress_proxy.as_ref())
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            return failed(
                text,
                format!("  api call    FAILED: {}\n", error_chain(&err)),
            )
        }
    };
    let response = http
        .get(&url)
        .bearer_auth(token.access_token.expose())
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await;
    match response {
        Ok(r) if r.status().is_success() => {
            let _ = writeln!(text, "  api call    ok: GET {path} -> {}", r.status());
            CredentialReport { text, ok: true }
        }
        Ok(r) => {
            let status = r.status();
            let fix = match status.as_u16() {
                401 => "Coupa rejected the fresh token: check that coupa.base_url and oauth.token_url name the same instance",
                403 => "the client lacks the scope for this object: assign it in Coupa and add it to oauth.scopes (or use --live-path for an object it may read)",
                404 => "no such API at this URL: check coupa.base_url (https://<instance>.coupahost.com, no path)",
                429 => "Coupa's rate limit: try again in a moment",
                _ => "Coupa answered with an error: see the status",
            };
            failed(text, format!("  api call    FAILED: GET {path} -> {status}; fix: {fix}\n"))
        }
        Err(err) => failed(
            text,
            format!(
                "  api call    FAILED: {}; fix: check that coupa.base_url names a reachable instance and that its certificate is trusted (coupa.ca_file)\n",
                error_chain(&err)
            ),
        ),
    }
}

fn failed(mut text: String, line: String) -> CredentialReport {
    text.push_str(&line);
    CredentialReport { text, ok: false }
}
