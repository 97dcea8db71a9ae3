//! Key types, their key material and the primitives on it (aws-lc-rs only).
//!
//! Material as stored (before wrapping): 32 random bytes for symmetric and HMAC keys,
//! PKCS#8 DER for asymmetric keys. [`Loaded`] is a version parsed once and cached.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey,
};
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, UnparsedPublicKey,
};
use aws_lc_rs::{hkdf, hmac};
use zeroize::Zeroizing;

/// The key types crypto-svc offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    Aes256Gcm,
    Chacha20Poly1305,
    Aes256GcmSiv,
    Rsa3072,
    Rsa4096,
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    HmacSha256,
    /// RSA keys made only to receive backups (`RestoreKey`): no caller operation at all,
    /// so the RSA-OAEP that wraps a backup's one-time key can never be reached through
    /// `Decrypt` (issue 14). Their public key is exported with `GetPublicKey`.
    Rsa3072Wrapping,
    Rsa4096Wrapping,
}

/// What a caller can do with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
    DataKey,
    Sign,
    Verify,
    Hmac,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
            Op::DataKey => "datakey",
            Op::Sign => "sign",
            Op::Verify => "verify",
            Op::Hmac => "hmac",
        }
    }
}

const ENCRYPTION: &[Op] = &[Op::Encrypt, Op::Decrypt, Op::Rewrap, Op::DataKey];
const RSA: &[Op] = &[
    Op::Encrypt,
    Op::Decrypt,
    Op::Rewrap,
    Op::DataKey,
    Op::Sign,
    Op::Verify,
];
const SIGNING: &[Op] = &[Op::Sign, Op::Verify];
const MAC: &[Op] = &[Op::Hmac];
/// Wrapping keys are used only inside `RestoreKey`.
const NONE: &[Op] = &[];

/// Nonce plus tag: what the AEAD types add to a plaintext.
pub const AEAD_OVERHEAD: usize = NONCE_LEN + 16;

/// The longest ciphertext body any type adds beyond its plaintext, or produces at all:
/// an RSA-4096 block (512 bytes) is more than any AEAD's nonce and tag. Used for bounds
/// computed before a key is known (batch response sizes).
pub const MAX_CIPHERTEXT_OVERHEAD: usize = 512;

