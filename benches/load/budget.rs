//! `coupa-budget`: Coupa's 25 requests/s used to the last slot. The fake
//! plays Coupa's own limit (25/s, burst 20, 429 beyond), and bursty load
//! arrives from several integrations: [`CLIENTS`] clients that each fire
//! [`PER_CLIENT`] requests at once, [`STAGGER`] apart. Targets: straight to
//! Coupa (the clients meet its 429s), nginx with `limit_req` at 25 r/s
//! (delaying) as one process and as three (each with its own limit, as
//! three replicas would be), and the proxy as one process and as three
//! sharing one budget through Redis (`[cluster]`).
//!
//! Figures: 429s Coupa answered, goodput (2xx per second at Coupa over the
//! run ÷ 25), requests that failed at the client, and the p99 a request
//! waited.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coupa_auth_proxy::fake_coupa::FakeState;

use crate::stats::median;
use crate::targets::{
    free_port, proxy_config, spawn_proxy, start_rate_limited_nginx, start_redis_on, wait_for_port,
    wait_ready,
};
use crate::LEGACY_KEY;

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 100;
const STAGGER: Duration = Duration::from_millis(1500);
const RATE: f64 = 25.0;
const BURST: u32 = 20;

struct Row {
    target: &'static str,
    coupa_429: u64,
    goodput: f64,
    failed: usize,
    p99_ms: f64,
    /// With another client calling Coupa directly: its calls answered 2xx
    /// per second.
    outside_ok_per_second: Option<f64>,
}

/// The other client of the `coupa-budget-outside` rows: it calls Coupa
/// directly, evenly paced, at this rate.
const OUTSIDE_PER_SECOND: u64 = 20;

