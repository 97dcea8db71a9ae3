//! auth-svc: the OAuth 2.0 / OpenID Connect authorization server behind the HTTP facade,
//! and the gRPC API that manages its clients, users and scopes.
//!
//! Layout (crypto-svc's): `config.rs` (`[oauth]`), `store/` (trait, PostgreSQL, SQLite,
//! contract suite), `engine.rs` ([`engine::AuthServer`], what every handler shares),
//! `clients.rs` and `users.rs` (management, secret and password checks), `grpc.rs`
//! (validation and proto mapping), `oauth/` (the protocol endpoints), `pages/` (login,
//! consent, logout), `facade.rs` (the router), and below: [`SPEC`] and `run`.

pub mod clients;
pub mod config;
pub mod edge;
pub mod engine;
pub mod facade;
mod facade_audit;
mod facade_monitor;
pub mod grpc;
pub mod oauth;
pub mod pages;
pub mod store;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use sec_common::auth::{Access, AccessTable};
use sec_common::config::ConfigSection;
use sec_common::envelope::{CachePolicy, Envelope};
use sec_common::grpc::{BearerToken, channel};
use sec_common::password::PasswordHasher;
use sec_common::secret::KeyedHasher;
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::{Db, Migrations};
use sec_common::supervise::{Supervisor, until_ok};
use sec_proto::auth::v1::auth_service_server::AuthServiceServer;
use sec_proto::crypto::v1::EnsureServiceKeyRequest;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::session::v1::session_service_client::SessionServiceClient;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use tokio_util::sync::CancellationToken;

pub use config::OAuthConfig;

pub const NAME: &str = "auth";
/// The configuration section: `[oauth]` (`[auth]` is the platform's).
pub const SECTION: &str = "oauth";
/// The edge-protection section (rate limits, IP and geo rules, automatic blocks).
pub const EDGE_SECTION: &str = "edge";
/// The crypto-svc key (`svc.auth.<purpose>`) the service's own secrets are sealed under.
pub const SEALING_KEY_PURPOSE: &str = "facade-secrets";

/// Every RPC of the service and who may call it; a method missing here is refused.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.auth.v1.AuthService",
    methods: &[
        ("CreateClient", Access::Admin),
        ("GetClient", Access::Admin),
        ("ListClients", Access::Admin),
        ("UpdateClient", Access::Admin),
        ("DeleteClient", Access::Admin),
        ("RotateClientSecret", Access::Admin),
        ("CreateUser", Access::Admin),
        ("GetUser", Access::Admin),
        ("ListUsers", Access::Admin),
        ("UpdateUser", Access::Admin),
        ("SetPassword", Access::Admin),
        ("ListScopes", Access::Admin),
    ],
};

/// auth-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50051, 9101),
    http_facade: true,
    access: &[ACCESS, sec_edge::ACCESS],
    calls: &["crypto", "token", "session", "audit"],
    config: &[
        ConfigSection::named::<OAuthConfig>(SECTION),
        ConfigSection::named::<sec_edge::EdgeConfig>(EDGE_SECTION),
    ],
    preflight: no_preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/auth/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/auth/sqlite"),
};

/// The store for the configured backend.
pub fn auth_store(db: &Db) -> Arc<dyn store::AuthStore> {
    match db {
        Db::Postgres(p) => Arc::new(store::postgres::PgAuthStore::new(p.clone())),
        Db::Sqlite(p) => Arc::new(store::sqlite::SqliteAuthStore::new(p.clone())),
    }
}

/// The service's own 256-bit keys, made once (by whichever replica is first), stored
/// sealed under its crypto-svc key, and opened at start.
async fn own_key(
    store: &dyn store::AuthStore,
    sealer: &Envelope,
    name: &str,
) -> anyhow::Result<KeyedHasher> {
    let mut fresh = zeroize::Zeroizing::new([0_u8; 32]);
    aws_lc_rs::rand::fill(fresh.as_mut())
        .map_err(|_| anyhow::anyhow!("system random generator failed"))?;
    let aad = format!("auth-svc/{name}");
    let sealed = sealer.seal(fresh.as_ref(), aad.as_bytes()).await?;
    let stored = store.get_or_insert_secret(name, &sealed).await?;
    let key = zeroize::Zeroizing::new(sealer.open(&stored, aad.as_bytes()).await?);
    KeyedHasher::new(&key)
}

