//! Coupa's 429 never reaches a legacy integration within the bound: the
//! request waits Coupa's `Retry-After` and is sent again
//! (`coupa.resend_429_within`), a POST too; past the bound, or with a body
//! too large to keep, Coupa's own 429 goes to the client with its headers;
//! a client that leaves while its request waits causes no re-send.

use std::time::Duration;

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_399);

async fn proxy_with(coupa_extra: &str) -> (coupa_auth_proxy::fake_coupa::FakeCoupa, ProxyProcess) {
    let fake = start_fake(DAY).await;
    let proxy = ProxyProcess::start(&config_text(&fake.base_url(), coupa_extra, ""), &[], &[]);
    proxy.wait_ready().await;
    (fake, proxy)
}

fn access_lines(proxy: &ProxyProcess) -> Vec<serde_json::Value> {
    proxy
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "coupa_auth_proxy::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_and_posts_wait_out_coupas_429_and_succeed() {
    let (fake, proxy) = proxy_with("").await;
    // Another client holds the instance's budget for 3 s.
    fake.state().refuse_for(Duration::from_secs(3), 2);
    let client = http_client();
    let read = client.get(proxy.url("/api/invoices")).send();
    let write = client
        .post(proxy.url("/api/invoices"))
        .body(r#"{"id":1}"#)
        .send();
    let (read, write) = tokio::join!(read, write);
    let (read, post) = (read.unwrap(), write.unwrap());
    assert_eq!(read.status(), 200);
    assert_eq!(post.status(), 200);
    let echo: serde_json::Value = post.json().await.unwrap();
    assert_eq!(echo["body_bytes"], 8, "the body sent again whole: {echo}");
    assert_eq!(fake.state().api_requests(), 2, "each reached Coupa once");
    assert!(fake.state().throttled_requests() >= 2);

    eventually("both access lines", || async {
        access_lines(&proxy).len() >= 2
    })
    .await;
    for line in access_lines(&proxy) {
        assert!(line["resends"].as_u64().unwrap() >= 1, "{line}");
        assert!(line["resend_wait_ms"].as_f64().unwrap() >= 2000.0, "{line}");
    }
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let resent = metric(
        &metrics,
        "coupa_proxy_coupa_rate_limited_resends_total",
        &[("integration", "")],
    );
    assert!(resent >= 2.0, "{resent}");
    let status: serde_json::Value = get(format!("http://{}/status.json", proxy.admin))
        .await
        .json()
        .await
        .unwrap();
    let unnamed = &status["integrations"][0]["coupa_429_last_hour"];
    assert!(unnamed["resent"].as_u64().unwrap() >= 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_coupas_own_429_reaches_the_client() {
    let (fake, proxy) = proxy_with("resend_429_within = \"3s\"").await;
    fake.state().refuse_for(Duration::from_secs(60), 2);
    let answer = get(proxy.url("/api/invoices")).await;
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "2", "Coupa's own header");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(
        body["errors"]["rate_limit"].is_array(),
        "Coupa's own body: {body}"
    );
    // Sent at once, then again after 2 s; a second wait would pass 3 s.
    assert_eq!(fake.state().throttled_requests(), 2);
    eventually("the access line", || async {
        !access_lines(&proxy).is_empty()
    })
    .await;
    assert_eq!(access_lines(&proxy)[0]["resends"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_keep_gets_coupas_429_at_once() {
    let (fake, proxy) = proxy_with("replay_body_limit = 16").await;
    fake.state().refuse_for(Duration::from_secs(60), 2);
    let answer = http_client()
        .post(proxy.url("/api/invoices"))
        .body("x".repeat(1024))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 429);
    assert_eq!(fake.state().throttled_requests(), 1, "not sent again");
    eventually("the access line", || async {
        !access_lines(&proxy).is_empty()
    })
    .await;
    assert_eq!(access_lines(&proxy)[0]["resends"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_request_waits_causes_no_resend() {
    let (fake, proxy) = proxy_with("").await;
    // Coupa asks for a second; a re-send would come inside its 2 s of
    // refusals, and be refused again.
    fake.state().refuse_for(Duration::from_secs(2), 1);
    let gone = http_client()
        .get(proxy.url("/api/invoices"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up: {gone:?}");
    assert_eq!(fake.state().throttled_requests(), 1);
    eventually("Coupa takes requests again", || async {
        !fake.state().is_refusing()
    })
    .await;
    assert_eq!(
        fake.state().throttled_requests(),
        1,
        "nothing was sent again"
    );
    assert_eq!(fake.state().api_requests(), 0);
    assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
}
