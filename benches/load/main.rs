//! Load bench: the same load straight at a fast upstream, through this
//! proxy, and through nginx and HAProxy doing the same job, interleaved
//! over several rounds. Reports requests/s, latency percentiles, errors,
//! and each proxy's CPU time per request and peak RSS.
//!
//! Run: `bench/install-tools.sh` once, then `cargo bench --bench load`.
//! Knobs (environment): BENCH_ROUNDS (5), BENCH_SECONDS (4),
//! BENCH_SCENARIOS (comma-separated names, default all; `fair-flood` is
//! the fairness row of [`fairness`], `net-legacy`, `net-keepalive` and
//! `net-cold` the rows over a real network of [`network`], `coupa-budget`
//! Coupa's own 25/s under bursty load of [`budget`]),
//! BENCH_DELAY_MS (one-way delay of those, 20), BENCH_TARGETS
//! (default all), BENCH_SOAK_SECONDS (0: off; else a soak of a fresh proxy
//! at 50 connections sampling its RSS every 10 s), BENCH_JSON (summary path), BENCH_PERF
//! (a file: `perf record` the proxy during its h1-c50-1k runs),
//! BENCH_CALLGRIND=1 (instead of the table: the proxy under valgrind's
//! callgrind, user-space instructions per request at 16 connections; a
//! stable figure on a noisy machine for comparing two builds; the profile
//! stays in target/load-bench/ for callgrind_annotate; allocations per
//! request too; BENCH_CALLGRIND=tls: the same with Coupa reached over
//! HTTPS, as in `h1-c50-1k-tls`), BENCH_IDLE=N (instead of the table: memory per idle
//! keep-alive client connection, proxy against nginx, N connections),
//! BENCH_PROXY_B (path of another build of the proxy: target `proxy-b`
//! runs it beside `proxy` in every row, for a lever that is a build
//! choice, e.g. the crypto provider or the allocator),
//! BENCH_OTLP_ENDPOINT (a collector's OTLP/HTTP base URL, e.g. the
//! receiver `tests/otel/receiver.py PORT /dev/null discard`: this build's
//! proxy exports traces to it, for the cost of tracing).
//!
//! Targets: `direct`, `proxy`, `nginx`, `haproxy`, and in the
//! 50-connection scenario variants of the proxy with one lever turned:
//! `proxy+log` (access log lines on), `proxy+mt` (the multi-thread
//! runtime, still pinned to one core), `proxy+limit` (`[coupa.rate_limit]`
//! far above the load: the local limiter's cost) and `proxy+cluster` (the
//! same budget shared through a redis-server: one Redis round trip per
//! request).
//!
//! Layout on a 2-core machine: every proxy under test is pinned to core 0;
//! the load generator and the upstream (the fake Coupa, in this process)
//! share core 1.
//!
//! Files: [`targets`] (what is measured), [`drive`] (wrk/h2load, CPU and RSS
//! readings), [`stats`], [`report`] (table and JSON), [`profile`] (callgrind),
//! [`fairness`] (a steady integration's wait while another floods),
//! [`network`] (latency over a delayed TLS link, cold start), [`budget`]
//! (Coupa's 429s and goodput under bursts).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench that cannot run should stop loudly

mod budget;
mod drive;
mod fairness;
mod idle;
mod network;
mod profile;
mod report;
mod stats;
mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};

use drive::{measure, soak_run, Sample};
use targets::{
    start_haproxy, start_nginx, start_proxy, start_tls_upstream, Target, Upstream, Variant, PROXY,
    VARIANTS,
};

const CLIENT_ID: &str = "bench";
const CLIENT_SECRET: &str = "bench-secret";
const LEGACY_KEY: &str = "legacy-key-0123456789abcdef0123456789abcd";
const PROXY_CORE: &str = "0";
const LOAD_CORE: &str = "1";

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    H1,
    H2,
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    protocol: Protocol,
    concurrency: usize,
    kib: usize,
    /// Coupa is reached over HTTPS: the proxy and nginx in front of an
    /// nginx serving TLS ([`targets::start_tls_upstream`]).
    tls_upstream: bool,
}

