//! Redis replicated with Sentinel (`redis+sentinel://`), against Debian's
//! redis-server and redis-sentinel: three proxies under load follow a
//! failover — the primary SIGKILLed, the replica promoted — without a
//! failed request, keep Coupa within its budget outside the failover,
//! share again within seconds, notice nothing when the old primary
//! comes back as a replica, and follow a planned failover in which the
//! demoted primary stays up answering `READONLY`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::sentinel::Replicated;
use crate::support::*;

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const PER_SECOND: f64 = 20.0;
const BURST: f64 = 5.0;

/// The whole cluster view of one proxy, from `/status.json`.
async fn cluster_view(proxy: &TestProxy) -> serde_json::Value {
    proxy.status_json().await["cluster"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_follow_a_sentinel_failover_without_a_failed_request() {
    let Some(mut redis) = Replicated::start() else {
        return;
    };
    let fake = Arc::new(start_fake(Duration::from_secs(86_400)).await);
    let dir = tempdir::Dir::new("sentinel-cluster");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let text = config_text(
        &fake.base_url(),
        &format!("[coupa.rate_limit]\nper_second = {PER_SECOND}\nburst = {BURST}\nmax_queue = 100"),
        "",
    ) + &format!(
        "\n[cluster]\nredis_url = \"{}\"\nkey_prefix = \"test\"\nencryption_key_file = \"{}\"\n",
        redis.url(),
        key_file.display()
    );
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(TestProxy::start(parse_config(&text)).await);
    }
    for proxy in &proxies {
        proxy.wait_ready().await;
    }
    let first_primary = redis.primary_port().await.unwrap();
    for proxy in &proxies {
        eventually(
            "each proxy found the primary through the sentinels",
            || async {
                let view = cluster_view(proxy).await;
                view["redis"] == "available"
                    && view["connection"]["primary"] == format!("127.0.0.1:{first_primary}")
            },
        )
        .await;
    }
    assert_eq!(fake.state().token_requests(), 1, "one token for all three");

    // Closed-loop load, 4 callers per proxy: far above the budget, so the
    // proxies queue and Coupa sees the budget.
    let running = Arc::new(AtomicBool::new(true));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let client = http_client();
    let mut callers = Vec::new();
    for proxy in &proxies {
        for _ in 0..4 {
            let (client, url) = (client.clone(), proxy.url("/api/invoices"));
            let (running, failed, answered) = (running.clone(), failed.clone(), answered.clone());
            callers.push(tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failed
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status())),
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
    }
    // What reached Coupa, sampled every 100 ms.
    let samples = Arc::new(Mutex::new(Vec::<(Instant, u64)>::new()));
    let sampler = {
        let (samples, running, fake) = (samples.clone(), running.clone(), fake.clone());
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                samples
                    .lock()
                    .unwrap()
                    .push((Instant::now(), fake.state().api_requests()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    let killed_at = Instant::now();
    let old = redis.kill_primary().await;
    let promoted = redis.wait_for_promotion(old, Duration::from_secs(30)).await;
    let promoted_at = Instant::now();
    for proxy in &proxies {
        eventually(
            "each proxy shares again through the new primary",
            || async {
                let view = cluster_view(proxy).await;
                view["redis"] == "available"
                    && view["connection"]["primary"] == format!("127.0.0.1:{promoted}")
            },
        )
        .await;
    }
    let shared_again = promoted_at.elapsed();
    let resumed_at = Instant::now();
    eprintln!(
        "failover: replica promoted {:?} after the kill; every proxy shared again {shared_again:?} after the promotion",
        promoted_at - killed_at
    );
    assert!(
        shared_again <= Duration::from_secs(10),
        "the proxies shared again {shared_again:?} after the promotion"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The old primary comes back as a replica: nothing changes for anyone.
    // Watched over more than a Sentinel re-check (5 s), each proxy's
    // primary and its count of changes: a switch back, even a passing
    // one, shows in either.
    let changes = |metrics: &str| metric(metrics, "coupa_proxy_cluster_primary_changes_total", &[]);
    for proxy in &proxies {
        let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
        assert_eq!(changes(&metrics), 1.0, "the failover was followed once");
    }
    redis.bring_back(old).await;
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        for proxy in &proxies {
            assert_eq!(
                cluster_view(proxy).await["connection"]["primary"],
                format!("127.0.0.1:{promoted}"),
                "a proxy went back to the old primary"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for proxy in &proxies {
        let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
        assert_eq!(
            changes(&metrics),
            1.0,
            "no switch when the old primary returned"
        );
    }

    // A failover with the primary alive: it is demoted and answers
    // READONLY; the proxies move to the promoted one.
    let planned_at = Instant::now();
    redis.manual_failover().await;
    let back = redis
        .wait_for_promotion(promoted, Duration::from_secs(30))
        .await;
    assert_eq!(back, old);
    for proxy in &proxies {
        eventually("each proxy follows the planned failover", || async {
            let view = cluster_view(proxy).await;
            view["redis"] == "available"
                && view["connection"]["primary"] == format!("127.0.0.1:{old}")
        })
        .await;
    }
    let planned_done = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    sampler.await.unwrap();

    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(answered.load(Ordering::Relaxed) > 100);
    assert_eq!(
        fake.state().token_requests(),
        1,
        "the failover cost no token request"
    );

    // Outside the failover window, Coupa never saw more than the budget
    // allows in any second.
    let samples = samples.lock().unwrap().clone();
    let mut worst = 0.0f64;
    for (i, (from, count_from)) in samples.iter().enumerate() {
        let Some((to, count_to)) = samples[i..]
            .iter()
            .find(|(at, _)| *at >= *from + Duration::from_secs(1))
        else {
            break;
        };
        let overlaps_failover =
            (*to > killed_at && *from < resumed_at) || (*to > planned_at && *from < planned_done);
        if overlaps_failover {
            continue;
        }
        let seconds = (*to - *from).as_secs_f64();
        let allowed = BURST + PER_SECOND * seconds + 1.0;
        let seen = (count_to - count_from) as f64;
        worst = worst.max(seen / allowed);
        assert!(
            seen <= allowed,
            "{seen} requests at Coupa in {seconds:.2} s outside the failover (allowed {allowed:.0})"
        );
    }
    assert!(worst > 0.5, "the load kept the budget busy ({worst:.2})");

    // Metrics and the status page show the failover, once.
    for proxy in &proxies {
        let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
        assert_eq!(
            metric(&metrics, "coupa_proxy_cluster_primary_changes_total", &[]),
            2.0
        );
        assert_eq!(metric(&metrics, "coupa_proxy_cluster_up", &[]), 1.0);
        let page = get(proxy.admin_url("/")).await.text().await.unwrap();
        assert!(
            page.contains(&format!("primary 127.0.0.1:{old} (named by Sentinel)"))
                && page.contains("failovers followed: 2"),
            "{page}"
        );
    }
    for proxy in proxies {
        proxy.stop().await;
    }
    drop(dir);
}
