//! SQLite event store (the embedded default). A batch is one transaction.

use async_trait::async_trait;
use sec_common::clock::SharedClock;
use sec_common::events::SecurityEvent;
use sqlx::SqlitePool;

use super::{
    Cursor, EventQuery, EventStore, Row, StoreError, cursor_after, from_row, like_prefix, to_row,
};

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
);

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let rows = events.iter().map(to_row).collect::<Result<Vec<Row>, _>>()?;
        let received = self.clock.now().timestamp_micros();
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        // Multi-row statements: one hop to SQLite's worker thread per 64 events instead
        // of one per event (14 parameters each, far below SQLite's 32,766).
        for chunk in rows.chunks(64) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT OR IGNORE INTO security_events
                   (id, event_type, ts_us, service, user_id, actor_kind, actor_id, subject,
                    ip_address, outcome, severity, details, trace_id, received_us) ",
            );
            q.push_values(chunk, |mut b, r| {
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
                    .push_bind(received);
            });
            inserted += q.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn list(
        &self,
        q: &EventQuery,
    ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError> {
        let limit = i64::from(q.limit.max(1));
        let rows: Vec<SqlRow> = sqlx::query_as(
            r"SELECT id, event_type, ts_us, service, user_id, actor_kind, actor_id, subject,
                     ip_address, outcome, severity, details, trace_id
              FROM security_events
              WHERE (?1 IS NULL OR event_type = ?1)
                AND (?2 IS NULL OR event_type LIKE ?2 ESCAPE '\')
                AND (?3 IS NULL OR ts_us >= ?3)
                AND (?4 IS NULL OR ts_us < ?4)
                AND (?5 IS NULL OR (ts_us, id) < (?5, ?6))
              ORDER BY ts_us DESC, id DESC
              LIMIT ?7",
        )
        .bind(q.event_type.as_deref())
        .bind(q.type_prefix.as_deref().map(like_prefix))
        .bind(q.since_us)
        .bind(q.until_us)
        .bind(q.after.map(|c| c.time_us))
        .bind(q.after.map(|c| c.id.to_string()))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() as i64 > limit;
        let events = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| {
                let id =
                    uuid::Uuid::parse_str(&r.0).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let user_id = r.4.as_deref().and_then(|u| uuid::Uuid::parse_str(u).ok());
                from_row(Row {
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
}
