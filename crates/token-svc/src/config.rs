//! token-svc's `[token]` section: issuer, algorithm, key rotation, lifetimes and limits.

use sec_common::config::ServiceConfig;
use serde::{Deserialize, Serialize};

/// Claim names the service sets itself; `extra_claims` may not list them.
pub const RESERVED_CLAIMS: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "iat",
    "nbf",
    "jti",
    "client_id",
    "scope",
    "auth_time",
    "acr",
    "amr",
    "nonce",
    "azp",
    "sid",
    "at_hash",
    "c_hash",
    "typ",
    "cnf",
    "kid",
    "alg",
];

const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// `iss` of every token; the public facade's URL.
    pub issuer: String,
    /// `aud` of access tokens when the grant names none, and what ValidateToken expects
    /// when the caller names none.
    pub default_audience: String,
    /// Algorithm of new signing keys: ES256 (default), EdDSA, RS256 or PS256.
    pub algorithm: String,
    /// A new key becomes current this often (1 hour ..= 1 year).
    pub rotation_period_seconds: u64,
    /// How long verifiers may cache the JWKS.
    pub jwks_max_age_seconds: u64,
    /// A `next` key is in the JWKS at least this long before it signs (≥ jwks_max_age).
    pub publish_ahead_seconds: u64,
    pub access_ttl_seconds: u64,
    pub max_access_ttl_seconds: u64,
    pub id_ttl_seconds: u64,
    pub max_id_ttl_seconds: u64,
    pub refresh_ttl_seconds: u64,
    pub max_refresh_ttl_seconds: u64,
    /// A refresh token presented again within this long after its rotation gets a new
    /// successor instead of revoking its family (a lost response). 0..=60.
    pub refresh_grace_seconds: u64,
    /// Clock skew allowed on `exp` and `nbf` (0..=300).
    pub skew_seconds: u64,
    /// Longer tokens are refused before parsing.
    pub max_token_bytes: usize,
    /// Claim names IssueTokens accepts in `extra_claims_json`.
    pub extra_claims: Vec<String>,
    /// Service identities that may IssueTokens / RefreshTokens (the admin always may).
    pub issuers: Vec<String>,
    /// How often the rotation loop checks the key lifecycle.
    pub rotation_check_seconds: u64,
    /// How often a replica reloads revocations written by the others.
    pub revocation_poll_seconds: u64,
    /// How often expired refresh tokens and revocations are deleted.
    pub cleanup_interval_seconds: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "http://127.0.0.1:8080".into(),
            default_audience: "sec-platform".into(),
            algorithm: "ES256".into(),
            rotation_period_seconds: 30 * DAY,
            jwks_max_age_seconds: 300,
            publish_ahead_seconds: HOUR,
            access_ttl_seconds: 600,
            max_access_ttl_seconds: DAY,
            id_ttl_seconds: HOUR,
            max_id_ttl_seconds: DAY,
            refresh_ttl_seconds: 30 * DAY,
            max_refresh_ttl_seconds: 365 * DAY,
            refresh_grace_seconds: 10,
            skew_seconds: 60,
            max_token_bytes: 8192,
            extra_claims: Vec::new(),
            issuers: vec!["auth".into()],
            rotation_check_seconds: 60,
            revocation_poll_seconds: 2,
            cleanup_interval_seconds: 600,
        }
    }
}

impl TokenConfig {
    /// The longest lifetime a token signed now can have, plus skew: how long a key
    /// stays published after it stops signing.
    pub fn retire_after_seconds(&self) -> u64 {
        self.max_access_ttl_seconds.max(self.max_id_ttl_seconds) + self.skew_seconds
    }
}

