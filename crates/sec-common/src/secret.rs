//! Server-generated machine secrets (OAuth client secrets, API keys): 256 random bits,
//! stored only as HMAC-SHA-256 under a server key and compared in constant time.
//!
//! A keyed hash is enough because the secret cannot be guessed: a slow KDF would only cap
//! the token endpoint's throughput (argon2id allows a few hundred checks a second per
//! core). The key means a stolen table of hashes cannot even be checked offline without
//! the server key as well.

use base64::Engine as _;

/// A fresh 256-bit secret, `<prefix>` + base64url (no padding).
pub fn generate_secret(prefix: &str) -> anyhow::Result<String> {
    let mut bytes = [0_u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("system random generator failed"))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// HMAC-SHA-256 of secrets under one server key.
pub struct KeyedHasher {
    key: aws_lc_rs::hmac::Key,
}

impl std::fmt::Debug for KeyedHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedHasher([redacted])")
    }
}

impl KeyedHasher {
    /// `key` should itself hold at least 256 random bits (e.g. a crypto-svc data key).
    pub fn new(key: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(key.len() >= 32, "a keyed-hash key needs at least 32 bytes");
        Ok(Self {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
        })
    }

    /// The value to store for `secret`.
    pub fn hash(&self, secret: &str) -> [u8; 32] {
        let tag = aws_lc_rs::hmac::sign(&self.key, secret.as_bytes());
        let mut out = [0_u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `secret` matches `stored`, in constant time.
    pub fn verify(&self, secret: &str, stored: &[u8]) -> bool {
        aws_lc_rs::hmac::verify(&self.key, secret.as_bytes(), stored).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_verify_and_others_do_not() {
        let s = generate_secret("cs_").unwrap();
        assert!(s.starts_with("cs_") && s.len() == 3 + 43);
        assert_ne!(s, generate_secret("cs_").unwrap());
        let h = KeyedHasher::new(&[7; 32]).unwrap();
        let stored = h.hash(&s);
        assert!(h.verify(&s, &stored));
        assert!(!h.verify("cs_wrong", &stored));
        assert!(!h.verify(&s, &stored[..31]));
        let other_key = KeyedHasher::new(&[8; 32]).unwrap();
        assert!(
            !other_key.verify(&s, &stored),
            "the hash is bound to the server key"
        );
        assert!(KeyedHasher::new(&[0; 16]).is_err());
    }
}
