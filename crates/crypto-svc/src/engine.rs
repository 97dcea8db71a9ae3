//! crypto-svc's logic, independent of gRPC: key lifecycle, operations, automatic
//! rotation, backup/restore and KEK rotation, over a [`KeyStore`] and the [`KekRing`].
//!
//! Every failure is a `sec_common::error::Error` whose message is safe for a caller: it
//! never contains key material, plaintext or another key's details.
//!
//! Nothing grows with caller input: a key name is checked by [`validate_name`] before any
//! lookup, log, metric or event; the `key` metric label is a key's name only once that
//! key has loaded (else [`UNKNOWN_KEY`]); `sec.crypto.decrypt.failed` events are
//! aggregated per key and reason by a [`FailureAggregator`], which the service ticks with
//! [`Engine::tick`] and drains with [`Engine::flush_events`] at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sec_common::auth::Caller;
use sec_common::clock::SharedClock;
use sec_common::error::{Error, ErrorCode};
use sec_common::events::aggregate::{FailureAggregator, Summary};
use sec_common::events::{Outcome, SecurityEvent, Severity, new_event};
use zeroize::Zeroizing;

use crate::kek::{KekError, KekRing, MacCheck};
use crate::material::{KeyType, Loaded, MAX_CIPHERTEXT_OVERHEAD, Op, OpError, generate, wire};
use crate::store::{DeleteOutcome, KeyPolicy, KeyRecord, KeyStore, StoreError, VersionRecord};

pub type Emit = Arc<dyn Fn(SecurityEvent) + Send + Sync>;

/// (version, created_at, public key DER, encryptions reserved under it)
pub type VersionView = (u32, DateTime<Utc>, Option<Vec<u8>>, u64);

/// A key as callers see it: its record and per-version metadata (never material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    pub record: KeyRecord,
    pub key_type: KeyType,
    pub versions: Vec<VersionView>,
    /// Listings only: the record failed its MAC check (its public keys are withheld).
    pub integrity_failed: bool,
}

struct CachedKey {
    record: KeyRecord,
    key_type: KeyType,
    versions: BTreeMap<u32, Arc<Loaded>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    key: String,
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpName {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationReason {
    reason: &'static str,
}

#[derive(Clone)]
pub struct CryptoMetrics {
    ops: Family<OpLabels, Counter>,
    seconds: Family<OpName, Histogram>,
    /// Automatic rotations by reason (`period`, `encryption_bound`): a fixed label set.
    auto_rotations: Family<RotationReason, Counter>,
    /// Keys with automatic rotation still not rotated more than one check interval after
    /// they were due, as of the last complete rotation pass.
    rotation_overdue: Gauge,
}

impl CryptoMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            ops: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_01, 2.5, 14))
            }),
            auto_rotations: Family::default(),
            rotation_overdue: Gauge::default(),
        };
        registry.register(
            "sec_crypto_automatic_rotations",
            "Automatic key rotations by reason (period, encryption_bound)",
            m.auto_rotations.clone(),
        );
        registry.register(
            "sec_crypto_keys_rotation_overdue",
            "Keys with automatic rotation whose rotation is overdue by more than one check interval (crypto.rotation_check_seconds), as of the last complete rotation pass",
            m.rotation_overdue.clone(),
        );
        registry.register(
            "sec_crypto_operations",
            "Key operations by key, operation and outcome",
            m.ops.clone(),
        );
        registry.register(
            "sec_crypto_operation_duration_seconds",
            "Time spent in key operations",
            m.seconds.clone(),
        );
        m
    }

    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    /// What `sec_crypto_keys_rotation_overdue` reports now.
    pub fn rotation_overdue(&self) -> i64 {
        self.rotation_overdue.get()
    }
}

/// The `key` label of operations on a key that does not exist or never loaded here: label
/// values come only from existing keys, so callers cannot create series (or read back the
/// names they tried) on the unauthenticated `/metrics`.
pub const UNKNOWN_KEY: &str = "unknown";

/// Default bound of encryptions per random-nonce key version: 2^30, far below the 2^32
/// NIST SP 800-38D allows for random 96-bit nonces (collision chance about 2^-35).
pub const DEFAULT_MAX_ENCRYPTIONS_PER_VERSION: u64 = 1 << 30;

/// Uses of one key version reserved in the store and not yet spent by this engine.
type Reserved = HashMap<(String, u32), Vec<std::ops::Range<u64>>>;

/// Limits and tuning.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    /// Most items in one batch request (`crypto.max_batch_items`).
    pub max_batch_items: usize,
    pub cache_ttl: Duration,
    /// Failures of one key and reason within this long become one `decrypt.failed`
    /// summary (after the first, which is reported at once).
    pub failure_window: Duration,
    /// Distinct keys whose decrypt failures are counted apart; beyond, they share `other`.
    pub failure_keys: usize,
    /// Encryptions allowed under one version of a random-nonce key (AES-GCM,
    /// ChaCha20-Poly1305) before it is rotated (`crypto.max_encryptions_per_version`).
    pub max_encryptions_per_version: u64,
    /// Uses reserved in the store at a time per version: one write per this many
    /// encryptions; a crash loses at most this many (over-counted, never under-).
    pub encryption_reservation: u64,
    /// How often the rotation task runs `rotate_due` (`crypto.rotation_check_seconds`):
    /// a key still unrotated this long after it was due counts as overdue.
    pub rotation_check: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 4 * 1024 * 1024,
            max_batch_items: 1000,
            cache_ttl: Duration::from_secs(5),
            failure_window: Duration::from_secs(10),
            failure_keys: 1000,
            max_encryptions_per_version: DEFAULT_MAX_ENCRYPTIONS_PER_VERSION,
            encryption_reservation: 4096,
            rotation_check: Duration::from_secs(60),
        }
    }
}

/// Protobuf framing of one `BatchEncryptResult` at most: the repeated field's tag and
/// length, the oneof's tag and length, and `EncryptResponse`'s two fields (ciphertext tag
/// and length, `key_version` tag and varint), each length a varint of at most 5 bytes.
const BATCH_ITEM_FRAMING: usize = 24;

/// Room for gRPC and protobuf envelope bytes not counted item by item.
const MESSAGE_SLACK: usize = 64 * 1024;

impl Limits {
    /// The most ciphertext text `items` ciphertexts of plaintexts totalling `plaintext`
    /// bytes can take, whatever the key type: each body is at most its plaintext plus
    /// [`MAX_CIPHERTEXT_OVERHEAD`] (an RSA-4096 block exceeds any AEAD's nonce and tag),
    /// base64-encoded (up to 4 bytes of padding per item), behind its `sec:v<n>:` prefix.
    pub fn batch_ciphertext_text_bound(items: usize, plaintext: usize) -> usize {
        let bodies = items
            .saturating_mul(MAX_CIPHERTEXT_OVERHEAD)
            .saturating_add(plaintext);
        wire::base64_len(bodies).saturating_add(items.saturating_mul(wire::MAX_PREFIX + 4))
    }

    /// The worst-case encoded size of a `BatchEncryptResponse` of `items` items whose
    /// plaintexts total `plaintext` bytes. An item that failed carries a short fixed
    /// message, smaller than the successful item (≥ 700 bytes) it is counted as.
    pub fn batch_encrypt_response_bound(items: usize, plaintext: usize) -> usize {
        Self::batch_ciphertext_text_bound(items, plaintext)
            .saturating_add(items.saturating_mul(BATCH_ITEM_FRAMING))
    }

    /// The largest gRPC message crypto-svc accepts or sends under these limits: a batch
    /// of the most items at the payload limit, plus a payload of associated data (batch
    /// decrypt requests), plus slack. The server's decoding and encoding limits are set
    /// to it, so every request within the limits has a response that can be sent (a
    /// BatchEncrypt never fails at response encoding), and anything larger gets our
    /// precise `INVALID_ARGUMENT` rather than a transport error up to this size.
    pub fn max_message_bytes(&self) -> usize {
        Self::batch_encrypt_response_bound(self.max_batch_items, self.max_payload_bytes)
            .saturating_add(self.max_payload_bytes)
            .saturating_add(MESSAGE_SLACK)
    }
}

pub struct Engine {
    store: Arc<dyn KeyStore>,
    kek: Arc<KekRing>,
    clock: SharedClock,
    emit: Emit,
    limits: Limits,
    metrics: CryptoMetrics,
    /// Only keys that loaded from the store, so it is bounded by the number of keys.
    cache: Mutex<HashMap<String, (Instant, Arc<CachedKey>)>>,
    decrypt_failures: FailureAggregator<Caller>,
    /// `sec.crypto.key.integrity_failed`, at most once per key per window (plus a
    /// summary), however many calls hit the key.
    integrity_failures: FailureAggregator<Caller>,
    /// Encryption uses reserved in the store per (key, version), spent before reserving
    /// more. Bounded by the versions in use: exhausted entries are removed.
    reserved: Mutex<Reserved>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kek", &self.kek)
            .finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::AlreadyExists => Error::new(
            ErrorCode::AlreadyExists,
            "a key with that name already exists",
        ),
        StoreError::NotFound => Error::not_found("key not found"),
        StoreError::Conflict => {
            Error::new(ErrorCode::Aborted, "the key changed concurrently; retry")
        }
        other => Error::unavailable("key store failed", &other),
    }
}

