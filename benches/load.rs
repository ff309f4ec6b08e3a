//! Load bench: the same load straight at a fast upstream, through this
//! proxy, and through nginx and HAProxy doing the same job, interleaved
//! over several rounds. Reports requests/s, latency percentiles, errors,
//! and each proxy's CPU time per request and peak RSS.
//!
//! Run: `bench/install-tools.sh` once, then `cargo bench --bench load`.
//! Knobs (environment): BENCH_ROUNDS (5), BENCH_SECONDS (4),
//! BENCH_SCENARIOS (comma-separated names, default all), BENCH_TARGETS
//! (default all), BENCH_SOAK_SECONDS (0: off; else a soak of a fresh proxy
//! at 50 connections sampling its RSS every 10 s), BENCH_JSON (summary path), BENCH_PERF
//! (a file: `perf record` the proxy during its h1-c50-1k runs),
//! BENCH_CALLGRIND=1 (instead of the table: the proxy under valgrind's
//! callgrind, user-space instructions per request at 16 connections; a
//! stable figure on a noisy machine for comparing two builds; the profile
//! stays in target/load-bench/ for callgrind_annotate).
//!
//! Targets: `direct`, `proxy`, `nginx`, `haproxy`, and in the
//! 50-connection scenario two variants of the proxy with one lever turned
//! the other way: `proxy+log` (access log lines on) and `proxy+mt` (the
//! multi-thread runtime, still pinned to one core).
//!
//! Layout on a 2-core machine: every proxy under test is pinned to core 0;
//! the load generator and the upstream (the fake Coupa, in this process)
//! share core 1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench that cannot run should stop loudly

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};

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
}

fn scenarios() -> Vec<Scenario> {
    let s = |name, protocol, concurrency, kib| Scenario {
        name,
        protocol,
        concurrency,
        kib,
    };
    vec![
        s("h1-c1-1k", Protocol::H1, 1, 1),
        s("h1-c16-1k", Protocol::H1, 16, 1),
        s("h1-c50-1k", Protocol::H1, 50, 1),
        s("h1-c64-1k", Protocol::H1, 64, 1),
        s("h1-c16-64k", Protocol::H1, 16, 64),
        s("h2-c16-1k", Protocol::H2, 16, 1),
        s("h2-c64-1k", Protocol::H2, 64, 1),
    ]
}

/// One measurement of one target under one scenario.
#[derive(Clone, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    requests: u64,
    /// CPU time of the target's processes per request, µs (not for direct).
    cpu_us_per_request: Option<f64>,
    peak_rss_kib: Option<u64>,
}

/// Something that answers on a port: the upstream itself, or a proxy in
/// front of it (a child process pinned to the proxy core).
struct Target {
    name: &'static str,
    port: u16,
    h2_port: u16,
    child: Option<Child>,
    /// Extra headers the load sends (direct needs the bearer itself).
    headers: Vec<(String, String)>,
    /// Where this target's own logs and files live.
    _dir: Option<PathBuf>,
}

