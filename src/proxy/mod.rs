//! The request path: one client request in, one Coupa request out.
//!
//! A request goes through named phases, each a method of [`Proxy`] over
//! one per-request [`Trace`], so a reader knows where a change belongs
//! (`Proxy::forward` calls them in order). The types they share live in
//! `core.rs`, which imports no phase; this file is the hub that calls them.
//! 1. `request_filter` ([`filter`]): a target this proxy serves, an
//!    integration known by its legacy key or local token ([`auth`]), and a
//!    valid token; if not, an error answer and nothing is forwarded.
//!    `POST /oauth2/token` is answered by the proxy itself ([`local_token`]).
//!    Its common case (`request_filter_now`) needs no await.
//! 2. `upstream_request` ([`rewrite`]): target URI and header rewrite
//!    ([`headers`]); then `client_body`: a body, if any, wrapped so it can
//!    be replayed ([`body`]); then `take_share` ([`slot`]): a place under
//!    the integration's `max_concurrent`.
//! 3. `send_with_retries` ([`send`]): rate limit ([`ratelimit`]), pooled
//!    client ([`upstream`]), response-header timeout. Sent again on another
//!    connection when the server provably did not process it (any method,
//!    a few times), or once after a connection failure (idempotent only).
//!    Then `resend_rate_limited` ([`resend`]): Coupa answered 429, so the
//!    request waits what Coupa asked and goes again, within
//!    `coupa.resend_429_within` (after a 401 replay too).
//! 4. `on_rejected_token` ([`rejected`]): Coupa answered 401, so fetch a
//!    new token (once for a whole burst) and replay the request once.
//! 5. `response_filter`: hop-by-hop removal, stall guard on the body, and
//!    the answer taken off Coupa's connection ahead of the client
//!    ([`spool`]).
//! 6. `log` ([`log`]): one access line, and the request counted in the
//!    migration view ([`crate::insight`]).
//!
//! Failures become answers in one place ([`error`]).

pub mod auth;
pub mod body;
mod core;
pub mod error;
mod filter;
pub mod headers;
mod line_budget;
mod local_token;
mod log;
pub mod ratelimit;
mod rejected;
mod resend;
mod rewrite;
mod send;
mod share;
mod slot;
mod spool;
mod stall;
pub mod upstream;

use std::time::Instant as StdInstant;

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use crate::guesses::Guess;
use crate::insight::Via;
use body::{Replay, UpstreamBody};
use core::Trace;
pub use core::{CredentialSlot, Proxy, ProxyBody, Services, Shared};
pub use error::ProxyError;
use filter::Admitted;
pub use headers::{ClientInfo, RewriteRules};
use http_body::Body as _;
use log::{Handled, Record};
use rewrite::Outgoing;
use spool::Answer;
pub use spool::SpoolSettings;
pub use stall::BodyTimeout;
pub use upstream::UpstreamClient;
use upstream::{Leased, ResponseBody};

