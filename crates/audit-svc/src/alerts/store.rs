//! The alert tables: one trait, both backends; `alerts/tests.rs` runs the same suite on
//! both (SQLite always, PostgreSQL when reachable).
//!
//! Counting is always a query on `security_events` ([`AlertStore::hits`]), so what a
//! replica decides depends only on what is committed, never on what it saw in memory.
//! The unique partial index `alerts_open_idx` (rule, group_key) WHERE status = 'open' is
//! what makes "raise once while open" hold across replicas: [`AlertStore::record`] tries
//! the insert, and when another transaction already holds the open alert it updates
//! that one instead.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, SqlitePool};

use super::{GroupBy, Rule};
use crate::store::{Cursor, StoreError, TypeMatch, like_prefix};

/// Most events linked to one alert.
pub const MAX_LINKED_EVENTS: i64 = 100;
/// Longest `last_error` kept.
const MAX_ERROR_CHARS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStatus {
    Open,
    Acknowledged,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "open" => Ok(Self::Open),
            "acknowledged" => Ok(Self::Acknowledged),
            other => Err(StoreError::Corrupt(format!("alert status `{other}`"))),
        }
    }
}

/// A stored alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub id: uuid::Uuid,
    pub rule: String,
    pub group_key: String,
    pub severity: String,
    pub status: AlertStatus,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
    /// Matching events of the group from `first_seen` to `last_seen` (recounted from the
    /// store at each update, never decreasing).
    pub count: u64,
    pub raised_us: i64,
    pub acknowledged_us: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub note: Option<String>,
    /// Linked events, oldest first, at most about [`MAX_LINKED_EVENTS`].
    pub event_ids: Vec<uuid::Uuid>,
}

/// Which alerts to list: newest raised first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertQuery {
    pub status: Option<AlertStatus>,
    pub rule: Option<String>,
    /// (raised time, id) of the last alert of the previous page.
    pub after: Option<Cursor>,
    pub limit: u32,
}

/// A group seen in a batch, and the time its window ends at (its newest event there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub group: String,
    pub at_us: i64,
}

/// A group whose window holds at least the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub group: String,
    pub count: u64,
    pub first_us: i64,
    pub last_us: i64,
}

/// The alert to insert when the group has no open alert.
#[derive(Debug, Clone)]
pub struct NewAlert {
    pub id: uuid::Uuid,
    pub raised_us: i64,
    /// One delivery per configured webhook, queued in the same transaction.
    pub deliveries: Vec<NewDelivery>,
}

#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: uuid::Uuid,
    pub webhook: String,
    pub body: String,
}

/// What [`AlertStore::record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A new alert (the [`NewAlert`]) was raised.
    Raised,
    /// The group's open alert (this id) was updated.
    Updated(uuid::Uuid),
}

/// What [`AlertStore::acknowledge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Done(Box<Alert>),
    /// It exists but is not open (someone acknowledged it first).
    NotOpen,
    NotFound,
}

/// A delivery taken for an attempt; `attempts` counts this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: uuid::Uuid,
    pub alert_id: uuid::Uuid,
    pub webhook: String,
    pub body: String,
    pub attempts: u32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Delivered,
    Retry { next_us: i64, error: String },
    Failed { error: String },
}

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    pub id: uuid::Uuid,
    pub alert_id: uuid::Uuid,
    pub webhook: String,
    pub status: String,
    pub attempts: u32,
    pub next_attempt_us: i64,
    pub last_error: Option<String>,
}

