//! Phase 3b, `resend_rate_limited`: Coupa answered 429. Its budget is per
//! instance and shared with clients outside the proxy, and most legacy
//! integrations take any non-2xx answer for a failed job. A 429 is an
//! answer to a request the server did not process (RFC 6585 §4), so
//! sending it again later is safe, for a POST too: the request, its body
//! kept for replay, waits Coupa's `Retry-After` (a second without one) and
//! goes again through its integration's place in the rate limit, while
//! `coupa.resend_429_within` allows in all. Past that bound, or without
//! the body, Coupa's 429 goes to the client unchanged. A request whose
//! client has gone is dropped by the server while it waits, so it is not
//! sent again.

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderMap, Method, StatusCode, Uri};
use tracing::debug;

use super::body::Replay;
use super::core::{Proxy, Trace};
use super::upstream::Leased;
use super::{ratelimit, ProxyError};

impl Proxy {
    /// `leased` as it is, or, while Coupa answers 429 and the bound
    /// allows, the answer to the request sent again after the wait Coupa
    /// asked for.
    pub(super) async fn resend_rate_limited(
        &self,
        mut leased: Leased,
        replay: &Replay,
        (method, uri, headers): (&Method, &Uri, &HeaderMap),
        trace: &mut Trace,
    ) -> Result<Leased, ProxyError> {
        let inner = &*self.inner;
        while leased.response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = leased.response.headers().get(RETRY_AFTER);
            if let Some(limiter) = &inner.rate_limiter {
                limiter.coupa_rate_limited(retry_after);
            }
            inner.insight.coupa_refused(self.usage(trace));
            let Some(wait) = next_wait(retry_after, trace.resend_wait, inner.resend_429_within)
            else {
                break;
            };
            let Some(body) = replay.body() else {
                break;
            };
            // Read off (small) so the connection serves others meanwhile.
            let _ = self.buffer_rejection(leased).await?;
            let waited = std::time::Instant::now();
            tokio::time::sleep(wait).await;
            trace.note_wait("429 wait", waited);
            trace.resend_wait += wait;
            trace.resends += 1;
            inner.insight.resent(self.usage(trace), wait);
            debug!(wait = ?wait, "sending a request Coupa answered 429 again");
            // As any send: again on another connection when that is safe.
            leased = self
                .send_with_retries(method, uri, headers, body, replay, trace)
                .await?;
        }
        Ok(leased)
    }
}

/// How long the next re-send waits — Coupa's `Retry-After` (a second
/// without one, at least [`MIN_WAIT`]) — or `None` when that would take the
/// request's waits past `bound` (zero: never re-sent).
fn next_wait(
    retry_after: Option<&http::HeaderValue>,
    waited: Duration,
    bound: Duration,
) -> Option<Duration> {
    let wait = ratelimit::hold_off(retry_after).max(MIN_WAIT);
    (waited + wait <= bound).then_some(wait)
}

/// How long a re-send waits at least: after `Retry-After: 0` a request
/// sent again at once would only meet the next 429, and the bound would
/// never be reached.
const MIN_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// The schedule a request meets while Coupa keeps answering 429.
    fn schedule(retry_after: Option<&str>, bound: Duration) -> Vec<Duration> {
        let header = retry_after.map(|v| HeaderValue::from_str(v).unwrap());
        let mut waited = Duration::ZERO;
        let mut waits = Vec::new();
        while let Some(wait) = next_wait(header.as_ref(), waited, bound) {
            waited += wait;
            waits.push(wait);
        }
        waits
    }

    #[test]
    fn resends_follow_retry_after_within_the_bound() {
        let s = Duration::from_secs;
        assert_eq!(schedule(Some("2"), s(30)), vec![s(2); 15]);
        assert_eq!(
            schedule(Some("2"), s(3)),
            vec![s(2)],
            "a second wait would pass 3 s"
        );
        assert_eq!(
            schedule(None, s(3)),
            vec![s(1); 3],
            "a second without Retry-After"
        );
        assert_eq!(
            schedule(Some("0"), s(2)),
            vec![s(1); 2],
            "never a busy loop"
        );
        assert_eq!(
            schedule(Some("soon"), s(1)),
            vec![s(1)],
            "an unreadable value: a second"
        );
        assert_eq!(
            schedule(Some("120"), s(90)),
            vec![s(60)],
            "at most a minute"
        );
        assert!(
            schedule(Some("2"), Duration::ZERO).is_empty(),
            "0s: passed on at once"
        );
    }
}
