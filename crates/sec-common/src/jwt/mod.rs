//! The pure core of JWT verification, shared by token-svc's `ValidateToken` and the local
//! verifier ([`crate::verifier`]): no network, no proto types, no clock of its own.
//!
//! Rules (RFC 8725, RFC 9068), all ours whatever library signs the token:
//! - Only compact JWS with `ES256`, `EdDSA`, `RS256` or `PS256`. `none`, `HS*` and
//!   anything else is `UnsupportedAlg` before any key is looked up: never HMAC for tokens
//!   that others verify, so a public key can never be used as an HMAC secret.
//! - Each key is bound to one algorithm; a header `alg` that differs from the key's is
//!   `AlgMismatch` (no algorithm confusion) and no signature check is attempted.
//! - Headers that would point the verifier at other keys or demand extensions we do not
//!   implement are refused as `Malformed`: `crit` (RFC 7515 §4.1.11: we understand no
//!   extension), `jku`, `x5u` (a URL to fetch keys from), `jwk`, `x5c` (an embedded key):
//!   keys come only from the configured key set.
//! - The size limit is checked before anything is decoded; the header is decoded into a
//!   fixed stack buffer and the signature too; claims are parsed only after the signature
//!   verified.
//!
//! Why not `jsonwebtoken` for the verification itself: it re-parses the public key on
//! every `decode` (an `UnparsedPublicKey` per call: for RSA a new `EVP_PKEY` built from
//! n/e, for P-256 a point decode and on-curve check), deserialises the header into owned
//! strings, and applies its own claim rules, which we would have to switch off and redo.
//! Here the key is an aws-lc-rs `ParsedPublicKey` built once per key-set refresh; the
//! bench (`benches/verifier.rs`) puts the figures side by side.

mod keys;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

pub use keys::{
    KeyError, KeySet, KeyState, MAX_JWKS_BYTES, MAX_JWKS_KEYS, MAX_KID_BYTES, RSA_MAX_BITS,
    RSA_MIN_BITS, VerifyingKey,
};

/// Default `max_token_bytes`.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest base64url header accepted (it decodes into a 1 KiB stack buffer).
const MAX_HEADER_B64: usize = 1360;
/// The largest signature is RSA-4096's 512 bytes.
const MAX_SIGNATURE_BYTES: usize = RSA_MAX_BITS / 8;

/// The JWS algorithms tokens may be signed with. Nothing else exists here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    Es256,
    EdDsa,
    Rs256,
    Ps256,
}

impl Alg {
    pub const ALL: [Alg; 4] = [Alg::Es256, Alg::EdDsa, Alg::Rs256, Alg::Ps256];

    /// The JOSE `alg` name (RFC 7518 / RFC 8037).
    pub fn as_jose(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
            Alg::Rs256 => "RS256",
            Alg::Ps256 => "PS256",
        }
    }

    /// Parses a JOSE `alg` name, exactly (JOSE names are case-sensitive).
    pub fn from_jose(s: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.as_jose() == s)
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_jose())
    }
}

impl FromStr for Alg {
    type Err = InvalidReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Alg::from_jose(s).ok_or(InvalidReason::UnsupportedAlg)
    }
}

