//! The ingest loop: events from the bus into the store, acknowledged only after the
//! batch is committed, so a crash or a database outage redelivers instead of losing.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;
use sec_common::events::{EventBus, SecurityEvent};
use tokio_util::sync::CancellationToken;

use crate::store::EventStore;

const BATCH: usize = 1000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct IngestMetrics {
    ingested: Counter,
    duplicates: Counter,
    failures: Counter,
    batch_seconds: Histogram,
    lag_seconds: Gauge<f64, AtomicU64>,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            ingested: Counter::default(),
            duplicates: Counter::default(),
            failures: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            lag_seconds: Gauge::default(),
        };
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
        m
    }

    /// What `sec_audit_ingest_lag_seconds` reports now.
    pub fn lag_seconds(&self) -> f64 {
        self.lag_seconds.get()
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

/// Runs until `stop`; then drains what the bus still holds before returning. `clock`
/// is what the ingest lag is measured against.
pub async fn run(
    bus: EventBus,
    store: Arc<dyn EventStore>,
    metrics: IngestMetrics,
    clock: SharedClock,
    stop: CancellationToken,
) {
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
        let fetched = bus.fetch(BATCH, wait).await;
        let deliveries = match fetched {
            Ok(d) if d.is_empty() => {
                // Nothing was waiting for a whole fetch: caught up.
                metrics.lag_seconds.set(0.0);
                if draining {
                    return;
                }
                continue;
            }
            Ok(d) => d,
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
        // The trace id of the producing request, from the `traceparent` header when the
        // producer could not put it in the event itself.
        let events: Vec<_> = deliveries
            .iter()
            .map(sec_common::events::Delivery::event_with_trace_id)
            .collect();
        let started = Instant::now();
        match store.insert_batch(&events).await {
            Ok(new) => {
                backoff = Duration::from_millis(100);
                metrics
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.ingested.inc_by(new);
                metrics.duplicates.inc_by(events.len() as u64 - new);
                metrics.lag_seconds.set(lag_seconds(clock.now(), &events));
                let acks = futures::future::join_all(deliveries.into_iter().map(|d| d.ack())).await;
                if let Some(Err(e)) = acks.into_iter().find(Result::is_err) {
                    // Stored but not acked: the broker redelivers and the store skips the ids.
                    tracing::warn!(error = %e, "ack failed after commit; events will be redelivered and de-duplicated");
                }
            }
            Err(e) => {
                metrics.failures.inc();
                tracing::error!(error = %e, batch = events.len(), "cannot store events, they will be redelivered");
                futures::future::join_all(deliveries.into_iter().map(|d| d.nack())).await;
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
    use crate::store::{Cursor, EventQuery, StoreError};

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn event_at(t: DateTime<Utc>) -> SecurityEvent {
        let mut e = new_event(&*ManualClock::new(t0()), "auth", "sec.auth.test.happened");
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
            bus.clone(),
            store.clone(),
            metrics.clone(),
            clock.clone(),
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
