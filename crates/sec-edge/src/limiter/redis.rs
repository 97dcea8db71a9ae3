//! The shared store: one Lua script per check decides every matching rule of a request
//! in one round trip, atomically (Redis runs scripts one at a time), and commits the new
//! theoretical arrival times only if every enforcing rule passed.
//!
//! Time comes from the caller's injected clock (microseconds, `ARGV[1]`), so every
//! replica must run a synchronised clock; a skew of `d` lets the fast replica admit about
//! `d / emission_interval` extra requests per key.
//!
//! In front of it, a small local tier remembers keys that Redis refused with a long
//! retry-after and refuses them locally until then, without a round trip.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::redis;

use super::{Item, StoreOutcome};
use crate::rules::RuleSet;

/// KEYS: one per rule. ARGV[1]: now (µs); then per key: emission interval (µs),
/// burst, enforce (1) or shadow (0). Returns per key {allowed, remaining, reset µs,
/// retry-after µs}.
const GCRA_LUA: &str = r#"
local now = tonumber(ARGV[1])
local n = #KEYS
local res = {}
local news = {}
local ok = true
for i = 1, n do
  local t = tonumber(ARGV[3 * i - 1])
  local cap = tonumber(ARGV[3 * i])
  local enforce = ARGV[3 * i + 1] == '1'
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) or now
  if tat < now then tat = now end
  local new = tat + t
  local allow_at = new - cap * t
  if allow_at <= now then
    news[i] = new
    res[i] = {1, math.floor((now + cap * t - new) / t), new - now, 0, tat}
  else
    news[i] = false
    if enforce then ok = false end
    res[i] = {0, 0, tat - now, allow_at - now, tat}
  end
end
for i = 1, n do
  if ok and news[i] then
    redis.call('SET', KEYS[i], string.format('%d', news[i]), 'PX',
      math.max(1, math.ceil((news[i] - now) / 1000)))
  elseif res[i][1] == 1 then
    -- passed, but another rule refused the request: nothing was consumed
    local cap = tonumber(ARGV[3 * i])
    res[i][2] = math.min(cap, res[i][2] + 1)
    res[i][3] = res[i][5] - now
  end
  res[i][5] = nil
end
return res
"#;

/// Most keys remembered by the local tier.
const LOCAL_TIER_MAX: usize = 100_000;

pub struct RedisStore {
    pool: sec_common::storage::RedisPool,
    /// `<redis_key_prefix>edge:` (or a test's unique prefix).
    prefix: String,
    script: redis::Script,
    timeout: Duration,
    /// Redis refusals with a retry-after above this are remembered locally.
    local_tier_min: Duration,
    /// Full Redis key → refused until (µs since the epoch).
    local_tier: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate-limit store unavailable: {0}")]
pub struct StoreError(pub String);

/// The outcome of a check against Redis.
pub(crate) enum RedisCheck {
    /// Refused by the local tier: no round trip. The index of the item that refused.
    Local(usize, Duration),
    Remote(Vec<StoreOutcome>),
}

impl RedisStore {
    /// `prefix` must end the caller's namespace (e.g. `sec:edge:`); keys are
    /// `<prefix>rl:<rule id>:<hex hash of the key parts>`.
    pub fn new(
        pool: sec_common::storage::RedisPool,
        prefix: String,
        timeout: Duration,
        local_tier_min: Duration,
    ) -> Self {
        Self {
            pool,
            prefix,
            script: redis::Script::new(GCRA_LUA),
            timeout,
            local_tier_min,
            local_tier: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, rules: &RuleSet, it: &Item) -> String {
        let id = rules.rules.get(it.rule).map_or("", |r| &r.id);
        let mut k = String::with_capacity(self.prefix.len() + id.len() + 36);
        k.push_str(&self.prefix);
        k.push_str("rl:");
        k.push_str(id);
        k.push(':');
        for b in it.key {
            k.push_str(&format!("{b:02x}"));
        }
        k
    }

    pub(crate) async fn check(
        &self,
        rules: &RuleSet,
        items: &[Item],
        now_us: i64,
    ) -> Result<RedisCheck, StoreError> {
        let keys: Vec<String> = items.iter().map(|it| self.key(rules, it)).collect();
        {
            let tier = self
                .local_tier
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !tier.is_empty() {
                for (i, (k, it)) in keys.iter().zip(items).enumerate() {
                    let enforce = rules.rules.get(it.rule).is_some_and(|r| !r.shadow);
                    if let Some(until) = tier.get(k)
                        && *until > now_us
                        && enforce
                    {
                        let wait = u64::try_from(until - now_us).unwrap_or(0);
                        return Ok(RedisCheck::Local(i, Duration::from_micros(wait)));
                    }
                }
            }
        }
        let mut inv = self.script.prepare_invoke();
        inv.arg(now_us);
        for (k, it) in keys.iter().zip(items) {
            let (t, burst, enforce) = match rules.rules.get(it.rule) {
                Some(r) => (
                    i64::try_from(r.emission_interval().as_micros()).unwrap_or(i64::MAX),
                    i64::from(r.limit.burst),
                    i64::from(!r.shadow),
                ),
                None => (1, 1, 0),
            };
            inv.key(k).arg(t).arg(burst).arg(enforce);
        }
        let call = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| StoreError(e.to_string()))?;
            inv.invoke_async::<Vec<Vec<i64>>>(&mut conn)
                .await
                .map_err(|e| StoreError(e.to_string()))
        };
        let rows = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError(format!("no answer within {:?}", self.timeout)))??;
        if rows.len() != items.len() {
            return Err(StoreError("script returned a malformed result".into()));
        }
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        let mut out = Vec::with_capacity(rows.len());
        let mut remember = Vec::new();
        for (row, k) in rows.iter().zip(&keys) {
            let [allowed, remaining, reset, retry] = row.as_slice() else {
                return Err(StoreError("script returned a malformed row".into()));
            };
            let o = StoreOutcome {
                allowed: *allowed == 1,
                remaining: u64::try_from(*remaining).unwrap_or(0),
                reset: us(*reset),
                retry_after: us(*retry),
            };
            if !o.allowed && o.retry_after > self.local_tier_min {
                remember.push((k.clone(), now_us.saturating_add(*retry)));
            }
            out.push(o);
        }
        if !remember.is_empty() {
            let mut tier = self
                .local_tier
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if tier.len() + remember.len() > LOCAL_TIER_MAX {
                tier.retain(|_, until| *until > now_us);
            }
            for (k, until) in remember {
                if tier.len() < LOCAL_TIER_MAX {
                    tier.insert(k, until);
                }
            }
        }
        Ok(RedisCheck::Remote(out))
    }
}
