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

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::guesses::{Guess, Guesses};
use crate::insight::{chart, Insight};
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
            status_page(&status(&state).await),
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

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "—".to_owned(),
        serde_json::Value::String(s) => crate::encode::html(s),
        other => crate::encode::html(&other.to_string()),
    }
}

fn seconds(value: &serde_json::Value) -> String {
    value
        .as_u64()
        .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
        .unwrap_or_else(|| "—".to_owned())
}

/// The status page: one self-contained HTML document.
fn status_page(status: &serde_json::Value) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\"><title>coupa-auth-proxy</title>\
         <style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
         .ok{color:#060}.bad{color:#a00}h3{margin:1.5em 0 .3em}.chart{display:block}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>coupa-auth-proxy {}</h1><p>Upstream {} · up {}</p><h2>Credentials</h2>\
         <table><tr><th>credential</th><th>client id</th><th>grant</th><th>scopes</th>\
         <th>token age</th><th>expires in</th><th>last refresh</th><th>last error</th>\
         <th>refresh token ends in</th></tr>",
        cell(&status["version"]),
        cell(&status["upstream"]),
        seconds(&status["uptime_seconds"]),
    );
    for c in status["credentials"].as_array().into_iter().flatten() {
        let class = if c["ready"] == true { "ok" } else { "bad" };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            cell(&c["credential"]),
            cell(&c["client_id"]),
            cell(&c["grant"]),
            cell(&c["scopes"]),
            seconds(&c["token_age_seconds"]),
            seconds(&c["token_expires_in_seconds"]),
            cell(&c["last_refresh"]),
            cell(&c["last_token_error"]),
            match c["warning"].as_str() {
                Some(warning) => format!(
                    "<span class=\"bad\">{}</span>",
                    crate::encode::html(warning)
                ),
                None => seconds(&c["refresh_token_expires_in_seconds"]),
            },
        );
    }
    html.push_str("</table>");
    budget_section(&mut html, &status["coupa_budget"]);
    html.push_str("<h2>Integrations</h2>");
    let integrations = status["integrations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if integrations.is_empty() {
        html.push_str("<p>No traffic yet.</p>");
    }
    for i in &integrations {
        integration_section(&mut html, i);
    }
    if let Some(cluster) = status["cluster"].as_object() {
        let _ = write!(
            html,
            "<h2>Cluster</h2><p>{} · this process {}</p><table><tr><th>processes seen \
             in the last 30 s</th></tr>",
            cell(&cluster["redis"]),
            cell(&cluster["this_process"]),
        );
        let connection = cluster
            .get("connection")
            .unwrap_or(&serde_json::Value::Null);
        if connection["sentinel"] == true {
            let _ = write!(
                html,
                "<p>primary {} (named by Sentinel) since {} · failovers followed: {}</p>",
                cell(&connection["primary"]),
                cell(&connection["primary_since"]),
                cell(&connection["failovers_followed"]),
            );
        }
        for process in cluster["processes_seen"].as_array().into_iter().flatten() {
            let _ = write!(html, "<tr><td>{}</td></tr>", cell(process));
        }
        html.push_str("</table><table><tr><th>credential</th><th>fetching a token now</th></tr>");
        for (name, holder) in cluster["fetching_now"].as_object().into_iter().flatten() {
            let holder = holder
                .as_str()
                .map(crate::encode::html)
                .unwrap_or_else(|| "nobody".into());
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{holder}</td></tr>",
                crate::encode::html(name)
            );
        }
        html.push_str("</table>");
    }
    html.push_str(
        "<p><a href=\"/status.json\">status.json</a> · <a href=\"/metrics\">metrics</a></p>\
         </body></html>",
    );
    html
}

/// Coupa's budget over the last hour: how often Coupa refused the proxy,
/// and what clients outside it seem to take.
fn budget_section(html: &mut String, budget: &serde_json::Value) {
    let Some(per_second) = budget["per_second"].as_f64() else {
        return;
    };
    let minutes = budget["refused_minutes_last_hour"].as_u64().unwrap_or(0);
    let _ = write!(
        html,
        "<h2>Coupa's budget</h2><p>{per_second:.0} requests/s configured; in the last hour Coupa refused the proxy (429) in {minutes} minutes"
    );
    if let Some(share) = budget["outside_share_estimate"].as_f64() {
        let _ = write!(
            html,
            "; clients outside the proxy took about {:.0} % of the budget then",
            share * 100.0
        );
    }
    html.push_str(".</p>");
    if let Some(hint) = budget["hint"].as_str() {
        let _ = write!(
            html,
            "<p class=\"flag bad\">⚑ {}</p>",
            crate::encode::html(hint)
        );
    }
}

