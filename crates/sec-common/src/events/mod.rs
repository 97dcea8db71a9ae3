//! The security-event bus.
//!
//! Producers call [`EventBus::publish`], which never blocks: the event goes into a bounded
//! in-memory spool and a background worker delivers it to the [`EventTransport`] (NATS
//! JetStream in production, [`memory::MemoryTransport`] in one process), waiting for the
//! broker's acknowledgement and retrying with backoff while the broker is unreachable.
//! An event is only ever dropped loudly: when the spool is full `publish` returns
//! [`PublishError::SpoolFull`] and `sec_events_spool_rejected_total` counts it.
//!
//! # Durability: the outbox
//!
//! A service's bus ([`EventBus::with_outbox`], which `Platform::connect` uses with
//! `events.outbox_dir`, by default `<data_dir>/outbox/<process>`) also writes every event
//! it accepts to a local on-disk [`outbox`] before `publish` returns: `publish` first
//! reserves the event's place in the spool (so an event refused for a full spool is never
//! on disk and never comes back), then appends the record (one `write`, a few µs; with
//! `events.outbox_fsync` also a `sync_data`, slow), then hands it to the worker. The
//! worker settles the record once the event left the spool: stored by the broker, or
//! dead-lettered. If the process dies (`kill -9`, OOM, a panic that aborts) while the
//! broker is down, the next process on the same outbox replays every record that was not
//! settled, oldest first, as the worker's first backlog (`replaying N events from the
//! outbox`, `sec_events_outbox_replayed_total`), counted in [`EventBus::pending`] so
//! [`EventBus::flush`] waits for them. Redelivery is harmless: the broker drops a
//! `Nats-Msg-Id` (= event id) it saw within its duplicate window and audit-svc inserts
//! with `ON CONFLICT (id) DO NOTHING`. A record can be replayed although it was
//! delivered (settlements are counted in memory, not written, so a crash replays the
//! whole of each segment still owed something): at most one segment, 4 MiB.
//!
//! The outbox is bounded by `events.outbox_max_bytes` (`sec_events_outbox_bytes` shows
//! its size); beyond it, or when the disk fails, `publish` refuses
//! ([`PublishError::OutboxFull`], [`PublishError::Outbox`], both counted as
//! `sec_events_rejected_total{reason="outbox"}`): an event is never reported as safe when
//! it is not. One process per outbox directory: it is locked, and a second bus on it
//! fails to start. [`EventBus::new`], [`EventBus::with_clock`] and
//! [`EventBus::in_process`] have no outbox (memory only, as in tests).
//!
//! The in-process transport is not [durable](EventTransport::durable): an event it
//! "stored" is in this process's memory only. With it, the bus settles a record when the
//! consumer acks the event (the transport calls the hook given to
//! [`EventTransport::set_ack_hook`]), not when the transport takes it, so `secd dev`
//! does not lose the events audit-svc had not stored yet either. The segment of each
//! event travels beside it in the spool rather than in [`Outgoing`] (a deviation from the
//! design brief): transports and their tests build `Outgoing`s themselves.
//!
//! `publish` also refuses at once, counted in `sec_events_rejected_total{reason}`: a bad
//! type or id (`invalid`), more than [`MAX_DETAILS`] details (`too_many_details`), an event
//! larger than `events.max_event_bytes` (`too_large`), and an event whose type already fills
//! `events.max_type_share_percent` of the spool (`type_quota`), so one noisy event type
//! cannot fill the spool and get every other service's events refused.
//!
//! Delivery failures come in two kinds. [`TransportError::Unavailable`] (broker down, ack
//! timeout) keeps the event in the spool and retries it with backoff, while newer events
//! keep joining each attempt. [`TransportError::Rejected`] (the broker will never store this
//! message, e.g. it is over the server's `max_payload`) dead-letters the event at once. An
//! event that keeps failing as "unavailable" while events queued *after* it in the same
//! attempt are stored is not facing an outage either: after [`MAX_STRIKES`] such attempts
//! it is dead-lettered too. Failures with nothing stored after them (an outage, a full
//! in-process queue, which fail the tail of a batch) never count, so an outage never
//! dead-letters anything.
//!
//! Dead-lettering: the event is appended to `events.dead_letter_file` when configured (one
//! JSON object per line: `event_id`, `event_type`, `subject`, `size`, `reason` and `event`,
//! the protobuf encoding in standard base64, so the event can be replayed byte for byte;
//! the file is created 0600 and, past [`DEAD_LETTER_MAX_BYTES`], renamed to `<file>.1`
//! (replacing the previous one) before a new file is started), counted in
//! `sec_events_dead_lettered_total`, logged as one error line (id, type, size, reason;
//! never the details), and announced by a small `sec.<service>.event.dead_lettered` event.
//! That summary is never itself summarised when it is dead-lettered, so this cannot loop.
//!
//! Consumers (audit-svc) call [`EventBus::fetch`] (or [`EventBus::fetch_all`], which also
//! hands over the messages that are not events at all) and must [`Delivery::ack`] only
//! after the event is durably stored; an unacknowledged event is delivered again. What can
//! never be stored goes to [`Delivery::dead_letter`] with a [`DeadLetterReason`] (on NATS:
//! copied to the `<stream>_DLQ` stream, then terminated; see `nats.rs`). [`catalog`] lists
//! every event type the platform emits.

pub mod aggregate;
pub mod catalog;
pub mod json;
pub mod memory;
pub mod nats;
pub mod outbox;
pub mod subscribe;

pub use subscribe::{Notice, SubscribeError, Subscription, TypeFilter};

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};

use crate::clock::{Clock, SharedClock, SystemClock};
use crate::config::EventsConfig;
pub use sec_proto::common::v1::{Actor, ActorKind, Outcome, SecurityEvent, Severity};

/// Largest batch the worker hands the transport at once.
const PUBLISH_BATCH: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most `details` entries one event may carry: details are context for a reader of the
/// audit trail, not a payload channel.
pub const MAX_DETAILS: usize = 64;
/// Attempts in which an event failed as "unavailable" while an event after it was stored,
/// before the event is treated as permanently refused and dead-lettered.
pub const MAX_STRIKES: u32 = 5;
/// The dead-letter file is rotated to `<file>.1` beyond this size, so it stays bounded
/// (at most twice this on disk) however long the broker keeps refusing.
pub const DEAD_LETTER_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// `<noun>.<verb>` of the summary published when an event is dead-lettered.
const DEAD_LETTER_SUMMARY: &str = "event.dead_lettered";
/// Longest failure reason copied into a summary event.
const MAX_REASON_CHARS: usize = 256;
/// Header bytes every NATS message carries besides the trace headers: the `NATS/1.0\r\n`
/// preamble, the final `\r\n` and `Nats-Msg-Id: <uuid>\r\n`.
const FIXED_HEADER_BYTES: usize = 10 + 2 + 11 + 2 + 36 + 2;

/// An event on its way to the broker, with the W3C trace headers of the request that
/// produced it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub event: SecurityEvent,
    pub trace_headers: Vec<(String, String)>,
}

impl Outgoing {
    /// The `traceparent` value this event travels with, if any.
    fn traceparent(&self) -> Option<&str> {
        self.trace_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
            .map(|(_, v)| v.as_str())
    }
}

/// An event in the spool, with the outbox segment holding it (if the bus has an outbox).
/// Not a field of [`Outgoing`]: transports and their tests build `Outgoing`s, and the
/// segment is the bus's business.
#[derive(Debug)]
struct Spooled {
    out: Outgoing,
    segment: Option<u64>,
}

