//! The current access token, shared between the refresher (writer) and the
//! request path (reader).
//!
//! The token is kept pre-rendered as the `Authorization` header value so a
//! request does one atomic load and one reference-count increment: no lock,
//! no formatting, no allocation.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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
    /// Whether this is `access_token` (the header is `Bearer <token>`).
    pub fn is(&self, access_token: &str) -> bool {
        self.header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .is_some_and(|t| t == access_token.as_bytes())
    }

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
    /// When the refresher will try again after a failure.
    pub next_attempt: Option<SystemTime>,
    /// User-consented grants only: the refresh token's end of life.
    pub refresh_token: Option<RefreshTokenInfo>,
}

/// Warn this long before a refresh token's end of life.
pub const REFRESH_TOKEN_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// The refresh token of a user-consented grant: when it ends, and the
/// command that gives a new consent.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshTokenInfo {
    pub expires_at: SystemTime,
    pub reauthorize: String,
}

impl RefreshTokenInfo {
    /// Time left at `now` (zero once past).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    /// The advice to give at `now`, within [`REFRESH_TOKEN_WARNING`] of
    /// the end.
    pub fn warning(&self, now: SystemTime) -> Option<String> {
        let left = self.remaining(now);
        if left > REFRESH_TOKEN_WARNING {
            return None;
        }
        let when = humantime::format_rfc3339_seconds(self.expires_at);
        Some(if left.is_zero() {
            format!(
                "the refresh token reached its end of life at {when}; run `{}` to give consent again",
                self.reauthorize
            )
        } else {
            format!(
                "the refresh token expires in {} days (at {when}); run `{}` before then",
                left.as_secs().div_ceil(86_400),
                self.reauthorize
            )
        })
    }
}

/// What a request that got 401 should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterRejection {
    /// A different valid token is already held: replay with it.
    Replay(HeaderValue),
    /// A fresh token is on its way: wait for it, then replay.
    Wait,
    /// A token fetched for a 401 moments ago was rejected too: a fetch
    /// would not help, pass the 401 on.
    GiveUp,
}

/// The 401-triggered fetch most recently asked for.
#[derive(Debug, Default)]
struct ForcedRefresh {
    at: Option<Instant>,
    /// The rejected header it was asked for.
    rejected: Option<HeaderValue>,
}

