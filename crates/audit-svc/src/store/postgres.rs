//! PostgreSQL event store. Batches go in as one `INSERT … SELECT FROM UNNEST(…)`
//! statement: one round trip per batch, whatever its size.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sec_common::clock::SharedClock;
use sec_common::events::SecurityEvent;
use sqlx::PgPool;

use super::{
    ChainStore, Cursor, EventQuery, EventStore, Outside, Row, StoreError, TypeMatch, chain_batch,
    cursor_after, from_row, like_prefix, seq_i64, seq_u64, to_hash, to_row,
};
use crate::chain::{Chained, Checkpoint, Head};

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
    /// Stamps `received_at` (rather than the column's `now()` default), so receipt
    /// times follow the platform clock on both backends.
    clock: SharedClock,
}

impl PgEventStore {
    pub fn new(pool: PgPool, clock: SharedClock) -> Self {
        Self { pool, clock }
    }
}

fn ts(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt("time out of range".into()))
}

/// The columns of [`PgRow`], in order.
const COLUMNS: &str = r#"id, event_type, "timestamp", service, user_id, actor_kind, actor_id, subject,
    host(ip_address), outcome, severity, details::text, trace_id, received_at"#;

type PgRow = (
    uuid::Uuid,
    String,
    DateTime<Utc>,
    String,
    Option<uuid::Uuid>,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
);

fn row_of(r: PgRow) -> Row {
    Row {
        id: r.0,
        event_type: r.1,
        time_us: r.2.timestamp_micros(),
        service: r.3,
        user_id: r.4,
        actor_kind: r.5,
        actor_id: r.6,
        subject: r.7,
        ip_address: r.8,
        outcome: r.9,
        severity: r.10,
        details: r.11,
        trace_id: r.12,
        received_us: r.13.timestamp_micros(),
    }
}

type CheckpointRow = (i64, Vec<u8>, DateTime<Utc>, String, String, i32, String);

fn checkpoint_of(r: CheckpointRow) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        seq: seq_u64(r.0)?,
        head_hash: to_hash(&r.1)?,
        time_us: r.2.timestamp_micros(),
        origin: r.3,
        key_name: r.4,
        key_version: u32::try_from(r.5).map_err(|_| StoreError::Corrupt("key version".into()))?,
        signature: r.6,
    })
}

