//! Engine tests over SQLite with a manual clock and an in-process sealer.

use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use sec_common::clock::ManualClock;

use super::*;
use crate::store::sqlite::SqliteTokenStore;

/// AES-256-GCM under a key held in the test (stands in for crypto-svc's envelope).
struct TestSealer(LessSafeKey);

impl TestSealer {
    fn new() -> Arc<Self> {
        let mut k = [0_u8; 32];
        aws_lc_rs::rand::fill(&mut k).unwrap();
        Arc::new(Self(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &k).unwrap(),
        )))
    }
}

#[async_trait]
impl Sealer for TestSealer {
    async fn seal(&self, pt: &[u8], aad: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut n = [0_u8; 12];
        aws_lc_rs::rand::fill(&mut n).unwrap();
        let mut buf = pt.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(n), Aad::from(aad), &mut buf)
            .unwrap();
        Ok([n.to_vec(), buf].concat())
    }
    async fn open(&self, sealed: &[u8], aad: &[u8]) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let (n, body) = sealed.split_at(12);
        let mut buf = body.to_vec();
        let n = Nonce::try_assume_unique_for_key(n).unwrap();
        let len = self
            .0
            .open_in_place(n, Aad::from(aad), &mut buf)
            .map_err(|_| anyhow::anyhow!("auth"))?
            .len();
        buf.truncate(len);
        Ok(Zeroizing::new(buf))
    }
}

struct Env {
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the pool and the schema to drop at the end.
    pg: Option<(sqlx::PgPool, String)>,
    store: Arc<dyn TokenStore>,
    sealer: Arc<TestSealer>,
    clock: Arc<ManualClock>,
    events: Arc<Mutex<Vec<SecurityEvent>>>,
}

fn start_time() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pool = sec_common::storage::connect_sqlite(&dir.path().join("t.db"), 8)
        .await
        .unwrap();
    sqlx::migrate!("../../migrations/token/sqlite")
        .run(&pool)
        .await
        .unwrap();
    Env {
        _dir: Some(dir),
        pg: None,
        store: Arc::new(SqliteTokenStore::new(pool)),
        sealer: TestSealer::new(),
        clock: ManualClock::new(start_time()),
        events: Arc::new(Mutex::new(Vec::new())),
    }
}

/// The same on PostgreSQL (a fresh schema); `None` when it is not reachable and not
/// required.
async fn env_pg() -> Option<Env> {
    let url = sec_testkit::backend_url(sec_testkit::Backend::Postgres)?;
    let schema = format!("token_e{}", uuid::Uuid::new_v4().simple());
    let pool = sec_common::storage::connect_postgres(&url, &schema, 20)
        .await
        .unwrap();
    sqlx::migrate!("../../migrations/token/postgres")
        .run(&pool)
        .await
        .unwrap();
    Some(Env {
        _dir: None,
        pg: Some((pool.clone(), schema)),
        store: Arc::new(crate::store::postgres::PgTokenStore::new(pool)),
        sealer: TestSealer::new(),
        clock: ManualClock::new(start_time()),
        events: Arc::new(Mutex::new(Vec::new())),
    })
}

impl Env {
    async fn engine(&self, cfg: TokenConfig) -> Engine {
        let events = self.events.clone();
        let e = Engine::new(
            self.store.clone(),
            self.sealer.clone(),
            self.clock.clone(),
            Arc::new(move |ev| events.lock().unwrap().push(ev)),
            cfg,
            TokenMetrics::unregistered(),
        )
        .unwrap();
        e.start().await.unwrap();
        e
    }

    fn events(&self, ty: &str) -> Vec<SecurityEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.r#type == ty)
            .cloned()
            .collect()
    }
}

fn grant() -> Grant {
    Grant {
        subject: "alice".into(),
        client_id: "app".into(),
        scope: "openid profile".into(),
        auth_time: 1_799_999_000,
        acr: "1".into(),
        amr: vec!["pwd".into()],
        session_id: "s1".into(),
        ..Grant::default()
    }
}

