//! `secctl ratelimit rules|set|delete|stats` and `secctl ip allow|deny|list|delete|unblock|stats`:
//! edge protection's runtime rules, lists and blocks (admin), served by auth-svc's
//! `sec.edge.v1.EdgeService`. Changes apply on every replica within seconds.

use std::process::ExitCode;

use clap::Subcommand;
use sec_common::config::Config;
use sec_proto::edge::v1 as pb;
use sec_proto::edge::v1::edge_service_client::EdgeServiceClient;
use serde_json::{Value, json};

use crate::cli::parse_duration;
use crate::output::Output;
use crate::rpc::{Rpc as _, authed_channel};
use crate::token::{emit, emit_json};

/// The service that hosts the edge API.
const HOST: &str = "auth";

#[derive(Debug, Subcommand)]
pub enum RateLimitCommand {
    /// The effective rules: configuration, overridden by runtime rules of the same id.
    Rules,
    /// Create or replace a runtime rule (validated with the whole set; a bad rule is
    /// refused naming the field and the old set stays).
    Set {
        id: String,
        /// An exact HTTP path.
        #[arg(long, conflicts_with_all = ["route_prefix", "endpoint"])]
        route: Option<String>,
        /// An HTTP path prefix.
        #[arg(long, conflicts_with = "endpoint")]
        route_prefix: Option<String>,
        /// A gRPC endpoint (`pkg.Service/Method`) checked through CheckRateLimit.
        #[arg(long)]
        endpoint: Option<String>,
        /// HTTP methods (repeat); none: any.
        #[arg(long = "method")]
        methods: Vec<String>,
        /// Key parts (repeat): client_id, user, ip, ip_prefix, header:<name>.
        #[arg(long = "key", required = true)]
        key: Vec<String>,
        #[arg(long)]
        rate: u32,
        /// second | minute | hour | day
        #[arg(long, default_value = "minute")]
        per: String,
        #[arg(long)]
        burst: u32,
        /// Evaluate and count, never refuse.
        #[arg(long)]
        shadow: bool,
        /// fail_open | fail_closed (required when the store is Redis).
        #[arg(long)]
        on_store_error: Option<String>,
    },
    /// Delete a runtime rule (a configuration rule of the same id applies again).
    Delete { id: String },
    /// The most-limited keys (hashed) and rules over a recent window (per replica).
    Stats {
        /// Window (e.g. 5m, 1h; at most 1h).
        #[arg(long, value_parser = parse_duration, default_value = "5m")]
        window: u64,
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum IpCommand {
    /// Allow an address or CIDR (a scope with an allow list admits only its networks).
    Allow(IpRuleArgs),
    /// Deny an address or CIDR.
    Deny(IpRuleArgs),
    /// Every rule: configuration, runtime, and automatic blocks with their expiry.
    List,
    /// Delete a runtime rule by its id (from `ip list`).
    Delete { id: String },
    /// Remove every automatic block covering an address.
    Unblock { ip: String },
    /// The most-blocked addresses and countries, and block reasons (per replica).
    Stats {
        #[arg(long, value_parser = parse_duration, default_value = "5m")]
        window: u64,
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
}

#[derive(Debug, clap::Args)]
pub struct IpRuleArgs {
    /// An address or CIDR (`203.0.113.0/24`).
    pub network: String,
    /// global | client:<id> | route:<path>
    #[arg(long, default_value = "global")]
    pub scope: String,
    /// Expire after this long (e.g. 1h, 7d); default: never.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<u64>,
}

type Client = EdgeServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        sec_common::grpc::BearerToken,
    >,
>;

fn client(config: &Config) -> anyhow::Result<Client> {
    Ok(EdgeServiceClient::new(authed_channel(config, HOST)?))
}

fn rule_json(r: &pb::RateLimitRule) -> Value {
    let (kind, target) = if !r.endpoint.is_empty() {
        ("endpoint", &r.endpoint)
    } else if !r.route_prefix.is_empty() {
        ("route_prefix", &r.route_prefix)
    } else {
        ("route", &r.route)
    };
    json!({
        "id": r.id,
        "match": { kind: target, "methods": r.methods },
        "key": r.key,
        "limit": { "rate": r.rate, "per": r.per, "burst": r.burst },
        "shadow": r.shadow,
        "on_store_error": if r.on_store_error.is_empty() { Value::Null } else { json!(r.on_store_error) },
        "source": r.source,
    })
}

fn us_time(us: i64) -> Value {
    if us == 0 {
        return Value::Null;
    }
    chrono::DateTime::from_timestamp_micros(us).map_or(Value::Null, |t| {
        json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
    })
}

fn ip_json(r: &pb::IpRule) -> Value {
    json!({
        "id": r.id,
        "action": r.action,
        "network": r.network,
        "scope": r.scope,
        "reason": r.reason,
        "expires_at": us_time(r.expires_at_us),
        "source": r.source,
    })
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&w)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut s = line(header.to_vec());
    for r in rows {
        s.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    s
}

fn window(secs: u64) -> anyhow::Result<u32> {
    anyhow::ensure!(
        (1..=3600).contains(&secs),
        "--window must be between 1s and 1h"
    );
    Ok(u32::try_from(secs)?)
}

pub async fn ratelimit(
    config: &Config,
    output: Output,
    cmd: RateLimitCommand,
) -> anyhow::Result<ExitCode> {
    let mut c = client(config)?;
    match cmd {
        RateLimitCommand::Rules => {
            let rules = c
                .list_rate_limit_rules(pb::ListRateLimitRulesRequest {})
                .await
                .rpc()?
                .rules;
            match output {
                Output::Json => emit_json(&Value::Array(rules.iter().map(rule_json).collect()))?,
                Output::Table => {
                    let rows: Vec<Vec<String>> = rules
                        .iter()
                        .map(|r| {
                            let m = rule_json(r)["match"].clone();
                            let target = m
                                .as_object()
                                .and_then(|o| o.iter().find(|(k, _)| *k != "methods"))
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                .unwrap_or_default();
                            vec![
                                r.id.clone(),
                                target,
                                r.key.join(","),
                                format!("{}/{} burst {}", r.rate, r.per, r.burst),
                                if r.shadow {
                                    "shadow".into()
                                } else {
                                    "enforce".into()
                                },
                                r.source.clone(),
                            ]
                        })
                        .collect();
                    emit(&table(
                        &["ID", "MATCH", "KEY", "LIMIT", "MODE", "SOURCE"],
                        &rows,
                    ))?;
                }
            }
        }
        RateLimitCommand::Set {
            id,
            route,
            route_prefix,
            endpoint,
            methods,
            key,
            rate,
            per,
            burst,
            shadow,
            on_store_error,
        } => {
            let rule = c
                .put_rate_limit_rule(pb::PutRateLimitRuleRequest {
                    rule: Some(pb::RateLimitRule {
                        id,
                        route: route.unwrap_or_default(),
                        route_prefix: route_prefix.unwrap_or_default(),
                        endpoint: endpoint.unwrap_or_default(),
                        methods,
                        key,
                        rate,
                        per,
                        burst,
                        shadow,
                        on_store_error: on_store_error.unwrap_or_default(),
                        source: String::new(),
                    }),
                })
                .await
                .rpc()?
                .rule
                .unwrap_or_default();
            match output {
                Output::Json => emit_json(&rule_json(&rule))?,
                Output::Table => emit(&format!("rule {} set\n", rule.id))?,
            }
        }
        RateLimitCommand::Delete { id } => {
            c.delete_rate_limit_rule(pb::DeleteRateLimitRuleRequest { id: id.clone() })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&json!({ "deleted": id }))?,
                Output::Table => emit(&format!("rule {id} deleted\n"))?,
            }
        }
        RateLimitCommand::Stats { window: w, limit } => {
            let s = c
                .rate_limit_stats(pb::RateLimitStatsRequest {
                    window_seconds: window(w)?,
                    limit,
                })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&json!({
                    "window_seconds": s.window_seconds,
                    "keys": s.keys.iter().map(|k| json!({"rule_id": k.rule_id, "key_hash": k.key_hash, "limited": k.limited})).collect::<Vec<_>>(),
                    "rules": s.rules.iter().map(|r| json!({"rule_id": r.rule_id, "limited": r.limited})).collect::<Vec<_>>(),
                }))?,
                Output::Table => {
                    let rules: Vec<Vec<String>> = s
                        .rules
                        .iter()
                        .map(|r| vec![r.rule_id.clone(), r.limited.to_string()])
                        .collect();
                    let keys: Vec<Vec<String>> = s
                        .keys
                        .iter()
                        .map(|k| vec![k.rule_id.clone(), k.key_hash.clone(), k.limited.to_string()])
                        .collect();
                    emit(&format!(
                        "last {}s\n{}\n{}",
                        s.window_seconds,
                        table(&["RULE", "LIMITED"], &rules),
                        table(&["RULE", "KEY HASH", "LIMITED"], &keys)
                    ))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn ip(config: &Config, output: Output, cmd: IpCommand) -> anyhow::Result<ExitCode> {
    let mut c = client(config)?;
    match cmd {
        IpCommand::Allow(a) => put_ip(&mut c, output, "allow", a).await?,
        IpCommand::Deny(a) => put_ip(&mut c, output, "deny", a).await?,
        IpCommand::List => {
            let rules = c
                .list_ip_rules(pb::ListIpRulesRequest {})
                .await
                .rpc()?
                .rules;
            match output {
                Output::Json => emit_json(&Value::Array(rules.iter().map(ip_json).collect()))?,
                Output::Table => {
                    let rows: Vec<Vec<String>> = rules
                        .iter()
                        .map(|r| {
                            vec![
                                r.action.clone(),
                                r.network.clone(),
                                r.scope.clone(),
                                r.reason.clone(),
                                us_time(r.expires_at_us).as_str().unwrap_or("-").to_owned(),
                                r.id.clone(),
                            ]
                        })
                        .collect();
                    emit(&table(
                        &["ACTION", "NETWORK", "SCOPE", "REASON", "EXPIRES", "ID"],
                        &rows,
                    ))?;
                }
            }
        }
        IpCommand::Delete { id } => {
            c.delete_ip_rule(pb::DeleteIpRuleRequest { id: id.clone() })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&json!({ "deleted": id }))?,
                Output::Table => emit(&format!("{id} deleted\n"))?,
            }
        }
        IpCommand::Unblock { ip } => {
            let n = c
                .unblock_ip(pb::UnblockIpRequest { ip: ip.clone() })
                .await
                .rpc()?
                .removed;
            match output {
                Output::Json => emit_json(&json!({ "ip": ip, "removed": n }))?,
                Output::Table => emit(&format!("{ip}: {n} block(s) removed\n"))?,
            }
        }
        IpCommand::Stats { window: w, limit } => {
            let s = c
                .ip_stats(pb::IpStatsRequest {
                    window_seconds: window(w)?,
                    limit,
                })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&json!({
                    "window_seconds": s.window_seconds,
                    "ips": s.ips.iter().map(|i| json!({"ip": i.ip, "blocked": i.blocked})).collect::<Vec<_>>(),
                    "countries": s.countries.iter().map(|i| json!({"country": i.country, "blocked": i.blocked})).collect::<Vec<_>>(),
                    "reasons": s.reasons.iter().map(|i| json!({"reason": i.reason, "blocked": i.blocked})).collect::<Vec<_>>(),
                }))?,
                Output::Table => {
                    let row = |a: &str, b: u64| vec![a.to_owned(), b.to_string()];
                    emit(&format!(
                        "last {}s\n{}\n{}\n{}",
                        s.window_seconds,
                        table(
                            &["IP", "BLOCKED"],
                            &s.ips
                                .iter()
                                .map(|i| row(&i.ip, i.blocked))
                                .collect::<Vec<_>>()
                        ),
                        table(
                            &["COUNTRY", "BLOCKED"],
                            &s.countries
                                .iter()
                                .map(|i| row(&i.country, i.blocked))
                                .collect::<Vec<_>>()
                        ),
                        table(
                            &["REASON", "BLOCKED"],
                            &s.reasons
                                .iter()
                                .map(|i| row(&i.reason, i.blocked))
                                .collect::<Vec<_>>()
                        ),
                    ))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn put_ip(c: &mut Client, output: Output, action: &str, a: IpRuleArgs) -> anyhow::Result<()> {
    let expires_at_us = match a.ttl {
        Some(0) => anyhow::bail!("--ttl must be positive (omit it for no expiry)"),
        Some(s) => sec_common::clock::Clock::now(&*sec_common::clock::system())
            .timestamp_micros()
            .saturating_add(i64::try_from(s.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
        None => 0,
    };
    let r = c
        .put_ip_rule(pb::PutIpRuleRequest {
            rule: Some(pb::IpRule {
                action: action.into(),
                network: a.network,
                scope: a.scope,
                expires_at_us,
                ..Default::default()
            }),
        })
        .await
        .rpc()?
        .rule
        .unwrap_or_default();
    match output {
        Output::Json => emit_json(&ip_json(&r)),
        Output::Table => emit(&format!("{} {} ({})\n", r.action, r.network, r.id)),
    }
}
