//! [`AuthServer`]: what every handler of auth-svc shares, gRPC and facade alike: the
//! store, the clients of token-svc and session-svc, the keyed hasher of client secrets,
//! the password hasher, the KV (pending logins, assertion replay cache), the clock, the
//! event emitter and the metrics.
//!
//! The logic lives in `impl AuthServer` blocks next to its topic: `clients.rs` and
//! `users.rs` (management, secret and password checks), `oauth/` (the protocol
//! endpoints), `pages/` (login, consent, logout).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sec_common::auth::Authenticator;
use sec_common::clock::SharedClock;
use sec_common::events::{Outcome, SecurityEvent, Severity, new_event};
use sec_common::grpc::BearerToken;
use sec_common::password::PasswordHasher;
use sec_common::secret::KeyedHasher;
use sec_common::storage::Kv;
use sec_proto::session::v1::session_service_client::SessionServiceClient;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::config::OAuthConfig;
use crate::store::{AuthStore, ClientRow};

pub type TokenClient = TokenServiceClient<InterceptedService<Channel, BearerToken>>;
pub type SessionClient = SessionServiceClient<InterceptedService<Channel, BearerToken>>;

/// Publishes a security event (the platform's bus in production, a collector in tests).
pub type Emit = Arc<dyn Fn(SecurityEvent) + Send + Sync>;

pub struct AuthServer {
    pub cfg: OAuthConfig,
    pub store: Arc<dyn AuthStore>,
    /// token-svc, as service `auth` (cheap to clone: one shared channel).
    pub tokens: TokenClient,
    /// session-svc, as service `auth`.
    pub sessions: SessionClient,
    /// HMAC-SHA-256 of client secrets and registration access tokens, under a key sealed
    /// by crypto-svc and kept in the store (`client-secret-key`).
    pub secrets: KeyedHasher,
    /// HMAC key of CSRF tokens and other page-bound values (`page-key`).
    pub page_key: KeyedHasher,
    pub passwords: PasswordHasher,
    /// Pending authorization requests during login, private_key_jwt `jti` replay cache.
    pub kv: Kv,
    pub clock: SharedClock,
    pub emit: Emit,
    pub metrics: AuthMetrics,
    /// The platform's authenticator (admin bearer token on admin facade endpoints).
    pub admin: Arc<Authenticator>,
    /// Recently read clients, for client authentication (`oauth.client_cache_ttl_ms`).
    pub client_cache: ClientCache,
}

/// At most this many clients are cached; beyond it, lookups go to the store.
const CLIENT_CACHE_MAX: usize = 10_000;

/// A short-lived copy of recently read clients: client authentication on every token,
/// introspection and revocation request would otherwise be a store round trip (on
/// SQLite a hop to its worker thread and back: a tenth of the grant's CPU). Only clients
/// that exist are cached, so unknown ids cannot fill it; writes through this replica
/// forget the entry at once.
#[derive(Debug)]
pub struct ClientCache {
    ttl_us: i64,
    entries: std::sync::Mutex<std::collections::HashMap<String, (i64, ClientRow)>>,
    /// Bumped by every [`forget`](Self::forget): a read that began before a write must
    /// not put back what the write replaced.
    generation: std::sync::atomic::AtomicU64,
}

impl ClientCache {
    pub fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_us: i64::try_from(ttl_ms).unwrap_or(0).saturating_mul(1000),
            entries: std::sync::Mutex::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (i64, ClientRow)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached client, if it was read less than the TTL before `now_us`.
    pub fn get(&self, client_id: &str, now_us: i64) -> Option<ClientRow> {
        if self.ttl_us == 0 {
            return None;
        }
        match self.lock().get(client_id) {
            Some((at, row)) if now_us.saturating_sub(*at) < self.ttl_us => Some(row.clone()),
            _ => None,
        }
    }

    /// Taken before reading the store; [`put`](Self::put) with it.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Caches `row` read at `now_us`, unless a write was forgotten since `generation`.
    pub fn put(&self, row: &ClientRow, now_us: i64, generation: u64) {
        if self.ttl_us == 0 {
            return;
        }
        let mut map = self.lock();
        if self.generation() != generation {
            return;
        }
        if map.len() >= CLIENT_CACHE_MAX && !map.contains_key(&row.client_id) {
            let ttl = self.ttl_us;
            map.retain(|_, (at, _)| now_us.saturating_sub(*at) < ttl);
            if map.len() >= CLIENT_CACHE_MAX {
                return;
            }
        }
        map.insert(row.client_id.clone(), (now_us, row.clone()));
    }

