//! The upstream hop: connections are reused once a response has been read
//! to its end, never while one is half-read, and closed after
//! `coupa.pool_idle_timeout`; the request line carries `base_url`'s path.
//! Checked against an upstream that counts the connections it accepts and
//! the ones that have closed, and answers with the target it got.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use coupa_auth_proxy::fake_coupa::FakeCoupa;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct Counts {
    opened: AtomicU64,
    closed: AtomicU64,
}

impl Counts {
    fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
    fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A body that sends one chunk and then nothing, ever.
struct Stalling {
    sent: bool,
}

impl http_body::Body for Stalling {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first part")))))
    }
}

type AnswerBody = Either<Full<Bytes>, Stalling>;

/// `/stall` sends part of a body and stalls, `/empty` answers 204,
/// anything else the request target it got.
async fn answer(request: Request<Incoming>) -> Result<Response<AnswerBody>, Infallible> {
    let full = |bytes: Bytes| Either::Left(Full::new(bytes));
    let mut response = match request.uri().path() {
        "/stall" => Response::new(Either::Right(Stalling { sent: false })),
        "/empty" => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        _ => Response::new(full(Bytes::from(request.uri().to_string()))),
    };
    response
        .headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    Ok(response)
}

async fn counting_upstream() -> (std::net::SocketAddr, Arc<Counts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.opened.fetch_add(1, Ordering::SeqCst);
            let counts = shared.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// The proxy in front of `base_url`, with the fake Coupa that issues its
/// tokens (keep it alive for the test).
async fn proxy_in_front_of(base_url: &str, coupa_extra: &str) -> (FakeCoupa, TestProxy) {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(
        base_url,
        coupa_extra,
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    (fake, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_responses_give_their_connection_back() {
    let (upstream, counts) = counting_upstream().await;
    let (_fake, proxy) = proxy_in_front_of(&format!("http://{upstream}"), "").await;
    let client = http_client();

    for path in ["/api/invoices", "/empty", "/api/users", "/empty"]
        .iter()
        .cycle()
        .take(20)
    {
        let response = client.get(proxy.url(path)).send().await.unwrap();
        assert!(response.status().is_success(), "{path}");
        response.bytes().await.unwrap();
    }
    assert_eq!(
        counts.opened(),
        1,
        "twenty sequential requests share one upstream connection"
    );

    // Eight at a time, five times over: never more connections than
    // requests in flight.
    for _ in 0..5 {
        let batch: Vec<_> = (0..8)
            .map(|_| {
                let request = client.get(proxy.url("/api/invoices")).send();
                async move { request.await.unwrap().bytes().await.unwrap() }
            })
            .collect();
        futures_util::future::join_all(batch).await;
    }
    assert!(
        counts.opened() <= 8,
        "{} connections for 8 concurrent requests",
        counts.opened()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_read_response_does_not_return_its_connection() {
    let (upstream, counts) = counting_upstream().await;
    let (_fake, proxy) = proxy_in_front_of(&format!("http://{upstream}"), "").await;
    let client = http_client();

    let mut stalled = client.get(proxy.url("/stall")).send().await.unwrap();
    assert_eq!(stalled.status(), 200);
    let first = stalled.chunk().await.unwrap().expect("some of the body");
    assert_eq!(&first[..], b"first part");
    assert_eq!(counts.closed(), 0);
    // The client gives up half-way; the proxy must not pool a connection
    // that is still in the middle of a response.
    drop(stalled);
    drop(client);
    eventually("the abandoned upstream connection closes", || async {
        counts.closed() == 1
    })
    .await;

    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "/api/invoices");
    assert_eq!(
        counts.opened(),
        2,
        "the next request needs a new connection"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_the_pool_idle_timeout() {
    let (upstream, counts) = counting_upstream().await;
    let (_fake, proxy) = proxy_in_front_of(
        &format!("http://{upstream}"),
        "pool_idle_timeout = \"300ms\"",
    )
    .await;

    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    assert_eq!(counts.opened(), 1);
    eventually("the idle connection is closed", || async {
        counts.closed() == 1
    })
    .await;

    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(counts.opened(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_connection_is_open_before_the_first_call() {
    let (upstream, counts) = counting_upstream().await;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(
        &format!("http://{upstream}"),
        "keep_warm = true",
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = ProxyProcess::start(&text, &["--log-level", "info,coupa_auth_proxy=debug"], &[]);
    proxy.wait_ready().await;
    // Opened while the token was fetched: no request has been made.
    eventually("a warm connection is in the pool", || async {
        proxy.logs().contains("a warm connection to Coupa is open")
    })
    .await;
    assert_eq!(counts.opened(), 1);
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    assert_eq!(
        counts.opened(),
        1,
        "the first call took the warm connection"
    );
}

/// Ready means warm: `/readyz` (and `READY=1`, and so an upgrade's
/// hand-over) waits for the warm connection, not only for the token, so
/// the first calls after a start skip the handshakes. The instance is a
/// TLS nginx behind a relay that adds 300 ms each way (the TLS handshake
/// takes seconds); the token endpoint is not behind it, so the token alone
/// is held long before the warm connection is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_warm_connection() {
    let Some(nginx) = crate::support::real::Nginx::start(Default::default()) else {
        return;
    };
    let nginx_addr = format!("127.0.0.1:{}", nginx.port).parse().unwrap();
    let relay = coupa_auth_proxy::fake_coupa::relay::DelayRelay::start(
        nginx_addr,
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(
        &format!("https://127.0.0.1:{}", relay.port()),
        &format!(
            "keep_warm = true\nca_file = \"{}\"",
            nginx.ca_file.display()
        ),
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    assert_eq!(
        metric(&metrics, "coupa_proxy_upstream_connections", &[]),
        1.0,
        "the warm connection is open once the proxy says ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_connection_is_opened_again_after_an_idle_close() {
    let (upstream, counts) = counting_upstream().await;
    let (_fake, proxy) = proxy_in_front_of(
        &format!("http://{upstream}"),
        "keep_warm = true\npool_idle_timeout = \"300ms\"",
    )
    .await;
    eventually(
        "the idle warm connection closed and another opened",
        || async { counts.closed() >= 1 && counts.opened() >= 2 },
    )
    .await;
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_warm_nothing_is_opened_before_a_call() {
    let (upstream, counts) = counting_upstream().await;
    let (_fake, proxy) =
        proxy_in_front_of(&format!("http://{upstream}"), "keep_warm = false").await;
    assert_eq!(counts.opened(), 0);
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(counts.opened(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_url_path_is_prepended_in_origin_form() {
    let (upstream, _counts) = counting_upstream().await;
    let (_fake, proxy) = proxy_in_front_of(&format!("http://{upstream}/coupa"), "").await;

    let response = get(proxy.url("/api/invoices?filter=a%20b&x=1")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "/coupa/api/invoices?filter=a%20b&x=1",
        "the request line holds the prefixed path and query, byte for byte"
    );
    proxy.stop().await;
}

/// An HTTP/2 (h2c) upstream allowing `max_streams` streams per connection,
/// answering after 200 ms; counts connections and the most streams any one
/// of them had open at once.
async fn h2_upstream(max_streams: u32) -> (std::net::SocketAddr, Arc<Counts>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let peak = Arc::new(AtomicU64::new(0));
    let (shared, peak_seen) = (counts.clone(), peak.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.opened.fetch_add(1, Ordering::SeqCst);
            let open = Arc::new(AtomicU64::new(0));
            let peak = peak_seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let (open, peak) = (open.clone(), peak.clone());
                    async move {
                        let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        open.fetch_sub(1, Ordering::SeqCst);
                        let body =
                            Bytes::from(format!("{:?} {}", request.version(), request.uri()));
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    (addr, counts, peak)
}

/// `http_version = "http2"` over plain loopback HTTP speaks h2c by prior
/// knowledge; a connection carries requests up to the server's stream
/// limit, and another opens only when that is used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_opens_another_connection_only_at_the_stream_limit() {
    let (upstream, counts, peak) = h2_upstream(4).await;
    let (_fake, proxy) =
        proxy_in_front_of(&format!("http://{upstream}"), "http_version = \"http2\"").await;
    let client = http_client();
    // One request first: the connection learns the server's limit.
    let first = client.get(proxy.url("/api/first")).send().await.unwrap();
    assert_eq!(
        first.text().await.unwrap(),
        "HTTP/2.0 http://".to_owned() + &upstream.to_string() + "/api/first"
    );
    assert_eq!(counts.opened(), 1);

    let burst: Vec<_> = (0..20)
        .map(|i| {
            let request = client.get(proxy.url(&format!("/api/{i}"))).send();
            async move { request.await.unwrap().status() }
        })
        .collect();
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200);
    }
    let opened = counts.opened();
    assert!(
        (2..=5).contains(&opened),
        "20 concurrent requests at 4 streams per connection opened {opened}"
    );
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "the server's limit was exceeded"
    );
    proxy.stop().await;
}

/// An upstream that answers the first request of each connection, then
/// reads the next one and closes without answering (no `Connection: close`
/// before): a server whose keep-alive ended as the request arrived, which
/// provably did not process it. Counts the requests it answered.
async fn closing_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Reads one request (head and a body of the stated length).
    async fn read_request(stream: &mut tokio::net::TcpStream) -> bool {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(n) = stream.read(&mut chunk).await else {
                return false;
            };
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&chunk[..n]);
            let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if seen.len() >= end + 4 + length {
                return true;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                if !read_request(&mut stream).await {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // The next request arrives; the connection ends unanswered.
                let _ = read_request(&mut stream).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, served)
}

/// A reused connection found closed before any byte of the answer means
/// the server never processed the request: it is sent again on a new
/// connection for every method, POST included, and the server sees each
/// request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_on_keep_alive_connections_the_server_closed_are_sent_again() {
    let (upstream, served) = closing_upstream().await;
    let (_fake, proxy) = proxy_in_front_of(&format!("http://{upstream}"), "").await;
    let client = http_client();
    for i in 0..30 {
        let response = client
            .post(proxy.url("/api/invoices"))
            .body(format!("{{\"n\":{i}}}"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body, "ok");
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        30,
        "each request processed once"
    );
    proxy.stop().await;
}
