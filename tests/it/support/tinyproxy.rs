//! A real forward proxy nobody here wrote: Debian's `tinyproxy`, on a free
//! loopback port with its config and log in a temp dir, its outgoing
//! connections from `127.0.0.3` (so the far end can tell them from direct
//! ones), optionally requiring a Basic login. Stopped by PID.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::real::{free_port, tool, wait_listening};
use super::tempdir::Dir;

/// Where the proxy's own outgoing connections come from.
pub const OUTGOING: &str = "127.0.0.3";

pub struct Tinyproxy {
    child: Child,
    binary: PathBuf,
    pub port: u16,
    dir: Dir,
}

impl Tinyproxy {
    /// `login`: (user, password) the proxy requires.
    pub fn start(login: Option<(&str, &str)>) -> Option<Self> {
        let binary = tool("tinyproxy")?;
        let dir = Dir::new("tinyproxy");
        let port = free_port();
        let auth = login
            .map(|(user, password)| format!("BasicAuth {user} {password}\n"))
            .unwrap_or_default();
        std::fs::write(
            dir.path().join("tinyproxy.conf"),
            format!(
                "Port {port}\nListen 127.0.0.1\nBind {OUTGOING}\nTimeout 30\n\
                 LogFile \"{}\"\nLogLevel Connect\nMaxClients 200\nAllow 127.0.0.1\n{auth}",
                dir.path().join("tinyproxy.log").display()
            ),
        )
        .unwrap();
        let child = spawn(&binary, &dir);
        let proxy = Self {
            child,
            binary,
            port,
            dir,
        };
        proxy.wait_listening();
        Some(proxy)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `CONNECT host:port` targets the proxy was asked for, in order.
    pub fn connects(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split("Request (file descriptor").nth(1))
            .filter_map(|l| l.split("CONNECT ").nth(1))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// Stops the proxy at once; tunnels through it break.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.child = spawn(&self.binary, &self.dir);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        wait_listening(self.port, "tinyproxy", || self.log());
    }
}

fn spawn(binary: &PathBuf, dir: &Dir) -> Child {
    Command::new(binary)
        .arg("-d")
        .arg("-c")
        .arg(dir.path().join("tinyproxy.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tinyproxy starts")
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
