//! The `coupa-auth-proxy` binary: argument parsing, logging set-up and
//! dispatch. Each subcommand's body lives in the library's `cli` module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use coupa_auth_proxy::cli::{self, Failure, EXIT_CONFIG};
use coupa_auth_proxy::config::CONFIG_ENV;
use coupa_auth_proxy::telemetry::{self, LogFormat};

/// jemalloc with its background thread: after a spike (thousands of
/// connections, then quiet) the freed heap goes back to the system within
/// seconds, where glibc's malloc kept it; CPU per request and RSS under
/// steady load measured the same (docs/performance.md, levers: the allocator).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// The local CA for `[listen.intercept]` (integrations that can only
    /// set a proxy) and the name-only recipe.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The configuration file's reference.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the man page (roff), generated from this command line's
    /// definition: `coupa-auth-proxy manpage > coupa-auth-proxy.1`.
    Manpage,
    /// Print the command-line reference in Markdown (docs/cli.md).
    #[command(hide = true)]
    CliReference,
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

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the JSON Schema of the configuration file (what editors with
    /// Taplo / Even Better TOML complete and check; docs/proxy.schema.json
    /// is this output).
    Schema,
    /// Print the configuration reference in Markdown, generated from the
    /// same types (docs/configuration.md is this output).
    Reference,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new local CA (ca.pem, ca.key mode 0600) into DIR, and with
    /// --host a certificate for that name signed by it (NAME.pem, NAME.key)
    /// for [listen.tls]. Never overwrites a file.
    Init {
        /// Where to write the files (made if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Also a server certificate for this name (e.g. acme.coupahost.com).
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, env = CONFIG_ENV)]
    config: PathBuf,
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
        } => cli::check(&config.config, live.then_some(live_path.as_str())),
        Command::HashKey => cli::hash_key(),
        Command::Authorize {
            config,
            credential,
            timeout,
        } => cli::authorize(&config, credential.as_deref(), timeout),
        Command::Token {
            config,
            credential,
            json,
        } => cli::token(&config, credential.as_deref(), json),
        Command::Run(args) => cli::run(args.config),
        Command::Demo { listen, admin } => cli::demo(listen, admin),
        Command::Ca {
            command: CaCommand::Init { dir, host },
        } => cli::ca_init(&dir, host.as_deref()),
        Command::Config {
            command: ConfigCommand::Schema,
        } => cli::config_schema(),
        Command::Config {
            command: ConfigCommand::Reference,
        } => cli::config_reference(),
        Command::Manpage => manpage(),
        Command::CliReference => {
            print!("{}", cli_reference());
            Ok(())
        }
    }
}

/// The man page, from the same definition clap parses with.
fn manpage() -> Result<(), Failure> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .and_then(|()| std::io::Write::write_all(&mut std::io::stdout(), &out))
        .map_err(|e| Failure {
            code: 1,
            error: anyhow::anyhow!("cannot write the man page: {e}"),
        })
}

/// docs/cli.md: every subcommand with its usage and each flag, from the
/// definition clap parses with (a test compares the committed page).
fn cli_reference() -> String {
    let mut command = Cli::command();
    command.build();
    let mut page = String::from(
        "# Command line\n\n<!-- Generated by `coupa-auth-proxy cli-reference > docs/cli.md` from the\n\
         command line's definition (src/main.rs); edit the doc comments there. -->\n\n\
         `man coupa-auth-proxy` shows the same (the container image installs the page;\n\
         `coupa-auth-proxy manpage` prints it). Exit codes: `0` success (a clean\n\
         shutdown too), `64` a configuration problem, `1` anything else.\n",
    );
    write_command(&mut page, &command, "coupa-auth-proxy");
    page
}

fn write_command(page: &mut String, command: &clap::Command, path: &str) {
    use std::fmt::Write as _;
    if command.is_hide_set() {
        return;
    }
    let _ = write!(page, "\n## `{path}`\n\n");
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        let _ = writeln!(page, "{about}\n");
    }
    let usage = command.clone().render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ");
    let _ = writeln!(page, "```\n{usage}\n```\n");
    // Global flags are listed once, at the top.
    let top = !path.contains(' ');
    let args: Vec<_> = command
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_id() != "help" && a.get_id() != "version")
        .filter(|a| top || !a.is_global_set())
        .collect();
    if !args.is_empty() {
        page.push_str("| flag | default | meaning |\n|---|---|---|\n");
        for arg in args {
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
            let possible: Vec<_> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect();
            let value = if !possible.is_empty() {
                possible.join("|")
            } else {
                arg.get_value_names()
                    .map(|v| v.join(" "))
                    .unwrap_or_else(|| arg.get_id().as_str().to_uppercase())
            };
            let name = match arg.get_long() {
                Some(long) if takes_value => format!("`--{long} <{value}>`"),
                Some(long) => format!("`--{long}`"),
                None => format!("`<{}>`", arg.get_id()),
            };
            let default: Vec<_> = if takes_value {
                arg.get_default_values()
            } else {
                &[]
            }
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
            let mut help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if let Some(env) = arg.get_env() {
                help.push_str(&format!(" (environment: `{}`)", env.to_string_lossy()));
            }
            let name = name.replace('|', "\\|");
            let _ = writeln!(
                page,
                "| {name} | {} | {} |",
                if default.is_empty() {
                    "—".to_owned()
                } else {
                    format!("`{}`", default.join(" "))
                },
                help.replace('|', "\\|"),
            );
        }
    }
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_command(page, sub, &format!("{path} {}", sub.get_name()));
    }
}
