//! `BENCH_CALLGRIND=1`: user-space instructions per request under
//! valgrind's callgrind, a stable figure on a noisy machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::drive::load;
use crate::targets::{start_proxy_with, Variant, PROXY};
use crate::{Protocol, Scenario};

/// Instructions the proxy executes per request, from callgrind: counting
/// starts after start-up and a warm-up, so only the request path counts.
pub fn callgrind(upstream: u16, work: &Path) {
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