pub const ALL_TYPES: [KeyType; 11] = [
    KeyType::Aes256Gcm,
    KeyType::Chacha20Poly1305,
    KeyType::Aes256GcmSiv,
    KeyType::Rsa3072,
    KeyType::Rsa4096,
    KeyType::EcdsaP256,
    KeyType::EcdsaP384,
    KeyType::Ed25519,
    KeyType::HmacSha256,
    KeyType::Rsa3072Wrapping,
    KeyType::Rsa4096Wrapping,
];

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Aes256Gcm => "aes256-gcm",
            KeyType::Chacha20Poly1305 => "chacha20-poly1305",
            KeyType::Aes256GcmSiv => "aes256-gcm-siv",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::HmacSha256 => "hmac-sha256",
            KeyType::Rsa3072Wrapping => "rsa-3072-wrapping",
            KeyType::Rsa4096Wrapping => "rsa-4096-wrapping",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        ALL_TYPES.into_iter().find(|t| t.name() == name)
    }

    pub fn operations(self) -> &'static [Op] {
        match self {
            KeyType::Aes256Gcm | KeyType::Chacha20Poly1305 | KeyType::Aes256GcmSiv => ENCRYPTION,
            KeyType::Rsa3072 | KeyType::Rsa4096 => RSA,
            KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::Ed25519 => SIGNING,
            KeyType::HmacSha256 => MAC,
            KeyType::Rsa3072Wrapping | KeyType::Rsa4096Wrapping => NONE,
        }
    }

    pub fn supports(self, op: Op) -> bool {
        self.operations().contains(&op)
    }

    pub fn is_asymmetric(self) -> bool {
        matches!(
            self,
            KeyType::Rsa3072
                | KeyType::Rsa4096
                | KeyType::EcdsaP256
                | KeyType::EcdsaP384
                | KeyType::Ed25519
                | KeyType::Rsa3072Wrapping
                | KeyType::Rsa4096Wrapping
        )
    }

    /// A key that only receives backups (see [`KeyType::Rsa4096Wrapping`]).
    pub fn is_wrapping(self) -> bool {
        matches!(self, KeyType::Rsa3072Wrapping | KeyType::Rsa4096Wrapping)
    }

    /// The longest ciphertext body (before base64) this type produces for a plaintext of
    /// at most `max_plaintext` bytes: AEADs add nonce and tag, RSA-OAEP always yields one
    /// modulus. Decrypt refuses longer bodies, so the limit applies to decoded sizes and a
    /// ciphertext of a plaintext at the limit always decrypts. `0` for types that never
    /// decrypt.
    pub fn max_ciphertext_body(self, max_plaintext: usize) -> usize {
        match self {
            KeyType::Aes256Gcm | KeyType::Chacha20Poly1305 | KeyType::Aes256GcmSiv => {
                max_plaintext.saturating_add(AEAD_OVERHEAD)
            }
            KeyType::Rsa3072 | KeyType::Rsa4096 => self.rsa_bits().unwrap_or(0) / 8,
            _ => 0,
        }
    }

    /// The modulus size of RSA types: material of another size is refused on load.
    fn rsa_bits(self) -> Option<usize> {
        match self {
            KeyType::Rsa3072 | KeyType::Rsa3072Wrapping => Some(3072),
            KeyType::Rsa4096 | KeyType::Rsa4096Wrapping => Some(4096),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaterialError {
    #[error("random generator or key generation failed")]
    Generate,
    #[error("stored key material does not parse")]
    Invalid,
}

/// Why an operation on a loaded key failed. Messages are safe to show a caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    /// Wrong key, wrong associated data, tampered or truncated: indistinguishable by design.
    #[error(
        "ciphertext is invalid, was tampered with, or does not belong to this key and associated data"
    )]
    Authentication,
    #[error("plaintext too large for this key type ({max} bytes at most)")]
    TooLarge { max: usize },
    #[error("cryptographic operation failed")]
    Failed,
}

/// Fresh key material for a new version.
pub fn generate(t: KeyType) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
    let rng = SystemRandom::new();
    let bytes = match t {
        KeyType::Aes256Gcm
        | KeyType::Chacha20Poly1305
        | KeyType::Aes256GcmSiv
        | KeyType::HmacSha256 => {
            let mut k = vec![0_u8; 32];
            aws_lc_rs::rand::fill(&mut k).map_err(|_| MaterialError::Generate)?;
            k
        }
        KeyType::Rsa3072
        | KeyType::Rsa4096
        | KeyType::Rsa3072Wrapping
        | KeyType::Rsa4096Wrapping => {
            let size = if t.rsa_bits() == Some(3072) {
                KeySize::Rsa3072
            } else {
                KeySize::Rsa4096
            };
            let pair = RsaKeyPair::generate(size).map_err(|_| MaterialError::Generate)?;
            let der: Pkcs8V1Der<'static> = pair.as_der().map_err(|_| MaterialError::Generate)?;
            der.as_ref().to_vec()
        }
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let alg = if t == KeyType::EcdsaP256 {
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING
            } else {
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING
            };
            EcdsaKeyPair::generate_pkcs8(alg, &rng)
                .map_err(|_| MaterialError::Generate)?
                .as_ref()
                .to_vec()
        }
        KeyType::Ed25519 => Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| MaterialError::Generate)?
            .as_ref()
            .to_vec(),
    };
    Ok(Zeroizing::new(bytes))
}

enum Inner {
    Aead {
        key: LessSafeKey,
        siv_nonce_key: Option<hmac::Key>,
    },
    Rsa {
        decrypt: OaepPrivateDecryptingKey,
        encrypt: OaepPublicEncryptingKey,
        sign: RsaKeyPair,
    },
    Ecdsa {
        pair: EcdsaKeyPair,
        verify: &'static signature::EcdsaVerificationAlgorithm,
    },
    Ed25519(Ed25519KeyPair),
    Hmac(hmac::Key),
}