/// Why a token is not valid: the closed set of `sec.token.v1.InvalidReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Not a compact JWS, bad base64/JSON, a refused header, missing or mistyped claims.
    Malformed,
    /// Longer than `max_token_bytes`; not parsed at all.
    Oversized,
    /// `none`, `HS*` or any algorithm outside the allow-list.
    UnsupportedAlg,
    /// `kid` missing or not in the key set.
    UnknownKey,
    KeyRetired,
    KeyRevoked,
    /// The header's `alg` is not the algorithm the key is bound to.
    AlgMismatch,
    BadSignature,
    /// `typ` differs from the expected kind.
    WrongType,
    WrongIssuer,
    WrongAudience,
    Expired,
    NotYetValid,
    /// `jti` denylisted, or issued before a subject/client/key cut-off.
    Revoked,
    /// Local verifier only: its view of keys/revocations is older than allowed.
    VerifierStale,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 15] = [
        InvalidReason::Malformed,
        InvalidReason::Oversized,
        InvalidReason::UnsupportedAlg,
        InvalidReason::UnknownKey,
        InvalidReason::KeyRetired,
        InvalidReason::KeyRevoked,
        InvalidReason::AlgMismatch,
        InvalidReason::BadSignature,
        InvalidReason::WrongType,
        InvalidReason::WrongIssuer,
        InvalidReason::WrongAudience,
        InvalidReason::Expired,
        InvalidReason::NotYetValid,
        InvalidReason::Revoked,
        InvalidReason::VerifierStale,
    ];

    /// Stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "malformed",
            InvalidReason::Oversized => "oversized",
            InvalidReason::UnsupportedAlg => "unsupported_alg",
            InvalidReason::UnknownKey => "unknown_key",
            InvalidReason::KeyRetired => "key_retired",
            InvalidReason::KeyRevoked => "key_revoked",
            InvalidReason::AlgMismatch => "alg_mismatch",
            InvalidReason::BadSignature => "bad_signature",
            InvalidReason::WrongType => "wrong_type",
            InvalidReason::WrongIssuer => "wrong_issuer",
            InvalidReason::WrongAudience => "wrong_audience",
            InvalidReason::Expired => "expired",
            InvalidReason::NotYetValid => "not_yet_valid",
            InvalidReason::Revoked => "revoked",
            InvalidReason::VerifierStale => "verifier_stale",
        }
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for InvalidReason {}

/// Which kind of token is expected, i.e. which `typ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// RFC 9068 access token: `typ` must be `at+jwt`.
    Access,
    /// OIDC ID token: `typ` is `JWT` or absent (OIDC does not require it), never `at+jwt`.
    Id,
}

impl TokenType {
    /// The `typ` header value tokens of this kind carry.
    pub fn typ(self) -> &'static str {
        match self {
            TokenType::Access => "at+jwt",
            TokenType::Id => "JWT",
        }
    }

    fn accepts(self, typ: Option<&str>) -> bool {
        let Some(typ) = typ else {
            return self == TokenType::Id;
        };
        // RFC 8725 §3.11 / RFC 7515 §4.1.9: media types compare case-insensitively and
        // the `application/` prefix may be present or omitted.
        let bare = match typ.get(..12) {
            Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
            _ => typ,
        };
        bare.eq_ignore_ascii_case(self.typ())
    }
}

/// What a verifier requires of a token beyond a good signature.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// The exact `iss`.
    pub issuer: String,
    /// The caller's identity: must be `aud` or one element of it.
    pub audience: String,
    pub typ: TokenType,
    /// Tolerance for `exp`, `nbf` and `iat` against clocks that drift.
    pub skew: Duration,
    /// Tokens longer than this are `Oversized`, refused before any decoding.
    pub max_token_bytes: usize,
}

impl Expectations {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>, typ: TokenType) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            typ,
            skew: Duration::from_secs(60),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }
}

/// A token whose signature, type, issuer, audience and times all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedClaims {
    pub kid: Arc<str>,
    pub alg: Alg,
    /// Every claim, as signed.
    pub claims: Map<String, Value>,
    /// `exp`, `iat` and `nbf` as unix seconds (fractions dropped).
    pub exp: i64,
    pub iat: i64,
    pub nbf: Option<i64>,
}

impl VerifiedClaims {
    fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    pub fn sub(&self) -> &str {
        self.str_claim("sub").unwrap_or_default()
    }

    pub fn iss(&self) -> &str {
        self.str_claim("iss").unwrap_or_default()
    }

    /// `client_id` (required in access tokens; absent in ID tokens, which carry `azp`).
    pub fn client_id(&self) -> Option<&str> {
        self.str_claim("client_id")
    }

    /// Space-separated scopes, when present.
    pub fn scope(&self) -> Option<&str> {
        self.str_claim("scope")
    }

    /// `jti` (required in access tokens).
    pub fn jti(&self) -> Option<&str> {
        self.str_claim("jti")
    }

