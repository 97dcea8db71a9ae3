//! Session storage: the [`SessionStore`] trait, its Redis and in-process implementations,
//! and the contract suite ([`contract`]) both must pass. The store only ever sees the
//! session id's hash (64 hex characters), never the id.
//!
//! Every operation takes `now` (ms since the epoch, from the engine's injected clock)
//! and treats a record whose `expires` is at or before it as absent, whatever Redis'
//! own TTL says: a stale session is never returned.

pub mod codec;
pub mod memory;
pub mod redis;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::LimitPolicy;

/// One stored session. The stored form ([`codec`]) uses the short names below; the
/// Redis scripts read and update some fields by them (`u`, `e`, `x`, `i`, `l`, `cr`,
/// `ip`, `ua`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "c")]
    pub client: String,
    /// Authentication time, ms.
    #[serde(rename = "at")]
    pub auth_time: i64,
    /// Space-separated `amr` values (a string, not an array: Lua cannot tell an empty
    /// array from an empty map).
    #[serde(rename = "m", default, skip_serializing_if = "String::is_empty")]
    pub amr: String,
    #[serde(rename = "r", default, skip_serializing_if = "String::is_empty")]
    pub acr: String,
    #[serde(rename = "cr")]
    pub created: i64,
    #[serde(rename = "l")]
    pub last_seen: i64,
    /// When the session ends unless touched: min(last_seen + idle, absolute).
    #[serde(rename = "e")]
    pub expires: i64,
    /// Absolute end, ms.
    #[serde(rename = "x")]
    pub absolute: i64,
    /// Idle timeout, ms (resolved per client at creation).
    #[serde(rename = "i")]
    pub idle_ms: i64,
    #[serde(rename = "ip", default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(rename = "ua", default, skip_serializing_if = "String::is_empty")]
    pub user_agent: String,
    #[serde(rename = "a", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Binding: bit 0 = IP prefix, bit 1 = user agent, bits 2.. = policy (0 record,
    /// 1 step-up, 2 deny).
    #[serde(rename = "b", default)]
    pub binding: u8,
}

impl Record {
    /// The stored form (MessagePack, see [`codec`]).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        codec::decode(bytes)
    }

    pub fn live(&self, now: i64) -> bool {
        self.expires > now && self.absolute > now
    }

    /// The expiry after activity at `now`: sliding idle, capped by the absolute end.
    pub fn slid(&self, now: i64) -> i64 {
        now.saturating_add(self.idle_ms).min(self.absolute)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("stored session unreadable: {0}")]
    Corrupt(String),
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // short-lived return value, boxing buys nothing
pub enum Lookup {
    Live(Record),
    /// It existed but had expired (now removed).
    Expired,
    Missing,
}

