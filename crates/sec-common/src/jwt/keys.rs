//! Public verification keys bound to one JWS algorithm each, and the key set a verifier
//! looks `kid`s up in. Keys are parsed once (aws-lc-rs `ParsedPublicKey`), so a
//! verification does no key parsing.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value};

use super::Alg;

/// Largest JWKS document accepted (decoded JSON bytes).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys a JWKS may hold.
pub const MAX_JWKS_KEYS: usize = 100;
/// Longest `kid` accepted, in bytes.
pub const MAX_KID_BYTES: usize = 256;
/// RSA modulus sizes accepted, in bits. 2048 is the RFC 7518 floor; 4096 bounds the
/// verifier's fixed signature buffer (see `jwt::verify`).
pub const RSA_MIN_BITS: usize = 2048;
pub const RSA_MAX_BITS: usize = 4096;

/// Why a JWKS document or a key was refused. Carries positions, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("jwks document larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("jwks document is not a JSON object with a \"keys\" array")]
    NotAJwks,
    #[error("jwks holds more than {MAX_JWKS_KEYS} keys")]
    TooManyKeys,
    #[error("jwks key #{index}: {reason}")]
    InvalidJwk { index: usize, reason: &'static str },
    #[error("jwks key #{index}: duplicate kid")]
    DuplicateKid { index: usize },
    #[error("invalid public key: {0}")]
    InvalidKey(&'static str),
}

/// The members a JWK carries for its public key, kept to print it back (`to_jwk`).
#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// P-256 affine coordinates, 32 bytes each.
    Ec { x: Vec<u8>, y: Vec<u8> },
    /// Ed25519 public key, 32 bytes.
    Okp { x: Vec<u8> },
    /// Big-endian modulus and exponent, no leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// A parsed public key bound to exactly one algorithm: a token whose header names any
/// other algorithm is refused with `AlgMismatch` before the signature is looked at.
#[derive(Clone)]
pub struct VerifyingKey {
    alg: Alg,
    parsed: ParsedPublicKey,
    material: Material,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// An ES256 key from its P-256 coordinates (32 bytes each).
    pub fn es256(x: &[u8], y: &[u8]) -> Result<Self, KeyError> {
        if x.len() != 32 || y.len() != 32 {
            return Err(KeyError::InvalidKey("P-256 coordinates must be 32 bytes"));
        }
        let mut point = [0u8; 65];
        point[0] = 0x04;
        point[1..33].copy_from_slice(x);
        point[33..].copy_from_slice(y);
        // FIXED: JWS carries ECDSA signatures as raw r‖s (RFC 7518 §3.4), not DER.
        let parsed = ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .map_err(|_| KeyError::InvalidKey("not a point on P-256"))?;
        Ok(Self {
            alg: Alg::Es256,
            parsed,
            material: Material::Ec {
                x: x.to_vec(),
                y: y.to_vec(),
            },
        })
    }

    /// An ES256 key from the uncompressed SEC1 point aws-lc-rs' `EcdsaKeyPair::public_key`
    /// returns (`0x04 ‖ x ‖ y`, 65 bytes).
    pub fn es256_from_sec1(point: &[u8]) -> Result<Self, KeyError> {
        match point {
            [0x04, rest @ ..] if rest.len() == 64 => Self::es256(&rest[..32], &rest[32..]),
            _ => Err(KeyError::InvalidKey("expected an uncompressed P-256 point")),
        }
    }

    /// An EdDSA (Ed25519) key from its 32 public bytes.
    pub fn ed25519(x: &[u8]) -> Result<Self, KeyError> {
        if x.len() != 32 {
            return Err(KeyError::InvalidKey("Ed25519 public keys are 32 bytes"));
        }
        let parsed = ParsedPublicKey::new(&signature::ED25519, x)
            .map_err(|_| KeyError::InvalidKey("not an Ed25519 public key"))?;
        Ok(Self {
            alg: Alg::EdDsa,
            parsed,
            material: Material::Okp { x: x.to_vec() },
        })
    }

    /// An RS256 or PS256 key from its modulus and exponent (big-endian). Leading zero
    /// bytes are stripped; the modulus must be 2048..=4096 bits.
    pub fn rsa(alg: Alg, n: &[u8], e: &[u8]) -> Result<Self, KeyError> {
        let params: &'static signature::RsaParameters = match alg {
            Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Alg::Es256 | Alg::EdDsa => return Err(KeyError::InvalidKey("not an RSA algorithm")),
        };
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(KeyError::InvalidKey(
                "RSA modulus must be 2048 to 4096 bits",
            ));
        }
        // e: odd, > 1, at most 32 bits (what every implementation accepts).
        if e.is_empty() || e.len() > 4 || e[e.len() - 1] & 1 == 0 || e == [1] {
            return Err(KeyError::InvalidKey("unsupported RSA public exponent"));
        }
        let parsed = RsaPublicKeyComponents { n, e }
            .to_parsed_public_key(params)
            .map_err(|_| KeyError::InvalidKey("not an RSA public key"))?;
        Ok(Self {
            alg,
            parsed,
            material: Material::Rsa {
                n: n.to_vec(),
                e: e.to_vec(),
            },
        })
    }

    /// An RS256 or PS256 key from a PKCS#1 `RSAPublicKey` DER (what aws-lc-rs'
    /// `RsaKeyPair::public_key().as_ref()` returns).
    pub fn rsa_from_pkcs1_der(alg: Alg, der: &[u8]) -> Result<Self, KeyError> {
        let bad = KeyError::InvalidKey("not a PKCS#1 RSAPublicKey");
        let (seq, rest) = der_take(der, 0x30).ok_or(bad.clone())?;
        if !rest.is_empty() {
            return Err(bad);
        }
        let (n, seq) = der_take(seq, 0x02).ok_or(bad.clone())?;
        let (e, seq) = der_take(seq, 0x02).ok_or(bad.clone())?;
        if !seq.is_empty() {
            return Err(bad);
        }
        Self::rsa(alg, n, e)
    }

    /// A key from one JWK object. `alg` is required and must agree with `kty`/`crv`
    /// (a key is usable under one algorithm only); `use`, when present, must be `sig`;
    /// private members are refused outright.
    pub fn from_jwk(jwk: &Map<String, Value>) -> Result<Self, &'static str> {
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            if jwk.contains_key(private) {
                return Err("private key member in a public key set");
            }
        }
        let text = |name: &str| -> Result<Option<&str>, &'static str> {
            match jwk.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err("member is not a string"),
            }
        };
        let bytes = |name: &str| -> Result<Vec<u8>, &'static str> {
            let s = text(name)?.ok_or("missing key member")?;
            B64.decode(s).map_err(|_| "key member is not base64url")
        };
        if let Some(u) = text("use")?
            && u != "sig"
        {
            return Err("use is not \"sig\"");
        }
        if let Some(ops) = jwk.get("key_ops") {
            let verifies = ops
                .as_array()
                .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
            if !verifies {
                return Err("key_ops does not allow verify");
            }
        }
        let alg = text("alg")?.ok_or("missing alg: a key must be bound to one algorithm")?;
        let alg = Alg::from_jose(alg).ok_or("unsupported alg")?;
        let kty = text("kty")?.ok_or("missing kty")?;
        let crv = text("crv")?;
        let key = match (alg, kty, crv) {
            (Alg::Es256, "EC", Some("P-256")) => Self::es256(&bytes("x")?, &bytes("y")?),
            (Alg::EdDsa, "OKP", Some("Ed25519")) => Self::ed25519(&bytes("x")?),
            (Alg::Rs256 | Alg::Ps256, "RSA", None) => Self::rsa(alg, &bytes("n")?, &bytes("e")?),
            _ => return Err("kty/crv do not match alg"),
        };
        key.map_err(|e| match e {
            KeyError::InvalidKey(reason) => reason,
            _ => "invalid key",
        })
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The public JWK (`kty`, `crv`, coordinates, `kid`, `alg`, `use: sig`), as `GetJwks`
    /// publishes it.
    pub fn to_jwk(&self, kid: &str) -> Value {
        let mut m = Map::new();
        match &self.material {
            Material::Ec { x, y } => {
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), "P-256".into());
                m.insert("x".into(), B64.encode(x).into());
                m.insert("y".into(), B64.encode(y).into());
            }
            Material::Okp { x } => {
                m.insert("kty".into(), "OKP".into());
                m.insert("crv".into(), "Ed25519".into());
                m.insert("x".into(), B64.encode(x).into());
            }
            Material::Rsa { n, e } => {
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), B64.encode(n).into());
                m.insert("e".into(), B64.encode(e).into());
            }
        }
        m.insert("kid".into(), kid.into());
        m.insert("alg".into(), self.alg.as_jose().into());
        m.insert("use".into(), "sig".into());
        Value::Object(m)
    }

    /// Verifies `signature` over `message` with this key (the raw JWS signature bytes).
    #[inline]
    pub fn verify_signature(&self, message: &[u8], signature: &[u8]) -> bool {
        self.parsed.verify_sig(message, signature).is_ok()
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// One DER TLV with the given tag (definite lengths up to 2 length bytes).
fn der_take(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = match l0 {
        0..=0x7f => (usize::from(l0), rest),
        0x81 => {
            let (&l, rest) = rest.split_first()?;
            (usize::from(l), rest)
        }
        0x82 => {
            let (hi, rest) = rest.split_first()?;
            let (lo, rest) = rest.split_first()?;
            (usize::from(*hi) << 8 | usize::from(*lo), rest)
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// Whether a key may still verify tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Published (`next`, `current` or `retiring`): its tokens verify.
    Active,
    /// Its tokens have all expired; any token still naming it fails with `KeyRetired`.
    Retired,
    /// Compromised: its tokens fail with `KeyRevoked`, whatever their signature.
    Revoked,
}

#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    pub(crate) kid: Arc<str>,
    pub(crate) state: KeyState,
    /// `None` for a tombstone (a kid known only as retired or revoked).
    pub(crate) key: Option<Arc<VerifyingKey>>,
}

/// The keys a verifier trusts, by `kid`. Cheap to clone (keys are shared).
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    entries: HashMap<Arc<str>, KeyEntry>,
}

impl KeySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a JWK Set (`{"keys":[...]}`). Every key must be valid and carry a unique
    /// `kid` and an `alg`: a set with one bad key is refused whole, so a verifier keeps
    /// its previous view rather than silently losing keys.
    pub fn from_jwks_json(json: &str) -> Result<Self, KeyError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(KeyError::TooLarge);
        }
        let doc: Value = serde_json::from_str(json).map_err(|_| KeyError::NotAJwks)?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeyError::NotAJwks)?;
        if keys.len() > MAX_JWKS_KEYS {
            return Err(KeyError::TooManyKeys);
        }
        let mut set = Self::new();
        for (index, jwk) in keys.iter().enumerate() {
            let obj = jwk.as_object().ok_or(KeyError::InvalidJwk {
                index,
                reason: "not a JSON object",
            })?;
            let kid = match obj.get("kid") {
                Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KID_BYTES => k,
                _ => {
                    return Err(KeyError::InvalidJwk {
                        index,
                        reason: "missing, empty or oversized kid",
                    });
                }
            };
            let key = VerifyingKey::from_jwk(obj)
                .map_err(|reason| KeyError::InvalidJwk { index, reason })?;
            if set.get(kid).is_some() {
                return Err(KeyError::DuplicateKid { index });
            }
            set.insert(kid, key, KeyState::Active);
        }
        Ok(set)
    }

    /// Adds or replaces a key.
    pub fn insert(&mut self, kid: &str, key: VerifyingKey, state: KeyState) {
        let kid: Arc<str> = Arc::from(kid);
        self.entries.insert(
            kid.clone(),
            KeyEntry {
                kid,
                state,
                key: Some(Arc::new(key)),
            },
        );
    }

    /// Marks `kid` revoked (or retired), keeping a tombstone if the key is not held, so
    /// its tokens fail with the precise reason instead of `UnknownKey`.
    pub fn set_state(&mut self, kid: &str, state: KeyState) {
        if let Some(entry) = self.entries.get_mut(kid) {
            // Revocation is final: a later refresh listing the key cannot revive it.
            if entry.state != KeyState::Revoked {
                entry.state = state;
            }
            return;
        }
        if state != KeyState::Active && kid.len() <= MAX_KID_BYTES {
            let kid: Arc<str> = Arc::from(kid);
            self.entries.insert(
                kid.clone(),
                KeyEntry {
                    kid,
                    state,
                    key: None,
                },
            );
        }
    }

    pub(crate) fn entry(&self, kid: &str) -> Option<&KeyEntry> {
        self.entries.get(kid)
    }

    /// The key for `kid` and its state.
    pub fn get(&self, kid: &str) -> Option<(&VerifyingKey, KeyState)> {
        self.entries
            .get(kid)
            .and_then(|e| e.key.as_deref().map(|k| (k, e.state)))
    }

    /// The state recorded for `kid` (tombstones included).
    pub fn state(&self, kid: &str) -> Option<KeyState> {
        self.entries.get(kid).map(|e| e.state)
    }

    /// `kid`s of the keys in `state`.
    pub fn kids(&self, state: KeyState) -> impl Iterator<Item = &str> {
        self.entries
            .values()
            .filter(move |e| e.state == state)
            .map(|e| &*e.kid)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The active keys as a JWK Set document.
    pub fn to_jwks(&self) -> Value {
        let mut keys: Vec<(&str, Value)> = self
            .entries
            .values()
            .filter(|e| e.state == KeyState::Active)
            .filter_map(|e| e.key.as_ref().map(|k| (&*e.kid, k.to_jwk(&e.kid))))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::json!({ "keys": keys.into_iter().map(|(_, v)| v).collect::<Vec<_>>() })
    }
}
