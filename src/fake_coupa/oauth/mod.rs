//! The fake's OAuth side: the token endpoint for every grant the proxy
//! uses, the authorize endpoint (a test user who always consents) and
//! device authorization.
//!
//! Rules it enforces, as Coupa does: client authentication in the form or
//! Basic, never both; requested scopes must be assigned to the client;
//! PKCE S256 checked at the code exchange, codes single-use and bound to
//! their redirect URI; refresh tokens only with `offline_access`, rotated
//! on use (the old one dies); RFC 8628 polling answers.
//!
//! Here: the token endpoint, client authentication and the scope and
//! refresh-token rules every grant shares; the authorization-code grant in
//! [`code`], device authorization in [`device`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use rand::RngCore;

mod code;
pub(super) use code::s256;
mod device;

use super::{json, FakeBody, FakeClient, FakeState, TokenFailure, TokenRecord};
use code::{redeem_code, PendingCode};
use device::{poll_device, DeviceGrant, DEVICE_CODE_GRANT};

pub(super) use code::authorize;
pub(super) use device::device_authorization;

pub(super) struct RefreshRecord {
    client_id: String,
    scope: String,
    expires_at: Instant,
    pub(super) revoked: bool,
}

impl RefreshRecord {
    pub(super) fn is_live(&self) -> bool {
        !self.revoked && Instant::now() < self.expires_at
    }
}

/// What the fake remembers of user-consented grants.
pub(super) struct OAuthState {
    codes: HashMap<String, PendingCode>,
    pub(super) refresh_tokens: HashMap<String, RefreshRecord>,
    devices: HashMap<String, DeviceGrant>,
    pub(super) refresh_token_lifetime: Duration,
    pub(super) rotate_refresh_tokens: bool,
    pub(super) deny_consent: bool,
    pub(super) device_interval: Duration,
    pub(super) device_script: Vec<String>,
    pub(super) device_polls: u64,
    pub(super) device_polls_too_fast: u64,
    pub(super) refresh_grants: u64,
}

impl Default for OAuthState {
    fn default() -> Self {
        Self {
            codes: HashMap::new(),
            refresh_tokens: HashMap::new(),
            devices: HashMap::new(),
            refresh_token_lifetime: Duration::from_secs(90 * 86_400),
            rotate_refresh_tokens: true,
            deny_consent: false,
            device_interval: Duration::from_secs(5),
            device_script: vec!["authorization_pending".to_owned()],
            device_polls: 0,
            device_polls_too_fast: 0,
            refresh_grants: 0,
        }
    }
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response<FakeBody> {
    json(
        status,
        serde_json::json!({"error": code, "error_description": description}),
    )
}

/// An RFC 6749 error answer, made into a response at the end.
pub(super) struct Refusal {
    status: StatusCode,
    code: String,
    description: String,
}

fn refuse(status: StatusCode, code: &str, description: &str) -> Refusal {
    Refusal {
        status,
        code: code.to_owned(),
        description: description.to_owned(),
    }
}

impl Refusal {
    fn response(self) -> Response<FakeBody> {
        oauth_error(self.status, &self.code, &self.description)
    }
}

fn random_token(prefix: &str, bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn find_client(state: &FakeState, id: &str) -> Option<FakeClient> {
    state
        .clients
        .lock()
        .ok()
        .and_then(|clients| clients.iter().find(|c| c.id == id).cloned())
}

/// Every requested scope assigned to the client, or the RFC 6749 error.
fn check_scopes(client: &FakeClient, requested: &str) -> Result<String, Refusal> {
    if requested.contains(',') {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scopes are separated by spaces",
        ));
    }
    let scopes: Vec<&str> = requested.split(' ').filter(|s| !s.is_empty()).collect();
    if scopes.is_empty() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "no scope requested",
        ));
    }
    if let Some(missing) = scopes
        .iter()
        .find(|s| !client.scopes.iter().any(|assigned| assigned == *s))
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("scope {missing} is not assigned to the client"),
        ));
    }
    Ok(scopes.join(" "))
}

/// Client authentication: form fields or Basic, never both. A public
/// client (empty secret) sends its id alone.
fn authenticate(
    state: &FakeState,
    basic: Option<(String, String)>,
    form: &HashMap<String, String>,
) -> Result<FakeClient, Refusal> {
    let unauthorized = || {
        refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        )
    };
    let body_secret = form.get("client_secret");
    let (id, secret) = match (basic, body_secret) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "provided multiple credentials",
            ))
        }
        (Some((id, secret)), None) => (id, Some(secret)),
        (None, secret) => match form.get("client_id") {
            Some(id) => (id.clone(), secret.cloned()),
            None => return Err(unauthorized()),
        },
    };
    let client = find_client(state, &id).ok_or_else(unauthorized)?;
    let authenticated = match secret {
        Some(secret) => !client.secret.is_empty() && client.secret == secret,
        None => client.secret.is_empty(),
    };
    if authenticated {
        Ok(client)
    } else {
        Err(unauthorized())
    }
}

