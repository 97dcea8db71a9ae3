//! Storage bootstrap: the SQL pool a service owns (PostgreSQL schema `<prefix><service>`,
//! or a SQLite file `<data_dir>/<service>.db` on the embedded default) with its embedded
//! migrations run at start, and the key-value store (Redis, or the in-process store with
//! the same expiry semantics).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use deadpool_redis::redis;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, PgConnection};

use crate::clock::SharedClock;
use crate::config::Config;

/// A service's two migration sets, embedded with `sqlx::migrate!`.
#[derive(Debug)]
pub struct Migrations {
    pub postgres: &'static Migrator,
    pub sqlite: &'static Migrator,
}

/// The SQL pool of one service. Each service's storage trait has one implementation per
/// variant and one contract test suite over both.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    pub async fn ping(&self) -> Result<(), String> {
        let r = match self {
            Db::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.map(|_| ()),
            Db::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(|_| ()),
        };
        r.map_err(|e| format!("database: {e}"))
    }

    pub async fn close(&self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }
}

/// Connects `service`'s database and runs its migrations.
pub async fn connect_db(
    cfg: &Config,
    service: &str,
    migrations: &Migrations,
) -> anyhow::Result<Db> {
    match &cfg.storage.database_url {
        Some(url) => {
            let schema = format!("{}{}", cfg.storage.postgres_schema_prefix, service);
            let pool = connect_postgres(url.expose(), &schema, cfg.storage.max_connections).await?;
            // Already migrated (by the `migrate` init container, as the schema's owner):
            // nothing to run, so a service role without DDL rights (audit-svc's
            // `sec_audit_service`) can start. Anything missing or changed is run (and an
            // edited migration refused) as before.
            if !up_to_date(&pool, migrations.postgres).await? {
                migrations
                    .postgres
                    .run(&pool)
                    .await
                    .with_context(|| format!("running {service} migrations in schema {schema}"))?;
            }
            Ok(Db::Postgres(pool))
        }
        None => {
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
            let path = cfg.data_dir.join(format!("{service}.db"));
            let pool = connect_sqlite(&path, cfg.storage.max_connections).await?;
            migrations
                .sqlite
                .run(&pool)
                .await
                .with_context(|| format!("running {service} migrations in {}", path.display()))?;
            Ok(Db::Sqlite(pool))
        }
    }
}

/// Whether every migration of `migrator` is applied, with the same checksum.
async fn up_to_date(pool: &PgPool, migrator: &Migrator) -> anyhow::Result<bool> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(false);
    }
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    Ok(migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .all(|m| {
            applied
                .iter()
                .any(|(v, c)| *v == m.version && c.as_slice() == &*m.checksum)
        }))
}

/// What [`migrate_db`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub service: String,
    /// Where: `PostgreSQL schema "<schema>"` or `SQLite <path>`.
    pub target: String,
    /// Migrations this run applied, `(version, description)`, in order.
    pub applied: Vec<(i64, String)>,
    /// Migrations found already applied.
    pub already_applied: usize,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (s, t) = (&self.service, &self.target);
        for (v, d) in &self.applied {
            writeln!(f, "{s}: applied migration {v} {d}")?;
        }
        if self.applied.is_empty() {
            writeln!(
                f,
                "{s}: {t} is up to date ({} migrations already applied)",
                self.already_applied
            )
        } else {
            writeln!(
                f,
                "{s}: {t}: {} migrations applied now, {} before",
                self.applied.len(),
                self.already_applied
            )
        }
    }
}