/// Told the id of each event a consumer acknowledged (see [`EventTransport::durable`]).
pub type AckHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Why the transport did not store an event. Decides what the bus does next.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Transient (broker down, ack timeout): the event stays in the spool and is retried.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Permanent for this event (too big, invalid subject, refused by the stream): it is
    /// dead-lettered at once instead of blocking the events behind it.
    #[error("broker refused the event: {0}")]
    Rejected(String),
}

/// A message broker as the bus needs it.
#[async_trait]
pub trait EventTransport: Send + Sync + 'static {
    /// `nats` or `memory`, for logs and status output.
    fn kind(&self) -> &'static str;
    /// Publishes a batch; one result per event, in batch order, `Ok` once the broker has
    /// stored it. Events are stored in order, so a failure followed by a success in the
    /// same batch is specific to the failed event (the bus relies on this).
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>>;
    /// Up to `max` events for the durable consumer, within about `wait`: in process, 20 ms
    /// after the first is there (or at `max`); on NATS, when `max` arrived or `wait`
    /// passed. Either way a steady stream gives batches. Empty when none came.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError>;
    /// [`EventTransport::fetch`], plus the messages that are not events at all
    /// ([`Undecodable`]), for a consumer that dead-letters them. Transports that cannot
    /// carry foreign bytes (in-process) have none.
    async fn fetch_all(&self, max: usize, wait: Duration) -> Result<Fetched, TransportError> {
        Ok(Fetched {
            deliveries: self.fetch(max, wait).await?,
            undecodable: Vec::new(),
        })
    }
    /// Streams found without `deny_delete`/`deny_purge` that could not be updated (see
    /// `nats.rs`); empty when every stream is protected or the transport has none.
    fn unprotected_streams(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether the broker is reachable now (readiness).
    async fn ready(&self) -> Result<(), String>;
    /// Whether an event the transport stored survives the death of this process (a
    /// broker: yes). For a transport that is not durable (the in-process one), the bus
    /// keeps an event in its outbox until a consumer acknowledges it, and learns of the
    /// acknowledgement through [`EventTransport::set_ack_hook`].
    fn durable(&self) -> bool {
        true
    }
    /// Only for transports that are not [`durable`](EventTransport::durable): call `hook`
    /// with the event id when a consumer acks an event, and for an event published again
    /// after its first copy was acknowledged (a duplicate that will never be acked).
    fn set_ack_hook(&self, hook: AckHook) {
        let _ = hook;
    }
    /// A live, non-durable subscription to the events matching `filters`, buffered up to
    /// `capacity` (see [`subscribe`]). Transports without one refuse.
    async fn subscribe(
        &self,
        filters: Vec<TypeFilter>,
        capacity: usize,
    ) -> Result<Subscription, SubscribeError> {
        let _ = (filters, capacity);
        Err(SubscribeError::Unsupported)
    }
}

/// Why a consumed message can never be stored. A fixed set: it is a metric label
/// (`sec_audit_dead_lettered_total{reason}`), the last token of the dead-letter subject
/// (`<events.dead_letter_subject>.<reason>`) and the `reason` column of audit-svc's
/// `dead_letters` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterReason {
    /// The payload is not a protobuf `SecurityEvent`.
    Undecodable,
    /// Id not a UUID, type not `sec.<service>[.<noun>].<verb>`, type of another service
    /// than `event.service`, or published on another subject than its type's.
    Invalid,
    /// Well-formed, but not in [`catalog::EVENT_TYPES`].
    UnknownType,
    /// Details over the consumer's limit (count or bytes).
    TooLarge,
    /// The database refuses this one row (a data error, e.g. a NUL character).
    Unstorable,
}

impl DeadLetterReason {
    pub const ALL: [Self; 5] = [
        Self::Undecodable,
        Self::Invalid,
        Self::UnknownType,
        Self::TooLarge,
        Self::Unstorable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::Invalid => "invalid",
            Self::UnknownType => "unknown_type",
            Self::TooLarge => "too_large",
            Self::Unstorable => "unstorable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one fetch returned: events, and messages that are not events at all.
#[derive(Debug, Default)]
pub struct Fetched {
    pub deliveries: Vec<Delivery>,
    pub undecodable: Vec<Undecodable>,
}

impl Fetched {
    /// Messages received, decodable or not.
    pub fn len(&self) -> usize {
        self.deliveries.len() + self.undecodable.len()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A message on the event stream that does not decode as a `SecurityEvent`. Never
/// dropped: the consumer dead-letters it (or nacks it to retry later).
#[derive(Debug)]
pub struct Undecodable {
    /// The decoder's complaint (about the bytes' shape, never their content).
    pub error: String,
    received: Box<nats::Received>,
}

impl Undecodable {
    pub(crate) fn new(error: String, received: nats::Received) -> Self {
        Self {
            error,
            received: Box::new(received),
        }
    }

    /// The original payload bytes.
    pub fn payload(&self) -> &[u8] {
        self.received.payload()
    }

    pub fn subject(&self) -> &str {
        self.received.subject()
    }

    /// Identifies the message in its stream (`<stream>:<sequence>`): the same across
    /// redeliveries.
    pub fn source_key(&self) -> Option<String> {
        self.received.source_key()
    }

    /// See [`Delivery::dead_letter`].
    pub async fn dead_letter(self, detail: &str) -> Result<(), TransportError> {
        self.received
            .dead_letter(DeadLetterReason::Undecodable, detail)
            .await
    }

    pub async fn nack(self) -> Result<(), TransportError> {
        self.received.nack().await
    }
}

/// One consumed event. Ack after it is stored; nack (or drop without ack, for NATS after
/// the ack wait) to have it delivered again; [`Delivery::dead_letter`] when it can never
/// be stored.
#[derive(Debug)]
pub struct Delivery {
    pub event: SecurityEvent,
    /// The `traceparent` header the event travelled with.
    traceparent: Option<String>,
    handle: DeliveryHandle,
}

#[derive(Debug)]
enum DeliveryHandle {
    Nats(Box<nats::Received>),
    Memory(Arc<memory::MemoryTransport>),
}

impl Delivery {
    /// The subject the message was published on (`None` in process, where there are none).
    pub fn subject(&self) -> Option<&str> {
        match &self.handle {
            DeliveryHandle::Nats(r) => Some(r.subject()),
            DeliveryHandle::Memory(_) => None,
        }
    }

    /// The bytes as received: the original payload from NATS, the protobuf encoding in
    /// process.
    pub fn payload(&self) -> Vec<u8> {
        match &self.handle {
            DeliveryHandle::Nats(r) => r.payload().to_vec(),
            DeliveryHandle::Memory(_) => self.event.encode_to_vec(),
        }
    }

    /// Identifies the message in its stream (`<stream>:<sequence>`), the same across
    /// redeliveries; `None` in process.
    pub fn source_key(&self) -> Option<String> {
        match &self.handle {
            DeliveryHandle::Nats(r) => r.source_key(),
            DeliveryHandle::Memory(_) => None,
        }
    }

    /// Sets the message aside for good. NATS: the original payload and headers are
    /// republished to `<events.dead_letter_subject>.<reason>` (stream `<stream>_DLQ`,
    /// `Nats-Msg-Id` `dlq-<stream sequence>`), the publish ack awaited, and only then the
    /// original terminated; if the copy fails the original is nacked (retried later) and
    /// the error returned. In process: acked; the consumer keeps the event itself
    /// (audit-svc's `dead_letters` table). `detail` is a short, content-free description
    /// of the failure.
    pub async fn dead_letter(
        self,
        reason: DeadLetterReason,
        detail: &str,
    ) -> Result<(), TransportError> {
        match self.handle {
            DeliveryHandle::Nats(r) => r.dead_letter(reason, detail).await,
            DeliveryHandle::Memory(t) => {
                t.ack(&self.event.id);
                Ok(())
            }
        }
    }

    /// The W3C trace id of the request that produced the event: the event's own
    /// `trace_id`, else the one of the `traceparent` header it travelled with (a producer
    /// may not have had its trace context at hand when it built the event).
    pub fn trace_id(&self) -> Option<String> {
        if !self.event.trace_id.is_empty() {
            return Some(self.event.trace_id.clone());
        }
        self.traceparent
            .as_deref()
            .and_then(trace_id_of_traceparent)
    }

    /// The event as it should be stored: with [`Delivery::trace_id`] filled in.
    pub fn event_with_trace_id(&self) -> SecurityEvent {
        let mut event = self.event.clone();
        if event.trace_id.is_empty()
            && let Some(trace_id) = self.trace_id()
        {
            event.trace_id = trace_id;
        }
        event
    }

    pub async fn ack(self) -> Result<(), TransportError> {
        match self.handle {
            DeliveryHandle::Nats(r) => r.ack().await,
            DeliveryHandle::Memory(t) => {
                t.ack(&self.event.id);
                Ok(())
            }
        }
    }

    pub async fn nack(self) -> Result<(), TransportError> {
        match self.handle {
            DeliveryHandle::Nats(r) => r.nack().await,
            DeliveryHandle::Memory(t) => {
                t.nack(&self.event.id);
                Ok(())
            }
        }
    }
}

/// The 32-hex-digit trace id of a W3C `traceparent` value; `None` when it is malformed.
/// Parsed with the W3C propagator itself, not the global one, so it works whether or not
/// telemetry was initialised.
pub fn trace_id_of_traceparent(value: &str) -> Option<String> {
    let carrier = HashMap::from([("traceparent".to_owned(), value.to_owned())]);
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("event spool is full ({0} events waiting for the broker); event refused")]
    SpoolFull(usize),
    #[error("event bus is shut down")]
    Closed,
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error(
        "event is {size} bytes, over the {max}-byte limit (events.max_event_bytes); \
         keep bulk data out of events"
    )]
    TooLarge { size: usize, max: usize },
    #[error("event has {count} details, over the limit of {max}")]
    TooManyDetails { count: usize, max: usize },
    #[error(
        "events of type `{event_type}` already fill their share of the spool ({limit} \
         waiting for the broker); event refused"
    )]
    TypeQuota { event_type: String, limit: usize },
    #[error(
        "the event outbox holds {max_bytes} bytes waiting for the broker \
         (events.outbox_max_bytes); event refused"
    )]
    OutboxFull { max_bytes: u64 },
    /// The outbox could not write the event (disk full, I/O error): it is not safe.
    #[error("event refused: {0}")]
    Outbox(String),
}

