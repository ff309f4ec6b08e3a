//! The process's life beside its supervisor, so that restarts, upgrades
//! and rollouts refuse no connection:
//! - [`sockets`]: listening sockets handed over instead of bound — by
//!   systemd (socket activation: `LISTEN_FDS`, `LISTEN_FDNAMES`) or by the
//!   previous process on an in-place upgrade — so they outlive the process
//!   and connections wait in the kernel's backlog meanwhile;
//! - [`notify`]: `sd_notify` — `READY=1` once every credential holds a
//!   token, `RELOADING=1`/`READY=1` around a reload, `STOPPING=1` at the
//!   drain, a one-line `STATUS=`, the watchdog;
//! - [`upgrade`]: `SIGUSR2` starts the binary at its own path again with
//!   the listening sockets, and hands over once the new process is ready
//!   (nginx's convention).
//!
//! Without a supervisor (no `LISTEN_FDS`, no `NOTIFY_SOCKET`) each part is
//! a no-op and the process binds its addresses as before.

pub mod notify;
pub mod sockets;
pub mod upgrade;
