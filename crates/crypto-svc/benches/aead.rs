//! In-process cryptography throughput, through the same `Loaded` path the service uses:
//! AES-256-GCM (target ≥ 1 GB/s per core), ChaCha20-Poly1305, and a 1 KiB encrypt.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a failure should abort the run

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crypto_svc::material::{KeyType, Loaded, generate};

fn aead(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    for t in [KeyType::Aes256Gcm, KeyType::Chacha20Poly1305] {
        let key = Loaded::load(t, &generate(t).unwrap()).unwrap();
        for size in [1024_usize, 1 << 20] {
            let data = vec![7_u8; size];
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{}/encrypt", t.name()), size),
                &data,
                |b, d| {
                    b.iter(|| key.encrypt(d, b"aad").unwrap());
                },
            );
            let ct = key.encrypt(&data, b"aad").unwrap();
            g.bench_with_input(
                BenchmarkId::new(format!("{}/decrypt", t.name()), size),
                &ct,
                |b, ct| {
                    b.iter(|| key.decrypt(ct, b"aad").unwrap());
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