/// Label of `sec_events_rejected_total`: a fixed set of reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectReason {
    reason: &'static str,
}

#[derive(Clone, Default)]
struct BusMetrics {
    published: Counter,
    retries: Counter,
    rejected: Counter,
    refused: Family<RejectReason, Counter>,
    dead_lettered: Counter,
    depth: Gauge,
    outbox_replayed: Counter,
    /// The outbox's own gauge when there is one.
    outbox_bytes: Gauge,
}

struct BusInner {
    tx: mpsc::Sender<Spooled>,
    transport: Arc<dyn EventTransport>,
    /// `transport.durable()`, asked once.
    durable: bool,
    /// Every accepted event until it left the spool (or, with a transport that is not
    /// durable, until it was consumed); `None`: memory only.
    outbox: Option<outbox::Outbox>,
    /// Transports that are not durable only: the outbox segments of events stored but
    /// not yet acknowledged by their consumer, by event id (a list: the same id may have
    /// been published twice).
    awaiting_ack: Mutex<HashMap<String, Vec<u64>>>,
    clock: SharedClock,
    subject_prefix: String,
    capacity: usize,
    max_event_bytes: usize,
    /// Events of one type allowed to wait in the spool at once.
    type_limit: usize,
    /// Events accepted and not yet stored or dead-lettered, per (validated) event type.
    /// An entry is removed when its count drops to zero, so the map is bounded by the spool.
    waiting_by_type: Mutex<HashMap<String, usize>>,
    dead_letter_file: Option<PathBuf>,
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
    /// Starts the delivery worker on the current tokio runtime. The spool is in memory
    /// only, whatever `cfg.outbox_dir` says: see [`EventBus::with_outbox`].
    pub fn new(transport: Arc<dyn EventTransport>, cfg: &EventsConfig) -> Self {
        Self::with_clock(transport, cfg, Arc::new(SystemClock))
    }

    /// [`EventBus::new`] with the clock that stamps the bus's own events (dead-letter
    /// summaries).
    pub fn with_clock(
        transport: Arc<dyn EventTransport>,
        cfg: &EventsConfig,
        clock: SharedClock,
    ) -> Self {
        Self::build(transport, cfg, clock, None)
    }

    /// The bus of a service process: [`EventBus::with_clock`] plus, when
    /// `cfg.outbox_dir` is set, the durable outbox there (see [`outbox`]). Its unsettled
    /// events from an earlier run are delivered first. Fails when the outbox cannot be
    /// opened, e.g. because another process holds it.
    pub fn with_outbox(
        transport: Arc<dyn EventTransport>,
        cfg: &EventsConfig,
        clock: SharedClock,
    ) -> anyhow::Result<Self> {
        let opened = match &cfg.outbox_dir {
            None => None,
            Some(dir) => Some(
                outbox::Outbox::open(dir, cfg.outbox_max_bytes, cfg.outbox_fsync)
                    .context("opening the event outbox (events.outbox_dir)")?,
            ),
        };
        Ok(Self::build(transport, cfg, clock, opened))
    }

