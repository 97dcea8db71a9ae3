//! Injectable time, so that expiry, rotation and retention are testable without sleeping.
//!
//! This is the only place that reads the wall clock: clippy.toml disallows
//! `Utc::now`, `SystemTime::now` and `Uuid::now_v7` everywhere else, so every timestamp
//! and every time-ordered id follows the injected clock (and tests can control both).

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;

    /// A time-ordered (v7) id stamped with this clock's `now`, so ids sort the same way
    /// as the times recorded next to them, under a manual clock too.
    fn new_uuid_v7(&self) -> uuid::Uuid {
        uuid_v7_at(self.now())
    }
}

/// A v7 id carrying `t` (millisecond precision) and random bits. Times before the epoch
/// are clamped to it: a v7 id cannot express them.
pub fn uuid_v7_at(t: DateTime<Utc>) -> uuid::Uuid {
    let secs = u64::try_from(t.timestamp()).unwrap_or(0);
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, t.timestamp_subsec_nanos());
    uuid::Uuid::new_v7(ts)
}

pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    // The one sanctioned read of the wall clock (see the module docs).
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to. For tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(start)))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t += by;
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = ManualClock::new(start);
        assert_eq!(c.now(), start);
        c.advance(Duration::days(30));
        assert_eq!(c.now(), start + Duration::days(30));
    }

    #[test]
    fn uuid_v7_follows_the_clock() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = ManualClock::new(start);
        let a = c.new_uuid_v7();
        assert_eq!(a.get_version(), Some(uuid::Version::SortRand));
        let (secs, nanos) = a.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos), (1_767_225_600, 123_000_000), "carries now()");
        assert_ne!(
            a,
            c.new_uuid_v7(),
            "random bits differ within a millisecond"
        );
        c.advance(Duration::seconds(1));
        assert!(c.new_uuid_v7() > a, "later time sorts later");
        let before_epoch = DateTime::from_timestamp(-5, 0).unwrap();
        let (secs, _) = uuid_v7_at(before_epoch).get_timestamp().unwrap().to_unix();
        assert_eq!(secs, 0, "clamped to the epoch");
    }
}
