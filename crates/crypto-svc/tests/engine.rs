//! crypto-svc's behaviour through its engine, on both stores: lifecycle, rotation with
//! old ciphertexts, policy, every bad input the issue names, backup/restore across
//! installations, KEK rotation, automatic rotation on an injected clock, and events;
//! and that nothing grows with caller input: key-name validation, bounded metric labels,
//! the batch item limit, and aggregated `decrypt.failed` events.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use crypto_svc::engine::{CryptoMetrics, Engine, Limits, PolicyUpdate};
use crypto_svc::kek::KekRing;
use crypto_svc::material::{ALL_TYPES, KeyType, Loaded, Op};
use crypto_svc::store::{KeyPolicy, KeyStore};
use sec_common::auth::Caller;
use sec_common::clock::{ManualClock, SharedClock};
use sec_common::error::ErrorCode;
use sec_common::events::SecurityEvent;

struct Fixture {
    engine: Engine,
    events: Arc<Mutex<Vec<SecurityEvent>>>,
    clock: Arc<ManualClock>,
    store: Arc<dyn KeyStore>,
    _dir: Option<tempfile::TempDir>,
}

const ADMIN: Caller = Caller::Admin;

async fn sqlite_store() -> (Arc<dyn KeyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pool = sec_common::storage::connect_sqlite(&dir.path().join("crypto.db"), 4)
        .await
        .unwrap();
    crypto_svc::MIGRATIONS.sqlite.run(&pool).await.unwrap();
    (
        Arc::new(crypto_svc::store::sqlite::SqliteKeyStore::new(pool)),
        dir,
    )
}

async fn pg_store() -> Option<Arc<dyn KeyStore>> {
    let url = sec_testkit::backend_url(sec_testkit::Backend::Postgres)?;
    let schema = format!("crypto_t{}", uuid::Uuid::new_v4().simple());
    let pool = sec_common::storage::connect_postgres(&url, &schema, 4)
        .await
        .unwrap();
    crypto_svc::MIGRATIONS.postgres.run(&pool).await.unwrap();
    Some(Arc::new(crypto_svc::store::postgres::PgKeyStore::new(pool)))
}

/// A fixed start, so tests never read the wall clock.
fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn engine_on(
    store: Arc<dyn KeyStore>,
    kek: KekRing,
    max_payload: usize,
) -> (Engine, Arc<Mutex<Vec<SecurityEvent>>>, Arc<ManualClock>) {
    engine_with(
        store,
        kek,
        Limits {
            max_payload_bytes: max_payload,
            cache_ttl: Duration::from_millis(0),
            ..Limits::default()
        },
        CryptoMetrics::unregistered(),
    )
}

fn engine_with(
    store: Arc<dyn KeyStore>,
    kek: KekRing,
    limits: Limits,
    metrics: CryptoMetrics,
) -> (Engine, Arc<Mutex<Vec<SecurityEvent>>>, Arc<ManualClock>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let clock = ManualClock::new(t0());
    let shared: SharedClock = clock.clone();
    let engine = Engine::new(
        store,
        Arc::new(kek),
        shared,
        Arc::new(move |e| sink.lock().unwrap().push(e)),
        limits,
        metrics,
    );
    (engine, events, clock)
}

async fn fixture() -> Fixture {
    let (store, dir) = sqlite_store().await;
    let (engine, events, clock) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        64 * 1024,
    );
    Fixture {
        engine,
        events,
        clock,
        store,
        _dir: Some(dir),
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, sec_common::error::Error>) -> ErrorCode {
    r.unwrap_err().code
}

fn types(f: &Fixture) -> Vec<String> {
    f.events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.r#type.clone())
        .collect()
}

