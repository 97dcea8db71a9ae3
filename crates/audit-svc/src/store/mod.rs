//! Where the audit trail lives. One trait, two implementations (PostgreSQL, SQLite),
//! one contract suite ([`contract`]) that both must pass.

pub mod dead_letter;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
pub mod chain_tests;
#[cfg(test)]
pub mod retention_tests;

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use sec_common::events::{ActorKind, Outcome, SecurityEvent, Severity};

use crate::chain::{Chained, Checkpoint, Hash, Head, Prune, PruneRun};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    /// Something the write needs first is unavailable (the sensitive fields' HMACs).
    #[error("{0}")]
    Dependency(String),
}

/// Position after the last event of a page (events are ordered newest first by time, then id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub time_us: i64,
    pub id: uuid::Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.time_us, self.id))
    }

    pub fn decode(token: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (t, id) = raw.split_once(':')?;
        Some(Self {
            time_us: t.parse().ok()?,
            id: uuid::Uuid::parse_str(id).ok()?,
        })
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Exact type.
    pub event_type: Option<String>,
    /// Type prefix (from `sec.crypto.*`).
    pub type_prefix: Option<String>,
    /// Inclusive lower bound, microseconds since the epoch.
    pub since_us: Option<i64>,
    /// Exclusive upper bound.
    pub until_us: Option<i64>,
    /// Any of these types (SearchEvents).
    pub types: Vec<TypeMatch>,
    pub actor_id: Option<String>,
    pub subject: Option<String>,
    /// An address is a /32 or /128.
    pub ip: Option<ipnet::IpNet>,
    /// Any of these (stored names: `high`, `denied`, ...).
    pub severities: Vec<String>,
    pub outcomes: Vec<String>,
    pub service: Option<String>,
    /// Details that must match: (key, any of these values). Keys are
    /// `[A-Za-z0-9_.-]{1,64}`; a sensitive field has one value per key version.
    pub details: Vec<(String, Vec<String>)>,
    /// Any of these ids (the events linked to an alert); empty: any id.
    pub ids: Vec<uuid::Uuid>,
    /// Oldest first (the cursor then moves forward in time).
    pub oldest_first: bool,
    pub after: Option<Cursor>,
    pub limit: u32,
}

/// One accepted event type: exact, or a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeMatch {
    Exact(String),
    Prefix(String),
}

/// The 16-byte form of an address (IPv4 mapped into IPv6), whose byte order is the
/// address order: a CIDR block is a contiguous range of them.
pub(crate) fn ip_bytes(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// First and last 16-byte forms inside `net`.
pub(crate) fn ip_range(net: &ipnet::IpNet) -> ([u8; 16], [u8; 16]) {
    (ip_bytes(net.network()), ip_bytes(net.broadcast()))
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Stores events; ids already stored are skipped (redelivery is normal). Returns how
    /// many were new. All or nothing: on error nothing of the batch is stored.
    async fn insert_batch(&self, events: &[SecurityEvent]) -> Result<u64, StoreError>;
    /// Newest first; the cursor is set when there may be more.
    async fn list(
        &self,
        query: &EventQuery,
    ) -> Result<(Vec<SecurityEvent>, Option<Cursor>), StoreError>;
}

/// The tamper-evidence side of the store (see [`crate::chain`]).
#[async_trait]
pub trait ChainStore: Send + Sync + 'static {
    async fn head(&self) -> Result<Head, StoreError>;
    /// Records with `from <= seq <= to`, in order of position, at most `limit`.
    async fn chained(&self, from: u64, to: u64, limit: u32) -> Result<Vec<Chained>, StoreError>;
    /// A record outside the chain, if any: one without a position (its id), else one
    /// positioned beyond `head_seq` (its position).
    async fn outside_chain(&self, head_seq: u64) -> Result<Option<Outside>, StoreError>;
    /// Gives the rows stored before the chain existed their positions, oldest receipt
    /// first; does nothing after the first successful call. Returns how many it chained.
    async fn chain_legacy_rows(&self) -> Result<u64, StoreError>;
    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError>;
    /// The newest checkpoint at or before `seq`.
    async fn checkpoint_at_or_before(&self, seq: u64) -> Result<Option<Checkpoint>, StoreError>;
    /// Checkpoints with `from <= seq <= to`, in order, at most `limit`.
    async fn checkpoints(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError>;
    /// The prune record whose run of removed positions starts at `first_seq`, with the
    /// id of its retention run.
    async fn prune_at(&self, first_seq: u64) -> Result<Option<(Prune, i64)>, StoreError>;
    /// A retention run with all its prune records.
    async fn prune_run(&self, id: i64) -> Result<Option<PruneRun>, StoreError>;
}

/// Receipt-time cutoffs of one retention run: a row received before the cutoff of the
/// longest prefix its type starts with (else `default_us`) has expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cutoffs {
    /// Longest prefix first.
    pub by_prefix: Vec<(String, i64)>,
    pub default_us: i64,
}

