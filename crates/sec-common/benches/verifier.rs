//! The local verifier's cost beside the signature it checks: for ES256, EdDSA and RS256
//! (RSA 3072), `LocalVerifier::verify` (the whole hot path: staleness check, key-set
//! snapshot, size check, header parse, kid lookup, alg binding, signature, claims parse and
//! checks, revocation lookups among 1,000 denylisted jtis, metrics) against bare
//! aws-lc-rs verification of the same token's signing input and signature with the same
//! pre-parsed key, in the same run. Target: verify reaches >= 85% of the bare rate.
//!
//! A third line, `bare_key_parsed_per_call`, is what a library that keeps only key bytes
//! (jsonwebtoken's `DecodingKey` → `UnparsedPublicKey`) pays: the key parsed on every call.
//!
//! Run with `cargo bench -p sec-common --bench verifier`; `make bench` prints the ratios.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use sec_common::clock::ManualClock;
use sec_common::jwt::{self, Alg, Expectations, KeySet, KeyState, TokenType, VerifyingKey};
use sec_common::verifier::{
    JwksDocument, JwksSource, LocalVerifier, Revocation, RevocationPage, RevocationSource,
    SourceError, VerifierConfig,
};

/// The key set and a revocation snapshot, as token-svc would answer.
struct Fixed {
    jwks: String,
    now: chrono::DateTime<Utc>,
}

#[async_trait::async_trait]
impl JwksSource for Fixed {
    async fn fetch_jwks(&self) -> Result<JwksDocument, SourceError> {
        Ok(JwksDocument {
            jwks_json: self.jwks.clone(),
            max_age: Duration::from_secs(300),
        })
    }
}

#[async_trait::async_trait]
impl RevocationSource for Fixed {
    async fn list_revocations(&self, _cursor: &str) -> Result<RevocationPage, SourceError> {
        Ok(RevocationPage {
            revocations: (0..1000)
                .map(|i| Revocation::Jti {
                    jti: format!("revoked-{i}"),
                    expires_at: self.now + chrono::Duration::seconds(600),
                })
                .collect(),
            cursor: "1".into(),
            snapshot: true,
            as_of: self.now,
        })
    }
}

fn local_verifier(keys: &KeySet, now: chrono::DateTime<Utc>) -> LocalVerifier {
    let fixed = std::sync::Arc::new(Fixed {
        jwks: keys.to_jwks().to_string(),
        now,
    });
    let v = LocalVerifier::new(
        VerifierConfig::new("https://token.sec.local", "api"),
        ManualClock::new(now),
        fixed.clone(),
        fixed,
    );
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(v.refresh_all())
        .unwrap();
    v
}

type Signer = Box<dyn Fn(&[u8]) -> Vec<u8>>;

struct Case {
    name: &'static str,
    token: String,
    keys: KeySet,
    bare_key: signature::ParsedPublicKey,
    unparsed: (&'static dyn signature::VerificationAlgorithm, Vec<u8>),
}

fn case(alg: Alg) -> Case {
    let rng = SystemRandom::new();
    let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap().timestamp();
    let claims = serde_json::json!({
        "iss": "https://token.sec.local", "sub": "0190c2a4-7d3e-7b7a-9f6e-3c1d2b4a5e6f",
        "aud": "api", "client_id": "web", "scope": "openid profile read",
        "jti": "0190c2a4-7d3e-7b7a-9f6e-3c1d2b4a5e70", "iat": now, "nbf": now, "exp": now + 900,
        "auth_time": now - 30, "acr": "1", "amr": ["pwd", "otp"],
    });
    let claims = claims.as_object().unwrap();
    let (name, key, sign, alg_v, pk): (_, _, Signer, _, Vec<u8>) = match alg {
        Alg::Es256 => {
            let k = signature::EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                .unwrap();
            let pk = k.public_key().as_ref().to_vec();
            let v = VerifyingKey::es256_from_sec1(&pk).unwrap();
            let alg_v: &'static dyn signature::VerificationAlgorithm =
                &signature::ECDSA_P256_SHA256_FIXED;
            (
                "es256",
                v,
                Box::new(move |m: &[u8]| k.sign(&rng, m).unwrap().as_ref().to_vec()),
                alg_v,
                pk,
            )
        }
        Alg::EdDsa => {
            let k = signature::Ed25519KeyPair::generate().unwrap();
            let pk = k.public_key().as_ref().to_vec();
            let v = VerifyingKey::ed25519(&pk).unwrap();
            let alg_v: &'static dyn signature::VerificationAlgorithm = &signature::ED25519;
            (
                "eddsa",
                v,
                Box::new(move |m: &[u8]| k.sign(m).as_ref().to_vec()),
                alg_v,
                pk,
            )
        }
        Alg::Rs256 | Alg::Ps256 => {
            let k = signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).unwrap();
            let pk = k.public_key().as_ref().to_vec();
            let v = VerifyingKey::rsa_from_pkcs1_der(Alg::Rs256, &pk).unwrap();
            let alg_v: &'static dyn signature::VerificationAlgorithm =
                &signature::RSA_PKCS1_2048_8192_SHA256;
            let sign = move |m: &[u8]| {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
                    .unwrap();
                sig
            };
            ("rs256_3072", v, Box::new(sign), alg_v, pk)
        }
    };
    let token = jwt::encode(alg, "2026-11-23-k1", TokenType::Access, claims, |m| {
        Ok::<_, ()>(sign(m))
    })
    .unwrap();
    let mut keys = KeySet::new();
    keys.insert("2026-11-23-k1", key, KeyState::Active);
    // Two more keys, as during a rotation (next + retiring).
    let spare = signature::Ed25519KeyPair::generate().unwrap();
    let spare = VerifyingKey::ed25519(spare.public_key().as_ref()).unwrap();
    keys.insert("2026-11-23-k0", spare.clone(), KeyState::Active);
    keys.insert("2026-11-23-k2", spare, KeyState::Active);
    Case {
        name,
        token,
        keys,
        bare_key: signature::ParsedPublicKey::new(alg_v, &pk).unwrap(),
        unparsed: (alg_v, pk),
    }
}

