//! Guessing slowed per source: failed legacy keys, failed local client
//! secrets and failed status-page logins from one address are answered at
//! once within a small budget, then increasingly late. A valid credential
//! is never looked up here, so it is never delayed, from any source: a busy
//! integration behind the same NAT as a broken one keeps its speed.
//!
//! The budget is a bucket of [`BUDGET`] failures refilled one per
//! [`REFILL_EVERY`]. Past it, failed answers from the source leave one at a
//! time, each [`FIRST_STEP`] after the previous, the step doubling up to
//! [`MAX_STEP`]: however many guesses a source sends at once, their
//! answers come out at that pace. A source being slowed earns nothing back
//! until it has been quiet for a whole refill (a minute) after its last
//! delayed answer; then it has its whole budget again. The table holds at most [`CAPACITY`] sources; when it
//! is full, sources not being slowed make room first (oldest first), so a
//! flood of one-off addresses cannot free a source that is being slowed.
//! IPv6 sources count by their /64, the block one host gets.
//!
//! The log says when a source first runs past its budget and then once per
//! [`SUMMARY_EVERY`] with the count, instead of a warning per guess.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Failures a source may have answered at once.
pub const BUDGET: u32 = 10;
/// One more failure answered at once per this (ten a minute).
pub const REFILL_EVERY: Duration = Duration::from_secs(6);
/// The pace of the first answer past the budget.
pub const FIRST_STEP: Duration = Duration::from_millis(250);
/// The slowest pace: one failed answer per this, per source.
pub const MAX_STEP: Duration = Duration::from_secs(4);
/// Sources remembered at most (about 100 bytes each).
pub const CAPACITY: usize = 4096;
/// How often a source being slowed is summarised in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What was guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guess {
    /// An `X-COUPA-API-KEY` no integration has.
    LegacyKey,
    /// A wrong local client secret at the proxy's `/oauth2/token`.
    LocalClientSecret,
    /// A wrong password for the status page.
    StatusLogin,
}

impl Guess {
    pub fn as_str(self) -> &'static str {
        match self {
            Guess::LegacyKey => "legacy_key",
            Guess::LocalClientSecret => "local_client_secret",
            Guess::StatusLogin => "status_login",
        }
    }
}

/// One source's account.
#[derive(Debug, Clone, Copy)]
struct Source {
    /// Failures that may still be answered at once (fractional: refilled
    /// continuously).
    allowance: f64,
    refilled: Instant,
    /// Failures past the budget since the source was last at rest.
    excess: u32,
    /// When the source's latest delayed answer leaves.
    release_at: Instant,
    /// Failures since the last log line about the source.
    unlogged: u64,
    logged_at: Instant,
}

impl Source {
    fn new(now: Instant) -> Self {
        Self {
            allowance: f64::from(BUDGET),
            refilled: now,
            excess: 0,
            release_at: now,
            unlogged: 0,
            logged_at: now,
        }
    }

    /// Brings the account to `now`: a source not being slowed earns its
    /// allowance back continuously; one being slowed earns nothing until
    /// it has been quiet for a whole refill after its last delayed answer,
    /// then starts again with its whole budget.
    fn settle(&mut self, now: Instant) {
        if self.slowed() {
            if now >= self.release_at + REFILL_EVERY * BUDGET {
                self.excess = 0;
                self.allowance = f64::from(BUDGET);
            }
        } else {
            let earned = now.saturating_duration_since(self.refilled).as_secs_f64()
                / REFILL_EVERY.as_secs_f64();
            self.allowance = (self.allowance + earned).min(f64::from(BUDGET));
        }
        self.refilled = now;
    }

    fn slowed(&self) -> bool {
        self.excess > 0
    }

    /// The gap between its late answers now: [`FIRST_STEP`] doubled for
    /// each failure past the budget, at most [`MAX_STEP`].
    fn step(&self) -> Duration {
        FIRST_STEP
            .saturating_mul(1u32 << self.excess.saturating_sub(1).min(16))
            .min(MAX_STEP)
    }

