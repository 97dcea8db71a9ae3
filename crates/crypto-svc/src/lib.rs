//! crypto-svc: the platform's root of trust. Named, versioned keys whose material is
//! wrapped at rest by a key-encryption key; encryption, signing, HMAC and data keys;
//! automatic rotation; backup and restore; KEK rotation.
//!
//! Layout (copy it for a new service): `store/` (trait, PostgreSQL, SQLite, contract
//! suite), `engine.rs` (the logic, no gRPC), `grpc.rs` (validation and proto mapping),
//! `config.rs` (its `[crypto]` section), `material.rs` and `kek.rs` (the cryptography),
//! and below: [`SPEC`] (name, access table, config, preflight) and `run`.

pub mod config;
pub mod engine;
pub mod grpc;
pub mod kek;
pub mod material;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use sec_common::auth::{Access, AccessTable};
use sec_common::config::{Config, ConfigError, ConfigSection};
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::ServiceSpec;
use sec_common::storage::{Db, Migrations};
use sec_common::supervise::Supervisor;
use sec_proto::crypto::v1::crypto_service_server::CryptoServiceServer;
use tokio_util::sync::CancellationToken;

pub use config::CryptoConfig;

pub const NAME: &str = "crypto";

/// Key management is the admin's; using keys is open to trusted services.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.crypto.v1.CryptoService",
    methods: &[
        ("CreateKey", Access::Admin),
        ("GetKey", Access::Admin),
        ("ListKeys", Access::Admin),
        ("RotateKey", Access::Admin),
        ("UpdateKeyConfig", Access::Admin),
        ("DeleteKey", Access::Admin),
        ("BackupKey", Access::Admin),
        ("RestoreKey", Access::Admin),
        ("RotateKek", Access::Admin),
        ("GetInstallationKey", Access::Admin),
        ("Encrypt", Access::Service),
        ("Decrypt", Access::Service),
        ("BatchEncrypt", Access::Service),
        ("BatchDecrypt", Access::Service),
        ("Rewrap", Access::Service),
        ("GenerateDataKey", Access::Service),
        ("Sign", Access::Service),
        ("Verify", Access::Service),
        ("Hmac", Access::Service),
        ("VerifyHmac", Access::Service),
        ("BatchHmac", Access::Service),
        ("GetPublicKey", Access::Service),
        ("EnsureServiceKey", Access::Service),
    ],
};

/// crypto-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50055, 9105),
    http_facade: false,
    access: &[ACCESS],
    calls: &[],
    config: &[ConfigSection::of::<CryptoConfig>()],
    preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

/// The KEK settings parse and their files are readable: a bad KEK exits 64 before any
/// port is bound.
fn preflight(config: &Config) -> Result<(), ConfigError> {
    kek::KekRing::check_config(config).map_err(|e| ConfigError::Invalid {
        key: "crypto.kek".into(),
        message: format!("{e:#}"),
    })
}

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
    let cfg = platform.config.section::<CryptoConfig>(NAME)?;
    // Load the root of trust before anything else: no KEK, no service.
    let kek = Arc::new(kek::KekRing::load(&platform.config)?);
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    // A lost or wrong KEK must stop the start, not make every stored key unreadable.
    kek.check_store(key_store(&db).as_ref()).await?;
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
            max_encryptions_per_version: cfg.max_encryptions_per_version,
            rotation_check: Duration::from_secs(cfg.rotation_check_seconds.max(1)),
            ..engine::Limits::default()
        },
        metrics,
    ));
    // Key rows written before record MACs existed get theirs now (the service holds the
    // KEK); from then on every load checks them.
    engine
        .backfill_record_macs()
        .await
        .map_err(|e| anyhow::anyhow!("backfilling key record macs: {e}"))?;

    // Supervised: if a loop ends or panics, `/readyz` names it and it is restarted.
    let mut tasks = Supervisor::new(NAME, &mut host.registry, host.readiness.clone(), &shutdown);
    {
        let (engine, clock, stop) = (engine.clone(), platform.clock.clone(), shutdown.clone());
        let every = Duration::from_secs(cfg.rotation_check_seconds.max(1));
        tasks.spawn("rotation", move || {
            rotation_loop(engine.clone(), clock.clone(), every, stop.clone())
        });
    }
    {
        let (engine, stop) = (engine.clone(), shutdown.clone());
        tasks.spawn("event_tick", move || {
            event_tick_loop(engine.clone(), stop.clone())
        });
    }

    // Sized from the payload and batch limits (see `Limits::max_message_bytes`): room
    // for the base64 expansion of a ciphertext at the limit and for a full batch's
    // response, so nothing within the limits fails in the transport.
    let limit = engine.limits().max_message_bytes();
    let server = CryptoServiceServer::new(grpc::CryptoApi {
        engine: engine.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let serve = Serve {
        routes: tonic::service::Routes::new(server),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    tasks.stop().await;
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

#[cfg(test)]
mod tests {
    #[test]
    fn access_table_covers_every_rpc() {
        sec_common::auth::check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, super::SPEC.access)
            .unwrap();
    }
}