impl Target {
    fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let root = child.id();
        let mut pids = vec![root];
        // nginx forks its worker; count master and children.
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    let after = stat.rsplit(')').next().unwrap_or("");
                    let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
                    if ppid == Some(root) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    /// User + system CPU of the target's processes, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                // Fields after the command: state is 0, utime 11, stime 12.
                let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                utime + stime
            })
            .sum()
    }

    /// Starts a new peak-RSS window, so each run reports its own peak
    /// rather than the largest since start-up (`clear_refs` 5).
    fn reset_peak_rss(&self) {
        for pid in self.pids() {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
    }

    /// Sum of the peak resident sets of the target's processes (KiB).
    fn peak_rss_kib(&self) -> Option<u64> {
        let pids = self.pids();
        if pids.is_empty() {
            return None;
        }
        Some(
            pids.iter()
                .filter_map(|pid| status_kib(*pid, "VmHWM:"))
                .sum(),
        )
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn require_tools() {
    let missing: Vec<&str> = ["wrk", "h2load", "nginx", "haproxy", "taskset"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "load bench: missing {}; run bench/install-tools.sh first",
            missing.join(", ")
        );
        std::process::exit(2);
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pinned(core: &str, program: &str) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", core, program]);
    command
}

/// How a proxy under test runs: the default (`proxy`), or one lever
/// turned the other way, to show what it is worth.
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    /// Per-request access log lines on (`info`) instead of `warn`.
    log: bool,
    /// `[runtime] flavor`.
    flavor: &'static str,
}

const PROXY: Variant = Variant {
    name: "proxy",
    log: false,
    flavor: "auto",
};

/// Compared in the 50-connection scenario only.
const VARIANTS: [Variant; 2] = [
    Variant {
        name: "proxy+log",
        log: true,
        flavor: "auto",
    },
    Variant {
        name: "proxy+mt",
        log: false,
        flavor: "multi_thread",
    },
];

fn start_proxy(upstream: u16, work: &Path, variant: Variant) -> Target {
    start_proxy_with(upstream, work, variant, &[])
}

/// The proxy, run through `wrapper` (e.g. valgrind) when one is given.
fn start_proxy_with(upstream: u16, work: &Path, variant: Variant, wrapper: &[&str]) -> Target {
    let Variant { name, log, flavor } = variant;
    let port = free_port();
    let admin = free_port();
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listen]
address = "127.0.0.1:{port}"
[coupa]
base_url = "http://127.0.0.1:{upstream}"
accept = "application/json"
[oauth]
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
scopes = ["core.common.read"]
activation_delay = "0s"
[admin]
address = "127.0.0.1:{admin}"
[reload]
watch_interval = "0s"
[runtime]
flavor = "{flavor}"
"#
        ),
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_coupa-auth-proxy");
    let log_file = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = pinned(PROXY_CORE, program);
            command.args(args).arg(binary);
            command
        }
        None => pinned(PROXY_CORE, binary),
    };
    let child = command
        .args([
            "--log-level",
            if log { "info" } else { "warn" },
            "run",
            "--config",
        ])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("proxy starts");
    wait_for_port(port, "proxy");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers_200(admin, "/readyz") {
        assert!(Instant::now() < deadline, "proxy not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    Target {
        name,
        port,
        // The proxy serves HTTP/1.1 and h2c on one port.
        h2_port: port,
        child: Some(child),
        headers: vec![("X-COUPA-API-KEY".into(), LEGACY_KEY.into())],
        _dir: Some(dir),
    }
}

fn answers_200(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

fn start_nginx(upstream: u16, token: &str, work: &Path) -> Target {
    let port = free_port();
    let h2_port = free_port();
    let dir = work.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            r#"
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream coupa {{
        server 127.0.0.1:{upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{h2_port} http2;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://coupa;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream};
            proxy_set_header Authorization "Bearer {token}";
            proxy_set_header Accept "application/json";
            proxy_set_header X-COUPA-API-KEY "";
        }}
    }}
}}
"#
        ),
    )
    .unwrap();
    let child = pinned(PROXY_CORE, "nginx")
        .args(["-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    wait_for_port(port, "nginx");
    Target {
        name: "nginx",
        port,
        h2_port,
        child: Some(child),
        headers: vec![("X-COUPA-API-KEY".into(), LEGACY_KEY.into())],
        _dir: Some(dir),
    }
}

fn start_haproxy(upstream: u16, token: &str, work: &Path) -> Target {
    let port = free_port();
    let h2_port = free_port();
    let dir = work.join("haproxy");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            r#"
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{h2_port} proto h2
    http-request del-header X-COUPA-API-KEY
    http-request set-header Authorization "Bearer {token}"
    http-request set-header Accept application/json
    default_backend coupa
backend coupa
    server up 127.0.0.1:{upstream}
"#
        ),
    )
    .unwrap();
    let child = pinned(PROXY_CORE, "haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    wait_for_port(port, "haproxy");
    Target {
        name: "haproxy",
        port,
        h2_port,
        child: Some(child),
        headers: vec![("X-COUPA-API-KEY".into(), LEGACY_KEY.into())],
        _dir: Some(dir),
    }
}

