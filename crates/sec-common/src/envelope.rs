//! Envelope encryption for platform services: data is encrypted in the caller's process
//! with a data key from crypto-svc, so plaintext never leaves it and crypto-svc never
//! sees the data. `seal` reuses a data key for a bounded time and number of uses, then
//! asks for a new one; `open` unwraps a sealed blob's data key through crypto-svc and
//! caches it (bounded). Data keys are zeroized when dropped.
//!
//! Sealed format: `SEC1` ‖ u16 length ‖ wrapped data key (`sec:v<n>:…`) ‖ 12-byte nonce ‖
//! AES-256-GCM ciphertext and tag. The header is authenticated with the caller's
//! associated data, so a blob cannot be re-pointed at another data key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{DecryptRequest, GenerateDataKeyRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::grpc::BearerToken;

const MAGIC: &[u8; 4] = b"SEC1";
/// Associated data under which crypto-svc wraps envelope data keys.
const DEK_AAD: &[u8] = b"sec-envelope:v1";

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("crypto-svc: {0}")]
    Crypto(#[from] tonic::Status),
    #[error("sealed data is malformed")]
    Malformed,
    #[error("sealed data failed authentication (tampered, or other associated data)")]
    Authentication,
    #[error("data key from crypto-svc is unusable")]
    BadDataKey,
}

/// How long and how often a data key may be used.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    /// A sealing data key is replaced after this long.
    pub max_age: Duration,
    /// … or after this many `seal`s (keeps random-nonce use far from GCM's limits).
    pub max_uses: u64,
    /// Unwrapped data keys kept for `open`.
    pub max_open_keys: usize,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(300),
            max_uses: 1 << 20,
            max_open_keys: 1024,
        }
    }
}

struct DataKey {
    key: LessSafeKey,
    /// Kept only to be wiped on drop alongside the key schedule.
    _raw: Zeroizing<Vec<u8>>,
    wrapped: String,
    born: Instant,
    uses: u64,
}

impl DataKey {
    fn new(raw: Zeroizing<Vec<u8>>, wrapped: String) -> Result<Self, EnvelopeError> {
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| EnvelopeError::BadDataKey)?,
        );
        Ok(Self {
            key,
            _raw: raw,
            wrapped,
            born: Instant::now(),
            uses: 0,
        })
    }
}

fn aad_for(wrapped: &str, aad: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(8 + wrapped.len() + aad.len());
    a.extend_from_slice(&(wrapped.len() as u64).to_be_bytes());
    a.extend_from_slice(wrapped.as_bytes());
    a.extend_from_slice(aad);
    a
}

type Client = CryptoServiceClient<InterceptedService<Channel, BearerToken>>;

/// Seals and opens data under a crypto-svc key (of a type that supports data keys).
pub struct Envelope {
    client: Client,
    key_name: String,
    policy: CachePolicy,
    sealing: tokio::sync::Mutex<Option<DataKey>>,
    opening: Mutex<HashMap<String, (Instant, Arc<DataKey>)>>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("key_name", &self.key_name)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Envelope {
    pub fn new(
        channel: Channel,
        token: Option<&str>,
        key_name: &str,
        policy: CachePolicy,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: CryptoServiceClient::with_interceptor(channel, BearerToken::new(token)?),
            key_name: key_name.to_owned(),
            policy,
            sealing: tokio::sync::Mutex::new(None),
            opening: Mutex::new(HashMap::new()),
        })
    }

    /// Encrypts `plaintext`, authenticating `aad` (which `open` must be given again).
    pub async fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut slot = self.sealing.lock().await;
        let fresh = slot.as_ref().is_some_and(|k| {
            k.born.elapsed() < self.policy.max_age && k.uses < self.policy.max_uses
        });
        if !fresh {
            let resp = self
                .client
                .clone()
                .generate_data_key(GenerateDataKeyRequest {
                    key_name: self.key_name.clone(),
                    bytes: 32,
                    wrapped_only: false,
                    associated_data: DEK_AAD.to_vec(),
                })
                .await?
                .into_inner();
            *slot = Some(DataKey::new(
                Zeroizing::new(resp.plaintext),
                resp.ciphertext,
            )?);
        }
        let dk = slot.as_mut().ok_or(EnvelopeError::BadDataKey)?;
        dk.uses += 1;
        let mut nonce = [0_u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| EnvelopeError::BadDataKey)?;
        let wrapped = dk.wrapped.as_bytes();
        let len = u16::try_from(wrapped.len()).map_err(|_| EnvelopeError::BadDataKey)?;
        let mut out = Vec::with_capacity(6 + wrapped.len() + NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(wrapped);
        out.extend_from_slice(&nonce);
        let body_at = out.len();
        out.extend_from_slice(plaintext);
        let tag = dk
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad_for(&dk.wrapped, aad)),
                &mut out[body_at..],
            )
            .map_err(|_| EnvelopeError::BadDataKey)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts what `seal` produced (by this or any other process using the same key).
    pub async fn open(
        &self,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if sealed.len() < 6 || &sealed[..4] != MAGIC {
            return Err(EnvelopeError::Malformed);
        }
        let n = usize::from(u16::from_be_bytes([sealed[4], sealed[5]]));
        if sealed.len() < 6 + n + NONCE_LEN + 16 {
            return Err(EnvelopeError::Malformed);
        }
        let wrapped =
            std::str::from_utf8(&sealed[6..6 + n]).map_err(|_| EnvelopeError::Malformed)?;
        let nonce = &sealed[6 + n..6 + n + NONCE_LEN];
        let body = &sealed[6 + n + NONCE_LEN..];
        let dk = self.data_key_for(wrapped).await?;
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Malformed)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = dk
            .key
            .open_in_place(nonce, Aad::from(aad_for(wrapped, aad)), &mut buf)
            .map_err(|_| EnvelopeError::Authentication)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    async fn data_key_for(&self, wrapped: &str) -> Result<Arc<DataKey>, EnvelopeError> {
        {
            let cache = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((at, k)) = cache.get(wrapped)
                && at.elapsed() < self.policy.max_age
            {
                return Ok(Arc::clone(k));
            }
        }
        let resp = self
            .client
            .clone()
            .decrypt(DecryptRequest {
                key_name: self.key_name.clone(),
                ciphertext: wrapped.to_owned(),
                associated_data: DEK_AAD.to_vec(),
            })
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::InvalidArgument {
                    EnvelopeError::Authentication
                } else {
                    EnvelopeError::Crypto(s)
                }
            })?
            .into_inner();
        let dk = Arc::new(DataKey::new(
            Zeroizing::new(resp.plaintext),
            wrapped.to_owned(),
        )?);
        let mut cache = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|_, (at, _)| at.elapsed() < self.policy.max_age);
        if cache.len() >= self.policy.max_open_keys.max(1) {
            // Bounded: evict the oldest entry.
            if let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(wrapped.to_owned(), (Instant::now(), Arc::clone(&dk)));
        Ok(dk)
    }
}
