//! The fault the event outbox exists for: a producer is killed (SIGKILL) while NATS is
//! down, with every event it accepted still waiting for the broker. A new process on the
//! same outbox, with NATS up, must deliver each of them to JetStream exactly once.
//!
//! The producer is this test binary run again (`current_exe --exact child_producer`) with
//! [`CHILD_DIR`] set: it publishes [`EVENTS`] events through a bus whose NATS is a closed
//! port, prints their ids and [`READY`], and sleeps until it is killed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use prost::Message as _;
use sec_common::config::EventsConfig;
use sec_common::events::nats::NatsTransport;
use sec_common::events::{EventBus, SecurityEvent, new_event};
use sec_testkit::{Backend, backend_url};

/// Set for the child: its outbox directory. [`CHILD_RUN`] names its stream and subjects.
const CHILD_DIR: &str = "SEC_OUTBOX_KILL_DIR";
const CHILD_RUN: &str = "SEC_OUTBOX_KILL_RUN";
const EVENTS: usize = 500;
/// What the child prints before each accepted event's id, and once all are accepted.
const ID_MARK: &str = "OUTBOX-KILL-ID ";
const READY: &str = "OUTBOX-KILL-READY";
/// Nothing listens there: the child's broker is down for its whole life.
const CLOSED_NATS: &str = "nats://127.0.0.1:1";

fn cfg(run: &str, dir: &Path) -> EventsConfig {
    EventsConfig {
        stream: format!("EVENTS_KILL_{run}"),
        subject_prefix: format!("eventskill{run}"),
        audit_consumer: format!("audit-{run}"),
        outbox_dir: Some(dir.to_owned()),
        ..EventsConfig::default()
    }
}

/// The producer (only when run as the child; a no-op in a normal test run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_producer() {
    let (Ok(dir), Ok(run)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_RUN)) else {
        return;
    };
    let cfg = cfg(&run, Path::new(&dir));
    let transport = NatsTransport::connect(CLOSED_NATS, &cfg, "outbox-kill-child")
        .await
        .unwrap();
    let bus =
        EventBus::with_outbox(Arc::new(transport), &cfg, sec_common::clock::system()).unwrap();
    for i in 0..EVENTS {
        let mut e = new_event(
            &sec_common::clock::SystemClock,
            "audit",
            "sec.audit.test.happened",
        );
        e.details.insert("i".into(), i.to_string());
        let id = e.id.clone();
        bus.publish(e).unwrap();
        println!("{ID_MARK}{id}");
    }
    assert_eq!(
        bus.pending(),
        EVENTS,
        "the broker is down: nothing delivered"
    );
    println!("{READY}");
    // Killed long before this; bounded so a lost parent never leaves it behind.
    tokio::time::sleep(Duration::from_secs(120)).await;
    panic!("child_producer was not killed");
}

#[test]
fn a_producer_killed_while_nats_is_down_loses_no_event_and_duplicates_none() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let Some(url) = backend_url(Backend::Nats) else {
        return;
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_producer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, &outbox)
        .env(CHILD_RUN, &run)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut sent = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            // libtest's own `test child_producer ... ` may start the first line.
            Ok(line) if line.ends_with(READY) => break,
            Ok(line) => {
                if let Some((_, id)) = line.split_once(ID_MARK) {
                    sent.push(id.to_owned());
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "the child never got ready ({e}); ids so far: {}",
                    sent.len()
                );
            }
        }
    }
    assert_eq!(sent.len(), EVENTS);
    child.kill().unwrap(); // SIGKILL: no destructor, no flush, nothing runs
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = rt.block_on(async {
        let cfg = cfg(&run, &outbox);
        let scenario = tokio::spawn(restart_and_read_back(url.clone(), cfg.clone(), sent));
        let outcome = scenario.await;
        let client = async_nats::connect(&url).await.unwrap();
        let _ = jetstream::new(client).delete_stream(&cfg.stream).await;
        outcome
    });
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn restart_and_read_back(url: String, cfg: EventsConfig, sent: Vec<String>) {
    let transport = NatsTransport::connect(&url, &cfg, "outbox-kill-restart")
        .await
        .unwrap();
    // The kernel released the dead child's lock: the outbox opens.
    let bus =
        EventBus::with_outbox(Arc::new(transport), &cfg, sec_common::clock::system()).unwrap();
    assert_eq!(bus.pending(), EVENTS, "every accepted event is replayed");
    assert_eq!(bus.flush(Duration::from_secs(60)).await, 0);

    let mut reg = prometheus_client::registry::Registry::default();
    bus.register_metrics(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(
        text.contains(&format!("sec_events_outbox_replayed_total {EVENTS}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("sec_events_published_total {EVENTS}")),
        "{text}"
    );

    // Read the stream back with a consumer of our own.
    let client = async_nats::connect(&url).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream(&cfg.stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < EVENTS + 10 {
        let mut batch = consumer
            .fetch()
            .max_messages(200)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let before = got.len();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            got.push(SecurityEvent::decode(m.payload.as_ref()).unwrap().id);
        }
        if got.len() == before {
            break;
        }
    }
    assert_eq!(got.len(), EVENTS, "stream holds {stored} messages");
    assert_eq!(stored, EVENTS as u64);
    let unique: BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), EVENTS, "an event reached the stream twice");
    assert_eq!(
        unique,
        sent.iter().collect::<BTreeSet<_>>(),
        "exactly the events the killed producer accepted"
    );
    assert_eq!(got, sent, "and in the order they were published");
}
