//! The hash-chain contract both backends must meet: one linear chain under parallel
//! writers, redeliveries that take no position, and verification that names the first
//! bad position after a row is edited, deleted or inserted behind the service's back.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::sync::Arc;

use sec_common::clock::{Clock as _, ManualClock};
use sec_common::events::{SecurityEvent, new_event};
use sec_common::storage::Db;

use super::AuditStore;
use crate::chain::{CheckpointSigner, Problem};
use crate::verify::local::LocalSigner;
use crate::verify::{checkpoint_now, verify};

const ORIGIN: &str = "sec-audit/test";

fn events(clock: &ManualClock, n: usize, tag: &str) -> Vec<SecurityEvent> {
    (0..n)
        .map(|i| {
            let mut e = new_event(clock, "auth", "sec.auth.login.failed");
            e.subject = format!("user:{tag}-{i}");
            e.details.insert("attempt".into(), i.to_string());
            e.details.insert("reason".into(), "bad password".into());
            e.source_ip = "192.0.2.7".into();
            clock.advance(chrono::Duration::milliseconds(3));
            e
        })
        .collect()
}

async fn exec(db: &Db, pg: &str, lite: &str) {
    match db {
        Db::Postgres(p) => {
            sqlx::query(sqlx::AssertSqlSafe(pg.to_owned()))
                .execute(p)
                .await
                .unwrap();
        }
        Db::Sqlite(p) => {
            sqlx::query(sqlx::AssertSqlSafe(lite.to_owned()))
                .execute(p)
                .await
                .unwrap();
        }
    }
}

async fn check(
    store: &dyn AuditStore,
    signer: &dyn CheckpointSigner,
    from: u64,
) -> crate::chain::Report {
    verify(store, signer, ORIGIN, from, 0).await.unwrap()
}

fn failure(r: &crate::chain::Report) -> (Problem, u64) {
    let f = r.failure.as_ref().expect("a failure");
    (f.problem, f.seq)
}

async fn subject_at(store: &dyn AuditStore, seq: u64) -> String {
    store.chained(seq, seq, 1).await.unwrap()[0]
        .row
        .subject
        .clone()
}

async fn set_subject(db: &Db, seq: u64, subject: &str) {
    let q = format!("UPDATE security_events SET subject = '{subject}' WHERE seq = {seq}");
    exec(db, &q, &q).await;
}

async fn set_hash(db: &Db, seq: Option<u64>, hash: &[u8]) {
    let h = crate::chain::hex(hash);
    let (pg, lite) = match seq {
        Some(seq) => (
            format!("UPDATE security_events SET hash = '\\x{h}' WHERE seq = {seq}"),
            format!("UPDATE security_events SET hash = X'{h}' WHERE seq = {seq}"),
        ),
        None => (
            format!("UPDATE audit_chain_head SET hash = '\\x{h}'"),
            format!("UPDATE audit_chain_head SET hash = X'{h}'"),
        ),
    };
    exec(db, &pg, &lite).await;
}

