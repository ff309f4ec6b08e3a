//! What integrations feel over a real network: Coupa 2 × `BENCH_DELAY_MS`
//! (default 20, so 40 ms) away over TLS. A delay relay of our own sits in
//! front of the TLS upstream (the kernel here has no netem): each chunk
//! it forwards, either way, leaves `BENCH_DELAY_MS` after it arrived.
//!
//! Rows (`BENCH_SCENARIOS` names):
//! - `net-legacy`: a client that opens a new connection per call, as many
//!   scripts and older ERP connectors do — straight to Coupa (TCP + TLS +
//!   request: 3 round trips) against through nginx and through the proxy,
//!   both keeping their connections to Coupa (1 round trip is the floor).
//! - `net-keepalive`: a client that keeps its connection: what each target
//!   adds over calling Coupa directly, beside what a bare TCP hop that
//!   does no work adds on this machine (the floor for any proxy).
//! - `net-cold`: process start to the first answered call, and the first
//!   call after an idle period longer than `coupa.pool_idle_timeout`, with
//!   `coupa.keep_warm` on and off.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use coupa_auth_proxy::fake_coupa::relay::DelayRelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::median;
use crate::targets::{
    answers_200, free_port, proxy_config, spawn_proxy, start_nginx, start_proxy,
    start_tls_upstream, Upstream, PROXY,
};
use crate::{env_or, wanted, LEGACY_KEY};

/// Calls per target and row.
const CALLS: usize = 200;

pub fn wanted_any() -> bool {
    ["net-legacy", "net-keepalive", "net-cold"]
        .iter()
        .any(|row| wanted("BENCH_SCENARIOS", row))
}

/// Latencies of one target in one row, in ms.
struct Latency {
    target: &'static str,
    ms: Percentiles,
}

struct Percentiles {
    p50: f64,
    p99: f64,
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    let p50 = median(&mut samples);
    let at = ((samples.len() as f64 * 0.99).ceil() as usize).clamp(1, samples.len()) - 1;
    Percentiles {
        p50,
        p99: samples[at],
    }
}

pub fn run(fake: u16, token: &str, work: &Path) -> (String, serde_json::Value) {
    let delay = Duration::from_millis(env_or("BENCH_DELAY_MS", 20));
    let work = work.join("network");
    std::fs::create_dir_all(&work).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (upstream_tls, tls) = start_tls_upstream(fake, &work);
    let relay = runtime
        .block_on(DelayRelay::start(
            SocketAddr::from(([127, 0, 0, 1], tls.port)),
            delay,
        ))
        .unwrap();
    let far = Upstream {
        port: relay.port(),
        ca_file: tls.ca_file.clone(),
    };
    let ca_file = far.ca_file.clone().expect("a TLS upstream");
    let rtt = delay * 2;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nover a network: Coupa {} ms away (round trip) over TLS, through a delay relay; {CALLS} calls per target, ms\n",
        rtt.as_millis()
    );
    let mut json = serde_json::Map::new();
    json.insert("round_trip_ms".into(), (rtt.as_millis() as u64).into());

    let needs_targets =
        wanted("BENCH_SCENARIOS", "net-legacy") || wanted("BENCH_SCENARIOS", "net-keepalive");
    let targets = needs_targets.then(|| {
        let proxy = start_proxy(&far, &work, PROXY);
        let nginx = start_nginx(&far, token, &work);
        (proxy, nginx)
    });
    for (row, fresh) in [("net-legacy", true), ("net-keepalive", false)] {
        if !wanted("BENCH_SCENARIOS", row) {
            continue;
        }
        let Some((proxy, nginx)) = &targets else {
            continue;
        };
        let direct = runtime.block_on(calls(
            &format!("https://localhost:{}/api/invoices", relay.port()),
            Some((&ca_file, relay.port())),
            &[
                ("Authorization", format!("Bearer {token}")),
                ("Accept", "application/json".into()),
            ],
            fresh,
        ));
        let through = |port: u16| {
            runtime.block_on(calls(
                &format!("http://127.0.0.1:{port}/api/invoices"),
                None,
                &[("X-COUPA-API-KEY", LEGACY_KEY.to_owned())],
                fresh,
            ))
        };
        let mut rows = vec![
            Latency {
                target: "direct",
                ms: direct,
            },
            Latency {
                target: "nginx",
                ms: through(nginx.port),
            },
            Latency {
                target: "proxy",
                ms: through(proxy.port),
            },
        ];
        if !fresh {
            // What one more loopback hop costs on this machine with no work
            // at all: the floor under what any proxy adds.
            let hop = bare_hop(relay.port());
            rows.push(Latency {
                target: "bare TCP hop (no work)",
                ms: runtime.block_on(calls(
                    &format!("https://localhost:{hop}/api/invoices"),
                    Some((&ca_file, hop)),
                    &[
                        ("Authorization", format!("Bearer {token}")),
                        ("Accept", "application/json".into()),
                    ],
                    fresh,
                )),
            });
        }
        report_row(&mut table, &mut json, row, fresh, &rows);
    }
    drop(targets);

    if wanted("BENCH_SCENARIOS", "net-cold") {
        let _ = writeln!(
            table,
            "\n| net-cold | keep_warm | start → ready (token held) | first call after ready | call after idle > pool_idle_timeout |\n|---|---|---|---|---|"
        );
        let trips = |ms: f64| ms / (rtt.as_secs_f64() * 1000.0);
        let mut cold = Vec::new();
        for keep_warm in [true, false] {
            let Cold { ready, first, idle } = cold_start(&far, &work, keep_warm, &runtime);
            let _ = writeln!(
                table,
                "| proxy | {keep_warm} | {ready:.0} ms ({:.1} RTT) | {first:.0} ms ({:.1} RTT) | {idle:.0} ms ({:.1} RTT) |",
                trips(ready),
                trips(first),
                trips(idle),
            );
            cold.push(serde_json::json!({
                "keep_warm": keep_warm,
                "start_to_ready_ms": ready,
                "first_call_ms": first,
                "call_after_idle_ms": idle,
            }));
        }
        json.insert("net-cold".into(), cold.into());
    }
    drop(relay);
    drop(upstream_tls);
    (table, serde_json::Value::Object(json))
}