    fn build(
        transport: Arc<dyn EventTransport>,
        cfg: &EventsConfig,
        clock: SharedClock,
        opened: Option<(outbox::Outbox, Vec<outbox::Replayed>)>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(cfg.spool_capacity.max(1));
        let share = usize::from(cfg.max_type_share_percent.clamp(1, 100));
        let (outbox, replayed) = match opened {
            Some((o, r)) => (Some(o), r),
            None => (None, Vec::new()),
        };
        let metrics = BusMetrics {
            outbox_bytes: outbox
                .as_ref()
                .map(outbox::Outbox::bytes_gauge)
                .unwrap_or_default(),
            ..BusMetrics::default()
        };
        let durable = transport.durable();
        let inner = Arc::new(BusInner {
            tx,
            transport,
            durable,
            outbox,
            awaiting_ack: Mutex::new(HashMap::new()),
            clock,
            subject_prefix: cfg.subject_prefix.clone(),
            capacity: cfg.spool_capacity,
            max_event_bytes: cfg.max_event_bytes,
            // 100%: no per-type limit at all (the spool's own bound still applies; events
            // in the worker's hands count as waiting, so a limit equal to the capacity
            // would bite before the spool is full).
            type_limit: if share >= 100 {
                usize::MAX
            } else {
                (cfg.spool_capacity.saturating_mul(share) / 100).max(1)
            },
            waiting_by_type: Mutex::new(HashMap::new()),
            dead_letter_file: cfg.dead_letter_file.clone(),
            pending: AtomicI64::new(0),
            drained: Notify::new(),
            metrics,
        });
        if inner.outbox.is_some() && !inner.durable {
            let bus = Arc::downgrade(&inner);
            inner.transport.set_ack_hook(Arc::new(move |id: &str| {
                if let Some(bus) = bus.upgrade() {
                    bus.acked(id);
                }
            }));
        }
        // The previous run's unsettled events: the worker's first backlog, outside the
        // bounded channel (they were accepted once already), and waited for by `flush`.
        let backlog: std::collections::VecDeque<Spooled> = replayed
            .into_iter()
            .map(|r| {
                let mut out = r.out;
                // The prefix may have been reconfigured since: publish where events go now.
                if let Ok(subject) = subject_for(&inner.subject_prefix, &out.event) {
                    out.subject = subject;
                }
                Spooled {
                    out,
                    segment: Some(r.segment),
                }
            })
            .collect();
        if !backlog.is_empty() {
            let n = backlog.len();
            tracing::info!(
                dir = %inner.outbox.as_ref().map(|o| o.dir().display().to_string()).unwrap_or_default(),
                "replaying {n} events from the outbox"
            );
            let n64 = i64::try_from(n).unwrap_or(i64::MAX);
            inner.pending.fetch_add(n64, Ordering::SeqCst);
            inner.metrics.depth.inc_by(n64);
            inner.metrics.outbox_replayed.inc_by(n as u64);
        }
        tokio::spawn(deliver(Arc::downgrade(&inner), rx, backlog));
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

    /// Hands the event to the spool. Never blocks; fails when the event is invalid, too
    /// large, its type is over its share of the spool, or the spool is full.
    pub fn publish(&self, event: SecurityEvent) -> Result<(), PublishError> {
        self.inner.publish(event)
    }

    /// Events for the durable consumer (audit-svc).
    pub async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        self.inner.transport.fetch(max, wait).await
    }

    /// [`EventBus::fetch`] with the undecodable messages handed over too (audit-svc
    /// dead-letters them).
    pub async fn fetch_all(&self, max: usize, wait: Duration) -> Result<Fetched, TransportError> {
        self.inner.transport.fetch_all(max, wait).await
    }

    /// Event streams that lack `deny_delete`/`deny_purge` and could not be updated.
    pub fn unprotected_streams(&self) -> Vec<String> {
        self.inner.transport.unprotected_streams()
    }

    pub async fn ready(&self) -> Result<(), String> {
        self.inner.transport.ready().await
    }

    /// Receives, live, the events whose type is one of `filters`: an exact type
    /// (`sec.token.key.revoked`) or a prefix ending in a dot (`sec.token.signing_key.`). At most
    /// `capacity` events wait for the subscriber; beyond that it gets [`Notice::Lagged`]
    /// (see [`subscribe`]). Not durable: follow a state that can also be polled.
    pub async fn subscribe(
        &self,
        filters: &[&str],
        capacity: usize,
    ) -> Result<Subscription, SubscribeError> {
        if filters.is_empty() || filters.len() > subscribe::MAX_FILTERS {
            return Err(SubscribeError::InvalidFilter(format!(
                "between 1 and {} filters",
                subscribe::MAX_FILTERS
            )));
        }
        let filters = filters
            .iter()
            .map(|f| TypeFilter::new(&self.inner.subject_prefix, f))
            .collect::<Result<Vec<_>, _>>()?;
        self.inner.transport.subscribe(filters, capacity).await
    }

    /// Events accepted but not yet stored by the broker (or dead-lettered).
    pub fn pending(&self) -> usize {
        usize::try_from(self.inner.pending.load(Ordering::SeqCst)).unwrap_or(0)
    }

    /// Waits until every accepted event is stored by the broker (or dead-lettered), or
    /// `timeout`. Returns how many are still pending (logged as an error by callers at
    /// shutdown).
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
            "sec_events_rejected",
            "Events refused by publish: invalid, too_many_details, too_large, type_quota, outbox",
            m.refused.clone(),
        );
        registry.register(
            "sec_events_dead_lettered",
            "Events the broker refused for good, set aside instead of retried",
            m.dead_lettered.clone(),
        );
        registry.register(
            "sec_events_spool_depth",
            "Events waiting in the spool for the broker",
            m.depth.clone(),
        );
        registry.register(
            "sec_events_outbox_replayed",
            "Events found in the outbox at start (not settled by the previous run), delivered again",
            m.outbox_replayed.clone(),
        );
        registry.register(
            "sec_events_outbox_bytes",
            "Bytes of the event outbox on disk",
            m.outbox_bytes.clone(),
        );
    }
}

