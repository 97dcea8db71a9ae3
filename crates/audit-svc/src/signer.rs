//! Checkpoints are signed by crypto-svc with audit-svc's own Ed25519 key
//! (`svc.audit.audit-checkpoints`), which never leaves crypto-svc. Signatures are
//! checked locally against the key version's public key (fetched once per version), so
//! verifying a year of checkpoints is not a year of RPCs.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine as _;
use sec_common::grpc::BearerToken;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{EnsureServiceKeyRequest, GetPublicKeyRequest, KeyType, SignRequest};
use tonic::transport::Channel;

use crate::chain::{CheckpointSigner, SignError};

/// `EnsureServiceKey` purpose of the checkpoint key.
pub const KEY_PURPOSE: &str = "audit-checkpoints";
/// Most public keys kept (one per key version).
const MAX_CACHED_KEYS: usize = 1024;

/// DER SubjectPublicKeyInfo header of an Ed25519 key (RFC 8410); 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

pub struct CryptoSigner {
    channel: Channel,
    credential: Option<String>,
    key_name: String,
    /// (key name, version) → raw Ed25519 public key.
    public_keys: Mutex<HashMap<(String, u32), Vec<u8>>>,
}

fn sign_error(e: impl std::fmt::Display) -> SignError {
    SignError(e.to_string())
}

impl CryptoSigner {
    /// Makes sure the key exists (created on first start) and returns the signer.
    pub async fn ensure(channel: Channel, credential: Option<String>) -> anyhow::Result<Self> {
        let mut client = CryptoServiceClient::with_interceptor(
            channel.clone(),
            BearerToken::new(credential.as_deref())?,
        );
        let key = client
            .ensure_service_key(EnsureServiceKeyRequest {
                purpose: KEY_PURPOSE.into(),
                r#type: KeyType::Ed25519 as i32,
            })
            .await?
            .into_inner();
        Ok(Self {
            channel,
            credential,
            key_name: key.name,
            public_keys: Mutex::new(HashMap::new()),
        })
    }

    fn client(
        &self,
    ) -> Result<
        CryptoServiceClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>,
        SignError,
    > {
        Ok(CryptoServiceClient::with_interceptor(
            self.channel.clone(),
            BearerToken::new(self.credential.as_deref()).map_err(sign_error)?,
        ))
    }

    async fn public_key(&self, key_name: &str, version: u32) -> Result<Vec<u8>, SignError> {
        let cache_key = (key_name.to_owned(), version);
        if let Some(k) = self
            .public_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&cache_key)
        {
            return Ok(k.clone());
        }
        let pem = self
            .client()?
            .get_public_key(GetPublicKeyRequest {
                key_name: key_name.to_owned(),
                version,
            })
            .await
            .map_err(|s| sign_error(format!("GetPublicKey: {}", s.message())))?
            .into_inner();
        if pem.r#type != KeyType::Ed25519 as i32 {
            return Err(SignError(format!("{key_name} is not an Ed25519 key")));
        }
        let raw = ed25519_from_pem(&pem.public_key_pem)
            .ok_or_else(|| SignError(format!("{key_name} v{version}: unreadable public key")))?;
        let mut cache = self
            .public_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_KEYS {
            cache.clear();
        }
        cache.insert(cache_key, raw.clone());
        Ok(raw)
    }
}

/// The 32 key bytes of a PEM Ed25519 SubjectPublicKeyInfo.
fn ed25519_from_pem(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = der.strip_prefix(&ED25519_SPKI_PREFIX)?;
    (raw.len() == 32).then(|| raw.to_vec())
}

/// `sec:v<version>:<base64>` → (version, signature bytes).
fn parse_signature(s: &str) -> Option<(u32, Vec<u8>)> {
    let rest = s.strip_prefix("sec:v")?;
    let (v, b64) = rest.split_once(':')?;
    let sig = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some((v.parse().ok()?, sig))
}

#[async_trait]
impl CheckpointSigner for CryptoSigner {
    async fn sign(&self, message: &[u8]) -> Result<(String, u32, String), SignError> {
        let r = self
            .client()?
            .sign(SignRequest {
                key_name: self.key_name.clone(),
                message: message.to_vec(),
            })
            .await
            .map_err(|s| sign_error(format!("Sign: {}", s.message())))?
            .into_inner();
        Ok((self.key_name.clone(), r.key_version, r.signature))
    }

    async fn verify(
        &self,
        key_name: &str,
        message: &[u8],
        signature: &str,
    ) -> Result<bool, SignError> {
        let Some((version, sig)) = parse_signature(signature) else {
            return Ok(false);
        };
        let key = self.public_key(key_name, version).await?;
        Ok(UnparsedPublicKey::new(&ED25519, &key)
            .verify(message, &sig)
            .is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_and_pem_parsing() {
        assert_eq!(parse_signature("sec:v3:AAEC"), Some((3, vec![0, 1, 2])));
        for bad in ["", "sec:v:AA", "sec:vx:AA", "v3:AA", "sec:v3:!!"] {
            assert_eq!(parse_signature(bad), None, "{bad}");
        }
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend([7u8; 32]);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        assert_eq!(ed25519_from_pem(&pem), Some(vec![7u8; 32]));
        assert_eq!(ed25519_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n"), None);
    }
}
