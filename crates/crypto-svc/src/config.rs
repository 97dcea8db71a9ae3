//! crypto-svc's `[crypto]` section: the root of trust and operation limits.

use std::path::PathBuf;

use sec_common::config::{Secret, ServiceConfig};
use serde::{Deserialize, Serialize};

/// Upper bound of `max_payload_bytes`: gRPC messages carry twice that plus framing.
const MAX_PAYLOAD_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CryptoConfig {
    /// The key-encryption key, base64 of 32 bytes (e.g. from `SEC_CRYPTO__KEK`).
    pub kek: Option<Secret>,
    /// A file holding the KEK (base64, or 32 raw bytes): a mounted Kubernetes secret.
    pub kek_file: Option<PathBuf>,
    /// KEKs being rotated out: still used to unwrap until `secctl kek rotate` re-wraps.
    pub previous_keks: Vec<Secret>,
    pub previous_kek_files: Vec<PathBuf>,
    /// Largest plaintext, message or ciphertext one operation accepts.
    pub max_payload_bytes: usize,
    /// Most items one batch request may carry (1..=10000); larger batches are refused
    /// before any work, so one request cannot queue unbounded work.
    pub max_batch_items: usize,
    /// How long unwrapped keys stay cached; another replica's rotation or policy change
    /// is seen after at most this long.
    pub cache_ttl_ms: u64,
    /// How often automatic rotation looks for keys that are due.
    pub rotation_check_seconds: u64,
    /// Encryptions one AES-GCM / ChaCha20-Poly1305 key version may make (random 96-bit
    /// nonces) before the key is rotated automatically: 1..=2^32, default 2^30.
    pub max_encryptions_per_version: u64,
}

impl Default for CryptoConfig {
    fn default() -> Self {
        Self {
            kek: None,
            kek_file: None,
            previous_keks: Vec::new(),
            previous_kek_files: Vec::new(),
            max_payload_bytes: 4 * 1024 * 1024,
            max_batch_items: 1000,
            cache_ttl_ms: 5_000,
            rotation_check_seconds: 60,
            max_encryptions_per_version: crate::engine::DEFAULT_MAX_ENCRYPTIONS_PER_VERSION,
        }
    }
}

impl ServiceConfig for CryptoConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let invalid = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        if self.kek.is_some() && self.kek_file.is_some() {
            return invalid("kek", "set kek or kek_file, not both");
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return invalid("max_payload_bytes", "must be between 1 byte and 64 MiB");
        }
        if !(1..=10_000).contains(&self.max_batch_items) {
            return invalid("max_batch_items", "must be between 1 and 10000");
        }
        if self.rotation_check_seconds == 0 || self.rotation_check_seconds > 86_400 {
            return invalid("rotation_check_seconds", "must be between 1 and 86400");
        }
        if !(1..=1 << 32).contains(&self.max_encryptions_per_version) {
            return invalid(
                "max_encryptions_per_version",
                "must be between 1 and 2^32 (NIST SP 800-38D's bound for random nonces)",
            );
        }
        if self.cache_ttl_ms > 3_600_000 {
            return invalid("cache_ttl_ms", "must be at most one hour");
        }
        Ok(())
    }
}
