//! The `secd dev` binary as a user runs it: it prints every address, serves gRPC health
//! on all seven services, exits 0 within 10 s of SIGTERM, and a second start reuses the
//! data directory (and its admin token).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICES: [&str; 7] = [
    "audit", "crypto", "token", "session", "auth", "gdpr", "assess",
];

fn start(data: &std::path::Path) -> (Child, BTreeMap<String, String>, Vec<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_secd"));
    cmd.args(["dev", "--data-dir"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd.env("SEC_FACADE__HTTP_ADDR", "127.0.0.1:0");
    for s in SERVICES {
        let up = s.to_uppercase();
        cmd.env(format!("SEC_SERVICES__{up}__GRPC_ADDR"), "127.0.0.1:0");
        cmd.env(format!("SEC_SERVICES__{up}__ADMIN_ADDR"), "127.0.0.1:0");
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = BTreeMap::new();
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 3 && words[1] == "grpc" {
            addrs.insert(words[0].to_owned(), words[2].to_owned());
        }
        if words.first() == Some(&"facade") {
            addrs.insert("facade".into(), words[1].to_owned());
        }
        let done = line.contains("press Ctrl-C");
        banner.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {}); // keep the pipe drained
    (child, addrs, banner)
}

fn sigterm_and_wait(mut child: Child) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(15) {
            child.kill().ok();
            panic!("secd still running 15 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// Multi-thread so the client connections answer the server's GOAWAY while the test
// thread waits for the exit, as a live client process would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secd_dev_serves_stops_on_sigterm_and_keeps_data() {
    let data = tempfile::tempdir().unwrap();
    let (child, addrs, banner) = start(data.path());
    assert!(
        banner.iter().any(|l| l.contains("admin token created")),
        "{banner:?}"
    );
    assert_eq!(addrs.len(), 8, "seven services and the facade: {banner:?}");
    for s in SERVICES {
        let url = format!("http://{}", addrs[s]);
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let name = format!("sec.{s}.v1.{}{}Service", &s[..1].to_uppercase(), &s[1..]);
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest { service: name })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, ServingStatus::Serving as i32, "{s}");
    }
    let (status, took) = sigterm_and_wait(child);
    assert!(status.success(), "exit status {status:?}");
    // Clients still hold open connections here; the drain must not wait them out.
    assert!(took < Duration::from_secs(3), "took {took:?}");

    let token = std::fs::read_to_string(data.path().join("admin.token")).unwrap();
    let (child, _, banner) = start(data.path());
    assert!(banner.iter().any(|l| l.contains("(reused)")), "{banner:?}");
    assert_eq!(
        std::fs::read_to_string(data.path().join("admin.token")).unwrap(),
        token
    );
    let (status, _) = sigterm_and_wait(child);
    assert!(status.success());
}

#[test]
fn bad_config_exits_64_before_binding() {
    let out = Command::new(env!("CARGO_BIN_EXE_secd"))
        .args(["dev"])
        .env("SEC_EVENTS__SPOOL_CAPACITY", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SEC_EVENTS__SPOOL_CAPACITY"), "{err}");
}

#[test]
fn check_config_redacts_secrets() {
    let out = Command::new(env!("CARGO_BIN_EXE_secd"))
        .arg("check-config")
        .env(
            "SEC_STORAGE__DATABASE_URL",
            "postgres://sec:hunter2@db:5432/sec",
        )
        .env(
            "SEC_CRYPTO__KEK",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("db:5432") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(!shown.contains("AAAAAAAA"), "the KEK is a secret: {shown}");
    assert!(
        shown.contains("[crypto]"),
        "service sections are shown: {shown}"
    );
}
