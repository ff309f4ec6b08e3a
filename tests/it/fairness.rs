//! A fair share of Coupa's budget per integration, end to end over real
//! sockets: a flood of one integration waits in its own queue while
//! another's steady calls keep their turn (the scheduling itself is
//! unit-tested with paused time in `proxy::ratelimit::fair`).

use std::time::{Duration, Instant};

use crate::support::*;
use coupa_auth_proxy::proxy::auth::hash_key;

const BATCH_KEY: &str = "batch-legacy-key-5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f";
const APPROVALS_KEY: &str = "approvals-legacy-key-a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_integration_does_not_delay_a_steady_one() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let integrations = format!(
        "\n[[integration]]\nname = \"batch\"\napi_key_sha256 = \"{}\"\nmax_concurrent = 200\nmax_queue = 200\n\
         \n[[integration]]\nname = \"approvals\"\napi_key_sha256 = \"{}\"\n",
        hash_key(BATCH_KEY),
        hash_key(APPROVALS_KEY),
    );
    let text = config_text(
        &fake.base_url(),
        "[coupa.rate_limit]\nper_second = 10.0\nburst = 1\nmax_queue = 100",
        "",
    ) + &integrations;
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    let client = http_client();
    let call = |key: &'static str| {
        let (client, url) = (client.clone(), proxy.url("/api/invoices"));
        async move {
            client
                .get(url)
                .header("X-COUPA-API-KEY", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // 60 calls at once: six seconds of the budget.
    let flood: Vec<_> = (0..60).map(|_| tokio::spawn(call(BATCH_KEY))).collect();
    let metrics_url = proxy.admin_url("/metrics");
    wait_queued(&metrics_url, "batch", 30.0).await;

    // Behind a FIFO queue each of these would wait for the flood: 3 s and
    // more. In its own lane, about one slot interval (100 ms).
    let mut waits = Vec::new();
    for _ in 0..6 {
        let asked = Instant::now();
        assert_eq!(call(APPROVALS_KEY).await, 200, "never a 429");
        waits.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let worst = *waits.iter().max().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "the steady integration waited {worst:?} behind the flood ({waits:?})"
    );

    let text = scrape(&metrics_url).await;
    assert!(
        metric(
            &text,
            "coupa_proxy_rate_queue_depth",
            &[("integration", "batch")]
        ) > 0.0,
        "the flood still waits after the steady calls went"
    );
    assert_eq!(
        metric(
            &text,
            "coupa_proxy_rate_slots_total",
            &[("integration", "approvals")]
        ),
        6.0
    );

    for call in flood {
        assert_eq!(call.await.unwrap(), 200, "the whole flood goes through");
    }
    let text = scrape(&metrics_url).await;
    assert_eq!(
        metric(
            &text,
            "coupa_proxy_rate_slots_total",
            &[("integration", "batch")]
        ),
        60.0
    );
    assert_eq!(
        metric(
            &text,
            "coupa_proxy_rate_queue_depth",
            &[("integration", "batch")]
        ),
        0.0
    );
    assert!(
        metric(
            &text,
            "coupa_proxy_rate_wait_seconds",
            &[("integration", "batch")]
        ) > 0.0
    );

    // The migration view: each integration's share of the budget.
    let status = proxy.status_json().await;
    let integrations = status["integrations"].as_array().unwrap();
    let budget_of = |name: &str| {
        integrations
            .iter()
            .find(|i| i["integration"] == name)
            .map(|i| i["budget"]["slots_last_hour"].as_u64().unwrap())
    };
    assert_eq!(budget_of("batch"), Some(60), "{status}");
    assert_eq!(budget_of("approvals"), Some(6), "{status}");
    let page = client
        .get(proxy.admin_url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Coupa's budget in the last hour: 60 slots"),
        "{page}"
    );
    proxy.stop().await;
}