const WRK_REPORT: &str = r#"
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
               + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"errors":%d,"p50":%f,"p99":%f,"p999":%f}\n',
    summary.requests, summary.duration, errors,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// Runs the load generator once; returns (requests, errors, rps, p50, p99, p99.9 in µs).
fn load(target: &Target, scenario: &Scenario, seconds: u64, work: &Path) -> Sample {
    let query = if scenario.kib == 64 { "?kib=64" } else { "" };
    match scenario.protocol {
        Protocol::H1 => {
            let url = format!("http://127.0.0.1:{}/api/invoices{query}", target.port);
            let script = work.join("report.lua");
            if !script.exists() {
                std::fs::write(&script, WRK_REPORT).unwrap();
            }
            let mut command = pinned(LOAD_CORE, "wrk");
            command.args([
                "-t1",
                &format!("-c{}", scenario.concurrency),
                &format!("-d{seconds}s"),
                "--timeout",
                "5s",
                "-s",
            ]);
            command.arg(&script);
            for (name, value) in &target.headers {
                command.args(["-H", &format!("{name}: {value}")]);
            }
            let output = command.arg(&url).output().expect("wrk runs");
            let text = String::from_utf8_lossy(&output.stdout);
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("WRK_JSON "))
                .unwrap_or_else(|| panic!("wrk printed no summary:\n{text}"));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let requests = v["requests"].as_u64().unwrap_or(0);
            let duration = v["duration_us"].as_f64().unwrap_or(1.0) / 1e6;
            Sample {
                rps: requests as f64 / duration,
                p50_us: v["p50"].as_f64().unwrap_or(0.0),
                p99_us: v["p99"].as_f64().unwrap_or(0.0),
                p999_us: v["p999"].as_f64().unwrap_or(0.0),
                errors: v["errors"].as_u64().unwrap_or(0),
                requests,
                ..Sample::default()
            }
        }
        Protocol::H2 => {
            let url = format!("http://127.0.0.1:{}/api/invoices{query}", target.h2_port);
            let log = work.join("h2load.log");
            let _ = std::fs::remove_file(&log);
            let connections = (scenario.concurrency / 16).max(1);
            let streams = scenario.concurrency / connections;
            let mut command = pinned(LOAD_CORE, "h2load");
            command.args([
                "-c",
                &connections.to_string(),
                "-m",
                &streams.to_string(),
                "-D",
                &seconds.to_string(),
                "--log-file",
            ]);
            command.arg(&log);
            for (name, value) in &target.headers {
                command.args(["-H", &format!("{name}: {value}")]);
            }
            let started = Instant::now();
            let output = command.arg(&url).output().expect("h2load runs");
            let elapsed = started
                .elapsed()
                .as_secs_f64()
                .min(seconds as f64)
                .max(0.001);
            let text = std::fs::read_to_string(&log).unwrap_or_else(|_| {
                panic!(
                    "h2load wrote no log: {}",
                    String::from_utf8_lossy(&output.stdout)
                )
            });
            let mut latencies: Vec<f64> = Vec::new();
            let mut errors = 0;
            for line in text.lines() {
                let fields: Vec<&str> = line.split('\t').collect();
                if fields.len() < 3 {
                    continue;
                }
                if fields[1] != "200" {
                    errors += 1;
                }
                latencies.push(fields[2].trim().parse().unwrap_or(0.0));
            }
            latencies.sort_by(f64::total_cmp);
            let pct = |p: f64| -> f64 {
                if latencies.is_empty() {
                    return 0.0;
                }
                let i = ((p / 100.0) * (latencies.len() - 1) as f64).round() as usize;
                latencies[i]
            };
            let requests = latencies.len() as u64;
            Sample {
                rps: requests as f64 / elapsed,
                p50_us: pct(50.0),
                p99_us: pct(99.0),
                p999_us: pct(99.9),
                errors,
                requests,
                ..Sample::default()
            }
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return 0.0;
    }
    values[values.len() / 2]
}