/// One integration of the migration view: what identifies it, when it was
/// seen, its flags, the last hour, and its resources.
fn integration_section(html: &mut String, i: &serde_json::Value) {
    let rate = i["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
    let identified = &i["identified_by"];
    let mut by = Vec::new();
    if identified["legacy_key"] == true {
        by.push("legacy key".to_owned());
    }
    if let Some(id) = identified["oauth_client_id"].as_str() {
        by.push(format!("local OAuth client {}", crate::encode::html(id)));
    }
    let _ =
        write!(
        html,
        "<h3>{}</h3><p>credential {} · identified by {} · {} requests, {} errors ({rate:.1} %), \
         {} refused by Coupa (4xx) · first seen {} · last seen {}</p>",
        cell(&i["integration"]),
        cell(&i["credential"]),
        if by.is_empty() { "—".to_owned() } else { by.join(", ") },
        cell(&i["requests"]),
        cell(&i["errors"]),
        cell(&i["refused_by_coupa"]),
        cell(&i["first_seen"]),
        cell(&i["last_seen"]),
    );
    let relied: Vec<String> = i["default_accept"]["relied_on"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(format, n)| format!("{n} {}", crate::encode::html(format)))
        .collect();
    if let Some(given) = i["default_accept"]["given"].as_str() {
        let _ = write!(
            html,
            "<p>requests without Accept are given {}; sent without Accept: {}</p>",
            crate::encode::html(given),
            if relied.is_empty() {
                "none".to_owned()
            } else {
                relied.join(", ")
            },
        );
    }
    if let Some(slots) = i["budget"]["slots_last_hour"].as_u64() {
        let share = i["budget"]["share_last_hour"].as_f64().unwrap_or(0.0) * 100.0;
        let _ = write!(
            html,
            "<p>Coupa's budget in the last hour: {slots} slots, {share:.1} % of it</p>"
        );
    }
    let coupa_429 = &i["coupa_429_last_hour"];
    if let Some(refused) = coupa_429["refused"].as_u64().filter(|n| *n > 0) {
        let resent = coupa_429["resent"].as_u64().unwrap_or(0);
        let waited = coupa_429["resend_wait_seconds"].as_f64().unwrap_or(0.0);
        let _ = write!(
            html,
            "<p>Coupa's own 429s in the last hour: {refused}, sent again {resent} times after {waited:.0} s of waiting in all \
             (other clients share the instance's budget)</p>"
        );
    }
    for flag in i["flags"].as_array().into_iter().flatten() {
        let _ = write!(
            html,
            "<p class=\"flag bad\">⚑ {}</p>",
            cell(&flag["message"])
        );
    }
    let series: Vec<u64> = i["requests_per_minute"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect();
    html.push_str(&chart::requests_per_minute(&series));
    html.push_str(
        "<table><tr><th>resource</th><th>requests</th><th>methods</th><th>answers</th>\
         <th>403</th></tr>",
    );
    let pairs = |value: &serde_json::Value| -> String {
        value
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{} {}", crate::encode::html(k), cell(v)))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    for r in i["resources"].as_array().into_iter().flatten() {
        let forbidden = r["forbidden"].as_u64().unwrap_or(0);
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{forbidden}</td></tr>",
            cell(&r["resource"]),
            cell(&r["requests"]),
            pairs(&r["methods"]),
            pairs(&r["answers"]),
            if forbidden > 0 { " class=\"bad\"" } else { "" },
        );
    }
    html.push_str("</table>");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_on_the_page_is_closed_and_none_is_empty() {
        for cluster in [
            serde_json::Value::Null,
            serde_json::json!({"redis": "up", "this_process": "p", "processes_seen": ["p"], "fetching_now": {"default": null}}),
        ] {
            let status = serde_json::json!({
                "credentials": [{"credential": "default", "ready": true}],
                "integrations": [{"integration": "erp", "identified_by": {"legacy_key": true},
                    "flags": [], "requests_per_minute": [0, 1],
                    "resources": [{"resource": "invoices", "requests": 1, "forbidden": 0,
                        "methods": {"GET": 1}, "answers": {"2xx": 1}}]}],
                "cluster": cluster,
            });
            let html = status_page(&status);
            assert_eq!(
                html.matches("<table").count(),
                html.matches("</table>").count(),
                "{html}"
            );
            assert!(!html.contains("<table></table>"), "{html}");
            assert!(html.ends_with("</body></html>"));
        }
    }
}
