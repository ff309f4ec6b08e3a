//! The admin listener: probes for orchestrators, Prometheus metrics, and a
//! status page for people.
//!
//! - `/healthz`: 200 while the process runs.
//! - `/readyz`: 200 only while every credential holds a valid token and the
//!   proxy is not shutting down, so a load balancer never routes to a proxy
//!   that would answer 503 or is draining.
//! - `/metrics`: Prometheus text format ([`crate::metrics`]).
//! - `/` and `/status.json`: credentials, integrations, version, uptime —
//!   server-rendered, no external assets, nothing secret; off loopback
//!   behind a password ([`access`]).

mod access;
mod page;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::guesses::{Guess, Guesses};
use crate::insight::Insight;
use crate::metrics::{Metrics, Stores};
use crate::proxy::Shared;
use crate::token::shared::credential_digest;
use access::{StatusAccess, Verdict};

/// What a credential is, for the status page (no secret).
struct CredentialInfo {
    client_id: String,
    scopes: String,
    grant: &'static str,
}

pub struct AdminState {
    /// Cancelled when the proxy starts draining: from then on `/readyz`
    /// says 503 so load balancers stop sending new requests.
    draining: tokio_util::sync::CancellationToken,
    /// `true` once the first warm connection to Coupa was tried: ready
    /// means the first calls skip the handshakes too.
    first_warm: tokio::sync::watch::Receiver<bool>,
    stores: Stores,
    metrics: Arc<Metrics>,
    insight: Arc<Insight>,
    credentials: Vec<CredentialInfo>,
    upstream: String,
    /// [`Config::warnings`] of the running configuration.
    config_warnings: Vec<String>,
    /// With `[cluster]`: the shared state, and each shared credential's
    /// (name, key digest), for the cluster view.
    cluster: Option<SharedView>,
    /// Who may read the status page.
    access: StatusAccess,
    /// Wrong status-page passwords count as guesses.
    guesses: Arc<Guesses>,
}

/// What the status page shows of the cluster: its state, and the
/// credentials fetched once for all processes, as (name, key digest).
struct SharedView {
    cluster: Arc<Cluster>,
    credentials: Vec<(String, String)>,
}

impl AdminState {
    /// `address`: the admin socket's own address (a handed-over socket's
    /// may differ from `admin.address`).
    pub fn new(
        config: &Config,
        address: Option<SocketAddr>,
        stores: Stores,
        metrics: Arc<Metrics>,
        Shared { insight, guesses }: Shared,
        (draining, first_warm): (
            tokio_util::sync::CancellationToken,
            tokio::sync::watch::Receiver<bool>,
        ),
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        let cluster = cluster.map(|cluster| {
            let shared = config
                .credentials
                .iter()
                .filter(|c| c.oauth.grant.consent().is_none())
                .map(|c| (c.name.clone(), credential_digest(&c.oauth)))
                .collect();
            SharedView {
                cluster,
                credentials: shared,
            }
        });
        Self {
            draining,
            first_warm,
            stores,
            metrics,
            insight,
            credentials: config
                .credentials
                .iter()
                .map(|c| CredentialInfo {
                    client_id: c.oauth.client_id.clone(),
                    scopes: c.oauth.scopes.join(" "),
                    grant: c.oauth.grant.kind().as_str(),
                })
                .collect(),
            upstream: config.coupa.base_url.clone(),
            config_warnings: config.warnings_with_env(),
            cluster,
            access: StatusAccess::new(address, config.admin.status_password_sha256),
            guesses,
        }
    }
}

pub async fn handle(
    request: Request<Incoming>,
    state: Arc<AdminState>,
    peer: IpAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        ));
    }
    // Probes and Prometheus never log in.
    match request.uri().path() {
        "/healthz" => return Ok(json(StatusCode::OK, serde_json::json!({"status": "ok"}))),
        "/readyz" => return Ok(readiness(&state)),
        "/metrics" => {
            return Ok(text(
                "text/plain; version=0.0.4; charset=utf-8",
                state.metrics.render(),
            ))
        }
        _ => {}
    }
    match state.access.check(request.headers()) {
        Verdict::Allowed => {}
        Verdict::Asked => return Ok(login_required("a password is required")),
        Verdict::Refused => {
            state.guesses.failed(peer, Guess::StatusLogin).await;
            return Ok(login_required("the password is wrong"));
        }
        Verdict::Closed => {
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({
                    "error": "status_page_closed",
                    "message": CLOSED,
                }),
            ))
        }
    }
    Ok(match request.uri().path() {
        "/status.json" => json(StatusCode::OK, status(&state).await),
        "/" => text(
            "text/html; charset=utf-8",
            page::status_page(&status(&state).await),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({
                "error": "not_found",
                "endpoints": ["/", "/status.json", "/metrics", "/healthz", "/readyz"],
            }),
        ),
    })
}

