//! The admin listener: liveness and readiness for orchestrators.
//!
//! `/healthz` is 200 while the process runs; `/readyz` is 200 only while a
//! valid token is held, so a load balancer never routes to a proxy that
//! would answer 503.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::token::TokenStore;

/// Token stores by credential name.
pub type Stores = Arc<Vec<(String, Arc<TokenStore>)>>;

pub async fn handle(
    request: Request<Incoming>,
    stores: Stores,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        ));
    }
    Ok(match request.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => readiness(&stores),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "endpoints": ["/healthz", "/readyz"]}),
        ),
    })
}

/// Ready when every credential holds a valid token. The top-level fields
/// describe the first credential not ready (or the first one), so a
/// single-credential set-up reads simply.
fn readiness(stores: &[(String, Arc<TokenStore>)]) -> Response<Full<Bytes>> {
    let now = tokio::time::Instant::now();
    let credentials: Vec<serde_json::Value> = stores
        .iter()
        .map(|(name, store)| {
            let status = store.status();
            let token = store.current(now);
            let expires_in = token.as_ref().map(|t| {
                t.expires_at_wall
                    .duration_since(SystemTime::now())
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            });
            serde_json::json!({
                "credential": name,
                "ready": token.is_some(),
                "token_expires_in_seconds": expires_in,
                "last_token_error": status.last_error,
            })
        })
        .collect();
    let ready = credentials.iter().all(|c| c["ready"] == true);
    let headline = credentials
        .iter()
        .find(|c| c["ready"] != true)
        .or_else(|| credentials.first())
        .cloned()
        .unwrap_or_default();
    let body = serde_json::json!({
        "ready": ready,
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

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