impl Proxy {
    /// Handles one client request; never fails (failures are responses).
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        client: &ClientInfo,
    ) -> Response<ProxyBody> {
        let started = StdInstant::now();
        let _in_flight = self.inner.metrics.in_flight();
        let request_id = headers::request_id(request.headers_mut());
        let method = request.method().clone();
        let http11 = request.version() == http::Version::HTTP_11;
        let target = request.uri().path_and_query().cloned();
        let spans = match &self.inner.traces {
            Some(traces) => traces.begin(request.headers(), started),
            None => None,
        };
        let trace_id = match &spans {
            Some(spans) => Some(spans.trace_id()),
            None => crate::traces::client_trace_id(request.headers()),
        };
        // Writes the access line when dropped: at the end of this
        // function, or, if the server drops this future because the
        // client went away, as 499 `client_gone`.
        let mut record = Record {
            proxy: self,
            handled: Handled {
                method: &method,
                target: target.as_ref(),
                id: &request_id,
                started,
            },
            trace: Trace {
                trace_id,
                spans,
                ..Trace::default()
            },
            status: None,
        };
        let trace = &mut record.trace;
        let mut response = match self.forward(request, target.as_ref(), client, trace).await {
            Ok(response) => response,
            Err(err) => {
                trace.reason = err.code();
                if matches!(err, ProxyError::UnknownApiKey) && trace.via == Via::LegacyKey {
                    trace.failed_credential = Some(Guess::LegacyKey);
                }
                // A refusal of the client's request (4xx) is the access
                // line's `reason`, which says it all: a flood of bad
                // requests costs one line each. A failure on the way to
                // Coupa (5xx) is warned of with its cause.
                if err.status().is_client_error() || matches!(err, ProxyError::NoToken { .. }) {
                    debug!(error = %err, "request not forwarded");
                } else {
                    warn!(error = %err, "request not forwarded");
                }
                err.into_response()
            }
        };
        // A wrong legacy key (above) or local client secret (the token
        // endpoint's answer) is answered as late as its source's account
        // says ([`crate::guesses`]).
        if let Some(guess) = trace.failed_credential {
            trace.guess_delay = self.inner.guesses.failed(client.ip, guess).await;
        }
        if http11 && !trace.guess_delay.is_zero() {
            // Each further guess costs a new connection.
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        // The same id reaches Coupa and comes back, so one call can be
        // followed through the integration, the proxy and Coupa support.
        let answer = response.headers_mut();
        answer.insert(headers::X_REQUEST_ID, request_id.clone());
        if http11 && !answer.contains_key(http::header::CONNECTION) {
            // Coupa's own, hop-by-hop, was removed with the other ones.
            answer.insert(headers::KEEP_ALIVE, self.inner.keep_alive.clone());
        }
        record.status = Some(response.status());
        drop(record);
        response
    }

    /// The phases in order; each is a function of its own.
    async fn forward(
        &self,
        request: Request<Incoming>,
        target: Option<&PathAndQuery>,
        client: &ClientInfo,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The common case needs no await; the slow path may take the
        // request (the proxy's own token endpoint answers it).
        let mut request = Some(request);
        let admitted = match request
            .as_ref()
            .and_then(|r| self.request_filter_now(r, trace))
        {
            Some(admitted) => admitted?,
            None => self.request_filter(&mut request, trace).await?,
        };
        let (credential, bearer) = match admitted {
            Admitted::Answered(response) => return Ok(*response),
            Admitted::Forward { credential, bearer } => (credential, bearer),
            Admitted::AwaitToken(credential) => match self.await_token(credential, trace).await {
                Ok(bearer) => (credential, bearer),
                Err(refused) => {
                    if let Some(request) = &request {
                        filter::note_legacy_key(request.headers(), trace);
                    }
                    return Err(refused);
                }
            },
        };
        let request = request.ok_or(ProxyError::BadTarget)?;
        let (
            Outgoing {
                method,
                uri,
                mut headers,
            },
            body,
        ) = self.upstream_request(request, target, &bearer, client, trace)?;
        let (body, replay) = if body.is_end_stream() {
            (UpstreamBody::Empty, Replay::Empty)
        } else {
            self.client_body(body).await?
        };
        let share = self.take_share(trace).await?;
        let leased = self
            .send_with_retries(&method, &uri, &headers, body, &replay, trace)
            .await?;
        let mut leased = self
            .resend_rate_limited(leased, &replay, (&method, &uri, &headers), trace)
            .await?;
        if leased.response.status() == StatusCode::UNAUTHORIZED {
            // Read the (small) 401 first: its connection goes back to the
            // pool instead of being held while a new token is fetched,
            // which under the connection cap would starve the replays.
            let rejected = self.buffer_rejection(leased).await?;
            match self
                .on_rejected_token(
                    credential,
                    &bearer,
                    &replay,
                    (&method, &uri, &mut headers),
                    trace,
                )
                .await
            {
                Some(replayed) => {
                    leased = self
                        .resend_rate_limited(replayed?, &replay, (&method, &uri, &headers), trace)
                        .await?;
                }
                None => return Ok(rejected),
            }
        }
        self.response_filter(leased, share).await
    }

    /// Phase 5: Coupa's answer for the client, taken off its connection
    /// as far as `coupa.response_buffer` allows.
    async fn response_filter(
        &self,
        leased: Leased,
        share: Option<OwnedSemaphorePermit>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;
        let (mut parts, body) = leased.response.into_parts();
        headers::rewrite_response(&mut parts.headers);
        let body = ResponseBody::new(body, inner.idle_timeout, leased.lease, share);
        match Answer::take(body, &inner.spool).await {
            Ok(answer) => Ok(Response::from_parts(parts, Either::Left(answer))),
            Err(broken) if broken.is::<upstream::IdleTimeout>() => {
                Err(ProxyError::Timeout(broken.to_string()))
            }
            Err(broken) => Err(ProxyError::Upstream(format!(
                "Coupa's answer broke off: {}",
                crate::token::client::error_chain(&*broken)
            ))),
        }
    }
}
