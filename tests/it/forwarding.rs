//! What reaches Coupa: headers injected and stripped, targets byte-exact,
//! Accept policy, both inbound protocols, and upstream failures as JSON.

use std::time::Duration;

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_399);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_key_is_replaced_by_bearer_and_hop_by_hop_headers_are_stripped() {
    let (fake, proxy) = start_pair(DAY).await;
    let request = format!(
        "GET /api/invoices?limit=1 HTTP/1.1\r\n\
         Host: client.example:8080\r\n\
         X-COUPA-API-KEY: {LEGACY_KEY}\r\n\
         x-coupa-api-key: second-{LEGACY_KEY}\r\n\
         Authorization: Basic dXNlcjpwYXNz\r\n\
         Proxy-Authorization: Basic cHJveHk6cGFzcw==\r\n\
         Connection: keep-alive, X-Hop-Secret\r\n\
         Connection: close\r\n\
         X-Hop-Secret: must-not-pass\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         X-Forwarded-For: 203.0.113.7\r\n\
         X-Custom: kept as is\r\n\
         \r\n"
    );
    let (status, _, body) = raw_request(proxy.addr, &request).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let headers = echoed_headers(&echo);

    let token = echoed_token(&echo);
    assert!(fake.state().token_is_live(&token));
    for gone in [
        "x-coupa-api-key",
        "proxy-authorization",
        "x-hop-secret",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert!(header(&headers, gone).is_empty(), "{gone} was forwarded");
    }
    assert_eq!(header(&headers, "x-custom"), ["kept as is"]);
    assert_eq!(header(&headers, "host"), [fake.addr().to_string().as_str()]);
    assert_eq!(
        header(&headers, "x-forwarded-host"),
        ["client.example:8080"]
    );
    assert_eq!(
        header(&headers, "x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(header(&headers, "x-forwarded-proto"), ["http"]);
    assert_eq!(header(&headers, "accept"), ["application/json"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_query_are_forwarded_byte_for_byte() {
    let (_fake, proxy) = start_pair(DAY).await;
    for target in [
        "/api/invoices?filter%5Bstatus%5D=approved&q=a%2Bb%20c&empty=&flag",
        "/api/suppliers/%2F..%2Fetc?name=%E2%9C%93;x=1&x=2",
        "/api/a%20b/c+d/~user?%3D=%26&%%25",
        "/api/purchase_orders?fields=[%22id%22,{%22supplier%22:[%22name%22]}]",
        "/api/UPPER/Case?Key=Value",
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, _, body) = raw_request(proxy.addr, &request).await;
        assert_eq!(status, 200, "{target}: {}", String::from_utf8_lossy(&body));
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["target"], target);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_follows_the_client_then_content_type_then_default() {
    let (_fake, proxy) = start_pair(DAY).await;
    let client = http_client();
    // config_text sets coupa.accept = "application/json".
    let cases: [(Option<&str>, Option<&str>, &str); 5] = [
        (None, None, "application/json"),
        (Some("*/*"), None, "application/json"),
        (
            None,
            Some("application/xml; charset=utf-8"),
            "application/xml",
        ),
        (Some("*/*"), Some("application/json"), "application/json"),
        (
            Some("application/xml"),
            Some("application/json"),
            "application/xml",
        ),
    ];
    for (accept, content_type, expected) in cases {
        let mut request = client.post(proxy.url("/api/invoices")).body("<x/>");
        if let Some(a) = accept {
            request = request.header("accept", a);
        }
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let echo = echo_of(response).await;
        let headers = echoed_headers(&echo);
        assert_eq!(
            header(&headers, "accept"),
            [expected],
            "accept={accept:?} content-type={content_type:?}"
        );
        let format = if expected.contains("xml") {
            "xml"
        } else {
            "json"
        };
        assert_eq!(echo["format"], format, "Coupa answers what Accept asks");
        assert_eq!(echo["body_bytes"], 4);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_clients_are_served() {
    let (fake, proxy) = start_pair(DAY).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(proxy.url("/api/departments?limit=1"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert!(fake.state().token_is_live(&echoed_token(&echo)));
    let headers = echoed_headers(&echo);
    assert!(header(&headers, "x-coupa-api-key").is_empty());
    assert_eq!(
        header(&headers, "x-forwarded-host"),
        [proxy.addr.to_string().as_str()]
    );
    assert_eq!(echo["target"], "/api/departments?limit=1");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coupa_status_and_body_pass_through_unchanged() {
    let (fake, proxy) = start_pair(DAY).await;
    // The end-to-end headers of an answer: what the proxy adds (its
    // request id, keep-alive) and the hop's own (date, connection) aside.
    let end_to_end = |response: &reqwest::Response| {
        let mut headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(name, _)| {
                !matches!(
                    name.as_str(),
                    "date" | "connection" | "keep-alive" | "x-request-id"
                )
            })
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        headers.sort();
        headers
    };
    // The fake answers 404 with Coupa's error shape outside /api: the
    // proxy's answer is the one Coupa gives directly, byte for byte.
    let direct = get(format!("{}/not-api", fake.base_url())).await;
    let proxied = get(proxy.url("/not-api")).await;
    assert_eq!(proxied.status(), 404);
    assert_eq!(proxied.status(), direct.status());
    assert_eq!(end_to_end(&proxied), end_to_end(&direct));
    assert_eq!(
        proxied.bytes().await.unwrap(),
        direct.bytes().await.unwrap()
    );

    // A refusal of Coupa's with its own headers (Retry-After) and body.
    let refused = get(proxy.url("/api/_status?code=422")).await;
    assert_eq!(refused.status(), 422);
    assert_eq!(refused.headers()["retry-after"], "7");
    assert_eq!(refused.headers()["content-type"], "application/json");
    assert_eq!(
        refused.text().await.unwrap(),
        r#"{"errors":{"fake":["status 422 Unprocessable Entity"]}}"#
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_502_with_json_body() {
    // Tokens come from a live fake; the API points at a closed port.
    let fake = start_fake(DAY).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let text = config_text(
        &format!("http://{closed_addr}"),
        "",
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    let retries = || async {
        metric(
            &scrape(&proxy.admin_url("/metrics")).await,
            "coupa_proxy_upstream_retries_total",
            &[("reason", "connection_failure")],
        )
    };
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(retries().await, 1.0, "a GET is tried twice");
    let response = http_client()
        .post(proxy.url("/api/invoices"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(retries().await, 1.0, "a POST is tried once");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_forwarded_returned_and_logged() {
    let fake = start_fake(DAY).await;
    let proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;
    let client = http_client();

    let response = client
        .get(proxy.url("/api/invoices"))
        .header("x-request-id", "erp-run-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "erp-run-7f3a");
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        header(&echoed_headers(&echo), "x-request-id"),
        ["erp-run-7f3a"]
    );

    // Without one, the proxy makes one and uses it on both sides.
    let response = get(proxy.url("/api/suppliers")).await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        header(&echoed_headers(&echo), "x-request-id"),
        [generated.as_str()]
    );

    eventually("both ids in the JSON access log", || {
        let logs = proxy.logs();
        let generated = generated.clone();
        async move {
            let ids: Vec<String> = logs
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["message"] == "request")
                .filter_map(|v| v["request_id"].as_str().map(str::to_owned))
                .collect();
            ids.contains(&"erp-run-7f3a".to_owned()) && ids.contains(&generated)
        }
    })
    .await;
}
