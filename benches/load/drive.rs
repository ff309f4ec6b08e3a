//! Driving load: wrk for HTTP/1.1, h2load for HTTP/2, both pinned to the
//! load core; one run gives one [`Sample`]. Also the CPU and memory
//! readings around a run, and the soak.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::targets::{pinned, status_kib, Target};
use crate::{Protocol, Scenario, LOAD_CORE};

/// One measurement of one target under one scenario.
#[derive(Clone, Default)]
pub struct Sample {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
    pub requests: u64,
    /// CPU time of the target's processes per request, µs (not for direct).
    pub cpu_us_per_request: Option<f64>,
    /// The user-space part of it: what is the proxy's own to cut; the rest
    /// is the kernel's (system calls on loopback, the floor for any proxy).
    pub user_us_per_request: Option<f64>,
    pub peak_rss_kib: Option<u64>,
}

pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub const WRK_REPORT: &str = r#"
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
pub fn load(target: &Target, scenario: &Scenario, seconds: u64, work: &Path) -> Sample {
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

/// Drives the proxy at 50 connections for `seconds`, sampling its RSS
/// every 10 s. Returns the samples (KiB).
pub fn soak_run(proxy: &Target, seconds: u64, work: &Path) -> Vec<u64> {
    let scenario = Scenario {
        name: "soak",
        protocol: Protocol::H1,
        concurrency: 50,
        kib: 1,
        tls_upstream: false,
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

/// One run of `scenario` against `target`, with the target's CPU time per
/// request and peak RSS over that run. `BENCH_PERF=FILE` records a profile
/// of the proxy's busiest run.
pub fn measure(target: &Target, scenario: &Scenario, seconds: u64, work: &Path) -> Sample {
    target.reset_peak_rss();
    let before = target.cpu_ticks();
    let profiler = match std::env::var("BENCH_PERF") {
        Ok(file) if target.name == "proxy" && scenario.name == "h1-c50-1k" => Command::new("perf")
            .args(["record", "-F", "1999", "-g", "-o", &file, "-p"])
            .arg(target.pids()[0].to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok(),
        _ => None,
    };
    let mut sample = load(target, scenario, seconds, work);
    if let Some(mut perf) = profiler {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let after = target.cpu_ticks();
    let (user, system) = (after.0 - before.0, after.1 - before.1);
    if target.child.is_some() && sample.requests > 0 {
        let per_request =
            |ticks: u64| ticks as f64 / ticks_per_second() * 1e6 / sample.requests as f64;
        sample.cpu_us_per_request = Some(per_request(user + system));
        sample.user_us_per_request = Some(per_request(user));
        sample.peak_rss_kib = target.peak_rss_kib();
    }
    sample
}
