//! `[[integration]]`: who may call, by legacy key or local OAuth client,
//! and with which credential's token.

use super::super::file::*;
use super::super::*;
use crate::encode::parse_sha256;
use http::HeaderValue;

/// `max_concurrent` when not set: with several integrations, half of
/// `coupa.max_connections`, so one integration's burst always leaves the
/// other half to the rest; a lone integration has nobody to leave room for.
fn default_max_concurrent(integrations: usize, max_connections: usize) -> usize {
    if integrations <= 1 {
        max_connections
    } else {
        max_connections.div_ceil(2)
    }
}

pub(super) fn validate_integrations(
    files: Vec<IntegrationFile>,
    credentials: &[Credential],
    max_connections: usize,
    rate_limit: Option<&RateLimit>,
) -> Result<Vec<Integration>, ConfigError> {
    let count = files.len();
    let mut integrations: Vec<Integration> = Vec::with_capacity(count);
    for (i, file) in files.into_iter().enumerate() {
        let IntegrationFile {
            name,
            api_key_sha256,
            oauth_client_id,
            oauth_client_secret_sha256,
            credential,
            max_concurrent,
            accept,
            weight,
            max_queue,
            max_per_second,
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
        let local_client = local_client(&key, oauth_client_id, oauth_client_secret_sha256)?;
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
        if max_concurrent == Some(0) {
            return Err(invalid(
                format!("{key}.max_concurrent"),
                "must be positive (requests of this integration at Coupa at once)",
            ));
        }
        let accept = accept
            .map(|accept| media_type(&format!("{key}.accept"), &accept))
            .transpose()?;
        let rate = rate_policy(&key, weight, max_queue, max_per_second, rate_limit)?;
        integrations.push(Integration {
            rate,
            accept,
            name,
            api_key_sha256: hash,
            local_client,
            credential: credential_index,
            max_concurrent: max_concurrent
                .unwrap_or_else(|| default_max_concurrent(count, max_connections)),
        });
    }
    Ok(integrations)
}

/// `weight`, `max_queue` and `max_per_second`: only with a
/// `[coupa.rate_limit]` to share out.
fn rate_policy(
    key: &str,
    weight: Option<u32>,
    max_queue: Option<usize>,
    max_per_second: Option<f64>,
    rate_limit: Option<&RateLimit>,
) -> Result<RatePolicy, ConfigError> {
    let given = [
        ("weight", weight.is_some()),
        ("max_queue", max_queue.is_some()),
        ("max_per_second", max_per_second.is_some()),
    ];
    if rate_limit.is_none() {
        if let Some((name, _)) = given.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("{key}.{name}"),
                "shares out Coupa's budget, so it needs a [coupa.rate_limit] table",
            ));
        }
    }
    if weight == Some(0) {
        return Err(invalid(
            format!("{key}.weight"),
            "must be at least 1 (slots per turn while other integrations wait too)",
        ));
    }
    if let Some(ceiling) = max_per_second {
        if !(ceiling.is_finite() && ceiling > 0.0) {
            return Err(invalid(
                format!("{key}.max_per_second"),
                format!("must be a positive number, got {ceiling}"),
            ));
        }
    }
    Ok(RatePolicy {
        weight: weight.unwrap_or(1),
        max_queue,
        max_per_second,
    })
}

/// An `Accept` value naming a media type (`type/subtype`, parameters and
/// several ranges allowed), as `coupa.accept` and `[[integration]] accept`
/// take it.
pub(in crate::config) fn media_type(key: &str, value: &str) -> Result<HeaderValue, ConfigError> {
    let value = value.trim();
    let first = value
        .split(',')
        .next()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let (kind, subtype) = first.split_once('/').unwrap_or(("", ""));
    if kind.is_empty() || subtype.is_empty() {
        return Err(invalid(
            key,
            format!("must be a media type such as \"application/xml\" or \"application/json\", got {value:?}"),
        ));
    }
    HeaderValue::from_str(value)
        .map_err(|_| invalid(key, "must be a valid header value (visible ASCII)"))
}

/// A tool that fetches its own token from the proxy: its client id and the
/// SHA-256 of its secret, both or neither.
fn local_client(
    key: &str,
    client_id: Option<String>,
    secret_sha256: Option<String>,
) -> Result<Option<LocalClient>, ConfigError> {
    Ok(match (client_id, secret_sha256) {
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
    })
}
