//! Live event subscriptions: a service (the local token verifier) receives the events of
//! some types as they are published, with no durable state.
//!
//! - In process ([`super::memory::MemoryTransport`]): every stored event is offered to
//!   each matching subscriber.
//! - NATS: a core subscription on the subject(s) the bus publishes those types to;
//!   JetStream-published messages are delivered to core subscribers too.
//!
//! Each subscriber has its own bounded buffer, filled with `try_send`: a slow subscriber
//! never blocks a publisher (or the NATS client). When its buffer is full the event is
//! dropped for it and it is told, by a [`Notice::Lagged`] before its next event, so it can
//! re-read the state it follows (the verifier polls `ListRevocations`). A NATS reconnect
//! is reported the same way: core subscriptions miss what was published meanwhile.
//!
//! Nothing here is durable: a subscription is a low-latency hint; the state it follows
//! must have a pollable source of truth.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, mpsc};

use super::SecurityEvent;

/// Most type filters one subscription may carry.
pub const MAX_FILTERS: usize = 16;
/// Largest per-subscriber buffer.
pub const MAX_CAPACITY: usize = 65_536;

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    Event(Box<SecurityEvent>),
    /// This many events (or, for a reconnect, an unknown number counted as 1) were lost
    /// for this subscriber: re-read the state from its source.
    Lagged(u64),
}

/// Why a subscription could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("invalid event type filter: {0}")]
    InvalidFilter(String),
    #[error("this event transport has no live subscriptions")]
    Unsupported,
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// One validated type filter: an exact event type (`sec.token.key.revoked`) or a prefix
/// ending in a dot (`sec.token.signing_key.`), and the NATS subject it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeFilter {
    type_prefix: String,
    subject: String,
}

impl TypeFilter {
    /// Validates `filter` like event types are validated at publish (lowercase tokens of
    /// `[a-z0-9_]`), so a subject is never built from an unchecked string.
    pub fn new(subject_prefix: &str, filter: &str) -> Result<Self, SubscribeError> {
        let bad = || SubscribeError::InvalidFilter(filter.chars().take(128).collect());
        let rest = filter.strip_prefix("sec.").ok_or_else(bad)?;
        let (body, wildcard) = match rest.strip_suffix('.') {
            Some(body) => (body, true),
            None => (rest, false),
        };
        let tokens: Vec<&str> = body.split('.').collect();
        let valid_token = |t: &&str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        // `sec.<service>.` at least; an exact type has `<service>.<verb>` at least.
        if !tokens.iter().all(valid_token) || (!wildcard && tokens.len() < 2) || filter.len() > 256
        {
            return Err(bad());
        }
        let subject = if wildcard {
            format!("{subject_prefix}.{body}.>")
        } else {
            format!("{subject_prefix}.{body}")
        };
        Ok(Self {
            type_prefix: filter.to_owned(),
            subject,
        })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        if self.type_prefix.ends_with('.') {
            event_type.starts_with(&self.type_prefix) && event_type.len() > self.type_prefix.len()
        } else {
            event_type == self.type_prefix
        }
    }

