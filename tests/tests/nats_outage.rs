//! Killing NATS for a while loses no event: the bus spools while the broker is down and
//! delivers everything once it is back. Runs its own nats-server on a free loopback port
//! so the shared one is never disturbed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sec_common::clock::SystemClock;
use sec_common::config::EventsConfig;
use sec_common::events::nats::NatsTransport;
use sec_common::events::{EventBus, new_event};

fn nats_server_binary() -> Option<String> {
    [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .map(str::to_owned)
}

fn start_nats(bin: &str, port: u16, store: &std::path::Path) -> Child {
    Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_port(port: u16, up: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
        != up
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nats on {port} never became {}",
            if up { "up" } else { "down" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_loses_no_event() {
    let Some(bin) = nats_server_binary() else {
        assert!(
            !sec_testkit::backends_required(),
            "nats-server binary required for the outage test"
        );
        sec_testkit::skipped("nats_outage_loses_no_event: no nats-server binary");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = tempfile::tempdir().unwrap();
    let mut server = start_nats(&bin, port, store.path());
    wait_port(port, true).await;

    let cfg = EventsConfig {
        stream: "OUTAGE".into(),
        subject_prefix: "outage".into(),
        spool_capacity: 10_000,
        ..Default::default()
    };
    let transport =
        NatsTransport::connect(&format!("nats://127.0.0.1:{port}"), &cfg, "outage-test")
            .await
            .unwrap();
    let bus = EventBus::new(Arc::new(transport), &cfg);
    let mut sent = BTreeSet::new();
    let mut publish = |n: usize| {
        for _ in 0..n {
            let e = new_event(&SystemClock, "audit", "sec.audit.test.recorded");
            sent.insert(e.id.clone());
            bus.publish(e).unwrap();
        }
    };
    publish(100);
    assert_eq!(
        bus.flush(Duration::from_secs(10)).await,
        0,
        "delivered while up"
    );

    server.kill().unwrap();
    server.wait().unwrap();
    wait_port(port, false).await;
    publish(200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        bus.pending() > 0,
        "events wait in the spool while the broker is down"
    );

    let mut server = start_nats(&bin, port, store.path());
    wait_port(port, true).await;
    assert_eq!(
        bus.flush(Duration::from_secs(30)).await,
        0,
        "spool drains once the broker is back"
    );

    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < sent.len() && tokio::time::Instant::now() < deadline {
        for d in bus
            .fetch(500, Duration::from_millis(500))
            .await
            .unwrap_or_default()
        {
            got.insert(d.event.id.clone());
            d.ack().await.unwrap();
        }
    }
    server.kill().ok();
    server.wait().ok();
    assert_eq!(got.len(), 300);
    assert_eq!(
        got, sent,
        "every event, none twice (Nats-Msg-Id de-duplication)"
    );
}