fn issue_req() -> IssueRequest {
    IssueRequest {
        grant: grant(),
        id_token: true,
        nonce: "n-1".into(),
        authorization_code: "code-1".into(),
        refresh_token: true,
        ..IssueRequest::default()
    }
}

fn parts(token: &str) -> (Value, Value) {
    let p: Vec<&str> = token.split('.').collect();
    let d = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (d(p[0]), d(p[1]))
}

fn forge(header: &Value, claims: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()),
        URL_SAFE_NO_PAD.encode(sig)
    )
}

async fn reason(e: &Engine, t: &str) -> Option<Reason> {
    e.validate(t, validate::Kind::Access, None).await.err()
}

#[tokio::test]
async fn start_makes_current_and_next_and_issues_standard_tokens() {
    let env = env().await;
    let e = env.engine(TokenConfig::default()).await;
    let mut keys = e.list_keys(false).await.unwrap();
    keys.sort_by_key(|k| k.state != KeyState::Current);
    let states: Vec<_> = keys.iter().map(|k| k.state).collect();
    assert_eq!(states, vec![KeyState::Current, KeyState::Next]);
    let (jwks, max_age) = e.jwks();
    assert_eq!(max_age, 300);
    let jwks: Value = serde_json::from_str(&jwks).unwrap();
    let ks = jwks["keys"].as_array().unwrap();
    assert_eq!(ks.len(), 2);
    for k in ks {
        assert_eq!(
            (k["alg"].as_str(), k["use"].as_str(), k["kty"].as_str()),
            (Some("ES256"), Some("sig"), Some("EC"))
        );
    }

    let r = e.issue(issue_req()).await.unwrap();
    let (h, c) = parts(&r.access.token);
    assert_eq!(h["typ"], "at+jwt");
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["kid"], keys[0].kid.as_str());
    assert_eq!(c["iss"], "http://127.0.0.1:8080");
    assert_eq!(c["aud"], "sec-platform");
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["client_id"], "app");
    assert_eq!(c["scope"], "openid profile");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    assert_eq!(c["nbf"], c["iat"]);
    assert_eq!(c["jti"], r.access.jti.as_str());
    assert_eq!(c["amr"], serde_json::json!(["pwd"]));
    let id = r.id.unwrap();
    let (ih, ic) = parts(&id.token);
    assert_eq!(ih["typ"], "JWT");
    assert_eq!(ic["aud"], "app");
    assert_eq!(ic["azp"], "app");
    assert_eq!(ic["nonce"], "n-1");
    assert_eq!(ic["sid"], "s1");
    assert_eq!(
        ic["at_hash"],
        Alg::Es256.half_hash(&r.access.token).as_str()
    );
    assert_eq!(ic["c_hash"], Alg::Es256.half_hash("code-1").as_str());
    assert!(r.refresh.unwrap().token.starts_with("sec_rt_"));

    let v = e
        .validate(&r.access.token, validate::Kind::Access, None)
        .await
        .unwrap();
    assert_eq!((v.subject.as_str(), v.client_id.as_str()), ("alice", "app"));
    let v = e
        .validate(&id.token, validate::Kind::Id, Some("app"))
        .await
        .unwrap();
    assert_eq!(v.subject, "alice");
    // Kinds do not substitute for each other.
    assert_eq!(reason(&e, &id.token).await, Some(Reason::WrongType));
    assert_eq!(
        e.validate(&r.access.token, validate::Kind::Id, Some("app"))
            .await
            .err(),
        Some(Reason::WrongType)
    );
}

