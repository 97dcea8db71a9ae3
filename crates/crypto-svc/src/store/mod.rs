//! Where keys live: one trait, a PostgreSQL and a SQLite implementation, and one
//! contract suite ([`contract::run`]) both must pass. The store only ever sees key
//! material wrapped by the KEK; it never holds plaintext keys.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("key already exists")]
    AlreadyExists,
    #[error("key not found")]
    NotFound,
    /// An optimistic update lost a race (the key changed since it was read).
    #[error("key was changed concurrently")]
    Conflict,
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// Per-key policy, stored as is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPolicy {
    pub min_decryption_version: u32,
    pub min_encryption_version: u32,
    /// 0: no automatic rotation.
    pub rotation_period_seconds: u64,
    pub deletion_allowed: bool,
    pub exportable: bool,
    /// Service identities (mTLS identity, or `internal` for the in-process credential)
    /// that may use the key; empty: any trusted service. Sorted, without duplicates.
    pub allowed_services: Vec<String>,
}

/// A named key (without its versions). `key_type` is the canonical type name
/// (`aes256-gcm`, …), opaque to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub name: String,
    pub key_type: String,
    pub latest_version: u32,
    pub policy: KeyPolicy,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_rotated_at: DateTime<Utc>,
    /// Incremented by every write to the key row (policy update, rotation): writers
    /// compare-and-set on it, so concurrent updates cannot silently overwrite each other.
    pub policy_version: u64,
    /// Integrity tag over the fields that decide what the key may do,
    /// `<kek id>:<base64 tag>`, written by the engine; `None` on rows older than it.
    pub record_mac: Option<String>,
}

/// What [`KeyStore::delete_if_allowed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The key exists but `deletion_allowed` is false at the moment of deletion.
    Protected,
}

/// One version of a key: its material wrapped by the KEK identified by `kek_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub version: u32,
    pub created_at: DateTime<Utc>,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
    /// DER SubjectPublicKeyInfo, for asymmetric keys.
    pub public_key: Option<Vec<u8>>,
    /// Encryptions reserved under this version (random-nonce AEADs): only grows, and
    /// is reserved before use, so it can over-count (a crash) but never under-count.
    pub encryptions: u64,
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Inserts a key with its versions (creation: one version; restore: several) in
    /// one transaction. `AlreadyExists` if the name is taken.
    async fn insert(&self, key: &KeyRecord, versions: &[VersionRecord]) -> Result<(), StoreError>;
    /// The key and all its versions (ascending), or `None`.
    async fn get(&self, name: &str) -> Result<Option<(KeyRecord, Vec<VersionRecord>)>, StoreError>;
    /// Keys ordered by name, strictly after `after`, at most `limit`.
    async fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError>;
    /// Adds `version.version` (which must be `expected_latest + 1`), sets
    /// `latest_version`, `updated_at` and `last_rotated_at` to `now`, `record_mac` to
    /// `mac` and increments `policy_version`, only if the stored latest version is still
    /// `expected_latest` and the policy version still `expected_policy_version`
    /// (`Conflict` otherwise, `NotFound` if gone).
    async fn add_version(
        &self,
        name: &str,
        expected_latest: u32,
        expected_policy_version: u64,
        version: &VersionRecord,
        now: DateTime<Utc>,
        mac: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Replaces the policy, sets `updated_at` and `record_mac` and increments
    /// `policy_version`, only if it is still `expected_policy_version` (compare-and-set:
    /// `Conflict` otherwise, `NotFound` if the key does not exist).
    async fn update_policy(
        &self,
        name: &str,
        expected_policy_version: u64,
        policy: &KeyPolicy,
        now: DateTime<Utc>,
        mac: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Replaces `record_mac` without changing anything else (backfill, KEK rotation),
    /// only if `policy_version` is still `policy_version`; false otherwise.
    async fn set_mac(&self, name: &str, policy_version: u64, mac: &str)
    -> Result<bool, StoreError>;
    /// Deletes the key and its versions unconditionally; true if it existed.
    async fn delete(&self, name: &str) -> Result<bool, StoreError>;
    /// Deletes the key and its versions only if `deletion_allowed` is set, checked in the
    /// same statement or transaction that deletes, so a concurrent update that protects
    /// the key either lands first (and the key stays) or after (on a deleted key).
    async fn delete_if_allowed(&self, name: &str) -> Result<DeleteOutcome, StoreError>;
    /// Up to `limit` (key name, version) pairs whose material is NOT wrapped by `kek_id`,
    /// or whose wrapping does not start with `format_prefix` (an older wrapping format;
    /// an empty prefix matches every wrapping).
    async fn versions_not_wrapped_by(
        &self,
        kek_id: &str,
        format_prefix: &[u8],
        limit: u32,
    ) -> Result<Vec<(String, VersionRecord)>, StoreError>;
    /// Replaces one version's wrapping, only if it is still wrapped by `old_kek_id`
    /// (false otherwise, e.g. someone else re-wrapped it first).
    async fn rewrap_version(
        &self,
        name: &str,
        version: u32,
        old_kek_id: &str,
        new_kek_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError>;
    /// Adds `n` to one version's `encryptions` in one atomic statement and returns the
    /// new total, so the caller owns the uses `total - n .. total` (`NotFound` if the
    /// version does not exist).
    async fn reserve_encryptions(
        &self,
        name: &str,
        version: u32,
        n: u64,
    ) -> Result<u64, StoreError>;
    /// How many versions are wrapped by each KEK id.
    async fn kek_usage(&self) -> Result<Vec<(String, u64)>, StoreError>;
}

// Conversions shared by both backends. Integers are stored as signed 64-bit values;
// whatever comes back from the database is checked, never truncated.

/// A `u32` (key version) as stored.
pub(crate) fn version_to_db(v: u32) -> i64 {
    i64::from(v)
}

/// A stored key version, which must fit a `u32`.
pub(crate) fn version_from_db(v: i64, column: &str) -> Result<u32, StoreError> {
    u32::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("{column} {v} is not a valid version")))
}

