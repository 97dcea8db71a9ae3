//! ValidateToken: the shared core `sec_common::jwt::verify` (size limit before parsing,
//! alg allow-list, the key's bound algorithm, signature, typ, iss, aud, exp/nbf/iat with
//! skew) over this service's key set, then the revocation replica. Each failure is one
//! reason of a closed set.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{Engine, secs};

/// Why a token is not valid (mirrors `sec.token.v1.InvalidReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Malformed = 1,
    Oversized = 2,
    UnsupportedAlg = 3,
    UnknownKey = 4,
    KeyRetired = 5,
    KeyRevoked = 6,
    AlgMismatch = 7,
    BadSignature = 8,
    WrongType = 9,
    WrongIssuer = 10,
    WrongAudience = 11,
    Expired = 12,
    NotYetValid = 13,
    Revoked = 14,
}

impl Reason {
    /// The shared core's reason (`sec_common::jwt`), one to one.
    pub fn from_core(r: sec_common::jwt::InvalidReason) -> Self {
        use sec_common::jwt::InvalidReason as C;
        match r {
            C::Malformed => Reason::Malformed,
            C::Oversized => Reason::Oversized,
            C::UnsupportedAlg => Reason::UnsupportedAlg,
            C::UnknownKey => Reason::UnknownKey,
            C::KeyRetired => Reason::KeyRetired,
            C::KeyRevoked => Reason::KeyRevoked,
            C::AlgMismatch => Reason::AlgMismatch,
            C::BadSignature => Reason::BadSignature,
            C::WrongType => Reason::WrongType,
            C::WrongIssuer => Reason::WrongIssuer,
            C::WrongAudience => Reason::WrongAudience,
            C::Expired => Reason::Expired,
            C::NotYetValid => Reason::NotYetValid,
            // Local verifiers only; this service's view is the store itself.
            C::Revoked | C::VerifierStale => Reason::Revoked,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Oversized => "oversized",
            Reason::UnsupportedAlg => "unsupported_alg",
            Reason::UnknownKey => "unknown_key",
            Reason::KeyRetired => "key_retired",
            Reason::KeyRevoked => "key_revoked",
            Reason::AlgMismatch => "alg_mismatch",
            Reason::BadSignature => "bad_signature",
            Reason::WrongType => "wrong_type",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Access,
    Id,
    /// Either (RevokeToken with a whole token).
    Any,
}

#[derive(Debug, Clone)]
pub struct Validated {
    pub claims: Map<String, Value>,
    pub subject: String,
    pub client_id: String,
    pub scope: String,
    pub jti: String,
    pub expires_at: DateTime<Utc>,
    pub kid: String,
}

impl Engine {
    /// Checks `token`; `audience` None means the configured default audience (for ID
    /// tokens the audience is the client id and must be given).
    pub async fn validate(
        &self,
        token: &str,
        kind: Kind,
        audience: Option<&str>,
    ) -> Result<Validated, Reason> {
        let r = self.check(token, kind, audience).await;
        let now = self.clock.now();
        match &r {
            Ok(v) => {
                self.metrics.validated.inc();
                self.stats
                    .record(now, Some(&v.client_id), |c| c.validated += 1);
            }
            Err(reason) => {
                self.metrics.rejected(reason.as_str());
                let i = *reason as usize;
                self.stats.record(now, None, |c| {
                    if let Some(n) = c.rejected.get_mut(i) {
                        *n += 1;
                    }
                });
            }
        }
        r
    }

    async fn check(
        &self,
        token: &str,
        kind: Kind,
        audience: Option<&str>,
    ) -> Result<Validated, Reason> {
        use sec_common::jwt::{self, TokenType};
        if token.len() > self.cfg.max_token_bytes {
            return Err(Reason::Oversized);
        }
        let (typ, audience) = match kind {
            Kind::Access => (TokenType::Access, audience.filter(|a| !a.is_empty())),
            Kind::Id => (TokenType::Id, audience.filter(|a| !a.is_empty())),
            // RevokeToken with a whole token: its own type and audience, but the
            // signature, issuer and times are checked all the same.
            Kind::Any => {
                let (h, c) = jwt::decode_unverified(token, self.cfg.max_token_bytes)
                    .map_err(Reason::from_core)?;
                let at = h.get("typ").and_then(Value::as_str).is_some_and(|t| {
                    t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
                });
                let aud = match c.get("aud") {
                    Some(Value::String(a)) => Some(a.clone()),
                    Some(Value::Array(v)) => v.first().and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                };
                let typ = if at { TokenType::Access } else { TokenType::Id };
                return self.check_with(token, typ, aud.as_deref()).await;
            }
        };
        self.check_with(token, typ, audience).await
    }

    async fn check_with(
        &self,
        token: &str,
        typ: sec_common::jwt::TokenType,
        audience: Option<&str>,
    ) -> Result<Validated, Reason> {
        use sec_common::jwt::{self, Expectations, InvalidReason};
        let expect = Expectations {
            issuer: self.cfg.issuer.clone(),
            audience: audience.unwrap_or(&self.cfg.default_audience).to_owned(),
            typ,
            skew: std::time::Duration::from_secs(self.cfg.skew_seconds),
            max_token_bytes: self.cfg.max_token_bytes,
        };
        let now = self.clock.now();
        let mut r = jwt::verify(token, &self.ring().keyset, &expect, now);
        if matches!(r, Err(InvalidReason::UnknownKey)) && self.reload_for_unknown_kid().await {
            r = jwt::verify(token, &self.ring().keyset, &expect, now);
        }
        let v = r.map_err(Reason::from_core)?;
        let jti = v.jti().unwrap_or("").to_owned();
        let client_id = v
            .client_id()
            .or_else(|| v.claims.get("azp").and_then(Value::as_str))
            .unwrap_or("")
            .to_owned();
        if self
            .revocations
            .is_revoked(&jti, v.sub(), &client_id, v.iat, &v.kid)
        {
            return Err(Reason::Revoked);
        }
        Ok(Validated {
            subject: v.sub().to_owned(),
            scope: v.scope().unwrap_or("").to_owned(),
            client_id,
            jti,
            expires_at: DateTime::from_timestamp(v.exp, 0).ok_or(Reason::Malformed)?,
            kid: v.kid.to_string(),
            claims: v.claims,
        })
    }

    /// An unknown kid may be another replica's brand-new key: reload the ring, at most
    /// once a second.
    async fn reload_for_unknown_kid(&self) -> bool {
        let now = self.clock.now();
        {
            let mut last = self
                .last_kid_reload
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t + secs(1) > now) {
                return false;
            }
            *last = Some(now);
        }
        match self.reload_ring().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "reloading signing keys for an unknown kid failed");
                false
            }
        }
    }
}
