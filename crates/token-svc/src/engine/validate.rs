//! ValidateToken: every check of a JWT this service issued, each failure mapped to one
//! reason of a closed set. The size limit is checked before anything is parsed; the
//! algorithm is the key's own (bound when the key was made), never the header's choice.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{Engine, secs};
use crate::keys::{self, Alg};
use crate::store::KeyState;

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

fn b64_json(part: &str) -> Result<Map<String, Value>, Reason> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Reason::Malformed)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Reason::Malformed),
    }
}

fn str_claim<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str, Reason> {
    m.get(k).and_then(Value::as_str).ok_or(Reason::Malformed)
}

fn int_claim(m: &Map<String, Value>, k: &str) -> Result<i64, Reason> {
    m.get(k).and_then(Value::as_i64).ok_or(Reason::Malformed)
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
        if token.len() > self.cfg.max_token_bytes {
            return Err(Reason::Oversized);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reason::Malformed);
        };
        let header = b64_json(h)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(Reason::Malformed)?;
        let alg = Alg::parse(alg).ok_or(Reason::UnsupportedAlg)?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or(Reason::UnknownKey)?;
        let key = match self.ring().keys.get(kid) {
            Some(k) => k.clone(),
            None => {
                self.reload_for_unknown_kid().await;
                self.ring()
                    .keys
                    .get(kid)
                    .cloned()
                    .ok_or(Reason::UnknownKey)?
            }
        };
        match key.state {
            KeyState::Retired => return Err(Reason::KeyRetired),
            KeyState::Revoked => return Err(Reason::KeyRevoked),
            _ => {}
        }
        if key.alg != alg {
            return Err(Reason::AlgMismatch);
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| Reason::Malformed)?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        if !keys::verify(key.alg, &key.public_key, signing_input.as_bytes(), &sig) {
            return Err(Reason::BadSignature);
        }
        let claims = b64_json(p)?;
        let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
        let is_access =
            typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt");
        let is_id = typ == "JWT";
        let type_ok = match kind {
            Kind::Access => is_access,
            Kind::Id => is_id,
            Kind::Any => is_access || is_id,
        };
        if !type_ok {
            return Err(Reason::WrongType);
        }
        let iss = str_claim(&claims, "iss")?;
        let sub = str_claim(&claims, "sub")?.to_owned();
        let exp = int_claim(&claims, "exp")?;
        let iat = int_claim(&claims, "iat")?;
        let jti = str_claim(&claims, "jti")?.to_owned();
        if iss != self.cfg.issuer {
            return Err(Reason::WrongIssuer);
        }
        let expected_aud = match (kind, audience) {
            (_, Some(a)) if !a.is_empty() => Some(a),
            (Kind::Access, _) => Some(self.cfg.default_audience.as_str()),
            _ => None,
        };
        if let Some(expected) = expected_aud {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => a == expected,
                Some(Value::Array(v)) => v.iter().any(|a| a.as_str() == Some(expected)),
                _ => false,
            };
            if !ok {
                return Err(Reason::WrongAudience);
            }
        }
        let now = self.clock.now().timestamp();
        let skew = i64::try_from(self.cfg.skew_seconds).unwrap_or(0);
        if exp + skew <= now {
            return Err(Reason::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_i64().ok_or(Reason::Malformed)?;
            if nbf - skew > now {
                return Err(Reason::NotYetValid);
            }
        }
        if iat - skew > now {
            return Err(Reason::NotYetValid);
        }
        let client_id = claims
            .get("client_id")
            .or_else(|| claims.get("azp"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if self
            .revocations
            .is_revoked(&jti, &sub, &client_id, iat, kid)
        {
            return Err(Reason::Revoked);
        }
        let scope = claims
            .get("scope")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        Ok(Validated {
            subject: sub,
            client_id,
            scope,
            jti,
            expires_at: DateTime::from_timestamp(exp, 0).ok_or(Reason::Malformed)?,
            kid: kid.to_owned(),
            claims,
        })
    }

    /// An unknown kid may be another replica's brand-new key: reload the ring, at most
    /// once a second.
    async fn reload_for_unknown_kid(&self) {
        let now = self.clock.now();
        {
            let mut last = self
                .last_kid_reload
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t + secs(1) > now) {
                return;
            }
            *last = Some(now);
        }
        if let Err(e) = self.reload_ring().await {
            tracing::warn!(error = %e, "reloading signing keys for an unknown kid failed");
        }
    }
}
