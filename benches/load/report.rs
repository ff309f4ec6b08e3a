//! The report: a Markdown table for the README and a JSON summary with
//! ratios to direct (throughput, p99) and to nginx (CPU).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::drive::Sample;
use crate::stats::{stat, Stat};
use crate::targets::Target;
use crate::{Scenario, LOAD_CORE, PROXY_CORE};

/// Cores of the machine (this process is pinned to one of them).
pub fn cores() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

pub fn report(
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
        "| scenario | target | req/s | p50 µs | p99 µs | p99.9 µs | errors | CPU µs/req | user µs | kernel µs | peak RSS MiB | req/s ÷ direct | p99 ÷ direct | CPU ÷ nginx |"
    );
    let _ = writeln!(
        table,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
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
            let user = stat(samples, |x| x.user_us_per_request);
            let kernel = stat(samples, |x| {
                Some(x.cpu_us_per_request? - x.user_us_per_request?)
            });
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
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                scenario.name,
                name,
                range(rps, 0),
                p50.median,
                p99.median,
                p999.median,
                errors,
                cpu.map(|c| range(c, 1)).unwrap_or_else(|| "—".into()),
                opt(user.map(|u| u.median), 1),
                opt(kernel.map(|k| k.median), 1),
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
                "user_us_per_request": user.map(|u| u.median),
                "kernel_us_per_request": kernel.map(|k| k.median),
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