impl BusInner {
    fn publish(&self, event: SecurityEvent) -> Result<(), PublishError> {
        // Validates the type before it is used as a quota key below.
        let subject =
            subject_for(&self.subject_prefix, &event).map_err(|e| self.refuse("invalid", e))?;
        if event.details.len() > MAX_DETAILS {
            return Err(self.refuse(
                "too_many_details",
                PublishError::TooManyDetails {
                    count: event.details.len(),
                    max: MAX_DETAILS,
                },
            ));
        }
        let trace_headers = current_trace_headers();
        let size = wire_size(&event, &trace_headers);
        if size > self.max_event_bytes {
            return Err(self.refuse(
                "too_large",
                PublishError::TooLarge {
                    size,
                    max: self.max_event_bytes,
                },
            ));
        }
        self.admit_type(&event.r#type)
            .map_err(|e| self.refuse("type_quota", e))?;
        // A place in the spool first, then the outbox: an event refused for a full spool
        // must never be on disk, or a restart would deliver an event `publish` refused.
        let permit = match self.tx.try_reserve() {
            Ok(permit) => permit,
            Err(e) => {
                self.release_types([event.r#type.as_str()]);
                tracing::error!(event_id = %event.id, event_type = %event.r#type, "security event refused: spool full or closed");
                self.metrics.rejected.inc();
                return Err(match e {
                    mpsc::error::TrySendError::Full(()) => PublishError::SpoolFull(self.capacity),
                    mpsc::error::TrySendError::Closed(()) => PublishError::Closed,
                });
            }
        };
        let out = Outgoing {
            subject,
            event,
            trace_headers,
        };
        let segment = match &self.outbox {
            None => None,
            Some(outbox) => match outbox.append(&out) {
                Ok(segment) => Some(segment),
                Err(e) => {
                    drop(permit);
                    self.release_types([out.event.r#type.as_str()]);
                    tracing::error!(event_id = %out.event.id, event_type = %out.event.r#type, error = %e, "security event refused: the outbox cannot keep it");
                    let refused = match e {
                        outbox::AppendError::Full { max_bytes } => {
                            PublishError::OutboxFull { max_bytes }
                        }
                        outbox::AppendError::Io { .. } => PublishError::Outbox(e.to_string()),
                    };
                    return Err(self.refuse("outbox", refused));
                }
            },
        };
        // Count before sending so the worker's decrement can never run first.
        self.pending.fetch_add(1, Ordering::SeqCst);
        permit.send(Spooled { out, segment });
        self.metrics.depth.inc();
        Ok(())
    }

    fn refuse(&self, reason: &'static str, error: PublishError) -> PublishError {
        self.metrics
            .refused
            .get_or_create(&RejectReason { reason })
            .inc();
        error
    }

    /// Counts one more waiting event of `event_type`, unless the type is at its limit.
    fn admit_type(&self, event_type: &str) -> Result<(), PublishError> {
        let mut waiting = self
            .waiting_by_type
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match waiting.get_mut(event_type) {
            Some(n) if *n >= self.type_limit => Err(PublishError::TypeQuota {
                event_type: event_type.to_owned(),
                limit: self.type_limit,
            }),
            Some(n) => {
                *n += 1;
                Ok(())
            }
            None => {
                waiting.insert(event_type.to_owned(), 1);
                Ok(())
            }
        }
    }

    fn release_types<'a>(&self, types: impl IntoIterator<Item = &'a str>) {
        let mut waiting = self
            .waiting_by_type
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for t in types {
            if let Some(n) = waiting.get_mut(t) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    waiting.remove(t);
                }
            }
        }
    }

    /// `gone` events left the spool (`stored` of them stored, the rest dead-lettered);
    /// `types` are those of them that were admitted by `publish` in this run (replayed ones
    /// never took a type's share), `segments` the outbox records to settle now.
    fn settle(&self, stored: u64, gone: usize, types: &[String], segments: &mut [u64]) {
        if let Some(outbox) = &self.outbox {
            segments.sort_unstable();
            for run in segments.chunk_by(|a, b| a == b) {
                outbox.settle(run[0], run.len() as u64);
            }
        }
        if gone == 0 {
            return;
        }
        let n = i64::try_from(gone).unwrap_or(i64::MAX);
        self.metrics.published.inc_by(stored);
        self.metrics.depth.dec_by(n);
        self.release_types(types.iter().map(String::as_str));
        if self.pending.fetch_sub(n, Ordering::SeqCst) == n {
            self.drained.notify_waiters();
        }
    }

    /// Transports that are not durable: the outbox records of these events are settled
    /// when their consumer acks them. Registered before the events are handed over, so
    /// an ack can never come first.
    fn await_acks(&self, batch: &[Outgoing], meta: &[Meta]) {
        let mut waiting = self
            .awaiting_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (out, m) in batch.iter().zip(meta) {
            if let Some(segment) = m.segment {
                waiting
                    .entry(out.event.id.clone())
                    .or_default()
                    .push(segment);
            }
        }
    }

    /// Undoes [`BusInner::await_acks`] for an event the transport did not store.
    fn forget_ack(&self, id: &str, segment: u64) {
        let mut waiting = self
            .awaiting_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(segments) = waiting.get_mut(id) {
            if let Some(i) = segments.iter().position(|s| *s == segment) {
                segments.swap_remove(i);
            }
            if segments.is_empty() {
                waiting.remove(id);
            }
        }
    }

    /// A consumer acknowledged event `id` (transports that are not durable).
    fn acked(&self, id: &str) {
        let segments = self
            .awaiting_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let (Some(outbox), Some(segments)) = (&self.outbox, segments) {
            for segment in segments {
                outbox.settle(segment, 1);
            }
        }
    }

    /// Sets aside an event the broker will never store: file (if configured), metric, one
    /// error line, and a summary event unless the event is itself a summary.
    async fn dead_letter(&self, out: Outgoing, reason: String) {
        let size = out.event.encoded_len();
        self.metrics.dead_lettered.inc();
        let kept = match &self.dead_letter_file {
            None => false,
            Some(path) => {
                let line = dead_letter_line(&out, size, &reason);
                let path = path.clone();
                let written = tokio::task::spawn_blocking(move || {
                    append_bounded(&path, line.as_bytes(), DEAD_LETTER_MAX_BYTES)
                })
                .await;
                match written {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot append to the dead-letter file");
                        false
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "dead-letter writer failed");
                        false
                    }
                }
            }
        };
        tracing::error!(
            event_id = %out.event.id,
            event_type = %out.event.r#type,
            size,
            reason = %reason,
            kept_in_file = kept,
            "security event dead-lettered: the broker will not store it"
        );
        if is_dead_letter_summary(&out.event) {
            return;
        }
        let summary = dead_letter_summary(self.clock.as_ref(), &out.event, size, &reason);
        if let Err(e) = self.publish(summary) {
            tracing::warn!(error = %e, "dead-letter summary event not published");
        }
    }
}

/// The W3C headers (`traceparent`, …) of the current trace, if any.
fn current_trace_headers() -> Vec<(String, String)> {
    let mut h = http::HeaderMap::new();
    crate::telemetry::inject_http(&mut h);
    h.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Bytes the event takes on the wire: the protobuf plus the NATS headers it travels with.
fn wire_size(event: &SecurityEvent, trace_headers: &[(String, String)]) -> usize {
    let headers: usize = trace_headers
        .iter()
        .map(|(k, v)| k.len() + 2 + v.len() + 2)
        .sum();
    event.encoded_len() + FIXED_HEADER_BYTES + headers
}

fn is_dead_letter_summary(event: &SecurityEvent) -> bool {
    event
        .r#type
        .strip_prefix("sec.")
        .and_then(|rest| rest.strip_prefix(event.service.as_str()))
        .and_then(|rest| rest.strip_prefix('.'))
        == Some(DEAD_LETTER_SUMMARY)
}

/// `sec.<service>.event.dead_lettered`: which event was set aside and why, without its
/// details.
fn dead_letter_summary(
    clock: &dyn Clock,
    original: &SecurityEvent,
    size: usize,
    reason: &str,
) -> SecurityEvent {
    let mut e = new_event(
        clock,
        &original.service,
        &format!("sec.{}.{DEAD_LETTER_SUMMARY}", original.service),
    );
    e.outcome = Outcome::Failure as i32;
    e.severity = Severity::High as i32;
    e.subject = format!("event:{}", original.id);
    e.trace_id = original.trace_id.clone();
    e.details.insert("event_id".into(), original.id.clone());
    e.details
        .insert("event_type".into(), original.r#type.clone());
    e.details.insert("size".into(), size.to_string());
    e.details.insert(
        "reason".into(),
        reason.chars().take(MAX_REASON_CHARS).collect(),
    );
    e
}

/// One line of the dead-letter file (see the module documentation for the format).
fn dead_letter_line(out: &Outgoing, size: usize, reason: &str) -> String {
    let mut line = serde_json::json!({
        "event_id": out.event.id,
        "event_type": out.event.r#type,
        "subject": out.subject,
        "size": size,
        "reason": reason,
        "traceparent": out.traceparent(),
        "event": base64::engine::general_purpose::STANDARD.encode(out.event.encode_to_vec()),
    })
    .to_string();
    line.push('\n');
    line
}

/// Appends `line` to `path` (created 0600), first renaming a file that would grow past
/// `max` to `<path>.1`, so at most two generations exist.
fn append_bounded(path: &Path, line: &[u8], max: u64) -> std::io::Result<()> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if len > 0 && len.saturating_add(line.len() as u64) > max {
        let mut previous = path.as_os_str().to_owned();
        previous.push(".1");
        std::fs::rename(path, PathBuf::from(previous))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(line)?;
    file.sync_data()
}

/// The service token of a well-formed type (`sec.<service>[.<noun>].<verb>`, tokens of
/// `[a-z0-9_]`), `None` when the type is malformed.
pub fn type_service(event_type: &str) -> Option<&str> {
    let rest = event_type.strip_prefix("sec.")?;
    let tokens: Vec<&str> = rest.split('.').collect();
    if tokens.len() < 2
        || tokens.iter().any(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
    {
        return None;
    }
    tokens.first().copied()
}

/// Event domains not owned by one service: edge protection (`sec.ip.*`,
/// `sec.ratelimit.*`) runs inside whichever service hosts the facade, and its events
/// carry that service's name.
pub const SHARED_DOMAINS: &[&str] = &["ip", "ratelimit"];

/// `sec.crypto.key.rotated` → `<prefix>.crypto.key.rotated`. Types are
/// `sec.<service>.<noun>.<verb>`, or `sec.<service>.<verb>` where a service's contract
/// names one so (`sec.token.revoked`). The id must be a UUID. audit-svc applies the same
/// rule at ingest.
pub fn subject_for(prefix: &str, event: &SecurityEvent) -> Result<String, PublishError> {
    let rest = event.r#type.strip_prefix("sec.").ok_or_else(|| {
        PublishError::Invalid(format!("type `{}` must start with `sec.`", event.r#type))
    })?;
    let Some(service) = type_service(&event.r#type) else {
        return Err(PublishError::Invalid(format!(
            "type `{}` is not `sec.<service>[.<noun>].<verb>`",
            event.r#type
        )));
    };
    if service != event.service && !SHARED_DOMAINS.contains(&service) {
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

/// What the worker keeps beside each event of its batch.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Attempts it failed while an event after it was stored.
    strikes: u32,
    /// Its outbox record, if the bus has an outbox.
    segment: Option<u64>,
    /// Replayed from the outbox at start: it never took a type's share of the spool.
    replayed: bool,
}

/// The delivery worker. Each attempt publishes the events still failing first, then the
/// events replayed from the outbox, then new events from the spool, so a failing event
/// never holds back the ones behind it.
async fn deliver(
    bus: std::sync::Weak<BusInner>,
    mut rx: mpsc::Receiver<Spooled>,
    mut backlog: std::collections::VecDeque<Spooled>,
) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(PUBLISH_BATCH);
    let mut meta: Vec<Meta> = Vec::with_capacity(PUBLISH_BATCH);
    let mut backoff = MIN_BACKOFF;
    let push = |batch: &mut Vec<Outgoing>, meta: &mut Vec<Meta>, s: Spooled, replayed: bool| {
        batch.push(s.out);
        meta.push(Meta {
            strikes: 0,
            segment: s.segment,
            replayed,
        });
    };
    loop {
        if batch.is_empty() {
            if let Some(first) = backlog.pop_front() {
                push(&mut batch, &mut meta, first, true);
            } else {
                // Runs until every sender (every EventBus clone) is gone and the spool is
                // empty.
                let Some(first) = rx.recv().await else { return };
                push(&mut batch, &mut meta, first, false);
            }
            backoff = MIN_BACKOFF;
        }
        while batch.len() < PUBLISH_BATCH {
            let Some(s) = backlog.pop_front() else { break };
            push(&mut batch, &mut meta, s, true);
        }
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(s) => push(&mut batch, &mut meta, s, false),
                Err(_) => break,
            }
        }
        let Some(inner) = bus.upgrade() else { return };
        let settle_on_ack = inner.outbox.is_some() && !inner.durable;
        if settle_on_ack {
            inner.await_acks(&batch, &meta);
        }
        let mut results = inner.transport.publish(&batch).await;
        results.resize_with(batch.len(), || {
            Err(TransportError::Unavailable(
                "transport returned no result".into(),
            ))
        });
        // A failure before the last stored event is specific to the failed event; failures
        // after it look like an outage (or a full in-process queue) and never count.
        let last_stored = results.iter().rposition(Result::is_ok);
        let mut retry = Vec::new();
        let mut retry_meta = Vec::new();
        let mut dead = Vec::new();
        let mut types = Vec::new();
        let mut segments = Vec::new();
        let mut gone = 0_usize;
        let mut stored = 0_u64;
        let mut first_error = None;
        for (i, ((out, m), res)) in batch.drain(..).zip(meta.drain(..)).zip(results).enumerate() {
            if res.is_err()
                && settle_on_ack
                && let Some(segment) = m.segment
            {
                inner.forget_ack(&out.event.id, segment);
            }
            match res {
                Ok(()) => {
                    stored += 1;
                    gone += 1;
                    if !m.replayed {
                        types.push(out.event.r#type);
                    }
                    // Stored by a broker: safe. In process: safe once consumed (`acked`).
                    if let Some(segment) = m.segment
                        && !settle_on_ack
                    {
                        segments.push(segment);
                    }
                }
                Err(TransportError::Rejected(reason)) => dead.push((out, m, reason)),
                Err(TransportError::Unavailable(reason)) => {
                    let n = m.strikes + u32::from(last_stored.is_some_and(|last| last > i));
                    if n >= MAX_STRIKES {
                        dead.push((
                            out,
                            m,
                            format!(
                                "failed {n} times while events after it were stored; \
                                 last error: {reason}"
                            ),
                        ));
                    } else {
                        first_error.get_or_insert(reason);
                        retry.push(out);
                        retry_meta.push(Meta { strikes: n, ..m });
                    }
                }
            }
        }
        let progress = stored > 0 || !dead.is_empty();
        // Dead-letter (and enqueue the summaries) before settling, so `flush` also waits
        // for the summaries.
        for (out, m, reason) in dead {
            gone += 1;
            if !m.replayed {
                types.push(out.event.r#type.clone());
            }
            segments.extend(m.segment);
            inner.dead_letter(out, reason).await;
        }
        inner.settle(stored, gone, &types, &mut segments);
        if retry.is_empty() {
            continue;
        }
        inner.metrics.retries.inc_by(retry.len() as u64);
        if progress {
            // The broker is up; only these events fail. Retry soon, with newer events.
            backoff = MIN_BACKOFF;
        }
        tracing::warn!(
            pending = retry.len(),
            error = %first_error.unwrap_or_default(),
            retry_in_ms = backoff.as_millis() as u64,
            "event publish failed, keeping events in the spool"
        );
        batch = retry;
        meta = retry_meta;
        drop(inner);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
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
        // Edge protection's domains are shared: the hosting service publishes them.
        let edge = new_event(&SystemClock, "auth", "sec.ip.blocked");
        assert_eq!(subject_for("p", &edge).unwrap(), "p.ip.blocked");
        let edge = new_event(&SystemClock, "auth", "sec.ratelimit.exceeded");
        assert!(subject_for("p", &edge).is_ok());
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
        // One event type fills the spool here: no per-type share in the way.
        let bus = EventBus::new(
            flaky.clone(),
            &EventsConfig {
                max_type_share_percent: 100,
                ..cfg(4)
            },
        );
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
        assert!(
            text.contains("sec_events_dead_lettered_total 0"),
            "an outage never dead-letters: {text}"
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

    fn metrics(bus: &EventBus) -> String {
        let mut reg = Registry::default();
        bus.register_metrics(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text
    }

    type Verdict = Box<dyn Fn(&Outgoing) -> Result<(), TransportError> + Send + Sync>;

    /// A broker that judges each event with `verdict` and keeps what it accepts.
    struct Scripted {
        verdict: Verdict,
        stored: std::sync::Mutex<Vec<SecurityEvent>>,
    }

    impl Scripted {
        fn new(
            verdict: impl Fn(&Outgoing) -> Result<(), TransportError> + Send + Sync + 'static,
        ) -> Arc<Self> {
            Arc::new(Self {
                verdict: Box::new(verdict),
                stored: Default::default(),
            })
        }

        fn stored(&self) -> Vec<SecurityEvent> {
            self.stored.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl EventTransport for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }
        async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
            batch
                .iter()
                .map(|o| {
                    let r = (self.verdict)(o);
                    if r.is_ok() {
                        self.stored.lock().unwrap().push(o.event.clone());
                    }
                    r
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

    fn dead_letter_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn decode_dead_letter(line: &serde_json::Value) -> SecurityEvent {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line["event"].as_str().unwrap())
            .unwrap();
        SecurityEvent::decode(bytes.as_slice()).unwrap()
    }

    #[tokio::test]
    async fn permanently_rejected_event_is_dead_lettered_and_never_blocks_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.deadletter");
        let mut bad = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        bad.details.insert("note".into(), "private-detail".into());
        let bad_id = bad.id.clone();
        let broker = Scripted::new(move |o| {
            if o.event.id == bad_id {
                Err(TransportError::Rejected("maximum payload exceeded".into()))
            } else {
                Ok(())
            }
        });
        let bus = EventBus::new(
            broker.clone(),
            &EventsConfig {
                dead_letter_file: Some(file.clone()),
                ..cfg(100)
            },
        );
        bus.publish(bad.clone()).unwrap();
        let mut good = Vec::new();
        for _ in 0..10 {
            let e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
            good.push(e.id.clone());
            bus.publish(e).unwrap();
        }
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);

        let stored = broker.stored();
        for id in &good {
            assert!(stored.iter().any(|e| &e.id == id), "good event {id} lost");
        }
        assert!(!stored.iter().any(|e| e.id == bad.id));
        let summaries: Vec<_> = stored
            .iter()
            .filter(|e| e.r#type == "sec.audit.event.dead_lettered")
            .collect();
        assert_eq!(summaries.len(), 1, "one summary per dead-lettered event");
        let summary = summaries[0];
        assert_eq!(summary.details["event_id"], bad.id);
        assert_eq!(summary.details["event_type"], "sec.audit.test.happened");
        assert!(summary.details["reason"].contains("maximum payload"));
        assert!(
            !summary
                .details
                .values()
                .any(|v| v.contains("private-detail")),
            "the summary never copies the event's details"
        );
        assert_eq!(summary.outcome, Outcome::Failure as i32);

        let text = metrics(&bus);
        assert!(text.contains("sec_events_dead_lettered_total 1"), "{text}");
        assert!(
            text.contains("sec_events_publish_retries_total 0"),
            "a rejected event is never retried: {text}"
        );
        assert!(text.contains("sec_events_spool_depth 0"), "{text}");

        let lines = dead_letter_lines(&file);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["event_id"], bad.id.as_str());
        assert_eq!(lines[0]["reason"], "maximum payload exceeded");
        assert_eq!(
            decode_dead_letter(&lines[0]),
            bad,
            "the file keeps the event byte for byte"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[tokio::test]
    async fn a_dead_lettered_summary_is_not_summarised_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dl");
        let broker = Scripted::new(|_| Err(TransportError::Rejected("stream sealed".into())));
        let bus = EventBus::new(
            broker.clone(),
            &EventsConfig {
                dead_letter_file: Some(file.clone()),
                ..cfg(100)
            },
        );
        bus.publish(new_event(&SystemClock, "token", "sec.token.key.rotated"))
            .unwrap();
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        let lines = dead_letter_lines(&file);
        let types: Vec<_> = lines.iter().map(|l| l["event_type"].clone()).collect();
        assert_eq!(
            types,
            ["sec.token.key.rotated", "sec.token.event.dead_lettered"],
            "the event, then its summary, and nothing more"
        );
        assert!(metrics(&bus).contains("sec_events_dead_lettered_total 2"));
        assert!(broker.stored().is_empty());
    }

    #[tokio::test]
    async fn an_event_failing_alone_while_others_get_through_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dl");
        let bad = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        let bad_id = bad.id.clone();
        let broker = Scripted::new(move |o| {
            if o.event.id == bad_id {
                Err(TransportError::Unavailable("timed out".into()))
            } else {
                Ok(())
            }
        });
        let bus = EventBus::new(
            broker.clone(),
            &EventsConfig {
                dead_letter_file: Some(file.clone()),
                ..cfg(100)
            },
        );
        bus.publish(bad.clone()).unwrap();
        // Traffic keeps flowing behind it; a deadline only guards against a hang.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut good = Vec::new();
        while dead_letter_lines(&file).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never dead-lettered"
            );
            let e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
            good.push(e.id.clone());
            bus.publish(e).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        let lines = dead_letter_lines(&file);
        assert_eq!(lines[0]["event_id"], bad.id.as_str());
        let reason = lines[0]["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("failed {MAX_STRIKES} times")) && reason.contains("timed out"),
            "{reason}"
        );
        let stored: Vec<String> = broker.stored().into_iter().map(|e| e.id).collect();
        for id in &good {
            assert!(stored.contains(id), "good event {id} lost");
        }
    }

    /// A broker whose queue takes only two events per call: the tail of every batch fails
    /// as "unavailable", like the in-process queue under a slow consumer.
    struct Trickle {
        stored: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl EventTransport for Trickle {
        fn kind(&self) -> &'static str {
            "trickle"
        }
        async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
            batch
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    if i < 2 {
                        self.stored.lock().unwrap().push(o.event.id.clone());
                        Ok(())
                    } else {
                        Err(TransportError::Unavailable("queue full".into()))
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
    async fn back_pressure_delays_events_but_never_dead_letters_them() {
        let broker = Arc::new(Trickle {
            stored: Default::default(),
        });
        let bus = EventBus::new(
            broker.clone(),
            &EventsConfig {
                max_type_share_percent: 100,
                ..cfg(100)
            },
        );
        let mut ids = Vec::new();
        for _ in 0..30 {
            let e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
            ids.push(e.id.clone());
            bus.publish(e).unwrap();
        }
        assert_eq!(bus.flush(Duration::from_secs(30)).await, 0);
        let mut stored = broker.stored.lock().unwrap().clone();
        stored.sort();
        ids.sort();
        assert_eq!(stored, ids);
        assert!(metrics(&bus).contains("sec_events_dead_lettered_total 0"));
    }

    #[tokio::test]
    async fn oversized_events_and_too_many_details_are_refused_at_publish() {
        let bus = EventBus::in_process(&cfg(100));
        let mut big = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        big.details.insert("blob".into(), "x".repeat(70_000));
        let err = bus.publish(big).unwrap_err();
        let PublishError::TooLarge { size, max } = err.clone() else {
            panic!("expected TooLarge, got {err}");
        };
        assert_eq!(max, 64 * 1024);
        assert!(size > 70_000);
        assert!(err.to_string().contains("events.max_event_bytes"), "{err}");

        let mut chatty = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        for i in 0..=MAX_DETAILS {
            chatty.details.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(
            bus.publish(chatty),
            Err(PublishError::TooManyDetails {
                count: MAX_DETAILS + 1,
                max: MAX_DETAILS
            })
        );

        let mut fine = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        for i in 0..MAX_DETAILS {
            fine.details.insert(format!("k{i}"), "v".into());
        }
        let fine_id = fine.id.clone();
        bus.publish(fine).unwrap();
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let got = bus.fetch(10, Duration::from_millis(100)).await.unwrap();
        assert_eq!(got.len(), 1, "refused events never reach the broker");
        assert_eq!(got[0].event.id, fine_id);

        let text = metrics(&bus);
        assert!(
            text.contains(r#"sec_events_rejected_total{reason="too_large"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sec_events_rejected_total{reason="too_many_details"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_flood_of_one_type_cannot_crowd_out_other_types() {
        let flaky = Arc::new(Flaky {
            up: false.into(),
            stored: Default::default(),
        });
        let bus = EventBus::new(flaky.clone(), &cfg(100));
        let (mut accepted, mut quota) = (0, 0);
        for _ in 0..1000 {
            match bus.publish(new_event(&SystemClock, "auth", "sec.auth.login.failed")) {
                Ok(()) => accepted += 1,
                Err(PublishError::TypeQuota { event_type, limit }) => {
                    assert_eq!(event_type, "sec.auth.login.failed");
                    assert_eq!(limit, 25);
                    quota += 1;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(accepted, 25, "25% of a 100-event spool");
        assert_eq!(quota, 975);
        // Other types, of this service and others, still get in.
        for _ in 0..20 {
            bus.publish(new_event(&SystemClock, "auth", "sec.auth.login.succeeded"))
                .unwrap();
            bus.publish(new_event(&SystemClock, "crypto", "sec.crypto.key.rotated"))
                .unwrap();
        }
        let text = metrics(&bus);
        assert!(
            text.contains(r#"sec_events_rejected_total{reason="type_quota"} 975"#),
            "{text}"
        );

        flaky.up.store(true, Ordering::SeqCst);
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(flaky.stored.lock().unwrap().len(), 65);
        // Delivered events give their share back.
        bus.publish(new_event(&SystemClock, "auth", "sec.auth.login.failed"))
            .unwrap();
    }

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// What a gRPC server does: `TraceContextLayer` around a handler that emits an event.
    async fn serve_one_request(bus: &EventBus, traceparent: &str) {
        use tower::{Layer as _, ServiceExt as _};
        let producer = bus.clone();
        let svc =
            crate::telemetry::TraceContextLayer.layer(tower::service_fn(
                move |_req: http::Request<()>| {
                    let bus = producer.clone();
                    async move {
                        bus.publish(new_event(&SystemClock, "audit", "sec.audit.test.happened"))
                    }
                },
            ));
        let req = http::Request::builder()
            .uri("/sec.audit.v1.AuditService/Query")
            .header("traceparent", traceparent)
            .body(())
            .unwrap();
        svc.oneshot(req).await.unwrap();
    }

    async fn delivered_trace_id(bus: &EventBus) -> (String, Option<String>) {
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let mut got = bus.fetch(10, Duration::from_millis(100)).await.unwrap();
        assert_eq!(got.len(), 1);
        let d = got.remove(0);
        let ids = (d.event.trace_id.clone(), d.trace_id());
        d.ack().await.unwrap();
        ids
    }

    #[tokio::test]
    async fn the_request_traceparent_reaches_the_delivered_event_with_or_without_export() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let bus = EventBus::in_process(&cfg(100));

        // No OTLP endpoint: no OpenTelemetry layer in the subscriber.
        serve_one_request(&bus, TRACEPARENT).await;
        let (in_event, delivered) = delivered_trace_id(&bus).await;
        assert_eq!(in_event, TRACE_ID);
        assert_eq!(delivered.as_deref(), Some(TRACE_ID));

        // With export: the OpenTelemetry layer parents the request span.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        {
            let _default = tracing::subscriber::set_default(subscriber);
            serve_one_request(&bus, TRACEPARENT).await;
        }
        let (in_event, delivered) = delivered_trace_id(&bus).await;
        assert_eq!(in_event, TRACE_ID);
        assert_eq!(delivered.as_deref(), Some(TRACE_ID));

        // A malformed traceparent is ignored, not copied.
        serve_one_request(&bus, "00-nope-01").await;
        let (in_event, delivered) = delivered_trace_id(&bus).await;
        assert_eq!(in_event, "");
        assert_eq!(delivered, None);
    }

    #[tokio::test]
    async fn consumer_falls_back_to_the_traceparent_header() {
        let t = memory::MemoryTransport::new(10);
        let mut e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        e.trace_id.clear();
        let out = Outgoing {
            subject: "s".into(),
            event: e,
            trace_headers: vec![("traceparent".into(), TRACEPARENT.into())],
        };
        assert!(t.publish(&[out]).await[0].is_ok());
        let got = t.fetch(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got[0].trace_id().as_deref(), Some(TRACE_ID));
        assert_eq!(got[0].event_with_trace_id().trace_id, TRACE_ID);
        assert_eq!(trace_id_of_traceparent("garbage"), None);
        assert_eq!(
            trace_id_of_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn dead_letter_file_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dl");
        let line = |c: char| format!("{}\n", c.to_string().repeat(59));
        append_bounded(&path, line('a').as_bytes(), 100).unwrap();
        append_bounded(&path, line('b').as_bytes(), 100).unwrap();
        append_bounded(&path, line('c').as_bytes(), 100).unwrap();
        let previous = dir.path().join("dl.1");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line('c'));
        assert_eq!(
            std::fs::read_to_string(&previous).unwrap(),
            line('b'),
            "one older generation is kept, older ones are dropped"
        );
    }

    #[test]
    fn event_limits_are_validated() {
        use crate::config::Config;
        let with = |f: &dyn Fn(&mut EventsConfig)| {
            let mut c = Config::default();
            f(&mut c.events);
            c.validate().map_err(|e| e.to_string())
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|e| e.max_event_bytes = 1024 * 1024).is_ok());
        for bad in [0, 1024 * 1024 + 1] {
            let err = with(&|e| e.max_event_bytes = bad).unwrap_err();
            assert!(err.contains("events.max_event_bytes"), "{err}");
        }
        for bad in [0, 101] {
            let err = with(&|e| e.max_type_share_percent = bad).unwrap_err();
            assert!(err.contains("events.max_type_share_percent"), "{err}");
        }
        assert_eq!(EventsConfig::default().max_event_bytes, 64 * 1024);
        assert_eq!(EventsConfig::default().max_type_share_percent, 25);
        assert_eq!(EventsConfig::default().dead_letter_file, None);
        assert_eq!(EventsConfig::default().outbox_dir, None);
        assert_eq!(EventsConfig::default().outbox_max_bytes, 256 * 1024 * 1024);
        assert!(!EventsConfig::default().outbox_fsync);
        assert!(with(&|e| e.outbox_max_bytes = 1024 * 1024).is_ok());
        let err = with(&|e| e.outbox_max_bytes = 1024 * 1024 - 1).unwrap_err();
        assert!(err.contains("events.outbox_max_bytes"), "{err}");

        // What secd and operators set, through the environment overlay.
        let vars: std::collections::BTreeMap<String, String> = [
            (
                "SEC_EVENTS__DEAD_LETTER_FILE",
                "/var/lib/sec/events.deadletter",
            ),
            ("SEC_EVENTS__MAX_EVENT_BYTES", "131072"),
            ("SEC_EVENTS__MAX_TYPE_SHARE_PERCENT", "10"),
            ("SEC_EVENTS__OUTBOX_DIR", "/var/lib/sec/outbox"),
            ("SEC_EVENTS__OUTBOX_MAX_BYTES", "1073741824"),
            ("SEC_EVENTS__OUTBOX_FSYNC", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let c = Config::load(None, &vars, &[]).unwrap();
        assert_eq!(
            c.events.dead_letter_file.as_deref(),
            Some(Path::new("/var/lib/sec/events.deadletter"))
        );
        assert_eq!(c.events.max_event_bytes, 128 * 1024);
        assert_eq!(c.events.max_type_share_percent, 10);
        assert_eq!(
            c.events.outbox_dir.as_deref(),
            Some(Path::new("/var/lib/sec/outbox"))
        );
        assert_eq!(c.events.outbox_max_bytes, 1024 * 1024 * 1024);
        assert!(c.events.outbox_fsync);
    }
}
