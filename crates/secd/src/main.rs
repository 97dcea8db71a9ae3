//! `secd`: every platform service in one process. `secd dev` runs on the embedded
//! default (SQLite under the data directory, in-process session store and event bus)
//! unless PostgreSQL/Redis/NATS URLs are configured.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sec_common::auth::{Authenticator, Bootstrap, ServiceCredentials, ensure_bootstrap_token};
use sec_common::config::{Config, ProcessEnv};
use sec_common::service::{EXIT_BAD_CONFIG, Platform};
use secd::SERVICES;

#[derive(Debug, Parser)]
#[command(
    name = "secd",
    version,
    about = "Run the whole security platform in one process"
)]
struct Args {
    /// TOML configuration file (optional; `SEC_*` variables overlay it).
    #[arg(long, short, env = "SEC_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run every service (embedded storage unless URLs are configured).
    Dev {
        /// Data directory (overrides `data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate the configuration (including TLS files and keys) and print it with
    /// secrets redacted.
    CheckConfig,
    /// Read a token on stdin and print the `auth.admin_token_hash` value for it
    /// (`sha256:<hex>`, the same as `printf %s "$TOKEN" | sha256sum`).
    HashToken,
}

fn bad_config(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("configuration error: {e}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if matches!(args.command, Command::HashToken) {
        let mut token = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut token) {
            eprintln!("secd: reading stdin: {e}");
            return ExitCode::FAILURE;
        }
        let token = token.trim();
        if token.is_empty() {
            eprintln!("secd: no token on stdin");
            return ExitCode::FAILURE;
        }
        println!("{}", sec_common::auth::hash_token(token));
        return ExitCode::SUCCESS;
    }
    let mut config =
        match sec_common::spec::load_config(args.config.as_deref(), &ProcessEnv, SERVICES) {
            Ok(c) => c,
            Err(e) => return bad_config(e),
        };
    if let Command::Dev { data_dir: Some(d) } = &args.command {
        config.data_dir = d.clone();
    }
    // The bootstrap token (or the migration of an older installation's hash) comes first,
    // so the checks below see the credential the services will use.
    let bootstrap = match (&args.command, &config.auth.admin_token_hash) {
        (Command::Dev { .. }, None) => match ensure_bootstrap_token(&config.data_dir) {
            Ok(b) => Some(b),
            Err(e) => return bad_config(format!("{e:#}")),
        },
        _ => None,
    };
    if let Err(e) = sec_common::spec::preflight(&config, SERVICES) {
        return bad_config(e);
    }
    match args.command {
        Command::HashToken => ExitCode::SUCCESS,
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            eprintln!("configuration ok");
            ExitCode::SUCCESS
        }
        Command::Dev { .. } => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let code = rt.block_on(async move {
                let telemetry = match sec_common::telemetry::init(&config.telemetry, "secd") {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("telemetry: {e:#}");
                        return ExitCode::FAILURE;
                    }
                };
                let r = dev(config, bootstrap).await;
                telemetry.shutdown();
                match r {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("secd failed: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            });
            // Services have drained and events are flushed: bound the runtime teardown.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            code
        }
    }
}

async fn dev(mut config: Config, bootstrap: Option<Bootstrap>) -> anyhow::Result<()> {
    if config.storage.database_url.is_none() {
        std::fs::create_dir_all(&config.data_dir)?;
    }
    // Services in this process authenticate to each other with a credential that lives
    // only as long as the process.
    let credentials = ServiceCredentials::generate(SERVICES.iter().map(|s| s.name))?;
    let auth = Authenticator::from_config(&config)?.with_service_credentials(&credentials);
    let listeners = secd::bind_all(&mut config).await?;
    let platform = Platform::connect(config.clone(), auth, sec_common::clock::system(), "secd")
        .await?
        .with_credentials(credentials);
    print_banner(
        &config,
        &listeners,
        bootstrap.as_ref(),
        platform.events.transport_kind(),
    );
    let shutdown = sec_common::shutdown::on_signal();
    secd::run_all(platform, listeners, shutdown).await?;
    println!("secd stopped cleanly");
    Ok(())
}

/// Prints the addresses actually bound (a configured port 0 shows the port it got).
fn print_banner(
    config: &Config,
    listeners: &std::collections::BTreeMap<&'static str, sec_common::service::Listeners>,
    bootstrap: Option<&sec_common::auth::Bootstrap>,
    bus: &str,
) {
    let addr = |l: &tokio::net::TcpListener| {
        l.local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into())
    };
    let db = if config.storage.database_url.is_some() {
        "postgres".to_owned()
    } else {
        format!("sqlite in {}", config.data_dir.display())
    };
    let kv = if config.storage.redis_url.is_some() {
        "redis"
    } else {
        "in-process"
    };
    println!("secd: security platform running (database: {db}; sessions: {kv}; events: {bus})");
    if let Some(http) = listeners.get("auth").and_then(|l| l.http.as_ref()) {
        println!("  {:<8} http://{}  (HTTP facade)", "facade", addr(http));
    }
    for name in SERVICES.iter().map(|s| s.name) {
        if let Some(l) = listeners.get(name) {
            println!(
                "  {:<8} grpc {}  admin http://{}/readyz",
                name,
                addr(&l.grpc),
                addr(&l.admin)
            );
        }
    }
    match bootstrap {
        Some(b) if b.migrated => println!(
            "admin token: {} (reused; its argon2id hash was replaced by a sha256 digest)",
            b.token_path.display()
        ),
        Some(b) if b.created => println!(
            "admin token created: {} (owner-only; secctl reads it)",
            b.token_path.display()
        ),
        Some(b) => println!("admin token: {} (reused)", b.token_path.display()),
        None => println!("admin token: from auth.admin_token_hash"),
    }
    if config.is_embedded() {
        println!(
            "note: embedded default, for development; production supplies PostgreSQL, Redis, NATS and TLS"
        );
    }
    println!("press Ctrl-C to stop");
}
