//! A fake Coupa instance, owned by the project, for tests, benches and the
//! demo (nobody here can reach a real one). `run` never starts it.
//!
//! It behaves like the parts of Coupa the proxy depends on:
//! - `POST /oauth2/token` validates the form encoding, the client id and
//!   secret (form or Basic, never both), the grant and that every requested
//!   scope is assigned to the client; it issues random tokens with a
//!   configurable lifetime and answers RFC 6749 errors otherwise;
//! - `/api/*` requires a live bearer token (401 otherwise) and echoes what it
//!   received as JSON: method, target, headers, body length and SHA-256;
//! - `/api/_download?bytes=N` streams N bytes of a known pattern;
//!   `/api/_slow?ms=N` answers after a delay.
//!
//! - the OAuth side of user-consented grants (authorize, PKCE, device
//!   authorization, refresh tokens) lives in [`oauth`].
//!
//! Switches make the token endpoint fail and revoke tokens; counters record
//! token requests and any use of an expired token.

mod oauth;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// An OAuth client registered in the fake.
#[derive(Debug, Clone)]
pub struct FakeClient {
    pub id: String,
    /// Empty for a public client, which authenticates with PKCE alone.
    pub secret: String,
    /// Scopes assigned to the client; requests may ask for any subset.
    pub scopes: Vec<String>,
}

/// How the token endpoint misbehaves while a failure is switched on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFailure {
    /// HTTP 500 with an HTML body, like a load balancer error page.
    ServerError,
    /// An RFC 6749 error with this code, e.g. `invalid_client`.
    OAuth(String),
}

#[derive(Debug, Clone)]
pub struct FakeCoupaOptions {
    pub clients: Vec<FakeClient>,
    /// `expires_in` of issued tokens (Coupa: 86399 s).
    pub token_lifetime: Duration,
    /// Serve HTTPS with this configuration instead of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for FakeCoupaOptions {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            token_lifetime: Duration::from_secs(86_399),
            tls: None,
        }
    }
}

struct TokenRecord {
    expires_at: Instant,
    revoked: bool,
    /// Granted scopes, space-separated.
    scope: String,
}

/// What the fake knows and counts. All methods are cheap and thread-safe.
pub struct FakeState {
    clients: Mutex<Vec<FakeClient>>,
    lifetime: Mutex<Duration>,
    failure: Mutex<Option<TokenFailure>>,
    tokens: Mutex<HashMap<String, TokenRecord>>,
    /// Extra characters appended to issued tokens (Coupa's JWTs grow with
    /// their scopes; tests need multi-kilobyte ones).
    token_padding: AtomicU64,
    /// While set, every token is treated as revoked, even new ones.
    reject_all: std::sync::atomic::AtomicBool,
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    api_requests: AtomicU64,
    rejected_api_requests: AtomicU64,
    expired_token_uses: AtomicU64,
    oauth: Mutex<oauth::OAuthState>,
    base_url: String,
    /// Benchmark mode: `/api/*` answers a fixed JSON body.
    fast_api: std::sync::atomic::AtomicBool,
}

/// The fixed answer of fast mode: a JSON array padded to `kib` KiB.
fn fast_body(kib: usize) -> Bytes {
    let record = br#"{"id":1,"name":"Office supplies","active":true,"description":"padding"}"#;
    let mut body = Vec::with_capacity(kib * 1024);
    body.push(b'[');
    while body.len() + record.len() + 2 <= kib * 1024 {
        if body.len() > 1 {
            body.push(b',');
        }
        body.extend_from_slice(record);
    }
    body.push(b']');
    body.resize(kib * 1024, b' ');
    Bytes::from(body)
}

static FAST_1K: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| fast_body(1));
static FAST_64K: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| fast_body(64));

impl FakeState {
    /// Benchmark mode: `/api/*` with a live token answers a fixed JSON
    /// body of 1 KiB (`?kib=64`: 64 KiB) and does nothing else, so the
    /// upstream costs as little as possible.
    pub fn set_fast_api(&self, fast: bool) {
        self.fast_api.store(fast, Ordering::SeqCst);
    }

    fn oauth(&self) -> std::sync::MutexGuard<'_, oauth::OAuthState> {
        // A panicking test thread must not wedge the fake for the others.
        self.oauth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the test user decline consent (authorize and device grants).
    pub fn set_deny_consent(&self, deny: bool) {
        self.oauth().deny_consent = deny;
    }

