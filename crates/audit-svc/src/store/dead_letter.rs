//! The `dead_letters` table: what the ingest pipeline set aside because it can never be
//! stored in `security_events` (see `pipeline.rs`). One trait, both backends, one
//! contract test.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sec_common::clock::SharedClock;
use sec_common::events::DeadLetterReason;
use sqlx::{PgPool, SqlitePool};

use super::StoreError;

/// Longest `detail` kept, in characters (the column is `VARCHAR(256)`).
pub const MAX_DETAIL_CHARS: usize = 256;

/// One message set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    /// What was wrong, without the event's details.
    pub detail: String,
    /// The event's id when it is a UUID.
    pub event_id: Option<uuid::Uuid>,
    /// The event's type when it is well-formed.
    pub event_type: Option<String>,
    /// Position in the broker's stream (`<stream>:<sequence>`): recorded once however
    /// often the message is redelivered. `None` in process.
    pub source_key: Option<String>,
    /// The bytes as received, cut at the configured limit.
    pub payload: Vec<u8>,
    /// The full size of the payload.
    pub payload_size: usize,
}

impl DeadLetter {
    /// A row with `detail` made safe for any text column (no control characters, NUL
    /// included; at most [`MAX_DETAIL_CHARS`]) and `payload` cut at `max_payload`.
    pub fn new(
        reason: DeadLetterReason,
        detail: &str,
        event_id: Option<uuid::Uuid>,
        event_type: Option<String>,
        source_key: Option<String>,
        payload: &[u8],
        max_payload: usize,
    ) -> Self {
        Self {
            reason,
            detail: detail
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .take(MAX_DETAIL_CHARS)
                .collect(),
            event_id,
            // The column is 128 wide; a longer type is not kept rather than refused.
            event_type: event_type.filter(|t| t.len() <= 128),
            source_key,
            payload: payload[..payload.len().min(max_payload)].to_vec(),
            payload_size: payload.len(),
        }
    }
}

/// A recorded row, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub id: i64,
    pub received_us: i64,
    pub row: DeadLetter,
}

#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Records one; `false` when its `source_key` is already recorded (a redelivery).
    async fn record(&self, dead_letter: &DeadLetter) -> Result<bool, StoreError>;
    /// Count per reason (for `/security/monitor`).
    async fn counts(&self) -> Result<Vec<(DeadLetterReason, u64)>, StoreError>;
    /// Newest first.
    async fn recent(&self, limit: u32) -> Result<Vec<Recorded>, StoreError>;
}

type DbRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Vec<u8>,
    i64,
);

fn from_db(r: DbRow) -> Result<Recorded, StoreError> {
    let reason = DeadLetterReason::parse(&r.2)
        .ok_or_else(|| StoreError::Corrupt(format!("dead-letter reason `{}`", r.2)))?;
    let event_id =
        r.4.as_deref()
            .map(uuid::Uuid::parse_str)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Recorded {
        id: r.0,
        received_us: r.1,
        row: DeadLetter {
            reason,
            detail: r.3,
            event_id,
            event_type: r.5,
            source_key: r.6,
            payload: r.7,
            payload_size: usize::try_from(r.8).unwrap_or(0),
        },
    })
}

