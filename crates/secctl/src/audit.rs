//! `secctl audit …`: security events (`list`, `export`), the hash chain (`verify`,
//! `head`), reports, retention and legal holds (`retention`, `hold`), alerts and the
//! monitor (`alerts`, `ack`, `monitor`).

use std::process::ExitCode;

use anyhow::Context as _;
use sec_common::config::Config;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_proto::audit::v1::{GetChainHeadRequest, ListEventsRequest, VerifyChainRequest};
use sec_proto::common::v1::PageRequest;

use crate::output::{Output, event_json, print_json};
use crate::rpc::{Rpc as _, authed_channel};

pub async fn list(
    config: &Config,
    output: Output,
    event_type: Option<String>,
    since: Option<String>,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    let since = since
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(&s)
                .map(|t| sec_common::events::to_timestamp(t.with_timezone(&chrono::Utc)))
                .with_context(|| {
                    format!("--since {s}: expected RFC 3339, e.g. 2026-01-31T12:00:00Z")
                })
        })
        .transpose()?;
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
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
        .rpc()?;
    match output {
        Output::Json => {
            let v: Vec<_> = resp.events.iter().map(event_json).collect();
            print_json(&v.into())?;
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

/// Exit status of `verify` when the chain does not verify (1 is a failed call).
pub const EXIT_TAMPERED: u8 = 3;

pub async fn verify(
    config: &Config,
    output: Output,
    from: u64,
    to: u64,
) -> anyhow::Result<ExitCode> {
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    let r = client
        .verify_chain(VerifyChainRequest {
            from_seq: from,
            to_seq: to,
        })
        .await
        .rpc()?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "ok": r.ok,
            "from_seq": r.from_seq,
            "to_seq": r.to_seq,
            "records_checked": r.records_checked,
            "checkpoints_checked": r.checkpoints_checked,
            "anchor_seq": r.anchor_seq,
            "hash": r.hash,
            "problem": (!r.ok).then_some(r.problem.as_str()),
            "first_bad_seq": (!r.ok).then_some(r.first_bad_seq),
            "detail": (!r.ok).then_some(r.detail.as_str()),
        }))?,
        Output::Table => {
            let anchor = if r.anchor_seq == 0 {
                "the start".to_owned()
            } else {
                format!("the checkpoint at {}", r.anchor_seq)
            };
            if r.ok {
                println!(
                    "ok: {} records ({}..{}) and {} checkpoints verified from {anchor}; hash {}",
                    r.records_checked, r.from_seq, r.to_seq, r.checkpoints_checked, r.hash
                );
            } else {
                println!(
                    "TAMPERED: {} at position {}: {}",
                    r.problem, r.first_bad_seq, r.detail
                );
                println!(
                    "({} records and {} checkpoints verified from {anchor} before it)",
                    r.records_checked, r.checkpoints_checked
                );
            }
        }
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TAMPERED)
    })
}

