//! [`LocalVerifier`]: verifies token-svc's access and ID tokens inside a platform service,
//! with no network hop on the hot path.
//!
//! - Keys: the JWKS is fetched from a [`JwksSource`] (token-svc's `GetJwks`), parsed once
//!   into a [`KeySet`] snapshot and refreshed in the background every `max_age_seconds`
//!   (clamped to a third of the staleness bound). A token with an unknown `kid` asks for an
//!   early refetch, at most once per `min_refetch_interval` however many unknown kids
//!   arrive, and is refused with `UnknownKey` (token-svc publishes a `next` key before it
//!   signs with it, so a verifier normally has it already).
//! - Revocations: a full snapshot from a [`RevocationSource`] (`ListRevocations`) at start,
//!   then live `sec.token.*` events applied as they arrive (a jti, subject, client or
//!   signing-key revocation takes effect at once, a revoked key is dropped from the
//!   snapshot), plus periodic `ListRevocations(cursor)` polls. A lag notice from the
//!   subscription forces a poll; a poll answered with a snapshot replaces the state.
//! - Staleness, bounded and fail-closed: every successful JWKS refresh and revocation poll
//!   records when it was true (`as_of`, the earlier of token-svc's and our clock). When
//!   the older of the two is more than `max_staleness` ago (default 60 s), `verify` fails
//!   with `VerifierStale`: a verifier cut off from token-svc stops accepting tokens rather
//!   than ignoring revocations it cannot see. Events never count as freshness: they are
//!   a fast path, the polls are the bound.
//! - Hot path: one read of the key-set snapshot (an `Arc` clone under a read lock), the
//!   pure [`jwt::verify`], one read lock over the revocation maps. Allocations: the claims.
//!
//! The background loops run under the owner's [`Supervisor`] ([`LocalVerifier::spawn`]).

mod grpc;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::events::{EventBus, Notice, SecurityEvent, Subscription};
use crate::jwt::{
    self, Expectations, InvalidReason, KeySet, KeyState, MAX_KID_BYTES, TokenType, VerifiedClaims,
};
use crate::supervise::Supervisor;

pub use grpc::GrpcTokenSource;

/// Shortest pause between two polls or refreshes of one loop.
const MIN_WAIT: Duration = Duration::from_millis(100);
/// Longest jti, subject or client id kept in the revocation state.
pub const MAX_ID_BYTES: usize = 256;
/// The event types the verifier follows: every token-svc event (revocations under
/// whatever noun, and key changes, which trigger a JWKS refresh).
pub const EVENT_FILTER: &str = "sec.token.";

/// Why a source could not answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error("token service unavailable: {0}")]
    Unavailable(String),
    #[error("invalid answer from the token service: {0}")]
    Invalid(String),
}

/// The published key set and how long it may be cached.
#[derive(Debug, Clone)]
pub struct JwksDocument {
    pub jwks_json: String,
    pub max_age: Duration,
}

/// Where the JWKS comes from (token-svc's `GetJwks`; a fake in tests).
#[async_trait]
pub trait JwksSource: Send + Sync + 'static {
    async fn fetch_jwks(&self) -> Result<JwksDocument, SourceError>;
}

/// One revocation in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// One token, until its `exp`.
    Jti {
        jti: String,
        expires_at: DateTime<Utc>,
    },
    /// Every token of the subject issued at or before `not_before`.
    Subject {
        subject: String,
        not_before: DateTime<Utc>,
    },
    /// Every token of the client issued at or before `not_before`.
    Client {
        client_id: String,
        not_before: DateTime<Utc>,
    },
    /// A compromised signing key.
    Kid { kid: String },
}

/// One answer of `ListRevocations`.
#[derive(Debug, Clone)]
pub struct RevocationPage {
    pub revocations: Vec<Revocation>,
    pub cursor: String,
    /// Replace the state instead of adding to it.
    pub snapshot: bool,
    /// Server time of the answer.
    pub as_of: DateTime<Utc>,
}

