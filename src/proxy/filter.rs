//! Phase 1, `request_filter`: a target this proxy serves, an integration
//! known by its legacy key or local token ([`super::auth`]), and a valid
//! token for its credential. Anything else is an error answer and nothing
//! is forwarded; `POST /oauth2/token` is answered here by the proxy itself
//! ([`super::local_token`]).

use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request, Response, Version};
use hyper::body::Incoming;

use super::core::{CredentialSlot, Proxy, ProxyBody, Trace};
use super::{headers, ProxyError};
use crate::encode::default_port;
use crate::insight::Via;
use crate::local_oauth;

/// What the filter lets through.
pub(super) enum Admitted<'a> {
    /// The proxy answered the request itself (rare: boxed, so the common
    /// variant stays small).
    Answered(Box<Response<ProxyBody>>),
    /// To be forwarded with `credential`'s token.
    Forward {
        credential: &'a CredentialSlot,
        bearer: HeaderValue,
    },
    /// To be forwarded once `credential` holds a token (none yet at
    /// start-up, or it expired without renewal): the request waits rather
    /// than failing, up to `coupa.token_wait_timeout`.
    AwaitToken(&'a CredentialSlot),
}

/// A refused request still shows in the migration view as sending a
/// legacy key (a forwarded one is noted by `upstream_request`, which
/// removes the key anyway; only the rare refusal pays a lookup).
pub(super) fn note_legacy_key(headers: &http::HeaderMap, trace: &mut Trace) {
    if trace.via == Via::Nothing && headers.contains_key(headers::X_COUPA_API_KEY) {
        trace.via = Via::LegacyKey;
    }
}

