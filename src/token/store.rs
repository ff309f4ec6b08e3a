//! The current access token, shared between the refresher (writer) and the
//! request path (reader).
//!
//! The token is kept pre-rendered as the `Authorization` header value so a
//! request does one atomic load and one reference-count increment: no lock,
//! no formatting, no allocation.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

use crate::secret::Secret;

/// A token that may be sent upstream until `expires_at`.
pub struct ActiveToken {
    /// `Bearer <token>`, marked sensitive so HTTP/2 never indexes it.
    header: HeaderValue,
    /// After this instant the token is never sent again.
    pub expires_at: Instant,
    /// When the token endpoint issued it (request time, our clock).
    pub issued_at: Instant,
    /// Wall-clock expiry, for logs and the admin endpoints.
    pub expires_at_wall: SystemTime,
    /// Scopes the endpoint granted (may differ from those requested).
    pub scope: Option<String>,
}

impl ActiveToken {
    pub fn new(
        access_token: &Secret,
        issued_at: Instant,
        expires_at: Instant,
        expires_at_wall: SystemTime,
        scope: Option<String>,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut rendered = Vec::with_capacity(7 + access_token.len());
        rendered.extend_from_slice(b"Bearer ");
        rendered.extend_from_slice(access_token.expose().as_bytes());
        let mut header = HeaderValue::from_maybe_shared(Bytes::from(rendered))?;
        header.set_sensitive(true);
        Ok(Self {
            header,
            expires_at,
            issued_at,
            expires_at_wall,
            scope,
        })
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

impl std::fmt::Debug for ActiveToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveToken")
            .field("header", &"Bearer ***")
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .finish()
    }
}

/// The outcome of the latest token fetch, for readiness and status pages.
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    /// The last failure's message (never contains secrets).
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub struct TokenStore {
    current: ArcSwapOption<ActiveToken>,
    status: Mutex<TokenStatus>,
}

impl TokenStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `Authorization` value to send now, or `None` when no token is
    /// valid. This is the only call on the request path.
    #[inline]
    pub fn bearer(&self, now: Instant) -> Option<HeaderValue> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(token) if token.is_valid_at(now) => Some(token.header.clone()),
            _ => None,
        }
    }

    /// The current token if still valid (background and admin use).
    pub fn current(&self, now: Instant) -> Option<Arc<ActiveToken>> {
        self.current.load_full().filter(|t| t.is_valid_at(now))
    }

    pub fn is_ready(&self) -> bool {
        self.current(Instant::now()).is_some()
    }

    /// Makes `token` the one the request path sends.
    pub fn install(&self, token: ActiveToken) {
        self.current.store(Some(Arc::new(token)));
    }

    pub fn status(&self) -> TokenStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(crate) fn record_success(&self) {
        if let Ok(mut s) = self.status.lock() {
            s.fetches_ok += 1;
            s.last_error = None;
            s.last_success = Some(SystemTime::now());
        }
    }

    pub(crate) fn record_failure(&self, message: String) {
        if let Ok(mut s) = self.status.lock() {
            s.fetches_failed += 1;
            s.last_error = Some(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn token(secret: &str, now: Instant, ttl: Duration) -> ActiveToken {
        ActiveToken::new(
            &Secret::new(secret),
            now,
            now + ttl,
            SystemTime::now() + ttl,
            None,
        )
        .unwrap()
    }

    #[test]
    fn empty_store_has_no_bearer() {
        assert!(TokenStore::new().bearer(Instant::now()).is_none());
    }

    #[test]
    fn bearer_is_prerendered_sensitive_and_expires() {
        let store = TokenStore::new();
        let now = Instant::now();
        store.install(token("abc", now, Duration::from_secs(10)));
        let value = store.bearer(now).unwrap();
        assert_eq!(value, "Bearer abc");
        assert!(value.is_sensitive());
        assert!(store.bearer(now + Duration::from_secs(10)).is_none());
        assert!(store.bearer(now + Duration::from_secs(9)).is_some());
    }

    #[test]
    fn debug_hides_token() {
        let t = token("very-secret-token", Instant::now(), Duration::from_secs(1));
        assert!(!format!("{t:?}").contains("very-secret-token"));
    }
}