/// Runs `service`'s migrations on the configured database and nothing else (the
/// `migrate` command): the same schema or file, the same migrations and the same lock
/// as [`connect_db`] at start, so running it again, or starting the service after it,
/// applies nothing new.
pub async fn migrate_db(
    cfg: &Config,
    service: &str,
    migrations: &Migrations,
) -> anyhow::Result<MigrationReport> {
    let (target, before, migrator) = match &cfg.storage.database_url {
        Some(url) => {
            let schema = format!("{}{}", cfg.storage.postgres_schema_prefix, service);
            let pool = connect_postgres(url.expose(), &schema, 1).await?;
            let before = applied_versions(&Db::Postgres(pool.clone())).await?;
            let run = migrations.postgres.run(&pool).await;
            pool.close().await;
            run.with_context(|| format!("running {service} migrations in schema {schema}"))?;
            (
                format!("PostgreSQL schema \"{schema}\""),
                before,
                migrations.postgres,
            )
        }
        None => {
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
            let path = cfg.data_dir.join(format!("{service}.db"));
            let pool = connect_sqlite(&path, 1).await?;
            let before = applied_versions(&Db::Sqlite(pool.clone())).await?;
            let run = migrations.sqlite.run(&pool).await;
            pool.close().await;
            run.with_context(|| format!("running {service} migrations in {}", path.display()))?;
            (
                format!("SQLite {}", path.display()),
                before,
                migrations.sqlite,
            )
        }
    };
    let mut applied = Vec::new();
    let mut already_applied = 0;
    for m in migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
    {
        if before.contains(&m.version) {
            already_applied += 1;
        } else {
            applied.push((m.version, m.description.to_string()));
        }
    }
    Ok(MigrationReport {
        service: service.to_owned(),
        target,
        applied,
        already_applied,
    })
}

/// Versions recorded as applied in sqlx's `_sqlx_migrations` table (none before the
/// first run, when the table does not exist yet).
async fn applied_versions(db: &Db) -> anyhow::Result<Vec<i64>> {
    const TABLE: &str = "_sqlx_migrations";
    let versions = match db {
        Db::Postgres(p) => {
            // `search_path` is the service's schema only.
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(TABLE)
                .fetch_one(p)
                .await?;
            if !exists {
                return Ok(Vec::new());
            }
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(p)
                .await?
        }
        Db::Sqlite(p) => {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            )
            .bind(TABLE)
            .fetch_one(p)
            .await?;
            if !exists {
                return Ok(Vec::new());
            }
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(p)
                .await?
        }
    };
    Ok(versions)
}

/// A pool whose connections all use `schema` (created if missing).
pub async fn connect_postgres(
    url: &str,
    schema: &str,
    max_connections: u32,
) -> anyhow::Result<PgPool> {
    anyhow::ensure!(
        !schema.is_empty()
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "invalid schema name"
    );
    // The URL is never put in an error: it may carry a password.
    let base = PgConnectOptions::from_str(url).context("parsing storage.database_url")?;
    let mut conn = PgConnection::connect_with(&base)
        .await
        .context("connecting to PostgreSQL")?;
    // An existing schema is not created again: a role without CREATE on the database
    // (a restricted service role) connects to the schema its owner made.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut conn)
            .await
            .context("looking up the schema")?;
    // Two services starting together can race on CREATE SCHEMA IF NOT EXISTS; a second try settles it.
    let ddl = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    // Safe: `schema` was checked above to be [a-z0-9_]+.
    if !exists
        && sqlx::query(sqlx::AssertSqlSafe(ddl.clone()))
            .execute(&mut conn)
            .await
            .is_err()
    {
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating schema {schema}"))?;
    }
    conn.close().await.ok();
    let opts = base.options([("search_path", schema)]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await
        .context("opening PostgreSQL pool")
}

/// A pool on the SQLite file at `path` (created if missing), in WAL mode with
/// `synchronous=FULL`.
///
/// FULL, not NORMAL: in WAL mode NORMAL skips the fsync at each commit, so a power cut can
/// lose transactions the service already acknowledged. For crypto-svc that is a committed
/// key rotation (data encrypted under the new version becomes undecryptable); for
/// audit-svc it is audit records. Every service gets FULL rather than a per-service knob:
/// the embedded default serves small installations, where one fsync per commit is cheap
/// and a silently lost write is not.
pub async fn connect_sqlite(
    path: &std::path::Path,
    max_connections: u32,
) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(opts)
        .await
        .with_context(|| format!("opening SQLite database {}", path.display()))
}

