//! Client authentication at the token, revocation and introspection endpoints
//! (RFC 6749 §2.3, RFC 7523 §2.2, OIDC Core §9).
//!
//! Why it is strict:
//! - A client authenticates with exactly the method it registered. Accepting any method
//!   a client *could* use would let a stolen secret of a `private_key_jwt` client (there
//!   is none — but a leaked old one after a method change) or a bare `client_id` stand in
//!   for a stronger credential.
//! - More than one method in one request is `invalid_request` (RFC 6749 §2.3: "MUST NOT
//!   use more than one authentication method in each request"), so a request never
//!   authenticates by one credential while another is ignored.
//! - Unknown client, wrong secret and wrong method all answer the same 401
//!   `invalid_client` with the same description: a caller cannot tell which client ids
//!   exist. The secret of an unknown client is still hashed so the timing does not tell
//!   either.
//! - `private_key_jwt` assertions are verified with the platform's own JWT core
//!   (`sec_common::jwt`: asymmetric algorithms only, `kid` required, no embedded or
//!   remote keys), are short-lived (`exp` at most 5 minutes ahead) and single-use: the
//!   `jti` is remembered in the KV until the assertion expires, set-if-absent, so two
//!   concurrent requests with one assertion cannot both pass.
//!
//! Every failure is published as `sec.auth.client.auth_failed` with a reason from a
//! closed set, and counted as `sec_auth_http_requests{endpoint="client_auth"}`.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use sec_common::jwt::{self, Expectations, InvalidReason, KeySet, TokenType};
use sec_common::storage::Kv;

use super::error::OAuthError;
use super::params::Params;
use crate::engine::AuthServer;
use crate::store::{AuthMethod, ClientRow};

/// RFC 7523 §2.2.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A client assertion may expire at most this far ahead.
pub const MAX_ASSERTION_LIFETIME_SECONDS: i64 = 300;
/// The `Authorization` header is refused beyond this many bytes.
const MAX_AUTHORIZATION_BYTES: usize = 4096;
/// Client ids and `jti` values are refused beyond this many bytes.
const MAX_ID_BYTES: usize = 256;
/// The one description of every authentication failure (no client enumeration).
const FAILED: &str = "client authentication failed";

/// A client that proved who it is (or, for a public client, named itself).
#[derive(Debug, Clone)]
pub struct AuthenticatedClient {
    pub client: ClientRow,
    pub method: AuthMethod,
}

impl AuthenticatedClient {
    pub fn id(&self) -> &str {
        &self.client.client_id
    }
}

/// The credentials a request carries, before any lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    Basic { id: String, secret: String },
    Post { id: String, secret: String },
    Jwt { id: Option<String>, assertion: String },
    None { id: String },
}

impl Presented {
    fn method(&self) -> AuthMethod {
        match self {
            Presented::Basic { .. } => AuthMethod::ClientSecretBasic,
            Presented::Post { .. } => AuthMethod::ClientSecretPost,
            Presented::Jwt { .. } => AuthMethod::PrivateKeyJwt,
            Presented::None { .. } => AuthMethod::None,
        }
    }

    fn used_basic(&self) -> bool {
        matches!(self, Presented::Basic { .. })
    }
}

/// Why authentication failed: a closed set (event detail and metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    UnknownClient,
    BadSecret,
    WrongMethod,
    BadAssertion,
    AssertionReplayed,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::UnknownClient => "unknown_client",
            Failure::BadSecret => "bad_secret",
            Failure::WrongMethod => "wrong_method",
            Failure::BadAssertion => "bad_assertion",
            Failure::AssertionReplayed => "assertion_replayed",
        }
    }
}

