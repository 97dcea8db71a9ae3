//! The security-event bus.
//!
//! Producers call [`EventBus::publish`], which never blocks: the event goes into a bounded
//! in-memory spool and a background worker delivers it to the [`EventTransport`] (NATS
//! JetStream in production, [`memory::MemoryTransport`] in one process), waiting for the
//! broker's acknowledgement and retrying with backoff while the broker is unreachable.
//! An event is only ever dropped loudly: when the spool is full `publish` returns
//! [`PublishError::SpoolFull`] and `sec_events_spool_rejected_total` counts it.
//!
//! Consumers (audit-svc) call [`EventBus::fetch`] and must [`Delivery::ack`] only after
//! the event is durably stored; an unacknowledged event is delivered again.

pub mod aggregate;
pub mod memory;
pub mod nats;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc};

use crate::clock::Clock;
use crate::config::EventsConfig;
pub use sec_proto::common::v1::{Actor, ActorKind, Outcome, SecurityEvent, Severity};

/// Largest batch the worker hands the transport at once.
const PUBLISH_BATCH: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// An event on its way to the broker, with the W3C trace headers of the request that
/// produced it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub event: SecurityEvent,
    pub trace_headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker refused the event: {0}")]
    Rejected(String),
}

/// A message broker as the bus needs it.
#[async_trait]
pub trait EventTransport: Send + Sync + 'static {
    /// `nats` or `memory`, for logs and status output.
    fn kind(&self) -> &'static str;
    /// Publishes a batch; one result per event, `Ok` once the broker has stored it.
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>>;
    /// Up to `max` events for the durable consumer, waiting at most `wait` for the first.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError>;
    /// Whether the broker is reachable now (readiness).
    async fn ready(&self) -> Result<(), String>;
}

/// One consumed event. Ack after it is stored; nack (or drop without ack, for NATS after
/// the ack wait) to have it delivered again.
#[derive(Debug)]
pub struct Delivery {
    pub event: SecurityEvent,
    handle: DeliveryHandle,
}

#[derive(Debug)]
enum DeliveryHandle {
    Nats(Box<async_nats::jetstream::Message>),
    Memory(Arc<memory::MemoryTransport>),
}

impl Delivery {
    pub async fn ack(self) -> Result<(), TransportError> {
        match self.handle {
            DeliveryHandle::Nats(m) => m
                .ack()
                .await
                .map_err(|e| TransportError::Unavailable(e.to_string())),
            DeliveryHandle::Memory(t) => {
                t.ack(&self.event.id);
                Ok(())
            }
        }
    }

    pub async fn nack(self) -> Result<(), TransportError> {
        match self.handle {
            DeliveryHandle::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(
                    Duration::from_secs(1),
                )))
                .await
                .map_err(|e| TransportError::Unavailable(e.to_string())),
            DeliveryHandle::Memory(t) => {
                t.nack(&self.event.id);
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("event spool is full ({0} events waiting for the broker); event refused")]
    SpoolFull(usize),
    #[error("event bus is shut down")]
    Closed,
    #[error("invalid event: {0}")]
    Invalid(String),
}

#[derive(Clone, Default)]
struct BusMetrics {
    published: Counter,
    retries: Counter,
    rejected: Counter,
    depth: Gauge,
}

struct BusInner {
    tx: mpsc::Sender<Outgoing>,
    transport: Arc<dyn EventTransport>,
    subject_prefix: String,
    capacity: usize,
    /// Events accepted by `publish` and not yet acknowledged by the broker.
    pending: AtomicI64,
    drained: Notify,
    metrics: BusMetrics,
}

/// Cheap to clone; every clone feeds the same spool.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("transport", &self.inner.transport.kind())
            .finish()
    }
}

