//! An in-place upgrade without a supervisor (nginx's `USR2`): on `SIGUSR2`
//! the process starts the binary at its own path again — the new version,
//! if the file was replaced — handing it the listening sockets (fd 3 and
//! 4, named `proxy` and `admin`, as systemd would). The new process says
//! `READY=1` over a notify socket of the old one's once every credential
//! holds a token; then the old one drains as on SIGTERM. The sockets never
//! close, so no connection is refused: until the old process stops
//! accepting, the kernel hands connections to either. A new process that
//! exits, or is not ready within [`READY_WITHIN`], is stopped, and the old
//! one keeps serving; the log says why. The notify socket is the old
//! process's own and goes with it; the new one then stops notifying.
//!
//! Under systemd, restart with the socket unit instead: systemd follows
//! one main process, and the new one would not be it.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::net::{TcpListener, UnixDatagram};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long a new process may take to hold its tokens.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {path}: {source}")]
    Start {
        path: String,
        source: std::io::Error,
    },
    #[error("the new process exited before it was ready ({0}); see its log lines above")]
    Exited(std::process::ExitStatus),
    #[error("the new process was not ready within {0:?}; stopped it")]
    NotReady(Duration),
    #[error("cannot hand the sockets over: {0}")]
    Sockets(std::io::Error),
}

/// What an upgrade needs, captured at start: the binary's path before
/// anything replaces it, the arguments, and the listening sockets.
pub struct Upgrade {
    exe: PathBuf,
    args: Vec<OsString>,
    proxy: OwnedFd,
    admin: OwnedFd,
}

impl Upgrade {
    pub fn prepare(proxy: &TcpListener, admin: &TcpListener) -> std::io::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
            proxy: proxy.as_fd().try_clone_to_owned()?,
            admin: admin.as_fd().try_clone_to_owned()?,
        })
    }

    /// Upgrades on each `SIGUSR2` until one succeeds, which cancels
    /// `shutdown`; ends with `shutdown` too.
    pub fn spawn(self, shutdown: CancellationToken) {
        let mut signal =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) {
                Ok(signal) => signal,
                Err(error) => {
                    warn!(%error, "cannot listen for SIGUSR2; in-place upgrades are off");
                    return;
                }
            };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = signal.recv() => if received.is_none() { return },
                }
                info!(binary = %self.exe.display(), "SIGUSR2: starting the new process with the listening sockets");
                match self.start_and_wait().await {
                    Ok(pid) => {
                        info!(new_pid = pid, "upgrade: the new process is ready; this one stops accepting and drains");
                        shutdown.cancel();
                        return;
                    }
                    Err(err) => error!(error = %err, "upgrade failed; this process keeps serving"),
                }
            }
        });
    }

    async fn start_and_wait(&self) -> Result<u32, UpgradeError> {
        let dir = tempfile::tempdir().map_err(UpgradeError::Sockets)?;
        let path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&path).map_err(UpgradeError::Sockets)?;
        let mappings = vec![
            FdMapping {
                parent_fd: self.proxy.try_clone().map_err(UpgradeError::Sockets)?,
                child_fd: 3,
            },
            FdMapping {
                parent_fd: self.admin.try_clone().map_err(UpgradeError::Sockets)?,
                child_fd: 4,
            },
        ];
        let mut command = Command::new(&self.exe);
        command
            .args(&self.args)
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "proxy:admin")
            // The child's pid is not known before it runs: empty means
            // "for whoever reads them", as the sockets crate reads it.
            .env("LISTEN_PID", "")
            .env("NOTIFY_SOCKET", &path)
            .stdin(Stdio::null());
        command
            .fd_mappings(mappings)
            .map_err(|e| UpgradeError::Sockets(std::io::Error::other(e)))?;
        let mut child = command.spawn().map_err(|source| UpgradeError::Start {
            path: self.exe.display().to_string(),
            source,
        })?;
        let pid = child.id();
        match wait_ready(&notify, &mut child).await {
            Ok(()) => Ok(pid),
            Err(err) => {
                let _ = child.kill();
                let _ = tokio::task::spawn_blocking(move || child.wait()).await;
                Err(err)
            }
        }
    }
}

/// Waits for `READY=1` from `child`, its exit, or [`READY_WITHIN`].
async fn wait_ready(notify: &UnixDatagram, child: &mut Child) -> Result<(), UpgradeError> {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    let mut message = [0u8; 4096];
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpgradeError::Exited(status));
        }
        tokio::select! {
            received = notify.recv(&mut message) => {
                let n = received.map_err(UpgradeError::Sockets)?;
                if message[..n].split(|&b| b == b'\n').any(|line| line == b"READY=1") {
                    return Ok(());
                }
            }
            // The child's exit is polled: it is not this runtime's child.
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => return Err(UpgradeError::NotReady(READY_WITHIN)),
        }
    }
}
