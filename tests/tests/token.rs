//! token-svc end to end over gRPC: issue with the in-process credential of `auth`,
//! validate, refresh rotation and reuse detection, revocation, signing-key management,
//! the JWKS; and interop: tokens of every algorithm verified against the published JWKS
//! by PyJWT and npm `jose` (installed by the test under the target directory).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use sec_common::error::error_info;
use sec_common::grpc::BearerToken;
use sec_proto::token::v1 as pb;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_tests::{Backends, TestPlatform};
use token_svc::TokenConfig;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = TokenServiceClient<InterceptedService<Channel, BearerToken>>;

fn client(tp: &TestPlatform, bearer: BearerToken) -> Client {
    TokenServiceClient::with_interceptor(tp.channel("token"), bearer)
}

async fn start(backends: Backends) -> Option<TestPlatform> {
    let mut seed = TestPlatform::seed(backends)?;
    // No grace window, so reuse is detected without waiting.
    let cfg = TokenConfig {
        refresh_grace_seconds: 0,
        ..seed
            .config
            .section::<TokenConfig>(token_svc::NAME)
            .unwrap()
            .clone()
    };
    seed.config.set_section(token_svc::NAME, cfg).unwrap();
    Some(TestPlatform::start_with(seed, None).await)
}

fn grant() -> pb::Grant {
    pb::Grant {
        subject: "alice".into(),
        client_id: "app".into(),
        scope: "openid profile".into(),
        ..Default::default()
    }
}

