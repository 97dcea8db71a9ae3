//! crypto-svc over gRPC, as a platform service calls it, on the embedded default and on
//! PostgreSQL + NATS: authorization, the precise error codes, restart keeping every key,
//! and its lifecycle events reaching the audit trail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use sec_common::grpc::BearerToken;
use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::*;
use sec_tests::{Backends, TestPlatform};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = CryptoServiceClient<InterceptedService<Channel, BearerToken>>;

fn client(tp: &TestPlatform, token: Option<&str>) -> Client {
    CryptoServiceClient::with_interceptor(tp.channel("crypto"), BearerToken::new(token).unwrap())
}

fn create(name: &str, t: KeyType) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        r#type: t as i32,
        config: None,
    }
}

async fn crypto_over_grpc(backends: Backends) {
    let Some(seed) = TestPlatform::seed(backends) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let tp = TestPlatform::start_with(seed.clone(), Some(data.path().to_owned())).await;
    let mut c = client(&tp, Some(&tp.token));

    let key = c
        .create_key(create("orders", KeyType::Aes256Gcm))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.type_name, "aes256-gcm");
    assert_eq!(key.latest_version, 1);
    assert!(!key.config.unwrap().deletion_allowed);
    assert_eq!(key.operations, ["encrypt", "decrypt", "rewrap", "datakey"]);

    let one_kib = vec![0xA5_u8; 1024];
    let ct = c
        .encrypt(EncryptRequest {
            key_name: "orders".into(),
            plaintext: one_kib.clone(),
            associated_data: b"tenant-1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ct.ciphertext.starts_with("sec:v1:"));
    let pt = c
        .decrypt(DecryptRequest {
            key_name: "orders".into(),
            ciphertext: ct.ciphertext.clone(),
            associated_data: b"tenant-1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pt.plaintext, one_kib);

    // precise codes, messages without key material or plaintext
    let wrong_aad = c
        .decrypt(DecryptRequest {
            key_name: "orders".into(),
            ciphertext: ct.ciphertext.clone(),
            associated_data: b"tenant-2".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_aad.code(), Code::InvalidArgument);
    let missing = c
        .encrypt(EncryptRequest {
            key_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        c.delete_key(DeleteKeyRequest {
            name: "orders".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition
    );
    c.create_key(create("signer", KeyType::Ed25519))
        .await
        .unwrap();
    let enc_only = c
        .sign(SignRequest {
            key_name: "orders".into(),
            message: b"m".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(enc_only.code(), Code::FailedPrecondition);
    let big = c
        .encrypt(EncryptRequest {
            key_name: "orders".into(),
            plaintext: vec![0; 4 * 1024 * 1024 + 1],
            associated_data: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::InvalidArgument, "{big:?}");
    let bad_type = c
        .create_key(CreateKeyRequest {
            name: "x".into(),
            r#type: 0,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_type.code(), Code::InvalidArgument);

    // batch: per-item results, one bad item does not fail the rest
    let batch = c
        .batch_decrypt(BatchDecryptRequest {
            key_name: "orders".into(),
            items: vec![
                BatchDecryptItem {
                    ciphertext: ct.ciphertext.clone(),
                    associated_data: b"tenant-1".to_vec(),
                },
                BatchDecryptItem {
                    ciphertext: "sec:v1:AAAA".into(),
                    associated_data: vec![],
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        batch.results[0].result,
        Some(batch_decrypt_result::Result::Ok(_))
    ));
    match &batch.results[1].result {
        Some(batch_decrypt_result::Result::Error(e)) => assert_eq!(e.code, "invalid_argument"),
        other => panic!("{other:?}"),
    }

    // who may call what
    let mut anon = client(&tp, None);
    assert_eq!(
        anon.list_keys(ListKeysRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        anon.encrypt(EncryptRequest {
            key_name: "orders".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::Unauthenticated
    );

    // a service caller may use keys but not manage them
    let mut svc = client(&tp, Some(&tp.service_token));
    assert!(
        svc.encrypt(EncryptRequest {
            key_name: "orders".into(),
            plaintext: b"x".to_vec(),
            associated_data: vec![]
        })
        .await
        .is_ok()
    );
    assert_eq!(
        svc.create_key(create("svc-made", KeyType::Aes256Gcm))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        svc.delete_key(DeleteKeyRequest {
            name: "orders".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );

    // per-key service access: the in-process credential is the service `internal`
    let limited = |name: &str, services: &[&str]| CreateKeyRequest {
        name: name.into(),
        r#type: KeyType::Aes256Gcm as i32,
        config: Some(KeyConfig {
            allowed_services: services.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }),
    };
    let only_internal = c
        .create_key(limited("only-internal", &["internal"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_internal.config.unwrap().allowed_services, ["internal"]);
    c.create_key(limited("only-token-svc", &["token-svc"]))
        .await
        .unwrap();
    let enc = |key: &str| EncryptRequest {
        key_name: key.into(),
        plaintext: b"x".to_vec(),
        associated_data: vec![],
    };
    assert!(svc.encrypt(enc("only-internal")).await.is_ok());
    assert_eq!(
        svc.encrypt(enc("only-token-svc")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert!(
        c.encrypt(enc("only-token-svc")).await.is_ok(),
        "admin may use it"
    );
    let got = c
        .get_key(GetKeyRequest {
            name: "only-token-svc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let updated = c
        .update_key_config(UpdateKeyConfigRequest {
            name: "only-token-svc".into(),
            allowed_services: Some(ServiceList {
                services: vec!["token-svc".into(), "internal".into()],
            }),
            expected_policy_version: Some(got.policy_version),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        updated.config.unwrap().allowed_services,
        ["internal", "token-svc"]
    );
    assert!(svc.encrypt(enc("only-token-svc")).await.is_ok());
    // a stale expected_policy_version changes nothing
    assert_eq!(
        c.update_key_config(UpdateKeyConfigRequest {
            name: "only-token-svc".into(),
            allowed_services: Some(ServiceList { services: vec![] }),
            expected_policy_version: Some(got.policy_version),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::Aborted
    );
    assert!(svc.encrypt(enc("only-token-svc")).await.is_ok());

    // per-key, per-operation metrics on the admin port
    let (_, metrics) = sec_tests::http_get(tp.admin["crypto"], "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"sec_crypto_operations_total{key="orders",operation="encrypt",outcome="ok"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"operation="decrypt",outcome="invalid_argument""#),
        "{metrics}"
    );

    // rotation keeps old ciphertexts readable; restart keeps every key
    let rotated = c
        .rotate_key(RotateKeyRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.latest_version, 2);
    let (result, _) = tp.stop().await;
    result.unwrap();
    let tp = TestPlatform::start_with(seed.clone(), Some(data.path().to_owned())).await;
    let mut c = client(&tp, Some(&tp.token));
    let pt = c
        .decrypt(DecryptRequest {
            key_name: "orders".into(),
            ciphertext: ct.ciphertext.clone(),
            associated_data: b"tenant-1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pt.plaintext, one_kib,
        "after restart, v1 ciphertext still decrypts"
    );
    let listed = c
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed.keys.iter().map(|k| k.name.as_str()).collect();
    // token-svc's and auth-svc's own sealing keys (EnsureServiceKey at their start) are
    // listed too.
    assert_eq!(
        names,
        [
            "only-internal",
            "only-token-svc",
            "orders",
            "signer",
            "svc.auth.facade-secrets",
            "svc.token.signing-keys"
        ]
    );
    assert_eq!(listed.keys[2].latest_version, 2);
    assert_eq!(
        listed.keys[1].config.as_ref().unwrap().allowed_services,
        ["internal", "token-svc"],
        "the service list survives a restart"
    );

    // lifecycle events and the refused decrypt reached the audit trail
    let want = [
        "sec.crypto.key.created",
        "sec.crypto.key.rotated",
        "sec.crypto.decrypt.failed",
        "sec.crypto.key.delete_refused",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = tp
            .audit()
            .list_events(ListEventsRequest {
                event_type: "sec.crypto.*".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        if want.iter().all(|w| events.iter().any(|e| e.r#type == *w)) {
            for e in &events {
                let dump = format!("{e:?}");
                assert!(!dump.contains("sec:v1:"), "no ciphertext in events: {dump}");
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events missing: {:?}",
            events.iter().map(|e| &e.r#type).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tp.stop().await.0.unwrap();
    TestPlatform::cleanup(&seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crypto_over_grpc_embedded() {
    crypto_over_grpc(Backends::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crypto_over_grpc_production() {
    crypto_over_grpc(Backends::Production).await;
}

/// Limits apply to decoded sizes, end to end: a plaintext and associated data of exactly
/// `crypto.max_payload_bytes` round-trip through Encrypt, Decrypt and Rewrap (the
/// ciphertext text is a third longer), one byte more is INVALID_ARGUMENT, and a
/// BatchEncrypt of the most items allowed, each producing the longest ciphertext there is
/// (RSA-4096), is answered, not failed at response encoding.
async fn decoded_size_limits_over_grpc(backends: Backends) {
    const LIMIT: usize = 1024 * 1024;
    const ITEMS: usize = 10_000;
    let Some(mut seed) = TestPlatform::seed(backends) else {
        return;
    };
    let crypto = crypto_svc::CryptoConfig {
        max_payload_bytes: LIMIT,
        max_batch_items: ITEMS,
        ..seed
            .config
            .section::<crypto_svc::CryptoConfig>(crypto_svc::NAME)
            .unwrap()
            .clone()
    };
    seed.config.set_section(crypto_svc::NAME, crypto).unwrap();
    let tp = TestPlatform::start_with(seed.clone(), None).await;
    // Clients have a 4 MiB decoding default; the responses here are larger.
    let mut admin = client(&tp, Some(&tp.token))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let mut svc = client(&tp, Some(&tp.service_token))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    admin
        .create_key(create("big", KeyType::Aes256Gcm))
        .await
        .unwrap();

    let plaintext: Vec<u8> = (0..LIMIT).map(|i| (i % 253) as u8).collect();
    let aad = vec![b'a'; LIMIT];
    let ct = svc
        .encrypt(EncryptRequest {
            key_name: "big".into(),
            plaintext: plaintext.clone(),
            associated_data: aad.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert!(ct.len() > LIMIT * 4 / 3);
    let pt = svc
        .decrypt(DecryptRequest {
            key_name: "big".into(),
            ciphertext: ct.clone(),
            associated_data: aad.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, plaintext);
    let rewrapped = svc
        .rewrap(RewrapRequest {
            key_name: "big".into(),
            ciphertext: ct,
            associated_data: aad.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let pt = svc
        .decrypt(DecryptRequest {
            key_name: "big".into(),
            ciphertext: rewrapped,
            associated_data: aad.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, plaintext);

    // One byte more: our error, not the transport's.
    let e = svc
        .encrypt(EncryptRequest {
            key_name: "big".into(),
            plaintext: vec![1; LIMIT + 1],
            associated_data: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    use base64::Engine as _;
    let forged = format!(
        "sec:v1:{}",
        base64::engine::general_purpose::STANDARD.encode(vec![0_u8; LIMIT + 1 + 28])
    );
    for aad in [vec![], aad.clone()] {
        let e = svc
            .decrypt(DecryptRequest {
                key_name: "big".into(),
                ciphertext: forged.clone(),
                associated_data: aad,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }

    // rotation_period_seconds is bounded: 10^13 (which used to panic the rotation task)
    // is refused on create and update, and the service stays ready.
    let e = admin
        .create_key(CreateKeyRequest {
            config: Some(KeyConfig {
                rotation_period_seconds: 10_u64.pow(13),
                ..Default::default()
            }),
            ..create("forever", KeyType::Aes256Gcm)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = admin
        .update_key_config(UpdateKeyConfigRequest {
            name: "big".into(),
            rotation_period_seconds: Some(10_u64.pow(13)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    tp.wait_ready().await.unwrap();
    // Its background loops are supervised: each is a named /readyz check, passing.
    let (status, body) = sec_tests::http_get(tp.admin["crypto"], "/readyz")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    for task in ["\"rotation\"", "\"event_tick\""] {
        assert!(body.contains(task), "{body}");
    }

    // A batch at the item limit whose every ciphertext is an RSA-4096 block: ~7 MB of
    // response from 10 KB of request.
    admin
        .create_key(create("rsa", KeyType::Rsa4096))
        .await
        .unwrap();
    let items: Vec<_> = (0..ITEMS)
        .map(|_| BatchEncryptItem {
            plaintext: vec![],
            associated_data: vec![],
        })
        .collect();
    let results = svc
        .batch_encrypt(BatchEncryptRequest {
            key_name: "rsa".into(),
            items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), ITEMS);
    assert!(
        results
            .iter()
            .all(|r| matches!(r.result, Some(batch_encrypt_result::Result::Ok(_))))
    );
    // And its ciphertexts decrypt back as a batch (a slice: RSA decryption is slow).
    let items: Vec<_> = results
        .into_iter()
        .take(50)
        .map(|r| match r.result {
            Some(batch_encrypt_result::Result::Ok(ok)) => BatchDecryptItem {
                ciphertext: ok.ciphertext,
                associated_data: vec![],
            },
            other => panic!("{other:?}"),
        })
        .collect();
    let results = svc
        .batch_decrypt(BatchDecryptRequest {
            key_name: "rsa".into(),
            items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        results
            .iter()
            .all(|r| matches!(r.result, Some(batch_decrypt_result::Result::Ok(_))))
    );
    tp.stop().await.0.unwrap();
    TestPlatform::cleanup(&seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_size_limits_over_grpc_embedded() {
    decoded_size_limits_over_grpc(Backends::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_size_limits_over_grpc_production() {
    decoded_size_limits_over_grpc(Backends::Production).await;
}
