//! Hostile and broken clients, as raw bytes over TCP: nothing malformed or
//! ambiguous is forwarded, the proxy is never an open proxy, and slow or
//! greedy clients are cut off.

use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests that must be refused with `status` and never reach Coupa.
async fn assert_refused(cases: &[(&str, String, u16)]) {
    let (fake, proxy) = start_with_listen("max_header_bytes = 16384").await;
    for (name, request, status) in cases {
        let (got, head, _) = raw_request(proxy.addr, request).await;
        assert_eq!(got, *status, "{name}: {head}");
    }
    assert_eq!(
        fake.state().api_requests() + fake.state().rejected_api_requests(),
        0,
        "a refused request reached Coupa"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_refused_before_forwarding() {
    let big = "a".repeat(20 * 1024);
    assert_refused(&[
        (
            "header section too large",
            format!("GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
            431,
        ),
        (
            "header without colon",
            "GET /api/x HTTP/1.1\r\nHost x\r\n\r\n".into(),
            400,
        ),
        ("garbage request line", "GET\r\n\r\n".into(), 400),
        (
            "space in target",
            "GET /api/a b HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            400,
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_shapes_are_refused_before_forwarding() {
    assert_refused(&[
        (
            "content-length and transfer-encoding",
            "POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "transfer-encoding and content-length",
            "POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\n\r\n".into(),
            400,
        ),
        (
            "duplicate differing content-length",
            "POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".into(),
            400,
        ),
        (
            "obs-fold",
            "GET /api/x HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n".into(),
            400,
        ),
        (
            "bad chunk size",
            "POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "transfer-encoding not chunked",
            "POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc".into(),
            400,
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_never_an_open_proxy() {
    assert_refused(&[
        (
            "absolute-form for another host",
            "GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".into(),
            400,
        ),
        (
            "CONNECT",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n".into(),
            405,
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_for_the_instance_itself_is_served() {
    let (fake, proxy) = start_with_listen("").await;
    let request = format!(
        "GET http://{}/api/x?y=1 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        fake.addr(),
        fake.addr()
    );
    let (status, _, body) = raw_request(proxy.addr, &request).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["target"], "/api/x?y=1");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_slowly_is_cut_off() {
    let timeout = Duration::from_millis(300);
    let (fake, proxy) = start_with_listen("header_read_timeout = \"300ms\"").await;
    let metrics = proxy.admin_url("/metrics");
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let began = std::time::Instant::now();
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the head. The proxy must close the connection (hyper
    // may send a 408 first); without its timer this read would hang.
    let rest = cut_at_header_timeout(&mut stream, timeout, began, (&metrics, 1.0)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    // A client that connects and sends nothing at all is cut off too.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let began = std::time::Instant::now();
    let rest = cut_at_header_timeout(&mut silent, timeout, began, (&metrics, 2.0)).await;
    assert!(rest.is_empty());
    assert_eq!(fake.state().api_requests(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_a_clear_503() {
    // Idle connections hold their slots (a long header-read timeout).
    let (_fake, proxy) =
        start_with_listen("max_connections = 2\nheader_read_timeout = \"1h\"").await;
    // Two idle connections hold both slots.
    let _a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut refused = Vec::new();
    eventually("a refused connection", || {
        let addr = proxy.addr;
        async move {
            let Ok(mut third) = tokio::net::TcpStream::connect(addr).await else {
                return false;
            };
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 503")
                && String::from_utf8_lossy(&answer).contains("too_many_connections")
        }
    })
    .await;
    refused.push(());
    drop(_a);
    // A freed slot is usable again.
    eventually("a slot frees up", || {
        let url = proxy.url("/api/x");
        async move { matches!(http_client().get(url).send().await, Ok(r) if r.status() == 200) }
    })
    .await;
    proxy.stop().await;
}

/// Reads a response head (tolerating the reset a server may send after
/// answering a request whose body it did not read).
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 1024];
    let _ = tokio::time::timeout(DEADLINE, async {
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&raw).into_owned()
}

/// A client that stops sending a body larger than `replay_body_limit`
/// (which streams) is answered 408 after `listen.body_read_timeout`, and
/// the upstream request it started is aborted (its connection closed)
/// rather than held open. (A smaller body never reaches Coupa unfinished:
/// `slow_clients`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_gets_408_and_the_upstream_request_is_aborted() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "replay_body_limit = 4", "").replace(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"10s\"\nbody_read_timeout = \"300ms\"",
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/invoices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"partial\":",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // The upstream request had started (the first bytes went on) and was
    // aborted: its connection is closed, none is left busy.
    eventually("upstream connection closed", || async {
        let text = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
        metric(&text, "coupa_proxy_upstream_connections", &[]) == 0.0
    })
    .await;
    assert_eq!(
        fake.state().api_requests(),
        1,
        "the upstream request had started"
    );
    proxy.stop().await;
}

/// A header name with `_` is dropped (nginx's default), so a next hop that
/// maps `_` to `-` cannot read `Transfer_Encoding` as a second framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_with_underscores_are_dropped_and_counted() {
    let (_fake, proxy) = start_with_listen("").await;
    let (status, _, body) = raw_request(
        proxy.addr,
        "GET /api/invoices HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\
         X_Coupa_Api_Key: k\r\nX-Kept: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let headers = echoed_headers(&echo);
    assert!(headers.iter().all(|(n, _)| !n.contains('_')), "{headers:?}");
    assert_eq!(header(&headers, "x-kept"), ["1"]);
    let text = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    assert_eq!(
        metric(
            &text,
            "coupa_proxy_request_fields_dropped_total",
            &[("reason", "underscore")]
        ),
        2.0
    );
    proxy.stop().await;
}

/// A client that closes its connection in the middle of a request head
/// began no request, so it has no access line: it is counted instead, and
/// nothing reaches Coupa. A head cut inside the request line and one cut
/// between header lines both count; a client that closes an idle
/// keep-alive connection between requests does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_mid_head_is_counted() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;
    for partial in [
        "GET /api/invo",
        "GET /api/invoices HTTP/1.1\r\nHost: x\r\nAccept: a",
    ] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(partial.as_bytes()).await.unwrap();
        drop(stream);
    }
    // A whole request, then an idle close: not incomplete.
    let (status, _, _) = raw_request(
        proxy.addr,
        "GET /api/invoices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    eventually("two heads cut by their clients, counted", || async {
        metric(
            &scrape(&metrics_url).await,
            "coupa_proxy_client_incomplete_heads_total",
            &[],
        ) == 2.0
    })
    .await;
    assert_eq!(
        proxy.access_lines().len(),
        1,
        "only the whole request has a line"
    );
    assert_eq!(fake.state().api_requests(), 1);
}
