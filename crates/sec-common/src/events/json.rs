//! The one JSON and CSV form of a [`SecurityEvent`] that every reader shows: audit-svc's
//! exports, the facade's `/security/audit`, and `secctl audit`.

use std::collections::BTreeMap;

use super::{ActorKind, Outcome, SecurityEvent, Severity};

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

/// RFC 3339 in UTC with microseconds, or empty when unset.
fn time(e: &SecurityEvent) -> String {
    e.time
        .as_ref()
        .and_then(super::from_timestamp)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// The actor kind, outcome and severity as every reader shows them (`user`, `success`,
/// `high`; empty when unset or unknown), without building the whole JSON form.
pub fn names(e: &SecurityEvent) -> (String, String, String) {
    let kind = e
        .actor
        .as_ref()
        .and_then(|a| ActorKind::try_from(a.kind).ok())
        .map(|k| lower(k.as_str_name(), "ACTOR_KIND_"))
        .unwrap_or_default();
    let outcome = Outcome::try_from(e.outcome)
        .map(|o| lower(o.as_str_name(), "OUTCOME_"))
        .unwrap_or_default();
    let severity = Severity::try_from(e.severity)
        .map(|s| lower(s.as_str_name(), "SEVERITY_"))
        .unwrap_or_default();
    (kind, outcome, severity)
}

/// `{"id", "type", "time", "service", "actor", "actor_kind", "subject", "source_ip",
/// "outcome", "severity", "details", "trace_id"}`, details with sorted keys.
pub fn event_json(e: &SecurityEvent) -> serde_json::Value {
    let (kind, outcome, severity) = names(e);
    serde_json::json!({
        "id": e.id,
        "type": e.r#type,
        "time": time(e),
        "service": e.service,
        "actor": e.actor.as_ref().map(|a| a.id.clone()),
        "actor_kind": kind,
        "subject": e.subject,
        "source_ip": e.source_ip,
        "outcome": outcome,
        "severity": severity,
        "details": e.details.iter().collect::<BTreeMap<_, _>>(),
        "trace_id": e.trace_id,
    })
}

/// The CSV header line of [`csv_row`], with its CRLF.
pub const CSV_HEADER: &str =
    "id,type,time,service,actor_kind,actor,subject,source_ip,outcome,severity,details,trace_id\r\n";

/// A field quoted per RFC 4180 when it needs to be; a field starting with `=`, `+`, `-`
/// or `@` is prefixed with `'` so a spreadsheet never runs a caller's text as a formula.
fn csv_field(out: &mut String, s: &str) {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    };
    if s.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(&s);
    }
}

/// One CSV record (RFC 4180, CRLF-terminated) in the order of [`CSV_HEADER`]; the details
/// as a JSON object.
pub fn csv_row(e: &SecurityEvent) -> String {
    let (kind, outcome, severity) = names(e);
    let details =
        serde_json::to_string(&e.details.iter().collect::<BTreeMap<_, _>>()).unwrap_or_default();
    let actor = e.actor.as_ref().map(|a| a.id.as_str()).unwrap_or_default();
    csv_record(&[
        e.id.as_str(),
        &e.r#type,
        &time(e),
        &e.service,
        &kind,
        actor,
        &e.subject,
        &e.source_ip,
        &outcome,
        &severity,
        &details,
        &e.trace_id,
    ])
}

/// One CSV record (RFC 4180, CRLF-terminated) of `fields`, each quoted when it needs to
/// be and defused when a spreadsheet would read it as a formula.
pub fn csv_record(fields: &[&str]) -> String {
    let mut out = String::with_capacity(256);
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(&mut out, f);
    }
    out.push_str("\r\n");
    out
}

// ---- Alerts and the monitor (audit-svc, issue 19 item 7): the facade's
// `/security/monitor` and `secctl audit alerts|monitor` show the same JSON.

fn ts_json(t: Option<&prost_types::Timestamp>) -> serde_json::Value {
    t.and_then(super::from_timestamp)
        .map(|t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into()
        })
        .unwrap_or(serde_json::Value::Null)
}

