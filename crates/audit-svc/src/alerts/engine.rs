//! Evaluation after each committed ingest batch, raising, acknowledging, and the metrics
//! and events that go with them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;
use sec_common::error::{Error, ErrorCode};
use sec_common::events::{Actor, EventBus, SecurityEvent, Severity, new_event};
use tokio::sync::Notify;

use super::store::{Ack, Alert, AlertStore, Candidate, Hit, NewAlert, NewDelivery, Recorded};
use super::{ACKNOWLEDGED, ALERT_TYPE_PREFIX, RAISED, Rule};
use crate::store::StoreError;

/// Attempts at evaluating one batch before giving up on it (the events stay stored).
const EVALUATION_ATTEMPTS: u32 = 3;
/// Longest one evaluation attempt may take: ingest waits for it before acking.
const EVALUATION_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest acknowledgement note kept, in characters.
pub const MAX_NOTE_CHARS: usize = 1024;

/// `rule` comes from validated configuration only, never from an event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Outcomes of `sec_audit_webhook_deliveries_total`.
pub const OUTCOMES: [&str; 3] = ["delivered", "retry", "failed"];

#[derive(Clone, Debug)]
pub struct AlertMetrics {
    raised: Family<RuleLabel, Counter>,
    open: Gauge,
    deliveries: Family<OutcomeLabel, Counter>,
    evaluation_failures: Counter,
}

impl AlertMetrics {
    pub fn register(registry: &mut Registry, rules: &[Rule]) -> Self {
        let m = Self {
            raised: Family::default(),
            open: Gauge::default(),
            deliveries: Family::default(),
            evaluation_failures: Counter::default(),
        };
        for r in rules {
            drop(m.raised.get_or_create(&RuleLabel {
                rule: r.name.clone(),
            }));
        }
        for o in OUTCOMES {
            drop(m.deliveries.get_or_create(&OutcomeLabel { outcome: o }));
        }
        registry.register(
            "sec_audit_alerts_raised",
            "Alerts raised, by rule (rule names come from configuration)",
            m.raised.clone(),
        );
        registry.register(
            "sec_audit_alerts_open",
            "Alerts open (not acknowledged), across all replicas",
            m.open.clone(),
        );
        registry.register(
            "sec_audit_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retry (will be tried again), failed (given up)",
            m.deliveries.clone(),
        );
        registry.register(
            "sec_audit_alert_evaluation_failures",
            "Committed batches whose alert evaluation failed after retries (events are stored; see the error log)",
            m.evaluation_failures.clone(),
        );
        m
    }

    pub(crate) fn delivery(&self, outcome: &'static str) {
        self.deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub(crate) fn set_open(&self, n: u64) {
        self.open.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn raised(&self, rule: &str) -> u64 {
        self.raised
            .get_or_create(&RuleLabel { rule: rule.into() })
            .get()
    }

    pub fn open(&self) -> i64 {
        self.open.get()
    }

    pub fn deliveries(&self, outcome: &'static str) -> u64 {
        self.deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }

    pub fn evaluation_failures(&self) -> u64 {
        self.evaluation_failures.get()
    }
}

pub struct AlertEngine {
    rules: Vec<Rule>,
    /// Names of the configured webhooks: each raised alert queues one delivery to each.
    webhooks: Vec<String>,
    pub store: Arc<dyn AlertStore>,
    bus: EventBus,
    clock: SharedClock,
    pub metrics: AlertMetrics,
    /// Wakes the webhook worker when deliveries were queued.
    pub wake: Arc<Notify>,
}

fn severity(s: &str) -> Severity {
    match s {
        "info" => Severity::Info,
        "low" => Severity::Low,
        "medium" => Severity::Medium,
        "critical" => Severity::Critical,
        _ => Severity::High,
    }
}

fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// The JSON a webhook receives for a raised alert (no secret, no event details).
pub fn webhook_body(delivery: uuid::Uuid, alert: &Alert) -> String {
    serde_json::json!({
        "type": RAISED,
        "delivery_id": delivery.to_string(),
        "alert": alert_json(alert),
    })
    .to_string()
}

/// An alert as JSON (webhook bodies, the facade, secctl).
pub fn alert_json(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "id": a.id.to_string(),
        "rule": a.rule,
        "group": a.group_key,
        "severity": a.severity,
        "status": a.status.as_str(),
        "count": a.count,
        "first_seen": rfc3339(a.first_seen_us),
        "last_seen": rfc3339(a.last_seen_us),
        "raised_at": rfc3339(a.raised_us),
        "acknowledged_at": a.acknowledged_us.map(rfc3339),
        "acknowledged_by": a.acknowledged_by,
        "note": a.note,
        "event_ids": a.event_ids.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    })
}