#[async_trait]
pub trait AlertStore: Send + Sync + 'static {
    /// ONE query: for each candidate group, the events of `rule` in
    /// `(at - window, at]` that no acknowledged alert of the group already covered
    /// (newer than its `last_seen`); the groups with at least `threshold` of them.
    async fn hits(&self, rule: &Rule, candidates: &[Candidate]) -> Result<Vec<Hit>, StoreError>;
    /// Raises `new` for `hit`, or, when the group already has an open alert, updates
    /// that one (last_seen, recounted count); then links the events, both in one
    /// transaction with the queued deliveries.
    async fn record(&self, rule: &Rule, hit: &Hit, new: &NewAlert) -> Result<Recorded, StoreError>;
    async fn list(&self, q: &AlertQuery) -> Result<(Vec<Alert>, Option<Cursor>), StoreError>;
    async fn get(&self, id: uuid::Uuid) -> Result<Option<Alert>, StoreError>;
    /// Compare-and-set: only an open alert is acknowledged.
    async fn acknowledge(
        &self,
        id: uuid::Uuid,
        by: &str,
        note: &str,
        at_us: i64,
    ) -> Result<Ack, StoreError>;
    async fn open_count(&self) -> Result<u64, StoreError>;
    /// Pending deliveries due at `now_us`, at most `limit`; each is leased until
    /// `lease_until_us` (another replica will not take it meanwhile) and its attempt
    /// counted.
    async fn claim_due(
        &self,
        now_us: i64,
        lease_until_us: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// Records how the attempt ended; `false` when the row moved on meanwhile (another
    /// worker took it after the lease ran out).
    async fn finish(&self, c: &Claimed, how: &Finish, at_us: i64) -> Result<bool, StoreError>;
    async fn deliveries(&self, alert_id: uuid::Uuid) -> Result<Vec<DeliveryRow>, StoreError>;
}

fn cut_error(e: &str) -> String {
    e.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_ERROR_CHARS)
        .collect()
}

fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v}")))
}

fn u32_of(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v}")))
}

fn type_pattern(t: &TypeMatch) -> String {
    match t {
        TypeMatch::Exact(t) => t.clone(),
        TypeMatch::Prefix(p) => like_prefix(p),
    }
}

fn cursor_of(more: bool, alerts: &[Alert]) -> Option<Cursor> {
    let last = alerts.last().filter(|_| more)?;
    Some(Cursor {
        time_us: last.raised_us,
        id: last.id,
    })
}

/// The status to store for an attempt's end, with its error.
fn finish_parts(how: &Finish) -> (&'static str, Option<String>) {
    match how {
        Finish::Delivered => ("delivered", None),
        Finish::Retry { error, .. } => ("pending", Some(cut_error(error))),
        Finish::Failed { error } => ("failed", Some(cut_error(error))),
    }
}

// ---------------------------------------------------------------------------- PostgreSQL

#[derive(Debug, Clone)]
pub struct PgAlerts {
    pool: PgPool,
}

impl PgAlerts {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn ts(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt("time out of range".into()))
}

/// `(type condition, group expression)` over `security_events` with the type pattern
/// bound at `$type_n` and a detail key (if any) at `$key_n`.
fn pg_filter(rule: &Rule, type_n: u8, key_n: u8) -> (String, String) {
    let t = match rule.types {
        TypeMatch::Exact(_) => format!("event_type = ${type_n}"),
        TypeMatch::Prefix(_) => format!(r"event_type LIKE ${type_n} ESCAPE '\'"),
    };
    let g = match rule.group {
        GroupBy::ActorId => "actor_id".to_owned(),
        GroupBy::Subject => "subject".to_owned(),
        GroupBy::Service => "service".to_owned(),
        GroupBy::IpAddress => "host(ip_address)".to_owned(),
        GroupBy::Detail(_) => format!("(details ->> ${key_n})"),
    };
    (t, g)
}

fn detail_key(rule: &Rule) -> Option<String> {
    match &rule.group {
        GroupBy::Detail(k) => Some(k.clone()),
        _ => None,
    }
}

const PG_ALERT_COLUMNS: &str = "id, rule, group_key, severity, status, first_seen, last_seen, count, raised_at, acknowledged_at, acknowledged_by, note";

type PgAlertRow = (
    uuid::Uuid,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    i64,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
);

fn pg_alert(r: PgAlertRow) -> Result<Alert, StoreError> {
    Ok(Alert {
        id: r.0,
        rule: r.1,
        group_key: r.2,
        severity: r.3,
        status: AlertStatus::parse(&r.4)?,
        first_seen_us: r.5.timestamp_micros(),
        last_seen_us: r.6.timestamp_micros(),
        count: u64_of(r.7, "count")?,
        raised_us: r.8.timestamp_micros(),
        acknowledged_us: r.9.map(|t| t.timestamp_micros()),
        acknowledged_by: r.10,
        note: r.11,
        event_ids: Vec::new(),
    })
}

