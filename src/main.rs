//! The `coupa-auth-proxy` binary: CLI parsing, logging, exit codes. The work
//! itself lives in the library.
//!
//! Size: one handler per subcommand, each a few dozen lines of argument
//! and exit-code mapping; moving them apart would only scatter the CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use coupa_auth_proxy::app::{self, Listeners};
use coupa_auth_proxy::cluster::{Cluster, ClusterMetrics};
use coupa_auth_proxy::config::{Config, CONFIG_ENV};
use coupa_auth_proxy::config::{Credential, RuntimeFlavor};
use coupa_auth_proxy::telemetry::{self, LogFormat};
use coupa_auth_proxy::token::consent::SharedConsent;
use coupa_auth_proxy::token::refresher::TokenSource;
use coupa_auth_proxy::token::source::SourceError;
use coupa_auth_proxy::token::{CredentialSource, TokenClient, TokenRequest, TokenStore};
use coupa_auth_proxy::{demo, tls};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration problem (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "coupa-auth-proxy", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. `info`, `warn,coupa_auth_proxy=debug`); overrides RUST_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(ConfigArg),
    /// Validate the configuration and print a summary (secrets redacted).
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also fetch a token with each credential and make one API call.
        #[arg(long)]
        live: bool,
        /// The API call `--live` makes.
        #[arg(long, default_value = coupa_auth_proxy::live::DEFAULT_LIVE_PATH)]
        live_path: String,
    },
    /// Fetch one access token and print it on stdout (expiry and scopes on
    /// stderr), for tools that take a ready-made token. The output is a
    /// credential: treat it like the client secret.
    Token {
        /// Configuration file.
        #[arg(long, env = CONFIG_ENV)]
        config: PathBuf,
        /// The `[oauth.NAME]` credential to use (default: the only one, or `default`).
        #[arg(long)]
        credential: Option<String>,
        /// Print the token endpoint's whole JSON answer instead.
        #[arg(long)]
        json: bool,
    },
    /// Give a user's one-time consent for an `authorization_code` or
    /// `device_code` credential and store the tokens in its state_file.
    Authorize {
        /// Configuration file.
        #[arg(long, env = CONFIG_ENV)]
        config: PathBuf,
        /// The `[oauth.NAME]` credential to authorize (default: the only one, or `default`).
        #[arg(long)]
        credential: Option<String>,
        /// Give up when the consent has not arrived within this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Read a legacy API key (or a local OAuth client secret) on stdin and
    /// print its SHA-256, for `api_key_sha256` (or
    /// `oauth_client_secret_sha256`) in an `[[integration]]` table.
    HashKey,
    /// Start a fake Coupa and the proxy in front of it, on loopback.
    Demo {
        /// Proxy address (a free port is used if this one is taken).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin address (a free port is used if this one is taken).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, env = CONFIG_ENV)]
    config: PathBuf,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

fn config_failure(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_CONFIG,
        error: error.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = telemetry::init(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("error: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Check {
            config,
            live,
            live_path,
        } => check(&config.config, live.then_some(live_path.as_str())),
        Command::HashKey => hash_key(),
        Command::Authorize {
            config,
            credential,
            timeout,
        } => authorize(&config, credential.as_deref(), timeout),
        Command::Token {
            config,
            credential,
            json,
        } => token(&config, credential.as_deref(), json),
        Command::Run(args) => {
            let config = Config::load(&args.config).map_err(config_failure)?;
            proxy_runtime(&config.runtime)?.block_on(run(config, args.config))
        }
        Command::Demo { listen, admin } => runtime()?.block_on(async move {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            demo::run(listen, admin, shutdown).await?;
            Ok(())
        }),
    }
}

/// The credential `--credential` names, or the only (or default) one.
fn choose_credential<'c>(
    config: &'c Config,
    credential: Option<&str>,
) -> Result<&'c Credential, Failure> {
    Ok(match credential {
        Some(name) => config
            .credentials
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = config.credentials.iter().map(|c| c.name.as_str()).collect();
                config_failure(anyhow::anyhow!(
                    "--credential {name}: no such credential (known: {})",
                    known.join(", ")
                ))
            })?,
        None if config.credentials.len() == 1 => &config.credentials[0],
        None => &config.credentials[config.default_credential()],
    })
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?)
}

