//! SIGTERM and SIGINT: the listener closes at once, an in-flight request
//! finishes with its real answer (saying `Connection: close`), a request
//! longer than the grace period is cut when it runs out, and the process
//! exits 0.

use std::time::Duration;

use crate::support::*;

/// `signal` (TERM or INT) while a slow request is at Coupa: the listener
/// closes, the request finishes with its real answer saying
/// `Connection: close`, and the process exits 0.
async fn a_signal_lets_an_in_flight_slow_request_finish(signal: &str) {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let mut proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;

    let client = http_client();
    let slow = tokio::spawn({
        let url = proxy.url("/api/_slow?ms=1500");
        async move { client.get(url).send().await }
    });
    eventually("the slow request reaches Coupa", || {
        let n = fake.state().api_requests();
        async move { n >= 1 }
    })
    .await;
    proxy.signal(signal);

    let addr = proxy.addr;
    eventually("the listener closes", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;

    let response = slow.await.unwrap().expect("in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["connection"],
        "close",
        "an answer during the drain closes its connection"
    );
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["target"], "/api/_slow?ms=1500");
    assert_eq!(proxy.wait_exit().await, Some(0));
    let logs = proxy.logs();
    assert!(logs.contains("shutdown signal received"), "{logs}");
    assert!(logs.contains("all in-flight requests finished"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_slow_request_finish() {
    a_signal_lets_an_in_flight_slow_request_finish("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_lets_an_in_flight_slow_request_finish() {
    a_signal_lets_an_in_flight_slow_request_finish("-INT").await;
}

/// A request slower than `listen.shutdown_grace`: the grace period runs
/// out, its connection is closed, the log says so, and the process exits
/// 0 without waiting for Coupa.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_running_out_closes_what_is_left() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "")
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"1s\"");
    let mut proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let client = http_client();
    let slow = tokio::spawn({
        let url = proxy.url("/api/_slow?ms=30000");
        async move { client.get(url).send().await }
    });
    eventually("the slow request reaches Coupa", || {
        let n = fake.state().api_requests();
        async move { n >= 1 }
    })
    .await;
    let signalled = std::time::Instant::now();
    proxy.terminate();
    assert_eq!(proxy.wait_exit().await, Some(0));
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "exited {took:?} after SIGTERM: the 30 s request was not waited for"
    );
    let cut = slow.await.unwrap();
    assert!(
        cut.is_err(),
        "the unfinished request's connection was closed: {cut:?}"
    );
    let logs = proxy.logs();
    assert!(
        logs.contains("grace period ran out; closing the remaining connections"),
        "{logs}"
    );
    // Its access line says the process cut it, not that its client left.
    let line = proxy
        .access_lines()
        .pop()
        .unwrap_or_else(|| panic!("the cut request's access line: {logs}"));
    assert_eq!(line["reason"], "cut_at_shutdown", "{line}");
    assert_eq!(line["status"], 503, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_drain_reports_complete() {
    let (_fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    let response = get(proxy.url("/api/x")).await;
    assert_eq!(response.status(), 200);
    drop(response);
    assert_eq!(
        proxy.stop().await,
        coupa_auth_proxy::server::Drain::Complete
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_in_flight_request() {
    const IN_FLIGHT: usize = 200;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let mut proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;

    let client = http_client();
    let mut requests = Vec::new();
    for i in 0..IN_FLIGHT {
        let request = client
            .post(proxy.url(&format!("/api/_slow?ms=1500&n={i}")))
            .body(format!("request {i}"));
        requests.push(tokio::spawn(async move {
            let response = request.send().await?;
            let status = response.status();
            let echo: serde_json::Value = response.json().await?;
            Ok::<_, reqwest::Error>((status, echo))
        }));
    }
    eventually("every request reaches Coupa", || {
        let n = fake.state().api_requests();
        async move { n >= IN_FLIGHT as u64 }
    })
    .await;
    proxy.terminate();
    let addr = proxy.addr;
    eventually("the listener closes", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;

    for (i, request) in requests.into_iter().enumerate() {
        let (status, echo) = request
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i} was lost: {e}"));
        assert_eq!(status, 200, "request {i}");
        assert_eq!(echo["target"], format!("/api/_slow?ms=1500&n={i}"));
        assert_eq!(echo["body_bytes"], format!("request {i}").len());
    }
    assert_eq!(proxy.wait_exit().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_while_draining() {
    let (fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    let slow = tokio::spawn(get(proxy.url("/api/_slow?ms=1500")));
    eventually("the slow request reaches Coupa", || {
        let n = fake.state().api_requests();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(get(proxy.admin_url("/readyz")).await.status(), 200);
    proxy.shutdown.cancel();
    let ready = get(proxy.admin_url("/readyz")).await;
    assert_eq!(ready.status(), 503, "a draining proxy is not ready");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["draining"], true);
    assert_eq!(slow.await.unwrap().status(), 200);
    proxy.task.await.unwrap();
}

/// A process whose stderr reader has gone (its supervisor's log pipe
/// closed, a `| tee` killed) still stops on SIGTERM: a log line that cannot
/// be written is lost, it does not take the signal handling down with it.
/// (It used to stay up: the logger's own error report panicked the task
/// that starts the drain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_process_whose_stderr_reader_has_gone() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("dead-stderr");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config_text(&fake.base_url(), "", "")).unwrap();
    let mut child = Command::new(binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.contains("coupa-auth-proxy started"));
    assert!(started);
    drop(lines);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Killed if it never exits, so a failure leaves no process behind.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(child);
    eventually("the process exits after SIGTERM", || {
        let exited = child.0.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
}

/// A request that arrives on an idle keep-alive connection just after
/// SIGTERM (a client between calls) is answered, saying
/// `Connection: close`, rather than finding its connection closed: idle
/// connections linger for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_an_idle_connection_just_after_sigterm_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let mut proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = b"GET /api/invoices HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut answer = vec![0u8; 64 * 1024];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));

    proxy.terminate();
    let readyz = format!("http://{}/readyz", proxy.admin);
    let client = http_client();
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Ok(r) = client.get(&readyz).send().await {
                if r.status() == 503 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the process takes the signal");
    stream.write_all(request).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("answered, then closed")
        .unwrap();
    let text = String::from_utf8_lossy(&rest).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert_eq!(proxy.wait_exit().await, Some(0));
    assert_eq!(fake.state().api_requests(), 2);
}