#[tokio::test]
async fn issue_refuses_claims_outside_the_allow_list_and_ttls_over_the_max() {
    let env = env().await;
    let cfg = TokenConfig {
        extra_claims: vec!["tenant".into()],
        ..TokenConfig::default()
    };
    let e = env.engine(cfg).await;
    let mut r = issue_req();
    r.grant.extra_claims.insert("tenant".into(), "t1".into());
    let t = e.issue(r.clone()).await.unwrap();
    assert_eq!(parts(&t.access.token).1["tenant"], "t1");
    r.grant.extra_claims.insert("role".into(), "admin".into());
    assert!(matches!(e.issue(r).await, Err(TokenError::Api(_))));
    let mut r = issue_req();
    r.id_claims.insert("sub".into(), "mallory".into());
    assert!(matches!(e.issue(r).await, Err(TokenError::Api(_))));
    let mut r = issue_req();
    r.access_ttl_seconds = 86_401;
    assert!(matches!(e.issue(r).await, Err(TokenError::Api(_))));
    let mut r = issue_req();
    r.grant.subject.clear();
    assert!(matches!(e.issue(r).await, Err(TokenError::Api(_))));
}

/// Tokens from every key state over simulated rotation.
#[tokio::test]
async fn rotation_over_simulated_time() {
    let env = env().await;
    let cfg = TokenConfig::default();
    let period = Duration::seconds(cfg.rotation_period_seconds as i64);
    let e = env.engine(cfg.clone()).await;
    let keys = e.list_keys(false).await.unwrap();
    let kid_in = |s: KeyState| keys.iter().find(|k| k.state == s).unwrap().kid.clone();
    let (a, b) = (kid_in(KeyState::Current), kid_in(KeyState::Next));
    let t_a = e.issue(issue_req()).await.unwrap().access;
    assert_eq!(t_a.kid, a);

    // Not due yet: nothing moves.
    env.clock.advance(period - Duration::seconds(1));
    assert!(e.maintain_keys().await.unwrap().is_empty());
    // Due: B (published since start, long enough) becomes current, A retiring.
    env.clock.advance(Duration::seconds(1));
    assert_eq!(e.maintain_keys().await.unwrap(), vec![b.clone()]);
    let keys = e.list_keys(false).await.unwrap();
    let state = |kid: &str| keys.iter().find(|k| k.kid == kid).map(|k| k.state);
    assert_eq!(state(&a), Some(KeyState::Retiring));
    assert_eq!(state(&b), Some(KeyState::Current));
    let c = keys
        .iter()
        .find(|k| k.state == KeyState::Next)
        .unwrap()
        .kid
        .clone();
    // The next key is published, not signing.
    assert!(e.jwks().0.contains(&c));
    let t_b = e.issue(issue_req()).await.unwrap().access;
    assert_eq!(t_b.kid, b);
    assert_ne!(t_b.kid, c);
    // A retiring key's token was issued long ago: expired, but its key is still known.
    assert_eq!(reason(&e, &t_a.token).await, Some(Reason::Expired));
    // A token A signed just before rotation stays valid while A is retiring.
    assert!(
        e.validate(&t_b.token, validate::Kind::Access, None)
            .await
            .is_ok()
    );

    // After the longest lifetime + skew, A is retired and unpublished.
    env.clock
        .advance(Duration::seconds(cfg.retire_after_seconds() as i64));
    e.maintain_keys().await.unwrap();
    assert!(!e.jwks().0.contains(&a));
    assert_eq!(reason(&e, &t_a.token).await, Some(Reason::KeyRetired));
    assert_eq!(env.events("sec.token.key.retired").len(), 1);

    // Revoking the current key: gone from the JWKS at once, its tokens fail, and a
    // new current key signs.
    let t_b = e.issue(issue_req()).await.unwrap().access;
    let revoked = e.revoke_key(&b, "compromised").await.unwrap();
    assert_eq!(revoked.state, KeyState::Revoked);
    assert!(!e.jwks().0.contains(&b));
    assert_eq!(reason(&e, &t_b.token).await, Some(Reason::KeyRevoked));
    let t_c = e.issue(issue_req()).await.unwrap().access;
    assert_eq!(t_c.kid, c);
    assert!(
        e.validate(&t_c.token, validate::Kind::Access, None)
            .await
            .is_ok()
    );
    assert_eq!(env.events("sec.token.key.revoked").len(), 1);
    let rev = env.events("sec.token.revoked");
    assert_eq!(rev.last().unwrap().details["kind"], "signing_key");
    assert_eq!(rev.last().unwrap().details["kid"], b);
    // Revoked twice: not found.
    assert!(e.revoke_key(&b, "").await.is_err());
}

