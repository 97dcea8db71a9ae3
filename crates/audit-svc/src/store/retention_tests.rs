//! Retention on both backends: what expires goes (partitions whole on PostgreSQL, by
//! range otherwise), held and young rows stay, the chain still verifies across the
//! signed gaps, and a gap without a good signature does not.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use sec_common::clock::{Clock as _, ManualClock, SharedClock};
use sec_common::events::{SecurityEvent, new_event};
use sec_common::storage::Db;

use super::{AuditStore, LegalHold, Release};
use crate::chain::{CheckpointSigner, PRUNE_PARTITION, Problem, Prune, PruneRun};
use crate::checkpointer::Checkpointer;
use crate::retention::{Retention, RetentionConfig, RetentionRule, months_from};
use crate::verify::local::LocalSigner;
use crate::verify::{checkpoint_now, verify};

const ORIGIN: &str = "sec-audit/test";

fn events(clock: &ManualClock, n: usize, ty: &str, actor: &str) -> Vec<SecurityEvent> {
    (0..n)
        .map(|i| {
            let mut e = new_event(clock, "auth", ty);
            e.actor = Some(sec_common::events::Actor {
                kind: sec_common::events::ActorKind::User as i32,
                id: actor.into(),
            });
            e.subject = format!("user:{actor}-{i}");
            clock.advance(Duration::milliseconds(5));
            e
        })
        .collect()
}

async fn exec(db: &Db, sql: &str) {
    match db {
        Db::Postgres(p) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .unwrap();
        }
        Db::Sqlite(p) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .unwrap();
        }
    }
}

async fn count(store: &dyn AuditStore) -> usize {
    store
        .chained(1, u64::MAX >> 1, 100_000)
        .await
        .unwrap()
        .len()
}

async fn problem(store: &dyn AuditStore, signer: &dyn CheckpointSigner) -> Option<(Problem, u64)> {
    verify(store, signer, ORIGIN, 0, 0)
        .await
        .unwrap()
        .failure
        .map(|f| (f.problem, f.seq))
}

fn hold(name: &str, actor: &str, now: DateTime<Utc>) -> LegalHold {
    LegalHold {
        id: uuid::Uuid::new_v4(),
        name: name.into(),
        reason: "litigation".into(),
        type_prefix: String::new(),
        actor_id: actor.into(),
        subject: String::new(),
        since_us: None,
        until_us: None,
        created_us: now.timestamp_micros(),
        created_by: "admin".into(),
        released_us: None,
        released_by: None,
    }
}