impl Cutoffs {
    /// No row received at or after this has expired.
    pub fn latest(&self) -> i64 {
        self.by_prefix
            .iter()
            .map(|(_, c)| *c)
            .fold(self.default_us, i64::max)
    }

    /// Whether a row of `event_type` received at `received_us` has expired.
    pub fn expired(&self, event_type: &str, received_us: i64) -> bool {
        let cutoff = self
            .by_prefix
            .iter()
            .find(|(p, _)| event_type.starts_with(p.as_str()))
            .map_or(self.default_us, |(_, c)| *c);
        received_us < cutoff
    }
}

/// What one retention run removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Partitions dropped whole (PostgreSQL), with the run of positions they hold (`None`:
    /// an empty partition).
    pub drops: Vec<(String, Option<Prune>)>,
    /// Runs of positions deleted by range.
    pub ranges: Vec<Prune>,
    /// Expired rows kept because a legal hold matches them.
    pub held_rows: u64,
    /// Partitions of the events table now (0 on SQLite).
    pub partitions: u64,
}

impl RetentionPlan {
    /// Every prune record of the plan, in order of position.
    pub fn prunes(&self) -> Vec<Prune> {
        let mut all: Vec<Prune> = self
            .drops
            .iter()
            .filter_map(|(_, p)| p.clone())
            .chain(self.ranges.iter().cloned())
            .collect();
        all.sort_by_key(|p| p.first_seq);
        all
    }

    pub fn rows(&self) -> u64 {
        self.prunes().iter().map(|p| p.rows).sum()
    }
}

/// A legal hold: while active, every event it matches is kept. Empty strings and `None`
/// match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalHold {
    pub id: uuid::Uuid,
    pub name: String,
    pub reason: String,
    pub type_prefix: String,
    pub actor_id: String,
    pub subject: String,
    /// Event time, inclusive lower bound (microseconds).
    pub since_us: Option<i64>,
    /// Event time, exclusive upper bound.
    pub until_us: Option<i64>,
    pub created_us: i64,
    pub created_by: String,
    pub released_us: Option<i64>,
    pub released_by: Option<String>,
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Released,
    /// Someone released it first (the loser of a race).
    AlreadyReleased,
    NotFound,
}

/// Partitions, retention and legal holds.
#[async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// Makes sure the events table has a partition for each UTC month that starts at
    /// one of `months` (PostgreSQL; nothing on SQLite). Returns how many it created.
    async fn ensure_partitions(&self, months: &[chrono::NaiveDate]) -> Result<u32, StoreError>;
    /// Names of the events table's partitions, oldest first (none on SQLite).
    async fn partitions(&self) -> Result<Vec<String>, StoreError>;
    /// What a run with these cutoffs would remove, at most `max_ranges` runs of
    /// positions, oldest first.
    async fn plan_retention(
        &self,
        cutoffs: &Cutoffs,
        max_ranges: usize,
    ) -> Result<RetentionPlan, StoreError>;
    /// Records `run` (signed, with the plan's prunes) and removes the plan's rows, all or
    /// nothing. Returns how many rows it removed.
    async fn apply_retention(
        &self,
        run: &PruneRun,
        plan: &RetentionPlan,
    ) -> Result<u64, StoreError>;
    /// False when an active hold of that name exists.
    async fn create_hold(&self, hold: &LegalHold) -> Result<bool, StoreError>;
    /// Releases an active hold (compare-and-set: only the first caller succeeds).
    async fn release_hold(
        &self,
        id: uuid::Uuid,
        by: &str,
        now_us: i64,
    ) -> Result<Release, StoreError>;
    /// Newest first, at most `limit`.
    async fn list_holds(
        &self,
        include_released: bool,
        limit: u32,
    ) -> Result<Vec<LegalHold>, StoreError>;
}

/// Name of the monthly partition starting at `month` (`security_events_pYYYYMM`).
pub fn partition_name(month: chrono::NaiveDate) -> String {
    format!("security_events_p{}", month.format("%Y%m"))
}

/// The end (exclusive, microseconds) of the partition named `name`, if it is one of ours.
pub fn partition_end_us(name: &str) -> Option<i64> {
    partition_bounds_us(name).map(|(_, end)| end)
}

