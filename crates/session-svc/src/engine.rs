//! The session logic, without gRPC: id generation and hashing, validation, timeouts,
//! binding checks, per-user limits, metrics and events.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;
use sec_common::error::{Error, ErrorCode};
use sec_common::events::{Outcome, SecurityEvent, Severity, new_event};

use crate::config::{BindingPolicy, SessionConfig};
use crate::store::{CreateOutcome, ImportOutcome, Lookup, Record, SessionStore, StoreError};

pub type Emit = Arc<dyn Fn(SecurityEvent) + Send + Sync>;

/// `sess_` + base64url of 32 random bytes.
pub const ID_PREFIX: &str = "sess_";
const ID_LEN: usize = 5 + 43;
const MAX_USER_ID: usize = 128;
const MAX_CLIENT_ID: usize = 64;
const MAX_AMR: usize = 16;
const MAX_AMR_VALUE: usize = 32;
const MAX_ACR: usize = 128;
/// Distinct client labels on the per-client gauge; the rest are summed under `other`.
const MAX_CLIENT_LABELS: usize = 100;
/// Largest exported record accepted by import.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// A failure fit for a caller, with the `ErrorInfo.code` that names it precisely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionError {
    pub error: Error,
    /// `ErrorInfo.code`: `session_not_found`, `session_binding_violation`,
    /// `session_limit_reached`, or the generic code's name.
    pub reason: &'static str,
}

impl SessionError {
    fn new(error: Error, reason: &'static str) -> Self {
        Self { error, reason }
    }

    pub fn not_found() -> Self {
        // Unknown, expired and revoked read the same to callers: telling them apart
        // would only help someone probing stolen or guessed ids.
        Self::new(Error::not_found("session not found"), "session_not_found")
    }

    pub fn invalid(field: &str, message: &'static str) -> Self {
        Self::new(Error::invalid(field, message), "invalid_argument")
    }

    pub fn code(&self) -> ErrorCode {
        self.error.code
    }
}

impl From<Error> for SessionError {
    fn from(error: Error) -> Self {
        let reason = error.code.as_str();
        Self { error, reason }
    }
}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => {
                Error::unavailable("session store unavailable", &m).into()
            }
            StoreError::Corrupt(m) => Error::internal("stored session unreadable", &m).into(),
        }
    }
}

impl From<SessionError> for tonic::Status {
    fn from(e: SessionError) -> Self {
        use prost::Message;
        let info = sec_proto::common::v1::ErrorInfo {
            code: e.reason.to_owned(),
            field: e.error.field.clone().unwrap_or_default(),
        };
        tonic::Status::with_details(
            e.error.code.grpc(),
            e.error.message.into_owned(),
            info.encode_to_vec().into(),
        )
    }
}

pub type Result<T> = std::result::Result<T, SessionError>;

fn id_chars_ok(s: &str, extra: &[char]) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// User ids: 1..=128 of `[A-Za-z0-9._:@+-]` (they name Redis keys).
pub fn validate_user_id(user: &str) -> Result<()> {
    if user.is_empty()
        || user.len() > MAX_USER_ID
        || !id_chars_ok(user, &['.', '_', ':', '@', '+', '-'])
    {
        return Err(SessionError::invalid(
            "user_id",
            "user id must be 1-128 characters of A-Z a-z 0-9 . _ : @ + -",
        ));
    }
    Ok(())
}

