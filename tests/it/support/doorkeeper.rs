//! A real OAuth 2 authorization server: Doorkeeper (Debian's
//! `ruby-doorkeeper`, the provider of Rails applications) in the minimal
//! app of `tests/doorkeeper/app.rb`, on a free loopback port with its
//! sqlite database in a temp dir, stopped by PID.
//!
//! Missing Ruby or Doorkeeper skips the test loudly on a developer's
//! machine and fails it under CI, since `.ci/run` installs both.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::real::free_port;
use super::tempdir::Dir;

/// The client-credentials client whose secret holds every character that
/// RFC 6749's Basic encoding changes.
pub const CC_CLIENT: &str = "cc-client";
pub const CC_SECRET: &str = "Zx9+/=%:&-dk-secret";
/// A client-credentials client with an unreserved secret (the app's own).
pub const PLAIN_CLIENT: &str = "cc-plain";
pub const PLAIN_SECRET: &str = "plain-secret-Zx9_Qm-4.kT7";
/// The public authorization-code client (PKCE, rotating refresh tokens).
pub const USER_CLIENT: &str = "user-client";

/// Rails boots in about a second; a loaded machine may take much longer.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);

pub struct Doorkeeper {
    child: Child,
    pub port: u16,
    dir: Dir,
}

/// Token counts from the server's database.
#[derive(Debug, serde::Deserialize)]
pub struct Stats {
    /// Access tokens issued to the client-credentials clients.
    pub client_credentials: u64,
    /// Access tokens issued for the consenting user (code or refresh).
    pub user: u64,
}

fn installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        Command::new("ruby")
            .args([
                "-e",
                "require 'rails'; require 'doorkeeper'; require 'sqlite3'",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

impl Doorkeeper {
    /// Starts the server with access tokens living `lifetime`; the user
    /// client's registered redirect URI is `user_redirect`.
    pub fn start(lifetime: Duration, user_redirect: &str) -> Option<Self> {
        if !installed() {
            super::skip(
                "Doorkeeper",
                "apt-get install ruby-doorkeeper ruby-rails ruby-sqlite3",
            );
            return None;
        }
        let dir = Dir::new("doorkeeper");
        let port = free_port();
        let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/doorkeeper/app.rb");
        let child = Command::new("ruby")
            .arg(app)
            .arg(dir.path())
            .arg(port.to_string())
            .arg(lifetime.as_secs().to_string())
            .arg(CC_SECRET)
            .arg(user_redirect)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("ruby starts");
        let server = Self { child, port, dir };
        server.wait_answering();
        Some(server)
    }

    fn wait_answering(&self) {
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            if self.get("/test/stats").is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Doorkeeper did not answer on {}: {}",
                self.port,
                self.log("stderr.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A bodyless request on a fresh connection; the body of a 200.
    fn request(&self, method: &str, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    fn get(&self, path: &str) -> Option<String> {
        self.request("GET", path)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stats(&self) -> Stats {
        let body = self.get("/test/stats").expect("stats answer");
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// Ends every access token early at the server (an administrator's
    /// revocation, a server restart that lost its tokens); refresh tokens
    /// stay valid.
    pub fn end_access_tokens(&self) {
        self.request("POST", "/test/expire")
            .expect("expire answers");
    }

    /// Requests the server logged (WEBrick's access log).
    pub fn access_log(&self) -> String {
        self.log("access.log")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Doorkeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