/// One key version, parsed and ready.
pub struct Loaded {
    pub key_type: KeyType,
    inner: Inner,
    /// DER SubjectPublicKeyInfo, for asymmetric keys.
    pub public_der: Option<Vec<u8>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

fn spki<T: AsDer<PublicKeyX509Der<'static>>>(k: &T) -> Result<Vec<u8>, MaterialError> {
    k.as_der()
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| MaterialError::Invalid)
}

/// HKDF info for the key that derives deterministic nonces of AES-GCM-SIV keys.
const SIV_NONCE_INFO: &[u8] = b"sec-crypto:aes256-gcm-siv:nonce-key:v1";

impl Loaded {
    pub fn load(t: KeyType, material: &[u8]) -> Result<Self, MaterialError> {
        let aead_key = |alg: &'static aead::Algorithm| {
            UnboundKey::new(alg, material)
                .map(LessSafeKey::new)
                .map_err(|_| MaterialError::Invalid)
        };
        let (inner, public_der) = match t {
            KeyType::Aes256Gcm => (
                Inner::Aead {
                    key: aead_key(&aead::AES_256_GCM)?,
                    siv_nonce_key: None,
                },
                None,
            ),
            KeyType::Chacha20Poly1305 => (
                Inner::Aead {
                    key: aead_key(&aead::CHACHA20_POLY1305)?,
                    siv_nonce_key: None,
                },
                None,
            ),
            KeyType::Aes256GcmSiv => {
                // Deterministic: the nonce is a MAC of (aad, plaintext) under a key derived
                // from the version's material, so equal inputs give equal ciphertexts and
                // GCM-SIV's misuse resistance covers the repeated nonce.
                let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"").extract(material);
                let okm = prk
                    .expand(&[SIV_NONCE_INFO], hmac::HMAC_SHA256)
                    .map_err(|_| MaterialError::Invalid)?;
                let nonce_key = hmac::Key::from(okm);
                (
                    Inner::Aead {
                        key: aead_key(&aead::AES_256_GCM_SIV)?,
                        siv_nonce_key: Some(nonce_key),
                    },
                    None,
                )
            }
            KeyType::Rsa3072
            | KeyType::Rsa4096
            | KeyType::Rsa3072Wrapping
            | KeyType::Rsa4096Wrapping => {
                let sign = RsaKeyPair::from_pkcs8(material).map_err(|_| MaterialError::Invalid)?;
                // The type names the modulus: a 2048-bit key restored as "rsa-4096" is refused.
                if Some(sign.public_modulus_len() * 8) != t.rsa_bits() {
                    return Err(MaterialError::Invalid);
                }
                let priv_key = PrivateDecryptingKey::from_pkcs8(material)
                    .map_err(|_| MaterialError::Invalid)?;
                let public = priv_key.public_key();
                let der = spki(&public)?;
                let encrypt =
                    OaepPublicEncryptingKey::new(public).map_err(|_| MaterialError::Invalid)?;
                let decrypt =
                    OaepPrivateDecryptingKey::new(priv_key).map_err(|_| MaterialError::Invalid)?;
                (
                    Inner::Rsa {
                        decrypt,
                        encrypt,
                        sign,
                    },
                    Some(der),
                )
            }
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
                let (alg, verify) = if t == KeyType::EcdsaP256 {
                    (
                        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                        &signature::ECDSA_P256_SHA256_ASN1,
                    )
                } else {
                    (
                        &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                        &signature::ECDSA_P384_SHA384_ASN1,
                    )
                };
                let pair =
                    EcdsaKeyPair::from_pkcs8(alg, material).map_err(|_| MaterialError::Invalid)?;
                let der = spki(pair.public_key())?;
                (Inner::Ecdsa { pair, verify }, Some(der))
            }
            KeyType::Ed25519 => {
                let pair =
                    Ed25519KeyPair::from_pkcs8(material).map_err(|_| MaterialError::Invalid)?;
                let der = spki(pair.public_key())?;
                (Inner::Ed25519(pair), Some(der))
            }
            KeyType::HmacSha256 => {
                // Generated keys are 32 bytes; imported (restored) keys of other lengths are valid HMAC keys.
                if material.is_empty() {
                    return Err(MaterialError::Invalid);
                }
                (
                    Inner::Hmac(hmac::Key::new(hmac::HMAC_SHA256, material)),
                    None,
                )
            }
        };
        Ok(Self {
            key_type: t,
            inner,
            public_der,
        })
    }

    /// Largest plaintext `encrypt` accepts for this key (RSA-OAEP is bounded by the modulus).
    pub fn max_plaintext(&self) -> Option<usize> {
        match &self.inner {
            Inner::Rsa { encrypt, .. } => Some(encrypt.max_plaintext_size(&OAEP_SHA256_MGF1SHA256)),
            _ => None,
        }
    }

    /// Encrypts; the result is the ciphertext body (nonce ‖ ciphertext ‖ tag for AEADs).
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, OpError> {
        match &self.inner {
            Inner::Aead { key, siv_nonce_key } => {
                let nonce = match siv_nonce_key {
                    Some(nk) => {
                        let mut ctx = hmac::Context::with_key(nk);
                        ctx.update(&(aad.len() as u64).to_be_bytes());
                        ctx.update(aad);
                        ctx.update(plaintext);
                        let tag = ctx.sign();
                        let mut n = [0_u8; NONCE_LEN];
                        n.copy_from_slice(&tag.as_ref()[..NONCE_LEN]);
                        n
                    }
                    None => {
                        let mut n = [0_u8; NONCE_LEN];
                        aws_lc_rs::rand::fill(&mut n).map_err(|_| OpError::Failed)?;
                        n
                    }
                };
                let mut out =
                    Vec::with_capacity(NONCE_LEN + plaintext.len() + key.algorithm().tag_len());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(plaintext);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut out[NONCE_LEN..],
                    )
                    .map_err(|_| OpError::Failed)?;
                out.extend_from_slice(tag.as_ref());
                Ok(out)
            }
            Inner::Rsa { encrypt, .. } => {
                let max = encrypt.max_plaintext_size(&OAEP_SHA256_MGF1SHA256);
                if plaintext.len() > max {
                    return Err(OpError::TooLarge { max });
                }
                let mut out = vec![0_u8; encrypt.ciphertext_size()];
                let label = (!aad.is_empty()).then_some(aad);
                let n = encrypt
                    .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, label)
                    .map_err(|_| OpError::Failed)?
                    .len();
                out.truncate(n);
                Ok(out)
            }
            _ => Err(OpError::Failed),
        }
    }

    pub fn decrypt(&self, body: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpError> {
        match &self.inner {
            Inner::Aead { key, .. } => {
                if body.len() < NONCE_LEN + key.algorithm().tag_len() {
                    return Err(OpError::Authentication);
                }
                let (nonce, ct) = body.split_at(NONCE_LEN);
                let nonce =
                    Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpError::Authentication)?;
                let mut buf = Zeroizing::new(ct.to_vec());
                let n = key
                    .open_in_place(nonce, Aad::from(aad), &mut buf)
                    .map_err(|_| OpError::Authentication)?
                    .len();
                buf.truncate(n);
                Ok(buf)
            }
            Inner::Rsa { decrypt, .. } => {
                let mut out = Zeroizing::new(vec![0_u8; decrypt.min_output_size()]);
                let label = (!aad.is_empty()).then_some(aad);
                let n = decrypt
                    .decrypt(&OAEP_SHA256_MGF1SHA256, body, &mut out, label)
                    .map_err(|_| OpError::Authentication)?
                    .len();
                out.truncate(n);
                Ok(out)
            }
            _ => Err(OpError::Failed),
        }
    }

    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, OpError> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Rsa { sign, .. } => {
                let mut sig = vec![0_u8; sign.public_modulus_len()];
                sign.sign(&signature::RSA_PSS_SHA256, &rng, message, &mut sig)
                    .map_err(|_| OpError::Failed)?;
                Ok(sig)
            }
            Inner::Ecdsa { pair, .. } => pair
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| OpError::Failed),
            Inner::Ed25519(pair) => pair
                .try_sign(message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| OpError::Failed),
            _ => Err(OpError::Failed),
        }
    }

    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.inner {
            Inner::Rsa { sign, .. } => UnparsedPublicKey::new(
                &signature::RSA_PSS_2048_8192_SHA256,
                sign.public_key().as_ref(),
            )
            .verify(message, sig)
            .is_ok(),
            Inner::Ecdsa { pair, verify } => {
                UnparsedPublicKey::new(*verify, pair.public_key().as_ref())
                    .verify(message, sig)
                    .is_ok()
            }
            Inner::Ed25519(pair) => {
                UnparsedPublicKey::new(&signature::ED25519, pair.public_key().as_ref())
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        }
    }

    pub fn hmac(&self, message: &[u8]) -> Result<Vec<u8>, OpError> {
        match &self.inner {
            Inner::Hmac(k) => Ok(hmac::sign(k, message).as_ref().to_vec()),
            _ => Err(OpError::Failed),
        }
    }

    /// Constant-time tag comparison.
    pub fn verify_hmac(&self, message: &[u8], tag: &[u8]) -> bool {
        match &self.inner {
            Inner::Hmac(k) => hmac::verify(k, message, tag).is_ok(),
            _ => false,
        }
    }
}

