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

fn names(e: &SecurityEvent) -> (String, String, String) {
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
}