impl ServiceConfig for TokenConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let invalid = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        if !(self.issuer.starts_with("https://") || self.issuer.starts_with("http://"))
            || self.issuer.len() > 512
        {
            return invalid("issuer", "must be an http(s) URL of at most 512 bytes");
        }
        if self.default_audience.is_empty() || self.default_audience.len() > 256 {
            return invalid("default_audience", "must be 1..=256 bytes");
        }
        if crate::keys::Alg::parse(&self.algorithm).is_none() {
            return invalid("algorithm", "must be one of ES256, EdDSA, RS256, PS256");
        }
        if !(HOUR..=365 * DAY).contains(&self.rotation_period_seconds) {
            return invalid(
                "rotation_period_seconds",
                "must be between 1 hour and 1 year",
            );
        }
        if !(1..=DAY).contains(&self.jwks_max_age_seconds) {
            return invalid("jwks_max_age_seconds", "must be between 1 second and 1 day");
        }
        if self.publish_ahead_seconds < self.jwks_max_age_seconds
            || self.publish_ahead_seconds >= self.rotation_period_seconds
        {
            return invalid(
                "publish_ahead_seconds",
                "must be at least jwks_max_age_seconds and less than rotation_period_seconds",
            );
        }
        for (k, d, m, cap) in [
            (
                "access_ttl_seconds",
                self.access_ttl_seconds,
                self.max_access_ttl_seconds,
                DAY,
            ),
            (
                "id_ttl_seconds",
                self.id_ttl_seconds,
                self.max_id_ttl_seconds,
                DAY,
            ),
            (
                "refresh_ttl_seconds",
                self.refresh_ttl_seconds,
                self.max_refresh_ttl_seconds,
                365 * DAY,
            ),
        ] {
            if d == 0 || d > m || m > cap {
                return invalid(
                    k,
                    "default must be 1..=max, and max within its cap (1 day for access/id tokens, 1 year for refresh)",
                );
            }
        }
        if self.refresh_grace_seconds > 60 {
            return invalid("refresh_grace_seconds", "must be at most 60");
        }
        if self.skew_seconds > 300 {
            return invalid("skew_seconds", "must be at most 300");
        }
        if !(512..=65_536).contains(&self.max_token_bytes) {
            return invalid("max_token_bytes", "must be between 512 and 65536");
        }
        if self.extra_claims.len() > 64 {
            return invalid("extra_claims", "at most 64 names");
        }
        for c in &self.extra_claims {
            if c.is_empty() || c.len() > 64 || RESERVED_CLAIMS.contains(&c.as_str()) {
                return invalid(
                    "extra_claims",
                    "names must be 1..=64 bytes and not a reserved claim",
                );
            }
        }
        if self.issuers.len() > 32 || self.issuers.iter().any(|s| s.is_empty() || s.len() > 128) {
            return invalid("issuers", "at most 32 service identities of 1..=128 bytes");
        }
        for (k, v) in [
            ("rotation_check_seconds", self.rotation_check_seconds),
            ("revocation_poll_seconds", self.revocation_poll_seconds),
            ("cleanup_interval_seconds", self.cleanup_interval_seconds),
        ] {
            if !(1..=DAY).contains(&v) {
                return invalid(k, "must be between 1 second and 1 day");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        TokenConfig::default().validate().unwrap();
    }

    #[test]
    fn bounds_are_enforced() {
        type Change = Box<dyn Fn(&mut TokenConfig)>;
        let bad: Vec<(&str, Change)> = vec![
            ("algorithm", Box::new(|c| c.algorithm = "HS256".into())),
            ("algorithm", Box::new(|c| c.algorithm = "none".into())),
            (
                "rotation_period_seconds",
                Box::new(|c| c.rotation_period_seconds = 60),
            ),
            (
                "publish_ahead_seconds",
                Box::new(|c| c.publish_ahead_seconds = 10),
            ),
            (
                "refresh_grace_seconds",
                Box::new(|c| c.refresh_grace_seconds = 61),
            ),
            ("skew_seconds", Box::new(|c| c.skew_seconds = 301)),
            ("access_ttl_seconds", Box::new(|c| c.access_ttl_seconds = 0)),
            (
                "extra_claims",
                Box::new(|c| c.extra_claims = vec!["sub".into()]),
            ),
            ("max_token_bytes", Box::new(|c| c.max_token_bytes = 10)),
        ];
        for (key, f) in bad {
            let mut c = TokenConfig::default();
            f(&mut c);
            assert_eq!(c.validate().unwrap_err().0, key);
        }
    }
}