    fn last_seen(&self) -> Instant {
        self.refilled
    }
}

/// The failures of every source, and their counts for `/metrics`.
pub struct Guesses {
    sources: Mutex<HashMap<IpAddr, Source>>,
    metrics: GuessMetrics,
    /// Cancelled when the proxy drains: delayed answers go out at once
    /// rather than holding the drain up.
    draining: CancellationToken,
}

impl Guesses {
    pub fn new(metrics: GuessMetrics, draining: CancellationToken) -> Self {
        Self {
            sources: Mutex::new(HashMap::new()),
            metrics,
            draining,
        }
    }

    /// Counts a failed credential from `ip` and waits as long as its
    /// source's account says; returns how long that was to be.
    pub async fn failed(&self, ip: IpAddr, guess: Guess) -> Duration {
        let delay = self.account(ip, guess, Instant::now());
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.draining.cancelled() => {}
            }
        }
        delay
    }

    /// The bookkeeping of [`Self::failed`], at `now`: how long the answer
    /// waits.
    fn account(&self, ip: IpAddr, guess: Guess, now: Instant) -> Duration {
        let key = source_of(ip);
        let kind = [("kind", guess.as_str())];
        self.metrics.failed.get_or_create(&kind).inc();
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !sources.contains_key(&key) && sources.len() >= CAPACITY {
            make_room(&mut sources);
        }
        let source = sources.entry(key).or_insert_with(|| Source::new(now));
        source.settle(now);
        let delay = if !source.slowed() && source.allowance >= 1.0 {
            source.allowance -= 1.0;
            Duration::ZERO
        } else {
            source.excess = source.excess.saturating_add(1);
            source.release_at = source.release_at.max(now) + source.step();
            self.metrics.delayed.get_or_create(&kind).inc();
            let first = source.excess == 1;
            source.unlogged += 1;
            if first || now.saturating_duration_since(source.logged_at) >= SUMMARY_EVERY {
                summarise(key, guess, source, first);
                source.unlogged = 0;
                source.logged_at = now;
            }
            source.release_at.saturating_duration_since(now)
        };
        self.metrics.sources.set(sources.len() as i64);
        delay
    }
}

fn summarise(key: IpAddr, guess: Guess, source: &Source, first: bool) {
    if first {
        warn!(
            source = %key,
            kind = guess.as_str(),
            budget = BUDGET,
            "failed credentials from one source passed their budget; its failed answers are now delayed (summarised every minute)"
        );
    } else {
        warn!(
            source = %key,
            kind = guess.as_str(),
            failed = source.unlogged,
            step_ms = source.step().as_millis() as u64,
            "failed credentials from one source in the last minute, answered late"
        );
    }
}

/// Frees one place: the source seen longest ago among those not being
/// slowed, or, if every source is being slowed, the one seen longest ago.
fn make_room(sources: &mut HashMap<IpAddr, Source>) {
    let oldest = sources
        .iter()
        .min_by_key(|(_, source)| (source.slowed(), source.last_seen()))
        .map(|(key, _)| *key);
    if let Some(key) = oldest {
        sources.remove(&key);
    }
}

/// The address guesses are counted by: an IPv4 address (IPv4-mapped IPv6
/// included), or an IPv6 address's /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(Ipv6Addr::from(segments))
            }
        },
    }
}

/// Failed credentials by kind, those answered late, and the sources held.
#[derive(Debug, Clone, Default)]
pub struct GuessMetrics {
    failed: Family<[(&'static str, &'static str); 1], Counter>,
    delayed: Family<[(&'static str, &'static str); 1], Counter>,
    sources: Gauge,
}

