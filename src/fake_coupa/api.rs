//! The fake's API side: `/api/*` needs a live bearer token, then echoes
//! what it received, or streams a known pattern (`_download`), answers late
//! (`_slow`), or ends a body badly (faults for the proxy's error paths).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use super::*;

pub(super) async fn api(state: &FakeState, request: Request<Incoming>) -> Response<FakeBody> {
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    // Kept for the tests (bounded); not in the benchmark's fast mode.
    if !state.fast_api.load(Ordering::Relaxed) {
        if let (Some(token), Ok(mut seen)) = (&token, state.seen_bearers.lock()) {
            if seen.len() < 1_000 {
                seen.push(token.clone());
            }
        }
        let traceparent = request.headers().get("traceparent");
        if let (Some(traceparent), Ok(mut seen)) = (traceparent, state.seen_traceparents.lock()) {
            if seen.len() < 1_000 {
                seen.push(String::from_utf8_lossy(traceparent.as_bytes()).into_owned());
            }
        }
    }
    let reason = rejection(state, token.as_deref());
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
    let refusal = match state.refusing_now() {
        Some(retry_after) => Some(retry_after),
        None => (!state.within_rate_limit()).then_some(1),
    };
    if let Some(retry_after) = refusal {
        // Like a real server, read the request before answering it.
        let _ = http_body_util::Limited::new(request.into_body(), 4 * 1024 * 1024)
            .collect()
            .await;
        state.throttled.fetch_add(1, Ordering::SeqCst);
        let mut response = json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"errors": {"rate_limit": ["Too many requests"]}}),
        );
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
        return response;
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

    let query = request.uri().query().unwrap_or("").to_owned();
    let param = |name: &str| -> Option<u64> {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    if state.scoped_api.load(Ordering::Relaxed) {
        let scope = token
            .as_deref()
            .and_then(|t| state.token_scope(t))
            .unwrap_or_default();
        if let Some(missing) = missing_scope(request.method(), request.uri().path(), &scope) {
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"errors": {"authorization": [format!("needs scope {missing}")]}}),
            );
        }
        if request.method() == http::Method::GET && request.uri().path() == "/api/suppliers" {
            return suppliers_page(param("offset").unwrap_or(0), param("limit").unwrap_or(50));
        }
    }
    route(request, param).await
}

/// The test endpoints (`/api/_…`) by path; any other path echoes.
async fn route(
    request: Request<Incoming>,
    param: impl Fn(&str) -> Option<u64>,
) -> Response<FakeBody> {
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

/// Why a bearer token is refused, if it is.
fn rejection(state: &FakeState, token: Option<&str>) -> Option<&'static str> {
    let verdict = token
        .map(|t| state.check_token(t))
        .unwrap_or(TokenCheck::Unknown);
    match verdict {
        TokenCheck::Live => None,
        TokenCheck::Expired => {
            state.expired_token_uses.fetch_add(1, Ordering::SeqCst);
            Some("token expired")
        }
        TokenCheck::Revoked => Some("token revoked"),
        TokenCheck::Unknown => Some("missing or unknown token"),
    }
}

/// Suppliers the scoped API lists.
const SUPPLIERS: u64 = 120;

/// The scope `path` needs for `method` that `granted` lacks, if any.
fn missing_scope(method: &http::Method, path: &str, granted: &str) -> Option<String> {
    let resource = path.strip_prefix("/api/")?.split('/').next()?;
    if !resource.starts_with(|c: char| c.is_ascii_lowercase()) {
        return None;
    }
    let read = matches!(*method, http::Method::GET | http::Method::HEAD);
    // Shared master data is read with core.common.read.
    const COMMON: [&str; 4] = ["departments", "lookup_values", "currencies", "addresses"];
    if read
        && COMMON.contains(&resource)
        && granted.split_whitespace().any(|g| g == "core.common.read")
    {
        return None;
    }
    let stem = format!("core.{}", resource.strip_suffix('s').unwrap_or(resource));
    let write_scope = format!("{stem}.write");
    let read_scope = format!("{stem}.read");
    let has = |scope: &str| granted.split_whitespace().any(|g| g == scope);
    let allowed = has(&write_scope) || (read && has(&read_scope));
    (!allowed).then_some(if read { read_scope } else { write_scope })
}

/// One page of the supplier list: at most 50 records, like Coupa.
fn suppliers_page(offset: u64, limit: u64) -> Response<FakeBody> {
    let end = SUPPLIERS.min(offset.saturating_add(limit.min(50)));
    let records: Vec<serde_json::Value> = (offset..end)
        .map(|i| serde_json::json!({"id": i + 1, "name": format!("Supplier {}", i + 1)}))
        .collect();
    json(StatusCode::OK, serde_json::Value::Array(records))
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
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let digest = crate::encode::hex(&hasher.finalize());
    if answers_xml(&parts.headers) {
        return xml_echo(&parts.method, target, &headers, length, &digest);
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "method": parts.method.as_str(),
            "target": target,
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": length,
            "body_sha256": digest,
        }),
    )
}

/// Coupa answers XML when a request carries no `Accept`, and when the
/// `Accept` asks for XML rather than JSON.
fn answers_xml(headers: &http::HeaderMap) -> bool {
    let accept: Vec<String> = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .collect();
    accept.is_empty()
        || (accept.iter().any(|a| a.contains("xml")) && !accept.iter().any(|a| a.contains("json")))
}

/// The echo as Coupa-style XML: one parent node.
fn xml_echo(
    method: &http::Method,
    target: &str,
    headers: &[(String, String)],
    length: u64,
    digest: &str,
) -> Response<FakeBody> {
    let escape = crate::encode::html;
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<echo><method>{}</method><target>{}</target><headers>",
        escape(method.as_str()),
        escape(target)
    );
    for (name, value) in headers {
        xml.push_str(&format!(
            "<header name=\"{}\">{}</header>",
            escape(name),
            escape(value)
        ));
    }
    xml.push_str(&format!(
        "</headers><body-bytes type=\"integer\">{length}</body-bytes><body-sha256>{digest}</body-sha256></echo>"
    ));
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(xml))));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/xml; charset=utf-8"),
    );
    response
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
    crate::encode::hex(&hasher.finalize())
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
        // Made once: hundreds of large downloads at once (the slow-read
        // tests) should cost the fake nothing but the sending.
        static SOURCE: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
        let source = SOURCE.get_or_init(|| {
            Bytes::from(
                (0..(CHUNK + 251) as u64)
                    .map(pattern_byte)
                    .collect::<Vec<u8>>(),
            )
        });
        Self {
            source: source.clone(),
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
