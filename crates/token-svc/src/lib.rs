//! token-svc: JWT signing keys with a lifecycle and automatic rotation, RFC 9068 access
//! tokens and OIDC ID tokens, refresh-token families with reuse detection, validation,
//! revocation and the public JWKS.
//!
//! Layout (crypto-svc's): `store/` (trait, PostgreSQL, SQLite, contract suite),
//! `engine/` (the logic, no gRPC), `grpc.rs` (validation and proto mapping), `config.rs`
//! (its `[token]` section), `keys.rs` (the signing cryptography), and below: [`SPEC`] and
//! `run`.

pub mod config;
pub mod engine;
pub mod grpc;
pub mod keys;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use sec_common::auth::{Access, AccessTable};
use sec_common::config::ConfigSection;
use sec_common::envelope::{CachePolicy, Envelope};
use sec_common::grpc::BearerToken;
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::{Db, Migrations};
use sec_common::supervise::{Supervisor, until_ok};
use sec_proto::crypto::v1::EnsureServiceKeyRequest;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::token::v1::token_service_server::TokenServiceServer;
use tokio_util::sync::CancellationToken;

pub use config::TokenConfig;

pub const NAME: &str = "token";

/// The crypto-svc key (`svc.token.<purpose>`) signing keys are sealed under.
pub const SEALING_KEY_PURPOSE: &str = "signing-keys";

/// Every RPC of the service and who may call it; a method missing here is refused.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.token.v1.TokenService",
    methods: &[
        ("GetJwks", Access::Anyone),
        ("IssueTokens", Access::Service),
        ("RefreshTokens", Access::Service),
        ("ValidateToken", Access::Service),
        ("IntrospectRefreshToken", Access::Service),
        ("ListRevocations", Access::Service),
        ("RevokeToken", Access::Service),
        ("ListSigningKeys", Access::Admin),
        ("RotateSigningKey", Access::Admin),
        ("RevokeSigningKey", Access::Admin),
        ("TokenStats", Access::Admin),
    ],
};

/// token-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50052, 9102),
    http_facade: false,
    access: &[ACCESS],
    calls: &["crypto"],
    config: &[ConfigSection::of::<TokenConfig>()],
    preflight: no_preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/token/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/token/sqlite"),
};

/// The token store for the configured backend.
pub fn token_store(db: &Db) -> Arc<dyn store::TokenStore> {
    match db {
        Db::Postgres(p) => Arc::new(store::postgres::PgTokenStore::new(p.clone())),
        Db::Sqlite(p) => Arc::new(store::sqlite::SqliteTokenStore::new(p.clone())),
    }
}

/// Runs token-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = platform.config.section::<TokenConfig>(NAME)?.clone();
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;

    // Private keys are sealed under our own crypto-svc key, made on first start.
    let url = platform
        .addrs("crypto")?
        .endpoint_url(platform.config.tls.enabled());
    let channel = sec_common::grpc::channel(&url, &platform.config.tls)?;
    let credential = platform.credential(NAME).map(str::to_owned);
    let key = {
        let (channel, credential) = (channel.clone(), credential.clone());
        let key = until_ok(
            "ensuring the sealing key in crypto-svc",
            &shutdown,
            move || {
                let (channel, credential) = (channel.clone(), credential.clone());
                async move {
                    let mut client = CryptoServiceClient::with_interceptor(
                        channel,
                        BearerToken::new(credential.as_deref())?,
                    );
                    let k = client
                        .ensure_service_key(EnsureServiceKeyRequest {
                            purpose: SEALING_KEY_PURPOSE.into(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok(k.name)
                }
            },
        )
        .await;
        match key {
            Some(k) => k,
            None => {
                db.close().await;
                return Ok(());
            }
        }
    };
    let sealer = Arc::new(Envelope::new(
        channel,
        credential.as_deref(),
        &key,
        CachePolicy::default(),
    )?);

    let metrics = engine::TokenMetrics::register(&mut host.registry);
    let emitter = platform.clone();
    let engine = Arc::new(engine::Engine::new(
        token_store(&db),
        sealer,
        platform.clock.clone(),
        Arc::new(move |e| emitter.emit(e)),
        cfg.clone(),
        metrics,
    )?);
    {
        let engine = engine.clone();
        let started = until_ok("loading signing keys", &shutdown, move || {
            let engine = engine.clone();
            async move { engine.start().await.map_err(|e| anyhow::anyhow!("{e}")) }
        })
        .await;
        if started.is_none() {
            db.close().await;
            return Ok(());
        }
    }

    // Supervised: if a loop ends or panics, `/readyz` names it and it is restarted.
    let mut tasks = Supervisor::new(NAME, &mut host.registry, host.readiness.clone(), &shutdown);
    spawn_every(
        &mut tasks,
        "key_rotation",
        &engine,
        &shutdown,
        cfg.rotation_check_seconds,
        |e| {
            Box::pin(async move {
                match e.maintain_keys().await {
                    Ok(k) if !k.is_empty() => {
                        tracing::info!(activated = ?k, "signing key rotation")
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(error = %err, "signing key maintenance failed"),
                }
            })
        },
    );
    spawn_every(
        &mut tasks,
        "revocation_sync",
        &engine,
        &shutdown,
        cfg.revocation_poll_seconds,
        |e| {
            Box::pin(async move {
                if let Err(err) = e.sync_revocations().await {
                    tracing::warn!(error = %err, "revocation sync failed");
                }
            })
        },
    );
    spawn_every(
        &mut tasks,
        "cleanup",
        &engine,
        &shutdown,
        cfg.cleanup_interval_seconds,
        |e| {
            Box::pin(async move {
                if let Err(err) = e.cleanup().await {
                    tracing::warn!(error = %err, "token cleanup failed");
                }
            })
        },
    );

    let server = TokenServiceServer::new(grpc::TokenApi {
        engine: engine.clone(),
    })
    .max_decoding_message_size(256 * 1024);
    let serve = Serve {
        routes: tonic::service::Routes::new(server),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    tasks.stop().await;
    db.close().await;
    result
}

type Job =
    fn(Arc<engine::Engine>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A supervised loop running `job` every `seconds`.
fn spawn_every(
    tasks: &mut Supervisor,
    name: &'static str,
    engine: &Arc<engine::Engine>,
    shutdown: &CancellationToken,
    seconds: u64,
    job: Job,
) {
    let (engine, stop) = (engine.clone(), shutdown.clone());
    let every = Duration::from_secs(seconds.max(1));
    tasks.spawn(name, move || {
        let (engine, stop) = (engine.clone(), stop.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                job(engine.clone()).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_table_covers_every_rpc() {
        sec_common::auth::check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, super::SPEC.access)
            .unwrap();
    }
}