    pub fn forget(&self, client_id: &str) {
        let mut map = self.lock();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        map.remove(client_id);
    }
}

impl AuthServer {
    /// A new event of auth-svc, outcome success, severity info.
    pub fn event(&self, event_type: &str) -> SecurityEvent {
        new_event(self.clock.as_ref(), crate::NAME, event_type)
    }

    /// A failure event (outcome failure, severity low).
    pub fn failure_event(&self, event_type: &str) -> SecurityEvent {
        let mut e = self.event(event_type);
        e.outcome = Outcome::Failure as i32;
        e.severity = Severity::Low as i32;
        e
    }

    pub fn publish(&self, e: SecurityEvent) {
        (self.emit)(e);
    }

    /// A fresh opaque value with 256 random bits (authorization codes, login ids), base64url.
    pub fn random_value() -> anyhow::Result<String> {
        sec_common::secret::generate_secret("")
    }

    /// What the store keeps of an authorization code: SHA-256 of it (the code has 256
    /// random bits, so a fast hash is enough; the code itself is never stored).
    pub fn code_hash(code: &str) -> Vec<u8> {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, code.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// Now, in unix microseconds.
    pub fn now_us(&self) -> i64 {
        self.clock.now().timestamp_micros()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    grant: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Prometheus metrics. Every label is a `&'static str` from a closed set (endpoint names,
/// grant types, RFC error codes), never a caller's string.
#[derive(Clone, Debug, Default)]
pub struct AuthMetrics {
    requests: Family<EndpointLabels, Counter>,
    grants: Family<GrantLabels, Counter>,
    logins: Family<OutcomeLabel, Counter>,
}

impl AuthMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "sec_auth_http_requests",
            "Facade requests by endpoint and outcome (ok, or the RFC error code)",
            m.requests.clone(),
        );
        registry.register(
            "sec_auth_grants",
            "Token endpoint grants by grant type and outcome",
            m.grants.clone(),
        );
        registry.register(
            "sec_auth_logins",
            "Password logins by outcome (success, invalid_credentials, disabled, locked, error)",
            m.logins.clone(),
        );
        m
    }

    pub fn request(&self, endpoint: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&EndpointLabels { endpoint, outcome })
            .inc();
    }

    pub fn grant(&self, grant: &'static str, outcome: &'static str) {
        self.grants
            .get_or_create(&GrantLabels { grant, outcome })
            .inc();
    }

    pub fn login(&self, outcome: &'static str) {
        self.logins.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::ClientCache;
    use crate::store::contract::client;

    #[test]
    fn cached_clients_expire_after_the_ttl() {
        let cache = ClientCache::new(2_000);
        let g = cache.generation();
        cache.put(&client("a"), 1_000_000, g);
        assert!(cache.get("a", 1_000_000 + 1_999_999).is_some());
        assert!(cache.get("a", 1_000_000 + 2_000_000).is_none(), "expired");
        assert!(cache.get("b", 1_000_000).is_none());
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_cached() {
        let cache = ClientCache::new(2_000);
        let before_write = cache.generation();
        // A write through this replica lands while the read is in flight...
        cache.forget("a");
        // ...so what the read saw (the old secret) must not be put back.
        cache.put(&client("a"), 0, before_write);
        assert!(cache.get("a", 1).is_none());
        cache.put(&client("a"), 0, cache.generation());
        assert!(cache.get("a", 1).is_some());
        cache.forget("a");
        assert!(cache.get("a", 1).is_none(), "a write forgets at once");
    }

    #[test]
    fn ttl_zero_disables_the_cache() {
        let cache = ClientCache::new(0);
        cache.put(&client("a"), 0, cache.generation());
        assert!(cache.get("a", 0).is_none());
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = ClientCache::new(1_000);
        for i in 0..super::CLIENT_CACHE_MAX + 10 {
            cache.put(&client(&format!("c{i}")), 0, cache.generation());
        }
        assert_eq!(cache.lock().len(), super::CLIENT_CACHE_MAX);
        // Once the old entries expired, new ones replace them.
        cache.put(&client("late"), 2_000_000, cache.generation());
        assert!(cache.get("late", 2_000_000).is_some());
        assert_eq!(cache.lock().len(), 1);
    }
}