pub async fn run(store: Arc<dyn AuditStore>, db: Db) {
    let clock = ManualClock::new(
        chrono::DateTime::parse_from_rfc3339("2026-06-01T08:00:00Z")
            .unwrap()
            .to_utc(),
    );
    let signer = LocalSigner::new();
    let s = store.as_ref();
    let sig = signer.as_ref();
    assert_eq!(store.chain_legacy_rows().await.unwrap(), 0);
    let empty = check(s, sig, 0).await;
    assert!(empty.failure.is_none(), "{empty:?}");
    assert_eq!(empty.records, 0);

    // Four writers at once, with overlapping batches (redeliveries): one linear chain,
    // every event once.
    let all = events(&clock, 400, "p");
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        // Writer w covers events [80w, 80w + 160): every event once or twice.
        let batch: Vec<_> = all[w * 80..(w * 80 + 160).min(400)].to_vec();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            for chunk in batch.chunks(40) {
                n += store.insert_batch(chunk).await.unwrap();
            }
            n
        }));
    }
    let mut stored = 0;
    for w in writers {
        stored += w.await.unwrap();
    }
    assert_eq!(stored, 400, "every event stored exactly once");
    let head = store.head().await.unwrap();
    assert_eq!(head.seq, 400);
    let full = check(s, sig, 0).await;
    assert!(full.failure.is_none(), "{full:?}");
    assert_eq!((full.records, full.to_seq), (400, 400));
    assert_eq!(full.hash, head.hash);

    // A redelivered batch takes no position.
    assert_eq!(store.insert_batch(&all[100..150]).await.unwrap(), 0);
    assert_eq!(store.head().await.unwrap().seq, 400);

    // Checkpoints; an incremental check starts from the one before its range.
    let now = clock.now().timestamp_micros();
    let sign = |t: i64| checkpoint_now(s, sig, ORIGIN, t);
    let cp = sign(now).await.unwrap().unwrap().expect("a checkpoint");
    assert_eq!(cp.seq, 400);
    assert!(
        sign(now).await.unwrap().unwrap().is_none(),
        "no new checkpoint while the head has not moved"
    );
    store.insert_batch(&events(&clock, 50, "q")).await.unwrap();
    let inc = check(s, sig, 401).await;
    assert!(inc.failure.is_none(), "{inc:?}");
    assert_eq!(inc.anchor_seq, Some(400));
    assert_eq!((inc.from_seq, inc.to_seq, inc.records), (401, 450, 50));
    assert_eq!(sign(now + 1).await.unwrap().unwrap().unwrap().seq, 450);
    store.insert_batch(&events(&clock, 10, "r")).await.unwrap();

    // Checkpoints signed by someone else do not verify.
    let other = LocalSigner::new();
    let forged = check(s, other.as_ref(), 0).await;
    assert_eq!(failure(&forged), (Problem::BadSignature, 400));

    // An edited row is caught at its position; a check from a later checkpoint does
    // not read it.
    let original = subject_at(s, 123).await;
    set_subject(&db, 123, "user:mallory").await;
    assert_eq!(failure(&check(s, sig, 0).await), (Problem::Modified, 123));
    assert!(check(s, sig, 451).await.failure.is_none());
    set_subject(&db, 123, &original).await;
    assert!(check(s, sig, 0).await.failure.is_none());

    // The checkpointer never signs over an edited row.
    let original = subject_at(s, 455).await;
    set_subject(&db, 455, "user:mallory").await;
    let refused = sign(now + 2).await.unwrap().unwrap_err();
    assert_eq!((refused.problem, refused.seq), (Problem::Modified, 455));
    assert_eq!(
        store
            .checkpoint_at_or_before(u64::MAX >> 1)
            .await
            .unwrap()
            .unwrap()
            .seq,
        450
    );
    set_subject(&db, 455, &original).await;
    assert_eq!(sign(now + 3).await.unwrap().unwrap().unwrap().seq, 460);

    // A tail rewritten with consistently recomputed hashes, head and all: only the
    // signed checkpoint at 450 can tell, and does.
    let saved = store.chained(441, 460, 100).await.unwrap();
    let mut prev: crate::chain::Hash = store.chained(440, 440, 1).await.unwrap()[0]
        .hash
        .as_slice()
        .try_into()
        .unwrap();
    for c in &saved {
        let mut row = c.row.clone();
        if c.seq == 445 {
            row.subject = "user:rewritten".into();
            set_subject(&db, 445, "user:rewritten").await;
        }
        prev = crate::chain::next_hash(&prev, c.seq, &row).unwrap();
        set_hash(&db, Some(c.seq), &prev).await;
    }
    set_hash(&db, None, &prev).await;
    assert_eq!(
        failure(&check(s, sig, 441).await),
        (Problem::CheckpointMismatch, 450)
    );
    for c in &saved {
        set_hash(&db, Some(c.seq), &c.hash).await;
    }
    set_subject(&db, 445, &saved[4].row.subject).await;
    set_hash(&db, None, &saved.last().unwrap().hash).await;
    assert!(check(s, sig, 0).await.failure.is_none());

    // A row inserted by hand: without a position, then beyond the head.
    exec(
        &db,
        r#"INSERT INTO security_events (id, event_type, "timestamp", service, actor_kind,
             actor_id, subject, outcome, severity, details, trace_id)
           VALUES ('0190c2a4-7d3e-7b7a-9f6e-000000000001', 'sec.auth.login.succeeded', now(),
             'auth', 'user', 'mallory', 'user:mallory', 'success', 'info', '{}', '')"#,
        "INSERT INTO security_events (id, event_type, ts_us, service, actor_kind, actor_id,
             subject, outcome, severity, details, trace_id, received_us)
           VALUES ('0190c2a4-7d3e-7b7a-9f6e-000000000001', 'sec.auth.login.succeeded', 1, 'auth',
             'user', 'mallory', 'user:mallory', 'success', 'info', '{}', '', 1)",
    )
    .await;
    assert_eq!(failure(&check(s, sig, 0).await), (Problem::Inserted, 0));
    let q = "UPDATE security_events SET seq = 100000 WHERE seq IS NULL";
    exec(&db, q, q).await;
    assert_eq!(
        failure(&check(s, sig, 0).await),
        (Problem::Inserted, 100_000)
    );
    let q = "DELETE FROM security_events WHERE seq = 100000";
    exec(&db, q, q).await;
    assert!(check(s, sig, 0).await.failure.is_none());

    // A deleted row.
    let q = "DELETE FROM security_events WHERE seq = 420";
    exec(&db, q, q).await;
    assert_eq!(failure(&check(s, sig, 0).await), (Problem::Missing, 420));
    assert!(
        check(s, sig, 451).await.failure.is_none(),
        "outside the range checked"
    );
}

