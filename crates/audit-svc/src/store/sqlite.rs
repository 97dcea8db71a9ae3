//! SQLite event store (the embedded default). A batch is one transaction.

use async_trait::async_trait;
use sec_common::clock::SharedClock;
use sec_common::events::SecurityEvent;
use sqlx::SqlitePool;

use super::{
    ChainStore, Cursor, Cutoffs, EventQuery, EventStore, LegalHold, Outside, Release,
    RetentionPlan, RetentionStore, Row, StoreError, TypeMatch, chain_batch, cursor_after, from_row,
    like_prefix, seq_i64, seq_u64, to_hash, to_row,
};
use crate::chain::{Chained, Checkpoint, Head, PRUNE_RETENTION, Prune, PruneRun};

#[derive(Debug, Clone)]
pub struct SqliteEventStore {
    pool: SqlitePool,
    /// Stamps `received_us`, so receipt times follow the platform clock (and tests).
    clock: SharedClock,
}

impl SqliteEventStore {
    pub fn new(pool: SqlitePool, clock: SharedClock) -> Self {
        Self { pool, clock }
    }
}

/// The columns of [`SqlRow`], in order.
const COLUMNS: &str = "id, event_type, ts_us, service, user_id, actor_kind, actor_id, subject,
    ip_address, outcome, severity, details, trace_id, received_us";

type SqlRow = (
    String,
    String,
    i64,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    i64,
);

fn row_of(r: SqlRow) -> Result<Row, StoreError> {
    let id = uuid::Uuid::parse_str(&r.0).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let user_id = r.4.as_deref().and_then(|u| uuid::Uuid::parse_str(u).ok());
    Ok(Row {
        id,
        event_type: r.1,
        time_us: r.2,
        service: r.3,
        user_id,
        actor_kind: r.5,
        actor_id: r.6,
        subject: r.7,
        ip_address: r.8,
        outcome: r.9,
        severity: r.10,
        details: r.11,
        trace_id: r.12,
        received_us: r.13,
    })
}

type CheckpointRow = (i64, Vec<u8>, i64, String, String, i64, String);

fn checkpoint_of(r: CheckpointRow) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        seq: seq_u64(r.0)?,
        head_hash: to_hash(&r.1)?,
        time_us: r.2,
        origin: r.3,
        key_name: r.4,
        key_version: u32::try_from(r.5).map_err(|_| StoreError::Corrupt("key version".into()))?,
        signature: r.6,
    })
}

/// The `ip_bytes` column of a stored address.
fn ip_column(ip: Option<&str>) -> Option<Vec<u8>> {
    ip.and_then(|s| s.parse().ok())
        .map(|ip| super::ip_bytes(ip).to_vec())
}

/// A write transaction that holds SQLite's write lock from its first statement: the
/// chain head read inside it cannot change before the commit.
async fn begin_write(
    pool: &SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}

async fn read_head(conn: &mut sqlx::SqliteConnection) -> Result<Head, StoreError> {
    Ok(read_head_received(conn).await?.0)
}

/// The head, with the newest receipt time stored.
async fn read_head_received(
    conn: &mut sqlx::SqliteConnection,
) -> Result<(Head, Option<i64>), StoreError> {
    let (seq, hash, received): (i64, Vec<u8>, Option<i64>) =
        sqlx::query_as("SELECT seq, hash, received_us FROM audit_chain_head WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    Ok((
        Head {
            seq: seq_u64(seq)?,
            hash: to_hash(&hash)?,
        },
        received,
    ))
}