/// The receipt-time range `[start, end)` (microseconds) of the partition named `name`, if
/// it is one of ours.
pub fn partition_bounds_us(name: &str) -> Option<(i64, i64)> {
    use chrono::Datelike as _;
    let ym = name.strip_prefix("security_events_p")?;
    if ym.len() != 6 || !ym.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let start = chrono::NaiveDate::from_ymd_opt(ym[..4].parse().ok()?, ym[4..].parse().ok()?, 1)?;
    let end = if start.month() == 12 {
        chrono::NaiveDate::from_ymd_opt(start.year() + 1, 1, 1)?
    } else {
        chrono::NaiveDate::from_ymd_opt(start.year(), start.month() + 1, 1)?
    };
    let us = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros())
    };
    Some((us(start)?, us(end)?))
}

/// Every side: what audit-svc runs on.
pub trait AuditStore: EventStore + ChainStore + RetentionStore {}
impl<T: EventStore + ChainStore + RetentionStore> AuditStore for T {}

/// A record found outside the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outside {
    Unpositioned(uuid::Uuid),
    BeyondHead(u64),
}

/// A row with its position and hash, ready to insert.
pub(crate) type Positioned = (u64, Hash, Row);

/// Positions and hashes for the new rows of a batch, after `head`. `stored` are the ids
/// of the batch already in the store (redeliveries); an id twice in one batch is kept
/// once. Returns the rows to insert, each with its position and hash, and the new head.
pub(crate) fn chain_batch(
    head: Head,
    rows: Vec<Row>,
    stored: &std::collections::HashSet<uuid::Uuid>,
) -> Result<(Vec<Positioned>, Head), StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    let mut out = Vec::with_capacity(rows.len());
    let mut h = head;
    for r in rows {
        if stored.contains(&r.id) || !seen.insert(r.id) {
            continue;
        }
        let seq = h.seq + 1;
        let hash = crate::chain::next_hash(&h.hash, seq, &r)?;
        h = Head { seq, hash };
        out.push((seq, hash, r));
    }
    Ok((out, h))
}

/// The receipt time of a batch: the clock's, unless the newest one stored is later.
pub(crate) fn monotone_received(now_us: i64, last_us: Option<i64>) -> i64 {
    last_us.map_or(now_us, |l| l.max(now_us))
}

pub(crate) fn to_hash(bytes: &[u8]) -> Result<Hash, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("hash of {} bytes", bytes.len())))
}

pub(crate) fn seq_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("position {v}")))
}

pub(crate) fn seq_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Row form shared by both backends: the envelope flattened into columns.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: uuid::Uuid,
    pub event_type: String,
    pub time_us: i64,
    pub service: String,
    pub user_id: Option<uuid::Uuid>,
    pub actor_kind: String,
    pub actor_id: String,
    pub subject: String,
    pub ip_address: Option<String>,
    pub outcome: String,
    pub severity: String,
    pub details: String,
    pub trace_id: String,
    /// When audit-svc stored it (its clock), microseconds since the epoch.
    pub received_us: i64,
}

pub(crate) fn time_us(e: &SecurityEvent) -> i64 {
    e.time
        .as_ref()
        .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000))
}

/// The stored form of `e`, received at `received_us`.
pub(crate) fn to_row(e: &SecurityEvent, received_us: i64) -> Result<Row, StoreError> {
    let id = uuid::Uuid::parse_str(&e.id)
        .map_err(|_| StoreError::Corrupt(format!("event id `{}` is not a UUID", e.id)))?;
    let actor = e.actor.clone().unwrap_or_default();
    let kind = ActorKind::try_from(actor.kind).unwrap_or(ActorKind::Unspecified);
    let user_id = if kind == ActorKind::User {
        uuid::Uuid::parse_str(&actor.id).ok()
    } else {
        None
    };
    // A malformed address is not an address: keep the column typed and the event stored.
    let ip_address = e
        .source_ip
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string());
    Ok(Row {
        id,
        event_type: e.r#type.clone(),
        time_us: time_us(e),
        service: e.service.clone(),
        user_id,
        actor_kind: actor_kind_name(kind).into(),
        actor_id: actor.id,
        subject: e.subject.clone(),
        ip_address,
        outcome: outcome_name(Outcome::try_from(e.outcome).unwrap_or(Outcome::Unspecified)).into(),
        severity: severity_name(Severity::try_from(e.severity).unwrap_or(Severity::Unspecified))
            .into(),
        // Sorted keys: the same event always gives the same text.
        details: serde_json::to_string(
            &e.details
                .iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap_or_else(|_| "{}".into()),
        trace_id: e.trace_id.clone(),
        received_us,
    })
}