/// Authenticates the client of a `/token`, `/revoke` or `/introspect` request.
pub async fn authenticate_client(
    server: &AuthServer,
    headers: &HeaderMap,
    params: &Params,
) -> Result<AuthenticatedClient, OAuthError> {
    let presented = presented(headers, params, server.cfg.max_param_bytes)?;
    let basic = presented.used_basic();
    let id = match &presented {
        Presented::Basic { id, .. } | Presented::Post { id, .. } | Presented::None { id } => {
            id.clone()
        }
        Presented::Jwt { id, assertion } => match id {
            Some(id) => id.clone(),
            // RFC 7523 §3: `iss` (= `sub`) is the client; read it to find the keys, then
            // verify that it is what the signature covers.
            None => unverified_issuer(assertion)
                .ok_or_else(|| fail(server, None, Failure::BadAssertion, false))?,
        },
    };
    if id.len() > MAX_ID_BYTES {
        return Err(OAuthError::invalid_request("`client_id` is too long"));
    }

    let client = match server.find_client(&id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            if let Presented::Basic { secret, .. } | Presented::Post { secret, .. } = &presented {
                // Same work as a known client: timing does not tell the ids apart.
                let _ = server.secrets.hash(secret);
            }
            return Err(fail(server, None, Failure::UnknownClient, basic));
        }
        Err(e) => return Err(OAuthError::temporarily_unavailable("looking up a client", &e)),
    };
    if client.settings.auth_method != presented.method() {
        return Err(fail(server, Some(&client), Failure::WrongMethod, basic));
    }
    match &presented {
        Presented::Basic { secret, .. } | Presented::Post { secret, .. } => {
            if !server.check_client_secret(&client, secret) {
                return Err(fail(server, Some(&client), Failure::BadSecret, basic));
            }
        }
        Presented::Jwt { assertion, .. } => {
            let jwks = client.settings.jwks_json.as_deref().unwrap_or_default();
            let now = server.clock.now();
            let checked = check_assertion(
                assertion,
                &client.client_id,
                jwks,
                &server.cfg.url("/token"),
                &server.cfg.issuer,
                now,
            );
            let (jti, exp) = match checked {
                Ok(v) => v,
                Err(reason) => {
                    tracing::debug!(client_id = %client.client_id, %reason, "client assertion refused");
                    return Err(fail(server, Some(&client), Failure::BadAssertion, false));
                }
            };
            // Kept until the assertion could no longer pass (exp plus the verifier's skew).
            let ttl = Duration::from_secs(
                u64::try_from(exp - now.timestamp() + 60)
                    .unwrap_or(1)
                    .max(1),
            );
            let key = replay_key(&client.client_id, &jti);
            match first_use(&server.kv, &key, ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(fail(
                        server,
                        Some(&client),
                        Failure::AssertionReplayed,
                        false,
                    ));
                }
                Err(e) => {
                    return Err(OAuthError::temporarily_unavailable(
                        "recording a client assertion",
                        &e,
                    ));
                }
            }
        }
        Presented::None { .. } => {
            // Only a public client registers `none` (validated at registration); check
            // again so a settings mistake can never make a confidential client open.
            if !client.settings.public {
                return Err(fail(server, Some(&client), Failure::WrongMethod, basic));
            }
        }
    }
    Ok(AuthenticatedClient {
        method: presented.method(),
        client,
    })
}

/// The failure response, its event and its metric.
fn fail(
    server: &AuthServer,
    client: Option<&ClientRow>,
    why: Failure,
    used_basic: bool,
) -> OAuthError {
    server.metrics.request("client_auth", why.as_str());
    let mut e = server.failure_event("sec.auth.client.auth_failed");
    // Only an id that exists becomes the subject (bounded by the registered clients).
    if let Some(c) = client {
        e.subject = c.client_id.clone();
    }
    e.details.insert("reason".into(), why.as_str().into());
    server.publish(e);
    OAuthError::invalid_client(FAILED, used_basic)
}