/// Where revocations come from (token-svc's `ListRevocations`; a fake in tests).
#[async_trait]
pub trait RevocationSource: Send + Sync + 'static {
    /// Empty cursor: a full snapshot.
    async fn list_revocations(&self, cursor: &str) -> Result<RevocationPage, SourceError>;
}

/// What the verifier expects of tokens and how fresh it must stay.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// token-svc's `iss`.
    pub issuer: String,
    /// This service's identity, as it appears in `aud`.
    pub audience: String,
    pub skew: Duration,
    pub max_token_bytes: usize,
    /// Beyond this age of the key or revocation view, `verify` fails with `VerifierStale`.
    pub max_staleness: Duration,
    /// How often revocations are polled (events make them faster, not fresher).
    pub poll_interval: Duration,
    /// Unknown-kid refetches: at most one per this interval.
    pub min_refetch_interval: Duration,
    /// Entries the revocation state may hold; beyond it the verifier fails closed
    /// (`VerifierStale`) rather than forget a revocation.
    pub max_revocations: usize,
    /// Events buffered for the verifier before it is told it lagged.
    pub event_buffer: usize,
}

impl VerifierConfig {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            skew: Duration::from_secs(60),
            max_token_bytes: jwt::DEFAULT_MAX_TOKEN_BYTES,
            max_staleness: Duration::from_secs(60),
            poll_interval: Duration::from_secs(10),
            min_refetch_interval: Duration::from_secs(5),
            max_revocations: 1_000_000,
            event_buffer: 1024,
        }
    }

    fn expectations(&self, typ: TokenType) -> Expectations {
        Expectations {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            typ,
            skew: self.skew,
            max_token_bytes: self.max_token_bytes,
        }
    }
}

#[derive(Default)]
struct RevocationState {
    /// jti → exp (unix seconds).
    jtis: HashMap<String, i64>,
    /// subject / client id → not_before (unix seconds).
    subjects: HashMap<String, i64>,
    clients: HashMap<String, i64>,
    kids: HashSet<String>,
    cursor: String,
    /// More entries than `max_revocations`: fail closed until a snapshot fits.
    overflow: bool,
}

impl RevocationState {
    fn len(&self) -> usize {
        self.jtis.len() + self.subjects.len() + self.clients.len() + self.kids.len()
    }

    /// Adds one revocation; returns a kid that must leave the key set.
    fn add(&mut self, r: Revocation, max: usize) -> Option<String> {
        let fits = |id: &str| !id.is_empty() && id.len() <= MAX_ID_BYTES;
        if self.len() >= max {
            self.overflow = true;
            return None;
        }
        match r {
            Revocation::Jti { jti, expires_at } if fits(&jti) => {
                let exp = expires_at.timestamp();
                let e = self.jtis.entry(jti).or_insert(exp);
                *e = (*e).max(exp);
            }
            Revocation::Subject {
                subject,
                not_before,
            } if fits(&subject) => {
                let e = self.subjects.entry(subject).or_insert(i64::MIN);
                *e = (*e).max(not_before.timestamp());
            }
            Revocation::Client {
                client_id,
                not_before,
            } if fits(&client_id) => {
                let e = self.clients.entry(client_id).or_insert(i64::MIN);
                *e = (*e).max(not_before.timestamp());
            }
            Revocation::Kid { kid } if !kid.is_empty() && kid.len() <= MAX_KID_BYTES => {
                self.kids.insert(kid.clone());
                return Some(kid);
            }
            _ => tracing::warn!("revocation with an empty or oversized id ignored"),
        }
        None
    }

