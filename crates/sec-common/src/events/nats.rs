//! NATS JetStream transport: one stream for every security event, `Nats-Msg-Id` = event
//! id (the broker drops duplicates within its window, so retries are safe), publish acks
//! awaited, and a durable pull consumer for audit-svc with explicit acks.
//!
//! Dead letters: a consumed message that can never be stored is republished, original
//! payload and headers, to `<events.dead_letter_subject>.<reason>` in its own stream
//! `<stream>_DLQ`, with `Sec-Dead-Letter-Reason`, `Sec-Original-Subject`,
//! `Sec-Original-Sequence` and `Nats-Msg-Id: dlq-<stream sequence>` (so a crash between
//! the copy and the ack does not copy it twice); the original is terminated only after
//! the copy's publish ack. The dead-letter stream is created at the first dead letter
//! (a process that never dead-letters never creates it).
//!
//! Protection: both streams are created with `deny_delete` and `deny_purge` (no message
//! can be deleted and the stream cannot be purged through the API; only `max_age` ages
//! events out). A stream that exists without them is updated to set them (the server
//! allows setting them, never clearing them). If the update is refused, an error names
//! the stream and the `nats stream edit` command, and the stream is listed by
//! [`EventTransport::unprotected_streams`] (audit-svc exports it as the
//! `sec_audit_event_streams_unprotected` gauge).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, ErrorCode, consumer::PullConsumer};
use async_trait::async_trait;
use futures::{FutureExt as _, StreamExt};
use prost::Message;
use tokio::sync::OnceCell;

use super::subscribe::{SubscribeError, Subscription, TypeFilter};
use super::{
    DeadLetterReason, Delivery, DeliveryHandle, EventTransport, Fetched, Outgoing, SecurityEvent,
    TransportError, Undecodable,
};
use crate::config::EventsConfig;

const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past its `expires` a pull request may take to end (messages and the 408
/// still on their way) before the client ends it.
const FETCH_END_GRACE: Duration = Duration::from_secs(1);

/// JetStream API errors that refuse this one message for good: retrying it can never
/// succeed, whatever the state of the server.
const PERMANENT_STREAM_ERRORS: &[ErrorCode] = &[
    // larger than the stream's max_msg_size
    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
    // headers larger than the stream allows
    ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
    // the subject is bound to a different stream than the one expected
    ErrorCode::STREAM_NOT_MATCH,
    ErrorCode::MESSAGE_TTL_INVALID,
    ErrorCode::MESSAGE_TTL_DISABLED,
];

/// Sorts a publish (or publish-ack) failure into "retry later" and "never": invalid
/// subject, over the server's max_payload, refused by the stream for this message
/// ([`PERMANENT_STREAM_ERRORS`]) and an undecodable ack are permanent; timeouts, no
/// responders (no stream bound yet, JetStream down), a lost connection, too many acks
/// in flight and any other stream error (storage full, leader election, …) are
/// transient. When unsure it says transient: the bus dead-letters an event that keeps
/// failing while others get through anyway (see `events` module docs).
fn classify(e: &PublishError) -> TransportError {
    let transient = || TransportError::Unavailable(e.to_string());
    let permanent = || TransportError::Rejected(e.to_string());
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => permanent(),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::StreamNotFound => transient(),
        PublishErrorKind::Other => {
            let Some(source) = std::error::Error::source(e) else {
                return transient();
            };
            if source
                .downcast_ref::<async_nats::subject::SubjectError>()
                .is_some()
                || source.downcast_ref::<serde_json::Error>().is_some()
            {
                permanent()
            } else if let Some(api) = source.downcast_ref::<jetstream::Error>()
                && PERMANENT_STREAM_ERRORS.contains(&api.error_code())
            {
                permanent()
            } else {
                transient()
            }
        }
    }
}

/// The dead-letter stream of one event stream, shared by every message consumed from it.
#[derive(Debug)]
pub(crate) struct DeadLetterStream {
    js: jetstream::Context,
    config: jetstream::stream::Config,
    /// `<events.dead_letter_subject>`: reasons are appended as the last token.
    subject: String,
    ensured: OnceCell<()>,
    unprotected: Arc<Mutex<BTreeSet<String>>>,
}