    /// The NATS subject (possibly with a trailing `>`) this filter subscribes to.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

/// The sending half of one subscription, held by the transport.
#[derive(Clone)]
pub(crate) struct Feed {
    filters: Arc<[TypeFilter]>,
    tx: mpsc::Sender<SecurityEvent>,
    lagged: Arc<AtomicU64>,
    wake: Arc<Notify>,
}

impl Feed {
    /// Offers one event; never waits. Returns false once the subscriber is gone.
    pub(crate) fn offer(&self, event: &SecurityEvent) -> bool {
        if !self.filters.iter().any(|f| f.matches(&event.r#type)) {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lag(1);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Records lost events and wakes the subscriber.
    pub(crate) fn lag(&self, n: u64) {
        self.lagged.fetch_add(n, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// A live stream of the events of some types. Dropping it ends the subscription.
pub struct Subscription {
    rx: mpsc::Receiver<SecurityEvent>,
    lagged: Arc<AtomicU64>,
    wake: Arc<Notify>,
    /// The NATS forwarding task, aborted with the subscription.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Subscription {
    /// A subscription and the feed a transport fills it through.
    pub(crate) fn channel(filters: Vec<TypeFilter>, capacity: usize) -> (Self, Feed) {
        let (tx, rx) = mpsc::channel(capacity.clamp(1, MAX_CAPACITY));
        let lagged = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let feed = Feed {
            filters: filters.into(),
            tx,
            lagged: lagged.clone(),
            wake: wake.clone(),
        };
        (
            Self {
                rx,
                lagged,
                wake,
                task: None,
            },
            feed,
        )
    }

    pub(crate) fn with_task(mut self, task: tokio::task::JoinHandle<()>) -> Self {
        self.task = Some(task);
        self
    }

    /// The next notice: a lag report first when events were lost, else the next event.
    /// `None` when the transport ended the subscription (the NATS client is gone).
    pub async fn recv(&mut self) -> Option<Notice> {
        loop {
            let lost = self.lagged.swap(0, Ordering::SeqCst);
            if lost > 0 {
                return Some(Notice::Lagged(lost));
            }
            tokio::select! {
                biased;
                // A permit stored by `notify_one` is never missed.
                () = self.wake.notified() => continue,
                ev = self.rx.recv() => return ev.map(|e| Notice::Event(Box::new(e))),
            }
        }
    }

    /// A notice if one is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<Notice> {
        let lost = self.lagged.swap(0, Ordering::SeqCst);
        if lost > 0 {
            return Some(Notice::Lagged(lost));
        }
        self.rx.try_recv().ok().map(|e| Notice::Event(Box::new(e)))
    }
}

/// Subscribers of the in-process transport.
#[derive(Default)]
pub(crate) struct Subscribers {
    feeds: std::sync::Mutex<Vec<Feed>>,
}

impl Subscribers {
    pub(crate) fn add(&self, feed: Feed) {
        self.feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(feed);
    }

    /// Offers the events to every subscriber and forgets the ones that went away.
    pub(crate) fn offer(&self, events: &[SecurityEvent]) {
        if events.is_empty() {
            return;
        }
        let mut feeds = self
            .feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        feeds.retain(|feed| events.iter().all(|e| feed.offer(e)));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::SystemClock;
    use crate::config::EventsConfig;
    use crate::events::{EventBus, new_event};

    const FILTERS: &[&str] = &["sec.token.key.revoked", "sec.token.signing_key."];

    fn ev(service: &str, event_type: &str) -> SecurityEvent {
        new_event(&SystemClock, service, event_type)
    }

    /// The next notice, failing the test (not hanging it) if none comes.
    pub(crate) async fn next(sub: &mut Subscription) -> Notice {
        tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("no notice within 10 s")
            .expect("subscription ended")
    }

    /// Publishes a mix of types and checks exactly the matching ones arrive, in order.
    pub(crate) async fn only_matching_types_arrive(bus: &EventBus) {
        let mut sub = bus.subscribe(FILTERS, 100).await.unwrap();
        let wanted = [
            ev("token", "sec.token.key.revoked"),
            ev("token", "sec.token.signing_key.revoked"),
            ev("token", "sec.token.signing_key.rotated"),
        ];
        let unwanted = [
            ev("token", "sec.token.refresh.reuse_detected"),
            ev("token", "sec.token.key.revoked_not"),
            ev("auth", "sec.auth.login.failed"),
        ];
        for (w, u) in wanted.iter().zip(&unwanted) {
            bus.publish(u.clone()).unwrap();
            bus.publish(w.clone()).unwrap();
        }
        // A marker after everything: once it arrives, nothing unwanted was queued before it.
        let marker = ev("token", "sec.token.signing_key.created");
        bus.publish(marker.clone()).unwrap();
        let mut got = Vec::new();
        loop {
            match next(&mut sub).await {
                Notice::Event(e) if e.id == marker.id => break,
                Notice::Event(e) => got.push(e.id),
                Notice::Lagged(n) => panic!("lagged {n} with a roomy buffer"),
            }
        }
        let want: Vec<_> = wanted.iter().map(|e| e.id.clone()).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn in_process_subscribers_get_only_their_types() {
        let bus = EventBus::in_process(&EventsConfig::default());
        only_matching_types_arrive(&bus).await;
    }

    #[tokio::test]
    async fn a_full_buffer_reports_lag_and_never_blocks_the_publisher() {
        let bus = EventBus::in_process(&EventsConfig::default());
        let mut slow = bus.subscribe(&["sec.token.key.revoked"], 2).await.unwrap();
        let mut fast = bus
            .subscribe(&["sec.token.key.revoked"], 100)
            .await
            .unwrap();
        let events: Vec<_> = (0..5)
            .map(|_| ev("token", "sec.token.key.revoked"))
            .collect();
        for e in &events {
            bus.publish(e.clone()).unwrap();
        }
        assert_eq!(
            bus.flush(Duration::from_secs(10)).await,
            0,
            "publisher not blocked"
        );
        assert_eq!(next(&mut slow).await, Notice::Lagged(3));
        assert_eq!(
            next(&mut slow).await,
            Notice::Event(Box::new(events[0].clone()))
        );
        assert_eq!(
            next(&mut slow).await,
            Notice::Event(Box::new(events[1].clone()))
        );
        assert_eq!(slow.try_recv(), None);
        // The other subscriber's buffer is its own.
        for e in &events {
            assert_eq!(next(&mut fast).await, Notice::Event(Box::new(e.clone())));
        }
        // After the lag, new events flow again.
        let later = ev("token", "sec.token.key.revoked");
        bus.publish(later.clone()).unwrap();
        assert_eq!(next(&mut slow).await, Notice::Event(Box::new(later)));
    }

    #[tokio::test]
    async fn a_dropped_subscription_is_forgotten() {
        let bus = EventBus::in_process(&EventsConfig::default());
        let sub = bus.subscribe(&["sec.token.key.revoked"], 1).await.unwrap();
        drop(sub);
        for _ in 0..3 {
            bus.publish(ev("token", "sec.token.key.revoked")).unwrap();
        }
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
    }

    #[tokio::test]
    async fn filters_are_validated_before_any_subject_is_built() {
        let bus = EventBus::in_process(&EventsConfig::default());
        for bad in [
            "",
            "token.revoked",
            "sec.",
            "sec.token",
            "sec.token.revoked.>",
            "sec.token.*.x",
            "sec.Token.revoked",
            "sec.token..revoked",
            "sec.token.re voked",
            "sec.token.revoked..",
        ] {
            assert!(
                matches!(
                    bus.subscribe(&[bad], 10).await,
                    Err(SubscribeError::InvalidFilter(_))
                ),
                "{bad:?}"
            );
        }
        assert!(bus.subscribe(&[], 10).await.is_err());
        assert!(
            bus.subscribe(&["sec.token.a.b"; MAX_FILTERS + 1], 10)
                .await
                .is_err()
        );
        let f = TypeFilter::new("p", "sec.token.signing_key.").unwrap();
        assert_eq!(f.subject(), "p.token.signing_key.>");
        assert!(f.matches("sec.token.signing_key.revoked"));
        assert!(!f.matches("sec.token.signing_key."));
        assert!(!f.matches("sec.token.signing_keys.revoked"));
        let f = TypeFilter::new("p", "sec.token.key.revoked").unwrap();
        assert_eq!(f.subject(), "p.token.key.revoked");
        assert!(!f.matches("sec.token.key.revoked.x"));
    }
}
