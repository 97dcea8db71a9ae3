//! Sensitive values (`audit.sensitive_fields`), as Vault's audit devices treat them: the
//! configured detail fields are stored as keyed HMACs under audit-svc's own crypto-svc
//! key (`svc.audit.audit-fields`, HMAC-SHA256), which never leaves crypto-svc. A stored
//! value is `sec:v<key version>:<base64 tag>`: it can be matched exactly (search computes
//! the HMAC of the value asked for, under every version of the key) but not read back.
//!
//! Fail closed: when the HMACs cannot be computed (crypto-svc unreachable), the batch is
//! not stored in plain text; it is handed back to the broker and retried.
//!
//! One ingest batch is one `BatchHmac` call per [`CHUNK_ITEMS`] distinct values, all under
//! the version the first chunk used, so a batch never mixes versions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use sec_common::events::SecurityEvent;
use sec_common::grpc::BearerToken;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{BatchHmacRequest, EnsureServiceKeyRequest, KeyType};
use tokio::sync::OnceCell;
use tonic::transport::Channel;

/// `EnsureServiceKey` purpose of the field key.
pub const KEY_PURPOSE: &str = "audit-fields";
/// Prefix of a configured field: only detail fields are HMAC'd (the envelope's
/// `actor_id` and `subject` are identifiers search and reports are built on).
pub const DETAILS_PREFIX: &str = "details.";
/// Values per `BatchHmac` call (crypto-svc's default `max_batch_items` is 1000).
const CHUNK_ITEMS: usize = 500;
/// Bytes of values per call (crypto-svc's default `max_payload_bytes` is 4 MiB).
const CHUNK_BYTES: usize = 1024 * 1024;
/// What the dead-letter table keeps of a sensitive value.
pub const REDACTED: &str = "[redacted]";
/// Key versions a search value is matched under, newest first.
pub const MAX_MATCH_VERSIONS: u32 = 32;

#[derive(Debug, thiserror::Error)]
#[error("cannot compute the HMACs of sensitive fields: {0}")]
pub struct HashError(pub String);

/// Computes HMACs under the field key: crypto-svc in production, a local key in tests.
#[async_trait]
pub trait FieldHasher: Send + Sync + 'static {
    /// HMACs of `values`, in order, under `version` (0: the latest), and the version
    /// used. `Ok(None)` when that version cannot be used any more (retired by policy).
    async fn hmac(
        &self,
        version: u32,
        values: &[Vec<u8>],
    ) -> Result<Option<(Vec<String>, u32)>, HashError>;
}

/// The configured fields and the hasher.
pub struct Sensitive {
    /// Detail keys (without `details.`).
    keys: BTreeSet<String>,
    hasher: Arc<dyn FieldHasher>,
}

impl Sensitive {
    /// `None` when no field is configured (nothing to hash, crypto-svc is not needed).
    pub fn new(fields: &[String], hasher: Arc<dyn FieldHasher>) -> Option<Arc<Self>> {
        let keys: BTreeSet<String> = fields
            .iter()
            .filter_map(|f| f.strip_prefix(DETAILS_PREFIX))
            .map(str::to_owned)
            .collect();
        (!keys.is_empty()).then(|| Arc::new(Self { keys, hasher }))
    }

    /// Whether `key` (a detail key) is stored as an HMAC.
    pub fn is_sensitive(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// A copy of `event` with its sensitive values replaced by [`REDACTED`], when it has
    /// any: what the dead-letter table keeps of an event it could not store (the broker's
    /// dead-letter stream keeps the original, to be replayed).
    pub fn redacted(&self, event: &SecurityEvent) -> Option<SecurityEvent> {
        if !self.keys.iter().any(|k| event.details.contains_key(k)) {
            return None;
        }
        let mut e = event.clone();
        for k in &self.keys {
            if let Some(v) = e.details.get_mut(k) {
                REDACTED.clone_into(v);
            }
        }
        Some(e)
    }

    /// Replaces every configured detail value of `events` with its HMAC. On error the
    /// events may be partly replaced: the caller stores none of them.
    pub async fn protect(&self, events: &mut [SecurityEvent]) -> Result<usize, HashError> {
        let mut distinct: BTreeMap<String, Option<String>> = BTreeMap::new();
        for e in events.iter() {
            for k in &self.keys {
                if let Some(v) = e.details.get(k) {
                    distinct.entry(v.clone()).or_default();
                }
            }
        }
        if distinct.is_empty() {
            return Ok(0);
        }
        let values: Vec<String> = distinct.keys().cloned().collect();
        let mut version = 0;
        let mut start = 0;
        while start < values.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < values.len()
                && end - start < CHUNK_ITEMS
                && (end == start || bytes + values[end].len() <= CHUNK_BYTES)
            {
                bytes += values[end].len();
                end += 1;
            }
            let chunk: Vec<Vec<u8>> = values[start..end]
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            let (tags, used) = self
                .hasher
                .hmac(version, &chunk)
                .await?
                .ok_or_else(|| HashError(format!("key version {version} is retired")))?;
            if tags.len() != chunk.len() {
                return Err(HashError(format!(
                    "{} HMACs for {} values",
                    tags.len(),
                    chunk.len()
                )));
            }
            version = used;
            for (v, t) in values[start..end].iter().zip(tags) {
                distinct.insert(v.clone(), Some(t));
            }
            start = end;
        }
        let mut replaced = 0;
        for e in events.iter_mut() {
            for k in &self.keys {
                if let Some(v) = e.details.get_mut(k)
                    && let Some(Some(t)) = distinct.get(v.as_str())
                {
                    *v = t.clone();
                    replaced += 1;
                }
            }
        }
        Ok(replaced)
    }

