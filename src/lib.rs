//! coupa-auth-proxy: lets integrations that only know Coupa's retired
//! `X-COUPA-API-KEY` talk to Coupa's OAuth2-protected API unchanged.
//!
//! # Layout
//! - [`config`]: the TOML file — its shape, `${ENV}` expansion, validation into
//!   [`config::Config`], the redacted summary — one file per pass.
//! - [`secret`]: the redacting wrapper for secret strings.
//! - [`encode`]: hex of digests, HTML escaping, the JSON error body.
//! - [`token`]: fetching ([`token::client`]), holding ([`token::store`]) and
//!   rotating ([`token::refresher`]) the access token — background work;
//!   one fetch across processes ([`token::shared`]); a user's consent, its
//!   `authorize` subcommand and state file ([`token::consent`]).
//! - [`cluster`]: the storage shared with the other proxies of one instance
//!   in Redis/Valkey (connection, the primary through Sentinel failovers,
//!   keys, locks, sealed values) — a leaf the
//!   shared budget and token fetch call; untouched without `[cluster]`.
//! - [`basic_auth`]: HTTP Basic client authentication as RFC 6749 encodes it.
//! - [`proxy`]: the per-request path as named phases — filter, rewrite,
//!   send, 401 replay, response, log — and the upstream pool.
//! - [`server`]: accept loop, connection limits and graceful drain for every listener;
//!   idle HTTP/1.1 connections give their buffers back when many are open.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, the status page (off
//!   loopback behind a password).
//! - [`guesses`]: failed credentials per source address, answered late
//!   past a budget.
//! - [`metrics`]: Prometheus metrics.
//! - [`insight`]: the migration view — what each integration calls.
//! - [`local_oauth`]: the proxy's own `/oauth2/token` for tools that fetch
//!   their own token, and the local tokens it issues.
//! - [`reload`]: SIGHUP and file-change reload of secrets and integrations.
//! - [`app`]: wires the above together for `run`.
//! - [`lifecycle`]: the process beside its supervisor — listening sockets
//!   handed over (systemd socket activation, in-place upgrade), `sd_notify`,
//!   `SIGUSR2`'s in-place upgrade.
//! - [`background`]: one lifecycle for work beside the request path
//!   (spawned with the shutdown token, tracked, awaited after the drain).
//! - [`tls`]: the rustls configurations, outbound and inbound.
//! - [`egress`]: the corporate egress proxy both hops to Coupa take
//!   (`[coupa.egress_proxy]`), or none; never the environment's variables.
//! - [`intercept`]: forward-proxy mode for the one instance
//!   (`[listen.intercept]`): which `CONNECT` is tunnelled, the local CA and
//!   the leaf it mints; `ca init`.
//! - [`telemetry`]: log format and filtering, and warnings a flood repeats
//!   written once a minute.
//! - [`traces`]: OpenTelemetry spans of requests and token fetches, exported
//!   over OTLP/HTTP in the background (`[telemetry] otlp_endpoint`).
//! - [`fake_coupa`]: a fake Coupa instance for tests, benches and the demo.
//! - [`demo`]: the `demo` subcommand.
//! - [`cli`]: each subcommand's body, output and exit code (`main.rs` only
//!   parses and dispatches).
//! - [`live`]: `check --live`, a token and one API call per credential.

#![forbid(unsafe_code)]

/// The error type hyper and the body wrappers pass along.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod admin;
pub mod app;
pub mod background;
pub mod basic_auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod egress;
pub mod encode;
pub mod fake_coupa;
pub mod guesses;
pub mod insight;
pub mod intercept;
pub mod lifecycle;
pub mod live;
pub mod local_oauth;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod traces;
