//! auth-svc: users, OAuth clients, roles and policies, authorization decisions, and the HTTP facade.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

pub mod facade;

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::Migrations;
use sec_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "auth";
pub const GRPC_NAMES: &[&str] = &["sec.auth.v1.AuthService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/auth/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/auth/sqlite"),
};

struct AuthApi;

#[tonic::async_trait]
impl AuthService for AuthApi {}

/// Runs auth-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let _kv = host.open_kv().await?;
    let api = AuthServiceServer::with_interceptor(AuthApi, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: Some(facade::router(&platform)?),
    };
    let result = host.serve(serve, listeners, shutdown).await;
    db.close().await;
    result
}
