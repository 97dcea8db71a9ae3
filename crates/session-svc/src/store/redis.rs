//! The Redis store. Layout, under the prefix `<storage.redis_key_prefix>session:`:
//!
//! - `s:<SHA-256 of the id, 32 raw bytes>`: the encoded [`Record`], expiring (`PXAT`)
//!   at its `expires`;
//! - `u:<user id>`: a sorted set of the user's session hashes (32 raw bytes each) scored
//!   by expiry, expiring with its last member.
//!
//! Raw hashes rather than hex save 64 bytes per session (key and index member), which
//! keeps a session under the 600-byte memory target; the API's handles are the hex.
//!
//! Every change touching both is one Lua script (atomic on the server). Scripts compute
//! `s:`/`u:` key names from the prefix, which single-instance Redis (with replicas and
//! Sentinel) allows and Redis Cluster does not: Cluster is not supported.

use async_trait::async_trait;
use deadpool_redis::redis;
use deadpool_redis::redis::aio::MultiplexedConnection;
use sec_common::storage::RedisPool;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::{CreateOutcome, ImportOutcome, Lookup, Record, SessionStore, StoreError};
use crate::config::LimitPolicy;

/// Shared by the scripts: the index key expires with its last-expiring member.
const PRELUDE: &str = r#"
local function extend(idx)
  local top = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIREAT', idx, top[2]) end
end
local function expired(s, now)
  return s.e <= now or s.x <= now
end
"#;

/// KEYS: session, index. ARGV: prefix, hash, value, expires, now, max, policy.
const CREATE: &str = r#"
local P, h, now, max = ARGV[1], ARGV[2], tonumber(ARGV[5]), tonumber(ARGV[6])
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, m in ipairs(dead) do redis.call('DEL', P .. 's:' .. m) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
local n = redis.call('ZCARD', KEYS[2])
local out = {'ok'}
if n >= max then
  if ARGV[7] == 'refuse' then return {'limit'} end
  local items = {}
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local raw = redis.call('GET', P .. 's:' .. m)
    local cr = -1
    if raw then cr = cmsgpack.unpack(raw).cr end
    table.insert(items, {cr, m})
  end
  table.sort(items, function(a, b)
    if a[1] == b[1] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  for i = 1, n - max + 1 do
    local m = items[i][2]
    redis.call('DEL', P .. 's:' .. m)
    redis.call('ZREM', KEYS[2], m)
    if items[i][1] >= 0 then table.insert(out, m) end
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'PXAT', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], h)
extend(KEYS[2])
return out
"#;

/// KEYS: session. ARGV: prefix, hash, now, mode (get|touch), slide, set_seen, ip, ua.
const READ: &str = r#"
local raw = redis.call('GET', KEYS[1])
if not raw then return {'missing'} end
local s = cmsgpack.unpack(raw)
local now = tonumber(ARGV[3])
local idx = ARGV[1] .. 'u:' .. s.u
if expired(s, now) then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', idx, ARGV[2])
  return {'expired'}
end
if ARGV[4] == 'get' then return {'live', raw} end
if ARGV[5] == '1' then
  s.l = now
  s.e = math.min(now + s.i, s.x)
end
if ARGV[6] == '1' then
  s.ip = ARGV[7]
  s.ua = ARGV[8]
end
local out = cmsgpack.pack(s)
redis.call('SET', KEYS[1], out, 'PXAT', string.format('%d', s.e))
redis.call('ZADD', idx, s.e, ARGV[2])
extend(idx)
return {'live', out}
"#;

/// KEYS: old session, new session. ARGV: prefix, old hash, new hash, now.
const ROTATE: &str = r#"
local raw = redis.call('GET', KEYS[1])
if not raw then return {'missing'} end
local s = cmsgpack.unpack(raw)
local idx = ARGV[1] .. 'u:' .. s.u
redis.call('DEL', KEYS[1])
redis.call('ZREM', idx, ARGV[2])
if expired(s, tonumber(ARGV[4])) then return {'expired'} end
redis.call('SET', KEYS[2], raw, 'PXAT', string.format('%d', s.e))
redis.call('ZADD', idx, s.e, ARGV[3])
extend(idx)
return {'live', raw}
"#;

