//! Shared test harness: the fake Coupa and the proxy on port 0, in-process
//! or as the real binary, plus small client helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod consent;
pub mod doorkeeper;
pub mod real;
pub mod sentinel;
pub mod tinyproxy;

use bytes::Bytes;
use coupa_auth_proxy::app::{self, Listeners};
use coupa_auth_proxy::config::Config;
use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};
use coupa_auth_proxy::server::Drain;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "test-secret-Zx9-never-log-me";
pub const LEGACY_KEY: &str = "legacy-key-0123456789abcdef0123456789abcd";
pub const SCOPES: [&str; 2] = ["core.common.read", "core.invoice.read"];

/// Generous bound for waiting on a condition; tests poll, never sleep blind.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn fake_client() -> FakeClient {
    FakeClient {
        id: CLIENT_ID.to_owned(),
        secret: CLIENT_SECRET.to_owned(),
        scopes: vec![
            "core.common.read".into(),
            "core.invoice.read".into(),
            "core.supplier.read".into(),
        ],
    }
}

pub async fn start_fake(lifetime: Duration) -> FakeCoupa {
    FakeCoupa::start(FakeCoupaOptions {
        clients: vec![fake_client()],
        token_lifetime: lifetime,
        tls: None,
    })
    .await
    .expect("fake Coupa starts")
}

/// A config for `base_url` with test-friendly timings; `extra` is appended
/// to the `[oauth]` table, `coupa_extra` to `[coupa]`.
pub fn config_text(base_url: &str, coupa_extra: &str, oauth_extra: &str) -> String {
    // Tests count upstream connections: the warm connection (on by
    // default) only where a test asks for it (tests/it/pool.rs).
    let keep_warm = if coupa_extra.contains("keep_warm") {
        ""
    } else {
        "keep_warm = false"
    };
    format!(
        r#"
[listen]
address = "127.0.0.1:0"
shutdown_grace = "10s"

[coupa]
base_url = "{base_url}"
accept = "application/json"
{keep_warm}
{coupa_extra}

[oauth]
client_id = "{CLIENT_ID}"
client_secret = "${{TEST_CLIENT_SECRET}}"
scopes = ["core.common.read", "core.invoice.read"]
activation_delay = "100ms"
retry_initial = "100ms"
retry_max = "500ms"
{oauth_extra}

[admin]
address = "127.0.0.1:0"
"#
    )
}

pub fn parse_config(text: &str) -> Config {
    Config::from_toml(text, Path::new("."), |var| {
        (var == "TEST_CLIENT_SECRET").then(|| CLIENT_SECRET.to_owned())
    })
    .expect("test config is valid")
}

/// The proxy running in this process on port 0.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Drain>,
}

