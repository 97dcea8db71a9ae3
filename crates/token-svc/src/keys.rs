//! The signing cryptography, on aws-lc-rs directly: key generation, JWS signing and
//! verification bound to one algorithm per key, and the public JWK.
//!
//! JWS compact serialization is produced by hand (base64url header and claims, the
//! signature over `header.payload`): standard RFC 7515 output, verified in the tests by
//! PyJWT and npm `jose`. Keys are parsed once when loaded, not per signature.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    Es256,
    EdDsa,
    Rs256,
    Ps256,
}

impl Alg {
    /// The JOSE name (`alg` header).
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
            Alg::Rs256 => "RS256",
            Alg::Ps256 => "PS256",
        }
    }

    /// Exactly the four JOSE names: `none`, `HS256`, `es256`… are not algorithms here.
    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            "RS256" => Some(Alg::Rs256),
            "PS256" => Some(Alg::Ps256),
            _ => None,
        }
    }

    /// The hash OIDC's `at_hash` / `c_hash` use: SHA-512 for EdDSA (Ed25519), SHA-256
    /// otherwise.
    pub fn half_hash(self, value: &str) -> String {
        let alg = match self {
            Alg::EdDsa => &aws_lc_rs::digest::SHA512,
            _ => &aws_lc_rs::digest::SHA256,
        };
        let d = aws_lc_rs::digest::digest(alg, value.as_bytes());
        let bytes = d.as_ref();
        URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() / 2])
    }

    fn verify_alg(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            Alg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
            Alg::EdDsa => &signature::ED25519,
            Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key generation failed")]
    Generate,
    #[error("stored key is invalid")]
    Invalid,
    #[error("signing failed")]
    Sign,
}

/// A freshly generated key: PKCS#8 private key (to be sealed), the public key aws-lc-rs
/// verifies with, and the public JWK.
pub struct Generated {
    pub pkcs8: Zeroizing<Vec<u8>>,
    pub public_key: Vec<u8>,
    pub jwk: serde_json::Value,
}

pub fn generate(alg: Alg, kid: &str) -> Result<Generated, KeyError> {
    let rng = SystemRandom::new();
    let pkcs8 = match alg {
        Alg::Es256 => Zeroizing::new(
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| KeyError::Generate)?
                .as_ref()
                .to_vec(),
        ),
        Alg::EdDsa => Zeroizing::new(
            Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| KeyError::Generate)?
                .as_ref()
                .to_vec(),
        ),
        Alg::Rs256 | Alg::Ps256 => {
            let pair = RsaKeyPair::generate(KeySize::Rsa3072).map_err(|_| KeyError::Generate)?;
            let der: Pkcs8V1Der<'static> = pair.as_der().map_err(|_| KeyError::Generate)?;
            Zeroizing::new(der.as_ref().to_vec())
        }
    };
    let signer = Signer::load(alg, &pkcs8)?;
    let public_key = signer.public_key();
    let jwk = signer.jwk(kid);
    Ok(Generated {
        pkcs8,
        public_key,
        jwk,
    })
}