impl DeadLetterStream {
    async fn ensure(&self) -> Result<(), TransportError> {
        self.ensured
            .get_or_try_init(|| ensure_protected(&self.js, self.config.clone(), &self.unprotected))
            .await
            .map(|_| ())
    }
}

/// A consumed message and where it goes if it is dead-lettered.
#[derive(Debug)]
pub(crate) struct Received {
    msg: jetstream::Message,
    dlq: Arc<DeadLetterStream>,
}

impl Received {
    pub(crate) fn payload(&self) -> &[u8] {
        self.msg.payload.as_ref()
    }

    pub(crate) fn subject(&self) -> &str {
        self.msg.subject.as_str()
    }

    pub(crate) fn source_key(&self) -> Option<String> {
        let info = self.msg.info().ok()?;
        Some(format!("{}:{}", info.stream, info.stream_sequence))
    }

    pub(crate) async fn ack(self) -> Result<(), TransportError> {
        self.msg
            .ack()
            .await
            .map_err(|e| TransportError::Unavailable(e.to_string()))
    }

    pub(crate) async fn nack(&self) -> Result<(), TransportError> {
        self.msg
            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
            .await
            .map_err(|e| TransportError::Unavailable(e.to_string()))
    }

    /// Copy to the dead-letter stream, await its ack, then terminate the original. If
    /// the copy fails the original is nacked (redelivered later), never terminated.
    pub(crate) async fn dead_letter(
        self,
        reason: DeadLetterReason,
        detail: &str,
    ) -> Result<(), TransportError> {
        match self.copy_to_dead_letters(reason, detail).await {
            Ok(()) => self
                .msg
                .ack_with(jetstream::AckKind::Term)
                .await
                .map_err(|e| TransportError::Unavailable(e.to_string())),
            Err(e) => {
                if let Err(nack) = self.nack().await {
                    tracing::warn!(error = %nack, "nack failed; the message comes back after the ack wait");
                }
                Err(e)
            }
        }
    }

    async fn copy_to_dead_letters(
        &self,
        reason: DeadLetterReason,
        detail: &str,
    ) -> Result<(), TransportError> {
        self.dlq.ensure().await?;
        let sequence = self
            .msg
            .info()
            .map_err(|e| TransportError::Unavailable(format!("no stream sequence: {e}")))?
            .stream_sequence;
        let mut headers = self.msg.headers.clone().unwrap_or_default();
        headers.insert("Sec-Dead-Letter-Reason", reason.as_str());
        headers.insert("Sec-Dead-Letter-Detail", header_safe(detail).as_str());
        headers.insert("Sec-Original-Subject", self.msg.subject.as_str());
        headers.insert("Sec-Original-Sequence", sequence.to_string().as_str());
        // Replaces the original's (the event id): the copy is de-duplicated by position.
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("dlq-{sequence}").as_str(),
        );
        let subject = format!("{}.{}", self.dlq.subject, reason.as_str());
        let ack = self
            .dlq
            .js
            .publish_with_headers(subject, headers, self.msg.payload.clone())
            .await
            .map_err(|e| classify(&e))?;
        ack.await.map_err(|e| classify(&e))?;
        Ok(())
    }
}

