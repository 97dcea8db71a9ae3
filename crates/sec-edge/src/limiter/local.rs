//! The in-process store: one governor GCRA limiter per rule, keyed by the hashed key.
//!
//! governor decides each key; all-or-nothing across the rules of one request comes from
//! the state store below: it journals every write governor makes during one check, and a
//! check refused by any enforcing rule restores the journal, so the rules that passed
//! are not consumed. Checks run one at a time (a mutex around the transaction; a check
//! is about a microsecond).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use sec_common::clock::SharedClock;

use super::{Item, KeyHash, StoreOutcome};
use crate::rules::{Rule, RuleSet};

/// governor's clock, read from the platform's injected [`sec_common::clock::Clock`]
/// (nanoseconds since the epoch), so tests move time with a `ManualClock`.
#[derive(Clone, Debug)]
pub struct GovernorClock(pub SharedClock);

impl governor::clock::Clock for GovernorClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let ns = self.0.now().timestamp_nanos_opt().unwrap_or(0);
        Nanos::from(u64::try_from(ns).unwrap_or(0))
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<KeyHash, Nanos>,
    journal: Vec<(KeyHash, Option<Nanos>)>,
    /// Sweep expired keys when the map reaches this size (then double it).
    sweep_at: usize,
}

/// A journaling state store shared between governor (which writes) and us (which
/// commits or rolls back).
#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Inner>>);

impl StateStore for Journal {
    type Key = KeyHash;

    fn measure_and_replace<T, F, E>(&self, key: &KeyHash, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let old = g.map.get(key).copied();
        let (out, new) = f(old)?;
        g.journal.push((*key, old));
        g.map.insert(*key, new);
        Ok(out)
    }
}

impl Journal {
    fn commit(&self, now_rel: Nanos) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        g.journal.clear();
        if g.map.len() >= g.sweep_at.max(4096) {
            // A key whose TAT has passed is at full capacity again: same as absent.
            g.map.retain(|_, tat| *tat > now_rel);
            g.sweep_at = (g.map.len() * 2).max(4096);
        }
    }

    fn rollback(&self) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((k, old)) = g.journal.pop() {
            match old {
                Some(v) => {
                    g.map.insert(k, v);
                }
                None => {
                    g.map.remove(&k);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }
}

type Gov = RateLimiter<KeyHash, Journal, GovernorClock, StateInformationMiddleware>;

struct RuleLimiter {
    limiter: Gov,
    state: Journal,
    /// governor measures from its creation; our sweep needs the same origin.
    start: Nanos,
    limit: crate::rules::LimitConfig,
}

pub struct LocalStore {
    clock: GovernorClock,
    /// By rule id; rebuilt (keeping the state of unchanged rules) on a rule swap.
    limiters: Mutex<Arc<HashMap<Arc<str>, Arc<RuleLimiter>>>>,
    txn: Mutex<()>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalStore")
    }
}

fn quota(rule: &Rule) -> Quota {
    let burst = NonZeroU32::new(rule.limit.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(rule.emission_interval())
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl LocalStore {
    pub fn new(clock: SharedClock, rules: &RuleSet) -> Self {
        let s = Self {
            clock: GovernorClock(clock),
            limiters: Mutex::new(Arc::new(HashMap::new())),
            txn: Mutex::new(()),
        };
        s.set_rules(rules);
        s
    }

    /// Installs limiters for `rules`; a rule whose id and limit are unchanged keeps its state.
    pub fn set_rules(&self, rules: &RuleSet) {
        let mut cur = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = HashMap::with_capacity(rules.rules.len());
        for r in &rules.rules {
            let keep = cur.get(&r.id).filter(|l| l.limit == r.limit).cloned();
            let l = keep.unwrap_or_else(|| {
                let state = Journal::default();
                let limiter = RateLimiter::new(quota(r), state.clone(), self.clock.clone());
                Arc::new(RuleLimiter {
                    limiter,
                    state,
                    start: self.clock.now(),
                    limit: r.limit,
                })
            });
            next.insert(r.id.clone(), l);
        }
        *cur = Arc::new(next);
    }

    /// Keys held for `rule_id` (tests and stats).
    pub fn key_count(&self, rule_id: &str) -> usize {
        let cur = self
            .limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        cur.get(rule_id).map_or(0, |l| l.state.len())
    }

    pub(crate) fn check(&self, rules: &RuleSet, items: &[Item]) -> Vec<StoreOutcome> {
        let limiters = self
            .limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let _txn = self.txn.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now();
        let mut out = Vec::with_capacity(items.len());
        let mut touched = Vec::with_capacity(items.len());
        let mut refused = false;
        for it in items {
            // Rules and limiters are swapped separately; a rule without a limiter yet
            // passes this once.
            let Some((rule, l)) = rules
                .rules
                .get(it.rule)
                .and_then(|r| Some((r, limiters.get(&r.id)?)))
            else {
                out.push(StoreOutcome::default());
                continue;
            };
            let t = rule.emission_interval();
            let burst = u64::from(rule.limit.burst);
            touched.push(l.clone());
            match l.limiter.check_key(&it.key) {
                Ok(snap) => {
                    let remaining = u64::from(snap.remaining_burst_capacity());
                    let used = u32::try_from(burst.saturating_sub(remaining)).unwrap_or(u32::MAX);
                    out.push(StoreOutcome {
                        allowed: true,
                        remaining,
                        reset: t.saturating_mul(used),
                        retry_after: Duration::ZERO,
                    });
                }
                Err(not_until) => {
                    if !rule.shadow {
                        refused = true;
                    }
                    let wait = not_until.wait_time_from(now);
                    let full = t.saturating_mul(u32::try_from(burst - 1).unwrap_or(u32::MAX));
                    out.push(StoreOutcome {
                        allowed: false,
                        remaining: 0,
                        reset: wait + full,
                        retry_after: wait,
                    });
                }
            }
        }
        for l in &touched {
            if refused {
                l.state.rollback();
            } else {
                l.state.commit(now.saturating_sub(l.start));
            }
        }
        if refused {
            // Nothing was consumed: a rule that passed still has this request's cell.
            for (o, it) in out.iter_mut().zip(items) {
                if o.allowed
                    && let Some(rule) = rules.rules.get(it.rule)
                {
                    o.remaining = (o.remaining + 1).min(u64::from(rule.limit.burst));
                }
            }
        }
        out
    }
}
