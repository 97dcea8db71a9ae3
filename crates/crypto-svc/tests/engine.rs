//! crypto-svc's behaviour through its engine, on both stores: lifecycle, rotation with
//! old ciphertexts, policy, every bad input the issue names, backup/restore across
//! installations, KEK rotation, automatic rotation on an injected clock, and events.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use crypto_svc::engine::{CryptoMetrics, Engine, Limits, PolicyUpdate};
use crypto_svc::kek::KekRing;
use crypto_svc::material::{ALL_TYPES, KeyType, Op};
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

fn engine_on(
    store: Arc<dyn KeyStore>,
    kek: KekRing,
    max_payload: usize,
) -> (Engine, Arc<Mutex<Vec<SecurityEvent>>>, Arc<ManualClock>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let clock = ManualClock::new(Utc::now());
    let shared: SharedClock = clock.clone();
    let engine = Engine::new(
        store,
        Arc::new(kek),
        shared,
        Arc::new(move |e| sink.lock().unwrap().push(e)),
        Limits {
            max_payload_bytes: max_payload,
            cache_ttl: Duration::from_millis(0),
        },
        CryptoMetrics::unregistered(),
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
    let failed = f
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.r#type == "sec.crypto.decrypt.failed")
        .count();
    assert!(failed >= 6, "every refused decrypt is an event");

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
        .create_key(&ADMIN, "import", KeyType::Rsa4096, KeyPolicy::default())
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
    assert!(backup.starts_with("sec-backup:v1:"));

    let restored = target
        .restore_key(&ADMIN, &backup, "import", None)
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
        code(target.restore_key(&ADMIN, &backup, "import", None).await),
        ErrorCode::AlreadyExists
    );
    assert!(
        target
            .restore_key(&ADMIN, &backup, "import", Some("payroll-copy"))
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
                .restore_key(&ADMIN, &tampered, "import", Some("t1"))
                .await
        ),
        ErrorCode::InvalidArgument
    );
    target
        .create_key(&ADMIN, "other-rsa", KeyType::Rsa3072, KeyPolicy::default())
        .await
        .unwrap();
    assert_eq!(
        code(
            target
                .restore_key(&ADMIN, &backup, "other-rsa", Some("t2"))
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
    // and the wrong KEK alone cannot read anything
    let (wrong, _, _) = engine_on(store, KekRing::from_bytes(&[3; 32], &[]).unwrap(), 1024);
    assert_eq!(
        code(wrong.encrypt("a", b"x", b"").await),
        ErrorCode::Internal
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
