//! `GET /jwks`: token-svc's published signing keys (its `GetJwks`), for relying parties
//! verifying our ID and access tokens.
//!
//! Every verifier on the internet may poll this, so it is cheap: the JWK Set is kept in
//! memory for [`FRESH_SECONDS`] (one gRPC call refreshes it, concurrent requests wait for
//! that one call instead of making their own), answered with
//! `Cache-Control: public, max-age=<token-svc's max_age_seconds>`, and with an `ETag`
//! (SHA-256 of the body) so a poller that sends `If-None-Match` gets `304` and no body.
//!
//! When token-svc is down, a copy fetched less than `max_age_seconds` ago is still
//! served (the keys a verifier may cache that long are still valid); with nothing usable
//! cached the answer is `503` JSON, never an empty key set (which would make verifiers
//! reject every token).
//!
//! The set is re-checked before it is published: a key carrying private parameters is
//! dropped (and logged), so a fault upstream cannot publish a private key.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use sec_proto::token::v1::GetJwksRequest;
use serde_json::Value;

use super::error::OAuthError;
use crate::engine::AuthServer;

/// A fetched JWK Set is reused this long before token-svc is asked again.
pub const FRESH_SECONDS: i64 = 5;
/// A `GetJwks` call taking longer than this counts as token-svc being down.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// JWK members that only private (or symmetric) keys have (RFC 7518 §6.2.2, §6.3.2, §6.4).
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
/// A published set larger than this is refused (token-svc publishes a handful of keys).
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The JWK Set as published, with what the handlers derive from it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The exact body served.
    pub body: axum::body::Bytes,
    /// Quoted strong entity tag: `"<hex SHA-256 of body>"`.
    pub etag: String,
    pub max_age_seconds: u32,
    /// Distinct `alg` values of the keys, in order of first appearance.
    pub algs: Vec<String>,
    fetched_at: DateTime<Utc>,
}

/// The in-memory copy of token-svc's JWK Set. The lock is held across the fetch, so of
/// many concurrent requests for a stale set exactly one calls token-svc.
#[derive(Debug, Default)]
pub struct JwksCache {
    state: tokio::sync::Mutex<Option<Arc<Published>>>,
}

impl JwksCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current set: cached when fresh, else fetched; on a failed fetch, the cached
    /// copy while it is younger than its `max_age_seconds`.
    pub async fn get(&self, server: &AuthServer) -> Result<Arc<Published>, OAuthError> {
        let mut state = self.state.lock().await;
        let now = server.clock.now();
        if let Some(p) = state.as_ref() {
            if (now - p.fetched_at).num_seconds() < FRESH_SECONDS && now >= p.fetched_at {
                return Ok(p.clone());
            }
        }
        let mut tokens = server.tokens.clone();
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, tokens.get_jwks(GetJwksRequest {}))
            .await
            .map_err(|_| "token-svc GetJwks timed out".to_owned())
            .and_then(|r| r.map_err(|s| format!("token-svc GetJwks failed: {s}")))
            .and_then(|r| {
                let r = r.into_inner();
                publish(&r.jwks_json, r.max_age_seconds, now)
            });
        match fetched {
            Ok(p) => {
                let p = Arc::new(p);
                *state = Some(p.clone());
                Ok(p)
            }
            Err(cause) => match state.as_ref() {
                Some(p) if (now - p.fetched_at).num_seconds() < i64::from(p.max_age_seconds) => {
                    tracing::warn!(error = %cause, "serving the cached JWKS");
                    Ok(p.clone())
                }
                _ => Err(OAuthError::temporarily_unavailable(
                    "cannot read the JWKS",
                    &cause,
                )),
            },
        }
    }
}

