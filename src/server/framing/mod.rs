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
//! does; bodies skipped by length or by chunk size lines). Bytes pass
//! through as read, except that a head split across reads is held back
//! until it is whole, and two kinds of head are changed before hyper
//! reads them:
//! - a request target with bytes lenient servers accept but hyper's URI
//!   type refuses (`"` in a query, `<`, `>`): those bytes are
//!   percent-encoded (`target`), so Coupa decodes what the client sent;
//! - a malformed head (a control character in the target, a bad header
//!   line): replaced by a stand-in request that the server answers 400
//!   with the reason, the connection read no further.
//!
//! A head with both fields, or a malformed one, marks that request in the
//! connection's [`ConnectionGuard`]; the server answers it 400 itself
//! ([`ConnectionGuard::refusal`]) before the service sees it, and closes
//! the connection after it. Anything else the guard does not understand
//! it leaves to hyper, and stops inspecting that connection.
//!
//! Following the framing also tells when an HTTP/1 connection rests between
//! requests, which the server uses to give an idle connection's buffers
//! back ([`ConnectionGuard::is_idle`], `server::park`).

mod guard;
mod scan;
mod target;

use crate::encode::error_json_static;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use tracing::warn;

pub use guard::FramingGuard;

/// Why the server refused a request before any phase ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// Both `Content-Length` and `Transfer-Encoding`.
    AmbiguousFraming = 1,
    /// A method or target with a byte no server accepts there (a control
    /// character, a space inside the target), or a version other than 1.x.
    MalformedRequestLine = 2,
    /// A header line that is not `name: value` (a space in the name, an
    /// obs-fold continuation, a control character), or a bad line end.
    MalformedHead = 3,
}

impl Refusal {
    /// The stable name access lines and metrics use.
    pub fn reason(self) -> &'static str {
        match self {
            Self::AmbiguousFraming => "ambiguous_framing",
            Self::MalformedRequestLine => "malformed_request_line",
            Self::MalformedHead => "malformed_head",
        }
    }

    /// The refusal's JSON body.
    fn body(self) -> &'static str {
        match self {
            Self::AmbiguousFraming => error_json_static!(
                "ambiguous_framing",
                "the request has both Content-Length and Transfer-Encoding (possible request smuggling)"
            ),
            Self::MalformedRequestLine => error_json_static!(
                "malformed_request_line",
                "the request line is malformed: the method or target holds a byte no HTTP server accepts there (a space, a control character; percent-encode it), or the version is not HTTP/1.x"
            ),
            Self::MalformedHead => error_json_static!(
                "malformed_head",
                "a header line is malformed: not 'name: value' (a space or control character in the name, an obs-fold continuation line, a control character in the value) or a bad line end"
            ),
        }
    }

    /// A head `httparse` refused: which refusal, or `None` where hyper's
    /// own answer is the right one (431 for too many headers).
    fn of_malformed(error: httparse::Error) -> Option<Self> {
        match error {
            httparse::Error::Token | httparse::Error::Version => Some(Self::MalformedRequestLine),
            httparse::Error::HeaderName
            | httparse::Error::HeaderValue
            | httparse::Error::NewLine => Some(Self::MalformedHead),
            httparse::Error::TooManyHeaders | httparse::Error::Status => None,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            2 => Self::MalformedRequestLine,
            3 => Self::MalformedHead,
            _ => Self::AmbiguousFraming,
        }
    }
}

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
    /// Index of the first refused request; `u64::MAX` for none.
    refused_from: AtomicU64,
    /// Its [`Refusal`], as `u8`. Only one is ever set: no head is read
    /// after a refused one.
    refusal: AtomicU8,
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
    /// The guard cut the connection at the header-read timeout (hyper
    /// takes the guard's error for the client's end when it holds no
    /// bytes of the head, so the error itself does not reach the server).
    head_timed_out: AtomicBool,
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self {
            next_request: AtomicU64::new(0),
            refused_from: AtomicU64::new(u64::MAX),
            refusal: AtomicU8::new(0),
            heads: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            between_requests: AtomicBool::new(true),
            unflushed: AtomicBool::new(false),
            end_session: AtomicBool::new(false),
            head_timed_out: AtomicBool::new(false),
        }
    }
}

impl ConnectionGuard {
    /// Called once per request, in order: the server's own answer if this
    /// request was refused (ambiguous framing, a malformed head). Nothing
    /// of it may be served, and the connection cannot be trusted after it,
    /// so the answer closes it.
    #[inline]
    pub fn refusal(&self) -> Option<(Refusal, Response<Full<Bytes>>)> {
        let index = self.next_request.fetch_add(1, Ordering::Relaxed);
        if index < self.refused_from.load(Ordering::Acquire) {
            return None;
        }
        let refusal = Refusal::from_u8(self.refusal.load(Ordering::Relaxed));
        Some((refusal, refusal_answer(refusal)))
    }

    fn refuse(&self, index: u64, refusal: Refusal) {
        if index < self.refused_from.load(Ordering::Relaxed) {
            self.refusal.store(refusal as u8, Ordering::Relaxed);
            self.refused_from.store(index, Ordering::Release);
        }
    }

    /// A response was written to its end.
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Every request read has been answered and flushed, and nothing of
    /// the next one has arrived: hyper waits for a head and holds nothing
    /// of the client's. A connection that stopped being followed (HTTP/2,
    /// a head the guard left to hyper) is never idle.
    pub fn head_timed_out(&self) -> bool {
        self.head_timed_out.load(Ordering::Relaxed)
    }

    pub(super) fn note_head_timeout(&self) {
        self.head_timed_out.store(true, Ordering::Relaxed);
    }

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
fn refusal_answer(refusal: Refusal) -> Response<Full<Bytes>> {
    static AMBIGUOUS: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
    if refusal == Refusal::AmbiguousFraming {
        if let Some(left_out) = AMBIGUOUS.due() {
            warn!(
                left_out,
                "request refused: both Content-Length and Transfer-Encoding (possible request smuggling); connection closed \
                 (each has its access line; repeats are summarised once a minute)"
            );
        }
    }
    let mut response = Response::new(Full::new(Bytes::from_static(refusal.body().as_bytes())));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