impl Proxy {
    /// Phase 1 without an await — the common case: a target this proxy
    /// serves, an integration known by its legacy key (or none
    /// configured), a token held. `None`: the request needs
    /// [`Self::request_filter`] (the proxy's own token endpoint, or a local
    /// token to look up), so a forwarded call builds no future here.
    pub(super) fn request_filter_now(
        &self,
        request: &Request<Incoming>,
        trace: &mut Trace,
    ) -> Option<Result<Admitted<'_>, ProxyError>> {
        if let Err(refused) = self.check_target(request) {
            note_legacy_key(request.headers(), trace);
            return Some(Err(refused));
        }
        if local_oauth::is_oauth_path(request.uri().path()) {
            return None;
        }
        let admitted = match self.identify_now(request.headers(), trace)? {
            Ok(credential) => self.admit(credential),
            Err(refused) => Err(refused),
        };
        if admitted.is_err() {
            note_legacy_key(request.headers(), trace);
        }
        Some(admitted)
    }

    /// Phase 1 whole, for what [`Self::request_filter_now`] leaves (it has
    /// checked the target already): takes the request by reference except
    /// on the rare path that answers it here.
    pub(super) async fn request_filter(
        &self,
        request: &mut Option<Request<Incoming>>,
        trace: &mut Trace,
    ) -> Result<Admitted<'_>, ProxyError> {
        let Some(incoming) = request.as_ref() else {
            return Err(ProxyError::BadTarget);
        };
        if local_oauth::is_oauth_path(incoming.uri().path()) {
            let path = incoming.uri().path();
            if path != local_oauth::TOKEN_PATH {
                return Err(ProxyError::OAuthPathNotForwarded(path.to_owned()));
            }
            let Some(incoming) = request.take() else {
                return Err(ProxyError::BadTarget);
            };
            return Ok(Admitted::Answered(Box::new(
                self.answer_token_request(incoming, trace).await?,
            )));
        }
        let credential = match self.identify_now(incoming.headers(), trace) {
            Some(identified) => identified?,
            None => {
                self.identify_by_local_token(incoming.headers(), trace)
                    .await?
            }
        };
        self.admit(credential)
    }

    /// Forwarded with `credential`'s token (`None`: the default
    /// credential's), if one is held.
    fn admit(&self, credential: Option<usize>) -> Result<Admitted<'_>, ProxyError> {
        let inner = &*self.inner;
        let credential = &inner.credentials[credential.unwrap_or(inner.default_credential)];
        match credential.store.bearer(tokio::time::Instant::now()) {
            Some(bearer) => Ok(Admitted::Forward { credential, bearer }),
            None if inner.token_wait_timeout.is_zero() => Err(self.no_token(credential)),
            None => Ok(Admitted::AwaitToken(credential)),
        }
    }

    /// Waits for `credential`'s token, up to `coupa.token_wait_timeout`;
    /// past it, the 503 naming why there is none.
    pub(super) async fn await_token(
        &self,
        credential: &CredentialSlot,
        trace: &mut Trace,
    ) -> Result<HeaderValue, ProxyError> {
        let started = tokio::time::Instant::now();
        let bearer = credential
            .store
            .wait_for_token(self.inner.token_wait_timeout)
            .await;
        trace.token_wait = Some(started.elapsed());
        trace.note_wait("token wait", started.into_std());
        bearer.ok_or_else(|| self.no_token(credential))
    }

    /// Which integration sent the request, by its legacy key, and so which
    /// credential's token it gets (`Ok(None)`: no integrations are
    /// configured, everyone gets the default credential). `None`: it
    /// carries no legacy key but may carry a local token, which takes a
    /// lookup ([`Self::identify_by_local_token`]).
    fn identify_now(
        &self,
        headers: &http::HeaderMap,
        trace: &mut Trace,
    ) -> Option<Result<Option<usize>, ProxyError>> {
        let inner = &*self.inner;
        let integrations = inner.integrations.load();
        if integrations.is_empty() {
            // A legacy key then identifies nobody; `upstream_request` notes
            // one for the migration view as it removes it.
            return Some(Ok(None));
        }
        if let Some(key) = headers.get(headers::X_COUPA_API_KEY) {
            let Some(found) = integrations.identify(key) else {
                return Some(Err(ProxyError::UnknownApiKey));
            };
            trace.via = Via::LegacyKey;
            trace.integration = Some(found.clone());
            return Some(Ok(Some(found.credential)));
        }
        match headers.get(http::header::AUTHORIZATION) {
            Some(_) if integrations.has_local_clients() => None,
            _ => Some(Err(ProxyError::UnknownApiKey)),
        }
    }

    /// The integration of a request carrying a token from the proxy's own
    /// `/oauth2/token`, and so its credential.
    async fn identify_by_local_token(
        &self,
        headers: &http::HeaderMap,
        trace: &mut Trace,
    ) -> Result<Option<usize>, ProxyError> {
        let inner = &*self.inner;
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| local_oauth::bearer_of(value.as_bytes()))
            .ok_or(ProxyError::UnknownApiKey)?;
        let grant = inner
            .local_tokens
            .lookup(token)
            .await
            .ok_or(ProxyError::InvalidLocalToken)?;
        // The integration may have gone, or changed its secret, on reload.
        let integrations = inner.integrations.load();
        let found = integrations
            .by_name(&grant.integration)
            .filter(|key| key.local_secret() == Some(&grant.secret_sha256))
            .ok_or(ProxyError::InvalidLocalToken)?;
        trace.via = Via::LocalToken;
        trace.integration = Some(found.clone());
        Ok(Some(found.credential))
    }

    /// The proxy is never an open proxy: no CONNECT tunnels, and an
    /// HTTP/1 absolute-form target must name the instance itself. (HTTP/2
    /// always carries an authority: the proxy's own address, like `Host`.)
    /// An HTTP/1.1 request without `Host` is malformed (RFC 9112 §3.2).
    fn check_target<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        if request.version() == Version::HTTP_11
            && !request.headers().contains_key(http::header::HOST)
        {
            return Err(ProxyError::MissingHost);
        }
        if request.version() <= Version::HTTP_11 {
            if let Some(authority) = request.uri().authority() {
                let ours = &self.inner.authority;
                let same_host = authority.host().eq_ignore_ascii_case(ours.host());
                let same_port = authority
                    .port_u16()
                    .unwrap_or_else(|| default_port(request.uri().scheme_str()))
                    == ours
                        .port_u16()
                        .unwrap_or_else(|| default_port(Some(self.inner.scheme.as_str())));
                if !(same_host && same_port) {
                    return Err(ProxyError::ForeignTarget(authority.to_string()));
                }
            }
        }
        Ok(())
    }

    /// The 503 answer while no token is held, naming the cause.
    fn no_token(&self, credential: &CredentialSlot) -> ProxyError {
        let status = credential.store.status();
        let retry_after = status
            .next_attempt
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(1));
        let cause = match status.last_error {
            Some(error) => format!("the last token request failed: {error}"),
            None if status.fetches_ok > 0 => "the token expired and no new one arrived".to_owned(),
            None => "the first token is still being fetched".to_owned(),
        };
        ProxyError::NoToken { cause, retry_after }
    }
}
