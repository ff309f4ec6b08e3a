//! `BENCH_IDLE=N` (default row: 2,000): memory per idle keep-alive client
//! connection. A fresh proxy and a fresh nginx each get N client
//! connections that send one request and then idle; the resident memory
//! of each target is read before, while the N connections are held, and
//! after they are closed (once settled, and again 15 s later). With
//! BENCH_PROXY_B the other build is measured too (`proxy-b`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::targets::{
    proxy_b, start_nginx, start_proxy, status_kib, Target, Upstream, Variant, PROXY,
};

/// How long after the spike the last RSS reading is taken.
const LATE: Duration = Duration::from_secs(15);

/// Resident memory of the target's processes (nginx: master + worker).
fn rss_kib(target: &Target) -> u64 {
    target
        .pids()
        .iter()
        .filter_map(|pid| status_kib(*pid, "VmRSS:"))
        .sum()
}

/// One request on a fresh connection, read to its end; the connection
/// stays open (keep-alive).
fn one_request(target: &Target) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", target.port)).expect("target accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = String::from("GET /api/x HTTP/1.1\r\nHost: bench\r\n");
    for (name, value) in &target.headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("answer");
        assert!(n > 0, "{} closed the connection", target.name);
        seen.extend_from_slice(&chunk[..n]);
        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{}: {head}", target.name);
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        if seen.len() >= end + 4 + length {
            return stream;
        }
    }
}

/// Waits until the target's RSS stops moving (or a few seconds passed).
fn settled_rss(target: &Target) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = rss_kib(target);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_kib(target);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

pub fn idle(upstream: u16, token: &str, work: &Path, connections: usize) {
    // N client sockets here, N (and as many upstream) in the targets.
    let _ = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={0}:{0}", connections * 3 + 1024),
        ])
        .status();
    let upstream = Upstream::plain(upstream);
    let proxy = start_proxy(
        &upstream,
        work,
        Variant {
            name: "proxy-idle",
            ..PROXY
        },
    );
    let nginx = start_nginx(&upstream, token, work);
    let proxy_b = proxy_b().map(|variant| start_proxy(&upstream, work, variant));
    println!("idle keep-alive client connections: {connections}, one request each, then idle");
    for target in [Some(&proxy), proxy_b.as_ref(), Some(&nginx)]
        .into_iter()
        .flatten()
    {
        // Warm: the upstream pool and the first allocations are made.
        drop((0..50).map(|_| one_request(target)).collect::<Vec<_>>());
        let start = settled_rss(target);
        let held: Vec<TcpStream> = (0..connections).map(|_| one_request(target)).collect();
        let holding = settled_rss(target);
        drop(held);
        let after = settled_rss(target);
        // An allocator that gives memory back may do it over seconds
        // (jemalloc's decay is 10 s by default), not at once.
        std::thread::sleep(LATE);
        let late = rss_kib(target);
        println!(
            "{:>7}: RSS {:.1} MiB at start, {:.1} MiB holding them ({:.1} KiB per connection), {:.1} MiB after they closed, {:.1} MiB {} s later",
            target.name,
            start as f64 / 1024.0,
            holding as f64 / 1024.0,
            holding.saturating_sub(start) as f64 / connections as f64,
            after as f64 / 1024.0,
            late as f64 / 1024.0,
            LATE.as_secs(),
        );
    }
}
