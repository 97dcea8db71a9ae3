//! Aggregation of repetitive failure events, so that one caller's stream of failing
//! requests becomes a bounded number of events instead of filling the event spool.
//!
//! A [`FailureAggregator`] counts failures per `(key, reason)` in windows of a fixed
//! length measured on the injected [`Clock`](crate::clock::Clock):
//!
//! - The **first** failure of a `(key, reason)` is reported at once
//!   ([`Phase::First`], `count = 1`). Alerting on a single probe must not wait for a
//!   window to close, and a rare failure then costs exactly one event, as before.
//! - Every further failure of that `(key, reason)` until the window closes is only
//!   counted; when the window closes ([`FailureAggregator::tick`]) or the service stops
//!   ([`FailureAggregator::flush`]) they are reported as **one** [`Phase::Summary`] with
//!   their `count` and the time of the first and last of them. No summary is emitted
//!   when nothing was counted after the first.
//!
//! So each event's `count` is the number of failures it alone stands for: summing
//! `count` over events gives the exact number of failures, and a flood costs at most two
//! events per `(key, reason)` per window.
//!
//! Memory and event volume stay bounded whatever callers send: `reason` is a
//! `&'static str` (a fixed set chosen by the code, never caller input), and at most
//! `max_keys` distinct keys are tracked at once; failures for further keys are counted
//! in the shared [`Bucket::Other`] bucket (subject `other`, detail `bucket=other`).
//! Callers should still pass only bounded keys (e.g. names of keys that exist).
//!
//! The aggregator owns no task: the service calls [`FailureAggregator::tick`]
//! periodically (every second is plenty) and [`FailureAggregator::flush`] on shutdown,
//! and tests drive it with a `ManualClock`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Duration, SecondsFormat, Utc};

use super::SecurityEvent;
use crate::clock::SharedClock;

/// The subject of failures beyond the distinct-key cap.
pub const OTHER: &str = "other";

/// Where a failure is counted: its own key, or the shared overflow bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    Key(String),
    Other,
}

impl Bucket {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Key(k) => k,
            Self::Other => OTHER,
        }
    }
}

/// Whether a report is the immediate first failure of a window or the closing summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    First,
    Summary,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Summary => "summary",
        }
    }
}

/// One report: `count` failures of `reason` on `bucket` between `first_at` and `last_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary<A> {
    pub bucket: Bucket,
    pub reason: &'static str,
    pub phase: Phase,
    pub count: u64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// The single actor behind every failure counted here; `None` when there were several.
    pub actor: Option<A>,
    pub window: Duration,
}

impl<A> Summary<A> {
    /// Sets the subject and the details every aggregated failure event carries, so that
    /// services report floods in one shape: `reason`, `count`, `first_at`, `last_at`
    /// (RFC 3339), `window_seconds`, `aggregation` (`first` or `summary`), and
    /// `bucket=other` for the overflow bucket.
    pub fn describe(&self, event: &mut SecurityEvent) {
        event.subject = self.bucket.as_str().to_owned();
        let d = &mut event.details;
        d.insert("reason".into(), self.reason.into());
        d.insert("count".into(), self.count.to_string());
        d.insert(
            "first_at".into(),
            self.first_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        );
        d.insert(
            "last_at".into(),
            self.last_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        );
        d.insert(
            "window_seconds".into(),
            self.window.num_seconds().to_string(),
        );
        d.insert("aggregation".into(), self.phase.as_str().into());
        if self.bucket == Bucket::Other {
            d.insert("bucket".into(), OTHER.into());
        }
    }
}

/// Receives every report; called without the aggregator's lock held.
pub type Sink<A> = Arc<dyn Fn(Summary<A>) + Send + Sync>;

enum Attribution<A> {
    Nobody,
    One(A),
    Several,
}

impl<A: PartialEq> Attribution<A> {
    fn add(&mut self, actor: A) {
        match self {
            Self::Nobody => *self = Self::One(actor),
            Self::One(a) if *a == actor => {}
            Self::One(_) => *self = Self::Several,
            Self::Several => {}
        }
    }

    fn take(self) -> Option<A> {
        match self {
            Self::One(a) => Some(a),
            Self::Nobody | Self::Several => None,
        }
    }
}

/// The failures of one `(bucket, reason)` since its window opened, beyond the first.
struct Window<A> {
    opened_at: DateTime<Utc>,
    pending: u64,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    actor: Attribution<A>,
}

type State<A> = HashMap<Bucket, HashMap<&'static str, Window<A>>>;

/// Counts repetitive failures and reports them in bounded form; see the module doc.
pub struct FailureAggregator<A> {
    clock: SharedClock,
    window: Duration,
    max_keys: usize,
    sink: Sink<A>,
    state: Mutex<State<A>>,
}