impl EventBus {
    /// Starts the delivery worker on the current tokio runtime.
    pub fn new(transport: Arc<dyn EventTransport>, cfg: &EventsConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.spool_capacity);
        let inner = Arc::new(BusInner {
            tx,
            transport,
            subject_prefix: cfg.subject_prefix.clone(),
            capacity: cfg.spool_capacity,
            pending: AtomicI64::new(0),
            drained: Notify::new(),
            metrics: BusMetrics::default(),
        });
        tokio::spawn(deliver(Arc::downgrade(&inner), rx));
        Self { inner }
    }

    /// The in-process bus: events stay in this process (dev launcher, tests).
    pub fn in_process(cfg: &EventsConfig) -> Self {
        Self::new(
            Arc::new(memory::MemoryTransport::new(cfg.spool_capacity)),
            cfg,
        )
    }

    pub fn transport_kind(&self) -> &'static str {
        self.inner.transport.kind()
    }

    /// Hands the event to the spool. Never blocks; fails only when the spool is full.
    pub fn publish(&self, event: SecurityEvent) -> Result<(), PublishError> {
        let subject = subject_for(&self.inner.subject_prefix, &event)?;
        let mut trace_headers = Vec::new();
        let mut h = http::HeaderMap::new();
        crate::telemetry::inject_http(&mut h);
        for (k, v) in &h {
            if let Ok(v) = v.to_str() {
                trace_headers.push((k.as_str().to_owned(), v.to_owned()));
            }
        }
        let out = Outgoing {
            subject,
            event,
            trace_headers,
        };
        // Count before sending so the worker's decrement can never run first.
        self.inner.pending.fetch_add(1, Ordering::SeqCst);
        match self.inner.tx.try_send(out) {
            Ok(()) => {
                self.inner.metrics.depth.inc();
                Ok(())
            }
            Err(e) => {
                self.inner.pending.fetch_sub(1, Ordering::SeqCst);
                let ev = match &e {
                    mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => {
                        &o.event
                    }
                };
                tracing::error!(event_id = %ev.id, event_type = %ev.r#type, "security event refused: spool full or closed");
                self.inner.metrics.rejected.inc();
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        Err(PublishError::SpoolFull(self.inner.capacity))
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(PublishError::Closed),
                }
            }
        }
    }

    /// Events for the durable consumer (audit-svc).
    pub async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        self.inner.transport.fetch(max, wait).await
    }

    pub async fn ready(&self) -> Result<(), String> {
        self.inner.transport.ready().await
    }

    /// Events accepted but not yet stored by the broker.
    pub fn pending(&self) -> usize {
        usize::try_from(self.inner.pending.load(Ordering::SeqCst)).unwrap_or(0)
    }

    /// Waits until every accepted event is stored by the broker, or `timeout`. Returns
    /// how many are still pending (logged as an error by callers at shutdown).
    pub async fn flush(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.drained.notified();
            if self.pending() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.pending();
            }
        }
    }

    /// Registers the bus metrics in a service's registry (the bus may be shared by
    /// several services in one process; each registry shows the same values).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.inner.metrics;
        registry.register(
            "sec_events_published",
            "Security events stored by the broker",
            m.published.clone(),
        );
        registry.register(
            "sec_events_publish_retries",
            "Event publish attempts that failed and were retried",
            m.retries.clone(),
        );
        registry.register(
            "sec_events_spool_rejected",
            "Events refused because the spool was full",
            m.rejected.clone(),
        );
        registry.register(
            "sec_events_spool_depth",
            "Events waiting in the spool for the broker",
            m.depth.clone(),
        );
    }
}

/// `sec.crypto.key.rotated` → `<prefix>.crypto.key.rotated`.
fn subject_for(prefix: &str, event: &SecurityEvent) -> Result<String, PublishError> {
    let rest = event.r#type.strip_prefix("sec.").ok_or_else(|| {
        PublishError::Invalid(format!("type `{}` must start with `sec.`", event.r#type))
    })?;
    let tokens: Vec<&str> = rest.split('.').collect();
    if tokens.len() < 3
        || tokens.iter().any(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
    {
        return Err(PublishError::Invalid(format!(
            "type `{}` is not `sec.<service>.<noun>.<verb>`",
            event.r#type
        )));
    }
    if tokens[0] != event.service {
        return Err(PublishError::Invalid(format!(
            "type `{}` does not belong to service `{}`",
            event.r#type, event.service
        )));
    }
    if uuid::Uuid::parse_str(&event.id).is_err() {
        return Err(PublishError::Invalid("id must be a UUID".into()));
    }
    Ok(format!("{prefix}.{rest}"))
}

async fn deliver(bus: std::sync::Weak<BusInner>, mut rx: mpsc::Receiver<Outgoing>) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(PUBLISH_BATCH);
    // Runs until every sender (every EventBus clone) is gone and the spool is empty.
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(inner) = bus.upgrade() else { break };
            let results = inner.transport.publish(&batch).await;
            let mut failed = Vec::new();
            let mut first_error = None;
            let mut stored = 0_i64;
            for (out, res) in batch.drain(..).zip(results) {
                match res {
                    Ok(()) => stored += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        failed.push(out);
                    }
                }
            }
            if stored > 0 {
                inner.metrics.published.inc_by(stored as u64);
                inner.metrics.depth.dec_by(stored);
                if inner.pending.fetch_sub(stored, Ordering::SeqCst) == stored {
                    inner.drained.notify_waiters();
                }
            }
            if failed.is_empty() {
                break;
            }
            inner.metrics.retries.inc_by(failed.len() as u64);
            tracing::warn!(
                pending = failed.len(),
                error = %first_error.map(|e| e.to_string()).unwrap_or_default(),
                retry_in_ms = backoff.as_millis() as u64,
                "event publish failed, keeping events in the spool"
            );
            batch = failed;
            drop(inner);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        batch.clear();
    }
}

