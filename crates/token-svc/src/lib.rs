//! token-svc: signing keys and rotation, JWT issue/validate/revoke, refresh families, JWKS.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::Migrations;
use sec_proto::token::v1::token_service_server::{TokenService, TokenServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "token";
pub const GRPC_NAMES: &[&str] = &["sec.token.v1.TokenService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/token/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/token/sqlite"),
};

struct TokenApi;

#[tonic::async_trait]
impl TokenService for TokenApi {}

/// Runs token-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let _kv = host.open_kv().await?;
    let api = TokenServiceServer::with_interceptor(TokenApi, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    db.close().await;
    result
}