/// Rows stored before the chain existed get positions once, at the first start.
pub async fn legacy(store: Arc<dyn AuditStore>, db: Db) {
    for (i, id) in [
        "0190c2a4-7d3e-7b7a-9f6e-00000000000a",
        "0190c2a4-7d3e-7b7a-9f6e-00000000000b",
    ]
    .iter()
    .enumerate()
    {
        exec(
            &db,
            &format!(
                r#"INSERT INTO security_events (id, event_type, "timestamp", service, actor_kind,
                     actor_id, subject, outcome, severity, details, trace_id, received_at)
                   VALUES ('{id}', 'sec.auth.login.succeeded', now(), 'auth', 'user', 'alice',
                     'user:alice', 'success', 'info', '{{"n": "{i}"}}', '',
                     now() - interval '{i} minutes')"#
            ),
            &format!(
                "INSERT INTO security_events (id, event_type, ts_us, service, actor_kind, actor_id,
                     subject, outcome, severity, details, trace_id, received_us)
                   VALUES ('{id}', 'sec.auth.login.succeeded', 5, 'auth', 'user', 'alice',
                     'user:alice', 'success', 'info', '{{\"n\": \"{i}\"}}', '', {})",
                100 - i
            ),
        )
        .await;
    }
    assert_eq!(store.chain_legacy_rows().await.unwrap(), 2);
    assert_eq!(store.chain_legacy_rows().await.unwrap(), 0, "only once");
    let chained = store.chained(1, 2, 10).await.unwrap();
    // Oldest receipt first.
    assert_eq!(
        chained[0].row.id.to_string(),
        "0190c2a4-7d3e-7b7a-9f6e-00000000000b"
    );
    let clock = ManualClock::new(sec_common::clock::system().now());
    store.insert_batch(&events(&clock, 3, "n")).await.unwrap();
    let signer = LocalSigner::new();
    let r = check(store.as_ref(), signer.as_ref(), 0).await;
    assert!(r.failure.is_none(), "{r:?}");
    assert_eq!(r.records, 5);

    // Verifying while batches are being stored never reports a false alarm.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                store.insert_batch(&events(&clock, 5, "w")).await.unwrap();
            }
        })
    };
    while !writer.is_finished() {
        let r = check(store.as_ref(), signer.as_ref(), 0).await;
        assert!(r.failure.is_none(), "{r:?}");
    }
    writer.await.unwrap();
    assert_eq!(store.head().await.unwrap().seq, 155);
}