    /// Lifetime of refresh tokens issued from now on (Coupa: 90 days).
    pub fn set_refresh_token_lifetime(&self, lifetime: Duration) {
        self.oauth().refresh_token_lifetime = lifetime;
    }

    /// Whether a refresh issues a new refresh token and kills the old one
    /// (default) or keeps the old one.
    pub fn set_rotate_refresh_tokens(&self, rotate: bool) {
        self.oauth().rotate_refresh_tokens = rotate;
    }

    /// The `interval` device authorizations announce, and enforce.
    pub fn set_device_interval(&self, interval: Duration) {
        self.oauth().device_interval = interval;
    }

    /// The answers polls get, in order, before the user approves, e.g.
    /// `["authorization_pending", "slow_down"]`.
    pub fn set_device_script(&self, answers: &[&str]) {
        self.oauth().device_script = answers.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Device-code token requests received.
    pub fn device_polls(&self) -> u64 {
        self.oauth().device_polls
    }

    /// Device-code polls sent sooner than the interval allowed.
    pub fn device_polls_too_fast(&self) -> u64 {
        self.oauth().device_polls_too_fast
    }

    /// `grant_type=refresh_token` requests received.
    pub fn refresh_grants(&self) -> u64 {
        self.oauth().refresh_grants
    }

    /// Revokes every refresh token issued so far.
    pub fn revoke_refresh_tokens(&self) {
        for record in self.oauth().refresh_tokens.values_mut() {
            record.revoked = true;
        }
    }

    /// Whether `token` is a refresh token that a refresh would accept now.
    pub fn refresh_token_is_live(&self, token: &str) -> bool {
        self.oauth()
            .refresh_tokens
            .get(token)
            .is_some_and(|r| r.is_live())
    }

    /// Makes every token request fail (or succeed again with `None`).
    pub fn set_token_failure(&self, failure: Option<TokenFailure>) {
        if let Ok(mut f) = self.failure.lock() {
            *f = failure;
        }
    }

    /// Changes `expires_in` for tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        if let Ok(mut l) = self.lifetime.lock() {
            *l = lifetime;
        }
    }

    /// Changes a client's secret, as rotating it in Coupa would.
    pub fn set_client_secret(&self, client_id: &str, secret: &str) {
        if let Ok(mut clients) = self.clients.lock() {
            for client in clients.iter_mut().filter(|c| c.id == client_id) {
                client.secret = secret.to_owned();
            }
        }
    }

    /// Makes tokens issued from now on `extra` characters longer.
    pub fn set_token_padding(&self, extra: usize) {
        self.token_padding.store(extra as u64, Ordering::SeqCst);
    }

    /// Rejects every token, issued before or after, until switched off.
    pub fn set_reject_all_tokens(&self, reject: bool) {
        self.reject_all.store(reject, Ordering::SeqCst);
    }

    /// Revokes every token issued so far.
    pub fn revoke_all_tokens(&self) {
        if let Ok(mut tokens) = self.tokens.lock() {
            for record in tokens.values_mut() {
                record.revoked = true;
            }
        }
    }

    /// Requests that reached the token endpoint, successful or not.
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::SeqCst)
    }

    pub fn tokens_issued(&self) -> u64 {
        self.tokens_issued.load(Ordering::SeqCst)
    }

    /// `/api/*` requests that carried a live token.
    pub fn api_requests(&self) -> u64 {
        self.api_requests.load(Ordering::SeqCst)
    }

    /// `/api/*` requests answered 401.
    pub fn rejected_api_requests(&self) -> u64 {
        self.rejected_api_requests.load(Ordering::SeqCst)
    }

    /// `/api/*` requests that carried a token after its expiry.
    pub fn expired_token_uses(&self) -> u64 {
        self.expired_token_uses.load(Ordering::SeqCst)
    }

    /// The scopes `token` was issued with.
    pub fn token_scope(&self, token: &str) -> Option<String> {
        self.tokens.lock().ok()?.get(token).map(|r| r.scope.clone())
    }

    /// Whether `token` was issued here and is live now.
    pub fn token_is_live(&self, token: &str) -> bool {
        matches!(self.check_token(token), TokenCheck::Live)
    }

    fn check_token(&self, token: &str) -> TokenCheck {
        if self.reject_all.load(Ordering::SeqCst) {
            return TokenCheck::Revoked;
        }
        let Ok(tokens) = self.tokens.lock() else {
            return TokenCheck::Unknown;
        };
        match tokens.get(token) {
            None => TokenCheck::Unknown,
            Some(r) if r.revoked => TokenCheck::Revoked,
            Some(r) if Instant::now() >= r.expires_at => TokenCheck::Expired,
            Some(_) => TokenCheck::Live,
        }
    }
}

