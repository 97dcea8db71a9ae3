//! Compliance reports (`GetReport`, `secctl audit report`) over a time range, as one
//! JSON document or as CSV:
//!
//! - **access**: who accessed what, per subject — the access events of [`ACCESS_TYPES`]
//!   grouped by subject, actor, event type and outcome, with counts and first/last time;
//! - **changes**: the configuration and key changes of [`CHANGE_TYPES`], oldest first;
//! - **incidents**: the alerts raised in the range, each with the events that raised it.
//!
//! A report reads the trail through the same indexed queries as `SearchEvents`, a page at
//! a time, and is bounded: at most [`MAX_SCANNED`] events read and [`MAX_ROWS`] rows, past
//! which the caller is told to narrow the range rather than given a silently cut report.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sec_common::events::SecurityEvent;
use sec_common::events::json::{CSV_HEADER, csv_record, csv_row, event_json, names};

use crate::store::{EventQuery, EventStore, StoreError, TypeMatch};

/// Events one report may read.
pub const MAX_SCANNED: u64 = 1_000_000;
/// Rows one report may have (groups of the access report, changes, incidents' events).
pub const MAX_ROWS: usize = 100_000;
/// Events read per query.
const PAGE: u32 = 1000;

/// Access: authentication, tokens, sessions, consent, refused decryptions.
pub const ACCESS_TYPES: &[&str] = &[
    "sec.auth.login.succeeded",
    "sec.auth.login.failed",
    "sec.auth.logout",
    "sec.auth.client.auth_failed",
    "sec.auth.code.issued",
    "sec.auth.consent.granted",
    "sec.auth.consent.denied",
    "sec.auth.token.granted",
    "sec.auth.token.revoked",
    "sec.token.revoked",
    "sec.session.session.created",
    "sec.session.session.revoked",
    "sec.session.binding.violated",
    "sec.crypto.decrypt.failed",
];

/// Changes: clients, users, keys and their configuration, signing keys, the KEK.
pub const CHANGE_TYPES: &[&str] = &[
    "sec.auth.client.created",
    "sec.auth.client.updated",
    "sec.auth.client.deleted",
    "sec.auth.client.secret_rotated",
    "sec.auth.user.created",
    "sec.auth.user.updated",
    "sec.auth.user.disabled",
    "sec.auth.user.locked",
    "sec.auth.user.password_changed",
    "sec.crypto.key.created",
    "sec.crypto.key.config_updated",
    "sec.crypto.key.rotated",
    "sec.crypto.key.deleted",
    "sec.crypto.key.delete_refused",
    "sec.crypto.key.restored",
    "sec.crypto.key.backed_up",
    "sec.crypto.kek.rotated",
    "sec.token.key.created",
    "sec.token.key.activated",
    "sec.token.key.retiring",
    "sec.token.key.retired",
    "sec.token.key.revoked",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Access,
    Changes,
    Incidents,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Access => "access",
            Kind::Changes => "changes",
            Kind::Incidents => "incidents",
        }
    }
}

