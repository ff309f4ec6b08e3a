//! Redis replicated the way production runs it: one primary, one replica
//! and three sentinels (Debian's redis-server and redis-sentinel) on free
//! loopback ports, each with its config in a temp dir, stopped by PID.
//! Sentinels decide quickly here (down after 1 s) so a failover takes a
//! few seconds.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::real::{free_port, redis_command, tool};
use super::tempdir::Dir;

/// The master name the sentinels monitor.
pub const MASTER: &str = "coupa";

pub struct Replicated {
    redis: PathBuf,
    sentinel: PathBuf,
    /// Data nodes by port; `None` once killed.
    nodes: Vec<(u16, Option<Child>)>,
    sentinels: Vec<(u16, Child)>,
    dir: Dir,
}

impl Replicated {
    /// Primary, replica and three sentinels, all agreeing; `None` (loudly)
    /// without the tools on a developer's machine.
    pub fn start() -> Option<Self> {
        let redis = tool("redis-server")?;
        let sentinel = tool("redis-sentinel")?;
        let dir = Dir::new("sentinel");
        let mut set = Self {
            redis,
            sentinel,
            nodes: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        let primary = free_port();
        set.start_node(primary, None);
        set.start_node(free_port(), Some(primary));
        for _ in 0..3 {
            set.start_sentinel(primary);
        }
        set.wait_until("the sentinels see the replica and each other", |set| {
            let master = redis_command(set.sentinels[0].0, &["SENTINEL", "MASTER", MASTER]);
            field(&master, "num-slaves") == Some("1")
                && field(&master, "num-other-sentinels") == Some("2")
                && redis_command(primary, &["INFO", "replication"]).contains("connected_slaves:1")
        });
        Some(set)
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/coupa/0`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER}/0", nodes.join(","))
    }

    /// The primary's port as the first sentinel that answers names it.
    pub async fn primary_port(&self) -> Option<u16> {
        for (port, _) in &self.sentinels {
            let asked = async {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut connection = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(MASTER)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await
                    .ok()
                    .flatten()
            };
            if let Ok(Some((_, found))) = tokio::time::timeout(Duration::from_secs(1), asked).await
            {
                return Some(found);
            }
        }
        None
    }

    /// SIGKILL of the current primary; returns its port.
    pub async fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port().await.expect("a primary is named");
        let node = self
            .nodes
            .iter_mut()
            .find(|(p, _)| *p == port)
            .expect("the primary is ours");
        if let Some(mut child) = node.1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        port
    }

    /// Starts the node on `port` again, empty, as a replica of the current
    /// primary (as an operator brings a failed primary back).
    pub async fn bring_back(&mut self, port: u16) {
        let primary = self.primary_port().await.expect("a primary is named");
        self.nodes.retain(|(p, _)| *p != port);
        self.start_node(port, Some(primary));
        let deadline = Instant::now() + super::DEADLINE;
        while !info_replication(port)
            .await
            .is_some_and(|info| info.contains("master_link_status:up"))
        {
            assert!(
                Instant::now() < deadline,
                "the old primary does not replicate"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the sentinels for a failover while the primary is alive (as
    /// an operator does for maintenance): the primary is demoted and keeps
    /// running, answering `READONLY` to writes. Retried until a replica is
    /// eligible (sentinels learn of a new replica within ~10 s).
    pub async fn manual_failover(&self) {
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            let asked = async {
                let port = self.sentinels[0].0;
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut connection = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(MASTER)
                    .query_async::<String>(&mut connection)
                    .await
                    .ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), asked).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels refused a failover"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits up to `deadline` for the sentinels to name a primary other
    /// than `old`; its port.
    pub async fn wait_for_promotion(&self, old: u16, deadline: Duration) -> u16 {
        let until = Instant::now() + deadline;
        loop {
            if let Some(port) = self.primary_port().await.filter(|p| *p != old) {
                return port;
            }
            assert!(Instant::now() < until, "no failover within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn start_node(&mut self, port: u16, replica_of: Option<u16>) {
        let data = self.dir.path().join(format!("node-{port}"));
        std::fs::create_dir_all(&data).unwrap();
        let mut command = Command::new(&self.redis);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&data);
        if let Some(primary) = replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.nodes.push((port, Some(child)));
        self.wait_until("the data node answers", |_| {
            redis_command(port, &["PING"]).starts_with("+PONG")
        });
    }

    fn start_sentinel(&mut self, primary: u16) {
        let port = free_port();
        let config = self.dir.path().join(format!("sentinel-{port}.conf"));
        // The file must be writable: a sentinel rewrites it as it learns.
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 4000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir = self.dir.path().display(),
            ),
        )
        .unwrap();
        let child = Command::new(&self.sentinel)
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel starts");
        self.sentinels.push((port, child));
        self.wait_until("the sentinel answers", |_| {
            redis_command(port, &["PING"]).starts_with("+PONG")
        });
    }

    fn wait_until(&self, what: &str, condition: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + super::DEADLINE;
        while !condition(self) {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `INFO replication` of the data node on `port`.
async fn info_replication(port: u16) -> Option<String> {
    let asked = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(&mut connection)
            .await
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(1), asked)
        .await
        .ok()
        .flatten()
}

/// A field of `SENTINEL MASTER`'s flat reply (name line, value line).
fn field<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let lines: Vec<&str> = reply.lines().collect();
    let at = lines.iter().position(|l| *l == name)?;
    lines.get(at + 2).copied()
}

impl Drop for Replicated {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (_, child) in &mut self.nodes {
            if let Some(child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