async fn set_head(
    conn: &mut sqlx::SqliteConnection,
    head: Head,
    received_us: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE audit_chain_head SET seq = ?1, hash = ?2,
           received_us = max(coalesce(received_us, ?3), coalesce(?3, received_us)) WHERE id = 1",
    )
    .bind(seq_i64(head.seq))
    .bind(head.hash.to_vec())
    .bind(received_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let rows = events
            .iter()
            .map(|e| to_row(e, 0))
            .collect::<Result<Vec<Row>, _>>()?;
        let mut tx = begin_write(&self.pool).await?;
        let (head, last_received) = read_head_received(&mut tx).await?;
        // Receipt times never go back along the chain (see the PostgreSQL store).
        let received = super::monotone_received(self.clock.now().timestamp_micros(), last_received);
        let rows: Vec<Row> = rows
            .into_iter()
            .map(|r| Row {
                received_us: received,
                ..r
            })
            .collect();
        let mut stored = std::collections::HashSet::new();
        // Which ids are stored already (redeliveries), 500 per statement.
        for chunk in rows.chunks(500) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT id FROM security_events WHERE id IN (",
            );
            let mut list = q.separated(", ");
            for r in chunk {
                list.push_bind(r.id.to_string());
            }
            q.push(")");
            let found: Vec<(String,)> = q.build_query_as().fetch_all(&mut *tx).await?;
            for (id,) in found {
                if let Ok(id) = uuid::Uuid::parse_str(&id) {
                    stored.insert(id);
                }
            }
        }
        let (new, head) = chain_batch(head, rows, &stored)?;
        if new.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        // Multi-row statements: one hop to SQLite's worker thread per 64 events instead
        // of one per event (16 parameters each, far below SQLite's 32,766).
        for chunk in new.chunks(64) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO security_events
                   (id, event_type, ts_us, service, user_id, actor_kind, actor_id, subject,
                    ip_address, outcome, severity, details, trace_id, received_us, seq, hash,
                    ip_bytes) ",
            );
            q.push_values(chunk, |mut b, (seq, hash, r)| {
                b.push_bind(r.id.to_string())
                    .push_bind(r.event_type.clone())
                    .push_bind(r.time_us)
                    .push_bind(r.service.clone())
                    .push_bind(r.user_id.map(|u| u.to_string()))
                    .push_bind(r.actor_kind.clone())
                    .push_bind(r.actor_id.clone())
                    .push_bind(r.subject.clone())
                    .push_bind(r.ip_address.clone())
                    .push_bind(r.outcome.clone())
                    .push_bind(r.severity.clone())
                    .push_bind(r.details.clone())
                    .push_bind(r.trace_id.clone())
                    .push_bind(r.received_us)
                    .push_bind(seq_i64(*seq))
                    .push_bind(hash.to_vec())
                    .push_bind(ip_column(r.ip_address.as_deref()));
            });
            q.build().execute(&mut *tx).await?;
        }
        set_head(&mut tx, head, Some(received)).await?;
        tx.commit().await?;
        Ok(new.len() as u64)
    }

    async fn list(
        &self,
        q: &EventQuery,
    ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError> {
        let limit = i64::from(q.limit.max(1));
        let mut b = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "SELECT {COLUMNS} FROM security_events WHERE 1"
        ));
        if let Some(t) = &q.event_type {
            b.push(" AND event_type = ").push_bind(t.clone());
        }
        if let Some(p) = &q.type_prefix {
            b.push(" AND event_type LIKE ")
                .push_bind(like_prefix(p))
                .push(r" ESCAPE '\'");
        }
        if !q.types.is_empty() {
            b.push(" AND (");
            for (i, t) in q.types.iter().enumerate() {
                if i > 0 {
                    b.push(" OR ");
                }
                match t {
                    TypeMatch::Exact(t) => b.push("event_type = ").push_bind(t.clone()),
                    TypeMatch::Prefix(p) => b
                        .push("event_type LIKE ")
                        .push_bind(like_prefix(p))
                        .push(r" ESCAPE '\'"),
                };
            }
            b.push(")");
        }
        if let Some(t) = q.since_us {
            b.push(" AND ts_us >= ").push_bind(t);
        }
        if let Some(t) = q.until_us {
            b.push(" AND ts_us < ").push_bind(t);
        }
        for (col, v) in [
            ("actor_id", &q.actor_id),
            ("subject", &q.subject),
            ("service", &q.service),
        ] {
            if let Some(v) = v {
                b.push(format!(" AND {col} = ")).push_bind(v.clone());
            }
        }
        if !q.ids.is_empty() {
            b.push(" AND id IN (");
            let mut list = b.separated(", ");
            for id in &q.ids {
                list.push_bind(id.to_string());
            }
            b.push(")");
        }
        if let Some(net) = &q.ip {
            let (lo, hi) = super::ip_range(net);
            b.push(" AND ip_bytes BETWEEN ")
                .push_bind(lo.to_vec())
                .push(" AND ")
                .push_bind(hi.to_vec());
        }
        for (col, values) in [("severity", &q.severities), ("outcome", &q.outcomes)] {
            if !values.is_empty() {
                b.push(format!(" AND {col} IN ("));
                let mut list = b.separated(", ");
                for v in values {
                    list.push_bind(v.clone());
                }
                b.push(")");
            }
        }
        for (k, values) in &q.details {
            // Keys are validated to `[A-Za-z0-9_.-]`: quoting them makes a literal key.
            b.push(" AND json_extract(details, ")
                .push_bind(format!("$.\"{k}\""))
                .push(") IN (");
            let mut list = b.separated(", ");
            for v in values {
                list.push_bind(v.clone());
            }
            b.push(")");
        }
        let (cmp, dir) = if q.oldest_first {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        if let Some(c) = q.after {
            b.push(format!(" AND (ts_us, id) {cmp} ("))
                .push_bind(c.time_us)
                .push(", ")
                .push_bind(c.id.to_string())
                .push(")");
        }
        b.push(format!(" ORDER BY ts_us {dir}, id {dir} LIMIT "))
            .push_bind(limit + 1);
        let rows: Vec<SqlRow> = b.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() as i64 > limit;
        let events = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| from_row(row_of(r)?))
            .collect::<Result<Vec<_>, _>>()?;
        let cursor = cursor_after(more, &events);
        Ok((events, cursor))
    }
}

