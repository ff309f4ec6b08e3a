//! `check` (the configuration, and with `--live` a token and one API call
//! per credential) and `hash-key`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use super::{config_failure, Failure};
use crate::config::Config;
use crate::tls;
use crate::token::{CredentialSource, TokenStore};

pub fn check(path: &Path, live_path: Option<&str>) -> Result<(), Failure> {
    let config = Config::load(path).map_err(config_failure)?;
    let tls = tls::client_config(&config.coupa.extra_roots).map_err(config_failure)?;
    println!("{}: configuration is valid\n", path.display());
    print!("{}", config.summary());
    for warning in config.warnings_with_env() {
        println!("warning: {warning}");
    }
    // `run` refuses to start without a consent on file; so does `check`.
    for credential in &config.credentials {
        if credential.oauth.grant.consent().is_none() {
            continue;
        }
        if config.cluster.is_some() {
            println!(
                "credential {}: consent kept in the cluster state (Redis); not checked offline",
                credential.name
            );
            continue;
        }
        let store = Arc::new(TokenStore::new());
        CredentialSource::new(credential, tls.clone(), Some(path), store.clone(), None)
            .map_err(config_failure)?;
        if let Some(info) = store.status().refresh_token {
            let now = std::time::SystemTime::now();
            println!(
                "credential {}: consent on file; refresh token valid for about {} more days",
                credential.name,
                info.remaining(now).as_secs() / 86_400
            );
            if let Some(warning) = info.warning(now) {
                println!("warning: credential {}: {warning}", credential.name);
            }
        }
    }
    let Some(live_path) = live_path else {
        return Ok(());
    };
    println!("\nlive check against {}:", config.coupa.base_url);
    let runtime = super::current_thread_runtime()?;
    let reports = runtime.block_on(crate::live::check(&config, Some(path), live_path));
    for report in &reports {
        print!("{}", report.text);
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        println!("live check passed");
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            error: anyhow::anyhow!("live check failed for {failed} credential(s); see above"),
        })
    }
}

pub fn hash_key() -> Result<(), Failure> {
    let mut key = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)
        .context("cannot read the key from stdin")?;
    // `echo KEY | …` and files end with a newline that is not part of the key.
    let key = key.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        return Err(config_failure(anyhow::anyhow!(
            "no key on stdin: pipe the legacy API key (or the local client secret) in, e.g. `printf %s \"$KEY\" | coupa-auth-proxy hash-key`"
        )));
    }
    println!("{}", crate::proxy::auth::hash_key(key));
    Ok(())
}

/// `config schema`: the configuration file's JSON Schema on stdout.
pub fn config_schema() -> Result<(), Failure> {
    println!("{}", crate::config::schema_text());
    Ok(())
}

/// `config reference`: the configuration reference page on stdout.
pub fn config_reference() -> Result<(), Failure> {
    print!("{}", crate::config::reference_markdown());
    Ok(())
}
