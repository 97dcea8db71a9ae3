//! The in-process broker: one durable consumer group, de-duplication by event id,
//! redelivery of events that were nacked. Same contract as the NATS transport, but the
//! events live only as long as the process: it is not
//! [`durable`](super::EventTransport::durable), so a bus with an outbox keeps each event
//! there until its consumer acks it, and learns of the ack through the hook.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::subscribe::{SubscribeError, Subscribers, Subscription, TypeFilter};
use super::{
    AckHook, Delivery, DeliveryHandle, EventTransport, Outgoing, SecurityEvent, TransportError,
};

/// How many recent ids are remembered for de-duplication (the broker's dedup window).
const DEDUP_WINDOW: usize = 100_000;
/// How long a fetch that found events waits for more before handing them over.
const LINGER: Duration = Duration::from_millis(20);

/// A stored event and the `traceparent` it was published with.
#[derive(Clone)]
struct Stored {
    event: SecurityEvent,
    traceparent: Option<String>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Stored>,
    in_flight: HashMap<String, Stored>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
}

pub struct MemoryTransport {
    state: Mutex<State>,
    available: Notify,
    capacity: usize,
    /// Live subscribers: offered every event as it is stored.
    subscribers: Subscribers,
    /// Told of every acknowledged event (the bus settles its outbox record then).
    ack_hook: Mutex<Option<AckHook>>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl MemoryTransport {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            available: Notify::new(),
            capacity,
            subscribers: Subscribers::default(),
            ack_hook: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn ack(&self, id: &str) {
        if self.lock().in_flight.remove(id).is_some() {
            self.tell_acked(&[id]);
        }
    }

    fn tell_acked(&self, ids: &[&str]) {
        if ids.is_empty() {
            return;
        }
        let hook = self
            .ack_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            for id in ids {
                hook(id);
            }
        }
    }

    pub(super) fn nack(&self, id: &str) {
        let mut s = self.lock();
        if let Some(e) = s.in_flight.remove(id) {
            s.queue.push_front(e);
            drop(s);
            self.available.notify_one();
        }
    }
}

