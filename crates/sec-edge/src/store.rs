//! The edge state every replica of the host shares: runtime rate-limit rules, runtime IP
//! rules and automatic blocks, in the host's database (auth-svc's, migration
//! `0003_edge.sql`), PostgreSQL or SQLite.
//!
//! Why a change counter: replicas poll one row (`edge_version`) every second or so and
//! reload everything only when it moved, which is one indexed read per poll and makes a
//! change on one replica apply on all within the poll interval. Every write bumps it in
//! the same transaction. Rule writes are compare-and-set on it: the caller validated the
//! whole set at version `v`, and the write succeeds only if the set is still at `v`
//! (else [`StoreError::Conflict`], ABORTED for the gRPC caller), so two concurrent
//! changes can never together produce a set neither validated.
//!
//! Both backends run the same SQL (`$n` placeholders work on both); [`on_db!`] writes
//! each method once for both pools.

use sec_common::storage::Db;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The state changed since the caller read it (another admin or replica won).
    #[error("the edge state changed concurrently; read it again and retry")]
    Conflict,
}

/// A stored runtime rate-limit rule: the rule's JSON (a `RuleConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRule {
    pub id: String,
    pub body: String,
    pub updated_at: i64,
}

/// A stored IP rule or automatic block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRuleRow {
    pub id: String,
    /// `allow` | `deny`
    pub action: String,
    /// Canonical network (`203.0.113.0/24`, `198.51.100.7/32`).
    pub network: String,
    /// `global` | `client:<id>` | `route:<path>`
    pub scope: String,
    /// `admin` | `auto_block:<reason>`
    pub reason: String,
    /// Unix µs; `None`: no expiry.
    pub expires_at: Option<i64>,
    pub created_at: i64,
}

impl IpRuleRow {
    pub fn is_auto_block(&self) -> bool {
        self.reason.starts_with("auto_block")
    }

    pub fn live_at(&self, now_us: i64) -> bool {
        self.expires_at.is_none_or(|e| e > now_us)
    }
}

/// Everything, as of `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub version: i64,
    pub rules: Vec<StoredRule>,
    pub ip_rules: Vec<IpRuleRow>,
}

/// Most runtime rate-limit rules and IP rules the store accepts.
pub const MAX_RUNTIME_RULES: usize = 1_000;
pub const MAX_IP_RULES: usize = 100_000;

macro_rules! on_db {
    ($db:expr, $p:ident => $body:block) => {
        match $db {
            Db::Postgres($p) => $body,
            Db::Sqlite($p) => $body,
        }
    };
}

type IpTuple = (String, String, String, String, String, Option<i64>, i64);

fn ip_row(t: IpTuple) -> IpRuleRow {
    IpRuleRow {
        id: t.0,
        action: t.1,
        network: t.2,
        scope: t.3,
        reason: t.4,
        expires_at: t.5,
        created_at: t.6,
    }
}

#[derive(Debug, Clone)]
pub struct EdgeStore {
    db: Db,
}