/// `detail` as a header value: printable ASCII only (no CR/LF), at most 200 bytes.
fn header_safe(detail: &str) -> String {
    detail
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

/// The configuration every event stream gets: file storage, the de-duplication window,
/// `max_age`, and no API deletes or purges.
fn protected_config(
    name: String,
    subjects: Vec<String>,
    cfg: &EventsConfig,
) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name,
        subjects,
        max_age: Duration::from_secs(cfg.stream_max_age_hours * 3600),
        storage: jetstream::stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// The command an operator runs when the server refused to protect `stream`.
pub fn protect_command(stream: &str) -> String {
    format!("nats stream edit {stream} --deny-delete --deny-purge")
}

/// Creates the stream protected, or protects the existing one (keeping the rest of its
/// configuration). A refused update is logged and recorded in `unprotected`, not fatal:
/// events still flow.
async fn ensure_protected(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
    unprotected: &Mutex<BTreeSet<String>>,
) -> Result<(), TransportError> {
    let name = config.name.clone();
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| TransportError::Unavailable(format!("cannot create stream {name}: {e}")))?;
    let info = stream
        .info()
        .await
        .map_err(|e| TransportError::Unavailable(format!("cannot read stream {name}: {e}")))?;
    let mut existing = info.config.clone();
    let mut refused = false;
    if !(existing.deny_delete && existing.deny_purge) {
        existing.deny_delete = true;
        existing.deny_purge = true;
        match js.update_stream(existing).await {
            Ok(_) => tracing::warn!(
                stream = %name,
                "event stream had deny_delete/deny_purge off; turned them on"
            ),
            Err(e) => {
                refused = true;
                tracing::error!(
                    stream = %name,
                    error = %e,
                    command = %protect_command(&name),
                    "event stream is not protected against message deletes and purges, and the server refused to change it; run the command"
                );
            }
        }
    }
    let mut set = unprotected.lock().unwrap_or_else(PoisonError::into_inner);
    if refused {
        set.insert(name);
    } else {
        set.remove(&name);
    }
    Ok(())
}

pub struct NatsTransport {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: EventsConfig,
    stream: OnceCell<()>,
    dlq: Arc<DeadLetterStream>,
    unprotected: Arc<Mutex<BTreeSet<String>>>,
    consumer: OnceCell<PullConsumer>,
    /// Bumped on every (re)connection and slow-consumer report: live subscriptions missed
    /// messages meanwhile and tell their subscriber it lagged.
    gaps: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("stream", &self.cfg.stream)
            .finish()
    }
}

impl NatsTransport {
    /// Returns at once even when the server is down: the client keeps reconnecting in the
    /// background and the bus spools events meanwhile.
    pub async fn connect(url: &str, cfg: &EventsConfig, client_name: &str) -> anyhow::Result<Self> {
        let gaps = tokio::sync::watch::Sender::new(0u64);
        let on_event = gaps.clone();
        // The first connection is no gap; a reconnection after a disconnect is.
        let disconnected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let gaps = on_event.clone();
                let disconnected = disconnected.clone();
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    let gap = match event {
                        async_nats::Event::Disconnected => {
                            disconnected.store(true, SeqCst);
                            false
                        }
                        async_nats::Event::Connected => disconnected.swap(false, SeqCst),
                        async_nats::Event::SlowConsumer(_) => true,
                        _ => false,
                    };
                    if gap {
                        gaps.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
            })
            .name(client_name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        let unprotected = Arc::new(Mutex::new(BTreeSet::new()));
        let dlq = Arc::new(DeadLetterStream {
            js: js.clone(),
            config: protected_config(
                dead_letter_stream(&cfg.stream),
                vec![format!("{}.>", cfg.dead_letter_subject)],
                cfg,
            ),
            subject: cfg.dead_letter_subject.clone(),
            ensured: OnceCell::new(),
            unprotected: unprotected.clone(),
        });
        Ok(Self {
            client,
            js,
            cfg: cfg.clone(),
            stream: OnceCell::new(),
            dlq,
            unprotected,
            consumer: OnceCell::new(),
            gaps,
        })
    }

    /// Creates the stream if it does not exist, protected (see the module docs); an
    /// existing stream keeps its configuration, protection added.
    async fn ensure_stream(&self) -> Result<(), TransportError> {
        self.stream
            .get_or_try_init(|| {
                let config = protected_config(
                    self.cfg.stream.clone(),
                    vec![format!("{}.>", self.cfg.subject_prefix)],
                    &self.cfg,
                );
                ensure_protected(&self.js, config, &self.unprotected)
            })
            .await
            .map(|_| ())
    }

    /// Decodes a consumed message into `out`: a [`Delivery`], or an [`Undecodable`] for
    /// the dead-letter path.
    fn push_received(&self, out: &mut Fetched, msg: jetstream::Message) {
        let received = Received {
            msg,
            dlq: self.dlq.clone(),
        };
        match SecurityEvent::decode(received.payload()) {
            Ok(event) => out.deliveries.push(Delivery {
                event,
                traceparent: traceparent_of(&received.msg),
                handle: DeliveryHandle::Nats(Box::new(received)),
            }),
            Err(e) => out
                .undecodable
                .push(Undecodable::new(e.to_string(), received)),
        }
    }