#[async_trait]
impl ChainStore for SqliteEventStore {
    async fn head(&self) -> Result<Head, StoreError> {
        let mut conn = self.pool.acquire().await?;
        read_head(&mut conn).await
    }

    async fn chained(&self, from: u64, to: u64, limit: u32) -> Result<Vec<Chained>, StoreError> {
        let q = format!(
            "SELECT seq, hash, {COLUMNS} FROM security_events
             WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(seq_i64(from))
            .bind(seq_i64(to))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| {
                use sqlx::Row as _;
                let seq: i64 = r.try_get(0)?;
                let hash: Option<Vec<u8>> = r.try_get(1)?;
                let row = row_of((
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                    r.try_get(7)?,
                    r.try_get(8)?,
                    r.try_get(9)?,
                    r.try_get(10)?,
                    r.try_get(11)?,
                    r.try_get(12)?,
                    r.try_get(13)?,
                    r.try_get(14)?,
                    r.try_get(15)?,
                ))?;
                Ok(Chained {
                    seq: seq_u64(seq)?,
                    hash: hash.unwrap_or_default(),
                    row,
                })
            })
            .collect()
    }

    async fn outside_chain(&self, head_seq: u64) -> Result<Option<Outside>, StoreError> {
        let unpositioned: Option<(String,)> =
            sqlx::query_as("SELECT id FROM security_events WHERE seq IS NULL LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        if let Some((id,)) = unpositioned {
            let id = uuid::Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            return Ok(Some(Outside::Unpositioned(id)));
        }
        let beyond: Option<(i64,)> =
            sqlx::query_as("SELECT seq FROM security_events WHERE seq > ?1 ORDER BY seq LIMIT 1")
                .bind(seq_i64(head_seq))
                .fetch_optional(&self.pool)
                .await?;
        beyond
            .map(|(s,)| Ok(Outside::BeyondHead(seq_u64(s)?)))
            .transpose()
    }

