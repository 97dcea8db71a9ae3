//! The ingest loop: events from the bus into the store, acknowledged only after the
//! batch is committed, so a crash or a database outage redelivers instead of losing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sec_common::events::EventBus;
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
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            ingested: Counter::default(),
            duplicates: Counter::default(),
            failures: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
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
        m
    }
}

/// Runs until `stop`; then drains what the bus still holds before returning.
pub async fn run(
    bus: EventBus,
    store: Arc<dyn EventStore>,
    metrics: IngestMetrics,
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