#[tokio::test]
async fn manual_rotation_and_replicas_agree() {
    let env = env().await;
    let e1 = env.engine(TokenConfig::default()).await;
    let e2 = env.engine(TokenConfig::default()).await;
    let before = e1.list_keys(false).await.unwrap();
    assert_eq!(
        before.len(),
        2,
        "the second replica reused the first one's keys"
    );
    e1.rotate_now(Some(Alg::EdDsa)).await.unwrap();
    let t = e1.issue(issue_req()).await.unwrap().access;
    // The other replica learns the new current key on an unknown... known kid: the
    // rotated-in key was already published, so e2 validates at once.
    assert!(
        e2.validate(&t.token, validate::Kind::Access, None)
            .await
            .is_ok()
    );
    let keys = e1.list_keys(false).await.unwrap();
    assert_eq!(
        keys.iter().find(|k| k.state == KeyState::Next).unwrap().alg,
        Alg::EdDsa
    );
}

#[tokio::test]
async fn every_bad_token_gets_its_reason() {
    let env = env().await;
    let e = env.engine(TokenConfig::default()).await;
    let t = e.issue(issue_req()).await.unwrap().access.token;
    let (h, c) = parts(&t);
    let sig = URL_SAFE_NO_PAD
        .decode(t.rsplit('.').next().unwrap())
        .unwrap();

    for bad in ["", "abc", "a.b", "a.b.c.d", "!!.e30.e30", "e30.e30.e30"] {
        let r = reason(&e, bad).await;
        assert!(
            matches!(r, Some(Reason::Malformed | Reason::UnknownKey)),
            "{bad}: {r:?}"
        );
    }
    assert_eq!(
        reason(&e, "e30.e30.e30").await,
        Some(Reason::Malformed),
        "no alg"
    );
    // Truncated: in the signature's base64 (malformed or a short signature), or mid-way.
    assert!(matches!(
        reason(&e, &t[..t.len() - 4]).await,
        Some(Reason::Malformed | Reason::BadSignature)
    ));
    assert_eq!(
        reason(&e, &forge(&h, &c, &sig[..63])).await,
        Some(Reason::BadSignature)
    );
    assert_eq!(reason(&e, &t[..t.len() / 2]).await, Some(Reason::Malformed));
    assert_eq!(reason(&e, &"a".repeat(8193)).await, Some(Reason::Oversized));

    // alg none, HS256 keyed with the public key: refused by the allow-list.
    let mut none = h.clone();
    none["alg"] = "none".into();
    assert_eq!(
        reason(&e, &forge(&none, &c, b"")).await,
        Some(Reason::UnsupportedAlg)
    );
    let mut hs = h.clone();
    hs["alg"] = "HS256".into();
    let jwk = e.list_keys(false).await.unwrap()[0].public_jwk.clone();
    let hkey = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, jwk.as_bytes());
    let unsigned = forge(&hs, &c, b"");
    let input = &unsigned[..unsigned.len() - 1];
    let mac = aws_lc_rs::hmac::sign(&hkey, input.as_bytes());
    assert_eq!(
        reason(&e, &forge(&hs, &c, mac.as_ref())).await,
        Some(Reason::UnsupportedAlg)
    );

    // Unknown kid, no kid.
    let mut unknown = h.clone();
    unknown["kid"] = "nope".into();
    assert_eq!(
        reason(&e, &forge(&unknown, &c, &sig)).await,
        Some(Reason::UnknownKey)
    );
    let mut nokid = h.clone();
    nokid.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        reason(&e, &forge(&nokid, &c, &sig)).await,
        Some(Reason::UnknownKey)
    );

    // A claim changed under the signature.
    let mut c2 = c.clone();
    c2["sub"] = "mallory".into();
    assert_eq!(
        reason(&e, &forge(&h, &c2, &sig)).await,
        Some(Reason::BadSignature)
    );

    // A valid EdDSA signature whose kid names the ES256 key.
    let es_kid = h["kid"].as_str().unwrap().to_owned();
    e.rotate_now(Some(Alg::EdDsa)).await.unwrap();
    e.rotate_now(None).await.unwrap();
    let ed = env
        .store
        .keys()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.alg == "EdDSA")
        .unwrap();
    let pk = env
        .sealer
        .open(&ed.sealed_private, &super::key_aad(&ed.kid, Alg::EdDsa))
        .await
        .unwrap();
    let signer = Signer::load(Alg::EdDsa, &pk).unwrap();
    let mut eh = h.clone();
    eh["alg"] = "EdDSA".into();
    let ed_token = signer.jws(&eh, &c).unwrap();
    assert_eq!(reason(&e, &ed_token).await, Some(Reason::AlgMismatch));
    // The same signature under its own kid is fine (the ES256 key is retiring now).
    eh["kid"] = ed.kid.clone().into();
    assert!(
        e.validate(&signer.jws(&eh, &c).unwrap(), validate::Kind::Access, None)
            .await
            .is_ok()
    );
    assert!(es_kid != ed.kid);

    // Wrong audience and issuer.
    assert_eq!(
        e.validate(&t, validate::Kind::Access, Some("other"))
            .await
            .err(),
        Some(Reason::WrongAudience)
    );
    let env2 = env_with_issuer(&env, "https://elsewhere").await;
    assert_eq!(reason(&env2, &t).await, Some(Reason::WrongIssuer));

    // Expiry and not-before, with skew.
    let t = e.issue(issue_req()).await.unwrap().access.token;
    env.clock.advance(Duration::seconds(600 + 59));
    assert!(reason(&e, &t).await.is_none(), "inside the skew");
    env.clock.advance(Duration::seconds(1));
    assert_eq!(reason(&e, &t).await, Some(Reason::Expired));
    let t = e.issue(issue_req()).await.unwrap().access.token;
    env.clock.advance(Duration::seconds(-61));
    assert_eq!(reason(&e, &t).await, Some(Reason::NotYetValid));
}