    /// What a stored `value` of a sensitive field looks like under each usable key
    /// version, newest first (at most [`MAX_MATCH_VERSIONS`]).
    pub async fn match_values(&self, value: &str) -> Result<Vec<String>, HashError> {
        let message = vec![value.as_bytes().to_vec()];
        let Some((mut tags, latest)) = self.hasher.hmac(0, &message).await? else {
            return Err(HashError("the field key has no usable version".into()));
        };
        let oldest = latest.saturating_sub(MAX_MATCH_VERSIONS - 1).max(1);
        for v in (oldest..latest).rev() {
            match self.hasher.hmac(v, &message).await? {
                Some((t, _)) => tags.extend(t),
                None => break,
            }
        }
        Ok(tags)
    }
}

/// The field key in crypto-svc, created on first use.
pub struct CryptoHasher {
    channel: Channel,
    credential: Option<String>,
    key_name: OnceCell<String>,
}

impl CryptoHasher {
    pub fn new(channel: Channel, credential: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            channel,
            credential,
            key_name: OnceCell::new(),
        })
    }

    fn client(
        &self,
    ) -> Result<
        CryptoServiceClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>,
        HashError,
    > {
        Ok(CryptoServiceClient::with_interceptor(
            self.channel.clone(),
            BearerToken::new(self.credential.as_deref()).map_err(|e| HashError(e.to_string()))?,
        ))
    }

    async fn key_name(&self) -> Result<&str, HashError> {
        self.key_name
            .get_or_try_init(|| async {
                let key = self
                    .client()?
                    .ensure_service_key(EnsureServiceKeyRequest {
                        purpose: KEY_PURPOSE.into(),
                        r#type: KeyType::HmacSha256 as i32,
                    })
                    .await
                    .map_err(|s| HashError(format!("EnsureServiceKey: {}", s.message())))?;
                Ok(key.into_inner().name)
            })
            .await
            .map(String::as_str)
    }
}

#[async_trait]
impl FieldHasher for CryptoHasher {
    async fn hmac(
        &self,
        version: u32,
        values: &[Vec<u8>],
    ) -> Result<Option<(Vec<String>, u32)>, HashError> {
        let key_name = self.key_name().await?.to_owned();
        match self
            .client()?
            .batch_hmac(BatchHmacRequest {
                key_name,
                messages: values.to_vec(),
                key_version: version,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                Ok(Some((r.hmacs, r.key_version)))
            }
            // A version below the key's minimum, or one that does not exist.
            Err(s)
                if version != 0
                    && matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                    ) =>
            {
                Ok(None)
            }
            Err(s) => Err(HashError(format!("BatchHmac: {}", s.message()))),
        }
    }
}

/// A hasher over local keys (tests; production hashes in crypto-svc). Same format as
/// crypto-svc: `sec:v<n>:<standard base64 of the HMAC-SHA256 tag>`.
#[cfg(test)]
pub mod local {
    use super::*;
    use base64::Engine as _;

    pub struct LocalHasher {
        /// Version n is `keys[n - 1]`.
        pub keys: std::sync::Mutex<Vec<[u8; 32]>>,
        /// Versions below this are refused, like `min_decryption_version`.
        pub min_version: std::sync::atomic::AtomicU32,
        pub down: std::sync::atomic::AtomicBool,
        pub calls: std::sync::atomic::AtomicUsize,
    }

    impl LocalHasher {
        pub fn new() -> Arc<Self> {
            Arc::new(Self {
                keys: std::sync::Mutex::new(vec![[7; 32]]),
                min_version: 1.into(),
                down: false.into(),
                calls: 0.into(),
            })
        }

        pub fn rotate(&self) {
            let mut keys = self.keys.lock().unwrap();
            let n = keys.len() as u8;
            keys.push([7 + n; 32]);
        }

        pub fn tag(&self, version: u32, value: &str) -> String {
            let key = self.keys.lock().unwrap()[version as usize - 1];
            let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
            let tag = aws_lc_rs::hmac::sign(&k, value.as_bytes());
            format!(
                "sec:v{version}:{}",
                base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
            )
        }
    }