impl GuessMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "failed_credentials",
            "Failed credentials, by kind: legacy_key (an unknown X-COUPA-API-KEY), local_client_secret (the proxy's /oauth2/token), status_login (the status page)",
            self.failed.clone(),
        );
        registry.register(
            "failed_credentials_delayed",
            "Failed credentials answered late because their source had passed its budget, by kind",
            self.delayed.clone(),
        );
        registry.register(
            "failed_credential_sources",
            "Sources with failed credentials the proxy remembers (bounded)",
            self.sources.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guesses() -> Guesses {
        Guesses::new(GuessMetrics::default(), CancellationToken::new())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_budget_answers_leave_one_at_a_time_at_a_doubling_pace() {
        let guesses = guesses();
        let now = Instant::now();
        let attacker = ip("192.0.2.7");
        for _ in 0..BUDGET {
            let delay = guesses.account(attacker, Guess::LegacyKey, now);
            assert_eq!(delay, Duration::ZERO);
        }
        // Ten more at the same instant: each leaves one step after the
        // one before it, the steps doubling up to the maximum.
        let delays: Vec<u64> = (0..8)
            .map(|_| guesses.account(attacker, Guess::LegacyKey, now).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [250, 750, 1750, 3750, 7750, 11750, 15750, 19750],
            "250 ms, then doubling to 4 s apart"
        );
        // Another source is not touched.
        let neighbour = guesses.account(ip("192.0.2.8"), Guess::LegacyKey, now);
        assert_eq!(neighbour, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sustained_guesser_gets_one_answer_per_max_step_and_rest_restores_the_budget() {
        let guesses = guesses();
        let attacker = ip("192.0.2.9");
        let start = Instant::now();
        let mut now = start;
        let mut answered_at = Vec::new();
        // A client that waits for each answer and sends the next at once.
        while now < start + Duration::from_secs(3600) {
            let delay = guesses.account(attacker, Guess::LocalClientSecret, now);
            now += delay + Duration::from_millis(1);
            answered_at.push(now);
        }
        let per_hour = answered_at.len();
        assert!(
            // The budget, one per step, and the four quicker steps of the
            // ramp (250 ms to 2 s).
            per_hour <= BUDGET as usize + 3600 / MAX_STEP.as_secs() as usize + 4,
            "{per_hour} answers in an hour"
        );
        assert!(
            per_hour >= 3600 / MAX_STEP.as_secs() as usize - 5,
            "{per_hour}"
        );
        // Quiet for a whole refill: the budget is back.
        now += REFILL_EVERY * BUDGET;
        for _ in 0..BUDGET {
            assert_eq!(
                guesses.account(attacker, Guess::LocalClientSecret, now),
                Duration::ZERO
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_keeps_the_sources_being_slowed() {
        let guesses = guesses();
        let now = Instant::now();
        let attacker = ip("198.51.100.1");
        for _ in 0..=BUDGET {
            guesses.account(attacker, Guess::LegacyKey, now);
        }
        for n in 0..20_000u32 {
            let one_off = IpAddr::V4((0x0a00_0000 + n).into());
            guesses.account(one_off, Guess::LegacyKey, now);
        }
        let sources = guesses.sources.lock().unwrap();
        assert_eq!(sources.len(), CAPACITY);
        assert!(sources.get(&attacker).is_some_and(Source::slowed));
        assert_eq!(guesses.metrics.sources.get(), CAPACITY as i64);
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        assert_eq!(
            source_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(source_of(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(source_of(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_sends_delayed_answers_at_once() {
        let draining = CancellationToken::new();
        let guesses = Guesses::new(GuessMetrics::default(), draining.clone());
        let attacker = ip("192.0.2.10");
        for _ in 0..BUDGET + 4 {
            guesses.account(attacker, Guess::StatusLogin, Instant::now());
        }
        let started = Instant::now();
        let waiting = guesses.failed(attacker, Guess::StatusLogin);
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("answered before its turn"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        draining.cancel();
        let delay = waiting.await;
        assert!(delay > Duration::from_secs(1));
        assert!(started.elapsed() < delay);
    }
}
