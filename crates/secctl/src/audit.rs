//! `secctl audit list`: recent security events.

use std::process::ExitCode;

use anyhow::Context as _;
use sec_common::config::Config;
use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
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