/// Each credential's token state.
fn credentials(state: &AdminState) -> Vec<serde_json::Value> {
    let now = tokio::time::Instant::now();
    state
        .stores
        .iter()
        .zip(&state.credentials)
        .map(|((name, store), info)| {
            let status = store.status();
            let token = store.current(now);
            let expires_in = token.as_ref().map(|t| {
                t.expires_at_wall
                    .duration_since(SystemTime::now())
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            });
            let age = token
                .as_ref()
                .map(|t| now.saturating_duration_since(t.issued_at).as_secs());
            let wall_now = SystemTime::now();
            let refresh = status.refresh_token.as_ref();
            serde_json::json!({
                "credential": name,
                "client_id": info.client_id,
                "grant": info.grant,
                "scopes": info.scopes,
                "granted_scopes": token.as_ref().and_then(|t| t.scope.clone()),
                "ready": token.is_some(),
                "token_age_seconds": age,
                "token_expires_in_seconds": expires_in,
                "last_refresh": if status.last_error.is_some() { "failed" } else if status.fetches_ok > 0 { "ok" } else { "pending" },
                "last_token_error": status.last_error,
                "fetches_ok": status.fetches_ok,
                "fetches_failed": status.fetches_failed,
                "refresh_token_expires_in_seconds": refresh.map(|r| r.remaining(wall_now).as_secs()),
                "warning": refresh.and_then(|r| r.warning(wall_now)),
            })
        })
        .collect()
}

/// Ready when every credential holds a valid token and the first warm
/// connection to Coupa has been tried (opened or failed: a connection that
/// cannot be opened does not hold readiness). The top-level fields
/// describe the first credential not ready (or the first one), so a
/// single-credential set-up reads simply.
fn readiness(state: &AdminState) -> Response<Full<Bytes>> {
    let mut credentials = credentials(state);
    if state.access.off_loopback() {
        // Open to every prober: what a credential is stays behind the
        // status page's password.
        for credential in &mut credentials {
            if let Some(fields) = credential.as_object_mut() {
                for private in ["client_id", "scopes", "granted_scopes"] {
                    fields.remove(private);
                }
            }
        }
    }
    let draining = state.draining.is_cancelled();
    let warm = *state.first_warm.borrow();
    let ready = !draining && warm && credentials.iter().all(|c| c["ready"] == true);
    let headline = credentials
        .iter()
        .find(|c| c["ready"] != true)
        .or_else(|| credentials.first())
        .cloned()
        .unwrap_or_default();
    // Not a reason to refuse traffic today, but someone must act soon.
    let warnings: Vec<String> = state
        .config_warnings
        .iter()
        .cloned()
        .chain(credentials.iter().filter_map(|c| {
            c["warning"].as_str().map(|w| {
                format!(
                    "credential {}: {w}",
                    c["credential"].as_str().unwrap_or("?")
                )
            })
        }))
        .collect();
    let body = serde_json::json!({
        "ready": ready,
        "draining": draining,
        "warm_connection_tried": warm,
        "warnings": warnings,
        "token_expires_in_seconds": headline["token_expires_in_seconds"],
        "last_token_error": headline["last_token_error"],
        "credentials": credentials,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, body)
}

async fn status(state: &AdminState) -> serde_json::Value {
    let cluster = match &state.cluster {
        Some(shared) => shared.cluster.view(&shared.credentials).await,
        None => serde_json::Value::Null,
    };
    let integrations = state.insight.snapshot();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.metrics.uptime().as_secs(),
        "upstream": state.upstream,
        "credentials": credentials(state),
        "integrations": integrations,
        "coupa_budget": state.insight.budget_view(),
        "cluster": cluster,
    })
}

/// Why the status page is closed off loopback without a password.
const CLOSED: &str = "the admin listener is not on loopback and admin.status_password_sha256 is not set, \
     so the status page and /status.json are closed (/healthz, /readyz and /metrics stay open): \
     set admin.status_password_sha256 to the digest `coupa-auth-proxy hash-key` prints for a password";

/// `401` with the challenge a browser answers with its login prompt.
fn login_required(message: &str) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": "login_required", "message": message}),
    );
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"coupa-auth-proxy status\", charset=\"UTF-8\""),
    );
    response
}

fn text(content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
