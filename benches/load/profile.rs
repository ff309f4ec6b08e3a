//! `BENCH_CALLGRIND=1`: user-space instructions per request under
//! valgrind's callgrind, a stable figure on a noisy machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::drive::load;
use crate::targets::{proxy_b, start_proxy_with, Upstream, Variant, PROXY};
use crate::{Protocol, Scenario};

/// Instructions the proxy executes per request, from callgrind: counting
/// starts after start-up and a warm-up, so only the request path counts.
/// With `BENCH_PROXY_B` the other build is measured the same way after it.
pub fn callgrind(upstream: &Upstream, work: &Path) {
    let callgrind = Variant {
        name: "proxy-callgrind",
        ..PROXY
    };
    let other = proxy_b().map(|variant| Variant {
        name: "proxy-b-callgrind",
        ..variant
    });
    for variant in std::iter::once(callgrind).chain(other) {
        measure(upstream, work, variant);
    }
}

fn measure(upstream: &Upstream, work: &Path, variant: Variant) {
    // Kept after the run, for callgrind_annotate.
    let keep = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/load-bench")
        .join(variant.name);
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep).unwrap();
    let out = keep.join("callgrind.out");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let proxy = start_proxy_with(
        upstream,
        work,
        variant,
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
        tls_upstream: upstream.ca_file.is_some(),
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
    let dumps: Vec<String> = std::fs::read_dir(&keep)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    let instructions: u64 = dumps
        .iter()
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
    let allocations: u64 = dumps
        .iter()
        .map(|text| allocation_calls(text))
        .max()
        .unwrap_or(0);
    let requests = sample.requests.max(1) as f64;
    println!(
        "callgrind {}: {} requests, {:.0} user-space instructions and {:.1} allocations per request ({} dumps in {})",
        variant.name,
        sample.requests,
        instructions as f64 / requests,
        allocations as f64 / requests,
        dumps.len(),
        keep.display()
    );
}

/// Calls to the allocator in a callgrind dump: every call edge into
/// `malloc`, `calloc` or `realloc` (glibc) or jemalloc's own entry points,
/// summed (callgrind names a function by `(id) name` once, then by `(id)`
/// alone).
fn allocation_calls(dump: &str) -> u64 {
    const ALLOCATORS: [&str; 7] = [
        "malloc",
        "calloc",
        "realloc",
        "_rjem_malloc",
        "_rjem_mallocx",
        "_rjem_calloc",
        "_rjem_rallocx",
    ];
    let mut names = std::collections::HashMap::new();
    let mut callee_allocates = false;
    let mut total = 0;
    for line in dump.lines() {
        if let Some(rest) = line
            .strip_prefix("cfn=")
            .or_else(|| line.strip_prefix("fn="))
        {
            let (id, name) = rest.split_once(' ').unwrap_or((rest, ""));
            if !name.is_empty() {
                names.insert(id.to_owned(), name.to_owned());
            }
            callee_allocates = line.starts_with("cfn=")
                && names
                    .get(id)
                    .is_some_and(|n| ALLOCATORS.contains(&n.as_str()));
        } else if let Some(calls) = line.strip_prefix("calls=") {
            if callee_allocates {
                total += calls
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            callee_allocates = false;
        }
    }
    total
}
