//! The things under load: the upstream alone (`direct`), this proxy (and its
//! variants with one lever turned), nginx and HAProxy doing the same job.
//! Each proxy is a child process pinned to the proxy core, started on free
//! loopback ports with its config in the run's work directory.
//!
//! Size: most of it is the three config templates (proxy, nginx, HAProxy),
//! kept whole so the jobs they do can be compared side by side.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{CLIENT_ID, CLIENT_SECRET, LEGACY_KEY, PROXY_CORE};

/// Something that answers on a port: the upstream itself, or a proxy in
/// front of it (a child process pinned to the proxy core).
pub struct Target {
    pub name: &'static str,
    pub port: u16,
    pub h2_port: u16,
    pub child: Option<Child>,
    /// Extra headers the load sends (direct needs the bearer itself).
    pub headers: Vec<(String, String)>,
    /// Where this target's own logs and files live.
    pub _dir: Option<PathBuf>,
}

impl Target {
    /// The upstream itself; the load sends the bearer and Accept that a
    /// proxy would add.
    pub fn direct(upstream: u16, token: &str) -> Self {
        Target {
            name: "direct",
            port: upstream,
            h2_port: upstream,
            child: None,
            headers: vec![
                ("Authorization".into(), format!("Bearer {token}")),
                ("Accept".into(), "application/json".into()),
            ],
            _dir: None,
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let root = child.id();
        let mut pids = vec![root];
        // nginx forks its worker; count master and children.
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    let after = stat.rsplit(')').next().unwrap_or("");
                    let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
                    if ppid == Some(root) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    /// (user, system) CPU of the target's processes, in clock ticks.
    pub fn cpu_ticks(&self) -> (u64, u64) {
        self.pids()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                // Fields after the command: state is 0, utime 11, stime 12.
                let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                (utime, stime)
            })
            .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps))
    }

    /// Starts a new peak-RSS window, so each run reports its own peak
    /// rather than the largest since start-up (`clear_refs` 5).
    pub fn reset_peak_rss(&self) {
        for pid in self.pids() {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
    }

    /// Sum of the peak resident sets of the target's processes (KiB).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pids = self.pids();
        if pids.is_empty() {
            return None;
        }
        Some(
            pids.iter()
                .filter_map(|pid| status_kib(*pid, "VmHWM:"))
                .sum(),
        )
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn require_tools() {
    let missing: Vec<&str> = [
        "wrk",
        "h2load",
        "nginx",
        "haproxy",
        "redis-server",
        "taskset",
    ]
    .into_iter()
    .filter(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
    .collect();
    if !missing.is_empty() {
        eprintln!(
            "load bench: missing {}; run bench/install-tools.sh first",
            missing.join(", ")
        );
        std::process::exit(2);
    }
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pinned(core: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", core]).arg(program);
    command
}

/// How a proxy under test runs: the default (`proxy`), or one lever
/// turned the other way, to show what it is worth.
#[derive(Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    /// Per-request access log lines on (`info`) instead of `warn`.
    pub log: bool,
    /// `[runtime] flavor`.
    pub flavor: &'static str,
    /// `[coupa.rate_limit]` (set far above the load, so only its cost
    /// shows), local or shared through a redis-server.
    pub budget: Budget,
    /// `coupa.response_buffer = 0`: answers stream at the client's pace
    /// instead of being taken off Coupa's connection first.
    pub stream: bool,
    /// The scenario a variant is compared in.
    pub scenario: &'static str,
    /// Runs the other build named by `BENCH_PROXY_B` instead of this one,
    /// to weigh a lever that is a build choice (allocator, crypto).
    pub other_build: bool,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Budget {
    Off,
    Local,
    /// Shared through the bench's redis-server (`REDIS_PORT`).
    Shared,
}

/// The bench's redis-server, when a shared-budget variant runs.
pub static REDIS_PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

pub const PROXY: Variant = Variant {
    name: "proxy",
    log: false,
    flavor: "auto",
    budget: Budget::Off,
    stream: false,
    scenario: "h1-c50-1k",
    other_build: false,
};

/// [`PROXY`] built the other way (`BENCH_PROXY_B`), when that is set.
pub fn proxy_b() -> Option<Variant> {
    std::env::var_os("BENCH_PROXY_B").map(|_| Variant {
        name: "proxy-b",
        other_build: true,
        ..PROXY
    })
}

/// Each compared in its own scenario only.
pub const VARIANTS: [Variant; 5] = [
    Variant {
        name: "proxy+log",
        log: true,
        ..PROXY
    },
    Variant {
        name: "proxy+mt",
        flavor: "multi_thread",
        ..PROXY
    },
    Variant {
        name: "proxy+limit",
        budget: Budget::Local,
        ..PROXY
    },
    Variant {
        name: "proxy+cluster",
        budget: Budget::Shared,
        ..PROXY
    },
    Variant {
        name: "proxy+stream",
        stream: true,
        scenario: "h1-c16-64k",
        ..PROXY
    },
];

/// Starts the redis-server the shared-budget variant uses (on the load
/// core, like the upstream). The child is left to the caller.
pub fn start_redis(work: &Path) -> Child {
    let (child, port) = start_redis_on(work);
    let _ = REDIS_PORT.set(port);
    child
}

/// A redis-server of its own on a free port: the process and its port.
pub fn start_redis_on(work: &Path) -> (Child, u16) {
    let port = free_port();
    let child = pinned(LOAD_CORE_FOR_REDIS, "redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    wait_for_port(port, "redis-server");
    (child, port)
}

const LOAD_CORE_FOR_REDIS: &str = crate::LOAD_CORE;

/// The `[coupa.rate_limit]` and `[cluster]` text of a variant.
fn budget_config(budget: Budget, dir: &Path) -> String {
    let limit = "[coupa.rate_limit]\nper_second = 1000000\nburst = 100000\nmax_queue = 1000\n";
    match budget {
        Budget::Off => String::new(),
        Budget::Local => limit.to_owned(),
        Budget::Shared => {
            let key = dir.join("cluster.key");
            std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
            let port = REDIS_PORT.get().copied().expect("redis-server started");
            format!(
                "{limit}[cluster]\nredis_url = \"redis://127.0.0.1:{port}/0\"\nencryption_key_file = \"{}\"\n",
                key.display()
            )
        }
    }
}

/// Where the proxies under test send requests: the fake Coupa in plain
/// HTTP, or an nginx serving TLS in front of it ([`start_tls_upstream`]).
pub struct Upstream {
    pub port: u16,
    /// The CA that signed the upstream's certificate; `None`: plain HTTP.
    pub ca_file: Option<PathBuf>,
}

impl Upstream {
    pub fn plain(port: u16) -> Self {
        Upstream {
            port,
            ca_file: None,
        }
    }

    fn base_url(&self) -> String {
        match self.ca_file {
            Some(_) => format!("https://localhost:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// A target's files: one folder per target and upstream kind.
    fn dir(&self, work: &Path, name: &str) -> PathBuf {
        work.join(match self.ca_file {
            Some(_) => format!("{name}-tls"),
            None => name.to_owned(),
        })
    }
}

pub fn start_proxy(upstream: &Upstream, work: &Path, variant: Variant) -> Target {
    start_proxy_with(upstream, work, variant, &[])
}

/// The proxy, run through `wrapper` (e.g. valgrind) when one is given.
pub fn start_proxy_with(
    upstream: &Upstream,
    work: &Path,
    variant: Variant,
    wrapper: &[&str],
) -> Target {
    let Variant {
        name,
        log,
        flavor,
        budget,
        stream,
        scenario: _,
        other_build,
    } = variant;
    let port = free_port();
    let admin = free_port();
    let dir = upstream.dir(work, name);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = upstream
        .ca_file
        .as_ref()
        .map(|ca| format!("ca_file = \"{}\"\n", ca.display()))
        .unwrap_or_default();
    // As many upstream connections as the load needs, like the nginx and
    // HAProxy targets (the default cap of 32 would queue the 50- and
    // 64-connection rows).
    let coupa = format!(
        "{ca_file}max_connections = 128\n{}",
        if stream { "response_buffer = 0\n" } else { "" }
    );
    let mut tail = format!(
        "[reload]\nwatch_interval = \"0s\"\n[runtime]\nflavor = \"{flavor}\"\n{}",
        budget_config(budget, &dir)
    );
    // This build only: an older one may not know the table.
    if let (Some(collector), false) = (std::env::var_os("BENCH_OTLP_ENDPOINT"), other_build) {
        tail.push_str(&format!(
            "[telemetry]\notlp_endpoint = \"{}\"\n",
            collector.to_string_lossy()
        ));
    }
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        proxy_config(port, admin, &upstream.base_url(), &coupa, &tail),
    )
    .unwrap();
    let binary = match other_build {
        true => std::env::var_os("BENCH_PROXY_B")
            .expect("BENCH_PROXY_B names the other build")
            .into(),
        false => PathBuf::from(env!("CARGO_BIN_EXE_coupa-auth-proxy")),
    };
    let child = spawn_binary(&binary, &config, &dir.join("proxy.log"), log, wrapper);
    wait_for_port(port, "proxy");
    wait_ready(admin, "proxy");
    Target {
        name,
        port,
        // The proxy serves HTTP/1.1 and h2c on one port.
        h2_port: port,
        child: Some(child),
        headers: vec![("X-COUPA-API-KEY".into(), LEGACY_KEY.into())],
        _dir: Some(dir),
    }
}

/// A proxy config for the bench: listening on `port`, admin on `admin`,
/// Coupa at `base_url` with `coupa` added to its table, the bench's OAuth
/// client, then `tail` (further tables).
pub fn proxy_config(port: u16, admin: u16, base_url: &str, coupa: &str, tail: &str) -> String {
    format!(
        r#"
[listen]
address = "127.0.0.1:{port}"
[coupa]
base_url = "{base_url}"
accept = "application/json"
{coupa}
[oauth]
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
scopes = ["core.common.read"]
activation_delay = "0s"
[admin]
address = "127.0.0.1:{admin}"
{tail}"#
    )
}

/// The proxy binary on [`PROXY_CORE`] with `config`, its log to `log_file`
/// (access lines with `log`), run through `wrapper` (e.g. valgrind) if one
/// is given. Returns at once.
pub fn spawn_proxy(config: &Path, log_file: &Path, log: bool, wrapper: &[&str]) -> Child {
    let binary = Path::new(env!("CARGO_BIN_EXE_coupa-auth-proxy"));
    spawn_binary(binary, config, log_file, log, wrapper)
}

fn spawn_binary(
    binary: &Path,
    config: &Path,
    log_file: &Path,
    log: bool,
    wrapper: &[&str],
) -> Child {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = pinned(PROXY_CORE, program);
            command.args(args).arg(binary);
            command
        }
        None => pinned(PROXY_CORE, binary),
    };
    command
        .args([
            "--log-level",
            if log { "info" } else { "warn" },
            "run",
            "--config",
        ])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_file).unwrap())
        .spawn()
        .expect("proxy starts")
}

/// Waits until the admin listener on `admin` says ready (a token held).
pub fn wait_ready(admin: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers_200(admin, "/readyz") {
        assert!(Instant::now() < deadline, "{what} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn answers_200(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

pub fn start_nginx(upstream: &Upstream, token: &str, work: &Path) -> Target {
    let port = free_port();
    let h2_port = free_port();
    let dir = upstream.dir(work, "nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("nginx.conf");
    let port_up = upstream.port;
    // Over TLS as the issue's by-hand runs did it: certificate verified,
    // sessions reused, keep-alive.
    let (scheme, tls) = match &upstream.ca_file {
        Some(ca) => (
            "https",
            format!(
                "proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {};\n            \
                 proxy_ssl_name localhost;\n            proxy_ssl_server_name on;\n            \
                 proxy_ssl_session_reuse on;",
                ca.display()
            ),
        ),
        None => ("http", String::new()),
    };
    std::fs::write(
        &config,
        format!(
            r#"{prelude}
    upstream coupa {{
        server 127.0.0.1:{port_up};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{h2_port} http2;
        keepalive_requests 1000000;
        location / {{
            proxy_pass {scheme}://coupa;
            {tls}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{port_up};
            proxy_set_header Authorization "Bearer {token}";
            proxy_set_header Accept "application/json";
            proxy_set_header X-COUPA-API-KEY "";
        }}
    }}
}}
"#,
            prelude = nginx_prelude(&dir),
        ),
    )
    .unwrap();
    let child = spawn_nginx(PROXY_CORE, &dir, &config, port, "nginx");
    Target {
        name: "nginx",
        port,
        h2_port,
        child: Some(child),
        headers: vec![("X-COUPA-API-KEY".into(), LEGACY_KEY.into())],
        _dir: Some(dir),
    }
}

/// nginx doing what an API gateway does in front of one upstream: the
/// bearer injected, and `limit_req` at `rate` per second with a delaying
/// queue of `queue` (requests wait their turn in one queue; past it, 429).
/// Its files in `dir`; returns the process and its port.
pub fn start_rate_limited_nginx(
    upstream: u16,
    token: &str,
    dir: &Path,
    rate: f64,
    queue: usize,
) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            r#"{prelude}
    limit_req_zone $server_port zone=coupa:1m rate={rate}r/s;
    limit_req_status 429;
    upstream coupa {{
        server 127.0.0.1:{upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            limit_req zone=coupa burst={queue};
            proxy_pass http://coupa;
            proxy_http_version 1.1;
            proxy_read_timeout 120s;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_set_header Accept "application/json";
            proxy_set_header X-COUPA-API-KEY "";
        }}
    }}
}}
"#,
            prelude = nginx_prelude(dir),
        ),
    )
    .unwrap();
    (
        spawn_nginx(PROXY_CORE, dir, &config, port, "rate-limited nginx"),
        port,
    )
}