    #[async_trait]
    impl FieldHasher for LocalHasher {
        async fn hmac(
            &self,
            version: u32,
            values: &[Vec<u8>],
        ) -> Result<Option<(Vec<String>, u32)>, HashError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.calls.fetch_add(1, SeqCst);
            if self.down.load(SeqCst) {
                return Err(HashError("crypto-svc unreachable".into()));
            }
            let latest = self.keys.lock().unwrap().len() as u32;
            let v = if version == 0 { latest } else { version };
            if v > latest || v < self.min_version.load(SeqCst) {
                return Ok(None);
            }
            let tags = values
                .iter()
                .map(|m| self.tag(v, std::str::from_utf8(m).unwrap()))
                .collect();
            Ok(Some((tags, v)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use sec_common::clock::SystemClock;
    use sec_common::events::new_event;

    use super::local::LocalHasher;
    use super::*;

    fn login(username: &str, email: &str) -> SecurityEvent {
        let mut e = new_event(&SystemClock, "auth", "sec.auth.login.failed");
        e.details.insert("username".into(), username.into());
        e.details.insert("email".into(), email.into());
        e.details.insert("reason".into(), "bad_password".into());
        e
    }

    fn fields() -> Vec<String> {
        vec!["details.username".into(), "details.email".into()]
    }

    #[tokio::test]
    async fn configured_fields_become_hmacs_and_the_rest_is_untouched() {
        let h = LocalHasher::new();
        let s = Sensitive::new(&fields(), h.clone()).unwrap();
        let mut events = vec![
            login("alice", "alice@example.com"),
            login("alice", "a2@example.com"),
            login("bob", "alice@example.com"),
        ];
        let original = events.clone();
        assert_eq!(s.protect(&mut events).await.unwrap(), 6);
        // one call for the batch, three distinct values among six fields
        assert_eq!(h.calls.load(SeqCst), 1);
        for (e, o) in events.iter().zip(&original) {
            assert_eq!(e.details["username"], h.tag(1, &o.details["username"]));
            assert_eq!(e.details["email"], h.tag(1, &o.details["email"]));
            assert_eq!(e.details["reason"], "bad_password");
            assert!(!e.details["username"].contains("alice"));
            assert_eq!(e.id, o.id);
        }
        // the same value under the same key gives the same stored value: matchable
        assert_eq!(events[0].details["username"], events[1].details["username"]);
        assert_eq!(events[0].details["email"], events[2].details["email"]);
        assert_ne!(events[0].details["username"], events[2].details["username"]);
    }

    #[tokio::test]
    async fn no_configured_field_needs_no_hasher_and_an_outage_fails_closed() {
        assert!(Sensitive::new(&[], LocalHasher::new()).is_none());
        let h = LocalHasher::new();
        let s = Sensitive::new(&fields(), h.clone()).unwrap();
        let mut plain = vec![new_event(&SystemClock, "auth", "sec.auth.login.succeeded")];
        assert_eq!(s.protect(&mut plain).await.unwrap(), 0);
        assert_eq!(
            h.calls.load(SeqCst),
            0,
            "no call for a batch without values"
        );
        h.down.store(true, SeqCst);
        let mut events = vec![login("alice", "alice@example.com")];
        assert!(s.protect(&mut events).await.is_err());
    }

    #[tokio::test]
    async fn large_batches_are_chunked_under_one_version() {
        let h = LocalHasher::new();
        h.rotate();
        let s = Sensitive::new(&fields(), h.clone()).unwrap();
        let mut events: Vec<_> = (0..1200)
            .map(|i| login(&format!("user{i}"), &format!("u{i}@example.com")))
            .collect();
        assert_eq!(s.protect(&mut events).await.unwrap(), 2400);
        assert_eq!(
            h.calls.load(SeqCst),
            5,
            "2400 distinct values in chunks of 500"
        );
        assert!(
            events
                .iter()
                .all(|e| e.details["email"].starts_with("sec:v2:"))
        );
        assert_eq!(events[7].details["username"], h.tag(2, "user7"));
    }

    #[tokio::test]
    async fn a_value_matches_under_every_usable_version() {
        let h = LocalHasher::new();
        let s = Sensitive::new(&fields(), h.clone()).unwrap();
        assert_eq!(
            s.match_values("alice").await.unwrap(),
            vec![h.tag(1, "alice")]
        );
        h.rotate();
        h.rotate();
        assert_eq!(
            s.match_values("alice").await.unwrap(),
            vec![h.tag(3, "alice"), h.tag(2, "alice"), h.tag(1, "alice")]
        );
        h.min_version.store(2, SeqCst);
        assert_eq!(
            s.match_values("alice").await.unwrap(),
            vec![h.tag(3, "alice"), h.tag(2, "alice")]
        );
        assert!(s.is_sensitive("email") && !s.is_sensitive("reason"));
    }
}