fn authorize(
    path: &std::path::Path,
    credential: Option<&str>,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    let config = Config::load(path).map_err(config_failure)?;
    let chosen = choose_credential(&config, credential)?;
    let tls = tls::client_config(&config.coupa.extra_roots).map_err(config_failure)?;
    let state = current_thread_runtime()?.block_on(async {
        let shared = match &config.cluster {
            Some(settings) => Some(SharedConsent::new(
                cli_cluster(settings, &config)?,
                &chosen.oauth,
            )),
            None => None,
        };
        coupa_auth_proxy::token::consent::authorize::authorize(chosen, tls, timeout, shared)
            .await
            .map_err(|e| match e {
                coupa_auth_proxy::token::consent::authorize::AuthorizeError::NotAUserGrant(_) => {
                    config_failure(e)
                }
                other => other.into(),
            })
    })?;
    let consent = chosen.oauth.grant.consent();
    let refresh_until = consent.map(|c| state.refresh_token_issued_at + c.refresh_token_lifetime);
    let stored_in = match (&config.cluster, consent) {
        (Some(cluster), _) => format!("the cluster state ({}, sealed)", cluster.redis_url),
        (None, Some(c)) => format!("{} (mode 0600)", c.state_file.display()),
        (None, None) => String::new(),
    };
    eprintln!(
        "credential {}: consent stored in {stored_in}; granted scopes: {}",
        chosen.name, state.scope
    );
    if let Some(until) = refresh_until {
        eprintln!(
            "the refresh token lasts until about {}; `run` renews from it, and a running proxy \
             picks the new consent up at its next renewal",
            humantime::format_rfc3339_seconds(until)
        );
    }
    Ok(())
}

/// The cluster state for a one-shot subcommand (`authorize`, `token`).
/// Must be called inside the runtime.
fn cli_cluster(
    settings: &coupa_auth_proxy::config::Cluster,
    config: &Config,
) -> Result<std::sync::Arc<Cluster>, Failure> {
    Cluster::start(
        settings,
        &config.coupa.base_url,
        ClusterMetrics::default(),
        &coupa_auth_proxy::background::Background::new(),
    )
    .map_err(config_failure)
}

fn token(path: &std::path::Path, credential: Option<&str>, json: bool) -> Result<(), Failure> {
    let config = Config::load(path).map_err(config_failure)?;
    let chosen = choose_credential(&config, credential)?;
    let tls = tls::client_config(&config.coupa.extra_roots).map_err(config_failure)?;
    let runtime = current_thread_runtime()?;
    let (token, response) = if chosen.oauth.grant.consent().is_none() {
        let client = TokenClient::new(&chosen.oauth, tls)?;
        runtime
            .block_on(client.request(TokenRequest::ClientCredentials))
            .map(|(token, response)| (token, Some(response)))
    } else {
        // Renews from the state file (or the cluster state) like `run`,
        // persisting a rotated refresh token, so the proxies keep working.
        runtime.block_on(async {
            let cluster = match &config.cluster {
                Some(settings) => Some(cli_cluster(settings, &config)?),
                None => None,
            };
            let source = CredentialSource::new(
                chosen,
                tls,
                Some(path),
                std::sync::Arc::new(TokenStore::new()),
                cluster.as_ref(),
            )
            .map_err(config_failure)?;
            Ok::<_, Failure>(source.fetch().await.map(|token| (token, None)))
        })?
    }
    .map_err(|e| anyhow::anyhow!("{}", e.explain()))?;
    // stdout carries the credential alone, so `$(coupa-auth-proxy token …)` works.
    match (json, response) {
        (true, Some(response)) => println!("{}", response.expose().trim()),
        (true, None) => println!(
            "{}",
            serde_json::json!({
                "access_token": token.access_token.expose(),
                "token_type": "bearer",
                "expires_in": token.expires_in.as_secs(),
                "scope": token.scope,
            })
        ),
        (false, _) => println!("{}", token.access_token.expose()),
    }
    let expires_at = std::time::SystemTime::now() + token.expires_in;
    eprintln!(
        "credential {}: token expires in {} (at {}); scopes: {}",
        chosen.name,
        humantime::format_duration(token.expires_in),
        humantime::format_rfc3339_seconds(expires_at),
        token.scope.as_deref().unwrap_or("(not stated)")
    );
    eprintln!("warning: the printed token is a credential; do not paste it into tickets or logs");
    Ok(())
}