/// A new event of `service` with a fresh UUIDv7 id, the clock's time, the current trace
/// id, outcome success and severity info. Callers fill in actor, subject and details.
pub fn new_event(clock: &dyn Clock, service: &str, event_type: &str) -> SecurityEvent {
    let now = clock.now();
    SecurityEvent {
        id: new_event_id(now).to_string(),
        r#type: event_type.to_owned(),
        time: Some(to_timestamp(now)),
        service: service.to_owned(),
        actor: None,
        subject: String::new(),
        source_ip: String::new(),
        outcome: Outcome::Success as i32,
        severity: Severity::Info as i32,
        details: Default::default(),
        trace_id: crate::telemetry::current_trace_id().unwrap_or_default(),
    }
}

fn new_event_id(now: DateTime<Utc>) -> uuid::Uuid {
    let secs = u64::try_from(now.timestamp()).unwrap_or(0);
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, now.timestamp_subsec_nanos());
    uuid::Uuid::new_v7(ts)
}

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn cfg(capacity: usize) -> EventsConfig {
        EventsConfig {
            spool_capacity: capacity,
            ..EventsConfig::default()
        }
    }

    #[test]
    fn subjects_follow_the_naming_rule() {
        let e = new_event(&SystemClock, "crypto", "sec.crypto.key.rotated");
        assert_eq!(
            subject_for("sec.events", &e).unwrap(),
            "sec.events.crypto.key.rotated"
        );
        let bad = new_event(&SystemClock, "crypto", "crypto.key.rotated");
        assert!(matches!(
            subject_for("p", &bad),
            Err(PublishError::Invalid(_))
        ));
        let wrong_owner = new_event(&SystemClock, "token", "sec.crypto.key.rotated");
        assert!(matches!(
            subject_for("p", &wrong_owner),
            Err(PublishError::Invalid(_))
        ));
        let wildcard = new_event(&SystemClock, "crypto", "sec.crypto.*.rotated");
        assert!(matches!(
            subject_for("p", &wildcard),
            Err(PublishError::Invalid(_))
        ));
    }

    #[test]
    fn event_ids_are_time_ordered_uuid_v7() {
        let a = new_event(&SystemClock, "crypto", "sec.crypto.key.created");
        std::thread::sleep(Duration::from_millis(2));
        let b = new_event(&SystemClock, "crypto", "sec.crypto.key.created");
        let (ua, ub) = (
            uuid::Uuid::parse_str(&a.id).unwrap(),
            uuid::Uuid::parse_str(&b.id).unwrap(),
        );
        assert_eq!(ua.get_version_num(), 7);
        assert!(ua < ub);
    }

    #[tokio::test]
    async fn in_process_bus_delivers_and_flushes() {
        let bus = EventBus::in_process(&cfg(100));
        for _ in 0..10 {
            bus.publish(new_event(&SystemClock, "audit", "sec.audit.test.happened"))
                .unwrap();
        }
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let got = bus.fetch(100, Duration::from_millis(100)).await.unwrap();
        assert_eq!(got.len(), 10);
        for d in got {
            d.ack().await.unwrap();
        }
        assert!(
            bus.fetch(100, Duration::from_millis(20))
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A broker that is down until told otherwise.
    struct Flaky {
        up: std::sync::atomic::AtomicBool,
        stored: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl EventTransport for Flaky {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
            batch
                .iter()
                .map(|o| {
                    if self.up.load(Ordering::SeqCst) {
                        self.stored.lock().unwrap().push(o.event.id.clone());
                        Ok(())
                    } else {
                        Err(TransportError::Unavailable("down".into()))
                    }
                })
                .collect()
        }
        async fn fetch(&self, _: usize, _: Duration) -> Result<Vec<Delivery>, TransportError> {
            Ok(vec![])
        }
        async fn ready(&self) -> Result<(), String> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn broker_outage_keeps_events_and_full_spool_refuses_loudly() {
        let flaky = Arc::new(Flaky {
            up: false.into(),
            stored: Default::default(),
        });
        let bus = EventBus::new(flaky.clone(), &cfg(4));
        let mut ids = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            let e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
            let id = e.id.clone();
            match bus.publish(e) {
                Ok(()) => ids.push(id),
                Err(PublishError::SpoolFull(4)) => refused += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(refused > 0, "a bounded spool must refuse when full");
        assert_eq!(
            bus.flush(Duration::from_millis(200)).await,
            ids.len(),
            "nothing is stored while down"
        );
        let mut reg = Registry::default();
        bus.register_metrics(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(&format!("sec_events_spool_rejected_total {refused}")),
            "{text}"
        );

        flaky.up.store(true, Ordering::SeqCst);
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        let stored = flaky.stored.lock().unwrap().clone();
        let mut want = ids.clone();
        let mut got = stored.clone();
        want.sort();
        got.sort();
        assert_eq!(
            got, want,
            "every accepted event reaches the broker once it is back"
        );
    }
}
