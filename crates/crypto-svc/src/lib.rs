//! crypto-svc: the platform's root of trust. Named, versioned keys whose material is
//! wrapped at rest by a key-encryption key; encryption, signing, HMAC and data keys;
//! automatic rotation; backup and restore; KEK rotation.
//!
//! Layout (copy it for a new service): `store/` (trait, PostgreSQL, SQLite, contract
//! suite), `engine.rs` (the logic, no gRPC), `grpc.rs` (validation, authorization and
//! proto mapping), `material.rs` and `kek.rs` (the cryptography), `run` below.

pub mod engine;
pub mod grpc;
pub mod kek;
pub mod material;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::{Db, Migrations};
use sec_proto::crypto::v1::crypto_service_server::CryptoServiceServer;
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "crypto";
pub const GRPC_NAMES: &[&str] = &["sec.crypto.v1.CryptoService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/crypto/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/crypto/sqlite"),
};

/// The key store for the configured backend.
pub fn key_store(db: &Db) -> Arc<dyn store::KeyStore> {
    match db {
        Db::Postgres(p) => Arc::new(store::postgres::PgKeyStore::new(p.clone())),
        Db::Sqlite(p) => Arc::new(store::sqlite::SqliteKeyStore::new(p.clone())),
    }
}

/// Runs crypto-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = &platform.config.crypto;
    // Load the root of trust before anything else: no KEK, no service.
    let kek = Arc::new(kek::KekRing::load(&platform.config)?);
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let metrics = engine::CryptoMetrics::register(&mut host.registry);
    let emitter = platform.clone();
    let engine = Arc::new(engine::Engine::new(
        key_store(&db),
        kek,
        platform.clock.clone(),
        Arc::new(move |e| emitter.emit(e)),
        engine::Limits {
            max_payload_bytes: cfg.max_payload_bytes,
            max_batch_items: cfg.max_batch_items,
            cache_ttl: Duration::from_millis(cfg.cache_ttl_ms),
            ..engine::Limits::default()
        },
        metrics,
    ));

    let rotation = tokio::spawn(rotation_loop(
        engine.clone(),
        platform.clock.clone(),
        Duration::from_secs(cfg.rotation_check_seconds.max(1)),
        shutdown.clone(),
    ));

    // Leave room above the payload limit for the envelope and batches, so an oversized
    // payload gets our precise error rather than a transport one.
    let limit = cfg
        .max_payload_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024);
    let ticker = tokio::spawn(event_tick_loop(engine.clone(), shutdown.clone()));
    let server = CryptoServiceServer::new(grpc::CryptoApi {
        engine: engine.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let api =
        tonic::service::interceptor::InterceptedService::new(server, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    rotation.abort();
    ticker.abort();
    // Requests have drained: hand the pending decrypt.failed summaries to the event bus,
    // which the host flushes to the broker before exit.
    engine.flush_events();
    db.close().await;
    result
}

/// Closes aggregated-event windows about once a second, so a summary is emitted at most
/// a second after its window ends.
async fn event_tick_loop(engine: Arc<engine::Engine>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        engine.tick();
    }
}

async fn rotation_loop(
    engine: Arc<engine::Engine>,
    clock: sec_common::clock::SharedClock,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match engine.rotate_due(clock.now()).await {
            Ok(rotated) if !rotated.is_empty() => {
                tracing::info!(keys = ?rotated, "automatic rotation")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "automatic rotation check failed"),
        }
    }
}
