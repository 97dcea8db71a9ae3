//! NATS JetStream transport: one stream for every security event, `Nats-Msg-Id` = event
//! id (the broker drops duplicates within its window, so retries are safe), publish acks
//! awaited, and a durable pull consumer for audit-svc with explicit acks.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use async_trait::async_trait;
use futures::StreamExt;
use prost::Message;
use tokio::sync::OnceCell;

use super::{Delivery, DeliveryHandle, EventTransport, Outgoing, SecurityEvent, TransportError};
use crate::config::EventsConfig;

const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct NatsTransport {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: EventsConfig,
    stream: OnceCell<()>,
    consumer: OnceCell<PullConsumer>,
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
        let client = async_nats::ConnectOptions::new()
            .name(client_name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        Ok(Self {
            client,
            js,
            cfg: cfg.clone(),
            stream: OnceCell::new(),
            consumer: OnceCell::new(),
        })
    }

    /// Creates the stream if it does not exist (idempotent; an existing stream is kept).
    async fn ensure_stream(&self) -> Result<(), TransportError> {
        self.stream
            .get_or_try_init(|| async {
                let config = jetstream::stream::Config {
                    name: self.cfg.stream.clone(),
                    subjects: vec![format!("{}.>", self.cfg.subject_prefix)],
                    max_age: Duration::from_secs(self.cfg.stream_max_age_hours * 3600),
                    storage: jetstream::stream::StorageType::File,
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                };
                self.js
                    .get_or_create_stream(config)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        TransportError::Unavailable(format!(
                            "cannot create stream {}: {e}",
                            self.cfg.stream
                        ))
                    })
            })
            .await
            .map(|_| ())
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
        let mut results = Vec::with_capacity(batch.len());
        for ack in acks {
            results.push(match ack {
                Ok(fut) => fut
                    .await
                    .map(|_| ())
                    .map_err(|e| TransportError::Unavailable(e.to_string())),
                Err(e) => Err(TransportError::Unavailable(e.to_string())),
            });
        }
        results
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let consumer = self.consumer().await?;
        let mut messages = consumer
            .fetch()
            .max_messages(max)
            .expires(wait.max(Duration::from_millis(100)))
            .messages()
            .await
            .map_err(|e| TransportError::Unavailable(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| TransportError::Unavailable(e.to_string()))?;
            match SecurityEvent::decode(m.payload.as_ref()) {
                Ok(event) => out.push(Delivery {
                    event,
                    handle: DeliveryHandle::Nats(Box::new(m)),
                }),
                Err(e) => {
                    // Not ours to store; terminate it so it is not redelivered forever.
                    tracing::error!(subject = %m.subject, error = %e, "undecodable message on the event stream, terminating it");
                    let _ = m.ack_with(jetstream::AckKind::Term).await;
                }
            }
        }
        Ok(out)
    }

    async fn ready(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            s => Err(format!("nats {s:?}").to_lowercase()),
        }
    }
}
