//! The tamper-evident audit trail end to end: events from every service are chained as
//! audit-svc stores them, crypto-svc signs checkpoints with audit-svc's own Ed25519 key
//! (checked here with crypto-svc's `Verify`, as an outside party would), and
//! `VerifyChain` / `secctl audit verify` name the first bad position after a row is edited
//! or deleted in the database behind the service's back. Embedded and PostgreSQL + NATS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use sec_proto::audit::v1::{GetChainHeadRequest, GetChainHeadResponse, VerifyChainRequest};
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{CreateKeyRequest, KeyType, VerifyRequest};
use sec_tests::{Backends, TestPlatform};

mod common;
use common::Env;

/// Waits (bounded) for a signed checkpoint covering at least `seq`.
async fn checkpoint_covering(tp: &TestPlatform, seq: u64) -> GetChainHeadResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let head = tp
            .audit()
            .get_chain_head(GetChainHeadRequest {})
            .await
            .unwrap()
            .into_inner();
        if head
            .latest_checkpoint
            .as_ref()
            .is_some_and(|c| c.seq >= seq)
        {
            return head;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint covering {seq}: {head:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn exec(db: &sec_common::storage::Db, sql: &str) {
    match db {
        sec_common::storage::Db::Postgres(p) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .unwrap();
        }
        sec_common::storage::Db::Sqlite(p) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .unwrap();
        }
    }
}

/// The outside verifier (`tests/interop/audit/verify_chain.py`, Python standard library
/// only) over the embedded database: its JSON verdict and exit code, or `None` when there
/// is no python3 (fatal with `SEC_TEST_INTEROP=required`).
fn outside_verifier(db: &std::path::Path) -> Option<(i32, serde_json::Value)> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop/audit/verify_chain.py"
    );
    match std::process::Command::new("python3")
        .arg(script)
        .arg(db)
        .output()
    {
        Ok(out) => Some((
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "verifier output ({e}): {} {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
        )),
        Err(e) => {
            assert_ne!(
                std::env::var("SEC_TEST_INTEROP").as_deref(),
                Ok("required"),
                "python3: {e}"
            );
            eprintln!("*** SKIPPED the outside chain verifier: no python3 ({e}) ***");
            None
        }
    }
}

