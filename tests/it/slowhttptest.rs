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
    /// The slowest probe's time in the proxy itself, Coupa's excluded.
    slowest_in_proxy: Duration,
    most_client_connections: f64,
    most_coupa_connections: i64,
}

/// The fake on a runtime of its own, so the megabytes it sends the slow
/// readers do not queue in front of the probes on the test's runtime.
fn fake_on_its_own_thread() -> coupa_auth_proxy::fake_coupa::FakeCoupa {
    let (started, fake) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let fake = start_fake(Duration::from_secs(86_399)).await;
            let stopped = fake.stopped();
            started.send(fake).unwrap();
            stopped.cancelled().await;
        });
    });
    fake.recv().unwrap()
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
    let fake = fake_on_its_own_thread();
    let text = format!(
        "{}\n[[integration]]\nname = \"attacker\"\napi_key_sha256 = \"{}\"\nmax_concurrent = 4\n\n\
         [[integration]]\nname = \"probe\"\napi_key_sha256 = \"{}\"\n",
        config_text(&fake.base_url(), "", "").replace(
            "shutdown_grace = \"10s\"",
            &format!("shutdown_grace = \"10s\"\n{listen_extra}"),
        ),
        hash_key("attacker-key"),
        hash_key("probe-key"),
    );
    // The attacker's calls at Coupa at once are capped low: the fake Coupa
    // runs on this 2-core machine, and 16 answers of 2 MiB at once would
    // make *its* answer to the probe slow, which is not the proxy's doing.
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let mut attack = Command::new(slowhttptest)
        .args(mode)
        .args(["-c", "200", "-i", "2", "-p", "3"])
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
        slowest_in_proxy: Duration::ZERO,
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
    // The proxy's own share of each probe (its access line's total minus
    // the time Coupa took) stays small whatever the attack.
    let own = proxy
        .logs()
        .lines()
        .filter(|l| l.contains("\"integration\":\"probe\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some(v["duration_ms"].as_f64()? - v["upstream_ms"].as_f64()?))
        .fold(0.0, f64::max);
    observed.slowest_in_proxy = Duration::from_secs_f64(own / 1000.0);
    eprintln!(
        "slowhttptest {mode:?}: {} probes, slowest {:?} ({:?} in the proxy), at most {} client and {} Coupa connections",
        observed.probes,
        observed.slowest_probe,
        observed.slowest_in_proxy,
        observed.most_client_connections,
        observed.most_coupa_connections
    );
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
    assert!(
        observed.slowest_in_proxy < Duration::from_millis(250),
        "the proxy's own time per probe stays small; slowest {:?}",
        observed.slowest_in_proxy
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
        &["-B", "-r", "200", "-s", "4096", "-x", "16"],
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
    let Some((observed, metrics)) = under_attack(
        &["-H", "-r", "200", "-x", "16"],
        "/api/invoices",
        "header_read_timeout = \"3s\"",
    )
    .await
    else {
        return;
    };
    assert_served_everyone(&observed);
    // The proxy cut the heads, rather than the tool closing its sockets.
    assert!(
        metric(&metrics, "coupa_proxy_client_head_timeouts_total", &[]) >= 100.0,
        "the unfinished heads were cut off at listen.header_read_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_a_large_answer_hold_no_connection_to_coupa() {
    let Some((observed, metrics)) = under_attack(
        // The tool's own connection rate (50/s): 200 readers of 2 MiB at
        // once would measure the build's copying speed on a 2-core machine
        // rather than whether the others are served.
        &[
            "-X", "-r", "50", "-w", "512", "-y", "1024", "-n", "2", "-z", "32",
        ],
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
