//! Integrations that can only set a proxy (`[listen.intercept]`) or only
//! name the instance (`ca init --host` + `[listen.tls]`), with real
//! clients: curl, Python requests, a Java `HttpsURLConnection`. Each gets
//! what the base-URL mode gives; anything but the instance is refused and
//! nothing is opened; the CA key is never shown.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use coupa_auth_proxy::fake_coupa::FakeCoupa;
use coupa_auth_proxy::proxy::auth::hash_key;

use crate::support::real::{python_with, tool};
use crate::support::*;

const KEY: &str = "intercepted-legacy-key-5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d";

struct Setup {
    fake: FakeCoupa,
    proxy: ProxyProcess,
    /// The local CA the clients trust.
    ca: PathBuf,
    /// `localhost:PORT`, the instance as the clients name it.
    instance: String,
    _dir: tempdir::Dir,
}

/// `ca init` through the binary.
fn ca_init(dir: &Path, host: Option<&str>) -> String {
    let mut args = vec!["ca", "init", "--dir", dir.to_str().unwrap()];
    if let Some(host) = host {
        args.extend(["--host", host]);
    }
    let (code, stdout, stderr) = run_binary(&args, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    stdout
}

/// A proxy for an instance named `localhost` (the fake), in forward mode;
/// `listen_tables` adds tables below `[listen]` (e.g. `[listen.tls]`).
async fn setup(listen_tables: &str) -> Setup {
    setup_with("", listen_tables).await
}

/// [`setup`] with `listen_keys` in `[listen]` itself.
async fn setup_with(listen_keys: &str, listen_tables: &str) -> Setup {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("intercept");
    let ca_dir = dir.path().join("ca");
    ca_init(&ca_dir, None);
    let instance = format!("localhost:{}", fake.addr().port());
    let text = format!(
        "{}\n[listen.intercept]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\n{listen_tables}\n\
         [[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n",
        config_text(&format!("http://{instance}"), "", "").replace(
            "shutdown_grace = \"10s\"",
            &format!("shutdown_grace = \"10s\"\n{listen_keys}"),
        ),
        ca_dir.join("ca.pem").display(),
        ca_dir.join("ca.key").display(),
        hash_key(KEY),
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    Setup {
        fake,
        proxy,
        ca: ca_dir.join("ca.pem"),
        instance,
        _dir: dir,
    }
}

/// Runs a client off the async workers, with no proxy variables of the
/// environment in its way.
async fn run(program: PathBuf, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args(&args)
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("ALL_PROXY")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The parts of an echo that must not depend on how the call came in.
fn essentials(echo: &serde_json::Value) -> (String, String, Vec<String>, Vec<String>) {
    let headers = echoed_headers(echo);
    let one = |name: &str| -> Vec<String> {
        header(&headers, name)
            .into_iter()
            .map(str::to_owned)
            .collect()
    };
    assert!(one("x-coupa-api-key").is_empty(), "the key is stripped");
    (
        echo["method"].as_str().unwrap().to_owned(),
        echo["target"].as_str().unwrap().to_owned(),
        one("authorization"),
        one("accept"),
    )
}

/// What the base-URL mode gives the same call.
async fn direct(setup: &Setup, target: &str, accept: &str) -> serde_json::Value {
    let response = http_client()
        .get(setup.proxy.url(target))
        .header("X-COUPA-API-KEY", KEY)
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    echo_of(response).await
}

const TARGET: &str = "/api/invoices?limit=1&offset=0";

/// Coupa's `fields` syntax as its documentation writes it.
const FIELDS: &str = r#"/api/invoices?fields=["id",{"supplier":["name"]}]"#;

/// [`FIELDS`] as Coupa receives it: the quotes percent-encoded (Coupa
/// decodes `%22` and `"` alike), every other byte as sent.
const FIELDS_AS_COUPA_GETS_THEM: &str =
    "/api/invoices?fields=[%22id%22,{%22supplier%22:[%22name%22]}]";

/// curl's call of the instance's https:// URL with the legacy key, going
/// the way `proxy_args` set, trusting the local CA; its echo.
async fn curl_through(curl: &Path, setup: &Setup, proxy_args: &[String]) -> serde_json::Value {
    let mut args = vec!["-sS".to_owned()];
    args.extend_from_slice(proxy_args);
    args.extend([
        "--cacert".to_owned(),
        setup.ca.display().to_string(),
        "-H".to_owned(),
        format!("X-COUPA-API-KEY: {KEY}"),
        "-H".to_owned(),
        "Accept: application/json".to_owned(),
        format!("https://{}{TARGET}", setup.instance),
    ]);
    let output = run(curl.to_owned(), args).await;
    serde_json::from_str(&stdout_of(&output)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_proxy_setting_gets_what_the_base_url_gets() {
    let Some(curl) = tool("curl") else { return };
    let setup = setup("").await;
    let proxy_setting = ["-x".to_owned(), format!("http://{}", setup.proxy.addr)];
    let echo = curl_through(&curl, &setup, &proxy_setting).await;
    let base_url = direct(&setup, TARGET, "application/json").await;
    assert_eq!(essentials(&echo), essentials(&base_url));
    assert!(essentials(&echo).2[0].starts_with("Bearer "));

    // A client that does not trust the CA fails its handshake, and
    // nothing reaches Coupa.
    let before = setup.fake.state().api_requests();
    let untrusting = run(
        curl,
        vec![
            "-sS".into(),
            "-x".into(),
            format!("http://{}", setup.proxy.addr),
            "-H".into(),
            format!("X-COUPA-API-KEY: {KEY}"),
            format!("https://{}{TARGET}", setup.instance),
        ],
    )
    .await;
    assert!(!untrusting.status.success(), "curl must refuse the leaf");
    assert_eq!(setup.fake.state().api_requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_with_proxies_and_verify_gets_what_the_base_url_gets() {
    let Some(python) = python_with("requests") else {
        return;
    };
    let setup = setup("").await;
    let script = format!(
        "import requests, sys\n\
         r = requests.get('https://{}{TARGET}', proxies={{'https': 'http://{}'}}, verify='{}',\n\
         \x20   headers={{'X-COUPA-API-KEY': '{KEY}', 'Accept': 'application/json'}}, timeout=20)\n\
         print(r.status_code)\n\
         sys.stdout.write(r.text)\n",
        setup.instance,
        setup.proxy.addr,
        setup.ca.display()
    );
    let output = run(python, vec!["-c".into(), script]).await;
    let out = stdout_of(&output);
    let (status, body) = out.split_once('\n').unwrap();
    assert_eq!(status, "200");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    let base_url = direct(&setup, TARGET, "application/json").await;
    assert_eq!(essentials(&echo), essentials(&base_url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_https_url_connection_with_https_proxy_host_gets_the_same_answer() {
    let (Some(javac), Some(java), Some(keytool)) = (tool("javac"), tool("java"), tool("keytool"))
    else {
        return;
    };
    let setup = setup("").await;
    let work = tempdir::Dir::new("java");
    let source = work.path().join("Client.java");
    std::fs::write(
        &source,
        r#"import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URL;

public class Client {
    // args: the legacy key, then URLs; prints each answer's status and body.
    public static void main(String[] args) throws Exception {
        for (int i = 1; i < args.length; i++) {
            HttpURLConnection connection = (HttpURLConnection) new URL(args[i]).openConnection();
            connection.setRequestProperty("X-COUPA-API-KEY", args[0]);
            System.out.println(connection.getResponseCode());
            try (InputStream in = connection.getInputStream()) {
                System.out.println(new String(in.readAllBytes(), "UTF-8"));
            }
        }
    }
}
"#,
    )
    .unwrap();
    let dir = work.path().display().to_string();
    stdout_of(
        &run(
            javac,
            vec!["-d".into(), dir.clone(), source.display().to_string()],
        )
        .await,
    );
    let truststore = work.path().join("trust.jks").display().to_string();
    stdout_of(
        &run(
            keytool,
            [
                "-importcert",
                "-noprompt",
                "-alias",
                "coupa-auth-proxy",
                "-storepass",
                "changeit",
                "-keystore",
                &truststore,
                "-file",
                &setup.ca.display().to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
        )
        .await,
    );
    let output = run(
        java,
        vec![
            "-Dhttps.proxyHost=127.0.0.1".into(),
            format!("-Dhttps.proxyPort={}", setup.proxy.addr.port()),
            // By default Java goes direct to loopback names; an empty
            // list proxies every host.
            "-Dhttp.nonProxyHosts=".into(),
            format!("-Djavax.net.ssl.trustStore={truststore}"),
            "-Djavax.net.ssl.trustStorePassword=changeit".into(),
            "-cp".into(),
            dir,
            "Client".into(),
            KEY.into(),
            format!("https://{}{TARGET}", setup.instance),
            // Coupa's documented `fields` syntax, which `new URL` sends
            // unencoded: through the intercept and to the base URL.
            format!("https://{}{FIELDS}", setup.instance),
            setup.proxy.url(FIELDS),
        ],
    )
    .await;
    let out = stdout_of(&output);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    let echoes: Vec<serde_json::Value> = lines
        .chunks(2)
        .map(|answer| {
            assert_eq!(answer[0], "200", "{out}");
            serde_json::from_str(answer[1]).unwrap()
        })
        .collect();
    for fields in &echoes[1..] {
        assert_eq!(
            fields["target"], FIELDS_AS_COUPA_GETS_THEM,
            "the bytes hyper's URI type refuses are percent-encoded, the rest as sent"
        );
    }
    let echo = &echoes[0];
    // Java's own Accept ("text/html, image/gif, image/jpeg, *; q=.2,
    // */*; q=.2" before JDK 17's "*/*; q=0.2") is passed on as it is.
    let java_accept = essentials(echo).3;
    assert_eq!(java_accept.len(), 1);
    assert!(
        java_accept[0].starts_with("text/html, image/gif, image/jpeg, "),
        "{java_accept:?}"
    );
    let base_url = direct(&setup, TARGET, &java_accept[0]).await;
    assert_eq!(essentials(echo), essentials(&base_url));
}

/// Sends a raw `CONNECT` and returns the answer's head and body.
async fn connect(addr: std::net::SocketAddr, target: &str) -> (u16, String) {
    let (status, _head, body) = raw_request(
        addr,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_instance_is_tunnelled_and_garbage_is_closed_cleanly() {
    let setup = setup("").await;
    let port = setup.fake.addr().port();
    let before = setup.fake.open_connections();
    for target in [
        "evil.example:443".to_owned(),
        format!("localhost:{}", port + 1),
        format!("127.0.0.1:{port}"),
    ] {
        let (status, body) = connect(setup.proxy.addr, &target).await;
        assert_eq!(status, 403, "{target}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["error"], "tunnel_refused");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains(&setup.instance),
            "{answer}"
        );
    }
    assert_eq!(
        setup.fake.open_connections(),
        before,
        "nothing was opened for a refused tunnel"
    );

    // Garbage where the TLS handshake belongs: the tunnel closes cleanly.
    let mut stream = tokio::net::TcpStream::connect(setup.proxy.addr)
        .await
        .unwrap();
    stream
        .write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", setup.instance).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 39];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 Connection Established\r\n\r\n");
    stream
        .write_all(b"GET /api/invoices HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the tunnel")
        .expect("with a clean close, not a reset");
    assert!(
        rest.is_empty() || rest[0] == 0x15,
        "nothing but a TLS alert comes back: {rest:?}"
    );
    assert_eq!(
        setup.fake.state().api_requests(),
        0,
        "Coupa received nothing of the garbage"
    );
    assert_eq!(setup.fake.open_connections(), before);
    // Everyone else is served as before.
    let ok = http_client()
        .get(setup.proxy.url("/api/x"))
        .header("X-COUPA-API-KEY", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // The CA key is shown nowhere.
    let key_text = std::fs::read_to_string(setup.ca.with_file_name("ca.key")).unwrap();
    let key_lines: Vec<&str> = key_text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!key_lines.is_empty());
    let status = get(format!("http://{}/status.json", setup.proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    let page = get(format!("http://{}/", setup.proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    let (_, check_out, check_err) = run_binary(
        &[
            "check",
            "--config",
            setup.proxy.config_path().to_str().unwrap(),
        ],
        &[("TEST_CLIENT_SECRET", "x")],
    );
    assert!(check_out.contains("listen.intercept"), "{check_out}");
    for (what, text) in [
        ("logs", setup.proxy.logs()),
        ("status.json", status),
        ("status page", page),
        ("check", check_out + &check_err),
    ] {
        assert!(!text.contains("PRIVATE KEY"), "{what}");
        for line in &key_lines {
            assert!(!text.contains(line), "the CA key is in {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_never_starts_tls_is_closed_at_the_header_read_timeout() {
    let setup = setup_with("header_read_timeout = \"1s\"", "").await;
    let mut stream = tokio::net::TcpStream::connect(setup.proxy.addr)
        .await
        .unwrap();
    stream
        .write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", setup.instance).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 39];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 Connection Established\r\n\r\n");
    // Silence after the 200: the same bound as any connection's start.
    let began = std::time::Instant::now();
    let metrics = format!("http://{}/metrics", setup.proxy.admin);
    let rest =
        cut_at_header_timeout(&mut stream, Duration::from_secs(1), began, (&metrics, 1.0)).await;
    assert!(rest.is_empty(), "the idle tunnel is closed without a word");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_intercept_connect_stays_405() {
    let (_fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    let (status, body) = connect(proxy.addr, "localhost:443").await;
    assert_eq!(status, 405, "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_reached_over_https_tunnels_too_and_the_name_only_recipe_works() {
    let Some(curl) = tool("curl") else { return };
    // The listener's own certificate, for the name `localhost`, from
    // `ca init --host` (the name-only recipe's tool).
    let listener_dir = tempdir::Dir::new("listener-ca");
    let printed = ca_init(listener_dir.path(), Some("localhost"));
    assert!(printed.contains("[listen.tls]"), "{printed}");
    assert!(printed.contains("keytool -importcert"), "{printed}");
    let listener_ca = listener_dir.path().join("ca.pem").display().to_string();
    let setup = setup(&format!(
        "[listen.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        listener_dir.path().join("localhost.pem").display(),
        listener_dir.path().join("localhost.key").display(),
    ))
    .await;
    let proxy_port = setup.proxy.addr.port();

    // HTTPS to the proxy, CONNECT inside, TLS to the "instance" inside that.
    let https_proxy = [
        "--proxy".to_owned(),
        format!("https://localhost:{proxy_port}"),
        "--proxy-cacert".to_owned(),
        listener_ca.clone(),
    ];
    let echo = curl_through(&curl, &setup, &https_proxy).await;
    assert!(essentials(&echo).2[0].starts_with("Bearer "));

    // The name-only recipe: the instance's name resolves to the proxy,
    // which serves TLS for it with the certificate `ca init --host` made.
    let by_name = run(
        curl,
        vec![
            "-sS".into(),
            "--resolve".into(),
            format!("localhost:{proxy_port}:127.0.0.1"),
            "--cacert".into(),
            listener_ca,
            "-H".into(),
            format!("X-COUPA-API-KEY: {KEY}"),
            "-H".into(),
            "Accept: application/json".into(),
            format!("https://localhost:{proxy_port}{TARGET}"),
        ],
    )
    .await;
    let echo: serde_json::Value = serde_json::from_str(&stdout_of(&by_name)).unwrap();
    assert_eq!(essentials(&echo).1, TARGET);
    assert!(essentials(&echo).2[0].starts_with("Bearer "));
}
