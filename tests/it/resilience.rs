//! Failure behaviour against a misbehaving fake Coupa: rejected tokens,
//! token endpoint outages, slow, stalling, broken and flaky upstreams, and
//! rate limits. Each test injects one fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::fake_coupa::TokenFailure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DAY: Duration = Duration::from_secs(86_399);

async fn start_with(
    coupa_extra: &str,
    oauth_extra: &str,
) -> (coupa_auth_proxy::fake_coupa::FakeCoupa, TestProxy) {
    let fake = start_fake(DAY).await;
    let proxy = TestProxy::start(parse_config(&config_text(
        &fake.base_url(),
        coupa_extra,
        oauth_extra,
    )))
    .await;
    proxy.wait_ready().await;
    (fake, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refreshed_once_and_every_request_replayed() {
    let (fake, proxy) = start_pair(DAY).await;
    let before = fake.state().token_requests();
    fake.state().revoke_all_tokens();

    let client = http_client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        let url = proxy.url(&format!("/api/invoices?n={i}"));
        tasks.push(tokio::spawn(async move {
            // Half with a small body, which must be replayed too.
            let request = if i % 2 == 0 {
                client.get(url)
            } else {
                client.post(url).body(format!("{{\"n\":{i}}}"))
            };
            let response = request.send().await.unwrap();
            let status = response.status();
            let echo: serde_json::Value = response.json().await.unwrap();
            (status, echo)
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, echo) = task.await.unwrap();
        assert_eq!(status, 200, "request {i}: {echo}");
        assert_eq!(echo["target"], format!("/api/invoices?n={i}"));
        if i % 2 == 1 {
            assert_eq!(echo["body_bytes"], format!("{{\"n\":{i}}}").len());
        }
    }
    assert!(
        fake.state().rejected_api_requests() >= 1,
        "the fault was not hit"
    );
    assert_eq!(
        fake.state().token_requests(),
        before + 1,
        "a burst of 401s must cost exactly one token request"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_replay_limit_gets_the_401_passed_through() {
    let (fake, proxy) = start_with("replay_body_limit = 1024", "").await;
    fake.state().revoke_all_tokens();
    let client = http_client();
    let response = client
        .post(proxy.url("/api/invoices"))
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["errors"].is_object(), "Coupa's own 401 body: {body}");
    // The 401 still made the proxy fetch a new token for what follows.
    let response = client.get(proxy.url("/api/invoices")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_gets_401_again_is_passed_through_without_loops() {
    let (fake, proxy) = start_with("", "rejected_token_cooldown = \"1h\"").await;
    let before = fake.state().token_requests();
    fake.state().set_reject_all_tokens(true);
    let client = http_client();
    for _ in 0..3 {
        let response = client.get(proxy.url("/api/invoices")).send().await.unwrap();
        assert_eq!(response.status(), 401);
    }
    assert_eq!(
        fake.state().token_requests(),
        before + 1,
        "one fetch, then the cool-down"
    );
    // 1 original + 1 replay, then one attempt each for the next two.
    assert_eq!(fake.state().rejected_api_requests(), 4);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_outage_longer_than_a_rotation_fails_no_request() {
    // Renewal after 2 s of a 10 s token: the outage spans several renewal
    // attempts but ends long before the token expires.
    let fake = start_fake(Duration::from_secs(10)).await;
    let proxy = TestProxy::start(parse_config(&config_text(
        &fake.base_url(),
        "",
        "refresh_fraction = 0.2",
    )))
    .await;
    proxy.wait_ready().await;
    fake.state()
        .set_token_failure(Some(TokenFailure::ServerError));
    let attempts_before = fake.state().token_requests();

    let failed = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, url) = (http_client(), proxy.url("/api/suppliers"));
        let (failed, ok, stop) = (failed.clone(), ok.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    eventually("three failed renewals", || {
        let n = fake.state().token_requests();
        async move { n >= attempts_before + 3 }
    })
    .await;
    fake.state().set_token_failure(None);
    let issued = fake.state().tokens_issued();
    eventually("renewal after the outage", || {
        let n = fake.state().tokens_issued();
        async move { n > issued }
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_expiry_without_renewal_requests_get_503_naming_the_cause_then_recover() {
    let fake = start_fake(Duration::from_secs(2)).await;
    let proxy = TestProxy::start(parse_config(&config_text(&fake.base_url(), "", ""))).await;
    proxy.wait_ready().await;
    fake.state()
        .set_token_failure(Some(TokenFailure::ServerError));
    let client = http_client();
    let ready_url = proxy.admin_url("/readyz");
    eventually("token expiry", || {
        let (client, url) = (client.clone(), ready_url.clone());
        async move { client.get(&url).send().await.unwrap().status() == 503 }
    })
    .await;
    let response = client.get(proxy.url("/api/invoices")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=1).contains(&retry_after),
        "retry_max is 500ms: {retry_after}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "no_token");
    assert!(
        body["message"].as_str().unwrap().contains("HTTP 500"),
        "{body}"
    );

    fake.state().set_token_failure(None);
    proxy.wait_ready().await;
    let response = client.get(proxy.url("/api/invoices")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_logged_once_with_the_fix_and_retried_slowly() {
    let fake = start_fake(DAY).await;
    fake.state()
        .set_token_failure(Some(TokenFailure::OAuth("invalid_scope".into())));
    let text = config_text(&fake.base_url(), "", "")
        .replace("retry_max = \"500ms\"", "retry_max = \"2s\"");
    let proxy = ProxyProcess::start(&text, &[], &[]);
    eventually("three refused attempts", || {
        let n = fake.state().token_requests();
        async move { n >= 3 }
    })
    .await;
    let logs = proxy.logs();
    let loud = logs
        .lines()
        .filter(|l| l.contains("token fetch failed") && !l.contains("DEBUG"))
        .count();
    assert_eq!(loud, 1, "one loud line per change of error:\n{logs}");
    assert!(logs.contains("invalid_scope"), "{logs}");
    assert!(logs.contains("not assigned to this client"), "{logs}");
    // How slowly they are retried is checked under paused time in
    // token::refresher's unit tests.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504_after_the_response_header_timeout() {
    let (_fake, proxy) = start_with("response_header_timeout = \"300ms\"", "").await;
    let response = get(proxy.url("/api/_slow?ms=10000")).await;
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_response_body_is_aborted_not_left_hanging() {
    let (_fake, proxy) = start_with("idle_timeout = \"300ms\"", "").await;
    // Small enough to be read whole before the client sees anything: the
    // client is told plainly.
    let response = get(proxy.url("/api/_stall?bytes=5000")).await;
    assert_eq!(response.status(), 504);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "upstream_timeout", "{answer}");
    // Larger than coupa.response_buffer: its head went out first, so the
    // body must end in an error, not look complete.
    let response = get(proxy.url("/api/_stall?bytes=500000")).await;
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(DEADLINE, response.bytes())
        .await
        .expect("the proxy must abort, not hang");
    assert!(
        body.is_err(),
        "a stalled body must end in an error, not look complete"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstream_body_aborts_the_client_response() {
    let (_fake, proxy) = start_pair(DAY).await;
    let response = get(proxy.url("/api/_broken?bytes=100000")).await;
    assert_eq!(response.status(), 502, "read whole, so told plainly");
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "upstream_error", "{answer}");
    let response = get(proxy.url("/api/_broken?bytes=1000000")).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a truncated body must not look complete"
    );
    proxy.stop().await;
}

/// An upstream whose odd-numbered connections close right after reading a
/// request head, like a pooled connection the server already dropped.
async fn flaky_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                if n % 2 == 1 {
                    return; // dropped: closes without an answer
                }
                let body = b"{\"ok\":true}";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.write_all(body).await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_is_retried_once_for_idempotent_requests_only() {
    let fake = start_fake(DAY).await;
    let (flaky, connections) = flaky_upstream().await;
    let text = config_text(
        &format!("http://{flaky}"),
        "",
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    let client = http_client();

    let response = client.get(proxy.url("/api/invoices")).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "GET is retried on a fresh connection"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 2);

    let response = client
        .post(proxy.url("/api/invoices"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502, "POST is never retried");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_error");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_queues_a_burst_and_answers_429_past_the_queue() {
    let (_fake, proxy) = start_with(
        "[coupa.rate_limit]\nper_second = 1\nburst = 2\nmax_queue = 2",
        "",
    )
    .await;
    let client = http_client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), proxy.url("/api/invoices"));
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").cloned();
            (status, retry_after, r.text().await.unwrap())
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        if status == 429 {
            // The queue of 2 drains at 1 request/s: about 2 s.
            assert_eq!(
                retry_after.as_ref().map(|v| v.to_str().unwrap()),
                Some("2"),
                "{body}"
            );
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(answer["error"], "rate_limited", "{body}");
            assert_eq!(answer["source"], "coupa-auth-proxy", "{body}");
            assert!(
                answer["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
        }
        statuses.push(status);
    }
    statuses.sort();
    // Two at once (the burst), two after waiting in the queue of 2, the
    // rest refused. Each attempt at Coupa takes a slot: a request sent
    // again on another connection (a loaded machine can fail a loopback
    // connection) takes a second one, and with the queue full it is
    // refused, so one retry costs one 200.
    let metrics = scrape(&proxy.admin_url("/metrics")).await;
    let retried = metric(&metrics, "coupa_proxy_upstream_retries_total", &[]);
    let slots = metric(&metrics, "coupa_proxy_rate_slots_total", &[]);
    let answered = statuses.iter().filter(|s| **s == 200).count() as f64;
    let refused = statuses.iter().filter(|s| **s == 429).count() as f64;
    assert_eq!(answered + refused, 8.0, "{statuses:?}");
    assert!(
        answered <= 4.0 && answered + retried >= 4.0 && slots == answered + retried,
        "{statuses:?}: {slots} slots given, {retried} requests sent again"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_resending_off_coupas_own_429_passes_through_untouched() {
    let (_fake, proxy) = start_with("resend_429_within = \"0s\"", "").await;
    let response = get(proxy.url("/api/_status?code=429")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["errors"]["fake"].is_array(), "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_kilobyte_tokens_are_sent_upstream() {
    let fake = start_fake(DAY).await;
    fake.state().set_token_padding(20 * 1024);
    let proxy = TestProxy::start(parse_config(&config_text(&fake.base_url(), "", ""))).await;
    proxy.wait_ready().await;
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert!(echoed_token(&echo).len() > 20 * 1024);
    proxy.stop().await;
}
