//! TokenStats: counts per client and per reason over a sliding window, in memory per
//! replica (one-minute buckets, at most 24 hours). Only client ids seen on issue are
//! tracked, at most `MAX_CLIENTS` of them; everything also counts in the total.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};

const MAX_CLIENTS: usize = 1024;
const MAX_BUCKETS: usize = 1440;
/// Number of InvalidReason values (the proto's closed set, UNSPECIFIED included).
pub const REASONS: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCounts {
    pub issued: u64,
    pub refreshed: u64,
    pub validated: u64,
    pub rejected: [u64; REASONS],
    pub reuse_detected: u64,
    pub revoked: u64,
    pub rotations: u64,
}

impl ClientCounts {
    fn add(&mut self, o: &ClientCounts) {
        self.issued += o.issued;
        self.refreshed += o.refreshed;
        self.validated += o.validated;
        for (a, b) in self.rejected.iter_mut().zip(o.rejected.iter()) {
            *a += b;
        }
        self.reuse_detected += o.reuse_detected;
        self.revoked += o.revoked;
        self.rotations += o.rotations;
    }
}

#[derive(Debug, Default)]
struct Bucket {
    minute: i64,
    clients: HashMap<String, ClientCounts>,
    total: ClientCounts,
}

#[derive(Debug, Default)]
struct Inner {
    buckets: VecDeque<Bucket>,
    known: HashSet<String>,
}

#[derive(Debug, Default)]
pub struct Stats(Mutex<Inner>);

#[derive(Debug, Clone, Default)]
pub struct StatsReport {
    pub window_seconds: i64,
    pub clients: Vec<(String, ClientCounts)>,
    pub total: ClientCounts,
    pub active_refresh_families: u64,
}

impl Stats {
    /// Counts in the bucket of `now`, for `client` when it is a known client.
    pub fn record(&self, now: DateTime<Utc>, client: Option<&str>, f: impl Fn(&mut ClientCounts)) {
        let mut i = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let minute = now.timestamp().div_euclid(60);
        let known = client.filter(|c| i.known.contains(*c)).map(str::to_owned);
        if i.buckets.back().is_none_or(|b| b.minute != minute) {
            i.buckets.push_back(Bucket {
                minute,
                ..Bucket::default()
            });
            while i.buckets.len() > MAX_BUCKETS {
                i.buckets.pop_front();
            }
        }
        if let Some(b) = i.buckets.back_mut() {
            f(&mut b.total);
            if let Some(c) = known {
                f(b.clients.entry(c).or_default());
            }
        }
    }

    /// An issue for `client` (validated by the engine): makes it a known client.
    pub fn record_issue(&self, now: DateTime<Utc>, client: &str) {
        {
            let mut i = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if i.known.len() < MAX_CLIENTS {
                i.known.insert(client.to_owned());
            }
        }
        self.record(now, Some(client), |c| c.issued += 1);
    }

    pub fn report(&self, now: DateTime<Utc>, window_seconds: i64, client: &str) -> StatsReport {
        let i = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let from = (now.timestamp() - window_seconds).div_euclid(60);
        let mut clients: HashMap<String, ClientCounts> = HashMap::new();
        let mut total = ClientCounts::default();
        for b in i.buckets.iter().filter(|b| b.minute > from) {
            total.add(&b.total);
            for (c, n) in &b.clients {
                if client.is_empty() || c == client {
                    clients.entry(c.clone()).or_default().add(n);
                }
            }
        }
        let mut clients: Vec<_> = clients.into_iter().collect();
        clients.sort_by(|a, b| a.0.cmp(&b.0));
        StatsReport {
            window_seconds,
            clients,
            total,
            active_refresh_families: 0,
        }
    }
}
