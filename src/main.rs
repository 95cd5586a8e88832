//! The one binary: `serve` (the default), `token` to mint a JWT with the configured key,
//! `loadtest` to put a server under load and check what its clients receive.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use agentwire::auth::Minter;
use agentwire::config::{Config, Loaded, SecretSource, Source};

#[derive(Parser)]
#[command(name = "agentwire", version, about = "Real-time WebSocket server for AI agent events")]
struct Cli {
    /// Configuration file (default: ./config.toml when it exists, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print a token signed with the configured key.
    Token {
        /// The user id (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Display name (`name` claim).
        #[arg(long)]
        name: Option<String>,
    },
    /// Open many sessions against a server, run a scenario, report latencies and correctness.
    Loadtest(Box<agentwire_loadtest::LoadtestArgs>),
}

/// Exit code for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,actix_server=warn"))
        .init();
    let cli = Cli::parse();
    let Loaded { config, source, secret } = match Config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        // The load generator needs the server's configuration only for its key: `--secret`
        // replaces it.
        Err(_) if matches!(&cli.command, Some(Command::Loadtest(args)) if args.secret.is_some()) => {
            Loaded { config: Config::default(), source: Source::Defaults, secret: SecretSource::None }
        }
        Err(e) => {
            eprintln!("agentwire: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config, source, secret),
        Command::Token { sub, ttl, name } => token(&config, &sub, ttl, name.as_deref()),
        Command::Loadtest(args) => loadtest(*args, &config),
    }
}

/// The load generator mints its users' tokens with the configured key, or with `--secret` (HS256).
fn loadtest(args: agentwire_loadtest::LoadtestArgs, config: &Config) -> ExitCode {
    let json = args.json.clone();
    let mut auth = config.auth.clone();
    if let Some(secret) = &args.secret {
        auth.algorithm = agentwire::config::Algorithm::HS256;
        auth.secret = secret.clone();
    }
    let minter = match Minter::new(&auth) {
        Ok(minter) => minter,
        Err(e) => {
            eprintln!("agentwire loadtest: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tokens: agentwire_loadtest::TokenSource =
        std::sync::Arc::new(move |sub: &str| minter.mint(sub, None, 24 * 3600).map(|(token, _)| token));
    let report = match agentwire_loadtest::run(args, tokens, config.api.keys.first().cloned()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("agentwire loadtest: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    print!("{}", report.table());
    if let Some(path) = json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("agentwire loadtest: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn token(config: &Config, sub: &str, ttl: u64, name: Option<&str>) -> ExitCode {
    let minted = Minter::new(&config.auth).and_then(|minter| minter.mint(sub, name, ttl));
    match minted {
        Ok((token, _)) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentwire: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Resolves on SIGTERM or SIGINT, naming which.
async fn wait_for_signal() -> &'static str {
    use actix_web::rt::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            let (term, int) = (std::pin::pin!(term.recv()), std::pin::pin!(int.recv()));
            match futures_util::future::select(term, int).await {
                futures_util::future::Either::Left(_) => "SIGTERM",
                futures_util::future::Either::Right(_) => "SIGINT",
            }
        }
        _ => {
            log::warn!("cannot listen for signals; stop with SIGKILL");
            std::future::pending().await
        }
    }
}

fn serve(config: Config, source: Source, secret: SecretSource) -> ExitCode {
    let system = actix_web::rt::System::new();
    let result = system.block_on(async move {
        let running = agentwire::build(config.clone())?;
        let from = match &source {
            Source::Defaults => "built-in defaults".to_owned(),
            Source::File(path) => path.display().to_string(),
        };
        log::info!("configuration: {from}; {secret}");
        let addr = running.addr;
        println!("agentwire listening on http://{addr}  (WebSocket: ws://{addr}/ws)");
        if config.server.dev_mode {
            // Where the secret came from (never the secret itself).
            println!(
                "  development mode (server.dev_mode = true in {from}): dev tokens on, loopback only, \
                 {secret}. Do not deploy this configuration."
            );
        }
        if config.dev_tokens_enabled() {
            println!("  get a token: curl -s -X POST http://{addr}/dev/token -d '{{\"sub\":\"alice\"}}'");
        }
        if !config.auth.uses_key_sets() {
            let program = std::env::args().next().unwrap_or_else(|| "agentwire".to_owned());
            println!("  or:          {program} token --sub alice");
        }
        let control = running.control.clone();
        actix_web::rt::spawn(async move {
            let signal = wait_for_signal().await;
            log::info!("{signal}: shutting down (sessions get 1012)");
            control.shutdown().await;
        });
        running.server.await.map_err(agentwire::StartError::Io)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ agentwire::StartError::Config(_)) => {
            eprintln!("agentwire: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("agentwire: {e}");
            ExitCode::FAILURE
        }
    }
}