/// KEYS: session. ARGV: prefix, hash, now.
const REVOKE: &str = r#"
local raw = redis.call('GET', KEYS[1])
if not raw then return {'missing'} end
local s = cmsgpack.unpack(raw)
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. 'u:' .. s.u, ARGV[2])
if expired(s, tonumber(ARGV[3])) then return {'expired'} end
return {'live', raw}
"#;

/// KEYS: index. ARGV: prefix.
const REVOKE_USER: &str = r#"
local ms = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, m in ipairs(ms) do redis.call('DEL', ARGV[1] .. 's:' .. m) end
redis.call('DEL', KEYS[1])
return ms
"#;

/// KEYS: index. ARGV: prefix, now. Returns hash, record, hash, record...
const LIST: &str = r#"
local now = tonumber(ARGV[2])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(dead) do redis.call('DEL', ARGV[1] .. 's:' .. m) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local out = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local raw = redis.call('GET', ARGV[1] .. 's:' .. m)
  if raw then
    table.insert(out, m)
    table.insert(out, raw)
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
"#;

/// KEYS: session, index. ARGV: hash, value, expires, now.
const IMPORT: &str = r#"
if tonumber(ARGV[3]) <= tonumber(ARGV[4]) then return 'expired' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
extend(KEYS[2])
return 'imported'
"#;

/// A Lua script with its SHA-1, run with EVALSHA (EVAL when the server lacks it).
struct Script {
    body: String,
    sha: String,
}

impl Script {
    fn new(body: &str) -> Self {
        let body = format!("{PRELUDE}{body}");
        let d = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            body.as_bytes(),
        );
        let sha = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { body, sha }
    }
}

struct Scripts {
    create: Script,
    read: Script,
    rotate: Script,
    revoke: Script,
    revoke_user: Script,
    list: Script,
    import: Script,
}

