//! `GET /security/keys` on the facade, end to end: auth-svc reaches crypto-svc over
//! gRPC, admin-only, public parts only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;

use sec_common::grpc::BearerToken;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{CreateKeyRequest, KeyType};
use sec_tests::{Backends, TestPlatform};

/// A minimal HTTP/1.1 GET with optional `Authorization`: (status, lower-cased headers, body).
async fn get(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_keys_lists_public_parts_for_admins_only() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let mut crypto = CryptoServiceClient::with_interceptor(
        tp.channel("crypto"),
        BearerToken::new(Some(&tp.token)).unwrap(),
    );
    for (name, t) in [
        ("facade-signer", KeyType::Ed25519),
        ("facade-orders", KeyType::Aes256Gcm),
    ] {
        crypto
            .create_key(CreateKeyRequest {
                name: name.into(),
                r#type: t as i32,
                config: None,
            })
            .await
            .unwrap();
    }

    // no credentials: 401 with a Bearer challenge and the platform's JSON error
    let (status, headers, body) = get(tp.http, "/security/keys", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        header(&headers, "www-authenticate")
            .unwrap()
            .starts_with("Bearer"),
        "{headers:?}"
    );
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"], "unauthenticated");
    assert!(err["error_description"].as_str().is_some());
    assert!(!body.contains("facade-signer"));

    // a well-formed token that is not the admin's: 401
    let wrong = sec_common::auth::generate_token().unwrap();
    let (status, headers, body) =
        get(tp.http, "/security/keys", Some(&format!("Bearer {wrong}"))).await;
    assert_eq!(status, 401, "{body}");
    assert!(header(&headers, "www-authenticate").is_some());
    assert!(!body.contains("facade-signer") && !body.contains(&wrong));

    // the admin token: 200, both keys, a public key for ed25519 only, no caching
    let (status, headers, body) = get(
        tp.http,
        "/security/keys",
        Some(&format!("Bearer {}", tp.token)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    assert!(
        header(&headers, "content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = v["keys"].as_array().unwrap();
    let find = |name: &str| {
        keys.iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {body}"))
    };
    let signer = find("facade-signer");
    assert_eq!(signer["type"], "ed25519");
    assert_eq!(signer["latest_version"], 1);
    assert_eq!(signer["deletion_allowed"], false);
    assert_eq!(signer["exportable"], false);
    assert_eq!(signer["rotation_period_seconds"], 0);
    for field in ["created_at", "last_rotated_at"] {
        let t = signer[field].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(t).unwrap();
    }
    let v1 = &signer["versions"][0];
    assert_eq!(v1["version"], 1);
    chrono::DateTime::parse_from_rfc3339(v1["created_at"].as_str().unwrap()).unwrap();
    assert!(
        v1["public_key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----"),
        "{v1}"
    );
    let orders = find("facade-orders");
    assert_eq!(orders["type"], "aes256-gcm");
    assert_eq!(orders["versions"].as_array().unwrap().len(), 1);
    assert!(
        orders["versions"][0].get("public_key_pem").is_none(),
        "{orders}"
    );
    // exactly the documented, public fields
    let fields: std::collections::BTreeSet<&str> = signer
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "created_at",
            "deletion_allowed",
            "exportable",
            "integrity_failed",
            "last_rotated_at",
            "latest_version",
            "min_decryption_version",
            "min_encryption_version",
            "name",
            "rotation_period_seconds",
            "type",
            "versions",
        ]
        .into()
    );
    assert!(!body.contains("PRIVATE"));

    let (r, _) = tp.stop().await;
    r.unwrap();
}