pub fn coupa_budget(
    fake: &Arc<FakeState>,
    upstream: u16,
    token: &str,
    work: &Path,
) -> (String, serde_json::Value) {
    let work = work.join("coupa-budget");
    std::fs::create_dir_all(&work).unwrap();
    fake.set_rate_limit(Some((RATE, BURST)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let outside_url = format!("http://127.0.0.1:{upstream}/api/invoices");
    let drive_with = |target: &'static str,
                      urls: Vec<String>,
                      headers: Vec<(&'static str, String)>,
                      outside: bool| {
        // Coupa's bucket full again, as after a quiet minute.
        std::thread::sleep(Duration::from_secs(1));
        let (ok_before, throttled_before) = (fake.api_requests(), fake.throttled_requests());
        let (failed, waits, elapsed, outside_ok) = runtime.block_on(async {
            let stop = tokio_util::sync::CancellationToken::new();
            let other = outside.then(|| {
                tokio::spawn(outside_client(
                    outside_url.clone(),
                    token.to_owned(),
                    stop.clone(),
                ))
            });
            let (failed, waits, elapsed) = burst_load(urls, headers).await;
            stop.cancel();
            let outside_ok = match other {
                Some(task) => Some(task.await.unwrap_or(0)),
                None => None,
            };
            (failed, waits, elapsed, outside_ok)
        });
        let ok = fake.api_requests() - ok_before - outside_ok.unwrap_or(0);
        Row {
            target,
            coupa_429: fake.throttled_requests() - throttled_before,
            goodput: ok as f64 / elapsed.as_secs_f64() / RATE,
            failed,
            p99_ms: p99(waits),
            outside_ok_per_second: outside_ok.map(|n| n as f64 / elapsed.as_secs_f64()),
        }
    };
    let drive = |target, urls, headers| drive_with(target, urls, headers, false);
    let mut rows = Vec::new();
    rows.push(drive(
        "direct",
        vec![format!("http://127.0.0.1:{upstream}/api/invoices")],
        vec![
            ("Authorization", format!("Bearer {token}")),
            ("Accept", "application/json".into()),
        ],
    ));
    let legacy = || vec![("X-COUPA-API-KEY", LEGACY_KEY.to_owned())];
    for count in [1, 3] {
        let nginx: Vec<(Child, u16)> = (0..count)
            .map(|i| {
                start_rate_limited_nginx(
                    upstream,
                    token,
                    &work.join(format!("nginx{count}-{i}")),
                    RATE,
                    10_000,
                )
            })
            .collect();
        let urls = nginx
            .iter()
            .map(|(_, port)| format!("http://127.0.0.1:{port}/api/invoices"))
            .collect();
        rows.push(drive(
            if count == 1 {
                "nginx limit_req"
            } else {
                "nginx limit_req ×3"
            },
            urls,
            legacy(),
        ));
        for (mut child, _) in nginx {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let (mut redis, redis_port) = start_redis_on(&work);
    // The proxy's own default burst (16), alone and as three replicas, and
    // three replicas given Coupa's own burst: requests admitted in turn by
    // three processes reach Coupa a few milliseconds apart, sometimes
    // bunched; a burst kept under Coupa's leaves its bucket the slack to
    // take them.
    for (name, count, burst) in [
        ("proxy", 1, None),
        ("proxy ×3 [cluster]", 3, None),
        ("proxy ×3 [cluster], burst 20", 3, Some(BURST)),
    ] {
        let shared = (count > 1).then_some(redis_port);
        let proxies: Vec<(Child, u16)> = (0..count)
            .map(|i| {
                start_proxy(
                    upstream,
                    &work.join(format!("{count}-{}-{i}", burst.unwrap_or(0))),
                    burst,
                    (shared, ""),
                )
            })
            .collect();
        let urls = proxies
            .iter()
            .map(|(_, port)| format!("http://127.0.0.1:{port}/api/invoices"))
            .collect();
        rows.push(drive(name, urls, legacy()));
        for (mut child, _) in proxies {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let _ = redis.kill();
    let _ = redis.wait();

    // The same bursts while another client takes part of Coupa's budget:
    // the clients straight to Coupa, behind nginx's limit_req, and behind
    // the proxy with Coupa's 429s sent again (the default) and passed on
    // (`resend_429_within = "0s"`, as before).
    let mut outside_rows = vec![drive_with(
        "direct",
        vec![outside_url.clone()],
        vec![
            ("Authorization", format!("Bearer {token}")),
            ("Accept", "application/json".into()),
        ],
        true,
    )];
    let (mut nginx, nginx_port) =
        start_rate_limited_nginx(upstream, token, &work.join("nginx-outside"), RATE, 10_000);
    outside_rows.push(drive_with(
        "nginx limit_req",
        vec![format!("http://127.0.0.1:{nginx_port}/api/invoices")],
        legacy(),
        true,
    ));
    let _ = nginx.kill();
    let _ = nginx.wait();
    for (name, resend) in [
        ("proxy, 429s passed on", "resend_429_within = \"0s\""),
        ("proxy, 429s sent again", ""),
    ] {
        let (mut proxy, port) = start_proxy(
            upstream,
            &work.join(format!("outside-{}", resend.len())),
            None,
            (None, resend),
        );
        outside_rows.push(drive_with(
            name,
            vec![format!("http://127.0.0.1:{port}/api/invoices")],
            legacy(),
            true,
        ));
        let _ = proxy.kill();
        let _ = proxy.wait();
    }
    fake.set_rate_limit(None);
    let (mut table, mut json) = report(
        &format!(
            "coupa-budget: Coupa at {RATE}/s burst {BURST} (429 beyond); {CLIENTS} clients each firing {PER_CLIENT} requests at once, {} ms apart",
            STAGGER.as_millis()
        ),
        &rows,
    );
    let (outside_table, outside_json) = report(
        &format!(
            "coupa-budget beside another client: the same bursts while another client calls Coupa directly at {OUTSIDE_PER_SECOND}/s"
        ),
        &outside_rows,
    );
    table.push_str(&outside_table);
    json = serde_json::json!({"bursts": json, "beside_another_client": outside_json});
    (table, json)
}

/// Another client of the instance, outside any proxy: one call every
/// 1/[`OUTSIDE_PER_SECOND`] s until `stop`; its calls answered 2xx.
async fn outside_client(
    url: String,
    token: String,
    stop: tokio_util::sync::CancellationToken,
) -> u64 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / OUTSIDE_PER_SECOND));
    let mut ok = 0;
    while !stop.is_cancelled() {
        tick.tick().await;
        let call = client.get(&url).bearer_auth(&token).send().await;
        if matches!(call, Ok(r) if r.status().is_success()) {
            ok += 1;
        }
    }
    ok
}

/// The rows as a table under `heading`, and as JSON; the other client's
/// column only where there was one.
fn report(heading: &str, rows: &[Row]) -> (String, serde_json::Value) {
    let outside = rows.iter().any(|row| row.outside_ok_per_second.is_some());
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n{heading}\n\n| target | 429s from Coupa | goodput (2xx/s at Coupa ÷ 25) | failed at the client | p99 wait |{}\n|---|---|---|---|---|{}",
        if outside { " the other client's 2xx/s |" } else { "" },
        if outside { "---|" } else { "" },
    );
    let mut json = Vec::new();
    for row in rows {
        let _ = write!(
            table,
            "| {} | {} | {:.2} | {} | {:.0} ms |",
            row.target, row.coupa_429, row.goodput, row.failed, row.p99_ms
        );
        let mut entry = serde_json::json!({
            "target": row.target,
            "coupa_429": row.coupa_429,
            "goodput": row.goodput,
            "failed_at_client": row.failed,
            "p99_wait_ms": row.p99_ms,
        });
        if let Some(per_second) = row.outside_ok_per_second {
            let _ = write!(table, " {per_second:.1} |");
            entry["outside_ok_per_second"] = per_second.into();
        }
        table.push('\n');
        json.push(entry);
    }
    (table, serde_json::Value::Array(json))
}

fn p99(mut waits: Vec<f64>) -> f64 {
    if waits.is_empty() {
        return 0.0;
    }
    let _ = median(&mut waits);
    let at = ((waits.len() as f64 * 0.99).ceil() as usize).clamp(1, waits.len()) - 1;
    waits[at]
}

/// The bursts, each request to the next of `urls` in turn (as a load
/// balancer spreads them): requests that did not get a 2xx, every
/// request's time, and how long the whole run took.
async fn burst_load(
    urls: Vec<String>,
    headers: Vec<(&'static str, String)>,
) -> (usize, Vec<f64>, Duration) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut calls = Vec::new();
    for burst in 0..CLIENTS {
        tokio::time::sleep_until((started + STAGGER * burst as u32).into()).await;
        for i in 0..PER_CLIENT {
            let mut request = client.get(&urls[(burst * PER_CLIENT + i) % urls.len()]);
            for (name, value) in &headers {
                request = request.header(*name, value);
            }
            calls.push(tokio::spawn(async move {
                let asked = Instant::now();
                let ok = matches!(request.send().await, Ok(r) if r.status().is_success());
                (ok, asked.elapsed().as_secs_f64() * 1000.0)
            }));
        }
    }
    let mut failed = 0;
    let mut waits = Vec::new();
    for call in calls {
        let (ok, wait) = call.await.unwrap();
        failed += usize::from(!ok);
        waits.push(wait);
    }
    (failed, waits, started.elapsed())
}

/// A proxy shaping to Coupa's budget, with `burst` or the proxy's default;
/// `shared`: through the Redis on this port, as one of several replicas;
/// `coupa_extra`: more of `[coupa]`.
fn start_proxy(
    upstream: u16,
    dir: &Path,
    burst: Option<u32>,
    (shared, coupa_extra): (Option<u16>, &str),
) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let admin = free_port();
    let cluster = if let Some(redis_port) = shared {
        let key = dir.join("cluster.key");
        std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
        format!(
            "[cluster]\nredis_url = \"redis://127.0.0.1:{}/0\"\nkey_prefix = \"budget-{}\"\nencryption_key_file = \"{}\"\n",
            redis_port,
            burst.unwrap_or(0),
            key.display()
        )
    } else {
        String::new()
    };
    let config = dir.join("proxy.toml");
    let burst = burst.map(|b| format!("burst = {b}\n")).unwrap_or_default();
    let limit =
        format!("[coupa.rate_limit]\nper_second = {RATE}\n{burst}max_queue = 10000\n{cluster}");
    std::fs::write(
        &config,
        proxy_config(
            port,
            admin,
            &format!("http://127.0.0.1:{upstream}"),
            &format!("max_connections = 128\n{coupa_extra}"),
            &limit,
        ),
    )
    .unwrap();
    let child = spawn_proxy(&config, &dir.join("proxy.log"), false, &[]);
    wait_for_port(port, "budget proxy");
    wait_ready(admin, "budget proxy");
    (child, port)
}