/// `{"id", "rule", "group", "severity", "status", "count", "first_seen", "last_seen",
/// "raised_at", "acknowledged_at", "acknowledged_by", "note", "event_ids"}`.
pub fn alert_json(a: &sec_proto::audit::v1::Alert) -> serde_json::Value {
    let status = sec_proto::audit::v1::AlertStatus::try_from(a.status)
        .map(|s| lower(s.as_str_name(), "ALERT_STATUS_"))
        .unwrap_or_default();
    serde_json::json!({
        "id": a.id,
        "rule": a.rule,
        "group": a.group,
        "severity": a.severity,
        "status": status,
        "count": a.count,
        "first_seen": ts_json(a.first_seen.as_ref()),
        "last_seen": ts_json(a.last_seen.as_ref()),
        "raised_at": ts_json(a.raised_at.as_ref()),
        "acknowledged_at": ts_json(a.acknowledged_at.as_ref()),
        "acknowledged_by": (!a.acknowledged_by.is_empty()).then_some(&a.acknowledged_by),
        "note": (!a.note.is_empty()).then_some(&a.note),
        "event_ids": a.event_ids,
    })
}

/// `{"open_alerts", "newest_open": [alert], "ingest_lag_seconds",
/// "dead_letters": {reason: count}, "chain_head_seq", "checkpoint_age_seconds"}`.
pub fn monitor_json(m: &sec_proto::audit::v1::GetMonitorResponse) -> serde_json::Value {
    let dead: serde_json::Map<String, serde_json::Value> = m
        .dead_letters
        .iter()
        .map(|d| (d.reason.clone(), d.count.into()))
        .collect();
    serde_json::json!({
        "open_alerts": m.open_alerts,
        "newest_open": m.newest_open.iter().map(alert_json).collect::<Vec<_>>(),
        "ingest_lag_seconds": m.ingest_lag_seconds,
        "dead_letters": dead,
        "chain_head_seq": m.chain_head_seq,
        "checkpoint_age_seconds": m.checkpoint_age_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    #[test]
    fn json_and_csv_forms() {
        let mut e = super::super::new_event(&SystemClock, "auth", "sec.auth.login.failed");
        e.actor = Some(super::super::Actor {
            kind: ActorKind::User as i32,
            id: "alice".into(),
        });
        e.subject = "user:a,b \"c\"".into();
        e.details.insert("z".into(), "1".into());
        e.details.insert("a".into(), "=cmd()".into());
        e.severity = Severity::High as i32;
        let j = event_json(&e);
        assert_eq!(j["actor_kind"], "user");
        assert_eq!(j["severity"], "high");
        assert_eq!(j["outcome"], "success");
        assert_eq!(j["details"].to_string(), r#"{"a":"=cmd()","z":"1"}"#);
        let row = csv_row(&e);
        assert!(row.ends_with("\r\n"));
        assert!(row.contains(r#","user:a,b ""c""","#), "{row}");
        assert!(row.contains(r#""{""a"":""=cmd()"",""z"":""1""}""#), "{row}");
        assert_eq!(
            row.matches(',').count() - 2,
            CSV_HEADER.matches(',').count(),
            "{row}"
        );
        let mut f = String::new();
        csv_field(&mut f, "=1+1");
        assert_eq!(f, "'=1+1");
    }

    #[test]
    fn alerts_and_the_monitor_as_json() {
        let a = sec_proto::audit::v1::Alert {
            id: "a1".into(),
            rule: "key-deleted".into(),
            group: "k".into(),
            status: sec_proto::audit::v1::AlertStatus::Acknowledged as i32,
            count: 2,
            raised_at: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            }),
            ..Default::default()
        };
        let j = alert_json(&a);
        assert_eq!(j["status"], "acknowledged");
        assert_eq!(j["raised_at"], "2026-01-01T00:00:00.000000Z");
        assert!(j["acknowledged_at"].is_null() && j["note"].is_null());
        let m = monitor_json(&sec_proto::audit::v1::GetMonitorResponse {
            open_alerts: 1,
            newest_open: vec![a],
            dead_letters: vec![sec_proto::audit::v1::DeadLetterCount {
                reason: "too_large".into(),
                count: 3,
            }],
            ..Default::default()
        });
        assert_eq!(m["dead_letters"]["too_large"], 3);
        assert_eq!(m["newest_open"][0]["id"], "a1");
        assert!(m["checkpoint_age_seconds"].is_null());
    }
}