pub fn start_haproxy(upstream: u16, token: &str, work: &Path) -> Target {
    let port = free_port();
    let h2_port = free_port();
    let dir = work.join("haproxy");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            r#"
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{h2_port} proto h2
    http-request del-header X-COUPA-API-KEY
    http-request set-header Authorization "Bearer {token}"
    http-request set-header Accept application/json
    default_backend coupa
backend coupa
    server up 127.0.0.1:{upstream}
"#
        ),
    )
    .unwrap();
    let child = pinned(PROXY_CORE, "haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    wait_for_port(port, "haproxy");
    Target {
        name: "haproxy",
        port,
        h2_port,
        child: Some(child),
        headers: vec![("X-COUPA-API-KEY".into(), LEGACY_KEY.into())],
        _dir: Some(dir),
    }
}

/// nginx on the load core serving TLS as the instance: `/oauth2/` goes on
/// to the fake Coupa (so the proxy fetches a real token), every other path
/// answers the fake's fast ~1 KiB JSON when a bearer came with it. Returns
/// the nginx (a [`Target`], so dropping it stops nginx gracefully: a killed
/// master leaves its worker running) and the upstream to hand the proxies.
pub fn start_tls_upstream(fake: u16, work: &Path) -> (Target, Upstream) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = work.join("upstream-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf whose issuer name equals its
    // subject (rcgen's default for both) for self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "load bench CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&key, &ca).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let body = String::from_utf8(coupa_auth_proxy::fake_coupa::fast_body(1).to_vec()).unwrap();
    let port = free_port();
    let d = dir.display();
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            r#"{prelude}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        keepalive_requests 1000000;
        location /oauth2/ {{
            proxy_pass http://127.0.0.1:{fake};
        }}
        location / {{
            if ($http_authorization !~ "^Bearer ") {{ return 401; }}
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"#,
            prelude = nginx_prelude(&dir),
        ),
    )
    .unwrap();
    let child = spawn_nginx(
        crate::LOAD_CORE,
        &dir,
        &config,
        port,
        "nginx (TLS upstream)",
    );
    (
        Target {
            name: "upstream-tls",
            port,
            h2_port: port,
            child: Some(child),
            headers: Vec::new(),
            _dir: Some(dir),
        },
        Upstream {
            port,
            ca_file: Some(ca_file),
        },
    )
}

/// What every nginx here starts its configuration with: one worker in the
/// foreground, its files in `dir`, no access log; the `http` block is left
/// open for the caller's upstreams and servers.
pub fn nginx_prelude(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;"#
    )
}

/// Starts nginx with `config` on `core` and waits until it listens on `port`.
pub fn spawn_nginx(core: &str, dir: &Path, config: &Path, port: u16, what: &str) -> Child {
    let child = pinned(core, "nginx")
        .args(["-p"])
        .arg(dir)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    wait_for_port(port, what);
    child
}
