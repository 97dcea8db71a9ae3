//! The ingest loop: events from the bus into the store, acknowledged only after the
//! batch is committed, so a crash or a database outage redelivers instead of losing.
//!
//! Every fetched message ends in exactly one of three ways:
//! - **stored**: valid, inserted (or already there), then acked;
//! - **dead-lettered**: it can never be stored, so it is recorded in `dead_letters`
//!   (reason, content-free detail, event id and type when valid, payload cut at
//!   `audit.max_details_bytes`), counted in `sec_audit_dead_lettered_total{reason}`,
//!   announced by a `sec.audit.event.dead_lettered` event (never with the payload), and
//!   handed to [`Delivery::dead_letter`] (NATS: copied to the DLQ stream, then
//!   terminated; in process: acked);
//! - **redelivered**: nacked when the database or the broker is unavailable. An outage
//!   never dead-letters anything.
//!
//! Validation before the insert ([`validate`]), in this order: the payload decodes
//! (`undecodable`); the id is a UUID, the type is `sec.<service>[.<noun>].<verb>` of
//! `event.service`, the time is representable, and the NATS subject is the type's
//! (`invalid`); the type is in [`catalog`] (`unknown_type`); at most
//! [`MAX_DETAILS`] details of at most `audit.max_details_bytes` in all (`too_large`).
//!
//! Poison rows: when a batch insert fails with a *data* error (PostgreSQL SQLSTATE class
//! 22 or 23, SQLite constraint/mismatch/too-big, or a row the store cannot map), the
//! batch is bisected until the rows that fail alone are found; those are dead-lettered
//! `unstorable` and the rest is stored. Any other error (connection, pool, I/O) nacks
//! what is not committed and backs off.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use prost::Message as _;
use sec_common::clock::SharedClock;
use sec_common::events::{
    DeadLetterReason, Delivery, EventBus, Fetched, MAX_DETAILS, Outcome, SecurityEvent, Severity,
    TransportError, Undecodable, catalog,
};
use tokio_util::sync::CancellationToken;

use crate::store::dead_letter::{DeadLetter, DeadLetterStore};
use crate::store::{EventStore, StoreError};

/// Events per fetch and per transaction. Each commit waits for the WAL flush and holds
/// the chain-head lock, a fixed cost of tens of milliseconds on this class of machine:
/// 10,000 per batch measured ~20,000 events/s where 1,000 gave ~7,500
/// (`cargo bench -p audit-svc --bench ingest`). Inside a batch the insert itself
/// dominates (~300 ms of ~360 ms per 10,000 rows, most of it index maintenance; see
/// `docs/search.md`).
const BATCH: usize = 10_000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Type of the event announcing a dead letter.
pub const DEAD_LETTERED: &str = "sec.audit.event.dead_lettered";

/// Label of `sec_audit_dead_lettered_total`: one of [`DeadLetterReason::ALL`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone)]
pub struct IngestMetrics {
    ingested: Counter,
    duplicates: Counter,
    failures: Counter,
    batch_seconds: Histogram,
    lag_seconds: Gauge<f64, AtomicU64>,
    dead_lettered: Family<ReasonLabel, Counter>,
    unprotected_streams: Gauge,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            ingested: Counter::default(),
            duplicates: Counter::default(),
            failures: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            lag_seconds: Gauge::default(),
            dead_lettered: Family::default(),
            unprotected_streams: Gauge::default(),
        };
        // Every reason shows, at 0 until it happens.
        for r in DeadLetterReason::ALL {
            drop(
                m.dead_lettered
                    .get_or_create(&ReasonLabel { reason: r.as_str() }),
            );
        }
        registry.register(
            "sec_audit_events_ingested",
            "Events newly stored in the audit trail",
            m.ingested.clone(),
        );
        registry.register(
            "sec_audit_events_duplicate",
            "Redelivered events that were already stored",
            m.duplicates.clone(),
        );
        registry.register(
            "sec_audit_ingest_failures",
            "Batches that failed to store and were redelivered",
            m.failures.clone(),
        );
        registry.register(
            "sec_audit_ingest_batch_seconds",
            "Time to store one batch",
            m.batch_seconds.clone(),
        );
        registry.register(
            "sec_audit_ingest_lag_seconds",
            "Now minus the event time of the newest event in the last stored batch; 0 when a fetch finds nothing waiting",
            m.lag_seconds.clone(),
        );
        registry.register(
            "sec_audit_dead_lettered",
            "Messages set aside because they can never be stored, by reason: undecodable, invalid, unknown_type, too_large, unstorable",
            m.dead_lettered.clone(),
        );
        registry.register(
            "sec_audit_event_streams_unprotected",
            "Event streams (main, dead-letter) that lack deny_delete/deny_purge because the broker refused to set them; see the error log for the nats command",
            m.unprotected_streams.clone(),
        );
        m
    }

    /// What `sec_audit_ingest_lag_seconds` reports now.
    pub fn lag_seconds(&self) -> f64 {
        self.lag_seconds.get()
    }

    /// What `sec_audit_dead_lettered_total{reason}` reports now.
    pub fn dead_lettered(&self, reason: DeadLetterReason) -> u64 {
        self.dead_lettered
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .get()
    }
}

/// `now` minus the newest event time among `events`, in seconds, never below 0 (a
/// producer's clock ahead of ours is not a lag); 0 when no event carries a time.
fn lag_seconds(now: chrono::DateTime<chrono::Utc>, events: &[SecurityEvent]) -> f64 {
    let newest = events
        .iter()
        .filter_map(|e| e.time.as_ref())
        .filter_map(sec_common::events::from_timestamp)
        .max();
    newest.map_or(0.0, |t| {
        let ms = (now - t).num_milliseconds().max(0);
        // Milliseconds: exact in an f64 for any lag that matters.
        ms as f64 / 1000.0
    })
}

/// What validation needs to know.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `events.subject_prefix`: a NATS message must be on `<prefix>.<type minus "sec.">`.
    pub subject_prefix: String,
    /// `audit.max_details_bytes`.
    pub max_details_bytes: usize,
}

/// Latest instant a stored time may be: `security_events` keeps microseconds in an i64.
const MAX_EVENT_SECONDS: i64 = i64::MAX / 1_000_000 - 1;

