//! auth-svc's `[oauth]` section (`[auth]` is the platform's admin-token section): the
//! issuer, lifetimes of codes and pages, cookies, registration, the scope registry, and
//! the password hasher's bounds.

use std::collections::BTreeMap;

use sec_common::config::{Secret, ServiceConfig};
use serde::{Deserialize, Serialize};

/// Scopes every installation has (OIDC Core §5.4, §11). Their descriptions can be
/// overridden in `oauth.scopes`.
pub const BUILTIN_SCOPES: &[(&str, &str)] = &[
    ("openid", "Sign you in and know who you are"),
    ("profile", "Read your name and profile details"),
    ("email", "Read your email address"),
    (
        "offline_access",
        "Stay signed in when you are away (refresh tokens)",
    ),
];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    /// The public URL of the facade: discovery's `issuer`, RFC 9207 `iss`, and the base of
    /// every endpoint URL. Must equal `token.issuer` (the `iss` of the tokens).
    pub issuer: String,
    /// Dev mode for cookies: without it the session cookie is `__Host-sec_session` with
    /// `Secure`; with it (plain-http loopback only) `sec_session` without `Secure`.
    /// Default: on when the issuer is `http://` on loopback.
    pub insecure_dev_cookies: Option<bool>,
    /// Authorization codes live this long (RFC 6749 §4.1.2 recommends ≤ 10 minutes).
    pub code_ttl_seconds: u64,
    /// A login page (its CSRF token and pending request) is valid this long.
    pub login_ttl_seconds: u64,
    /// Remembered consent lasts this long (0: never remembered).
    pub consent_ttl_seconds: u64,
    /// Idle and absolute lifetime of the browser session created at login.
    pub session_idle_seconds: u64,
    pub session_absolute_seconds: u64,
    /// SHA-256 (hex, as `secd hash-token` prints) of the initial access token RFC 7591
    /// registration requires. Unset: dynamic registration needs the admin token.
    pub registration_token_hash: Option<Secret>,
    /// Anyone may register a client, with no initial access token. Off by default.
    pub open_registration: bool,
    /// Extra scopes of the registry, name → description shown on the consent page.
    pub scopes: BTreeMap<String, String>,
    /// Scopes a client created without any gets.
    pub default_client_scopes: Vec<String>,
    /// At most this many argon2id computations run at once (the rest queue).
    pub password_hash_concurrency: usize,
    /// Form and query parameters longer than this are refused (bytes, decoded).
    pub max_param_bytes: usize,
    /// Request bodies of the OAuth endpoints are capped at this many bytes.
    pub max_body_bytes: usize,
    /// How long a replica may answer client authentication from its cached copy of a
    /// client (0: every request reads the store). Changes made on this replica apply at
    /// once; a secret rotated or a client deleted on another replica still works here for
    /// at most this long. Keycloak and Hydra cache clients the same way.
    pub client_cache_ttl_ms: u64,
    /// Audiences access tokens get when the client names none; empty: token-svc's default.
    pub default_audience: Vec<String>,
    /// How often expired codes, logins and consents are deleted.
    pub cleanup_interval_seconds: u64,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            issuer: "http://127.0.0.1:8080".into(),
            insecure_dev_cookies: None,
            code_ttl_seconds: 60,
            login_ttl_seconds: 600,
            consent_ttl_seconds: 90 * 86_400,
            session_idle_seconds: 30 * 60,
            session_absolute_seconds: 12 * 3_600,
            registration_token_hash: None,
            open_registration: false,
            scopes: BTreeMap::new(),
            default_client_scopes: vec!["openid".into()],
            password_hash_concurrency: 2,
            max_param_bytes: 2_048,
            max_body_bytes: 16 * 1024,
            client_cache_ttl_ms: 2_000,
            default_audience: Vec::new(),
            cleanup_interval_seconds: 300,
        }
    }
}

