//! Software nobody here wrote, started by the tests: a real nginx as the
//! Coupa instance, a real redis-server for shared state, and helpers to
//! find the real clients (curl, h2load).
//!
//! Each server gets a free loopback port and a config in a temp dir, is
//! waited for until it answers, and is stopped by PID. A missing tool
//! skips its test with a loud message on a developer's machine; under CI
//! (`CI` set) it fails instead, since `.ci/run` installs every one.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pki::Ca;
use super::tempdir::Dir;

/// The path of `tool` if it is installed; `None` (after saying so loudly)
/// when it is not and this is not CI.
pub fn tool(tool: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(tool))
        .find(|path| path.exists());
    if found.is_none() {
        super::skip(
            tool,
            "apt-get install nginx-light redis-server nghttp2-client curl",
        );
    }
    found
}

/// The project's test Python (`.venv`, made by `.ci/run`) if it can
/// import `module`; `None` (after saying so loudly) when not, and a
/// failure under CI.
pub fn python_with(module: &str) -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let imports = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !imports {
        super::skip(
            &format!("Python {module}"),
            "python3 -m venv .venv && .venv/bin/pip install requests-oauthlib opentelemetry-sdk opentelemetry-proto",
        );
        return None;
    }
    Some(python)
}

/// Waits until something listens on `port` of loopback; on timeout the
/// failure shows `log` of the server named `what`.
pub fn wait_listening(port: u16, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + super::DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the nginx instance behaves.
pub struct NginxOptions {
    /// Requests one client connection may carry before nginx closes it
    /// (HTTP/1.1 and HTTP/2 alike since nginx 1.19.7).
    pub keepalive_requests: u32,
    /// `http2_max_concurrent_streams`.
    pub max_concurrent_streams: u32,
}

impl Default for NginxOptions {
    fn default() -> Self {
        Self {
            keepalive_requests: 1000,
            max_concurrent_streams: 128,
        }
    }
}

/// nginx serving TLS (HTTP/1.1 and h2 by ALPN) with a test CA's
/// certificate for 127.0.0.1. It answers `/api/*` with JSON naming what it
/// saw, and refuses a request that still carries `X-COUPA-API-KEY` (400) or
/// lacks a bearer (401), as an instance behind a strict front would.
pub struct Nginx {
    child: Child,
    binary: PathBuf,
    pub port: u16,
    pub dir: Dir,
    /// The CA that signed nginx's certificate, for `coupa.ca_file`.
    pub ca_file: PathBuf,
}

impl Nginx {
    pub fn start(options: NginxOptions) -> Option<Self> {
        let nginx = tool("nginx")?;
        let dir = Dir::new("nginx");
        let ca = Ca::new("coupa-auth-proxy nginx test CA");
        let leaf = ca.issue(&["127.0.0.1", "localhost"]);
        let d = dir.path().display().to_string();
        std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let port = free_port();
        let NginxOptions {
            keepalive_requests,
            max_concurrent_streams,
        } = options;
        let prelude = prelude(&d);
        let config = format!(
            r#"{prelude}
    log_format conns '$connection $connection_requests $server_protocol $status $request_method';
    access_log {d}/access.log conns;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        keepalive_requests {keepalive_requests};
        http2_max_concurrent_streams {max_concurrent_streams};
        default_type application/json;
        location / {{
            if ($http_x_coupa_api_key) {{
                return 400 '{{"error":"the legacy key reached the instance"}}';
            }}
            if ($http_authorization !~ "^Bearer .") {{
                return 401 '{{"error":"no bearer token"}}';
            }}
            return 200 '{{"ok":true,"uri":"$request_uri","method":"$request_method","protocol":"$server_protocol","accept":"$http_accept"}}';
        }}
    }}
}}
"#
        );
        Some(Self::launch(nginx, dir, port, ca_file, &config))
    }

    /// nginx over plain HTTP answering every request `200` with its raw
    /// request target (`$request_uri`): the oracle of what a lenient
    /// front accepts, as Coupa's own edge would.
    pub fn start_echoing_targets() -> Option<Self> {
        let nginx = tool("nginx")?;
        let dir = Dir::new("nginx-targets");
        let prelude = prelude(&dir.path().display().to_string());
        let port = free_port();
        let config = format!(
            r#"{prelude}
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        default_type text/plain;
        location / {{
            return 200 "$request_uri";
        }}
    }}
}}
"#
        );
        let ca_file = dir.path().join("no-tls");
        Some(Self::launch(nginx, dir, port, ca_file, &config))
    }

    /// nginx over plain HTTP in front of `upstream` playing Coupa's
    /// per-instance limit with `limit_req` (`per_second`, `burst`,
    /// `nodelay`, 429 beyond, no `Retry-After`): every client of the
    /// instance, the proxy's or not, shares it.
    pub fn start_limiting(
        upstream: std::net::SocketAddr,
        per_second: u32,
        burst: u32,
    ) -> Option<Self> {
        let nginx = tool("nginx")?;
        let dir = Dir::new("nginx-limit");
        let prelude = prelude(&dir.path().display().to_string());
        let port = free_port();
        let config = format!(
            r#"{prelude}
    access_log off;
    limit_req_zone $server_name zone=instance:1m rate={per_second}r/s;
    limit_req_status 429;
    upstream coupa {{
        server {upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name coupa;
        location / {{
            limit_req zone=instance burst={burst} nodelay;
            proxy_pass http://coupa;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let ca_file = dir.path().join("no-tls");
        Some(Self::launch(nginx, dir, port, ca_file, &config))
    }

    /// Writes `config`, starts nginx on it and waits until it listens.
    fn launch(binary: PathBuf, dir: Dir, port: u16, ca_file: PathBuf, config: &str) -> Self {
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        let child = spawn(&binary, &dir);
        let nginx = Self {
            child,
            binary,
            port,
            dir,
            ca_file,
        };
        nginx.wait_listening();
        nginx
    }

    /// Starts nginx again (after [`Nginx::kill`]) on the same port.
    pub fn restart(&mut self) {
        self.child = spawn(&self.binary, &self.dir);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        wait_listening(self.port, "nginx", || self.error_log());
    }

    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Lines of nginx's error log that say a request was malformed.
    pub fn malformed_request_lines(&self) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| {
                l.contains("client sent") || l.contains("invalid") || l.contains("duplicate")
            })
            .map(str::to_owned)
            .collect()
    }

    /// (connection serial, protocol, status) of every request logged.
    pub fn access_log(&self) -> Vec<(String, String, u16)> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                Some((
                    fields.first()?.to_string(),
                    fields.get(2)?.to_string(),
                    fields.get(3)?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// Stops nginx at once (SIGTERM: fast shutdown, connections dropped).
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// One worker in the foreground with its files in `d`; the `http` block
/// is left open for the caller's logs and servers.
fn prelude(d: &str) -> String {
    format!(
        r#"
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;"#
    )
}

fn spawn(nginx: &PathBuf, dir: &Dir) -> Child {
    Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts")
}

/// A real `redis-server` on a free loopback port, no persistence.
pub struct Redis {
    child: Child,
    binary: PathBuf,
    pub port: u16,
    dir: Dir,
}

impl Redis {
    pub fn start() -> Option<Self> {
        let binary = tool("redis-server")?;
        let dir = Dir::new("redis");
        let port = free_port();
        let redis = Self {
            child: spawn_redis(&binary, port, &dir),
            binary,
            port,
            dir,
        };
        redis.wait_answering();
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn wait_answering(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut pong = [0u8; 7];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut pong).is_ok()
                    && &pong == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server at once (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.child = spawn_redis(&self.binary, self.port, &self.dir);
        self.wait_answering();
    }

    /// Runs one command with `redis-cli`-free raw RESP and returns the reply.
    pub fn command(&self, args: &[&str]) -> String {
        redis_command(self.port, args)
    }
}

/// One command to the Redis-protocol server on `port` (a data node or a
/// sentinel), in raw RESP; the reply as text ("" when it does not answer).
pub fn redis_command(port: u16, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_redis(binary: &PathBuf, port: u16, dir: &Dir) -> Child {
    Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}