pub async fn head(config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    let r = client.get_chain_head(GetChainHeadRequest {}).await.rpc()?;
    let cp = r.latest_checkpoint.as_ref();
    match output {
        Output::Json => print_json(&serde_json::json!({
            "seq": r.seq,
            "hash": r.hash,
            "latest_checkpoint": cp.map(|c| serde_json::json!({
                "seq": c.seq,
                "head_hash": c.head_hash,
                "time": crate::output::time(c.time.as_ref()),
                "origin": c.origin,
                "key_name": c.key_name,
                "key_version": c.key_version,
                "signature": c.signature,
                "note": c.note,
            })),
        }))?,
        Output::Table => {
            println!("head: {} {}", r.seq, r.hash);
            match cp {
                Some(c) => println!(
                    "checkpoint: {} {} at {} signed by {} v{}",
                    c.seq,
                    c.head_hash,
                    crate::output::time(c.time.as_ref()),
                    c.key_name,
                    c.key_version
                ),
                None => println!("checkpoint: none yet"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(flag: &str, s: Option<String>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    s.map(|s| {
        chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| sec_common::events::to_timestamp(t.with_timezone(&chrono::Utc)))
            .with_context(|| format!("{flag} {s}: expected RFC 3339, e.g. 2026-01-31T12:00:00Z"))
    })
    .transpose()
}

/// `secctl audit export`: ExportEvents' chunks straight to stdout (`-o` does not apply:
/// the format is `--format`).
pub async fn export(
    config: &Config,
    command: crate::cli::AuditCommand,
) -> anyhow::Result<ExitCode> {
    use sec_proto::audit::v1::{EventFilter, ExportEventsRequest, ExportFormat, Order};
    let crate::cli::AuditCommand::Export {
        event_types,
        since,
        until,
        actor,
        subject,
        ip,
        format,
        oldest_first,
        limit,
    } = command
    else {
        anyhow::bail!("not an export command");
    };
    let request = ExportEventsRequest {
        filter: Some(EventFilter {
            since: rfc3339("--since", since)?,
            until: rfc3339("--until", until)?,
            event_types,
            actor_id: actor.unwrap_or_default(),
            subject: subject.unwrap_or_default(),
            ip: ip.unwrap_or_default(),
            ..Default::default()
        }),
        order: if oldest_first {
            Order::OldestFirst
        } else {
            Order::NewestFirst
        } as i32,
        format: match format {
            crate::cli::ExportFormatArg::Jsonl => ExportFormat::Jsonl,
            crate::cli::ExportFormatArg::Csv => ExportFormat::Csv,
        } as i32,
        limit,
    };
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    write_chunks(client.export_events(request).await.rpc()?).await
}

/// Streamed chunks straight to stdout, in order.
async fn write_chunks(
    mut stream: tonic::Streaming<sec_proto::audit::v1::ExportChunk>,
) -> anyhow::Result<ExitCode> {
    use futures::StreamExt as _;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(crate::rpc::RpcError)?;
        crate::output::write_raw(&chunk.data)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `secctl audit report`: GetReport's chunks straight to stdout (`--format` chooses JSON
/// or CSV; the JSON document is what `-o json` prints too).
pub async fn report(
    config: &Config,
    command: crate::cli::AuditCommand,
) -> anyhow::Result<ExitCode> {
    use sec_proto::audit::v1::{GetReportRequest, ReportFormat, ReportKind};
    let crate::cli::AuditCommand::Report {
        kind,
        since,
        until,
        subject,
        actor,
        format,
    } = command
    else {
        anyhow::bail!("not a report command");
    };
    let request = GetReportRequest {
        kind: match kind {
            crate::cli::ReportKindArg::Access => ReportKind::Access,
            crate::cli::ReportKindArg::Changes => ReportKind::Changes,
            crate::cli::ReportKindArg::Incidents => ReportKind::Incidents,
        } as i32,
        since: rfc3339("--since", since)?,
        until: rfc3339("--until", until)?,
        subject: subject.unwrap_or_default(),
        actor_id: actor.unwrap_or_default(),
        format: match format {
            crate::cli::ReportFormatArg::Json => ReportFormat::Json,
            crate::cli::ReportFormatArg::Csv => ReportFormat::Csv,
        } as i32,
    };
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    write_chunks(client.get_report(request).await.rpc()?).await
}

fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// `secctl audit retention [--dry-run]`.
pub async fn retention(config: &Config, output: Output, dry_run: bool) -> anyhow::Result<ExitCode> {
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    let r = client
        .run_retention(sec_proto::audit::v1::RunRetentionRequest { dry_run })
        .await
        .rpc()?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "dry_run": r.dry_run,
            "removed_rows": r.removed_rows,
            "dropped_partitions": r.dropped_partitions,
            "held_rows": r.held_rows,
            "partitions": r.partitions,
            "exported": r.exported,
            "ranges": r.ranges.iter().map(|p| serde_json::json!({
                "first_seq": p.first_seq,
                "last_seq": p.last_seq,
                "rows": p.rows,
                "reason": p.reason,
                "partition": (!p.partition.is_empty()).then_some(p.partition.as_str()),
            })).collect::<Vec<_>>(),
        }))?,
        Output::Table => {
            let verb = if r.dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} events in {} runs of positions ({} partitions dropped); {} expired events held",
                r.removed_rows,
                r.ranges.len(),
                r.dropped_partitions,
                r.held_rows
            );
            if !r.ranges.is_empty() {
                println!(
                    "{:<12} {:<12} {:<10} {:<10} PARTITION",
                    "FIRST", "LAST", "ROWS", "REASON"
                );
            }
            for p in &r.ranges {
                println!(
                    "{:<12} {:<12} {:<10} {:<10} {}",
                    p.first_seq, p.last_seq, p.rows, p.reason, p.partition
                );
            }
            for f in &r.exported {
                println!("exported: {f}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn hold_json(h: &sec_proto::audit::v1::LegalHold) -> serde_json::Value {
    serde_json::json!({
        "id": h.id,
        "name": h.name,
        "reason": h.reason,
        "type_prefix": h.type_prefix,
        "actor_id": h.actor_id,
        "subject": h.subject,
        "since": h.since.is_some().then(|| time_text(h.since.as_ref())),
        "until": h.until.is_some().then(|| time_text(h.until.as_ref())),
        "created_at": time_text(h.created_at.as_ref()),
        "created_by": h.created_by,
        "released_at": h.released_at.is_some().then(|| time_text(h.released_at.as_ref())),
        "released_by": (!h.released_by.is_empty()).then_some(h.released_by.as_str()),
    })
}

/// `secctl audit hold create|release|list`.
pub async fn hold(
    config: &Config,
    output: Output,
    command: crate::cli::HoldCommand,
) -> anyhow::Result<ExitCode> {
    use crate::cli::HoldCommand;
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    match command {
        HoldCommand::Create {
            name,
            reason,
            type_prefix,
            actor,
            subject,
            since,
            until,
        } => {
            let h = client
                .create_legal_hold(sec_proto::audit::v1::CreateLegalHoldRequest {
                    name,
                    reason,
                    type_prefix: type_prefix.unwrap_or_default(),
                    actor_id: actor.unwrap_or_default(),
                    subject: subject.unwrap_or_default(),
                    since: rfc3339("--since", since)?,
                    until: rfc3339("--until", until)?,
                })
                .await
                .rpc()?
                .hold
                .unwrap_or_default();
            match output {
                Output::Json => print_json(&hold_json(&h))?,
                Output::Table => println!("hold {} placed: {}", h.name, h.id),
            }
        }
        HoldCommand::Release { id } => {
            let r = client
                .release_legal_hold(sec_proto::audit::v1::ReleaseLegalHoldRequest {
                    id: id.clone(),
                })
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "id": id,
                    "released_at": time_text(r.released_at.as_ref()),
                }))?,
                Output::Table => println!("hold {id} released"),
            }
        }
        HoldCommand::List { all } => {
            let r = client
                .list_legal_holds(sec_proto::audit::v1::ListLegalHoldsRequest {
                    include_released: all,
                })
                .await
                .rpc()?;
            match output {
                Output::Json => {
                    print_json(&r.holds.iter().map(hold_json).collect::<Vec<_>>().into())?;
                }
                Output::Table => {
                    println!(
                        "{:<36} {:<24} {:<20} {:<16} {:<20} RELEASED",
                        "ID", "NAME", "TYPE PREFIX", "ACTOR", "CREATED"
                    );
                    for h in &r.holds {
                        println!(
                            "{:<36} {:<24} {:<20} {:<16} {:<20} {}",
                            h.id,
                            h.name,
                            h.type_prefix,
                            h.actor_id,
                            time_text(h.created_at.as_ref()),
                            time_text(h.released_at.as_ref())
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---- Alerts and the monitor (issue 19 item 7) ----

use sec_common::events::json::{alert_json, monitor_json};
use sec_proto::audit::v1::{
    AcknowledgeAlertRequest, AlertStatus, GetMonitorRequest, ListAlertsRequest,
};

use crate::cli::AlertStatusArg;

fn alert_row(a: &sec_proto::audit::v1::Alert) {
    let j = alert_json(a);
    println!(
        "{:<36} {:<20} {:<8} {:<12} {:>6} {:<27} {}",
        a.id,
        a.rule,
        a.severity,
        j["status"].as_str().unwrap_or_default(),
        a.count,
        j["last_seen"].as_str().unwrap_or_default(),
        a.group
    );
}

fn alert_header() {
    println!(
        "{:<36} {:<20} {:<8} {:<12} {:>6} {:<27} GROUP",
        "ID", "RULE", "SEVERITY", "STATUS", "COUNT", "LAST SEEN"
    );
}

pub async fn alerts(
    config: &Config,
    output: Output,
    status: AlertStatusArg,
    rule: Option<String>,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    let status = match status {
        AlertStatusArg::Open => AlertStatus::Open,
        AlertStatusArg::Acknowledged => AlertStatus::Acknowledged,
        AlertStatusArg::All => AlertStatus::Unspecified,
    };
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    let resp = client
        .list_alerts(ListAlertsRequest {
            status: status as i32,
            rule: rule.unwrap_or_default(),
            page: Some(PageRequest {
                page_size: limit,
                page_token: String::new(),
            }),
        })
        .await
        .rpc()?;
    match output {
        Output::Json => {
            let v: Vec<_> = resp.alerts.iter().map(alert_json).collect();
            print_json(&v.into())?;
        }
        Output::Table => {
            alert_header();
            resp.alerts.iter().for_each(alert_row);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn ack(
    config: &Config,
    output: Output,
    id: String,
    note: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    let resp = client
        .acknowledge_alert(AcknowledgeAlertRequest {
            id,
            note: note.unwrap_or_default(),
        })
        .await
        .rpc()?;
    let alert = resp.alert.unwrap_or_default();
    match output {
        Output::Json => print_json(&alert_json(&alert))?,
        Output::Table => println!(
            "acknowledged {} ({}, group {}, {} events)",
            alert.id, alert.rule, alert.group, alert.count
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn monitor(config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    let mut client = AuditServiceClient::new(authed_channel(config, "audit")?);
    let m = client.get_monitor(GetMonitorRequest {}).await.rpc()?;
    match output {
        Output::Json => print_json(&monitor_json(&m))?,
        Output::Table => {
            println!("open alerts:      {}", m.open_alerts);
            println!("ingest lag:       {:.3} s", m.ingest_lag_seconds);
            let dead: Vec<String> = m
                .dead_letters
                .iter()
                .map(|d| format!("{} {}", d.reason, d.count))
                .collect();
            println!("dead letters:     {}", dead.join(", "));
            println!("chain head:       {}", m.chain_head_seq);
            match m.checkpoint_age_seconds {
                Some(age) => println!("last checkpoint:  {age:.0} s ago"),
                None => println!("last checkpoint:  none yet"),
            }
            if !m.newest_open.is_empty() {
                println!();
                alert_header();
                m.newest_open.iter().for_each(alert_row);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