    /// The claims as a JSON object string.
    pub fn to_json(&self) -> String {
        Value::Object(self.claims.clone()).to_string()
    }
}

/// A JOSE header as far as we read it. Borrowed where the JSON has no escapes.
#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    typ: Option<Cow<'a, str>>,
    // Present at all (even `null`) means refused; see the module docs.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
    #[serde(default, deserialize_with = "present")]
    jku: bool,
    #[serde(default, deserialize_with = "present")]
    x5u: bool,
    #[serde(default, deserialize_with = "present")]
    jwk: bool,
    #[serde(default, deserialize_with = "present")]
    x5c: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// Verifies a compact JWS access or ID token against `keys` and `expect` at `now`.
///
/// Order: size; structure; header (alg allow-list, refused members); `kid` lookup and key
/// state; the key's bound algorithm; the signature; then — only on signed content — `typ`,
/// `iss`, `aud`, `exp`, `nbf` and `iat` with `skew`. Never panics, whatever the input.
pub fn verify(
    token: &str,
    keys: &KeySet,
    expect: &Expectations,
    now: DateTime<Utc>,
) -> Result<VerifiedClaims, InvalidReason> {
    use InvalidReason as R;

    if token.len() > expect.max_token_bytes {
        return Err(R::Oversized);
    }
    let (signing_input, sig_b64) = token.rsplit_once('.').ok_or(R::Malformed)?;
    let (header_b64, payload_b64) = signing_input.split_once('.').ok_or(R::Malformed)?;
    // Exactly three segments: a JWE (five) or anything with extra dots is malformed.
    if payload_b64.contains('.') || header_b64.is_empty() || payload_b64.is_empty() {
        return Err(R::Malformed);
    }

    if header_b64.len() > MAX_HEADER_B64 {
        return Err(R::Malformed);
    }
    let mut header_buf = [0u8; 1024];
    let n = B64
        .decode_slice(header_b64, &mut header_buf)
        .map_err(|_| R::Malformed)?;
    let header: Header<'_> = serde_json::from_slice(&header_buf[..n]).map_err(|_| R::Malformed)?;
    let alg = Alg::from_jose(&header.alg).ok_or(R::UnsupportedAlg)?;
    if header.crit || header.jku || header.x5u || header.jwk || header.x5c {
        return Err(R::Malformed);
    }

    let kid = header.kid.as_deref().ok_or(R::UnknownKey)?;
    let entry = keys.entry(kid).ok_or(R::UnknownKey)?;
    match entry.state {
        KeyState::Active => {}
        KeyState::Retired => return Err(R::KeyRetired),
        KeyState::Revoked => return Err(R::KeyRevoked),
    }
    let key = entry.key.as_deref().ok_or(R::UnknownKey)?;
    if key.alg() != alg {
        return Err(R::AlgMismatch);
    }

    if sig_b64.len() > (MAX_SIGNATURE_BYTES * 4).div_ceil(3) {
        return Err(R::BadSignature);
    }
    let mut sig_buf = [0u8; MAX_SIGNATURE_BYTES];
    let n = B64
        .decode_slice(sig_b64, &mut sig_buf)
        .map_err(|_| R::Malformed)?;
    if !key.verify_signature(signing_input.as_bytes(), &sig_buf[..n]) {
        return Err(R::BadSignature);
    }

    // Signed content from here on.
    if !expect.typ.accepts(header.typ.as_deref()) {
        return Err(R::WrongType);
    }
    let payload = B64.decode(payload_b64).map_err(|_| R::Malformed)?;
    let claims: Map<String, Value> = serde_json::from_slice(&payload).map_err(|_| R::Malformed)?;

    let required_str = |name: &str| -> Result<&str, InvalidReason> {
        claims.get(name).and_then(Value::as_str).ok_or(R::Malformed)
    };
    let optional_str_ok = |name: &str| -> bool { claims.get(name).is_none_or(Value::is_string) };

    let iss = required_str("iss")?;
    // Not a secret: a plain comparison is fine.
    if iss != expect.issuer {
        return Err(R::WrongIssuer);
    }
    match claims.get("aud") {
        Some(Value::String(aud)) if *aud == expect.audience => {}
        Some(Value::Array(auds)) => {
            if !auds.iter().all(Value::is_string) {
                return Err(R::Malformed);
            }
            if !auds
                .iter()
                .any(|a| a.as_str() == Some(expect.audience.as_str()))
            {
                return Err(R::WrongAudience);
            }
        }
        Some(Value::String(_)) => return Err(R::WrongAudience),
        _ => return Err(R::Malformed),
    }
    required_str("sub")?;
    if expect.typ == TokenType::Access {
        // RFC 9068 §2.2: client_id and jti are required in access tokens.
        required_str("client_id")?;
        required_str("jti")?;
    }
    if !optional_str_ok("jti") || !optional_str_ok("scope") || !optional_str_ok("client_id") {
        return Err(R::Malformed);
    }

    let exp = numeric_date(claims.get("exp"))?.ok_or(R::Malformed)?;
    let iat = numeric_date(claims.get("iat"))?.ok_or(R::Malformed)?;
    let nbf = numeric_date(claims.get("nbf"))?;
    let now = now.timestamp();
    let skew = i64::try_from(expect.skew.as_secs()).unwrap_or(i64::MAX);
    // RFC 7519 §4.1.4: the token must not be accepted on or after exp.
    if now >= exp.saturating_add(skew) {
        return Err(R::Expired);
    }
    if let Some(nbf) = nbf
        && now.saturating_add(skew) < nbf
    {
        return Err(R::NotYetValid);
    }
    // Issued in the future: a clock far off or a forged-looking token.
    if now.saturating_add(skew) < iat {
        return Err(R::NotYetValid);
    }

    Ok(VerifiedClaims {
        kid: entry.kid.clone(),
        alg,
        claims,
        exp,
        iat,
        nbf,
    })
}

