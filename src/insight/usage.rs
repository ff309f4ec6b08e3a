//! One integration's usage: counts per resource, method and answer, a
//! minute-by-minute ring for the last hour, and when it was seen. Updated
//! on the request path with atomics only; a new resource takes a lock once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Method, StatusCode};

use super::resource::{Resource, OTHER, OUTSIDE_API};

/// Resources counted by name per integration; beyond it, [`OTHER`].
pub const MAX_RESOURCES: usize = 64;

/// Methods as the view shows them.
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "other"];
/// Answers as the view shows them (`4xx`: the other 4xx).
pub const ANSWERS: [&str; 8] = ["2xx", "3xx", "401", "403", "404", "429", "4xx", "5xx"];
const FORBIDDEN: usize = 3;

/// The formats a request that stated no `Accept` was given, as the view
/// shows them.
pub const FORMATS: [&str; 3] = ["json", "xml", "other"];

/// Which of [`FORMATS`] an `Accept` value asks for.
pub fn format_index(accept: &http::HeaderValue) -> usize {
    let text = accept.as_bytes();
    // The defaults as configured, compared whole first.
    match text {
        b"application/json" => return 0,
        b"application/xml" => return 1,
        _ => {}
    }
    let has = |needle: &[u8]| {
        text.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if has(b"json") {
        0
    } else if has(b"xml") {
        1
    } else {
        2
    }
}

pub use super::ring::MINUTES;
use super::ring::{count_minute, last_hour};
/// A 403 for one (method, resource) is logged at most this often.
pub const FORBIDDEN_LOG_EVERY: Duration = Duration::from_secs(3600);

pub fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        _ => 6,
    }
}

pub fn answer_index(status: StatusCode) -> usize {
    match status.as_u16() {
        200..=299 => 0,
        401 => 2,
        403 => FORBIDDEN,
        404 => 4,
        429 => 5,
        400..=499 => 6,
        500.. => 7,
        _ => 1,
    }
}

/// How a request was identified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Via {
    /// It carried `X-COUPA-API-KEY`.
    LegacyKey,
    /// It carried a token from the proxy's `/oauth2/token`.
    LocalToken,
    /// Neither (the unauthenticated default, or refused).
    #[default]
    Nothing,
}

/// Counts of one resource.
pub struct ResourceUsage {
    pub name: Box<str>,
    counts: [[AtomicU64; ANSWERS.len()]; METHODS.len()],
    /// Per method: the time (ms on the view's clock) before which no
    /// further 403 is logged.
    forbidden_quiet_until: [AtomicU64; METHODS.len()],
}

impl ResourceUsage {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            counts: Default::default(),
            forbidden_quiet_until: Default::default(),
        }
    }

    /// Count of (method, answer) by index.
    pub fn count(&self, method: usize, answer: usize) -> u64 {
        self.counts[method][answer].load(Ordering::Relaxed)
    }
}

/// One integration's usage ("" is the unauthenticated default).
pub struct Usage {
    pub name: Arc<str>,
    resources: ArcSwap<Vec<Arc<ResourceUsage>>>,
    /// Serialises adding a resource; reads never take it.
    adding: Mutex<()>,
    other: ResourceUsage,
    outside: ResourceUsage,
    /// Milliseconds on the view's clock, plus one; 0 means never.
    first_seen: AtomicU64,
    last_seen: AtomicU64,
    last_legacy_key: AtomicU64,
    last_local_token: AtomicU64,
    /// Answers with status 5xx, or errors the proxy answered itself.
    errors: AtomicU64,
    /// Coupa's own 4xx answers (a missing scope's 403, a 404, a 422):
    /// what a migrating operator looks for, apart from the errors.
    refused_by_coupa: AtomicU64,
    /// Requests forwarded with no `Accept` of their own (none, or only
    /// `*/*`), by the format they were given ([`FORMATS`]).
    defaulted_accept: [AtomicU64; FORMATS.len()],
    /// Per slot: (minute number << 32) | requests in that minute.
    per_minute: [AtomicU64; MINUTES],
    /// The same for slots of Coupa's budget (`[coupa.rate_limit]`) it
    /// was given: one per attempt sent.
    slots_per_minute: [AtomicU64; MINUTES],
    /// Coupa's 429s to it, and the re-sends that absorbed them.
    pub coupa_refusals: super::refusals::CoupaRefusals,
    /// Where its forwarded requests spent their time, the last hour.
    pub time_spent: super::time_spent::TimeSpent,
}

