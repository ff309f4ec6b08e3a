//! Phase 2, `upstream_request`: the target URI on the instance and the
//! header rewrite ([`super::headers`]), then `client_body`: the body
//! wrapped so it can be replayed ([`super::body`]). The head needs no
//! await; the body only when there is one, so a GET builds no future here.

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use hyper::body::Incoming;
use tracing::debug;

use super::body::{self, Replay, UpstreamBody};
use super::core::{Proxy, Trace};
use super::{headers, ClientInfo, ProxyError};
use crate::insight::Via;

/// The request's head as it goes to Coupa.
pub(super) struct Outgoing {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Proxy {
    /// The head for Coupa, and the client's body still unread.
    pub(super) fn upstream_request(
        &self,
        request: Request<Incoming>,
        target: Option<&PathAndQuery>,
        bearer: &HeaderValue,
        client: &ClientInfo,
        trace: &mut Trace,
    ) -> Result<(Outgoing, Incoming), ProxyError> {
        let inner = &*self.inner;
        let (mut parts, body) = request.into_parts();
        let target = target.ok_or(ProxyError::BadTarget)?;
        let uri = self.upstream_uri(target)?;
        let (default_accept, usage) = match &trace.integration {
            Some(integration) => (&integration.accept, &integration.usage),
            None => (&inner.default_accept, inner.insight.unnamed()),
        };
        let headers::Rewritten {
            dropped,
            defaulted_accept,
            sent_legacy_key,
        } = headers::rewrite_request(
            &mut parts.headers,
            parts.uri.authority(),
            &inner.rules,
            default_accept,
            bearer.clone(),
            client,
        );
        if sent_legacy_key && trace.via == Via::Nothing {
            // Without integrations the key identifies nobody, but the
            // migration view still shows who sends one.
            trace.via = Via::LegacyKey;
        }
        if let Some(given) = defaulted_accept {
            // The migration view shows who relied on the default, and what
            // they got: an integration written for Coupa's XML default
            // that is given JSON breaks.
            usage.defaulted_accept(&given);
        }
        if dropped > 0 {
            inner
                .metrics
                .dropped_underscore_fields
                .inc_by(dropped as u64);
            debug!(
                dropped,
                "dropped request header fields with '_' in their name"
            );
        }
        Ok((
            Outgoing {
                method: parts.method,
                uri,
                headers: parts.headers,
            },
            body,
        ))
    }

    /// The client's body, wrapped so it can be sent again: read whole when
    /// it fits in `coupa.replay_body_limit` (see [`UpstreamBody::from_client`]).
    pub(super) async fn client_body(
        &self,
        body: Incoming,
    ) -> Result<(UpstreamBody, Replay), ProxyError> {
        let inner = &*self.inner;
        UpstreamBody::from_client(
            body,
            inner.replay_body_limit,
            inner.body_read_timeout,
            inner.body_pace,
        )
        .await
        .map_err(|e| match e {
            body::ClientBodyError::Stalled(why) => {
                inner.metrics.client_body_timeout(why.reason());
                ProxyError::ClientBodyTimeout { why, sent: false }
            }
            body::ClientBodyError::Malformed(e) if client_left(&e) => ProxyError::ClientGone,
            body::ClientBodyError::Malformed(e) => ProxyError::BadBody(e.to_string()),
        })
    }

    /// `base_url`'s path + the request's path and query, byte for byte, in
    /// origin form: the pool owns the scheme and authority and adds them
    /// where HTTP/2 needs them.
    fn upstream_uri(&self, target: &PathAndQuery) -> Result<Uri, ProxyError> {
        let inner = &*self.inner;
        let path_and_query = if inner.path_prefix.is_empty() {
            target.clone()
        } else {
            let joined = format!("{}{}", inner.path_prefix, target.as_str());
            PathAndQuery::from_maybe_shared(Bytes::from(joined))
                .map_err(|_| ProxyError::BadTarget)?
        };
        Ok(Uri::from(path_and_query))
    }
}

/// A body error that is the client leaving (its connection closed before
/// the body was complete), not a malformed body.
fn client_left(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_closed() {
        return true;
    }
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        cause = e.source();
    }
    false
}
