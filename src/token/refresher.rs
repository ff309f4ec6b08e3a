//! Background token rotation: fetch, wait out the activation delay, swap,
//! sleep until the renewal point, repeat; back off on failure.
//!
//! One task per credential owns every fetch, so there is never more than one
//! token request in flight. The schedule is made of pure functions so it can
//! be tested without a clock.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::client::{FetchError, FetchedToken, TokenClient};
use super::store::{ActiveToken, TokenStore};
use crate::config::OAuth;

/// Never renew sooner than this after a fetch, whatever the lifetime says,
/// so a server answering `expires_in: 0` cannot make us spin.
const MIN_RENEW_AFTER: Duration = Duration::from_secs(1);
/// Cap on the safety margin taken off every lifetime.
const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// When to renew and how to retry.
#[derive(Debug, Clone, Copy)]
pub struct RefreshPolicy {
    pub refresh_fraction: f64,
    pub activation_delay: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl From<&OAuth> for RefreshPolicy {
    fn from(oauth: &OAuth) -> Self {
        Self {
            refresh_fraction: oauth.refresh_fraction,
            activation_delay: oauth.activation_delay,
            retry_initial: oauth.retry_initial,
            retry_max: oauth.retry_max,
        }
    }
}

impl RefreshPolicy {
    /// Last instant we will send the token: its lifetime counted from when
    /// we asked for it, minus a margin (5 %, at most a minute) for the time a
    /// forwarded request needs to reach Coupa.
    pub fn usable_until(&self, requested_at: Instant, lifetime: Duration) -> Instant {
        let margin = (lifetime / 20).min(MAX_EXPIRY_MARGIN);
        requested_at + lifetime.saturating_sub(margin)
    }

    /// When to start fetching the next token.
    pub fn renew_at(&self, requested_at: Instant, lifetime: Duration) -> Instant {
        let after = lifetime.mul_f64(self.refresh_fraction).max(MIN_RENEW_AFTER);
        requested_at + after
    }

    /// When a freshly fetched token replaces the current one: after the
    /// activation delay Coupa asks for, but no later than the moment the old
    /// one stops being usable, and at once when there is none.
    pub fn activate_at(&self, now: Instant, current_expiry: Option<Instant>) -> Instant {
        match current_expiry {
            Some(expiry) if expiry > now => (now + self.activation_delay).min(expiry),
            _ => now,
        }
    }
}

/// Exponential backoff with jitter: each delay is drawn from the upper half
/// of a window that doubles from `initial` up to `max`.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    window: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            window: initial,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let window = self.window;
        self.window = (self.window * 2).min(self.max);
        let half = window / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    pub fn reset(&mut self) {
        self.window = self.initial;
    }
}

/// Where new tokens come from. The token endpoint in production
/// ([`TokenClient`]); a script in tests, so the schedule can be checked
/// under paused time.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch(&self) -> impl std::future::Future<Output = Result<FetchedToken, FetchError>> + Send;

    /// The scopes a fetch asks for, space-separated (for advice on
    /// `invalid_scope`).
    fn requested_scope(&self) -> String {
        String::new()
    }
}

impl TokenSource for TokenClient {
    fn fetch(&self) -> impl std::future::Future<Output = Result<FetchedToken, FetchError>> + Send {
        TokenClient::fetch(self)
    }

    fn requested_scope(&self) -> String {
        TokenClient::requested_scope(self)
    }
}

/// Scopes in `requested` but not in `granted`: after a reload that added
/// scopes, the likely culprits of an `invalid_scope`.
pub fn missing_scopes(requested: &str, granted: &str) -> Vec<String> {
    let granted: Vec<&str> = granted.split_whitespace().collect();
    requested
        .split_whitespace()
        .filter(|s| !granted.contains(s))
        .map(str::to_owned)
        .collect()
}

/// Keeps one [`TokenStore`] filled.
pub struct Refresher<S = TokenClient> {
    pub client: S,
    pub store: Arc<TokenStore>,
    pub policy: RefreshPolicy,
    /// Credential name for log lines.
    pub credential: String,
    /// Each fetch a span, with `[telemetry] otlp_endpoint`.
    pub traces: Option<crate::traces::Traces>,
}

