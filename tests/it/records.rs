//! What an access line says about where a request's time went: every
//! phase field on every line (0 when there was no wait), the wait for a
//! place under an integration's `max_concurrent` in `slot_ms` rather than
//! read as the proxy's own time, which stays in `proxy_ms`.

use std::time::Duration;

use coupa_auth_proxy::proxy::auth::hash_key;

use crate::support::*;

const KEY: &str = "records-legacy-key-5a4b3c2d1e0f";
const PHASES: [&str; 8] = [
    "duration_ms",
    "token_wait_ms",
    "queue_ms",
    "slot_ms",
    "guess_delay_ms",
    "resend_wait_ms",
    "proxy_ms",
    "resends",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_a_capped_integrations_slot_is_its_own_field() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "")
        + &format!(
            "\n[[integration]]\nname = \"batch\"\napi_key_sha256 = \"{}\"\nmax_concurrent = 1\n",
            hash_key(KEY)
        );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let client = http_client();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            client
                .get(proxy.url("/api/_slow?ms=300"))
                .header("X-COUPA-API-KEY", KEY)
                .send()
        })
        .collect();
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer.unwrap().status(), 200);
    }
    let lines = || proxy.access_lines();
    eventually("four access lines", || async { lines().len() == 4 }).await;
    let lines = lines();
    for line in &lines {
        for phase in PHASES {
            assert!(line[phase].is_number(), "{phase} in every line: {line}");
        }
    }
    // One at a time at Coupa: the last waited for three answers of 300 ms.
    let slowest = lines
        .iter()
        .max_by(|a, b| {
            a["slot_ms"]
                .as_f64()
                .partial_cmp(&b["slot_ms"].as_f64())
                .unwrap()
        })
        .unwrap();
    let slot = slowest["slot_ms"].as_f64().unwrap();
    assert!(slot >= 800.0, "the wait for the slot is counted: {slowest}");
    let own = slowest["proxy_ms"].as_f64().unwrap();
    let total = slowest["duration_ms"].as_f64().unwrap();
    assert!(
        own < total / 4.0,
        "the slot's wait is not read as the proxy's own time: {slowest}"
    );

    // The same split in the metrics (all four went through the slot
    // phase, none through a rate-limit queue) and on the status page: the integration's waits reach the
    // second-long bucket, Coupa's 300 ms in the 512 ms one.
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let waited = |phase| metric(&metrics, "coupa_proxy_wait_seconds", &[("phase", phase)]);
    assert_eq!(waited("slot"), 4.0);
    assert_eq!(waited("queue"), 0.0);
    let status = proxy.status_json().await;
    let batch = status["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["integration"] == "batch")
        .unwrap();
    let spent = &batch["time_last_hour"];
    assert_eq!(spent["requests"], 4, "{spent}");
    assert_eq!(spent["coupa_ms"]["p50"], 512.0, "{spent}");
    assert_eq!(spent["waiting_ms"]["p99"], 1024.0, "{spent}");
    let page = proxy.status_page().await;
    assert!(
        page.contains("where the time went in the last hour (4 requests sent to Coupa)"),
        "{page}"
    );
}