    /// Drops denylisted jtis whose token has expired anyway.
    fn prune(&mut self, now: i64, skew: i64) {
        self.jtis.retain(|_, exp| exp.saturating_add(skew) > now);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabel {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    verified: Counter,
    rejected: Family<ReasonLabel, Counter>,
    refreshes: Family<RefreshLabel, Counter>,
    refetches: Counter,
    events: Counter,
    staleness: Gauge<f64, std::sync::atomic::AtomicU64>,
}

struct Inner {
    cfg: VerifierConfig,
    access: Expectations,
    id: Expectations,
    clock: SharedClock,
    jwks_source: Arc<dyn JwksSource>,
    revocation_source: Arc<dyn RevocationSource>,
    keys: RwLock<Arc<KeySet>>,
    revoked: RwLock<RevocationState>,
    /// Unix milliseconds of the last good refresh / poll; `i64::MIN`: never.
    jwks_as_of: AtomicI64,
    revocations_as_of: AtomicI64,
    /// Unix milliseconds of the last granted unknown-kid refetch.
    last_refetch: AtomicI64,
    refresh_jwks: Notify,
    poll_now: Notify,
    metrics: Metrics,
}

/// A local token verifier. Cheap to clone; clones share one view.
#[derive(Clone)]
pub struct LocalVerifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVerifier")
            .field("issuer", &self.inner.cfg.issuer)
            .field("audience", &self.inner.cfg.audience)
            .finish_non_exhaustive()
    }
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

impl LocalVerifier {
    /// A verifier with an empty view: every `verify` is `VerifierStale` until the first
    /// JWKS refresh and revocation poll succeed ([`Self::refresh_all`] or the loops).
    pub fn new(
        cfg: VerifierConfig,
        clock: SharedClock,
        jwks_source: Arc<dyn JwksSource>,
        revocation_source: Arc<dyn RevocationSource>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                access: cfg.expectations(TokenType::Access),
                id: cfg.expectations(TokenType::Id),
                cfg,
                clock,
                jwks_source,
                revocation_source,
                keys: RwLock::new(Arc::new(KeySet::new())),
                revoked: RwLock::new(RevocationState::default()),
                jwks_as_of: AtomicI64::new(i64::MIN),
                revocations_as_of: AtomicI64::new(i64::MIN),
                last_refetch: AtomicI64::new(i64::MIN),
                refresh_jwks: Notify::new(),
                poll_now: Notify::new(),
                metrics: Metrics::default(),
            }),
        }
    }

    /// `sec_<service>_token_verifier_*`: verified, rejected{reason}, refreshes{source,
    /// outcome}, unknown-kid refetches, events applied, staleness seconds.
    pub fn register_metrics(&self, service: &str, registry: &mut Registry) {
        let m = &self.inner.metrics;
        let p = format!("sec_{service}_token_verifier");
        registry.register(
            format!("{p}_verified"),
            "Tokens verified locally",
            m.verified.clone(),
        );
        registry.register(
            format!("{p}_rejected"),
            "Tokens refused locally, by reason",
            m.rejected.clone(),
        );
        registry.register(
            format!("{p}_refreshes"),
            "JWKS refreshes and revocation polls, by outcome",
            m.refreshes.clone(),
        );
        registry.register(
            format!("{p}_unknown_kid_refetches"),
            "JWKS refetches granted to tokens with an unknown kid (rate-limited)",
            m.refetches.clone(),
        );
        registry.register(
            format!("{p}_events"),
            "Revocation and key events applied",
            m.events.clone(),
        );
        registry.register(
            format!("{p}_staleness_seconds"),
            "Age of the older of the key and revocation views",
            m.staleness.clone(),
        );
    }

    /// Verifies an access token (`typ: at+jwt`).
    pub fn verify(&self, token: &str) -> Result<VerifiedClaims, InvalidReason> {
        self.verify_as(token, TokenType::Access)
    }

    /// Verifies a token of the given kind, with no network hop.
    pub fn verify_as(&self, token: &str, typ: TokenType) -> Result<VerifiedClaims, InvalidReason> {
        let result = self.check(token, typ);
        match &result {
            Ok(_) => {
                self.inner.metrics.verified.inc();
            }
            Err(reason) => {
                self.inner
                    .metrics
                    .rejected
                    .get_or_create(&ReasonLabel {
                        reason: reason.as_str(),
                    })
                    .inc();
            }
        }
        result
    }

    fn check(&self, token: &str, typ: TokenType) -> Result<VerifiedClaims, InvalidReason> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        // Fail closed: a view older than the bound may miss revocations and key changes.
        if inner.staleness_ms(now) > duration_ms(inner.cfg.max_staleness) {
            return Err(InvalidReason::VerifierStale);
        }
        let keys = inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let expect = match typ {
            TokenType::Access => &inner.access,
            TokenType::Id => &inner.id,
        };
        let claims = match jwt::verify(token, &keys, expect, now) {
            Err(InvalidReason::UnknownKey) => {
                inner.request_refetch(now);
                return Err(InvalidReason::UnknownKey);
            }
            r => r?,
        };
        let revoked = inner.revoked.read().unwrap_or_else(PoisonError::into_inner);
        if revoked.overflow {
            return Err(InvalidReason::VerifierStale);
        }
        if claims.jti().is_some_and(|j| revoked.jtis.contains_key(j)) {
            return Err(InvalidReason::Revoked);
        }
        let cut = |map: &HashMap<String, i64>, id: Option<&str>| {
            id.and_then(|id| map.get(id))
                .is_some_and(|nb| claims.iat <= *nb)
        };
        if cut(&revoked.subjects, Some(claims.sub())) || cut(&revoked.clients, claims.client_id()) {
            return Err(InvalidReason::Revoked);
        }
        drop(revoked);
        Ok(claims)
    }

    /// Seconds since the older of the key and revocation views was current (`None`:
    /// never loaded).
    pub fn staleness(&self) -> Option<Duration> {
        let ms = self.inner.staleness_ms(self.inner.clock.now());
        (ms != i64::MAX).then(|| Duration::from_millis(u64::try_from(ms.max(0)).unwrap_or(0)))
    }

    /// Fetches the JWKS now and swaps the key snapshot.
    pub async fn refresh_jwks(&self) -> Result<Duration, SourceError> {
        let r = self.inner.refresh_jwks().await;
        self.inner.count_refresh("jwks", r.is_ok());
        r
    }

    /// Polls revocations now (snapshot on the first call, then changes since the cursor).
    pub async fn poll_revocations(&self) -> Result<(), SourceError> {
        let r = self.inner.poll_revocations().await;
        self.inner.count_refresh("revocations", r.is_ok());
        r
    }

    /// Both, for a start-up that wants to be ready before serving.
    pub async fn refresh_all(&self) -> Result<(), SourceError> {
        self.refresh_jwks().await?;
        self.poll_revocations().await
    }

    /// Applies one `sec.token.*` event (what the event loop does with each).
    pub fn apply_event(&self, event: &SecurityEvent) {
        self.inner.apply_event(event);
    }

    /// Runs the background loops under `supervisor`: `token_verifier_jwks` (refresh every
    /// max-age or on an unknown kid / key event), `token_verifier_revocations` (poll every
    /// `poll_interval`, or at once on a lag notice), and with a bus `token_verifier_events`
    /// (live `sec.token.*` events). Each returns on `shutdown`.
    pub fn spawn(
        &self,
        supervisor: &mut Supervisor,
        bus: Option<EventBus>,
        shutdown: &CancellationToken,
    ) {
        let (v, stop) = (self.clone(), shutdown.clone());
        supervisor.spawn("token_verifier_jwks", move || {
            let (v, stop) = (v.clone(), stop.clone());
            async move { v.jwks_loop(stop).await }
        });
        let (v, stop) = (self.clone(), shutdown.clone());
        supervisor.spawn("token_verifier_revocations", move || {
            let (v, stop) = (v.clone(), stop.clone());
            async move { v.revocation_loop(stop).await }
        });
        if let Some(bus) = bus {
            let (v, stop) = (self.clone(), shutdown.clone());
            supervisor.spawn("token_verifier_events", move || {
                let (v, stop, bus) = (v.clone(), stop.clone(), bus.clone());
                async move { v.event_loop(bus, stop).await }
            });
        }
    }

    async fn jwks_loop(self, stop: CancellationToken) {
        loop {
            let wait = match self.refresh_jwks().await {
                Ok(max_age) => max_age,
                Err(e) => {
                    tracing::warn!(error = %e, "jwks refresh failed; retrying");
                    Duration::from_secs(1)
                }
            };
            self.inner.update_staleness_gauge();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = self.inner.refresh_jwks.notified() => {}
            }
        }
    }

    async fn revocation_loop(self, stop: CancellationToken) {
        loop {
            // Floors keep a zero interval in a config from turning into a busy loop.
            let wait = match self.poll_revocations().await {
                Ok(()) => self.inner.cfg.poll_interval.max(MIN_WAIT),
                Err(e) => {
                    tracing::warn!(error = %e, "revocation poll failed; retrying");
                    Duration::from_secs(1)
                        .min(self.inner.cfg.poll_interval)
                        .max(MIN_WAIT)
                }
            };
            self.inner.update_staleness_gauge();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = self.inner.poll_now.notified() => {}
            }
        }
    }

    async fn event_loop(self, bus: EventBus, stop: CancellationToken) {
        let mut sub: Subscription = match bus
            .subscribe(&[EVENT_FILTER], self.inner.cfg.event_buffer)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to token events; polling only");
                // Returning makes the supervisor retry with backoff.
                return;
            }
        };
        // Anything published before the subscription existed is caught by one poll.
        self.inner.poll_now.notify_one();
        loop {
            let notice = tokio::select! {
                () = stop.cancelled() => return,
                n = sub.recv() => n,
            };
            match notice {
                Some(n) => self.inner.on_notice(n),
                None => return,
            }
        }
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Inner {
    fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::Event(e) => self.apply_event(&e),
            Notice::Lagged(n) => {
                // Events were lost: only a poll can tell which revocations we missed.
                tracing::warn!(lost = n, "token events lost; polling revocations now");
                self.poll_now.notify_one();
            }
        }
    }

    fn staleness_ms(&self, now: DateTime<Utc>) -> i64 {
        let oldest = self
            .jwks_as_of
            .load(Ordering::Acquire)
            .min(self.revocations_as_of.load(Ordering::Acquire));
        if oldest == i64::MIN {
            return i64::MAX;
        }
        millis(now).saturating_sub(oldest)
    }

    fn update_staleness_gauge(&self) {
        let ms = self.staleness_ms(self.clock.now());
        // Never loaded: report the bound's double, an obviously-stale figure, not infinity.
        let secs = if ms == i64::MAX {
            2.0 * self.cfg.max_staleness.as_secs_f64()
        } else {
            ms as f64 / 1000.0
        };
        self.metrics.staleness.set(secs);
    }

    fn count_refresh(&self, source: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.metrics
            .refreshes
            .get_or_create(&RefreshLabel { source, outcome })
            .inc();
    }

    /// Grants at most one refetch per `min_refetch_interval`: a flood of random kids costs
    /// one JWKS fetch, not one per token.
    fn request_refetch(&self, now: DateTime<Utc>) {
        let now_ms = millis(now);
        let min = duration_ms(self.cfg.min_refetch_interval);
        let last = self.last_refetch.load(Ordering::Acquire);
        if last != i64::MIN && now_ms.saturating_sub(last) < min {
            return;
        }
        if self
            .last_refetch
            .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.metrics.refetches.inc();
            self.refresh_jwks.notify_one();
        }
    }

    async fn refresh_jwks(&self) -> Result<Duration, SourceError> {
        let doc = self.jwks_source.fetch_jwks().await?;
        let mut keys = KeySet::from_jwks_json(&doc.jwks_json)
            .map_err(|e| SourceError::Invalid(e.to_string()))?;
        let revoked_kids: Vec<String> = self
            .revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .kids
            .iter()
            .cloned()
            .collect();
        // A key revoked by event or poll stays out, whatever a (possibly older) JWKS says.
        for kid in &revoked_kids {
            keys.set_state(kid, KeyState::Revoked);
        }
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        self.jwks_as_of
            .store(millis(self.clock.now()), Ordering::Release);
        // Refresh at least three times per staleness bound, whatever max-age says.
        let cap = (self.cfg.max_staleness / 3).max(Duration::from_secs(1));
        Ok(doc.max_age.clamp(Duration::from_secs(1), cap))
    }

    async fn poll_revocations(&self) -> Result<(), SourceError> {
        let cursor = self
            .revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .cursor
            .clone();
        let page = self.revocation_source.list_revocations(&cursor).await?;
        let received = self.clock.now();
        let mut kids = Vec::new();
        {
            let mut state = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
            if page.snapshot {
                // Revoked kids survive a snapshot: a key revocation is final, and the
                // snapshot lists them again anyway.
                let kept_kids = std::mem::take(&mut state.kids);
                *state = RevocationState {
                    kids: kept_kids,
                    ..RevocationState::default()
                };
            }
            for r in page.revocations {
                if let Some(kid) = state.add(r, self.cfg.max_revocations) {
                    kids.push(kid);
                }
            }
            let skew = i64::try_from(self.cfg.skew.as_secs()).unwrap_or(i64::MAX);
            state.prune(received.timestamp(), skew);
            if page.snapshot && state.len() < self.cfg.max_revocations {
                state.overflow = false;
            }
            state.cursor = page.cursor;
        }
        self.revoke_kids(&kids);
        // Conservative: the earlier of the server's and our own time of the answer.
        let as_of = page.as_of.min(received);
        self.revocations_as_of
            .store(millis(as_of), Ordering::Release);
        Ok(())
    }

    fn revoke_kids(&self, kids: &[String]) {
        if kids.is_empty() {
            return;
        }
        let mut guard = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let mut keys = KeySet::clone(&guard);
        for kid in kids {
            keys.set_state(kid, KeyState::Revoked);
        }
        *guard = Arc::new(keys);
    }

    fn apply_event(&self, e: &SecurityEvent) {
        if e.service != "token" || !e.r#type.starts_with(EVENT_FILTER) {
            return;
        }
        let detail = |k: &str| e.details.get(k).map(String::as_str).unwrap_or_default();
        let unix = |k: &str| {
            detail(k)
                .parse::<i64>()
                .ok()
                .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
        };
        let revocation = if e.r#type.ends_with(".revoked") {
            match detail("kind") {
                "jti" => unix("expires_at").map(|expires_at| Revocation::Jti {
                    jti: detail("jti").to_owned(),
                    expires_at,
                }),
                "subject" => unix("not_before").map(|not_before| Revocation::Subject {
                    subject: e.subject.clone(),
                    not_before,
                }),
                "client" => unix("not_before").map(|not_before| Revocation::Client {
                    client_id: e.subject.clone(),
                    not_before,
                }),
                "signing_key" => Some(Revocation::Kid {
                    kid: detail("kid").to_owned(),
                }),
                // `sec.token.key.revoked` without a kind: the kid is in the details.
                "" if !detail("kid").is_empty() => Some(Revocation::Kid {
                    kid: detail("kid").to_owned(),
                }),
                _ => None,
            }
        } else {
            None
        };
        match revocation {
            Some(r) => {
                let kid = self
                    .revoked
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(r, self.cfg.max_revocations);
                if let Some(kid) = kid {
                    self.revoke_kids(&[kid]);
                }
                self.metrics.events.inc();
            }
            None if e.r#type.starts_with("sec.token.key.") => {
                // A key was created, activated or retired: fetch the JWKS now rather than
                // at the next max-age.
                self.refresh_jwks.notify_one();
                self.metrics.events.inc();
            }
            None => {}
        }
    }
}