impl TestProxy {
    pub async fn start(config: Config) -> Self {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            app::run(config, Listeners { proxy, admin }, token)
                .await
                .expect("proxy runs")
        });
        Self {
            addr,
            admin: admin_addr,
            shutdown,
            task,
        }
    }

    pub fn url(&self, target: &str) -> String {
        format!("http://{}{}", self.addr, target)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// What the admin listener's `/status.json` answers.
    pub async fn status_json(&self) -> serde_json::Value {
        get(self.admin_url("/status.json"))
            .await
            .json()
            .await
            .expect("/status.json is JSON")
    }

    /// Waits until `/readyz` says a token is held.
    pub async fn wait_ready(&self) {
        let client = http_client();
        let url = self.admin_url("/readyz");
        eventually("proxy ready", || {
            let client = client.clone();
            let url = url.clone();
            async move { matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
    }

    pub async fn stop(self) -> Drain {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// Fake (tokens for a day) + proxy with `listen_extra` added to its
/// `[listen]` table, a token held.
pub async fn start_with_listen(listen_extra: &str) -> (FakeCoupa, TestProxy) {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "").replace(
        "shutdown_grace = \"10s\"",
        &format!("shutdown_grace = \"10s\"\n{listen_extra}"),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    (fake, proxy)
}

/// Fake + proxy with a token held, the common starting point.
pub async fn start_pair(lifetime: Duration) -> (FakeCoupa, TestProxy) {
    let fake = start_fake(lifetime).await;
    let proxy = TestProxy::start(parse_config(&config_text(&fake.base_url(), "", ""))).await;
    proxy.wait_ready().await;
    (fake, proxy)
}

/// A plain HTTP/1.1 client that ignores proxy environment variables.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client builds")
}

/// Polls `condition` until it holds or [`DEADLINE`] passes.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fake's echo in either of Coupa's formats, as the JSON shape
/// (`method`, `target`, `headers` as pairs, `body_bytes`, `body_sha256`),
/// with `format` set to `json` or `xml`: what the request was given.
pub async fn echo_of(response: reqwest::Response) -> serde_json::Value {
    let xml = response
        .headers()
        .get("content-type")
        .is_some_and(|ct| ct.to_str().unwrap_or("").contains("xml"));
    let text = response.text().await.expect("echo body");
    if !xml {
        let mut echo: serde_json::Value = serde_json::from_str(&text).expect("JSON echo");
        echo["format"] = "json".into();
        return echo;
    }
    let unescape = |s: &str| {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
    };
    let element = |name: &str| -> String {
        let open = text.find(&format!("<{name}")).expect("element");
        let start = open + text[open..].find('>').unwrap() + 1;
        let end = start + text[start..].find(&format!("</{name}>")).unwrap();
        unescape(&text[start..end])
    };
    let headers: Vec<serde_json::Value> = text
        .split("<header name=\"")
        .skip(1)
        .map(|piece| {
            let (name, rest) = piece.split_once("\">").unwrap();
            let value = rest.split("</header>").next().unwrap();
            serde_json::json!([unescape(name), unescape(value)])
        })
        .collect();
    assert!(text.starts_with("<?xml"), "an XML document: {text}");
    serde_json::json!({
        "format": "xml",
        "method": element("method"),
        "target": element("target"),
        "headers": headers,
        "body_bytes": element("body-bytes").parse::<u64>().unwrap(),
        "body_sha256": element("body-sha256"),
    })
}

/// The echo's headers as (name, value) pairs.
pub fn echoed_headers(echo: &serde_json::Value) -> Vec<(String, String)> {
    echo["headers"]
        .as_array()
        .expect("headers array")
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_owned(),
                pair[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Reads a hyper response body completely (small bodies only).
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.expect("body reads").to_bytes()
}

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coupa-auth-proxy"))
}

/// A `coupa-auth-proxy run` child process whose stderr is captured.
pub struct ProxyProcess {
    pub child: Child,
    pub logs: Arc<Mutex<String>>,
    /// Copies the child's stderr into `logs`; done once the child exited
    /// and every line was read.
    log_reader: std::thread::JoinHandle<()>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempdir::Dir,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "coupa-proxy-test-{tag}-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst)
    }
}

impl ProxyProcess {
    /// Starts `coupa-auth-proxy [args] run --config <file>` with `config`
    /// written to a temp file and waits for its listen addresses.
    pub fn start(config: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_handing(config, args, env, Vec::new())
    }

    /// [`ProxyProcess::start`] with listening sockets handed over as
    /// systemd hands them (from fd 3, `LISTEN_FDS`, `LISTEN_FDNAMES`;
    /// `LISTEN_PID` empty: the child's pid is not known before it runs).
    pub fn start_handing(
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        sockets: Vec<(std::os::fd::OwnedFd, &str)>,
    ) -> Self {
        Self::start_program(&binary(), &[], config, args, env, sockets)
    }

    /// [`ProxyProcess::start_handing`] running `program` with `pre_args`
    /// (another copy of the binary, or a launcher such as
    /// `systemd-socket-activate` followed by the binary).
    pub fn start_program(
        program: &Path,
        pre_args: &[&str],
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        sockets: Vec<(std::os::fd::OwnedFd, &str)>,
    ) -> Self {
        let dir = tempdir::Dir::new("run");
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(program);
        command
            .args(pre_args)
            .args(["--log-format", "json"])
            .args(args)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        if !sockets.is_empty() {
            use command_fds::{CommandFdExt, FdMapping};
            let names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
            command
                .env("LISTEN_FDS", sockets.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"))
                .env("LISTEN_PID", "");
            let mappings = sockets
                .into_iter()
                .zip(3..)
                .map(|((parent_fd, _), child_fd)| FdMapping {
                    parent_fd,
                    child_fd,
                })
                .collect();
            command.fd_mappings(mappings).unwrap();
        }
        let mut child = command.spawn().expect("binary starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
        let sink = logs.clone();
        let log_reader = std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["message"] == "coupa-auth-proxy started" {
                            let listen = v["listen"].as_str().unwrap().parse().unwrap();
                            let admin = v["admin"].as_str().unwrap().parse().unwrap();
                            let _ = tx.send((listen, admin));
                            sent = true;
                        }
                    }
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (addr, admin) = match rx.recv_timeout(DEADLINE) {
            Ok(pair) => pair,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "binary did not report its addresses; logs:\n{}",
                    logs.lock().unwrap()
                );
            }
        };
        Self {
            child,
            logs,
            log_reader,
            addr,
            admin,
            _dir: dir,
        }
    }

    pub fn url(&self, target: &str) -> String {
        format!("http://{}{}", self.addr, target)
    }

    /// The config file the process runs with (tests rewrite it).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("proxy.toml")
    }

    /// A directory that lives as long as the process, for secret files.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The access lines logged so far (JSON), oldest first.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "coupa_auth_proxy::access")
            .collect()
    }

    /// What the admin listener's `/status.json` answers.
    pub async fn status_json(&self) -> serde_json::Value {
        get(format!("http://{}/status.json", self.admin))
            .await
            .json()
            .await
            .expect("/status.json is JSON")
    }

    /// The status page's HTML.
    pub async fn status_page(&self) -> String {
        get(format!("http://{}/", self.admin))
            .await
            .text()
            .await
            .expect("the status page is text")
    }

    pub async fn wait_ready(&self) {
        let client = http_client();
        let url = format!("http://{}/readyz", self.admin);
        eventually("binary ready", || {
            let client = client.clone();
            let url = url.clone();
            async move { matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
    }

    /// Sends `signal` (`-USR2`, `-INT`, …).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for exit (polling, bounded) and for the last log line to be
    /// read, and returns the exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if self.log_reader.is_finished() {
                    return status.code();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "binary did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory of the process in KiB (Linux `VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`, returning (code, stdout, stderr).
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends `request` as raw bytes (so nothing rewrites it on the way) and
/// reads until the server closes. Returns (status, head, body).
pub async fn raw_request(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
        .await
        .expect("response within deadline")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, head, body)
}

/// Reads one response (head and `Content-Length` body) from a kept
/// connection; `pending` carries bytes read past it. Returns the status,
/// the body and the head (lower-cased).
pub async fn read_response(
    stream: &mut tokio::net::TcpStream,
    pending: &mut Vec<u8>,
) -> (u16, Vec<u8>, String) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if pending.len() >= end + 4 + length {
                    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                    let body = pending[end + 4..end + 4 + length].to_vec();
                    pending.drain(..end + 4 + length);
                    return (status, body, head);
                }
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before a whole response");
            pending.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("a response within the deadline")
}

/// HTTP/2 frames as (type, payload).
pub fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        out.push((bytes[3], bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

/// The bearer token the fake received, from an echo.
pub fn echoed_token(echo: &serde_json::Value) -> String {
    let headers = echoed_headers(echo);
    let auth = header(&headers, "authorization");
    assert_eq!(auth.len(), 1, "exactly one Authorization: {auth:?}");
    auth[0]
        .strip_prefix("Bearer ")
        .expect("bearer scheme")
        .to_owned()
}

/// Test certificate authorities, made fresh in each test.
pub mod pki {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    pub struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    /// A certificate and its key, as PEM and DER.
    pub struct Issued {
        pub cert_pem: String,
        pub key_pem: String,
        pub cert: CertificateDer<'static>,
        pub key: PrivateKeyDer<'static>,
    }

    impl Ca {
        pub fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            Self {
                issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
            }
        }

        pub fn pem(&self) -> String {
            self.issuer.pem()
        }

        pub fn roots(&self) -> rustls::RootCertStore {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            roots
        }

        /// A leaf for `names` (server or client use).
        pub fn issue(&self, names: &[&str]) -> Issued {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &self.issuer)
                .unwrap();
            Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                cert: cert.der().clone(),
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            }
        }

        /// A server configuration for `localhost`, offering h2 and http/1.1.
        pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
            let leaf = self.issue(&["localhost"]);
            let mut server = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.cert], leaf.key)
                .unwrap();
            server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(server)
        }
    }

    pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// An HTTPS client trusting `ca`, presenting `identity` if given.
    pub fn client(ca: &Ca, identity: Option<&Issued>) -> reqwest::Client {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(ca.roots());
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => builder
                .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
                .unwrap(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .no_proxy()
            .use_preconfigured_tls(config)
            .build()
            .unwrap()
    }
}

