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

/// Whether a panic is `print!`'s on a closed stdout (`secctl … | head`).
fn is_broken_pipe(info: &std::panic::PanicHookInfo<'_>) -> bool {
    let msg = info
        .payload()
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| info.payload().downcast_ref::<&str>().copied())
        .unwrap_or_default();
    msg.contains("failed printing to stdout") && msg.contains("Broken pipe")
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `println!` to a reader that went away (`| head`) panics;
    // like any Unix tool, end quietly instead.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if is_broken_pipe(info) {
            std::process::exit(0);
        }
        default_hook(info);
    }));
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
        Command::Audit {
            command: command @ AuditCommand::Export { .. },
        } => audit::export(&config, command).await,
        Command::Audit {
            command: command @ AuditCommand::Report { .. },
        } => audit::report(&config, command).await,
        Command::Audit {
            command: AuditCommand::Retention { dry_run },
        } => audit::retention(&config, out, dry_run).await,
        Command::Audit {
            command: AuditCommand::Hold { command },
        } => audit::hold(&config, out, command).await,
        Command::Audit {
            command:
                AuditCommand::Alerts {
                    status,
                    rule,
                    limit,
                },
        } => audit::alerts(&config, out, status, rule, limit).await,
        Command::Audit {
            command: AuditCommand::Ack { id, note },
        } => audit::ack(&config, out, id, note).await,
        Command::Audit {
            command: AuditCommand::Monitor,
        } => audit::monitor(&config, out).await,
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
