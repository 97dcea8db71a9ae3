//! The service template's guarantees, tried from outside over gRPC and the admin port:
//! the host enforces each service's access table (deny by default), the audit trail is
//! admin-only, and a flood of random key names adds no metric series.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use sec_common::grpc::BearerToken;
use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{EncryptRequest, ListKeysRequest};
use sec_tests::{Backends, TestPlatform, http_get};
use tonic::Code;

#[tokio::test]
async fn methods_missing_from_a_servers_access_table_are_refused_even_to_the_admin() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    // CryptoService methods sent to token-svc's port: not in token-svc's table.
    for token in [
        Some(tp.token.as_str()),
        Some(tp.service_token.as_str()),
        None,
    ] {
        let mut c = CryptoServiceClient::with_interceptor(
            tp.channel("token"),
            BearerToken::new(token).unwrap(),
        );
        let err = c.list_keys(ListKeysRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    // Health stays open to anyone on every port.
    let mut h = tonic_health::pb::health_client::HealthClient::new(tp.channel("token"));
    h.check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    tp.stop().await.0.unwrap();
}

#[tokio::test]
async fn the_audit_trail_is_admin_only() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let as_who = |t: Option<&str>| {
        AuditServiceClient::with_interceptor(tp.channel("audit"), BearerToken::new(t).unwrap())
    };
    let err = as_who(Some(&tp.service_token))
        .list_events(ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = as_who(None)
        .list_events(ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = as_who(Some("sec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
        .list_events(ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    as_who(Some(&tp.token))
        .list_events(ListEventsRequest::default())
        .await
        .unwrap();
    tp.stop().await.0.unwrap();
}

fn operation_series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("sec_crypto_operations_total{"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

#[tokio::test]
async fn a_flood_of_random_key_names_adds_no_metric_series() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let mut c = CryptoServiceClient::with_interceptor(
        tp.channel("crypto"),
        BearerToken::new(Some(&tp.service_token)).unwrap(),
    );
    let encrypt = |name: String| EncryptRequest {
        key_name: name,
        plaintext: b"x".to_vec(),
        associated_data: vec![],
    };
    // Warm up both outcome kinds (unknown key, invalid name) so the series exist.
    let _ = c.encrypt(encrypt("warm-up-unknown".into())).await;
    let _ = c.encrypt(encrypt("bad name!".into())).await;
    let (_, before) = http_get(tp.admin["crypto"], "/metrics").await.unwrap();
    let before = operation_series(&before);

    let mut names = Vec::new();
    for i in 0..300 {
        let name = if i % 2 == 0 {
            format!("probe-{}", uuid::Uuid::new_v4().simple())
        } else {
            format!("probe {}/{}", uuid::Uuid::new_v4(), "ü")
        };
        let err = c.encrypt(encrypt(name.clone())).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::NotFound | Code::InvalidArgument),
            "{err:?}"
        );
        names.push(name);
    }
    let (_, after) = http_get(tp.admin["crypto"], "/metrics").await.unwrap();
    assert_eq!(
        operation_series(&after),
        before,
        "300 random names must not add a series"
    );
    for n in &names {
        assert!(
            !after.contains(n.as_str()),
            "a caller's key name leaked into /metrics"
        );
    }
    tp.stop().await.0.unwrap();
}

/// Inside one process each service has its own credential and authenticates as itself,
/// so a key limited to token-svc is refused to assess-svc there too.
#[tokio::test]
async fn in_process_services_authenticate_as_themselves() {
    use sec_proto::crypto::v1::{CreateKeyRequest, KeyConfig, KeyType};
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let mut admin = CryptoServiceClient::with_interceptor(
        tp.channel("crypto"),
        BearerToken::new(Some(&tp.token)).unwrap(),
    );
    admin
        .create_key(CreateKeyRequest {
            name: "token-signing-wrap".into(),
            r#type: KeyType::Aes256Gcm as i32,
            config: Some(KeyConfig {
                allowed_services: vec!["token".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let encrypt = || EncryptRequest {
        key_name: "token-signing-wrap".into(),
        plaintext: b"signing key".to_vec(),
        associated_data: vec![],
    };
    let mut as_token =
        CryptoServiceClient::with_interceptor(tp.channel("crypto"), tp.as_service("token"));
    as_token.encrypt(encrypt()).await.unwrap();
    let mut as_assess =
        CryptoServiceClient::with_interceptor(tp.channel("crypto"), tp.as_service("assess"));
    let err = as_assess.encrypt(encrypt()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Neither may manage keys: that stays the admin's.
    let err = as_token
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    tp.stop().await.0.unwrap();
}