/// This installation's identity for a service: made on first start, then kept. Every
/// service's first migration creates the `service_instance` table it lives in, so a
/// restart that keeps its data reports the same id and first-start time. `now` comes
/// from the platform clock; the id is a v7 stamped with it.
pub async fn ensure_instance(
    db: &Db,
    now: DateTime<Utc>,
) -> anyhow::Result<(uuid::Uuid, DateTime<Utc>)> {
    let fresh = crate::clock::uuid_v7_at(now);
    match db {
        Db::Postgres(p) => {
            sqlx::query("INSERT INTO service_instance (id, created_at) SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM service_instance)")
                .bind(fresh)
                .bind(now)
                .execute(p)
                .await?;
            let row: (uuid::Uuid, DateTime<Utc>) = sqlx::query_as(
                "SELECT id, created_at FROM service_instance ORDER BY created_at LIMIT 1",
            )
            .fetch_one(p)
            .await?;
            Ok(row)
        }
        Db::Sqlite(p) => {
            sqlx::query("INSERT INTO service_instance (id, created_us) SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM service_instance)")
                .bind(fresh.to_string())
                .bind(now.timestamp_micros())
                .execute(p)
                .await?;
            let (id, us): (String, i64) = sqlx::query_as(
                "SELECT id, created_us FROM service_instance ORDER BY created_us LIMIT 1",
            )
            .fetch_one(p)
            .await?;
            let created = DateTime::from_timestamp_micros(us)
                .ok_or_else(|| anyhow::anyhow!("bad instance time"))?;
            Ok((uuid::Uuid::parse_str(&id)?, created))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key-value store unavailable: {0}")]
    Unavailable(String),
}

/// A Redis connection pool: one server (`redis://`, `rediss://`), or the primary that
/// Redis Sentinel names (`redis+sentinel://[:password@]host:port[,host:port...]/<master>[/<db>]`).
/// A Sentinel pool asks the sentinels for the current primary whenever it opens a
/// connection, so after a failover new connections go to the promoted replica (pooled
/// connections to the old primary fail their recycle ping and are dropped).
#[derive(Clone)]
pub enum RedisPool {
    Direct(deadpool_redis::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisPool::Direct(_) => "RedisPool::Direct",
            RedisPool::Sentinel(_) => "RedisPool::Sentinel",
        })
    }
}