impl OAuthConfig {
    /// Whether cookies drop `Secure` and the `__Host-` prefix.
    pub fn dev_cookies(&self) -> bool {
        self.insecure_dev_cookies.unwrap_or_else(|| {
            ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| self.issuer.starts_with(p))
        })
    }

    /// `issuer` + `path`, without a doubled slash.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer.trim_end_matches('/'))
    }

    /// Every scope of the registry with its description, built-ins first.
    pub fn scope_registry(&self) -> Vec<(String, String, bool)> {
        let mut out: Vec<(String, String, bool)> = BUILTIN_SCOPES
            .iter()
            .map(|(n, d)| {
                let d = self.scopes.get(*n).cloned().unwrap_or_else(|| (*d).into());
                ((*n).to_owned(), d, true)
            })
            .collect();
        for (n, d) in &self.scopes {
            if !BUILTIN_SCOPES.iter().any(|(b, _)| b == n) {
                out.push((n.clone(), d.clone(), false));
            }
        }
        out
    }

    pub fn is_registered_scope(&self, name: &str) -> bool {
        BUILTIN_SCOPES.iter().any(|(b, _)| *b == name) || self.scopes.contains_key(name)
    }
}

/// RFC 6749 `scope-token`: `%x21 / %x23-5B / %x5D-7E`, here also at most 64 bytes.
pub fn valid_scope_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

impl ServiceConfig for OAuthConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let invalid = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        let issuer_ok = (self.issuer.starts_with("https://") || self.issuer.starts_with("http://"))
            && self.issuer.len() <= 512
            && !self.issuer.contains(['?', '#']);
        if !issuer_ok {
            return invalid(
                "issuer",
                "must be an http(s) URL of at most 512 bytes, without query or fragment",
            );
        }
        if !(10..=600).contains(&self.code_ttl_seconds) {
            return invalid("code_ttl_seconds", "must be between 10 and 600");
        }
        if !(60..=3_600).contains(&self.login_ttl_seconds) {
            return invalid("login_ttl_seconds", "must be between 60 and 3600");
        }
        if self.consent_ttl_seconds > 400 * 86_400 {
            return invalid("consent_ttl_seconds", "must be at most 400 days");
        }
        if self.session_idle_seconds < 60
            || self.session_absolute_seconds < self.session_idle_seconds
        {
            return invalid(
                "session_absolute_seconds",
                "session_idle_seconds must be ≥ 60 and session_absolute_seconds ≥ it",
            );
        }
        for name in self.scopes.keys() {
            if !valid_scope_name(name) {
                return invalid(
                    "scopes",
                    "scope names are RFC 6749 scope-tokens of ≤ 64 bytes",
                );
            }
        }
        for s in &self.default_client_scopes {
            if !self.is_registered_scope(s) {
                return invalid(
                    "default_client_scopes",
                    "every scope must be in the registry",
                );
            }
        }
        if !(1..=64).contains(&self.password_hash_concurrency) {
            return invalid("password_hash_concurrency", "must be between 1 and 64");
        }
        if !(256..=16_384).contains(&self.max_param_bytes) {
            return invalid("max_param_bytes", "must be between 256 and 16384");
        }
        if self.client_cache_ttl_ms > 60_000 {
            return invalid("client_cache_ttl_ms", "must be at most 60000 (one minute)");
        }
        if !(1_024..=1_048_576).contains(&self.max_body_bytes) {
            return invalid("max_body_bytes", "must be between 1 KiB and 1 MiB");
        }
        if self.cleanup_interval_seconds == 0 {
            return invalid("cleanup_interval_seconds", "must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_dev_cookies_follow_the_issuer() {
        let c = OAuthConfig::default();
        c.validate().unwrap();
        assert!(c.dev_cookies());
        let prod = OAuthConfig {
            issuer: "https://login.example.com".into(),
            ..OAuthConfig::default()
        };
        assert!(!prod.dev_cookies());
        assert_eq!(prod.url("/token"), "https://login.example.com/token");
    }

    #[test]
    fn bad_values_name_their_key() {
        let c = OAuthConfig {
            issuer: "ftp://x".into(),
            ..OAuthConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "issuer");
        let mut c = OAuthConfig::default();
        c.scopes.insert("bad scope".into(), "x".into());
        assert_eq!(c.validate().unwrap_err().0, "scopes");
        let c = OAuthConfig {
            default_client_scopes: vec!["nope".into()],
            ..OAuthConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "default_client_scopes");
    }
}
