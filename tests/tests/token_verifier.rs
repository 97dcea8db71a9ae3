//! `sec_common::verifier::LocalVerifier` against the real token-svc: keys and
//! revocations from `GetJwks` / `ListRevocations` over gRPC; a signing-key revocation
//! (`sec.token.key.revoked`) and a jti revocation (`sec.token.revoked`) applied from the
//! live events (the poll interval is set far beyond the test, so only an event can
//! deliver them), on the in-process bus and on NATS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::Arc;
use std::time::Duration;

use sec_common::admin::Readiness;
use sec_common::jwt::InvalidReason;
use sec_common::supervise::Supervisor;
use sec_common::verifier::{GrpcTokenSource, LocalVerifier, VerifierConfig};
use sec_proto::token::v1 as pb;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_tests::{Backends, TestPlatform};
use token_svc::TokenConfig;
use tokio_util::sync::CancellationToken;

/// Polls `f` until it holds; the deadline only turns a hang into a failure.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scenario(tp: &TestPlatform) {
    let token_cfg = tp
        .config
        .section::<TokenConfig>(token_svc::NAME)
        .unwrap()
        .clone();
    let source = Arc::new(GrpcTokenSource::new(
        tp.channel("token"),
        tp.as_service("session"),
    ));
    let cfg = VerifierConfig {
        // Far beyond the test: revocations can only arrive as events.
        poll_interval: Duration::from_secs(3600),
        max_staleness: Duration::from_secs(7200),
        ..VerifierConfig::new(&token_cfg.issuer, &token_cfg.default_audience)
    };
    let v = LocalVerifier::new(cfg, sec_common::clock::system(), source.clone(), source);
    v.refresh_all().await.unwrap();

    let stop = CancellationToken::new();
    let mut sup_registry = Default::default();
    let mut sup = Supervisor::new(
        "test",
        &mut sup_registry,
        Arc::new(Readiness::default()),
        &stop,
    );
    v.spawn(&mut sup, Some(tp.platform.events.clone()), &stop);

    let auth = TokenServiceClient::with_interceptor(tp.channel("token"), tp.as_service("auth"));
    let issue = |subject: &'static str| {
        let mut auth = auth.clone();
        async move {
            auth.issue_tokens(pb::IssueTokensRequest {
                grant: Some(pb::Grant {
                    subject: subject.into(),
                    client_id: "app".into(),
                    scope: "read".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .access_token
            .unwrap()
        }
    };
    let a = issue("alice").await;
    let b = issue("bob").await;
    let claims = v.verify(&a.token).unwrap();
    assert_eq!(claims.sub(), "alice");
    assert_eq!(claims.jti(), Some(a.jti.as_str()));
    assert!(v.verify(&b.token).is_ok());
    // refresh_all, the loop's first poll, and the one the event loop asks for once it is
    // subscribed: after the third, events published from now on reach the verifier.
    let mut registry = prometheus_client::registry::Registry::default();
    v.register_metrics("test", &mut registry);
    let polls = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find(|l| {
                l.starts_with(
                    r#"sec_test_token_verifier_refreshes_total{source="revocations",outcome="ok"}"#,
                )
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually("subscribed", || polls() >= 3).await;
    let polls_before = polls();

    // A revoked signing key: every token it signed fails at once, by event.
    let mut admin =
        TokenServiceClient::with_interceptor(tp.channel("token"), tp.admin_bearer().unwrap());
    admin
        .revoke_signing_key(pb::RevokeSigningKeyRequest {
            kid: b.kid.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    eventually("key revocation applied", || {
        matches!(v.verify(&b.token), Err(InvalidReason::KeyRevoked))
    })
    .await;
    assert_eq!(polls(), polls_before, "applied from the event, not a poll");
    assert!(v.verify(&a.token).is_err(), "a was signed by the same key");

    // A jti revocation, by the `sec.token.revoked` event.
    let c = issue("carol").await;
    // A new key may be current now; fetch it (a token of an unknown kid asks for that).
    v.refresh_jwks().await.unwrap();
    assert!(v.verify(&c.token).is_ok());
    let polls_before = polls();
    auth.clone()
        .revoke_token(pb::RevokeTokenRequest {
            target: Some(pb::revoke_token_request::Target::Jti(c.jti.clone())),
            expires_at: c.expires_at,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("jti revocation applied", || {
        matches!(v.verify(&c.token), Err(InvalidReason::Revoked))
    })
    .await;
    assert_eq!(polls(), polls_before, "applied from the event, not a poll");
    let d = issue("dave").await;
    assert!(v.verify(&d.token).is_ok(), "only that jti");

    // Garbage is refused with its reason, no network involved.
    assert_eq!(v.verify("x.y.z").unwrap_err(), InvalidReason::Malformed);
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_verifier_follows_token_svc_in_process() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    scenario(&tp).await;
    tp.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_verifier_follows_token_svc_over_nats() {
    let Some(tp) = TestPlatform::start(Backends::Production).await else {
        return;
    };
    scenario(&tp).await;
    let seed = tp.seed.clone();
    let (r, _) = tp.stop().await;
    TestPlatform::cleanup(&seed).await;
    r.unwrap();
}