/// Each refused request has exactly one access line with its reason, and
/// the counter by reason equals the lines: a wrong key, a missing Host, a
/// CONNECT, ambiguous framing, a malformed head, and a client that left
/// while Coupa was still answering (499 `client_gone`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_request_has_one_line_with_its_reason_and_is_counted() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "")
        + &format!(
            "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n",
            hash_key(KEY)
        );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let raw = |request: &'static str| raw_request(proxy.addr, request);
    let expected = [
        ("unknown_api_key", 2),
        ("missing_host", 1),
        ("method_not_allowed", 1),
        ("ambiguous_framing", 1),
        ("malformed_head", 1),
        ("client_gone", 1),
    ];
    for _ in 0..2 {
        raw(
            "GET /api/x HTTP/1.1\r\nHost: x\r\nX-COUPA-API-KEY: wrong\r\nConnection: close\r\n\r\n",
        )
        .await;
    }
    raw("GET /api/x HTTP/1.1\r\nX-COUPA-API-KEY: wrong\r\nConnection: close\r\n\r\n").await;
    raw("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n")
        .await;
    raw("POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    raw("GET /api/x HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n").await;
    let gone = http_client()
        .get(proxy.url("/api/_slow?ms=3000"))
        .header("X-COUPA-API-KEY", KEY)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "the client left: {gone:?}");

    let lines = || proxy.access_lines();
    let total: usize = expected.iter().map(|(_, n)| n).sum();
    eventually("every refused request is logged", || async {
        lines().len() >= total
    })
    .await;
    let lines = lines();
    assert_eq!(lines.len(), total, "one line each: {lines:?}");
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    for (reason, count) in expected {
        let logged = lines.iter().filter(|l| l["reason"] == reason).count();
        assert_eq!(logged, count, "{reason}: {lines:?}");
        assert_eq!(
            metric(
                &metrics,
                "coupa_proxy_refused_requests_total",
                &[("reason", reason)]
            ),
            count as f64,
            "{reason} counted as logged"
        );
    }
    let gone = lines.iter().find(|l| l["reason"] == "client_gone").unwrap();
    assert_eq!(gone["status"], 499, "{gone}");
    assert_eq!(gone["integration"], "erp", "{gone}");
}

/// A flood of smuggling attempts: each has its access line and is
/// counted, but the warning beside them is written once (then once a
/// minute with the count left out), so the log grows by one line a
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_ambiguous_requests_is_counted_and_warned_of_once() {
    const FLOOD: usize = 200;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;
    for _ in 0..FLOOD {
        let request = "POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
                       Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(raw_request(proxy.addr, request).await.0, 400);
    }
    eventually("every refusal has its access line", || async {
        proxy.access_lines().len() >= FLOOD
    })
    .await;
    let refused = proxy
        .access_lines()
        .iter()
        .filter(|l| l["reason"] == "ambiguous_framing")
        .count();
    assert_eq!(refused, FLOOD);
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_refused_requests_total",
            &[("reason", "ambiguous_framing")]
        ),
        FLOOD as f64
    );
    let warned = proxy.logs().matches("request refused: both").count();
    assert_eq!(warned, 1, "warned of once, not per request");
    assert_eq!(fake.state().api_requests(), 0);
}

/// With `telemetry.refused_lines_per_second`, a flood of refused requests
/// writes a burst and then that many lines a second; every refusal is
/// still counted, the lines left out are counted too (the two add up),
/// one warning says so, and a forwarded request's line is always written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_access_lines_past_the_configured_rate_are_left_out_and_counted() {
    const RATE: f64 = 20.0;
    const EACH: usize = 150;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text =
        config_text(&fake.base_url(), "", "") + "\n[telemetry]\nrefused_lines_per_second = 20\n";
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let flood = std::time::Instant::now();
    for _ in 0..EACH {
        // Refused by the framing guard, and by the request path.
        let ambiguous = "POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
                         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(raw_request(proxy.addr, ambiguous).await.0, 400);
        let hostless = "GET /api/x HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert_eq!(raw_request(proxy.addr, hostless).await.0, 400);
    }
    let elapsed = flood.elapsed().as_secs_f64();
    let answer = http_client().get(proxy.url("/api/invoices")).send().await;
    assert_eq!(answer.unwrap().status(), 200);
    eventually("the forwarded request's line", || async {
        proxy.access_lines().iter().any(|l| l["status"] == 200)
    })
    .await;

    let written = proxy
        .access_lines()
        .iter()
        .filter(|l| l["reason"] != "")
        .count();
    assert!(
        written as f64 >= RATE && written as f64 <= RATE + RATE * elapsed + 1.0,
        "{written} refused lines in {elapsed:.2} s at {RATE}/s"
    );
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let refused = |reason| {
        metric(
            &metrics,
            "coupa_proxy_refused_requests_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("ambiguous_framing"), EACH as f64);
    assert_eq!(refused("missing_host"), EACH as f64);
    let left_out = metric(&metrics, "coupa_proxy_access_lines_left_out_total", &[]);
    assert_eq!(left_out + written as f64, 2.0 * EACH as f64);
    let warned = proxy
        .logs()
        .matches("access lines of refused requests left out")
        .count();
    assert_eq!(warned, 1, "{}", proxy.logs());
}
