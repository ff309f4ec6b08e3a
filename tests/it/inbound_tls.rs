//! The listener over TLS: served to clients trusting its CA, mutual TLS
//! when a client CA is configured, and certificate rotation without
//! dropping connections.

use std::path::Path;
use std::time::Duration;

use crate::support::pki::{client, Ca};
use crate::support::*;
use coupa_auth_proxy::fake_coupa::FakeCoupa;

/// Writes the listener's certificate and key (and a client CA) and
/// returns the `[listen.tls]` table.
fn tls_table(dir: &Path, server_ca: &Ca, client_ca: Option<&Ca>) -> String {
    let leaf = server_ca.issue(&["localhost"]);
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    let mut table = format!(
        "\n[listen.tls]\ncert_file = \"{}/cert.pem\"\nkey_file = \"{}/key.pem\"\n",
        dir.display(),
        dir.display()
    );
    if let Some(ca) = client_ca {
        std::fs::write(dir.join("clients.pem"), ca.pem()).unwrap();
        table.push_str(&format!(
            "client_ca_file = \"{}/clients.pem\"\n",
            dir.display()
        ));
    }
    table
}

/// The test config with a `[listen.tls]` table (it must follow `[listen]`).
fn tls_config(base_url: &str, table: &str) -> String {
    config_text(base_url, "", "").replace("\n[coupa]", &format!("{table}\n[coupa]"))
        + "\n[reload]\nwatch_interval = \"100ms\"\n"
}

/// The binary with a TLS listener whose certificate `ca` signed, in front
/// of a fresh fake (kept alive with its directory by the caller).
async fn tls_proxy(tag: &str) -> (FakeCoupa, tempdir::Dir, Ca, ProxyProcess) {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new(tag);
    let ca = Ca::new("listener CA");
    let proxy = ProxyProcess::start(
        &tls_config(&fake.base_url(), &tls_table(dir.path(), &ca, None)),
        &[],
        &[],
    );
    proxy.wait_ready().await;
    (fake, dir, ca, proxy)
}

fn https(proxy: &ProxyProcess, target: &str) -> String {
    format!("https://localhost:{}{}", proxy.addr.port(), target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_is_served_to_clients_trusting_its_ca() {
    let (_fake, _dir, ca, proxy) = tls_proxy("inbound-tls").await;

    let response = client(&ca, None)
        .get(https(&proxy, "/api/invoices?x=1"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN h2");
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        header(&echoed_headers(&echo), "x-forwarded-proto"),
        ["https"]
    );

    // A client trusting another CA refuses the listener.
    let stranger = Ca::new("someone else");
    assert!(client(&stranger, None)
        .get(https(&proxy, "/api/invoices"))
        .send()
        .await
        .is_err());
    // Plain HTTP to the TLS port gets nowhere.
    assert!(http_client()
        .get(proxy.url("/api/invoices"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("mtls");
    let server_ca = Ca::new("listener CA");
    let client_ca = Ca::new("integration client CA");
    let proxy = ProxyProcess::start(
        &tls_config(
            &fake.base_url(),
            &tls_table(dir.path(), &server_ca, Some(&client_ca)),
        ),
        &[],
        &[],
    );
    proxy.wait_ready().await;

    let anonymous = client(&server_ca, None)
        .get(https(&proxy, "/api/invoices"))
        .send()
        .await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate must be refused"
    );

    let foreign = Ca::new("not trusted").issue(&["erp"]);
    let wrong = client(&server_ca, Some(&foreign))
        .get(https(&proxy, "/api/invoices"))
        .send()
        .await;
    assert!(
        wrong.is_err(),
        "a certificate from another CA must be refused"
    );

    let identity = client_ca.issue(&["erp-connector"]);
    let response = client(&server_ca, Some(&identity))
        .get(https(&proxy, "/api/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(fake.state().api_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_served_without_dropping_connections() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("rotate");
    let old_ca = Ca::new("old CA");
    let proxy = ProxyProcess::start(
        &tls_config(&fake.base_url(), &tls_table(dir.path(), &old_ca, None)),
        &[],
        &[],
    );
    proxy.wait_ready().await;
    let old_client = client(&old_ca, None);
    let get = |c: &reqwest::Client| c.get(https(&proxy, "/api/invoices")).send();
    assert_eq!(get(&old_client).await.unwrap().status(), 200);

    // cert-manager writes a certificate from a new CA.
    let new_ca = Ca::new("new CA");
    let leaf = new_ca.issue(&["localhost"]);
    std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem).unwrap();
    eventually("the new certificate is served", || {
        let request = get(&client(&new_ca, None));
        async move { matches!(request.await, Ok(r) if r.status() == 200) }
    })
    .await;
    eventually("the reload is logged", || {
        let logs = proxy.logs();
        async move { logs.contains("TLS certificate reloaded") }
    })
    .await;
    // The old client's HTTP/2 connection was negotiated before the swap
    // and keeps working.
    assert_eq!(get(&old_client).await.unwrap().status(), 200);
}

/// Sends `bytes` over TLS offering only `alpn`, returns all that comes
/// back until the proxy closes the connection.
async fn tls_exchange(proxy: &ProxyProcess, ca: &Ca, alpn: &[u8], bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer)).await;
    answer
}

/// On TLS the protocol is the one ALPN agreed: after `h2` a bad preface
/// gets a GOAWAY with PROTOCOL_ERROR (RFC 9113 §3.4), not an HTTP/1.1 400;
/// after `http/1.1` an HTTP/2 preface is not taken as HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_protocol_follows_alpn() {
    let (_fake, _dir, ca, proxy) = tls_proxy("inbound-alpn").await;

    let answer = tls_exchange(&proxy, &ca, b"h2", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        !answer.starts_with(b"HTTP/1.1"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let goaway = frames(&answer)
        .into_iter()
        .find(|(kind, _)| *kind == 0x7)
        .unwrap_or_else(|| panic!("no GOAWAY in {answer:?}"));
    let code = u32::from_be_bytes(goaway.1[4..8].try_into().unwrap());
    assert_eq!(code, 0x1, "PROTOCOL_ERROR");

    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let answer = tls_exchange(&proxy, &ca, b"http/1.1", preface).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        frames(&answer).iter().all(|(kind, _)| *kind != 0x4),
        "no SETTINGS frame"
    );
}

/// Clients whose handshakes fail never send a request, so they have no
/// access line: they are counted, and summarised in one warning however
/// many there are, while a client that trusts the CA is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_and_warned_of_once() {
    let (_fake, _dir, ca, proxy) = tls_proxy("inbound-tls-failures").await;
    let untrusting = client(&Ca::new("some other CA"), None);
    for _ in 0..10 {
        let error = untrusting.get(https(&proxy, "/api/invoices")).send().await;
        assert!(error.is_err(), "a client not trusting the CA was served");
        // Plain HTTP to the TLS port: not a TLS record at all. The
        // proxy closes the connection (after a TLS alert).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("the connection is closed");
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plain HTTP answered on the TLS port"
        );
    }
    let answer = client(&ca, None)
        .get(https(&proxy, "/api/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    eventually("20 failed handshakes counted", || async {
        let text = scrape(&metrics_url).await;
        metric(
            &text,
            "coupa_proxy_client_tls_handshake_failures_total",
            &[],
        ) == 20.0
    })
    .await;
    let warnings = proxy
        .logs()
        .matches("TLS handshake with a client failed")
        .count();
    assert_eq!(warnings, 1, "{}", proxy.logs());
}
