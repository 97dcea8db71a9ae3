use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use chrono::TimeZone;
use serde_json::{Map, Value, json};

use super::*;
use crate::clock::{Clock as _, ManualClock};
use crate::events::new_event;
use crate::jwt::{Alg, VerifyingKey};

const ISS: &str = "https://token.sec.test";
const AUD: &str = "session";

struct Key {
    kid: String,
    pair: EcdsaKeyPair,
}

impl Key {
    fn new(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
        }
    }

    fn jwk(&self) -> Value {
        VerifyingKey::es256_from_sec1(self.pair.public_key().as_ref())
            .unwrap()
            .to_jwk(&self.kid)
    }

    fn token(&self, claims: &Map<String, Value>) -> String {
        jwt::encode(Alg::Es256, &self.kid, TokenType::Access, claims, |m| {
            Ok::<_, ()>(
                self.pair
                    .sign(&SystemRandom::new(), m)
                    .unwrap()
                    .as_ref()
                    .to_vec(),
            )
        })
        .unwrap()
    }
}

#[derive(Default)]
struct FakeJwks {
    keys: Mutex<Vec<Value>>,
    calls: AtomicUsize,
    down: AtomicBool,
}

impl FakeJwks {
    fn publish(&self, k: &Key) {
        self.keys.lock().unwrap().push(k.jwk());
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl JwksSource for FakeJwks {
    async fn fetch_jwks(&self) -> Result<JwksDocument, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable("down".into()));
        }
        Ok(JwksDocument {
            jwks_json: json!({ "keys": *self.keys.lock().unwrap() }).to_string(),
            max_age: Duration::from_secs(300),
        })
    }
}

/// A revocation log; the cursor is the number of entries already seen.
struct FakeRevocations {
    log: Mutex<Vec<Revocation>>,
    calls: AtomicUsize,
    down: AtomicBool,
    clock: Arc<ManualClock>,
    /// Seconds the server's clock is ahead of ours.
    ahead: std::sync::atomic::AtomicI64,
}

impl FakeRevocations {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl RevocationSource for FakeRevocations {
    async fn list_revocations(&self, cursor: &str) -> Result<RevocationPage, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable("down".into()));
        }
        let log = self.log.lock().unwrap();
        let from: usize = cursor.parse().unwrap_or(0);
        Ok(RevocationPage {
            revocations: log[from.min(log.len())..].to_vec(),
            cursor: log.len().to_string(),
            snapshot: cursor.is_empty(),
            as_of: self.clock.now() + chrono::Duration::seconds(self.ahead.load(Ordering::SeqCst)),
        })
    }
}

struct Env {
    clock: Arc<ManualClock>,
    jwks: Arc<FakeJwks>,
    revs: Arc<FakeRevocations>,
    v: LocalVerifier,
    key: Key,
}