/// Client ids: 1..=64 of `[A-Za-z0-9._-]` (they become metric labels).
pub fn validate_client_id(client: &str) -> Result<()> {
    if client.is_empty() || client.len() > MAX_CLIENT_ID || !id_chars_ok(client, &['.', '_', '-']) {
        return Err(SessionError::invalid(
            "client_id",
            "client id must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    Ok(())
}

/// The id's shape, checked before it is hashed or looked up.
pub fn validate_session_id(id: &str) -> Result<()> {
    let ok = id.len() == ID_LEN
        && id.starts_with(ID_PREFIX)
        && id_chars_ok(id.get(ID_PREFIX.len()..).unwrap_or(""), &['-', '_']);
    if !ok {
        return Err(SessionError::invalid("session_id", "malformed session id"));
    }
    Ok(())
}

/// A handle: the SHA-256 of an id, 64 lowercase hex characters.
pub fn validate_handle(handle: &str) -> Result<()> {
    if handle.len() != 64 || !handle.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(SessionError::invalid(
            "handle",
            "handle must be 64 lowercase hex characters",
        ));
    }
    Ok(())
}

/// The stored and listed form of an id (SHA-256, hex): a 256-bit random secret needs no
/// slow or keyed hash, and a Redis dump of hashes lets nobody use a session.
pub fn handle_of(id: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn new_id() -> Result<String> {
    let mut bytes = [0_u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| Error::internal("generating a session id", &"random generator failed"))?;
    Ok(format!(
        "{ID_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// What a session is bound to, and what happens when that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub ip: bool,
    pub user_agent: bool,
    pub policy: BindingPolicy,
}

impl Binding {
    pub fn encode(self) -> u8 {
        let p = match self.policy {
            BindingPolicy::Record => 0,
            BindingPolicy::StepUp => 1,
            BindingPolicy::Deny => 2,
        };
        u8::from(self.ip) | (u8::from(self.user_agent) << 1) | (p << 2)
    }

    pub fn decode(b: u8) -> Self {
        Self {
            ip: b & 1 != 0,
            user_agent: b & 2 != 0,
            policy: match b >> 2 {
                0 => BindingPolicy::Record,
                1 => BindingPolicy::StepUp,
                // Unknown values fail closed.
                _ => BindingPolicy::Deny,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingResult {
    Ok,
    ChangedRecorded,
    StepUpRequired,
}

/// Everything Create needs besides the configuration.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    pub user: String,
    pub client: String,
    /// ms; None = now.
    pub auth_time: Option<i64>,
    pub amr: Vec<String>,
    pub acr: String,
    pub ip: String,
    pub user_agent: String,
    pub attributes: HashMap<String, String>,
    pub binding: Option<Binding>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabel {
    client: String,
}

/// The service's metrics (`sec_session_*`).
#[derive(Clone, Default)]
pub struct SessionMetrics {
    pub active: Gauge,
    active_by_client: Family<ClientLabel, Gauge>,
    pub created: Counter,
    pub expired: Counter,
    pub revoked: Counter,
    pub rotated: Counter,
    pub binding_violations: Counter,
    pub evictions: Counter,
    /// 1 while the store answers, 0 while it does not: set by every [`Engine::ping`]
    /// (the readiness check and the gauge task).
    pub store_up: Gauge,
}

impl SessionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "sec_session_active_sessions",
            "Live sessions (refreshed periodically from the store)",
            m.active.clone(),
        );
        registry.register(
            "sec_session_active_sessions_by_client",
            "Live sessions per client id (at most 100 clients; the rest under other)",
            m.active_by_client.clone(),
        );
        registry.register(
            "sec_session_store_up",
            "Whether the session store (Redis) answered the last ping: 1 yes, 0 no (readiness check session_store)",
            m.store_up.clone(),
        );
        for (name, help, c) in [
            ("sec_session_created", "Sessions created", &m.created),
            (
                "sec_session_expired",
                "Sessions found expired on access",
                &m.expired,
            ),
            ("sec_session_revoked", "Sessions revoked", &m.revoked),
            ("sec_session_rotated", "Session ids rotated", &m.rotated),
            (
                "sec_session_binding_violations",
                "Requests whose IP prefix or user agent differed from a bound session's",
                &m.binding_violations,
            ),
            (
                "sec_session_evictions",
                "Sessions evicted by the per-user limit",
                &m.evictions,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        m
    }
}

/// Live sessions in total and per client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub active: u64,
    pub by_client: BTreeMap<String, u64>,
}

/// Longest a store ping may take (readiness gives each check 2 s).
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

pub struct Engine {
    store: Arc<dyn SessionStore>,
    clock: SharedClock,
    emit: Emit,
    cfg: SessionConfig,
    pub metrics: SessionMetrics,
}

fn ms_now(clock: &SharedClock) -> i64 {
    clock.now().timestamp_millis()
}

/// `addr` truncated to `bits`.
fn prefix_of(addr: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

fn parse_ip(ip: &str, field: &str) -> Result<Option<IpAddr>> {
    if ip.is_empty() {
        return Ok(None);
    }
    ip.parse()
        .map(Some)
        .map_err(|_| SessionError::invalid(field, "not an IP address"))
}

impl Engine {
    pub fn new(
        store: Arc<dyn SessionStore>,
        clock: SharedClock,
        emit: Emit,
        cfg: SessionConfig,
        metrics: SessionMetrics,
    ) -> Self {
        Self {
            store,
            clock,
            emit,
            cfg,
            metrics,
        }
    }

    pub fn default_binding_policy(&self) -> BindingPolicy {
        self.cfg.binding_policy
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn now_ms(&self) -> i64 {
        ms_now(&self.clock)
    }

    fn event(&self, kind: &str, handle: &str, r: &Record) -> SecurityEvent {
        let mut e = new_event(self.clock.as_ref(), "session", kind);
        // Subject is the handle: the id never leaves the service after Create/Rotate.
        e.subject = handle.to_owned();
        e.details.insert("user_id".into(), r.user.clone());
        e.details.insert("client_id".into(), r.client.clone());
        e
    }

    fn emit_revoked(&self, handle: &str, r: &Record, reason: &str) {
        self.metrics.revoked.inc();
        let mut e = self.event("sec.session.session.revoked", handle, r);
        e.details.insert("reason".into(), reason.to_owned());
        (self.emit)(e);
    }

    fn validate_ua(&self, ua: &str, field: &str) -> Result<()> {
        if ua.len() > self.cfg.max_user_agent_bytes || ua.chars().any(char::is_control) {
            return Err(SessionError::invalid(
                field,
                "user agent too long or has control characters",
            ));
        }
        Ok(())
    }

    fn validate_attributes(&self, attrs: &HashMap<String, String>) -> Result<()> {
        let c = &self.cfg;
        if attrs.len() > c.max_attributes {
            return Err(SessionError::invalid("attributes", "too many attributes"));
        }
        let mut total = 0_usize;
        for (k, v) in attrs {
            if k.is_empty()
                || k.len() > c.max_attribute_key_bytes
                || !id_chars_ok(k, &['.', '_', '-', ':'])
            {
                return Err(SessionError::invalid(
                    "attributes",
                    "attribute keys must be 1-64 characters of A-Z a-z 0-9 . _ - :",
                ));
            }
            if v.len() > c.max_attribute_value_bytes {
                return Err(SessionError::invalid(
                    "attributes",
                    "attribute value too long",
                ));
            }
            total += k.len() + v.len();
        }
        if total > c.max_attributes_total_bytes {
            return Err(SessionError::invalid(
                "attributes",
                "attributes too large in total",
            ));
        }
        Ok(())
    }

    /// (idle, absolute) in ms for `client`.
    fn timeouts(&self, client: &str) -> (i64, i64) {
        let (idle, abs) = self.cfg.clients.get(client).map_or(
            (
                self.cfg.idle_timeout_seconds,
                self.cfg.absolute_lifetime_seconds,
            ),
            |t| (t.idle_timeout_seconds, t.absolute_lifetime_seconds),
        );
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        (ms(idle), ms(abs))
    }

    /// Creates a session: its id (returned once) and record.
    pub async fn create(&self, n: NewSession) -> Result<(String, String, Record)> {
        validate_user_id(&n.user)?;
        validate_client_id(&n.client)?;
        if n.amr.len() > MAX_AMR
            || n.amr.iter().any(|a| {
                a.is_empty() || a.len() > MAX_AMR_VALUE || !id_chars_ok(a, &['_', '-', '.'])
            })
        {
            return Err(SessionError::invalid(
                "amr",
                "at most 16 amr values of 1-32 characters A-Z a-z 0-9 _ - .",
            ));
        }
        if n.acr.len() > MAX_ACR || n.acr.chars().any(|c| c.is_control() || c == ' ') {
            return Err(SessionError::invalid("acr", "acr too long or has spaces"));
        }
        parse_ip(&n.ip, "source_ip")?;
        self.validate_ua(&n.user_agent, "user_agent")?;
        self.validate_attributes(&n.attributes)?;
        let now = self.now_ms();
        if let Some(at) = n.auth_time
            && at > now + 60_000
        {
            return Err(SessionError::invalid(
                "auth_time",
                "authentication time is in the future",
            ));
        }
        let binding = n.binding.unwrap_or(Binding {
            ip: self.cfg.bind_ip,
            user_agent: self.cfg.bind_user_agent,
            policy: self.cfg.binding_policy,
        });
        if binding.ip && n.ip.is_empty() {
            return Err(SessionError::invalid(
                "source_ip",
                "an IP-bound session needs the source IP",
            ));
        }
        let (idle, abs) = self.timeouts(&n.client);
        let record = Record {
            user: n.user,
            client: n.client,
            auth_time: n.auth_time.unwrap_or(now),
            amr: n.amr.join(" "),
            acr: n.acr,
            created: now,
            last_seen: now,
            expires: now.saturating_add(idle.min(abs)),
            absolute: now.saturating_add(abs),
            idle_ms: idle,
            ip: n.ip,
            user_agent: n.user_agent,
            attributes: n.attributes.into_iter().collect(),
            binding: binding.encode(),
        };
        let id = new_id()?;
        let handle = handle_of(&id);
        let outcome = self
            .store
            .create(
                &handle,
                &record,
                self.cfg.max_sessions_per_user,
                self.cfg.limit_policy,
                now,
            )
            .await?;
        match outcome {
            CreateOutcome::LimitReached => {
                return Err(SessionError::new(
                    Error::new(
                        ErrorCode::ResourceExhausted,
                        "the user has the maximum number of sessions",
                    ),
                    "session_limit_reached",
                ));
            }
            CreateOutcome::Created { evicted } => {
                for h in evicted {
                    self.metrics.evictions.inc();
                    let mut e = self.event("sec.session.limit.evicted", &h, &record);
                    e.details.insert("new_session".into(), handle.clone());
                    (self.emit)(e);
                }
            }
        }
        self.metrics.created.inc();
        let mut e = self.event("sec.session.session.created", &handle, &record);
        if !record.acr.is_empty() {
            e.details.insert("acr".into(), record.acr.clone());
        }
        (self.emit)(e);
        Ok((id, handle, record))
    }

    fn found(&self, l: Lookup) -> Result<Record> {
        match l {
            Lookup::Live(r) => Ok(r),
            Lookup::Expired => {
                self.metrics.expired.inc();
                Err(SessionError::not_found())
            }
            Lookup::Missing => Err(SessionError::not_found()),
        }
    }

    /// Whether the caller's IP prefix / user agent differ from the bound ones.
    fn binding_changed(&self, r: &Record, ip: Option<IpAddr>, ua: &str) -> bool {
        let b = Binding::decode(r.binding);
        let (v4, v6) = (self.cfg.ipv4_prefix_len, self.cfg.ipv6_prefix_len);
        let ip_changed = b.ip
            && match (r.ip.parse::<IpAddr>().ok(), ip) {
                (Some(old), Some(new)) => prefix_of(old, v4, v6) != prefix_of(new, v4, v6),
                // A bound session asked about without an IP is treated as changed: fail closed.
                _ => true,
            };
        // Not a secret: a plain comparison is fine.
        let ua_changed = b.user_agent && r.user_agent != ua;
        ip_changed || ua_changed
    }

    /// Get (`slide` false) or Touch (`slide` true) with the caller's IP and user agent.
    pub async fn access(
        &self,
        id: &str,
        ip: &str,
        ua: &str,
        slide: bool,
    ) -> Result<(String, Record, BindingResult)> {
        validate_session_id(id)?;
        let ip_addr = parse_ip(ip, "source_ip")?;
        self.validate_ua(ua, "user_agent")?;
        let handle = handle_of(id);
        let now = self.now_ms();
        let r = self.found(self.store.get(&handle, now).await?)?;
        if !self.binding_changed(&r, ip_addr, ua) {
            if !slide {
                return Ok((handle, r, BindingResult::Ok));
            }
            let r = self.found(self.store.touch(&handle, now, true, None).await?)?;
            return Ok((handle, r, BindingResult::Ok));
        }
        self.metrics.binding_violations.inc();
        let policy = Binding::decode(r.binding).policy;
        let mut e = self.event("sec.session.binding.violated", &handle, &r);
        e.outcome = Outcome::Failure as i32;
        e.severity = Severity::Medium as i32;
        e.source_ip = ip.to_owned();
        e.details.insert("policy".into(), policy.as_str().into());
        (self.emit)(e);
        match policy {
            BindingPolicy::Record => {
                let r = self.found(
                    self.store
                        .touch(&handle, now, slide, Some((ip, ua)))
                        .await?,
                )?;
                Ok((handle, r, BindingResult::ChangedRecorded))
            }
            // Nothing changes until the user steps up (the caller re-authenticates and
            // rotates or re-creates the session).
            BindingPolicy::StepUp => Ok((handle, r, BindingResult::StepUpRequired)),
            BindingPolicy::Deny => {
                // The presented id is treated as stolen: the session ends for everyone.
                if let Some(r) = self.store.revoke(&handle, now).await? {
                    self.emit_revoked(&handle, &r, "binding_violation");
                }
                Err(SessionError::new(
                    Error::denied("session binding violated; the session was revoked"),
                    "session_binding_violation",
                ))
            }
        }
    }

    /// Issues a new id for the session; the old one stops working atomically.
    pub async fn rotate(&self, id: &str) -> Result<(String, String, Record)> {
        validate_session_id(id)?;
        let old = handle_of(id);
        let new = new_id()?;
        let handle = handle_of(&new);
        let now = self.now_ms();
        let r = self.found(self.store.rotate(&old, &handle, now).await?)?;
        self.metrics.rotated.inc();
        let mut e = self.event("sec.session.session.rotated", &handle, &r);
        e.details.insert("previous".into(), old);
        (self.emit)(e);
        Ok((new, handle, r))
    }

    /// Revokes by id or by handle; 0 when there was nothing live to revoke (idempotent
    /// logout).
    pub async fn revoke(&self, handle: &str, reason: &str) -> Result<u32> {
        let now = self.now_ms();
        match self.store.revoke(handle, now).await? {
            Some(r) => {
                self.emit_revoked(handle, &r, reason);
                Ok(1)
            }
            None => Ok(0),
        }
    }

    /// "Log out everywhere".
    pub async fn revoke_user(&self, user: &str) -> Result<u32> {
        validate_user_id(user)?;
        let now = self.now_ms();
        let gone = self.store.revoke_user(user, now).await?;
        let stub = Record {
            user: user.to_owned(),
            ..Record::default()
        };
        for h in &gone {
            self.emit_revoked(h, &stub, "revoke_all_for_user");
        }
        Ok(u32::try_from(gone.len()).unwrap_or(u32::MAX))
    }

    pub async fn list_user(&self, user: &str) -> Result<Vec<(String, Record)>> {
        validate_user_id(user)?;
        Ok(self.store.list_user(user, self.now_ms()).await?)
    }

    /// Counts live sessions (a full scan of the store).
    pub async fn stats(&self) -> Result<Stats> {
        let now = self.now_ms();
        let mut seen = std::collections::HashSet::new();
        let mut stats = Stats::default();
        let mut cursor = 0;
        loop {
            let (next, page) = self.store.scan(cursor, 1000, now).await?;
            for (h, r) in page {
                // SCAN may return a key twice.
                if seen.insert(h) {
                    stats.active += 1;
                    *stats.by_client.entry(r.client).or_default() += 1;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(stats)
    }

    /// Recomputes the gauges from the store.
    pub async fn refresh_gauges(&self) -> Result<Stats> {
        let s = self.stats().await?;
        self.metrics
            .active
            .set(i64::try_from(s.active).unwrap_or(i64::MAX));
        self.metrics.active_by_client.clear();
        let mut other = 0_u64;
        for (i, (client, n)) in s.by_client.iter().enumerate() {
            // Client ids were validated at creation; the label set is capped as well.
            if i < MAX_CLIENT_LABELS && validate_client_id(client).is_ok() {
                self.metrics
                    .active_by_client
                    .get_or_create(&ClientLabel {
                        client: client.clone(),
                    })
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            } else {
                other += n;
            }
        }
        if other > 0 {
            self.metrics
                .active_by_client
                .get_or_create(&ClientLabel {
                    client: "other".into(),
                })
                .set(i64::try_from(other).unwrap_or(i64::MAX));
        }
        Ok(s)
    }

    /// One page of live sessions for export: (handle, record, remaining ms).
    pub async fn export_page(&self, cursor: u64) -> Result<(u64, Vec<(String, Record, u64)>)> {
        let now = self.now_ms();
        let (next, page) = self.store.scan(cursor, 500, now).await?;
        Ok((
            next,
            page.into_iter()
                .map(|(h, r)| {
                    let left = u64::try_from(r.expires.min(r.absolute) - now).unwrap_or(0);
                    (h, r, left)
                })
                .collect(),
        ))
    }

    /// Loads one exported session; expired ones are skipped.
    pub async fn import(&self, handle: &str, raw: &[u8]) -> Result<ImportOutcome> {
        validate_handle(handle)?;
        if raw.len() > MAX_RECORD_BYTES {
            return Err(SessionError::invalid("record", "record too large"));
        }
        let r = Record::decode(raw)
            .map_err(|_| SessionError::invalid("record", "unreadable session record"))?;
        validate_user_id(&r.user)
            .map_err(|_| SessionError::invalid("record", "record has an invalid user id"))?;
        validate_client_id(&r.client)
            .map_err(|_| SessionError::invalid("record", "record has an invalid client id"))?;
        if r.attributes.len() > 16 || r.user_agent.len() > 2048 {
            return Err(SessionError::invalid(
                "record",
                "record exceeds the attribute limits",
            ));
        }
        Ok(self.store.import(handle, &r, self.now_ms()).await?)
    }

    /// Pings the store and records the answer in `sec_session_store_up`. Bounded by
    /// [`PING_TIMEOUT`], under the readiness check's own timeout, so a Redis that hangs
    /// is recorded as down here rather than abandoned by the caller.
    pub async fn ping(&self) -> std::result::Result<(), String> {
        let r = match tokio::time::timeout(PING_TIMEOUT, self.store.ping()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("session store: ping timed out".to_owned()),
        };
        self.metrics.store_up.set(i64::from(r.is_ok()));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_256_random_bits_and_a_strict_shape() {
        let a = new_id().unwrap();
        let b = new_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), ID_LEN);
        validate_session_id(&a).unwrap();
        for bad in [
            "",
            "sess_",
            "sess_x",
            &format!("{a}x"),
            &a.replace("sess_", "tokn_"),
            &format!("{}!", &a[..ID_LEN - 1]),
        ] {
            let e = validate_session_id(bad).unwrap_err();
            assert_eq!(e.error.field.as_deref(), Some("session_id"), "{bad}");
        }
        assert_eq!(handle_of(&a).len(), 64);
        validate_handle(&handle_of(&a)).unwrap();
        assert!(validate_handle("ABC").is_err());
    }

    #[test]
    fn ip_prefixes_compare_networks() {
        let p = |s: &str| prefix_of(s.parse().unwrap(), 24, 64);
        assert_eq!(p("192.0.2.1"), p("192.0.2.200"));
        assert_ne!(p("192.0.2.1"), p("192.0.3.1"));
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(
            prefix_of("10.1.2.3".parse().unwrap(), 32, 128),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn binding_round_trips_and_unknown_policies_fail_closed() {
        for policy in [
            BindingPolicy::Record,
            BindingPolicy::StepUp,
            BindingPolicy::Deny,
        ] {
            for (ip, user_agent) in [(false, false), (true, false), (false, true), (true, true)] {
                let b = Binding {
                    ip,
                    user_agent,
                    policy,
                };
                assert_eq!(Binding::decode(b.encode()), b);
            }
        }
        assert_eq!(Binding::decode(0b1111_0000).policy, BindingPolicy::Deny);
    }

    #[test]
    fn user_and_client_ids_are_bounded() {
        validate_user_id("alice@example.com").unwrap();
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id(&"a".repeat(129)).is_err());
        assert!(validate_user_id("a b").is_err());
        assert!(validate_user_id("a*").is_err());
        validate_client_id("web-app_1").unwrap();
        assert!(validate_client_id("web app").is_err());
        assert!(validate_client_id(&"c".repeat(65)).is_err());
    }
}
