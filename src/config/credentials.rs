//! Validation of the `[oauth]` tables: one credential or several, each with
//! its grant and what that grant needs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{self, OAuthFile};
use super::values::{is_loopback, parse_endpoint};
use super::*;
use crate::secret::Secret;

/// One credential's table as written.
struct CredentialTable {
    name: String,
    /// The key errors about this table start with: `oauth` or `oauth.NAME`.
    prefix: String,
    /// Given as `[oauth.NAME]` (so `name` is the user's) rather than `[oauth]`.
    named: bool,
    table: toml::Value,
}

/// `[oauth]` as one credential named `default`, or `[oauth.NAME]` tables.
fn credential_tables(oauth: &toml::Table) -> Vec<CredentialTable> {
    let single = oauth.is_empty() || oauth.values().any(|v| !v.is_table());
    if single {
        return vec![CredentialTable {
            name: DEFAULT_CREDENTIAL.to_owned(),
            prefix: "oauth".to_owned(),
            named: false,
            table: toml::Value::Table(oauth.clone()),
        }];
    }
    oauth
        .iter()
        .map(|(name, table)| CredentialTable {
            name: name.clone(),
            prefix: format!("oauth.{name}"),
            named: true,
            table: table.clone(),
        })
        .collect()
}

/// The shape pass for `[oauth]`: every unknown key of every credential,
/// reported beside the rest of the file's shape problems.
pub(super) fn check_shapes(oauth: &toml::Table, problems: &mut Vec<ConfigError>) {
    for CredentialTable { prefix, table, .. } in credential_tables(oauth) {
        let _: Option<OAuthFile> = file::deserialize(table, &prefix, problems);
    }
}

pub(super) fn validate_credentials(
    oauth: &toml::Table,
    base_dir: &Path,
    base_url: &str,
) -> Result<Vec<Credential>, ConfigError> {
    let mut credentials = Vec::new();
    for CredentialTable {
        name,
        prefix,
        named,
        table,
    } in credential_tables(oauth)
    {
        if named && !is_identifier(&name) {
            return Err(invalid(
                prefix,
                "credential names use letters, digits, '-' and '_'",
            ));
        }
        let mut problems = Vec::new();
        let file: Option<OAuthFile> = file::deserialize(table, &prefix, &mut problems);
        if let Some(problem) = ConfigError::from_problems(problems) {
            return Err(problem);
        }
        let file = file.ok_or_else(|| invalid(prefix.clone(), "could not be read"))?;
        let oauth = validate_oauth(&prefix, file, base_dir, base_url)?;
        credentials.push(Credential { name, oauth });
    }
    credentials.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(credentials)
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn validate_oauth(
    prefix: &str,
    oauth: OAuthFile,
    base_dir: &Path,
    base_url: &str,
) -> Result<OAuth, ConfigError> {
    let OAuthFile {
        client_id,
        client_secret,
        client_secret_file,
        scopes,
        token_url,
        client_auth,
        refresh_fraction,
        activation_delay,
        retry_initial,
        retry_max,
        request_timeout,
        rejected_token_cooldown,
        grant,
        state_file,
        redirect_uri,
        authorize_url,
        device_authorization_url,
        refresh_token_lifetime,
    } = oauth;
    let token_url = match token_url {
        Some(url) => parse_endpoint(&format!("{prefix}.token_url"), &url)?.to_string(),
        None => format!("{base_url}/oauth2/token"),
    };
    if client_id.trim().is_empty() {
        return Err(invalid(format!("{prefix}.client_id"), "must not be empty"));
    }
    let (client_secret, secret_source) =
        client_secret_of(prefix, client_secret, client_secret_file, grant, base_dir)?;
    check_scopes(prefix, &scopes)?;
    if !(refresh_fraction > 0.0 && refresh_fraction < 1.0) {
        return Err(invalid(
            format!("{prefix}.refresh_fraction"),
            format!("must be between 0 and 1 (exclusive), got {refresh_fraction}"),
        ));
    }
    if retry_initial.is_zero() || retry_max < retry_initial {
        return Err(invalid(
            format!("{prefix}.retry_max"),
            "retry_initial must be positive and retry_max at least retry_initial",
        ));
    }
    if request_timeout.is_zero() {
        return Err(invalid(
            format!("{prefix}.request_timeout"),
            "must be positive",
        ));
    }
    let grant = validate_grant(
        prefix,
        GrantFile {
            kind: grant,
            state_file,
            redirect_uri,
            authorize_url,
            device_authorization_url,
            refresh_token_lifetime,
        },
        &scopes,
        base_dir,
        base_url,
    )?;
    Ok(OAuth {
        // Set from [coupa] once both tables are validated.
        egress_proxy: None,
        grant,
        client_id,
        client_secret,
        secret_source,
        scopes,
        token_url,
        client_auth,
        refresh_fraction,
        activation_delay,
        retry_initial,
        retry_max,
        request_timeout,
        rejected_token_cooldown,
    })
}

/// The client secret, inline or from its file; none for a public client
/// of a user grant.
fn client_secret_of(
    prefix: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    grant: GrantKind,
    base_dir: &Path,
) -> Result<(Option<Secret>, SecretSource), ConfigError> {
    let (client_secret, secret_source) = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{prefix}.client_secret"),
                "set either client_secret or client_secret_file, not both",
            ))
        }
        (None, None) if grant != GrantKind::ClientCredentials => (None, SecretSource::None),
        (None, None) => return Err(invalid(
            format!("{prefix}.client_secret"),
            "missing: set client_secret (e.g. \"${COUPA_CLIENT_SECRET}\") or client_secret_file",
        )),
        (Some(secret), None) => (Some(Secret::new(secret)), SecretSource::Inline),
        (None, Some(path)) => {
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    format!("{prefix}.client_secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // Secret files are usually written with a trailing newline.
            let secret = Secret::new(text.trim_end_matches(['\r', '\n']));
            (Some(secret), SecretSource::File(path))
        }
    };
    if client_secret
        .as_ref()
        .is_some_and(|s| s.expose().trim().is_empty())
    {
        return Err(invalid(format!("{prefix}.client_secret"), "is empty"));
    }
    Ok((client_secret, secret_source))
}

