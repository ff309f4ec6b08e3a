//! Token lifecycle under load: rotation without failed requests, no token
//! used after its expiry, and the 503 → 200 path when the token endpoint
//! fails at start-up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::fake_coupa::TokenFailure;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_concurrent_load_fails_no_request_and_never_sends_an_expired_token() {
    // 2 s tokens renewed at half-life: a rotation about every second.
    let fake = start_fake(Duration::from_secs(2)).await;
    let text = config_text(&fake.base_url(), "", "refresh_fraction = 0.5");
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    let first_issued = fake.state().tokens_issued();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let distinct_tokens = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = http_client();
        let url = proxy.url("/api/invoices?limit=1");
        let (ok, failed, stop, tokens) = (
            ok.clone(),
            failed.clone(),
            stop.clone(),
            distinct_tokens.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match client
                    .get(&url)
                    .header("x-coupa-api-key", LEGACY_KEY)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        let echo: serde_json::Value = r.json().await.unwrap();
                        tokens.lock().unwrap().insert(echoed_token(&echo));
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    // Three rotations after the first token, while the load runs.
    eventually("three rotations", || {
        let issued = fake.state().tokens_issued();
        async move { issued >= first_issued + 3 }
    })
    .await;
    // Let the last rotated token serve some traffic before stopping.
    let seen = ok.load(Ordering::SeqCst);
    eventually("traffic after the last rotation", || {
        let now = ok.load(Ordering::SeqCst);
        async move { now > seen + 50 }
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during rotation"
    );
    assert_eq!(fake.state().rejected_api_requests(), 0);
    assert_eq!(
        fake.state().expired_token_uses(),
        0,
        "a token was sent after its expiry"
    );
    assert!(
        distinct_tokens.lock().unwrap().len() >= 3,
        "traffic used {} tokens; rotation did not reach the request path",
        distinct_tokens.lock().unwrap().len()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_at_startup_gives_503_then_recovers() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    fake.state()
        .set_token_failure(Some(TokenFailure::ServerError));
    let proxy = TestProxy::start(parse_config(&config_text(&fake.base_url(), "", ""))).await;
    let client = http_client();

    // Wait until the proxy has tried (and failed) at least twice.
    eventually("failed token attempts", || {
        let n = fake.state().token_requests();
        async move { n >= 2 }
    })
    .await;
    let response = client
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "no_token");
    assert_eq!(
        fake.state().api_requests() + fake.state().rejected_api_requests(),
        0,
        "nothing may be forwarded without a token"
    );

    let ready = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert!(ready["last_token_error"]
        .as_str()
        .unwrap()
        .contains("HTTP 500"));
    let health = client
        .get(proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    fake.state().set_token_failure(None);
    proxy.wait_ready().await;
    let response = client
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    proxy.stop().await;
}

/// Fifty requests arrive while the first token is still being fetched
/// (the fake holds its answer back): they all wait on that one fetch, and
/// a second burst once the token is held fetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fetch_at_a_time_and_none_while_the_token_is_fresh() {
    const BURST: usize = 50;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    fake.state().set_token_delay(Duration::from_secs(3));
    let proxy = TestProxy::start(parse_config(&config_text(&fake.base_url(), "", ""))).await;
    let client = http_client();
    let burst = || {
        (0..BURST)
            .map(|_| {
                let request = client.get(proxy.url("/api/invoices")).send();
                tokio::spawn(async move { request.await.unwrap().status() })
            })
            .collect::<Vec<_>>()
    };
    let waiting = burst();
    let metrics_url = proxy.admin_url("/metrics");
    eventually("the whole burst waits for the first token", || async {
        let metrics = scrape(&metrics_url).await;
        metric(&metrics, "coupa_proxy_in_flight_requests", &[]) == BURST as f64
    })
    .await;
    assert_eq!(fake.state().token_requests(), 1, "one fetch under way");
    for t in waiting {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(fake.state().token_requests(), 1, "the burst shared it");
    for t in burst() {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        fake.state().token_requests(),
        1,
        "none while the token is fresh"
    );
    proxy.stop().await;
}