impl Lookup {
    pub fn live(self) -> Option<Record> {
        match self {
            Lookup::Live(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Stored; the hashes of sessions evicted to stay within the per-user limit.
    Created { evicted: Vec<String> },
    /// The user is at the limit and the policy is `refuse`.
    LimitReached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported,
    Expired,
    Exists,
}

/// Storage of sessions by id hash, with a per-user index whose cost is proportional to
/// that user's sessions. Every multi-key change is atomic.
#[async_trait]
pub trait SessionStore: Send + Sync {
    fn backend(&self) -> &'static str;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new session and indexes it under its user, applying the per-user limit
    /// atomically (parallel creates never exceed it).
    async fn create(
        &self,
        hash: &str,
        record: &Record,
        max_per_user: u32,
        policy: LimitPolicy,
        now: i64,
    ) -> Result<CreateOutcome, StoreError>;

    async fn get(&self, hash: &str, now: i64) -> Result<Lookup, StoreError>;

    /// Marks activity: with `slide`, last seen becomes `now` and the expiry slides
    /// (capped by the absolute end); `seen` replaces the recorded IP and user agent.
    async fn touch(
        &self,
        hash: &str,
        now: i64,
        slide: bool,
        seen: Option<(&str, &str)>,
    ) -> Result<Lookup, StoreError>;

    /// Moves a live session from `old` to `new` in one atomic step.
    async fn rotate(&self, old: &str, new: &str, now: i64) -> Result<Lookup, StoreError>;

    /// Removes a session; its record if it was live.
    async fn revoke(&self, hash: &str, now: i64) -> Result<Option<Record>, StoreError>;

    /// Removes every session of `user`; the hashes removed.
    async fn revoke_user(&self, user: &str, now: i64) -> Result<Vec<String>, StoreError>;

    /// The user's live sessions (expired index members are swept), oldest first.
    async fn list_user(&self, user: &str, now: i64) -> Result<Vec<(String, Record)>, StoreError>;

    /// One page of every live session, for export and statistics; start with cursor 0,
    /// done when the returned cursor is 0. Pages may repeat a session (Redis SCAN).
    async fn scan(
        &self,
        cursor: u64,
        count: usize,
        now: i64,
    ) -> Result<(u64, Vec<(String, Record)>), StoreError>;

    /// Stores an exported session unless it expired meanwhile or exists.
    async fn import(
        &self,
        hash: &str,
        record: &Record,
        now: i64,
    ) -> Result<ImportOutcome, StoreError>;
}

/// The contract every [`SessionStore`] meets. Each run uses users and hashes of its
/// own; `advance` moves the store's notion of time (the manual clock for memory, a
/// real sleep for Redis) and returns the new `now`.
#[cfg(test)]
pub mod contract {
    use super::*;

    pub fn hash(n: &str) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, n.as_bytes());
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn record(user: &str, now: i64, idle_ms: i64, abs_ms: i64) -> Record {
        Record {
            user: user.into(),
            client: "web".into(),
            auth_time: now,
            amr: "pwd otp".into(),
            acr: "aal2".into(),
            created: now,
            last_seen: now,
            expires: (now + idle_ms).min(now + abs_ms),
            absolute: now + abs_ms,
            idle_ms,
            ip: "192.0.2.1".into(),
            user_agent: "test-agent/1".into(),
            attributes: BTreeMap::from([("k".into(), "v".into())]),
            binding: 0,
        }
    }

    /// Basic life cycle, index, limits, rotation, revocation, scan and import.
    pub async fn run(store: &dyn SessionStore, ns: &str, now: i64) {
        let user = format!("{ns}-alice");
        let other = format!("{ns}-bob");
        let h1 = hash(&format!("{ns}1"));
        let r1 = record(&user, now, 60_000, 600_000);
        assert_eq!(store.get(&h1, now).await.unwrap(), Lookup::Missing);
        assert_eq!(
            store
                .create(&h1, &r1, 3, LimitPolicy::Refuse, now)
                .await
                .unwrap(),
            CreateOutcome::Created { evicted: vec![] }
        );
        assert_eq!(
            store.get(&h1, now).await.unwrap(),
            Lookup::Live(r1.clone()),
            "round trip keeps every field"
        );

        // Touch slides the idle expiry and records what it is told.
        let t = now + 1000;
        let touched = store
            .touch(&h1, t, true, Some(("198.51.100.7", "agent/2")))
            .await
            .unwrap()
            .live()
            .unwrap();
        assert_eq!(touched.last_seen, t);
        assert_eq!(touched.expires, t + 60_000);
        assert_eq!(touched.ip, "198.51.100.7");
        assert_eq!(touched.user_agent, "agent/2");
        assert_eq!(
            store.get(&h1, t).await.unwrap().live().unwrap(),
            touched,
            "touch is stored"
        );
        let not_slid = store
            .touch(&h1, t + 5, false, None)
            .await
            .unwrap()
            .live()
            .unwrap();
        assert_eq!(not_slid.expires, t + 60_000, "no slide without slide");

        // Per-user index and refuse policy.
        let h2 = hash(&format!("{ns}2"));
        let h3 = hash(&format!("{ns}3"));
        let h4 = hash(&format!("{ns}4"));
        for (h, at) in [(&h2, now + 10), (&h3, now + 20)] {
            let mut r = record(&user, at, 60_000, 600_000);
            r.created = at;
            store
                .create(h, &r, 3, LimitPolicy::Refuse, t)
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .create(
                    &h4,
                    &record(&user, t, 60_000, 600_000),
                    3,
                    LimitPolicy::Refuse,
                    t
                )
                .await
                .unwrap(),
            CreateOutcome::LimitReached
        );
        assert_eq!(store.get(&h4, t).await.unwrap(), Lookup::Missing);
        // Evict-oldest removes the earliest created (h1).
        assert_eq!(
            store
                .create(
                    &h4,
                    &record(&user, t, 60_000, 600_000),
                    3,
                    LimitPolicy::EvictOldest,
                    t
                )
                .await
                .unwrap(),
            CreateOutcome::Created {
                evicted: vec![h1.clone()]
            }
        );
        assert_eq!(store.get(&h1, t).await.unwrap(), Lookup::Missing);
        let listed: Vec<String> = store
            .list_user(&user, t)
            .await
            .unwrap()
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert_eq!(listed.len(), 3);
        for h in [&h2, &h3, &h4] {
            assert!(listed.contains(h), "{listed:?}");
        }
        assert!(store.list_user(&other, t).await.unwrap().is_empty());

        // Rotation: the old hash is gone, the new one has the same session.
        let h5 = hash(&format!("{ns}5"));
        let moved = store.rotate(&h2, &h5, t).await.unwrap().live().unwrap();
        assert_eq!(moved.user, user);
        assert_eq!(store.get(&h2, t).await.unwrap(), Lookup::Missing);
        assert_eq!(store.get(&h5, t).await.unwrap().live().unwrap(), moved);
        assert_eq!(
            store.rotate(&h2, &h5, t).await.unwrap(),
            Lookup::Missing,
            "the old id cannot rotate again"
        );
        let listed: Vec<String> = store
            .list_user(&user, t)
            .await
            .unwrap()
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert!(listed.contains(&h5) && !listed.contains(&h2), "re-indexed");

        // Revoke one, then all.
        assert_eq!(store.revoke(&h3, t).await.unwrap().unwrap().user, user);
        assert!(store.revoke(&h3, t).await.unwrap().is_none());
        assert_eq!(store.get(&h3, t).await.unwrap(), Lookup::Missing);
        let mut gone = store.revoke_user(&user, t).await.unwrap();
        gone.sort();
        let mut want = vec![h4.clone(), h5.clone()];
        want.sort();
        assert_eq!(gone, want);
        for h in [&h4, &h5] {
            assert_eq!(store.get(h, t).await.unwrap(), Lookup::Missing);
        }
        assert!(store.list_user(&user, t).await.unwrap().is_empty());

        // Scan sees live sessions; import skips existing and expired ones.
        let h6 = hash(&format!("{ns}6"));
        let r6 = record(&other, t, 60_000, 600_000);
        assert_eq!(
            store.import(&h6, &r6, t).await.unwrap(),
            ImportOutcome::Imported
        );
        assert_eq!(
            store.import(&h6, &r6, t).await.unwrap(),
            ImportOutcome::Exists
        );
        let h7 = hash(&format!("{ns}7"));
        let mut old = record(&other, t - 700_000, 60_000, 600_000);
        old.expires = t - 1;
        assert_eq!(
            store.import(&h7, &old, t).await.unwrap(),
            ImportOutcome::Expired
        );
        let mut seen = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, page) = store.scan(cursor, 100, t).await.unwrap();
            seen.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        assert!(seen.iter().any(|(h, r)| h == &h6 && r == &r6));
        assert!(!seen.iter().any(|(h, _)| h == &h7));
        assert_eq!(
            store.list_user(&other, t).await.unwrap(),
            vec![(h6.clone(), r6)],
            "an import is indexed"
        );
        store.revoke_user(&other, t).await.unwrap();
    }

    /// Expiry: idle, sliding, absolute cap, and sweeping of the index. `advance(ms)`
    /// moves time on by `ms` and returns the new now. Timeouts are `unit` ms multiples.
    pub async fn expiry<F, Fut>(store: &dyn SessionStore, ns: &str, unit: i64, advance: F)
    where
        F: Fn(i64) -> Fut,
        Fut: std::future::Future<Output = i64>,
    {
        let user = format!("{ns}-exp");
        let now = advance(0).await;
        let h = hash(&format!("{ns}e1"));
        // idle 4 units, absolute 6 units.
        let r = record(&user, now, 4 * unit, 6 * unit);
        store
            .create(&h, &r, 5, LimitPolicy::Refuse, now)
            .await
            .unwrap();
        let now = advance(3 * unit).await;
        assert!(
            store
                .touch(&h, now, true, None)
                .await
                .unwrap()
                .live()
                .is_some(),
            "alive before the idle timeout; the touch slides it"
        );
        let now = advance(2 * unit).await;
        assert!(
            store.get(&h, now).await.unwrap().live().is_some(),
            "5 units after creation: the touch kept it alive past the first idle expiry"
        );
        let now = advance(unit + unit / 2).await;
        assert!(
            store.get(&h, now).await.unwrap().live().is_none(),
            "the absolute lifetime caps the sliding expiry"
        );
        assert!(store.list_user(&user, now).await.unwrap().is_empty());
        // Idle expiry without touches; the index is swept and a new create fits.
        let h2 = hash(&format!("{ns}e2"));
        store
            .create(
                &h2,
                &record(&user, now, 2 * unit, 6 * unit),
                1,
                LimitPolicy::Refuse,
                now,
            )
            .await
            .unwrap();
        let now = advance(3 * unit).await;
        assert!(
            store
                .touch(&h2, now, true, None)
                .await
                .unwrap()
                .live()
                .is_none()
        );
        let h3 = hash(&format!("{ns}e3"));
        assert_eq!(
            store
                .create(
                    &h3,
                    &record(&user, now, 2 * unit, 6 * unit),
                    1,
                    LimitPolicy::Refuse,
                    now
                )
                .await
                .unwrap(),
            CreateOutcome::Created { evicted: vec![] },
            "an expired session does not count against the limit"
        );
        assert!(
            store
                .rotate(&h2, &hash("x"), now)
                .await
                .unwrap()
                .live()
                .is_none()
        );
        store.revoke_user(&user, now).await.unwrap();
    }
}
