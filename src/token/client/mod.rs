//! One request to the OAuth token endpoint, for any of the grants (client
//! credentials, authorization code, refresh token, device code), and the
//! translation of its failures into advice.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{ClientAuth, GrantKind, OAuth};
use crate::secret::Secret;

mod error;

pub(crate) use error::error_chain;
pub use error::{Endpoint, FetchError};

/// Coupa's documented lifetime, assumed when a response omits `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(86_399);

/// A token as the endpoint issued it.
#[derive(Debug)]
pub struct FetchedToken {
    pub access_token: Secret,
    pub expires_in: Duration,
    pub scope: Option<String>,
    /// Issued by user-consented grants when `offline_access` was granted.
    pub refresh_token: Option<Secret>,
    /// When the request was sent: the lifetime counts from here, so our
    /// idea of the expiry is never later than the server's.
    pub requested_at: Instant,
    pub requested_at_wall: SystemTime,
}

/// One token request, by grant.
pub enum TokenRequest<'a> {
    ClientCredentials,
    AuthorizationCode {
        code: &'a str,
        redirect_uri: &'a str,
        code_verifier: &'a Secret,
    },
    RefreshToken(&'a Secret),
    DeviceCode(&'a Secret),
}

impl TokenRequest<'_> {
    fn form(&self) -> Vec<(&str, &str)> {
        match self {
            Self::ClientCredentials => vec![("grant_type", "client_credentials")],
            Self::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
            } => vec![
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", code_verifier.expose()),
            ],
            Self::RefreshToken(token) => vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", token.expose()),
            ],
            Self::DeviceCode(code) => vec![
                ("grant_type", crate::token::DEVICE_CODE_GRANT),
                ("device_code", code.expose()),
            ],
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// What a token request is made of. Replaced whole on reload, so a fetch
/// never mixes old and new values.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientParams {
    pub url: String,
    pub client_id: String,
    /// `None`: a public client, identified by `client_id` alone.
    pub secret: Option<Secret>,
    /// Scopes joined by spaces, as Coupa wants them.
    pub scope: String,
    pub auth: ClientAuth,
    pub grant: GrantKind,
    /// The egress proxy the requests tunnel through; its password may
    /// change on reload.
    pub egress: Option<crate::config::EgressProxy>,
}

impl From<&OAuth> for ClientParams {
    fn from(oauth: &OAuth) -> Self {
        Self {
            url: oauth.token_url.clone(),
            client_id: oauth.client_id.clone(),
            secret: oauth.client_secret.clone(),
            scope: oauth.scopes.join(" "),
            auth: oauth.client_auth,
            grant: oauth.grant.kind(),
            egress: oauth.egress_proxy.clone(),
        }
    }
}

/// Fetches tokens for one OAuth client.
#[derive(Debug, Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    /// Swappable: a reload may bring a new secret, scopes or client.
    params: Arc<ArcSwap<ClientParams>>,
    timeout: Duration,
}