/// The key-name rule, `^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`: ASCII only and bounded,
/// exactly what `CreateKey` has always accepted so existing keys stay usable. Checked
/// before a name reaches a lookup, log, metric or event; the error names `field` and
/// never echoes the name.
pub fn validate_name(name: &str, field: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "key names are 1-128 characters: letters, digits, '-', '_', '.', not starting with '.'",
        ))
    }
}

/// Most entries in a key's `allowed_services`.
pub const MAX_ALLOWED_SERVICES: usize = 32;
/// Longest service identity in `allowed_services`.
pub const MAX_SERVICE_IDENTITY_LEN: usize = 256;

/// Checks a key's `allowed_services` (at most 32 identities of 1-256 characters: ASCII
/// letters, digits and `-._:/@`, which covers service names, DNS names and SPIFFE IDs)
/// and returns it sorted without duplicates, so equal lists MAC equally. The error never
/// echoes an identity.
pub fn validate_services(mut services: Vec<String>) -> Result<Vec<String>, Error> {
    if services.len() > MAX_ALLOWED_SERVICES {
        return Err(Error::invalid(
            "allowed_services",
            format!("at most {MAX_ALLOWED_SERVICES} service identities"),
        ));
    }
    let ok = |id: &str| {
        !id.is_empty()
            && id.len() <= MAX_SERVICE_IDENTITY_LEN
            && id.bytes().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b':' | b'/' | b'@')
            })
    };
    if !services.iter().all(|id| ok(id)) {
        return Err(Error::invalid(
            "allowed_services",
            "service identities are 1-256 characters: letters, digits, '-', '.', '_', ':', '/', '@'",
        ));
    }
    services.sort();
    services.dedup();
    Ok(services)
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Changes to a key's policy; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct PolicyUpdate {
    pub min_decryption_version: Option<u32>,
    pub min_encryption_version: Option<u32>,
    pub rotation_period_seconds: Option<u64>,
    pub deletion_allowed: Option<bool>,
    pub exportable: Option<bool>,
    /// Replaces the list of services that may use the key (empty: any trusted service).
    pub allowed_services: Option<Vec<String>>,
    /// Apply only if the key's `policy_version` is still this (the caller's read).
    /// Without it the update is compared against the version this call reads, so a
    /// concurrent writer still makes one of the two fail with `ABORTED`.
    pub expected_policy_version: Option<u64>,
}

/// The loser of a compare-and-set on a key's policy.
fn policy_conflict() -> Error {
    Error::new(ErrorCode::Aborted, "key policy changed concurrently; retry")
}

/// Backups v2: `sec-backup:v2:` + base64(signature ‖ signed), signed = u16 length of
/// the wrapped key ‖ RSA-OAEP-wrapped AES key ‖ nonce ‖ AES-GCM(key document). The
/// Ed25519 signature of the source installation covers all of `signed`.
const BACKUP_PREFIX: &str = "sec-backup:v2:";
/// Unsigned backups of earlier releases: refused, since anyone could have made them.
const BACKUP_PREFIX_V1: &str = "sec-backup:v1:";
const BACKUP_FORMAT: &str = "sec-crypto-backup/v2";
/// OAEP label and AEAD associated data of a backup (in the reserved AAD namespace).
const BACKUP_AAD: &[u8] = b"sec-crypto-backup:v2";
/// Context prefixed to the signed bytes, so the signing key's signatures mean only this.
const SIGNATURE_CONTEXT: &[u8] = b"sec-crypto-backup-signature:v2\0";
const SIGNATURE_LEN: usize = 64;

/// The installation signing key's reserved name: it starts with '.', which
/// [`validate_name`] refuses, so no caller can create, read, use, back up or delete it;
/// `ListKeys` hides it. The KEK wraps it like any key (and `RotateKek` re-wraps it).
pub const INSTALLATION_KEY: &str = ".installation-backup-signing";

/// DER SubjectPublicKeyInfo header of an Ed25519 key (RFC 8410); 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Most versions a restored key may have.
const MAX_RESTORED_VERSIONS: u32 = 100_000;
fn too_large(field: &str, max: usize) -> Error {
    Error::invalid(field, format!("payload exceeds the limit of {max} bytes"))
}

/// The longest ciphertext body of any type for a plaintext of `max_plaintext` bytes.
fn max_any_ciphertext_body(max_plaintext: usize) -> usize {
    crate::material::ALL_TYPES
        .iter()
        .map(|t| t.max_ciphertext_body(max_plaintext))
        .max()
        .unwrap_or(0)
}

/// Upper bound of `rotation_period_seconds` (ten years), on CreateKey, UpdateKeyConfig and
/// restore: far beyond any sensible rotation, and far from the end of representable time,
/// so the rotation task's date arithmetic cannot overflow.
pub const MAX_ROTATION_PERIOD_SECONDS: u64 = 10 * 365 * 86_400;

/// Lower bound of a non-zero `rotation_period_seconds` (one hour).
pub const MIN_ROTATION_PERIOD_SECONDS: u64 = 3600;

/// `rotation_period_seconds` is 0 (off) or within
/// [`MIN_ROTATION_PERIOD_SECONDS`]..=[`MAX_ROTATION_PERIOD_SECONDS`].
pub fn check_rotation_period(field: &str, period: u64) -> Result<(), Error> {
    if period != 0 && !(MIN_ROTATION_PERIOD_SECONDS..=MAX_ROTATION_PERIOD_SECONDS).contains(&period)
    {
        return Err(Error::invalid(
            field,
            format!(
                "must be 0 (off) or between {MIN_ROTATION_PERIOD_SECONDS} and \
                 {MAX_ROTATION_PERIOD_SECONDS} (ten years)"
            ),
        ));
    }
    Ok(())
}

/// When a key rotated at `last` with `period` is next due; `None` if that is beyond
/// representable time (a row from before the bound): never, rather than a panic.
fn next_rotation(last: DateTime<Utc>, period: u64) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(period).ok()?;
    last.checked_add_signed(chrono::TimeDelta::try_seconds(secs)?)
}

fn signature_input(signed: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + signed.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(signed);
    m
}

/// SHA-256 of a public key's DER, lowercase hex: what operators compare.
pub fn fingerprint(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The pinned source public key (PEM Ed25519 SubjectPublicKeyInfo) as DER. Required:
/// without a pin a backup's origin cannot be checked, so nothing is restored.
fn pinned_ed25519(pem: &str) -> Result<Vec<u8>, Error> {
    const FIELD: &str = "source_public_key_pem";
    if pem.trim().is_empty() {
        return Err(Error::invalid(
            FIELD,
            "the source installation's backup-signing public key is required (see GetInstallationKey on the source)",
        ));
    }
    let der = crate::material::pem_to_der(pem)
        .filter(|d| {
            d.len() == ED25519_SPKI_PREFIX.len() + 32 && d.starts_with(&ED25519_SPKI_PREFIX)
        })
        .ok_or_else(|| Error::invalid(FIELD, "not a PEM Ed25519 public key"))?;
    Ok(der)
}

/// Checks a decrypted backup document before any of it is used: format, names, key
/// type, versions 1..=latest each exactly once, minimum versions within them, rotation
/// period within bounds. Returns the key type.
fn validate_backup(doc: &BackupDoc) -> Result<KeyType, Error> {
    let invalid = |m: &str| Err(Error::invalid("backup", m.to_owned()));
    if doc.format != BACKUP_FORMAT {
        return invalid("unsupported backup format");
    }
    validate_name(&doc.name, "backup")?;
    let Some(key_type) = KeyType::parse(&doc.key_type) else {
        return invalid("unknown key type in backup");
    };
    let latest = doc.latest_version;
    if latest == 0 || latest > MAX_RESTORED_VERSIONS {
        return invalid("latest_version out of range");
    }
    let mut seen: Vec<u32> = doc.versions.iter().map(|v| v.version).collect();
    seen.sort_unstable();
    if seen.len() != latest as usize || seen.iter().zip(1..).any(|(v, want)| *v != want) {
        return invalid("versions must be exactly 1..=latest_version");
    }
    if doc.min_decryption_version > latest || doc.min_encryption_version > latest {
        return invalid("minimum versions cannot exceed latest_version");
    }
    if doc.min_encryption_version != 0 && doc.min_encryption_version < doc.min_decryption_version {
        return invalid("min_encryption_version must be 0 or at least min_decryption_version");
    }
    let period = doc.rotation_period_seconds;
    if check_rotation_period("backup", period).is_err() {
        return invalid("rotation_period_seconds out of range");
    }
    Ok(key_type)
}

/// Material length against the key type (the rest — RSA modulus, curve point, Ed25519
/// seed and public key agreeing — is checked by [`Loaded::load`]).
fn check_material(t: KeyType, m: &[u8]) -> Result<(), Error> {
    let ok = match t {
        KeyType::Aes256Gcm | KeyType::Chacha20Poly1305 | KeyType::Aes256GcmSiv => m.len() == 32,
        // generated keys are 32 bytes; beyond the 64-byte block HMAC hashes the key anyway
        KeyType::HmacSha256 => (32..=64).contains(&m.len()),
        _ => !m.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "backup",
            "key material does not match its key type",
        ))
    }
}