#[derive(Debug)]
pub struct TokenStore {
    current: ArcSwapOption<ActiveToken>,
    status: Mutex<TokenStatus>,
    /// Token requests by outcome label, for metrics.
    outcomes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Bumped on every install and every failed fetch, so waiters learn
    /// of a new token, or that none is coming for now.
    installed: tokio::sync::watch::Sender<u64>,
    /// Wakes the refresher for an out-of-schedule fetch whose token replaces
    /// a rejected one at once.
    refresh_now: tokio::sync::Notify,
    /// Wakes the refresher for an early renewal (new scopes or client after a
    /// reload): the current token serves until the new one activates.
    renew_now: tokio::sync::Notify,
    forced: Mutex<ForcedRefresh>,
    /// A fetched token is waiting out its activation delay.
    awaiting_activation: std::sync::atomic::AtomicBool,
    /// Wakes that wait when the current token is rejected meanwhile: the
    /// waiting token replaces it at once, without a new fetch.
    activate_now: tokio::sync::Notify,
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenStore {
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            status: Mutex::new(TokenStatus::default()),
            outcomes: Mutex::new(std::collections::BTreeMap::new()),
            installed: tokio::sync::watch::Sender::new(0),
            refresh_now: tokio::sync::Notify::new(),
            renew_now: tokio::sync::Notify::new(),
            forced: Mutex::new(ForcedRefresh::default()),
            awaiting_activation: std::sync::atomic::AtomicBool::new(false),
            activate_now: tokio::sync::Notify::new(),
        }
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
        self.awaiting_activation
            .store(false, std::sync::atomic::Ordering::Release);
        self.installed.send_modify(|generation| *generation += 1);
    }

    /// The expiry of the current token, unless Coupa rejected it: a
    /// rejected token is not worth waiting on, so the next one activates
    /// at once.
    pub fn unrejected_expiry(&self, now: Instant) -> Option<Instant> {
        let current = self.current(now)?;
        let rejected = self
            .forced
            .lock()
            .map(|forced| {
                forced
                    .rejected
                    .as_ref()
                    .is_some_and(|r| r.as_bytes() == current.header.as_bytes())
            })
            .unwrap_or(false);
        (!rejected).then_some(current.expires_at)
    }

    /// Marks a fetched token as waiting for its activation; the returned
    /// future resolves when a 401 on the current token asks for it now.
    /// Enabled before the mark, so no such request is missed.
    pub(crate) fn await_activation(
        &self,
    ) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut wanted = Box::pin(self.activate_now.notified());
        wanted.as_mut().enable();
        self.awaiting_activation
            .store(true, std::sync::atomic::Ordering::Release);
        wanted
    }

    /// Coupa answered 401 to a request sent with `rejected`. Asks the
    /// refresher for a new token unless one is already on its way, so a
    /// burst of 401s costs one token request; within `cooldown` of the last
    /// such request it asks for nothing (no loops on a token Coupa keeps
    /// rejecting).
    pub fn report_rejected(&self, rejected: &HeaderValue, cooldown: Duration) -> AfterRejection {
        let now = Instant::now();
        if let Some(current) = self.bearer(now) {
            if current != *rejected {
                return AfterRejection::Replay(current);
            }
        }
        // A newer token is fetched and only waits out its activation
        // delay (a server that ends the old pair when it issues the next
        // gives exactly this 401): install it now. No fetch is asked for, so
        // the cooldown stays for a rejection of the new token.
        if self
            .awaiting_activation
            .load(std::sync::atomic::Ordering::Acquire)
        {
            self.activate_now.notify_waiters();
            return AfterRejection::Wait;
        }
        let Ok(mut forced) = self.forced.lock() else {
            return AfterRejection::GiveUp;
        };
        if forced.rejected.as_ref() == Some(rejected) {
            return AfterRejection::Wait;
        }
        if forced.at.is_some_and(|at| now < at + cooldown) {
            return AfterRejection::GiveUp;
        }
        forced.at = Some(now);
        forced.rejected = Some(rejected.clone());
        self.refresh_now.notify_one();
        AfterRejection::Wait
    }

    /// Waits up to `timeout` for a valid token other than `rejected`; gives
    /// up early when a token fetch fails meanwhile.
    pub async fn wait_for_replacement(
        &self,
        rejected: &HeaderValue,
        timeout: Duration,
    ) -> Option<HeaderValue> {
        let mut installs = self.installed.subscribe();
        let failures_before = self.status().fetches_failed;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(current) = self.bearer(Instant::now()) {
                if current != *rejected {
                    return Some(current);
                }
            }
            if self.status().fetches_failed > failures_before {
                return None;
            }
            match tokio::time::timeout_at(deadline, installs.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Waits up to `timeout` for a valid token (the first, or one after an
    /// expiry without renewal); failed fetches meanwhile do not end the
    /// wait, since the refresher tries again within it.
    pub async fn wait_for_token(&self, timeout: Duration) -> Option<HeaderValue> {
        let mut installs = self.installed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(bearer) = self.bearer(Instant::now()) {
                return Some(bearer);
            }
            match tokio::time::timeout_at(deadline, installs.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Resolves once a valid token is held.
    pub async fn ready(&self) {
        let mut installs = self.installed.subscribe();
        while !self.is_ready() {
            if installs.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Resolves when a request asked for an out-of-schedule fetch.
    pub(crate) async fn refresh_requested(&self) {
        self.refresh_now.notified().await;
    }

    /// Asks the refresher to renew now, with the usual activation delay.
    pub fn renew_soon(&self) {
        self.renew_now.notify_one();
    }

    pub(crate) async fn renew_requested(&self) {
        self.renew_now.notified().await;
    }

    /// Records a user-consented grant's refresh token lifetime.
    pub fn set_refresh_token(&self, info: RefreshTokenInfo) {
        if let Ok(mut status) = self.status.lock() {
            status.refresh_token = Some(info);
        }
    }

    pub fn status(&self) -> TokenStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Token requests so far by outcome (`ok`, `network`, an OAuth code…).
    pub fn fetch_outcomes(&self) -> Vec<(String, u64)> {
        self.outcomes
            .lock()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    fn count_outcome(&self, outcome: &str) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            *outcomes.entry(outcome.to_owned()).or_default() += 1;
        }
    }

    pub(crate) fn record_success(&self) {
        self.count_outcome("ok");
        if let Ok(mut s) = self.status.lock() {
            s.fetches_ok += 1;
            s.last_error = None;
            s.next_attempt = None;
            s.last_success = Some(SystemTime::now());
        }
    }

    pub(crate) fn record_failure(&self, outcome: &str, message: String, retry_in: Duration) {
        self.count_outcome(outcome);
        if let Ok(mut s) = self.status.lock() {
            s.fetches_failed += 1;
            s.last_error = Some(message);
            s.next_attempt = Some(SystemTime::now() + retry_in);
        }
        self.installed.send_modify(|generation| *generation += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn refresh_token_warning_starts_fourteen_days_before_the_end() {
        let now = SystemTime::now();
        let info = |days_left: u64| RefreshTokenInfo {
            expires_at: now + Duration::from_secs(days_left * 86_400),
            reauthorize: "coupa-auth-proxy authorize --config p --credential c".to_owned(),
        };
        assert_eq!(info(15).warning(now), None);
        let warning = info(14).warning(now).unwrap();
        assert!(warning.contains("expires in 14 days"), "{warning}");
        assert!(
            warning.contains("authorize --config p --credential c"),
            "{warning}"
        );
        let ended = RefreshTokenInfo {
            expires_at: now - Duration::from_secs(1),
            ..info(0)
        };
        assert!(ended.warning(now).unwrap().contains("reached its end"));
        assert_eq!(ended.remaining(now), Duration::ZERO);
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

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_rejections_asks_for_one_fetch_then_cools_down() {
        let store = TokenStore::new();
        let now = Instant::now();
        store.install(token("old", now, Duration::from_secs(100)));
        let old = store.bearer(now).unwrap();
        let cooldown = Duration::from_secs(10);

        assert_eq!(store.report_rejected(&old, cooldown), AfterRejection::Wait);
        // The refresher is woken exactly once for the whole burst.
        for _ in 0..50 {
            assert_eq!(store.report_rejected(&old, cooldown), AfterRejection::Wait);
        }
        store.refresh_requested().await;
        let woken_again =
            tokio::time::timeout(Duration::from_millis(1), store.refresh_requested()).await;
        assert!(woken_again.is_err(), "a burst must wake the refresher once");

        // A waiter gets the new token as soon as it is installed.
        let waiter = store.wait_for_replacement(&old, Duration::from_secs(5));
        store.install(token("new", now, Duration::from_secs(100)));
        assert_eq!(waiter.await.unwrap(), "Bearer new");

        // Late 401s for the old token replay with the new one at once.
        let new = store.bearer(Instant::now()).unwrap();
        assert_eq!(
            store.report_rejected(&old, cooldown),
            AfterRejection::Replay(new.clone())
        );
        // The new token rejected too, within the cool-down: give up.
        assert_eq!(
            store.report_rejected(&new, cooldown),
            AfterRejection::GiveUp
        );
        tokio::time::advance(cooldown).await;
        assert_eq!(store.report_rejected(&new, cooldown), AfterRejection::Wait);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_replacement_ends_when_the_fetch_fails() {
        let store = TokenStore::new();
        let old = HeaderValue::from_static("Bearer old");
        let started = Instant::now();
        let waiter = store.wait_for_replacement(&old, Duration::from_secs(30));
        tokio::pin!(waiter);
        assert!(futures_util::poll!(waiter.as_mut()).is_pending());
        store.record_failure("invalid_client", "refused".into(), Duration::from_secs(60));
        assert_eq!(waiter.await, None);
        assert_eq!(Instant::now(), started, "no waiting out the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_replacement_times_out() {
        let store = TokenStore::new();
        let old = HeaderValue::from_static("Bearer old");
        assert_eq!(
            store
                .wait_for_replacement(&old, Duration::from_secs(3))
                .await,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_first_token_and_not_past_its_bound() {
        let store = std::sync::Arc::new(TokenStore::new());
        assert_eq!(store.wait_for_token(Duration::from_secs(2)).await, None);
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.wait_for_token(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiting.is_finished(), "no token yet: still waiting");
        store.install(token("first", Instant::now(), Duration::from_secs(60)));
        let bearer = waiting.await.unwrap().expect("the token, once installed");
        assert_eq!(bearer, HeaderValue::from_static("Bearer first"));
        store.ready().await;
    }

    #[test]
    fn debug_hides_token() {
        let t = token("very-secret-token", Instant::now(), Duration::from_secs(1));
        assert!(!format!("{t:?}").contains("very-secret-token"));
    }
}
