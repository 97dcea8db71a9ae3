//! `secctl`: the operator CLI over the platform's gRPC APIs. It reads the same
//! configuration as the services (to find their endpoints and TLS settings) and
//! authenticates with `SEC_TOKEN` or the bootstrap token file in the data directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sec_common::config::{Config, SERVICES};
use sec_common::grpc::{BearerToken, channel};
use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_proto::common::v1::{PageRequest, SecurityEvent};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, Parser)]
#[command(name = "secctl", version, about = "Operate the security platform")]
struct Cli {
    /// TOML configuration file (the one the services use); `SEC_*` variables overlay it.
    #[arg(long, short, env = "SEC_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// gRPC health of every service (exit 1 if any is not SERVING).
    Status,
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recent events, newest first.
    List {
        /// Exact event type, or a prefix ending in `*` (e.g. `sec.crypto.*`).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// How many events.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match sec_common::service::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
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
    match cli.command {
        Command::Status => status(&config, cli.output).await,
        Command::Audit {
            command:
                AuditCommand::List {
                    event_type,
                    since,
                    limit,
                },
        } => audit_list(&config, cli.output, event_type, since, limit).await,
    }
}

fn endpoint(config: &Config, service: &str) -> anyhow::Result<String> {
    let addrs = config.services.get(service).context("unknown service")?;
    Ok(addrs.endpoint_url(config.tls.enabled()))
}

async fn status(config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    let checks = SERVICES.iter().map(|name| async move {
        let url = endpoint(config, name)?;
        let grpc_name = format!("sec.{name}.v1.{}Service", capitalize(name));
        let started = Instant::now();
        let status = match channel(&url, &config.tls) {
            Ok(ch) => {
                let mut client = HealthClient::new(ch);
                let req = tonic_health::pb::HealthCheckRequest {
                    service: grpc_name.clone(),
                };
                match tokio::time::timeout(Duration::from_secs(3), client.check(req)).await {
                    Ok(Ok(r)) => match ServingStatus::try_from(r.into_inner().status) {
                        Ok(ServingStatus::Serving) => "SERVING".to_owned(),
                        Ok(s) => s.as_str_name().to_owned(),
                        Err(_) => "UNKNOWN".to_owned(),
                    },
                    Ok(Err(e)) => format!("UNREACHABLE ({})", e.code()),
                    Err(_) => "UNREACHABLE (timeout)".to_owned(),
                }
            }
            Err(e) => format!("ERROR ({e})"),
        };
        anyhow::Ok((name.to_string(), url, status, started.elapsed()))
    });
    let rows = futures::future::try_join_all(checks).await?;
    let all_ok = rows.iter().all(|r| r.2 == "SERVING");
    match output {
        Output::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(n, u, s, d)| {
                    serde_json::json!({"service": format!("{n}-svc"), "endpoint": u, "status": s, "latency_ms": d.as_secs_f64() * 1000.0})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            println!(
                "{:<12} {:<28} {:<24} {:>10}",
                "SERVICE", "ENDPOINT", "STATUS", "LATENCY"
            );
            for (n, u, s, d) in &rows {
                println!(
                    "{:<12} {:<28} {:<24} {:>8.1}ms",
                    format!("{n}-svc"),
                    u,
                    s,
                    d.as_secs_f64() * 1000.0
                );
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

async fn audit_list(
    config: &Config,
    output: Output,
    event_type: Option<String>,
    since: Option<String>,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    let token = sec_common::auth::client_token(&config.data_dir)
        .context("no token: set SEC_TOKEN or run where the data directory holds admin.token")?;
    let since = since
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(&s)
                .map(|t| sec_common::events::to_timestamp(t.with_timezone(&chrono::Utc)))
                .with_context(|| {
                    format!("--since {s}: expected RFC 3339, e.g. 2026-01-31T12:00:00Z")
                })
        })
        .transpose()?;
    let ch = channel(&endpoint(config, "audit")?, &config.tls)?;
    let mut client = AuditServiceClient::with_interceptor(ch, BearerToken::new(Some(&token))?);
    let resp = client
        .list_events(ListEventsRequest {
            event_type: event_type.unwrap_or_default(),
            since,
            until: None,
            page: Some(PageRequest {
                page_size: limit,
                page_token: String::new(),
            }),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    match output {
        Output::Json => {
            let v: Vec<_> = resp.events.iter().map(event_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            println!(
                "{:<27} {:<34} {:<8} {:<16} {:<8} SUBJECT",
                "TIME", "TYPE", "OUTCOME", "ACTOR", "SEVERITY"
            );
            for e in &resp.events {
                let j = event_json(e);
                println!(
                    "{:<27} {:<34} {:<8} {:<16} {:<8} {}",
                    j["time"].as_str().unwrap_or_default(),
                    e.r#type,
                    j["outcome"].as_str().unwrap_or_default(),
                    e.actor.as_ref().map(|a| a.id.as_str()).unwrap_or_default(),
                    j["severity"].as_str().unwrap_or_default(),
                    e.subject
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn event_json(e: &SecurityEvent) -> serde_json::Value {
    use sec_proto::common::v1::{Outcome, Severity};
    let time = e
        .time
        .as_ref()
        .and_then(sec_common::events::from_timestamp)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default();
    let outcome = Outcome::try_from(e.outcome)
        .map(|o| {
            o.as_str_name()
                .trim_start_matches("OUTCOME_")
                .to_lowercase()
        })
        .unwrap_or_default();
    let severity = Severity::try_from(e.severity)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SEVERITY_")
                .to_lowercase()
        })
        .unwrap_or_default();
    serde_json::json!({
        "id": e.id,
        "type": e.r#type,
        "time": time,
        "service": e.service,
        "actor": e.actor.as_ref().map(|a| a.id.clone()),
        "subject": e.subject,
        "source_ip": e.source_ip,
        "outcome": outcome,
        "severity": severity,
        "details": e.details,
        "trace_id": e.trace_id,
    })
}