/// Waits for `f` to hold; the deadline only turns a hang into a failure.
async fn until(mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn start() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

fn env() -> Env {
    let clock = ManualClock::new(start());
    let jwks = Arc::new(FakeJwks::default());
    let key = Key::new("k1");
    jwks.publish(&key);
    let revs = Arc::new(FakeRevocations {
        log: Mutex::default(),
        calls: AtomicUsize::new(0),
        down: AtomicBool::new(false),
        clock: clock.clone(),
        ahead: std::sync::atomic::AtomicI64::new(0),
    });
    let v = LocalVerifier::new(
        VerifierConfig::new(ISS, AUD),
        clock.clone(),
        jwks.clone(),
        revs.clone(),
    );
    Env {
        clock,
        jwks,
        revs,
        v,
        key,
    }
}

impl Env {
    fn claims(&self, sub: &str, jti: &str) -> Map<String, Value> {
        let t = self.clock.now().timestamp();
        json!({
            "iss": ISS, "sub": sub, "aud": AUD, "client_id": "web", "jti": jti,
            "iat": t, "exp": t + 600,
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn token(&self, sub: &str, jti: &str) -> String {
        self.key.token(&self.claims(sub, jti))
    }

    fn metrics(&self) -> String {
        let mut r = Registry::default();
        self.v.register_metrics("test", &mut r);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &r).unwrap();
        s
    }
}

fn revoked_event(kind: &str, details: &[(&str, String)], subject: &str) -> SecurityEvent {
    let mut e = new_event(
        &crate::clock::SystemClock,
        "token",
        "sec.token.token.revoked",
    );
    e.subject = subject.into();
    e.details.insert("kind".into(), kind.into());
    for (k, v) in details {
        e.details.insert((*k).into(), v.clone());
    }
    e
}

#[tokio::test]
async fn nothing_verifies_before_the_first_load_then_tokens_do() {
    let env = env();
    let t = env.token("u1", "j1");
    assert_eq!(env.v.verify(&t).unwrap_err(), InvalidReason::VerifierStale);
    env.v.refresh_jwks().await.unwrap();
    assert_eq!(
        env.v.verify(&t).unwrap_err(),
        InvalidReason::VerifierStale,
        "keys alone are not enough: revocations were never loaded"
    );
    env.v.poll_revocations().await.unwrap();
    let c = env.v.verify(&t).unwrap();
    assert_eq!(c.sub(), "u1");
    assert_eq!(env.v.staleness(), Some(Duration::ZERO));
    let m = env.metrics();
    assert!(
        m.contains("sec_test_token_verifier_verified_total 1"),
        "{m}"
    );
    assert!(
        m.contains(r#"sec_test_token_verifier_rejected_total{reason="verifier_stale"} 2"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_refresh_picks_up_new_keys_and_drops_unpublished_ones() {
    let env = env();
    env.v.refresh_all().await.unwrap();
    let k2 = Key::new("k2");
    let t2 = k2.token(&env.claims("u1", "j2"));
    assert_eq!(env.v.verify(&t2).unwrap_err(), InvalidReason::UnknownKey);
    *env.jwks.keys.lock().unwrap() = vec![k2.jwk()];
    env.v.refresh_jwks().await.unwrap();
    assert!(env.v.verify(&t2).is_ok());
    assert_eq!(
        env.v.verify(&env.token("u1", "j1")).unwrap_err(),
        InvalidReason::UnknownKey
    );
    // A broken JWKS keeps the previous view.
    env.jwks
        .keys
        .lock()
        .unwrap()
        .push(json!({"kty": "EC", "kid": "bad"}));
    assert!(matches!(
        env.v.refresh_jwks().await,
        Err(SourceError::Invalid(_))
    ));
    assert!(env.v.verify(&t2).is_ok());
}

#[tokio::test]
async fn unknown_kids_trigger_one_rate_limited_refetch() {
    let env = env();
    env.v.refresh_all().await.unwrap();
    let stop = CancellationToken::new();
    let loop_task = tokio::spawn(env.v.clone().jwks_loop(stop.clone()));
    // The loop's own first refresh.
    until(|| env.jwks.calls() >= 2).await;

    let k2 = Key::new("k2");
    env.jwks.publish(&k2);
    let t2 = k2.token(&env.claims("u1", "j2"));
    assert_eq!(env.v.verify(&t2).unwrap_err(), InvalidReason::UnknownKey);
    // A flood of random kids on top costs nothing more.
    for i in 0..1000 {
        let k = Key {
            kid: format!("random-{i}"),
            pair: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
        };
        if i % 100 == 0 {
            assert_eq!(
                env.v.verify(&k.token(&env.claims("u1", "x"))).unwrap_err(),
                InvalidReason::UnknownKey
            );
        }
    }
    let garbage_kid = |i: usize| {
        let k = Key {
            kid: format!("flood-{i}"),
            pair: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
        };
        k.token(&env.claims("u1", "x"))
    };
    let flood: Vec<String> = (0..50).map(garbage_kid).collect();
    for t in &flood {
        assert_eq!(env.v.verify(t).unwrap_err(), InvalidReason::UnknownKey);
    }
    assert!(
        env.metrics()
            .contains("sec_test_token_verifier_unknown_kid_refetches_total 1")
    );
    // The granted refetch brings k2 in (the wait is bounded by the test timeout only).
    until(|| env.v.verify(&t2).is_ok()).await;
    assert_eq!(
        env.jwks.calls(),
        3,
        "one refetch for 1 + 10 + 50 unknown-kid tokens"
    );

    // After the interval, an unknown kid may ask again.
    env.clock.advance(chrono::Duration::seconds(5));
    assert_eq!(
        env.v.verify(&flood[0]).unwrap_err(),
        InvalidReason::UnknownKey
    );
    assert!(
        env.metrics()
            .contains("sec_test_token_verifier_unknown_kid_refetches_total 2")
    );
    stop.cancel();
    loop_task.await.unwrap();
}

#[tokio::test]
async fn a_revocation_event_applies_without_a_poll() {
    let env = env();
    env.v.refresh_all().await.unwrap();
    let polls = env.revs.calls();
    let (t1, t2) = (env.token("u1", "j1"), env.token("u1", "j2"));
    assert!(env.v.verify(&t1).is_ok());
    let exp = (env.clock.now().timestamp() + 600).to_string();
    env.v.apply_event(&revoked_event(
        "jti",
        &[("jti", "j1".into()), ("expires_at", exp)],
        "",
    ));
    assert_eq!(env.v.verify(&t1).unwrap_err(), InvalidReason::Revoked);
    assert!(env.v.verify(&t2).is_ok(), "only that jti");

    // Subject cut-off: tokens issued at or before it fail, later ones pass.
    let nb = env.clock.now().timestamp().to_string();
    env.v.apply_event(&revoked_event(
        "subject",
        &[("not_before", nb.clone())],
        "u1",
    ));
    assert_eq!(env.v.verify(&t2).unwrap_err(), InvalidReason::Revoked);
    assert!(env.v.verify(&env.token("u2", "j3")).is_ok());
    env.clock.advance(chrono::Duration::seconds(1));
    assert!(
        env.v.verify(&env.token("u1", "j4")).is_ok(),
        "issued after the cut-off"
    );
    // Client cut-off.
    env.v.apply_event(&revoked_event(
        "client",
        &[("not_before", env.clock.now().timestamp().to_string())],
        "web",
    ));
    assert_eq!(
        env.v.verify(&env.token("u9", "j5")).unwrap_err(),
        InvalidReason::Revoked
    );
    assert_eq!(env.revs.calls(), polls, "no poll was needed");

    // Events of other services, or malformed, change nothing.
    let mut foreign = revoked_event(
        "jti",
        &[("jti", "j9".into()), ("expires_at", "9999999999".into())],
        "",
    );
    foreign.service = "auth".into();
    env.v.apply_event(&foreign);
    env.v.apply_event(&revoked_event(
        "jti",
        &[("jti", "j9".into()), ("expires_at", "soon".into())],
        "",
    ));
    env.clock.advance(chrono::Duration::seconds(1));
    assert!(env.v.verify(&env.token("u3", "j9")).is_ok());
}

#[tokio::test]
async fn a_revoked_signing_key_is_dropped_at_once_and_stays_revoked() {
    let env = env();
    env.v.refresh_all().await.unwrap();
    let t = env.token("u1", "j1");
    assert!(env.v.verify(&t).is_ok());
    env.v
        .apply_event(&revoked_event("signing_key", &[("kid", "k1".into())], ""));
    assert_eq!(env.v.verify(&t).unwrap_err(), InvalidReason::KeyRevoked);
    // The JWKS may still list it (an older replica): it stays revoked.
    env.v.refresh_jwks().await.unwrap();
    assert_eq!(env.v.verify(&t).unwrap_err(), InvalidReason::KeyRevoked);
}

#[tokio::test]
async fn polls_apply_snapshots_and_changes() {
    let env = env();
    env.revs.log.lock().unwrap().push(Revocation::Jti {
        jti: "j1".into(),
        expires_at: env.clock.now() + chrono::Duration::seconds(600),
    });
    env.v.refresh_all().await.unwrap();
    assert_eq!(
        env.v.verify(&env.token("u1", "j1")).unwrap_err(),
        InvalidReason::Revoked
    );
    env.revs
        .log
        .lock()
        .unwrap()
        .push(Revocation::Kid { kid: "k1".into() });
    env.v.poll_revocations().await.unwrap();
    assert_eq!(
        env.v.verify(&env.token("u1", "j2")).unwrap_err(),
        InvalidReason::KeyRevoked
    );
}

#[tokio::test]
async fn a_stale_view_fails_closed_and_recovers() {
    let env = env();
    env.v.refresh_all().await.unwrap();
    env.clock.advance(chrono::Duration::seconds(60));
    let t = env.token("u1", "j1");
    assert!(
        env.v.verify(&t).is_ok(),
        "exactly at the bound is still fresh"
    );
    env.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(
        env.v.verify(&env.token("u1", "j1")).unwrap_err(),
        InvalidReason::VerifierStale
    );
    // token-svc unreachable: polls fail, the verifier stays closed.
    env.revs.down.store(true, Ordering::SeqCst);
    env.jwks.down.store(true, Ordering::SeqCst);
    assert!(env.v.refresh_jwks().await.is_err());
    assert!(env.v.poll_revocations().await.is_err());
    assert_eq!(
        env.v.verify(&env.token("u1", "j1")).unwrap_err(),
        InvalidReason::VerifierStale
    );
    // Keys come back but revocations do not: still closed.
    env.jwks.down.store(false, Ordering::SeqCst);
    env.v.refresh_jwks().await.unwrap();
    assert_eq!(
        env.v.verify(&env.token("u1", "j1")).unwrap_err(),
        InvalidReason::VerifierStale
    );
    env.revs.down.store(false, Ordering::SeqCst);
    env.v.poll_revocations().await.unwrap();
    assert!(env.v.verify(&env.token("u1", "j1")).is_ok());
    let m = env.metrics();
    assert!(
        m.contains(
            r#"sec_test_token_verifier_refreshes_total{source="revocations",outcome="error"} 1"#
        ),
        "{m}"
    );
}

#[tokio::test]
async fn a_server_clock_ahead_of_ours_does_not_extend_freshness() {
    let env = env();
    env.v.refresh_jwks().await.unwrap();
    // The poll answer claims a time an hour in our future: we count from our own receipt.
    env.revs.ahead.store(3600, Ordering::SeqCst);
    env.v.poll_revocations().await.unwrap();
    assert_eq!(env.v.staleness(), Some(Duration::ZERO));
    env.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(
        env.v.verify(&env.token("u1", "j1")).unwrap_err(),
        InvalidReason::VerifierStale
    );
    // One behind ours counts from the server's time: 30 s old at once.
    env.revs.ahead.store(-30, Ordering::SeqCst);
    env.v.refresh_jwks().await.unwrap();
    env.v.poll_revocations().await.unwrap();
    assert_eq!(env.v.staleness(), Some(Duration::from_secs(30)));
}

#[tokio::test]
async fn too_many_revocations_fail_closed() {
    let env = env();
    let v = LocalVerifier::new(
        VerifierConfig {
            max_revocations: 2,
            ..VerifierConfig::new(ISS, AUD)
        },
        env.clock.clone(),
        env.jwks.clone(),
        env.revs.clone(),
    );
    v.refresh_all().await.unwrap();
    let exp = (env.clock.now().timestamp() + 600).to_string();
    for j in ["a", "b", "c"] {
        v.apply_event(&revoked_event(
            "jti",
            &[("jti", j.into()), ("expires_at", exp.clone())],
            "",
        ));
    }
    assert_eq!(
        v.verify(&env.token("u1", "z")).unwrap_err(),
        InvalidReason::VerifierStale
    );
}

#[tokio::test]
async fn the_loops_under_a_supervisor_follow_the_bus() {
    let env = env();
    let bus = EventBus::in_process(&crate::config::EventsConfig::default());
    let stop = CancellationToken::new();
    let mut registry = Registry::default();
    let readiness = Arc::new(crate::admin::Readiness::default());
    let mut sup = Supervisor::new("test", &mut registry, readiness, &stop);
    env.v.spawn(&mut sup, Some(bus.clone()), &stop);
    let t = env.token("u1", "j1");
    until(|| env.v.verify(&t).is_ok()).await;
    // Subscribed (its first poll came after subscribing): a published revocation arrives.
    until(|| env.revs.calls() >= 2).await;
    let exp = (env.clock.now().timestamp() + 600).to_string();
    bus.publish(revoked_event(
        "jti",
        &[("jti", "j1".into()), ("expires_at", exp)],
        "",
    ))
    .unwrap();
    until(|| env.v.verify(&t).is_err()).await;
    assert_eq!(env.v.verify(&t).unwrap_err(), InvalidReason::Revoked);
    sup.stop().await;
}

#[tokio::test]
async fn a_lag_notice_forces_a_poll() {
    let env = env();
    let v = LocalVerifier::new(
        VerifierConfig {
            poll_interval: Duration::from_secs(3600),
            ..VerifierConfig::new(ISS, AUD)
        },
        env.clock.clone(),
        env.jwks.clone(),
        env.revs.clone(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(v.clone().revocation_loop(stop.clone()));
    until(|| env.revs.calls() >= 1).await;
    // A revocation the verifier's events missed.
    env.revs.log.lock().unwrap().push(Revocation::Jti {
        jti: "j1".into(),
        expires_at: env.clock.now() + chrono::Duration::seconds(600),
    });
    v.inner.on_notice(Notice::Lagged(3));
    until(|| env.revs.calls() >= 2).await;
    v.refresh_jwks().await.unwrap();
    // The poll finished once the revocation is visible (bounded by the test timeout).
    until(|| v.verify(&env.token("u1", "j1")).err() == Some(InvalidReason::Revoked)).await;
    stop.cancel();
    task.await.unwrap();
}