/// `POST /oauth2/token` for every grant.
pub(super) async fn token_endpoint(
    state: &FakeState,
    request: Request<Incoming>,
) -> Response<FakeBody> {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let delay = state.token_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let failure = state.failure.lock().ok().and_then(|f| f.clone());
    match failure {
        Some(TokenFailure::ServerError) => {
            let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(
                b"<html><body>502 Bad Gateway</body></html>",
            ))));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return r;
        }
        Some(TokenFailure::OAuth(code)) => {
            return oauth_error(StatusCode::BAD_REQUEST, &code, "switched on by the test");
        }
        None => {}
    }
    let form = match read_form(request).await {
        Ok(form) => form,
        Err(refusal) => return refusal.response(),
    };
    let (basic, form) = form;
    let client = match authenticate(state, basic, &form) {
        Ok(client) => client,
        Err(refusal) => return refusal.response(),
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let granted = match field("grant_type") {
        "client_credentials" if !client.secret.is_empty() => {
            check_scopes(&client, field("scope")).map(|scope| (scope, false))
        }
        "authorization_code" => redeem_code(state, &client, &form),
        "refresh_token" => redeem_refresh_token(state, &client, field("refresh_token")),
        DEVICE_CODE_GRANT => poll_device(state, &client, field("device_code")),
        "client_credentials" => Err(refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "public clients cannot use client_credentials",
        )),
        _ => Err(refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant type not supported",
        )),
    };
    match granted {
        Ok((scope, user_grant)) => issue(state, &client, &scope, user_grant),
        Err(refusal) => refusal.response(),
    }
}

type Form = (Option<(String, String)>, HashMap<String, String>);

/// Checks the method and encoding; returns Basic credentials and the form.
async fn read_form(request: Request<Incoming>) -> Result<Form, Refusal> {
    if request.method() != Method::POST {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        ));
    }
    let form_encoded = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    if !form_encoded {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let basic = request.headers().get(AUTHORIZATION).and_then(parse_basic);
    let body = match http_body_util::Limited::new(request.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "bad body",
            ))
        }
    };
    Ok((basic, form_urlencoded::parse(&body).into_owned().collect()))
}

fn invalid_grant(description: &str) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn redeem_refresh_token(
    state: &FakeState,
    client: &FakeClient,
    token: &str,
) -> Result<(String, bool), Refusal> {
    let mut oauth = state
        .oauth
        .lock()
        .map_err(|_| invalid_grant("server lock"))?;
    oauth.refresh_grants += 1;
    let rotate = oauth.rotate_refresh_tokens;
    let record = oauth
        .refresh_tokens
        .get_mut(token)
        .ok_or_else(|| invalid_grant("unknown refresh token"))?;
    if !record.is_live() || record.client_id != client.id {
        return Err(invalid_grant(
            "refresh token expired, revoked or not issued to this client",
        ));
    }
    if rotate {
        record.revoked = true;
    }
    Ok((record.scope.clone(), rotate))
}

/// Issues an access token, plus a refresh token for user grants that
/// include `offline_access` (and, for a refresh, only when rotating).
fn issue(state: &FakeState, client: &FakeClient, scope: &str, refresh: bool) -> Response<FakeBody> {
    let padding = state.token_padding.load(Ordering::SeqCst) as usize;
    let token = format!("{}{}", random_token("fake.", 48), "p".repeat(padding));
    let lifetime = state
        .lifetime
        .lock()
        .map(|l| *l)
        .unwrap_or(Duration::from_secs(86_399));
    if let Ok(mut tokens) = state.tokens.lock() {
        tokens.insert(
            token.clone(),
            TokenRecord {
                expires_at: Instant::now() + lifetime,
                revoked: false,
                scope: scope.to_owned(),
            },
        );
    }
    state.tokens_issued.fetch_add(1, Ordering::SeqCst);
    let mut body = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs(),
        "scope": scope,
    });
    if refresh && scope.split(' ').any(|s| s == "offline_access") {
        let refresh_token = random_token("refresh.", 32);
        if let Ok(mut oauth) = state.oauth.lock() {
            let expires_at = Instant::now() + oauth.refresh_token_lifetime;
            oauth.refresh_tokens.insert(
                refresh_token.clone(),
                RefreshRecord {
                    client_id: client.id.clone(),
                    scope: scope.to_owned(),
                    expires_at,
                    revoked: false,
                },
            );
        }
        body["refresh_token"] = serde_json::Value::String(refresh_token);
    }
    json(StatusCode::OK, body)
}

/// Basic credentials, decoded as RFC 6749 §2.3.1 says (a server that
/// follows the RFC; Doorkeeper in tests/it/real_oauth.rs is one that does not).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    crate::basic_auth::decode(value.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse() {
        let value = HeaderValue::from_static("Basic aWQ6c2VjcmV0");
        assert_eq!(
            parse_basic(&value),
            Some(("id".to_owned(), "secret".to_owned()))
        );
    }
}