/// `GET /security/audit` through the facade and `ExportEvents`, on the five keys made.
async fn search_and_export(tp: &TestPlatform) {
    // The events reach the trail asynchronously: wait (bounded) for the five.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored = tp
            .audit()
            .search_events(sec_proto::audit::v1::SearchEventsRequest {
                filter: Some(sec_proto::audit::v1::EventFilter {
                    event_types: vec!["sec.crypto.key.created".into()],
                    ..Default::default()
                }),
                page: Some(sec_proto::common::v1::PageRequest {
                    page_size: 1000,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .iter()
            .filter(|e| e.subject.contains("chain-"))
            .count();
        if stored == 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stored} of 5 key events stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let auth = format!("Bearer {}", tp.token);
    let get = |path: String, token: Option<String>| async move {
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("authorization", t)])
            .unwrap_or_default();
        let r = sec_tests::http_request(tp.http, "GET", &path, &headers, b"")
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        (r.status, body)
    };
    // Paged, oldest first, following next_cursor; the key names are in the subjects.
    let mut seen = Vec::new();
    let mut path = "/security/audit?type=sec.crypto.key.created&order=oldest&limit=2".to_owned();
    loop {
        let (status, v) = get(path.clone(), Some(auth.clone())).await;
        assert_eq!(status, 200, "{v}");
        let events = v["events"].as_array().unwrap();
        assert!(events.len() <= 2);
        for e in events {
            assert_eq!(e["type"], "sec.crypto.key.created");
            seen.push(e["subject"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => {
                path = format!(
                    "/security/audit?type=sec.crypto.key.created&order=oldest&limit=2&cursor={c}"
                );
            }
            None => break,
        }
    }
    let ours: Vec<_> = seen.iter().filter(|s| s.contains("chain-")).collect();
    assert_eq!(ours.len(), 5, "{seen:?}");
    assert!(
        ours[0].contains("chain-0") && ours[4].contains("chain-4"),
        "{ours:?}"
    );
    let subject = ours[3].clone();
    let (status, v) = get(
        format!("/security/audit?subject={subject}&type=sec.crypto.*"),
        Some(auth.clone()),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["next_cursor"].is_null());
    // Refusals: no credential, a service credential, an unknown or malformed parameter.
    assert_eq!(get("/security/audit".into(), None).await.0, 401);
    let service = format!("Bearer {}", tp.service_token);
    assert_eq!(get("/security/audit".into(), Some(service)).await.0, 403);
    let (status, v) = get("/security/audit?actr=alice".into(), Some(auth.clone())).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error_description"].as_str().unwrap().contains("actr"),
        "{v}"
    );
    assert_eq!(
        get("/security/audit?ip=300.1.1.1".into(), Some(auth.clone()))
            .await
            .0,
        400
    );

    // ExportEvents: the same events as CSV, header first, one record each.
    use futures::StreamExt as _;
    use sec_proto::audit::v1::{EventFilter, ExportEventsRequest, ExportFormat};
    let mut stream = tp
        .audit()
        .export_events(ExportEventsRequest {
            filter: Some(EventFilter {
                event_types: vec!["sec.crypto.key.created".into()],
                ..Default::default()
            }),
            format: ExportFormat::Csv as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    while let Some(chunk) = stream.next().await {
        csv.extend(chunk.unwrap().data);
    }
    let csv = String::from_utf8(csv).unwrap();
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert!(lines[0].starts_with("id,type,time,"), "{csv}");
    assert_eq!(lines.len(), seen.len() + 1, "{csv}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains(",sec.crypto.key.created,"))
    );
}

/// Retention (nothing has expired on a fresh platform) and legal holds through secctl;
/// of parallel releases of one hold exactly one succeeds, the others get ABORTED.
async fn retention_and_holds(tp: &TestPlatform, env: &Env) {
    let j = env
        .run(&["audit", "retention", "--dry-run", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(
        (j["dry_run"].as_bool(), j["removed_rows"].as_u64()),
        (Some(true), Some(0)),
        "{j}"
    );
    let j = env
        .run(&["audit", "retention", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(j["removed_rows"], 0, "{j}");

    let j = env
        .run(
            &[
                "audit",
                "hold",
                "create",
                "case-1",
                "--reason",
                "ticket LEG-1",
                "--actor",
                "alice",
                "--type-prefix",
                "sec.auth.",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    let id = j["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (j["name"].as_str(), j["actor_id"].as_str()),
        (Some("case-1"), Some("alice"))
    );
    let dup = env
        .run(
            &["audit", "hold", "create", "case-1", "--reason", "again"],
            b"",
        )
        .await;
    assert_eq!(
        dup.code, 1,
        "an active hold's name is unique: {}",
        dup.stderr
    );
    let bad = env
        .run(&["audit", "hold", "create", "a b", "--reason", "x"], b"")
        .await;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    let list = env
        .run(&["audit", "hold", "list", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    let mut releases = Vec::new();
    for _ in 0..4 {
        let mut audit = tp.audit();
        let id = id.clone();
        releases.push(tokio::spawn(async move {
            audit
                .release_legal_hold(sec_proto::audit::v1::ReleaseLegalHoldRequest { id })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }));
    }
    let mut codes = Vec::new();
    for r in releases {
        codes.push(r.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| c.is_ok()).count(), 1, "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c.is_ok() || *c == Err(tonic::Code::Aborted)),
        "{codes:?}"
    );
    let list = env
        .run(&["audit", "hold", "list", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    let all = env
        .run(&["audit", "hold", "list", "--all", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(all[0]["released_at"].is_string(), "{all}");
    let again = env.run(&["audit", "hold", "release", &id], b"").await;
    assert_eq!(again.code, 1, "{}", again.stderr);
}

async fn chain_end_to_end(backends: Backends) {
    let Some(seed) = TestPlatform::seed(backends) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let tp = TestPlatform::start_with(seed.clone(), Some(data.path().to_owned())).await;
    let env = Env::new(&tp, data.path(), Some(&tp.token));

    // Some events besides the seven `service.started` ones.
    let mut crypto =
        CryptoServiceClient::with_interceptor(tp.channel("crypto"), tp.admin_bearer().unwrap());
    for i in 0..5 {
        crypto
            .create_key(CreateKeyRequest {
                name: format!("chain-{i}"),
                r#type: KeyType::Aes256Gcm as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    search_and_export(&tp).await;
    retention_and_holds(&tp, &env).await;

    // secctl audit export: CSV and JSON Lines on stdout.
    let csv = env
        .run(
            &[
                "audit",
                "export",
                "--type",
                "sec.crypto.key.created",
                "--format",
                "csv",
                "--oldest-first",
            ],
            b"",
        )
        .await
        .ok()
        .out();
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert!(lines[0].starts_with("id,type,time,"), "{csv}");
    assert!(lines.len() >= 6, "{csv}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains(",sec.crypto.key.created,")),
        "{csv}"
    );
    let jsonl = env
        .run(
            &["audit", "export", "--type", "sec.crypto.*", "--limit", "3"],
            b"",
        )
        .await
        .ok()
        .out();
    let records: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{jsonl}");
    assert!(
        records
            .iter()
            .all(|r| r["type"].as_str().unwrap().starts_with("sec.crypto."))
    );
    let run = env.run(&["audit", "export", "--ip", "nonsense"], b"").await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("InvalidArgument") || run.stderr.contains("invalid"),
        "{}",
        run.stderr
    );
    // A reader that went away (`| head`): a quiet exit 0, for a stream and for JSON.
    for args in [
        &["audit", "export"][..],
        &["audit", "list", "-o", "json"][..],
        &["audit", "head"][..],
    ] {
        let (code, stderr) = env.run_into_closed_pipe(args).await;
        assert_eq!((code, stderr.as_str()), (0, ""), "{args:?}");
    }

    // secctl audit report: the change history holds the five keys made, oldest first,
    // as CSV and as one JSON document; the access report is JSON too.
    let csv = env
        .run(&["audit", "report", "changes", "--format", "csv"], b"")
        .await
        .ok()
        .out();
    let made: Vec<&str> = csv
        .split_terminator("\r\n")
        .filter(|l| l.contains(",sec.crypto.key.created,") && l.contains("chain-"))
        .collect();
    assert_eq!(made.len(), 5, "{csv}");
    assert!(
        made[0].contains("chain-0") && made[4].contains("chain-4"),
        "{csv}"
    );
    let doc: serde_json::Value = serde_json::from_str(
        &env.run(&["audit", "report", "changes", "-o", "json"], b"")
            .await
            .ok()
            .out(),
    )
    .unwrap();
    assert_eq!(doc["report"], "changes");
    assert!(doc["rows"].as_array().unwrap().len() >= 5, "{doc}");
    let access: serde_json::Value = serde_json::from_str(
        &env.run(&["audit", "report", "access"], b"")
            .await
            .ok()
            .out(),
    )
    .unwrap();
    assert_eq!(access["report"], "access");
    let run = env
        .run(&["audit", "report", "access", "--since", "yesterday"], b"")
        .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let run = env
        .run(
            &[
                "audit",
                "report",
                "changes",
                "--since",
                "2026-02-01T00:00:00Z",
                "--until",
                "2026-01-01T00:00:00Z",
            ],
            b"",
        )
        .await;
    assert_eq!(run.code, 1, "until before since: {}", run.stderr);

    // The first checkpoint comes a few seconds after the start (the seven
    // `service.started` events are stored by then).
    let head = checkpoint_covering(&tp, 7).await;
    let cp = head.latest_checkpoint.clone().unwrap();
    assert_eq!(cp.key_name, "svc.audit.audit-checkpoints");
    assert!(cp.origin.starts_with("sec-audit/"), "{cp:?}");
    assert!(cp.note.starts_with("sec-audit-checkpoint-v1\n"), "{cp:?}");
    assert!(cp.note.contains(&format!("\n{}\n", cp.seq)));
    // The signature checks out with crypto-svc, independently of audit-svc.
    let mut as_audit =
        CryptoServiceClient::with_interceptor(tp.channel("crypto"), tp.as_service("audit"));
    let valid = as_audit
        .verify(VerifyRequest {
            key_name: cp.key_name.clone(),
            message: cp.note.clone().into_bytes(),
            signature: cp.signature.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .valid;
    assert!(valid, "checkpoint signature verifies in crypto-svc");

    // The whole chain verifies, through gRPC and secctl.
    let v = tp
        .audit()
        .verify_chain(VerifyChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.records_checked >= cp.seq, "{v:?}");
    assert!(v.checkpoints_checked >= 1, "{v:?}");
    let j = env
        .run(&["audit", "verify", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(j["ok"], true, "{j}");
    // Incremental: from the checkpoint on, only what is new is read.
    let inc = tp
        .audit()
        .verify_chain(VerifyChainRequest {
            from_seq: cp.seq + 1,
            to_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(inc.ok, "{inc:?}");
    assert_eq!(inc.anchor_seq, cp.seq);
    assert_eq!(inc.records_checked, inc.to_seq.saturating_sub(cp.seq));
    let table = env.run(&["audit", "head"], b"").await.ok().out();
    assert!(
        table.contains(&format!("checkpoint: {}", cp.seq)),
        "{table}"
    );
    let sqlite = data.path().join("audit.db");
    if backends == Backends::Embedded
        && let Some((code, v)) = outside_verifier(&sqlite)
    {
        assert_eq!(code, 0, "{v}");
        assert!(v["records"].as_u64().unwrap() >= cp.seq, "{v}");
        assert!(v["checkpoints"].as_u64().unwrap() >= 1, "{v}");
    }

    // Behind the service's back: an edited row...
    let db = sec_common::storage::connect_db(&tp.config, "audit", &audit_svc::MIGRATIONS)
        .await
        .unwrap();
    exec(
        &db,
        "UPDATE security_events SET actor_id = 'mallory' WHERE seq = 3",
    )
    .await;
    let v = tp
        .audit()
        .verify_chain(VerifyChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!v.ok);
    assert_eq!(
        (v.problem.as_str(), v.first_bad_seq),
        ("modified", 3),
        "{v:?}"
    );
    let run = env.run(&["audit", "verify", "-o", "json"], b"").await;
    assert_eq!(run.code, 3, "exit 3 on a broken chain: {}", run.stderr);
    let j = run.json();
    assert_eq!(j["problem"], "modified");
    assert_eq!(j["first_bad_seq"], 3);
    if backends == Backends::Embedded
        && let Some((code, v)) = outside_verifier(&sqlite)
    {
        assert_eq!(code, 3, "{v}");
        assert_eq!(
            (v["problem"].as_str(), v["first_bad_seq"].as_u64()),
            (Some("modified"), Some(3))
        );
    }
    let run = env.run(&["audit", "verify"], b"").await;
    assert_eq!(run.code, 3);
    assert!(
        run.out().contains("TAMPERED: modified at position 3"),
        "{}",
        run.out()
    );
    // ...is outside a range checked from a later checkpoint,
    let inc = env
        .run(
            &[
                "audit",
                "verify",
                "--from",
                &(cp.seq + 1).to_string(),
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(inc["ok"], true, "{inc}");
    // ...and a deleted row is named too (the edit is still there, further on).
    exec(&db, "DELETE FROM security_events WHERE seq = 2").await;
    let v = tp
        .audit()
        .verify_chain(VerifyChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.problem.as_str(), v.first_bad_seq),
        ("missing", 2),
        "{v:?}"
    );
    // Bad range: a clear error, not a verdict.
    let run = env
        .run(&["audit", "verify", "--from", "9", "--to", "3"], b"")
        .await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("to_seq"), "{}", run.stderr);
    // Without the admin token: refused.
    let anon = Env::new(&tp, data.path(), None);
    let run = anon.run(&["audit", "verify"], b"").await;
    assert_eq!(run.code, 1, "{}", run.stderr);

    db.close().await;
    let (r, _) = tp.stop().await;
    r.unwrap();
    TestPlatform::cleanup(&seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_embedded() {
    chain_end_to_end(Backends::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_on_postgres_and_nats() {
    chain_end_to_end(Backends::Production).await;
}