/// A connection from a [`RedisPool`]; use it like any `redis` async connection.
pub enum RedisConn {
    Direct(deadpool_redis::Connection),
    Sentinel(deadpool_redis::sentinel::Connection),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Direct(c) => c.req_packed_command(cmd),
            RedisConn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Direct(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Direct(c) => c.get_db(),
            RedisConn::Sentinel(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// The underlying multiplexed connection: cheap to clone and shared by many tasks, so
    /// a hot path can keep one instead of taking (and ping-checking) a pooled one per call.
    pub fn multiplexed(&self) -> redis::aio::MultiplexedConnection {
        match self {
            RedisConn::Direct(c) => (**c).clone(),
            RedisConn::Sentinel(c) => (**c).clone(),
        }
    }
}

/// The pieces of a `redis+sentinel://` URL: sentinel addresses, master name, and the
/// password and database of the data nodes.
#[derive(Debug, PartialEq, Eq)]
struct SentinelUrl {
    sentinels: Vec<String>,
    master: String,
    password: Option<String>,
    db: i64,
}

/// Whether `url` is a well-formed `redis+sentinel://` URL (checked at configuration load).
pub(crate) fn sentinel_url_ok(url: &str) -> bool {
    parse_sentinel_url(url).is_some()
}

fn parse_sentinel_url(url: &str) -> Option<SentinelUrl> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    let master = parts.next().filter(|m| !m.is_empty())?.to_owned();
    let db = match parts.next() {
        Some(d) if !d.is_empty() => d.parse().ok()?,
        _ => 0,
    };
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    if hosts.is_empty() || sentinels.iter().any(|h| h == "redis://") {
        return None;
    }
    let password = auth
        .map(|a| a.split_once(':').map_or(a, |(_, p)| p).to_owned())
        .filter(|p| !p.is_empty());
    Some(SentinelUrl {
        sentinels,
        master,
        password,
        db,
    })
}

impl RedisPool {
    /// A pool for `url` (nothing is connected yet). Errors never contain the URL.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("redis+sentinel://") {
            let s = parse_sentinel_url(url).ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid Redis Sentinel URL: expected redis+sentinel://[:password@]host:port[,host:port]/<master>[/<db>]"
                )
            })?;
            let node = deadpool_redis::sentinel::SentinelNodeConnectionInfo {
                tls_mode: None,
                redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                    db: s.db,
                    password: s.password,
                    ..Default::default()
                }),
            };
            let pool = deadpool_redis::sentinel::Config::from_urls(
                s.sentinels,
                s.master,
                deadpool_redis::sentinel::SentinelServerType::Master,
            )
            .with_node_connection_info(Some(node))
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| {
                anyhow::anyhow!("invalid Redis Sentinel configuration: {}", redact(&e, url))
            })?;
            return Ok(RedisPool::Sentinel(pool));
        }
        let pool = deadpool_redis::Config::from_url(url)
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| anyhow::anyhow!("invalid storage.redis_url: {}", redact(&e, url)))?;
        Ok(RedisPool::Direct(pool))
    }

    /// A connection (the pool checks a reused one with PING first).
    pub async fn get(&self) -> Result<RedisConn, KvError> {
        match self {
            RedisPool::Direct(p) => p.get().await.map(RedisConn::Direct).map_err(redis_err),
            RedisPool::Sentinel(p) => p.get().await.map(RedisConn::Sentinel).map_err(redis_err),
        }
    }
}

fn redact(e: &dyn std::fmt::Display, url: &str) -> String {
    e.to_string().replace(url, "[redacted]")
}

/// Sessions, counters and denylists: Redis in production, in-process otherwise.
#[derive(Clone)]
pub enum Kv {
    Redis { pool: RedisPool, prefix: String },
    Memory(Arc<MemoryKv>),
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.backend())
    }
}

/// Connects the store `service` uses; keys are prefixed `<redis_key_prefix><service>:`.
pub async fn connect_kv(cfg: &Config, service: &str, clock: SharedClock) -> anyhow::Result<Kv> {
    match redis_for(cfg, service)? {
        Some((pool, prefix)) => {
            let kv = Kv::Redis { pool, prefix };
            kv.ping().await.context("connecting to Redis")?;
            Ok(kv)
        }
        None => Ok(Kv::Memory(Arc::new(MemoryKv::new(clock)))),
    }
}

/// The configured Redis (`storage.redis_url`, plain or Sentinel) as a pool, nothing
/// connected yet, with `service`'s key prefix `<redis_key_prefix><service>:`; `None` on
/// the embedded default. For a service whose own store talks Redis directly.
pub fn redis_for(cfg: &Config, service: &str) -> anyhow::Result<Option<(RedisPool, String)>> {
    let Some(url) = &cfg.storage.redis_url else {
        return Ok(None);
    };
    let pool = RedisPool::from_url(url.expose())?;
    Ok(Some((
        pool,
        format!("{}{service}:", cfg.storage.redis_key_prefix),
    )))
}

fn redis_err(e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(e.to_string())
}

