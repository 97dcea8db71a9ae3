//! audit-svc: persists every `SecurityEvent` from the bus (NATS JetStream or in-process)
//! into its `security_events` table and serves them over `sec.audit.v1.AuditService`.
//!
//! Layout (the model for every service): `store/` holds the storage trait, one module per
//! backend and the contract suite; `grpc.rs` the API; `pipeline.rs` the background work;
//! `run` wires them onto a [`ServiceHost`].

pub mod alerts;
pub mod chain;
pub mod checkpointer;
pub mod config;
pub mod grpc;
pub mod pipeline;
pub mod reports;
pub mod retention;
pub mod sensitive;
pub mod signer;
pub mod store;
pub mod verify;

use anyhow::Context as _;
use std::sync::Arc;

pub use config::AuditConfig;
use sec_common::auth::{Access, AccessTable};
use sec_common::clock::SharedClock;
use sec_common::config::ConfigSection;
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::{Db, Migrations};
use sec_common::supervise::Supervisor;
use sec_proto::audit::v1::audit_service_server::AuditServiceServer;
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "audit";

/// The audit trail names every actor and subject on the platform: admin only.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.audit.v1.AuditService",
    methods: &[
        ("ListEvents", Access::Admin),
        ("VerifyChain", Access::Admin),
        ("GetChainHead", Access::Admin),
        ("SearchEvents", Access::Admin),
        ("ExportEvents", Access::Admin),
        ("GetReport", Access::Admin),
        // Retention and legal holds (issue 19 item 6).
        ("RunRetention", Access::Admin),
        ("CreateLegalHold", Access::Admin),
        ("ReleaseLegalHold", Access::Admin),
        ("ListLegalHolds", Access::Admin),
        // Alerts and monitoring (issue 19 item 7).
        ("ListAlerts", Access::Admin),
        ("AcknowledgeAlert", Access::Admin),
        ("GetMonitor", Access::Admin),
    ],
};

/// audit-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50054, 9104),
    http_facade: false,
    access: &[ACCESS],
    // Checkpoints are signed, and sensitive fields HMAC'd, with audit-svc's own
    // crypto-svc keys.
    calls: &["crypto"],
    config: &[ConfigSection::of::<AuditConfig>()],
    preflight: no_preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/audit/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/audit/sqlite"),
};

/// The store for the configured backend; `clock` stamps each event's receipt time.
pub fn event_store(db: &Db, clock: SharedClock) -> Arc<dyn store::AuditStore> {
    match db {
        Db::Postgres(p) => Arc::new(store::postgres::PgEventStore::new(p.clone(), clock)),
        Db::Sqlite(p) => Arc::new(store::sqlite::SqliteEventStore::new(p.clone(), clock)),
    }
}

/// The dead-letter table for the configured backend.
pub fn dead_letter_store(
    db: &Db,
    clock: SharedClock,
) -> Arc<dyn store::dead_letter::DeadLetterStore> {
    match db {
        Db::Postgres(p) => Arc::new(store::dead_letter::PgDeadLetters::new(p.clone(), clock)),
        Db::Sqlite(p) => Arc::new(store::dead_letter::SqliteDeadLetters::new(p.clone(), clock)),
    }
}

/// A channel to crypto-svc (checkpoint signatures, sensitive fields' HMACs) and
/// audit-svc's credential for it.
fn crypto_channel(
    platform: &Platform,
) -> anyhow::Result<(tonic::transport::Channel, Option<String>)> {
    let url = platform
        .addrs("crypto")?
        .endpoint_url(platform.config.tls.enabled());
    let channel = sec_common::grpc::channel(&url, &platform.config.tls)?;
    Ok((channel, platform.credential(NAME).map(str::to_owned)))
}

/// The alert tables for the configured backend.
pub fn alert_store(db: &Db) -> Arc<dyn alerts::store::AlertStore> {
    match db {
        Db::Postgres(p) => Arc::new(alerts::store::PgAlerts::new(p.clone())),
        Db::Sqlite(p) => Arc::new(alerts::store::SqliteAlerts::new(p.clone())),
    }
}