impl TokenClient {
    pub fn new(oauth: &OAuth, tls: rustls::ClientConfig) -> Result<Self, FetchError> {
        let params = Arc::new(ArcSwap::from_pointee(ClientParams::from(oauth)));
        let live = params.clone();
        let http = crate::egress::reqwest_builder_with(oauth.egress_proxy.is_some(), move || {
            live.load().egress.clone()
        })
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(oauth.request_timeout)
        .user_agent(concat!("coupa-auth-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FetchError::Network(error_chain(&e)))?;
        Ok(Self {
            http,
            params,
            timeout: oauth.request_timeout,
        })
    }

    /// Where a reload puts new parameters, used from the next fetch.
    pub fn params_handle(&self) -> Arc<ArcSwap<ClientParams>> {
        self.params.clone()
    }

    /// The scopes the next fetch asks for, space-separated.
    pub fn requested_scope(&self) -> String {
        self.params.load().scope.clone()
    }

    /// Requests one token with the client credentials grant.
    pub async fn fetch(&self) -> Result<FetchedToken, FetchError> {
        self.request(TokenRequest::ClientCredentials)
            .await
            .map(|(token, _)| token)
    }

    /// The grant this client was configured for.
    pub fn grant(&self) -> GrantKind {
        self.params.load().grant
    }

    /// Posts `form` (plus client authentication) to `url` and returns the
    /// successful answer's body, or the RFC 6749 error.
    pub async fn post_form(
        &self,
        endpoint: Endpoint,
        url: &str,
        mut form: Vec<(&str, &str)>,
    ) -> Result<bytes::Bytes, FetchError> {
        let params = self.params.load_full();
        let mut request = self.http.post(url);
        let mut ambiguous_basic = false;
        match (&params.secret, params.auth) {
            (None, _) => form.push(("client_id", &params.client_id)),
            (Some(secret), ClientAuth::Body) => {
                form.push(("client_id", &params.client_id));
                form.push(("client_secret", secret.expose()));
            }
            (Some(secret), ClientAuth::Basic) => {
                ambiguous_basic =
                    crate::basic_auth::is_ambiguous(&params.client_id, secret.expose());
                let value = crate::basic_auth::encode(&params.client_id, secret.expose());
                request = request.header(http::header::AUTHORIZATION, value);
            }
        }
        let response = match request
            .header(http::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) => return Err(self.send_error(e, url).await),
        };
        let status = response.status();
        if status.is_redirection() {
            return Err(FetchError::Redirected {
                endpoint,
                status: status.as_u16(),
                location: redirect_target(url, response.headers()),
            });
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        if status.is_success() {
            return Ok(body);
        }
        Err(match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(err) => FetchError::OAuth {
                status: status.as_u16(),
                code: err.error,
                description: err.error_description,
                ambiguous_basic,
            },
            Err(_) => FetchError::Http {
                status: status.as_u16(),
            },
        })
    }

    /// Requests one token and also returns the endpoint's JSON answer as
    /// it came (for `coupa-auth-proxy token --json`; it holds the token).
    pub async fn request(
        &self,
        grant: TokenRequest<'_>,
    ) -> Result<(FetchedToken, Secret), FetchError> {
        let requested_at = Instant::now();
        let requested_at_wall = SystemTime::now();
        let params = self.params.load_full();
        let mut form = grant.form();
        if matches!(grant, TokenRequest::ClientCredentials) {
            form.push(("scope", &params.scope));
        }
        let body = self.post_form(Endpoint::Token, &params.url, form).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            // serde_json's message names the field, never the value.
            FetchError::BadResponse(format!("not a token response: {e}"))
        })?;
        if !parsed.token_type.eq_ignore_ascii_case("bearer") {
            return Err(FetchError::BadResponse(format!(
                "token_type is {:?}, expected bearer",
                parsed.token_type
            )));
        }
        if parsed.access_token.is_empty()
            || http::HeaderValue::from_str(&parsed.access_token).is_err()
        {
            return Err(FetchError::BadResponse(
                "access_token is empty or not a valid header value".to_owned(),
            ));
        }
        let expires_in = match parsed.expires_in {
            None => DEFAULT_EXPIRES_IN,
            Some(value) => parse_expires_in(&value).ok_or_else(|| {
                FetchError::BadResponse(format!("expires_in {value} is not a number of seconds"))
            })?,
        };
        let token = FetchedToken {
            access_token: Secret::new(parsed.access_token),
            expires_in,
            scope: parsed.scope,
            refresh_token: parsed
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            requested_at,
            requested_at_wall,
        };
        Ok((token, Secret::new(String::from_utf8_lossy(&body))))
    }

    /// A request that got no answer. Through an egress proxy, the HTTP
    /// client only says the tunnel failed: one tunnel of our own asks the
    /// proxy why, so the error names the hop (proxy down, login, refusal,
    /// Coupa unreachable behind it).
    async fn send_error(&self, e: reqwest::Error, url: &str) -> FetchError {
        if !e.is_timeout() {
            if let Some(egress) = &self.params.load().egress {
                if let Some(why) = crate::egress::diagnose(egress, url).await {
                    return FetchError::Egress(why);
                }
            }
        }
        self.transport_error(e)
    }

    fn transport_error(&self, e: reqwest::Error) -> FetchError {
        if e.is_timeout() {
            FetchError::Timeout(self.timeout)
        } else {
            FetchError::Network(error_chain(&e))
        }
    }
}

/// Where a redirect points, as an absolute URL (a relative `Location` is
/// resolved against the request's URL).
fn redirect_target(url: &str, headers: &http::HeaderMap) -> String {
    let Some(location) = headers
        .get(http::header::LOCATION)
        .and_then(|l| l.to_str().ok())
    else {
        return "(no Location header)".to_owned();
    };
    url::Url::parse(url)
        .and_then(|base| base.join(location))
        .map(String::from)
        .unwrap_or_else(|_| location.to_owned())
}

/// Some servers send `expires_in` as a string; accept both.
fn parse_expires_in(value: &serde_json::Value) -> Option<Duration> {
    let secs = match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_accepts_number_or_string() {
        assert_eq!(
            parse_expires_in(&serde_json::json!(86399)),
            Some(Duration::from_secs(86399))
        );
        assert_eq!(
            parse_expires_in(&serde_json::json!("60")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_expires_in(&serde_json::json!(-1)), None);
    }

    #[test]
    fn a_redirect_names_where_to_and_the_setting() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::LOCATION,
            http::HeaderValue::from_static("/oauth2/token"),
        );
        let location = redirect_target("http://127.0.0.1:9/moved/oauth2/token", &headers);
        assert_eq!(location, "http://127.0.0.1:9/oauth2/token");
        let err = FetchError::Redirected {
            endpoint: Endpoint::Token,
            status: 308,
            location,
        };
        assert_eq!(
            err.to_string(),
            "the token endpoint redirected (HTTP 308) to http://127.0.0.1:9/oauth2/token: set \
             oauth.token_url to it"
        );
        assert!(err.is_configuration_error());
    }

    #[test]
    fn oauth_errors_come_with_a_fix() {
        let err = FetchError::OAuth {
            status: 401,
            code: "invalid_client".into(),
            description: None,
            ambiguous_basic: false,
        };
        assert!(err.explain().contains("secret"));
        assert!(!err.explain().contains("RFC 6749"));
        let basic = FetchError::OAuth {
            status: 401,
            code: "invalid_client".into(),
            description: None,
            ambiguous_basic: true,
        };
        assert!(
            basic.explain().contains("RFC 6749 §2.3.1"),
            "{}",
            basic.explain()
        );
        assert!(basic.explain().contains("client_auth = \"body\""));
        let err = FetchError::OAuth {
            status: 400,
            code: "invalid_scope".into(),
            description: Some("core.x.read".into()),
            ambiguous_basic: false,
        };
        assert!(err.explain().contains("oauth.scopes"));
        assert!(err.explain().contains("core.x.read"));
    }
}