impl Kv {
    pub fn backend(&self) -> &'static str {
        match self {
            Kv::Redis { .. } => "redis",
            Kv::Memory(_) => "memory",
        }
    }

    async fn conn(pool: &RedisPool) -> Result<RedisConn, KvError> {
        pool.get().await
    }

    pub async fn ping(&self) -> Result<(), KvError> {
        match self {
            Kv::Redis { pool, .. } => {
                let mut c = Self::conn(pool).await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .map(|_| ())
                    .map_err(redis_err)
            }
            Kv::Memory(_) => Ok(()),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self {
            Kv::Redis { pool, prefix } => {
                let mut c = Self::conn(pool).await?;
                redis::cmd("GET")
                    .arg(format!("{prefix}{key}"))
                    .query_async(&mut c)
                    .await
                    .map_err(redis_err)
            }
            Kv::Memory(m) => Ok(m.get(key)),
        }
    }

    /// Sets `key`; with `ttl` it disappears after that long.
    pub async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
        match self {
            Kv::Redis { pool, prefix } => {
                let mut c = Self::conn(pool).await?;
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!("{prefix}{key}")).arg(value);
                if let Some(ttl) = ttl {
                    cmd.arg("PX")
                        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
                }
                cmd.query_async::<()>(&mut c).await.map_err(redis_err)
            }
            Kv::Memory(m) => {
                m.set(key, value, ttl);
                Ok(())
            }
        }
    }

    /// Removes `key`; true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, KvError> {
        match self {
            Kv::Redis { pool, prefix } => {
                let mut c = Self::conn(pool).await?;
                let n: i64 = redis::cmd("DEL")
                    .arg(format!("{prefix}{key}"))
                    .query_async(&mut c)
                    .await
                    .map_err(redis_err)?;
                Ok(n > 0)
            }
            Kv::Memory(m) => Ok(m.delete(key)),
        }
    }
}

/// The in-process store. Expiry follows the injected clock, so tests can move time.
/// Value and optional expiry.
type Entry = (Vec<u8>, Option<DateTime<Utc>>);

pub struct MemoryKv {
    clock: SharedClock,
    map: Mutex<HashMap<String, Entry>>,
}