impl<S: TokenSource> Refresher<S> {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.policy.retry_initial, self.policy.retry_max);
        // The last failure logged loudly; a repeat of it is logged quietly.
        let mut last_failure: Option<String> = None;
        // Scopes of the last token Coupa granted, to name what a later
        // request is missing.
        let mut granted = String::new();
        // Why the next fetch runs, for its span.
        let mut trigger = "start";
        loop {
            let next_fetch = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.traced_fetch(trigger) => match result {
                    Ok(token) => {
                        backoff.reset();
                        if last_failure.take().is_some() {
                            info!(credential = %self.credential, "token endpoint recovered");
                        }
                        granted = token.scope.clone().unwrap_or_else(|| self.client.requested_scope());
                        match self.activate(token, &shutdown).await {
                            Some(renew_at) => renew_at,
                            None => return,
                        }
                    }
                    Err(err) => {
                        let retry_in = if err.is_configuration_error() {
                            // Retrying soon cannot fix a wrong secret or
                            // scope; do not hammer Coupa while someone does.
                            self.policy.retry_max.mul_f64(0.5 + 0.5 * rand::rng().random::<f64>())
                        } else {
                            backoff.next_delay()
                        };
                        let mut message = err.explain();
                        if matches!(&err, super::FetchError::OAuth { code, .. } if code == "invalid_scope") {
                            let missing = missing_scopes(&self.client.requested_scope(), &granted);
                            if !granted.is_empty() && !missing.is_empty() {
                                message.push_str(&format!(
                                    "; scopes the client is missing (requested now, not granted before): {}",
                                    missing.join(" ")
                                ));
                            }
                        }
                        self.log_failure(&message, retry_in, &mut last_failure);
                        self.store.record_failure(err.outcome(), message, retry_in);
                        Instant::now() + retry_in
                    }
                }
            };
            let failing = last_failure.is_some();
            trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until(next_fetch) => if failing { "retry" } else { "renewal" },
                _ = self.store.refresh_requested() => {
                    info!(credential = %self.credential, "Coupa rejected the token; fetching a new one now");
                    "rejected_token"
                }
                _ = self.store.renew_requested() => {
                    info!(credential = %self.credential, "renewing now for the reloaded configuration");
                    "reload"
                }
            };
        }
    }

    /// One fetch, a span of its own when traces are exported.
    async fn traced_fetch(&self, trigger: &'static str) -> Result<FetchedToken, FetchError> {
        let Some(traces) = &self.traces else {
            return self.client.fetch().await;
        };
        let started_at = std::time::SystemTime::now();
        let result = self.client.fetch().await;
        traces.token_fetch(crate::traces::TokenFetch {
            credential: &self.credential,
            trigger,
            started_at,
            ended_at: std::time::SystemTime::now(),
            failure: result.as_ref().err().map(|e| e.outcome()),
        });
        result
    }

    fn log_failure(&self, message: &str, retry_in: Duration, last: &mut Option<String>) {
        let still_valid = self.store.is_ready();
        if last.as_deref() == Some(message) {
            debug!(credential = %self.credential, error = %message, retry_in = ?retry_in,
                "token fetch failed again");
        } else if still_valid {
            warn!(credential = %self.credential, error = %message, retry_in = ?retry_in,
                "token fetch failed; the current token keeps serving");
        } else {
            error!(credential = %self.credential, error = %message, retry_in = ?retry_in,
                "token fetch failed and no valid token is held; requests get 503");
        }
        *last = Some(message.to_owned());
    }

    /// Installs `token` at its activation time; returns when to renew, or
    /// `None` if shut down while waiting.
    async fn activate(&self, token: FetchedToken, shutdown: &CancellationToken) -> Option<Instant> {
        let FetchedToken {
            access_token,
            expires_in,
            scope,
            requested_at,
            requested_at_wall,
            ..
        } = token;
        let usable_until = self.policy.usable_until(requested_at, expires_in);
        let wall_expiry = requested_at_wall + (usable_until - requested_at);
        let active = match ActiveToken::new(
            &access_token,
            requested_at,
            usable_until,
            wall_expiry,
            scope.clone(),
        ) {
            Ok(active) => active,
            Err(_) => {
                // Checked by the client already; kept as a guard.
                let retry_in = self.policy.retry_initial;
                self.store.record_failure(
                    "bad_response",
                    "token is not a valid header value".to_owned(),
                    retry_in,
                );
                return Some(Instant::now() + retry_in);
            }
        };
        self.store.record_success();
        let now = Instant::now();
        let current = self.store.unrejected_expiry(now);
        let activate_at = self.policy.activate_at(now, current);
        let wanted_now = self.store.await_activation();
        info!(
            credential = %self.credential,
            expires_in = ?expires_in,
            expires_at = %humantime::format_rfc3339_seconds(wall_expiry),
            scope = scope.as_deref().unwrap_or(""),
            activates_in = ?(activate_at - now),
            "token fetched"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = sleep_until(activate_at) => {}
            // The current token was rejected: waiting out the activation
            // delay would only fail more requests.
            _ = self.store.refresh_requested() => {}
            _ = wanted_now => {}
        }
        self.store.install(active);
        info!(credential = %self.credential, "token activated");
        Some(self.policy.renew_at(requested_at, expires_in))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::AfterRejection;

    fn policy() -> RefreshPolicy {
        RefreshPolicy {
            refresh_fraction: 0.8333,
            activation_delay: Duration::from_secs(5),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }

    #[test]
    fn coupa_token_is_renewed_after_about_twenty_hours() {
        let t0 = Instant::now();
        let renew = policy().renew_at(t0, Duration::from_secs(86_399)) - t0;
        assert!(
            renew > Duration::from_secs(19 * 3600 + 59 * 60),
            "{renew:?}"
        );
        assert!(renew < Duration::from_secs(20 * 3600 + 60), "{renew:?}");
    }

    #[test]
    fn usable_until_leaves_a_margin_before_expiry() {
        let t0 = Instant::now();
        let p = policy();
        assert_eq!(
            p.usable_until(t0, Duration::from_secs(86_399)) - t0,
            Duration::from_secs(86_339)
        );
        assert_eq!(
            p.usable_until(t0, Duration::from_secs(2)) - t0,
            Duration::from_millis(1900)
        );
    }

    #[test]
    fn renewal_never_spins_on_tiny_lifetimes() {
        let t0 = Instant::now();
        assert_eq!(policy().renew_at(t0, Duration::ZERO) - t0, MIN_RENEW_AFTER);
    }

    #[test]
    fn activation_waits_for_delay_only_while_a_token_is_valid() {
        let p = policy();
        let now = Instant::now();
        assert_eq!(p.activate_at(now, None), now);
        assert_eq!(p.activate_at(now, Some(now)), now);
        assert_eq!(
            p.activate_at(now, Some(now + Duration::from_secs(3600))),
            now + Duration::from_secs(5)
        );
        // The old token runs out before the delay: switch when it does.
        assert_eq!(
            p.activate_at(now, Some(now + Duration::from_secs(2))),
            now + Duration::from_secs(2)
        );
    }

    /// Hands out numbered tokens, or fails while `failing` is set
    /// (with an OAuth configuration error when `misconfigured` is set).
    struct Script {
        fetches: Arc<std::sync::atomic::AtomicU64>,
        failing: Arc<std::sync::atomic::AtomicBool>,
        misconfigured: bool,
        lifetime: Duration,
    }

    impl TokenSource for Script {
        async fn fetch(&self) -> Result<FetchedToken, FetchError> {
            use std::sync::atomic::Ordering;
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            if self.failing.load(Ordering::SeqCst) {
                return Err(if self.misconfigured {
                    FetchError::OAuth {
                        status: 401,
                        code: "invalid_client".into(),
                        description: None,
                        ambiguous_basic: false,
                    }
                } else {
                    FetchError::Http { status: 500 }
                });
            }
            Ok(FetchedToken {
                access_token: crate::secret::Secret::new(format!("t{n}")),
                expires_in: self.lifetime,
                scope: None,
                refresh_token: None,
                requested_at: Instant::now(),
                requested_at_wall: std::time::SystemTime::now(),
            })
        }
    }

    fn bearer(store: &TokenStore) -> Option<String> {
        store
            .bearer(Instant::now())
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn schedule_follows_fraction_activation_delay_and_backoff() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let fetches = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let store = Arc::new(TokenStore::new());
        let refresher = Refresher {
            traces: None,
            client: Script {
                fetches: fetches.clone(),
                failing: failing.clone(),
                misconfigured: false,
                lifetime: Duration::from_secs(1000),
            },
            store: store.clone(),
            policy: RefreshPolicy {
                refresh_fraction: 0.5,
                activation_delay: Duration::from_secs(5),
                retry_initial: Duration::from_secs(1),
                retry_max: Duration::from_secs(8),
            },
            credential: "test".into(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(refresher.run(shutdown.clone()));
        let step = |secs: u64| tokio::time::sleep(Duration::from_secs(secs));

        // First token: active at once, no activation delay without a token.
        step(0).await;
        tokio::task::yield_now().await;
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t1"));

        // Renewal at half the lifetime; the old token serves through the
        // activation delay, then the new one takes over.
        step(499).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        step(2).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t1"));
        step(5).await;
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t2"));

        // The endpoint fails from the next renewal on: retries back off
        // (0.5-1 s, 1-2 s, 2-4 s, then capped at 4-8 s) while t2 serves.
        failing.store(true, Ordering::SeqCst);
        step(500).await; // t = 1006; the renewal was due at 1000
        let attempts = fetches.load(Ordering::SeqCst) - 2;
        assert!((3..=6).contains(&attempts), "{attempts} attempts in 5 s");
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t2"));

        // Past t2's usable end (fetched at 500, + 950): nothing is sent.
        step(950).await;
        assert_eq!(bearer(&store), None);
        let status = store.status();
        assert!(status.fetches_failed > 100);
        assert!(status.last_error.unwrap().contains("HTTP 500"));

        // Recovery within one backoff step (at most 8 s).
        failing.store(false, Ordering::SeqCst);
        step(8).await;
        assert!(bearer(&store).is_some());

        shutdown.cancel();
        task.await.unwrap();
    }

    /// A refresher on a scripted source with a 5 s activation delay and
    /// 1000 s tokens renewed at half their life.
    fn scripted(store: &Arc<TokenStore>) -> (Refresher<Script>, Arc<std::sync::atomic::AtomicU64>) {
        let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refresher = Refresher {
            traces: None,
            client: Script {
                fetches: fetches.clone(),
                failing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                misconfigured: false,
                lifetime: Duration::from_secs(1000),
            },
            store: store.clone(),
            policy: RefreshPolicy {
                refresh_fraction: 0.5,
                ..policy()
            },
            credential: "test".into(),
        };
        (refresher, fetches)
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_fetched_for_a_rejection_is_not_held_back_by_the_activation_delay() {
        let store = Arc::new(TokenStore::new());
        let (refresher, fetches) = scripted(&store);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(refresher.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t1 = store.bearer(Instant::now()).unwrap();
        assert_eq!(t1, "Bearer t1");

        // Coupa rejects t1 long before its renewal: the new token serves
        // as soon as it is fetched, not 5 s later.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let cooldown = Duration::from_secs(10);
        assert_eq!(store.report_rejected(&t1, cooldown), AfterRejection::Wait);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t2"));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_during_the_activation_delay_installs_the_waiting_token_and_keeps_the_cooldown(
    ) {
        let store = Arc::new(TokenStore::new());
        let (refresher, fetches) = scripted(&store);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(refresher.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t1 = store.bearer(Instant::now()).unwrap();

        // The scheduled renewal fetched t2, which waits out the delay; the
        // server ended t1 when it issued t2.
        tokio::time::sleep(Duration::from_secs(501)).await;
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t1"));
        let cooldown = Duration::from_secs(10);
        assert_eq!(store.report_rejected(&t1, cooldown), AfterRejection::Wait);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t2"));
        assert_eq!(
            fetches.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "no extra fetch"
        );

        // A genuine revocation of t2 right after still gets a fetch: the
        // superseded t1's 401 did not spend the cooldown.
        let t2 = store.bearer(Instant::now()).unwrap();
        assert_eq!(store.report_rejected(&t2, cooldown), AfterRejection::Wait);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(bearer(&store).as_deref(), Some("Bearer t3"));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn configuration_errors_are_retried_in_minutes_not_seconds() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let fetches = Arc::new(AtomicU64::new(0));
        let store = Arc::new(TokenStore::new());
        let refresher = Refresher {
            traces: None,
            client: Script {
                fetches: fetches.clone(),
                failing: Arc::new(AtomicBool::new(true)),
                misconfigured: true,
                lifetime: Duration::from_secs(1000),
            },
            store: store.clone(),
            policy: policy(),
            credential: "test".into(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(refresher.run(shutdown.clone()));
        // retry_max is 5 min: the second attempt comes after 2.5-5 min.
        tokio::time::sleep(Duration::from_secs(149)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(152)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        assert!(store
            .status()
            .last_error
            .unwrap()
            .contains("invalid_client"));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn missing_scopes_are_the_new_ones() {
        assert_eq!(
            missing_scopes(
                "core.a.read core.b.read core.c.write",
                "core.a.read core.b.read"
            ),
            vec!["core.c.write".to_owned()]
        );
        assert!(missing_scopes("core.a.read", "core.a.read").is_empty());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let delays: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays[3] >= Duration::from_secs(4) && delays[3] <= Duration::from_secs(8));
        for d in &delays {
            assert!(*d <= Duration::from_secs(300));
        }
        assert!(delays[11] >= Duration::from_secs(150));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
