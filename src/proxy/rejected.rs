//! Phase 4, `on_rejected_token`: Coupa answered 401, so the token is
//! reported rejected (one fetch for a whole burst) and the request is
//! replayed once with the fresh one.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use http_body_util::{Either, Full};
use tracing::debug;

use super::body::Replay;
use super::core::{CredentialSlot, Proxy, ProxyBody, Trace};
use super::send::attempt_request;
use super::upstream::Leased;
use super::upstream::ResponseBody;
use super::{headers, ProxyError};
use crate::token::AfterRejection;

impl Proxy {
    /// Coupa's refusal (401, 429), read whole (bounded in size and time)
    /// and rewritten for the client, so its connection is free before
    /// anything waits.
    pub(super) async fn buffer_rejection(
        &self,
        leased: Leased,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        use http_body_util::BodyExt;
        const LIMIT: usize = 64 * 1024;
        let inner = &*self.inner;
        let (mut parts, body) = leased.response.into_parts();
        let body = ResponseBody::new(body, inner.idle_timeout, leased.lease, None);
        let bytes = http_body_util::Limited::new(body, LIMIT)
            .collect()
            .await
            .map_err(|e| ProxyError::Upstream(format!("reading Coupa's refusal: {e}")))?
            .to_bytes();
        headers::rewrite_response(&mut parts.headers);
        Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))))
    }

    /// Coupa rejected `bearer`. Gets a fresh token (one fetch for a burst)
    /// and replays the request once; `None` passes the 401 on (body not
    /// replayable, no new token in time, or a fresh token rejected too).
    pub(super) async fn on_rejected_token(
        &self,
        credential: &CredentialSlot,
        bearer: &HeaderValue,
        replay: &Replay,
        (method, uri, headers): (&Method, &Uri, &mut HeaderMap),
        trace: &mut Trace,
    ) -> Option<Result<Leased, ProxyError>> {
        let store = &credential.store;
        let outcome = store.report_rejected(bearer, credential.rejected_token_cooldown);
        let body = replay.body()?;
        let fresh = match outcome {
            AfterRejection::Replay(fresh) => fresh,
            AfterRejection::Wait => {
                store
                    .wait_for_replacement(bearer, credential.token_wait)
                    .await?
            }
            AfterRejection::GiveUp => return None,
        };
        debug!("replaying a request Coupa answered 401 with a fresh token");
        // The caller's copy carries the fresh token too, for a re-send.
        headers.insert(AUTHORIZATION, fresh);
        Some(
            self.send(attempt_request(method, uri, headers.clone(), body), trace)
                .await
                .map_err(ProxyError::from),
        )
    }
}
