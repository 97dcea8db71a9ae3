//! The real `secctl ratelimit …` and `secctl ip …` against an in-test tonic server of
//! sec-edge's `EdgeService` (auth-svc hosts it in the platform; the server here checks
//! the admin bearer token and nothing else): JSON output, field-named refusals, exit
//! codes, automatic blocks listed and unblocked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use sec_common::auth::Caller;
use sec_common::storage::Db;
use sec_edge::limiter::{EdgeMetrics, Limiter, LimiterOptions};
use sec_edge::rules::{RuleSet, StoreKind};
use sec_edge::runtime::{EdgeConfig, EdgeDeps, EdgeRuntime, FailureReason};
use sec_proto::edge::v1::edge_service_server::EdgeServiceServer;

mod common;
use common::Run;

static AUTH_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/auth/sqlite");
const TOKEN: &str = "sec_edge-test-admin-token";

async fn serve(dir: &std::path::Path) -> (SocketAddr, EdgeRuntime) {
    let pool = sec_common::storage::connect_sqlite(&dir.join("auth.db"), 4)
        .await
        .unwrap();
    AUTH_SQLITE.run(&pool).await.unwrap();
    let clock = sec_common::clock::system();
    let mut cfg = EdgeConfig::default();
    cfg.auto_block.threshold = 2;
    let mut reg = Registry::default();
    let limiter = Limiter::in_process(
        RuleSet::build(&cfg.ratelimit, StoreKind::InProcess).unwrap(),
        &LimiterOptions::default(),
        clock.clone(),
        EdgeMetrics::register(&mut reg),
    )
    .unwrap();
    let rt = EdgeRuntime::with_limiter(
        &cfg,
        limiter,
        EdgeDeps {
            service: "auth",
            db: Db::Sqlite(pool),
            clock,
            emit: Arc::new(|_| {}),
        },
        &mut reg,
    )
    .await
    .unwrap();
    let svc = EdgeServiceServer::with_interceptor(
        sec_edge::EdgeGrpc::new(rt.clone()),
        |mut req: tonic::Request<()>| {
            let caller = match req.metadata().get("authorization").map(|v| v.to_str()) {
                Some(Ok(v)) if v == format!("Bearer {TOKEN}") => Caller::Admin,
                Some(_) => return Err(tonic::Status::unauthenticated("bad token")),
                None => Caller::Anonymous,
            };
            req.extensions_mut().insert(caller);
            Ok(req)
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rt)
}

async fn secctl(addr: SocketAddr, data: &std::path::Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_secctl"));
    cmd.env_clear()
        .env("SEC_SERVICES__AUTH__GRPC_ADDR", addr.to_string())
        .env("SEC_DATA_DIR", data.display().to_string())
        .env("SEC_TOKEN", TOKEN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        drop(child.stdin.take().map(|mut p| p.write_all(b"")));
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secctl_ratelimit_and_ip_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, rt) = serve(dir.path()).await;
    let data = dir.path().join("cli");
    let run = |args: Vec<&'static str>| {
        let data = data.clone();
        async move { secctl(addr, &data, &args).await }
    };

    // ratelimit set / rules / delete
    let set = run(vec![
        "ratelimit",
        "set",
        "login.ip",
        "--route",
        "/v1/login",
        "--key",
        "ip",
        "--rate",
        "10",
        "--per",
        "minute",
        "--burst",
        "5",
        "-o",
        "json",
    ])
    .await
    .ok()
    .json();
    assert_eq!(set["id"], "login.ip");
    assert_eq!(set["limit"]["burst"], 5);
    let rules = run(vec!["ratelimit", "rules", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(rules.as_array().unwrap().len(), 1);
    assert_eq!(rules[0]["match"]["route"], "/v1/login");
    assert_eq!(rules[0]["source"], "runtime");
    let table = run(vec!["ratelimit", "rules"]).await.ok().out();
    assert!(
        table.contains("login.ip") && table.contains("10/minute burst 5"),
        "{table}"
    );

    // A bad rule: refused naming the field, exit 1, the old rule stays.
    let bad = run(vec![
        "ratelimit",
        "set",
        "login.ip",
        "--route",
        "/v1/login",
        "--key",
        "ip",
        "--rate",
        "10",
        "--burst",
        "0",
    ])
    .await;
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("InvalidArgument") && bad.stderr.contains("rule.limit.burst"),
        "{}",
        bad.stderr
    );
    let rules = run(vec!["ratelimit", "rules", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(rules[0]["limit"]["burst"], 5);

    let stats = run(vec!["ratelimit", "stats", "--window", "10m", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(stats["window_seconds"], 600);
    assert_eq!(stats["keys"], serde_json::json!([]));
    assert_eq!(
        run(vec!["ratelimit", "stats", "--window", "2h"]).await.code,
        1
    );

    run(vec!["ratelimit", "delete", "login.ip"]).await.ok();
    let gone = run(vec!["ratelimit", "delete", "login.ip"]).await;
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("NotFound"), "{}", gone.stderr);

    // ip deny / allow / list
    let deny = run(vec!["ip", "deny", "203.0.113.0/24", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(deny["action"], "deny");
    assert_eq!(deny["expires_at"], serde_json::Value::Null);
    run(vec![
        "ip",
        "allow",
        "198.51.100.7",
        "--scope",
        "client:partner",
        "--ttl",
        "1h",
    ])
    .await
    .ok();
    let bad = run(vec!["ip", "deny", "10.0.0.1/8"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("rule.network"), "{}", bad.stderr);
    let bad = run(vec!["ip", "deny", "10.0.0.0/8", "--scope", "tenant"]).await;
    assert!(bad.stderr.contains("rule.scope"), "{}", bad.stderr);
    assert_eq!(
        run(vec!["ip", "deny", "10.0.0.0/8", "--ttl", "soon"])
            .await
            .code,
        2
    );

    // An automatic block shows in the list and goes with unblock.
    let ip = "192.0.2.77".parse().unwrap();
    rt.record_failure(ip, FailureReason::LoginFailure)
        .await
        .unwrap();
    rt.record_failure(ip, FailureReason::LoginFailure)
        .await
        .unwrap();
    let list = run(vec!["ip", "list", "-o", "json"]).await.ok().json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    let block = list
        .iter()
        .find(|r| r["reason"] == "auto_block:login_failure")
        .unwrap();
    assert_eq!(block["network"], "192.0.2.77/32");
    assert!(block["expires_at"].is_string());
    assert!(
        list.iter()
            .any(|r| r["scope"] == "client:partner" && r["expires_at"].is_string())
    );
    let table = run(vec!["ip", "list"]).await.ok().out();
    assert!(table.contains("auto_block:login_failure"), "{table}");
    let un = run(vec!["ip", "unblock", "192.0.2.77", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(un["removed"], 1);
    assert_eq!(run(vec!["ip", "unblock", "192.0.2.77"]).await.code, 1);
    assert_eq!(
        rt.ip_control().check(ip, None, "/"),
        Ok(()),
        "unblocked at once"
    );

    // delete by id
    run(vec!["ip", "delete", "deny:global:203.0.113.0/24"])
        .await
        .ok();
    let list = run(vec!["ip", "list", "-o", "json"]).await.ok().json();
    assert_eq!(list.as_array().unwrap().len(), 1);

    let stats = run(vec!["ip", "stats", "-o", "json"]).await.ok().json();
    assert_eq!(stats["window_seconds"], 300);

    // Without the admin token: refused.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_secctl"));
    let out = tokio::task::spawn_blocking(move || {
        cmd.env_clear()
            .env("SEC_SERVICES__AUTH__GRPC_ADDR", addr.to_string())
            .env("SEC_DATA_DIR", "/nonexistent-secctl-edge")
            .env("SEC_TOKEN", "sec_wrong")
            .args(["ip", "list"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
}