fn report_row(
    table: &mut String,
    json: &mut serde_json::Map<String, serde_json::Value>,
    row: &str,
    fresh: bool,
    rows: &[Latency],
) {
    let direct = &rows[0].ms;
    let _ = writeln!(
        table,
        "| {row} ({}) | p50 | p99 | p50 ÷ direct | p50 − direct |\n|---|---|---|---|---|",
        if fresh {
            "new connection per call"
        } else {
            "keep-alive client"
        }
    );
    let mut entries = Vec::new();
    for Latency { target, ms } in rows {
        let _ = writeln!(
            table,
            "| {target} | {:.1} | {:.1} | {:.2} | {:+.2} |",
            ms.p50,
            ms.p99,
            ms.p50 / direct.p50,
            ms.p50 - direct.p50
        );
        entries.push(serde_json::json!({
            "target": target,
            "p50_ms": ms.p50,
            "p99_ms": ms.p99,
            "p50_over_direct": ms.p50 / direct.p50,
            "p99_over_direct": ms.p99 / direct.p99,
        }));
    }
    json.insert(row.to_owned(), entries.into());
}

/// [`CALLS`] sequential GETs; `fresh`: a new connection for each.
/// `tls`: the CA and the relay port `localhost` resolves to.
async fn calls(
    url: &str,
    tls: Option<(&PathBuf, u16)>,
    headers: &[(&str, String)],
    fresh: bool,
) -> Percentiles {
    let mut builder = reqwest::Client::builder().no_proxy();
    if fresh {
        builder = builder.pool_max_idle_per_host(0);
    }
    if let Some((ca, port)) = tls {
        let pem = std::fs::read(ca).unwrap();
        builder = builder
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let client = builder.build().unwrap();
    let call = || {
        let mut request = client.get(url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        async move {
            let started = Instant::now();
            let response = request.send().await.expect("call answered");
            assert!(response.status().is_success(), "{}", response.status());
            response.bytes().await.unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        }
    };
    // A warm-up call: every target starts with its pool (and the client's)
    // as it would be in use.
    call().await;
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        samples.push(call().await);
    }
    percentiles(samples)
}

/// The proxy started with `keep_warm`, through the relay: how long to
/// ready, the first call after, and a call after an idle period.
fn cold_start(
    far: &Upstream,
    work: &Path,
    keep_warm: bool,
    runtime: &tokio::runtime::Runtime,
) -> Cold {
    let port = free_port();
    let admin = free_port();
    let dir = work.join(format!("cold-{keep_warm}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    let coupa = format!(
        "ca_file = \"{}\"\npool_idle_timeout = \"1s\"\nkeep_warm = {keep_warm}",
        far.ca_file.as_ref().unwrap().display()
    );
    std::fs::write(
        &config,
        proxy_config(
            port,
            admin,
            &format!("https://localhost:{}", far.port),
            &coupa,
            "",
        ),
    )
    .unwrap();
    let spawned = Instant::now();
    let mut child: Child = spawn_proxy(&config, &dir.join("proxy.log"), false, &[]);
    let ready = runtime.block_on(async {
        let deadline = spawned + Duration::from_secs(30);
        while !answers_200(admin, "/readyz") {
            assert!(Instant::now() < deadline, "the proxy never got ready");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        spawned.elapsed().as_secs_f64() * 1000.0
    });
    let first = runtime.block_on(async {
        let started = Instant::now();
        assert_eq!(raw_get(port).await, Some(200));
        started.elapsed().as_secs_f64() * 1000.0
    });
    // Idle longer than pool_idle_timeout (1 s, pruned every 0.5 s).
    std::thread::sleep(Duration::from_millis(2_500));
    let idle = runtime.block_on(async {
        let started = Instant::now();
        assert_eq!(raw_get(port).await, Some(200));
        started.elapsed().as_secs_f64() * 1000.0
    });
    let _ = child.kill();
    let _ = child.wait();
    Cold { ready, first, idle }
}

/// A TCP forwarder to `target` on a thread of its own that does nothing
/// but copy bytes; its port. It lives as long as the bench.
fn bare_hop(target: u16) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
    });
    port
}

/// Cold-start figures of one proxy, ms.
struct Cold {
    /// Spawn to `/readyz` 200 (the token fetched).
    ready: f64,
    /// The first call right after ready.
    first: f64,
    /// A call after an idle period longer than `pool_idle_timeout`.
    idle: f64,
}

/// One GET on a fresh plain connection; its status, `None` if refused.
async fn raw_get(port: u16) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!(
        "GET /api/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-COUPA-API-KEY: {LEGACY_KEY}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    std::str::from_utf8(answer.get(9..12)?).ok()?.parse().ok()
}