/// Runs audit-svc until `shutdown`, then stops serving and drains the bus into the store.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = platform.config.section::<AuditConfig>(NAME)?.clone();
    // Rules and webhook secrets first: a bad rule or an unreadable secret stops the start.
    let alert_rules = cfg
        .alerts
        .rules()
        .map_err(|(k, m)| anyhow::anyhow!("audit.alerts.{k}: {m}"))?;
    let webhooks = cfg
        .alerts
        .webhooks
        .iter()
        .map(alerts::webhook::Webhook::load)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let store = event_store(&db, platform.clock.clone());
    let chained = store.chain_legacy_rows().await?;
    if chained > 0 {
        tracing::info!(
            events = chained,
            "chained the events stored before the hash chain existed"
        );
    }
    let instance = host
        .instance_id()
        .context("open_db reads the installation identity")?;
    // One channel to crypto-svc for checkpoint signatures and sensitive fields' HMACs.
    let crypto = crypto_channel(&platform)?;
    let chain = checkpointer::Checkpointer::new(
        store.clone(),
        format!("sec-audit/{instance}"),
        std::time::Duration::from_secs(cfg.checkpoint_interval_seconds),
        &platform,
        crypto.clone(),
        &mut host.registry,
    );
    let retention = retention::Retention::new(
        store.clone(),
        chain.clone(),
        platform.clock.clone(),
        cfg.retention.clone(),
        &mut host.registry,
    );
    // No partition for this month: nothing could be stored. Fail the start loudly.
    retention.ensure_partitions().await?;
    let mut tasks = Supervisor::new(NAME, &mut host.registry, host.readiness.clone(), &shutdown);
    {
        let (chain, stop) = (chain.clone(), shutdown.clone());
        tasks.spawn("checkpoint", move || {
            let (chain, stop) = (chain.clone(), stop.clone());
            async move { chain.run(stop).await }
        });
    }
    {
        let (retention, stop) = (retention.clone(), shutdown.clone());
        tasks.spawn("retention", move || {
            let (retention, stop) = (retention.clone(), stop.clone());
            async move { retention.task(stop).await }
        });
    }

    let sensitive = {
        let (channel, credential) = crypto;
        sensitive::Sensitive::new(
            &cfg.sensitive_fields,
            sensitive::CryptoHasher::new(channel, credential),
        )
    };
    let alert_metrics = alerts::engine::AlertMetrics::register(&mut host.registry, &alert_rules);
    let alert_store = alert_store(&db);
    let engine = Arc::new(alerts::engine::AlertEngine::new(
        alert_rules,
        webhooks.iter().map(|w| w.name.clone()).collect(),
        alert_store.clone(),
        platform.events.clone(),
        platform.clock.clone(),
        alert_metrics.clone(),
    ));
    engine.refresh_open().await;
    {
        let deliverer = Arc::new(alerts::webhook::Deliverer::new(
            webhooks,
            alerts::webhook::http_client()?,
            alert_store.clone(),
            platform.clock.clone(),
            alert_metrics,
            engine.wake.clone(),
        ));
        let stop = shutdown.clone();
        tasks.spawn("webhooks", move || {
            let (deliverer, stop) = (deliverer.clone(), stop.clone());
            async move { deliverer.run(stop).await }
        });
    }

    let metrics = pipeline::IngestMetrics::register(&mut host.registry);
    let dead_letters = dead_letter_store(&db, platform.clock.clone());
    let ingest_stop = CancellationToken::new();
    let ingest = tokio::spawn(pipeline::run(
        pipeline::Ingest {
            bus: platform.events.clone(),
            store: store.clone(),
            dead_letters: dead_letters.clone(),
            metrics: metrics.clone(),
            clock: platform.clock.clone(),
            limits: pipeline::Limits {
                subject_prefix: platform.config.events.subject_prefix.clone(),
                max_details_bytes: cfg.max_details_bytes,
            },
            sensitive: sensitive.clone(),
            alerts: Some(engine.clone()),
        },
        ingest_stop.clone(),
    ));

    let api = AuditServiceServer::new(grpc::AuditApi {
        store: store.clone(),
        chain: chain.clone(),
        sensitive,
        incidents: Some(Arc::new(reports::AlertIncidents {
            alerts: alert_store.clone(),
            events: store.clone(),
        })),
        retention: retention.clone(),
        events: platform.events.clone(),
        clock: platform.clock.clone(),
        monitor: alerts::api::Monitor {
            engine,
            dead_letters,
            ingest: metrics,
            clock: platform.clock.clone(),
        },
    });
    let serve = Serve {
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let served = host.serve(serve, listeners, shutdown).await;

    // Events emitted while the other services stopped are still on the bus: flush the
    // spool, then drain it into the store before closing.
    platform
        .events
        .flush(std::time::Duration::from_secs(
            platform.config.shutdown.grace_seconds,
        ))
        .await;
    ingest_stop.cancel();
    let _ = ingest.await;
    tasks.stop().await;
    // Sign what was stored last, so the next start verifies it from a checkpoint.
    chain.final_checkpoint().await;
    db.close().await;
    served
}

/// A migrated SQLite audit database in a temporary directory (which the guard keeps).
#[cfg(test)]
pub(crate) async fn test_sqlite() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let pool = sec_common::storage::connect_sqlite(&dir.path().join("audit.db"), 4)
        .await
        .unwrap();
    MIGRATIONS.sqlite.run(&pool).await.unwrap();
    (dir, Db::Sqlite(pool))
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_table_covers_every_rpc() {
        sec_common::auth::check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, super::SPEC.access)
            .unwrap();
    }
}