async fn issue(auth: &mut Client, refresh: bool) -> pb::IssueTokensResponse {
    auth.issue_tokens(pb::IssueTokensRequest {
        grant: Some(grant()),
        id_token: true,
        nonce: "n".into(),
        refresh_token: refresh,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn validate(c: &mut Client, token: &str) -> pb::ValidateTokenResponse {
    c.validate_token(pb::ValidateTokenRequest {
        token: token.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn flow(tp: &TestPlatform) {
    let mut auth = client(tp, tp.as_service("auth"));
    let mut other = client(tp, tp.as_service("session"));
    let mut anon = client(tp, BearerToken::new(None).unwrap());
    let mut admin = client(tp, tp.admin_bearer().unwrap());

    // JWKS: anyone; current + next published.
    let jwks = anon
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let v: serde_json::Value = serde_json::from_str(&jwks.jwks_json).unwrap();
    assert_eq!(v["keys"].as_array().unwrap().len(), 2);
    assert_eq!(jwks.max_age_seconds, 300);

    // Only token.issuers (auth) and the admin issue.
    let denied = other
        .issue_tokens(pb::IssueTokensRequest {
            grant: Some(grant()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        anon.validate_token(pb::ValidateTokenRequest::default())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );

    let t = issue(&mut auth, true).await;
    let access = t.access_token.unwrap();
    let ok = validate(&mut other, &access.token).await;
    assert!(ok.valid);
    assert_eq!(
        (ok.subject.as_str(), ok.client_id.as_str()),
        ("alice", "app")
    );
    assert_eq!(ok.jti, access.jti);
    let claims: serde_json::Value = serde_json::from_str(&ok.claims_json).unwrap();
    assert_eq!(claims["scope"], "openid profile");
    let bad = validate(&mut other, "not.a.token").await;
    assert!(!bad.valid);
    assert_eq!(bad.reason, pb::InvalidReason::Malformed as i32);
    let id = t.id_token.unwrap();
    let idv = other
        .validate_token(pb::ValidateTokenRequest {
            token: id.token.clone(),
            kind: pb::TokenKind::Id as i32,
            audience: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(idv.valid);

    // Refresh: rotation, then reuse of the first token revokes the family.
    let r0 = t.refresh_token.unwrap();
    let r1 = auth
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: r0.token.clone(),
            client_id: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r1.outcome, pb::RefreshOutcome::Rotated as i32);
    let r1 = r1.tokens.unwrap().refresh_token.unwrap();
    let reuse = auth
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: r0.token.clone(),
            client_id: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_info(&reuse).unwrap().code, "reuse_detected");
    let gone = auth
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: r1.token.clone(),
            client_id: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_info(&gone).unwrap().code, "invalid_grant");
    let intro = other
        .introspect_refresh_token(pb::IntrospectRefreshTokenRequest {
            refresh_token: r1.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!intro.active);

    // Revocation by jti, visible in ValidateToken and ListRevocations.
    let revoked = other
        .revoke_token(pb::RevokeTokenRequest {
            target: Some(pb::revoke_token_request::Target::Jti(access.jti.clone())),
            expires_at: access.expires_at,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked, 1);
    let r = validate(&mut other, &access.token).await;
    assert_eq!(r.reason, pb::InvalidReason::Revoked as i32);
    let list = other
        .list_revocations(pb::ListRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.snapshot);
    assert!(
        list.revocations
            .iter()
            .any(|r| r.target == Some(pb::revocation::Target::Jti(access.jti.clone())))
    );

    // Key management is the admin's.
    assert_eq!(
        other
            .list_signing_keys(pb::ListSigningKeysRequest::default())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    let before = issue(&mut auth, false).await.access_token.unwrap();
    let rot = admin
        .rotate_signing_key(pb::RotateSigningKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rot.retiring.unwrap().kid, before.kid);
    assert!(
        validate(&mut other, &before.token).await.valid,
        "retiring still valid"
    );
    let k = admin
        .revoke_signing_key(pb::RevokeSigningKeyRequest {
            kid: before.kid.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.state, pb::KeyState::Revoked as i32);
    let r = validate(&mut other, &before.token).await;
    assert_eq!(r.reason, pb::InvalidReason::KeyRevoked as i32);
    let jwks = anon
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!jwks.jwks_json.contains(&before.kid));
    let stats = admin
        .token_stats(pb::TokenStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let total = stats.total.unwrap();
    assert_eq!(
        (total.issued, total.refreshed, total.reuse_detected),
        (2, 1, 1)
    );
    assert!(stats.signing_key_rotations >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_flow_embedded() {
    let tp = start(Backends::Embedded).await.unwrap();
    flow(&tp).await;
    let (r, _) = tp.stop().await;
    r.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_flow_production_backends() {
    let Some(tp) = start(Backends::Production).await else {
        return;
    };
    flow(&tp).await;
    let seed = tp.seed.clone();
    let (r, _) = tp.stop().await;
    TestPlatform::cleanup(&seed).await;
    r.unwrap();
}

/// Keys and refresh families survive a restart over the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_keys_and_families() {
    let mut seed = TestPlatform::seed(Backends::Embedded).unwrap();
    // The facade gets a new port at restart: an issuer that does not name it stays valid.
    let mut cfg = seed
        .config
        .section::<token_svc::TokenConfig>(token_svc::NAME)
        .unwrap()
        .clone();
    cfg.issuer = "https://issuer.restart.test".into();
    seed.config.set_section(token_svc::NAME, cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tp = TestPlatform::start_with(seed.clone(), Some(dir.path().to_owned())).await;
    let mut auth = client(&tp, tp.as_service("auth"));
    let t = issue(&mut auth, true).await;
    let (r, _) = tp.stop().await;
    r.unwrap();

    let tp = TestPlatform::start_with(seed, Some(dir.path().to_owned())).await;
    let mut auth = client(&tp, tp.as_service("auth"));
    assert!(
        validate(&mut auth, &t.access_token.unwrap().token)
            .await
            .valid
    );
    auth.refresh_tokens(pb::RefreshTokensRequest {
        refresh_token: t.refresh_token.unwrap().token,
        client_id: "app".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (r, _) = tp.stop().await;
    r.unwrap();
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_with_stdin(mut cmd: Command, input: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Tokens of ES256, EdDSA, RS256 and PS256 verified against the published JWKS by two
/// independent libraries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_pyjwt_and_jose() {
    let tp = start(Backends::Embedded).await.unwrap();
    let mut auth = client(&tp, tp.as_service("auth"));
    let mut admin = client(&tp, tp.admin_bearer().unwrap());
    let mut cases = Vec::new();
    for (alg, name) in [
        (pb::Algorithm::Es256, "ES256"),
        (pb::Algorithm::Eddsa, "EdDSA"),
        (pb::Algorithm::Rs256, "RS256"),
        (pb::Algorithm::Ps256, "PS256"),
    ] {
        // The first rotation makes a next key of `alg`, the second makes it current.
        for _ in 0..2 {
            admin
                .rotate_signing_key(pb::RotateSigningKeyRequest { alg: alg as i32 })
                .await
                .unwrap();
        }
        let t = issue(&mut auth, false).await.access_token.unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                t.token.split('.').next().unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], name);
        cases.push(serde_json::json!({ "alg": name, "token": t.token }));
    }
    let jwks = auth
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let cfg = tp.config.section::<TokenConfig>(token_svc::NAME).unwrap();
    let input = serde_json::json!({
        "jwks": jwks.jwks_json,
        "iss": cfg.issuer,
        "aud": cfg.default_audience,
        "cases": cases,
    })
    .to_string();
    let (r, _) = tp.stop().await;
    r.unwrap();

    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/token");
    let target = target_dir();
    if have("python3") {
        let py = target.join("pyenv");
        if !py.join("jwt").exists() {
            let st = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&py)
                .arg("pyjwt[crypto]>=2.8,<3")
                .status()
                .unwrap();
            assert!(st.success(), "pip install pyjwt[crypto] failed");
        }
        let mut cmd = Command::new("python3");
        cmd.arg(here.join("verify_pyjwt.py")).env("PYTHONPATH", &py);
        let (ok, out) = run_with_stdin(cmd, &input);
        println!("PyJWT:\n{out}");
        assert!(ok, "PyJWT: {out}");
        assert_eq!(out.matches(" ok").count(), 4, "{out}");
    } else {
        interop_skipped("PyJWT interop (python3 not installed)");
    }
    if have("node") && have("npm") {
        let dir = target.join("node-jose");
        if !dir.join("node_modules/jose").exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let st = Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&dir)
                .arg("jose@5")
                .status()
                .unwrap();
            assert!(st.success(), "npm install jose failed");
        }
        let mut cmd = Command::new("node");
        cmd.arg(here.join("verify_jose.mjs")).env("JOSE_DIR", &dir);
        let (ok, out) = run_with_stdin(cmd, &input);
        println!("jose:\n{out}");
        assert!(ok, "jose: {out}");
        assert_eq!(out.matches(" ok").count(), 4, "{out}");
    } else {
        interop_skipped("npm jose interop (node/npm not installed)");
    }
}

/// A missing third-party tool skips loudly, or fails under `SEC_TEST_INTEROP=required`
/// (as CI sets it), like the interop suite in `tests/interop/run.sh`.
fn interop_skipped(what: &str) {
    assert!(
        std::env::var("SEC_TEST_INTEROP").as_deref() != Ok("required"),
        "{what}, and SEC_TEST_INTEROP=required"
    );
    sec_testkit::skipped(what);
}