impl<A> std::fmt::Debug for FailureAggregator<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureAggregator")
            .field("window", &self.window)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<A: Clone + PartialEq> FailureAggregator<A> {
    /// `window`: how long failures of one `(key, reason)` are gathered into one summary
    /// (at least one second). `max_keys`: distinct keys tracked at once (at least one)
    /// before further keys share the `other` bucket.
    pub fn new(
        clock: SharedClock,
        window: std::time::Duration,
        max_keys: usize,
        sink: Sink<A>,
    ) -> Self {
        let window = Duration::from_std(window)
            .unwrap_or(Duration::MAX)
            .max(Duration::seconds(1));
        Self {
            clock,
            window,
            max_keys: max_keys.max(1),
            sink,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<A>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closes_at(&self, opened_at: DateTime<Utc>) -> DateTime<Utc> {
        opened_at
            .checked_add_signed(self.window)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    fn summary(&self, bucket: Bucket, reason: &'static str, w: Window<A>) -> Option<Summary<A>> {
        (w.pending > 0).then(|| Summary {
            bucket,
            reason,
            phase: Phase::Summary,
            count: w.pending,
            first_at: w.first_at,
            last_at: w.last_at,
            actor: w.actor.take(),
            window: self.window,
        })
    }

    /// Counts one failure of `reason` on `key` by `actor`; reports it at once if it is the
    /// first of its window.
    pub fn record(&self, key: &str, reason: &'static str, actor: A) {
        let now = self.clock.now();
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            let own = Bucket::Key(key.to_owned());
            let tracked = state.keys().filter(|b| **b != Bucket::Other).count();
            let bucket = if state.contains_key(&own) || tracked < self.max_keys {
                own
            } else {
                Bucket::Other
            };
            let reasons = state.entry(bucket.clone()).or_default();
            let open = reasons
                .get(reason)
                .is_some_and(|w| now < self.closes_at(w.opened_at));
            if open {
                if let Some(w) = reasons.get_mut(reason) {
                    if w.pending == 0 {
                        w.first_at = now;
                    }
                    w.pending += 1;
                    w.last_at = now;
                    w.actor.add(actor);
                }
            } else {
                // A window that closed without a tick yet: report it before opening anew.
                if let Some(old) = reasons.remove(reason) {
                    out.extend(self.summary(bucket.clone(), reason, old));
                }
                reasons.insert(
                    reason,
                    Window {
                        opened_at: now,
                        pending: 0,
                        first_at: now,
                        last_at: now,
                        actor: Attribution::Nobody,
                    },
                );
                out.push(Summary {
                    bucket,
                    reason,
                    phase: Phase::First,
                    count: 1,
                    first_at: now,
                    last_at: now,
                    actor: Some(actor),
                    window: self.window,
                });
            }
        }
        for s in out {
            (self.sink)(s);
        }
    }

    /// Reports and forgets every window that has closed by now. Returns how many
    /// summaries were emitted.
    pub fn tick(&self) -> usize {
        let now = self.clock.now();
        self.drain(|w| now >= self.closes_at(w.opened_at))
    }

    /// Reports every pending failure now, whether or not its window has closed (shutdown).
    /// Returns how many summaries were emitted.
    pub fn flush(&self) -> usize {
        self.drain(|_| true)
    }

    /// Distinct keys currently tracked (without the `other` bucket).
    pub fn tracked_keys(&self) -> usize {
        self.lock().keys().filter(|b| **b != Bucket::Other).count()
    }

    fn drain(&self, closed: impl Fn(&Window<A>) -> bool) -> usize {
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            for (bucket, reasons) in state.iter_mut() {
                let done: Vec<&'static str> = reasons
                    .iter()
                    .filter(|(_, w)| closed(w))
                    .map(|(r, _)| *r)
                    .collect();
                for reason in done {
                    if let Some(w) = reasons.remove(reason) {
                        out.extend(self.summary(bucket.clone(), reason, w));
                    }
                }
            }
            state.retain(|_, reasons| !reasons.is_empty());
        }
        let n = out.len();
        for s in out {
            (self.sink)(s);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SystemClock};
    use crate::events::new_event;

    type Reports = Arc<Mutex<Vec<Summary<String>>>>;

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn aggregator(max_keys: usize) -> (FailureAggregator<String>, Arc<ManualClock>, Reports) {
        let clock = ManualClock::new(start());
        let reports: Reports = Arc::default();
        let sink = reports.clone();
        let agg = FailureAggregator::new(
            clock.clone(),
            std::time::Duration::from_secs(10),
            max_keys,
            Arc::new(move |s| sink.lock().unwrap().push(s)),
        );
        (agg, clock, reports)
    }

    #[test]
    fn a_flood_is_one_immediate_event_and_one_summary_per_window() {
        let (agg, clock, reports) = aggregator(8);
        for _ in 0..100 {
            agg.record("orders", "invalid_argument", "svc-a".into());
            clock.advance(Duration::milliseconds(50));
        }
        {
            let r = reports.lock().unwrap();
            assert_eq!(
                r.len(),
                1,
                "only the first is reported before the window closes"
            );
            assert_eq!(r[0].phase, Phase::First);
            assert_eq!(r[0].count, 1);
        }
        assert_eq!(agg.tick(), 0, "window (10 s) still open after 5 s");
        clock.advance(Duration::seconds(5));
        assert_eq!(agg.tick(), 1);
        let r = reports.lock().unwrap();
        assert_eq!(r.len(), 2);
        let s = &r[1];
        assert_eq!(
            (s.phase, s.count, s.reason),
            (Phase::Summary, 99, "invalid_argument")
        );
        assert_eq!(r.iter().map(|s| s.count).sum::<u64>(), 100);
        assert_eq!(s.first_at, start() + Duration::milliseconds(50));
        assert_eq!(s.last_at, start() + Duration::milliseconds(99 * 50));
        assert_eq!(s.actor.as_deref(), Some("svc-a"));
        assert_eq!(s.bucket, Bucket::Key("orders".into()));
        drop(r);
        assert_eq!(agg.tracked_keys(), 0, "closed windows are forgotten");
    }

    #[test]
    fn reasons_are_counted_apart_and_mixed_actors_are_not_attributed() {
        let (agg, _clock, reports) = aggregator(8);
        for i in 0..3 {
            agg.record("k", "invalid_argument", format!("svc-{i}"));
            agg.record("k", "failed_precondition", "svc-a".into());
        }
        assert_eq!(agg.flush(), 2);
        let r = reports.lock().unwrap();
        assert_eq!(r.len(), 4, "{r:?}");
        let summary = |reason| {
            r.iter()
                .find(|s| s.phase == Phase::Summary && s.reason == reason)
                .unwrap()
                .clone()
        };
        assert_eq!(summary("invalid_argument").count, 2);
        assert_eq!(summary("invalid_argument").actor, None, "two services");
        assert_eq!(
            summary("failed_precondition").actor.as_deref(),
            Some("svc-a")
        );
    }

    #[test]
    fn distinct_keys_are_capped_and_overflow_goes_to_other() {
        let (agg, _clock, reports) = aggregator(3);
        for i in 0..50 {
            agg.record(&format!("key-{i}"), "invalid_argument", "svc".into());
        }
        assert_eq!(agg.tracked_keys(), 3);
        // a tracked key keeps its own bucket even when the cap is reached
        agg.record("key-0", "invalid_argument", "svc".into());
        agg.flush();
        let r = reports.lock().unwrap();
        let other: u64 = r
            .iter()
            .filter(|s| s.bucket == Bucket::Other)
            .map(|s| s.count)
            .sum();
        assert_eq!(other, 47);
        assert!(
            r.len() <= 3 + 2 + 1,
            "3 keys + first/summary of other + key-0's summary: {}",
            r.len()
        );
        let key0: u64 = r
            .iter()
            .filter(|s| s.bucket.as_str() == "key-0")
            .map(|s| s.count)
            .sum();
        assert_eq!(key0, 2);
    }

    #[test]
    fn a_new_window_opens_after_the_old_one_closed_even_without_a_tick() {
        let (agg, clock, reports) = aggregator(8);
        agg.record("k", "r", "a".into());
        agg.record("k", "r", "a".into());
        clock.advance(Duration::seconds(11));
        agg.record("k", "r", "a".into());
        let r = reports.lock().unwrap();
        let phases: Vec<_> = r.iter().map(|s| (s.phase, s.count)).collect();
        assert_eq!(
            phases,
            [(Phase::First, 1), (Phase::Summary, 1), (Phase::First, 1)]
        );
    }

    #[test]
    fn describe_gives_every_event_the_same_shape() {
        let s = Summary {
            bucket: Bucket::Other,
            reason: "invalid_argument",
            phase: Phase::Summary,
            count: 7,
            first_at: start(),
            last_at: start() + Duration::seconds(3),
            actor: None::<String>,
            window: Duration::seconds(10),
        };
        let mut e = new_event(&SystemClock, "crypto", "sec.crypto.decrypt.failed");
        s.describe(&mut e);
        assert_eq!(e.subject, "other");
        assert_eq!(e.details["count"], "7");
        assert_eq!(e.details["reason"], "invalid_argument");
        assert_eq!(e.details["first_at"], "2026-01-01T00:00:00.000000Z");
        assert_eq!(e.details["last_at"], "2026-01-01T00:00:03.000000Z");
        assert_eq!(e.details["window_seconds"], "10");
        assert_eq!(e.details["aggregation"], "summary");
        assert_eq!(e.details["bucket"], "other");
    }
}