async fn env_with_issuer(env: &Env, issuer: &str) -> Engine {
    env.engine(TokenConfig {
        issuer: issuer.into(),
        ..TokenConfig::default()
    })
    .await
}

#[tokio::test]
async fn refresh_rotates_reissues_in_grace_and_detects_reuse() {
    let env = env().await;
    let e = env.engine(TokenConfig::default()).await;
    let r0 = e.issue(issue_req()).await.unwrap().refresh.unwrap();
    let req = |t: &str| RefreshRequest {
        refresh_token: t.into(),
        client_id: "app".into(),
        ..RefreshRequest::default()
    };
    let (r1, o) = e.refresh(req(&r0.token)).await.unwrap();
    assert_eq!(o, RefreshOutcome::Rotated);
    let r1 = r1.refresh.unwrap();
    assert_eq!(r1.family_id, r0.family_id);
    // Lost response: the same token again within the grace window gets a new successor,
    // and the first successor is revoked.
    env.clock.advance(Duration::seconds(5));
    let (r1b, o) = e.refresh(req(&r0.token)).await.unwrap();
    assert_eq!(o, RefreshOutcome::GraceReissued);
    let r1b = r1b.refresh.unwrap();
    assert!(matches!(
        e.refresh(req(&r1.token)).await,
        Err(TokenError::InvalidGrant)
    ));
    // Another client, scope widening: refused.
    let mut other = req(&r1b.token);
    other.client_id = "evil".into();
    assert!(matches!(
        e.refresh(other).await,
        Err(TokenError::InvalidGrant)
    ));
    let mut wider = req(&r1b.token);
    wider.scope = "openid admin".into();
    assert!(matches!(
        e.refresh(wider).await,
        Err(TokenError::InvalidGrant)
    ));
    let mut narrower = req(&r1b.token);
    narrower.scope = "openid".into();
    let (r2, _) = e.refresh(narrower).await.unwrap();
    assert_eq!(r2.scope, "openid");
    assert_eq!(parts(&r2.access.token).1["scope"], "openid");
    let r2 = r2.refresh.unwrap();
    // Within the grace window but after the successor was used: reuse, not a reissue.
    let f = e.issue(issue_req()).await.unwrap().refresh.unwrap();
    let (f1, _) = e.refresh(req(&f.token)).await.unwrap();
    e.refresh(req(&f1.refresh.unwrap().token)).await.unwrap();
    assert!(matches!(
        e.refresh(req(&f.token)).await,
        Err(TokenError::ReuseDetected)
    ));
    // Outside the grace window: reuse revokes the family, even its newest token.
    env.clock.advance(Duration::seconds(11));
    assert!(matches!(
        e.refresh(req(&r1b.token)).await,
        Err(TokenError::ReuseDetected)
    ));
    assert!(matches!(
        e.refresh(req(&r2.token)).await,
        Err(TokenError::InvalidGrant)
    ));
    let ev = env.events("sec.token.refresh.reuse_detected");
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].severity, Severity::High as i32);
    assert_eq!(ev[1].details["family_id"], r0.family_id);
    let (row, active) = e.introspect_refresh(&r2.token).await.unwrap().unwrap();
    assert!(!active);
    assert_eq!(row.user_id, "alice");
    assert!(e.introspect_refresh("sec_rt_nope").await.unwrap().is_none());
    assert!(matches!(
        e.refresh(req("garbage")).await,
        Err(TokenError::InvalidGrant)
    ));
    // Expired family.
    let r = e.issue(issue_req()).await.unwrap().refresh.unwrap();
    env.clock.advance(Duration::days(31));
    assert!(matches!(
        e.refresh(req(&r.token)).await,
        Err(TokenError::InvalidGrant)
    ));
}

