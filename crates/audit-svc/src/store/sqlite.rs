//! SQLite event store (the embedded default). A batch is one transaction.

use async_trait::async_trait;
use sec_common::clock::SharedClock;
use sec_common::events::SecurityEvent;
use sqlx::SqlitePool;

use super::{
    ChainStore, Cursor, EventQuery, EventStore, Outside, Row, StoreError, TypeMatch, chain_batch,
    cursor_after, from_row, like_prefix, seq_i64, seq_u64, to_hash, to_row,
};
use crate::chain::{Chained, Checkpoint, Head};

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
    let (seq, hash): (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, hash FROM audit_chain_head WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    Ok(Head {
        seq: seq_u64(seq)?,
        hash: to_hash(&hash)?,
    })
}

async fn set_head(conn: &mut sqlx::SqliteConnection, head: Head) -> Result<(), StoreError> {
    sqlx::query("UPDATE audit_chain_head SET seq = ?1, hash = ?2 WHERE id = 1")
        .bind(seq_i64(head.seq))
        .bind(head.hash.to_vec())
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
        let received = self.clock.now().timestamp_micros();
        let rows = events
            .iter()
            .map(|e| to_row(e, received))
            .collect::<Result<Vec<Row>, _>>()?;
        let mut tx = begin_write(&self.pool).await?;
        let head = read_head(&mut tx).await?;
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
        set_head(&mut tx, head).await?;
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
        set_head(&mut tx, head).await?;
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
    async fn search_sqlite() {
        let (_dir, pool) = fresh().await;
        let store = std::sync::Arc::new(SqliteEventStore::new(pool, sec_common::clock::system()));
        crate::store::chain_tests::search(store).await;
    }
}