impl Usage {
    pub fn new(name: Arc<str>) -> Self {
        Self {
            name,
            resources: ArcSwap::from_pointee(Vec::new()),
            adding: Mutex::new(()),
            other: ResourceUsage::new(OTHER),
            outside: ResourceUsage::new(OUTSIDE_API),
            first_seen: AtomicU64::new(0),
            last_seen: AtomicU64::new(0),
            last_legacy_key: AtomicU64::new(0),
            last_local_token: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refused_by_coupa: AtomicU64::new(0),
            defaulted_accept: Default::default(),
            per_minute: std::array::from_fn(|_| AtomicU64::new(0)),
            slots_per_minute: std::array::from_fn(|_| AtomicU64::new(0)),
            coupa_refusals: Default::default(),
            time_spent: Default::default(),
        }
    }

    /// Counts one answered request at `now` (on the view's clock);
    /// `refused`: the proxy answered it without forwarding. True
    /// when it is a 403 that should be logged: the first for this
    /// (method, resource) within [`FORBIDDEN_LOG_EVERY`].
    pub fn record(
        &self,
        now: Duration,
        via: Via,
        method: &Method,
        resource: Resource<'_>,
        status: StatusCode,
        refused: bool,
    ) -> bool {
        let stamp = now.as_millis() as u64 + 1;
        if self.first_seen.load(Ordering::Relaxed) == 0 {
            let _ =
                self.first_seen
                    .compare_exchange(0, stamp, Ordering::Relaxed, Ordering::Relaxed);
        }
        touch(&self.last_seen, stamp);
        match via {
            Via::LegacyKey => touch(&self.last_legacy_key, stamp),
            Via::LocalToken => touch(&self.last_local_token, stamp),
            Via::Nothing => {}
        }
        if refused || status.is_server_error() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        } else if status.is_client_error() {
            self.refused_by_coupa.fetch_add(1, Ordering::Relaxed);
        }
        count_minute(&self.per_minute, now);
        let (m, a) = (method_index(method), answer_index(status));
        self.with_resource(resource, |usage| {
            usage.counts[m][a].fetch_add(1, Ordering::Relaxed);
            if a != FORBIDDEN {
                return false;
            }
            let quiet_until = &usage.forbidden_quiet_until[m];
            let until = quiet_until.load(Ordering::Relaxed);
            let next = stamp + FORBIDDEN_LOG_EVERY.as_millis() as u64;
            // Whoever moves the mark forward logs; racing requests do not.
            stamp >= until
                && quiet_until
                    .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        })
    }

    fn with_resource<T>(&self, resource: Resource<'_>, f: impl Fn(&ResourceUsage) -> T) -> T {
        let name = match resource {
            Resource::Named(name) => name,
            Resource::Other => return f(&self.other),
            Resource::OutsideApi => return f(&self.outside),
        };
        if let Some(found) = self.resources.load().iter().find(|r| &*r.name == name) {
            return f(found);
        }
        let Ok(_adding) = self.adding.lock() else {
            return f(&self.other);
        };
        let current = self.resources.load_full();
        if let Some(found) = current.iter().find(|r| &*r.name == name) {
            return f(found);
        }
        if current.len() >= MAX_RESOURCES {
            return f(&self.other);
        }
        let added = Arc::new(ResourceUsage::new(name));
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().cloned());
        next.push(added.clone());
        self.resources.store(Arc::new(next));
        f(&added)
    }

    /// Requests per minute over the last hour, oldest first; the last
    /// entry is the current minute.
    pub fn per_minute(&self, now: Duration) -> [u64; MINUTES] {
        last_hour(&self.per_minute, now)
    }

    /// Counts one slot of Coupa's budget given to it at `now`.
    pub fn count_slot(&self, now: Duration) {
        count_minute(&self.slots_per_minute, now);
    }

    /// Slots of Coupa's budget it was given per minute over the last
    /// hour, oldest first.
    pub fn slots_per_minute(&self, now: Duration) -> [u64; MINUTES] {
        last_hour(&self.slots_per_minute, now)
    }

    /// Slots of Coupa's budget it was given in the last hour.
    pub fn slots_last_hour(&self, now: Duration) -> u64 {
        last_hour(&self.slots_per_minute, now).iter().sum()
    }

    /// The named resources, in order of first use.
    pub fn resources(&self) -> Vec<Arc<ResourceUsage>> {
        self.resources.load_full().iter().cloned().collect()
    }

    /// [`Self::resources`], then `other` and the paths outside `/api/`.
    pub fn for_each_resource(&self, mut f: impl FnMut(&ResourceUsage)) {
        for resource in self.resources.load().iter() {
            f(resource);
        }
        f(&self.other);
        f(&self.outside);
    }

    pub fn first_seen(&self) -> Option<Duration> {
        at(&self.first_seen)
    }
    pub fn last_seen(&self) -> Option<Duration> {
        at(&self.last_seen)
    }
    pub fn last_legacy_key(&self) -> Option<Duration> {
        at(&self.last_legacy_key)
    }
    pub fn last_local_token(&self) -> Option<Duration> {
        at(&self.last_local_token)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Coupa's own 4xx answers to it.
    pub fn refused_by_coupa(&self) -> u64 {
        self.refused_by_coupa.load(Ordering::Relaxed)
    }

    /// A request that stated no `Accept` was forwarded with `given`.
    pub fn defaulted_accept(&self, given: &http::HeaderValue) {
        self.defaulted_accept[format_index(given)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests forwarded on the default `Accept`, per [`FORMATS`].
    pub fn defaulted_accepts(&self) -> [u64; FORMATS.len()] {
        std::array::from_fn(|i| self.defaulted_accept[i].load(Ordering::Relaxed))
    }
}

/// Moves a last-seen mark to `stamp`, at most once a second: a read on
/// most requests instead of a locked write that every core contends for.
fn touch(mark: &AtomicU64, stamp: u64) {
    let current = mark.load(Ordering::Relaxed);
    if current == 0 || current + 1000 <= stamp {
        mark.fetch_max(stamp, Ordering::Relaxed);
    }
}

fn at(stamp: &AtomicU64) -> Option<Duration> {
    match stamp.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms - 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(usage: &Usage, name: &str) -> u64 {
        let mut sum = 0;
        usage.for_each_resource(|r| {
            if &*r.name == name {
                for m in 0..METHODS.len() {
                    for a in 0..ANSWERS.len() {
                        sum += r.count(m, a);
                    }
                }
            }
        });
        sum
    }

    #[test]
    fn counts_land_by_resource_method_and_answer() {
        let usage = Usage::new("erp".into());
        let t = Duration::from_secs(10);
        let ok = StatusCode::OK;
        usage.record(
            t,
            Via::LegacyKey,
            &Method::GET,
            Resource::Named("invoices"),
            ok,
            false,
        );
        usage.record(
            t,
            Via::LegacyKey,
            &Method::PUT,
            Resource::Named("invoices"),
            StatusCode::NOT_FOUND,
            false,
        );
        usage.record(
            t,
            Via::LegacyKey,
            &Method::GET,
            Resource::Named("suppliers"),
            StatusCode::TOO_MANY_REQUESTS,
            false,
        );
        usage.record(
            t,
            Via::LegacyKey,
            &Method::OPTIONS,
            Resource::OutsideApi,
            StatusCode::BAD_GATEWAY,
            true,
        );
        let invoices = usage
            .resources()
            .into_iter()
            .find(|r| &*r.name == "invoices")
            .unwrap();
        assert_eq!(invoices.count(0, 0), 1, "GET 2xx");
        assert_eq!(invoices.count(3, 4), 1, "PUT 404");
        assert_eq!(total(&usage, "suppliers"), 1);
        assert_eq!(total(&usage, OUTSIDE_API), 1);
        assert_eq!(usage.errors(), 1);
        assert_eq!(usage.first_seen(), Some(t));
        assert_eq!(usage.last_legacy_key(), Some(t));
        assert_eq!(usage.last_local_token(), None);
    }

    #[test]
    fn past_the_cap_new_resources_count_as_other() {
        let usage = Usage::new("erp".into());
        let names: Vec<String> = (0..MAX_RESOURCES + 5).map(|i| format!("r{i}")).collect();
        for name in &names {
            usage.record(
                Duration::ZERO,
                Via::Nothing,
                &Method::GET,
                Resource::Named(name),
                StatusCode::OK,
                false,
            );
        }
        // A resource known before the cap keeps counting under its name.
        usage.record(
            Duration::ZERO,
            Via::Nothing,
            &Method::GET,
            Resource::Named("r0"),
            StatusCode::OK,
            false,
        );
        assert_eq!(usage.resources().len(), MAX_RESOURCES);
        assert_eq!(total(&usage, OTHER), 5);
        assert_eq!(total(&usage, "r0"), 2);
    }

    #[test]
    fn a_403_is_reported_once_per_method_and_resource_per_hour() {
        let usage = Usage::new("erp".into());
        let forbidden = |at: u64, method: &Method, resource: &str| {
            usage.record(
                Duration::from_secs(at),
                Via::LegacyKey,
                method,
                Resource::Named(resource),
                StatusCode::FORBIDDEN,
                false,
            )
        };
        assert!(forbidden(0, &Method::GET, "invoices"));
        assert!(!forbidden(1, &Method::GET, "invoices"));
        assert!(forbidden(2, &Method::POST, "invoices"), "another method");
        assert!(forbidden(3, &Method::GET, "suppliers"), "another resource");
        assert!(!forbidden(3599, &Method::GET, "invoices"));
        assert!(forbidden(3600, &Method::GET, "invoices"), "an hour later");
        let invoices = usage
            .resources()
            .into_iter()
            .find(|r| &*r.name == "invoices")
            .unwrap();
        assert_eq!(invoices.count(0, FORBIDDEN), 4, "every 403 is counted");
    }

    #[test]
    fn the_minute_ring_keeps_the_last_hour_only() {
        let usage = Usage::new("erp".into());
        let at = |minute: u64, second: u64| Duration::from_secs(minute * 60 + second);
        for _ in 0..3 {
            usage.record(
                at(0, 5),
                Via::Nothing,
                &Method::GET,
                Resource::Other,
                StatusCode::OK,
                false,
            );
        }
        usage.record(
            at(59, 0),
            Via::Nothing,
            &Method::GET,
            Resource::Other,
            StatusCode::OK,
            false,
        );
        let series = usage.per_minute(at(59, 30));
        assert_eq!(series[0], 3, "the oldest minute of the hour");
        assert_eq!(series[MINUTES - 1], 1);
        assert_eq!(series.iter().sum::<u64>(), 4);
        // An hour on, minute 0's slot is reused; its old count is gone.
        usage.record(
            at(60, 0),
            Via::Nothing,
            &Method::GET,
            Resource::Other,
            StatusCode::OK,
            false,
        );
        let series = usage.per_minute(at(60, 1));
        assert_eq!(series.iter().sum::<u64>(), 2);
        assert_eq!(series[MINUTES - 1], 1);
        assert_eq!(series[MINUTES - 2], 1);
    }
}