    async fn chain_legacy_rows(&self) -> Result<u64, StoreError> {
        let mut tx = begin_write(&self.pool).await?;
        let (done,): (bool,) =
            sqlx::query_as("SELECT legacy_chained FROM audit_chain_head WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        if done {
            return Ok(0);
        }
        let head = read_head(&mut tx).await?;
        let rows: Vec<SqlRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM security_events WHERE seq IS NULL ORDER BY received_us, id"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let rows = rows
            .into_iter()
            .map(row_of)
            .collect::<Result<Vec<_>, _>>()?;
        let (new, head) = chain_batch(head, rows, &Default::default())?;
        for (seq, hash, r) in &new {
            sqlx::query(
                "UPDATE security_events SET seq = ?1, hash = ?2, ip_bytes = ?4 WHERE id = ?3",
            )
            .bind(seq_i64(*seq))
            .bind(hash.to_vec())
            .bind(r.id.to_string())
            .bind(ip_column(r.ip_address.as_deref()))
            .execute(&mut *tx)
            .await?;
        }
        let newest = new.iter().map(|(_, _, r)| r.received_us).max();
        set_head(&mut tx, head, newest).await?;
        sqlx::query("UPDATE audit_chain_head SET legacy_chained = 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(new.len() as u64)
    }

    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR IGNORE INTO audit_checkpoints
               (seq, head_hash, created_us, origin, key_name, key_version, signature)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(seq_i64(c.seq))
        .bind(c.head_hash.to_vec())
        .bind(c.time_us)
        .bind(&c.origin)
        .bind(&c.key_name)
        .bind(i64::from(c.key_version))
        .bind(&c.signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn checkpoint_at_or_before(&self, seq: u64) -> Result<Option<Checkpoint>, StoreError> {
        let r: Option<CheckpointRow> = sqlx::query_as(
            "SELECT seq, head_hash, created_us, origin, key_name, key_version, signature
             FROM audit_checkpoints WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(seq_i64(seq))
        .fetch_optional(&self.pool)
        .await?;
        r.map(checkpoint_of).transpose()
    }

    async fn checkpoints(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let rows: Vec<CheckpointRow> = sqlx::query_as(
            "SELECT seq, head_hash, created_us, origin, key_name, key_version, signature
             FROM audit_checkpoints WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(seq_i64(from))
        .bind(seq_i64(to))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(checkpoint_of).collect()
    }

    async fn prune_at(&self, first_seq: u64) -> Result<Option<(Prune, i64)>, StoreError> {
        let r: Option<PruneRow> = sqlx::query_as(
            "SELECT first_seq, last_seq, last_hash, rows, reason, run_id
             FROM audit_prunes WHERE first_seq = ?1",
        )
        .bind(seq_i64(first_seq))
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| Ok((prune_of(&r)?, r.5))).transpose()
    }

    async fn prune_run(&self, id: i64) -> Result<Option<PruneRun>, StoreError> {
        let run: Option<(i64, String, String, i64, String)> = sqlx::query_as(
            "SELECT created_us, origin, key_name, key_version, signature
             FROM audit_prune_runs WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(run) = run else {
            return Ok(None);
        };
        let prunes: Vec<PruneRow> = sqlx::query_as(
            "SELECT first_seq, last_seq, last_hash, rows, reason, run_id
             FROM audit_prunes WHERE run_id = ?1 ORDER BY first_seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(PruneRun {
            id,
            time_us: run.0,
            origin: run.1,
            key_name: run.2,
            key_version: u32::try_from(run.3)
                .map_err(|_| StoreError::Corrupt("key version".into()))?,
            signature: run.4,
            prunes: prunes.iter().map(prune_of).collect::<Result<_, _>>()?,
        }))
    }
}

type PruneRow = (i64, i64, Vec<u8>, i64, String, i64);

fn prune_of(r: &PruneRow) -> Result<Prune, StoreError> {
    Ok(Prune {
        first_seq: seq_u64(r.0)?,
        last_seq: seq_u64(r.1)?,
        last_hash: to_hash(&r.2)?,
        rows: seq_u64(r.3)?,
        reason: r.4.clone(),
    })
}

/// `EXISTS` an active legal hold matching the row `e`.
const HELD: &str = "EXISTS (SELECT 1 FROM audit_legal_holds h WHERE h.released_us IS NULL
    AND (h.type_prefix = '' OR substr(e.event_type, 1, length(h.type_prefix)) = h.type_prefix)
    AND (h.actor_id = '' OR e.actor_id = h.actor_id)
    AND (h.subject = '' OR e.subject = h.subject)
    AND (h.since_us IS NULL OR e.ts_us >= h.since_us)
    AND (h.until_us IS NULL OR e.ts_us < h.until_us))";

/// The rows received before the latest cutoff, each with whether it expired and whether
/// a hold keeps it, as the CTE `r`.
fn push_candidates(b: &mut sqlx::QueryBuilder<sqlx::Sqlite>, cutoffs: &Cutoffs) {
    b.push("WITH r AS (SELECT e.seq, (e.received_us < CASE WHEN 0 THEN NULL");
    for (prefix, cutoff) in &cutoffs.by_prefix {
        b.push(format!(
            " WHEN substr(e.event_type, 1, {}) = ",
            prefix.chars().count()
        ))
        .push_bind(prefix.clone())
        .push(" THEN ")
        .push_bind(*cutoff);
    }
    b.push(" ELSE ")
        .push_bind(cutoffs.default_us)
        .push(format!(
            " END) AS expired, {HELD} AS held FROM security_events e WHERE e.received_us < "
        ))
        .push_bind(cutoffs.latest())
        .push(" AND e.seq IS NOT NULL)");
}

type HoldRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
    i64,
    String,
    Option<i64>,
    Option<String>,
);

fn hold_of(r: HoldRow) -> Result<LegalHold, StoreError> {
    Ok(LegalHold {
        id: uuid::Uuid::parse_str(&r.0).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        name: r.1,
        reason: r.2,
        type_prefix: r.3,
        actor_id: r.4,
        subject: r.5,
        since_us: r.6,
        until_us: r.7,
        created_us: r.8,
        created_by: r.9,
        released_us: r.10,
        released_by: r.11,
    })
}

#[async_trait]
impl RetentionStore for SqliteEventStore {
    /// SQLite has no partitions.
    async fn ensure_partitions(&self, _months: &[chrono::NaiveDate]) -> Result<u32, StoreError> {
        Ok(0)
    }

    async fn partitions(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    async fn plan_retention(
        &self,
        cutoffs: &Cutoffs,
        max_ranges: usize,
    ) -> Result<RetentionPlan, StoreError> {
        let mut b = sqlx::QueryBuilder::<sqlx::Sqlite>::new("");
        push_candidates(&mut b, cutoffs);
        b.push(
            ", f AS (SELECT seq, expired AND NOT held AS ok,
                   row_number() OVER (ORDER BY seq)
                 - row_number() OVER (PARTITION BY expired AND NOT held ORDER BY seq) AS grp
               FROM r)
             SELECT g.lo, g.hi, g.n,
                    (SELECT x.hash FROM security_events x WHERE x.seq = g.hi)
             FROM (SELECT min(seq) AS lo, max(seq) AS hi, count(*) AS n FROM f
                   WHERE ok GROUP BY grp) g
             ORDER BY g.lo LIMIT ",
        )
        .push_bind(i64::try_from(max_ranges).unwrap_or(i64::MAX));
        let islands: Vec<(i64, i64, i64, Option<Vec<u8>>)> =
            b.build_query_as().fetch_all(&self.pool).await?;
        let mut b = sqlx::QueryBuilder::<sqlx::Sqlite>::new("");
        push_candidates(&mut b, cutoffs);
        b.push(" SELECT count(*) FROM r WHERE expired AND held");
        let (held,): (i64,) = b.build_query_as().fetch_one(&self.pool).await?;
        let ranges = islands
            .into_iter()
            .map(|(lo, hi, n, hash)| {
                Ok(Prune {
                    first_seq: seq_u64(lo)?,
                    last_seq: seq_u64(hi)?,
                    last_hash: to_hash(hash.as_deref().unwrap_or_default())?,
                    rows: seq_u64(n)?,
                    reason: PRUNE_RETENTION.into(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(RetentionPlan {
            drops: Vec::new(),
            ranges,
            held_rows: seq_u64(held)?,
            partitions: 0,
        })
    }

    async fn apply_retention(
        &self,
        run: &PruneRun,
        plan: &RetentionPlan,
    ) -> Result<u64, StoreError> {
        if !plan.drops.is_empty() {
            return Err(StoreError::Corrupt(
                "SQLite has no partitions to drop".into(),
            ));
        }
        // One writer at a time: nothing (a hold, a batch) changes between the checks
        // below and the deletes.
        let mut tx = begin_write(&self.pool).await?;
        if !run.prunes.is_empty() {
            let id = sqlx::query(
                "INSERT INTO audit_prune_runs (created_us, origin, key_name, key_version, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(run.time_us)
            .bind(&run.origin)
            .bind(&run.key_name)
            .bind(i64::from(run.key_version))
            .bind(&run.signature)
            .execute(&mut *tx)
            .await?
            .last_insert_rowid();
            for p in &run.prunes {
                sqlx::query(
                    "INSERT INTO audit_prunes (first_seq, last_seq, last_hash, rows, reason, run_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .bind(seq_i64(p.first_seq))
                .bind(seq_i64(p.last_seq))
                .bind(p.last_hash.to_vec())
                .bind(seq_i64(p.rows))
                .bind(&p.reason)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        let mut removed = 0;
        for p in &plan.ranges {
            let (same, held): (bool, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT hash FROM security_events WHERE seq = ?2) = ?3,
                        (SELECT count(*) FROM security_events e
                          WHERE e.seq BETWEEN ?1 AND ?2 AND {HELD})"
            )))
            .bind(seq_i64(p.first_seq))
            .bind(seq_i64(p.last_seq))
            .bind(p.last_hash.to_vec())
            .fetch_one(&mut *tx)
            .await?;
            if !same || held > 0 {
                return Err(StoreError::Corrupt(format!(
                    "positions {}..={} changed since the plan (a hold, or a stale plan)",
                    p.first_seq, p.last_seq
                )));
            }
            let n = sqlx::query("DELETE FROM security_events WHERE seq BETWEEN ?1 AND ?2")
                .bind(seq_i64(p.first_seq))
                .bind(seq_i64(p.last_seq))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n != p.rows {
                return Err(StoreError::Corrupt(format!(
                    "positions {}..={} held {n} rows, {} planned",
                    p.first_seq, p.last_seq, p.rows
                )));
            }
            removed += n;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn create_hold(&self, h: &LegalHold) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO audit_legal_holds (id, name, reason, type_prefix, actor_id, subject,
               since_us, until_us, created_us, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (name) WHERE released_us IS NULL DO NOTHING",
        )
        .bind(h.id.to_string())
        .bind(&h.name)
        .bind(&h.reason)
        .bind(&h.type_prefix)
        .bind(&h.actor_id)
        .bind(&h.subject)
        .bind(h.since_us)
        .bind(h.until_us)
        .bind(h.created_us)
        .bind(&h.created_by)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn release_hold(
        &self,
        id: uuid::Uuid,
        by: &str,
        now_us: i64,
    ) -> Result<Release, StoreError> {
        let r = sqlx::query(
            "UPDATE audit_legal_holds SET released_us = ?2, released_by = ?3
             WHERE id = ?1 AND released_us IS NULL",
        )
        .bind(id.to_string())
        .bind(now_us)
        .bind(by)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(Release::Released);
        }
        let exists: Option<(String,)> =
            sqlx::query_as("SELECT id FROM audit_legal_holds WHERE id = ?1")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(if exists.is_some() {
            Release::AlreadyReleased
        } else {
            Release::NotFound
        })
    }

    async fn list_holds(
        &self,
        include_released: bool,
        limit: u32,
    ) -> Result<Vec<LegalHold>, StoreError> {
        let rows: Vec<HoldRow> = sqlx::query_as(
            "SELECT id, name, reason, type_prefix, actor_id, subject, since_us, until_us,
                    created_us, created_by, released_us, released_by
             FROM audit_legal_holds WHERE ?1 OR released_us IS NULL
             ORDER BY created_us DESC, id LIMIT ?2",
        )
        .bind(include_released)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(hold_of).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contract_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let pool = sec_common::storage::connect_sqlite(&dir.path().join("audit.db"), 4)
            .await
            .unwrap();
        crate::MIGRATIONS.sqlite.run(&pool).await.unwrap();
        super::super::contract::run(&SqliteEventStore::new(pool, sec_common::clock::system()))
            .await;
    }

    #[tokio::test]
    async fn receipt_time_comes_from_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let pool = sec_common::storage::connect_sqlite(&dir.path().join("audit.db"), 1)
            .await
            .unwrap();
        crate::MIGRATIONS.sqlite.run(&pool).await.unwrap();
        let received = chrono::DateTime::from_timestamp_micros(1_767_225_600_123_456).unwrap();
        let clock = sec_common::clock::ManualClock::new(received);
        let store = SqliteEventStore::new(pool.clone(), clock.clone());
        let event = sec_common::events::new_event(
            sec_common::clock::ManualClock::new(received - chrono::Duration::hours(1)).as_ref(),
            "crypto",
            "sec.crypto.key.created",
        );
        assert_eq!(store.insert_batch(&[event]).await.unwrap(), 1);
        let (us,): (i64,) = sqlx::query_as("SELECT received_us FROM security_events")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(us, received.timestamp_micros());
    }

    async fn fresh() -> (tempfile::TempDir, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = sec_common::storage::connect_sqlite(&dir.path().join("audit.db"), 4)
            .await
            .unwrap();
        crate::MIGRATIONS.sqlite.run(&pool).await.unwrap();
        (dir, pool)
    }

    #[tokio::test]
    async fn chain_sqlite() {
        let (_dir, pool) = fresh().await;
        let store = std::sync::Arc::new(SqliteEventStore::new(
            pool.clone(),
            sec_common::clock::system(),
        ));
        crate::store::chain_tests::run(store, sec_common::storage::Db::Sqlite(pool)).await;
    }

    #[tokio::test]
    async fn legacy_rows_sqlite() {
        let (_dir, pool) = fresh().await;
        let store = std::sync::Arc::new(SqliteEventStore::new(
            pool.clone(),
            sec_common::clock::system(),
        ));
        crate::store::chain_tests::legacy(store, sec_common::storage::Db::Sqlite(pool)).await;
    }

    #[tokio::test]
    async fn retention_sqlite() {
        let (_dir, pool) = fresh().await;
        let make = |clock: sec_common::clock::SharedClock| {
            std::sync::Arc::new(SqliteEventStore::new(pool.clone(), clock))
                as std::sync::Arc<dyn crate::store::AuditStore>
        };
        crate::store::retention_tests::run(&make, sec_common::storage::Db::Sqlite(pool.clone()))
            .await;
    }

    /// The outside verifier (tests/interop/audit/verify_chain.py) accepts the gaps
    /// retention recorded and still catches a row deleted by hand.
    #[tokio::test]
    async fn retention_outside_verifier_sqlite() {
        let (dir, pool) = fresh().await;
        let now = sec_common::clock::system().now();
        let clock = sec_common::clock::ManualClock::new(now - chrono::Duration::days(800));
        let store = std::sync::Arc::new(SqliteEventStore::new(pool.clone(), clock.clone()));
        for _ in 0..3 {
            let batch: Vec<_> = (0..4)
                .map(|_| {
                    sec_common::events::new_event(clock.as_ref(), "auth", "sec.auth.login.failed")
                })
                .collect();
            store.insert_batch(&batch).await.unwrap();
            clock.set(now);
        }
        let signer = crate::verify::local::LocalSigner::new();
        let chain = crate::checkpointer::Checkpointer::with_signer(
            store.clone(),
            "sec-audit/test",
            clock.clone(),
            signer,
        );
        let retention = crate::retention::Retention::for_test(
            store.clone(),
            chain,
            clock,
            crate::retention::RetentionConfig::default(),
        );
        assert_eq!(retention.run(false).await.unwrap().removed_rows, 4);
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/interop/audit/verify_chain.py"
        );
        let outside = || {
            let out = match std::process::Command::new("python3")
                .arg(script)
                .arg(dir.path().join("audit.db"))
                .output()
            {
                Ok(out) => out,
                Err(e) => {
                    assert_ne!(
                        std::env::var("SEC_TEST_INTEROP").as_deref(),
                        Ok("required"),
                        "python3: {e}"
                    );
                    return None;
                }
            };
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
            Some((out.status.code(), v))
        };
        let Some((code, v)) = outside() else {
            return;
        };
        assert_eq!(code, Some(0), "{v}");
        assert_eq!(
            (v["records"].as_u64(), v["pruned_runs"].as_u64()),
            (Some(8), Some(1))
        );
        sqlx::query("DELETE FROM security_events WHERE seq = 10")
            .execute(&pool)
            .await
            .unwrap();
        let (code, v) = outside().unwrap();
        assert_eq!(code, Some(3), "{v}");
        assert_eq!(
            (v["problem"].as_str(), v["first_bad_seq"].as_u64()),
            (Some("missing"), Some(10))
        );
    }

    /// With `export_dir`, removed rows are written (JSON Lines + SHA-256 sidecar) first;
    /// when the export cannot be written nothing is removed.
    #[tokio::test]
    async fn retention_export_sqlite() {
        let (_dir, pool) = fresh().await;
        let now = sec_common::clock::system().now();
        let clock = sec_common::clock::ManualClock::new(now - chrono::Duration::days(800));
        let store = std::sync::Arc::new(SqliteEventStore::new(pool.clone(), clock.clone()));
        let batch: Vec<_> = (0..6)
            .map(|_| sec_common::events::new_event(clock.as_ref(), "auth", "sec.auth.login.failed"))
            .collect();
        store.insert_batch(&batch).await.unwrap();
        clock.set(now);
        let signer = crate::verify::local::LocalSigner::new();
        let chain = crate::checkpointer::Checkpointer::with_signer(
            store.clone(),
            "sec-audit/test",
            clock.clone(),
            signer,
        );
        let out = tempfile::tempdir().unwrap();
        let missing = out.path().join("missing");
        let with_dir = |dir: std::path::PathBuf| {
            crate::retention::Retention::for_test(
                store.clone(),
                chain.clone(),
                clock.clone(),
                crate::retention::RetentionConfig {
                    export_dir: Some(dir),
                    ..Default::default()
                },
            )
        };
        let err = with_dir(missing).run(false).await.unwrap_err();
        assert!(
            matches!(err, crate::retention::RetentionError::Export(_)),
            "{err}"
        );
        assert_eq!(
            store.chained(1, 100, 100).await.unwrap().len(),
            6,
            "nothing removed"
        );

        let done = with_dir(out.path().to_owned()).run(false).await.unwrap();
        assert_eq!(done.removed_rows, 6);
        assert_eq!(done.exported.len(), 1);
        let text = std::fs::read_to_string(&done.exported[0]).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0]["seq"], 1);
        assert_eq!(lines[5]["id"], batch[5].id.as_str());
        assert_eq!(lines[0]["hash"].as_str().unwrap().len(), 64);
        let name = done.exported[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let sidecar = std::fs::read_to_string(out.path().join(format!("{name}.sha256"))).unwrap();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
        assert_eq!(
            sidecar,
            format!("{}  {name}\n", crate::chain::hex(digest.as_ref()))
        );
    }

    #[tokio::test]
    async fn holds_sqlite() {
        let (_dir, pool) = fresh().await;
        let store = std::sync::Arc::new(SqliteEventStore::new(pool, sec_common::clock::system()));
        crate::store::retention_tests::holds(store).await;
    }

    #[tokio::test]
    async fn search_sqlite() {
        let (_dir, pool) = fresh().await;
        let store = std::sync::Arc::new(SqliteEventStore::new(pool, sec_common::clock::system()));
        crate::store::chain_tests::search(store).await;
    }
}