/// 16 parallel uses of one token with no grace window: exactly one success; the
/// others are reuse, which revokes the family (the winner's successor too).
#[tokio::test]
async fn parallel_refresh_of_one_token_sqlite() {
    parallel_refresh_of_one_token(env().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_refresh_of_one_token_postgres() {
    if let Some(env) = env_pg().await {
        let (pool, schema) = env.pg.clone().unwrap();
        parallel_refresh_of_one_token(env).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }
}

async fn parallel_refresh_of_one_token(env: Env) {
    let e = Arc::new(
        env.engine(TokenConfig {
            refresh_grace_seconds: 0,
            ..TokenConfig::default()
        })
        .await,
    );
    let r0 = e.issue(issue_req()).await.unwrap().refresh.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (e, t) = (e.clone(), r0.token.clone());
        tasks.push(tokio::spawn(async move {
            e.refresh(RefreshRequest {
                refresh_token: t,
                client_id: "app".into(),
                ..RefreshRequest::default()
            })
            .await
        }));
    }
    let mut ok = Vec::new();
    let mut reuse = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok((r, _)) => ok.push(r),
            Err(TokenError::ReuseDetected) => reuse += 1,
            // Once the family is revoked, later readers see a revoked token.
            Err(TokenError::InvalidGrant) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok.len(), 1);
    assert!(reuse >= 1);
    let winner = ok[0].refresh.as_ref().unwrap();
    assert!(
        !e.introspect_refresh(&winner.token)
            .await
            .unwrap()
            .unwrap()
            .1
    );
}

