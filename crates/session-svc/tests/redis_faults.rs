//! Redis faults with servers this test starts itself (the machine's `redis-server`, on
//! free ports): an outage fails calls fast with UNAVAILABLE and readiness goes false,
//! then the store recovers by itself; and a Sentinel failover keeps every session whose
//! write was acknowledged with `WAIT`.
//!
//! Skipped loudly when `redis-server` is missing (failing under
//! `SEC_TEST_BACKENDS=required`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sec_common::error::ErrorCode;
use sec_common::storage::RedisPool;
use session_svc::SessionConfig;
use session_svc::engine::{Engine, NewSession, SessionMetrics};
use session_svc::store::redis::RedisSessionStore;

fn have_redis_server() -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !sec_testkit::backends_required(),
            "redis-server is required (SEC_TEST_BACKENDS=required)"
        );
        sec_testkit::skipped("session-svc Redis fault tests: no redis-server on PATH");
    }
    ok
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server process, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap(), "--save", ""])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Self { child, port };
        s.wait_up();
        s
    }

    fn wait_up(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn engine(store: RedisSessionStore) -> Engine {
    Engine::new(
        Arc::new(store),
        sec_common::clock::system(),
        Arc::new(|_| {}),
        SessionConfig {
            max_sessions_per_user: 1000,
            ..SessionConfig::default()
        },
        SessionMetrics::default(),
    )
}

fn session(user: &str) -> NewSession {
    NewSession {
        user: user.into(),
        client: "web".into(),
        ..Default::default()
    }
}

async fn redis_cmd<T: deadpool_redis::redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let mut c = RedisPool::from_url(&format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get()
        .await
        .unwrap();
    let mut cmd = deadpool_redis::redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_fast_then_recovers_with_sessions_kept_by_aof() {
    if !have_redis_server() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut server = Server::start(port, dir.path(), &aof);
    let pool = RedisPool::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
    let e = engine(
        RedisSessionStore::new(pool, "t:session:".into()).with_timeout(Duration::from_millis(300)),
    );
    let (id, _, _) = e.create(session("amy")).await.unwrap();
    e.access(&id, "", "", true).await.unwrap();
    assert!(e.ping().await.is_ok());
    assert_eq!(e.metrics.store_up.get(), 1);

    server.kill();
    // Every operation fails with UNAVAILABLE: never a panic, never a session granted.
    assert!(e.ping().await.is_err(), "readiness goes false");
    assert_eq!(e.metrics.store_up.get(), 0, "sec_session_store_up follows");
    for _ in 0..3 {
        let err = e.access(&id, "", "", false).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unavailable);
        assert_eq!(err.reason, "unavailable");
        assert!(!err.error.message.contains(&id[5..]), "no id in errors");
    }
    assert_eq!(
        e.create(session("amy")).await.unwrap_err().code(),
        ErrorCode::Unavailable
    );
    assert_eq!(
        e.rotate(&id).await.unwrap_err().code(),
        ErrorCode::Unavailable
    );

    // Restarted on the same port from its AOF: the pool reconnects by itself and the
    // session is still there.
    let _server = Server::start(port, dir.path(), &aof);
    let mut back = false;
    for _ in 0..50 {
        if e.ping().await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "readiness recovers");
    assert_eq!(e.metrics.store_up.get(), 1);
    let (_, r, _) = e.access(&id, "", "", false).await.unwrap();
    assert_eq!(r.user, "amy");
}

/// A Redis that accepts connections and never answers: the ping gives up within
/// `PING_TIMEOUT` even with a longer per-call timeout configured, so readiness gets an
/// answer and `sec_session_store_up` drops to 0 instead of keeping its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_is_recorded_down_within_the_ping_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let pool = RedisPool::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
    let e = engine(
        RedisSessionStore::new(pool, "t:session:".into()).with_timeout(Duration::from_secs(30)),
    );
    e.metrics.store_up.set(1);
    let started = std::time::Instant::now();
    let err = e.ping().await.unwrap_err();
    let took = started.elapsed();
    assert!(err.contains("timed out"), "{err}");
    // The Redis client may give up first (its connection setup is bounded too); never later.
    assert!(
        took < session_svc::engine::PING_TIMEOUT + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(e.metrics.store_up.get(), 0);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_every_acknowledged_session() {
    if !have_redis_server() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2, ps) = (free_port(), free_port(), free_port());
    let d1 = dir.path().join("primary");
    let d2 = dir.path().join("replica");
    let ds = dir.path().join("sentinel");
    for d in [&d1, &d2, &ds] {
        std::fs::create_dir(d).unwrap();
    }
    let mut primary = Server::start(p1, &d1, &[]);
    let _replica = Server::start(p2, &d2, &["--replicaof", "127.0.0.1", &p1.to_string()]);
    let conf = ds.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {ps}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {p1} 1\n\
             sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n",
            ds.display()
        ),
    )
    .unwrap();
    let sentinel_child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _sentinel = Server {
        child: sentinel_child,
        port: ps,
    };
    _sentinel.wait_up();
    // The replica must be attached before WAIT can acknowledge anything.
    let mut linked = false;
    for _ in 0..100 {
        let info: String = redis_cmd(p1, &["INFO", "replication"]).await;
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            linked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(linked, "replica attached");
    // Sentinel learns of replicas from the primary's INFO (every 10 s at first): a
    // failover before that would find no replica to promote.
    let mut known = false;
    for _ in 0..300 {
        let replicas: Vec<Vec<String>> = redis_cmd(ps, &["SENTINEL", "REPLICAS", "mymaster"]).await;
        if !replicas.is_empty() {
            known = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(known, "sentinel knows the replica");

    let pool = RedisPool::from_url(&format!("redis+sentinel://127.0.0.1:{ps}/mymaster")).unwrap();
    let e = engine(
        RedisSessionStore::new(pool, "f:session:".into())
            .with_wait(1, 2000)
            .with_timeout(Duration::from_millis(500)),
    );
    let mut acked = Vec::new();
    for i in 0..50 {
        let (id, _, _) = e.create(session(&format!("u{}", i % 5))).await.unwrap();
        acked.push(id);
    }

    primary.kill();
    // Sentinel notices after ~1 s and promotes the replica; the same store (Sentinel
    // URL) finds the new primary on its own.
    let mut ok = false;
    for _ in 0..150 {
        let r = e.access(&acked[0], "", "", false).await;
        if r.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "service resumed after failover");
    for id in &acked {
        let (_, r, _) = e.access(id, "", "", false).await.unwrap();
        assert!(r.user.starts_with('u'));
    }
    // The promoted primary has no replica left: a write that asks for one is not
    // acknowledged (UNAVAILABLE) rather than acknowledged and possibly lost.
    assert_eq!(
        e.access(&acked[1], "", "", true).await.unwrap_err().code(),
        ErrorCode::Unavailable
    );
    let info: String = redis_cmd(p2, &["INFO", "replication"]).await;
    assert!(info.contains("role:master"), "the replica was promoted");
}
