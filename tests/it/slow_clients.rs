//! No client takes the service away from the others: idle keep-alive
//! connections live as long as legacy clients expect, slow heads and
//! bodies are cut off, and malformed requests are refused before anything
//! reaches Coupa.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn post(body: &str) -> String {
    format!(
        "POST /api/invoices HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A keep-alive connection idle longer than the header-read timeout still
/// takes a `POST` (a failed `POST` is not retried by clients), every answer
/// says how long the connection may idle, and after that it is closed.
async fn keep_alive_outlives_the_header_timeout(listen_extra: &str) {
    let (fake, proxy) = start_with_listen(&format!(
        "header_read_timeout = \"1s\"\nkeepalive_timeout = \"4s\"\n{listen_extra}"
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(post("{}").as_bytes()).await.unwrap();
    let (status, _, head) = read_response(&mut stream, &mut pending).await;
    assert_eq!(status, 200);
    assert!(head.contains("\r\nkeep-alive: timeout=4"), "{head}");

    // Idle past header_read_timeout (the condition under test is the
    // passing of time itself).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stream
        .write_all(post("{\"a\":1}").as_bytes())
        .await
        .unwrap();
    let (status, echo, head) = read_response(&mut stream, &mut pending).await;
    assert_eq!(status, 200, "the reused connection answered");
    assert!(head.contains("\r\nkeep-alive: timeout=4"), "{head}");
    let echo: serde_json::Value = serde_json::from_slice(&echo).unwrap();
    assert_eq!(echo["method"], "POST");

    // Then silent: closed once the keep-alive timeout has passed, cleanly.
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert!(rest.is_empty(), "no stray bytes: {rest:?}");
    assert!(
        idle_from.elapsed() >= Duration::from_millis(3500),
        "closed after {:?}, before the advertised 4 s",
        idle_from.elapsed()
    );
    assert_eq!(fake.state().api_requests(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_lives_for_the_keep_alive_timeout() {
    keep_alive_outlives_the_header_timeout("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_keep_alive_connection_lives_for_the_keep_alive_timeout() {
    keep_alive_outlives_the_header_timeout("release_idle_buffers_above = 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_slowly_is_cut_off_from_its_first_byte_not_its_idle_time() {
    let (fake, proxy) =
        start_with_listen("header_read_timeout = \"1s\"\nkeepalive_timeout = \"1h\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(post("{}").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    // The next head starts, then trickles a header line every 300 ms and
    // never ends: bytes keep coming, but the head is cut off 1 s after its
    // first byte (slowloris).
    let started = Instant::now();
    stream
        .write_all(b"GET /api/invoices HTTP/1.1\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.split();
    let closed = async {
        let mut chunk = [0u8; 256];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let trickle = async {
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer
                .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(DEADLINE, async {
        tokio::select! {
            _ = closed => {}
            _ = trickle => {}
        }
    })
    .await
    .expect("an unfinished head is cut off after header_read_timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // Each header line came 300 ms after the last: a timer restarted by
    // every byte would never fire; the default (10 s) would fire later.
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    let metrics = scrape(&proxy.admin_url("/metrics")).await;
    assert_eq!(
        metric(&metrics, "coupa_proxy_client_head_timeouts_total", &[]),
        1.0
    );
    assert_eq!(
        fake.state().api_requests(),
        1,
        "the stalled head reached nothing"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_host_is_refused_and_not_forwarded() {
    let (fake, proxy) = start_with_listen("").await;
    let (status, _, body) = raw_request(
        proxy.addr,
        "GET /api/invoices HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["error"], "missing_host");
    // HTTP/1.0 has no Host requirement.
    let (status, _, _) = raw_request(proxy.addr, "GET /api/invoices HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(fake.state().api_requests(), 1, "only the HTTP/1.0 request");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_for_a_connection_gets_503_and_holds_nothing() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(
        &fake.base_url(),
        "http_version = \"http1\"\nmax_connections = 1\nconnection_wait_timeout = \"300ms\"",
        "",
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    // The one connection is held by a slow answer...
    let slow = tokio::spawn(http_client().get(proxy.url("/api/_slow?ms=3000")).send());
    eventually("the slow request holds the connection", || async {
        fake.state().api_requests() == 1
    })
    .await;
    // ...so the next request waits 300 ms, then is told to come back.
    let busy = http_client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");
    let answer: serde_json::Value = busy.json().await.unwrap();
    assert_eq!(answer["error"], "upstream_busy");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("coupa.connection_wait_timeout"),
        "{answer}"
    );
    assert_eq!(
        fake.state().api_requests(),
        1,
        "the refused one reached nothing"
    );
    let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_upstream_connection_wait_timeouts_total",
            &[]
        ),
        1.0
    );
    // The slow one is answered, and the connection serves the next call.
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    let next = http_client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(next.status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integration_at_its_max_concurrent_queues_while_another_is_served() {
    use coupa_auth_proxy::proxy::auth::hash_key;
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = format!(
        "{}\n[[integration]]\nname = \"batch\"\napi_key_sha256 = \"{}\"\nmax_concurrent = 1\n\n\
         [[integration]]\nname = \"approvals\"\napi_key_sha256 = \"{}\"\n",
        config_text(&fake.base_url(), "connection_wait_timeout = \"3s\"", ""),
        hash_key("batch-key"),
        hash_key("approvals-key"),
    );
    let config = parse_config(&text);
    assert_eq!(config.integrations[0].max_concurrent, 1);
    assert_eq!(
        config.integrations[1].max_concurrent, 16,
        "default: half of coupa.max_connections with several integrations"
    );
    let proxy = TestProxy::start(config).await;
    proxy.wait_ready().await;
    let call = |key: &'static str, target: &str| {
        http_client()
            .get(proxy.url(target))
            .header("X-COUPA-API-KEY", key)
            .send()
    };
    // The batch integration's one place is taken by a slow call...
    let slow = tokio::spawn(call("batch-key", "/api/_slow?ms=6000"));
    eventually("the slow call reached Coupa", || async {
        fake.state().api_requests() == 1
    })
    .await;
    // ...so its next call queues behind it, and gives up after the wait...
    let queued = tokio::spawn(call("batch-key", "/api/x"));
    // ...while the other integration is served at once.
    let other = call("approvals-key", "/api/x").await.unwrap();
    assert_eq!(other.status(), 200);
    assert!(!queued.is_finished(), "the batch call is still queued");
    let refused = queued.await.unwrap().unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let answer: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(answer["error"], "integration_busy");
    assert!(
        answer["message"].as_str().unwrap().contains("\"batch\""),
        "{answer}"
    );
    let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_integration_busy_total",
            &[("integration", "batch")]
        ),
        1.0
    );
    // Once the slow answer is read, the place is free again.
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(call("batch-key", "/api/x").await.unwrap().status(), 200);
    assert_eq!(
        fake.state().api_requests(),
        3,
        "the refused call reached nothing"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_within_the_replay_limit_reaches_coupa_only_once_complete() {
    let (fake, proxy) = start_with_listen("").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/invoices HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n\
              Content-Length: 13\r\n\r\n{\"half\":",
        )
        .await
        .unwrap();
    // Half a body, then a pause: nothing may reach Coupa meanwhile (the
    // absence can only be watched for a while).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        fake.state().api_requests(),
        0,
        "no request before its body is whole"
    );
    stream.write_all(b"true}").await.unwrap();
    let mut pending = Vec::new();
    let (status, echo, _) = read_response(&mut stream, &mut pending).await;
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&echo).unwrap();
    assert_eq!(echo["body_bytes"], 13);
    assert_eq!(fake.state().api_requests(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_below_the_minimum_rate_gets_408_after_the_grace() {
    let (fake, proxy) = start_with_listen(
        "min_body_rate = 240\nmin_rate_grace = \"1s\"\nbody_read_timeout = \"1h\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"POST /api/invoices HTTP/1.1\r\nHost: proxy\r\nContent-Length: 1000\r\n\r\nx")
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.split();
    let trickle = async {
        // A byte every 200 ms: never silent, far below 240 bytes/s.
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b"x").await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let answer = async {
        let mut raw = Vec::new();
        let mut chunk = [0u8; 1024];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") || !raw.ends_with(b"}") {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&raw).into_owned()
    };
    let answer = tokio::time::timeout(DEADLINE, async {
        tokio::select! {
            answer = answer => answer,
            _ = trickle => unreachable!(),
        }
    })
    .await
    .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    assert!(answer.contains("listen.min_body_rate"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the grace"
    );
    assert_eq!(fake.state().api_requests(), 0, "nothing reached Coupa");
    let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_client_body_timeouts_total",
            &[("reason", "rate")]
        ),
        1.0
    );
    proxy.stop().await;
}

/// On the cleartext port, bytes that start as HTTP/2's preface and then go
/// wrong get what RFC 9113 §3.4 asks (SETTINGS, then GOAWAY with
/// PROTOCOL_ERROR), as on TLS, not an HTTP/1.1 400 — also when the
/// preface arrives in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_cleartext_http2_preface_gets_a_goaway() {
    let (fake, proxy) = start_with_listen("").await;
    for pieces in [
        &[&b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"[..]][..],
        &[&b"PRI * HT"[..], &b"TP/2.0\r\n\r\nBAD!\r\n\r\n"[..]][..],
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                // A pause inside the preface (the condition under test).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stream.write_all(piece).await.unwrap();
        }
        let mut answer = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("the connection is closed")
            .ok();
        assert!(
            !answer.starts_with(b"HTTP/1.1"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        let frames = frames(&answer);
        assert_eq!(frames.first().map(|f| f.0), Some(0x4), "SETTINGS first");
        let goaway = frames
            .iter()
            .find(|(kind, _)| *kind == 0x7)
            .unwrap_or_else(|| panic!("no GOAWAY in {answer:?}"));
        let code = u32::from_be_bytes(goaway.1[4..8].try_into().unwrap());
        assert_eq!(code, 0x1, "PROTOCOL_ERROR");
    }
    // A real HTTP/2 client by prior knowledge is still served.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let answer = h2.get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(fake.state().api_requests(), 1);
    proxy.stop().await;
}
