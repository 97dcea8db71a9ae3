//! PostgreSQL event store. Batches go in as one `INSERT … SELECT FROM UNNEST(…)`
//! statement: one round trip per batch, whatever its size.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sec_common::clock::SharedClock;
use sec_common::events::SecurityEvent;
use sqlx::PgPool;

use super::{
    ChainStore, Cursor, Cutoffs, EventQuery, EventStore, LegalHold, Outside, Release,
    RetentionPlan, RetentionStore, Row, StoreError, TypeMatch, chain_batch, cursor_after, from_row,
    like_prefix, partition_bounds_us, seq_i64, seq_u64, to_hash, to_row,
};
use crate::chain::{Chained, Checkpoint, Head, PRUNE_PARTITION, PRUNE_RETENTION, Prune, PruneRun};

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

/// Locks the chain head for the rest of `tx` (the sequencer, see [`crate::chain`]);
/// with the newest receipt time stored.
async fn lock_head(tx: &mut sqlx::PgConnection) -> Result<(Head, Option<i64>), StoreError> {
    let (seq, hash, received): (i64, Vec<u8>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT seq, hash, received_at FROM audit_chain_head WHERE id = 1 FOR UPDATE",
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok((
        Head {
            seq: seq_u64(seq)?,
            hash: to_hash(&hash)?,
        },
        received.map(|t| t.timestamp_micros()),
    ))
}

async fn set_head(
    tx: &mut sqlx::PgConnection,
    head: Head,
    received_us: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE audit_chain_head SET seq = $1, hash = $2,
           received_at = greatest(received_at, $3) WHERE id = 1",
    )
    .bind(seq_i64(head.seq))
    .bind(head.hash.to_vec())
    .bind(received_us.map(ts).transpose()?)
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
        // Parsed before the lock is taken; stamped under it.
        let rows = events
            .iter()
            .map(|e| to_row(e, 0))
            .collect::<Result<Vec<Row>, _>>()?;
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
        let mut tx = self.pool.begin().await?;
        let (head, last_received) = lock_head(&mut tx).await?;
        // Receipt times never go back along the chain (a replica's clock behind another's
        // takes the newest one stored): every monthly partition then holds one contiguous
        // run of positions.
        let received = super::monotone_received(self.clock.now().timestamp_micros(), last_received);
        let rows: Vec<Row> = rows
            .into_iter()
            .map(|r| Row {
                received_us: received,
                ..r
            })
            .collect();
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
"#,
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
        // Under the head lock nothing else can have stored these ids meanwhile (ids are
        // looked up above without their receipt time, which the key includes).
        if result.rows_affected() != new.len() as u64 {
            return Err(StoreError::Corrupt(format!(
                "{} of {} new events were not stored",
                new.len() as u64 - result.rows_affected(),
                new.len()
            )));
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
            // Stored addresses are host addresses (`to_row`), so a block is the range of
            // its first and last address, as on SQLite (`super::ip_range`): a range of
            // the B-tree on ip_address (migration 0007), in generic plans too.
            b.push(" AND ip_address BETWEEN ")
                .push_bind(net.network().to_string())
                .push("::inet AND ")
                .push_bind(net.broadcast().to_string())
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
        let (head, _) = lock_head(&mut tx).await?;
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
        // Through the owner's function: the service's role may not UPDATE events.
        for (seq, hash, r) in &new {
            sqlx::query("SELECT audit_chain_legacy_row($1, $2, $3)")
                .bind(r.id)
                .bind(seq_i64(*seq))
                .bind(hash.to_vec())
                .execute(&mut *tx)
                .await?;
        }
        let newest = new.iter().map(|(_, _, r)| r.received_us).max();
        set_head(&mut tx, head, newest).await?;
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

    async fn prune_at(&self, first_seq: u64) -> Result<Option<(Prune, i64)>, StoreError> {
        let r: Option<PruneRow> = sqlx::query_as(
            "SELECT first_seq, last_seq, last_hash, rows, reason, run_id
             FROM audit_prunes WHERE first_seq = $1",
        )
        .bind(seq_i64(first_seq))
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| Ok((prune_of(&r)?, r.5))).transpose()
    }

    async fn prune_run(&self, id: i64) -> Result<Option<PruneRun>, StoreError> {
        let run: Option<(DateTime<Utc>, String, String, i32, String)> = sqlx::query_as(
            "SELECT created_at, origin, key_name, key_version, signature
             FROM audit_prune_runs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(run) = run else {
            return Ok(None);
        };
        let prunes: Vec<PruneRow> = sqlx::query_as(
            "SELECT first_seq, last_seq, last_hash, rows, reason, run_id
             FROM audit_prunes WHERE run_id = $1 ORDER BY first_seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(PruneRun {
            id,
            time_us: run.0.timestamp_micros(),
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
const HELD: &str = r#"EXISTS (SELECT 1 FROM audit_legal_holds h WHERE h.released_at IS NULL
    AND (h.type_prefix = '' OR substr(e.event_type, 1, length(h.type_prefix)) = h.type_prefix)
    AND (h.actor_id = '' OR e.actor_id = h.actor_id)
    AND (h.subject = '' OR e.subject = h.subject)
    AND (h.since IS NULL OR e."timestamp" >= h.since)
    AND (h.until IS NULL OR e."timestamp" < h.until))"#;

/// The rows received before the latest cutoff, each with whether it expired and whether
/// a hold keeps it, as the CTE `r`.
fn push_candidates(
    b: &mut sqlx::QueryBuilder<sqlx::Postgres>,
    cutoffs: &Cutoffs,
) -> Result<(), StoreError> {
    b.push("WITH r AS (SELECT e.seq, e.tableoid::regclass::text AS part, (e.received_at < CASE WHEN false THEN NULL");
    for (prefix, cutoff) in &cutoffs.by_prefix {
        b.push(format!(
            " WHEN substr(e.event_type, 1, {}) = ",
            prefix.chars().count()
        ))
        .push_bind(prefix.clone())
        .push(" THEN ")
        .push_bind(ts(*cutoff)?);
    }
    b.push(" ELSE ")
        .push_bind(ts(cutoffs.default_us)?)
        .push(format!(
            " END) AS expired, {HELD} AS held FROM security_events e WHERE e.received_at < "
        ))
        .push_bind(ts(cutoffs.latest())?)
        .push(" AND e.seq IS NOT NULL)");
    Ok(())
}

type HoldRow = (
    uuid::Uuid,
    String,
    String,
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    String,
    Option<DateTime<Utc>>,
    Option<String>,
);

fn hold_of(r: HoldRow) -> LegalHold {
    LegalHold {
        id: r.0,
        name: r.1,
        reason: r.2,
        type_prefix: r.3,
        actor_id: r.4,
        subject: r.5,
        since_us: r.6.map(|t| t.timestamp_micros()),
        until_us: r.7.map(|t| t.timestamp_micros()),
        created_us: r.8.timestamp_micros(),
        created_by: r.9,
        released_us: r.10.map(|t| t.timestamp_micros()),
        released_by: r.11,
    }
}

#[async_trait]
impl RetentionStore for PgEventStore {
    async fn ensure_partitions(&self, months: &[chrono::NaiveDate]) -> Result<u32, StoreError> {
        let mut created = 0;
        for m in months {
            let (new,): (bool,) = sqlx::query_as("SELECT audit_ensure_partition($1)")
                .bind(m)
                .fetch_one(&self.pool)
                .await?;
            created += u32::from(new);
        }
        Ok(created)
    }

    async fn partitions(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT c.relname::text FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace
             WHERE p.relname = 'security_events' AND n.nspname = current_schema()
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    async fn plan_retention(
        &self,
        cutoffs: &Cutoffs,
        max_ranges: usize,
    ) -> Result<RetentionPlan, StoreError> {
        let mut b = sqlx::QueryBuilder::<sqlx::Postgres>::new("");
        push_candidates(&mut b, cutoffs)?;
        // Runs of consecutive removable rows within each partition (gaps and islands).
        b.push(
            ", f AS (SELECT seq, part, expired AND NOT held AS ok,
                   row_number() OVER (PARTITION BY part ORDER BY seq)
                 - row_number() OVER (PARTITION BY part, expired AND NOT held ORDER BY seq) AS grp
               FROM r)
             SELECT g.part, g.lo, g.hi, g.n,
                    (SELECT x.hash FROM security_events x WHERE x.seq = g.hi)
             FROM (SELECT part, min(seq) AS lo, max(seq) AS hi, count(*) AS n FROM f
                   WHERE ok GROUP BY part, grp) g
             ORDER BY g.lo LIMIT ",
        )
        .push_bind(i64::try_from(max_ranges).unwrap_or(i64::MAX));
        let islands: Vec<(String, i64, i64, i64, Option<Vec<u8>>)> =
            b.build_query_as().fetch_all(&self.pool).await?;
        let mut b = sqlx::QueryBuilder::<sqlx::Postgres>::new("");
        push_candidates(&mut b, cutoffs)?;
        b.push(" SELECT count(*) FROM r WHERE expired AND held");
        let (held,): (i64,) = b.build_query_as().fetch_one(&self.pool).await?;

        let partitions = self.partitions().await?;
        let latest = cutoffs.latest();
        let mut plan = RetentionPlan {
            held_rows: seq_u64(held)?,
            partitions: partitions.len() as u64,
            ..Default::default()
        };
        let mut islands_in: std::collections::HashMap<&str, usize> = Default::default();
        for (part, ..) in &islands {
            *islands_in.entry(part.as_str()).or_default() += 1;
        }
        for (part, lo, hi, n, hash) in &islands {
            let prune = Prune {
                first_seq: seq_u64(*lo)?,
                last_seq: seq_u64(*hi)?,
                last_hash: to_hash(hash.as_deref().unwrap_or_default())?,
                rows: seq_u64(*n)?,
                reason: PRUNE_RETENTION.into(),
            };
            // Dropped whole: one of ours, entirely before the latest cutoff, every row
            // removable, and no other partition's rows among its positions.
            let mut whole = false;
            if islands_in.get(part.as_str()) == Some(&1)
                && let Some((start, end)) = partition_bounds_us(part)
                && end <= latest
            {
                // Through the parent (the service's role has no rights on partitions);
                // the receipt-time range confines the scan to this partition.
                let (total,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM security_events
                     WHERE received_at >= $1 AND received_at < $2",
                )
                .bind(ts(start)?)
                .bind(ts(end)?)
                .fetch_one(&self.pool)
                .await?;
                let (interleaved,): (bool,) = sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM security_events
                       WHERE seq BETWEEN $1 AND $2 AND tableoid <> $3::regclass)",
                )
                .bind(lo)
                .bind(hi)
                .bind(part)
                .fetch_one(&self.pool)
                .await?;
                whole = total == *n && !interleaved;
            }
            if whole {
                plan.drops.push((
                    part.clone(),
                    Some(Prune {
                        reason: PRUNE_PARTITION.into(),
                        ..prune
                    }),
                ));
            } else {
                plan.ranges.push(prune);
            }
        }
        // Empty partitions before every cutoff go too.
        for part in &partitions {
            let earliest = cutoffs
                .by_prefix
                .iter()
                .map(|(_, c)| *c)
                .fold(cutoffs.default_us, i64::min);
            if let Some((start, end)) = partition_bounds_us(part)
                && end <= earliest
                && !islands_in.contains_key(part.as_str())
            {
                let (any,): (bool,) = sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM security_events
                     WHERE received_at >= $1 AND received_at < $2)",
                )
                .bind(ts(start)?)
                .bind(ts(end)?)
                .fetch_one(&self.pool)
                .await?;
                if !any {
                    plan.drops.push((part.clone(), None));
                }
            }
        }
        Ok(plan)
    }

    async fn apply_retention(
        &self,
        run: &PruneRun,
        plan: &RetentionPlan,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !run.prunes.is_empty() {
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO audit_prune_runs (created_at, origin, key_name, key_version, signature)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(ts(run.time_us)?)
            .bind(&run.origin)
            .bind(&run.key_name)
            .bind(i32::try_from(run.key_version).unwrap_or(i32::MAX))
            .bind(&run.signature)
            .fetch_one(&mut *tx)
            .await?;
            for p in &run.prunes {
                sqlx::query(
                    "INSERT INTO audit_prunes (first_seq, last_seq, last_hash, rows, reason, run_id)
                     VALUES ($1, $2, $3, $4, $5, $6)",
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
        for (name, prune) in &plan.drops {
            let (n,): (i64,) = sqlx::query_as("SELECT audit_drop_partition($1)")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            let want = prune.as_ref().map_or(0, |p| p.rows);
            if seq_u64(n)? != want {
                return Err(StoreError::Corrupt(format!(
                    "partition {name} held {n} rows, {want} planned"
                )));
            }
            removed += want;
        }
        for p in &plan.ranges {
            let (n,): (i64,) = sqlx::query_as("SELECT audit_prune_range($1, $2)")
                .bind(seq_i64(p.first_seq))
                .bind(seq_i64(p.last_seq))
                .fetch_one(&mut *tx)
                .await?;
            if seq_u64(n)? != p.rows {
                return Err(StoreError::Corrupt(format!(
                    "positions {}..={} held {n} rows, {} planned",
                    p.first_seq, p.last_seq, p.rows
                )));
            }
            removed += p.rows;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn create_hold(&self, h: &LegalHold) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO audit_legal_holds (id, name, reason, type_prefix, actor_id, subject,
               since, until, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (name) WHERE released_at IS NULL DO NOTHING",
        )
        .bind(h.id)
        .bind(&h.name)
        .bind(&h.reason)
        .bind(&h.type_prefix)
        .bind(&h.actor_id)
        .bind(&h.subject)
        .bind(h.since_us.map(ts).transpose()?)
        .bind(h.until_us.map(ts).transpose()?)
        .bind(ts(h.created_us)?)
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
            "UPDATE audit_legal_holds SET released_at = $2, released_by = $3
             WHERE id = $1 AND released_at IS NULL",
        )
        .bind(id)
        .bind(ts(now_us)?)
        .bind(by)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(Release::Released);
        }
        let exists: Option<(uuid::Uuid,)> =
            sqlx::query_as("SELECT id FROM audit_legal_holds WHERE id = $1")
                .bind(id)
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
            "SELECT id, name, reason, type_prefix, actor_id, subject, since, until, created_at,
                    created_by, released_at, released_by
             FROM audit_legal_holds WHERE $1 OR released_at IS NULL
             ORDER BY created_at DESC, id LIMIT $2",
        )
        .bind(include_released)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(hold_of).collect())
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
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn receipt_time_comes_from_the_clock_postgres() {
        let Some((pool, schema)) = fresh_schema().await else {
            return;
        };
        // Receipt time comes from the store's clock, not the database's (2020-01-01,
        // long before any partition the migration made).
        let received = DateTime::from_timestamp_micros(1_577_836_800_123_456).unwrap();
        let store = PgEventStore::new(pool.clone(), sec_common::clock::ManualClock::new(received));
        // No partition for that month yet: the insert fails loudly (no DEFAULT partition).
        let early = sec_common::events::new_event(
            sec_common::clock::ManualClock::new(received).as_ref(),
            "crypto",
            "sec.crypto.key.created",
        );
        assert!(store.insert_batch(&[early]).await.is_err());
        assert_eq!(store.head().await.unwrap().seq, 0, "nothing stored");
        let month = crate::retention::months_from(received, 0);
        assert_eq!(store.ensure_partitions(&month).await.unwrap(), 1);
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
    async fn retention_postgres() {
        let Some((pool, schema)) = fresh_schema().await else {
            return;
        };
        let make = |clock: sec_common::clock::SharedClock| {
            std::sync::Arc::new(PgEventStore::new(pool.clone(), clock))
                as std::sync::Arc<dyn crate::store::AuditStore>
        };
        crate::store::retention_tests::run(&make, sec_common::storage::Db::Postgres(pool.clone()))
            .await;
        drop_schema(&pool, &schema).await;
    }

    /// The service's role (a LOGIN role granted `sec_audit_service`) stores, chains and
    /// runs retention, but cannot UPDATE, DELETE or TRUNCATE events, drop partitions or
    /// read the floor; the deletion functions refuse what retention did not record.
    #[tokio::test]
    async fn service_role_postgres() {
        let Some((owner, schema)) = fresh_schema().await else {
            return;
        };
        let url = backend_url(Backend::Postgres).unwrap();
        let login = format!(
            "audit_login_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        for q in [
            format!("CREATE ROLE {login} LOGIN"),
            format!("GRANT sec_audit_service TO {login}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(q))
                .execute(&owner)
                .await
                .unwrap();
        }
        let opts = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url)
            .unwrap()
            .options([("search_path", schema.as_str()), ("role", login.as_str())]);
        let svc = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .unwrap();
        let (who,): (String,) = sqlx::query_as("SELECT current_user::text")
            .fetch_one(&svc)
            .await
            .unwrap();
        assert_eq!(who, login);

        // audit-svc starts as this role on the schema its owner migrated (the `migrate`
        // init container): connecting and the start-up check need no DDL.
        let mut cfg = sec_common::config::Config::default();
        cfg.storage.postgres_schema_prefix = String::new();
        let sep = if url.contains('?') { '&' } else { '?' };
        cfg.storage.database_url = Some(sec_common::config::Secret::new(format!(
            "{url}{sep}options=-c%20role%3D{login}"
        )));
        let db = sec_common::storage::connect_db(&cfg, &schema, &crate::MIGRATIONS)
            .await
            .unwrap();
        sec_common::storage::ensure_instance(&db, sec_common::clock::system().now())
            .await
            .unwrap();
        let sec_common::storage::Db::Postgres(p) = &db else {
            panic!("a PostgreSQL URL gives PostgreSQL")
        };
        let (as_whom,): (String,) = sqlx::query_as("SELECT current_user::text")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(as_whom, login, "connected as the restricted role");
        db.close().await;

        let real_now = sec_common::clock::system().now();
        let old = real_now - chrono::Duration::days(800);
        let clock = sec_common::clock::ManualClock::new(old);
        let store = std::sync::Arc::new(PgEventStore::new(svc.clone(), clock.clone()));
        let months = crate::retention::months_from(old, 0);
        assert_eq!(store.ensure_partitions(&months).await.unwrap(), 1);
        let batch: Vec<_> = (0..5)
            .map(|_| sec_common::events::new_event(clock.as_ref(), "auth", "sec.auth.login.failed"))
            .collect();
        assert_eq!(store.insert_batch(&batch).await.unwrap(), 5);
        assert_eq!(store.chain_legacy_rows().await.unwrap(), 0);

        for q in [
            "DELETE FROM security_events WHERE seq = 1",
            "UPDATE security_events SET subject = 'x' WHERE seq = 1",
            "TRUNCATE security_events",
            "SELECT count(*) FROM audit_retention_floor",
            "INSERT INTO audit_retention_floor VALUES ('sec.', 1)",
            "UPDATE audit_checkpoints SET seq = 0",
            "DELETE FROM audit_prunes",
            "SELECT audit_prune_range(1, 5)",
        ] {
            let err = sqlx::query(q).execute(&svc).await.unwrap_err();
            let code = err
                .as_database_error()
                .and_then(|e| e.code())
                .unwrap_or_default()
                .to_string();
            assert_eq!(code, "42501", "{q}: {err}");
        }
        // Alerts (0004, granted by 0006): raised, updated and acknowledged, never deleted.
        let alert = uuid::Uuid::new_v4();
        for q in [
            format!(
                "INSERT INTO alerts (id, rule, group_key, severity, status, first_seen, last_seen, \
                 count, raised_at) VALUES ('{alert}', 'r', 'g', 'high', 'open', now(), now(), 1, now())"
            ),
            format!("INSERT INTO alert_events (alert_id, event_id) VALUES ('{alert}', '{alert}')"),
            format!("UPDATE alerts SET status = 'acknowledged' WHERE id = '{alert}'"),
            "SELECT count(*) FROM alert_webhook_deliveries".to_owned(),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .execute(&svc)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"));
        }
        for q in ["DELETE FROM alerts", "DELETE FROM alert_events"] {
            let err = sqlx::query(q).execute(&svc).await.unwrap_err();
            let code = err.as_database_error().and_then(|e| e.code());
            assert_eq!(code.as_deref(), Some("42501"), "{q}: {err}");
        }
        let part = crate::store::partition_name(months[0]);
        for q in [
            format!("DROP TABLE {part}"),
            format!("ALTER TABLE security_events DETACH PARTITION {part}"),
        ] {
            assert!(
                sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                    .execute(&svc)
                    .await
                    .is_err(),
                "{q}"
            );
        }
        let err = sqlx::query("SELECT audit_drop_partition($1)")
            .bind(&part)
            .execute(&svc)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not recorded"), "{err}");

        // Retention through the functions, as the service.
        clock.set(real_now);
        let signer = crate::verify::local::LocalSigner::new();
        let chain = crate::checkpointer::Checkpointer::with_signer(
            store.clone(),
            "sec-audit/test",
            clock.clone(),
            signer.clone(),
        );
        let retention = crate::retention::Retention::for_test(
            store.clone(),
            chain,
            clock.clone(),
            crate::retention::RetentionConfig::default(),
        );
        let done = retention.run(false).await.unwrap();
        assert_eq!((done.removed_rows, done.dropped_partitions), (5, 1));
        let r = crate::verify::verify(store.as_ref(), signer.as_ref(), "sec-audit/test", 0, 0)
            .await
            .unwrap();
        assert!(r.failure.is_none(), "{r:?}");
        svc.close().await;
        drop_schema(&owner, &schema).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {login}")))
            .execute(&owner)
            .await
            .unwrap();
    }

    /// An existing trail (0001..=0003, rows from two months and one not yet chained) is
    /// copied into the partitioned table by 0005 and still verifies after the legacy row
    /// is chained through the owner's function.
    #[tokio::test]
    async fn upgrade_keeps_rows_postgres() {
        let Some(url) = backend_url(Backend::Postgres) else {
            return;
        };
        let schema = format!("audit_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 4)
            .await
            .unwrap();
        let full = crate::MIGRATIONS.postgres;
        let before = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(
                full.migrations
                    .iter()
                    .filter(|m| m.version <= 3)
                    .cloned()
                    .collect(),
            ),
            ignore_missing: false,
            locking: full.locking,
            no_tx: full.no_tx,
            table_name: full.table_name.clone(),
            create_schemas: full.create_schemas.clone(),
        };
        before.run(&pool).await.unwrap();
        // Two chained rows a month apart (written the way 0003's store did), then one
        // legacy row without a position.
        let old = sec_common::clock::system().now() - chrono::Duration::days(70);
        let old_store = PgEventStore::new(pool.clone(), sec_common::clock::system());
        let mut head = Head::EMPTY;
        for (i, at) in [old, old + chrono::Duration::days(35)]
            .into_iter()
            .enumerate()
        {
            let e = sec_common::events::new_event(
                sec_common::clock::ManualClock::new(at).as_ref(),
                "auth",
                "sec.auth.login.failed",
            );
            let row = crate::store::to_row(&e, at.timestamp_micros()).unwrap();
            let seq = i as u64 + 1;
            let hash = crate::chain::next_hash(&head.hash, seq, &row).unwrap();
            head = Head { seq, hash };
            sqlx::query(
                r#"INSERT INTO security_events (id, event_type, "timestamp", service, actor_kind,
                     actor_id, subject, outcome, severity, details, trace_id, received_at, seq, hash)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '{}', $10, $11, $12, $13)"#,
            )
            .bind(row.id)
            .bind(&row.event_type)
            .bind(ts(row.time_us).unwrap())
            .bind(&row.service)
            .bind(&row.actor_kind)
            .bind(&row.actor_id)
            .bind(&row.subject)
            .bind(&row.outcome)
            .bind(&row.severity)
            .bind(&row.trace_id)
            .bind(at)
            .bind(seq as i64)
            .bind(hash.to_vec())
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query("UPDATE audit_chain_head SET seq = 2, hash = $1, legacy_chained = false")
            .bind(head.hash.to_vec())
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            r#"INSERT INTO security_events (id, event_type, "timestamp", service, actor_kind,
                 actor_id, subject, outcome, severity, details, trace_id, received_at)
               VALUES ('0190c2a4-7d3e-7b7a-9f6e-0000000000aa', 'sec.auth.login.succeeded', now(),
                 'auth', 'user', 'alice', 'user:alice', 'success', 'info', '{}', '', now())"#,
        )
        .execute(&pool)
        .await
        .unwrap();
        drop(old_store);

        full.run(&pool).await.unwrap();
        let store =
            std::sync::Arc::new(PgEventStore::new(pool.clone(), sec_common::clock::system()));
        assert!(
            store.partitions().await.unwrap().len() >= 5,
            "two old months, now and ahead"
        );
        assert_eq!(store.chain_legacy_rows().await.unwrap(), 1);
        let signer = crate::verify::local::LocalSigner::new();
        let r = crate::verify::verify(store.as_ref(), signer.as_ref(), "x", 0, 0)
            .await
            .unwrap();
        assert!(r.failure.is_none(), "{r:?}");
        assert_eq!(r.records, 3);
        drop_schema(&pool, &schema).await;
    }

    #[tokio::test]
    async fn holds_postgres() {
        let Some((pool, schema)) = fresh_schema().await else {
            return;
        };
        let store =
            std::sync::Arc::new(PgEventStore::new(pool.clone(), sec_common::clock::system()));
        crate::store::retention_tests::holds(store).await;
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
