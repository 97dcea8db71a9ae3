//! The platform end to end, on the embedded default and on PostgreSQL + Redis + NATS:
//! every service serves gRPC health and its admin endpoints, the seven started events
//! reach the audit store, admin calls need the admin token, restart keeps the data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;
use std::time::Duration;

use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_proto::common::v1::PageRequest;
use sec_tests::{Backends, TestPlatform, http_get};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICES: [(&str, &str); 7] = [
    ("audit", "sec.audit.v1.AuditService"),
    ("crypto", "sec.crypto.v1.CryptoService"),
    ("token", "sec.token.v1.TokenService"),
    ("session", "sec.session.v1.SessionService"),
    ("auth", "sec.auth.v1.AuthService"),
    ("gdpr", "sec.gdpr.v1.GdprService"),
    ("assess", "sec.assess.v1.AssessService"),
];

/// Waits (bounded) until the audit store holds events of every `types`.
async fn wait_for_types(
    tp: &TestPlatform,
    types: &[String],
) -> Vec<sec_proto::common::v1::SecurityEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resp = tp
            .audit()
            .list_events(ListEventsRequest {
                page: Some(PageRequest {
                    page_size: 1000,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let have: BTreeSet<&str> = resp.events.iter().map(|e| e.r#type.as_str()).collect();
        if types.iter().all(|t| have.contains(t.as_str())) {
            return resp.events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing events; have {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn platform_end_to_end(backends: Backends) {
    let Some(seed) = TestPlatform::seed(backends) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let tp = TestPlatform::start_with(seed.clone(), Some(data.path().to_owned())).await;

    // gRPC health SERVING for each service (by name and overall) and admin endpoints
    for (svc, grpc_name) in SERVICES {
        let mut health = HealthClient::new(tp.channel(svc));
        for name in [grpc_name, ""] {
            let r = health
                .check(HealthCheckRequest {
                    service: name.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{svc} `{name}`");
        }
        let err = health
            .check(HealthCheckRequest {
                service: "sec.nope.v1.Nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(http_get(tp.admin[svc], "/healthz").await.unwrap().0, 200);
        let (code, body) = http_get(tp.admin[svc], "/readyz").await.unwrap();
        assert_eq!(code, 200, "{svc}: {body}");
        let (code, metrics) = http_get(tp.admin[svc], "/metrics").await.unwrap();
        assert_eq!(code, 200);
        assert!(
            metrics.contains("sec_events_published_total"),
            "{svc}: {metrics}"
        );
    }
    assert_eq!(
        http_get(tp.http, "/healthz").await.unwrap().0,
        200,
        "facade"
    );

    // the seven started events are in the audit store, with the backends they ran on
    let started: Vec<String> = SERVICES
        .iter()
        .map(|(s, _)| format!("sec.{s}.service.started"))
        .collect();
    let events = wait_for_types(&tp, &started).await;
    let crypto = events
        .iter()
        .find(|e| e.r#type == "sec.crypto.service.started")
        .unwrap();
    let db = if backends == Backends::Production {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(crypto.details["database_backend"], db);
    assert_eq!(
        crypto.details["events_backend"],
        if backends == Backends::Production {
            "nats"
        } else {
            "memory"
        }
    );
    let instance = crypto.details["instance_id"].clone();

    // filters and paging over gRPC
    let only = tp
        .audit()
        .list_events(ListEventsRequest {
            event_type: "sec.crypto.*".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !only.events.is_empty()
            && only
                .events
                .iter()
                .all(|e| e.r#type.starts_with("sec.crypto."))
    );
    let page = tp
        .audit()
        .list_events(ListEventsRequest {
            page: Some(PageRequest {
                page_size: 3,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 3);
    assert!(!page.page.unwrap().next_page_token.is_empty());
    let bad = tp
        .audit()
        .list_events(ListEventsRequest {
            event_type: "sec.*.x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // admin calls: no token, a wrong token
    let mut anon = AuditServiceClient::new(tp.channel("audit"));
    assert_eq!(
        anon.list_events(ListEventsRequest::default())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let wrong = sec_common::auth::generate_token().unwrap();
    let mut forged = AuditServiceClient::with_interceptor(
        tp.channel("audit"),
        sec_common::grpc::BearerToken::new(Some(&wrong)).unwrap(),
    );
    let err = forged
        .list_events(ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(!err.message().contains(&wrong));

    // SIGTERM-equivalent stop is clean, and the stopped events are stored too
    let (result, _) = tp.stop().await;
    result.unwrap();

    // restart on the same data: same installation, earlier events still there
    let tp = TestPlatform::start_with(seed.clone(), Some(data.path().to_owned())).await;
    let stopped: Vec<String> = SERVICES
        .iter()
        .map(|(s, _)| format!("sec.{s}.service.stopped"))
        .collect();
    // The first run's stopped events are there at once; the second start may still be on
    // its way through the bus, so wait for it rather than racing it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = wait_for_types(&tp, &stopped).await;
        let starts = events
            .iter()
            .filter(|e| e.r#type == "sec.crypto.service.started")
            .count();
        if starts >= 2 {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both starts recorded (have {starts})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let newest = events
        .iter()
        .find(|e| e.r#type == "sec.crypto.service.started")
        .unwrap();
    assert_eq!(
        newest.details["instance_id"], instance,
        "restart keeps the installation"
    );
    tp.stop().await.0.unwrap();
    TestPlatform::cleanup(&seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_platform_end_to_end() {
    platform_end_to_end(Backends::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_backends_end_to_end() {
    platform_end_to_end(Backends::Production).await;
}