impl EdgeStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The change counter.
    pub async fn version(&self) -> Result<i64, StoreError> {
        on_db!(&self.db, p => {
            let (v,): (i64,) = sqlx::query_as("SELECT version FROM edge_version WHERE id = 1")
                .fetch_one(p)
                .await?;
            Ok(v)
        })
    }

    /// Everything, read in one transaction.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        on_db!(&self.db, p => {
            let mut tx = p.begin().await?;
            let (version,): (i64,) =
                sqlx::query_as("SELECT version FROM edge_version WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await?;
            let rules: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT id, body, updated_at FROM edge_ratelimit_rules ORDER BY id",
            )
            .fetch_all(&mut *tx)
            .await?;
            let ips: Vec<IpTuple> = sqlx::query_as(
                "SELECT id, action, network, scope, reason, expires_at, created_at \
                 FROM edge_ip_rules ORDER BY id",
            )
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Snapshot {
                version,
                rules: rules
                    .into_iter()
                    .map(|(id, body, updated_at)| StoredRule { id, body, updated_at })
                    .collect(),
                ip_rules: ips.into_iter().map(ip_row).collect(),
            })
        })
    }

    /// Creates or replaces a rule if the state is still at `expected_version`.
    pub async fn put_rule(
        &self,
        rule: &StoredRule,
        expected_version: i64,
    ) -> Result<i64, StoreError> {
        on_db!(&self.db, p => {
            let mut tx = p.begin().await?;
            let bumped = sqlx::query(
                "UPDATE edge_version SET version = version + 1 WHERE id = 1 AND version = $1",
            )
            .bind(expected_version)
            .execute(&mut *tx)
            .await?;
            if bumped.rows_affected() != 1 {
                return Err(StoreError::Conflict);
            }
            sqlx::query(
                "INSERT INTO edge_ratelimit_rules (id, body, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(&rule.id)
            .bind(&rule.body)
            .bind(rule.updated_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(expected_version + 1)
        })
    }

    /// Deletes a runtime rule if the state is still at `expected_version`; false if absent.
    pub async fn delete_rule(&self, id: &str, expected_version: i64) -> Result<bool, StoreError> {
        on_db!(&self.db, p => {
            let mut tx = p.begin().await?;
            let bumped = sqlx::query(
                "UPDATE edge_version SET version = version + 1 WHERE id = 1 AND version = $1",
            )
            .bind(expected_version)
            .execute(&mut *tx)
            .await?;
            if bumped.rows_affected() != 1 {
                return Err(StoreError::Conflict);
            }
            let n = sqlx::query("DELETE FROM edge_ratelimit_rules WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 0 {
                // Nothing changed: do not make every replica reload.
                tx.rollback().await?;
                return Ok(false);
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Creates or replaces an IP rule (by id) if the state is still at
    /// `expected_version`; `None` skips the check (automatic blocks, which only add a
    /// deny and cannot make the set invalid).
    pub async fn put_ip_rule(
        &self,
        row: &IpRuleRow,
        expected_version: Option<i64>,
    ) -> Result<(), StoreError> {
        on_db!(&self.db, p => {
            let mut tx = p.begin().await?;
            let bumped = match expected_version {
                Some(v) => sqlx::query(
                    "UPDATE edge_version SET version = version + 1 WHERE id = 1 AND version = $1",
                )
                .bind(v)
                .execute(&mut *tx)
                .await?,
                None => sqlx::query("UPDATE edge_version SET version = version + 1 WHERE id = 1")
                    .execute(&mut *tx)
                    .await?,
            };
            if bumped.rows_affected() != 1 {
                return Err(StoreError::Conflict);
            }
            sqlx::query(
                "INSERT INTO edge_ip_rules (id, action, network, scope, reason, expires_at, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (id) DO UPDATE SET action = excluded.action, network = excluded.network, \
                 scope = excluded.scope, reason = excluded.reason, expires_at = excluded.expires_at",
            )
            .bind(&row.id)
            .bind(&row.action)
            .bind(&row.network)
            .bind(&row.scope)
            .bind(&row.reason)
            .bind(row.expires_at)
            .bind(row.created_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Deletes IP rules by id; returns how many existed.
    pub async fn delete_ip_rules(&self, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        on_db!(&self.db, p => {
            let mut tx = p.begin().await?;
            let mut n = 0;
            for id in ids {
                n += sqlx::query("DELETE FROM edge_ip_rules WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            if n == 0 {
                tx.rollback().await?;
                return Ok(0);
            }
            sqlx::query("UPDATE edge_version SET version = version + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Removes rules and blocks that expired before `now_us` (housekeeping; expired rows
    /// are already ignored by every reader). Does not bump the counter.
    pub async fn purge_expired(&self, now_us: i64) -> Result<u64, StoreError> {
        on_db!(&self.db, p => {
            Ok(sqlx::query("DELETE FROM edge_ip_rules WHERE expires_at IS NOT NULL AND expires_at <= $1")
                .bind(now_us)
                .execute(p)
                .await?
                .rows_affected())
        })
    }
}
