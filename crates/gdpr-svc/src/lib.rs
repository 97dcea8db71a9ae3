//! gdpr-svc: consent, privacy notices, access/export/erasure requests, anonymization, retention.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::Migrations;
use sec_proto::gdpr::v1::gdpr_service_server::{GdprService, GdprServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "gdpr";
pub const GRPC_NAMES: &[&str] = &["sec.gdpr.v1.GdprService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/gdpr/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/gdpr/sqlite"),
};

struct GdprApi;

#[tonic::async_trait]
impl GdprService for GdprApi {}

/// Runs gdpr-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let api = GdprServiceServer::with_interceptor(GdprApi, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    db.close().await;
    result
}