    async fn consumer(&self) -> Result<&PullConsumer, TransportError> {
        self.ensure_stream().await?;
        self.consumer
            .get_or_try_init(|| async {
                let stream = self
                    .js
                    .get_stream(&self.cfg.stream)
                    .await
                    .map_err(|e| TransportError::Unavailable(e.to_string()))?;
                stream
                    .get_or_create_consumer(
                        &self.cfg.audit_consumer,
                        jetstream::consumer::pull::Config {
                            durable_name: Some(self.cfg.audit_consumer.clone()),
                            ack_policy: jetstream::consumer::AckPolicy::Explicit,
                            ack_wait: Duration::from_secs(30),
                            max_ack_pending: 50_000,
                            filter_subject: format!("{}.>", self.cfg.subject_prefix),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| {
                        TransportError::Unavailable(format!("cannot create consumer: {e}"))
                    })
            })
            .await
    }
}

/// `<stream>_DLQ`: where the consumer sets aside what it can never store.
pub fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}_DLQ")
}

/// The `traceparent` header of a consumed message (case-insensitive: a foreign publisher
/// may have capitalised it).
fn traceparent_of(m: &jetstream::Message) -> Option<String> {
    m.headers
        .as_ref()?
        .iter()
        .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case("traceparent"))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str().to_owned())
}

