//! Idle keep-alive connections give hyper's buffers back (park) when many
//! connections are open, and lose nothing by it: the next request on a
//! parked connection is served, pipelined and body-carrying requests too,
//! the smuggling guard keeps its place, and parked connections close on
//! shutdown and after the keep-alive timeout. Raw bytes over TCP, so what
//! the client sees is exactly what the proxy wrote.

use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn parked(proxy: &TestProxy) -> f64 {
    let text = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    metric(&text, "coupa_proxy_client_connections_parked", &[])
}

async fn wait_parked(proxy: &TestProxy, count: f64) {
    eventually(&format!("{count} connections parked"), || async move {
        parked(proxy).await == count
    })
    .await;
}

const GET: &str = "GET /api/invoices HTTP/1.1\r\nHost: proxy\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_serves_its_next_requests_and_loses_no_byte() {
    let (fake, proxy) = start_with_listen("release_idle_buffers_above = 0").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let mut pending = Vec::new();
        stream.write_all(GET.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
        clients.push((stream, pending));
    }
    wait_parked(&proxy, 3.0).await;

    for (stream, pending) in &mut clients {
        // One request, then two pipelined in one write, the second with a body.
        stream.write_all(GET.as_bytes()).await.unwrap();
        assert_eq!(read_response(stream, pending).await.0, 200);
        let body = "x".repeat(3000);
        let pipelined = format!(
            "{GET}POST /api/invoices HTTP/1.1\r\nHost: proxy\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(pipelined.as_bytes()).await.unwrap();
        assert_eq!(read_response(stream, pending).await.0, 200);
        let (status, echo, _) = read_response(stream, pending).await;
        assert_eq!(status, 200);
        let echo: serde_json::Value = serde_json::from_slice(&echo).unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["body_bytes"], 3000, "the body arrived whole");
    }
    wait_parked(&proxy, 3.0).await;
    assert_eq!(fake.state().api_requests(), 3 + 3 * 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_connections_above_the_threshold_park() {
    let (_fake, proxy) = start_with_listen("release_idle_buffers_above = 1").await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let mut first_pending = Vec::new();
    first.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut first, &mut first_pending).await.0, 200);
    // Alone, the first connection went idle holding its session. (The
    // metrics are scraped on the admin listener, which does not count.)
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    let mut second_pending = Vec::new();
    second.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut second, &mut second_pending).await.0, 200);
    // Two open: one parked, and it is the second: once the second closes
    // no connection is parked (a parked first would stay so).
    wait_parked(&proxy, 1.0).await;
    let text = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    assert_eq!(metric(&text, "coupa_proxy_client_connections", &[]), 2.0);
    drop(second);
    wait_parked(&proxy, 0.0).await;
    first.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut first, &mut first_pending).await.0, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smuggling_guard_keeps_its_place_across_parks() {
    let (fake, proxy) = start_with_listen("release_idle_buffers_above = 0").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..2 {
        stream.write_all(GET.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
        wait_parked(&proxy, 1.0).await;
    }
    let before = fake.state().api_requests();
    stream
        .write_all(
            b"POST /api/invoices HTTP/1.1\r\nHost: proxy\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 400);
    assert_eq!(fake.state().api_requests(), before, "nothing forwarded");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_close_after_the_keep_alive_timeout_and_on_shutdown() {
    let (_fake, proxy) =
        start_with_listen("release_idle_buffers_above = 0\nkeepalive_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    wait_parked(&proxy, 1.0).await;
    // Silent past the keep-alive timeout: closed, as hyper closes an idle
    // keep-alive connection.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest))
        .await
        .expect("closed within the deadline")
        .unwrap();
    assert!(rest.is_empty(), "no stray bytes: {rest:?}");
    wait_parked(&proxy, 0.0).await;

    // A parked connection does not hold up shutdown.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    wait_parked(&proxy, 1.0).await;
    let stopped = tokio::time::timeout(Duration::from_secs(5), proxy.stop())
        .await
        .expect("shutdown does not wait for parked connections");
    assert_eq!(stopped, coupa_auth_proxy::server::Drain::Complete);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the parked connection was closed")
        .unwrap();
    assert!(rest.is_empty());
}

/// curl, a client nobody here wrote, keeps its connection across parks:
/// three requests 200 ms apart (each gap long enough for the connection to
/// park) on one connection, every one answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keeps_its_connection_across_parks() {
    let Some(curl) = crate::support::real::tool("curl") else {
        return;
    };
    let (fake, proxy) = start_with_listen("release_idle_buffers_above = 0").await;
    let url = proxy.url("/api/invoices");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(curl)
            .args(["-sS", "--http1.1", "--rate", "5/s"])
            .args(["-w", "%{num_connects} %{http_code}\\n"])
            // `-o` pairs with one URL each.
            .args(["-o", "/dev/null", &url, "-o", "/dev/null", &url])
            .args(["-o", "/dev/null", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["1 200", "0 200", "0 200"],
        "one connection, three answers"
    );
    assert_eq!(fake.state().api_requests(), 3);
    proxy.stop().await;
}

/// Below the threshold an idle keep-alive connection keeps its session; on
/// shutdown it closes at once, on the proxy's listener and on the admin
/// listener (whose answers are not counted, so it never parks), instead
/// of holding the drain until its keep-alive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_at_once_on_shutdown() {
    let (_fake, proxy) = start_with_listen("").await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let mut admin = TcpStream::connect(proxy.admin).await.unwrap();
    let mut pending = Vec::new();
    client.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client, &mut pending).await.0, 200);
    admin
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut admin, &mut pending).await.0, 200);
    assert_eq!(parked(&proxy).await, 0.0, "below the threshold");
    // The header-read timeout (the keep-alive timeout) is 10 s: closing
    // within 5 s is the shutdown's doing.
    let stopped = tokio::time::timeout(Duration::from_secs(5), proxy.stop())
        .await
        .expect("shutdown does not wait for idle connections");
    assert_eq!(stopped, coupa_auth_proxy::server::Drain::Complete);
    for stream in [&mut client, &mut admin] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("closed by the shutdown")
            .unwrap();
        assert!(rest.is_empty());
    }
}

/// Garbage after a park is refused as it would be on a fresh connection,
/// and a client that half-sends a head to a parked connection is still
/// cut off by the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_stalled_heads_after_a_park_are_refused() {
    let (fake, proxy) =
        start_with_listen("release_idle_buffers_above = 0\nheader_read_timeout = \"1s\"").await;
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    let mut garbage = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();
    for stream in [&mut stalled, &mut garbage] {
        stream.write_all(GET.as_bytes()).await.unwrap();
        assert_eq!(read_response(stream, &mut pending).await.0, 200);
    }
    wait_parked(&proxy, 2.0).await;

    garbage
        .write_all(b"\x16\x03\x01 not http\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut garbage, &mut pending).await.0, 400);

    let began = std::time::Instant::now();
    stalled
        .write_all(b"GET /api/invoices HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let metrics = proxy.admin_url("/metrics");
    cut_at_header_timeout(&mut stalled, Duration::from_secs(1), began, (&metrics, 1.0)).await;
    assert_eq!(fake.state().api_requests(), 2, "neither reached Coupa");
    proxy.stop().await;
}
