//! session-svc: server-side sessions in Redis (or in process on the embedded default):
//! create, get, touch, rotate, revoke, log out everywhere, list, statistics, backup and
//! restore.
//!
//! Layout (the crypto-svc one): `store/` (trait, Redis, memory, contract suite),
//! `engine.rs` (the logic, no gRPC), `grpc.rs` (proto mapping), `config.rs` (its
//! `[session]` section), and below: [`SPEC`] and `run`.

pub mod config;
pub mod engine;
pub mod grpc;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use sec_common::admin::ReadyCheck;
use sec_common::auth::{Access, AccessTable};
use sec_common::config::{Config, ConfigSection};
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::Migrations;
use sec_common::supervise::Supervisor;
use sec_proto::session::v1::session_service_server::SessionServiceServer;
use tokio_util::sync::CancellationToken;

pub use config::SessionConfig;

pub const NAME: &str = "session";

/// auth-svc (a service) runs the session life cycle; statistics and backup are the admin's.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.session.v1.SessionService",
    methods: &[
        ("Create", Access::Service),
        ("Get", Access::Service),
        ("Touch", Access::Service),
        ("Rotate", Access::Service),
        ("Revoke", Access::Service),
        ("RevokeAllForUser", Access::Service),
        ("ListForUser", Access::Service),
        ("SessionStats", Access::Admin),
        ("ExportSessions", Access::Admin),
        ("ImportSessions", Access::Admin),
    ],
};

/// session-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50053, 9103),
    http_facade: false,
    access: &[ACCESS],
    calls: &[],
    config: &[ConfigSection::of::<SessionConfig>()],
    preflight: no_preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/session/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/session/sqlite"),
};

/// The session store for the platform's storage config: Redis (`storage.redis_url`,
/// Sentinel URLs too) under `<storage.redis_key_prefix>session:`, or in process.
pub fn session_store(
    config: &Config,
    cfg: &SessionConfig,
) -> anyhow::Result<Arc<dyn store::SessionStore>> {
    match sec_common::storage::redis_for(config, NAME)? {
        Some((pool, prefix)) => Ok(Arc::new(
            store::redis::RedisSessionStore::new(pool, prefix)
                .with_wait(cfg.redis_wait_replicas, cfg.redis_wait_timeout_ms)
                .with_timeout(Duration::from_millis(cfg.redis_timeout_ms)),
        )),
        None => Ok(Arc::new(store::memory::MemorySessionStore::new())),
    }
}

/// Readiness follows the store: false while Redis is unreachable, true again once it is
/// back (the pool reconnects by itself).
struct StoreReady(Arc<engine::Engine>);

#[async_trait::async_trait]
impl ReadyCheck for StoreReady {
    async fn check(&self) -> Result<(), String> {
        self.0.ping().await
    }
}

/// Runs session-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = platform.config.section::<SessionConfig>(NAME)?.clone();
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let store = session_store(&platform.config, &cfg)?;
    let metrics = engine::SessionMetrics::register(&mut host.registry);
    let emitter = platform.clone();
    let gauge_every = Duration::from_secs(cfg.gauge_refresh_seconds);
    let engine = Arc::new(engine::Engine::new(
        store,
        platform.clock.clone(),
        Arc::new(move |e| emitter.emit(e)),
        cfg,
        metrics,
    ));
    // A Redis that is down at start is not fatal: readiness (and sec_session_store_up)
    // say so until it is back.
    if let Err(e) = engine.ping().await {
        tracing::warn!(error = %e, "session store not reachable at start");
    }
    host.readiness
        .add_check("session_store", Arc::new(StoreReady(engine.clone())));

    let mut tasks = Supervisor::new(NAME, &mut host.registry, host.readiness.clone(), &shutdown);
    {
        let (engine, stop) = (engine.clone(), shutdown.clone());
        tasks.spawn("gauges", move || {
            gauge_loop(engine.clone(), gauge_every, stop.clone())
        });
    }
    let api = SessionServiceServer::new(grpc::SessionApi {
        engine: engine.clone(),
    });
    let serve = Serve {
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    tasks.stop().await;
    db.close().await;
    result
}

/// Recomputes the active-session gauges every `every`, and pings the store so that
/// `sec_session_store_up` is current even when nothing polls readiness.
async fn gauge_loop(engine: Arc<engine::Engine>, every: Duration, stop: CancellationToken) {
    loop {
        if let Err(e) = engine.ping().await {
            tracing::warn!(error = %e, "session store not reachable");
        } else if let Err(e) = engine.refresh_gauges().await {
            tracing::warn!(error = %e.error, "refreshing session gauges failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
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
