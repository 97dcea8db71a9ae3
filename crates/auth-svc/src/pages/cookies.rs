//! The pages' cookies: the browser session (its value is session-svc's secret session id)
//! and the per-browser CSRF secret. Outside dev both carry the `__Host-` prefix, which
//! makes the browser insist on `Secure`, `Path=/` and no `Domain` (so a sibling subdomain
//! cannot plant one); in dev (plain http on loopback) they drop the prefix and `Secure`.

use axum::http::{HeaderMap, HeaderValue, header};

use crate::config::OAuthConfig;

/// Longest cookie value we read (a session id or CSRF secret is 43 characters).
const MAX_COOKIE_VALUE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cookie {
    Session,
    Csrf,
}

impl Cookie {
    pub fn name(self, cfg: &OAuthConfig) -> &'static str {
        match (self, cfg.dev_cookies()) {
            (Cookie::Session, false) => "__Host-sec_session",
            (Cookie::Session, true) => "sec_session",
            (Cookie::Csrf, false) => "__Host-sec_csrf",
            (Cookie::Csrf, true) => "sec_csrf",
        }
    }
}

/// The value of cookie `name` in the request (the first one when repeated), if it is a
/// plausible token (base64url, bounded).
pub fn read(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_COOKIE_VALUE
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Lax` (the session must survive the
/// top-level navigation back from a client), `Path=/`, `Secure` outside dev.
/// `max_age` `Some(0)` deletes the cookie; `None` makes it a browser-session cookie.
pub fn set(cfg: &OAuthConfig, which: Cookie, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut s = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax",
        which.name(cfg)
    );
    if !cfg.dev_cookies() {
        s.push_str("; Secure");
    }
    if let Some(age) = max_age {
        s.push_str(&format!("; Max-Age={age}"));
    }
    // The value is ours (base64url), so this never fails; fall back to deleting.
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("sec_invalid=; Max-Age=0"))
}

/// Deletes `which`.
pub fn clear(cfg: &OAuthConfig, which: Cookie) -> HeaderValue {
    set(cfg, which, "", Some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prod() -> OAuthConfig {
        OAuthConfig {
            issuer: "https://login.example.com".into(),
            ..OAuthConfig::default()
        }
    }

    #[test]
    fn production_cookies_are_host_prefixed_and_secure() {
        let v = set(&prod(), Cookie::Session, "abc", Some(60));
        assert_eq!(
            v,
            "__Host-sec_session=abc; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=60"
        );
        let dev = set(&OAuthConfig::default(), Cookie::Csrf, "abc", None);
        assert_eq!(dev, "sec_csrf=abc; Path=/; HttpOnly; SameSite=Lax");
        assert!(
            clear(&prod(), Cookie::Session)
                .to_str()
                .unwrap()
                .contains("Max-Age=0")
        );
    }

    #[test]
    fn reads_the_named_cookie_and_refuses_odd_values() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; sec_session=abc_-9".parse().unwrap());
        h.append(header::COOKIE, "sec_csrf=x;y".parse().unwrap());
        assert_eq!(read(&h, "sec_session").as_deref(), Some("abc_-9"));
        assert_eq!(read(&h, "sec_csrf").as_deref(), Some("x"));
        assert_eq!(read(&h, "missing"), None);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "sec_session=a%20b".parse().unwrap());
        assert_eq!(read(&h, "sec_session"), None);
        let mut h = HeaderMap::new();
        let long = format!("sec_session={}", "a".repeat(300));
        h.insert(header::COOKIE, long.parse().unwrap());
        assert_eq!(read(&h, "sec_session"), None);
    }
}