fn check_scopes(prefix: &str, scopes: &[String]) -> Result<(), ConfigError> {
    if scopes.is_empty() {
        return Err(invalid(
            format!("{prefix}.scopes"),
            "list at least one scope, e.g. [\"core.common.read\"]",
        ));
    }
    for scope in scopes {
        if scope.is_empty() || scope.contains([' ', ',', '\t']) {
            return Err(invalid(
                    format!("{prefix}.scopes"),
                    format!("{scope:?} is not one scope: give each scope as its own list item (service.object.right)"),
                ));
        }
    }
    Ok(())
}

/// The grant-specific keys of an `[oauth]` table.
struct GrantFile {
    kind: GrantKind,
    state_file: Option<PathBuf>,
    redirect_uri: Option<String>,
    authorize_url: Option<String>,
    device_authorization_url: Option<String>,
    refresh_token_lifetime: Option<Duration>,
}

fn validate_grant(
    prefix: &str,
    file: GrantFile,
    scopes: &[String],
    base_dir: &Path,
    base_url: &str,
) -> Result<Grant, ConfigError> {
    let key = |name: &str| format!("{prefix}.{name}");
    refuse_other_grants_keys(prefix, &file)?;
    if file.kind == GrantKind::ClientCredentials {
        return Ok(Grant::ClientCredentials);
    }
    if !scopes.iter().any(|s| s == "offline_access") {
        return Err(invalid(
            key("scopes"),
            "add \"offline_access\": without it Coupa issues no refresh token, and the proxy would \
             need a new consent every day",
        ));
    }
    let state_file = file.state_file.ok_or_else(|| {
        invalid(
            key("state_file"),
            "missing: user-consented grants keep their tokens in a file, e.g. \
             state_file = \"/var/lib/coupa-auth-proxy/NAME.json\"",
        )
    })?;
    let refresh_token_lifetime = file
        .refresh_token_lifetime
        .unwrap_or(DEFAULT_REFRESH_TOKEN_LIFETIME);
    if refresh_token_lifetime.is_zero() {
        return Err(invalid(key("refresh_token_lifetime"), "must be positive"));
    }
    let consent = Consent {
        state_file: base_dir.join(state_file),
        refresh_token_lifetime,
    };
    let endpoint = |name: &str, given: Option<String>, default_path: &str| match given {
        Some(url) => parse_endpoint(&key(name), &url).map(|u| u.to_string()),
        None => Ok(format!("{base_url}{default_path}")),
    };
    Ok(match file.kind {
        GrantKind::AuthorizationCode => {
            let redirect_uri = loopback_redirect_uri(&key("redirect_uri"), file.redirect_uri)?;
            Grant::AuthorizationCode {
                authorize_url: endpoint(
                    "authorize_url",
                    file.authorize_url,
                    "/oauth2/authorizations/new",
                )?,
                redirect_uri,
                consent,
            }
        }
        GrantKind::DeviceCode => Grant::DeviceCode {
            device_authorization_url: endpoint(
                "device_authorization_url",
                file.device_authorization_url,
                "/oauth2/device_authorizations",
            )?,
            consent,
        },
        GrantKind::ClientCredentials => Grant::ClientCredentials,
    })
}

/// A key of another grant is a mistake worth naming, not a value to
/// ignore.
fn refuse_other_grants_keys(prefix: &str, file: &GrantFile) -> Result<(), ConfigError> {
    let only_for = |name: &str, grants: &str| {
        invalid(
            format!("{prefix}.{name}"),
            format!(
                "only applies to grant = {grants} (this credential's grant is {})",
                file.kind.as_str()
            ),
        )
    };
    let user_grants = "\"authorization_code\" or \"device_code\"";
    if file.kind == GrantKind::ClientCredentials {
        if file.state_file.is_some() {
            return Err(only_for("state_file", user_grants));
        }
        if file.refresh_token_lifetime.is_some() {
            return Err(only_for("refresh_token_lifetime", user_grants));
        }
    }
    if file.kind != GrantKind::AuthorizationCode {
        if file.redirect_uri.is_some() {
            return Err(only_for("redirect_uri", "\"authorization_code\""));
        }
        if file.authorize_url.is_some() {
            return Err(only_for("authorize_url", "\"authorization_code\""));
        }
    }
    if file.kind != GrantKind::DeviceCode && file.device_authorization_url.is_some() {
        return Err(only_for("device_authorization_url", "\"device_code\""));
    }
    Ok(())
}