/// Locks the chain head for the rest of `tx` (the sequencer, see [`crate::chain`]).
async fn lock_head(tx: &mut sqlx::PgConnection) -> Result<Head, StoreError> {
    let (seq, hash): (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    Ok(Head {
        seq: seq_u64(seq)?,
        hash: to_hash(&hash)?,
    })
}

async fn set_head(tx: &mut sqlx::PgConnection, head: Head) -> Result<(), StoreError> {
    sqlx::query("UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq_i64(head.seq))
        .bind(head.hash.to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let received = self.clock.now().timestamp_micros();
        let rows = events
            .iter()
            .map(|e| to_row(e, received))
            .collect::<Result<Vec<Row>, _>>()?;
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
        let mut tx = self.pool.begin().await?;
        let head = lock_head(&mut tx).await?;
        let stored: Vec<(uuid::Uuid,)> =
            sqlx::query_as("SELECT id FROM security_events WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
        let stored = stored.into_iter().map(|(id,)| id).collect();
        let (new, head) = chain_batch(head, rows, &stored)?;
        if new.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let times = new
            .iter()
            .map(|(_, _, r)| ts(r.time_us))
            .collect::<Result<Vec<_>, _>>()?;
        let col = |f: fn(&Row) -> String| new.iter().map(|(_, _, r)| f(r)).collect::<Vec<String>>();
        let result = sqlx::query(
            r#"INSERT INTO security_events
                 (id, event_type, "timestamp", service, user_id, actor_kind, actor_id, subject,
                  ip_address, outcome, severity, details, trace_id, received_at, seq, hash)
               SELECT id, event_type, ts, service, user_id, actor_kind, actor_id, subject,
                      ip::inet, outcome, severity, details::jsonb, trace_id, $14::timestamptz,
                      seq, hash
               FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::uuid[],
                           $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                           $11::text[], $12::text[], $13::text[], $15::bigint[], $16::bytea[])
                 AS t(id, event_type, ts, service, user_id, actor_kind, actor_id, subject,
                      ip, outcome, severity, details, trace_id, seq, hash)
               ON CONFLICT (id) DO NOTHING"#,
        )
        .bind(new.iter().map(|(_, _, r)| r.id).collect::<Vec<_>>())
        .bind(col(|r| r.event_type.clone()))
        .bind(times)
        .bind(col(|r| r.service.clone()))
        .bind(new.iter().map(|(_, _, r)| r.user_id).collect::<Vec<_>>())
        .bind(col(|r| r.actor_kind.clone()))
        .bind(col(|r| r.actor_id.clone()))
        .bind(col(|r| r.subject.clone()))
        .bind(
            new.iter()
                .map(|(_, _, r)| r.ip_address.clone())
                .collect::<Vec<_>>(),
        )
        .bind(col(|r| r.outcome.clone()))
        .bind(col(|r| r.severity.clone()))
        .bind(col(|r| r.details.clone()))
        .bind(col(|r| r.trace_id.clone()))
        .bind(ts(received)?)
        .bind(new.iter().map(|(s, _, _)| seq_i64(*s)).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, h, _)| h.to_vec()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        // Under the head lock nothing else can have stored these ids meanwhile; a row
        // skipped anyway would leave a hole in the chain, so refuse the batch instead.
        if result.rows_affected() != new.len() as u64 {
            return Err(StoreError::Corrupt(format!(
                "{} of {} new events were already stored",
                new.len() as u64 - result.rows_affected(),
                new.len()
            )));
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
        let mut b = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "SELECT {COLUMNS} FROM security_events WHERE TRUE"
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
            b.push(r#" AND "timestamp" >= "#).push_bind(ts(t)?);
        }
        if let Some(t) = q.until_us {
            b.push(r#" AND "timestamp" < "#).push_bind(ts(t)?);
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
            b.push(" AND id = ANY(").push_bind(q.ids.clone()).push(")");
        }
        if let Some(net) = &q.ip {
            b.push(" AND ip_address <<= ")
                .push_bind(net.to_string())
                .push("::inet");
        }
        if !q.severities.is_empty() {
            b.push(" AND severity = ANY(")
                .push_bind(q.severities.clone())
                .push(")");
        }
        if !q.outcomes.is_empty() {
            b.push(" AND outcome = ANY(")
                .push_bind(q.outcomes.clone())
                .push(")");
        }
        for (k, values) in &q.details {
            // `@>` on a one-pair object: served by the GIN (jsonb_path_ops) index, also
            // when OR'd (a BitmapOr of index scans).
            b.push(" AND (");
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    b.push(" OR ");
                }
                b.push("details @> ")
                    .push_bind(serde_json::json!({ k: v }).to_string())
                    .push("::jsonb");
            }
            b.push(")");
        }
        let (cmp, dir) = if q.oldest_first {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        if let Some(c) = q.after {
            b.push(format!(r#" AND ("timestamp", id) {cmp} ("#))
                .push_bind(ts(c.time_us)?)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        b.push(format!(r#" ORDER BY "timestamp" {dir}, id {dir} LIMIT "#))
            .push_bind(limit + 1);
        let rows: Vec<PgRow> = b.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() as i64 > limit;
        let events = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| from_row(row_of(r)))
            .collect::<Result<Vec<_>, _>>()?;
        let cursor = cursor_after(more, &events);
        Ok((events, cursor))
    }
}

#[async_trait]
impl ChainStore for PgEventStore {
    async fn head(&self) -> Result<Head, StoreError> {
        let (seq, hash): (i64, Vec<u8>) =
            sqlx::query_as("SELECT seq, hash FROM audit_chain_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        Ok(Head {
            seq: seq_u64(seq)?,
            hash: to_hash(&hash)?,
        })
    }

    async fn chained(&self, from: u64, to: u64, limit: u32) -> Result<Vec<Chained>, StoreError> {
        let q = format!(
            "SELECT seq, hash, {COLUMNS} FROM security_events
             WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3"
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
                ));
                Ok(Chained {
                    seq: seq_u64(seq)?,
                    hash: hash.unwrap_or_default(),
                    row,
                })
            })
            .collect()
    }

    async fn outside_chain(&self, head_seq: u64) -> Result<Option<Outside>, StoreError> {
        let unpositioned: Option<(uuid::Uuid,)> =
            sqlx::query_as("SELECT id FROM security_events WHERE seq IS NULL LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        if let Some((id,)) = unpositioned {
            return Ok(Some(Outside::Unpositioned(id)));
        }
        let beyond: Option<(i64,)> =
            sqlx::query_as("SELECT seq FROM security_events WHERE seq > $1 ORDER BY seq LIMIT 1")
                .bind(seq_i64(head_seq))
                .fetch_optional(&self.pool)
                .await?;
        beyond
            .map(|(s,)| Ok(Outside::BeyondHead(seq_u64(s)?)))
            .transpose()
    }

    async fn chain_legacy_rows(&self) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let head = lock_head(&mut tx).await?;
        let (done,): (bool,) =
            sqlx::query_as("SELECT legacy_chained FROM audit_chain_head WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        if done {
            return Ok(0);
        }
        let rows: Vec<PgRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM security_events WHERE seq IS NULL ORDER BY received_at, id"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let (new, head) = chain_batch(
            head,
            rows.into_iter().map(row_of).collect(),
            &Default::default(),
        )?;
        for (seq, hash, r) in &new {
            sqlx::query("UPDATE security_events SET seq = $1, hash = $2 WHERE id = $3")
                .bind(seq_i64(*seq))
                .bind(hash.to_vec())
                .bind(r.id)
                .execute(&mut *tx)
                .await?;
        }
        set_head(&mut tx, head).await?;
        sqlx::query("UPDATE audit_chain_head SET legacy_chained = true WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(new.len() as u64)
    }

    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_checkpoints
               (seq, head_hash, created_at, origin, key_name, key_version, signature)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(seq_i64(c.seq))
        .bind(c.head_hash.to_vec())
        .bind(ts(c.time_us)?)
        .bind(&c.origin)
        .bind(&c.key_name)
        .bind(i32::try_from(c.key_version).unwrap_or(i32::MAX))
        .bind(&c.signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn checkpoint_at_or_before(&self, seq: u64) -> Result<Option<Checkpoint>, StoreError> {
        let r: Option<CheckpointRow> = sqlx::query_as(
            "SELECT seq, head_hash, created_at, origin, key_name, key_version, signature
             FROM audit_checkpoints WHERE seq <= $1 ORDER BY seq DESC LIMIT 1",
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
            "SELECT seq, head_hash, created_at, origin, key_name, key_version, signature
             FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
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
    use sec_testkit::{Backend, backend_url};

    #[tokio::test]
    async fn contract_postgres() {
        let Some(url) = backend_url(Backend::Postgres) else {
            return;
        };
        let schema = format!("audit_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 4)
            .await
            .unwrap();
        crate::MIGRATIONS.postgres.run(&pool).await.unwrap();
        super::super::contract::run(&PgEventStore::new(
            pool.clone(),
            sec_common::clock::system(),
        ))
        .await;
        // Receipt time comes from the store's clock, not the database's.
        let received = DateTime::from_timestamp_micros(1_767_225_600_123_456).unwrap();
        let store = PgEventStore::new(pool.clone(), sec_common::clock::ManualClock::new(received));
        let event = sec_common::events::new_event(
            sec_common::clock::ManualClock::new(received - chrono::Duration::hours(1)).as_ref(),
            "crypto",
            "sec.crypto.key.created",
        );
        let id = uuid::Uuid::parse_str(&event.id).unwrap();
        assert_eq!(store.insert_batch(&[event]).await.unwrap(), 1);
        let (at,): (DateTime<Utc>,) =
            sqlx::query_as("SELECT received_at FROM security_events WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(at, received);
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }

    async fn fresh_schema() -> Option<(sqlx::PgPool, String)> {
        let url = backend_url(Backend::Postgres)?;
        let schema = format!("audit_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 8)
            .await
            .unwrap();
        crate::MIGRATIONS.postgres.run(&pool).await.unwrap();
        Some((pool, schema))
    }

    async fn drop_schema(pool: &sqlx::PgPool, schema: &str) {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(pool)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn chain_postgres() {
        let Some((pool, schema)) = fresh_schema().await else {
            return;
        };
        let store =
            std::sync::Arc::new(PgEventStore::new(pool.clone(), sec_common::clock::system()));
        crate::store::chain_tests::run(store, sec_common::storage::Db::Postgres(pool.clone()))
            .await;
        drop_schema(&pool, &schema).await;
    }

    #[tokio::test]
    async fn legacy_rows_postgres() {
        let Some((pool, schema)) = fresh_schema().await else {
            return;
        };
        let store =
            std::sync::Arc::new(PgEventStore::new(pool.clone(), sec_common::clock::system()));
        crate::store::chain_tests::legacy(store, sec_common::storage::Db::Postgres(pool.clone()))
            .await;
        drop_schema(&pool, &schema).await;
    }

    #[tokio::test]
    async fn search_postgres() {
        let Some((pool, schema)) = fresh_schema().await else {
            return;
        };
        let store =
            std::sync::Arc::new(PgEventStore::new(pool.clone(), sec_common::clock::system()));
        crate::store::chain_tests::search(store).await;
        drop_schema(&pool, &schema).await;
    }
}