/// One plain GET with a fresh client (no legacy key).
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Response {
    http_client()
        .get(url)
        .send()
        .await
        .expect("request completes")
}

/// The text an admin listener's `/metrics` answers.
pub async fn scrape(metrics_url: &str) -> String {
    get(metrics_url)
        .await
        .text()
        .await
        .expect("metrics are text")
}

/// Waits until `integration` has at least `depth` requests waiting for a
/// slot of Coupa's budget, as `/metrics` at `metrics_url` says.
pub async fn wait_queued(metrics_url: &str, integration: &str, depth: f64) {
    eventually(
        &format!("{integration} has {depth} requests queued"),
        || async {
            let text = scrape(metrics_url).await;
            metric(
                &text,
                "coupa_proxy_rate_queue_depth",
                &[("integration", integration)],
            ) >= depth
        },
    )
    .await;
}

/// The sum of the samples of `name` with `labels` in a `/metrics` text.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("metrics parse");
    metric_in(&scrape, name, labels)
}

/// [`metric`] over a parsed scrape; a histogram counts its observations.
pub fn metric_in(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            _ => 0.0,
        })
        .sum()
}

/// `listen.header_read_timeout`'s default: a cut well before it shows the
/// configured value was used.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `stream` until the proxy closes it — cleanly: a reset fails — and
/// checks the close was the header-read timeout `configured` (set shorter
/// than the default), counted `since` the head began: not before it, well
/// before the default, and `coupa_proxy_client_head_timeouts_total`
/// reaches `count` on `metrics_url`. Returns what the proxy sent.
pub async fn cut_at_header_timeout(
    stream: &mut tokio::net::TcpStream,
    configured: Duration,
    since: std::time::Instant,
    (metrics_url, count): (&str, f64),
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    assert!(configured * 2 < DEFAULT_HEADER_READ_TIMEOUT);
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection")
        .expect("a clean close, not a reset");
    let took = since.elapsed();
    assert!(
        took >= configured.mul_f64(0.9),
        "cut after {took:?}, before the {configured:?} timeout"
    );
    assert!(
        took < DEFAULT_HEADER_READ_TIMEOUT / 2,
        "cut after {took:?}: the configured {configured:?} was not used"
    );
    eventually("the proxy counted the cut", || async {
        metric(
            &scrape(metrics_url).await,
            "coupa_proxy_client_head_timeouts_total",
            &[],
        ) == count
    })
    .await;
    rest
}

/// Where skipped tests are listed, a line each, for `.ci/run`'s closing
/// line (which empties it first).
pub fn skip_log() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt")
}

/// The calling test cannot run: `missing` is not installed (`install` says
/// how). Under CI (`CI` set, as `.ci/run` sets it) that is a failure.
/// Elsewhere the test passes without running, and says so where it cannot
/// be missed: straight to the terminal (the harness hides what a passing
/// test prints with `eprintln!`, not what it writes to stderr itself) and
/// in [`skip_log`].
pub fn skip(missing: &str, install: &str) {
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {missing} is not installed, and CI must not skip: .ci/run installs it"
    );
    let line = format!(
        "*** SKIPPED {test}: {missing} is not installed ({install}); .ci/run installs it, so CI runs this test ***"
    );
    let _ = writeln!(std::io::stderr(), "\n{line}");
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
    {
        let _ = writeln!(log, "{line}");
    }
}