/// PEM of a DER SubjectPublicKeyInfo.
pub fn public_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// DER from a PEM public key (or the DER itself, base64).
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().chars())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Self-describing, versioned text form: `sec:v<version>:<base64>`.
pub mod wire {
    use base64::Engine as _;

    pub fn format(version: u32, body: &[u8]) -> String {
        format!(
            "sec:v{version}:{}",
            base64::engine::general_purpose::STANDARD.encode(body)
        )
    }

    /// `sec:v` + at most 10 version digits + `:`.
    pub const MAX_PREFIX: usize = 16;

    /// Length of the base64 (padded) text of `bytes` bytes.
    pub fn base64_len(bytes: usize) -> usize {
        bytes.div_ceil(3).saturating_mul(4)
    }

    /// The longest text [`format`] produces for a body of at most `body` bytes.
    pub fn max_text_len(body: usize) -> usize {
        base64_len(body).saturating_add(MAX_PREFIX)
    }

    /// `None` when it is not of that form.
    pub fn parse(text: &str) -> Option<(u32, Vec<u8>)> {
        let rest = text.trim().strip_prefix("sec:v")?;
        let (v, b64) = rest.split_once(':')?;
        if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let version: u32 = v.parse().ok()?;
        if version == 0 {
            return None;
        }
        Some((
            version,
            base64::engine::general_purpose::STANDARD.decode(b64).ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    //! Known-answer tests against published vectors, through the same code paths the
    //! service uses, plus the properties each key type promises.
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn gcm_kat(key: &str, iv: &str, pt: &str, aad: &str, ct: &str, tag: &str) {
        let k = Loaded::load(KeyType::Aes256Gcm, &hex(key)).unwrap();
        let body = [hex(iv), hex(ct), hex(tag)].concat();
        assert_eq!(
            k.decrypt(&body, &hex(aad)).unwrap().as_slice(),
            hex(pt).as_slice()
        );
        let mut tampered = body.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            k.decrypt(&tampered, &hex(aad)),
            Err(OpError::Authentication)
        );
    }

    #[test]
    fn nist_aes256_gcm_vectors() {
        // GCM specification (McGrew & Viega), test cases 14 and 16 (AES-256).
        gcm_kat(
            &"00".repeat(32),
            &"00".repeat(12),
            &"00".repeat(16),
            "",
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        );
        gcm_kat(
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            "76fc6ece0f4e1768cddf8853bb2d551b",
        );
    }

    #[test]
    fn rfc8032_ed25519_test_1() {
        // PKCS#8 v1 wrapping of the RFC 8032 section 7.1 TEST 1 secret key.
        let pkcs8 = [
            hex("302e020100300506032b657004220420"),
            hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"),
        ]
        .concat();
        let k = Loaded::load(KeyType::Ed25519, &pkcs8).unwrap();
        let sig = k.sign(b"").unwrap();
        assert_eq!(
            sig,
            hex(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            )
        );
        assert!(k.verify(b"", &sig));
        assert!(!k.verify(b"x", &sig));
        let spki = k.public_der.clone().unwrap();
        assert!(
            spki.ends_with(&hex(
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
            )),
            "public key of TEST 1"
        );
    }

    #[test]
    fn rfc4231_hmac_sha256() {
        let cases = [
            (
                "0b".repeat(20),
                b"Hi There".to_vec(),
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                hex_str(b"Jefe"),
                b"what do ya want for nothing?".to_vec(),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
        ];
        for (key, data, want) in cases {
            let k = Loaded::load(KeyType::HmacSha256, &hex(&key)).unwrap();
            assert_eq!(k.hmac(&data).unwrap(), hex(want));
            assert!(k.verify_hmac(&data, &hex(want)));
            let mut bad = hex(want);
            bad[0] ^= 1;
            assert!(!k.verify_hmac(&data, &bad));
        }
    }

    fn hex_str(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn every_type_round_trips_and_rejects_the_wrong_key() {
        for t in ALL_TYPES {
            let a = Loaded::load(t, &generate(t).unwrap()).unwrap();
            let b = Loaded::load(t, &generate(t).unwrap()).unwrap();
            if t.supports(Op::Encrypt) {
                let ct = a.encrypt(b"attack at dawn", b"ctx").unwrap();
                assert_eq!(
                    a.decrypt(&ct, b"ctx").unwrap().as_slice(),
                    b"attack at dawn",
                    "{t:?}"
                );
                assert_eq!(
                    a.decrypt(&ct, b"other"),
                    Err(OpError::Authentication),
                    "{t:?} wrong aad"
                );
                assert_eq!(
                    b.decrypt(&ct, b"ctx"),
                    Err(OpError::Authentication),
                    "{t:?} wrong key"
                );
                assert_eq!(
                    a.decrypt(&ct[..ct.len() - 1], b"ctx"),
                    Err(OpError::Authentication),
                    "{t:?} truncated"
                );
            }
            if t.supports(Op::Sign) {
                let sig = a.sign(b"msg").unwrap();
                assert!(a.verify(b"msg", &sig), "{t:?}");
                assert!(!a.verify(b"msh", &sig), "{t:?} other message");
                assert!(!b.verify(b"msg", &sig), "{t:?} other key");
                assert!(a.public_der.is_some());
            }
            if t.supports(Op::Hmac) {
                let tag = a.hmac(b"m").unwrap();
                assert!(a.verify_hmac(b"m", &tag) && !b.verify_hmac(b"m", &tag));
            }
        }
    }

    #[test]
    fn gcm_siv_is_deterministic_and_gcm_is_not() {
        let siv = Loaded::load(
            KeyType::Aes256GcmSiv,
            &generate(KeyType::Aes256GcmSiv).unwrap(),
        )
        .unwrap();
        assert_eq!(
            siv.encrypt(b"same", b"a").unwrap(),
            siv.encrypt(b"same", b"a").unwrap()
        );
        assert_ne!(
            siv.encrypt(b"same", b"a").unwrap(),
            siv.encrypt(b"same", b"b").unwrap()
        );
        let gcm = Loaded::load(KeyType::Aes256Gcm, &generate(KeyType::Aes256Gcm).unwrap()).unwrap();
        assert_ne!(
            gcm.encrypt(b"same", b"").unwrap(),
            gcm.encrypt(b"same", b"").unwrap()
        );
    }

    #[test]
    fn rsa_oaep_refuses_oversized_plaintext() {
        let k = Loaded::load(KeyType::Rsa3072, &generate(KeyType::Rsa3072).unwrap()).unwrap();
        let max = k.max_plaintext().unwrap();
        assert_eq!(max, 384 - 2 * 32 - 2);
        assert!(k.encrypt(&vec![1; max], b"").is_ok());
        assert_eq!(
            k.encrypt(&vec![1; max + 1], b""),
            Err(OpError::TooLarge { max })
        );
    }

    #[test]
    fn wire_format_is_strict() {
        let s = wire::format(7, b"body");
        assert_eq!(wire::parse(&s), Some((7, b"body".to_vec())));
        for bad in [
            "",
            "sec:v:YQ==",
            "sec:v0:YQ==",
            "sec:vx:YQ==",
            "sec:v1",
            "sec:v1:!!",
            "vault:v1:YQ==",
            "sec:v99999999999:YQ==",
        ] {
            assert_eq!(wire::parse(bad), None, "{bad}");
        }
    }
}