/// Median and range of one figure over the rounds.
#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(samples: &[Sample], figure: impl Fn(&Sample) -> Option<f64>) -> Option<Stat> {
    let mut values: Vec<f64> = samples.iter().filter_map(figure).collect();
    if values.is_empty() {
        return None;
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Stat {
        median: median(&mut values),
        min,
        max,
    })
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    require_tools();
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let seconds: u64 = env_or("BENCH_SECONDS", 4);
    let soak: u64 = env_or("BENCH_SOAK_SECONDS", 0);
    let wanted = |var: &str, name: &str| {
        std::env::var(var)
            .map(|list| list.split(',').any(|n| n.trim() == name))
            .unwrap_or(true)
    };
    let scenarios: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| wanted("BENCH_SCENARIOS", s.name))
        .collect();

    // This process (the upstream) and the load generator share the load core.
    let _ = Command::new("taskset")
        .args(["-a", "-cp", LOAD_CORE, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let work = std::env::temp_dir().join(format!("coupa-proxy-load-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
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
    let token = runtime.block_on(async {
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/oauth2/token", fake.base_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", "core.common.read"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["access_token"].as_str().unwrap().to_owned()
    });
    // The fake serves from a thread of its own runtime; this thread drives
    // the measurements and blocks on child processes.
    let fake_runtime = std::thread::spawn(move || {
        runtime.block_on(std::future::pending::<()>());
    });
    let _ = fake_runtime;

    if std::env::var("BENCH_CALLGRIND").is_ok() {
        callgrind(upstream, &work);
        let _ = std::fs::remove_dir_all(&work);
        std::process::exit(0);
    }
    let mut targets: Vec<Target> = Vec::new();
    if wanted("BENCH_TARGETS", "direct") {
        targets.push(Target {
            name: "direct",
            port: upstream,
            h2_port: upstream,
            child: None,
            headers: vec![
                ("Authorization".into(), format!("Bearer {token}")),
                ("Accept".into(), "application/json".into()),
            ],
            _dir: None,
        });
    }
    if wanted("BENCH_TARGETS", "proxy") {
        targets.push(start_proxy(upstream, &work, PROXY));
    }
    if wanted("BENCH_TARGETS", "nginx") {
        targets.push(start_nginx(upstream, &token, &work));
    }
    if wanted("BENCH_TARGETS", "haproxy") {
        targets.push(start_haproxy(upstream, &token, &work));
    }
    let variants: Vec<Target> = VARIANTS
        .iter()
        .filter(|v| wanted("BENCH_TARGETS", v.name))
        .map(|v| start_proxy(upstream, &work, *v))
        .collect();

    let tick = ticks_per_second();
    let mut results: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    eprintln!(
        "load bench: {} scenarios x {} targets x {rounds} rounds x {seconds} s",
        scenarios.len(),
        targets.len() + variants.len()
    );
    for round in 0..rounds {
        for scenario in &scenarios {
            // Rotate the order each round so no target always runs first.
            let mut order: Vec<&Target> = targets.iter().collect();
            let shift = round % order.len().max(1);
            order.rotate_left(shift);
            if scenario.name == "h1-c50-1k" {
                order.extend(variants.iter());
            }
            for target in order {
                target.reset_peak_rss();
                let before = target.cpu_ticks();
                // BENCH_PERF=FILE: record a profile of the proxy's busiest run.
                let profiler = match std::env::var("BENCH_PERF") {
                    Ok(file) if target.name == "proxy" && scenario.name == "h1-c50-1k" => {
                        Command::new("perf")
                            .args(["record", "-F", "1999", "-g", "-o", &file, "-p"])
                            .arg(target.pids()[0].to_string())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .ok()
                    }
                    _ => None,
                };
                let mut sample = load(target, scenario, seconds, &work);
                if let Some(mut perf) = profiler {
                    let _ = Command::new("kill")
                        .args(["-INT", &perf.id().to_string()])
                        .status();
                    let _ = perf.wait();
                }
                let cpu = target.cpu_ticks() - before;
                if target.child.is_some() && sample.requests > 0 {
                    sample.cpu_us_per_request =
                        Some(cpu as f64 / tick * 1e6 / sample.requests as f64);
                    sample.peak_rss_kib = target.peak_rss_kib();
                }
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
            upstream,
            &work,
            Variant {
                name: "proxy-soak",
                ..PROXY
            },
        );
        soak_run(&fresh, soak, &work)
    });

    let (table, summary) = report(&scenarios, &targets, &variants, &results, soak_rss);
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
    let _ = std::fs::remove_dir_all(&work);
    std::process::exit(0);
}

/// Instructions the proxy executes per request, from callgrind: counting
/// starts after start-up and a warm-up, so only the request path counts.
fn callgrind(upstream: u16, work: &Path) {
    // Kept after the run, for callgrind_annotate.
    let keep = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/load-bench");
    std::fs::create_dir_all(&keep).unwrap();
    for old in std::fs::read_dir(&keep).unwrap().flatten() {
        if old
            .file_name()
            .to_string_lossy()
            .starts_with("callgrind.out")
        {
            let _ = std::fs::remove_file(old.path());
        }
    }
    let out = keep.join("callgrind.out");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let proxy = start_proxy_with(
        upstream,
        work,
        Variant {
            name: "proxy-callgrind",
            ..PROXY
        },
        &[
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            &out_arg,
        ],
    );
    let pid = proxy.pids()[0].to_string();
    let scenario = Scenario {
        name: "callgrind",
        protocol: Protocol::H1,
        concurrency: 16,
        kib: 1,
    };
    load(&proxy, &scenario, 2, work);
    let control = |args: &[&str]| {
        Command::new("callgrind_control")
            .args(args)
            .arg(&pid)
            .stdout(Stdio::null())
            .status()
            .expect("callgrind_control runs")
    };
    control(&["--instr=on"]);
    let sample = load(&proxy, &scenario, 10, work);
    control(&["--dump"]);
    control(&["--instr=off"]);
    let dumps: Vec<PathBuf> = std::fs::read_dir(&keep)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("callgrind.out"))
        .collect();
    let instructions: u64 = dumps
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("summary:")
                        .or_else(|| l.strip_prefix("totals:"))
                })
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0);
    println!(
        "callgrind: {} requests, {:.0} user-space instructions per request ({} dumps in {})",
        sample.requests,
        instructions as f64 / sample.requests.max(1) as f64,
        dumps.len(),
        keep.display()
    );
}