/// Whether audit-svc stores this event; `Err` says why not. `subject` is the subject the
/// message arrived on (`None` in process).
pub fn validate(
    event: &SecurityEvent,
    subject: Option<&str>,
    limits: &Limits,
) -> Result<(), (DeadLetterReason, String)> {
    let invalid = |m: String| (DeadLetterReason::Invalid, m);
    // Id, type syntax and type's service: the bus's own rule.
    let expected = sec_common::events::subject_for(&limits.subject_prefix, event)
        .map_err(|e| invalid(e.to_string()))?;
    if let Some(t) = &event.time
        && (!(-MAX_EVENT_SECONDS..=MAX_EVENT_SECONDS).contains(&t.seconds)
            || !(0..1_000_000_000).contains(&t.nanos)
            || sec_common::events::from_timestamp(t).is_none())
    {
        return Err(invalid("event time out of range".into()));
    }
    if let Some(s) = subject
        && s != expected
    {
        return Err(invalid(format!(
            "published on `{s}`, its type belongs on `{expected}`"
        )));
    }
    if !catalog::is_known(&event.r#type) {
        return Err((
            DeadLetterReason::UnknownType,
            format!("type `{}` is not in the event catalog", event.r#type),
        ));
    }
    if event.details.len() > MAX_DETAILS {
        return Err((
            DeadLetterReason::TooLarge,
            format!(
                "{} details, over the limit of {MAX_DETAILS}",
                event.details.len()
            ),
        ));
    }
    let bytes: usize = event.details.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_details_bytes {
        return Err((
            DeadLetterReason::TooLarge,
            format!(
                "details are {bytes} bytes, over audit.max_details_bytes ({})",
                limits.max_details_bytes
            ),
        ));
    }
    Ok(())
}

/// A data error: this row (or one in the batch) is refused for what it contains, and
/// will be refused again however often it is retried. Connection, pool and I/O errors
/// are not.
pub fn is_data_error(e: &StoreError) -> bool {
    match e {
        StoreError::Corrupt(_) => true,
        StoreError::Db(sqlx::Error::Database(d)) => {
            if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                // SQLSTATE class 22 (data exception) or 23 (integrity constraint).
                d.code()
                    .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
            } else {
                // SQLite: extended result code; the primary code is its low byte.
                // 18 TOOBIG, 19 CONSTRAINT, 20 MISMATCH.
                d.code()
                    .and_then(|c| c.parse::<u32>().ok())
                    .is_some_and(|c| matches!(c & 0xff, 18..=20))
            }
        }
        _ => false,
    }
}

/// The SQLSTATE/result code of a data error, for the `detail` column (never the row).
fn data_error_detail(e: &StoreError) -> String {
    match e {
        StoreError::Db(sqlx::Error::Database(d)) => format!(
            "database refused the row: {} {}",
            d.code().unwrap_or_default(),
            d.message()
        ),
        other => format!("database refused the row: {other}"),
    }
}

/// What a (possibly bisected) batch insert did.
#[derive(Debug, Default)]
struct Inserted {
    /// Rows newly stored.
    new: u64,
    /// Per event: committed (stored or already there).
    committed: Vec<bool>,
    /// Events the database refuses alone, with why.
    unstorable: Vec<(usize, String)>,
    /// The error that stopped it (not a data error): the rest is to be retried.
    outage: Option<StoreError>,
}

/// Inserts `events`; on a data error splits the failing range in two and tries again,
/// down to single events, so one poison row costs O(log n) extra statements and never
/// holds back the others.
async fn insert_bisecting(store: &dyn EventStore, events: &[SecurityEvent]) -> Inserted {
    let mut out = Inserted {
        committed: vec![false; events.len()],
        ..Inserted::default()
    };
    if events.is_empty() {
        return out;
    }
    let mut ranges = vec![(0, events.len())];
    while let Some((lo, hi)) = ranges.pop() {
        match store.insert_batch(&events[lo..hi]).await {
            Ok(n) => {
                out.new += n;
                out.committed[lo..hi].iter_mut().for_each(|c| *c = true);
            }
            Err(e) if is_data_error(&e) => {
                if hi - lo == 1 {
                    tracing::error!(event_id = %events[lo].id, event_type = %events[lo].r#type, error = %e, "database refuses this event; dead-lettering it");
                    out.unstorable.push((lo, data_error_detail(&e)));
                } else {
                    let mid = lo + (hi - lo) / 2;
                    ranges.push((mid, hi));
                    ranges.push((lo, mid));
                }
            }
            Err(e) => {
                out.outage = Some(e);
                break;
            }
        }
    }
    out
}

/// A message on its way to the dead letters.
enum Aside {
    Event(Box<Delivery>),
    Raw(Undecodable),
}

impl Aside {
    async fn nack(self) {
        let r = match self {
            Self::Event(d) => d.nack().await,
            Self::Raw(u) => u.nack().await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "nack failed; the message comes back after the ack wait");
        }
    }

    async fn dead_letter(
        self,
        reason: DeadLetterReason,
        detail: &str,
    ) -> Result<(), TransportError> {
        match self {
            Self::Event(d) => d.dead_letter(reason, detail).await,
            Self::Raw(u) => u.dead_letter(detail).await,
        }
    }
}

/// Everything the loop works with.
pub struct Ingest {
    pub bus: EventBus,
    pub store: Arc<dyn EventStore>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub metrics: IngestMetrics,
    /// What the ingest lag is measured against; stamps the dead-letter events.
    pub clock: SharedClock,
    pub limits: Limits,
    /// `audit.sensitive_fields`, when any is configured.
    pub sensitive: Option<Arc<crate::sensitive::Sensitive>>,
    /// Alert rules, evaluated after each committed batch (`None`: no evaluation).
    pub alerts: Option<Arc<crate::alerts::engine::AlertEngine>>,
}

