//! `secctl`: the operator CLI over the platform's gRPC APIs. It reads the same
//! configuration as the services (to find their endpoints and TLS settings) and
//! authenticates with `SEC_TOKEN` or the bootstrap token file in the data directory.
//!
//! A failed call prints `secctl: <grpc code>: <message>` and exits 1; a usage error
//! (unknown flag, bad duration) exits 2; a bad configuration exits 64.

mod audit;
mod auth_admin;
mod cli;
mod crypt;
mod edge;
mod keys;
mod output;
mod rpc;
mod session;
mod signing_keys;
mod status;
mod token;

use std::process::ExitCode;

use clap::Parser as _;
use sec_common::config::Config;

use crate::cli::{AuditCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The same file and `SEC_*` variables as `secd`, so the CLI finds every service.
    let config = match sec_common::spec::load_config(
        cli.config.as_deref(),
        &sec_common::config::ProcessEnv,
        secd::SERVICES,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("secctl: configuration error: {e}");
            return ExitCode::from(sec_common::service::EXIT_BAD_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("secctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("secctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
    let out = cli.output;
    match cli.command {
        Command::Status => status::status(&config, out).await,
        Command::Audit {
            command:
                AuditCommand::List {
                    event_type,
                    since,
                    limit,
                },
        } => audit::list(&config, out, event_type, since, limit).await,
        Command::Audit {
            command: AuditCommand::Verify { from, to },
        } => audit::verify(&config, out, from, to).await,
        Command::Audit {
            command: AuditCommand::Head,
        } => audit::head(&config, out).await,
        Command::Key { command } => keys::run(&config, out, command).await,
        Command::Kek { command } => keys::kek(&config, out, command).await,
        Command::Encrypt(args) => crypt::encrypt(&config, out, args).await,
        Command::Decrypt(args) => crypt::decrypt(&config, args).await,
        Command::Token { command } => token::run(&config, out, command).await,
        Command::SigningKey { command } => signing_keys::run(&config, out, command).await,
        Command::Session { command } => session::run(&config, out, command).await,
        Command::Client { command } => auth_admin::run_client(&config, out, command).await,
        Command::User { command } => auth_admin::run_user(&config, out, command).await,
        Command::Ratelimit { command } => edge::ratelimit(&config, out, command).await,
        Command::Ip { command } => edge::ip(&config, out, command).await,
    }
}
