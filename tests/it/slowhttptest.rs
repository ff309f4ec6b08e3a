//! The slow-client attacks of a real tool, `slowhttptest` (Debian's), at
//! the built binary with 200 connections each: slow body (`-B`, with a
//! valid legacy key on a path the fake reads), slowloris (`-H`) and slow
//! read (`-X`, a 2 MiB answer). Meanwhile another integration calls every
//! 200 ms and every call is answered 200 within a second; Coupa never sees
//! more connections than the cap; afterwards the proxy's figures are back
//! at idle.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coupa_auth_proxy::proxy::auth::hash_key;

use crate::support::real::tool;
use crate::support::*;

/// How long each attack runs.
const ATTACK_SECONDS: u64 = 12;

/// What the attacked proxy measured while the attack ran.
struct Observed {
    probes: usize,
    slowest_probe: Duration,
    most_client_connections: f64,
    most_coupa_connections: i64,
}

async fn scrape(proxy: &ProxyProcess) -> String {
    get(format!("http://{}/metrics", proxy.admin))
        .await
        .text()
        .await
        .unwrap()
}

/// Runs `slowhttptest` with `mode` against `target` on a proxy whose
/// `[listen]` gets `listen_extra`, probing as another integration.
async fn under_attack(
    mode: &[&str],
    target: &str,
    listen_extra: &str,
) -> Option<(Observed, String)> {
    let slowhttptest = tool("slowhttptest")?;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = format!(
        "{}\n[[integration]]\nname = \"attacker\"\napi_key_sha256 = \"{}\"\n\n\
         [[integration]]\nname = \"probe\"\napi_key_sha256 = \"{}\"\n",
        config_text(&fake.base_url(), "", "").replace(
            "shutdown_grace = \"10s\"",
            &format!("shutdown_grace = \"10s\"\n{listen_extra}"),
        ),
        hash_key("attacker-key"),
        hash_key("probe-key"),
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let mut attack = Command::new(slowhttptest)
        .args(mode)
        .args(["-c", "200", "-r", "200", "-i", "2", "-p", "3"])
        .args(["-l", &ATTACK_SECONDS.to_string()])
        .args(["-u", &proxy.url(target)])
        // The tool sets no other header; its Cookie line carries the key.
        .args(["-j", "a=1\r\nX-COUPA-API-KEY: attacker-key"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("slowhttptest starts");

    let probe = http_client();
    let started = Instant::now();
    let mut observed = Observed {
        probes: 0,
        slowest_probe: Duration::ZERO,
        most_client_connections: 0.0,
        most_coupa_connections: 0,
    };
    while attack.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(ATTACK_SECONDS + 30),
            "slowhttptest did not end"
        );
        let sent = Instant::now();
        let answer = probe
            .get(proxy.url("/api/invoices"))
            .header("X-COUPA-API-KEY", "probe-key")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let took = sent.elapsed();
        let status = answer.map(|a| a.status().as_u16());
        assert!(
            matches!(status, Ok(200)),
            "probe {} at {:?} into the attack: {status:?}",
            observed.probes,
            started.elapsed()
        );
        observed.probes += 1;
        observed.slowest_probe = observed.slowest_probe.max(took);
        let metrics = scrape(&proxy).await;
        observed.most_client_connections = observed.most_client_connections.max(metric(
            &metrics,
            "coupa_proxy_client_connections",
            &[],
        ));
        observed.most_coupa_connections =
            observed.most_coupa_connections.max(fake.open_connections());
        tokio::time::sleep_until((sent + Duration::from_millis(200)).into()).await;
    }
    drop(probe);
    // Back to idle: no client connection, nothing in flight or held.
    eventually("the proxy's figures are back at idle", || async {
        let metrics = scrape(&proxy).await;
        metric(&metrics, "coupa_proxy_client_connections", &[]) == 0.0
            && metric(&metrics, "coupa_proxy_in_flight_requests", &[]) == 0.0
            && metric(&metrics, "coupa_proxy_response_buffered_bytes", &[]) == 0.0
            && metric(&metrics, "coupa_proxy_response_spool_files", &[]) == 0.0
    })
    .await;
    let metrics = scrape(&proxy).await;
    Some((observed, metrics))
}

fn assert_served_everyone(observed: &Observed) {
    assert!(
        observed.most_client_connections >= 100.0,
        "the attack held connections (at most {} seen)",
        observed.most_client_connections
    );
    // The tool stops early once the proxy has closed all its connections.
    assert!(
        observed.probes >= 10,
        "probes kept going: {}",
        observed.probes
    );
    assert!(
        observed.slowest_probe < Duration::from_secs(1),
        "every probe answered within a second; slowest {:?}",
        observed.slowest_probe
    );
    // coupa.max_connections (32) and the token client's one.
    assert!(
        observed.most_coupa_connections <= 33,
        "Coupa saw {} connections",
        observed.most_coupa_connections
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_with_a_valid_key_hold_no_connection_to_coupa() {
    let Some((observed, metrics)) = under_attack(
        &["-B", "-s", "4096", "-x", "16"],
        "/api/invoices",
        "min_rate_grace = \"3s\"",
    )
    .await
    else {
        return;
    };
    assert_served_everyone(&observed);
    assert!(
        metric(
            &metrics,
            "coupa_proxy_client_body_timeouts_total",
            &[("reason", "rate")]
        ) >= 100.0,
        "the trickles were cut off below listen.min_body_rate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_off_and_hold_nothing() {
    let Some((observed, _)) = under_attack(
        &["-H", "-x", "16"],
        "/api/invoices",
        "header_read_timeout = \"3s\"",
    )
    .await
    else {
        return;
    };
    assert_served_everyone(&observed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_a_large_answer_hold_no_connection_to_coupa() {
    let Some((observed, metrics)) = under_attack(
        &["-X", "-w", "512", "-y", "1024", "-n", "2", "-z", "32"],
        "/api/_download?bytes=2097152",
        "min_rate_grace = \"3s\"",
    )
    .await
    else {
        return;
    };
    assert_served_everyone(&observed);
    assert!(
        metric(&metrics, "coupa_proxy_client_response_timeouts_total", &[]) >= 100.0,
        "the slow readers were cut off below listen.min_response_rate"
    );
}