/// The rotation period as stored (BIGINT / INTEGER). Periods beyond `i64::MAX` seconds
/// cannot be stored; the service never produces them.
pub(crate) fn period_to_db(seconds: u64) -> Result<i64, StoreError> {
    i64::try_from(seconds).map_err(|_| {
        StoreError::Corrupt(format!(
            "rotation_period_seconds {seconds} is too large to store"
        ))
    })
}

pub(crate) fn period_from_db(seconds: i64) -> Result<u64, StoreError> {
    u64::try_from(seconds)
        .map_err(|_| StoreError::Corrupt(format!("rotation_period_seconds {seconds} is negative")))
}

/// A stored policy version, which is never negative.
pub(crate) fn policy_version_from_db(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("policy_version {v} is negative")))
}

/// A policy version as stored. Versions only grow by one per write, so `i64::MAX` is
/// out of reach; refuse rather than wrap.
pub(crate) fn policy_version_to_db(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("policy_version {v} is too large to store")))
}

/// `allowed_services` as stored: a JSON array of strings.
pub(crate) fn services_to_db(services: &[String]) -> String {
    serde_json::Value::from(services.to_vec()).to_string()
}

pub(crate) fn services_from_db(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s)
        .map_err(|_| StoreError::Corrupt("allowed_services is not a JSON array of strings".into()))
}

pub(crate) fn count_to_db(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Corrupt(format!("count {n} is too large to store")))
}

pub(crate) fn count_from_db(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("count {n} is negative")))
}

/// A time stored as microseconds since the epoch (SQLite).
pub(crate) fn time_from_us(us: i64, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt(format!("{column} {us} is out of range")))
}