/// Drives the proxy at 50 connections for `seconds`, sampling its RSS
/// every 10 s. Returns the samples (KiB).
fn soak_run(proxy: &Target, seconds: u64, work: &Path) -> Vec<u64> {
    let scenario = Scenario {
        name: "soak",
        protocol: Protocol::H1,
        concurrency: 50,
        kib: 1,
    };
    let mut samples = Vec::new();
    let chunks = seconds.div_ceil(10);
    for _ in 0..chunks {
        load(proxy, &scenario, 10, work);
        if let Some(pid) = proxy.pids().first() {
            samples.push(status_kib(*pid, "VmRSS:").unwrap_or(0));
        }
    }
    // Last: the peak over the whole soak.
    samples.push(proxy.peak_rss_kib().unwrap_or(0));
    samples
}

/// Cores of the machine (this process is pinned to one of them).
fn cores() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

fn report(
    scenarios: &[Scenario],
    targets: &[Target],
    variants: &[Target],
    results: &BTreeMap<(String, String), Vec<Sample>>,
    soak_rss: Option<Vec<u64>>,
) -> (String, serde_json::Value) {
    let mut table = String::new();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let _ = writeln!(
        table,
        "\nmachine: {} cores, {machine}; proxy on core {PROXY_CORE}, load + upstream on core {LOAD_CORE}",
        cores()
    );
    let _ = writeln!(
        table,
        "medians over the rounds (min..max); ratios against direct (throughput, p99) and nginx (CPU)\n"
    );
    let _ = writeln!(
        table,
        "| scenario | target | req/s | p50 µs | p99 µs | p99.9 µs | errors | CPU µs/req | peak RSS MiB | req/s ÷ direct | p99 ÷ direct | CPU ÷ nginx |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t.name)
        .chain(variants.iter().map(|t| t.name))
        .collect();
    for scenario in scenarios {
        let get = |target: &str| results.get(&(scenario.name.to_owned(), target.to_owned()));
        let direct_rps = get("direct").and_then(|s| stat(s, |x| Some(x.rps)));
        let direct_p99 = get("direct").and_then(|s| stat(s, |x| Some(x.p99_us)));
        let nginx_cpu = get("nginx").and_then(|s| stat(s, |x| x.cpu_us_per_request));
        for name in &names {
            let Some(samples) = get(name) else { continue };
            let rps = stat(samples, |x| Some(x.rps)).unwrap();
            let p50 = stat(samples, |x| Some(x.p50_us)).unwrap();
            let p99 = stat(samples, |x| Some(x.p99_us)).unwrap();
            let p999 = stat(samples, |x| Some(x.p999_us)).unwrap();
            let errors: u64 = samples.iter().map(|s| s.errors).sum();
            let cpu = stat(samples, |x| x.cpu_us_per_request);
            let rss = samples.iter().filter_map(|s| s.peak_rss_kib).max();
            let ratio = |a: Option<Stat>, b: Option<Stat>| match (a, b) {
                (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
                _ => None,
            };
            let rps_ratio = ratio(Some(rps), direct_rps);
            let p99_ratio = ratio(Some(p99), direct_p99);
            let cpu_ratio = ratio(cpu, nginx_cpu);
            let range = |s: Stat, digits: usize| {
                format!(
                    "{:.*} ({:.*}..{:.*})",
                    digits, s.median, digits, s.min, digits, s.max
                )
            };
            let opt = |v: Option<f64>, digits: usize| {
                v.map(|v| format!("{v:.digits$}"))
                    .unwrap_or_else(|| "—".into())
            };
            let _ = writeln!(
                table,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
                scenario.name,
                name,
                range(rps, 0),
                p50.median,
                p99.median,
                p999.median,
                errors,
                cpu.map(|c| range(c, 1)).unwrap_or_else(|| "—".into()),
                rss.map(|r| format!("{:.1}", r as f64 / 1024.0))
                    .unwrap_or_else(|| "—".into()),
                opt(rps_ratio, 2),
                opt(p99_ratio, 2),
                opt(cpu_ratio, 2),
            );
            rows.push(serde_json::json!({
                "scenario": scenario.name,
                "target": name,
                "rps": {"median": rps.median, "min": rps.min, "max": rps.max},
                "p50_us": p50.median,
                "p99_us": {"median": p99.median, "min": p99.min, "max": p99.max},
                "p999_us": p999.median,
                "errors": errors,
                "cpu_us_per_request": cpu.map(|c| serde_json::json!({"median": c.median, "min": c.min, "max": c.max})),
                "peak_rss_kib": rss,
                "rps_ratio_to_direct": rps_ratio,
                "p99_ratio_to_direct": p99_ratio,
                "cpu_ratio_to_nginx": cpu_ratio,
                "rounds": samples.len(),
            }));
        }
    }
    if let Some(samples) = &soak_rss {
        let (peak, every_10s) = samples.split_last().unwrap_or((&0, &[]));
        let _ = writeln!(
            table,
            "\nsoak of a fresh proxy at 50 connections: peak RSS {:.1} MiB; RSS every 10 s (MiB): {}",
            *peak as f64 / 1024.0,
            every_10s
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let summary = serde_json::json!({
        "machine": machine,
        "cores": cores(),
        "proxy_core": PROXY_CORE,
        "load_core": LOAD_CORE,
        "rows": rows,
        "soak_peak_rss_kib": soak_rss.as_ref().and_then(|s| s.last()),
        "soak_rss_kib_every_10s": soak_rss.as_ref().map(|s| &s[..s.len().saturating_sub(1)]),
    });
    (table, summary)
}