fn counts_from(rows: Vec<(String, i64)>) -> Result<Vec<(DeadLetterReason, u64)>, StoreError> {
    rows.into_iter()
        .map(|(r, n)| {
            let reason = DeadLetterReason::parse(&r)
                .ok_or_else(|| StoreError::Corrupt(format!("dead-letter reason `{r}`")))?;
            Ok((reason, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
}

fn size_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone)]
pub struct PgDeadLetters {
    pool: PgPool,
    clock: SharedClock,
}

impl PgDeadLetters {
    pub fn new(pool: PgPool, clock: SharedClock) -> Self {
        Self { pool, clock }
    }
}

#[async_trait]
impl DeadLetterStore for PgDeadLetters {
    async fn record(&self, d: &DeadLetter) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO dead_letters
               (received_at, reason, detail, event_id, event_type, source_key, payload,
                payload_size)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (source_key) DO NOTHING",
        )
        .bind(self.clock.now())
        .bind(d.reason.as_str())
        .bind(&d.detail)
        .bind(d.event_id)
        .bind(d.event_type.as_deref())
        .bind(d.source_key.as_deref())
        .bind(&d.payload)
        .bind(i32::try_from(d.payload_size).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn counts(&self) -> Result<Vec<(DeadLetterReason, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason",
        )
        .fetch_all(&self.pool)
        .await?;
        counts_from(rows)
    }

    async fn recent(&self, limit: u32) -> Result<Vec<Recorded>, StoreError> {
        let rows: Vec<(
            i64,
            DateTime<Utc>,
            String,
            String,
            Option<uuid::Uuid>,
            Option<String>,
            Option<String>,
            Vec<u8>,
            i32,
        )> = sqlx::query_as(
            "SELECT id, received_at, reason, detail, event_id, event_type, source_key, payload,
                    payload_size
             FROM dead_letters ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                from_db((
                    r.0,
                    r.1.timestamp_micros(),
                    r.2,
                    r.3,
                    r.4.map(|u| u.to_string()),
                    r.5,
                    r.6,
                    r.7,
                    i64::from(r.8),
                ))
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct SqliteDeadLetters {
    pool: SqlitePool,
    clock: SharedClock,
}

impl SqliteDeadLetters {
    pub fn new(pool: SqlitePool, clock: SharedClock) -> Self {
        Self { pool, clock }
    }
}

#[async_trait]
impl DeadLetterStore for SqliteDeadLetters {
    async fn record(&self, d: &DeadLetter) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO dead_letters
               (received_us, reason, detail, event_id, event_type, source_key, payload,
                payload_size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(self.clock.now().timestamp_micros())
        .bind(d.reason.as_str())
        .bind(&d.detail)
        .bind(d.event_id.map(|u| u.to_string()))
        .bind(d.event_type.as_deref())
        .bind(d.source_key.as_deref())
        .bind(&d.payload)
        .bind(size_i64(d.payload_size))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn counts(&self) -> Result<Vec<(DeadLetterReason, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason",
        )
        .fetch_all(&self.pool)
        .await?;
        counts_from(rows)
    }

    async fn recent(&self, limit: u32) -> Result<Vec<Recorded>, StoreError> {
        let rows: Vec<DbRow> = sqlx::query_as(
            "SELECT id, received_us, reason, detail, event_id, event_type, source_key, payload,
                    payload_size
             FROM dead_letters ORDER BY id DESC LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(from_db).collect()
    }
}

/// The contract both backends meet.
#[cfg(test)]
pub mod contract {
    use super::*;

    #[allow(clippy::unwrap_used, clippy::panic)]
    pub async fn run(store: &dyn DeadLetterStore) {
        let id = uuid::Uuid::new_v4();
        let a = DeadLetter::new(
            DeadLetterReason::Unstorable,
            "22P05: unsupported Unicode escape sequence\u{0}\n",
            Some(id),
            Some("sec.crypto.key.created".into()),
            Some("S:7".into()),
            &[0, 1, 2, 3, 4, 5],
            4,
        );
        assert_eq!(a.detail, "22P05: unsupported Unicode escape sequence??");
        assert_eq!(a.payload, [0, 1, 2, 3]);
        assert_eq!(a.payload_size, 6);
        assert!(store.record(&a).await.unwrap());
        assert!(
            !store.record(&a).await.unwrap(),
            "same source_key: a redelivery, recorded once"
        );
        let b = DeadLetter::new(
            DeadLetterReason::Undecodable,
            &"x".repeat(1000),
            None,
            Some("t".repeat(200)),
            None,
            &[0xff; 10],
            1024,
        );
        assert_eq!(b.detail.chars().count(), MAX_DETAIL_CHARS);
        assert_eq!(b.event_type, None);
        assert!(store.record(&b).await.unwrap());
        assert!(
            store.record(&b).await.unwrap(),
            "no source_key (in process): no de-duplication"
        );
        assert_eq!(
            store.counts().await.unwrap(),
            vec![
                (DeadLetterReason::Undecodable, 2),
                (DeadLetterReason::Unstorable, 1)
            ]
        );
        let recent = store.recent(10).await.unwrap();
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[2].row, a, "every field survives");
        assert_eq!(recent[0].row, b);
        assert!(recent[0].id > recent[2].id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sec_testkit::{Backend, backend_url};

    #[tokio::test]
    async fn dead_letters_sqlite() {
        let (_dir, db) = crate::test_sqlite().await;
        contract::run(crate::dead_letter_store(&db, sec_common::clock::system()).as_ref()).await;
    }

    #[tokio::test]
    async fn dead_letters_postgres() {
        let Some(url) = backend_url(Backend::Postgres) else {
            return;
        };
        let schema = format!("audit_dl{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 2)
            .await
            .unwrap();
        crate::MIGRATIONS.postgres.run(&pool).await.unwrap();
        contract::run(&PgDeadLetters::new(
            pool.clone(),
            sec_common::clock::system(),
        ))
        .await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