#[tokio::test]
async fn revocation_by_jti_subject_client_and_family() {
    let env = env().await;
    let e = env.engine(TokenConfig::default()).await;
    let r = e.issue(issue_req()).await.unwrap();
    assert_eq!(
        e.revoke(
            RevokeTarget::Jti(r.access.jti.clone()),
            Some(r.access.expires_at),
            ""
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(reason(&e, &r.access.token).await, Some(Reason::Revoked));
    let ev = env.events("sec.token.revoked");
    let d = &ev[0].details;
    assert_eq!(
        (d["kind"].as_str(), d["jti"].as_str()),
        ("jti", r.access.jti.as_str())
    );
    assert_eq!(
        d["expires_at"],
        (r.access.expires_at.timestamp() + 60).to_string()
    );

    // By whole token, for another client: a no-op success (RFC 7009).
    let r2 = e.issue(issue_req()).await.unwrap();
    assert_eq!(
        e.revoke(RevokeTarget::Token(r2.access.token.clone()), None, "other")
            .await
            .unwrap(),
        0
    );
    assert!(reason(&e, &r2.access.token).await.is_none());
    assert_eq!(
        e.revoke(RevokeTarget::Token(r2.access.token.clone()), None, "app")
            .await
            .unwrap(),
        1
    );
    assert_eq!(reason(&e, &r2.access.token).await, Some(Reason::Revoked));

    // By subject: a cut-off; tokens issued later are fine; refresh tokens revoked.
    let r3 = e.issue(issue_req()).await.unwrap();
    let mut bob = issue_req();
    bob.grant.subject = "bob".into();
    let rb = e.issue(bob).await.unwrap();
    assert!(
        e.revoke(RevokeTarget::Subject("alice".into()), None, "")
            .await
            .unwrap()
            >= 1
    );
    assert_eq!(reason(&e, &r3.access.token).await, Some(Reason::Revoked));
    assert!(reason(&e, &rb.access.token).await.is_none());
    assert!(
        !e.introspect_refresh(&r3.refresh.unwrap().token)
            .await
            .unwrap()
            .unwrap()
            .1
    );
    env.clock.advance(Duration::seconds(1));
    let r4 = e.issue(issue_req()).await.unwrap();
    assert!(reason(&e, &r4.access.token).await.is_none());

    // By client.
    assert!(
        e.revoke(RevokeTarget::Client("app".into()), None, "")
            .await
            .unwrap()
            >= 1
    );
    assert_eq!(reason(&e, &rb.access.token).await, Some(Reason::Revoked));

    // By refresh token: its family.
    env.clock.advance(Duration::seconds(1));
    let r5 = e.issue(issue_req()).await.unwrap().refresh.unwrap();
    assert_eq!(
        e.revoke(RevokeTarget::RefreshToken(r5.token.clone()), None, "other")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        e.revoke(RevokeTarget::RefreshToken(r5.token.clone()), None, "")
            .await
            .unwrap(),
        1
    );
    assert!(!e.introspect_refresh(&r5.token).await.unwrap().unwrap().1);

    // ListRevocations: snapshot, then only what is new.
    env.clock.advance(Duration::seconds(60));
    let (all, cursor, snapshot, _) = e.list_revocations("").await.unwrap();
    assert!(snapshot);
    assert_eq!(all.len(), 4);
    assert!(e.list_revocations("bogus").await.is_err());
    let (later, _, snapshot, _) = e.list_revocations(&cursor).await.unwrap();
    assert!(!snapshot);
    assert!(later.is_empty());
    e.revoke(RevokeTarget::Jti("j-9".into()), None, "")
        .await
        .unwrap();
    let (later, _, _, _) = e.list_revocations(&cursor).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].target, "j-9");

    // Another replica (or a restart) applies them from the store.
    let other = env.engine(TokenConfig::default()).await;
    assert_eq!(
        reason(&other, &rb.access.token).await,
        Some(Reason::Revoked)
    );
}