pub(crate) fn from_row(r: Row) -> Result<SecurityEvent, StoreError> {
    let details = serde_json::from_str(&r.details)
        .map_err(|e| StoreError::Corrupt(format!("details: {e}")))?;
    let time = DateTime::<Utc>::from_timestamp_micros(r.time_us)
        .ok_or_else(|| StoreError::Corrupt("time".into()))?;
    Ok(SecurityEvent {
        id: r.id.to_string(),
        r#type: r.event_type,
        time: Some(sec_common::events::to_timestamp(time)),
        service: r.service,
        actor: Some(sec_common::events::Actor {
            kind: actor_kind_from(&r.actor_kind) as i32,
            id: r.actor_id,
        }),
        subject: r.subject,
        source_ip: r.ip_address.unwrap_or_default(),
        outcome: outcome_from(&r.outcome) as i32,
        severity: severity_from(&r.severity) as i32,
        details,
        trace_id: r.trace_id,
    })
}

fn actor_kind_name(k: ActorKind) -> &'static str {
    match k {
        ActorKind::User => "user",
        ActorKind::Client => "client",
        ActorKind::Service => "service",
        ActorKind::Anonymous => "anonymous",
        ActorKind::Unspecified => "unspecified",
    }
}
fn actor_kind_from(s: &str) -> ActorKind {
    match s {
        "user" => ActorKind::User,
        "client" => ActorKind::Client,
        "service" => ActorKind::Service,
        "anonymous" => ActorKind::Anonymous,
        _ => ActorKind::Unspecified,
    }
}
fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "success",
        Outcome::Failure => "failure",
        Outcome::Denied => "denied",
        Outcome::Unspecified => "unspecified",
    }
}
fn outcome_from(s: &str) -> Outcome {
    match s {
        "success" => Outcome::Success,
        "failure" => Outcome::Failure,
        "denied" => Outcome::Denied,
        _ => Outcome::Unspecified,
    }
}
/// Lowercase names, as the requirement document's `severity VARCHAR(20)` suggests.
pub fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Low => "low",
        Severity::Medium => "medium",
        Severity::High => "high",
        Severity::Critical => "critical",
        Severity::Unspecified => "unspecified",
    }
}
fn severity_from(s: &str) -> Severity {
    match s {
        "info" => Severity::Info,
        "low" => Severity::Low,
        "medium" => Severity::Medium,
        "high" => Severity::High,
        "critical" => Severity::Critical,
        _ => Severity::Unspecified,
    }
}

pub(crate) fn cursor_after(more: bool, events: &[SecurityEvent]) -> Option<Cursor> {
    let last = events.last().filter(|_| more)?;
    Some(Cursor {
        time_us: time_us(last),
        id: uuid::Uuid::parse_str(&last.id).ok()?,
    })
}

/// `LIKE` pattern for a prefix, with `%`, `_` and `\` escaped (event types contain `_`).
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// The contract every [`EventStore`] implementation must meet. Called by each backend's
/// tests (and by the cross-crate harness) with a fresh, empty store.
#[cfg(test)]
pub mod contract {
    use super::*;
    use sec_common::clock::{Clock, ManualClock};
    use sec_common::events::new_event;

    fn ev(clock: &dyn Clock, ty: &str) -> SecurityEvent {
        let svc = ty.split('.').nth(1).unwrap_or("audit");
        new_event(clock, svc, ty)
    }

