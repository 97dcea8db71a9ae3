//! session-svc: sessions in Redis: create, get, touch, revoke, list.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::Migrations;
use sec_proto::session::v1::session_service_server::{SessionService, SessionServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "session";
pub const GRPC_NAMES: &[&str] = &["sec.session.v1.SessionService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/session/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/session/sqlite"),
};

struct SessionApi;

#[tonic::async_trait]
impl SessionService for SessionApi {}

/// Runs session-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let _kv = host.open_kv().await?;
    let api = SessionServiceServer::with_interceptor(SessionApi, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    db.close().await;
    result
}