#[tokio::test]
async fn restart_keeps_keys_families_and_revocations() {
    let env = env().await;
    let (t, rt, revoked) = {
        let e = env.engine(TokenConfig::default()).await;
        let r = e.issue(issue_req()).await.unwrap();
        let x = e.issue(issue_req()).await.unwrap().access;
        e.revoke(RevokeTarget::Jti(x.jti.clone()), Some(x.expires_at), "")
            .await
            .unwrap();
        (r.access.token, r.refresh.unwrap().token, x.token)
    };
    let e = env.engine(TokenConfig::default()).await;
    assert_eq!(e.list_keys(false).await.unwrap().len(), 2);
    assert!(e.validate(&t, validate::Kind::Access, None).await.is_ok());
    assert_eq!(reason(&e, &revoked).await, Some(Reason::Revoked));
    let (r, _) = e
        .refresh(RefreshRequest {
            refresh_token: rt,
            client_id: "app".into(),
            ..RefreshRequest::default()
        })
        .await
        .unwrap();
    assert!(r.refresh.is_some());
}

#[tokio::test]
async fn stats_count_per_client_and_reason() {
    let env = env().await;
    let e = env.engine(TokenConfig::default()).await;
    let t = e.issue(issue_req()).await.unwrap().access.token;
    e.validate(&t, validate::Kind::Access, None).await.unwrap();
    let _ = e.validate("x", validate::Kind::Access, None).await;
    let s = e.stats(0, "").await.unwrap();
    assert_eq!(s.clients.len(), 1);
    assert_eq!(s.clients[0].0, "app");
    assert_eq!((s.clients[0].1.issued, s.clients[0].1.validated), (1, 1));
    assert_eq!(s.total.rejected[Reason::Malformed as usize], 1);
    assert_eq!(s.active_refresh_families, 1);
    env.clock.advance(Duration::hours(2));
    let s = e.stats(3600, "").await.unwrap();
    assert_eq!(s.total.issued, 0);
    assert!(e.stats(86_401, "").await.is_err());
}

/// The value of an unlabelled sample in Prometheus text, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The inputs of the rotation-overdue alert (`age > 1.5 * interval`): the age of the
/// key that signs follows the clock, restarts at each rotation (automatic or on demand),
/// and a replica reports the key its own ring holds until it reloads.
#[tokio::test]
async fn signing_key_age_and_rotation_interval_are_exported() {
    let env = env().await;
    let cfg = TokenConfig::default();
    let period = cfg.rotation_period_seconds;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = TokenMetrics::register(&mut registry);
    let text = || {
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, &registry).unwrap();
        t
    };
    let e = Engine::new(
        env.store.clone(),
        env.sealer.clone(),
        env.clock.clone(),
        Arc::new(|_| {}),
        cfg.clone(),
        metrics.clone(),
    )
    .unwrap();
    let interval = "sec_token_signing_key_rotation_interval_seconds";
    let age = "sec_token_signing_key_age_seconds";
    assert_eq!(sample(&text(), interval), Some(period as f64));
    assert_eq!(sample(&text(), age), None, "no signing key yet: no sample");

    e.start().await.unwrap();
    assert_eq!(sample(&text(), age), Some(0.0));
    env.clock
        .advance(Duration::milliseconds(5 * 3_600_000 + 250));
    assert_eq!(sample(&text(), age), Some(18_000.25));

    // Due: the next key signs and the age starts again from its activation.
    env.clock
        .advance(Duration::seconds(period as i64) - Duration::milliseconds(5 * 3_600_000 + 250));
    assert_eq!(sample(&text(), age), Some(period as f64));
    assert_eq!(e.maintain_keys().await.unwrap().len(), 1);
    assert_eq!(sample(&text(), age), Some(0.0));

    // Another replica rotates on demand: this one reports its old key until it reloads.
    let other = env.engine(cfg.clone()).await;
    env.clock.advance(Duration::seconds(90));
    other.rotate_now(None).await.unwrap();
    assert_eq!(sample(&text(), age), Some(90.0));
    e.maintain_keys().await.unwrap();
    assert_eq!(sample(&text(), age), Some(0.0));
    assert_eq!(metrics.signing_key_age_seconds(), Some(0.0));
}
