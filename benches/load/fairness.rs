//! `fair-flood`: what a steady integration waits while another floods,
//! behind Coupa's budget (25/s, burst 20). The proxy (a queue per
//! integration, slots dealt in turn) against nginx `limit_req` with the
//! same rate and a delaying burst queue (one queue for everyone: what a
//! gateway in front of one upstream does), both in front of the fake.
//!
//! The batch integration sends [`FLOOD`] requests at once; a second later
//! the steady one starts calling every [`STEADY_EVERY`], [`STEADY`] times.
//! Figures: the steady calls' wait (p50, max), its non-200s, and the
//! budget used while the flood waited (2xx per second ÷ 25).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use coupa_auth_proxy::proxy::auth::hash_key;

use crate::targets::{
    free_port, proxy_config, spawn_proxy, start_rate_limited_nginx, wait_for_port, wait_ready,
};

const BATCH_KEY: &str = "batch-key-0123456789abcdef0123456789abcdef01";
const APPROVALS_KEY: &str = "approvals-key-0123456789abcdef0123456789abcd";
const FLOOD: usize = 300;
const STEADY: usize = 16;
const STEADY_EVERY: Duration = Duration::from_millis(500);
const RATE: f64 = 25.0;

/// One target's figures.
pub struct Row {
    pub target: &'static str,
    pub steady_p50_ms: f64,
    pub steady_max_ms: f64,
    pub steady_failed: usize,
    /// 2xx per second at the upstream while the steady calls ran, ÷ 25.
    pub goodput: f64,
    pub flood_failed: usize,
}

pub fn fair_flood(upstream: u16, token: &str, work: &Path) -> Vec<Row> {
    let dir = work.join("fair-flood");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = Vec::new();
    let (mut proxy, port) = start_fair_proxy(upstream, &dir);
    rows.push(drive("proxy", port));
    let _ = proxy.kill();
    let _ = proxy.wait();
    // Room for every request in nginx's queue: it delays, it does not refuse.
    let (mut nginx, port) = start_rate_limited_nginx(upstream, token, &dir, RATE, FLOOD + STEADY);
    rows.push(drive("nginx limit_req", port));
    let _ = nginx.kill();
    let _ = nginx.wait();
    rows
}

/// The table rows and their JSON.
pub fn report(rows: &[Row]) -> (String, serde_json::Value) {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nfair-flood: {FLOOD} requests of one integration at once, another calling every {} ms, budget {RATE}/s burst 20\n\n\
         | target | steady p50 | steady max | steady failed | budget used while flooded | flood failed |\n|---|---|---|---|---|---|",
        STEADY_EVERY.as_millis()
    );
    let mut json = Vec::new();
    for row in rows {
        let _ = writeln!(
            table,
            "| {} | {:.0} ms | {:.0} ms | {} | {:.2} | {} |",
            row.target,
            row.steady_p50_ms,
            row.steady_max_ms,
            row.steady_failed,
            row.goodput,
            row.flood_failed
        );
        json.push(serde_json::json!({
            "target": row.target,
            "steady_p50_ms": row.steady_p50_ms,
            "steady_max_ms": row.steady_max_ms,
            "steady_failed": row.steady_failed,
            "goodput": row.goodput,
            "flood_failed": row.flood_failed,
        }));
    }
    (table, serde_json::Value::Array(json))
}

fn drive(target: &'static str, port: u16) -> Row {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(FLOOD + 8)
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/api/invoices");
        let call = |key: &'static str| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let ok = matches!(
                    client.get(url).header("X-COUPA-API-KEY", key).send().await,
                    Ok(r) if r.status().is_success()
                );
                (ok, Instant::now())
            }
        };
        let flood: Vec<_> = (0..FLOOD).map(|_| tokio::spawn(call(BATCH_KEY))).collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let window_start = Instant::now();
        // Each steady call leaves on its schedule, whatever the previous
        // one still waits for, as a timer-driven integration's would.
        let mut steady = Vec::new();
        for i in 0..STEADY {
            tokio::time::sleep_until((window_start + STEADY_EVERY * i as u32).into()).await;
            let asked = Instant::now();
            let call = call(APPROVALS_KEY);
            steady.push(tokio::spawn(async move {
                let (ok, answered) = call.await;
                (ok, (answered - asked).as_secs_f64() * 1000.0)
            }));
        }
        let mut waits = Vec::new();
        let mut steady_failed = 0;
        for call in steady {
            let (ok, wait) = call.await.unwrap();
            waits.push(wait);
            steady_failed += usize::from(!ok);
        }
        let window_end = Instant::now();
        let mut flood_failed = 0;
        let mut flood_in_window = 0;
        for call in flood {
            let (ok, at) = call.await.unwrap();
            flood_failed += usize::from(!ok);
            if ok && at >= window_start && at <= window_end {
                flood_in_window += 1;
            }
        }
        waits.sort_by(f64::total_cmp);
        let answered = flood_in_window + STEADY - steady_failed;
        let window = (window_end - window_start).as_secs_f64();
        Row {
            target,
            steady_p50_ms: waits[waits.len() / 2],
            steady_max_ms: *waits.last().unwrap(),
            steady_failed,
            goodput: answered as f64 / window / RATE,
            flood_failed,
        }
    })
}

fn start_fair_proxy(upstream: u16, dir: &Path) -> (Child, u16) {
    let port = free_port();
    let admin = free_port();
    let config = dir.join("proxy.toml");
    let tables = format!(
        "[coupa.rate_limit]\nper_second = {RATE}\nburst = 20\nmax_queue = 1000\n\
         [[integration]]\nname = \"batch\"\napi_key_sha256 = \"{}\"\nmax_concurrent = {FLOOD}\n\
         [[integration]]\nname = \"approvals\"\napi_key_sha256 = \"{}\"\n",
        hash_key(BATCH_KEY),
        hash_key(APPROVALS_KEY),
    );
    std::fs::write(
        &config,
        proxy_config(
            port,
            admin,
            &format!("http://127.0.0.1:{upstream}"),
            "max_connections = 128",
            &tables,
        ),
    )
    .unwrap();
    let child = spawn_proxy(&config, &dir.join("proxy.log"), false, &[]);
    wait_for_port(port, "fair-flood proxy");
    wait_ready(admin, "fair-flood proxy");
    (child, port)
}
