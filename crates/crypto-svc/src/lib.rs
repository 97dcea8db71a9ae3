//! crypto-svc: key management: named keys, versions, rotation, encryption, signing, data keys, backup.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::storage::Migrations;
use sec_proto::crypto::v1::crypto_service_server::{CryptoService, CryptoServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "crypto";
pub const GRPC_NAMES: &[&str] = &["sec.crypto.v1.CryptoService"];

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/crypto/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/crypto/sqlite"),
};

struct CryptoApi;

#[tonic::async_trait]
impl CryptoService for CryptoApi {}

/// Runs crypto-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(NAME, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let api = CryptoServiceServer::with_interceptor(CryptoApi, platform.auth.interceptor());
    let serve = Serve {
        grpc_names: GRPC_NAMES,
        routes: tonic::service::Routes::new(api),
        http: None,
    };
    let result = host.serve(serve, listeners, shutdown).await;
    db.close().await;
    result
}