impl Ingest {
    /// Records, counts, announces and hands `item` to the broker's dead-letter path. On
    /// an outage (the row cannot be written) the message is nacked instead.
    async fn set_aside(&self, item: Aside, reason: DeadLetterReason, detail: &str) {
        let (row, event) = match &item {
            Aside::Event(d) => {
                let e = &d.event;
                // The table never holds a sensitive value in plain text.
                let payload = match self.sensitive.as_ref().and_then(|s| s.redacted(e)) {
                    Some(redacted) => redacted.encode_to_vec(),
                    None => d.payload(),
                };
                let event_id = uuid::Uuid::parse_str(&e.id).ok();
                let event_type =
                    sec_common::events::type_service(&e.r#type).map(|_| e.r#type.clone());
                (
                    DeadLetter::new(
                        reason,
                        detail,
                        event_id,
                        event_type,
                        d.source_key(),
                        &payload,
                        self.limits.max_details_bytes,
                    ),
                    Some(e),
                )
            }
            Aside::Raw(u) => (
                DeadLetter::new(
                    reason,
                    detail,
                    None,
                    None,
                    u.source_key(),
                    u.payload(),
                    self.limits.max_details_bytes,
                ),
                None,
            ),
        };
        let first_time = match self.dead_letters.record(&row).await {
            Ok(new) => new,
            Err(e) if is_data_error(&e) => {
                // Cannot happen with the sanitised row; if it does, the broker's copy is
                // the record, rather than retrying forever.
                tracing::error!(error = %e, reason = reason.as_str(), "cannot record the dead letter in the table; relying on the broker's copy");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a dead letter now, it will be redelivered");
                item.nack().await;
                return;
            }
        };
        if first_time {
            self.metrics
                .dead_lettered
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
            tracing::error!(
                reason = reason.as_str(),
                detail = %row.detail,
                event_id = ?row.event_id,
                event_type = ?row.event_type,
                size = row.payload_size,
                "message dead-lettered: it can never be stored in the audit trail"
            );
            let is_own_summary = event.is_some_and(|e| e.r#type == DEAD_LETTERED);
            if !is_own_summary {
                self.announce(&row);
            }
        }
        if let Err(e) = item.dead_letter(reason, &row.detail).await {
            tracing::warn!(error = %e, "cannot copy to the dead-letter stream now; the message was nacked and will be redelivered");
        }
    }

    /// `sec.audit.event.dead_lettered`: reason, and the event's id and type when valid;
    /// never its payload.
    fn announce(&self, row: &DeadLetter) {
        let mut e = sec_common::events::new_event(self.clock.as_ref(), crate::NAME, DEAD_LETTERED);
        e.outcome = Outcome::Failure as i32;
        e.severity = Severity::High as i32;
        e.details
            .insert("reason".into(), row.reason.as_str().into());
        e.details
            .insert("size".into(), row.payload_size.to_string());
        if let Some(id) = row.event_id {
            e.subject = format!("event:{id}");
            e.details.insert("event_id".into(), id.to_string());
        }
        if let Some(t) = &row.event_type {
            e.details.insert("event_type".into(), t.clone());
        }
        if let Err(err) = self.bus.publish(e) {
            tracing::warn!(error = %err, "dead-letter event not published");
        }
    }

    /// One fetched batch; `Err` when the database is unavailable (everything not
    /// committed was nacked).
    async fn handle(&self, fetched: Fetched) -> Result<(), StoreError> {
        let Fetched {
            deliveries,
            undecodable,
        } = fetched;
        let mut valid = Vec::with_capacity(deliveries.len());
        let mut rejected = Vec::new();
        for d in deliveries {
            match validate(&d.event, d.subject(), &self.limits) {
                Ok(()) => valid.push(d),
                Err((reason, detail)) => rejected.push((Aside::Event(Box::new(d)), reason, detail)),
            }
        }
        for u in undecodable {
            let detail = format!("not a SecurityEvent: {}", u.error);
            rejected.push((Aside::Raw(u), DeadLetterReason::Undecodable, detail));
        }

        // The trace id of the producing request, from the `traceparent` header when the
        // producer could not put it in the event itself.
        let mut events: Vec<_> = valid.iter().map(Delivery::event_with_trace_id).collect();
        if let Some(sensitive) = &self.sensitive
            && let Err(e) = sensitive.protect(&mut events).await
        {
            // Fail closed: nothing is stored in plain text; all of it comes back.
            let all = valid
                .into_iter()
                .map(|d| Aside::Event(Box::new(d)))
                .chain(rejected.into_iter().map(|(item, _, _)| item));
            futures::future::join_all(all.map(Aside::nack)).await;
            return Err(StoreError::Dependency(e.to_string()));
        }
        let started = Instant::now();
        let inserted = insert_bisecting(self.store.as_ref(), &events).await;
        let committed = inserted.committed.iter().filter(|c| **c).count() as u64;
        if committed > 0 {
            self.metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.ingested.inc_by(inserted.new);
            self.metrics.duplicates.inc_by(committed - inserted.new);
            let stored: Vec<SecurityEvent> = events
                .iter()
                .zip(&inserted.committed)
                .filter(|(_, c)| **c)
                .map(|(e, _)| e.clone())
                .collect();
            self.metrics
                .lag_seconds
                .set(lag_seconds(self.clock.now(), &stored));
            // Before the acks: a crash here redelivers and evaluates again (the counts
            // come from the store, so that is harmless). Never fails the batch.
            if let Some(alerts) = &self.alerts {
                alerts.after_commit(&stored).await;
            }
        }

        let mut unstorable: Vec<Option<String>> = vec![None; valid.len()];
        for (i, detail) in inserted.unstorable {
            unstorable[i] = Some(detail);
        }
        let mut acks = Vec::new();
        let mut nacks = Vec::new();
        for ((d, committed), bad) in valid.into_iter().zip(inserted.committed).zip(unstorable) {
            match bad {
                Some(detail) => rejected.push((
                    Aside::Event(Box::new(d)),
                    DeadLetterReason::Unstorable,
                    detail,
                )),
                None if committed => acks.push(d),
                None => nacks.push(Aside::Event(Box::new(d))),
            }
        }
        let results = futures::future::join_all(acks.into_iter().map(Delivery::ack)).await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            // Stored but not acked: the broker redelivers and the store skips the ids.
            tracing::warn!(error = %e, "ack failed after commit; events will be redelivered and de-duplicated");
        }

        if let Some(e) = inserted.outage {
            // An outage dead-letters nothing: everything not committed comes back.
            nacks.extend(rejected.into_iter().map(|(item, _, _)| item));
            futures::future::join_all(nacks.into_iter().map(Aside::nack)).await;
            return Err(e);
        }
        for (item, reason, detail) in rejected {
            self.set_aside(item, reason, &detail).await;
        }
        Ok(())
    }
}

/// Runs until `stop`; then drains what the bus still holds before returning.
///
/// While one batch is stored the next is already being fetched (a spawned task, so
/// decoding overlaps the insert's round trips and WAL flush): storing is serial anyway
/// (the chain-head lock), and a fetch that waits behind it leaves the database idle.
/// A fetch in flight is never abandoned; when stopping, no new one is started ahead.
pub async fn run(ingest: Ingest, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut ahead: Option<tokio::task::JoinHandle<Result<Fetched, TransportError>>> = None;
    loop {
        let draining = stop.is_cancelled();
        // Never abandon a fetch in flight: with JetStream the server may already have
        // handed messages to it, and a dropped fetch leaves them unacknowledged until the
        // consumer's ack wait (30 s) redelivers them. A stop is seen at the next turn, at
        // most one fetch's wait later.
        let fetched = match ahead.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(TransportError::Unavailable(format!(
                    "fetch task failed: {e}"
                )))
            }),
            None => ingest.bus.fetch_all(BATCH, fetch_wait(draining)).await,
        };
        ingest
            .metrics
            .unprotected_streams
            .set(i64::try_from(ingest.bus.unprotected_streams().len()).unwrap_or(i64::MAX));
        let fetched = match fetched {
            Ok(f) if f.is_empty() => {
                // Nothing was waiting for a whole fetch: caught up.
                ingest.metrics.lag_seconds.set(0.0);
                if draining {
                    return;
                }
                continue;
            }
            Ok(f) => f,
            Err(e) => {
                if draining {
                    tracing::warn!(error = %e, "event bus unavailable while draining, stopping");
                    return;
                }
                tracing::warn!(error = %e, "cannot fetch events, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !draining {
            let bus = ingest.bus.clone();
            ahead = Some(tokio::spawn(async move {
                bus.fetch_all(BATCH, fetch_wait(false)).await
            }));
        }
        let batch = fetched.len();
        match ingest.handle(fetched).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                ingest.metrics.failures.inc();
                tracing::error!(error = %e, batch, "cannot store events, they will be redelivered");
                if draining {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// How long one fetch waits for a full batch: shorter when draining at a stop.
fn fetch_wait(draining: bool) -> Duration {
    if draining {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(500)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::{DateTime, TimeDelta, Utc};
    use sec_common::clock::ManualClock;
    use sec_common::config::EventsConfig;
    use sec_common::events::{new_event, to_timestamp};

    use super::*;
    use crate::store::{Cursor, EventQuery};

    fn limits() -> Limits {
        Limits {
            subject_prefix: EventsConfig::default().subject_prefix,
            max_details_bytes: 16 * 1024,
        }
    }

    /// For tests where nothing is dead-lettered.
    struct NoDeadLetters;

    #[async_trait::async_trait]
    impl DeadLetterStore for NoDeadLetters {
        async fn record(&self, d: &DeadLetter) -> Result<bool, StoreError> {
            panic!("unexpected dead letter {d:?}")
        }
        async fn counts(&self) -> Result<Vec<(DeadLetterReason, u64)>, StoreError> {
            Ok(Vec::new())
        }
        async fn recent(
            &self,
            _: u32,
        ) -> Result<Vec<crate::store::dead_letter::Recorded>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn event_at(t: DateTime<Utc>) -> SecurityEvent {
        let mut e = new_event(&*ManualClock::new(t0()), "auth", "sec.auth.login.failed");
        e.time = Some(to_timestamp(t));
        e
    }

    #[test]
    fn lag_is_measured_to_the_newest_event_and_never_negative() {
        let now = t0() + TimeDelta::seconds(30);
        let at = |s: i64| event_at(t0() + TimeDelta::milliseconds(s));
        assert_eq!(lag_seconds(now, &[at(0), at(12_500), at(3_000)]), 17.5);
        assert_eq!(lag_seconds(now, &[at(45_000)]), 0.0, "producer clock ahead");
        let mut untimed = at(0);
        untimed.time = None;
        assert_eq!(lag_seconds(now, &[untimed]), 0.0);
        assert_eq!(lag_seconds(now, &[]), 0.0);
    }

    /// Records, at each batch, the lag the gauge showed when the batch arrived (the
    /// previous batch's), and publishes one more event during the first batch so the
    /// second follows without an idle fetch in between.
    struct Recorder {
        bus: EventBus,
        metrics: IngestMetrics,
        next: Mutex<Option<SecurityEvent>>,
        seen: Mutex<Vec<(f64, usize)>>,
    }

    #[async_trait::async_trait]
    impl EventStore for Recorder {
        async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
            self.seen
                .lock()
                .unwrap()
                .push((self.metrics.lag_seconds(), events.len()));
            let next = self.next.lock().unwrap().take();
            if let Some(e) = next {
                self.bus.publish(e).unwrap();
                assert_eq!(self.bus.flush(Duration::from_secs(5)).await, 0);
            }
            Ok(events.len() as u64)
        }

        async fn list(
            &self,
            _: &EventQuery,
        ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError> {
            Ok((Vec::new(), None))
        }
    }

    #[tokio::test]
    async fn lag_gauge_follows_each_stored_batch_and_drops_to_zero_when_idle() {
        let clock = ManualClock::new(t0() + TimeDelta::seconds(30));
        let cfg = EventsConfig::default();
        let bus = EventBus::with_clock(
            Arc::new(sec_common::events::memory::MemoryTransport::new(100)),
            &cfg,
            clock.clone(),
        );
        let metrics = IngestMetrics::register(&mut Registry::default());
        // Waiting when audit-svc starts: events 30 s and 10 s old.
        for s in [0, 20] {
            bus.publish(event_at(t0() + TimeDelta::seconds(s))).unwrap();
        }
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let store = Arc::new(Recorder {
            bus: bus.clone(),
            metrics: metrics.clone(),
            next: Mutex::new(Some(event_at(t0() + TimeDelta::seconds(27)))),
            seen: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Ingest {
                bus: bus.clone(),
                store: store.clone(),
                dead_letters: Arc::new(NoDeadLetters),
                metrics: metrics.clone(),
                clock: clock.clone(),
                limits: limits(),
                sensitive: None,
                alerts: None,
            },
            stop.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.seen.lock().unwrap().len() < 2 || metrics.lag_seconds() != 0.0 {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                store.seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();
        // Batch 1 (both waiting events) left 10 s: its newest event's age; batch 2 (the
        // event published meanwhile) arrived on that. Then an idle fetch: 0.
        assert_eq!(*store.seen.lock().unwrap(), vec![(0.0, 2), (10.0, 1)]);
        assert_eq!(metrics.lag_seconds(), 0.0);
    }

    /// Stores slowly, announcing each batch as it starts.
    struct Slow {
        started: tokio::sync::Notify,
        stored: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl EventStore for Slow {
        async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
            self.started.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.stored
                .lock()
                .unwrap()
                .extend(events.iter().map(|e| e.id.clone()));
            Ok(events.len() as u64)
        }

        async fn list(
            &self,
            _: &EventQuery,
        ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError> {
            Ok((Vec::new(), None))
        }
    }

    /// The next batch is fetched while one is stored; a stop in between must still store
    /// what that fetch took, not abandon it (it would come back only after the ack wait).
    #[tokio::test]
    async fn an_event_fetched_ahead_is_stored_when_the_stop_comes_meanwhile() {
        let clock = ManualClock::new(t0());
        let bus = EventBus::with_clock(
            Arc::new(sec_common::events::memory::MemoryTransport::new(100)),
            &EventsConfig::default(),
            clock.clone(),
        );
        let first = event_at(t0());
        bus.publish(first.clone()).unwrap();
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let store = Arc::new(Slow {
            started: tokio::sync::Notify::new(),
            stored: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Ingest {
                bus: bus.clone(),
                store: store.clone(),
                dead_letters: Arc::new(NoDeadLetters),
                metrics: IngestMetrics::register(&mut Registry::default()),
                clock: clock.clone(),
                limits: limits(),
                sensitive: None,
                alerts: None,
            },
            stop.clone(),
        ));
        // The first batch is being stored and the next fetch is waiting: an event arrives
        // for it, then the stop.
        store.started.notified().await;
        let second = event_at(t0());
        bus.publish(second.clone()).unwrap();
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop stops")
            .unwrap();
        assert_eq!(*store.stored.lock().unwrap(), vec![first.id, second.id]);
    }
}

#[cfg(test)]
mod ingest_tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Mutex;

    use prost::Message as _;
    use sec_common::clock::system;
    use sec_common::config::EventsConfig;
    use sec_common::events::memory::MemoryTransport;
    use sec_common::events::{EventTransport, Outgoing, new_event};

    use super::*;
    use crate::store::dead_letter::Recorded;
    use crate::store::{Cursor, EventQuery};

    const PREFIX: &str = "sec.events";

    fn limits() -> Limits {
        Limits {
            subject_prefix: PREFIX.into(),
            max_details_bytes: 16 * 1024,
        }
    }

    fn good() -> SecurityEvent {
        new_event(system().as_ref(), "crypto", "sec.crypto.key.created")
    }

    fn check(e: &SecurityEvent, subject: Option<&str>) -> Result<(), DeadLetterReason> {
        validate(e, subject, &limits()).map_err(|(r, _)| r)
    }

    #[test]
    fn validation_maps_each_defect_to_its_reason() {
        use DeadLetterReason::*;
        let ok = good();
        assert_eq!(check(&ok, None), Ok(()));
        assert_eq!(check(&ok, Some("sec.events.crypto.key.created")), Ok(()));
        let with = |f: &dyn Fn(&mut SecurityEvent)| {
            let mut e = good();
            f(&mut e);
            e
        };
        assert_eq!(check(&with(&|e| e.id = "nope".into()), None), Err(Invalid));
        assert_eq!(check(&with(&|e| e.id.clear()), None), Err(Invalid));
        for bad_type in [
            "crypto.key.created",
            "sec.crypto",
            "sec.Crypto.key.created",
            "sec.crypto..created",
            "sec.crypto.key.created\u{0}",
        ] {
            assert_eq!(
                check(&with(&|e| e.r#type = bad_type.into()), None),
                Err(Invalid),
                "{bad_type:?}"
            );
        }
        assert_eq!(
            check(&with(&|e| e.service = "token".into()), None),
            Err(Invalid),
            "type of another service"
        );
        assert_eq!(
            check(&ok, Some("sec.events.crypto.key.rotated")),
            Err(Invalid),
            "subject is not the type's"
        );
        assert_eq!(
            check(&ok, Some("other.crypto.key.created")),
            Err(Invalid),
            "another prefix"
        );
        assert_eq!(
            check(
                &with(&|e| e.time = Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                })),
                None
            ),
            Err(Invalid),
            "time out of range"
        );
        assert_eq!(
            check(
                &with(&|e| e.r#type = "sec.crypto.key.exploded".into()),
                None
            ),
            Err(UnknownType)
        );
        assert_eq!(
            check(
                &with(&|e| {
                    e.r#type = "sec.audit.test.happened".into();
                    e.service = "audit".into();
                }),
                None
            ),
            Err(UnknownType)
        );
        assert_eq!(
            check(
                &with(&|e| {
                    e.details.insert("blob".into(), "x".repeat(16 * 1024));
                }),
                None
            ),
            Err(TooLarge),
            "key + value over 16 KiB"
        );
        assert_eq!(
            check(
                &with(&|e| {
                    e.details.insert("blob".into(), "x".repeat(16 * 1024 - 4));
                }),
                None
            ),
            Ok(()),
            "exactly 16 KiB"
        );
        assert_eq!(
            check(
                &with(&|e| {
                    for i in 0..=MAX_DETAILS {
                        e.details.insert(format!("k{i}"), "v".into());
                    }
                }),
                None
            ),
            Err(TooLarge),
            "too many details"
        );
        // Invalid wins over unknown type: the cheaper, more precise reason.
        assert_eq!(
            check(
                &with(&|e| {
                    e.id = "nope".into();
                    e.r#type = "sec.crypto.key.exploded".into();
                }),
                None
            ),
            Err(Invalid)
        );
        // The reason names are the fixed set (metric labels, DLQ subjects).
        let names: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "undecodable",
                "invalid",
                "unknown_type",
                "too_large",
                "unstorable"
            ]
        );
        for r in DeadLetterReason::ALL {
            assert_eq!(DeadLetterReason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn only_data_errors_are_per_row() {
        assert!(is_data_error(&StoreError::Corrupt("id".into())));
        assert!(!is_data_error(&StoreError::Db(sqlx::Error::PoolTimedOut)));
        assert!(!is_data_error(&StoreError::Db(sqlx::Error::Io(
            std::io::Error::other("connection reset")
        ))));
        assert!(!is_data_error(&StoreError::Db(sqlx::Error::PoolClosed)));
    }

    /// Refuses (as a data error) any batch holding a poisoned id, all or nothing;
    /// refuses everything as an outage while `down`.
    #[derive(Default)]
    struct Picky {
        poison: HashSet<String>,
        down: std::sync::atomic::AtomicBool,
        stored: Mutex<Vec<String>>,
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl EventStore for Picky {
        async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.calls.fetch_add(1, SeqCst);
            if self.down.load(SeqCst) {
                return Err(StoreError::Db(sqlx::Error::PoolTimedOut));
            }
            if events.iter().any(|e| self.poison.contains(&e.id)) {
                return Err(StoreError::Corrupt("poison".into()));
            }
            let mut s = self.stored.lock().unwrap();
            let before = s.len();
            for e in events {
                if !s.contains(&e.id) {
                    s.push(e.id.clone());
                }
            }
            Ok((s.len() - before) as u64)
        }
        async fn list(
            &self,
            _: &EventQuery,
        ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError> {
            Ok((Vec::new(), None))
        }
    }

    #[tokio::test]
    async fn bisection_isolates_poison_rows_and_outages_store_nothing_more() {
        use std::sync::atomic::Ordering::SeqCst;
        let events: Vec<SecurityEvent> = (0..100).map(|_| good()).collect();
        let store = Picky {
            poison: [events[7].id.clone(), events[64].id.clone()].into(),
            ..Picky::default()
        };
        let out = insert_bisecting(&store, &events).await;
        assert!(out.outage.is_none());
        let bad: Vec<usize> = out.unstorable.iter().map(|(i, _)| *i).collect();
        assert_eq!(bad, [7, 64]);
        assert_eq!(out.new, 98);
        assert_eq!(out.committed.iter().filter(|c| **c).count(), 98);
        assert!(!out.committed[7] && !out.committed[64]);
        assert!(
            store.calls.load(SeqCst) <= 2 * 2 * 8 + 1,
            "O(k log n) statements: {}",
            store.calls.load(SeqCst)
        );

        let down = Picky::default();
        down.down.store(true, SeqCst);
        let out = insert_bisecting(&down, &events).await;
        assert!(out.outage.is_some());
        assert!(out.unstorable.is_empty(), "an outage dead-letters nothing");
        assert!(out.committed.iter().all(|c| !c));
        assert_eq!(down.calls.load(SeqCst), 1, "no bisection on an outage");
    }

    fn metric_text(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn all_events(store: &dyn EventStore) -> Vec<SecurityEvent> {
        store
            .list(&EventQuery {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .0
    }

    /// The bad events of both scenarios, by what they should be dead-lettered as.
    fn bad_events() -> Vec<(SecurityEvent, DeadLetterReason)> {
        let mut non_uuid = good();
        non_uuid.id = "not-a-uuid".into();
        let mut unknown = good();
        unknown.r#type = "sec.crypto.key.exploded".into();
        let mut big = good();
        big.details.insert("blob".into(), "x".repeat(20 * 1024));
        let mut foreign = good();
        foreign.service = "token".into();
        vec![
            (non_uuid, DeadLetterReason::Invalid),
            (unknown, DeadLetterReason::UnknownType),
            (big, DeadLetterReason::TooLarge),
            (foreign, DeadLetterReason::Invalid),
        ]
    }

    fn with_nul() -> SecurityEvent {
        let mut e = good();
        e.details.insert("note".into(), "a\u{0}b".into());
        e
    }

    fn subject_of(prefix: &str, e: &SecurityEvent) -> String {
        format!(
            "{prefix}.{}",
            e.r#type.strip_prefix("sec.").unwrap_or(&e.r#type)
        )
    }

    fn by_event_id(rows: &[Recorded]) -> BTreeMap<Option<uuid::Uuid>, Vec<DeadLetterReason>> {
        let mut m: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for r in rows {
            m.entry(r.row.event_id).or_default().push(r.row.reason);
        }
        m
    }

    /// Sensitive fields reach the store only as HMACs; while they cannot be computed
    /// nothing of the batch is stored (fail closed), and it is all stored once they can.
    #[tokio::test]
    async fn sensitive_fields_are_stored_as_hmacs_and_an_outage_stores_nothing() {
        use std::sync::atomic::Ordering::SeqCst;
        let (_dir, db) = crate::test_sqlite().await;
        let store = crate::event_store(&db, system());
        let dead_letters = crate::dead_letter_store(&db, system());
        let transport = MemoryTransport::new(10_000);
        let bus = EventBus::with_clock(Arc::new(transport), &EventsConfig::default(), system());
        let metrics = IngestMetrics::register(&mut Registry::default());
        let hasher = crate::sensitive::local::LocalHasher::new();
        hasher.down.store(true, SeqCst);
        let fields = crate::AuditConfig::default().sensitive_fields;
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Ingest {
                bus: bus.clone(),
                store: store.clone(),
                dead_letters: dead_letters.clone(),
                metrics: metrics.clone(),
                clock: system(),
                limits: limits(),
                sensitive: crate::sensitive::Sensitive::new(&fields, hasher.clone()),
                alerts: None,
            },
            stop.clone(),
        ));
        let mut login = new_event(system().as_ref(), "auth", "sec.auth.login.failed");
        login
            .details
            .insert("username".into(), "alice@example.com".into());
        login.details.insert("reason".into(), "bad_password".into());
        let plain = new_event(system().as_ref(), "auth", "sec.auth.login.succeeded");
        bus.publish(login.clone()).unwrap();
        bus.publish(plain.clone()).unwrap();
        wait_for("a refused attempt", async || hasher.calls.load(SeqCst) >= 2).await;
        assert!(
            all_events(store.as_ref()).await.is_empty(),
            "nothing stored in plain text"
        );
        assert!(metrics.failures.get() >= 1, "counted as failed batches");

        hasher.down.store(false, SeqCst);
        wait_for("both events", async || {
            all_events(store.as_ref()).await.len() == 2
        })
        .await;
        let stored = all_events(store.as_ref()).await;
        let got = stored.iter().find(|e| e.id == login.id).unwrap();
        assert_eq!(got.details["username"], hasher.tag(1, "alice@example.com"));
        assert_eq!(got.details["reason"], "bad_password");
        assert!(stored.iter().any(|e| e.id == plain.id));

        // An event that is dead-lettered keeps no sensitive value in the table either.
        let mut big = new_event(system().as_ref(), "auth", "sec.auth.login.exploded");
        big.details
            .insert("username".into(), "carol@example.com".into());
        bus.publish(big.clone()).unwrap();
        wait_for("the dead letter", async || {
            !dead_letters.recent(10).await.unwrap().is_empty()
        })
        .await;
        let row = &dead_letters.recent(10).await.unwrap()[0].row;
        assert_eq!(row.event_id.unwrap().to_string(), big.id);
        let kept = String::from_utf8_lossy(&row.payload);
        assert!(!kept.contains("carol") && kept.contains(crate::sensitive::REDACTED));
        stop.cancel();
        task.await.unwrap();
    }

    /// In process (memory bus + SQLite): what applies there (no subjects, no foreign
    /// bytes; SQLite stores a NUL character).
    #[tokio::test]
    async fn embedded_bad_events_are_dead_lettered_and_good_ones_stored() {
        let (_dir, db) = crate::test_sqlite().await;
        let store = crate::event_store(&db, system());
        let dead_letters = crate::dead_letter_store(&db, system());
        let cfg = EventsConfig::default();
        let transport = MemoryTransport::new(10_000);
        let bus = EventBus::with_clock(Arc::new(transport.clone()), &cfg, system());
        let mut registry = Registry::default();
        let metrics = IngestMetrics::register(&mut registry);

        // Straight onto the broker: the bus's own publish would refuse most of these.
        let raw = async |events: Vec<SecurityEvent>| {
            let out: Vec<Outgoing> = events
                .into_iter()
                .map(|event| Outgoing {
                    subject: subject_of(PREFIX, &event),
                    event,
                    trace_headers: vec![],
                })
                .collect();
            assert!(transport.publish(&out).await.iter().all(Result::is_ok));
        };
        let bad = bad_events();
        let nul = with_nul();
        let mut goods = Vec::new();
        let mut batch = Vec::new();
        for i in 0..50 {
            let e = good();
            goods.push(e.id.clone());
            batch.push(e);
            if i % 10 == 3 && i / 10 < bad.len() {
                batch.push(bad[i / 10].0.clone());
            }
        }
        batch.insert(25, nul.clone());
        raw(batch).await;

        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Ingest {
                bus: bus.clone(),
                store: store.clone(),
                dead_letters: dead_letters.clone(),
                metrics: metrics.clone(),
                clock: system(),
                limits: limits(),
                sensitive: None,
                alerts: None,
            },
            stop.clone(),
        ));
        // 50 good + the NUL one (SQLite takes it) + 4 announcements.
        wait_for("stored events", async || {
            all_events(store.as_ref()).await.len() >= 55
        })
        .await;
        let stored = all_events(store.as_ref()).await;
        let ids: HashSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
        for id in &goods {
            assert!(ids.contains(id.as_str()), "good event {id} stored");
        }
        assert!(
            ids.contains(nul.id.as_str()),
            "SQLite stores a NUL character"
        );

        let rows = dead_letters.recent(100).await.unwrap();
        assert_eq!(rows.len(), 4, "{rows:?}");
        let got = by_event_id(&rows);
        for (e, reason) in &bad {
            let key = uuid::Uuid::parse_str(&e.id).ok();
            assert!(got[&key].contains(reason), "{} → {reason}: {got:?}", e.id);
        }
        let big = rows
            .iter()
            .find(|r| r.row.reason == DeadLetterReason::TooLarge)
            .unwrap();
        assert_eq!(big.row.payload.len(), 16 * 1024, "payload cut at the limit");
        assert_eq!(big.row.payload_size, bad[2].0.encoded_len());
        assert!(!big.row.detail.contains("xxxx"), "no details in the detail");
        let non_uuid = got[&None].clone();
        assert_eq!(non_uuid, [DeadLetterReason::Invalid]);

        let text = metric_text(&registry);
        for (reason, n) in [
            ("invalid", 2),
            ("unknown_type", 1),
            ("too_large", 1),
            ("unstorable", 0),
            ("undecodable", 0),
        ] {
            let line = format!("sec_audit_dead_lettered_total{{reason=\"{reason}\"}} {n}");
            assert!(text.contains(&line), "{line}\n{text}");
        }
        let announced: Vec<&SecurityEvent> = stored
            .iter()
            .filter(|e| e.r#type == DEAD_LETTERED)
            .collect();
        assert_eq!(announced.len(), 4);
        for a in &announced {
            assert_eq!(a.service, "audit");
            assert_eq!(a.severity, Severity::High as i32);
            assert!(
                !a.details.contains_key("blob") && !a.details.values().any(|v| v.contains("xxxx"))
            );
        }
        assert!(
            announced
                .iter()
                .any(|a| a.subject == format!("event:{}", bad[1].0.id)
                    && a.details["event_type"] == "sec.crypto.key.exploded"
                    && a.details["reason"] == "unknown_type")
        );

        // Still consuming.
        let more: Vec<SecurityEvent> = (0..10).map(|_| good()).collect();
        raw(more.clone()).await;
        wait_for("10 more", async || {
            let stored = all_events(store.as_ref()).await;
            more.iter().all(|m| stored.iter().any(|e| e.id == m.id))
        })
        .await;
        assert!(!task.is_finished());
        stop.cancel();
        task.await.unwrap();
    }

    /// Against real NATS and PostgreSQL: garbage bytes, a non-UUID id, an unknown type,
    /// oversized details, a type of another service, an event on another subject and a
    /// NUL character (PostgreSQL refuses it in JSONB) among 50 good events, published
    /// with async_nats directly. The good ones are stored, each bad one is in
    /// `dead_letters` with its reason and on the DLQ stream, the metric counts them, and
    /// the consumer goes on.
    #[tokio::test]
    async fn nats_postgres_bad_events_are_dead_lettered_and_good_ones_stored() {
        let (Some(nats), Some(pg)) = (
            sec_testkit::backend_url(sec_testkit::Backend::Nats),
            sec_testkit::backend_url(sec_testkit::Backend::Postgres),
        ) else {
            return;
        };
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let cfg = EventsConfig {
            stream: format!("AUDIT_INGEST_{run_id}"),
            subject_prefix: format!("auditingest{run_id}"),
            audit_consumer: format!("audit-{run_id}"),
            dead_letter_subject: format!("auditingestdl{run_id}"),
            ..EventsConfig::default()
        };
        let schema = format!("audit_ing{run_id}");
        let pool = sec_common::storage::connect_postgres(&pg, &schema, 4)
            .await
            .unwrap();
        crate::MIGRATIONS.postgres.run(&pool).await.unwrap();
        let client = async_nats::connect(&nats).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let outcome =
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(nats_scenario(
                nats,
                cfg.clone(),
                sec_common::storage::Db::Postgres(pool.clone()),
                js.clone(),
            )))
            .await;
        let _ = js.delete_stream(&cfg.stream).await;
        let _ = js
            .delete_stream(sec_common::events::nats::dead_letter_stream(&cfg.stream))
            .await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn nats_scenario(
        url: String,
        cfg: EventsConfig,
        db: sec_common::storage::Db,
        js: async_nats::jetstream::Context,
    ) {
        let transport = sec_common::events::nats::NatsTransport::connect(&url, &cfg, "ingest-test")
            .await
            .unwrap();
        let bus = EventBus::with_clock(Arc::new(transport), &cfg, system());
        // Creates the streams and the consumer before anything is published.
        assert!(
            bus.fetch(1, Duration::from_millis(100))
                .await
                .unwrap()
                .is_empty()
        );
        let store = crate::event_store(&db, system());
        let dead_letters = crate::dead_letter_store(&db, system());
        let mut registry = Registry::default();
        let metrics = IngestMetrics::register(&mut registry);
        let limits = Limits {
            subject_prefix: cfg.subject_prefix.clone(),
            max_details_bytes: 16 * 1024,
        };

        let send = async |subject: String, payload: Vec<u8>| {
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        };
        let garbage: Vec<u8> = vec![0x0a, 0xff, 0x01, 0x02];
        let nul = with_nul();
        let wrong_subject = good();
        let mut bad = bad_events();
        bad.push((nul.clone(), DeadLetterReason::Unstorable));
        let mut goods = Vec::new();
        let mut garbage_seq = 0;
        let mut wrong_seq = 0;
        for i in 0..50 {
            let e = good();
            goods.push(e.id.clone());
            send(subject_of(&cfg.subject_prefix, &e), e.encode_to_vec()).await;
            if i % 8 == 3 && i / 8 < bad.len() {
                let (b, _) = &bad[i / 8];
                send(subject_of(&cfg.subject_prefix, b), b.encode_to_vec()).await;
            }
            if i == 20 {
                garbage_seq = send(
                    format!("{}.crypto.key.created", cfg.subject_prefix),
                    garbage.clone(),
                )
                .await;
            }
            if i == 30 {
                wrong_seq = send(
                    format!("{}.crypto.key.rotated", cfg.subject_prefix),
                    wrong_subject.encode_to_vec(),
                )
                .await;
            }
        }

        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Ingest {
                bus: bus.clone(),
                store: store.clone(),
                dead_letters: dead_letters.clone(),
                metrics: metrics.clone(),
                clock: system(),
                limits,
                sensitive: None,
                alerts: None,
            },
            stop.clone(),
        ));
        // 7 dead letters: 5 bad events, the garbage and the wrong subject.
        wait_for("dead letters", async || {
            dead_letters.recent(100).await.unwrap().len() >= 7
        })
        .await;
        wait_for("good events and announcements", async || {
            all_events(store.as_ref()).await.len() >= 57
        })
        .await;
        let stored = all_events(store.as_ref()).await;
        assert_eq!(stored.len(), 57, "50 good + 7 announcements, nothing else");
        let ids: HashSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
        for id in &goods {
            assert!(ids.contains(id.as_str()), "good event {id} stored");
        }
        assert!(!ids.contains(nul.id.as_str()));

        let rows = dead_letters.recent(100).await.unwrap();
        assert_eq!(rows.len(), 7, "{rows:?}");
        let got = by_event_id(&rows);
        for (e, reason) in &bad {
            let key = uuid::Uuid::parse_str(&e.id).ok();
            assert!(got[&key].contains(reason), "{} → {reason}: {got:?}", e.id);
        }
        let wrong_id = uuid::Uuid::parse_str(&wrong_subject.id).ok();
        assert_eq!(got[&wrong_id], [DeadLetterReason::Invalid]);
        let mut no_id = got[&None].clone();
        no_id.sort();
        assert_eq!(
            no_id,
            [DeadLetterReason::Undecodable, DeadLetterReason::Invalid],
            "the garbage and the non-UUID id"
        );
        let raw_row = rows
            .iter()
            .find(|r| r.row.reason == DeadLetterReason::Undecodable)
            .unwrap();
        assert_eq!(raw_row.row.payload, garbage, "the bytes as received");
        assert_eq!(
            raw_row.row.source_key.as_deref(),
            Some(format!("{}:{garbage_seq}", cfg.stream).as_str())
        );
        let unstorable = rows
            .iter()
            .find(|r| r.row.reason == DeadLetterReason::Unstorable)
            .unwrap();
        assert!(
            unstorable.row.detail.contains("22P05"),
            "{}",
            unstorable.row.detail
        );

        // The DLQ stream: one copy each, original bytes, the headers.
        let dlq = js
            .get_stream(sec_common::events::nats::dead_letter_stream(&cfg.stream))
            .await
            .unwrap();
        let mut per_reason: BTreeMap<String, usize> = BTreeMap::new();
        let mut seen_garbage = false;
        let mut seen_wrong = false;
        for seq in 1..=7 {
            let m = dlq.get_raw_message(seq).await.unwrap();
            let reason = m.subject.as_str().rsplit('.').next().unwrap().to_owned();
            let h = |k: &str| m.headers.get(k).map(|v| v.as_str().to_owned());
            assert_eq!(
                h("Sec-Dead-Letter-Reason").as_deref(),
                Some(reason.as_str())
            );
            let orig_seq: u64 = h("Sec-Original-Sequence").unwrap().parse().unwrap();
            assert_eq!(
                h("Nats-Msg-Id"),
                Some(format!("dlq-{orig_seq}")),
                "de-duplicated by stream position"
            );
            assert!(
                h("Sec-Original-Subject")
                    .unwrap()
                    .starts_with(&cfg.subject_prefix)
            );
            if orig_seq == garbage_seq {
                assert_eq!(m.payload.as_ref(), garbage.as_slice());
                assert_eq!(reason, "undecodable");
                seen_garbage = true;
            }
            if orig_seq == wrong_seq {
                assert_eq!(
                    h("Sec-Original-Subject"),
                    Some(format!("{}.crypto.key.rotated", cfg.subject_prefix))
                );
                assert_eq!(m.payload.as_ref(), wrong_subject.encode_to_vec().as_slice());
                seen_wrong = true;
            }
            *per_reason.entry(reason).or_default() += 1;
        }
        assert!(seen_garbage && seen_wrong);
        assert!(dlq.get_raw_message(8).await.is_err(), "exactly 7 copies");
        assert_eq!(
            per_reason,
            BTreeMap::from([
                ("invalid".to_owned(), 3),
                ("too_large".to_owned(), 1),
                ("undecodable".to_owned(), 1),
                ("unknown_type".to_owned(), 1),
                ("unstorable".to_owned(), 1),
            ])
        );

        let text = metric_text(&registry);
        for (reason, n) in per_reason {
            let line = format!("sec_audit_dead_lettered_total{{reason=\"{reason}\"}} {n}");
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(
            text.contains("sec_audit_event_streams_unprotected 0"),
            "{text}"
        );

        // Still consuming; nothing left pending or unacknowledged on the main stream.
        let mut more = Vec::new();
        for _ in 0..10 {
            let e = good();
            send(subject_of(&cfg.subject_prefix, &e), e.encode_to_vec()).await;
            more.push(e.id);
        }
        wait_for("10 more", async || {
            let stored = all_events(store.as_ref()).await;
            more.iter().all(|m| stored.iter().any(|e| &e.id == m))
        })
        .await;
        assert!(!task.is_finished());
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream(&cfg.stream)
            .await
            .unwrap()
            .get_consumer(&cfg.audit_consumer)
            .await
            .unwrap();
        wait_for("all acknowledged", async || {
            let info = consumer.info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await;
        stop.cancel();
        task.await.unwrap();
    }
}