/// Runs auth-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = platform.config.section::<OAuthConfig>(SECTION)?.clone();
    let edge_cfg = platform
        .config
        .section::<sec_edge::EdgeConfig>(EDGE_SECTION)?
        .clone();
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let kv = host.open_kv().await?;
    let store = auth_store(&db);

    let tls = &platform.config.tls;
    let peer = |name: &str| -> anyhow::Result<tonic::transport::Channel> {
        channel(&platform.addrs(name)?.endpoint_url(tls.enabled()), tls)
    };
    let credential = platform.credential(NAME).map(str::to_owned);
    let crypto = peer("crypto")?;

    // Our secrets are sealed under our own crypto-svc key, made on first start.
    let key = {
        let (crypto, credential) = (crypto.clone(), credential.clone());
        until_ok(
            "ensuring the sealing key in crypto-svc",
            &shutdown,
            move || {
                let (crypto, credential) = (crypto.clone(), credential.clone());
                async move {
                    let mut client = CryptoServiceClient::with_interceptor(
                        crypto,
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
        .await
    };
    let Some(key) = key else {
        db.close().await;
        return Ok(());
    };
    let sealer = Envelope::new(crypto, credential.as_deref(), &key, CachePolicy::default())?;
    let keys = {
        let (store, sealer) = (store.clone(), &sealer);
        until_ok("opening the facade's keys", &shutdown, move || {
            let store = store.clone();
            async move {
                Ok((
                    own_key(store.as_ref(), sealer, "client-secret-key").await?,
                    own_key(store.as_ref(), sealer, "page-key").await?,
                ))
            }
        })
        .await
    };
    let Some((secrets, page_key)) = keys else {
        db.close().await;
        return Ok(());
    };

    let bearer = BearerToken::new(credential.as_deref())?;
    let server = Arc::new(engine::AuthServer {
        passwords: PasswordHasher::new(cfg.password_hash_concurrency),
        tokens: TokenServiceClient::with_interceptor(peer("token")?, bearer.clone()),
        sessions: SessionServiceClient::with_interceptor(peer("session")?, bearer),
        cfg: cfg.clone(),
        store,
        secrets,
        page_key,
        kv,
        clock: platform.clock.clone(),
        emit: {
            let p = platform.clone();
            Arc::new(move |e| p.emit(e))
        },
        metrics: engine::AuthMetrics::register(&mut host.registry),
        admin: Arc::clone(&platform.auth),
        client_cache: engine::ClientCache::new(cfg.client_cache_ttl_ms),
    });

    // Supervised: if the loop ends or panics, `/readyz` names it and it is restarted.
    let mut tasks = Supervisor::new(NAME, &mut host.registry, host.readiness.clone(), &shutdown);
    // Edge protection: the limiter on the platform's Redis (else in process), the IP and
    // geo rules, and the `edge-sync` task that applies other replicas' changes.
    let edge = sec_edge::EdgeRuntime::start(
        &edge_cfg,
        &platform.config,
        sec_edge::EdgeDeps {
            service: NAME,
            db: db.clone(),
            clock: platform.clock.clone(),
            emit: {
                let p = platform.clone();
                Arc::new(move |e| p.emit(e))
            },
        },
        &mut host.registry,
        &mut tasks,
        &shutdown,
    )
    .await?;
    {
        let (server, stop) = (server.clone(), shutdown.clone());
        let every = Duration::from_secs(cfg.cleanup_interval_seconds.max(1));
        tasks.spawn("cleanup", move || {
            let (server, stop) = (server.clone(), stop.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let keep_used = i64::try_from(server.cfg.code_ttl_seconds)
                        .unwrap_or(600)
                        .saturating_mul(10_000_000);
                    if let Err(e) = server
                        .store
                        .delete_expired(server.now_us(), keep_used)
                        .await
                    {
                        tracing::warn!(error = %e, "auth cleanup failed");
                    }
                }
            }
        });
    }

    let api = AuthServiceServer::new(grpc::AuthApi::new(server.clone()));
    let serve = Serve {
        routes: tonic::service::Routes::new(api).add_service(edge.grpc()),
        http: Some(facade::protected(
            facade::router(&platform, server.clone())?,
            &edge,
            server,
        )?),
    };
    let result = host.serve(serve, listeners, shutdown).await;
    tasks.stop().await;
    db.close().await;
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_table_covers_every_rpc() {
        sec_common::auth::check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, super::SPEC.access)
            .unwrap();
    }
}