impl AlertEngine {
    pub fn new(
        rules: Vec<Rule>,
        webhooks: Vec<String>,
        store: Arc<dyn AlertStore>,
        bus: EventBus,
        clock: SharedClock,
        metrics: AlertMetrics,
    ) -> Self {
        Self {
            rules,
            webhooks,
            store,
            bus,
            clock,
            metrics,
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// For each rule: the groups of `events` it watches, each with the time of its
    /// newest event there (the end of its window).
    fn candidates(rule: &Rule, events: &[SecurityEvent]) -> Vec<Candidate> {
        let mut by_group: std::collections::HashMap<String, i64> = Default::default();
        for e in events {
            if e.r#type.starts_with(ALERT_TYPE_PREFIX) || !rule.matches(&e.r#type) {
                continue;
            }
            let Some(g) = rule.group.value_of(e) else {
                continue;
            };
            let at = crate::store::time_us(e);
            by_group
                .entry(g)
                .and_modify(|t| *t = (*t).max(at))
                .or_insert(at);
        }
        by_group
            .into_iter()
            .map(|(group, at_us)| Candidate { group, at_us })
            .collect()
    }

    /// Evaluates every rule against the committed `events` (new or redelivered: the
    /// counts come from the store). Returns the alerts raised.
    pub async fn evaluate(&self, events: &[SecurityEvent]) -> Result<Vec<Alert>, StoreError> {
        let mut raised = Vec::new();
        let mut touched = false;
        for rule in &self.rules {
            let candidates = Self::candidates(rule, events);
            if candidates.is_empty() {
                continue;
            }
            for hit in self.store.hits(rule, &candidates).await? {
                touched = true;
                if let Some(a) = self.record(rule, &hit).await? {
                    raised.push(a);
                }
            }
        }
        if touched {
            self.refresh_open().await;
        }
        if !raised.is_empty() && !self.webhooks.is_empty() {
            self.wake.notify_one();
        }
        Ok(raised)
    }

    async fn record(&self, rule: &Rule, hit: &Hit) -> Result<Option<Alert>, StoreError> {
        let now = self.clock.now().timestamp_micros();
        let alert = Alert {
            id: self.clock.new_uuid_v7(),
            rule: rule.name.clone(),
            group_key: hit.group.clone(),
            severity: rule.severity.to_owned(),
            status: super::store::AlertStatus::Open,
            first_seen_us: hit.first_us,
            last_seen_us: hit.last_us,
            count: hit.count,
            raised_us: now,
            acknowledged_us: None,
            acknowledged_by: None,
            note: None,
            event_ids: Vec::new(),
        };
        let deliveries = self
            .webhooks
            .iter()
            .map(|w| {
                let id = self.clock.new_uuid_v7();
                NewDelivery {
                    id,
                    webhook: w.clone(),
                    body: webhook_body(id, &alert),
                }
            })
            .collect();
        let new = NewAlert {
            id: alert.id,
            raised_us: now,
            deliveries,
        };
        match self.store.record(rule, hit, &new).await? {
            Recorded::Updated(_) => Ok(None),
            Recorded::Raised => {
                self.metrics
                    .raised
                    .get_or_create(&RuleLabel {
                        rule: rule.name.clone(),
                    })
                    .inc();
                tracing::warn!(
                    alert_id = %alert.id,
                    rule = %rule.name,
                    count = hit.count,
                    severity = rule.severity,
                    "alert raised"
                );
                self.announce_raised(&alert);
                Ok(Some(alert))
            }
        }
    }

    /// `sec.audit.alert.raised`: alert_id, rule, group, count, severity.
    fn announce_raised(&self, a: &Alert) {
        let mut e = new_event(self.clock.as_ref(), crate::NAME, RAISED);
        e.severity = severity(&a.severity) as i32;
        e.subject = format!("alert:{}", a.id);
        for (k, v) in [
            ("alert_id", a.id.to_string()),
            ("rule", a.rule.clone()),
            ("group", a.group_key.clone()),
            ("count", a.count.to_string()),
            ("severity", a.severity.clone()),
        ] {
            e.details.insert(k.into(), v);
        }
        if let Err(err) = self.bus.publish(e) {
            tracing::error!(error = %err, alert_id = %a.id, "alert event not published");
        }
    }

    /// Sets `sec_audit_alerts_open` from the store (all replicas' alerts).
    pub async fn refresh_open(&self) {
        match self.store.open_count().await {
            Ok(n) => self.metrics.set_open(n),
            Err(e) => tracing::warn!(error = %e, "cannot count open alerts"),
        }
    }

    /// The ingest hook: evaluates a committed batch, retrying a few times; a failure is
    /// logged and counted, never returned: the events are stored, and the next batch of
    /// the same groups counts them again.
    pub async fn after_commit(&self, events: &[SecurityEvent]) {
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=EVALUATION_ATTEMPTS {
            let error = match tokio::time::timeout(EVALUATION_TIMEOUT, self.evaluate(events)).await
            {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            if attempt == EVALUATION_ATTEMPTS {
                self.metrics.evaluation_failures.inc();
                tracing::error!(error = %error, events = events.len(), "alert evaluation failed; the events are stored, alerts for them may be missing");
                return;
            }
            tracing::warn!(error = %error, attempt, "alert evaluation failed, retrying");
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }

    /// Acknowledges an open alert (compare-and-set: of parallel callers exactly one
    /// wins; the others get ABORTED) and emits `sec.audit.alert.acknowledged`.
    pub async fn acknowledge(
        &self,
        id: uuid::Uuid,
        actor: Actor,
        note: &str,
    ) -> Result<Alert, Error> {
        if note.chars().count() > MAX_NOTE_CHARS {
            return Err(Error::invalid(
                "note",
                format!("at most {MAX_NOTE_CHARS} characters"),
            ));
        }
        let now = self.clock.now().timestamp_micros();
        let by = if actor.id.is_empty() {
            "anonymous".to_owned()
        } else {
            actor.id.clone()
        };
        let ack = self
            .store
            .acknowledge(id, &by, note, now)
            .await
            .map_err(|e| Error::unavailable("acknowledging the alert failed", &e))?;
        match ack {
            Ack::Done(alert) => {
                self.refresh_open().await;
                let mut e = new_event(self.clock.as_ref(), crate::NAME, ACKNOWLEDGED);
                e.actor = Some(actor);
                e.subject = format!("alert:{}", alert.id);
                e.details.insert("alert_id".into(), alert.id.to_string());
                e.details.insert("rule".into(), alert.rule.clone());
                e.details.insert("group".into(), alert.group_key.clone());
                if let Err(err) = self.bus.publish(e) {
                    tracing::error!(error = %err, alert_id = %alert.id, "acknowledgement event not published");
                }
                Ok(*alert)
            }
            Ack::NotOpen => Err(Error::new(
                ErrorCode::Aborted,
                "the alert is not open: it was acknowledged already (possibly concurrently)",
            )),
            Ack::NotFound => Err(Error::not_found("no such alert")),
        }
    }
}