/// Associated data (and so RSA-OAEP labels) starting with these bytes belong to
/// crypto-svc's own protocols (backups: `sec-crypto-backup:*`; derivations:
/// `sec-crypto:*`) and are refused from callers on every operation that takes AAD, so a
/// caller can never present crypto-svc's internal context as its own (issue 14).
/// `sec-envelope:v1`, the label of `sec_common::envelope`, is a caller's protocol and
/// stays allowed.
pub const RESERVED_AAD_PREFIX: &[u8] = b"sec-crypto";

/// Refuses caller associated data in crypto-svc's reserved namespace.
fn check_aad(aad: &[u8]) -> Result<(), Error> {
    if aad.starts_with(RESERVED_AAD_PREFIX) {
        return Err(Error::invalid(
            "associated_data",
            "associated data starting with 'sec-crypto' is reserved for crypto-svc",
        ));
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupDoc {
    format: String,
    name: String,
    key_type: String,
    latest_version: u32,
    min_decryption_version: u32,
    min_encryption_version: u32,
    rotation_period_seconds: u64,
    deletion_allowed: bool,
    exportable: bool,
    /// Absent in backups of unrestricted keys (and of earlier releases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allowed_services: Vec<String>,
    created_at: DateTime<Utc>,
    last_rotated_at: DateTime<Utc>,
    versions: Vec<BackupVersion>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupVersion {
    version: u32,
    created_at: DateTime<Utc>,
    material: String,
}

impl Engine {
    pub fn new(
        store: Arc<dyn KeyStore>,
        kek: Arc<KekRing>,
        clock: SharedClock,
        emit: Emit,
        limits: Limits,
        metrics: CryptoMetrics,
    ) -> Self {
        let (event_clock, sink) = (clock.clone(), emit.clone());
        let decrypt_failures = FailureAggregator::new(
            clock.clone(),
            limits.failure_window,
            limits.failure_keys,
            Arc::new(move |s: Summary<Caller>| {
                let mut e = new_event(event_clock.as_ref(), "crypto", "sec.crypto.decrypt.failed");
                e.actor = s.actor.as_ref().map(Caller::actor);
                e.outcome = Outcome::Failure as i32;
                e.severity = Severity::Medium as i32;
                s.describe(&mut e);
                sink(e);
            }),
        );
        let (event_clock, sink) = (clock.clone(), emit.clone());
        let integrity_failures = FailureAggregator::new(
            clock.clone(),
            limits.failure_window,
            limits.failure_keys,
            Arc::new(move |s: Summary<Caller>| {
                let mut e = new_event(
                    event_clock.as_ref(),
                    "crypto",
                    "sec.crypto.key.integrity_failed",
                );
                e.actor = s.actor.as_ref().map(Caller::actor);
                e.outcome = Outcome::Failure as i32;
                e.severity = Severity::High as i32;
                s.describe(&mut e);
                sink(e);
            }),
        );
        Self {
            store,
            kek,
            clock,
            emit,
            limits,
            metrics,
            cache: Mutex::new(HashMap::new()),
            decrypt_failures,
            integrity_failures,
            reserved: Mutex::new(HashMap::new()),
        }
    }

    /// Emits the `decrypt.failed` summaries whose window has closed. The service calls it
    /// about once a second; tests call it after moving a `ManualClock`.
    pub fn tick(&self) -> usize {
        self.decrypt_failures.tick() + self.integrity_failures.tick()
    }

    /// Emits every pending `decrypt.failed` summary now (shutdown).
    pub fn flush_events(&self) -> usize {
        self.decrypt_failures.flush() + self.integrity_failures.flush()
    }

    // ---- record integrity -----------------------------------------------------------

    /// The canonical encoding of everything in a key row that decides what the key may
    /// do (type, versions, policy, rotation schedule, write counter), as MACed.
    fn record_input(r: &KeyRecord) -> Vec<u8> {
        let p = &r.policy;
        // Fixed-order JSON array: unambiguous, and names are ASCII-only by rule.
        let mut input = serde_json::json!([
            "sec-crypto-record:v1",
            r.name,
            r.key_type,
            r.latest_version,
            p.min_decryption_version,
            p.min_encryption_version,
            p.rotation_period_seconds,
            p.deletion_allowed,
            p.exportable,
            r.policy_version,
            r.created_at.timestamp_micros(),
            r.last_rotated_at.timestamp_micros(),
        ]);
        // Appended only when set, so the MACs of unrestricted keys (every key written
        // before the field existed) stay valid, while clearing or widening a list in the
        // database breaks the MAC of a restricted key.
        if !p.allowed_services.is_empty()
            && let Some(a) = input.as_array_mut()
        {
            a.push(serde_json::json!({ "allowed_services": p.allowed_services }));
        }
        input.to_string().into_bytes()
    }

    fn mac_of(&self, r: &KeyRecord) -> String {
        self.kek.record_mac(&Self::record_input(r))
    }

    /// Refuses a key whose record or material failed its integrity check: emits
    /// `sec.crypto.key.integrity_failed` (aggregated per key) and logs why, without
    /// details in the caller's error.
    fn integrity_failure(&self, name: &str, why: &'static str) -> Error {
        tracing::error!(
            key = name,
            reason = why,
            "key record failed its integrity check"
        );
        self.invalidate(name);
        self.integrity_failures
            .record(name, why, Caller::Service("crypto-svc".into()));
        Error::precondition("key record failed its integrity check")
    }

    /// Checks a record's MAC (rows without one are refused: start-up backfills legacy
    /// rows, so a missing MAC later means someone removed it).
    fn check_record(&self, r: &KeyRecord) -> Result<(), Error> {
        let ok = r.record_mac.as_deref().is_some_and(|m| {
            self.kek.check_record_mac(m, &Self::record_input(r)) != MacCheck::Invalid
        });
        if ok {
            Ok(())
        } else {
            Err(self.integrity_failure(&r.name, "record_mac"))
        }
    }

    /// The key and its versions, with the record's integrity checked.
    async fn get_verified(&self, name: &str) -> Result<(KeyRecord, Vec<VersionRecord>), Error> {
        let (record, versions) = self
            .store
            .get(name)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::not_found("key not found"))?;
        self.check_record(&record)?;
        Ok((record, versions))
    }

    /// Unwraps one version, checking that the material belongs to this key, version and
    /// type, and that the stored public key is the one the private key implies.
    fn unwrap_version(
        &self,
        record: &KeyRecord,
        key_type: KeyType,
        v: &VersionRecord,
    ) -> Result<Loaded, Error> {
        let material = self
            .kek
            .unwrap(
                &v.kek_id,
                &record.key_type,
                &record.name,
                v.version,
                &v.wrapped,
            )
            .map_err(|e| match e {
                KekError::Corrupt => self.integrity_failure(&record.name, "wrapped_material"),
                other => Error::internal("unwrapping key material failed", &other),
            })?;
        let l = Loaded::load(key_type, &material)
            .map_err(|_| self.integrity_failure(&record.name, "material_type"))?;
        if l.public_der != v.public_key {
            return Err(self.integrity_failure(&record.name, "public_key"));
        }
        Ok(l)
    }

    /// Gives every key row without a MAC (written before record MACs existed, so never
    /// written since: `policy_version` 0) its MAC, trusting it as it is now. Run at
    /// start; returns how many rows it MACed.
    pub async fn backfill_record_macs(&self) -> Result<u64, Error> {
        let mut done = 0_u64;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list(after.as_deref(), 200)
                .await
                .map_err(store_err)?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for r in page.iter().filter(|r| r.record_mac.is_none()) {
                if r.policy_version != 0 {
                    // Written since MACs exist: a missing MAC was removed, not legacy.
                    tracing::error!(key = %r.name, "key record lost its mac; it stays refused");
                    continue;
                }
                if self
                    .store
                    .set_mac(&r.name, 0, &self.mac_of(r))
                    .await
                    .map_err(store_err)?
                {
                    tracing::warn!(key = %r.name, "backfilled the integrity mac of a key record written before record macs");
                    done += 1;
                }
            }
            if page.len() < 200 {
                break;
            }
        }
        if done > 0 {
            tracing::warn!(keys = done, "backfilled key record macs");
        }
        Ok(done)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn event(&self, who: &Caller, ty: &str, subject: &str) -> SecurityEvent {
        let mut e = new_event(self.clock.as_ref(), "crypto", ty);
        e.actor = Some(who.actor());
        e.subject = subject.to_owned();
        e
    }

    fn invalidate(&self, name: &str) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Refuses a batch of `items` before any of its work is done.
    pub fn check_batch(&self, items: usize) -> Result<(), Error> {
        if items > self.limits.max_batch_items {
            return Err(Error::invalid(
                "items",
                format!(
                    "batch has {items} items; the limit is {}",
                    self.limits.max_batch_items
                ),
            ));
        }
        Ok(())
    }

    fn check_payload(&self, field: &str, len: usize) -> Result<(), Error> {
        if len > self.limits.max_payload_bytes {
            return Err(too_large(field, self.limits.max_payload_bytes));
        }
        Ok(())
    }

    fn view(record: KeyRecord, versions: &[VersionRecord]) -> Result<KeyView, Error> {
        let key_type = KeyType::parse(&record.key_type)
            .ok_or_else(|| Error::internal("unknown stored key type", &record.key_type))?;
        Ok(KeyView {
            key_type,
            versions: versions
                .iter()
                .map(|v| (v.version, v.created_at, v.public_key.clone(), v.encryptions))
                .collect(),
            record,
            integrity_failed: false,
        })
    }

    // ---- key management -------------------------------------------------------------

    /// The rows of a new key: its record (MACed) and version 1, its material wrapped.
    fn first_version(
        &self,
        name: &str,
        key_type: KeyType,
        policy: KeyPolicy,
        material: &[u8],
        loaded: &Loaded,
    ) -> Result<(KeyRecord, VersionRecord), Error> {
        let (kek_id, wrapped) = self
            .kek
            .wrap(key_type.name(), name, 1, material)
            .map_err(|e| Error::internal("wrapping failed", &e))?;
        let now = micros(self.clock.now());
        let mut record = KeyRecord {
            name: name.to_owned(),
            key_type: key_type.name().to_owned(),
            latest_version: 1,
            policy,
            created_at: now,
            updated_at: now,
            last_rotated_at: now,
            policy_version: 1,
            record_mac: None,
        };
        record.record_mac = Some(self.mac_of(&record));
        let version = VersionRecord {
            version: 1,
            created_at: now,
            kek_id,
            wrapped,
            public_key: loaded.public_der.clone(),
            encryptions: 0,
        };
        Ok((record, version))
    }

    pub async fn create_key(
        &self,
        who: &Caller,
        name: &str,
        key_type: KeyType,
        policy: KeyPolicy,
    ) -> Result<KeyView, Error> {
        validate_name(name, "name")?;
        check_rotation_period(
            "config.rotation_period_seconds",
            policy.rotation_period_seconds,
        )?;
        let mut policy = policy;
        policy.allowed_services = validate_services(std::mem::take(&mut policy.allowed_services))?;
        if policy.min_decryption_version > 1 || policy.min_encryption_version > 1 {
            return Err(Error::invalid("config", "a new key has only version 1"));
        }
        let material =
            generate(key_type).map_err(|e| Error::internal("key generation failed", &e))?;
        let loaded = Loaded::load(key_type, &material)
            .map_err(|e| Error::internal("new key does not load", &e))?;
        let (record, version) = self.first_version(name, key_type, policy, &material, &loaded)?;
        self.store
            .insert(&record, std::slice::from_ref(&version))
            .await
            .map_err(store_err)?;
        let mut e = self.event(who, "sec.crypto.key.created", name);
        e.details.insert("key_type".into(), key_type.name().into());
        (self.emit)(e);
        tracing::info!(key = name, key_type = key_type.name(), "key created");
        Self::view(record, &[version])
    }

    /// EnsureServiceKey: the caller's own aes256-gcm key `svc.<identity>.<purpose>`,
    /// usable by it alone; created on the first call, returned as is afterwards. Confined
    /// to the caller's namespace, so a service cannot reach another's keys this way.
    pub async fn ensure_service_key(&self, who: &Caller, purpose: &str) -> Result<KeyView, Error> {
        self.ensure_service_key_of(who, purpose, KeyType::Aes256Gcm)
            .await
    }

    /// [`Engine::ensure_service_key`] for a key of type `key_type` (an audit trail's
    /// checkpoint-signing key, say). Backup-only wrapping types are refused: their private
    /// half is for RestoreKey, not for a service.
    pub async fn ensure_service_key_of(
        &self,
        who: &Caller,
        purpose: &str,
        key_type: KeyType,
    ) -> Result<KeyView, Error> {
        if matches!(
            key_type,
            KeyType::Rsa3072Wrapping | KeyType::Rsa4096Wrapping
        ) {
            return Err(Error::invalid(
                "type",
                "wrapping keys only receive backups; a service key cannot be one",
            ));
        }
        let Some(identity) = who.service_identity() else {
            return Err(Error::denied(
                "EnsureServiceKey is for services (their own namespace); the admin uses CreateKey",
            ));
        };
        if purpose.is_empty()
            || purpose.len() > 32
            || !purpose
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::invalid("purpose", "must match [a-z0-9-]{1,32}"));
        }
        let name = format!("svc.{identity}.{purpose}");
        validate_name(&name, "purpose")?;
        for _ in 0..2 {
            match self.get_key(&name).await {
                Ok(view) => {
                    let p = &view.record.policy;
                    if view.key_type != key_type || p.allowed_services != [identity] {
                        return Err(Error::precondition(
                            "a key of that name exists with another type or audience",
                        ));
                    }
                    return Ok(view);
                }
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(e),
            }
            let policy = KeyPolicy {
                allowed_services: vec![identity.to_owned()],
                ..KeyPolicy::default()
            };
            match self.create_key(who, &name, key_type, policy).await {
                Ok(view) => return Ok(view),
                // Two replicas asked at once: the other created it; read it back.
                Err(e) if e.code == ErrorCode::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorCode::Aborted,
            "service key changed concurrently; retry",
        ))
    }

    pub async fn get_key(&self, name: &str) -> Result<KeyView, Error> {
        validate_name(name, "name")?;
        let (record, versions) = self.get_verified(name).await?;
        Self::view(record, &versions)
    }

    /// Keys by name after `after`; the second value is the cursor for the next page.
    pub async fn list_keys(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<KeyView>, Option<String>), Error> {
        let limit = limit.clamp(1, 100);
        let mut records = self.store.list(after, limit + 2).await.map_err(store_err)?;
        // Internal keys ('.'-names, e.g. the installation signing key) are not listed.
        records.retain(|r| !r.name.starts_with('.'));
        let more = records.len() > limit as usize;
        let mut out = Vec::new();
        for r in records.into_iter().take(limit as usize) {
            // A key deleted between list and get simply drops out of the page.
            if let Some((record, versions)) = self.store.get(&r.name).await.map_err(store_err)? {
                // A tampered record is listed, flagged, with nothing from it an operator
                // could act on (public keys); the check also raises the event.
                let failed = self.check_record(&record).is_err();
                let mut view = match Self::view(record, &versions) {
                    Ok(v) => v,
                    Err(_) if failed => continue,
                    Err(e) => return Err(e),
                };
                if failed {
                    view.integrity_failed = true;
                    for v in &mut view.versions {
                        v.2 = None;
                    }
                }
                out.push(view);
            }
        }
        let next = if more {
            out.last().map(|k| k.record.name.clone())
        } else {
            None
        };
        Ok((out, next))
    }

    pub async fn rotate_key(&self, who: &Caller, name: &str) -> Result<KeyView, Error> {
        let view = self.get_key(name).await?;
        self.rotate_view(who, name, view, None).await
    }

    /// Adds a version to `view` (as just read), compare-and-set on its latest and policy
    /// version; `reason` names an automatic rotation in the event and the metrics.
    async fn rotate_view(
        &self,
        who: &Caller,
        name: &str,
        view: KeyView,
        reason: Option<&'static str>,
    ) -> Result<KeyView, Error> {
        let next = view.record.latest_version + 1;
        let material =
            generate(view.key_type).map_err(|e| Error::internal("key generation failed", &e))?;
        let loaded = Loaded::load(view.key_type, &material)
            .map_err(|e| Error::internal("new key does not load", &e))?;
        let (kek_id, wrapped) = self
            .kek
            .wrap(view.key_type.name(), name, next, &material)
            .map_err(|e| Error::internal("wrapping failed", &e))?;
        let now = micros(self.clock.now());
        let version = VersionRecord {
            version: next,
            created_at: now,
            kek_id,
            wrapped,
            public_key: loaded.public_der.clone(),
            encryptions: 0,
        };
        let after = KeyRecord {
            latest_version: next,
            last_rotated_at: now,
            updated_at: now,
            policy_version: view.record.policy_version + 1,
            ..view.record.clone()
        };
        let mac = self.mac_of(&after);
        self.store
            .add_version(
                name,
                view.record.latest_version,
                view.record.policy_version,
                &version,
                now,
                Some(&mac),
            )
            .await
            .map_err(store_err)?;
        self.invalidate(name);
        let mut e = self.event(who, "sec.crypto.key.rotated", name);
        e.details.insert("version".into(), next.to_string());
        if let Some(reason) = reason {
            e.details.insert("reason".into(), reason.into());
            self.metrics
                .auto_rotations
                .get_or_create(&RotationReason { reason })
                .inc();
        }
        (self.emit)(e);
        tracing::info!(key = name, version = next, reason, "key rotated");
        self.get_key(name).await
    }

    pub async fn update_policy(
        &self,
        who: &Caller,
        name: &str,
        u: PolicyUpdate,
    ) -> Result<KeyView, Error> {
        let view = self.get_key(name).await?;
        let expected = view.record.policy_version;
        if u.expected_policy_version.is_some_and(|v| v != expected) {
            return Err(policy_conflict());
        }
        let mut p = view.record.policy.clone();
        if let Some(v) = u.min_decryption_version {
            p.min_decryption_version = v;
        }
        if let Some(v) = u.min_encryption_version {
            p.min_encryption_version = v;
        }
        if let Some(v) = u.rotation_period_seconds {
            p.rotation_period_seconds = v;
        }
        if let Some(v) = u.deletion_allowed {
            p.deletion_allowed = v;
        }
        if let Some(v) = u.exportable {
            // One-way, as in Vault: once exportable, the material may already be in a
            // backup, so clearing the flag would only give false assurance.
            if p.exportable && !v {
                return Err(Error::precondition(
                    "exportable cannot be turned off once set: the key may already have been exported",
                )
                .with_field("exportable"));
            }
            p.exportable = v;
        }
        if let Some(v) = u.allowed_services {
            p.allowed_services = validate_services(v)?;
        }
        let latest = view.record.latest_version;
        if p.min_decryption_version > latest {
            return Err(Error::invalid(
                "min_decryption_version",
                format!("cannot exceed the latest version ({latest})"),
            ));
        }
        if p.min_encryption_version > latest {
            return Err(Error::invalid(
                "min_encryption_version",
                format!("cannot exceed the latest version ({latest})"),
            ));
        }
        if p.min_encryption_version != 0 && p.min_encryption_version < p.min_decryption_version {
            return Err(Error::invalid(
                "min_encryption_version",
                "must be 0 or at least min_decryption_version",
            ));
        }
        check_rotation_period("rotation_period_seconds", p.rotation_period_seconds)?;
        // Compare-and-set on the version read above: if anyone wrote the key since, this
        // write matches nothing and the caller retries on the new state, instead of
        // silently undoing the other change (e.g. a min_decryption_version raise).
        let after = KeyRecord {
            policy: p.clone(),
            policy_version: expected + 1,
            ..view.record.clone()
        };
        let mac = self.mac_of(&after);
        match self
            .store
            .update_policy(name, expected, &p, micros(self.clock.now()), Some(&mac))
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                self.invalidate(name);
                tracing::info!(key = name, "key policy update lost a race");
                return Err(policy_conflict());
            }
            Err(e) => return Err(store_err(e)),
        }
        self.invalidate(name);
        let mut e = self.event(who, "sec.crypto.key.config_updated", name);
        e.details.insert(
            "min_decryption_version".into(),
            p.min_decryption_version.to_string(),
        );
        e.details
            .insert("deletion_allowed".into(), p.deletion_allowed.to_string());
        e.details
            .insert("exportable".into(), p.exportable.to_string());
        e.details.insert(
            "rotation_period_seconds".into(),
            p.rotation_period_seconds.to_string(),
        );
        e.details
            .insert("allowed_services".into(), p.allowed_services.join(","));
        (self.emit)(e);
        self.get_key(name).await
    }

    pub async fn delete_key(&self, who: &Caller, name: &str) -> Result<(), Error> {
        validate_name(name, "name")?;
        // The store checks `deletion_allowed` in the statement (or transaction) that
        // deletes: a check here followed by a separate delete could remove a key that a
        // concurrent update had just protected.
        match self
            .store
            .delete_if_allowed(name)
            .await
            .map_err(store_err)?
        {
            DeleteOutcome::Deleted => {}
            DeleteOutcome::NotFound => return Err(Error::not_found("key not found")),
            DeleteOutcome::Protected => {
                let mut e = self.event(who, "sec.crypto.key.delete_refused", name);
                e.outcome = Outcome::Denied as i32;
                e.severity = Severity::Medium as i32;
                (self.emit)(e);
                return Err(Error::precondition(
                    "key is protected from deletion: set deletion_allowed first",
                ));
            }
        }
        self.invalidate(name);
        let mut e = self.event(who, "sec.crypto.key.deleted", name);
        e.severity = Severity::Medium as i32;
        (self.emit)(e);
        tracing::warn!(key = name, "key deleted");
        Ok(())
    }

    // ---- operations -----------------------------------------------------------------

    /// The key with its usable versions unwrapped, from the cache when fresh.
    async fn load(&self, name: &str) -> Result<Arc<CachedKey>, Error> {
        validate_name(name, "key_name")?;
        if let Some((at, k)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            && at.elapsed() < self.limits.cache_ttl
        {
            return Ok(Arc::clone(k));
        }
        let (record, versions) = self.get_verified(name).await?;
        let key_type = KeyType::parse(&record.key_type)
            .ok_or_else(|| Error::internal("unknown stored key type", &record.key_type))?;
        let mut loaded = BTreeMap::new();
        for v in versions
            .iter()
            .filter(|v| v.version >= record.policy.min_decryption_version)
        {
            let l = self.unwrap_version(&record, key_type, v)?;
            loaded.insert(v.version, Arc::new(l));
        }
        let k = Arc::new(CachedKey {
            record,
            key_type,
            versions: loaded,
        });
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), (Instant::now(), Arc::clone(&k)));
        Ok(k)
    }

    /// Per-key service access: a service caller (mTLS identity, or `internal` for the
    /// in-process credential) may use key `name` only if the key's `allowed_services` is
    /// empty or lists it; otherwise `PERMISSION_DENIED`, without naming who may. The
    /// admin may use every key: it can change the list anyway, so refusing it would only
    /// look like protection. Every cryptographic RPC calls this before the operation.
    pub async fn authorize(&self, who: &Caller, name: &str) -> Result<(), Error> {
        let id = match who {
            Caller::Admin => return Ok(()),
            Caller::Service(id) => id,
            Caller::Anonymous => {
                return Err(Error::new(ErrorCode::Unauthenticated, "unauthenticated"));
            }
        };
        let k = self.load(name).await?;
        let allowed = &k.record.policy.allowed_services;
        if allowed.is_empty() || allowed.iter().any(|a| a == id) {
            return Ok(());
        }
        tracing::warn!(
            key = name,
            service = id.as_str(),
            "service not allowed to use key"
        );
        Err(Error::denied("this service may not use this key"))
    }

    fn require(k: &CachedKey, op: Op) -> Result<(), Error> {
        if k.key_type.supports(op) {
            Ok(())
        } else {
            Err(Error::precondition(format!(
                "key type {} does not support {}",
                k.key_type.name(),
                op.as_str()
            )))
        }
    }

    /// The key and the version a new ciphertext uses, with one use of that version
    /// taken. For random-nonce AEADs each version may encrypt at most
    /// `max_encryptions_per_version` times: when the latest is spent, this rotates the
    /// key (compare-and-set; a racing replica's rotation simply wins and is reloaded)
    /// and uses the new version. AES-GCM-SIV does not count: its nonce is synthetic
    /// (derived from the AAD and plaintext), so only equal inputs repeat a nonce, which
    /// reveals only the equality it already reveals by design; RSA-OAEP has no nonce.
    async fn for_encryption(&self, name: &str, op: Op) -> Result<(Arc<CachedKey>, u32), Error> {
        for _ in 0..32 {
            let k = self.load(name).await?;
            Self::require(&k, op)?;
            let v = k.record.latest_version;
            if !matches!(k.key_type, KeyType::Aes256Gcm | KeyType::Chacha20Poly1305)
                || self.take_use(name, v).await?
            {
                return Ok((k, v));
            }
            // Version `v` is spent: rotate it, unless someone already has.
            self.invalidate(name);
            let view = self.get_key(name).await?;
            if view.record.latest_version == v {
                match self
                    .rotate_view(
                        &Caller::Service("crypto-svc".into()),
                        name,
                        view,
                        Some("encryption_bound"),
                    )
                    .await
                {
                    Ok(_) => {}
                    // Lost to a concurrent rotation or policy update: reload and retry.
                    Err(e) if e.code == ErrorCode::Aborted => self.invalidate(name),
                    Err(e) => return Err(e),
                }
            }
        }
        Err(Error::new(
            ErrorCode::Aborted,
            "the key is being rotated concurrently; retry",
        ))
    }

    /// Takes one encryption use of `version`, reserving a block in the store first when
    /// none is left here. False when the version has reached the bound.
    async fn take_use(&self, name: &str, version: u32) -> Result<bool, Error> {
        let key = (name.to_owned(), version);
        let bound = self.limits.max_encryptions_per_version;
        if let Some(i) = Self::pop_use(
            &mut self.reserved.lock().unwrap_or_else(PoisonError::into_inner),
            &key,
        ) {
            return Ok(i < bound);
        }
        let n = self.limits.encryption_reservation.clamp(1, bound.max(1));
        let total = self
            .store
            .reserve_encryptions(name, version, n)
            .await
            .map_err(store_err)?;
        let start = total.saturating_sub(n);
        if start >= bound {
            return Ok(false);
        }
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        // Drop spent versions of this key (rotated away) so the map stays bounded.
        reserved.retain(|(k, v), r| k != name || *v >= version || !r.is_empty());
        let ranges = reserved.entry(key.clone()).or_default();
        ranges.push(start..total.min(bound));
        Ok(Self::pop_use(&mut reserved, &key).is_some_and(|i| i < bound))
    }

    fn pop_use(reserved: &mut Reserved, key: &(String, u32)) -> Option<u64> {
        let ranges = reserved.get_mut(key)?;
        while let Some(r) = ranges.last_mut() {
            if let Some(i) = r.next() {
                return Some(i);
            }
            ranges.pop();
        }
        None
    }

    fn latest(k: &CachedKey) -> Result<(u32, &Arc<Loaded>), Error> {
        let v = k.record.latest_version;
        k.versions
            .get(&v)
            .map(|l| (v, l))
            .ok_or_else(|| Error::internal("latest version not loaded", &v))
    }

    /// The version a ciphertext/signature names, if policy allows it.
    fn version<'a>(k: &'a CachedKey, v: u32, field: &str) -> Result<&'a Arc<Loaded>, Error> {
        if v < k.record.policy.min_decryption_version {
            return Err(Error::precondition(format!(
                "version {v} is below the key's min_decryption_version ({})",
                k.record.policy.min_decryption_version
            ))
            .with_field(field));
        }
        k.versions
            .get(&v)
            .ok_or_else(|| Error::invalid(field, "no such key version"))
    }

    /// Runs an operation on key `name` and records its outcome and duration. An invalid
    /// name is refused here, before the operation touches the store.
    async fn metered<T>(
        &self,
        name: &str,
        op: Op,
        f: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let r = match validate_name(name, "key_name") {
            Ok(()) => f.await,
            Err(e) => Err(e),
        };
        self.record(name, op, started, &r);
        r
    }

    /// `name` if that key has loaded here (it exists, so the label set is bounded by the
    /// keys), else [`UNKNOWN_KEY`].
    fn key_label(&self, name: &str) -> String {
        let known = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name);
        if known { name } else { UNKNOWN_KEY }.to_owned()
    }

    fn record(&self, name: &str, op: Op, started: Instant, r: &Result<impl Sized, Error>) {
        let outcome = match r {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        self.metrics
            .ops
            .get_or_create(&OpLabels {
                key: self.key_label(name),
                operation: op.as_str(),
                outcome,
            })
            .inc();
        self.metrics
            .seconds
            .get_or_create(&OpName {
                operation: op.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    fn op_error(e: OpError, field: &str) -> Error {
        match e {
            OpError::Authentication => Error::invalid(field, e.to_string()),
            OpError::TooLarge { .. } => Error::invalid(field, e.to_string()),
            OpError::Failed => Error::internal("cryptographic operation failed", &e),
        }
    }

    pub async fn encrypt(
        &self,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(String, u32), Error> {
        self.metered(name, Op::Encrypt, async {
            self.check_payload("plaintext", plaintext.len())?;
            self.check_payload("associated_data", aad.len())?;
            check_aad(aad)?;
            let (k, v) = self.for_encryption(name, Op::Encrypt).await?;
            let l = Self::version(&k, v, "key_name")?;
            let body = l
                .encrypt(plaintext, aad)
                .map_err(|e| Self::op_error(e, "plaintext"))?;
            Ok((wire::format(v, &body), v))
        })
        .await
    }

    pub async fn decrypt(
        &self,
        who: &Caller,
        name: &str,
        ciphertext: &str,
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, u32), Error> {
        self.metered(name, Op::Decrypt, async {
            // Bounded before anything is decoded or looked up: no type's ciphertext of a
            // plaintext at the limit is longer. The limit itself applies to the decoded
            // size, per key type, in `open`.
            let max = self.limits.max_payload_bytes;
            if ciphertext.trim().len() > wire::max_text_len(max_any_ciphertext_body(max)) {
                return Err(too_large("ciphertext", max));
            }
            self.check_payload("associated_data", aad.len())?;
            let k = self.load(name).await?;
            let r = Self::open(&k, ciphertext, aad, max);
            // Only failures against a key that exists are events, so the aggregator's
            // keys are real key names (and capped on top of that).
            if let Err(e) = &r
                && matches!(
                    e.code,
                    ErrorCode::InvalidArgument | ErrorCode::FailedPrecondition
                )
            {
                self.decrypt_failures
                    .record(name, e.code.as_str(), who.clone());
            }
            r
        })
        .await
    }

    fn open(
        k: &CachedKey,
        ciphertext: &str,
        aad: &[u8],
        max_plaintext: usize,
    ) -> Result<(Zeroizing<Vec<u8>>, u32), Error> {
        Self::require(k, Op::Decrypt)?;
        check_aad(aad)?;
        let max_body = k.key_type.max_ciphertext_body(max_plaintext);
        if ciphertext.trim().len() > wire::max_text_len(max_body) {
            return Err(too_large("ciphertext", max_plaintext));
        }
        let (v, body) = wire::parse(ciphertext).ok_or_else(|| {
            Error::invalid(
                "ciphertext",
                "ciphertext is not of the form sec:v<version>:<base64>",
            )
        })?;
        if body.len() > max_body {
            return Err(too_large("ciphertext", max_plaintext));
        }
        let l = Self::version(k, v, "ciphertext")?;
        let pt = l
            .decrypt(&body, aad)
            .map_err(|e| Self::op_error(e, "ciphertext"))?;
        Ok((pt, v))
    }

    pub async fn rewrap(
        &self,
        who: &Caller,
        name: &str,
        ciphertext: &str,
        aad: &[u8],
    ) -> Result<(String, u32), Error> {
        self.metered(name, Op::Rewrap, async {
            let (pt, _) = self.decrypt(who, name, ciphertext, aad).await?;
            let (k, v) = self.for_encryption(name, Op::Rewrap).await?;
            let l = Self::version(&k, v, "key_name")?;
            let body = l
                .encrypt(&pt, aad)
                .map_err(|e| Self::op_error(e, "ciphertext"))?;
            Ok((wire::format(v, &body), v))
        })
        .await
    }

    /// A fresh random data key and its encryption under `name`.
    pub async fn generate_data_key(
        &self,
        name: &str,
        bytes: u32,
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, String, u32), Error> {
        self.metered(name, Op::DataKey, async {
            let n = match bytes {
                0 => 32,
                n @ 16..=64 => n as usize,
                _ => return Err(Error::invalid("bytes", "data keys are 16 to 64 bytes")),
            };
            check_aad(aad)?;
            let (k, v) = self.for_encryption(name, Op::DataKey).await?;
            let mut dk = Zeroizing::new(vec![0_u8; n]);
            aws_lc_rs::rand::fill(&mut dk)
                .map_err(|_| Error::internal("random generator failed", &"fill"))?;
            let l = Self::version(&k, v, "key_name")?;
            let body = l
                .encrypt(&dk, aad)
                .map_err(|e| Self::op_error(e, "bytes"))?;
            Ok((dk, wire::format(v, &body), v))
        })
        .await
    }

    pub async fn sign(&self, name: &str, message: &[u8]) -> Result<(String, u32), Error> {
        self.metered(name, Op::Sign, async {
            self.check_payload("message", message.len())?;
            let k = self.load(name).await?;
            Self::require(&k, Op::Sign)?;
            let (v, l) = Self::latest(&k)?;
            let sig = l.sign(message).map_err(|e| Self::op_error(e, "message"))?;
            Ok((wire::format(v, &sig), v))
        })
        .await
    }

    /// Ok(false) for a signature that does not verify; errors for malformed input.
    pub async fn verify(&self, name: &str, message: &[u8], signature: &str) -> Result<bool, Error> {
        self.metered(name, Op::Verify, async {
            self.check_payload("message", message.len())?;
            let k = self.load(name).await?;
            Self::require(&k, Op::Verify)?;
            let (v, sig) = wire::parse(signature).ok_or_else(|| {
                Error::invalid(
                    "signature",
                    "signature is not of the form sec:v<version>:<base64>",
                )
            })?;
            let l = Self::version(&k, v, "signature")?;
            Ok(l.verify(message, &sig))
        })
        .await
    }

    pub async fn hmac(&self, name: &str, message: &[u8]) -> Result<(String, u32), Error> {
        self.metered(name, Op::Hmac, async {
            self.check_payload("message", message.len())?;
            let k = self.load(name).await?;
            Self::require(&k, Op::Hmac)?;
            let (v, l) = Self::latest(&k)?;
            let tag = l.hmac(message).map_err(|e| Self::op_error(e, "message"))?;
            Ok((wire::format(v, &tag), v))
        })
        .await
    }

    /// HMACs of `messages` under `version` (0: the latest), in order. The caller checks
    /// the item count ([`Self::check_batch`]); the total size is checked here.
    pub async fn batch_hmac(
        &self,
        name: &str,
        version: u32,
        messages: &[Vec<u8>],
    ) -> Result<(Vec<String>, u32), Error> {
        self.metered(name, Op::Hmac, async {
            self.check_batch(messages.len())?;
            let total = messages.iter().map(Vec::len).sum();
            self.check_payload("messages", total)?;
            let k = self.load(name).await?;
            Self::require(&k, Op::Hmac)?;
            let (v, l) = if version == 0 {
                Self::latest(&k)?
            } else {
                (version, Self::version(&k, version, "key_version")?)
            };
            let tags = messages
                .iter()
                .map(|m| {
                    l.hmac(m)
                        .map(|tag| wire::format(v, &tag))
                        .map_err(|e| Self::op_error(e, "messages"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((tags, v))
        })
        .await
    }

    pub async fn verify_hmac(&self, name: &str, message: &[u8], tag: &str) -> Result<bool, Error> {
        self.metered(name, Op::Hmac, async {
            self.check_payload("message", message.len())?;
            let k = self.load(name).await?;
            Self::require(&k, Op::Hmac)?;
            let (v, t) = wire::parse(tag).ok_or_else(|| {
                Error::invalid("hmac", "hmac is not of the form sec:v<version>:<base64>")
            })?;
            let l = Self::version(&k, v, "hmac")?;
            Ok(l.verify_hmac(message, &t))
        })
        .await
    }

    /// PEM public key of `version` (0: latest).
    pub async fn public_key(
        &self,
        name: &str,
        version: u32,
    ) -> Result<(String, u32, KeyType), Error> {
        let view = self.get_key(name).await?;
        if !view.key_type.is_asymmetric() {
            return Err(Error::precondition(format!(
                "key type {} has no public key",
                view.key_type.name()
            )));
        }
        let v = if version == 0 {
            view.record.latest_version
        } else {
            version
        };
        // Derived from the private key (and checked against the stored column), never
        // taken from the column alone: a replaced public key would redirect backups.
        let (record, versions) = self.get_verified(name).await?;
        let stored = versions
            .iter()
            .find(|r| r.version == v)
            .ok_or_else(|| Error::not_found("no such key version").with_field("version"))?;
        let der = self
            .unwrap_version(&record, view.key_type, stored)?
            .public_der
            .ok_or_else(|| Error::internal("asymmetric key without a public key", &v))?;
        Ok((crate::material::public_pem(&der), v, view.key_type))
    }

    // ---- rotation -------------------------------------------------------------------

    /// Rotates every key whose rotation period has elapsed at `now`; returns their names.
    ///
    /// A complete pass also sets `sec_crypto_keys_rotation_overdue`: the keys it found due
    /// for longer than one check interval (`Limits::rotation_check`) and could not rotate
    /// (a rotation that fails every pass; a key rotated by another replica meanwhile is
    /// not counted). A pass that fails to list the keys leaves the gauge as it was.
    pub async fn rotate_due(&self, now: DateTime<Utc>) -> Result<Vec<String>, Error> {
        let grace = chrono::TimeDelta::from_std(self.limits.rotation_check)
            .unwrap_or(chrono::TimeDelta::MAX);
        let mut rotated = Vec::new();
        let mut overdue = 0_i64;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list(after.as_deref(), 200)
                .await
                .map_err(store_err)?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for r in &page {
                let period = r.policy.rotation_period_seconds;
                if period == 0 {
                    continue;
                }
                let Some(due) = next_rotation(r.last_rotated_at, period) else {
                    tracing::warn!(key = %r.name, "rotation period beyond representable time; never due");
                    continue;
                };
                if now >= due {
                    let rotation = async {
                        let view = self.get_key(&r.name).await?;
                        self.rotate_view(
                            &Caller::Service("crypto-svc".into()),
                            &r.name,
                            view,
                            Some("period"),
                        )
                        .await
                    };
                    match rotation.await {
                        Ok(_) => rotated.push(r.name.clone()),
                        // Another replica rotated (or deleted) it first: nothing to do.
                        Err(e) if matches!(e.code, ErrorCode::Aborted | ErrorCode::NotFound) => {}
                        Err(e) => {
                            tracing::warn!(key = %r.name, error = %e, "automatic rotation failed");
                            if due.checked_add_signed(grace).is_none_or(|late| now > late) {
                                overdue += 1;
                            }
                        }
                    }
                }
            }
            if page.len() < 200 {
                break;
            }
        }
        self.metrics.rotation_overdue.set(overdue);
        Ok(rotated)
    }

    // ---- backup, restore, KEK rotation -----------------------------------------------

    /// The installation signing key (created on first use), which signs every backup so
    /// a target can tell where a backup comes from. Stored like any key, wrapped by the
    /// KEK, under the reserved name [`INSTALLATION_KEY`] that no caller can pass.
    async fn installation_key(&self) -> Result<Loaded, Error> {
        for _ in 0..2 {
            if let Some((record, versions)) =
                self.store.get(INSTALLATION_KEY).await.map_err(store_err)?
            {
                self.check_record(&record)?;
                let v = versions
                    .iter()
                    .find(|v| v.version == record.latest_version)
                    .ok_or_else(|| Error::internal("installation key has no version", &"latest"))?;
                let m = self
                    .kek
                    .unwrap(
                        &v.kek_id,
                        KeyType::Ed25519.name(),
                        INSTALLATION_KEY,
                        v.version,
                        &v.wrapped,
                    )
                    .map_err(|e| Error::internal("unwrapping the installation key failed", &e))?;
                return Loaded::load(KeyType::Ed25519, &m)
                    .map_err(|e| Error::internal("installation key does not load", &e));
            }
            let material = generate(KeyType::Ed25519)
                .map_err(|e| Error::internal("key generation failed", &e))?;
            let loaded = Loaded::load(KeyType::Ed25519, &material)
                .map_err(|e| Error::internal("new key does not load", &e))?;
            let (record, version) = self.first_version(
                INSTALLATION_KEY,
                KeyType::Ed25519,
                KeyPolicy::default(),
                &material,
                &loaded,
            )?;
            match self.store.insert(&record, &[version]).await {
                Ok(()) => {
                    tracing::info!("installation signing key created");
                    return Ok(loaded);
                }
                // Another replica created it first: use theirs.
                Err(StoreError::AlreadyExists) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(Error::unavailable(
            "installation key unavailable",
            &"created concurrently and not readable",
        ))
    }

    /// This installation's backup-signing public key: (PEM, SHA-256 fingerprint of its
    /// DER in hex). Targets pin it to accept this installation's backups.
    pub async fn installation_public_key(&self) -> Result<(String, String), Error> {
        let k = self.installation_key().await?;
        let der = k
            .public_der
            .as_deref()
            .ok_or_else(|| Error::internal("installation key has no public key", &"ed25519"))?;
        Ok((crate::material::public_pem(der), fingerprint(der)))
    }

    /// The key with all versions, encrypted to an RSA public key (3072+ bits) and signed
    /// by this installation's signing key.
    pub async fn backup_key(
        &self,
        who: &Caller,
        name: &str,
        wrapping_pem: &str,
    ) -> Result<String, Error> {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
        use aws_lc_rs::rsa::{
            OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey,
        };
        validate_name(name, "name")?;
        let der = crate::material::pem_to_der(wrapping_pem)
            .ok_or_else(|| Error::invalid("wrapping_public_key_pem", "not a PEM public key"))?;
        let public = PublicEncryptingKey::from_der(&der)
            .map_err(|_| Error::invalid("wrapping_public_key_pem", "not an RSA public key"))?;
        if public.key_size_bits() < 3072 {
            return Err(Error::invalid(
                "wrapping_public_key_pem",
                "wrapping key must be RSA with at least 3072 bits",
            ));
        }
        let oaep = OaepPublicEncryptingKey::new(public)
            .map_err(|_| Error::invalid("wrapping_public_key_pem", "unusable RSA key"))?;
        let (record, versions) = self.get_verified(name).await?;
        if !record.policy.exportable {
            return Err(Error::precondition(
                "key is not exportable: set exportable first",
            ));
        }
        let signer = self.installation_key().await?;
        let mut doc = BackupDoc {
            format: BACKUP_FORMAT.into(),
            name: record.name.clone(),
            key_type: record.key_type.clone(),
            latest_version: record.latest_version,
            min_decryption_version: record.policy.min_decryption_version,
            min_encryption_version: record.policy.min_encryption_version,
            rotation_period_seconds: record.policy.rotation_period_seconds,
            deletion_allowed: record.policy.deletion_allowed,
            exportable: record.policy.exportable,
            allowed_services: record.policy.allowed_services.clone(),
            created_at: record.created_at,
            last_rotated_at: record.last_rotated_at,
            versions: Vec::new(),
        };
        for v in &versions {
            let m = self
                .kek
                .unwrap(&v.kek_id, &record.key_type, name, v.version, &v.wrapped)
                .map_err(|e| Error::internal("unwrapping key material failed", &e))?;
            doc.versions.push(BackupVersion {
                version: v.version,
                created_at: v.created_at,
                material: base64::engine::general_purpose::STANDARD.encode(m.as_slice()),
            });
        }
        let json = Zeroizing::new(
            serde_json::to_vec(&doc).map_err(|e| Error::internal("backup encoding failed", &e))?,
        );
        for v in &mut doc.versions {
            zeroize::Zeroize::zeroize(&mut v.material);
        }
        let mut cek = Zeroizing::new([0_u8; 32]);
        let mut nonce = [0_u8; NONCE_LEN];
        aws_lc_rs::rand::fill(cek.as_mut())
            .map_err(|_| Error::internal("random generator failed", &"fill"))?;
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| Error::internal("random generator failed", &"fill"))?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, cek.as_ref())
                .map_err(|_| Error::internal("cek", &"aes"))?,
        );
        let mut body = json.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(BACKUP_AAD),
            &mut body,
        )
        .map_err(|_| Error::internal("backup encryption failed", &"seal"))?;
        let mut wrapped_cek = vec![0_u8; oaep.ciphertext_size()];
        let n = oaep
            .encrypt(
                &OAEP_SHA256_MGF1SHA256,
                cek.as_ref(),
                &mut wrapped_cek,
                Some(BACKUP_AAD),
            )
            .map_err(|_| Error::internal("backup key wrapping failed", &"oaep"))?
            .len();
        wrapped_cek.truncate(n);
        let mut signed = Vec::with_capacity(2 + n + NONCE_LEN + body.len());
        signed.extend_from_slice(
            &u16::try_from(n)
                .map_err(|_| Error::internal("wrapped key too long", &n))?
                .to_be_bytes(),
        );
        signed.extend_from_slice(&wrapped_cek);
        signed.extend_from_slice(&nonce);
        signed.extend_from_slice(&body);
        let sig = signer
            .sign(&signature_input(&signed))
            .map_err(|e| Error::internal("backup signing failed", &e))?;
        let mut blob = Vec::with_capacity(sig.len() + signed.len());
        blob.extend_from_slice(&sig);
        blob.extend_from_slice(&signed);
        let mut e = self.event(who, "sec.crypto.key.backed_up", name);
        e.severity = Severity::Medium as i32;
        e.details
            .insert("versions".into(), versions.len().to_string());
        (self.emit)(e);
        Ok(format!(
            "{BACKUP_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        ))
    }

    /// Restores a backup made for `wrapping_key` (an `rsa-*-wrapping` key here) by the
    /// installation whose signing public key is `source_pem`. The signature is checked
    /// against the pin before anything is unwrapped; every field is then validated
    /// before anything is written, so a backup encrypted to our public wrapping key by
    /// anyone else, or a signed one with impossible contents, restores nothing.
    pub async fn restore_key(
        &self,
        who: &Caller,
        backup: &str,
        wrapping_key: &str,
        new_name: Option<&str>,
        source_pem: &str,
    ) -> Result<KeyView, Error> {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
        let bad = || {
            Error::invalid(
                "backup",
                "backup is malformed, tampered with, or not made for this wrapping key",
            )
        };
        validate_name(wrapping_key, "wrapping_key_name")?;
        if let Some(n) = new_name {
            validate_name(n, "new_name")?;
        }
        let backup = backup.trim();
        if backup.starts_with(BACKUP_PREFIX_V1) {
            return Err(Error::invalid(
                "backup",
                "unsigned v1 backups are no longer accepted: make a new backup on the source",
            ));
        }
        // 1. Proof of origin, before anything else is looked at.
        let pin = pinned_ed25519(source_pem)?;
        let raw = backup
            .strip_prefix(BACKUP_PREFIX)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or_else(bad)?;
        if raw.len() < SIGNATURE_LEN + 2 {
            return Err(bad());
        }
        let (sig, signed) = raw.split_at(SIGNATURE_LEN);
        let raw_pin = &pin[ED25519_SPKI_PREFIX.len()..];
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, raw_pin)
            .verify(&signature_input(signed), sig)
            .map_err(|_| {
                Error::invalid(
                    "backup",
                    "backup signature does not verify against the pinned source key",
                )
            })?;
        // 2. Unwrap with our wrapping key.
        let n = usize::from(u16::from_be_bytes([signed[0], signed[1]]));
        if signed.len() < 2 + n + NONCE_LEN + 16 {
            return Err(bad());
        }
        let (wrapped_cek, rest) = signed[2..].split_at(n);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let k = self.load(wrapping_key).await?;
        // Only a key made for this: a general RSA key's OAEP is reachable through
        // Decrypt, a wrapping key's only here.
        if !k.key_type.is_wrapping() {
            return Err(Error::precondition(
                "the wrapping key must be of type rsa-3072-wrapping or rsa-4096-wrapping",
            )
            .with_field("wrapping_key_name"));
        }
        // The backup names no version: try each usable version of the wrapping key.
        let cek = k
            .versions
            .values()
            .rev()
            .find_map(|l| l.decrypt(wrapped_cek, BACKUP_AAD).ok())
            .ok_or_else(bad)?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek).map_err(|_| bad())?);
        let mut buf = Zeroizing::new(body.to_vec());
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let len = key
            .open_in_place(nonce, Aad::from(BACKUP_AAD), &mut buf)
            .map_err(|_| bad())?
            .len();
        buf.truncate(len);
        let mut doc: BackupDoc = serde_json::from_slice(&buf).map_err(|_| bad())?;
        // 3. Every field, before anything is written.
        let key_type = validate_backup(&doc)?;
        let name = new_name.unwrap_or(&doc.name).to_owned();
        let mut versions = Vec::new();
        for v in &mut doc.versions {
            let material = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(&v.material)
                    .map_err(|_| bad())?,
            );
            zeroize::Zeroize::zeroize(&mut v.material);
            check_material(key_type, &material)?;
            let loaded = Loaded::load(key_type, &material).map_err(|_| {
                Error::invalid("backup", "key material does not match its key type")
            })?;
            let (kek_id, wrapped) = self
                .kek
                .wrap(key_type.name(), &name, v.version, &material)
                .map_err(|e| Error::internal("wrapping failed", &e))?;
            versions.push(VersionRecord {
                version: v.version,
                created_at: v.created_at,
                kek_id,
                wrapped,
                public_key: loaded.public_der.clone(),
                encryptions: 0,
            });
        }
        versions.sort_by_key(|v| v.version);
        let now = micros(self.clock.now());
        let mut record = KeyRecord {
            name: name.clone(),
            key_type: key_type.name().into(),
            latest_version: doc.latest_version,
            policy: KeyPolicy {
                min_decryption_version: doc.min_decryption_version,
                min_encryption_version: doc.min_encryption_version,
                rotation_period_seconds: doc.rotation_period_seconds,
                deletion_allowed: doc.deletion_allowed,
                exportable: doc.exportable,
                allowed_services: validate_services(std::mem::take(&mut doc.allowed_services))
                    .map_err(|_| Error::invalid("backup", "allowed_services is invalid"))?,
            },
            created_at: micros(doc.created_at),
            updated_at: now,
            last_rotated_at: micros(doc.last_rotated_at),
            policy_version: 1,
            record_mac: None,
        };
        record.record_mac = Some(self.mac_of(&record));
        self.store
            .insert(&record, &versions)
            .await
            .map_err(store_err)?;
        let mut e = self.event(who, "sec.crypto.key.restored", &name);
        e.severity = Severity::Medium as i32;
        e.details
            .insert("versions".into(), versions.len().to_string());
        e.details
            .insert("source_key_fingerprint".into(), fingerprint(&pin));
        (self.emit)(e);
        Self::view(record, &versions)
    }

    /// Re-wraps every version not under the current KEK or not in the current wrapping
    /// format (v1 material gets its key type bound), then re-MACs every key record MACed
    /// by a previous KEK. Returns (re-wrapped, already current).
    pub async fn rotate_kek(&self, who: &Caller) -> Result<(u64, u64), Error> {
        let current = self.kek.current_id().to_owned();
        let mut rewrapped = 0_u64;
        let mut records: HashMap<String, Option<KeyRecord>> = HashMap::new();
        loop {
            let batch = self
                .store
                .versions_not_wrapped_by(&current, crate::kek::WRAP_V2_PREFIX, 100)
                .await
                .map_err(store_err)?;
            if batch.is_empty() {
                break;
            }
            let mut progressed = false;
            for (name, v) in batch {
                if !records.contains_key(&name) {
                    let Some((record, _)) = self.store.get(&name).await.map_err(store_err)? else {
                        continue; // deleted meanwhile
                    };
                    // Never re-wrap (and so launder) material of a tampered record; it
                    // stays refused, and does not hold up the other keys.
                    let ok = self.check_record(&record).is_ok();
                    records.insert(name.clone(), ok.then_some(record));
                }
                let Some(Some(record)) = records.get(&name) else {
                    continue;
                };
                let m = match self.kek.unwrap(
                    &v.kek_id,
                    &record.key_type,
                    &name,
                    v.version,
                    &v.wrapped,
                ) {
                    Ok(m) => m,
                    // Material that is not this key's (swapped or damaged) stays refused;
                    // it must not hold up the re-wrapping of every other key.
                    Err(KekError::Corrupt) => {
                        tracing::error!(key = %name, version = v.version, "key material failed its integrity check; not re-wrapped");
                        continue;
                    }
                    Err(e) => {
                        return Err(Error::precondition(format!(
                            "cannot re-wrap {name} v{}: {e}",
                            v.version
                        )));
                    }
                };
                let (id, wrapped) = self
                    .kek
                    .wrap(&record.key_type, &name, v.version, &m)
                    .map_err(|e| Error::internal("wrapping failed", &e))?;
                if self
                    .store
                    .rewrap_version(&name, v.version, &v.kek_id, &id, &wrapped)
                    .await
                    .map_err(store_err)?
                {
                    rewrapped += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        let remaced = self.remac_previous().await?;
        let usage = self.store.kek_usage().await.map_err(store_err)?;
        let current_count = usage
            .iter()
            .find(|(id, _)| *id == current)
            .map_or(0, |(_, n)| *n);
        let mut e = self.event(who, "sec.crypto.kek.rotated", &current);
        e.severity = Severity::Medium as i32;
        e.details.insert("rewrapped".into(), rewrapped.to_string());
        e.details.insert("remaced".into(), remaced.to_string());
        (self.emit)(e);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok((rewrapped, current_count.saturating_sub(rewrapped)))
    }

    /// Re-MACs under the current KEK every record whose MAC verifies only under a
    /// previous KEK (a record that fails its check is left as it is, refused).
    async fn remac_previous(&self) -> Result<u64, Error> {
        let mut done = 0_u64;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list(after.as_deref(), 200)
                .await
                .map_err(store_err)?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for r in &page {
                let Some(mac) = r.record_mac.as_deref() else {
                    continue;
                };
                if self.kek.check_record_mac(mac, &Self::record_input(r)) == MacCheck::Previous
                    && self
                        .store
                        .set_mac(&r.name, r.policy_version, &self.mac_of(r))
                        .await
                        .map_err(store_err)?
                {
                    done += 1;
                }
            }
            if page.len() < 200 {
                break;
            }
        }
        Ok(done)
    }

    pub fn kek_id(&self) -> &str {
        self.kek.current_id()
    }
}