/// The same behaviour on a store: run on SQLite always and PostgreSQL when reachable.
async fn lifecycle_and_rotation(f: &Fixture) {
    let k = f
        .engine
        .create_key(&ADMIN, "orders", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    assert_eq!(k.record.latest_version, 1);
    assert!(
        !k.record.policy.deletion_allowed && !k.record.policy.exportable,
        "deny by default"
    );
    assert_eq!(
        code(
            f.engine
                .create_key(&ADMIN, "orders", KeyType::Ed25519, KeyPolicy::default())
                .await
        ),
        ErrorCode::AlreadyExists
    );

    let (c1, v1) = f
        .engine
        .encrypt("orders", b"card 4111", b"order-17")
        .await
        .unwrap();
    assert_eq!(v1, 1);
    assert!(c1.starts_with("sec:v1:"));
    f.engine.rotate_key(&ADMIN, "orders").await.unwrap();
    let (c2, v2) = f
        .engine
        .encrypt("orders", b"card 4111", b"order-17")
        .await
        .unwrap();
    assert_eq!(v2, 2);
    assert!(c2.starts_with("sec:v2:"));
    // old ciphertexts keep decrypting after rotation
    assert_eq!(
        f.engine
            .decrypt(&ADMIN, "orders", &c1, b"order-17")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"card 4111"
    );
    // rewrap moves an old ciphertext to the newest version
    let (rw, rv) = f
        .engine
        .rewrap(&ADMIN, "orders", &c1, b"order-17")
        .await
        .unwrap();
    assert_eq!(rv, 2);
    assert_eq!(
        f.engine
            .decrypt(&ADMIN, "orders", &rw, b"order-17")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"card 4111"
    );

    // min_decryption_version refuses older ciphertexts, with nothing else changed
    f.engine
        .update_policy(
            &ADMIN,
            "orders",
            PolicyUpdate {
                min_decryption_version: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        code(f.engine.decrypt(&ADMIN, "orders", &c1, b"order-17").await),
        ErrorCode::FailedPrecondition
    );
    assert!(
        f.engine
            .decrypt(&ADMIN, "orders", &c2, b"order-17")
            .await
            .is_ok()
    );
    assert_eq!(
        code(
            f.engine
                .update_policy(
                    &ADMIN,
                    "orders",
                    PolicyUpdate {
                        min_decryption_version: Some(9),
                        ..Default::default()
                    }
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        f.engine
            .get_key("orders")
            .await
            .unwrap()
            .record
            .policy
            .min_decryption_version,
        2
    );

    // tampered, truncated, wrong AAD, wrong key, garbage: INVALID_ARGUMENT, no detail leaked
    let (prefix, b64) = c2.rsplit_once(':').unwrap();
    let mut raw = base64_decode(b64);
    raw[14] ^= 0x40;
    let tampered = format!("{prefix}:{}", base64_encode(&raw));
    let truncated = format!("{prefix}:{}", base64_encode(&base64_decode(b64)[..20]));
    f.engine
        .create_key(&ADMIN, "billing", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    for (ct, aad, key) in [
        (tampered.as_str(), &b"order-17"[..], "orders"),
        (truncated.as_str(), b"order-17", "orders"),
        (c2.as_str(), b"order-18", "orders"),
        (c2.as_str(), b"order-17", "billing"),
        ("not a ciphertext", b"order-17", "orders"),
        ("sec:v7:AAAA", b"order-17", "orders"),
    ] {
        let e = f.engine.decrypt(&ADMIN, key, ct, aad).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{ct} / {key}");
        assert!(
            !e.message.contains("card") && !e.message.contains(b64),
            "{}",
            e.message
        );
    }
    assert_eq!(
        code(f.engine.decrypt(&ADMIN, "nope", &c2, b"").await),
        ErrorCode::NotFound
    );
    // 5 refusals on orders and 1 on billing (invalid_argument), 1 below min version
    // (failed_precondition) on orders: each (key, reason) is reported at once, the rest
    // are counted into a summary; the counts add up to every refused decrypt.
    assert_eq!(decrypt_failed(f).len(), 3, "first of each (key, reason)");
    f.engine.flush_events();
    let failed = decrypt_failed(f);
    assert_eq!(
        failed.len(),
        4,
        "plus one summary for orders/invalid_argument"
    );
    assert_eq!(
        failed.iter().map(count).sum::<u64>(),
        7,
        "every refused decrypt is counted"
    );

    // deleting a protected key fails and changes nothing; then allowed, then gone
    assert_eq!(
        code(f.engine.delete_key(&ADMIN, "orders").await),
        ErrorCode::FailedPrecondition
    );
    assert!(f.engine.get_key("orders").await.is_ok());
    f.engine
        .update_policy(
            &ADMIN,
            "orders",
            PolicyUpdate {
                deletion_allowed: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    f.engine.delete_key(&ADMIN, "orders").await.unwrap();
    assert_eq!(code(f.engine.get_key("orders").await), ErrorCode::NotFound);
    assert_eq!(
        code(f.engine.encrypt("orders", b"x", b"").await),
        ErrorCode::NotFound
    );

    let t = types(f);
    for want in [
        "sec.crypto.key.created",
        "sec.crypto.key.rotated",
        "sec.crypto.key.config_updated",
        "sec.crypto.key.delete_refused",
        "sec.crypto.key.deleted",
    ] {
        assert!(t.iter().any(|x| x == want), "missing {want} in {t:?}");
    }
    for e in f.events.lock().unwrap().iter() {
        let all = format!("{e:?}");
        assert!(
            !all.contains("card 4111") && !all.contains("4111"),
            "no plaintext in events: {all}"
        );
    }
}

fn decrypt_failed(f: &Fixture) -> Vec<SecurityEvent> {
    f.events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.r#type == "sec.crypto.decrypt.failed")
        .cloned()
        .collect()
}

fn count(e: &SecurityEvent) -> u64 {
    e.details["count"].parse().unwrap()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test]
async fn lifecycle_and_rotation_sqlite() {
    lifecycle_and_rotation(&fixture().await).await;
}

#[tokio::test]
async fn lifecycle_and_rotation_postgres() {
    let Some(store) = pg_store().await else {
        return;
    };
    let (engine, events, clock) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        64 * 1024,
    );
    lifecycle_and_rotation(&Fixture {
        engine,
        events,
        clock,
        store,
        _dir: None,
    })
    .await;
}

#[tokio::test]
async fn operations_match_key_types() {
    let f = fixture().await;
    for t in ALL_TYPES {
        let name = format!("k-{}", t.name());
        f.engine
            .create_key(&ADMIN, &name, t, KeyPolicy::default())
            .await
            .unwrap();
        let enc = f.engine.encrypt(&name, b"m", b"").await;
        let sig = f.engine.sign(&name, b"m").await;
        let mac = f.engine.hmac(&name, b"m").await;
        let dk = f.engine.generate_data_key(&name, 0, b"").await;
        assert_eq!(enc.is_ok(), t.supports(Op::Encrypt), "{t:?} encrypt");
        assert_eq!(sig.is_ok(), t.supports(Op::Sign), "{t:?} sign");
        assert_eq!(mac.is_ok(), t.supports(Op::Hmac), "{t:?} hmac");
        assert_eq!(dk.is_ok(), t.supports(Op::DataKey), "{t:?} datakey");
        if !t.supports(Op::Sign) {
            // signing with an encryption-only key is a precondition failure
            assert_eq!(
                sig.as_ref().unwrap_err().code,
                ErrorCode::FailedPrecondition,
                "{t:?}"
            );
        }
        if let Ok((s, _)) = sig {
            assert!(f.engine.verify(&name, b"m", &s).await.unwrap());
            assert!(!f.engine.verify(&name, b"tampered", &s).await.unwrap());
            let (pem, v, _) = f.engine.public_key(&name, 0).await.unwrap();
            assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----") && v == 1);
        }
        if let Ok((m, _)) = mac {
            assert!(f.engine.verify_hmac(&name, b"m", &m).await.unwrap());
            assert!(!f.engine.verify_hmac(&name, b"n", &m).await.unwrap());
        }
        if let Ok((pt, wrapped, _)) = dk {
            assert_eq!(pt.len(), 32);
            assert_eq!(
                f.engine
                    .decrypt(&ADMIN, &name, &wrapped, b"")
                    .await
                    .unwrap()
                    .0
                    .as_slice(),
                pt.as_slice()
            );
        }
    }
    assert_eq!(
        code(f.engine.public_key("k-aes256-gcm", 0).await),
        ErrorCode::FailedPrecondition
    );
    assert_eq!(
        code(f.engine.generate_data_key("k-aes256-gcm", 8, b"").await),
        ErrorCode::InvalidArgument
    );
    let (a, _) = f
        .engine
        .encrypt("k-aes256-gcm-siv", b"same", b"")
        .await
        .unwrap();
    let (b, _) = f
        .engine
        .encrypt("k-aes256-gcm-siv", b"same", b"")
        .await
        .unwrap();
    assert_eq!(a, b, "aes256-gcm-siv is deterministic");
}

/// A batch gives, in order, exactly what one HMAC per message gives; an older version
/// still answers (so a value hashed before a rotation can be matched); the limits hold.
#[tokio::test]
async fn batch_hmac_matches_single_hmacs_under_every_version() {
    let f = fixture().await;
    f.engine
        .create_key(&ADMIN, "fields", KeyType::HmacSha256, KeyPolicy::default())
        .await
        .unwrap();
    let messages: Vec<Vec<u8>> = vec![b"alice@example.com".to_vec(), b"".to_vec(), b"bob".to_vec()];
    let (v1, version) = f.engine.batch_hmac("fields", 0, &messages).await.unwrap();
    assert_eq!(version, 1);
    for (m, tag) in messages.iter().zip(&v1) {
        assert_eq!(&f.engine.hmac("fields", m).await.unwrap().0, tag);
        assert!(f.engine.verify_hmac("fields", m, tag).await.unwrap());
    }
    assert_ne!(v1[0], v1[2]);
    f.engine.rotate_key(&ADMIN, "fields").await.unwrap();
    let (v2, version) = f.engine.batch_hmac("fields", 0, &messages).await.unwrap();
    assert_eq!(version, 2);
    assert!(v2[0].starts_with("sec:v2:") && v2[0] != v1[0]);
    assert_eq!(
        f.engine.batch_hmac("fields", 1, &messages).await.unwrap(),
        (v1, 1),
        "an older version is still usable for matching"
    );
    assert_eq!(
        code(f.engine.batch_hmac("fields", 9, &messages).await),
        ErrorCode::InvalidArgument
    );
    // an encryption key cannot HMAC; the payload limit counts the whole batch
    f.engine
        .create_key(&ADMIN, "sealing", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    assert_eq!(
        code(f.engine.batch_hmac("sealing", 0, &messages).await),
        ErrorCode::FailedPrecondition
    );
    let big = vec![vec![0u8; 40 * 1024], vec![0u8; 40 * 1024]];
    assert_eq!(
        code(f.engine.batch_hmac("fields", 0, &big).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            f.engine
                .batch_hmac("fields", 0, &vec![b"m".to_vec(); 1001])
                .await
        ),
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn bad_names_and_oversized_payloads_are_refused() {
    let f = fixture().await;
    for bad in ["", ".hidden", "with space", "slash/name", &"x".repeat(129)] {
        assert_eq!(
            code(
                f.engine
                    .create_key(&ADMIN, bad, KeyType::Aes256Gcm, KeyPolicy::default())
                    .await
            ),
            ErrorCode::InvalidArgument,
            "{bad:?}"
        );
    }
    f.engine
        .create_key(&ADMIN, "small", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let big = vec![0_u8; 64 * 1024 + 1];
    let e = f.engine.encrypt("small", &big, b"").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert_eq!(e.field.as_deref(), Some("plaintext"));
    assert!(
        f.engine.encrypt("small", &big[1..], b"").await.is_ok(),
        "exactly at the limit is fine"
    );
    f.engine
        .create_key(&ADMIN, "rsa", KeyType::Rsa3072, KeyPolicy::default())
        .await
        .unwrap();
    assert_eq!(
        code(f.engine.encrypt("rsa", &[0; 400], b"").await),
        ErrorCode::InvalidArgument
    );
}

/// `sec_crypto_keys_rotation_overdue`: a key whose automatic rotation keeps failing
/// counts once it is late by more than one check interval; keys that rotate, and keys
/// without automatic rotation, never count.
#[tokio::test]
async fn keys_whose_rotation_keeps_failing_are_reported_overdue() {
    let (store, _dir) = sqlite_store().await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = CryptoMetrics::register(&mut registry);
    let (engine, _events, clock) = engine_with(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        Limits {
            rotation_check: Duration::from_secs(60),
            cache_ttl: Duration::ZERO,
            ..Limits::default()
        },
        metrics.clone(),
    );
    let hourly = KeyPolicy {
        rotation_period_seconds: 3600,
        ..Default::default()
    };
    for name in ["fine", "broken"] {
        engine
            .create_key(&ADMIN, name, KeyType::Aes256Gcm, hourly.clone())
            .await
            .unwrap();
    }
    engine
        .create_key(&ADMIN, "manual", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    // A row changed behind the engine's back (its MAC no longer matches): it is refused
    // at every load, so its rotation fails at every pass.
    let row = engine.get_key("broken").await.unwrap().record;
    let tampered = KeyPolicy {
        exportable: true,
        ..row.policy.clone()
    };
    store
        .update_policy(
            "broken",
            row.policy_version,
            &tampered,
            clock.now_utc(),
            row.record_mac.as_deref(),
        )
        .await
        .unwrap();
    let exported = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("sec_crypto_keys_rotation_overdue "))
            .map(str::to_owned)
    };
    assert_eq!(exported().as_deref(), Some("0"));

    // Due 30 s ago: "fine" rotates, "broken" fails but is within the check interval.
    clock.advance(chrono::Duration::seconds(3600 + 30));
    assert_eq!(
        engine.rotate_due(clock.now_utc()).await.unwrap(),
        vec!["fine".to_string()]
    );
    assert_eq!(metrics.rotation_overdue(), 0);
    // The next pass, a check interval later: "broken" is overdue, "fine" is not due.
    clock.advance(chrono::Duration::seconds(60));
    assert!(engine.rotate_due(clock.now_utc()).await.unwrap().is_empty());
    assert_eq!(metrics.rotation_overdue(), 1);
    assert_eq!(exported().as_deref(), Some("1"));
    // Still failing much later: still one key (a gauge of keys, not of passes).
    clock.advance(chrono::Duration::hours(5));
    assert_eq!(
        engine.rotate_due(clock.now_utc()).await.unwrap(),
        vec!["fine".to_string()]
    );
    assert_eq!(metrics.rotation_overdue(), 1);
}

#[tokio::test]
async fn automatic_rotation_follows_the_clock() {
    let f = fixture().await;
    let policy = KeyPolicy {
        rotation_period_seconds: 86_400,
        ..Default::default()
    };
    f.engine
        .create_key(&ADMIN, "auto", KeyType::Aes256Gcm, policy)
        .await
        .unwrap();
    f.engine
        .create_key(&ADMIN, "manual", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    assert!(
        f.engine
            .rotate_due(f.clock.now_utc())
            .await
            .unwrap()
            .is_empty()
    );
    f.clock.advance(chrono::Duration::hours(23));
    assert!(
        f.engine
            .rotate_due(f.clock.now_utc())
            .await
            .unwrap()
            .is_empty(),
        "not yet due"
    );
    f.clock.advance(chrono::Duration::hours(2));
    assert_eq!(
        f.engine.rotate_due(f.clock.now_utc()).await.unwrap(),
        vec!["auto".to_string()]
    );
    assert_eq!(
        f.engine
            .get_key("auto")
            .await
            .unwrap()
            .record
            .latest_version,
        2
    );
    assert_eq!(
        f.engine
            .get_key("manual")
            .await
            .unwrap()
            .record
            .latest_version,
        1
    );
    assert!(
        f.engine
            .rotate_due(f.clock.now_utc())
            .await
            .unwrap()
            .is_empty(),
        "period restarts at rotation"
    );
    assert_eq!(
        code(
            f.engine
                .update_policy(
                    &ADMIN,
                    "auto",
                    PolicyUpdate {
                        rotation_period_seconds: Some(60),
                        ..Default::default()
                    }
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
}

trait NowUtc {
    fn now_utc(&self) -> chrono::DateTime<Utc>;
}
impl NowUtc for ManualClock {
    fn now_utc(&self) -> chrono::DateTime<Utc> {
        sec_common::clock::Clock::now(self)
    }
}

#[tokio::test]
async fn backup_restores_on_another_installation_and_refuses_otherwise() {
    let source = fixture().await;
    let (tstore, _tdir) = sqlite_store().await;
    let (target, _, _) = engine_on(
        tstore,
        KekRing::from_bytes(&[2; 32], &[]).unwrap(),
        64 * 1024,
    );

    source
        .engine
        .create_key(&ADMIN, "payroll", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let (c1, _) = source
        .engine
        .encrypt("payroll", b"salary", b"")
        .await
        .unwrap();
    source.engine.rotate_key(&ADMIN, "payroll").await.unwrap();
    let (c2, _) = source
        .engine
        .encrypt("payroll", b"bonus", b"")
        .await
        .unwrap();

    target
        .create_key(
            &ADMIN,
            "import",
            KeyType::Rsa4096Wrapping,
            KeyPolicy::default(),
        )
        .await
        .unwrap();
    let (pem, _, _) = target.public_key("import", 0).await.unwrap();

    assert_eq!(
        code(source.engine.backup_key(&ADMIN, "payroll", &pem).await),
        ErrorCode::FailedPrecondition,
        "not exportable by default"
    );
    source
        .engine
        .update_policy(
            &ADMIN,
            "payroll",
            PolicyUpdate {
                exportable: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        code(source.engine.backup_key(&ADMIN, "payroll", "garbage").await),
        ErrorCode::InvalidArgument
    );
    let backup = source
        .engine
        .backup_key(&ADMIN, "payroll", &pem)
        .await
        .unwrap();
    assert!(backup.starts_with("sec-backup:v2:"));
    let (pin, _) = source.engine.installation_public_key().await.unwrap();
    let pin = pin.as_str();

    let restored = target
        .restore_key(&ADMIN, &backup, "import", None, pin)
        .await
        .unwrap();
    assert_eq!(restored.record.latest_version, 2);
    assert_eq!(
        target
            .decrypt(&ADMIN, "payroll", &c1, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"salary"
    );
    assert_eq!(
        target
            .decrypt(&ADMIN, "payroll", &c2, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"bonus"
    );
    assert_eq!(
        code(
            target
                .restore_key(&ADMIN, &backup, "import", None, pin)
                .await
        ),
        ErrorCode::AlreadyExists
    );
    assert!(
        target
            .restore_key(&ADMIN, &backup, "import", Some("payroll-copy"), pin)
            .await
            .is_ok()
    );

    // tampered backup, or one made for another key: refused, nothing created
    let mut raw = backup.clone().into_bytes();
    let i = raw.len() - 10;
    raw[i] = if raw[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(raw).unwrap();
    assert_eq!(
        code(
            target
                .restore_key(&ADMIN, &tampered, "import", Some("t1"), pin)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    target
        .create_key(
            &ADMIN,
            "other-rsa",
            KeyType::Rsa3072Wrapping,
            KeyPolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        code(
            target
                .restore_key(&ADMIN, &backup, "other-rsa", Some("t2"), pin)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(target.get_key("t1").await), ErrorCode::NotFound);
    assert_eq!(code(target.get_key("t2").await), ErrorCode::NotFound);
}

#[tokio::test]
async fn kek_rotation_rewraps_everything_without_losing_a_key() {
    let (store, _dir) = sqlite_store().await;
    let (old, _, _) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        1024,
    );
    old.create_key(&ADMIN, "a", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    old.create_key(&ADMIN, "b", KeyType::Ed25519, KeyPolicy::default())
        .await
        .unwrap();
    old.rotate_key(&ADMIN, "a").await.unwrap();
    let (ct, _) = old.encrypt("a", b"keep me", b"").await.unwrap();

    // new KEK current, old one still configured as previous: everything readable at once
    let (mid, events, _) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[2; 32], &[&[1; 32]]).unwrap(),
        1024,
    );
    assert_eq!(
        mid.decrypt(&ADMIN, "a", &ct, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"keep me"
    );
    let (rewrapped, _) = mid.rotate_kek(&ADMIN).await.unwrap();
    assert_eq!(rewrapped, 3);
    assert_eq!(mid.rotate_kek(&ADMIN).await.unwrap().0, 0, "idempotent");
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.r#type == "sec.crypto.kek.rotated")
    );

    // old KEK removed: still everything decrypts
    let (new, _, _) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[2; 32], &[]).unwrap(),
        1024,
    );
    assert_eq!(
        new.decrypt(&ADMIN, "a", &ct, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"keep me"
    );
    assert!(new.sign("b", b"m").await.is_ok());
    // and the wrong KEK alone cannot read anything (its record MACs do not verify)
    let (wrong, _, _) = engine_on(store, KekRing::from_bytes(&[3; 32], &[]).unwrap(), 1024);
    assert_eq!(
        code(wrong.encrypt("a", b"x", b"").await),
        ErrorCode::FailedPrecondition
    );
}

#[tokio::test]
async fn concurrent_rotations_do_not_lose_versions() {
    let f = fixture().await;
    f.engine
        .create_key(&ADMIN, "race", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        f.engine.rotate_key(&ADMIN, "race"),
        f.engine.rotate_key(&ADMIN, "race")
    );
    let ok = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert!(ok >= 1);
    let v = f.store.get("race").await.unwrap().unwrap();
    assert_eq!(
        v.0.latest_version as usize,
        v.1.len(),
        "no gaps, no duplicates"
    );
    if ok == 1 {
        let err = [a, b].into_iter().find_map(Result::err).unwrap();
        assert_eq!(err.code, ErrorCode::Aborted);
    }
}

// ---- nothing unbounded from caller input ----------------------------------------------

/// Delegates to a real store and remembers every key name the engine looked up.
struct SpyStore {
    inner: Arc<dyn KeyStore>,
    looked_up: Mutex<Vec<String>>,
}

impl SpyStore {
    fn seen(&self) -> Vec<String> {
        std::mem::take(&mut *self.looked_up.lock().unwrap())
    }
    fn saw(&self, name: &str) {
        self.looked_up.lock().unwrap().push(name.to_owned());
    }
}

use crypto_svc::store::{DeleteOutcome, KeyRecord, StoreError, VersionRecord};

#[async_trait::async_trait]
impl KeyStore for SpyStore {
    async fn insert(&self, key: &KeyRecord, versions: &[VersionRecord]) -> Result<(), StoreError> {
        self.saw(&key.name);
        self.inner.insert(key, versions).await
    }
    async fn get(&self, name: &str) -> Result<Option<(KeyRecord, Vec<VersionRecord>)>, StoreError> {
        self.saw(name);
        self.inner.get(name).await
    }
    async fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list(after, limit).await
    }
    async fn add_version(
        &self,
        name: &str,
        expected_latest: u32,
        expected_policy_version: u64,
        version: &VersionRecord,
        now: DateTime<Utc>,
        mac: Option<&str>,
    ) -> Result<(), StoreError> {
        self.saw(name);
        self.inner
            .add_version(
                name,
                expected_latest,
                expected_policy_version,
                version,
                now,
                mac,
            )
            .await
    }
    async fn update_policy(
        &self,
        name: &str,
        expected_policy_version: u64,
        policy: &KeyPolicy,
        now: DateTime<Utc>,
        mac: Option<&str>,
    ) -> Result<(), StoreError> {
        self.saw(name);
        self.inner
            .update_policy(name, expected_policy_version, policy, now, mac)
            .await
    }
    async fn set_mac(
        &self,
        name: &str,
        policy_version: u64,
        mac: &str,
    ) -> Result<bool, StoreError> {
        self.saw(name);
        self.inner.set_mac(name, policy_version, mac).await
    }
    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        self.saw(name);
        self.inner.delete(name).await
    }
    async fn delete_if_allowed(&self, name: &str) -> Result<DeleteOutcome, StoreError> {
        self.saw(name);
        self.inner.delete_if_allowed(name).await
    }
    async fn reserve_encryptions(
        &self,
        name: &str,
        version: u32,
        n: u64,
    ) -> Result<u64, StoreError> {
        self.saw(name);
        self.inner.reserve_encryptions(name, version, n).await
    }
    async fn versions_not_wrapped_by(
        &self,
        kek_id: &str,
        format_prefix: &[u8],
        limit: u32,
    ) -> Result<Vec<(String, VersionRecord)>, StoreError> {
        self.inner
            .versions_not_wrapped_by(kek_id, format_prefix, limit)
            .await
    }
    async fn rewrap_version(
        &self,
        name: &str,
        version: u32,
        old_kek_id: &str,
        new_kek_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        self.inner
            .rewrap_version(name, version, old_kek_id, new_kek_id, wrapped)
            .await
    }
    async fn kek_usage(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.kek_usage().await
    }
}

struct Bounded {
    engine: Arc<Engine>,
    spy: Arc<SpyStore>,
    events: Arc<Mutex<Vec<SecurityEvent>>>,
    clock: Arc<ManualClock>,
    registry: prometheus_client::registry::Registry,
    _dir: tempfile::TempDir,
}

async fn bounded(limits: Limits) -> Bounded {
    let (inner, dir) = sqlite_store().await;
    let spy = Arc::new(SpyStore {
        inner,
        looked_up: Mutex::default(),
    });
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = CryptoMetrics::register(&mut registry);
    let (engine, events, clock) = engine_with(
        spy.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        limits,
        metrics,
    );
    Bounded {
        engine: Arc::new(engine),
        spy,
        events,
        clock,
        registry,
        _dir: dir,
    }
}

impl Bounded {
    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// Every `sec_crypto_operations_total` series as `{labels} value`.
    fn op_series(&self) -> std::collections::BTreeMap<String, u64> {
        self.metrics_text()
            .lines()
            .filter_map(|l| l.strip_prefix("sec_crypto_operations_total"))
            .map(|l| {
                let (labels, v) = l.rsplit_once(' ').unwrap();
                (labels.to_owned(), v.parse().unwrap())
            })
            .collect()
    }
}

fn zero_ttl() -> Limits {
    Limits {
        cache_ttl: Duration::ZERO,
        ..Limits::default()
    }
}

#[tokio::test]
async fn a_flood_of_unknown_key_names_adds_one_unknown_series() {
    let b = bounded(zero_ttl()).await;
    b.engine
        .create_key(&ADMIN, "orders", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let (ct, _) = b.engine.encrypt("orders", b"x", b"").await.unwrap();
    b.engine.decrypt(&ADMIN, "orders", &ct, b"").await.unwrap();
    let before = b.op_series();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        [
            r#"{key="orders",operation="decrypt",outcome="ok"}"#,
            r#"{key="orders",operation="encrypt",outcome="ok"}"#,
        ]
    );

    let mut probes = Vec::new();
    for _ in 0..300 {
        let name = format!("probe-{}", uuid::Uuid::new_v4().simple());
        assert_eq!(
            code(b.engine.encrypt(&name, b"x", b"").await),
            ErrorCode::NotFound
        );
        probes.push(name);
    }

    let mut after = b.op_series();
    assert_eq!(
        after.remove(r#"{key="unknown",operation="encrypt",outcome="not_found"}"#),
        Some(300),
        "every probe is counted, under one series"
    );
    assert_eq!(after, before, "no other series appeared or changed");
    let text = b.metrics_text();
    assert!(
        !text.contains("probe-"),
        "no probed name is readable: {text}"
    );
    let events = format!("{:?}", b.events.lock().unwrap());
    assert!(!events.contains("probe-"), "no probed name in events");
}

#[tokio::test]
async fn invalid_key_names_are_refused_before_any_lookup_metric_or_event() {
    let b = bounded(zero_ttl()).await;
    let long = "x".repeat(129);
    let bad = [
        "",
        ".hidden",
        "with space",
        "slash/name",
        "tab\tname",
        "line\nbreak",
        "ünïcode",
        "quote\"}",
        long.as_str(),
    ];
    for name in bad {
        let who = Caller::Service("probe-svc".into());
        let errors = [
            b.engine.encrypt(name, b"x", b"").await.map(drop),
            b.engine
                .decrypt(&who, name, "sec:v1:AAAA", b"")
                .await
                .map(drop),
            b.engine
                .rewrap(&who, name, "sec:v1:AAAA", b"")
                .await
                .map(drop),
            b.engine.generate_data_key(name, 0, b"").await.map(drop),
            b.engine.sign(name, b"m").await.map(drop),
            b.engine.verify(name, b"m", "sec:v1:AAAA").await.map(drop),
            b.engine.hmac(name, b"m").await.map(drop),
            b.engine
                .verify_hmac(name, b"m", "sec:v1:AAAA")
                .await
                .map(drop),
        ];
        for e in errors {
            let e = e.unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{name:?}");
            assert_eq!(e.field.as_deref(), Some("key_name"), "{name:?}");
            assert!(name.is_empty() || !e.message.contains(name), "{e:?}");
        }
        let e = b.engine.get_key(name).await.unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::InvalidArgument, Some("name"))
        );
        let e = b
            .engine
            .restore_key(
                &ADMIN,
                "sec-backup:v2:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                name,
                None,
                "",
            )
            .await
            .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::InvalidArgument, Some("wrapping_key_name"))
        );
    }
    assert_eq!(b.spy.seen(), Vec::<String>::new(), "no lookup");
    assert!(b.events.lock().unwrap().is_empty(), "no event");
    let series = b.op_series();
    assert!(
        series.keys().all(|s| s.starts_with(r#"{key="unknown","#)
            && s.ends_with(r#"outcome="invalid_argument"}"#)),
        "{series:?}"
    );
    for leak in ["hidden", "space", "slash", "break", "quote", "xxxx"] {
        assert!(!b.metrics_text().contains(leak), "{leak}");
    }
}

#[tokio::test]
async fn names_createkey_accepted_before_stay_valid() {
    let b = bounded(zero_ttl()).await;
    let longest = "k".repeat(128);
    for name in [
        "orders",
        "Orders_2024",
        "-legacy",
        "_private",
        "a.b-c_d",
        "9lives",
        longest.as_str(),
    ] {
        b.engine
            .create_key(&ADMIN, name, KeyType::Aes256Gcm, KeyPolicy::default())
            .await
            .unwrap();
        let (ct, _) = b.engine.encrypt(name, b"x", b"").await.unwrap();
        assert!(b.engine.decrypt(&ADMIN, name, &ct, b"").await.is_ok());
        // an existing key is labelled with its own name
        assert!(
            b.op_series().contains_key(&format!(
                r#"{{key="{name}",operation="encrypt",outcome="ok"}}"#
            )),
            "{name}"
        );
    }
}

fn with_caller<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.extensions_mut()
        .insert(Caller::Service("batch-svc".into()));
    req
}

#[tokio::test]
async fn batches_over_the_item_limit_are_refused_before_any_work() {
    use crypto_svc::grpc::CryptoApi;
    use sec_proto::crypto::v1 as pb;
    use sec_proto::crypto::v1::crypto_service_server::CryptoService;

    let b = bounded(Limits {
        max_batch_items: 3,
        ..zero_ttl()
    })
    .await;
    b.engine
        .create_key(&ADMIN, "orders", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    b.spy.seen();
    b.events.lock().unwrap().clear();
    let api = CryptoApi {
        engine: b.engine.clone(),
    };
    let enc = |n: usize, key: &str| pb::BatchEncryptRequest {
        key_name: key.into(),
        items: vec![
            pb::BatchEncryptItem {
                plaintext: b"p".to_vec(),
                associated_data: vec![],
            };
            n
        ],
    };
    let dec = |n: usize| pb::BatchDecryptRequest {
        key_name: "orders".into(),
        items: vec![
            pb::BatchDecryptItem {
                ciphertext: "sec:v1:AAAA".into(),
                associated_data: vec![],
            };
            n
        ],
    };

    let over = api
        .batch_encrypt(with_caller(enc(4, "orders")))
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    assert!(over.message().contains("the limit is 3"), "{over:?}");
    let over = api.batch_decrypt(with_caller(dec(4))).await.unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    assert!(over.message().contains("4 items"), "{over:?}");
    let huge = api
        .batch_decrypt(with_caller(dec(100_000)))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), tonic::Code::InvalidArgument);
    // an invalid key name fails the whole batch once, not once per item
    let bad = api
        .batch_encrypt(with_caller(enc(2, "no such/name")))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(b.spy.seen(), Vec::<String>::new(), "no key was looked up");
    assert!(b.events.lock().unwrap().is_empty(), "no item was attempted");
    assert!(b.op_series().is_empty(), "no operation ran");

    let ok = api
        .batch_encrypt(with_caller(enc(3, "orders")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results.len(), 3, "exactly at the limit is fine");
    let ok = api
        .batch_decrypt(with_caller(dec(3)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results.len(), 3);
}

#[test]
fn max_batch_items_is_configurable_within_bounds() {
    use crypto_svc::CryptoConfig;
    let load = |v: Option<&str>| {
        let env: std::collections::BTreeMap<String, String> = v
            .map(|v| ("SEC_CRYPTO__MAX_BATCH_ITEMS".to_string(), v.to_string()))
            .into_iter()
            .collect();
        sec_common::spec::load_config(None, &env, &[&crypto_svc::SPEC])
    };
    let items = |c: sec_common::config::Config| {
        c.section::<CryptoConfig>("crypto").unwrap().max_batch_items
    };
    assert_eq!(items(load(None).unwrap()), 1000);
    assert_eq!(items(load(Some("10000")).unwrap()), 10_000);
    for bad in ["0", "10001"] {
        let err = load(Some(bad)).unwrap_err().to_string();
        assert!(err.contains("crypto.max_batch_items"), "{bad}: {err}");
    }
}

#[tokio::test]
async fn decrypt_failures_are_aggregated_per_key_and_reason() {
    let b = bounded(Limits {
        failure_window: Duration::from_secs(10),
        failure_keys: 2,
        ..zero_ttl()
    })
    .await;
    b.engine
        .create_key(&ADMIN, "orders", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    b.events.lock().unwrap().clear();
    let who = Caller::Service("billing-svc".into());
    let failed = |b: &Bounded| -> Vec<SecurityEvent> {
        b.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.r#type == "sec.crypto.decrypt.failed")
            .cloned()
            .collect()
    };

    for _ in 0..100 {
        assert_eq!(
            code(b.engine.decrypt(&who, "orders", "sec:v1:AAAA", b"").await),
            ErrorCode::InvalidArgument
        );
        b.clock.advance(chrono::Duration::milliseconds(20));
    }
    let first = failed(&b);
    assert_eq!(first.len(), 1, "the first failure is reported at once");
    assert_eq!(first[0].details["aggregation"], "first");
    assert_eq!(b.engine.tick(), 0, "the window is still open");
    b.clock.advance(chrono::Duration::seconds(10));
    assert_eq!(b.engine.tick(), 1);
    let events = failed(&b);
    assert_eq!(events.len(), 2, "one flood, two events");
    assert_eq!(events.iter().map(count).sum::<u64>(), 100);
    let s = &events[1];
    assert_eq!(s.subject, "orders");
    assert_eq!(s.details["reason"], "invalid_argument");
    assert_eq!(s.details["aggregation"], "summary");
    assert_eq!(s.details["count"], "99");
    assert_eq!(s.details["window_seconds"], "10");
    assert_eq!(s.details["first_at"], "2026-01-01T00:00:00.020000Z");
    assert_eq!(s.details["last_at"], "2026-01-01T00:00:01.980000Z");
    assert_eq!(s.actor.as_ref().unwrap().id, "billing-svc");
    assert_eq!(
        s.outcome,
        sec_common::events::Outcome::Failure as i32,
        "still a failure event"
    );
    assert_eq!(b.engine.tick(), 0, "nothing left to report");

    // more keys than the cap (2): the rest share the `other` bucket
    for k in ["k1", "k2", "k3", "k4"] {
        b.engine
            .create_key(&ADMIN, k, KeyType::Aes256Gcm, KeyPolicy::default())
            .await
            .unwrap();
    }
    b.events.lock().unwrap().clear();
    for k in ["k1", "k2", "k3", "k4"] {
        for _ in 0..5 {
            b.engine.decrypt(&who, k, "garbage", b"").await.unwrap_err();
        }
    }
    assert_eq!(b.engine.flush_events(), 3, "k1, k2 and other");
    let events = failed(&b);
    assert!(events.len() <= 6, "{}", events.len());
    let total = |subject: &str| -> u64 {
        events
            .iter()
            .filter(|e| e.subject == subject)
            .map(count)
            .sum()
    };
    assert_eq!((total("k1"), total("k2"), total("other")), (5, 5, 10));
    assert!(
        events
            .iter()
            .filter(|e| e.subject == "other")
            .all(|e| e.details["bucket"] == "other")
    );
    assert!(
        !events
            .iter()
            .any(|e| e.subject == "k3" || e.subject == "k4")
    );
}

// ---- no lost policy change: compare-and-set and an atomic protected delete ----------

async fn pg_fixture() -> Option<Fixture> {
    let store = pg_store().await?;
    let (engine, events, clock) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        64 * 1024,
    );
    Some(Fixture {
        engine,
        events,
        clock,
        store,
        _dir: None,
    })
}

/// One change to one field of a key's policy; equal changes set equal values.
#[derive(Debug, Clone, Copy)]
enum Change {
    MinDecryption,
    MinEncryption,
    Rotation,
    Deletion,
    Export,
}

impl Change {
    fn update(self) -> PolicyUpdate {
        let mut u = PolicyUpdate::default();
        match self {
            Change::MinDecryption => u.min_decryption_version = Some(2),
            Change::MinEncryption => u.min_encryption_version = Some(3),
            Change::Rotation => u.rotation_period_seconds = Some(7200),
            Change::Deletion => u.deletion_allowed = Some(true),
            Change::Export => u.exportable = Some(true),
        }
        u
    }

    fn visible_in(self, p: &KeyPolicy) -> bool {
        match self {
            Change::MinDecryption => p.min_decryption_version == 2,
            Change::MinEncryption => p.min_encryption_version == 3,
            Change::Rotation => p.rotation_period_seconds == 7200,
            Change::Deletion => p.deletion_allowed,
            Change::Export => p.exportable,
        }
    }
}

const CHANGES: [Change; 5] = [
    Change::MinDecryption,
    Change::MinEncryption,
    Change::Rotation,
    Change::Deletion,
    Change::Export,
];

/// Back to the defaults between rounds, except `exportable`, which is one-way: a round
/// that set it leaves it set, so its change stays visible (a lost update of the other
/// fields is still caught).
async fn reset_policy(f: &Fixture, name: &str) {
    let reset = PolicyUpdate {
        min_decryption_version: Some(0),
        min_encryption_version: Some(0),
        rotation_period_seconds: Some(0),
        deletion_allowed: Some(false),
        exportable: None,
        allowed_services: None,
        expected_policy_version: None,
    };
    f.engine.update_policy(&ADMIN, name, reset).await.unwrap();
}

async fn concurrent_policy_updates_lose_nothing(f: &Fixture) {
    let name = "policy-race";
    f.engine
        .create_key(&ADMIN, name, KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    for _ in 0..2 {
        f.engine.rotate_key(&ADMIN, name).await.unwrap();
    }

    // Rounds of 8 parallel callers updating different fields of the same key (some
    // fields twice, to the same value), without retrying: each call is either OK and its
    // change is in the final state, or ABORTED. Never OK-and-overwritten.
    for round in 0..8 {
        reset_policy(f, name).await;
        let mine: Vec<Change> = CHANGES.iter().chain(&CHANGES[..3]).copied().collect();
        let results = futures::future::join_all(
            mine.iter()
                .map(|c| f.engine.update_policy(&ADMIN, name, c.update())),
        )
        .await;
        let final_policy = f.engine.get_key(name).await.unwrap().record.policy;
        let mut ok = 0;
        for (c, r) in mine.iter().zip(&results) {
            match r {
                Ok(_) => {
                    ok += 1;
                    assert!(
                        c.visible_in(&final_policy),
                        "round {round}: {c:?} returned OK but was overwritten: {final_policy:?}"
                    );
                }
                Err(e) => {
                    assert_eq!(e.code, ErrorCode::Aborted, "round {round}: {c:?}: {e:?}");
                    assert_eq!(e.message, "key policy changed concurrently; retry");
                }
            }
        }
        assert!(ok >= 1, "round {round}: someone wins");
    }

    // 16 parallel callers that retry on ABORTED, as a client should: all succeed, and
    // the final state holds every change (the min_decryption_version raise included).
    reset_policy(f, name).await;
    let mine: Vec<Change> = CHANGES.iter().cycle().take(16).copied().collect();
    let results = futures::future::join_all(mine.iter().map(|c| async move {
        loop {
            match f.engine.update_policy(&ADMIN, name, c.update()).await {
                Err(e) if e.code == ErrorCode::Aborted => tokio::task::yield_now().await,
                other => return other,
            }
        }
    }))
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let view = f.engine.get_key(name).await.unwrap();
    for c in CHANGES {
        assert!(c.visible_in(&view.record.policy), "{c:?} lost: {view:?}");
    }
    let c1 = f.engine.encrypt(name, b"x", b"").await.unwrap();
    assert_eq!(c1.1, 3);

    // A caller may pin the version it read: a stale one is ABORTED and changes nothing.
    let read = view.record.policy_version;
    reset_policy(f, name).await;
    let err = f
        .engine
        .update_policy(
            &ADMIN,
            name,
            PolicyUpdate {
                rotation_period_seconds: Some(86_400),
                expected_policy_version: Some(read),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Aborted);
    let now = f.engine.get_key(name).await.unwrap().record;
    assert_eq!(
        now.policy.rotation_period_seconds, 0,
        "a stale expected version changes nothing"
    );
    assert_eq!(now.policy_version, read + 1, "only the reset wrote");
    f.engine
        .update_policy(
            &ADMIN,
            name,
            PolicyUpdate {
                rotation_period_seconds: Some(86_400),
                expected_policy_version: Some(now.policy_version),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        f.engine
            .get_key(name)
            .await
            .unwrap()
            .record
            .policy
            .rotation_period_seconds,
        86_400
    );
}

#[tokio::test]
async fn concurrent_policy_updates_lose_nothing_sqlite() {
    concurrent_policy_updates_lose_nothing(&fixture().await).await;
}

#[tokio::test]
async fn concurrent_policy_updates_lose_nothing_postgres() {
    if let Some(f) = pg_fixture().await {
        concurrent_policy_updates_lose_nothing(&f).await;
    }
}

/// Deleters race admins protecting the key: a key that ends up protected (its update
/// returned OK) is never deleted, and a delete that returned OK came before any
/// protection.
async fn raced_delete_never_removes_a_protected_key(f: &Fixture) {
    for round in 0..10 {
        let name = format!("del-race-{round}");
        f.engine
            .create_key(
                &ADMIN,
                &name,
                KeyType::Aes256Gcm,
                KeyPolicy {
                    deletion_allowed: true,
                    ..KeyPolicy::default()
                },
            )
            .await
            .unwrap();
        let protect = || {
            f.engine.update_policy(
                &ADMIN,
                &name,
                PolicyUpdate {
                    deletion_allowed: Some(false),
                    ..Default::default()
                },
            )
        };
        // Deleters and protectors interleaved, the first protector before any deleter
        // on even rounds, after them on odd ones.
        let (protects, deletes) = if round % 2 == 0 {
            tokio::join!(
                futures::future::join_all((0..4).map(|_| protect())),
                futures::future::join_all((0..4).map(|_| f.engine.delete_key(&ADMIN, &name))),
            )
        } else {
            let (d, p) = tokio::join!(
                futures::future::join_all((0..4).map(|_| f.engine.delete_key(&ADMIN, &name))),
                futures::future::join_all((0..4).map(|_| protect())),
            );
            (p, d)
        };
        let protected = protects.iter().any(Result::is_ok);
        let deleted = deletes.iter().filter(|r| r.is_ok()).count();
        let exists = f.store.get(&name).await.unwrap().is_some();
        assert!(deleted <= 1, "round {round}: deleted once at most");
        assert_eq!(exists, deleted == 0, "round {round}");
        if protected {
            assert!(
                exists,
                "round {round}: a key whose protection returned OK was deleted"
            );
        }
        for r in &deletes {
            if let Err(e) = r {
                assert!(
                    matches!(e.code, ErrorCode::FailedPrecondition | ErrorCode::NotFound),
                    "round {round}: {e:?}"
                );
            }
        }
        for r in &protects {
            if let Err(e) = r {
                assert!(
                    matches!(e.code, ErrorCode::Aborted | ErrorCode::NotFound),
                    "round {round}: {e:?}"
                );
            }
        }
    }
    // Once protected, deletion is refused with an event, and the key keeps working.
    let name = "del-race-0";
    if f.store.get(name).await.unwrap().is_some() {
        assert_eq!(
            code(f.engine.delete_key(&ADMIN, name).await),
            ErrorCode::FailedPrecondition
        );
        assert!(types(f).contains(&"sec.crypto.key.delete_refused".to_owned()));
        assert!(f.engine.encrypt(name, b"x", b"").await.is_ok());
    }
}

#[tokio::test]
async fn raced_delete_never_removes_a_protected_key_sqlite() {
    raced_delete_never_removes_a_protected_key(&fixture().await).await;
}

#[tokio::test]
async fn raced_delete_never_removes_a_protected_key_postgres() {
    if let Some(f) = pg_fixture().await {
        raced_delete_never_removes_a_protected_key(&f).await;
    }
}

// ---- type and policy bound to the key material ------------------------------------

/// Raw access to a store's database, to tamper with rows as a database writer could.
enum Raw {
    Sqlite(sqlx::SqlitePool, #[allow(dead_code)] tempfile::TempDir),
    Pg(sqlx::PgPool),
}

impl Raw {
    async fn exec(&self, sql: &str) {
        let q = sqlx::AssertSqlSafe(sql.to_owned());
        let n = match self {
            Raw::Sqlite(p, _) => sqlx::query(q).execute(p).await.unwrap().rows_affected(),
            Raw::Pg(p) => sqlx::query(q).execute(p).await.unwrap().rows_affected(),
        };
        assert!(n > 0, "tampering matched no row: {sql}");
    }
}

async fn raw_store(pg: bool) -> Option<(Arc<dyn KeyStore>, Raw)> {
    if pg {
        let url = sec_testkit::backend_url(sec_testkit::Backend::Postgres)?;
        let schema = format!("crypto_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 4)
            .await
            .unwrap();
        crypto_svc::MIGRATIONS.postgres.run(&pool).await.unwrap();
        let store = crypto_svc::store::postgres::PgKeyStore::new(pool.clone());
        return Some((Arc::new(store), Raw::Pg(pool)));
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = sec_common::storage::connect_sqlite(&dir.path().join("crypto.db"), 4)
        .await
        .unwrap();
    crypto_svc::MIGRATIONS.sqlite.run(&pool).await.unwrap();
    let store = crypto_svc::store::sqlite::SqliteKeyStore::new(pool.clone());
    Some((Arc::new(store), Raw::Sqlite(pool, dir)))
}

fn integrity_events(events: &Mutex<Vec<SecurityEvent>>, key: &str) -> Vec<SecurityEvent> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.r#type == "sec.crypto.key.integrity_failed" && e.subject == key)
        .cloned()
        .collect()
}

async fn tampering_is_detected(pg: bool) {
    let Some((store, raw)) = raw_store(pg).await else {
        return;
    };
    let (e, events, clock) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        64 * 1024,
    );
    let aes = |n: &'static str| e.create_key(&ADMIN, n, KeyType::Aes256Gcm, KeyPolicy::default());
    for n in [
        "t-exp", "t-min", "t-type", "t-swap-a", "t-swap-b", "t-ver", "t-ok",
    ] {
        aes(n).await.unwrap();
    }
    for n in ["t-pub", "t-pub2"] {
        e.create_key(&ADMIN, n, KeyType::EcdsaP256, KeyPolicy::default())
            .await
            .unwrap();
    }
    e.create_key(&ADMIN, "t-wrap", KeyType::Rsa3072, KeyPolicy::default())
        .await
        .unwrap();
    let (pem, _, _) = e.public_key("t-wrap", 0).await.unwrap();
    for n in ["t-min", "t-ver"] {
        e.rotate_key(&ADMIN, n).await.unwrap();
    }
    e.update_policy(
        &ADMIN,
        "t-min",
        PolicyUpdate {
            min_decryption_version: Some(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (ok_ct, _) = e.encrypt("t-ok", b"still fine", b"").await.unwrap();
    assert!(
        e.backup_key(&ADMIN, "t-exp", &pem).await.is_err(),
        "not exportable"
    );

    // The tampering a database writer could do.
    raw.exec("UPDATE crypto_keys SET exportable = TRUE WHERE name = 't-exp'")
        .await;
    raw.exec("UPDATE crypto_keys SET min_decryption_version = 0 WHERE name = 't-min'")
        .await;
    raw.exec("UPDATE crypto_keys SET key_type = 'hmac-sha256' WHERE name = 't-type'")
        .await;
    raw.exec(
        "UPDATE crypto_key_versions SET public_key = \
         (SELECT public_key FROM crypto_key_versions WHERE key_name = 't-pub2' AND version = 1) \
         WHERE key_name = 't-pub' AND version = 1",
    )
    .await;
    raw.exec(
        "UPDATE crypto_key_versions SET wrapped = \
         (SELECT wrapped FROM crypto_key_versions WHERE key_name = 't-swap-b' AND version = 1) \
         WHERE key_name = 't-swap-a' AND version = 1",
    )
    .await;
    raw.exec(
        "UPDATE crypto_key_versions SET wrapped = \
         (SELECT wrapped FROM crypto_key_versions WHERE key_name = 't-ver' AND version = 1) \
         WHERE key_name = 't-ver' AND version = 2",
    )
    .await;

    let refused = |r: Result<_, sec_common::error::Error>, what: &str| {
        let err = r
            .err()
            .unwrap_or_else(|| panic!("{what}: tampered key was used"));
        assert_eq!(err.code, ErrorCode::FailedPrecondition, "{what}: {err:?}");
        assert_eq!(
            err.message, "key record failed its integrity check",
            "{what}"
        );
    };
    refused(
        e.backup_key(&ADMIN, "t-exp", &pem).await.map(|_| ()),
        "flipped exportable: backup",
    );
    refused(
        e.encrypt("t-exp", b"x", b"").await.map(|_| ()),
        "flipped exportable",
    );
    refused(
        e.encrypt("t-min", b"x", b"").await.map(|_| ()),
        "lowered min_decryption",
    );
    refused(
        e.get_key("t-min").await.map(|_| ()),
        "lowered min_decryption: get",
    );
    refused(e.hmac("t-type", b"x").await.map(|_| ()), "changed type");
    refused(
        e.encrypt("t-type", b"x", b"").await.map(|_| ()),
        "changed type",
    );
    refused(
        e.public_key("t-pub", 1).await.map(|_| ()),
        "swapped public key: export",
    );
    refused(
        e.sign("t-pub", b"m").await.map(|_| ()),
        "swapped public key: sign",
    );
    refused(
        e.encrypt("t-swap-a", b"x", b"").await.map(|_| ()),
        "material of another key",
    );
    refused(
        e.encrypt("t-ver", b"x", b"").await.map(|_| ()),
        "material of another version",
    );
    // a tampered policy cannot be laundered by an update that re-MACs it
    refused(
        e.update_policy(
            &ADMIN,
            "t-min",
            PolicyUpdate {
                rotation_period_seconds: Some(7200),
                ..Default::default()
            },
        )
        .await
        .map(|_| ()),
        "update of a tampered key",
    );
    refused(
        e.rotate_key(&ADMIN, "t-exp").await.map(|_| ()),
        "rotation of a tampered key",
    );

    // one event per key however many calls, high severity
    for key in ["t-exp", "t-min", "t-type", "t-pub", "t-swap-a", "t-ver"] {
        let ev = integrity_events(&events, key);
        assert_eq!(ev.len(), 1, "{key}: one immediate event, got {ev:?}");
        assert_eq!(ev[0].severity, sec_common::events::Severity::High as i32);
    }
    refused(
        e.encrypt("t-exp", b"x", b"").await.map(|_| ()),
        "still refused",
    );
    assert_eq!(integrity_events(&events, "t-exp").len(), 1, "aggregated");
    clock.advance(chrono::Duration::seconds(11));
    e.tick();
    assert_eq!(
        integrity_events(&events, "t-exp").len(),
        2,
        "the rest as one summary when the window closes"
    );

    // untampered keys keep working
    assert_eq!(
        e.decrypt(&ADMIN, "t-ok", &ok_ct, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"still fine"
    );
    assert!(e.sign("t-pub2", b"m").await.is_ok());
    assert!(e.encrypt("t-swap-b", b"x", b"").await.is_ok());
    assert!(integrity_events(&events, "t-ok").is_empty());

    // a removed MAC: a legacy row (never written since MACs) is backfilled at start; a
    // row written since stays refused
    raw.exec("UPDATE crypto_keys SET record_mac = NULL, policy_version = 0 WHERE name = 't-ok'")
        .await;
    raw.exec("UPDATE crypto_keys SET record_mac = NULL WHERE name = 't-swap-b'")
        .await;
    refused(e.encrypt("t-ok", b"x", b"").await.map(|_| ()), "no mac");
    assert_eq!(e.backfill_record_macs().await.unwrap(), 1);
    assert!(
        e.decrypt(&ADMIN, "t-ok", &ok_ct, b"").await.is_ok(),
        "backfilled"
    );
    refused(
        e.encrypt("t-swap-b", b"x", b"").await.map(|_| ()),
        "mac removed",
    );

    // KEK rotation keeps untampered keys valid (re-wrapped and re-MACed) and does not
    // launder tampered ones
    let (mid, _, _) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[2; 32], &[&[1; 32]]).unwrap(),
        64 * 1024,
    );
    mid.rotate_kek(&ADMIN).await.unwrap();
    let (new, _, _) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[2; 32], &[]).unwrap(),
        64 * 1024,
    );
    assert_eq!(
        new.decrypt(&ADMIN, "t-ok", &ok_ct, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"still fine"
    );
    assert!(new.sign("t-pub2", b"m").await.is_ok());
    assert!(new.public_key("t-wrap", 0).await.is_ok());
    for key in ["t-exp", "t-min", "t-type"] {
        assert_eq!(
            code(new.encrypt(key, b"x", b"").await),
            ErrorCode::FailedPrecondition,
            "{key} stays refused after a KEK rotation"
        );
    }

    // Listings flag a tampered record and withhold its public keys; others are untouched.
    let (listed, _) = new.list_keys(None, 100).await.unwrap();
    let flag = |n: &str| {
        let k = listed
            .iter()
            .find(|k| k.record.name == n)
            .unwrap_or_else(|| panic!("{n} is still listed"));
        (k.integrity_failed, k.versions.iter().all(|v| v.2.is_none()))
    };
    for n in ["t-exp", "t-min", "t-type"] {
        assert_eq!(flag(n), (true, true), "{n}");
    }
    assert!(!flag("t-ok").0);
    assert_eq!(
        flag("t-pub2"),
        (false, false),
        "an intact key keeps its public key"
    );
}

#[tokio::test]
async fn tampering_is_detected_sqlite() {
    tampering_is_detected(false).await;
}

#[tokio::test]
async fn tampering_is_detected_postgres() {
    tampering_is_detected(true).await;
}

/// Material wrapped before the key type was bound (v1) still loads, and `RotateKek`
/// re-wraps it in the current format.
#[tokio::test]
async fn v1_wrapped_material_loads_and_kek_rotation_upgrades_it() {
    let f = fixture().await;
    f.engine
        .create_key(&ADMIN, "legacy", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let (ct, _) = f.engine.encrypt("legacy", b"old", b"").await.unwrap();
    // Put v1 back the way an old release stored it: v1-wrapped, no record MAC.
    let ring = KekRing::from_bytes(&[1; 32], &[]).unwrap();
    let (_, v) = f.store.get("legacy").await.unwrap().unwrap();
    let material = ring
        .unwrap(&v[0].kek_id, "aes256-gcm", "legacy", 1, &v[0].wrapped)
        .unwrap();
    let (id, old) = ring.wrap_v1_for_tests("legacy", 1, &material).unwrap();
    assert!(
        f.store
            .rewrap_version("legacy", 1, &id, &id, &old)
            .await
            .unwrap()
    );
    assert_eq!(
        f.engine
            .decrypt(&ADMIN, "legacy", &ct, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"old"
    );
    let (rewrapped, _) = f.engine.rotate_kek(&ADMIN).await.unwrap();
    assert_eq!(
        rewrapped, 1,
        "the v1 wrapping is upgraded under the same KEK"
    );
    let (_, v) = f.store.get("legacy").await.unwrap().unwrap();
    assert!(KekRing::is_current_format(&v[0].wrapped));
    assert_eq!(
        f.engine.rotate_kek(&ADMIN).await.unwrap().0,
        0,
        "idempotent"
    );
    assert_eq!(
        f.engine
            .decrypt(&ADMIN, "legacy", &ct, b"")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"old"
    );
}

/// The backup's wrapped one-time key as a `sec:v1:` ciphertext of the wrapping key.
fn wrapped_cek_of(backup: &str) -> String {
    let b64 = backup.rsplit(':').next().unwrap();
    let raw = base64_decode(b64);
    let raw = &raw[64..]; // Ed25519 signature first
    let n = usize::from(u16::from_be_bytes([raw[0], raw[1]]));
    format!("sec:v1:{}", base64_encode(&raw[2..2 + n]))
}

/// Issue 14 item 1, the exact attack: a service caller that may use the wrapping key
/// holds a backup, calls `Decrypt(wrapping key, "sec:v1:" + wrapped key, aad = the
/// backup's OAEP label)` and opens the backup's one-time AES key. It must be refused:
/// a wrapping key has no Decrypt at all, and the label is reserved even on a general
/// RSA key (which an admin might still have backed up to, by mistake or from old docs).
async fn backup_cannot_be_opened_through_decrypt(source: &Engine, target: &Engine) {
    let service = Caller::Service("assess-svc".into());
    source
        .create_key(
            &ADMIN,
            "payroll",
            KeyType::Aes256Gcm,
            KeyPolicy {
                exportable: true,
                ..KeyPolicy::default()
            },
        )
        .await
        .unwrap();
    target
        .create_key(
            &ADMIN,
            "import",
            KeyType::Rsa4096Wrapping,
            KeyPolicy::default(),
        )
        .await
        .unwrap();
    let (pem, _, _) = target.public_key("import", 0).await.unwrap();
    let backup = source.backup_key(&ADMIN, "payroll", &pem).await.unwrap();
    let forged = wrapped_cek_of(&backup);
    for label in [&b"sec-crypto-backup:v1"[..], b"sec-crypto-backup:v2", b""] {
        assert_eq!(
            code(target.decrypt(&service, "import", &forged, label).await),
            ErrorCode::FailedPrecondition,
            "a wrapping key refuses Decrypt"
        );
    }
    assert_eq!(
        code(target.encrypt("import", b"x", b"").await),
        ErrorCode::FailedPrecondition,
        "a wrapping key refuses Encrypt"
    );
    assert_eq!(
        code(target.rewrap(&service, "import", &forged, b"").await),
        ErrorCode::FailedPrecondition
    );
    assert_eq!(
        code(target.generate_data_key("import", 32, b"").await),
        ErrorCode::FailedPrecondition
    );

    // A backup made to a general RSA key: its label is reserved, so Decrypt refuses it.
    target
        .create_key(&ADMIN, "general", KeyType::Rsa4096, KeyPolicy::default())
        .await
        .unwrap();
    let (gpem, _, _) = target.public_key("general", 0).await.unwrap();
    let backup = source.backup_key(&ADMIN, "payroll", &gpem).await.unwrap();
    let forged = wrapped_cek_of(&backup);
    for label in [&b"sec-crypto-backup:v1"[..], b"sec-crypto-backup:v2"] {
        assert_eq!(
            code(target.decrypt(&service, "general", &forged, label).await),
            ErrorCode::InvalidArgument,
            "reserved label refused"
        );
    }
    // ... and cannot be restored through it either.
    assert_eq!(
        code(
            target
                .restore_key(
                    &ADMIN,
                    &backup,
                    "general",
                    None,
                    &source.installation_public_key().await.unwrap().0
                )
                .await
        ),
        ErrorCode::FailedPrecondition
    );

    // The general RSA key still works for callers, and every AAD-taking operation
    // refuses the reserved namespace.
    let (ct, _) = target
        .encrypt("general", b"hello", b"tenant-1")
        .await
        .unwrap();
    assert_eq!(
        target
            .decrypt(&service, "general", &ct, b"tenant-1")
            .await
            .unwrap()
            .0
            .as_slice(),
        b"hello"
    );
    assert_eq!(
        code(
            target
                .encrypt("general", b"x", b"sec-crypto-backup:v1")
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            target
                .rewrap(&service, "general", &ct, b"sec-crypto:x")
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(target.generate_data_key("general", 32, b"sec-crypto").await),
        ErrorCode::InvalidArgument
    );
    // the envelope's own label is a caller protocol and stays usable
    let (_, wrapped, _) = target
        .generate_data_key("general", 32, b"sec-envelope:v1")
        .await
        .unwrap();
    assert!(
        target
            .decrypt(&service, "general", &wrapped, b"sec-envelope:v1")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn backup_cannot_be_opened_through_decrypt_sqlite() {
    let source = fixture().await;
    let target = fixture().await;
    backup_cannot_be_opened_through_decrypt(&source.engine, &target.engine).await;
}

#[tokio::test]
async fn backup_cannot_be_opened_through_decrypt_postgres() {
    let (Some(s), Some(t)) = (pg_store().await, pg_store().await) else {
        return;
    };
    let (source, _, _) = engine_on(s, KekRing::from_bytes(&[1; 32], &[]).unwrap(), 64 * 1024);
    let (target, _, _) = engine_on(t, KekRing::from_bytes(&[2; 32], &[]).unwrap(), 64 * 1024);
    backup_cannot_be_opened_through_decrypt(&source, &target).await;
}

/// Issue 14 item 8: `exportable` is one-way. Turning it off is refused and changes
/// nothing (not even the other fields of the same update); setting it again is a no-op.
async fn exportable_is_one_way(engine: &Engine) {
    engine
        .create_key(&ADMIN, "once", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    // false -> false is fine while it was never set
    let set = |exportable, deletion_allowed| PolicyUpdate {
        exportable: Some(exportable),
        deletion_allowed,
        ..Default::default()
    };
    engine
        .update_policy(&ADMIN, "once", set(false, None))
        .await
        .unwrap();
    let k = engine
        .update_policy(&ADMIN, "once", set(true, None))
        .await
        .unwrap();
    assert!(k.record.policy.exportable);
    let e = engine
        .update_policy(&ADMIN, "once", set(false, Some(true)))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert_eq!(e.field.as_deref(), Some("exportable"));
    let k = engine.get_key("once").await.unwrap();
    assert!(k.record.policy.exportable, "still exportable");
    assert!(
        !k.record.policy.deletion_allowed,
        "the refused update changed nothing"
    );
    // true again, or an update that leaves it alone: accepted
    engine
        .update_policy(&ADMIN, "once", set(true, Some(true)))
        .await
        .unwrap();
    // created exportable: the same rule
    engine
        .create_key(
            &ADMIN,
            "born",
            KeyType::Ed25519,
            KeyPolicy {
                exportable: true,
                ..KeyPolicy::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        code(engine.update_policy(&ADMIN, "born", set(false, None)).await),
        ErrorCode::FailedPrecondition
    );
}

#[tokio::test]
async fn exportable_is_one_way_sqlite() {
    exportable_is_one_way(&fixture().await.engine).await;
}

#[tokio::test]
async fn exportable_is_one_way_postgres() {
    let Some(store) = pg_store().await else {
        return;
    };
    let (engine, _, _) = engine_on(store, KekRing::from_bytes(&[1; 32], &[]).unwrap(), 1024);
    exportable_is_one_way(&engine).await;
}

/// A backup as a source would make it, from a document of the test's choosing, sealed to
/// `target_pem` and signed by `signer` — what an attacker can make with a target's public
/// wrapping key and a signing key (their own, or a stolen or buggy source's).
fn forge(signer: &Loaded, target_pem: &str, doc: &serde_json::Value) -> String {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
    let label = b"sec-crypto-backup:v2";
    let cek = [7_u8; 32];
    let nonce = [9_u8; 12];
    let mut body = serde_json::to_vec(doc).unwrap();
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek).unwrap())
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(label),
            &mut body,
        )
        .unwrap();
    let der = crypto_svc::material::pem_to_der(target_pem).unwrap();
    let oaep = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(&der).unwrap()).unwrap();
    let mut wrapped = vec![0_u8; oaep.ciphertext_size()];
    let n = oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, &cek, &mut wrapped, Some(label))
        .unwrap()
        .len();
    let mut signed = (n as u16).to_be_bytes().to_vec();
    signed.extend_from_slice(&wrapped[..n]);
    signed.extend_from_slice(&nonce);
    signed.extend_from_slice(&body);
    let mut msg = b"sec-crypto-backup-signature:v2\0".to_vec();
    msg.extend_from_slice(&signed);
    let mut blob = signer.sign(&msg).unwrap();
    blob.extend_from_slice(&signed);
    format!("sec-backup:v2:{}", base64_encode(&blob))
}

/// The installation signing key of a store, read with its KEK (a stolen source).
async fn stolen_signing_key(store: &dyn KeyStore, kek: &[u8; 32]) -> Loaded {
    let (_, versions) = store
        .get(crypto_svc::engine::INSTALLATION_KEY)
        .await
        .unwrap()
        .unwrap();
    let v = &versions[0];
    let m = KekRing::from_bytes(kek, &[])
        .unwrap()
        .unwrap(
            &v.kek_id,
            "ed25519",
            crypto_svc::engine::INSTALLATION_KEY,
            v.version,
            &v.wrapped,
        )
        .unwrap();
    Loaded::load(KeyType::Ed25519, &m).unwrap()
}

fn doc(key_type: &str, material: &[&[u8]]) -> serde_json::Value {
    serde_json::json!({
        "format": "sec-crypto-backup/v2",
        "name": "forged",
        "key_type": key_type,
        "latest_version": material.len(),
        "min_decryption_version": 0,
        "min_encryption_version": 0,
        "rotation_period_seconds": 0,
        "deletion_allowed": false,
        "exportable": true,
        "created_at": "2026-01-01T00:00:00Z",
        "last_rotated_at": "2026-01-01T00:00:00Z",
        "versions": material.iter().enumerate().map(|(i, m)| serde_json::json!({
            "version": i + 1,
            "created_at": "2026-01-01T00:00:00Z",
            "material": base64_encode(m),
        })).collect::<Vec<_>>(),
    })
}

/// Issue 14 item 5: backups carry proof of origin, pinned on the target, checked before
/// anything is unwrapped; and a signed backup with impossible contents restores nothing.
/// `source_store` is the source's store under KEK `[1; 32]`.
async fn backups_prove_origin_and_are_validated(
    source: &Engine,
    source_store: &dyn KeyStore,
    attacker: &Engine,
    target: &Engine,
) {
    target
        .create_key(
            &ADMIN,
            "import",
            KeyType::Rsa4096Wrapping,
            KeyPolicy::default(),
        )
        .await
        .unwrap();
    let (wrap_pem, _, _) = target.public_key("import", 0).await.unwrap();
    let exportable = KeyPolicy {
        exportable: true,
        ..KeyPolicy::default()
    };
    source
        .create_key(&ADMIN, "payroll", KeyType::Aes256Gcm, exportable.clone())
        .await
        .unwrap();
    let backup = source
        .backup_key(&ADMIN, "payroll", &wrap_pem)
        .await
        .unwrap();
    let (pin, fp) = source.installation_public_key().await.unwrap();
    assert_eq!(fp.len(), 64);
    assert_eq!(
        source.installation_public_key().await.unwrap().0,
        pin,
        "created once"
    );
    assert!(pin.starts_with("-----BEGIN PUBLIC KEY-----"));
    // the internal key is invisible to callers
    let (listed, _) = source.list_keys(None, 100).await.unwrap();
    assert_eq!(listed.len(), 1, "only payroll is listed");
    for name in [crypto_svc::engine::INSTALLATION_KEY] {
        assert_eq!(code(source.get_key(name).await), ErrorCode::InvalidArgument);
        assert_eq!(
            code(source.sign(name, b"m").await),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(source.delete_key(&ADMIN, name).await),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(
                source
                    .create_key(&ADMIN, name, KeyType::Ed25519, KeyPolicy::default())
                    .await
            ),
            ErrorCode::InvalidArgument
        );
    }

    let (attacker_pin, _) = attacker.installation_public_key().await.unwrap();
    let refused = |r: Result<crypto_svc::engine::KeyView, sec_common::error::Error>,
                   field: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
    };
    // no pin, a malformed pin, the wrong pin, an unsigned v1 backup: refused
    refused(
        target
            .restore_key(&ADMIN, &backup, "import", None, "")
            .await,
        "source_public_key_pem",
    );
    refused(
        target
            .restore_key(&ADMIN, &backup, "import", None, &wrap_pem)
            .await,
        "source_public_key_pem",
    );
    refused(
        target
            .restore_key(&ADMIN, &backup, "import", None, &attacker_pin)
            .await,
        "backup",
    );
    let v1 = backup.replace("sec-backup:v2:", "sec-backup:v1:");
    refused(
        target.restore_key(&ADMIN, &v1, "import", None, &pin).await,
        "backup",
    );

    // The forgery of the issue: material of the attacker's choice, encrypted to the
    // target's public wrapping key, signed by the attacker's own installation key or by
    // their installation itself. Refused under the real source's pin.
    let chosen: &[u8] = &[0x41; 32];
    let own = Loaded::load(
        KeyType::Ed25519,
        &crypto_svc::material::generate(KeyType::Ed25519).unwrap(),
    )
    .unwrap();
    refused(
        target
            .restore_key(
                &ADMIN,
                &forge(&own, &wrap_pem, &doc("aes256-gcm", &[chosen])),
                "import",
                None,
                &pin,
            )
            .await,
        "backup",
    );
    attacker
        .create_key(&ADMIN, "payroll", KeyType::Aes256Gcm, exportable.clone())
        .await
        .unwrap();
    let theirs = attacker
        .backup_key(&ADMIN, "payroll", &wrap_pem)
        .await
        .unwrap();
    refused(
        target
            .restore_key(&ADMIN, &theirs, "import", None, &pin)
            .await,
        "backup",
    );
    assert_eq!(code(target.get_key("payroll").await), ErrorCode::NotFound);
    assert_eq!(code(target.get_key("forged").await), ErrorCode::NotFound);

    // the genuine backup, pinned: restored
    target
        .restore_key(&ADMIN, &backup, "import", None, &pin)
        .await
        .unwrap();

    // Signed by the real source key (stolen, or a source bug), but impossible contents:
    // every field is validated before anything is written.
    let signer = stolen_signing_key(source_store, &[1; 32]).await;
    let aes: &[u8] = &[1; 32];
    let rsa3072 = crypto_svc::material::generate(KeyType::Rsa3072).unwrap();
    let with = |mut d: serde_json::Value, k: &str, v: serde_json::Value| {
        d[k] = v;
        d
    };
    let base = doc("aes256-gcm", &[aes, aes]);
    let mut gap = base.clone();
    gap["versions"][1]["version"] = 3.into();
    let mut zero = base.clone();
    zero["versions"][0]["version"] = 0.into();
    let mut extra = base.clone();
    extra["surprise"] = true.into();
    let bad_docs = [
        (
            "latest above the versions",
            with(base.clone(), "latest_version", 3.into()),
        ),
        (
            "latest below the versions",
            with(base.clone(), "latest_version", 1.into()),
        ),
        ("versions not contiguous", gap),
        ("version zero", zero),
        (
            "min_decryption_version above latest",
            with(base.clone(), "min_decryption_version", 3.into()),
        ),
        (
            "min_encryption_version above latest",
            with(base.clone(), "min_encryption_version", 3.into()),
        ),
        (
            "min_encryption below min_decryption",
            with(
                with(base.clone(), "min_decryption_version", 2.into()),
                "min_encryption_version",
                1.into(),
            ),
        ),
        (
            "rotation period too long (panicked the rotation task)",
            with(
                base.clone(),
                "rotation_period_seconds",
                10_000_000_000_000_u64.into(),
            ),
        ),
        (
            "rotation period too short",
            with(base.clone(), "rotation_period_seconds", 60.into()),
        ),
        ("invalid name", with(base.clone(), "name", "../etc".into())),
        (
            "reserved name",
            with(base.clone(), "name", ".installation-backup-signing".into()),
        ),
        ("unknown type", with(base.clone(), "key_type", "des".into())),
        (
            "unknown format",
            with(base.clone(), "format", "sec-crypto-backup/v9".into()),
        ),
        ("unknown field", extra),
        ("short AES key", doc("aes256-gcm", &[&[1; 16]])),
        ("short HMAC key", doc("hmac-sha256", &[&[1; 8]])),
        ("RSA modulus not of the type", doc("rsa-4096", &[&rsa3072])),
        ("not an EC key", doc("ecdsa-p256", &[&[4; 65]])),
        ("not an Ed25519 key", doc("ed25519", &[aes])),
        ("no versions", doc("aes256-gcm", &[])),
    ];
    for (why, d) in bad_docs {
        let r = target
            .restore_key(
                &ADMIN,
                &forge(&signer, &wrap_pem, &d),
                "import",
                Some("bad"),
                &pin,
            )
            .await;
        assert_eq!(code(r), ErrorCode::InvalidArgument, "{why}");
        assert_eq!(
            code(target.get_key("bad").await),
            ErrorCode::NotFound,
            "{why}"
        );
    }
    // the harness itself makes restorable backups
    let ok = with(base, "min_decryption_version", 2.into());
    let k = target
        .restore_key(
            &ADMIN,
            &forge(&signer, &wrap_pem, &ok),
            "import",
            Some("good"),
            &pin,
        )
        .await
        .unwrap();
    assert_eq!(k.record.latest_version, 2);
    assert_eq!(k.record.policy.min_decryption_version, 2);
}

#[tokio::test]
async fn backups_prove_origin_and_are_validated_sqlite() {
    let source = fixture().await;
    let attacker = fixture().await;
    let target = fixture().await;
    backups_prove_origin_and_are_validated(
        &source.engine,
        source.store.as_ref(),
        &attacker.engine,
        &target.engine,
    )
    .await;
}

#[tokio::test]
async fn backups_prove_origin_and_are_validated_postgres() {
    let (Some(s), Some(a), Some(t)) = (pg_store().await, pg_store().await, pg_store().await) else {
        return;
    };
    let kek = |b| KekRing::from_bytes(&[b; 32], &[]).unwrap();
    let (source, _, _) = engine_on(s.clone(), kek(1), 64 * 1024);
    let (attacker, _, _) = engine_on(a, kek(3), 64 * 1024);
    let (target, _, _) = engine_on(t, kek(2), 64 * 1024);
    backups_prove_origin_and_are_validated(&source, s.as_ref(), &attacker, &target).await;
}

// ---- per-key service access ---------------------------------------------------------

fn denied<T>(r: Result<tonic::Response<T>, tonic::Status>) {
    let s = r.map(|_| ()).unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        !s.message().contains("token-svc"),
        "who may is not revealed"
    );
}

fn as_service<T>(id: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(Caller::Service(id.into()));
    req
}

/// A key limited to token-svc: token-svc uses it, assess-svc gets PERMISSION_DENIED on
/// every operation (over the gRPC handlers, as the host calls them), the admin keeps
/// every right, the list is validated, shown, changeable, and covered by the record MAC.
async fn services_are_limited_per_key(pg: bool) {
    use crypto_svc::grpc::CryptoApi;
    use sec_proto::crypto::v1 as pb;
    use sec_proto::crypto::v1::crypto_service_server::CryptoService;

    let Some((store, raw)) = raw_store(pg).await else {
        return;
    };
    let (engine, events, _) = engine_on(
        store.clone(),
        KekRing::from_bytes(&[1; 32], &[]).unwrap(),
        64 * 1024,
    );
    let limited = KeyPolicy {
        allowed_services: vec!["token-svc".into(), "token-svc".into()],
        ..KeyPolicy::default()
    };
    let k = engine
        .create_key(&ADMIN, "token-wrap", KeyType::Aes256Gcm, limited.clone())
        .await
        .unwrap();
    assert_eq!(
        k.record.policy.allowed_services,
        ["token-svc"],
        "deduplicated"
    );
    engine
        .create_key(&ADMIN, "token-sign", KeyType::Ed25519, limited)
        .await
        .unwrap();
    engine
        .create_key(&ADMIN, "open", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let api = CryptoApi {
        engine: Arc::new(engine),
    };
    let engine = &api.engine;
    let encrypt = |who: &str, key: &str| {
        api.encrypt(as_service(
            who,
            pb::EncryptRequest {
                key_name: key.into(),
                plaintext: b"secret".to_vec(),
                associated_data: vec![],
            },
        ))
    };
    let ct = encrypt("token-svc", "token-wrap")
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    denied(encrypt("assess-svc", "token-wrap").await);
    denied(
        api.decrypt(as_service(
            "assess-svc",
            pb::DecryptRequest {
                key_name: "token-wrap".into(),
                ciphertext: ct.clone(),
                associated_data: vec![],
            },
        ))
        .await,
    );
    denied(
        api.rewrap(as_service(
            "assess-svc",
            pb::RewrapRequest {
                key_name: "token-wrap".into(),
                ciphertext: ct.clone(),
                associated_data: vec![],
            },
        ))
        .await,
    );
    denied(
        api.generate_data_key(as_service(
            "assess-svc",
            pb::GenerateDataKeyRequest {
                key_name: "token-wrap".into(),
                ..Default::default()
            },
        ))
        .await,
    );
    denied(
        api.batch_encrypt(as_service(
            "assess-svc",
            pb::BatchEncryptRequest {
                key_name: "token-wrap".into(),
                items: vec![pb::BatchEncryptItem::default()],
            },
        ))
        .await,
    );
    denied(
        api.batch_decrypt(as_service(
            "assess-svc",
            pb::BatchDecryptRequest {
                key_name: "token-wrap".into(),
                items: vec![pb::BatchDecryptItem {
                    ciphertext: ct.clone(),
                    ..Default::default()
                }],
            },
        ))
        .await,
    );
    denied(
        api.sign(as_service(
            "assess-svc",
            pb::SignRequest {
                key_name: "token-sign".into(),
                message: b"m".to_vec(),
            },
        ))
        .await,
    );
    denied(
        api.get_public_key(as_service(
            "assess-svc",
            pb::GetPublicKeyRequest {
                key_name: "token-sign".into(),
                version: 0,
            },
        ))
        .await,
    );
    // the allowed service uses everything; unrestricted keys stay open to all services
    let pt = api
        .decrypt(as_service(
            "token-svc",
            pb::DecryptRequest {
                key_name: "token-wrap".into(),
                ciphertext: ct.clone(),
                associated_data: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pt.plaintext, b"secret");
    assert!(encrypt("assess-svc", "open").await.is_ok());
    // the admin keeps management and use
    assert!(engine.authorize(&ADMIN, "token-wrap").await.is_ok());
    assert!(
        api.encrypt({
            let mut r = tonic::Request::new(pb::EncryptRequest {
                key_name: "token-wrap".into(),
                plaintext: b"x".to_vec(),
                associated_data: vec![],
            });
            r.extensions_mut().insert(Caller::Admin);
            r
        })
        .await
        .is_ok()
    );

    // validated: count, length, syntax
    let set = |v: Vec<String>| PolicyUpdate {
        allowed_services: Some(v),
        ..Default::default()
    };
    for bad in [
        (0..33).map(|i| format!("svc-{i}")).collect::<Vec<_>>(),
        vec!["a".repeat(257)],
        vec![String::new()],
        vec!["two words".into()],
        vec!["svc\n".into()],
    ] {
        let err = engine
            .update_policy(&ADMIN, "open", set(bad))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert_eq!(err.field.as_deref(), Some("allowed_services"));
    }
    assert_eq!(
        code(
            engine
                .create_key(
                    &ADMIN,
                    "bad-list",
                    KeyType::Aes256Gcm,
                    KeyPolicy {
                        allowed_services: vec!["a b".into()],
                        ..KeyPolicy::default()
                    },
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
    let max: Vec<String> = (0..32).map(|i| format!("spiffe://sec/svc-{i}")).collect();
    engine
        .update_policy(&ADMIN, "open", set(max))
        .await
        .unwrap();
    denied(encrypt("assess-svc", "open").await);

    // changeable: widening to assess-svc takes effect at once; clearing lifts the limit
    let k = engine
        .update_policy(
            &ADMIN,
            "token-wrap",
            set(vec!["token-svc".into(), "assess-svc".into()]),
        )
        .await
        .unwrap();
    assert_eq!(
        k.record.policy.allowed_services,
        ["assess-svc", "token-svc"]
    );
    assert!(encrypt("assess-svc", "token-wrap").await.is_ok());
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.subject == "token-wrap"
                && e.details.get("allowed_services").map(String::as_str)
                    == Some("assess-svc,token-svc")),
        "config_updated names the new list"
    );
    engine
        .update_policy(&ADMIN, "token-wrap", set(vec!["token-svc".into()]))
        .await
        .unwrap();
    denied(encrypt("assess-svc", "token-wrap").await);

    // a database writer cannot widen or clear the list: the record MAC covers it
    raw.exec("UPDATE crypto_keys SET allowed_services = '[]' WHERE name = 'token-wrap'")
        .await;
    let s = encrypt("assess-svc", "token-wrap").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert_eq!(
        code(engine.get_key("token-wrap").await),
        ErrorCode::FailedPrecondition
    );
    // nor restrict an open key to lock out its users (the MAC changes too)
    raw.exec(r#"UPDATE crypto_keys SET allowed_services = '["x"]' WHERE name = 'token-sign'"#)
        .await;
    assert_eq!(
        code(engine.get_key("token-sign").await),
        ErrorCode::FailedPrecondition
    );
}

#[tokio::test]
async fn services_are_limited_per_key_sqlite() {
    services_are_limited_per_key(false).await;
}

#[tokio::test]
async fn services_are_limited_per_key_postgres() {
    services_are_limited_per_key(true).await;
}

// ---- bounded nonce use ----------------------------------------------------------------

fn nonce_limits(bound: u64, block: u64) -> Limits {
    Limits {
        cache_ttl: Duration::from_millis(0),
        max_encryptions_per_version: bound,
        encryption_reservation: block,
        ..Limits::default()
    }
}

/// With a bound of 10, the 11th encryption is under version 2 and old ciphertexts still
/// decrypt; concurrent encryptions from two engines (replicas) never exceed the bound per
/// version; a new engine on the same store (a restart) does not reset the count.
async fn nonce_use_is_bounded(store: Arc<dyn KeyStore>) {
    let kek = || KekRing::from_bytes(&[1; 32], &[]).unwrap();
    let (a, events, _) = engine_with(
        store.clone(),
        kek(),
        nonce_limits(10, 4),
        CryptoMetrics::unregistered(),
    );
    for t in [KeyType::Aes256Gcm, KeyType::Chacha20Poly1305] {
        let name = format!("bounded-{}", t.name());
        a.create_key(&ADMIN, &name, t, KeyPolicy::default())
            .await
            .unwrap();
        let mut cts = Vec::new();
        for i in 0..10 {
            let (ct, v) = a
                .encrypt(&name, format!("m{i}").as_bytes(), b"")
                .await
                .unwrap();
            assert_eq!(v, 1, "encryption {} is under version 1", i + 1);
            cts.push(ct);
        }
        let (ct, v) = a.encrypt(&name, b"eleventh", b"").await.unwrap();
        assert_eq!(v, 2, "the 11th encryption rotated the key");
        for (i, ct) in cts.iter().enumerate() {
            let (pt, v) = a.decrypt(&ADMIN, &name, ct, b"").await.unwrap();
            assert_eq!((pt.as_slice(), v), (format!("m{i}").as_bytes(), 1));
        }
        assert_eq!(a.decrypt(&ADMIN, &name, &ct, b"").await.unwrap().1, 2);
        let view = a.get_key(&name).await.unwrap();
        assert!(view.versions[0].3 >= 10, "GetKey shows the count of v1");
        assert!(view.versions[1].3 >= 1, "and of v2");
    }
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.r#type == "sec.crypto.key.rotated"
                && e.details.get("reason").map(String::as_str) == Some("encryption_bound")),
        "the automatic rotation is an event with its reason"
    );
    // data keys and rewraps draw nonces too
    a.create_key(&ADMIN, "dk", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let mut last = 0;
    for _ in 0..10 {
        last = a.generate_data_key("dk", 32, b"").await.unwrap().2;
    }
    assert_eq!(last, 1);
    let (ct, _) = a.encrypt("dk", b"x", b"").await.unwrap();
    let (re, v) = a.rewrap(&ADMIN, "dk", &ct, b"").await.unwrap();
    assert_eq!(v, 2, "rewrap counts");
    assert!(re.starts_with("sec:v2:"));
    // deterministic AES-GCM-SIV and RSA do not count
    a.create_key(&ADMIN, "siv", KeyType::Aes256GcmSiv, KeyPolicy::default())
        .await
        .unwrap();
    for i in 0..20 {
        assert_eq!(a.encrypt("siv", &[i], b"").await.unwrap().1, 1);
    }

    // concurrency: two replicas, 60 encryptions at once, at most 10 per version
    let (b, _, _) = engine_with(
        store.clone(),
        kek(),
        nonce_limits(10, 3),
        CryptoMetrics::unregistered(),
    );
    a.create_key(&ADMIN, "race", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    let results = futures::future::join_all((0..60).map(|i| {
        let e = if i % 2 == 0 { &a } else { &b };
        async move { e.encrypt("race", b"x", b"").await }
    }))
    .await;
    let mut per_version = std::collections::BTreeMap::<u32, u32>::new();
    for r in results {
        let (ct, v) = r.unwrap();
        *per_version.entry(v).or_default() += 1;
        assert_eq!(a.decrypt(&ADMIN, "race", &ct, b"").await.unwrap().1, v);
    }
    assert!(
        per_version.values().all(|n| *n <= 10),
        "no version exceeds the bound: {per_version:?}"
    );
    assert!(per_version.len() >= 6);

    // restart: a new engine continues from the stored count
    a.create_key(&ADMIN, "restart", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    for _ in 0..6 {
        assert_eq!(a.encrypt("restart", b"x", b"").await.unwrap().1, 1);
    }
    drop(a);
    let (c, _, _) = engine_with(
        store,
        kek(),
        nonce_limits(10, 4),
        CryptoMetrics::unregistered(),
    );
    assert!(c.get_key("restart").await.unwrap().versions[0].3 >= 6);
    let mut under_v1 = 6;
    for _ in 0..10 {
        if c.encrypt("restart", b"x", b"").await.unwrap().1 == 1 {
            under_v1 += 1;
        }
    }
    assert!(
        under_v1 <= 10,
        "the restart did not reset the count: {under_v1}"
    );
    assert_eq!(c.get_key("restart").await.unwrap().record.latest_version, 2);
}

#[tokio::test]
async fn nonce_use_is_bounded_sqlite() {
    let (store, _dir) = sqlite_store().await;
    nonce_use_is_bounded(store).await;
}

#[tokio::test]
async fn nonce_use_is_bounded_postgres() {
    if let Some(store) = pg_store().await {
        nonce_use_is_bounded(store).await;
    }
}

// ---- limits apply to decoded sizes ---------------------------------------------------

/// A plaintext of exactly the limit encrypts, and its ciphertext (longer as base64)
/// decrypts and rewraps: the limit is on the decoded size, never on the text. One byte
/// more is refused, as is text no key type could have produced, before any decoding.
async fn payload_limit_applies_to_decoded_sizes(f: &Fixture) {
    let limit = f.engine.limits().max_payload_bytes;
    let at_limit: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
    let caller = Caller::Service("test".into());
    for t in [
        KeyType::Aes256Gcm,
        KeyType::Chacha20Poly1305,
        KeyType::Aes256GcmSiv,
    ] {
        let name = format!("lim-{}", t.name());
        f.engine
            .create_key(&ADMIN, &name, t, KeyPolicy::default())
            .await
            .unwrap();
        let (ct, _) = f.engine.encrypt(&name, &at_limit, b"ctx").await.unwrap();
        assert!(ct.len() > limit, "the text is longer than the limit");
        let (pt, _) = f.engine.decrypt(&caller, &name, &ct, b"ctx").await.unwrap();
        assert_eq!(pt.as_slice(), at_limit.as_slice(), "{t:?}");
        let (rewrapped, _) = f.engine.rewrap(&caller, &name, &ct, b"ctx").await.unwrap();
        let (pt, _) = f
            .engine
            .decrypt(&caller, &name, &rewrapped, b"ctx")
            .await
            .unwrap();
        assert_eq!(pt.as_slice(), at_limit.as_slice(), "{t:?} after rewrap");

        // limit + 1: refused on encrypt, and a ciphertext body one byte longer than any
        // the limit allows is refused on decrypt and rewrap.
        let over = vec![7_u8; limit + 1];
        let e = f.engine.encrypt(&name, &over, b"").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let forged = format!("sec:v1:{}", base64_encode(&vec![0_u8; limit + 1 + 28]));
        for e in [
            f.engine
                .decrypt(&caller, &name, &forged, b"")
                .await
                .unwrap_err(),
            f.engine
                .rewrap(&caller, &name, &forged, b"")
                .await
                .unwrap_err(),
        ] {
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{t:?}");
            assert_eq!(e.field.as_deref(), Some("ciphertext"));
            assert!(e.message.contains("limit"), "{}", e.message);
        }
        // Far longer than any ciphertext: refused without decoding.
        let huge = format!("sec:v1:{}", "A".repeat(limit * 2));
        let e = f
            .engine
            .decrypt(&caller, &name, &huge, b"")
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("limit"), "{}", e.message);
    }
    // RSA: the body is one modulus whatever the limit; a longer one is refused.
    f.engine
        .create_key(&ADMIN, "lim-rsa", KeyType::Rsa3072, KeyPolicy::default())
        .await
        .unwrap();
    let (ct, _) = f.engine.encrypt("lim-rsa", &[5; 318], b"").await.unwrap();
    let (pt, _) = f
        .engine
        .decrypt(&caller, "lim-rsa", &ct, b"")
        .await
        .unwrap();
    assert_eq!(pt.as_slice(), &[5; 318][..]);
    let long = format!("sec:v1:{}", base64_encode(&[0; 385]));
    assert_eq!(
        code(f.engine.decrypt(&caller, "lim-rsa", &long, b"").await),
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn payload_limit_applies_to_decoded_sizes_sqlite() {
    payload_limit_applies_to_decoded_sizes(&fixture().await).await;
}

#[tokio::test]
async fn payload_limit_applies_to_decoded_sizes_postgres() {
    let Some(f) = pg_fixture().await else {
        return;
    };
    payload_limit_applies_to_decoded_sizes(&f).await;
}

/// The server's message limit covers the worst-case BatchEncrypt response at the item and
/// payload limits: a real response, every item the longest ciphertext possible (an
/// RSA-4096-sized body beyond its plaintext share, a 10-digit version), encodes within it.
#[test]
fn message_limit_covers_the_worst_batch_response() {
    use prost::Message as _;
    use sec_proto::crypto::v1 as pb;
    for (items, payload) in [(1, 1), (10_000, 1), (1000, 4 << 20), (3, 4 << 20)] {
        let limits = Limits {
            max_batch_items: items,
            max_payload_bytes: payload,
            ..Limits::default()
        };
        let share = payload / items;
        let results = (0..items)
            .map(|i| {
                let pt = if i == 0 {
                    payload - share * (items - 1)
                } else {
                    share
                };
                pb::BatchEncryptResult {
                    result: Some(pb::batch_encrypt_result::Result::Ok(pb::EncryptResponse {
                        ciphertext: format!(
                            "sec:v4294967295:{}",
                            "A".repeat((pt + 512).div_ceil(3) * 4)
                        ),
                        key_version: u32::MAX,
                    })),
                }
            })
            .collect();
        let encoded = pb::BatchEncryptResponse { results }.encoded_len();
        let bound = Limits::batch_encrypt_response_bound(items, payload);
        assert!(
            encoded <= bound,
            "{items} items, {payload} bytes: {encoded} > {bound}"
        );
        assert!(limits.max_message_bytes() >= bound);
        assert!(limits.max_message_bytes() > 2 * payload);
    }
}

// ---- rotation period bound -----------------------------------------------------------

/// `rotation_period_seconds` is bounded (ten years) on create and update, and a stored
/// row beyond the bound (written before it, or by a database writer) neither panics nor
/// stops the rotation of the other keys.
async fn rotation_period_is_bounded(f: &Fixture) {
    use crypto_svc::engine::MAX_ROTATION_PERIOD_SECONDS;
    let huge = 10_u64.pow(13);
    for period in [huge, MAX_ROTATION_PERIOD_SECONDS + 1, u64::MAX, 3599] {
        let e = f
            .engine
            .create_key(
                &ADMIN,
                "too-long",
                KeyType::Aes256Gcm,
                KeyPolicy {
                    rotation_period_seconds: period,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{period}");
        assert_eq!(e.field.as_deref(), Some("config.rotation_period_seconds"));
    }
    assert_eq!(
        code(f.engine.get_key("too-long").await),
        ErrorCode::NotFound,
        "nothing created"
    );
    f.engine
        .create_key(&ADMIN, "bad", KeyType::Aes256Gcm, KeyPolicy::default())
        .await
        .unwrap();
    for period in [huge, MAX_ROTATION_PERIOD_SECONDS + 1] {
        let e = f
            .engine
            .update_policy(
                &ADMIN,
                "bad",
                PolicyUpdate {
                    rotation_period_seconds: Some(period),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert_eq!(e.field.as_deref(), Some("rotation_period_seconds"));
    }
    let at_max = f
        .engine
        .update_policy(
            &ADMIN,
            "bad",
            PolicyUpdate {
                rotation_period_seconds: Some(MAX_ROTATION_PERIOD_SECONDS),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        at_max.record.policy.rotation_period_seconds,
        MAX_ROTATION_PERIOD_SECONDS
    );

    // A row that bypassed the API with 10^13 seconds (which used to panic the task),
    // next to a key that is due: the due key rotates, nothing panics.
    let policy = KeyPolicy {
        rotation_period_seconds: huge,
        ..at_max.record.policy.clone()
    };
    f.store
        .update_policy(
            "bad",
            at_max.record.policy_version,
            &policy,
            f.clock.now_utc(),
            at_max.record.record_mac.as_deref(),
        )
        .await
        .unwrap();
    f.engine
        .create_key(
            &ADMIN,
            "due",
            KeyType::Aes256Gcm,
            KeyPolicy {
                rotation_period_seconds: 3600,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    f.clock.advance(chrono::Duration::hours(2));
    assert_eq!(
        f.engine.rotate_due(f.clock.now_utc()).await.unwrap(),
        vec!["due".to_string()]
    );
    assert_eq!(
        f.engine.get_key("bad").await.map(|_| ()).unwrap_err().code,
        ErrorCode::FailedPrecondition,
        "the tampered row is refused, not rotated"
    );
}

#[tokio::test]
async fn rotation_period_is_bounded_sqlite() {
    rotation_period_is_bounded(&fixture().await).await;
}

#[tokio::test]
async fn rotation_period_is_bounded_postgres() {
    let Some(f) = pg_fixture().await else {
        return;
    };
    rotation_period_is_bounded(&f).await;
}

/// EnsureServiceKey: a service's own key in its own namespace, created once.
#[tokio::test]
async fn ensure_service_key_is_idempotent_and_confined_to_the_caller() {
    let f = fixture().await;
    let token = Caller::Service("token".into());
    let k = f
        .engine
        .ensure_service_key(&token, "signing-keys")
        .await
        .unwrap();
    assert_eq!(k.record.name, "svc.token.signing-keys");
    assert_eq!(k.key_type, KeyType::Aes256Gcm);
    assert_eq!(k.record.policy.allowed_services, vec!["token".to_owned()]);
    let again = f
        .engine
        .ensure_service_key(&token, "signing-keys")
        .await
        .unwrap();
    assert_eq!(again.record.created_at, k.record.created_at);
    assert_eq!(
        types(&f)
            .iter()
            .filter(|t| *t == "sec.crypto.key.created")
            .count(),
        1
    );
    // Another service gets its own key, never the first one's.
    let other = f
        .engine
        .ensure_service_key(&Caller::Service("auth".into()), "signing-keys")
        .await
        .unwrap();
    assert_eq!(other.record.name, "svc.auth.signing-keys");
    for bad in ["", "UPPER", "a.b", "x/y", &"a".repeat(33)] {
        assert_eq!(
            code(f.engine.ensure_service_key(&token, bad).await),
            ErrorCode::InvalidArgument,
            "{bad:?}"
        );
    }
    assert_eq!(
        code(f.engine.ensure_service_key(&ADMIN, "signing-keys").await),
        ErrorCode::PermissionDenied
    );
    // A key of that name made otherwise (by the admin) is not silently adopted.
    f.engine
        .create_key(
            &ADMIN,
            "svc.token.other",
            KeyType::Aes256Gcm,
            KeyPolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        code(f.engine.ensure_service_key(&token, "other").await),
        ErrorCode::FailedPrecondition
    );
    // Another type: its own key; asking for the same purpose with another type is refused.
    let signing = f
        .engine
        .ensure_service_key_of(&token, "checkpoints", KeyType::Ed25519)
        .await
        .unwrap();
    assert_eq!(signing.key_type, KeyType::Ed25519);
    assert_eq!(
        code(
            f.engine
                .ensure_service_key_of(&token, "checkpoints", KeyType::Aes256Gcm)
                .await
        ),
        ErrorCode::FailedPrecondition
    );
    assert_eq!(
        code(
            f.engine
                .ensure_service_key_of(&token, "backup", KeyType::Rsa3072Wrapping)
                .await
        ),
        ErrorCode::InvalidArgument
    );
}
