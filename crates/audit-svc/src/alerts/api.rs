//! The alert RPCs' logic (`ListAlerts`, `AcknowledgeAlert`, `GetMonitor`), kept out of
//! `grpc.rs` so it can be tested without a server.

use std::sync::Arc;

use sec_common::clock::SharedClock;
use sec_common::error::Error;
use sec_common::events::Actor;
use sec_proto::audit::v1 as pb;
use sec_proto::common::v1::PageResponse;

use super::engine::AlertEngine;
use super::store::{Alert, AlertQuery, AlertStatus};
use crate::pipeline::IngestMetrics;
use crate::store::dead_letter::DeadLetterStore;
use crate::store::{ChainStore, Cursor};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
/// Open alerts shown by GetMonitor.
pub const MONITOR_ALERTS: u32 = 20;

#[derive(Clone)]
pub struct Monitor {
    pub engine: Arc<AlertEngine>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub ingest: IngestMetrics,
    pub clock: SharedClock,
}

fn ts(us: i64) -> Option<prost_types::Timestamp> {
    chrono::DateTime::from_timestamp_micros(us).map(sec_common::events::to_timestamp)
}

pub fn alert_proto(a: Alert) -> pb::Alert {
    pb::Alert {
        id: a.id.to_string(),
        rule: a.rule,
        group: a.group_key,
        severity: a.severity,
        status: match a.status {
            AlertStatus::Open => pb::AlertStatus::Open,
            AlertStatus::Acknowledged => pb::AlertStatus::Acknowledged,
        } as i32,
        first_seen: ts(a.first_seen_us),
        last_seen: ts(a.last_seen_us),
        count: a.count,
        raised_at: ts(a.raised_us),
        acknowledged_at: a.acknowledged_us.and_then(ts),
        acknowledged_by: a.acknowledged_by.unwrap_or_default(),
        note: a.note.unwrap_or_default(),
        event_ids: a.event_ids.iter().map(|e| e.to_string()).collect(),
    }
}

/// Validates a ListAlerts request into a store query.
pub fn alert_query(r: &pb::ListAlertsRequest) -> Result<AlertQuery, Error> {
    let status = match pb::AlertStatus::try_from(r.status) {
        Ok(pb::AlertStatus::Unspecified) => None,
        Ok(pb::AlertStatus::Open) => Some(AlertStatus::Open),
        Ok(pb::AlertStatus::Acknowledged) => Some(AlertStatus::Acknowledged),
        Err(_) => return Err(Error::invalid("status", "unknown status")),
    };
    let rule = r.rule.trim();
    let rule = if rule.is_empty() {
        None
    } else if super::valid_name(rule) {
        Some(rule.to_owned())
    } else {
        return Err(Error::invalid(
            "rule",
            "a rule name: 1 to 64 of a-z, 0-9 and `-`",
        ));
    };
    let page = r.page.clone().unwrap_or_default();
    let limit = match page.page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let after = if page.page_token.is_empty() {
        None
    } else {
        Some(
            Cursor::decode(&page.page_token)
                .ok_or_else(|| Error::invalid("page.page_token", "invalid page token"))?,
        )
    };
    Ok(AlertQuery {
        status,
        rule,
        after,
        limit,
    })
}

impl Monitor {
    pub async fn list_alerts(
        &self,
        r: &pb::ListAlertsRequest,
    ) -> Result<pb::ListAlertsResponse, Error> {
        let q = alert_query(r)?;
        let (alerts, next) = self
            .engine
            .store
            .list(&q)
            .await
            .map_err(|e| Error::unavailable("listing alerts failed", &e))?;
        Ok(pb::ListAlertsResponse {
            alerts: alerts.into_iter().map(alert_proto).collect(),
            page: Some(PageResponse {
                next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
            }),
        })
    }

    pub async fn acknowledge(
        &self,
        r: &pb::AcknowledgeAlertRequest,
        actor: Actor,
    ) -> Result<pb::AcknowledgeAlertResponse, Error> {
        let id = uuid::Uuid::parse_str(r.id.trim())
            .map_err(|_| Error::invalid("id", "an alert id (UUID)"))?;
        let alert = self.engine.acknowledge(id, actor, r.note.trim()).await?;
        Ok(pb::AcknowledgeAlertResponse {
            alert: Some(alert_proto(alert)),
        })
    }

    pub async fn get_monitor(
        &self,
        chain: &dyn ChainStore,
    ) -> Result<pb::GetMonitorResponse, Error> {
        let unavailable = |e: crate::store::StoreError| {
            Error::unavailable("reading the monitor figures failed", &e)
        };
        let store = &self.engine.store;
        let open = store.open_count().await.map_err(unavailable)?;
        let (newest, _) = store
            .list(&AlertQuery {
                status: Some(AlertStatus::Open),
                limit: MONITOR_ALERTS,
                ..AlertQuery::default()
            })
            .await
            .map_err(unavailable)?;
        let dead_letters = self
            .dead_letters
            .counts()
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|(reason, count)| pb::DeadLetterCount {
                reason: reason.as_str().to_owned(),
                count,
            })
            .collect();
        let head = chain.head().await.map_err(unavailable)?;
        let checkpoint = chain
            .checkpoint_at_or_before(head.seq)
            .await
            .map_err(unavailable)?;
        let now = self.clock.now().timestamp_micros();
        Ok(pb::GetMonitorResponse {
            open_alerts: open,
            newest_open: newest.into_iter().map(alert_proto).collect(),
            ingest_lag_seconds: self.ingest.lag_seconds(),
            dead_letters,
            chain_head_seq: head.seq,
            checkpoint_age_seconds: checkpoint
                .map(|c| (now.saturating_sub(c.time_us)).max(0) as f64 / 1e6),
        })
    }
}
