//! PostgreSQL event store. Batches go in as one `INSERT … SELECT FROM UNNEST(…)`
//! statement: one round trip per batch, whatever its size.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sec_common::clock::SharedClock;
use sec_common::events::SecurityEvent;
use sqlx::PgPool;

use super::{
    Cursor, EventQuery, EventStore, Row, StoreError, cursor_after, from_row, like_prefix, to_row,
};

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
);

#[async_trait]
impl EventStore for PgEventStore {
    async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let rows = events.iter().map(to_row).collect::<Result<Vec<Row>, _>>()?;
        let times = rows
            .iter()
            .map(|r| ts(r.time_us))
            .collect::<Result<Vec<_>, _>>()?;
        let col = |f: fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
        let result = sqlx::query(
            r#"INSERT INTO security_events
                 (id, event_type, "timestamp", service, user_id, actor_kind, actor_id, subject,
                  ip_address, outcome, severity, details, trace_id, received_at)
               SELECT id, event_type, ts, service, user_id, actor_kind, actor_id, subject,
                      ip::inet, outcome, severity, details::jsonb, trace_id, $14::timestamptz
               FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::uuid[],
                           $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                           $11::text[], $12::text[], $13::text[])
                 AS t(id, event_type, ts, service, user_id, actor_kind, actor_id, subject,
                      ip, outcome, severity, details, trace_id)
               ON CONFLICT (id) DO NOTHING"#,
        )
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(col(|r| r.event_type.clone()))
        .bind(times)
        .bind(col(|r| r.service.clone()))
        .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
        .bind(col(|r| r.actor_kind.clone()))
        .bind(col(|r| r.actor_id.clone()))
        .bind(col(|r| r.subject.clone()))
        .bind(
            rows.iter()
                .map(|r| r.ip_address.clone())
                .collect::<Vec<_>>(),
        )
        .bind(col(|r| r.outcome.clone()))
        .bind(col(|r| r.severity.clone()))
        .bind(col(|r| r.details.clone()))
        .bind(col(|r| r.trace_id.clone()))
        .bind(self.clock.now())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn list(
        &self,
        q: &EventQuery,
    ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError> {
        let limit = i64::from(q.limit.max(1));
        let since = q.since_us.map(ts).transpose()?;
        let until = q.until_us.map(ts).transpose()?;
        let after_t = q.after.map(|c| ts(c.time_us)).transpose()?;
        let rows: Vec<PgRow> = sqlx::query_as(
            r#"SELECT id, event_type, "timestamp", service, user_id, actor_kind, actor_id, subject,
                      host(ip_address), outcome, severity, details::text, trace_id
               FROM security_events
               WHERE ($1::text IS NULL OR event_type = $1)
                 AND ($2::text IS NULL OR event_type LIKE $2 ESCAPE '\')
                 AND ($3::timestamptz IS NULL OR "timestamp" >= $3)
                 AND ($4::timestamptz IS NULL OR "timestamp" < $4)
                 AND ($5::timestamptz IS NULL OR ("timestamp", id) < ($5, $6::uuid))
               ORDER BY "timestamp" DESC, id DESC
               LIMIT $7"#,
        )
        .bind(q.event_type.as_deref())
        .bind(q.type_prefix.as_deref().map(like_prefix))
        .bind(since)
        .bind(until)
        .bind(after_t)
        .bind(q.after.map(|c| c.id))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() as i64 > limit;
        let events = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| {
                from_row(Row {
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
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cursor = cursor_after(more, &events);
        Ok((events, cursor))
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
}