enum TokenCheck {
    Live,
    Expired,
    Revoked,
    Unknown,
}

/// A running fake; stops when dropped.
pub struct FakeCoupa {
    addr: SocketAddr,
    tls: bool,
    state: Arc<FakeState>,
    shutdown: CancellationToken,
}

impl FakeCoupa {
    /// Starts the fake on `127.0.0.1` with an OS-chosen port.
    pub async fn start(options: FakeCoupaOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::start_on(listener, options)
    }

    pub fn start_on(listener: TcpListener, options: FakeCoupaOptions) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState {
            clients: Mutex::new(options.clients),
            lifetime: Mutex::new(options.token_lifetime),
            failure: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            token_padding: AtomicU64::new(0),
            reject_all: std::sync::atomic::AtomicBool::new(false),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            rejected_api_requests: AtomicU64::new(0),
            expired_token_uses: AtomicU64::new(0),
            oauth: Mutex::new(oauth::OAuthState::default()),
            base_url: base_url(addr, options.tls.is_some()),
            fast_api: std::sync::atomic::AtomicBool::new(false),
        });
        let shutdown = CancellationToken::new();
        let tls = options.tls.map(TlsAcceptor::from);
        let is_tls = tls.is_some();
        let served = state.clone();
        tokio::spawn(crate::server::serve(
            listener,
            tls,
            move |_peer, _guard| {
                let state = served.clone();
                service_fn(move |request| route(state.clone(), request))
            },
            crate::server::Limits {
                max_connections: 100_000,
                ..Default::default()
            },
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        Ok(Self {
            addr,
            tls: is_tls,
            state,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS (test
    /// certificates are issued for `localhost`).
    pub fn base_url(&self) -> String {
        base_url(self.addr, self.tls)
    }

    pub fn state(&self) -> &FakeState {
        &self.state
    }
}

fn base_url(addr: SocketAddr, tls: bool) -> String {
    if tls {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

impl Drop for FakeCoupa {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

type FakeBody = Either<Full<Bytes>, Either<PatternBody, FaultyBody>>;

async fn route(
    state: Arc<FakeState>,
    request: Request<Incoming>,
) -> Result<Response<FakeBody>, Infallible> {
    let path = request.uri().path();
    Ok(if path == "/oauth2/token" {
        oauth::token_endpoint(&state, request).await
    } else if path == "/oauth2/authorizations/new" {
        oauth::authorize(&state, &request)
    } else if path == "/oauth2/device_authorizations" {
        oauth::device_authorization(&state, &state.base_url, request).await
    } else if path.starts_with("/api/") {
        api(&state, request).await
    } else {
        json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"errors": {"path": ["not found"]}}),
        )
    })
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<FakeBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn api(state: &FakeState, request: Request<Incoming>) -> Response<FakeBody> {
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    let verdict = token
        .as_deref()
        .map(|t| state.check_token(t))
        .unwrap_or(TokenCheck::Unknown);
    let reason = match verdict {
        TokenCheck::Live => None,
        TokenCheck::Expired => {
            state.expired_token_uses.fetch_add(1, Ordering::SeqCst);
            Some("token expired")
        }
        TokenCheck::Revoked => Some("token revoked"),
        TokenCheck::Unknown => Some("missing or unknown token"),
    };
    if let Some(reason) = reason {
        // Like a real server, read the request before answering it.
        let _ = http_body_util::Limited::new(request.into_body(), 4 * 1024 * 1024)
            .collect()
            .await;
        state.rejected_api_requests.fetch_add(1, Ordering::SeqCst);
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"errors": {"authorization": [reason]}}),
        );
    }
    state.api_requests.fetch_add(1, Ordering::SeqCst);
    if state.fast_api.load(Ordering::Relaxed) {
        let body = match request.uri().query() {
            Some(q) if q.contains("kib=64") => FAST_64K.clone(),
            _ => FAST_1K.clone(),
        };
        let mut response = Response::new(Either::Left(Full::new(body)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return response;
    }

    let query = request.uri().query().unwrap_or("");
    let param = |name: &str| -> Option<u64> {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    match request.uri().path() {
        "/api/_download" => {
            let size = param("bytes").unwrap_or(0);
            let mut response = Response::new(Either::Right(Either::Left(PatternBody::new(size))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        "/api/_stall" => {
            // Sends `bytes` of a body that claims more, then goes silent.
            let size = param("bytes").unwrap_or(0);
            stream_then(size, size + 1, Ending::Stall)
        }
        "/api/_broken" => {
            // Sends `bytes` of a body that claims more, then breaks the
            // connection.
            let size = param("bytes").unwrap_or(0);
            stream_then(size, size + 1, Ending::Break)
        }
        "/api/_status" => {
            // Answers with the given status, like Coupa's own 429s.
            let code = param("code")
                .and_then(|c| u16::try_from(c).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
            let mut response = json(
                code,
                serde_json::json!({"errors": {"fake": [format!("status {code}")]}}),
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("7"));
            response
        }
        "/api/_slow" => {
            let ms = param("ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(request).await
        }
        _ => echo(request).await,
    }
}

enum Ending {
    Stall,
    Break,
}

pin_project_lite::pin_project! {
    /// Pattern bytes, then a stall or an error: an upstream failing mid-body.
    pub struct FaultyBody {
        pattern: PatternBody,
        claimed: u64,
        ending: Option<Ending>,
        #[pin]
        stall: tokio::time::Sleep,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fake Coupa broke the response on purpose")]
struct Broken;

fn stream_then(size: u64, claimed: u64, ending: Ending) -> Response<FakeBody> {
    let body = FaultyBody {
        pattern: PatternBody::new(size),
        claimed,
        ending: Some(ending),
        stall: tokio::time::sleep(Duration::from_secs(3600)),
    };
    let mut response = Response::new(Either::Right(Either::Right(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

impl Body for FaultyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(chunk) = this.pattern.next_chunk() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match this.ending {
            Some(Ending::Break) => {
                *this.ending = None;
                Poll::Ready(Some(Err(Box::new(Broken))))
            }
            Some(Ending::Stall) => this.stall.poll(cx).map(|_| None),
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.claimed)
    }
}

/// Answers with what was received; the body is hashed as it streams in, so
/// uploads of any size use constant memory.
async fn echo(request: Request<Incoming>) -> Response<FakeBody> {
    let (parts, mut body) = request.into_parts();
    let mut hasher = Sha256::new();
    let mut length: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    length += data.len() as u64;
                }
            }
            Err(err) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"errors": {"body": [err.to_string()]}}),
                )
            }
        }
    }
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({
            "method": parts.method.as_str(),
            "target": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": length,
            "body_sha256": hex(&hasher.finalize()),
        }),
    )
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Byte `i` of every download is `i % 251`: cheap to produce, easy to check,
/// and not a multiple of any buffer size.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// SHA-256 (hex) of the first `size` pattern bytes, for checking downloads.
pub fn pattern_sha256(size: u64) -> String {
    let mut hasher = Sha256::new();
    let mut body = PatternBody::new(size);
    while let Some(chunk) = body.next_chunk() {
        hasher.update(&chunk);
    }
    hex(&hasher.finalize())
}

const CHUNK: usize = 64 * 1024;

/// A streamed body of the download pattern, produced chunk by chunk.
pub struct PatternBody {
    /// One chunk plus a period, so any chunk is a zero-copy slice.
    source: Bytes,
    offset: u64,
    remaining: u64,
}

impl PatternBody {
    pub fn new(size: u64) -> Self {
        let source: Vec<u8> = (0..(CHUNK + 251) as u64).map(pattern_byte).collect();
        Self {
            source: Bytes::from(source),
            offset: 0,
            remaining: size,
        }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let len = (CHUNK as u64).min(self.remaining) as usize;
        let start = (self.offset % 251) as usize;
        let chunk = self.source.slice(start..start + len);
        self.offset += len as u64;
        self.remaining -= len as u64;
        Some(chunk)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().next_chunk().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_bodies_are_json_of_the_stated_size() {
        for kib in [1, 64] {
            let body = fast_body(kib);
            assert_eq!(body.len(), kib * 1024);
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(parsed.as_array().is_some_and(|a| !a.is_empty()));
        }
    }

    #[test]
    fn pattern_body_is_continuous_across_chunks() {
        let mut body = PatternBody::new(CHUNK as u64 * 2 + 7);
        let mut all = Vec::new();
        while let Some(chunk) = body.next_chunk() {
            all.extend_from_slice(&chunk);
        }
        assert_eq!(all.len(), CHUNK * 2 + 7);
        for (i, b) in all.iter().enumerate() {
            assert_eq!(*b, pattern_byte(i as u64));
        }
    }
}
