//! Alerts end to end, on the default rules: deleting a key in crypto-svc raises
//! `key-deleted` in audit-svc; `GET /security/monitor` (admin only) and
//! `secctl audit alerts|ack|monitor` show and acknowledge it. Embedded and
//! PostgreSQL + NATS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{CreateKeyRequest, DeleteKeyRequest, KeyType, UpdateKeyConfigRequest};
use sec_tests::{Backends, TestPlatform};

mod common;
use common::Env;

async fn alerts_end_to_end(backends: Backends) {
    let Some(seed) = TestPlatform::seed(backends) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let tp = TestPlatform::start_with(seed.clone(), Some(data.path().to_owned())).await;
    let env = Env::new(&tp, data.path(), Some(&tp.token));

    let mut crypto =
        CryptoServiceClient::with_interceptor(tp.channel("crypto"), tp.admin_bearer().unwrap());
    let name = format!("alert-{}", std::process::id());
    crypto
        .create_key(CreateKeyRequest {
            name: name.clone(),
            r#type: KeyType::Aes256Gcm as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    crypto
        .update_key_config(UpdateKeyConfigRequest {
            name: name.clone(),
            deletion_allowed: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    crypto
        .delete_key(DeleteKeyRequest { name: name.clone() })
        .await
        .unwrap();

    // The deletion reaches the trail and raises `key-deleted` for the key (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let alert = loop {
        let list = env
            .run(&["audit", "alerts", "-o", "json"], b"")
            .await
            .ok()
            .json();
        if let Some(a) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["rule"] == "key-deleted" && a["group"] == name.as_str())
        {
            break a.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no alert: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alert["status"], "open");
    assert_eq!(alert["severity"], "high");
    assert_eq!(alert["count"], 1);
    assert_eq!(alert["event_ids"].as_array().unwrap().len(), 1);
    let id = alert["id"].as_str().unwrap().to_owned();

    // GET /security/monitor: admin only, no parameters.
    let get = |path: &'static str, token: Option<String>| async move {
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("authorization", t)])
            .unwrap_or_default();
        let r = sec_tests::http_request(tp.http, "GET", path, &headers, b"")
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        (r.status, body)
    };
    let auth = format!("Bearer {}", tp.token);
    let (status, m) = get("/security/monitor", Some(auth.clone())).await;
    assert_eq!(status, 200, "{m}");
    let open = m["open_alerts"].as_u64().unwrap();
    assert!(open >= 1, "{m}");
    assert!(
        m["newest_open"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{m}"
    );
    assert!(m["chain_head_seq"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["ingest_lag_seconds"].as_f64().is_some(), "{m}");
    assert!(m["dead_letters"].is_object(), "{m}");
    assert_eq!(get("/security/monitor", None).await.0, 401);
    let service = format!("Bearer {}", tp.service_token);
    assert_eq!(get("/security/monitor", Some(service)).await.0, 403);
    assert_eq!(
        get("/security/monitor?x=1", Some(auth.clone())).await.0,
        400
    );

    // secctl audit monitor, table and JSON.
    let table = env.run(&["audit", "monitor"], b"").await.ok().out();
    assert!(table.contains("open alerts:"), "{table}");
    assert!(table.contains(&id), "{table}");
    let j = env
        .run(&["audit", "monitor", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(j["open_alerts"].as_u64().unwrap(), open);

    // secctl audit ack: once; a second time is refused (Aborted).
    let acked = env
        .run(
            &[
                "audit",
                "ack",
                &id,
                "--note",
                "expected, cleanup",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(acked["status"], "acknowledged");
    assert_eq!(acked["note"], "expected, cleanup");
    assert_eq!(acked["acknowledged_by"], "admin");
    let again = env.run(&["audit", "ack", &id], b"").await;
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("Aborted"), "{}", again.stderr);
    let bad = env.run(&["audit", "ack", "not-an-id"], b"").await;
    assert!(bad.stderr.contains("InvalidArgument"), "{}", bad.stderr);

    let acked_list = env
        .run(
            &["audit", "alerts", "--status", "acknowledged", "-o", "json"],
            b"",
        )
        .await
        .ok()
        .json();
    assert!(
        acked_list
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{acked_list}"
    );
    let open_list = env
        .run(
            &["audit", "alerts", "--rule", "key-deleted", "-o", "json"],
            b"",
        )
        .await
        .ok()
        .json();
    assert!(
        !open_list
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{open_list}"
    );
    let table = env
        .run(&["audit", "alerts", "--status", "all"], b"")
        .await
        .ok()
        .out();
    assert!(
        table.contains("key-deleted") && table.contains(&name),
        "{table}"
    );

    // The acknowledgement is in the trail, with the admin as actor.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = env
            .run(
                &["audit", "list", "--type", "sec.audit.alert.*", "-o", "json"],
                b"",
            )
            .await
            .ok()
            .json();
        let of_this = |ty: &str| {
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == ty && e["details"]["alert_id"] == id.as_str())
        };
        if of_this("sec.audit.alert.raised") && of_this("sec.audit.alert.acknowledged") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The incident report: this alert with the deletion event that raised it, as JSON
    // and as CSV (one line per alert and event); a subject filter narrows it.
    let report = env
        .run(&["audit", "report", "incidents", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(report["report"], "incidents");
    let incident = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    assert_eq!(incident["rule"], "key-deleted");
    assert_eq!(incident["status"], "acknowledged");
    let events = incident["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{incident}");
    assert_eq!(events[0]["type"], "sec.crypto.key.deleted");
    let csv = env
        .run(&["audit", "report", "incidents", "--format", "csv"], b"")
        .await
        .ok()
        .out();
    assert!(csv.starts_with("alert_id,alert,id,type,"), "{csv}");
    assert!(
        csv.split_terminator("\r\n")
            .any(|l| l.starts_with(&id) && l.contains(",sec.crypto.key.deleted,")),
        "{csv}"
    );
    let other = env
        .run(
            &[
                "audit",
                "report",
                "incidents",
                "--subject",
                "nobody",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert!(other["rows"].as_array().unwrap().is_empty(), "{other}");

    drop(env);
    let (r, _) = tp.stop().await;
    r.unwrap();
    TestPlatform::cleanup(&seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_embedded() {
    alerts_end_to_end(Backends::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_on_postgres_and_nats() {
    alerts_end_to_end(Backends::Production).await;
}