/// Checks and normalises token-svc's `jwks_json` into what is served.
pub fn publish(
    jwks_json: &str,
    max_age_seconds: u32,
    now: DateTime<Utc>,
) -> Result<Published, String> {
    if jwks_json.len() > MAX_JWKS_BYTES {
        return Err("token-svc's JWKS is too large".into());
    }
    let mut set: Value =
        serde_json::from_str(jwks_json).map_err(|e| format!("token-svc's JWKS: {e}"))?;
    let Some(keys) = set.get_mut("keys").and_then(Value::as_array_mut) else {
        return Err("token-svc's JWKS has no `keys` array".into());
    };
    keys.retain(|k| {
        let public = k.is_object() && PRIVATE_MEMBERS.iter().all(|m| k.get(m).is_none());
        if !public {
            let kid = k.get("kid").and_then(Value::as_str).unwrap_or("");
            tracing::error!(
                kid,
                "token-svc published a key with private parameters; not served"
            );
        }
        public
    });
    let mut algs: Vec<String> = Vec::new();
    for a in keys.iter().filter_map(|k| k.get("alg").and_then(Value::as_str)) {
        if !algs.iter().any(|x| x == a) {
            algs.push(a.to_owned());
        }
    }
    let body = serde_json::to_vec(&set).map_err(|e| e.to_string())?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
    let etag = format!("\"{}\"", hex(digest.as_ref()));
    Ok(Published {
        body: body.into(),
        etag,
        max_age_seconds,
        algs,
        fetched_at: now,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 9110 §13.1.2: `If-None-Match` matches with the weak comparison; `*` matches any.
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let ours = bare(etag);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .take(64)
        .any(|t| t.trim() == "*" || bare(t) == ours)
}

pub fn routes() -> Router<Arc<AuthServer>> {
    let cache = Arc::new(JwksCache::new());
    Router::new().route(
        "/jwks",
        get(move |s: State<Arc<AuthServer>>, h: HeaderMap| jwks(s, h, cache.clone())),
    )
}

/// `GET /jwks`.
#[utoipa::path(
    get,
    path = "/jwks",
    tag = "discovery",
    summary = "The JSON Web Key Set verifying this issuer's tokens",
    params(("If-None-Match" = Option<String>, Header, description = "ETag of a cached copy")),
    responses(
        (status = 200, description = "The JWK Set", content_type = "application/jwk-set+json", body = Object,
         headers(("ETag" = String, description = "SHA-256 of the body"), ("Cache-Control" = String))),
        (status = 304, description = "The cached copy named in If-None-Match is current"),
        (status = 503, description = "token-svc is unreachable and nothing is cached", body = super::openapi::OAuthErrorBody),
    ),
)]
pub async fn jwks(
    State(server): State<Arc<AuthServer>>,
    headers: HeaderMap,
    cache: Arc<JwksCache>,
) -> Response {
    let p = match cache.get(&server).await {
        Ok(p) => p,
        Err(e) => {
            server.metrics.request("jwks", e.error);
            return e.into_response();
        }
    };
    server.metrics.request("jwks", "ok");
    let not_modified = if_none_match(&headers, &p.etag);
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Response::new(Body::from(p.body.clone()))
    };
    let h = resp.headers_mut();
    if !not_modified {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jwk-set+json"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={}", p.max_age_seconds)) {
        h.insert(header::CACHE_CONTROL, v);
    }
    if let Ok(v) = HeaderValue::from_str(&p.etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: &str = r#"{"keys":[
        {"kty":"EC","crv":"P-256","x":"a","y":"b","kid":"k1","alg":"ES256","use":"sig"},
        {"kty":"OKP","crv":"Ed25519","x":"c","kid":"k2","alg":"EdDSA","use":"sig"},
        {"kty":"EC","crv":"P-256","x":"a","y":"b","kid":"k3","alg":"ES256","use":"sig"}]}"#;

    #[test]
    fn published_set_has_a_stable_etag_and_its_algorithms() {
        let now = Utc::now();
        let p = publish(SET, 300, now).unwrap();
        assert_eq!(p.algs, vec!["ES256".to_owned(), "EdDSA".to_owned()]);
        assert_eq!(p.etag.len(), 66);
        assert!(p.etag.starts_with('"') && p.etag.ends_with('"'));
        assert_eq!(p.etag, publish(SET, 300, now).unwrap().etag);
        let other = SET.replace("k3", "k4");
        assert_ne!(p.etag, publish(&other, 300, now).unwrap().etag);
    }

    #[test]
    fn private_keys_are_never_published() {
        let set = r#"{"keys":[
            {"kty":"EC","crv":"P-256","x":"a","y":"b","d":"SECRET","kid":"bad","alg":"ES256"},
            {"kty":"oct","k":"SECRET","kid":"sym"},
            {"kty":"OKP","crv":"Ed25519","x":"c","kid":"ok","alg":"EdDSA"}]}"#;
        let p = publish(set, 60, Utc::now()).unwrap();
        let body = String::from_utf8(p.body.to_vec()).unwrap();
        assert!(!body.contains("SECRET"), "{body}");
        assert!(body.contains("\"ok\""));
        assert_eq!(p.algs, vec!["EdDSA".to_owned()]);
    }

    #[test]
    fn malformed_sets_are_refused() {
        for bad in ["", "[]", r#"{"keys":{}}"#, "{not json"] {
            assert!(publish(bad, 60, Utc::now()).is_err(), "{bad}");
        }
        assert!(publish(&"x".repeat(MAX_JWKS_BYTES + 1), 60, Utc::now()).is_err());
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison() {
        let etag = "\"abc\"";
        let mut h = HeaderMap::new();
        assert!(!if_none_match(&h, etag));
        for (value, matches) in [
            ("\"abc\"", true),
            ("W/\"abc\"", true),
            ("\"x\", \"abc\"", true),
            ("*", true),
            ("\"abcd\"", false),
            ("abc", false),
        ] {
            h.insert(header::IF_NONE_MATCH, value.parse().unwrap());
            assert_eq!(if_none_match(&h, etag), matches, "{value}");
        }
    }
}