/// Which credentials the request carries. Pure: no lookups.
pub fn presented(
    headers: &HeaderMap,
    params: &Params,
    max_value: usize,
) -> Result<Presented, OAuthError> {
    let mut authorizations = headers.get_all(header::AUTHORIZATION).iter();
    let authorization = authorizations.next();
    if authorizations.next().is_some() {
        return Err(OAuthError::invalid_request(
            "more than one Authorization header",
        ));
    }
    let basic = match authorization {
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| OAuthError::invalid_client(FAILED, true))?;
            Some(decode_basic(v, max_value).ok_or_else(|| OAuthError::invalid_client(FAILED, true))?)
        }
        None => None,
    };
    let secret = params.get("client_secret");
    let assertion = params.get("client_assertion");
    let assertion_type = params.get("client_assertion_type");
    let client_id = params.get("client_id");

    let methods = usize::from(basic.is_some())
        + usize::from(secret.is_some())
        + usize::from(assertion.is_some() || assertion_type.is_some());
    if methods > 1 {
        return Err(OAuthError::invalid_request(
            "use exactly one client authentication method",
        ));
    }
    if let Some((id, secret)) = basic {
        if client_id.is_some_and(|c| c != id) {
            return Err(OAuthError::invalid_request(
                "`client_id` differs from the authenticated client",
            ));
        }
        return Ok(Presented::Basic { id, secret });
    }
    if let Some(secret) = secret {
        let id = client_id.ok_or_else(|| {
            OAuthError::invalid_request("`client_secret` needs `client_id`")
        })?;
        return Ok(Presented::Post {
            id: id.to_owned(),
            secret: secret.to_owned(),
        });
    }
    if assertion.is_some() || assertion_type.is_some() {
        let (Some(assertion), Some(kind)) = (assertion, assertion_type) else {
            return Err(OAuthError::invalid_request(
                "`client_assertion` and `client_assertion_type` go together",
            ));
        };
        if kind != JWT_BEARER_ASSERTION {
            return Err(OAuthError::invalid_client(
                "unsupported client_assertion_type",
                false,
            ));
        }
        return Ok(Presented::Jwt {
            id: client_id.map(str::to_owned),
            assertion: assertion.to_owned(),
        });
    }
    match client_id {
        Some(id) => Ok(Presented::None { id: id.to_owned() }),
        None => Err(OAuthError::invalid_client(
            "client authentication required",
            false,
        )),
    }
}

/// RFC 6749 §2.3.1: `Basic base64(urlencode(id) ":" urlencode(secret))`. `None` when the
/// scheme is not Basic or anything does not decode.
pub fn decode_basic(value: &str, max_value: usize) -> Option<(String, String)> {
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return None;
    }
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = STANDARD.decode(rest.trim()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (id, secret) = raw.split_once(':')?;
    let (id, secret) = (form_decode(id)?, form_decode(secret)?);
    if id.is_empty() || secret.is_empty() || id.len() > max_value || secret.len() > max_value {
        return None;
    }
    Some((id, secret))
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a
/// byte; a malformed escape or non-UTF-8 result is `None` (not passed through).
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The `iss` of an assertion, unverified: only to find the client whose keys verify it.
fn unverified_issuer(assertion: &str) -> Option<String> {
    let (_, claims) = jwt::decode_unverified(assertion, jwt::DEFAULT_MAX_TOKEN_BYTES).ok()?;
    claims
        .get("iss")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty() && s.len() <= MAX_ID_BYTES)
        .map(str::to_owned)
}

/// Verifies a `private_key_jwt` assertion (RFC 7523 §3) against the client's JWK Set.
/// Returns its `jti` and `exp` (unix seconds), or why it was refused.
pub fn check_assertion(
    assertion: &str,
    client_id: &str,
    jwks_json: &str,
    token_url: &str,
    issuer: &str,
    now: DateTime<Utc>,
) -> Result<(String, i64), &'static str> {
    let keys = KeySet::from_jwks_json(jwks_json).map_err(|_| "client has no usable jwks")?;
    // `iss` must be the client; `aud` the token endpoint or the issuer.
    let mut expect = Expectations::new(client_id, token_url, TokenType::Id);
    let verified = match jwt::verify(assertion, &keys, &expect, now) {
        Err(InvalidReason::WrongAudience) => {
            expect.audience = issuer.to_owned();
            jwt::verify(assertion, &keys, &expect, now)
        }
        other => other,
    }
    .map_err(InvalidReason::as_str)?;
    if verified.sub() != client_id {
        return Err("sub is not the client");
    }
    let jti = verified
        .jti()
        .filter(|j| !j.is_empty() && j.len() <= MAX_ID_BYTES)
        .ok_or("jti missing or too long")?;
    if verified.exp > now.timestamp() + MAX_ASSERTION_LIFETIME_SECONDS {
        return Err("exp too far ahead");
    }
    Ok((jti.to_owned(), verified.exp))
}

fn replay_key(client_id: &str, jti: &str) -> String {
    let mut input = Vec::with_capacity(client_id.len() + jti.len() + 1);
    input.extend_from_slice(client_id.as_bytes());
    input.push(0);
    input.extend_from_slice(jti.as_bytes());
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("client-assertion:{hex}")
}