#[async_trait]
impl EventTransport for NatsTransport {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        if let Err(e) = self.ensure_stream().await {
            let msg = e.to_string();
            return batch
                .iter()
                .map(|_| Err(TransportError::Unavailable(msg.clone())))
                .collect();
        }
        // Send the whole batch, then await the acks: one round trip per batch, not per event.
        let mut acks = Vec::with_capacity(batch.len());
        for out in batch {
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in &out.trace_headers {
                headers.insert(k.as_str(), v.as_str());
            }
            let msg = jetstream::message::PublishMessage::build()
                .payload(out.event.encode_to_vec().into())
                .headers(headers)
                .message_id(out.event.id.as_str());
            acks.push(self.js.send_publish(out.subject.clone(), msg).await);
        }
        // All acks awaited together: each ack's timeout (ACK_TIMEOUT) starts when it is
        // first polled, so awaiting them one after the other made a batch whose replies
        // were lost with the connection (NATS restarted) wait ACK_TIMEOUT per event, up to
        // 256 x 5 s, before anything was retried. Now a batch waits ACK_TIMEOUT at most.
        futures::future::join_all(acks.into_iter().map(|ack| async move {
            match ack {
                Ok(fut) => fut.await.map(|_| ()).map_err(|e| classify(&e)),
                Err(e) => Err(classify(&e)),
            }
        }))
        .await
    }

    /// For consumers that do not handle [`Undecodable`]s themselves: they are
    /// dead-lettered here, never dropped.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let fetched = self.fetch_all(max, wait).await?;
        for u in fetched.undecodable {
            let error = u.error.clone();
            tracing::error!(subject = %u.subject(), error = %error, "undecodable message on the event stream, dead-lettering it");
            if let Err(e) = u.dead_letter(&error).await {
                tracing::warn!(error = %e, "cannot dead-letter an undecodable message; it will be redelivered");
            }
        }
        Ok(fetched.deliveries)
    }

    fn unprotected_streams(&self) -> Vec<String> {
        self.unprotected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    async fn fetch_all(&self, max: usize, wait: Duration) -> Result<Fetched, TransportError> {
        let consumer = self.consumer().await?;
        // A waiting pull request (`batch()`, not `fetch()`'s no-wait one): the server
        // ends it when `max` messages were delivered or `wait` passed (status 408), so a
        // busy stream gives full batches and a quiet one an answer within `wait`.
        let expires = wait.max(Duration::from_millis(100));
        let mut messages = consumer
            .batch()
            .max_messages(max)
            .expires(expires)
            .messages()
            .await
            .map_err(|e| TransportError::Unavailable(e.to_string()))?;
        // nats-server 2.9 sometimes stops feeding a request part-filled and never sends
        // its end status (seen with both kinds of request, e.g. on a backlog after
        // audit-svc restarted); async-nats then waits on its own timer, `expires` + 5 s,
        // which stalled ingest 5.5 s per fetch. Past `expires` + FETCH_END_GRACE the
        // request is over: what has arrived is taken, and a message the server might still
        // send to it comes back after the ack wait (delayed, never lost).
        let deadline = tokio::time::Instant::now() + expires + FETCH_END_GRACE;
        let mut out = Fetched::default();
        loop {
            let m = match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => {
                    let mut late = 0;
                    while let Some(Some(Ok(m))) = messages.next().now_or_never() {
                        late += 1;
                        self.push_received(&mut out, m);
                    }
                    tracing::debug!(late, "pull request not ended by the server; ended here");
                    break;
                }
            };
            let m = match m {
                Ok(m) => m,
                // Nothing received yet: the fetch failed.
                Err(e) if out.is_empty() => {
                    return Err(TransportError::Unavailable(e.to_string()));
                }
                // A status that ends the request early (leadership change, consumer
                // deleted...): what was received is handed over, not dropped to come
                // back only after the ack wait.
                Err(e) => {
                    tracing::warn!(error = %e, received = out.len(), "pull request ended early");
                    break;
                }
            };
            self.push_received(&mut out, m);
        }
        Ok(out)
    }

    async fn ready(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            s => Err(format!("nats {s:?}").to_lowercase()),
        }
    }

    /// Core subscriptions on the filters' subjects: JetStream-published messages reach
    /// core subscribers too, with no consumer state on the server.
    async fn subscribe(
        &self,
        filters: Vec<TypeFilter>,
        capacity: usize,
    ) -> Result<Subscription, SubscribeError> {
        let mut subscribers = Vec::with_capacity(filters.len());
        for f in &filters {
            subscribers.push(
                self.client
                    .subscribe(f.subject().to_owned())
                    .await
                    .map_err(|e| SubscribeError::Unavailable(e.to_string()))?,
            );
        }
        let (subscription, feed) = Subscription::channel(filters, capacity);
        let mut gaps = self.gaps.subscribe();
        let mut messages = futures::stream::select_all(subscribers);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = feed.closed() => return,
                    changed = gaps.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        feed.lag(1);
                    }
                    m = messages.next() => {
                        let Some(m) = m else { return };
                        match SecurityEvent::decode(m.payload.as_ref()) {
                            // `offer` re-checks the type against the filters: the subject
                            // alone is not trusted to say what the event is.
                            Ok(event) => {
                                if !feed.offer(&event) {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(subject = %m.subject, error = %e, "undecodable message on an event subject, ignored");
                            }
                        }
                    }
                }
            }
        });
        Ok(subscription.with_task(task))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::SystemClock;
    use crate::events::{EventBus, new_event};
    use sec_testkit::{Backend, backend_url};

    /// Bytes the test stream accepts per message (its `max_msg_size`).
    const STREAM_MAX_MSG: i32 = 16 * 1024;

    fn event_with_blob(len: usize) -> SecurityEvent {
        let mut e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        if len > 0 {
            e.details.insert("blob".into(), "x".repeat(len));
        }
        e
    }

    fn outgoing(cfg: &EventsConfig, event: SecurityEvent) -> Outgoing {
        Outgoing {
            subject: format!("{}.audit.test.happened", cfg.subject_prefix),
            event,
            trace_headers: vec![],
        }
    }

    /// Against the real server: a message over the server's max_payload and one over the
    /// stream's max_msg_size are refused for good (not "unavailable"), the events around
    /// them are stored, and through the bus the oversized one is dead-lettered while the
    /// rest reach the consumer.
    #[tokio::test]
    async fn broker_refusals_are_permanent_and_never_block_the_stream() {
        let Some(url) = backend_url(Backend::Nats) else {
            return;
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        let dir = tempfile::tempdir().unwrap();
        let cfg = EventsConfig {
            stream: format!("EVENTS_TEST_{run}"),
            subject_prefix: format!("eventstest{run}"),
            audit_consumer: format!("audit-{run}"),
            dead_letter_subject: format!("eventstestdl{run}"),
            dead_letter_file: Some(dir.path().join("events.deadletter")),
            // Bypasses publish's size cap, to reach the broker's own limits.
            max_event_bytes: 4 * 1024 * 1024,
            ..EventsConfig::default()
        };
        let client = async_nats::connect(&url).await.unwrap();
        let js = jetstream::new(client.clone());
        // Created before the transport looks, which then keeps it as it is.
        js.create_stream(jetstream::stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![format!("{}.>", cfg.subject_prefix)],
            max_message_size: STREAM_MAX_MSG,
            ..Default::default()
        })
        .await
        .unwrap();
        let max_payload = client.server_info().max_payload;
        let outcome = tokio::spawn(refusals_scenario(url, cfg.clone(), max_payload)).await;
        let deleted = js.delete_stream(&cfg.stream).await;
        let _ = js.delete_stream(dead_letter_stream(&cfg.stream)).await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
        deleted.unwrap();
    }

    /// Replies lost (here: a core subscriber that never answers takes the publishes; in
    /// production a NATS restart drops them with the connection): the whole batch fails
    /// as "unavailable" once, after one ack timeout, not one timeout per event.
    #[tokio::test]
    async fn lost_acks_fail_a_batch_after_one_ack_timeout() {
        let Some(url) = backend_url(Backend::Nats) else {
            return;
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        let cfg = EventsConfig {
            stream: format!("EVENTS_ACKS_{run}"),
            subject_prefix: format!("eventsacks{run}"),
            ..EventsConfig::default()
        };
        let client = async_nats::connect(&url).await.unwrap();
        let silent = format!("eventsackssilent{run}");
        let _swallow = client.subscribe(format!("{silent}.>")).await.unwrap();
        client.flush().await.unwrap();
        let transport = NatsTransport::connect(&url, &cfg, "events-test-acks")
            .await
            .unwrap();
        let batch: Vec<Outgoing> = (0..4)
            .map(|_| Outgoing {
                subject: format!("{silent}.audit.test.happened"),
                event: event_with_blob(0),
                trace_headers: vec![],
            })
            .collect();
        let started = tokio::time::Instant::now();
        let results = transport.publish(&batch).await;
        let took = started.elapsed();
        let _ = jetstream::new(client).delete_stream(&cfg.stream).await;
        assert_eq!(results.len(), 4);
        for r in &results {
            assert!(matches!(r, Err(TransportError::Unavailable(_))), "{r:?}");
        }
        assert!(
            took >= ACK_TIMEOUT && took < 2 * ACK_TIMEOUT,
            "one ack timeout ({ACK_TIMEOUT:?}) for the batch, took {took:?}"
        );
    }

    async fn refusals_scenario(url: String, cfg: EventsConfig, max_payload: usize) {
        assert!(max_payload > 0, "server did not announce max_payload");
        let transport = NatsTransport::connect(&url, &cfg, "events-test")
            .await
            .unwrap();
        let over_server = event_with_blob(max_payload);
        let over_stream = event_with_blob(2 * STREAM_MAX_MSG as usize);
        let (good1, good2) = (event_with_blob(0), event_with_blob(0));
        let results = transport
            .publish(&[
                outgoing(&cfg, over_server),
                outgoing(&cfg, good1.clone()),
                outgoing(&cfg, over_stream),
                outgoing(&cfg, good2.clone()),
            ])
            .await;
        assert!(
            matches!(&results[0], Err(TransportError::Rejected(m)) if m.contains("max payload")),
            "{:?}",
            results[0]
        );
        assert!(results[1].is_ok(), "{:?}", results[1]);
        assert!(
            matches!(&results[2], Err(TransportError::Rejected(_))),
            "over the stream's max_msg_size: {:?}",
            results[2]
        );
        assert!(results[3].is_ok(), "{:?}", results[3]);

        // Through the bus: the oversized event first, normal traffic behind it.
        let bus = EventBus::new(
            Arc::new(
                NatsTransport::connect(&url, &cfg, "events-test-bus")
                    .await
                    .unwrap(),
            ),
            &cfg,
        );
        let big = event_with_blob(max_payload);
        bus.publish(big.clone()).unwrap();
        let mut want = vec![good1.id, good2.id];
        for _ in 0..5 {
            let e = event_with_blob(0);
            want.push(e.id.clone());
            bus.publish(e).unwrap();
        }
        assert_eq!(bus.flush(Duration::from_secs(30)).await, 0);

        let mut got = Vec::new();
        let mut summaries = Vec::new();
        for _ in 0..20 {
            if got.len() >= want.len() && !summaries.is_empty() {
                break;
            }
            for d in transport.fetch(100, Duration::from_secs(1)).await.unwrap() {
                if d.event.r#type == "sec.audit.event.dead_lettered" {
                    summaries.push(d.event.clone());
                } else {
                    got.push(d.event.id.clone());
                }
                d.ack().await.unwrap();
            }
        }
        got.sort();
        want.sort();
        assert_eq!(got, want, "every normal event reaches the consumer");
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].details["event_id"], big.id);

        let file = cfg.dead_letter_file.as_ref().unwrap();
        let lines = std::fs::read_to_string(file).unwrap();
        assert_eq!(lines.lines().count(), 1);
        assert!(lines.contains(&big.id));
    }

    /// Against the real server: a core subscription gets the JetStream-published events
    /// of its types, and only those.
    #[tokio::test]
    async fn live_subscribers_get_their_types_from_the_stream() {
        let Some(url) = backend_url(Backend::Nats) else {
            return;
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        let cfg = EventsConfig {
            stream: format!("EVENTS_SUB_{run}"),
            subject_prefix: format!("eventssub{run}"),
            audit_consumer: format!("audit-{run}"),
            dead_letter_subject: format!("eventssubdl{run}"),
            ..EventsConfig::default()
        };
        let transport = NatsTransport::connect(&url, &cfg, "events-sub-test")
            .await
            .unwrap();
        let bus = EventBus::new(Arc::new(transport), &cfg);
        let outcome = tokio::spawn(async move {
            crate::events::subscribe::tests::only_matching_types_arrive(&bus).await
        })
        .await;
        let client = async_nats::connect(&url).await.unwrap();
        let deleted = jetstream::new(client).delete_stream(&cfg.stream).await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
        deleted.unwrap();
    }
}