#[async_trait]
impl EventTransport for Arc<MemoryTransport> {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        let mut s = self.lock();
        let mut stored = Vec::new();
        // Duplicates of events already consumed: no ack will ever come for them.
        let mut consumed = Vec::new();
        let results = batch
            .iter()
            .map(|o| {
                if s.seen.contains(&o.event.id) {
                    // Duplicate: already stored once, like Nats-Msg-Id dedup.
                    if !s.in_flight.contains_key(&o.event.id)
                        && !s.queue.iter().any(|q| q.event.id == o.event.id)
                    {
                        consumed.push(o.event.id.as_str());
                    }
                    return Ok(());
                }
                if s.queue.len() + s.in_flight.len() >= self.capacity {
                    return Err(TransportError::Unavailable(
                        "in-process queue full: no consumer is keeping up".into(),
                    ));
                }
                s.seen.insert(o.event.id.clone());
                s.seen_order.push_back(o.event.id.clone());
                if s.seen_order.len() > DEDUP_WINDOW
                    && let Some(old) = s.seen_order.pop_front()
                {
                    s.seen.remove(&old);
                }
                s.queue.push_back(Stored {
                    event: o.event.clone(),
                    traceparent: o.traceparent().map(str::to_owned),
                });
                stored.push(o.event.clone());
                Ok(())
            })
            .collect();
        drop(s);
        self.available.notify_one();
        self.subscribers.offer(&stored);
        self.tell_acked(&consumed);
        results
    }

    /// Waits up to `wait` for the first event, then up to [`LINGER`] more (never past
    /// `wait`) unless `max` are there: a consumer under a steady stream gets batches, not
    /// an event or two per call (each audit batch is a transaction).
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let deadline = tokio::time::Instant::now() + wait;
        // When the events waiting are handed over even if fewer than `max`.
        let mut hand_over_at: Option<tokio::time::Instant> = None;
        loop {
            let notified = self.available.notified();
            {
                let mut s = self.lock();
                if s.queue.is_empty() {
                    hand_over_at = None;
                } else {
                    let now = tokio::time::Instant::now();
                    let at = *hand_over_at.get_or_insert_with(|| (now + LINGER).min(deadline));
                    if s.queue.len() >= max || now >= at {
                        let n = max.min(s.queue.len());
                        let taken: Vec<Stored> = s.queue.drain(..n).collect();
                        let mut out = Vec::with_capacity(n);
                        for e in taken {
                            s.in_flight.insert(e.event.id.clone(), e.clone());
                            out.push(Delivery {
                                event: e.event,
                                traceparent: e.traceparent,
                                handle: DeliveryHandle::Memory(Arc::clone(self)),
                            });
                        }
                        return Ok(out);
                    }
                }
            }
            let until = hand_over_at.unwrap_or(deadline);
            if tokio::time::timeout_at(until, notified).await.is_err() && hand_over_at.is_none() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn durable(&self) -> bool {
        false
    }

    fn set_ack_hook(&self, hook: AckHook) {
        *self.ack_hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    async fn subscribe(
        &self,
        filters: Vec<TypeFilter>,
        capacity: usize,
    ) -> Result<Subscription, SubscribeError> {
        let (subscription, feed) = Subscription::channel(filters, capacity);
        self.subscribers.add(feed);
        Ok(subscription)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::events::new_event;

    fn out(e: &SecurityEvent) -> Outgoing {
        Outgoing {
            subject: "s".into(),
            event: e.clone(),
            trace_headers: vec![],
        }
    }

    /// A steady stream is handed over in batches: events that follow the first within
    /// LINGER come with it; without followers the first comes after LINGER, not after
    /// the whole wait; `max` ends the linger at once.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_lingers_for_followers_but_not_for_the_whole_wait() {
        let t = MemoryTransport::new(100);
        let ev = || new_event(&SystemClock, "audit", "sec.audit.test.happened");
        t.publish(&[out(&ev())]).await;
        let follower = {
            let (t, b) = (Arc::clone(&t), ev());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                t.publish(&[out(&b)]).await;
            })
        };
        let start = tokio::time::Instant::now();
        let got = t.fetch(10, Duration::from_secs(5)).await.unwrap();
        follower.await.unwrap();
        assert_eq!(got.len(), 2, "the follower came within the linger");
        assert_eq!(start.elapsed(), Duration::from_millis(20));

        t.publish(&[out(&ev())]).await;
        let start = tokio::time::Instant::now();
        let got = t.fetch(10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(20),
            "handed over after the linger, not the wait"
        );

        t.publish(&[out(&ev()), out(&ev()), out(&ev())]).await;
        let start = tokio::time::Instant::now();
        let got = t.fetch(2, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(start.elapsed(), Duration::ZERO, "max reached: no linger");
    }

    #[tokio::test]
    async fn duplicates_are_stored_once_and_nack_redelivers() {
        let t = MemoryTransport::new(10);
        let e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        assert!(
            t.publish(&[out(&e), out(&e)])
                .await
                .iter()
                .all(Result::is_ok)
        );
        let first = t.fetch(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(first.len(), 1, "same id twice is one event");
        first.into_iter().next().unwrap().nack().await.unwrap();
        let again = t.fetch(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(again.len(), 1, "a nacked event comes back");
        assert_eq!(again[0].event.id, e.id);
        again.into_iter().next().unwrap().ack().await.unwrap();
        assert!(
            t.fetch(10, Duration::from_millis(10))
                .await
                .unwrap()
                .is_empty()
        );
        // published again after ack: still a duplicate inside the window
        assert!(t.publish(&[out(&e)]).await[0].is_ok());
        assert!(
            t.fetch(10, Duration::from_millis(10))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn full_queue_refuses_instead_of_dropping() {
        let t = MemoryTransport::new(1);
        let a = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        let b = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        let r = t.publish(&[out(&a), out(&b)]).await;
        assert!(r[0].is_ok());
        assert!(r[1].is_err());
    }

    #[tokio::test]
    async fn fetch_wakes_on_publish() {
        let t = MemoryTransport::new(10);
        let t2 = Arc::clone(&t);
        let waiter =
            tokio::spawn(async move { t2.fetch(10, Duration::from_secs(5)).await.unwrap().len() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let e = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        t.publish(&[out(&e)]).await;
        assert_eq!(waiter.await.unwrap(), 1);
    }
}