pub(crate) fn time_to_us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// The contract every [`KeyStore`] implementation must meet. Each run uses key names
/// and KEK ids unique to it, so it also holds on a store others use at the same time.
#[allow(clippy::unwrap_used, clippy::panic)]
#[cfg(test)]
pub mod contract {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("bad test time {s}: {e}"))
    }

    fn key(name: &str, latest: u32, t: DateTime<Utc>) -> KeyRecord {
        KeyRecord {
            name: name.to_owned(),
            key_type: "aes256-gcm".into(),
            latest_version: latest,
            policy: KeyPolicy::default(),
            created_at: t,
            updated_at: t,
            last_rotated_at: t,
            policy_version: 1,
            record_mac: None,
        }
    }

    fn ver(v: u32, kek: &str, t: DateTime<Utc>) -> VersionRecord {
        VersionRecord {
            version: v,
            created_at: t,
            kek_id: kek.to_owned(),
            wrapped: vec![v as u8, 0, 0xff, 7, 42],
            public_key: None,
            encryptions: 0,
        }
    }

    /// This run's keys among `(name, version)` pairs, sorted.
    fn ours(pairs: Vec<(String, VersionRecord)>, prefix: &str) -> Vec<(String, u32, String)> {
        let mut v: Vec<_> = pairs
            .into_iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, r)| (n, r.version, r.kek_id))
            .collect();
        v.sort();
        v
    }

    fn usage(u: &[(String, u64)], kek: &str) -> u64 {
        let hits: Vec<u64> = u
            .iter()
            .filter(|(k, _)| k == kek)
            .map(|(_, n)| *n)
            .collect();
        assert!(hits.len() <= 1, "kek_usage lists {kek} once: {u:?}");
        hits.first().copied().unwrap_or(0)
    }

    pub async fn run(store: &dyn KeyStore) {
        let sfx = uuid::Uuid::new_v4().simple().to_string();
        let p = format!("ct-{sfx}-");
        let kek_a = format!("kek-{sfx}-a");
        let kek_b = format!("kek-{sfx}-b");
        let t0 = at("2026-03-01T10:00:00.123456Z");
        let t1 = at("2026-03-02T11:30:00.000001Z");
        let t2 = at("2026-03-03T12:45:59.999999Z");
        let t3 = at("2026-03-04T00:00:00.5Z");

        // ---- insert / get: every field survives storage
        let full_name = format!("{p}full");
        let full = KeyRecord {
            name: full_name.clone(),
            key_type: "ecdsa-p256".into(),
            latest_version: 4_000_000_000,
            policy: KeyPolicy {
                min_decryption_version: 2,
                min_encryption_version: 3_000_000_000,
                rotation_period_seconds: 90 * 24 * 3600,
                deletion_allowed: true,
                exportable: true,
                allowed_services: vec!["internal".into(), "spiffe://sec/token-svc".into()],
            },
            created_at: t0,
            updated_at: t1,
            last_rotated_at: t2,
            policy_version: 41,
            record_mac: Some(format!("{kek_a}:dGFn")),
        };
        let full_versions = vec![
            VersionRecord {
                version: 1,
                created_at: t0,
                kek_id: kek_a.clone(),
                wrapped: (0..=255).collect(),
                public_key: Some(vec![0x30, 0x59, 0x30, 0x13, 0x00, 0xff]),
                encryptions: 5_000_000_000,
            },
            VersionRecord {
                version: 2,
                created_at: t1,
                kek_id: kek_b.clone(),
                wrapped: vec![0],
                public_key: None,
                encryptions: 0,
            },
            VersionRecord {
                version: 4_000_000_000,
                created_at: t2,
                kek_id: kek_a.clone(),
                wrapped: vec![1, 2, 3],
                public_key: Some(Vec::new()),
                encryptions: 7,
            },
        ];
        assert!(
            store.get(&full_name).await.unwrap().is_none(),
            "absent → None"
        );
        store.insert(&full, &full_versions).await.unwrap();
        let (k, vs) = store.get(&full_name).await.unwrap().unwrap();
        assert_eq!(k, full, "every key field round-trips");
        assert_eq!(
            vs, full_versions,
            "every version field round-trips, ascending"
        );

        // ---- reserve_encryptions: atomic, per version, persisted
        assert_eq!(
            store
                .reserve_encryptions(&full_name, 2, 4096)
                .await
                .unwrap(),
            4096
        );
        assert_eq!(
            store.reserve_encryptions(&full_name, 1, 1).await.unwrap(),
            5_000_000_001,
            "adds to the stored count"
        );
        let totals = futures::future::join_all(
            (0..20).map(|_| store.reserve_encryptions(&full_name, 2, 10)),
        )
        .await;
        let mut totals: Vec<u64> = totals.into_iter().map(|t| t.unwrap()).collect();
        totals.sort_unstable();
        assert_eq!(
            totals,
            (1..=20).map(|i| 4096 + 10 * i).collect::<Vec<u64>>(),
            "concurrent reservations get disjoint ranges"
        );
        let (_, vs) = store.get(&full_name).await.unwrap().unwrap();
        assert_eq!(
            vs.iter().map(|v| v.encryptions).collect::<Vec<_>>(),
            [5_000_000_001, 4296, 7]
        );
        assert!(matches!(
            store.reserve_encryptions(&full_name, 3, 1).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.reserve_encryptions(&format!("{p}absent"), 1, 1).await,
            Err(StoreError::NotFound)
        ));
        let full_versions: Vec<VersionRecord> = vs;

        // versions come back ascending whatever the insertion order
        let rev_name = format!("{p}rev");
        let rev = key(&rev_name, 3, t0);
        let rev_versions = vec![ver(3, &kek_b, t0), ver(1, &kek_b, t0), ver(2, &kek_b, t0)];
        store.insert(&rev, &rev_versions).await.unwrap();
        let (_, vs) = store.get(&rev_name).await.unwrap().unwrap();
        assert_eq!(
            vs.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );

        // duplicate name: AlreadyExists, and the stored key is untouched
        let mut other = key(&full_name, 1, t3);
        other.key_type = "aes128-gcm".into();
        let err = store
            .insert(&other, &[ver(1, &kek_a, t3)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists), "{err:?}");
        let (k, vs) = store.get(&full_name).await.unwrap().unwrap();
        assert_eq!((k, vs), (full.clone(), full_versions.clone()));

        // insert is all or nothing: a bad version list leaves no key behind
        let broken_name = format!("{p}broken");
        let res = store
            .insert(
                &key(&broken_name, 1, t0),
                &[ver(1, &kek_a, t0), ver(1, &kek_a, t0)],
            )
            .await;
        assert!(res.is_err(), "duplicate version numbers are rejected");
        assert!(
            store.get(&broken_name).await.unwrap().is_none(),
            "all or nothing"
        );
        assert!(store.get(&format!("{p}missing")).await.unwrap().is_none());

        // ---- list: ordered by name, `after` is exclusive, `limit` caps, paging is exact
        let list_p = format!("{p}l-");
        let mut names: Vec<String> = (0..25).map(|i| format!("{list_p}{i:02}")).collect();
        // inserted out of order
        for i in [
            7, 0, 24, 13, 3, 19, 1, 11, 22, 5, 16, 9, 2, 20, 14, 6, 23, 10, 4, 17, 12, 21, 8, 18,
            15,
        ] {
            store
                .insert(&key(&names[i], 1, t0), &[ver(1, &kek_b, t0)])
                .await
                .unwrap();
        }
        names.sort();
        let all = store.list(None, 100_000).await.unwrap();
        assert!(
            all.windows(2).all(|w| w[0].name < w[1].name),
            "strictly ascending by name"
        );
        let mine: Vec<&str> = all
            .iter()
            .map(|k| k.name.as_str())
            .filter(|n| n.starts_with(&list_p))
            .collect();
        assert_eq!(mine, names.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(store.list(None, 3).await.unwrap().len(), 3, "limit caps");
        assert!(
            store.list(None, 0).await.unwrap().is_empty(),
            "limit 0: nothing"
        );
        let got = store.list(Some(&names[9]), 3).await.unwrap();
        assert_eq!(
            got.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            vec![&names[10], &names[11], &names[12]],
            "strictly after the cursor"
        );
        let got = store.list(Some(&format!("{list_p}09x")), 1).await.unwrap();
        assert_eq!(got[0].name, names[10], "the cursor need not be a key");
        assert_eq!(
            got[0],
            key(&names[10], 1, t0),
            "listed keys carry every field"
        );
        // page through this run's keys, 7 at a time, starting just before them
        let mut seen = Vec::new();
        let mut after = list_p.clone();
        loop {
            let page = store.list(Some(&after), 7).await.unwrap();
            assert!(page.len() <= 7);
            let done = page.len() < 7;
            let in_range: Vec<String> = page
                .iter()
                .map(|k| k.name.clone())
                .filter(|n| n.starts_with(&list_p))
                .collect();
            let left = in_range.len() < page.len();
            seen.extend(in_range);
            match page.last() {
                Some(last) if !done && !left => after = last.name.clone(),
                _ => break,
            }
        }
        assert_eq!(
            seen, names,
            "paging visits every key exactly once, in order"
        );

        // ---- add_version
        let rot_name = format!("{p}rot");
        store
            .insert(&key(&rot_name, 1, t0), &[ver(1, &kek_a, t0)])
            .await
            .unwrap();
        let mut v2 = ver(2, &kek_a, t1);
        v2.public_key = Some(vec![9, 9, 9]);
        store
            .add_version(&rot_name, 1, 1, &v2, t1, Some("mac-2"))
            .await
            .unwrap();
        let (k, vs) = store.get(&rot_name).await.unwrap().unwrap();
        let mut want = key(&rot_name, 2, t0);
        want.updated_at = t1;
        want.last_rotated_at = t1;
        want.policy_version = 2;
        want.record_mac = Some("mac-2".into());
        assert_eq!(
            k, want,
            "latest and policy version bumped, mac set, updated/rotated at now, created kept"
        );
        assert_eq!(vs, vec![ver(1, &kek_a, t0), v2.clone()]);

        // stale expected_latest: Conflict, nothing changed
        let err = store
            .add_version(&rot_name, 1, 2, &ver(2, &kek_a, t2), t2, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict), "{err:?}");
        // expected_latest ahead of the stored one (no version row in the way): Conflict
        let err = store
            .add_version(&rot_name, 5, 2, &ver(6, &kek_a, t2), t2, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict), "{err:?}");
        // right latest, stale policy version (someone updated the policy): Conflict
        for stale in [0, 1, 3] {
            let err = store
                .add_version(&rot_name, 2, stale, &ver(3, &kek_a, t2), t2, None)
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::Conflict), "pv {stale}: {err:?}");
        }
        // version number not expected + 1: Conflict
        for bad in [2, 4, 1, 0] {
            let err = store
                .add_version(&rot_name, 2, 2, &ver(bad, &kek_a, t2), t2, None)
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::Conflict), "v{bad}: {err:?}");
        }
        let err = store
            .add_version(&rot_name, u32::MAX, 2, &ver(0, &kek_a, t2), t2, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict), "no overflow: {err:?}");
        let (k2, vs2) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(
            (k2, vs2),
            (want.clone(), vs.clone()),
            "failed adds change nothing"
        );
        // missing key: NotFound
        let err = store
            .add_version(&format!("{p}missing"), 1, 1, &ver(2, &kek_a, t2), t2, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");

        // two rotations racing from the same latest: exactly one wins
        let va = ver(3, &kek_a, t2);
        let vb = VersionRecord {
            wrapped: vec![0xbb; 32],
            ..ver(3, &kek_a, t3)
        };
        let (ra, rb) = tokio::join!(
            store.add_version(&rot_name, 2, 2, &va, t2, Some("mac-a")),
            store.add_version(&rot_name, 2, 2, &vb, t3, Some("mac-b")),
        );
        let (winner, when, winner_mac) = match (&ra, &rb) {
            (Ok(()), Err(StoreError::Conflict)) => (&va, t2, "mac-a"),
            (Err(StoreError::Conflict), Ok(())) => (&vb, t3, "mac-b"),
            other => panic!("expected one Ok and one Conflict, got {other:?}"),
        };
        let (k, vs) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(k.latest_version, 3);
        assert_eq!(k.updated_at, when);
        assert_eq!(k.last_rotated_at, when);
        assert_eq!(k.policy_version, 3);
        assert_eq!(
            k.record_mac.as_deref(),
            Some(winner_mac),
            "the winner's mac"
        );
        assert_eq!(vs.len(), 3);
        assert_eq!(&vs[2], winner, "the winner's version is the one stored");

        // ---- update_policy
        let policy = KeyPolicy {
            min_decryption_version: 2,
            min_encryption_version: 3,
            rotation_period_seconds: 3600,
            deletion_allowed: true,
            exportable: false,
            allowed_services: vec!["token-svc".into()],
        };
        store
            .update_policy(&rot_name, 3, &policy, t3, Some("mac-p"))
            .await
            .unwrap();
        let (k, vs_after) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(k.policy, policy);
        assert_eq!(k.policy_version, 4, "every write bumps the policy version");
        assert_eq!(k.record_mac.as_deref(), Some("mac-p"));
        assert_eq!(k.updated_at, t3, "updated_at set");
        assert_eq!(k.last_rotated_at, when, "rotation time untouched");
        assert_eq!((k.latest_version, k.created_at), (3, t0));
        assert_eq!(vs_after, vs, "versions untouched");
        store
            .update_policy(&rot_name, 4, &KeyPolicy::default(), t3, None)
            .await
            .unwrap();
        let (k, _) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(
            k.policy,
            KeyPolicy::default(),
            "policy replaced, not merged"
        );
        // compare-and-set: a stale policy version changes nothing
        for stale in [0, 4, 6] {
            let err = store
                .update_policy(&rot_name, stale, &policy, t3, Some("stale"))
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::Conflict), "pv {stale}: {err:?}");
        }
        let (k, _) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(
            (k.policy_version, k.policy.clone(), k.record_mac.clone()),
            (5, KeyPolicy::default(), None),
            "lost compare-and-sets change nothing"
        );
        let err = store
            .update_policy(&format!("{p}missing"), 1, &policy, t3, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");

        // many writers racing from the same read: exactly one wins, the rest Conflict
        let racers: Vec<KeyPolicy> = (0..12_u64)
            .map(|i| KeyPolicy {
                rotation_period_seconds: 3600 + i,
                ..KeyPolicy::default()
            })
            .collect();
        let results = futures::future::join_all(
            racers
                .iter()
                .map(|pol| store.update_policy(&rot_name, 5, pol, t3, None)),
        )
        .await;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "exactly one winner: {results:?}");
        assert!(
            results
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(StoreError::Conflict))),
            "{results:?}"
        );
        let (k, _) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(
            k.policy, racers[winners[0]],
            "the winner's policy is stored"
        );
        assert_eq!(k.policy_version, 6);

        // set_mac: compare-and-set on the policy version, changes nothing else
        assert!(!store.set_mac(&rot_name, 5, "old").await.unwrap(), "stale");
        assert!(store.set_mac(&rot_name, 6, "fresh").await.unwrap());
        let (k2, _) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!(k2.record_mac.as_deref(), Some("fresh"));
        assert_eq!(
            KeyRecord {
                record_mac: None,
                ..k2
            },
            KeyRecord {
                record_mac: None,
                ..k
            },
            "only the mac changed"
        );
        assert!(!store.set_mac(&format!("{p}missing"), 1, "x").await.unwrap());
        store
            .update_policy(&rot_name, 6, &KeyPolicy::default(), t3, None)
            .await
            .unwrap();

        // ---- KEK usage and rewrapping. This run's versions so far: `full` (a, b, a),
        // `rev` (b ×3), 25 listed keys (b), `rot` (a ×3).
        let u = store.kek_usage().await.unwrap();
        assert_eq!(usage(&u, &kek_a), 5, "{u:?}");
        assert_eq!(usage(&u, &kek_b), 29, "{u:?}");
        assert!(u.iter().all(|(_, n)| *n > 0), "no zero rows: {u:?}");

        let pending = ours(
            store
                .versions_not_wrapped_by(&kek_b, b"", u32::MAX)
                .await
                .unwrap(),
            &p,
        );
        let expected = vec![
            (full_name.clone(), 1, kek_a.clone()),
            (full_name.clone(), 4_000_000_000, kek_a.clone()),
            (rot_name.clone(), 1, kek_a.clone()),
            (rot_name.clone(), 2, kek_a.clone()),
            (rot_name.clone(), 3, kek_a.clone()),
        ];
        assert_eq!(pending, expected);
        let all_pending = store
            .versions_not_wrapped_by(&kek_b, b"", u32::MAX)
            .await
            .unwrap();
        assert!(all_pending.iter().all(|(_, v)| v.kek_id != kek_b));
        let (n, v) = all_pending
            .iter()
            .find(|(n, v)| *n == full_name && v.version == 1)
            .unwrap();
        assert_eq!(
            (n, v),
            (&full_name, &full_versions[0]),
            "full records returned"
        );
        let limited = store.versions_not_wrapped_by(&kek_b, b"", 2).await.unwrap();
        assert_eq!(limited.len(), 2, "limit caps");
        assert!(
            store
                .versions_not_wrapped_by(&kek_b, b"", 0)
                .await
                .unwrap()
                .is_empty()
        );

        // rewrap only from the KEK it is still wrapped by
        assert!(
            !store
                .rewrap_version(&full_name, 1, &kek_b, &kek_b, b"nope")
                .await
                .unwrap(),
            "old KEK does not match: nothing done"
        );
        assert!(
            !store
                .rewrap_version(&full_name, 3, &kek_a, &kek_b, b"nope")
                .await
                .unwrap(),
            "no such version"
        );
        assert!(
            !store
                .rewrap_version(&format!("{p}missing"), 1, &kek_a, &kek_b, b"nope")
                .await
                .unwrap(),
            "no such key"
        );
        let (_, vs) = store.get(&full_name).await.unwrap().unwrap();
        assert_eq!(vs, full_versions, "failed rewraps change nothing");
        for (name, version, old) in &pending {
            let wrapped = format!("{name}/{version}/b").into_bytes();
            assert!(
                store
                    .rewrap_version(name, *version, old, &kek_b, &wrapped)
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .rewrap_version(name, *version, old, &kek_b, b"again")
                    .await
                    .unwrap(),
                "someone else rewrapped it first"
            );
        }
        let left = ours(
            store
                .versions_not_wrapped_by(&kek_b, b"", u32::MAX)
                .await
                .unwrap(),
            &p,
        );
        assert!(left.is_empty(), "everything rewrapped: {left:?}");
        // an older wrapping format (not starting with the prefix) also needs a re-wrap
        let old_format: Vec<(String, u32)> = ours(
            store
                .versions_not_wrapped_by(&kek_b, p.as_bytes(), u32::MAX)
                .await
                .unwrap(),
            &p,
        )
        .into_iter()
        .filter(|(n, _, _)| *n == full_name)
        .map(|(n, v, _)| (n, v))
        .collect();
        assert_eq!(
            old_format,
            vec![(full_name.clone(), 2)],
            "v1 and v4e9 were rewrapped to '{{name}}/..' (prefix), v2 is [0]"
        );
        let (k, vs) = store.get(&full_name).await.unwrap().unwrap();
        assert_eq!(k, full, "rewrapping does not touch the key");
        for (got, orig) in vs.iter().zip(&full_versions) {
            assert_eq!(got.kek_id, kek_b);
            let want = if orig.kek_id == kek_a {
                format!("{full_name}/{}/b", orig.version).into_bytes()
            } else {
                orig.wrapped.clone()
            };
            assert_eq!(got.wrapped, want, "v{}", orig.version);
            assert_eq!(
                (got.version, got.created_at, &got.public_key),
                (orig.version, orig.created_at, &orig.public_key),
                "only the wrapping changes"
            );
        }
        let u = store.kek_usage().await.unwrap();
        assert_eq!(usage(&u, &kek_a), 0, "{u:?}");
        assert_eq!(usage(&u, &kek_b), 34, "{u:?}");

        // ---- delete_if_allowed: the flag is checked by the deleting statement
        let guarded = format!("{p}guarded");
        store
            .insert(&key(&guarded, 1, t0), &[ver(1, &kek_a, t0)])
            .await
            .unwrap();
        assert_eq!(
            store.delete_if_allowed(&guarded).await.unwrap(),
            DeleteOutcome::Protected
        );
        assert_eq!(
            store.get(&guarded).await.unwrap().unwrap().1.len(),
            1,
            "a protected key keeps its versions"
        );
        let allow = KeyPolicy {
            deletion_allowed: true,
            ..KeyPolicy::default()
        };
        store
            .update_policy(&guarded, 1, &allow, t1, None)
            .await
            .unwrap();
        assert_eq!(
            store.delete_if_allowed(&guarded).await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert!(store.get(&guarded).await.unwrap().is_none());
        assert_eq!(
            store.delete_if_allowed(&guarded).await.unwrap(),
            DeleteOutcome::NotFound
        );
        let u = store.kek_usage().await.unwrap();
        assert_eq!(usage(&u, &kek_a), 0, "its versions went with it: {u:?}");

        // ---- delete
        assert!(store.delete(&rot_name).await.unwrap());
        assert!(!store.delete(&rot_name).await.unwrap(), "already gone");
        assert!(store.get(&rot_name).await.unwrap().is_none());
        let u = store.kek_usage().await.unwrap();
        assert_eq!(usage(&u, &kek_b), 31, "its versions went with it: {u:?}");
        assert_eq!(
            store.get(&full_name).await.unwrap().unwrap().1.len(),
            3,
            "other keys intact"
        );
        assert!(store.get(&rev_name).await.unwrap().is_some());
        let err = store
            .add_version(&rot_name, 3, 7, &ver(4, &kek_b, t3), t3, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");
        // the name is free again, with no stale versions in the way
        store
            .insert(&key(&rot_name, 1, t3), &[ver(1, &kek_a, t3)])
            .await
            .unwrap();
        let (k, vs) = store.get(&rot_name).await.unwrap().unwrap();
        assert_eq!((k, vs), (key(&rot_name, 1, t3), vec![ver(1, &kek_a, t3)]));

        // clean up after ourselves (the store may be shared)
        for name in [full_name, rev_name, rot_name].iter().chain(&names) {
            assert!(store.delete(name).await.unwrap(), "{name}");
        }
        let u = store.kek_usage().await.unwrap();
        assert_eq!((usage(&u, &kek_a), usage(&u, &kek_b)), (0, 0), "{u:?}");
        assert!(
            store
                .list(Some(&p), 100)
                .await
                .unwrap()
                .iter()
                .all(|k| !k.name.starts_with(&p))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_convert_checked() {
        assert_eq!(version_to_db(u32::MAX), 4_294_967_295);
        assert_eq!(version_from_db(4_294_967_295, "v").unwrap(), u32::MAX);
        assert_eq!(version_from_db(0, "v").unwrap(), 0);
        assert!(matches!(
            version_from_db(4_294_967_296, "v"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            version_from_db(-1, "v"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn periods_and_counts_convert_checked() {
        assert_eq!(period_to_db(3600).unwrap(), 3600);
        assert_eq!(period_to_db(i64::MAX as u64).unwrap(), i64::MAX);
        assert!(matches!(
            period_to_db(u64::MAX),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(period_from_db(0).unwrap(), 0);
        assert!(matches!(period_from_db(-5), Err(StoreError::Corrupt(_))));
        assert_eq!(count_from_db(7).unwrap(), 7);
        assert!(matches!(count_from_db(-1), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn times_round_trip_in_microseconds() {
        let t = DateTime::parse_from_rfc3339("2026-03-01T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(time_from_us(time_to_us(t), "t").unwrap(), t);
        assert!(matches!(
            time_from_us(i64::MAX, "t"),
            Err(StoreError::Corrupt(_))
        ));
    }
}