fn hash_key() -> Result<(), Failure> {
    let mut key = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)
        .context("cannot read the key from stdin")?;
    // `echo KEY | …` and files end with a newline that is not part of the key.
    let key = key.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        return Err(config_failure(anyhow::anyhow!(
            "no key on stdin: pipe the legacy API key (or the local client secret) in, e.g. `printf %s \"$KEY\" | coupa-auth-proxy hash-key`"
        )));
    }
    println!("{}", coupa_auth_proxy::proxy::auth::hash_key(key));
    Ok(())
}

/// The runtime `run` serves on, as `[runtime]` says.
fn proxy_runtime(
    settings: &coupa_auth_proxy::config::Runtime,
) -> Result<tokio::runtime::Runtime, Failure> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (flavor, workers) = settings.resolve(cores);
    let mut builder = match flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tracing::debug!(?flavor, workers, cores, "async runtime");
    Ok(runtime)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?)
}

fn check(path: &std::path::Path, live_path: Option<&str>) -> Result<(), Failure> {
    let config = Config::load(path).map_err(config_failure)?;
    let tls = tls::client_config(&config.coupa.extra_roots).map_err(config_failure)?;
    println!("{}: configuration is valid\n", path.display());
    print!("{}", config.summary());
    for warning in config.warnings() {
        println!("warning: {warning}");
    }
    // `run` refuses to start without a consent on file; so does `check`.
    for credential in &config.credentials {
        if credential.oauth.grant.consent().is_none() {
            continue;
        }
        if config.cluster.is_some() {
            println!(
                "credential {}: consent kept in the cluster state (Redis); not checked offline",
                credential.name
            );
            continue;
        }
        let store = std::sync::Arc::new(TokenStore::new());
        CredentialSource::new(credential, tls.clone(), Some(path), store.clone(), None)
            .map_err(config_failure)?;
        if let Some(info) = store.status().refresh_token {
            let now = std::time::SystemTime::now();
            println!(
                "credential {}: consent on file; refresh token valid for about {} more days",
                credential.name,
                info.remaining(now).as_secs() / 86_400
            );
            if let Some(warning) = info.warning(now) {
                println!("warning: credential {}: {warning}", credential.name);
            }
        }
    }
    let Some(live_path) = live_path else {
        return Ok(());
    };
    println!("\nlive check against {}:", config.coupa.base_url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let reports = runtime.block_on(coupa_auth_proxy::live::check(
        &config,
        Some(path),
        live_path,
    ));
    for report in &reports {
        print!("{}", report.text);
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        println!("live check passed");
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            error: anyhow::anyhow!("live check failed for {failed} credential(s); see above"),
        })
    }
}

async fn run(config: Config, path: PathBuf) -> Result<(), Failure> {
    let proxy = TcpListener::bind(config.listen.address)
        .await
        .with_context(|| format!("listen.address: cannot bind {}", config.listen.address))
        .map_err(config_failure)?;
    let admin = TcpListener::bind(config.admin.address)
        .await
        .with_context(|| format!("admin.address: cannot bind {}", config.admin.address))
        .map_err(config_failure)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match app::run_with_reload(config, Some(path), Listeners { proxy, admin }, shutdown).await {
        Ok(_) => Ok(()),
        // A missing or unusable consent is fixed by the user, like a config error.
        Err(e @ app::AppError::TokenSource(SourceError::Consent(_))) => Err(config_failure(e)),
        Err(e) => Err(e.into()),
    }
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received; no new connections, draining");
    shutdown.cancel();
}