/// SearchEvents' filters and both orders, on a small trail.
pub async fn search(store: Arc<dyn AuditStore>) {
    use super::{EventQuery, TypeMatch};
    use sec_common::events::{Actor, ActorKind, Outcome, Severity};
    let clock = ManualClock::new(
        chrono::DateTime::parse_from_rfc3339("2026-07-01T00:00:00Z")
            .unwrap()
            .to_utc(),
    );
    let mut all = Vec::new();
    for i in 0..30_u32 {
        let ty = [
            "sec.auth.login.failed",
            "sec.auth.login.succeeded",
            "sec.crypto.key.deleted",
        ][i as usize % 3];
        let svc = ty.split('.').nth(1).unwrap();
        let mut e = new_event(clock.as_ref(), svc, ty);
        e.actor = Some(Actor {
            kind: ActorKind::User as i32,
            id: format!("user-{}", i % 5),
        });
        e.subject = format!("key:k{}", i % 2);
        e.source_ip = match i % 3 {
            0 => format!("192.0.2.{i}"),
            1 => format!("2001:db8::{i:x}"),
            _ => "198.51.100.9".into(),
        };
        e.severity = if i % 10 == 0 {
            Severity::High
        } else {
            Severity::Info
        } as i32;
        e.outcome = if i % 4 == 0 {
            Outcome::Denied
        } else {
            Outcome::Success
        } as i32;
        e.details.insert("client_id".into(), format!("c{}", i % 7));
        all.push(e);
        clock.advance(chrono::Duration::seconds(1));
    }
    store.insert_batch(&all).await.unwrap();
    let ids = |q: EventQuery| {
        let store = store.clone();
        async move {
            let mut q = EventQuery { limit: 7, ..q };
            let mut out = Vec::new();
            loop {
                let (page, next) = store.list(&q).await.unwrap();
                out.extend(page.into_iter().map(|e| e.id));
                match next {
                    Some(c) => q.after = Some(c),
                    None => return out,
                }
            }
        }
    };
    let want = |f: &dyn Fn(usize) -> bool, newest_first: bool| {
        let mut v: Vec<String> = (0..30)
            .filter(|i| f(*i))
            .map(|i| all[i].id.clone())
            .collect();
        if newest_first {
            v.reverse();
        }
        v
    };
    let q = EventQuery::default;
    assert_eq!(ids(q()).await, want(&|_| true, true));
    assert_eq!(
        ids(EventQuery {
            oldest_first: true,
            ..q()
        })
        .await,
        want(&|_| true, false),
        "oldest first, paged"
    );
    assert_eq!(
        ids(EventQuery {
            actor_id: Some("user-3".into()),
            ..q()
        })
        .await,
        want(&|i| i % 5 == 3, true)
    );
    assert_eq!(
        ids(EventQuery {
            subject: Some("key:k1".into()),
            service: Some("auth".into()),
            ..q()
        })
        .await,
        want(&|i| i % 2 == 1 && i % 3 != 2, true)
    );
    assert_eq!(
        ids(EventQuery {
            ip: Some("192.0.2.0/24".parse().unwrap()),
            ..q()
        })
        .await,
        want(&|i| i % 3 == 0, true),
        "IPv4 CIDR"
    );
    assert_eq!(
        ids(EventQuery {
            ip: Some("2001:db8::/32".parse().unwrap()),
            ..q()
        })
        .await,
        want(&|i| i % 3 == 1, true),
        "IPv6 CIDR"
    );
    assert_eq!(
        ids(EventQuery {
            ip: Some("198.51.100.9/32".parse().unwrap()),
            ..q()
        })
        .await,
        want(&|i| i % 3 == 2, true),
        "one address"
    );
    // Block edges: the range the store scans must end exactly where the block does.
    type Expect<'a> = &'a dyn Fn(usize) -> bool;
    let blocks: [(&str, Expect, &str); 8] = [
        ("192.0.2.16/28", &|i| i % 3 == 0 && i >= 16, "upper /28"),
        ("192.0.2.0/29", &|i| i % 3 == 0 && i < 8, "lower /29"),
        (
            "192.0.2.77/24",
            &|i| i % 3 == 0,
            "host bits set in the block",
        ),
        ("192.0.3.0/24", &|_| false, "the next /24"),
        ("192.0.1.0/24", &|_| false, "the previous /24"),
        (
            "2001:db8::10/124",
            &|i| i % 3 == 1 && (16..32).contains(&i),
            "IPv6 /124",
        ),
        ("198.51.100.8/32", &|_| false, "the address before"),
        ("0.0.0.0/0", &|i| i % 3 != 1, "every IPv4 address"),
    ];
    for (block, expect, what) in blocks {
        assert_eq!(
            ids(EventQuery {
                ip: Some(block.parse().unwrap()),
                ..q()
            })
            .await,
            want(expect, true),
            "{what}: {block}"
        );
    }
    assert_eq!(
        ids(EventQuery {
            severities: vec!["high".into()],
            outcomes: vec!["denied".into(), "failure".into()],
            ..q()
        })
        .await,
        want(&|i| i % 10 == 0 && i % 4 == 0, true)
    );
    assert_eq!(
        ids(EventQuery {
            details: vec![("client_id".into(), vec!["c4".into()])],
            ..q()
        })
        .await,
        want(&|i| i % 7 == 4, true),
        "detail match"
    );
    let picked: Vec<uuid::Uuid> = [3, 8, 21]
        .iter()
        .map(|i: &usize| all[*i].id.parse().unwrap())
        .collect();
    assert_eq!(
        ids(EventQuery {
            ids: picked,
            oldest_first: true,
            ..q()
        })
        .await,
        want(&|i| [3, 8, 21].contains(&i), false),
        "by id (an alert's events)"
    );
    assert_eq!(
        ids(EventQuery {
            details: vec![("client_id".into(), vec!["c4".into(), "c5".into()])],
            ..q()
        })
        .await,
        want(&|i| i % 7 == 4 || i % 7 == 5, true),
        "any of several values (a sensitive field under each key version)"
    );
    assert_eq!(
        ids(EventQuery {
            types: vec![
                TypeMatch::Exact("sec.crypto.key.deleted".into()),
                TypeMatch::Prefix("sec.auth.login.s".into())
            ],
            oldest_first: true,
            ..q()
        })
        .await,
        want(&|i| i % 3 != 0, false)
    );
    let t10 = super::time_us(&all[10]);
    assert_eq!(
        ids(EventQuery {
            since_us: Some(t10),
            until_us: Some(super::time_us(&all[20])),
            details: vec![("client_id".into(), vec!["nope".into(), "c4x".into()])],
            ..q()
        })
        .await,
        Vec::<String>::new()
    );
}
