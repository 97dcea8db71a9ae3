//! The real `secctl` binary against the whole platform started in-process: `token
//! inspect|revoke|stats` and `signing-key list|rotate|revoke`, their JSON, exit codes and
//! error reporting.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use sec_proto::token::v1 as pb;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_tests::{Backends, TestPlatform};

mod common;
use common::Env;

fn by_state<'a>(keys: &'a serde_json::Value, state: &str) -> Vec<&'a serde_json::Value> {
    keys.as_array()
        .unwrap()
        .iter()
        .filter(|k| k["state"] == state)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secctl_token_and_signing_key_commands() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(&tp, dir.path(), Some(&tp.token));

    // signing-key list: the published current and next keys.
    let keys = env
        .run(&["signing-key", "list", "-o", "json"], b"")
        .await
        .ok()
        .json();
    let current = by_state(&keys, "current");
    let next = by_state(&keys, "next");
    assert_eq!((current.len(), next.len()), (1, 1), "{keys}");
    let current_kid = current[0]["kid"].as_str().unwrap().to_owned();
    let next_kid = next[0]["kid"].as_str().unwrap().to_owned();
    assert_eq!(current[0]["alg"], "ES256");
    assert_eq!(current[0]["public_jwk"]["kid"], current_kid.as_str());
    let table = env.run(&["signing-key", "list"], b"").await.ok().out();
    assert!(
        table.contains(&current_kid) && table.contains("current"),
        "{table}"
    );

    // A token to work with, issued as the admin.
    let mut c =
        TokenServiceClient::with_interceptor(tp.channel("token"), tp.admin_bearer().unwrap());
    let issued = c
        .issue_tokens(pb::IssueTokensRequest {
            grant: Some(pb::Grant {
                subject: "alice".into(),
                client_id: "cli-app".into(),
                scope: "read".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .access_token
        .unwrap();

    // inspect: decoded locally, marked unverified; the token from stdin.
    let v = env
        .run(&["token", "inspect", "-o", "json"], issued.token.as_bytes())
        .await
        .ok()
        .json();
    assert_eq!(v["verified"], false);
    assert_eq!(v["header"]["kid"], current_kid.as_str());
    assert_eq!(v["header"]["typ"], "at+jwt");
    assert_eq!(v["claims"]["sub"], "alice");
    assert_eq!(v["claims"]["jti"], issued.jti.as_str());
    assert!(v.get("validation").is_none());
    let t = env
        .run(&["token", "inspect", &issued.token], b"")
        .await
        .ok()
        .out();
    assert!(t.starts_with("NOT VERIFIED"), "{t}");

    // --validate asks token-svc.
    let v = env
        .run(
            &["token", "inspect", "--validate", "-o", "json", "-"],
            issued.token.as_bytes(),
        )
        .await
        .ok()
        .json();
    assert_eq!(v["validation"]["valid"], true, "{v}");
    assert_eq!(v["validation"]["kid"], current_kid.as_str());

    // revoke by jti, then validation fails with exit 1 and the reason.
    let r = env
        .run(
            &["token", "revoke", "--jti", &issued.jti, "-o", "json"],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(r["revoked"], 1);
    let r = env
        .run(
            &["token", "inspect", "--validate", "-o", "json"],
            issued.token.as_bytes(),
        )
        .await;
    assert_eq!(r.code, 1, "an invalid token is a failing predicate");
    assert_eq!(r.json()["validation"]["reason"], "revoked");
    let r = env
        .run(&["token", "inspect", "--validate"], issued.token.as_bytes())
        .await;
    assert!(r.out().contains("INVALID (revoked)"), "{}", r.out());

    // revoke a subject (table output).
    let r = env
        .run(
            &["token", "revoke", "--subject", "alice", "--reason", "test"],
            b"",
        )
        .await
        .ok();
    assert!(r.out().starts_with("revoked: "), "{}", r.out());

    // stats: the issue and the validations are counted for the client.
    let s = env
        .run(&["token", "stats", "--window", "1h", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(s["window_seconds"], 3600);
    assert!(s["total"]["issued"].as_u64().unwrap() >= 1, "{s}");
    let app = s["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == "cli-app");
    assert!(app.is_some_and(|a| a["issued"] == 1), "{s}");
    let t = env
        .run(&["token", "stats", "--client", "cli-app"], b"")
        .await
        .ok()
        .out();
    assert!(t.contains("cli-app") && t.contains("TOTAL"), "{t}");

    // rotate: next becomes current, the old current retires.
    let r = env
        .run(&["signing-key", "rotate", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(r["current"]["kid"], next_kid.as_str(), "{r}");
    assert_eq!(r["retiring"]["kid"], current_kid.as_str(), "{r}");
    assert_eq!(r["next"]["state"], "next");

    // revoke the retiring key; it leaves the published list, `--all` still shows it.
    let r = env
        .run(
            &[
                "signing-key",
                "revoke",
                &current_kid,
                "--reason",
                "test",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(r["state"], "revoked");
    let published = env
        .run(&["signing-key", "list", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(by_state(&published, "revoked").is_empty());
    let all = env
        .run(&["signing-key", "list", "--all", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(
        by_state(&all, "revoked")
            .iter()
            .any(|k| k["kid"] == current_kid.as_str()),
        "{all}"
    );

    // Failures: a non-zero exit and the gRPC code by name; usage errors exit 2.
    let r = env
        .run(&["signing-key", "revoke", "no-such-kid"], b"")
        .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("secctl: NotFound"), "{}", r.stderr);
    let r = env.run(&["token", "inspect"], b"not a token").await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not a JWT"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("not a token"),
        "input never echoed: {}",
        r.stderr
    );
    assert_eq!(env.run(&["token", "revoke"], b"").await.code, 2);
    // Without credentials the admin commands are refused.
    let anon = Env::new(&tp, dir.path(), None);
    let r = anon.run(&["signing-key", "list"], b"").await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    tp.stop().await.0.unwrap();
}
