//! The in-process store (embedded default): the Redis store's semantics under one lock,
//! with time from the caller's `now` (the engine's injected clock), so expiry is
//! testable over simulated time. Sessions do not survive a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use super::{CreateOutcome, ImportOutcome, Lookup, Record, SessionStore, StoreError};
use crate::config::LimitPolicy;

#[derive(Default)]
struct State {
    sessions: HashMap<String, Record>,
    /// user -> hash -> expiry (the Redis sorted set).
    by_user: HashMap<String, BTreeMap<String, i64>>,
    writes: u64,
}

impl State {
    fn remove(&mut self, hash: &str) -> Option<Record> {
        let r = self.sessions.remove(hash)?;
        if let Some(idx) = self.by_user.get_mut(&r.user) {
            idx.remove(hash);
            if idx.is_empty() {
                self.by_user.remove(&r.user);
            }
        }
        Some(r)
    }

    fn lookup(&mut self, hash: &str, now: i64) -> Lookup {
        match self.sessions.get(hash) {
            None => Lookup::Missing,
            Some(r) if r.live(now) => Lookup::Live(r.clone()),
            Some(_) => {
                self.remove(hash);
                Lookup::Expired
            }
        }
    }

    fn insert(&mut self, hash: &str, r: Record) {
        self.by_user
            .entry(r.user.clone())
            .or_default()
            .insert(hash.to_owned(), r.expires);
        self.sessions.insert(hash.to_owned(), r);
    }

    /// Drops the user's expired sessions; the live ones, with their records.
    fn sweep_user(&mut self, user: &str, now: i64) -> Vec<(String, Record)> {
        let hashes: Vec<String> = self
            .by_user
            .get(user)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut live = Vec::new();
        for h in hashes {
            match self.lookup(&h, now) {
                Lookup::Live(r) => live.push((h, r)),
                _ => {
                    if let Some(idx) = self.by_user.get_mut(user) {
                        idx.remove(&h);
                    }
                }
            }
        }
        if self.by_user.get(user).is_some_and(BTreeMap::is_empty) {
            self.by_user.remove(user);
        }
        live.sort_by(|a, b| (a.1.created, &a.0).cmp(&(b.1.created, &b.0)));
        live
    }

    /// Now and then, drop every expired session so memory is bounded by live ones.
    fn maybe_sweep_all(&mut self, now: i64) {
        self.writes += 1;
        if !self.writes.is_multiple_of(1024) {
            return;
        }
        let dead: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, r)| !r.live(now))
            .map(|(h, _)| h.clone())
            .collect();
        for h in dead {
            self.remove(&h);
        }
    }
}

#[derive(Default)]
pub struct MemorySessionStore {
    state: Mutex<State>,
}

impl MemorySessionStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn create(
        &self,
        hash: &str,
        record: &Record,
        max_per_user: u32,
        policy: LimitPolicy,
        now: i64,
    ) -> Result<CreateOutcome, StoreError> {
        let mut s = self.state();
        s.maybe_sweep_all(now);
        let live = s.sweep_user(&record.user, now);
        let max = usize::try_from(max_per_user).unwrap_or(usize::MAX);
        let mut evicted = Vec::new();
        if live.len() >= max {
            if policy == LimitPolicy::Refuse {
                return Ok(CreateOutcome::LimitReached);
            }
            // `live` is oldest first.
            for (h, _) in live.iter().take(live.len() + 1 - max) {
                s.remove(h);
                evicted.push(h.clone());
            }
        }
        s.insert(hash, record.clone());
        Ok(CreateOutcome::Created { evicted })
    }

    async fn get(&self, hash: &str, now: i64) -> Result<Lookup, StoreError> {
        Ok(self.state().lookup(hash, now))
    }

    async fn touch(
        &self,
        hash: &str,
        now: i64,
        slide: bool,
        seen: Option<(&str, &str)>,
    ) -> Result<Lookup, StoreError> {
        let mut s = self.state();
        let Lookup::Live(mut r) = s.lookup(hash, now) else {
            return Ok(s.lookup(hash, now));
        };
        if slide {
            r.last_seen = now;
            r.expires = r.slid(now);
        }
        if let Some((ip, ua)) = seen {
            r.ip = ip.to_owned();
            r.user_agent = ua.to_owned();
        }
        s.insert(hash, r.clone());
        Ok(Lookup::Live(r))
    }

    async fn rotate(&self, old: &str, new: &str, now: i64) -> Result<Lookup, StoreError> {
        let mut s = self.state();
        match s.lookup(old, now) {
            Lookup::Live(r) => {
                s.remove(old);
                s.insert(new, r.clone());
                Ok(Lookup::Live(r))
            }
            other => Ok(other),
        }
    }

    async fn revoke(&self, hash: &str, now: i64) -> Result<Option<Record>, StoreError> {
        let mut s = self.state();
        let live = s.lookup(hash, now).live();
        s.remove(hash);
        Ok(live)
    }

    async fn revoke_user(&self, user: &str, _now: i64) -> Result<Vec<String>, StoreError> {
        let mut s = self.state();
        let hashes: Vec<String> = s
            .by_user
            .remove(user)
            .map(|m| m.into_keys().collect())
            .unwrap_or_default();
        for h in &hashes {
            s.sessions.remove(h);
        }
        Ok(hashes)
    }

    async fn list_user(&self, user: &str, now: i64) -> Result<Vec<(String, Record)>, StoreError> {
        Ok(self.state().sweep_user(user, now))
    }

    async fn scan(
        &self,
        cursor: u64,
        count: usize,
        now: i64,
    ) -> Result<(u64, Vec<(String, Record)>), StoreError> {
        // Cursor = how many (sorted) hashes were already returned.
        let s = self.state();
        let mut all: Vec<(&String, &Record)> =
            s.sessions.iter().filter(|(_, r)| r.live(now)).collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        let start = usize::try_from(cursor).unwrap_or(usize::MAX);
        let page: Vec<(String, Record)> = all
            .iter()
            .skip(start)
            .take(count.max(1))
            .map(|(h, r)| ((*h).clone(), (*r).clone()))
            .collect();
        let end = start.saturating_add(page.len());
        let next = if end >= all.len() {
            0
        } else {
            u64::try_from(end).unwrap_or(0)
        };
        Ok((next, page))
    }

    async fn import(
        &self,
        hash: &str,
        record: &Record,
        now: i64,
    ) -> Result<ImportOutcome, StoreError> {
        if !record.live(now) {
            return Ok(ImportOutcome::Expired);
        }
        let mut s = self.state();
        if let Lookup::Live(_) = s.lookup(hash, now) {
            return Ok(ImportOutcome::Exists);
        }
        s.insert(hash, record.clone());
        Ok(ImportOutcome::Imported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        let store = MemorySessionStore::new();
        super::super::contract::run(&store, "m", 1_767_225_600_000).await;
    }

    #[tokio::test]
    async fn memory_store_expires_over_simulated_time() {
        let store = MemorySessionStore::new();
        let now = std::sync::atomic::AtomicI64::new(1_767_225_600_000);
        // One unit = a minute of simulated time; nothing sleeps.
        super::super::contract::expiry(&store, "m", 60_000, |ms| {
            let t = now.fetch_add(ms, std::sync::atomic::Ordering::SeqCst) + ms;
            async move { t }
        })
        .await;
    }
}