    #[allow(clippy::unwrap_used, clippy::panic)]
    pub async fn run(store: &dyn EventStore) {
        let start = DateTime::parse_from_rfc3339("2026-03-01T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = ManualClock::new(start);
        let mut all = Vec::new();
        for i in 0..25 {
            let ty = if i % 2 == 0 {
                "sec.crypto.key.created"
            } else {
                "sec.token.refresh.reuse_detected"
            };
            let mut e = ev(clock.as_ref(), ty);
            if i == 3 {
                e.actor = Some(sec_common::events::Actor {
                    kind: ActorKind::User as i32,
                    id: uuid::Uuid::new_v4().to_string(),
                });
                e.source_ip = "2001:db8::1".into();
                e.details
                    .insert("reason".into(), "unit \"quoted\" ✓".into());
                e.severity = Severity::Critical as i32;
                e.outcome = Outcome::Denied as i32;
                e.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into();
            }
            if i == 4 {
                e.source_ip = "not-an-ip".into();
            }
            all.push(e);
            clock.advance(chrono::Duration::seconds(1));
        }
        // insert in two overlapping batches: the overlap is a redelivery
        assert_eq!(store.insert_batch(&all[..15]).await.unwrap(), 15);
        assert_eq!(
            store.insert_batch(&all[10..]).await.unwrap(),
            10,
            "already-stored ids are skipped"
        );
        assert_eq!(store.insert_batch(&[]).await.unwrap(), 0);

        // round trip of every field
        let (page, _) = store
            .list(&EventQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.len(), 25);
        let got = page.iter().find(|e| e.id == all[3].id).unwrap();
        assert_eq!(got, &all[3], "every envelope field survives storage");
        let bad_ip = page.iter().find(|e| e.id == all[4].id).unwrap();
        assert_eq!(
            bad_ip.source_ip, "",
            "a malformed address is not stored as one"
        );

        // newest first
        let ids: Vec<&str> = page.iter().map(|e| e.id.as_str()).collect();
        let mut want: Vec<&str> = all.iter().rev().map(|e| e.id.as_str()).collect();
        want.truncate(25);
        assert_eq!(ids, want);

        // paging walks everything exactly once
        let mut seen = Vec::new();
        let mut q = EventQuery {
            limit: 7,
            ..Default::default()
        };
        loop {
            let (p, next) = store.list(&q).await.unwrap();
            assert!(p.len() <= 7);
            seen.extend(p.into_iter().map(|e| e.id));
            match next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        assert_eq!(seen, want.iter().map(|s| s.to_string()).collect::<Vec<_>>());

        // filters: exact type, prefix with `_` in it, time window
        let (p, _) = store
            .list(&EventQuery {
                event_type: Some("sec.crypto.key.created".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(p.len(), 13);
        assert!(p.iter().all(|e| e.r#type == "sec.crypto.key.created"));
        let (p, _) = store
            .list(&EventQuery {
                type_prefix: Some("sec.token.refresh.reuse_".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(p.len(), 12);
        let (p, _) = store
            .list(&EventQuery {
                type_prefix: Some("sec.token.refresh.reuseX".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(p.is_empty(), "`_` in a prefix is literal, not a wildcard");
        let since = time_us(&all[5]);
        let until = time_us(&all[10]);
        let (p, _) = store
            .list(&EventQuery {
                since_us: Some(since),
                until_us: Some(until),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        let got: Vec<String> = p.into_iter().map(|e| e.id).collect();
        let want: Vec<String> = all[5..10].iter().rev().map(|e| e.id.clone()).collect();
        assert_eq!(got, want, "since inclusive, until exclusive");

        // a batch with one bad event stores nothing
        let mut bad = vec![
            ev(clock.as_ref(), "sec.crypto.key.created"),
            ev(clock.as_ref(), "sec.crypto.key.created"),
        ];
        bad[1].id = "nope".into();
        assert!(store.insert_batch(&bad).await.is_err());
        let (p, _) = store
            .list(&EventQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(p.len(), 25, "all or nothing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_garbage() {
        let c = Cursor {
            time_us: 1_700_000_000_123_456,
            id: sec_common::clock::system().new_uuid_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!!"), None);
        assert_eq!(Cursor::decode("bm9wZQ"), None);
    }

    #[test]
    fn partition_names_and_ends() {
        let m = chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
        assert_eq!(partition_name(m), "security_events_p202612");
        assert_eq!(
            partition_end_us("security_events_p202612"),
            Some(
                chrono::DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
                    .unwrap()
                    .timestamp_micros()
            )
        );
        for bad in [
            "security_events_p2026",
            "x_p202601",
            "security_events_p202613",
        ] {
            assert_eq!(partition_end_us(bad), None, "{bad}");
        }
    }

    #[test]
    fn cutoffs_longest_prefix_wins() {
        let c = Cutoffs {
            by_prefix: vec![
                ("sec.ratelimit.hit".into(), 50),
                ("sec.ratelimit.".into(), 100),
            ],
            default_us: 10,
        };
        assert!(c.expired("sec.ratelimit.hit.x", 49));
        assert!(!c.expired("sec.ratelimit.hit.x", 50));
        assert!(c.expired("sec.ratelimit.other", 99));
        assert!(!c.expired("sec.auth.login", 10));
        assert!(c.expired("sec.auth.login", 9));
        assert_eq!(c.latest(), 100);
    }

    #[test]
    fn like_prefix_escapes_wildcards() {
        assert_eq!(like_prefix("sec.a_b%"), "sec.a\\_b\\%%");
    }
}
