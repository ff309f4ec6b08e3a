//! A guard on inbound HTTP/1 connections against request smuggling by
//! ambiguous framing.
//!
//! hyper rejects most smuggling shapes itself (duplicate differing
//! `Content-Length`, obs-fold, a `Transfer-Encoding` other than chunked,
//! bad chunk sizes). One it accepts: a request with *both*
//! `Content-Length` and `Transfer-Encoding`, which RFC 9112 lets a server
//! read as chunked — and then hyper drops the `Content-Length` before the
//! proxy sees the request, so the ambiguity is invisible from inside.
//!
//! [`FramingGuard`] (in `guard`) sits between the socket and hyper and
//! follows the request stream's framing just far enough to find each
//! request head (the pure `scan`: heads parsed with `httparse`, as hyper
//! does; bodies skipped by length or by chunk size lines). It never delays
//! or changes a byte: it only reads along. A head with both fields marks
//! that request in the connection's [`ConnectionGuard`]; the server answers
//! it 400 itself ([`ConnectionGuard::refusal`]) before the service sees it,
//! and closes the connection after it. Anything the guard does not understand it leaves to hyper, which is
//! stricter than the guard, and stops inspecting that connection.
//!
//! Following the framing also tells when an HTTP/1 connection rests between
//! requests, which the server uses to give an idle connection's buffers
//! back ([`ConnectionGuard::is_idle`], `server::park`).

mod guard;
mod scan;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use tracing::warn;

pub use guard::FramingGuard;

/// Body of the answer to a request with ambiguous framing.
const AMBIGUOUS_FRAMING: &str = r#"{"error":"ambiguous_framing","message":"the request has both Content-Length and Transfer-Encoding (possible request smuggling)","source":"coupa-auth-proxy"}"#;

/// Per-connection verdicts, shared by the guard (writer) and the service
/// (reader). Requests on one HTTP/1 connection are handled in order, so
/// the n-th head the guard sees is the n-th request the service gets.
///
/// Also what the server needs to see that the connection is idle. The
/// guard, the service and the server's driver all run in the connection's
/// task, so relaxed atomics suffice for those fields.
#[derive(Debug)]
pub struct ConnectionGuard {
    next_request: AtomicU64,
    /// Index of the first request with ambiguous framing; `u64::MAX` for none.
    ambiguous: AtomicU64,
    /// Request heads the guard has read whole.
    heads: AtomicU64,
    /// Responses written to their end (hyper dropped their body).
    answered: AtomicU64,
    /// The guard is between requests: expecting a head, none of it read.
    between_requests: AtomicBool,
    /// A write waits for the socket: a response is not flushed yet.
    unflushed: AtomicBool,
    /// Asked by the server: answer the next read between requests with
    /// end-of-stream, so hyper ends its session and hands the socket back.
    end_session: AtomicBool,
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self {
            next_request: AtomicU64::new(0),
            ambiguous: AtomicU64::new(u64::MAX),
            heads: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            between_requests: AtomicBool::new(true),
            unflushed: AtomicBool::new(false),
            end_session: AtomicBool::new(false),
        }
    }
}

impl ConnectionGuard {
    /// Called once per request, in order: the server's own answer if this
    /// request's framing is ambiguous. Nothing of it may be served, and the
    /// connection cannot be trusted after it, so the answer closes it.
    #[inline]
    pub fn refusal(&self) -> Option<Response<Full<Bytes>>> {
        let index = self.next_request.fetch_add(1, Ordering::Relaxed);
        if index < self.ambiguous.load(Ordering::Acquire) {
            return None;
        }
        Some(ambiguous_framing_answer())
    }

    fn mark_ambiguous(&self, index: u64) {
        self.ambiguous.fetch_min(index, Ordering::AcqRel);
    }

    /// A response was written to its end.
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Every request read has been answered and flushed, and nothing of
    /// the next one has arrived: hyper waits for a head and holds nothing
    /// of the client's. A connection that stopped being followed (HTTP/2,
    /// a head the guard left to hyper) is never idle.
    pub fn is_idle(&self) -> bool {
        self.between_requests.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && self.heads.load(Ordering::Relaxed) == self.answered.load(Ordering::Relaxed)
    }

    /// Asks the guard to end hyper's session at the next read between
    /// requests (`true`), or to stop doing so.
    pub fn end_session(&self, end: bool) {
        self.end_session.store(end, Ordering::Relaxed);
    }
}

/// The refusal itself, out of the per-request path.
#[cold]
fn ambiguous_framing_answer() -> Response<Full<Bytes>> {
    warn!("request refused: both Content-Length and Transfer-Encoding (possible request smuggling); connection closed");
    let mut response = Response::new(Full::new(Bytes::from_static(AMBIGUOUS_FRAMING.as_bytes())));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
