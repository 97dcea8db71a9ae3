//! assess-svc: security checks, compliance mapping, reports.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::Migrations;
use sec_proto::assess::v1::assess_service_server::{AssessService, AssessServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "assess";
pub const GRPC_NAMES: &[&str] = &["sec.assess.v1.AssessService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/assess/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/assess/sqlite"),
};

struct AssessApi;

#[tonic::async_trait]
impl AssessService for AssessApi {}

/// Runs assess-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let api = AssessServiceServer::with_interceptor(AssessApi, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    db.close().await;
    result
}
