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
//! Size: over 400 lines because each grant's redemption sits beside the
//! shared client authentication and scope rules it must agree with; the
//! endpoints are short, the rules are the bulk.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::token::DEVICE_CODE_GRANT;

use super::{json, FakeBody, FakeClient, FakeState, TokenFailure, TokenRecord};

/// RFC 8628 §3.5: each `slow_down` adds this to the polling interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
const CODE_LIFETIME: Duration = Duration::from_secs(120);
const DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(600);

/// A code handed out by the authorize endpoint, waiting for its exchange.
struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    scope: String,
    expires_at: Instant,
}

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

struct DeviceGrant {
    client_id: String,
    scope: String,
    expires_at: Instant,
    /// Answers still to give before approval, in order.
    script: Vec<String>,
    interval: Duration,
    last_poll: Option<Instant>,
    done: bool,
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

/// `BASE64URL(SHA256(verifier))`, RFC 7636 §4.2.
fn s256(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
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

fn is_loopback_redirect(uri: &url::Url) -> bool {
    uri.scheme() == "http"
        && matches!(
            uri.host_str(),
            Some("127.0.0.1") | Some("localhost") | Some("[::1]")
        )
}

/// `GET /oauth2/authorizations/new`: a test user who is always signed in
/// and consents at once (unless told to deny), answering with the redirect.
pub(super) fn authorize(state: &FakeState, request: &Request<Incoming>) -> Response<FakeBody> {
    let q = query_map(request.uri().query());
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let Some(client) = find_client(state, get("client_id")) else {
        // RFC 6749 §4.1.2.1: never redirect for an unknown client.
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", "unknown client");
    };
    let redirect_uri = get("redirect_uri");
    let Some(redirect_target) = url::Url::parse(redirect_uri)
        .ok()
        .filter(is_loopback_redirect)
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "redirect_uri is not a registered (loopback) URI",
        );
    };
    let redirect = |params: &[(&str, &str)]| {
        let mut target = redirect_target.clone();
        target.query_pairs_mut().extend_pairs(params);
        if !get("state").is_empty() {
            target.query_pairs_mut().append_pair("state", get("state"));
        }
        let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::FOUND;
        if let Ok(location) = HeaderValue::from_str(target.as_str()) {
            response.headers_mut().insert(LOCATION, location);
        }
        response
    };
    if get("response_type") != "code" {
        return redirect(&[("error", "unsupported_response_type")]);
    }
    let challenge = match (get("code_challenge"), get("code_challenge_method")) {
        ("", _) if client.secret.is_empty() => {
            return redirect(&[
                ("error", "invalid_request"),
                ("error_description", "public clients must use PKCE"),
            ])
        }
        ("", _) => None,
        (challenge, "S256") => Some(challenge.to_owned()),
        _ => {
            return redirect(&[
                ("error", "invalid_request"),
                ("error_description", "code_challenge_method must be S256"),
            ])
        }
    };
    let scope = match check_scopes(&client, get("scope")) {
        Ok(scope) => scope,
        Err(_) => return redirect(&[("error", "invalid_scope")]),
    };
    let Ok(mut oauth) = state.oauth.lock() else {
        return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock");
    };
    if oauth.deny_consent {
        return redirect(&[
            ("error", "access_denied"),
            ("error_description", "the user declined"),
        ]);
    }
    let code = random_token("code.", 24);
    oauth.codes.insert(
        code.clone(),
        PendingCode {
            client_id: client.id,
            redirect_uri: redirect_uri.to_owned(),
            challenge,
            scope,
            expires_at: Instant::now() + CODE_LIFETIME,
        },
    );
    drop(oauth);
    redirect(&[("code", &code)])
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

fn redeem_code(
    state: &FakeState,
    client: &FakeClient,
    form: &HashMap<String, String>,
) -> Result<(String, bool), Refusal> {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let mut oauth = state
        .oauth
        .lock()
        .map_err(|_| invalid_grant("server lock"))?;
    // Single use: removed whether or not the exchange succeeds.
    let pending = oauth
        .codes
        .remove(field("code"))
        .ok_or_else(|| invalid_grant("unknown or used authorization code"))?;
    if pending.client_id != client.id || Instant::now() >= pending.expires_at {
        return Err(invalid_grant(
            "authorization code expired or not issued to this client",
        ));
    }
    if pending.redirect_uri != field("redirect_uri") {
        return Err(invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    if let Some(challenge) = &pending.challenge {
        if s256(field("code_verifier")) != *challenge {
            return Err(invalid_grant(
                "code_verifier does not match the code_challenge",
            ));
        }
    }
    Ok((pending.scope, true))
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

/// Device authorization polls, per RFC 8628 §3.5.
fn poll_device(
    state: &FakeState,
    client: &FakeClient,
    device_code: &str,
) -> Result<(String, bool), Refusal> {
    let error = |code: &str| Err(refuse(StatusCode::BAD_REQUEST, code, code));
    let mut guard = state
        .oauth
        .lock()
        .map_err(|_| invalid_grant("server lock"))?;
    let oauth = &mut *guard;
    oauth.device_polls += 1;
    let Some(device) = oauth.devices.get_mut(device_code) else {
        return Err(invalid_grant("unknown device code"));
    };
    if device.client_id != client.id || device.done {
        return Err(invalid_grant(
            "device code not issued to this client, or used",
        ));
    }
    let now = Instant::now();
    if now >= device.expires_at {
        return error("expired_token");
    }
    if let Some(last) = device.last_poll.replace(now) {
        if now.duration_since(last) < device.interval {
            oauth.device_polls_too_fast += 1;
            device.interval += SLOW_DOWN_STEP;
            return error("slow_down");
        }
    }
    if oauth.deny_consent {
        return error("access_denied");
    }
    if !device.script.is_empty() {
        let answer = device.script.remove(0);
        if answer == "slow_down" {
            device.interval += SLOW_DOWN_STEP;
        }
        return error(&answer);
    }
    device.done = true;
    Ok((device.scope.clone(), true))
}

/// `POST /oauth2/device_authorizations`.
pub(super) async fn device_authorization(
    state: &FakeState,
    base_url: &str,
    request: Request<Incoming>,
) -> Response<FakeBody> {
    let (basic, form) = match read_form(request).await {
        Ok(form) => form,
        Err(refusal) => return refusal.response(),
    };
    let client = match authenticate(state, basic, &form) {
        Ok(client) => client,
        Err(refusal) => return refusal.response(),
    };
    let scope = match check_scopes(&client, form.get("scope").map(String::as_str).unwrap_or("")) {
        Ok(scope) => scope,
        Err(refusal) => return refusal.response(),
    };
    let Ok(mut oauth) = state.oauth.lock() else {
        return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock");
    };
    let device_code = random_token("device.", 24);
    let user_code = {
        let mut raw = [0u8; 8];
        rand::rng().fill_bytes(&mut raw);
        let letters: String = raw.iter().map(|b| (b'B' + b % 24) as char).collect();
        format!("{}-{}", &letters[..4], &letters[4..])
    };
    let interval = oauth.device_interval;
    let script = oauth.device_script.clone();
    oauth.devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id: client.id,
            scope,
            expires_at: Instant::now() + DEVICE_CODE_LIFETIME,
            script,
            interval,
            last_poll: None,
            done: false,
        },
    );
    json(
        StatusCode::OK,
        serde_json::json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": format!("{base_url}/oauth2/device"),
            "verification_uri_complete": format!("{base_url}/oauth2/device?user_code={user_code}"),
            "expires_in": DEVICE_CODE_LIFETIME.as_secs(),
            "interval": interval.as_secs(),
        }),
    )
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

    #[test]
    fn s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