impl PgAlerts {
    async fn with_events(&self, mut alerts: Vec<Alert>) -> Result<Vec<Alert>, StoreError> {
        if alerts.is_empty() {
            return Ok(alerts);
        }
        let ids: Vec<uuid::Uuid> = alerts.iter().map(|a| a.id).collect();
        let links: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
            r#"SELECT l.alert_id, l.event_id FROM alert_events l
               LEFT JOIN security_events e ON e.id = l.event_id
               WHERE l.alert_id = ANY($1)
               ORDER BY l.alert_id, e."timestamp", l.event_id"#,
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        for (a, e) in links {
            if let Some(alert) = alerts.iter_mut().find(|x| x.id == a) {
                alert.event_ids.push(e);
            }
        }
        Ok(alerts)
    }
}

#[async_trait]
impl AlertStore for PgAlerts {
    async fn hits(&self, rule: &Rule, candidates: &[Candidate]) -> Result<Vec<Hit>, StoreError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let w = rule.window_us();
        let groups: Vec<String> = candidates.iter().map(|c| c.group.clone()).collect();
        let lo = candidates
            .iter()
            .map(|c| ts(c.at_us.saturating_sub(w)))
            .collect::<Result<Vec<_>, _>>()?;
        let hi = candidates
            .iter()
            .map(|c| ts(c.at_us))
            .collect::<Result<Vec<_>, _>>()?;
        let min_lo = lo.iter().min().copied().unwrap_or_default();
        let max_hi = hi.iter().max().copied().unwrap_or_default();
        let (t, g) = pg_filter(rule, 8, 9);
        let sql = format!(
            r#"WITH b AS (SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[])
                          AS b(g, lo, hi)),
                 cut AS (SELECT group_key, max(last_seen) AS cut FROM alerts
                         WHERE rule = $4 AND status = 'acknowledged' AND group_key = ANY($1)
                         GROUP BY group_key),
                 e AS (SELECT "timestamp" AS ts, {g} AS g FROM security_events
                       WHERE {t} AND "timestamp" > $5 AND "timestamp" <= $6 AND {g} = ANY($1))
               SELECT b.g, count(*), min(e.ts), max(e.ts)
               FROM b JOIN e ON e.g = b.g AND e.ts > b.lo AND e.ts <= b.hi
               LEFT JOIN cut ON cut.group_key = b.g
               WHERE cut.cut IS NULL OR e.ts > cut.cut
               GROUP BY b.g HAVING count(*) >= $7"#
        );
        let mut q = sqlx::query_as::<_, (String, i64, DateTime<Utc>, DateTime<Utc>)>(
            sqlx::AssertSqlSafe(sql),
        )
        .bind(&groups)
        .bind(&lo)
        .bind(&hi)
        .bind(&rule.name)
        .bind(min_lo)
        .bind(max_hi)
        .bind(i64::from(rule.threshold))
        .bind(type_pattern(&rule.types));
        if let Some(k) = detail_key(rule) {
            q = q.bind(k);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|(group, n, first, last)| {
                Ok(Hit {
                    group,
                    count: u64_of(n, "count")?,
                    first_us: first.timestamp_micros(),
                    last_us: last.timestamp_micros(),
                })
            })
            .collect()
    }

    async fn record(&self, rule: &Rule, hit: &Hit, new: &NewAlert) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut outcome = None;
        // The open alert can be acknowledged between the insert and the update: try
        // again, a few times at most.
        for _ in 0..3 {
            let raised: Option<(uuid::Uuid,)> = sqlx::query_as(
                "INSERT INTO alerts (id, rule, group_key, severity, status, first_seen, last_seen,
                                     count, raised_at)
                 VALUES ($1, $2, $3, $4, 'open', $5, $6, $7, $8)
                 ON CONFLICT (rule, group_key) WHERE status = 'open' DO NOTHING
                 RETURNING id",
            )
            .bind(new.id)
            .bind(&rule.name)
            .bind(&hit.group)
            .bind(rule.severity)
            .bind(ts(hit.first_us)?)
            .bind(ts(hit.last_us)?)
            .bind(i64::try_from(hit.count).unwrap_or(i64::MAX))
            .bind(ts(new.raised_us)?)
            .fetch_optional(&mut *tx)
            .await?;
            if raised.is_some() {
                for d in &new.deliveries {
                    sqlx::query(
                        "INSERT INTO alert_webhook_deliveries
                           (id, alert_id, webhook, body, status, attempts, next_attempt_at, created_at)
                         VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)",
                    )
                    .bind(d.id)
                    .bind(new.id)
                    .bind(&d.webhook)
                    .bind(&d.body)
                    .bind(ts(new.raised_us)?)
                    .execute(&mut *tx)
                    .await?;
                }
                outcome = Some((Recorded::Raised, new.id, hit.first_us));
                break;
            }
            let (t, g) = pg_filter(rule, 4, 5);
            let sql = format!(
                r#"UPDATE alerts a SET
                     last_seen = GREATEST(a.last_seen, $3),
                     count = GREATEST(a.count, (
                       SELECT count(*) FROM security_events
                       WHERE {t} AND {g} = a.group_key
                         AND "timestamp" >= a.first_seen
                         AND "timestamp" <= GREATEST(a.last_seen, $3)))
                   WHERE a.rule = $1 AND a.group_key = $2 AND a.status = 'open'
                   RETURNING a.id, a.first_seen"#
            );
            let mut q = sqlx::query_as::<_, (uuid::Uuid, DateTime<Utc>)>(sqlx::AssertSqlSafe(sql))
                .bind(&rule.name)
                .bind(&hit.group)
                .bind(ts(hit.last_us)?)
                .bind(type_pattern(&rule.types));
            if let Some(k) = detail_key(rule) {
                q = q.bind(k);
            }
            if let Some((id, first)) = q.fetch_optional(&mut *tx).await? {
                outcome = Some((Recorded::Updated(id), id, first.timestamp_micros()));
                break;
            }
        }
        let Some((recorded, id, first_us)) = outcome else {
            return Err(StoreError::Corrupt(
                "the group's open alert kept changing; evaluated again with the next batch".into(),
            ));
        };
        let (linked,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM alert_events WHERE alert_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        if linked < MAX_LINKED_EVENTS {
            let (t, g) = pg_filter(rule, 6, 7);
            let sql = format!(
                r#"INSERT INTO alert_events (alert_id, event_id)
                   SELECT $1, id FROM security_events
                   WHERE {t} AND {g} = $2 AND "timestamp" >= $3 AND "timestamp" <= $4
                     AND id NOT IN (SELECT event_id FROM alert_events WHERE alert_id = $1)
                   ORDER BY "timestamp", id LIMIT $5
                   ON CONFLICT DO NOTHING"#
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .bind(&hit.group)
                .bind(ts(first_us)?)
                .bind(ts(hit.last_us)?)
                .bind(MAX_LINKED_EVENTS - linked)
                .bind(type_pattern(&rule.types));
            if let Some(k) = detail_key(rule) {
                q = q.bind(k);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn list(&self, q: &AlertQuery) -> Result<(Vec<Alert>, Option<Cursor>), StoreError> {
        let limit = i64::from(q.limit.max(1));
        let mut b = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "SELECT {PG_ALERT_COLUMNS} FROM alerts WHERE TRUE"
        ));
        if let Some(s) = q.status {
            b.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(r) = &q.rule {
            b.push(" AND rule = ").push_bind(r.clone());
        }
        if let Some(c) = &q.after {
            b.push(" AND (raised_at, id) < (")
                .push_bind(ts(c.time_us)?)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        b.push(" ORDER BY raised_at DESC, id DESC LIMIT ")
            .push_bind(limit + 1);
        let rows: Vec<PgAlertRow> = b.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() as i64 > limit;
        let alerts = rows
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(pg_alert)
            .collect::<Result<Vec<_>, _>>()?;
        let alerts = self.with_events(alerts).await?;
        let next = cursor_of(more, &alerts);
        Ok((alerts, next))
    }

    async fn get(&self, id: uuid::Uuid) -> Result<Option<Alert>, StoreError> {
        let row: Option<PgAlertRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PG_ALERT_COLUMNS} FROM alerts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(self.with_events(vec![pg_alert(r)?]).await?.pop()),
            None => Ok(None),
        }
    }

    async fn acknowledge(
        &self,
        id: uuid::Uuid,
        by: &str,
        note: &str,
        at_us: i64,
    ) -> Result<Ack, StoreError> {
        let done = sqlx::query(
            "UPDATE alerts SET status = 'acknowledged', acknowledged_at = $2,
                               acknowledged_by = $3, note = $4
             WHERE id = $1 AND status = 'open'",
        )
        .bind(id)
        .bind(ts(at_us)?)
        .bind(by)
        .bind(note)
        .execute(&self.pool)
        .await?
        .rows_affected();
        match self.get(id).await? {
            Some(a) if done == 1 => Ok(Ack::Done(Box::new(a))),
            Some(_) => Ok(Ack::NotOpen),
            None => Ok(Ack::NotFound),
        }
    }

    async fn open_count(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM alerts WHERE status = 'open'")
            .fetch_one(&self.pool)
            .await?;
        u64_of(n, "count")
    }

    async fn claim_due(
        &self,
        now_us: i64,
        lease_until_us: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows: Vec<(uuid::Uuid, uuid::Uuid, String, String, i32)> = sqlx::query_as(
            "UPDATE alert_webhook_deliveries SET next_attempt_at = $2, attempts = attempts + 1
             WHERE id IN (SELECT id FROM alert_webhook_deliveries
                          WHERE status = 'pending' AND next_attempt_at <= $1
                          ORDER BY next_attempt_at LIMIT $3
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, alert_id, webhook, body, attempts",
        )
        .bind(ts(now_us)?)
        .bind(ts(lease_until_us)?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.0,
                    alert_id: r.1,
                    webhook: r.2,
                    body: r.3,
                    attempts: u32_of(i64::from(r.4), "attempts")?,
                })
            })
            .collect()
    }

    async fn finish(&self, c: &Claimed, how: &Finish, at_us: i64) -> Result<bool, StoreError> {
        let (status, error) = finish_parts(how);
        let next = match how {
            Finish::Retry { next_us, .. } => *next_us,
            _ => at_us,
        };
        let finished = (status != "pending").then_some(at_us).map(ts).transpose()?;
        let n = sqlx::query(
            "UPDATE alert_webhook_deliveries
             SET status = $3, next_attempt_at = $4, last_error = $5, finished_at = $6
             WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .bind(c.id)
        .bind(i32::try_from(c.attempts).unwrap_or(i32::MAX))
        .bind(status)
        .bind(ts(next)?)
        .bind(error)
        .bind(finished)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn deliveries(&self, alert_id: uuid::Uuid) -> Result<Vec<DeliveryRow>, StoreError> {
        let rows: Vec<(
            uuid::Uuid,
            uuid::Uuid,
            String,
            String,
            i32,
            DateTime<Utc>,
            Option<String>,
        )> = sqlx::query_as(
            "SELECT id, alert_id, webhook, status, attempts, next_attempt_at, last_error
                 FROM alert_webhook_deliveries WHERE alert_id = $1 ORDER BY webhook",
        )
        .bind(alert_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeliveryRow {
                    id: r.0,
                    alert_id: r.1,
                    webhook: r.2,
                    status: r.3,
                    attempts: u32_of(i64::from(r.4), "attempts")?,
                    next_attempt_us: r.5.timestamp_micros(),
                    last_error: r.6,
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------- SQLite

#[derive(Debug, Clone)]
pub struct SqliteAlerts {
    pool: SqlitePool,
}

impl SqliteAlerts {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

/// As [`pg_filter`]; the detail key is bound as a JSON path.
fn lite_filter(rule: &Rule, type_n: u8, key_n: u8) -> (String, String) {
    let t = match rule.types {
        TypeMatch::Exact(_) => format!("event_type = ?{type_n}"),
        TypeMatch::Prefix(_) => format!(r"event_type LIKE ?{type_n} ESCAPE '\'"),
    };
    let g = match rule.group {
        GroupBy::ActorId => "actor_id".to_owned(),
        GroupBy::Subject => "subject".to_owned(),
        GroupBy::Service => "service".to_owned(),
        GroupBy::IpAddress => "ip_address".to_owned(),
        GroupBy::Detail(_) => format!("json_extract(details, ?{key_n})"),
    };
    (t, g)
}

/// `$."key"`: the key's characters (`[A-Za-z0-9_.-]`) need no escaping inside quotes.
fn lite_path(rule: &Rule) -> Option<String> {
    detail_key(rule).map(|k| format!("$.\"{k}\""))
}

fn lite_uuid(s: &str) -> Result<uuid::Uuid, StoreError> {
    uuid::Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("uuid: {e}")))
}

const LITE_ALERT_COLUMNS: &str = "id, rule, group_key, severity, status, first_seen_us, last_seen_us, count, raised_us, acknowledged_us, acknowledged_by, note";

type LiteAlertRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
);

fn lite_alert(r: LiteAlertRow) -> Result<Alert, StoreError> {
    Ok(Alert {
        id: lite_uuid(&r.0)?,
        rule: r.1,
        group_key: r.2,
        severity: r.3,
        status: AlertStatus::parse(&r.4)?,
        first_seen_us: r.5,
        last_seen_us: r.6,
        count: u64_of(r.7, "count")?,
        raised_us: r.8,
        acknowledged_us: r.9,
        acknowledged_by: r.10,
        note: r.11,
        event_ids: Vec::new(),
    })
}

impl SqliteAlerts {
    async fn with_events(&self, mut alerts: Vec<Alert>) -> Result<Vec<Alert>, StoreError> {
        if alerts.is_empty() {
            return Ok(alerts);
        }
        let ids =
            serde_json::to_string(&alerts.iter().map(|a| a.id.to_string()).collect::<Vec<_>>())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let links: Vec<(String, String)> = sqlx::query_as(
            "SELECT l.alert_id, l.event_id FROM alert_events l
             LEFT JOIN security_events e ON e.id = l.event_id
             WHERE l.alert_id IN (SELECT value FROM json_each(?1))
             ORDER BY l.alert_id, e.ts_us, l.event_id",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        for (a, e) in links {
            let (a, e) = (lite_uuid(&a)?, lite_uuid(&e)?);
            if let Some(alert) = alerts.iter_mut().find(|x| x.id == a) {
                alert.event_ids.push(e);
            }
        }
        Ok(alerts)
    }
}

#[async_trait]
impl AlertStore for SqliteAlerts {
    async fn hits(&self, rule: &Rule, candidates: &[Candidate]) -> Result<Vec<Hit>, StoreError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let w = rule.window_us();
        let b: Vec<(String, i64, i64)> = candidates
            .iter()
            .map(|c| (c.group.clone(), c.at_us.saturating_sub(w), c.at_us))
            .collect();
        let min_lo = b.iter().map(|c| c.1).min().unwrap_or_default();
        let max_hi = b.iter().map(|c| c.2).max().unwrap_or_default();
        let b = serde_json::to_string(&b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (t, g) = lite_filter(rule, 6, 7);
        let sql = format!(
            "WITH b AS (SELECT json_extract(value, '$[0]') AS g, json_extract(value, '$[1]') AS lo,
                               json_extract(value, '$[2]') AS hi FROM json_each(?1)),
                  cut AS (SELECT group_key, max(last_seen_us) AS cut FROM alerts
                          WHERE rule = ?2 AND status = 'acknowledged'
                            AND group_key IN (SELECT g FROM b)
                          GROUP BY group_key),
                  e AS (SELECT ts_us AS ts, {g} AS g FROM security_events
                        WHERE {t} AND ts_us > ?3 AND ts_us <= ?4)
             SELECT b.g, count(*), min(e.ts), max(e.ts)
             FROM b JOIN e ON e.g = b.g AND e.ts > b.lo AND e.ts <= b.hi
             LEFT JOIN cut ON cut.group_key = b.g
             WHERE cut.cut IS NULL OR e.ts > cut.cut
             GROUP BY b.g HAVING count(*) >= ?5"
        );
        let mut q = sqlx::query_as::<_, (String, i64, i64, i64)>(sqlx::AssertSqlSafe(sql))
            .bind(b)
            .bind(&rule.name)
            .bind(min_lo)
            .bind(max_hi)
            .bind(i64::from(rule.threshold))
            .bind(type_pattern(&rule.types));
        if let Some(p) = lite_path(rule) {
            q = q.bind(p);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|(group, n, first_us, last_us)| {
                Ok(Hit {
                    group,
                    count: u64_of(n, "count")?,
                    first_us,
                    last_us,
                })
            })
            .collect()
    }

    async fn record(&self, rule: &Rule, hit: &Hit, new: &NewAlert) -> Result<Recorded, StoreError> {
        // BEGIN IMMEDIATE: the write lock from the first statement, so nothing changes
        // between the insert attempt and the update.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let raised: Option<(String,)> = sqlx::query_as(
            "INSERT INTO alerts (id, rule, group_key, severity, status, first_seen_us,
                                 last_seen_us, count, raised_us)
             VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7, ?8)
             ON CONFLICT (rule, group_key) WHERE status = 'open' DO NOTHING
             RETURNING id",
        )
        .bind(new.id.to_string())
        .bind(&rule.name)
        .bind(&hit.group)
        .bind(rule.severity)
        .bind(hit.first_us)
        .bind(hit.last_us)
        .bind(i64::try_from(hit.count).unwrap_or(i64::MAX))
        .bind(new.raised_us)
        .fetch_optional(&mut *tx)
        .await?;
        let (recorded, id, first_us) = if raised.is_some() {
            for d in &new.deliveries {
                sqlx::query(
                    "INSERT INTO alert_webhook_deliveries
                       (id, alert_id, webhook, body, status, attempts, next_attempt_us, created_us)
                     VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5)",
                )
                .bind(d.id.to_string())
                .bind(new.id.to_string())
                .bind(&d.webhook)
                .bind(&d.body)
                .bind(new.raised_us)
                .execute(&mut *tx)
                .await?;
            }
            (Recorded::Raised, new.id, hit.first_us)
        } else {
            let (t, g) = lite_filter(rule, 4, 5);
            let sql = format!(
                "UPDATE alerts SET
                   last_seen_us = max(last_seen_us, ?3),
                   count = max(count, (
                     SELECT count(*) FROM security_events
                     WHERE {t} AND {g} = alerts.group_key
                       AND ts_us >= alerts.first_seen_us
                       AND ts_us <= max(alerts.last_seen_us, ?3)))
                 WHERE rule = ?1 AND group_key = ?2 AND status = 'open'
                 RETURNING id, first_seen_us"
            );
            let mut q = sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql))
                .bind(&rule.name)
                .bind(&hit.group)
                .bind(hit.last_us)
                .bind(type_pattern(&rule.types));
            if let Some(p) = lite_path(rule) {
                q = q.bind(p);
            }
            let (id, first) = q.fetch_one(&mut *tx).await?;
            let id = lite_uuid(&id)?;
            (Recorded::Updated(id), id, first)
        };
        let (linked,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM alert_events WHERE alert_id = ?1")
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await?;
        if linked < MAX_LINKED_EVENTS {
            let (t, g) = lite_filter(rule, 6, 7);
            let sql = format!(
                "INSERT OR IGNORE INTO alert_events (alert_id, event_id)
                 SELECT ?1, id FROM security_events
                 WHERE {t} AND {g} = ?2 AND ts_us >= ?3 AND ts_us <= ?4
                   AND id NOT IN (SELECT event_id FROM alert_events WHERE alert_id = ?1)
                 ORDER BY ts_us, id LIMIT ?5"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id.to_string())
                .bind(&hit.group)
                .bind(first_us)
                .bind(hit.last_us)
                .bind(MAX_LINKED_EVENTS - linked)
                .bind(type_pattern(&rule.types));
            if let Some(p) = lite_path(rule) {
                q = q.bind(p);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn list(&self, q: &AlertQuery) -> Result<(Vec<Alert>, Option<Cursor>), StoreError> {
        let limit = i64::from(q.limit.max(1));
        let mut b = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "SELECT {LITE_ALERT_COLUMNS} FROM alerts WHERE 1"
        ));
        if let Some(s) = q.status {
            b.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(r) = &q.rule {
            b.push(" AND rule = ").push_bind(r.clone());
        }
        if let Some(c) = &q.after {
            b.push(" AND (raised_us, id) < (")
                .push_bind(c.time_us)
                .push(", ")
                .push_bind(c.id.to_string())
                .push(")");
        }
        b.push(" ORDER BY raised_us DESC, id DESC LIMIT ")
            .push_bind(limit + 1);
        let rows: Vec<LiteAlertRow> = b.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() as i64 > limit;
        let alerts = rows
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(lite_alert)
            .collect::<Result<Vec<_>, _>>()?;
        let alerts = self.with_events(alerts).await?;
        let next = cursor_of(more, &alerts);
        Ok((alerts, next))
    }

    async fn get(&self, id: uuid::Uuid) -> Result<Option<Alert>, StoreError> {
        let row: Option<LiteAlertRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {LITE_ALERT_COLUMNS} FROM alerts WHERE id = ?1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(self.with_events(vec![lite_alert(r)?]).await?.pop()),
            None => Ok(None),
        }
    }

    async fn acknowledge(
        &self,
        id: uuid::Uuid,
        by: &str,
        note: &str,
        at_us: i64,
    ) -> Result<Ack, StoreError> {
        let done = sqlx::query(
            "UPDATE alerts SET status = 'acknowledged', acknowledged_us = ?2,
                               acknowledged_by = ?3, note = ?4
             WHERE id = ?1 AND status = 'open'",
        )
        .bind(id.to_string())
        .bind(at_us)
        .bind(by)
        .bind(note)
        .execute(&self.pool)
        .await?
        .rows_affected();
        match self.get(id).await? {
            Some(a) if done == 1 => Ok(Ack::Done(Box::new(a))),
            Some(_) => Ok(Ack::NotOpen),
            None => Ok(Ack::NotFound),
        }
    }

    async fn open_count(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM alerts WHERE status = 'open'")
            .fetch_one(&self.pool)
            .await?;
        u64_of(n, "count")
    }

    async fn claim_due(
        &self,
        now_us: i64,
        lease_until_us: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "UPDATE alert_webhook_deliveries SET next_attempt_us = ?2, attempts = attempts + 1
             WHERE id IN (SELECT id FROM alert_webhook_deliveries
                          WHERE status = 'pending' AND next_attempt_us <= ?1
                          ORDER BY next_attempt_us LIMIT ?3)
             RETURNING id, alert_id, webhook, body, attempts",
        )
        .bind(now_us)
        .bind(lease_until_us)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Claimed {
                    id: lite_uuid(&r.0)?,
                    alert_id: lite_uuid(&r.1)?,
                    webhook: r.2,
                    body: r.3,
                    attempts: u32_of(r.4, "attempts")?,
                })
            })
            .collect()
    }

    async fn finish(&self, c: &Claimed, how: &Finish, at_us: i64) -> Result<bool, StoreError> {
        let (status, error) = finish_parts(how);
        let next = match how {
            Finish::Retry { next_us, .. } => *next_us,
            _ => at_us,
        };
        let finished = (status != "pending").then_some(at_us);
        let n = sqlx::query(
            "UPDATE alert_webhook_deliveries
             SET status = ?3, next_attempt_us = ?4, last_error = ?5, finished_us = ?6
             WHERE id = ?1 AND attempts = ?2 AND status = 'pending'",
        )
        .bind(c.id.to_string())
        .bind(i64::from(c.attempts))
        .bind(status)
        .bind(next)
        .bind(error)
        .bind(finished)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn deliveries(&self, alert_id: uuid::Uuid) -> Result<Vec<DeliveryRow>, StoreError> {
        let rows: Vec<(String, String, String, String, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, alert_id, webhook, status, attempts, next_attempt_us, last_error
                 FROM alert_webhook_deliveries WHERE alert_id = ?1 ORDER BY webhook",
        )
        .bind(alert_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeliveryRow {
                    id: lite_uuid(&r.0)?,
                    alert_id: lite_uuid(&r.1)?,
                    webhook: r.2,
                    status: r.3,
                    attempts: u32_of(r.4, "attempts")?,
                    next_attempt_us: r.5,
                    last_error: r.6,
                })
            })
            .collect()
    }
}