/// What a report covers.
#[derive(Debug, Clone)]
pub struct Scope {
    pub kind: Kind,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub subject: Option<String>,
    pub actor_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One alert and the events linked to it (the incident report's unit).
#[derive(Debug, Clone)]
pub struct Incident {
    /// The alert as a JSON object (id, rule, status, times, counts).
    pub alert: serde_json::Value,
    pub alert_id: String,
    pub events: Vec<SecurityEvent>,
}

/// Where the incident report reads alerts from.
#[async_trait::async_trait]
pub trait IncidentSource: Send + Sync {
    /// Alerts raised within the scope's range (and of its subject, when set), oldest
    /// first, with their events; at most `limit`.
    async fn incidents(&self, scope: &Scope, limit: usize) -> Result<Vec<Incident>, ReportError>;
}

/// The incident report's source in production: the alert tables, and the trail for the
/// events linked to each alert.
pub struct AlertIncidents {
    pub alerts: std::sync::Arc<dyn crate::alerts::store::AlertStore>,
    pub events: std::sync::Arc<dyn EventStore>,
}

#[async_trait::async_trait]
impl IncidentSource for AlertIncidents {
    async fn incidents(&self, scope: &Scope, limit: usize) -> Result<Vec<Incident>, ReportError> {
        let (since, until) = (
            scope.since.timestamp_micros(),
            scope.until.timestamp_micros(),
        );
        let mut q = crate::alerts::store::AlertQuery {
            limit: PAGE,
            ..Default::default()
        };
        let mut found = Vec::new();
        // Newest raised first: stop at the first alert raised before the range.
        'pages: loop {
            let (page, next) = self.alerts.list(&q).await?;
            for a in page {
                if a.raised_us >= until {
                    continue;
                }
                if a.raised_us < since {
                    break 'pages;
                }
                let events = if a.event_ids.is_empty() {
                    Vec::new()
                } else {
                    let q = EventQuery {
                        ids: a.event_ids.clone(),
                        oldest_first: true,
                        limit: u32::try_from(a.event_ids.len()).unwrap_or(u32::MAX),
                        ..EventQuery::default()
                    };
                    self.events.list(&q).await?.0
                };
                let concerns = |want: &Option<String>, of: &dyn Fn(&SecurityEvent) -> &str| {
                    want.as_ref()
                        .is_none_or(|w| a.group_key == *w || events.iter().any(|e| of(e) == w))
                };
                if !concerns(&scope.subject, &|e| e.subject.as_str())
                    || !concerns(&scope.actor_id, &|e| {
                        e.actor.as_ref().map(|a| a.id.as_str()).unwrap_or_default()
                    })
                {
                    continue;
                }
                if found.len() >= limit {
                    return Err(ReportError::TooLarge(format!(
                        "more than {limit} alerts in the range: narrow it"
                    )));
                }
                let alert_id = a.id.to_string();
                let mut alert =
                    sec_common::events::json::alert_json(&crate::alerts::api::alert_proto(a));
                if let Some(o) = alert.as_object_mut() {
                    o.remove("event_ids");
                }
                found.push(Incident {
                    alert,
                    alert_id,
                    events,
                });
            }
            match next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        found.reverse();
        Ok(found)
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn micros_time(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .map(rfc3339)
        .unwrap_or_default()
}

/// Every event of `types` in the scope, oldest first, handed to `each`.
async fn scan(
    store: &dyn EventStore,
    scope: &Scope,
    types: &[&str],
    mut each: impl FnMut(SecurityEvent) -> Result<(), ReportError>,
) -> Result<u64, ReportError> {
    let mut q = EventQuery {
        types: types
            .iter()
            .map(|t| TypeMatch::Exact((*t).to_owned()))
            .collect(),
        since_us: Some(scope.since.timestamp_micros()),
        until_us: Some(scope.until.timestamp_micros()),
        subject: scope.subject.clone(),
        actor_id: scope.actor_id.clone(),
        oldest_first: true,
        limit: PAGE,
        ..EventQuery::default()
    };
    let mut scanned = 0u64;
    loop {
        let (events, next) = store.list(&q).await?;
        scanned += events.len() as u64;
        if scanned > MAX_SCANNED {
            return Err(ReportError::TooLarge(format!(
                "more than {MAX_SCANNED} events in the range: narrow it"
            )));
        }
        for e in events {
            each(e)?;
        }
        match next {
            Some(c) => q.after = Some(c),
            None => return Ok(scanned),
        }
    }
}

/// Access rows: (subject, actor kind, actor, type, outcome) → (count, first, last).
type Groups = BTreeMap<(String, String, String, String, String), (u64, i64, i64)>;

fn too_many_rows() -> ReportError {
    ReportError::TooLarge(format!(
        "the report would have more than {MAX_ROWS} rows: narrow the range or set a subject"
    ))
}

/// The report, rendered.
pub async fn build(
    store: &dyn EventStore,
    incidents: Option<&dyn IncidentSource>,
    scope: &Scope,
    generated_at: DateTime<Utc>,
    csv: bool,
) -> Result<Vec<u8>, ReportError> {
    let head = serde_json::json!({
        "report": scope.kind.name(),
        "generated_at": rfc3339(generated_at),
        "since": rfc3339(scope.since),
        "until": rfc3339(scope.until),
        "subject": scope.subject,
        "actor_id": scope.actor_id,
    });
    let mut out = String::new();
    let (rows, scanned) = match scope.kind {
        Kind::Access => {
            let mut groups = Groups::new();
            let scanned = scan(store, scope, ACCESS_TYPES, |e| {
                let (actor_kind, outcome, _) = names(&e);
                let key = (
                    e.subject.clone(),
                    actor_kind,
                    e.actor.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
                    e.r#type.clone(),
                    outcome,
                );
                let t = crate::store::time_us(&e);
                if !groups.contains_key(&key) && groups.len() >= MAX_ROWS {
                    return Err(too_many_rows());
                }
                let g = groups.entry(key).or_insert((0, t, t));
                g.0 += 1;
                g.1 = g.1.min(t);
                g.2 = g.2.max(t);
                Ok(())
            })
            .await?;
            if csv {
                out.push_str(
                    "subject,actor_kind,actor_id,event_type,outcome,count,first_seen,last_seen\r\n",
                );
            }
            let mut rows = Vec::new();
            for ((subject, kind, actor, ty, outcome), (count, first, last)) in groups {
                if csv {
                    out.push_str(&csv_record(&[
                        &subject,
                        &kind,
                        &actor,
                        &ty,
                        &outcome,
                        &count.to_string(),
                        &micros_time(first),
                        &micros_time(last),
                    ]));
                } else {
                    rows.push(serde_json::json!({
                        "subject": subject, "actor_kind": kind, "actor_id": actor,
                        "event_type": ty, "outcome": outcome, "count": count,
                        "first_seen": micros_time(first), "last_seen": micros_time(last),
                    }));
                }
            }
            (rows, scanned)
        }
        Kind::Changes => {
            let mut rows = Vec::new();
            let mut n = 0usize;
            if csv {
                out.push_str(CSV_HEADER);
            }
            let scanned = scan(store, scope, CHANGE_TYPES, |e| {
                n += 1;
                if n > MAX_ROWS {
                    return Err(too_many_rows());
                }
                if csv {
                    out.push_str(&csv_row(&e));
                } else {
                    rows.push(event_json(&e));
                }
                Ok(())
            })
            .await?;
            (rows, scanned)
        }
        Kind::Incidents => {
            let Some(source) = incidents else {
                return Err(ReportError::Store(StoreError::Dependency(
                    "alerts are not available".into(),
                )));
            };
            let found = source.incidents(scope, MAX_ROWS).await?;
            let mut rows = Vec::new();
            let mut scanned = 0u64;
            if csv {
                out.push_str("alert_id,alert,");
                out.push_str(CSV_HEADER);
            }
            for i in found {
                scanned += i.events.len() as u64;
                if csv {
                    let alert = i.alert.to_string();
                    if i.events.is_empty() {
                        out.push_str(csv_record(&[&i.alert_id, &alert]).trim_end());
                        out.push_str(&",".repeat(11));
                        out.push_str("\r\n");
                    }
                    for e in &i.events {
                        let head = csv_record(&[&i.alert_id, &alert]);
                        out.push_str(head.trim_end_matches("\r\n"));
                        out.push(',');
                        out.push_str(&csv_row(e));
                    }
                } else {
                    let mut a = i.alert;
                    a["events"] = i.events.iter().map(event_json).collect();
                    rows.push(a);
                }
            }
            (rows, scanned)
        }
    };
    if csv {
        return Ok(out.into_bytes());
    }
    let mut doc = head;
    doc["events_scanned"] = scanned.into();
    doc["rows"] = rows.into();
    Ok(serde_json::to_vec_pretty(&doc).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use sec_common::clock::{Clock, ManualClock};
    use sec_common::events::{Actor, ActorKind, Outcome, new_event, to_timestamp};

    use super::*;

    fn scope(kind: Kind, clock: &ManualClock) -> Scope {
        Scope {
            kind,
            since: clock.now() - chrono::TimeDelta::hours(1),
            until: clock.now() + chrono::TimeDelta::hours(1),
            subject: None,
            actor_id: None,
        }
    }

    fn ev(clock: &ManualClock, ty: &str, actor: &str, subject: &str, ok: bool) -> SecurityEvent {
        let mut e = new_event(clock, "auth", ty);
        e.actor = Some(Actor {
            kind: ActorKind::User as i32,
            id: actor.into(),
        });
        e.subject = subject.into();
        e.outcome = if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        } as i32;
        e.time = Some(to_timestamp(clock.now()));
        clock.advance(chrono::TimeDelta::seconds(1));
        e
    }

    async fn store() -> (
        std::sync::Arc<dyn crate::store::AuditStore>,
        tempfile::TempDir,
    ) {
        let (dir, db) = crate::test_sqlite().await;
        (crate::event_store(&db, sec_common::clock::system()), dir)
    }

    #[tokio::test]
    async fn access_groups_per_subject_and_changes_list_in_order() {
        let clock = ManualClock::new("2026-06-01T12:00:00Z".parse().unwrap());
        let (store, _dir) = store().await;
        let events: Vec<SecurityEvent> = [
            ("sec.auth.login.failed", "alice", "user:alice", false),
            ("sec.auth.login.failed", "alice", "user:alice", false),
            ("sec.auth.login.succeeded", "alice", "user:alice", true),
            ("sec.auth.token.granted", "svc-a", "client:web", true),
            ("sec.crypto.key.rotated", "admin", "key:orders", true),
            ("sec.auth.client.created", "admin", "client:web", true),
            ("sec.ratelimit.exceeded", "bob", "user:bob", false),
        ]
        .iter()
        .map(|(ty, actor, subject, ok)| ev(&clock, ty, actor, subject, *ok))
        .collect();
        store.insert_batch(&events).await.unwrap();
        let now = clock.now();
        let report =
            async |scope: Scope, csv: bool| build(store.as_ref(), None, &scope, now, csv).await;
        let doc = async |scope: Scope| -> serde_json::Value {
            serde_json::from_slice(&report(scope, false).await.unwrap()).unwrap()
        };

        let access = doc(scope(Kind::Access, &clock)).await;
        assert_eq!(access["report"], "access");
        assert_eq!(access["events_scanned"], 4, "only access events");
        let rows = access["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        let failed = rows
            .iter()
            .find(|r| r["event_type"] == "sec.auth.login.failed")
            .unwrap();
        assert_eq!(failed["subject"], "user:alice");
        assert_eq!(failed["actor_id"], "alice");
        assert_eq!(failed["outcome"], "failure");
        assert_eq!(failed["count"], 2);
        assert!(failed["first_seen"].as_str() < failed["last_seen"].as_str());

        let csv =
            String::from_utf8(report(scope(Kind::Access, &clock), true).await.unwrap()).unwrap();
        assert!(csv.starts_with("subject,actor_kind,actor_id,event_type,outcome,count"));
        assert_eq!(csv.lines().count(), 4);
        assert!(csv.contains("user:alice,user,alice,sec.auth.login.failed,failure,2,"));

        let mut only_web = scope(Kind::Access, &clock);
        only_web.subject = Some("client:web".into());
        assert_eq!(doc(only_web).await["rows"].as_array().unwrap().len(), 1);

        let changes = doc(scope(Kind::Changes, &clock)).await;
        let types: Vec<&str> = changes["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["sec.crypto.key.rotated", "sec.auth.client.created"]);

        // outside the range: nothing
        let mut before = scope(Kind::Changes, &clock);
        before.until = before.since + chrono::TimeDelta::minutes(1);
        assert!(doc(before).await["rows"].as_array().unwrap().is_empty());

        // incidents need the alert store
        assert!(report(scope(Kind::Incidents, &clock), false).await.is_err());
    }
}