fn bench_verifier(c: &mut Criterion) {
    let now = Utc.timestamp_opt(1_800_000_100, 0).unwrap();
    let expect = Expectations::new("https://token.sec.local", "api", TokenType::Access);
    for alg in [Alg::Es256, Alg::EdDsa, Alg::Rs256] {
        let case = case(alg);
        let (input, sig) = case.token.rsplit_once('.').unwrap();
        let sig = B64.decode(sig).unwrap();
        assert!(jwt::verify(&case.token, &case.keys, &expect, now).is_ok());
        let verifier = local_verifier(&case.keys, now);
        assert!(verifier.verify(&case.token).is_ok());
        assert!(case.bare_key.verify_sig(input.as_bytes(), &sig).is_ok());

        let mut g = c.benchmark_group(format!("verifier/{}", case.name));
        g.measurement_time(Duration::from_secs(4));
        g.warm_up_time(Duration::from_secs(1));
        g.bench_function("bare_aws_lc_rs", |b| {
            b.iter(|| {
                case.bare_key
                    .verify_sig(black_box(input.as_bytes()), black_box(&sig))
                    .unwrap()
            })
        });
        g.bench_function("local_verify", |b| {
            b.iter(|| verifier.verify(black_box(&case.token)).unwrap())
        });
        g.bench_function("jwt_verify_core", |b| {
            b.iter(|| jwt::verify(black_box(&case.token), &case.keys, &expect, now).unwrap())
        });
        g.bench_function("bare_key_parsed_per_call", |b| {
            b.iter(|| {
                signature::UnparsedPublicKey::new(case.unparsed.0, &case.unparsed.1)
                    .verify(black_box(input.as_bytes()), black_box(&sig))
                    .unwrap()
            })
        });
        g.finish();

        paired(
            case.name,
            || {
                case.bare_key
                    .verify_sig(black_box(input.as_bytes()), black_box(&sig))
                    .unwrap()
            },
            || {
                verifier.verify(black_box(&case.token)).unwrap();
            },
        );
    }
}

/// The same ratio measured so that load from other processes hits both sides alike:
/// alternating blocks of bare and local verifications, keeping each side's fastest block.
/// Printed beside criterion's medians (which run one side after the other and so drift
/// when the machine's load changes between them).
fn paired(name: &str, mut bare: impl FnMut(), mut local: impl FnMut()) {
    const BLOCK: u32 = 20;
    const ROUNDS: u32 = 500;
    let (mut best_bare, mut best_local) = (Duration::MAX, Duration::MAX);
    for _ in 0..ROUNDS {
        let t = std::time::Instant::now();
        for _ in 0..BLOCK {
            bare();
        }
        best_bare = best_bare.min(t.elapsed());
        let t = std::time::Instant::now();
        for _ in 0..BLOCK {
            local();
        }
        best_local = best_local.min(t.elapsed());
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(BLOCK);
    println!(
        "verifier/{name}/paired: bare {:.2} µs, local_verify {:.2} µs, local rate = {:.1}% of bare",
        per(best_bare),
        per(best_local),
        100.0 * best_bare.as_secs_f64() / best_local.as_secs_f64()
    );
}

criterion_group!(benches, bench_verifier);
criterion_main!(benches);