/// A NumericDate claim (RFC 7519 §2): a JSON number of seconds, fractions dropped.
fn numeric_date(v: Option<&Value>) -> Result<Option<i64>, InvalidReason> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            match n.as_f64() {
                // ±2^53: beyond this the value is not a plausible time anyway.
                Some(f) if f.is_finite() && f.abs() < 9.0e15 => Ok(Some(f.floor() as i64)),
                _ => Err(InvalidReason::Malformed),
            }
        }
        Some(_) => Err(InvalidReason::Malformed),
    }
}

/// A token's header and claims, decoded but not verified.
pub type UnverifiedParts = (Map<String, Value>, Map<String, Value>);

/// Decodes a token's header and claims WITHOUT verifying anything (for `secctl token
/// inspect` and diagnostics). Never use the result for an access decision.
pub fn decode_unverified(
    token: &str,
    max_token_bytes: usize,
) -> Result<UnverifiedParts, InvalidReason> {
    if token.len() > max_token_bytes {
        return Err(InvalidReason::Oversized);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(InvalidReason::Malformed);
    };
    let obj = |seg: &str| -> Result<Map<String, Value>, InvalidReason> {
        let bytes = B64.decode(seg).map_err(|_| InvalidReason::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| InvalidReason::Malformed)
    };
    Ok((obj(h)?, obj(p)?))
}

/// Builds a compact JWS: `b64(header).b64(claims).b64(sign(signing_input))`. The header
/// gets `alg`, `kid` and `typ` from the arguments (nothing else), so every issuer writes
/// the same header the verifier expects. `sign` receives the signing input and returns
/// the raw JWS signature (ES256: r‖s, 64 bytes).
pub fn encode<E>(
    alg: Alg,
    kid: &str,
    typ: TokenType,
    claims: &Map<String, Value>,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let header = serde_json::json!({ "alg": alg.as_jose(), "kid": kid, "typ": typ.typ() });
    let mut out = String::with_capacity(512);
    B64.encode_string(header.to_string(), &mut out);
    out.push('.');
    B64.encode_string(Value::Object(claims.clone()).to_string(), &mut out);
    let signature = sign(out.as_bytes())?;
    out.push('.');
    B64.encode_string(signature, &mut out);
    Ok(out)
}