enum Inner {
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A private key, parsed once; dropped (and wiped by aws-lc) with its key ring entry.
pub struct Signer {
    pub alg: Alg,
    inner: Inner,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn load(alg: Alg, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let inner = match alg {
            Alg::Es256 => Inner::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
                    .map_err(|_| KeyError::Invalid)?,
            ),
            Alg::EdDsa => {
                Inner::Ed(Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| KeyError::Invalid)?)
            }
            Alg::Rs256 | Alg::Ps256 => {
                Inner::Rsa(RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| KeyError::Invalid)?)
            }
        };
        Ok(Self { alg, inner })
    }

    pub fn public_key(&self) -> Vec<u8> {
        match &self.inner {
            Inner::Ec(k) => k.public_key().as_ref().to_vec(),
            Inner::Ed(k) => k.public_key().as_ref().to_vec(),
            Inner::Rsa(k) => k.public_key().as_ref().to_vec(),
        }
    }

    pub fn jwk(&self, kid: &str) -> serde_json::Value {
        let b = |x: &[u8]| URL_SAFE_NO_PAD.encode(x);
        let mut jwk = match &self.inner {
            Inner::Ec(k) => {
                // Uncompressed point: 0x04 ‖ x ‖ y.
                let p = k.public_key().as_ref();
                let (x, y) = p
                    .get(1..)
                    .unwrap_or_default()
                    .split_at(p.len().saturating_sub(1) / 2);
                serde_json::json!({"kty": "EC", "crv": "P-256", "x": b(x), "y": b(y)})
            }
            Inner::Ed(k) => {
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": b(k.public_key().as_ref())})
            }
            Inner::Rsa(k) => {
                let p = k.public_key();
                serde_json::json!({
                    "kty": "RSA",
                    "n": b(p.modulus().big_endian_without_leading_zero()),
                    "e": b(p.exponent().big_endian_without_leading_zero()),
                })
            }
        };
        if let Some(o) = jwk.as_object_mut() {
            o.insert("kid".into(), kid.into());
            o.insert("alg".into(), self.alg.as_str().into());
            o.insert("use".into(), "sig".into());
        }
        jwk
    }

    /// The JWS signature over `signing_input` in its JOSE encoding (raw r‖s for ES256).
    pub fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match (&self.inner, self.alg) {
            (Inner::Ec(k), _) => k
                .sign(&rng, signing_input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Sign),
            (Inner::Ed(k), _) => Ok(k.sign(signing_input).as_ref().to_vec()),
            (Inner::Rsa(k), alg) => {
                let pad: &'static dyn signature::RsaEncoding = if alg == Alg::Ps256 {
                    &signature::RSA_PSS_SHA256
                } else {
                    &signature::RSA_PKCS1_SHA256
                };
                let mut sig = vec![0_u8; k.public_modulus_len()];
                k.sign(pad, &rng, signing_input, &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                Ok(sig)
            }
        }
    }

    /// `header.payload.signature` for the given header and claims objects.
    pub fn jws(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, KeyError> {
        let h = serde_json::to_vec(header).map_err(|_| KeyError::Sign)?;
        let c = serde_json::to_vec(claims).map_err(|_| KeyError::Sign)?;
        let mut out = String::with_capacity((h.len() + c.len()) * 4 / 3 + 520);
        URL_SAFE_NO_PAD.encode_string(&h, &mut out);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&c, &mut out);
        let sig = self.sign(out.as_bytes())?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut out);
        Ok(out)
    }
}

/// Verifies `sig` over `msg` with a public key of `alg` (the key's bound algorithm).
pub fn verify(alg: Alg, public_key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(alg.verify_alg(), public_key)
        .verify(msg, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_verifies_and_is_bound() {
        for alg in [Alg::Es256, Alg::EdDsa, Alg::Rs256, Alg::Ps256] {
            let g = generate(alg, "k1").unwrap();
            let s = Signer::load(alg, &g.pkcs8).unwrap();
            let sig = s.sign(b"msg").unwrap();
            assert!(verify(alg, &g.public_key, b"msg", &sig), "{alg:?}");
            assert!(!verify(alg, &g.public_key, b"other", &sig), "{alg:?}");
            assert_eq!(g.jwk["alg"], alg.as_str());
            assert_eq!(g.jwk["kid"], "k1");
            assert_eq!(g.jwk["use"], "sig");
        }
        // An RS256 signature does not pass as PS256 with the same key.
        let g = generate(Alg::Rs256, "k").unwrap();
        let sig = Signer::load(Alg::Rs256, &g.pkcs8)
            .unwrap()
            .sign(b"m")
            .unwrap();
        assert!(!verify(Alg::Ps256, &g.public_key, b"m", &sig));
    }

    #[test]
    fn only_the_four_names_parse() {
        for bad in ["none", "HS256", "es256", "ES384", ""] {
            assert_eq!(Alg::parse(bad), None);
        }
    }
}