/// `authorize` listens on the redirect URI, so it must be a loopback
/// `http://` address with a port.
fn loopback_redirect_uri(key: &str, given: Option<String>) -> Result<url::Url, ConfigError> {
    let text = given.unwrap_or_else(|| DEFAULT_REDIRECT_URI.to_owned());
    let redirect_uri =
        url::Url::parse(&text).map_err(|e| invalid(key, format!("{text:?} is not a URL: {e}")))?;
    let loopback = redirect_uri.host().is_some_and(|h| is_loopback(&h));
    if redirect_uri.scheme() != "http" || !loopback || redirect_uri.port().is_none() {
        return Err(invalid(
            key,
            format!(
                "{text:?} must be http://127.0.0.1:PORT/PATH (or localhost): `authorize` \
                 listens there for Coupa's redirect; register the same URI on the client in Coupa"
            ),
        ));
    }
    Ok(redirect_uri)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn user_grants_get_coupa_endpoints_and_may_be_public_clients() {
        let config = load(&user_grant("authorization_code", "")).unwrap();
        let oauth = &config.credentials[0].oauth;
        assert!(oauth.client_secret.is_none());
        match &oauth.grant {
            Grant::AuthorizationCode {
                authorize_url,
                redirect_uri,
                consent,
            } => {
                assert_eq!(
                    authorize_url,
                    "https://acme.coupahost.com/oauth2/authorizations/new"
                );
                assert_eq!(redirect_uri.as_str(), DEFAULT_REDIRECT_URI);
                assert_eq!(consent.state_file, Path::new("./state/invoices.json"));
                assert_eq!(
                    consent.refresh_token_lifetime,
                    DEFAULT_REFRESH_TOKEN_LIFETIME
                );
            }
            other => panic!("{other:?}"),
        }
        let config = load(&user_grant(
            "device_code",
            "refresh_token_lifetime = \"30d\"",
        ))
        .unwrap();
        match &config.credentials[0].oauth.grant {
            Grant::DeviceCode {
                device_authorization_url,
                consent,
            } => {
                assert_eq!(
                    device_authorization_url,
                    "https://acme.coupahost.com/oauth2/device_authorizations"
                );
                assert_eq!(
                    consent.refresh_token_lifetime,
                    Duration::from_secs(30 * 86_400)
                );
            }
            other => panic!("{other:?}"),
        }
        let summary = config.summary();
        assert!(
            summary.contains("device_code") && summary.contains("public client"),
            "{summary}"
        );
    }

    #[test]
    fn user_grant_mistakes_name_the_key() {
        let without_offline = user_grant("device_code", "").replace(", \"offline_access\"", "");
        assert!(error_of(&without_offline).starts_with("oauth.scopes: add \"offline_access\""));
        let without_state =
            user_grant("device_code", "").replace("state_file = \"state/invoices.json\"\n", "");
        assert!(error_of(&without_state).starts_with("oauth.state_file: missing"));
        let remote_redirect = user_grant(
            "authorization_code",
            "redirect_uri = \"https://example.com/callback\"",
        );
        assert!(error_of(&remote_redirect).starts_with("oauth.redirect_uri:"));
        let portless = user_grant(
            "authorization_code",
            "redirect_uri = \"http://127.0.0.1/cb\"",
        );
        assert!(error_of(&portless).starts_with("oauth.redirect_uri:"));
        let misplaced = user_grant("device_code", "redirect_uri = \"http://127.0.0.1:8765/cb\"");
        assert!(
            error_of(&misplaced)
                .starts_with("oauth.redirect_uri: only applies to grant = \"authorization_code\""),
            "{}",
            error_of(&misplaced)
        );
        let state_on_cc = MINIMAL.replace("scopes = [", "state_file = \"x.json\"\nscopes = [");
        assert!(error_of(&state_on_cc).starts_with("oauth.state_file: only applies"));
        let secretless_cc = MINIMAL.replace("client_secret = \"${COUPA_CLIENT_SECRET}\"\n", "");
        assert!(error_of(&secretless_cc).starts_with("oauth.client_secret: missing"));
        let unknown = user_grant("password", "");
        assert!(
            error_of(&unknown).starts_with("oauth.grant:"),
            "{}",
            error_of(&unknown)
        );
    }

    #[test]
    fn comma_separated_scopes_are_rejected() {
        let text = MINIMAL.replace(
            r#"["core.common.read", "core.invoice.read"]"#,
            r#"["core.common.read,core.invoice.read"]"#,
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("oauth.scopes"), "{err}");
    }
}