/// `make` builds a store over the test database whose receipt clock is the given one.
pub async fn run(make: &dyn Fn(SharedClock) -> Arc<dyn AuditStore>, db: Db) {
    let pg = matches!(db, Db::Postgres(_));
    let real_now = sec_common::clock::system().now();
    // Month start, 27 months ago, at noon: old enough for the database's 365-day floor.
    let t0 = {
        let m = months_from(real_now - Duration::days(27 * 31), 0)[0];
        m.and_hms_opt(12, 0, 0).unwrap().and_utc()
    };
    let clock = ManualClock::new(t0 - Duration::days(40));
    let store = make(clock.clone());
    let s = store.as_ref();
    let mut months = Vec::new();
    for t in [
        t0 - Duration::days(40),
        t0,
        real_now - Duration::days(100),
        real_now,
    ] {
        months.extend(months_from(t, 1));
    }
    let created = store.ensure_partitions(&months).await.unwrap();
    if pg {
        assert!(created >= 4, "{created}");
        assert_eq!(store.ensure_partitions(&months).await.unwrap(), 0);
    }

    // 1..=10 a month before t0 (its own partition), 11..=30 at t0 (25 held later),
    // 31..=35 rate-limit events and 36..=40 others 100 days ago, 41..=45 now.
    store
        .insert_batch(&events(&clock, 10, "sec.auth.login.failed", "a"))
        .await
        .unwrap();
    clock.set(t0);
    store
        .insert_batch(&events(&clock, 14, "sec.auth.login.failed", "b"))
        .await
        .unwrap();
    store
        .insert_batch(&events(&clock, 1, "sec.auth.login.failed", "held"))
        .await
        .unwrap();
    store
        .insert_batch(&events(&clock, 5, "sec.auth.login.succeeded", "c"))
        .await
        .unwrap();
    clock.set(real_now - Duration::days(100));
    store
        .insert_batch(&events(&clock, 5, "sec.ratelimit.exceeded", "d"))
        .await
        .unwrap();
    store
        .insert_batch(&events(&clock, 5, "sec.auth.login.failed", "e"))
        .await
        .unwrap();
    clock.set(real_now);
    store
        .insert_batch(&events(&clock, 5, "sec.auth.login.failed", "f"))
        .await
        .unwrap();
    assert_eq!(store.head().await.unwrap().seq, 45);

    // A clock stepping back does not take receipt times back along the chain.
    clock.set(real_now - Duration::hours(1));
    store
        .insert_batch(&events(&clock, 1, "sec.auth.login.failed", "g"))
        .await
        .unwrap();
    let last = store.chained(45, 46, 2).await.unwrap();
    assert_eq!(last[1].row.received_us, last[0].row.received_us);
    clock.set(real_now);

    let signer = LocalSigner::new();
    let sig = signer.as_ref();
    let chain = Checkpointer::with_signer(store.clone(), ORIGIN, clock.clone(), signer.clone());
    let cfg = RetentionConfig {
        rules: vec![RetentionRule {
            prefix: "sec.ratelimit.".into(),
            days: 90,
        }],
        ..Default::default()
    };
    if pg {
        // The owner lowers the database floor for the shorter rule.
        exec(
            &db,
            "INSERT INTO audit_retention_floor VALUES ('sec.ratelimit.', 90)",
        )
        .await;
    }
    let retention = Retention::for_test(store.clone(), chain.clone(), clock.clone(), cfg);

    // The held row.
    assert!(
        store
            .create_hold(&hold("case-1", "held", real_now))
            .await
            .unwrap()
    );
    assert!(
        !store
            .create_hold(&hold("case-1", "x", real_now))
            .await
            .unwrap(),
        "one active hold per name"
    );
    let holds = store.list_holds(false, 10).await.unwrap();
    assert_eq!(holds.len(), 1);
    let case1 = holds[0].id;

    // Dry run: the plan, nothing removed.
    let dry = retention.run(true).await.unwrap();
    assert_eq!(count(s).await, 46);
    assert_eq!(dry.plan.held_rows, 1);
    let spans: Vec<(u64, u64)> = dry
        .plan
        .prunes()
        .iter()
        .map(|p| (p.first_seq, p.last_seq))
        .collect();
    if pg {
        assert_eq!(spans, [(1, 10), (11, 24), (26, 30), (31, 35)]);
        // The first month's partition whole; the empty old ones around t0 too.
        let whole: Vec<&Prune> = dry.plan.drops.iter().filter_map(|d| d.1.as_ref()).collect();
        assert_eq!(whole.len(), 1, "{:?}", dry.plan);
        assert_eq!(
            (whole[0].first_seq, whole[0].reason.as_str()),
            (1, PRUNE_PARTITION)
        );
        assert!(dry.plan.drops.len() >= 2, "{:?}", dry.plan);
    } else {
        assert_eq!(spans, [(1, 24), (26, 35)], "one run across the rule change");
    }
    assert_eq!(dry.removed_rows, 34);

    // The run: 34 rows go, the held one and the young ones stay; the chain verifies.
    let partitions_before = store.partitions().await.unwrap().len();
    let done = retention.run(false).await.unwrap();
    assert_eq!(done.removed_rows, 34);
    assert_eq!(count(s).await, 12);
    let kept: Vec<u64> = store
        .chained(1, 100, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(kept, [25, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46]);
    if pg {
        assert_eq!(done.dropped_partitions, dry.plan.drops.len() as u64);
        assert_eq!(
            store.partitions().await.unwrap().len(),
            partitions_before - dry.plan.drops.len(),
        );
    }
    assert!(
        store
            .checkpoint_at_or_before(u64::MAX >> 1)
            .await
            .unwrap()
            .unwrap()
            .seq
            >= 35,
        "a checkpoint at the cut"
    );
    assert_eq!(problem(s, sig).await, None);
    let r = verify(s, sig, ORIGIN, 0, 0).await.unwrap();
    assert_eq!(r.records, 12);

    // Nothing more to do until the hold goes.
    assert_eq!(retention.run(false).await.unwrap().removed_rows, 0);
    assert_eq!(
        store.release_hold(case1, "admin", 1).await.unwrap(),
        Release::Released
    );
    let done = retention.run(false).await.unwrap();
    assert_eq!(done.removed_rows, 1);
    assert_eq!(done.plan.held_rows, 0);
    assert_eq!(problem(s, sig).await, None);

    // A row deleted by hand, outside retention, is caught...
    store
        .insert_batch(&events(&clock, 4, "sec.auth.login.failed", "h"))
        .await
        .unwrap();
    checkpoint_now(s, sig, ORIGIN, clock.now().timestamp_micros())
        .await
        .unwrap()
        .unwrap();
    let at48 = store.chained(48, 48, 1).await.unwrap().remove(0);
    exec(&db, "DELETE FROM security_events WHERE seq = 48").await;
    assert_eq!(problem(s, sig).await, Some((Problem::Missing, 48)));

    // ...and so is a prune record for it that this installation did not sign...
    let prune = Prune {
        first_seq: 48,
        last_seq: 48,
        last_hash: at48.hash.as_slice().try_into().unwrap(),
        rows: 1,
        reason: "retention".into(),
    };
    let mut forged = PruneRun {
        id: 0,
        time_us: clock.now().timestamp_micros(),
        origin: ORIGIN.into(),
        key_name: String::new(),
        key_version: 0,
        signature: String::new(),
        prunes: vec![prune],
    };
    let other = LocalSigner::new();
    (forged.key_name, forged.key_version, forged.signature) =
        other.sign(forged.statement().as_bytes()).await.unwrap();
    insert_run(&db, &forged).await;
    assert_eq!(problem(s, sig).await, Some((Problem::BadSignature, 48)));
    // ...or not signed at all.
    exec(
        &db,
        "UPDATE audit_prune_runs SET signature = '' WHERE id = 999",
    )
    .await;
    assert_eq!(problem(s, sig).await, Some((Problem::BadSignature, 48)));
    // A retention run refuses to work on a chain that does not verify.
    exec(&db, "DELETE FROM audit_prunes WHERE first_seq = 48").await;
    clock.advance(Duration::days(500));
    assert!(retention.run(false).await.is_err());
    assert_eq!(count(s).await, 14);
}

/// The forged run, stored by hand with the given (bad) signature.
async fn insert_run(db: &Db, run: &PruneRun) {
    let p = &run.prunes[0];
    let h = crate::chain::hex(&p.last_hash);
    let (runs, hash) = match db {
        Db::Postgres(_) => (
            format!(
                "INSERT INTO audit_prune_runs (id, created_at, origin, key_name, key_version, signature)
                 VALUES (999, now(), '{}', '{}', {}, '{}')",
                run.origin, run.key_name, run.key_version, run.signature
            ),
            format!("'\\x{h}'"),
        ),
        Db::Sqlite(_) => (
            format!(
                "INSERT INTO audit_prune_runs (id, created_us, origin, key_name, key_version, signature)
                 VALUES (999, {}, '{}', '{}', {}, '{}')",
                run.time_us, run.origin, run.key_name, run.key_version, run.signature
            ),
            format!("X'{h}'"),
        ),
    };
    exec(db, &runs).await;
    exec(
        db,
        &format!(
            "INSERT INTO audit_prunes (first_seq, last_seq, last_hash, rows, reason, run_id)
             VALUES ({}, {}, {hash}, {}, '{}', 999)",
            p.first_seq, p.last_seq, p.rows, p.reason
        ),
    )
    .await;
}

/// Parallel releases of one hold: exactly one wins, the others are told it is released.
pub async fn holds(store: Arc<dyn AuditStore>) {
    let now = sec_common::clock::system().now();
    let h = hold("case-race", "", now);
    assert!(store.create_hold(&h).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .release_hold(h.id, &format!("admin-{i}"), now.timestamp_micros())
                .await
                .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| **o == Release::Released).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Release::AlreadyReleased)
            .count(),
        7
    );
    assert_eq!(
        store
            .release_hold(uuid::Uuid::new_v4(), "admin", 0)
            .await
            .unwrap(),
        Release::NotFound
    );
    assert!(store.list_holds(false, 10).await.unwrap().is_empty());
    let all = store.list_holds(true, 10).await.unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].released_by.as_deref().unwrap().starts_with("admin-"));
    // The name is free again once released.
    assert!(
        store
            .create_hold(&hold("case-race", "", now))
            .await
            .unwrap()
    );
}