impl MemoryKv {
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self, exp: Option<DateTime<Utc>>) -> bool {
        exp.is_none_or(|e| e > self.clock.now())
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .filter(|(_, exp)| self.live(*exp))
            .map(|(v, _)| v.clone())
    }

    pub fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) {
        let exp = ttl.map(|t| {
            self.clock.now() + chrono::Duration::from_std(t).unwrap_or(chrono::Duration::MAX)
        });
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // Sweep expired entries now and then so memory is bounded by live keys.
        if map.len() % 1024 == 1023 {
            let now = self.clock.now();
            map.retain(|_, (_, e)| e.is_none_or(|e| e > now));
        }
        map.insert(key.to_owned(), (value.to_vec(), exp));
    }

    pub fn delete(&self, key: &str) -> bool {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(key).is_some_and(|(_, exp)| self.live(exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn sqlite_commits_are_durable_on_every_pooled_connection() {
        let dir = tempfile::tempdir().unwrap();
        let pool = connect_sqlite(&dir.path().join("t.db"), 3).await.unwrap();
        // Hold several connections at once so the pool has to open more than one.
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.acquire().await.unwrap());
        }
        for c in &mut conns {
            let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            assert_eq!(sync, 2, "synchronous=FULL");
            let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            assert_eq!(mode, "wal");
        }
    }

    #[tokio::test]
    async fn instance_identity_is_kept_and_stamped_with_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let pool = connect_sqlite(&dir.path().join("i.db"), 1).await.unwrap();
        sqlx::query(
            "CREATE TABLE service_instance (id TEXT PRIMARY KEY, created_us INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let db = Db::Sqlite(pool);
        let t0 = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let (id, created) = ensure_instance(&db, t0).await.unwrap();
        assert_eq!(created, t0);
        assert_eq!(id.get_timestamp().unwrap().to_unix(), (1_767_225_600, 0));
        let later = t0 + chrono::Duration::days(1);
        assert_eq!(
            ensure_instance(&db, later).await.unwrap(),
            (id, t0),
            "a restart keeps the first identity"
        );
    }

    #[test]
    fn memory_kv_expires_with_the_clock() {
        let clock = ManualClock::new(DateTime::from_timestamp(1_767_225_600, 0).unwrap());
        let kv = MemoryKv::new(clock.clone());
        kv.set("a", b"1", Some(Duration::from_secs(10)));
        kv.set("b", b"2", None);
        assert_eq!(kv.get("a").as_deref(), Some(&b"1"[..]));
        clock.advance(chrono::Duration::seconds(11));
        assert_eq!(kv.get("a"), None, "expired");
        assert!(!kv.delete("a"), "deleting an expired key reports it absent");
        assert_eq!(kv.get("b").as_deref(), Some(&b"2"[..]), "no ttl: kept");
    }

    /// The same contract, against both backends.
    async fn kv_contract(kv: Kv, ns: &str) {
        let k = |s: &str| format!("{ns}:{s}");
        assert_eq!(kv.get(&k("missing")).await.unwrap(), None);
        kv.set(&k("x"), b"hello", None).await.unwrap();
        assert_eq!(
            kv.get(&k("x")).await.unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        kv.set(&k("x"), b"again", None).await.unwrap();
        assert_eq!(
            kv.get(&k("x")).await.unwrap().as_deref(),
            Some(&b"again"[..]),
            "set overwrites"
        );
        assert!(kv.delete(&k("x")).await.unwrap());
        assert!(!kv.delete(&k("x")).await.unwrap());
        kv.set(&k("t"), b"short", Some(Duration::from_millis(150)))
            .await
            .unwrap();
        assert!(kv.get(&k("t")).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(kv.get(&k("t")).await.unwrap(), None, "ttl honoured");
    }

    #[tokio::test]
    async fn kv_contract_memory() {
        kv_contract(
            Kv::Memory(Arc::new(MemoryKv::new(crate::clock::system()))),
            "m",
        )
        .await;
    }

    #[tokio::test]
    async fn kv_contract_redis() {
        let Some(url) = sec_testkit::backend_url(sec_testkit::Backend::Redis) else {
            return;
        };
        let cfg = Config {
            storage: crate::config::StorageConfig {
                redis_url: Some(crate::config::Secret::new(url)),
                redis_key_prefix: format!("sectest:{}:", uuid::Uuid::new_v4().simple()),
                ..Default::default()
            },
            ..Default::default()
        };
        let kv = connect_kv(&cfg, "unit", crate::clock::system())
            .await
            .unwrap();
        assert_eq!(kv.backend(), "redis");
        kv_contract(kv, "r").await;
    }

    #[test]
    fn sentinel_urls_parse() {
        assert_eq!(
            parse_sentinel_url("redis+sentinel://:pw@h1:26379,h2:26380/mymaster/2"),
            Some(SentinelUrl {
                sentinels: vec!["redis://h1:26379".into(), "redis://h2:26380".into()],
                master: "mymaster".into(),
                password: Some("pw".into()),
                db: 2,
            })
        );
        assert_eq!(
            parse_sentinel_url("redis+sentinel://h1:26379/m"),
            Some(SentinelUrl {
                sentinels: vec!["redis://h1:26379".into()],
                master: "m".into(),
                password: None,
                db: 0,
            })
        );
        for bad in [
            "redis+sentinel://h1:26379",
            "redis+sentinel://h1:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://h1,,h2/m",
            "redis+sentinel://h1/m/notanumber",
        ] {
            assert_eq!(parse_sentinel_url(bad), None, "{bad}");
        }
        let err = RedisPool::from_url("redis+sentinel://:hunter2@h1/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn redis_url_password_never_in_errors() {
        let cfg = Config {
            storage: crate::config::StorageConfig {
                redis_url: Some(crate::config::Secret::new("redis://:hunter2@127.0.0.1:1/")),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            connect_kv(&cfg, "unit", crate::clock::system())
                .await
                .unwrap_err()
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}
