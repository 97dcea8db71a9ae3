//! The envelope-encryption client against a real crypto-svc: data sealed in the caller's
//! process, data keys cached within their time and use bounds, tampering refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use sec_common::envelope::{CachePolicy, Envelope, EnvelopeError};
use sec_common::grpc::BearerToken;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{CreateKeyRequest, KeyType};
use sec_tests::{Backends, TestPlatform};

fn header(sealed: &[u8]) -> String {
    let n = usize::from(u16::from_be_bytes([sealed[4], sealed[5]]));
    String::from_utf8(sealed[6..6 + n].to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_seal_open_caching_and_tampering() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let mut admin = CryptoServiceClient::with_interceptor(
        tp.channel("crypto"),
        BearerToken::new(Some(&tp.token)).unwrap(),
    );
    admin
        .create_key(CreateKeyRequest {
            name: "app-data".into(),
            r#type: KeyType::Aes256Gcm as i32,
            config: None,
        })
        .await
        .unwrap();
    let policy = CachePolicy {
        max_age: Duration::from_secs(60),
        max_uses: 3,
        max_open_keys: 8,
    };
    let env = Envelope::new(tp.channel("crypto"), Some(&tp.token), "app-data", policy).unwrap();

    let a = env.seal(b"patient record 1", b"row-1").await.unwrap();
    assert!(!a.windows(7).any(|w| w == b"patient"), "ciphertext only");
    assert_eq!(
        env.open(&a, b"row-1").await.unwrap().as_slice(),
        b"patient record 1"
    );

    // data key reused up to max_uses, then replaced
    let b = env.seal(b"2", b"").await.unwrap();
    let c = env.seal(b"3", b"").await.unwrap();
    let d = env.seal(b"4", b"").await.unwrap();
    assert_eq!(header(&a), header(&b));
    assert_eq!(header(&a), header(&c));
    assert_ne!(header(&a), header(&d), "fourth seal uses a new data key");

    // tampering, other associated data, swapped header, garbage
    let mut t = a.clone();
    *t.last_mut().unwrap() ^= 1;
    assert!(matches!(
        env.open(&t, b"row-1").await,
        Err(EnvelopeError::Authentication)
    ));
    assert!(matches!(
        env.open(&a, b"row-2").await,
        Err(EnvelopeError::Authentication)
    ));
    let mut swapped = d[..6 + header(&d).len()].to_vec();
    swapped.extend_from_slice(&a[6 + header(&a).len()..]);
    assert!(matches!(
        env.open(&swapped, b"row-1").await,
        Err(EnvelopeError::Authentication)
    ));
    assert!(matches!(
        env.open(b"SEC1\x00", b"").await,
        Err(EnvelopeError::Malformed)
    ));
    assert!(matches!(
        env.open(b"nope", b"").await,
        Err(EnvelopeError::Malformed)
    ));

    // another process (a new client) opens it through crypto-svc
    let other = Envelope::new(
        tp.channel("crypto"),
        Some(&tp.token),
        "app-data",
        CachePolicy::default(),
    )
    .unwrap();
    assert_eq!(
        other.open(&a, b"row-1").await.unwrap().as_slice(),
        b"patient record 1"
    );

    // cached keys keep working without crypto-svc; an uncached one needs it
    tp.stop().await.0.unwrap();
    assert_eq!(
        other.open(&a, b"row-1").await.unwrap().as_slice(),
        b"patient record 1",
        "cached data key"
    );
    assert!(
        env.seal(b"5", b"").await.is_ok(),
        "sealing key still within its uses"
    );
    let fresh = Envelope::new(other_channel(), None, "app-data", CachePolicy::default()).unwrap();
    assert!(matches!(
        fresh.open(&a, b"row-1").await,
        Err(EnvelopeError::Crypto(_))
    ));
}

fn other_channel() -> tonic::transport::Channel {
    // Nothing listens here: the platform is stopped and this port was never bound.
    tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy()
}
