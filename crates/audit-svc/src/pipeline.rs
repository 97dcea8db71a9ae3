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
use sec_common::clock::SharedClock;
use sec_common::events::{
    DeadLetterReason, Delivery, EventBus, Fetched, MAX_DETAILS, Outcome, SecurityEvent, Severity,
    TransportError, Undecodable, catalog,
};
use tokio_util::sync::CancellationToken;

use crate::store::dead_letter::{DeadLetter, DeadLetterStore};
use crate::store::{EventStore, StoreError};

const BATCH: usize = 1000;
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
}

impl Ingest {
    /// Records, counts, announces and hands `item` to the broker's dead-letter path. On
    /// an outage (the row cannot be written) the message is nacked instead.
    async fn set_aside(&self, item: Aside, reason: DeadLetterReason, detail: &str) {
        let (row, event) = match &item {
            Aside::Event(d) => {
                let e = &d.event;
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
                        &d.payload(),
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
        let events: Vec<_> = valid.iter().map(Delivery::event_with_trace_id).collect();
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
pub async fn run(ingest: Ingest, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let draining = stop.is_cancelled();
        let wait = if draining {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(500)
        };
        // Never abandon a fetch in flight: with JetStream the server may already have
        // handed messages to it, and a dropped fetch leaves them unacknowledged until the
        // consumer's ack wait (30 s) redelivers them. A stop is seen at the next turn, at
        // most `wait` later.
        let fetched = ingest.bus.fetch_all(BATCH, wait).await;
        ingest
            .metrics
            .unprotected_streams
            .set(i64::try_from(ingest.bus.unprotected_streams().len()).unwrap_or(i64::MAX));
        let fetched = match fetched {
            Ok(f) if f.deliveries.is_empty() && f.undecodable.is_empty() => {
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
        let batch = fetched.deliveries.len() + fetched.undecodable.len();
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
}