/// Serialises set-if-absent on the in-process KV (its get and set are each atomic, the
/// pair is not).
static MEMORY_NX: Mutex<()> = Mutex::new(());

/// Records `key` unless present: true the first time. Atomic on both backends.
async fn first_use(kv: &Kv, key: &str, ttl: Duration) -> Result<bool, String> {
    match kv {
        Kv::Redis { pool, prefix } => {
            let mut c = pool.get().await.map_err(|e| e.to_string())?;
            let set: Option<String> = redis::cmd("SET")
                .arg(format!("{prefix}{key}"))
                .arg(b"1")
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            Ok(set.is_some())
        }
        Kv::Memory(m) => {
            let _guard = MEMORY_NX.lock().unwrap_or_else(PoisonError::into_inner);
            if m.get(key).is_some() {
                return Ok(false);
            }
            m.set(key, b"1", Some(ttl));
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::json;
    use std::sync::Arc;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    fn basic(id: &str, secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        assert_eq!(
            decode_basic(&basic("my%20app", "s%3Ae+c%2Bret"), 100),
            Some(("my app".into(), "s:e c+ret".into()))
        );
        // The first colon separates; an encoded colon in the id stays in the id.
        assert_eq!(
            decode_basic(&basic("a%3Ab", "c:d"), 100),
            Some(("a:b".into(), "c:d".into()))
        );
        assert_eq!(decode_basic(&basic("a", "%zz"), 100), None);
        assert_eq!(decode_basic(&basic("a", "%"), 100), None);
        assert_eq!(decode_basic(&basic("a", "%FF"), 100), None);
        assert_eq!(decode_basic(&basic("", "x"), 100), None);
        assert_eq!(decode_basic("Basic !!!", 100), None);
        assert_eq!(decode_basic("Bearer abc", 100), None);
        assert_eq!(decode_basic(&basic("a", &"x".repeat(101)), 100), None);
        assert_eq!(
            decode_basic(&format!("basic {}", STANDARD.encode("a:b")), 100),
            Some(("a".into(), "b".into()))
        );
    }

    #[test]
    fn exactly_one_method() {
        let p = |raw: &str| Params::parse(raw.as_bytes(), 1000).unwrap();
        let two = presented(&headers(Some(&basic("a", "b"))), &p("client_secret=x"), 100);
        assert_eq!(two.unwrap_err().error, "invalid_request");
        let two = presented(
            &headers(None),
            &p("client_id=a&client_secret=x&client_assertion=y&client_assertion_type=z"),
            100,
        );
        assert_eq!(two.unwrap_err().error, "invalid_request");
        let half = presented(&headers(None), &p("client_assertion=y"), 100);
        assert_eq!(half.unwrap_err().error, "invalid_request");
        let mismatch = presented(&headers(Some(&basic("a", "b"))), &p("client_id=c"), 100);
        assert_eq!(mismatch.unwrap_err().error, "invalid_request");
        let bad_type = presented(
            &headers(None),
            &p("client_assertion=y&client_assertion_type=saml"),
            100,
        );
        assert_eq!(bad_type.unwrap_err().error, "invalid_client");
        let nothing = presented(&headers(None), &p("grant_type=x"), 100).unwrap_err();
        assert_eq!((nothing.error, nothing.status.as_u16()), ("invalid_client", 401));
        let bearer = presented(&headers(Some("Bearer x")), &p(""), 100).unwrap_err();
        assert!(bearer.challenge.unwrap().starts_with("Basic"));

        assert_eq!(
            presented(&headers(Some(&basic("a", "b"))), &p("client_id=a"), 100).unwrap(),
            Presented::Basic {
                id: "a".into(),
                secret: "b".into()
            }
        );
        assert_eq!(
            presented(&headers(None), &p("client_id=a&client_secret=b"), 100).unwrap(),
            Presented::Post {
                id: "a".into(),
                secret: "b".into()
            }
        );
        assert_eq!(
            presented(&headers(None), &p("client_id=a"), 100).unwrap(),
            Presented::None { id: "a".into() }
        );
    }

    struct Signer {
        key: EcdsaKeyPair,
        jwks: String,
    }

    fn signer(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = key.public_key().as_ref().to_vec();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        Signer {
            key,
            jwks: json!({ "keys": [jwk] }).to_string(),
        }
    }

    fn sign(s: &Signer, kid: &str, claims: serde_json::Value) -> String {
        let rng = SystemRandom::new();
        jwt::encode(
            jwt::Alg::Es256,
            kid,
            TokenType::Id,
            claims.as_object().unwrap(),
            |input| {
                s.key
                    .sign(&rng, input)
                    .map(|sig| sig.as_ref().to_vec())
                    .map_err(|_| "sign")
            },
        )
        .unwrap()
    }

    const TOKEN_URL: &str = "https://as.example/token";
    const ISSUER: &str = "https://as.example";

    #[test]
    fn private_key_jwt_checks() {
        let s = signer("k1");
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let t = now.timestamp();
        let claims = |aud: &str, sub: &str, exp: i64| {
            json!({"iss": "app", "sub": sub, "aud": aud, "exp": exp, "iat": t, "jti": "j-1"})
        };
        let check = |a: &str| check_assertion(a, "app", &s.jwks, TOKEN_URL, ISSUER, now);

        let good = sign(&s, "k1", claims(TOKEN_URL, "app", t + 60));
        assert_eq!(check(&good), Ok(("j-1".to_owned(), t + 60)));
        // The issuer as audience is accepted too; anything else is not.
        assert!(check(&sign(&s, "k1", claims(ISSUER, "app", t + 60))).is_ok());
        assert_eq!(
            check(&sign(&s, "k1", claims("https://other", "app", t + 60))),
            Err("wrong_audience")
        );
        // sub must be the client; exp within 5 minutes and not past.
        assert!(check(&sign(&s, "k1", claims(TOKEN_URL, "other", t + 60))).is_err());
        assert_eq!(
            check(&sign(&s, "k1", claims(TOKEN_URL, "app", t + 3600))),
            Err("exp too far ahead")
        );
        assert_eq!(
            check(&sign(&s, "k1", claims(TOKEN_URL, "app", t - 3600))),
            Err("expired")
        );
        // Another client's iss, a key the client does not have, a tampered payload.
        assert_eq!(
            check_assertion(&good, "other", &s.jwks, TOKEN_URL, ISSUER, now),
            Err("wrong_issuer")
        );
        let stranger = signer("k1");
        assert_eq!(
            check(&sign(&stranger, "k1", claims(TOKEN_URL, "app", t + 60))),
            Err("bad_signature")
        );
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(claims(TOKEN_URL, "app", t + 200).to_string());
        parts[1] = &forged;
        assert_eq!(check(&parts.join(".")), Err("bad_signature"));
        // No jti; an HMAC "assertion"; no JWKS at all.
        let no_jti = json!({"iss": "app", "sub": "app", "aud": TOKEN_URL, "exp": t + 60, "iat": t});
        assert!(check(&sign(&s, "k1", no_jti)).is_err());
        let hs = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k1"}"#),
            URL_SAFE_NO_PAD.encode(claims(TOKEN_URL, "app", t + 60).to_string())
        );
        assert_eq!(check(&hs), Err("unsupported_alg"));
        assert!(check_assertion(&good, "app", "", TOKEN_URL, ISSUER, now).is_err());
        assert_eq!(unverified_issuer(&good).as_deref(), Some("app"));
    }

    #[tokio::test]
    async fn assertion_ids_are_single_use() {
        let clock = sec_common::clock::ManualClock::new(DateTime::from_timestamp(1_800_000_000, 0).unwrap());
        let kv = Kv::Memory(Arc::new(sec_common::storage::MemoryKv::new(clock.clone())));
        let key = replay_key("app", "j-1");
        assert_ne!(key, replay_key("ap", "pj-1"));
        let ttl = Duration::from_secs(60);
        assert!(first_use(&kv, &key, ttl).await.unwrap());
        assert!(!first_use(&kv, &key, ttl).await.unwrap());
        assert!(first_use(&kv, &replay_key("other", "j-1"), ttl).await.unwrap());
        clock.advance(chrono::Duration::seconds(61));
        assert!(first_use(&kv, &key, ttl).await.unwrap());
    }
}
