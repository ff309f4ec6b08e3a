//! A fake Coupa instance, owned by the project, for tests, benches and the
//! demo (nobody here can reach a real one). `run` never starts it.
//!
//! It behaves like the parts of Coupa the proxy depends on:
//! - `POST /oauth2/token` validates the form encoding, the client id and
//!   secret (form or Basic, never both), the grant and that every requested
//!   scope is assigned to the client; it issues random tokens with a
//!   configurable lifetime and answers RFC 6749 errors otherwise;
//! - `/api/*` ([`api`]) requires a live bearer token (401 otherwise) and echoes
//!   what it received as JSON: method, target, headers, body length and SHA-256;
//!   `/api/_download?bytes=N` streams N bytes of a known pattern;
//!   `/api/_slow?ms=N` answers after a delay;
//! - the OAuth side of user-consented grants (authorize, PKCE, device
//!   authorization, refresh tokens) lives in [`oauth`].
//!
//! Switches make the token endpoint fail and revoke tokens; counters record
//! token requests and any use of an expired token.

mod api;
mod by_hand;
mod limit;
mod oauth;
pub mod relay;

use api::FaultyBody;
pub use api::{pattern_byte, pattern_sha256, PatternBody};
pub use by_hand::ByHandError;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
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
    /// Milliseconds every token answer is held back (a slow endpoint).
    token_delay_ms: AtomicU64,
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
    /// Coupa-like mode: resources need their scope, `/api/suppliers` lists.
    scoped_api: std::sync::atomic::AtomicBool,
    /// Coupa's rate limit, when played: API requests past it get 429.
    rate_limit: Mutex<Option<limit::Bucket>>,
    /// API requests answered 429 by that limit.
    throttled: AtomicU64,
    /// Until when every API request is answered 429, with this
    /// `Retry-After` (seconds): another client took the instance's budget.
    refusing: Mutex<Option<(std::time::Instant, u64)>>,
    /// Every bearer token the API side was sent, live or not.
    seen_bearers: Mutex<Vec<String>>,
    /// Every W3C `traceparent` the API side was sent.
    seen_traceparents: Mutex<Vec<String>>,
    /// The addresses connections came from.
    peers: Mutex<std::collections::BTreeSet<std::net::IpAddr>>,
}

/// The fixed answer of fast mode: a JSON array padded to `kib` KiB.
pub fn fast_body(kib: usize) -> Bytes {
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

    /// Plays Coupa's per-instance rate limit (`Some((per_second, burst))`,
    /// Coupa: 25 and 20): API requests past it are answered 429 with
    /// `Retry-After: 1`. `None`: no limit.
    pub fn set_rate_limit(&self, limit: Option<(f64, u32)>) {
        if let Ok(mut current) = self.rate_limit.lock() {
            *current = limit.map(|(per_second, burst)| limit::Bucket::new(per_second, burst));
        }
    }

    /// API requests answered 429 by [`Self::set_rate_limit`]'s limit.
    pub fn throttled_requests(&self) -> u64 {
        self.throttled.load(Ordering::SeqCst)
    }

    /// Answers every API request 429 with `Retry-After: retry_after`
    /// (seconds) for `period` from now.
    pub fn refuse_for(&self, period: Duration, retry_after: u64) {
        let until = std::time::Instant::now() + period;
        *self.refusing.lock().unwrap_or_else(|e| e.into_inner()) = Some((until, retry_after));
    }

    /// Whether [`Self::refuse_for`]'s period still runs.
    pub fn is_refusing(&self) -> bool {
        self.refusing_now().is_some()
    }

    /// The `Retry-After` of a refusal now, while [`Self::refuse_for`]'s
    /// period runs.
    fn refusing_now(&self) -> Option<u64> {
        let refusing = *self.refusing.lock().unwrap_or_else(|e| e.into_inner());
        refusing
            .filter(|(until, _)| std::time::Instant::now() < *until)
            .map(|(_, retry_after)| retry_after)
    }

    /// Whether the played rate limit lets a request through now.
    fn within_rate_limit(&self) -> bool {
        match self.rate_limit.lock() {
            Ok(mut limit) => limit
                .as_mut()
                .is_none_or(|bucket| bucket.admit(std::time::Instant::now())),
            Err(_) => true,
        }
    }

    fn oauth(&self) -> std::sync::MutexGuard<'_, oauth::OAuthState> {
        // A panicking test thread must not wedge the fake for the others.
        self.oauth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Coupa-like API: a resource needs its scope (`core.<resource
    /// singular>.read` to read, `.write` to change; write covers read;
    /// `core.common.read` reads departments and other master data) or
    /// gets 403, and `GET /api/suppliers` lists 120 suppliers, at most 50
    /// per call (`offset`, `limit`).
    pub fn set_scoped_api(&self, scoped: bool) {
        self.scoped_api.store(scoped, Ordering::Relaxed);
    }

    /// The bearer tokens sent to `/api/*` so far, in order (the first
    /// 1,000; none in fast mode).
    /// The addresses connections to the fake came from.
    pub fn peers(&self) -> Vec<std::net::IpAddr> {
        self.peers
            .lock()
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn seen_bearers(&self) -> Vec<String> {
        self.seen_bearers
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The `traceparent` headers sent to `/api/*` so far, in order (the
    /// first 1,000; none in fast mode).
    pub fn seen_traceparents(&self) -> Vec<String> {
        self.seen_traceparents
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
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

    /// Holds every token answer back for `delay` (a slow token endpoint).
    pub fn set_token_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.token_delay_ms.store(millis, Ordering::SeqCst);
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
    connections: crate::server::ConnectionGauges,
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
            token_delay_ms: AtomicU64::new(0),
            reject_all: std::sync::atomic::AtomicBool::new(false),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            rejected_api_requests: AtomicU64::new(0),
            expired_token_uses: AtomicU64::new(0),
            oauth: Mutex::new(oauth::OAuthState::default()),
            base_url: base_url(addr, options.tls.is_some()),
            fast_api: std::sync::atomic::AtomicBool::new(false),
            rate_limit: Mutex::new(None),
            throttled: AtomicU64::new(0),
            refusing: Mutex::new(None),
            scoped_api: std::sync::atomic::AtomicBool::new(false),
            seen_bearers: Mutex::new(Vec::new()),
            seen_traceparents: Mutex::new(Vec::new()),
            peers: Mutex::new(std::collections::BTreeSet::new()),
        });
        let shutdown = CancellationToken::new();
        let tls = options.tls.map(TlsAcceptor::from);
        let is_tls = tls.is_some();
        let served = state.clone();
        let connections = crate::server::ConnectionGauges::default();
        tokio::spawn(crate::server::serve(
            listener,
            tls,
            move |peer: SocketAddr, _guard| {
                if let Ok(mut peers) = served.peers.lock() {
                    peers.insert(peer.ip());
                }
                let state = served.clone();
                service_fn(move |request| route(state.clone(), request))
            },
            crate::server::Limits {
                max_connections: 100_000,
                gauges: connections.clone(),
                ..Default::default()
            },
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        Ok(Self {
            addr,
            tls: is_tls,
            state,
            connections,
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

    /// The state, to keep after the fake is handed to a thread of its own.
    pub fn shared_state(&self) -> Arc<FakeState> {
        self.state.clone()
    }

    /// Cancelled when the fake is dropped (a runtime of its own can end).
    pub fn stopped(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Connections open to the fake now (the proxy's upstream ones).
    pub fn open_connections(&self) -> i64 {
        self.connections.open.get()
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
        api::api(&state, request).await
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