pub struct RedisSessionStore {
    pool: RedisPool,
    /// One multiplexed connection shared by every call (a pooled one per call would cost
    /// a PING round trip each); dropped on any error, so the next call takes a fresh one
    /// from the pool (after a failover: from the new primary).
    shared: Mutex<Option<MultiplexedConnection>>,
    prefix: String,
    scripts: Scripts,
    /// `WAIT <replicas> <timeout>` after each write (0: no WAIT).
    wait_replicas: u32,
    wait_timeout_ms: u64,
    /// Bound on each call, so a dead Redis fails calls fast.
    timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// `prefix` with glob characters escaped, for SCAN MATCH.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The 32 raw bytes of a hex handle (the engine validated it; anything else is kept
/// as it is, so it simply matches nothing).
fn raw(hash: &str) -> Vec<u8> {
    let b = hash.as_bytes();
    if b.len() != 64 {
        return b.to_vec();
    }
    let mut out = Vec::with_capacity(32);
    for pair in b.chunks(2) {
        match std::str::from_utf8(pair)
            .ok()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
        {
            Some(v) => out.push(v),
            None => return b.to_vec(),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A script's `{'missing'|'expired'|'live', raw}` answer.
fn lookup_of(reply: Vec<Vec<u8>>) -> Result<Lookup, StoreError> {
    match reply.first().map(Vec::as_slice) {
        Some(b"live") => {
            let raw = reply
                .get(1)
                .ok_or_else(|| StoreError::Corrupt("script reply without record".into()))?;
            Ok(Lookup::Live(Record::decode(raw)?))
        }
        Some(b"expired") => Ok(Lookup::Expired),
        _ => Ok(Lookup::Missing),
    }
}

impl RedisSessionStore {
    /// A store on `pool`; keys start with `prefix` (e.g. `sec:session:`).
    pub fn new(pool: RedisPool, prefix: String) -> Self {
        Self {
            pool,
            shared: Mutex::new(None),
            prefix,
            scripts: Scripts {
                create: Script::new(CREATE),
                read: Script::new(READ),
                rotate: Script::new(ROTATE),
                revoke: Script::new(REVOKE),
                revoke_user: Script::new(REVOKE_USER),
                list: Script::new(LIST),
                import: Script::new(IMPORT),
            },
            wait_replicas: 0,
            wait_timeout_ms: 1000,
            timeout: Duration::from_secs(1),
        }
    }

    /// Acknowledge writes only once `replicas` replicas have them (`WAIT`).
    pub fn with_wait(mut self, replicas: u32, timeout_ms: u64) -> Self {
        self.wait_replicas = replicas;
        self.wait_timeout_ms = timeout_ms;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn skey(&self, hash: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 34);
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(b"s:");
        k.extend_from_slice(&raw(hash));
        k
    }

    fn ukey(&self, user: &str) -> Vec<u8> {
        format!("{}u:{user}", self.prefix).into_bytes()
    }

    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(c) = self.shared_slot().as_ref() {
            return Ok(c.clone());
        }
        let c = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(r) => r.map_err(unavailable)?.multiplexed(),
            Err(_) => return Err(StoreError::Unavailable("timed out connecting".into())),
        };
        *self.shared_slot() = Some(c.clone());
        Ok(c)
    }

    fn shared_slot(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a failure, the next call starts from the pool again.
    fn checked<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_err() {
            *self.shared_slot() = None;
        }
        r
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
        write: bool,
    ) -> Result<T, StoreError> {
        let run = async {
            let mut c = self.conn().await?;
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&script.sha).arg(keys.len()).arg(keys).arg(args);
            let r = match cmd.query_async::<T>(&mut c).await {
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(&script.body).arg(keys.len()).arg(keys).arg(args);
                    cmd.query_async::<T>(&mut c).await
                }
                other => other,
            }
            .map_err(unavailable)?;
            if write && self.wait_replicas > 0 {
                let acked: u64 = redis::cmd("WAIT")
                    .arg(self.wait_replicas)
                    .arg(self.wait_timeout_ms)
                    .query_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                if acked < u64::from(self.wait_replicas) {
                    // Written on the primary but not yet on enough replicas: a failover
                    // now could lose it, so the caller must not rely on it.
                    return Err(StoreError::Unavailable(format!(
                        "write reached {acked} of {} replicas",
                        self.wait_replicas
                    )));
                }
            }
            Ok(r)
        };
        let limit = self.timeout + Duration::from_millis(self.wait_timeout_ms * u64::from(write));
        self.checked(match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("timed out".into())),
        })
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let run = async {
            let mut c = self.conn().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
                .map_err(unavailable)
        };
        self.checked(
            tokio::time::timeout(self.timeout, run)
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("timed out".into()))),
        )
    }

    async fn create(
        &self,
        hash: &str,
        record: &Record,
        max_per_user: u32,
        policy: LimitPolicy,
        now: i64,
    ) -> Result<CreateOutcome, StoreError> {
        let (skey, ukey) = (self.skey(hash), self.ukey(&record.user));
        let value = record.encode();
        let (expires, now_s, max) = (
            record.expires.to_string(),
            now.to_string(),
            max_per_user.to_string(),
        );
        let policy = match policy {
            LimitPolicy::Refuse => "refuse",
            LimitPolicy::EvictOldest => "evict",
        };
        let hash_raw = raw(hash);
        let reply: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.create,
                &[&skey, &ukey],
                &[
                    self.prefix.as_bytes(),
                    &hash_raw,
                    &value,
                    expires.as_bytes(),
                    now_s.as_bytes(),
                    max.as_bytes(),
                    policy.as_bytes(),
                ],
                true,
            )
            .await?;
        match reply.split_first() {
            Some((s, evicted)) if s == b"ok" => Ok(CreateOutcome::Created {
                evicted: evicted.iter().map(|h| hex(h)).collect(),
            }),
            _ => Ok(CreateOutcome::LimitReached),
        }
    }

    async fn get(&self, hash: &str, now: i64) -> Result<Lookup, StoreError> {
        let now_s = now.to_string();
        let reply: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.read,
                &[&self.skey(hash)],
                &[self.prefix.as_bytes(), &raw(hash), now_s.as_bytes(), b"get"],
                false,
            )
            .await?;
        // The script checked expiry against `now`; check again after decoding so a
        // stale record is never returned, whatever the server did.
        match lookup_of(reply)? {
            Lookup::Live(r) if !r.live(now) => Ok(Lookup::Expired),
            other => Ok(other),
        }
    }

    async fn touch(
        &self,
        hash: &str,
        now: i64,
        slide: bool,
        seen: Option<(&str, &str)>,
    ) -> Result<Lookup, StoreError> {
        let now_s = now.to_string();
        let (ip, ua) = seen.unwrap_or(("", ""));
        let reply: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.read,
                &[&self.skey(hash)],
                &[
                    self.prefix.as_bytes(),
                    &raw(hash),
                    now_s.as_bytes(),
                    b"touch",
                    if slide { b"1" } else { b"0" },
                    if seen.is_some() { b"1" } else { b"0" },
                    ip.as_bytes(),
                    ua.as_bytes(),
                ],
                true,
            )
            .await?;
        match lookup_of(reply)? {
            Lookup::Live(r) if !r.live(now) => Ok(Lookup::Expired),
            other => Ok(other),
        }
    }

    async fn rotate(&self, old: &str, new: &str, now: i64) -> Result<Lookup, StoreError> {
        let now_s = now.to_string();
        let reply: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.rotate,
                &[&self.skey(old), &self.skey(new)],
                &[
                    self.prefix.as_bytes(),
                    &raw(old),
                    &raw(new),
                    now_s.as_bytes(),
                ],
                true,
            )
            .await?;
        lookup_of(reply)
    }

    async fn revoke(&self, hash: &str, now: i64) -> Result<Option<Record>, StoreError> {
        let now_s = now.to_string();
        let reply: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.revoke,
                &[&self.skey(hash)],
                &[self.prefix.as_bytes(), &raw(hash), now_s.as_bytes()],
                true,
            )
            .await?;
        Ok(lookup_of(reply)?.live())
    }

    async fn revoke_user(&self, user: &str, _now: i64) -> Result<Vec<String>, StoreError> {
        let gone: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.revoke_user,
                &[&self.ukey(user)],
                &[self.prefix.as_bytes()],
                true,
            )
            .await?;
        Ok(gone.iter().map(|h| hex(h)).collect())
    }

    async fn list_user(&self, user: &str, now: i64) -> Result<Vec<(String, Record)>, StoreError> {
        let now_s = now.to_string();
        let reply: Vec<Vec<u8>> = self
            .eval(
                &self.scripts.list,
                &[&self.ukey(user)],
                &[self.prefix.as_bytes(), now_s.as_bytes()],
                false,
            )
            .await?;
        let mut out = Vec::new();
        for pair in reply.chunks(2) {
            if let [h, raw] = pair {
                let r = Record::decode(raw)?;
                if r.live(now) {
                    out.push((hex(h), r));
                }
            }
        }
        out.sort_by(|a, b| (a.1.created, &a.0).cmp(&(b.1.created, &b.0)));
        Ok(out)
    }

    async fn scan(
        &self,
        cursor: u64,
        count: usize,
        now: i64,
    ) -> Result<(u64, Vec<(String, Record)>), StoreError> {
        let run = async {
            let mut c = self.conn().await?;
            let pattern = format!("{}s:*", glob_escape(&self.prefix));
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if keys.is_empty() {
                return Ok((next, Vec::new()));
            }
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            let skip = self.prefix.len() + 2;
            let mut page = Vec::new();
            for (k, v) in keys.iter().zip(values) {
                let (Some(v), Some(h)) = (v, k.get(skip..)) else {
                    continue;
                };
                let r = Record::decode(&v)?;
                if r.live(now) {
                    page.push((hex(h), r));
                }
            }
            Ok((next, page))
        };
        self.checked(
            tokio::time::timeout(self.timeout * 5, run)
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("timed out".into()))),
        )
    }

    async fn import(
        &self,
        hash: &str,
        record: &Record,
        now: i64,
    ) -> Result<ImportOutcome, StoreError> {
        let value = record.encode();
        let (expires, now_s) = (
            record.expires.min(record.absolute).to_string(),
            now.to_string(),
        );
        let reply: String = self
            .eval(
                &self.scripts.import,
                &[&self.skey(hash), &self.ukey(&record.user)],
                &[&raw(hash), &value, expires.as_bytes(), now_s.as_bytes()],
                true,
            )
            .await?;
        Ok(match reply.as_str() {
            "imported" => ImportOutcome::Imported,
            "exists" => ImportOutcome::Exists,
            _ => ImportOutcome::Expired,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract;

    fn store() -> Option<RedisSessionStore> {
        let url = sec_testkit::backend_url(sec_testkit::Backend::Redis)?;
        let pool = RedisPool::from_url(&url).unwrap();
        let prefix = format!("sectest:{}:session:", uuid::Uuid::new_v4().simple());
        Some(RedisSessionStore::new(pool, prefix))
    }

    fn wall_ms() -> i64 {
        sec_common::clock::system().now().timestamp_millis()
    }

    #[tokio::test]
    async fn redis_store_meets_the_contract() {
        let Some(store) = store() else { return };
        contract::run(&store, "r", wall_ms()).await;
    }

    #[tokio::test]
    async fn redis_store_expires_with_short_ttls() {
        let Some(store) = store() else { return };
        // One unit = 100 ms of real time: Redis' own TTLs are part of what is tested.
        contract::expiry(&store, "r", 100, |ms| async move {
            tokio::time::sleep(Duration::from_millis(u64::try_from(ms).unwrap_or(0))).await;
            wall_ms()
        })
        .await;
    }

    #[tokio::test]
    async fn the_script_reads_expiry_even_before_redis_removes_the_key() {
        let Some(store) = store() else { return };
        let now = wall_ms();
        let h = contract::hash("stale");
        let r = contract::record("stale-user", now, 60_000, 600_000);
        store
            .create(&h, &r, 5, LimitPolicy::Refuse, now)
            .await
            .unwrap();
        // Redis still holds the key for a minute; a `now` past its expiry must not see it.
        assert_eq!(store.get(&h, now + 60_001).await.unwrap(), Lookup::Expired);
        assert_eq!(
            store.get(&h, now).await.unwrap(),
            Lookup::Missing,
            "removed"
        );
    }

    #[tokio::test]
    async fn keys_hold_only_hashes() {
        let Some(store) = store() else { return };
        let now = wall_ms();
        let h = contract::hash("some-secret-id");
        store
            .create(
                &h,
                &contract::record("u1", now, 60_000, 600_000),
                5,
                LimitPolicy::Refuse,
                now,
            )
            .await
            .unwrap();
        let url = sec_testkit::backend_url(sec_testkit::Backend::Redis).unwrap();
        let mut c = RedisPool::from_url(&url).unwrap().get().await.unwrap();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg(format!("{}*", glob_escape(store.prefix())))
            .query_async(&mut c)
            .await
            .unwrap();
        let mut keys = keys;
        keys.sort();
        assert_eq!(
            keys,
            vec![store.skey(&h), store.ukey("u1")],
            "the session key is the hash of the id, nothing else"
        );
        store.revoke_user("u1", now).await.unwrap();
    }
}
