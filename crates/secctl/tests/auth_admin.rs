//! The real `secctl` binary against the whole platform started in-process:
//! `client create|list|get|update|delete|rotate-secret` and
//! `user create|list|get|disable|set-password`, their JSON, exit codes, the secret shown
//! once, the stale-update refusal, and passwords only from stdin.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use sec_tests::{Backends, TestPlatform};

mod common;
use common::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secctl_client_and_user_commands() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(&tp, dir.path(), Some(&tp.token));

    // client create: the secret is in the output once.
    let c = env
        .run(
            &[
                "client",
                "create",
                "--id",
                "cli-web",
                "--name",
                "CLI web",
                "--redirect-uri",
                "https://app.example/cb",
                "--scope",
                "openid",
                "--scope",
                "profile",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(c["client_id"], "cli-web");
    assert_eq!(c["type"], "confidential");
    assert_eq!(c["token_endpoint_auth_method"], "client_secret_basic");
    assert_eq!(c["grant_types"][0], "authorization_code");
    assert_eq!(c["require_pkce"], true);
    assert_eq!(c["version"], 1);
    let secret = c["client_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("cs_"), "{c}");

    // get / list never show it.
    let got = env
        .run(&["client", "get", "cli-web", "-o", "json"], b"")
        .await
        .ok();
    assert!(!got.out().contains(&secret));
    assert!(got.json().get("client_secret").is_none());
    let table = env.run(&["client", "get", "cli-web"], b"").await.ok().out();
    assert!(
        table.contains("CLI web") && !table.contains(&secret),
        "{table}"
    );
    let list = env
        .run(&["client", "list", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|c| c["client_id"] == "cli-web")
    );

    // update: flags applied to what was read; the version moves on.
    let u = env
        .run(
            &[
                "client",
                "update",
                "cli-web",
                "--name",
                "Renamed",
                "--trusted",
                "true",
                "--access-ttl",
                "15m",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(
        (
            &u["name"],
            &u["trusted"],
            &u["access_token_ttl_seconds"],
            &u["version"]
        ),
        (&"Renamed".into(), &true.into(), &900.into(), &2.into())
    );
    assert_eq!(u["scopes"], serde_json::json!(["openid", "profile"]));
    // A stale version: ABORTED, exit 1, a message that says what happened.
    let stale = env
        .run(
            &[
                "client",
                "update",
                "cli-web",
                "--name",
                "Lost",
                "--expected-version",
                "1",
            ],
            b"",
        )
        .await;
    assert_eq!(stale.code, 1, "{}", stale.stderr);
    assert!(
        stale.stderr.contains("Aborted") && stale.stderr.contains("changed since it was read"),
        "{}",
        stale.stderr
    );
    // Invalid settings: exit 1 and the server's field-naming message.
    let bad = env
        .run(
            &[
                "client",
                "update",
                "cli-web",
                "--redirect-uri",
                "http://evil.example/cb",
            ],
            b"",
        )
        .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("InvalidArgument"), "{}", bad.stderr);
    // A usage error (unknown grant) is exit 2 before anything is dialled.
    let usage = env
        .run(
            &["client", "create", "--name", "x", "--grant", "implicit"],
            b"",
        )
        .await;
    assert_eq!(usage.code, 2);

    // rotate-secret: a new one, printed once.
    let r = env
        .run(&["client", "rotate-secret", "cli-web", "-o", "json"], b"")
        .await
        .ok()
        .json();
    let new_secret = r["client_secret"].as_str().unwrap();
    assert!(new_secret.starts_with("cs_") && new_secret != secret);
    assert_eq!(r["version"], 3);

    // delete; then get is NotFound (exit 1).
    let d = env
        .run(&["client", "delete", "cli-web", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(d["deleted"], "cli-web");
    let gone = env.run(&["client", "get", "cli-web"], b"").await;
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("NotFound"), "{}", gone.stderr);

    // user create with the password from stdin; it never appears in the output.
    let user = env
        .run(
            &[
                "user",
                "create",
                "Linus",
                "--email",
                "linus@example.com",
                "--role",
                "maintainer",
                "--claims",
                r#"{"name":"Linus"}"#,
                "--password-stdin",
                "-o",
                "json",
            ],
            b"penguin power\n",
        )
        .await
        .ok();
    assert!(!user.out().contains("penguin"));
    let user = user.json();
    let id = user["user_id"].as_str().unwrap().to_owned();
    assert_eq!(user["has_password"], true);
    assert_eq!(user["status"], "active");
    assert_eq!(user["claims"]["name"], "Linus");
    assert_eq!(user["roles"], serde_json::json!(["maintainer"]));

    let by_name = env
        .run(&["user", "get", "--username", "LINUS", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(by_name["user_id"], id.as_str());
    let listed = env
        .run(&["user", "list", "--prefix", "lin", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // set-password: only with --password-stdin; a short one is refused by the server.
    let no_flag = env
        .run(&["user", "set-password", &id], b"new password\n")
        .await;
    assert_eq!(no_flag.code, 2, "{}", no_flag.stderr);
    let short = env
        .run(
            &["user", "set-password", &id, "--password-stdin"],
            b"short\n",
        )
        .await;
    assert_eq!(short.code, 1);
    assert!(short.stderr.contains("InvalidArgument"), "{}", short.stderr);
    let set = env
        .run(
            &[
                "user",
                "set-password",
                &id,
                "--password-stdin",
                "-o",
                "json",
            ],
            b"a much longer password\n",
        )
        .await
        .ok()
        .json();
    assert_eq!(set["version"], 2);

    // disable.
    let dis = env
        .run(&["user", "disable", &id, "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(dis["status"], "disabled");
    assert_eq!(dis["version"], 3);
    let table = env.run(&["user", "list"], b"").await.ok().out();
    assert!(
        table.contains("Linus") && table.contains("disabled"),
        "{table}"
    );

    // Without the admin token: refused.
    let anon = Env::new(&tp, dir.path(), Some("wrong-token"));
    let r = anon.run(&["client", "list"], b"").await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Unauthenticated"), "{}", r.stderr);

    let _ = tp.stop().await;
}
