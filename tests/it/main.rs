//! The integration tests: one binary (one link step instead of one per
//! file), a module per promise area. Each drives the real binary or the
//! in-process server over real sockets; `support` starts the fake Coupa,
//! the proxy and the real servers (nginx, Redis, Doorkeeper) they need.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

mod accept;
mod admin_access;
mod bad_input;
mod cli;
mod cluster;
mod consent;
mod coupa_429;
mod demo;
mod deploy;
mod docs;
mod egress;
mod failure_logs;
mod fairness;
mod forwarding;
mod guessing;
mod idle_buffers;
mod inbound_tls;
mod insight;
mod integrations;
mod intercept;
mod interop_clients;
mod interop_nginx;
mod layout;
mod local_oauth;
mod operate;
mod pool;
mod real_oauth;
mod records;
mod reload;
mod resilience;
mod restarts;
mod rotation;
mod secrets;
mod sentinel;
mod shutdown;
mod slow_clients;
mod slow_readers;
mod slowhttptest;
mod streaming;
mod targets;
mod tls;
mod token_cli;
mod traces;