fn scenarios() -> Vec<Scenario> {
    let s = |name, protocol, concurrency, kib| Scenario {
        name,
        protocol,
        concurrency,
        kib,
        tls_upstream: false,
    };
    vec![
        s("h1-c1-1k", Protocol::H1, 1, 1),
        s("h1-c16-1k", Protocol::H1, 16, 1),
        s("h1-c50-1k", Protocol::H1, 50, 1),
        s("h1-c64-1k", Protocol::H1, 64, 1),
        s("h1-c16-64k", Protocol::H1, 16, 64),
        s("h2-c16-1k", Protocol::H2, 16, 1),
        s("h2-c64-1k", Protocol::H2, 64, 1),
        Scenario {
            tls_upstream: true,
            ..s("h1-c50-1k-tls", Protocol::H1, 50, 1)
        },
    ]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    targets::require_tools();
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let seconds: u64 = env_or("BENCH_SECONDS", 4);
    let soak: u64 = env_or("BENCH_SOAK_SECONDS", 0);
    let scenarios: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| wanted("BENCH_SCENARIOS", s.name))
        .collect();

    // This process (the upstream) and the load generator share the load core.
    let _ = Command::new("taskset")
        .args(["-a", "-cp", LOAD_CORE, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let work = std::env::temp_dir().join(format!("coupa-proxy-load-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let (upstream, token, fake_state) = start_upstream();

    if let Ok(connections) = std::env::var("BENCH_IDLE") {
        idle::idle(
            upstream,
            &token,
            &work,
            connections.parse().unwrap_or(2_000),
        );
        let _ = std::fs::remove_dir_all(&work);
        std::process::exit(0);
    }
    if let Ok(mode) = std::env::var("BENCH_CALLGRIND") {
        if mode == "tls" {
            let (_nginx, over_tls) = start_tls_upstream(upstream, &work);
            profile::callgrind(&over_tls, &work);
        } else {
            profile::callgrind(&Upstream::plain(upstream), &work);
        }
        let _ = std::fs::remove_dir_all(&work);
        std::process::exit(0);
    }
    let plain = Upstream::plain(upstream);
    let mut targets: Vec<Target> = Vec::new();
    if wanted("BENCH_TARGETS", "direct") {
        targets.push(Target::direct(upstream, &token));
    }
    if wanted("BENCH_TARGETS", "proxy") {
        targets.push(start_proxy(&plain, &work, PROXY));
    }
    let proxy_b = targets::proxy_b();
    if let Some(variant) = proxy_b {
        targets.push(start_proxy(&plain, &work, variant));
    }
    if wanted("BENCH_TARGETS", "nginx") {
        targets.push(start_nginx(&plain, &token, &work));
    }
    // The same two in front of Coupa over HTTPS, for the scenarios that ask.
    let mut tls_upstream = None;
    let mut tls_targets: Vec<Target> = Vec::new();
    if scenarios.iter().any(|s| s.tls_upstream) {
        let (nginx, over_tls) = start_tls_upstream(upstream, &work);
        tls_upstream = Some(nginx);
        if wanted("BENCH_TARGETS", "proxy") {
            tls_targets.push(start_proxy(&over_tls, &work, PROXY));
        }
        if let Some(variant) = proxy_b {
            tls_targets.push(start_proxy(&over_tls, &work, variant));
        }
        if wanted("BENCH_TARGETS", "nginx") {
            tls_targets.push(start_nginx(&over_tls, &token, &work));
        }
    }
    if wanted("BENCH_TARGETS", "haproxy") {
        targets.push(start_haproxy(upstream, &token, &work));
    }
    let redis = VARIANTS
        .iter()
        .any(|v| v.budget == targets::Budget::Shared && wanted("BENCH_TARGETS", v.name))
        .then(|| targets::start_redis(&work));
    let wanted_variants: Vec<Variant> = VARIANTS
        .into_iter()
        .filter(|v| wanted("BENCH_TARGETS", v.name))
        .collect();
    let variants: Vec<Target> = wanted_variants
        .iter()
        .map(|v| start_proxy(&plain, &work, *v))
        .collect();

    let mut results: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    eprintln!(
        "load bench: {} scenarios x {} targets x {rounds} rounds x {seconds} s",
        scenarios.len(),
        targets.len() + variants.len() + tls_targets.len()
    );
    for round in 0..rounds {
        for scenario in &scenarios {
            // Rotate the order each round so no target always runs first.
            let pool = if scenario.tls_upstream {
                &tls_targets
            } else {
                &targets
            };
            let mut order: Vec<&Target> = pool.iter().collect();
            let shift = round % order.len().max(1);
            order.rotate_left(shift);
            order.extend(
                wanted_variants
                    .iter()
                    .zip(&variants)
                    .filter(|(v, _)| v.scenario == scenario.name)
                    .map(|(_, target)| target),
            );
            for target in order {
                let sample = measure(target, scenario, seconds, &work);
                eprintln!(
                    "round {} {:>11} {:>9}: {:>8.0} req/s p99 {:>6.0} µs errors {} cpu/req {}",
                    round + 1,
                    scenario.name,
                    target.name,
                    sample.rps,
                    sample.p99_us,
                    sample.errors,
                    sample
                        .cpu_us_per_request
                        .map(|c| format!("{c:.1} µs"))
                        .unwrap_or_else(|| "-".into())
                );
                results
                    .entry((scenario.name.to_owned(), target.name.to_owned()))
                    .or_default()
                    .push(sample);
            }
        }
    }

    // A fresh proxy, so the soak shows the 50-connection footprint alone,
    // not what the 64 KiB and HTTP/2 scenarios left in the heap.
    let soak_rss = (soak > 0).then(|| {
        let fresh = start_proxy(
            &plain,
            &work,
            Variant {
                name: "proxy-soak",
                ..PROXY
            },
        );
        soak_run(&fresh, soak, &work)
    });

    let (mut table, mut summary) =
        report::report(&scenarios, &targets, &variants, &results, soak_rss);
    if wanted("BENCH_SCENARIOS", "fair-flood") {
        let rows = fairness::fair_flood(upstream, &token, &work);
        let (fair_table, fair_json) = fairness::report(&rows);
        table.push_str(&fair_table);
        summary["fair_flood"] = fair_json;
    }
    if wanted("BENCH_SCENARIOS", "coupa-budget") {
        let (budget_table, budget_json) =
            budget::coupa_budget(&fake_state, upstream, &token, &work);
        table.push_str(&budget_table);
        summary["coupa_budget"] = budget_json["bursts"].clone();
        summary["coupa_budget_outside"] = budget_json["beside_another_client"].clone();
    }
    if network::wanted_any() {
        let (network_table, network_json) = network::run(upstream, &token, &work);
        table.push_str(&network_table);
        summary["network"] = network_json;
    }
    println!("{table}");
    let json_path = std::env::var("BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/load-bench/summary.json")
        });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    println!("summary written to {}", json_path.display());
    drop(targets);
    drop(variants);
    drop(tls_targets);
    drop(tls_upstream);
    if let Some(mut redis) = redis {
        let _ = redis.kill();
        let _ = redis.wait();
    }
    let _ = std::fs::remove_dir_all(&work);
    std::process::exit(0);
}

/// Whether the comma-separated list in `var` names `name` (unset: all).
fn wanted(var: &str, name: &str) -> bool {
    std::env::var(var)
        .map(|list| list.split(',').any(|n| n.trim() == name))
        .unwrap_or(true)
}

/// The fake Coupa in fast mode, served from a thread of its own runtime
/// (this thread drives the measurements and blocks on child processes).
/// Returns its port and a token for the targets that inject one themselves.
fn start_upstream() -> (
    u16,
    String,
    std::sync::Arc<coupa_auth_proxy::fake_coupa::FakeState>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fake = runtime.block_on(async {
        FakeCoupa::start(FakeCoupaOptions {
            clients: vec![FakeClient {
                id: CLIENT_ID.into(),
                secret: CLIENT_SECRET.into(),
                scopes: vec!["core.common.read".into()],
            }],
            ..FakeCoupaOptions::default()
        })
        .await
        .unwrap()
    });
    fake.state().set_fast_api(true);
    let upstream = fake.addr().port();
    let state = fake.shared_state();
    let token = runtime
        .block_on(fake.client_credentials_by_hand(CLIENT_ID, CLIENT_SECRET, "core.common.read"))
        .unwrap();
    std::thread::spawn(move || {
        let _fake = fake;
        runtime.block_on(std::future::pending::<()>());
    });
    (upstream, token, state)
}