#[cfg(test)]
mod protection_tests {
    use super::*;
    use sec_testkit::{Backend, backend_url};

    /// Against the real server: a stream that exists unprotected is protected by the
    /// transport (keeping its own settings), the dead-letter stream is created protected,
    /// and deleting a message or purging either stream is refused.
    #[tokio::test]
    async fn event_streams_refuse_deletes_and_purges() {
        let Some(url) = backend_url(Backend::Nats) else {
            return;
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        let cfg = EventsConfig {
            stream: format!("EVENTS_PROT_{run}"),
            subject_prefix: format!("eventsprot{run}"),
            audit_consumer: format!("audit-{run}"),
            dead_letter_subject: format!("eventsprotdl{run}"),
            ..EventsConfig::default()
        };
        let client = async_nats::connect(&url).await.unwrap();
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![format!("{}.>", cfg.subject_prefix)],
            max_messages: 12_345,
            ..Default::default()
        })
        .await
        .unwrap();
        let outcome = tokio::spawn(protection_scenario(url, cfg.clone(), js.clone())).await;
        let deleted = js.delete_stream(&cfg.stream).await;
        let _ = js.delete_stream(dead_letter_stream(&cfg.stream)).await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
        deleted.unwrap();
    }

    async fn protection_scenario(url: String, cfg: EventsConfig, js: jetstream::Context) {
        let transport = NatsTransport::connect(&url, &cfg, "events-prot-test")
            .await
            .unwrap();
        // Creating the consumer ensures the main stream; the first dead letter, the other.
        assert!(
            transport
                .fetch(1, Duration::from_millis(100))
                .await
                .unwrap()
                .is_empty()
        );
        transport.dlq.ensure().await.unwrap();
        assert!(transport.unprotected_streams().is_empty());
        let ack = js
            .publish(format!("{}.audit.x.y", cfg.subject_prefix), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let dlq_ack = js
            .publish(format!("{}.invalid", cfg.dead_letter_subject), "y".into())
            .await
            .unwrap()
            .await
            .unwrap();
        for (name, seq) in [
            (cfg.stream.clone(), ack.sequence),
            (dead_letter_stream(&cfg.stream), dlq_ack.sequence),
        ] {
            let mut stream = js.get_stream(&name).await.unwrap();
            let info = stream.info().await.unwrap().clone();
            assert!(info.config.deny_delete && info.config.deny_purge, "{name}");
            assert!(
                stream.delete_message(seq).await.is_err(),
                "{name}: message delete refused"
            );
            assert!(stream.purge().await.is_err(), "{name}: purge refused");
            assert_eq!(stream.info().await.unwrap().state.messages, 1, "{name}");
        }
        let main = js
            .get_stream(&cfg.stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
        assert_eq!(main.max_messages, 12_345, "existing settings kept");
    }
}

#[cfg(test)]
mod dead_letter_tests {
    use super::*;
    use sec_testkit::{Backend, backend_url};

    /// Against the real server: while the dead-letter stream cannot be created (another
    /// stream holds its subjects), dead-lettering fails and the original comes back
    /// (nacked, never terminated without its copy); once it can, the copy is made and
    /// the original is gone from the consumer.
    #[tokio::test]
    async fn a_failed_copy_leaves_the_message_for_redelivery() {
        let Some(url) = backend_url(Backend::Nats) else {
            return;
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        let cfg = EventsConfig {
            stream: format!("EVENTS_DLT_{run}"),
            subject_prefix: format!("eventsdlt{run}"),
            audit_consumer: format!("audit-{run}"),
            dead_letter_subject: format!("eventsdltdl{run}"),
            ..EventsConfig::default()
        };
        let client = async_nats::connect(&url).await.unwrap();
        let js = jetstream::new(client);
        let blocker = format!("EVENTS_DLT_BLOCK_{run}");
        js.create_stream(jetstream::stream::Config {
            name: blocker.clone(),
            subjects: vec![format!("{}.>", cfg.dead_letter_subject)],
            ..Default::default()
        })
        .await
        .unwrap();
        let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
            dead_letter_scenario(url, cfg.clone(), js.clone(), blocker.clone()),
        ))
        .await;
        let _ = js.delete_stream(&blocker).await;
        let _ = js.delete_stream(dead_letter_stream(&cfg.stream)).await;
        let deleted = js.delete_stream(&cfg.stream).await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        deleted.unwrap();
    }

    async fn dead_letter_scenario(
        url: String,
        cfg: EventsConfig,
        js: jetstream::Context,
        blocker: String,
    ) {
        let transport = NatsTransport::connect(&url, &cfg, "events-dlt-test")
            .await
            .unwrap();
        assert!(
            transport
                .fetch(1, Duration::from_millis(100))
                .await
                .unwrap()
                .is_empty()
        );
        js.publish(
            format!("{}.audit.x.y", cfg.subject_prefix),
            "\u{a}\u{ff}".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let take = || async {
            let mut got = Vec::new();
            for _ in 0..10 {
                got.extend(
                    transport
                        .fetch_all(10, Duration::from_millis(500))
                        .await
                        .unwrap()
                        .undecodable,
                );
                if !got.is_empty() {
                    break;
                }
            }
            got
        };
        let mut first = take().await;
        assert_eq!(first.len(), 1);
        let u = first.remove(0);
        let key = u.source_key();
        assert!(key.is_some());
        assert!(
            u.dead_letter("test").await.is_err(),
            "no dead-letter stream: refused"
        );
        let mut again = take().await;
        assert_eq!(again.len(), 1, "nacked, not terminated: redelivered");
        let u = again.remove(0);
        assert_eq!(u.source_key(), key);

        js.delete_stream(&blocker).await.unwrap();
        u.dead_letter("test").await.unwrap();
        let dlq = js
            .get_stream(dead_letter_stream(&cfg.stream))
            .await
            .unwrap();
        let copy = dlq.get_raw_message(1).await.unwrap();
        assert_eq!(copy.payload.as_ref(), "\u{a}\u{ff}".as_bytes());
        assert_eq!(
            copy.subject.as_str(),
            format!("{}.undecodable", cfg.dead_letter_subject)
        );
        assert!(
            transport
                .fetch_all(10, Duration::from_secs(2))
                .await
                .unwrap()
                .undecodable
                .is_empty(),
            "terminated after the copy"
        );
    }
}
