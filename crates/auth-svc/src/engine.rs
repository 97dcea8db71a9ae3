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
use crate::store::AuthStore;

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
