//! auth-svc: users, OAuth clients, roles and policies, authorization decisions, and the HTTP facade.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

pub mod facade;

use sec_common::auth::AccessTable;
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::Migrations;
use sec_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "auth";

/// Every RPC of the service and who may call it; a method missing here is refused.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.auth.v1.AuthService",
    methods: &[],
};

/// auth-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50051, 9101),
    http_facade: true,
    access: &[ACCESS],
    calls: &["crypto"],
    config: None,
    preflight: no_preflight,
    run: |p, l, s| Box::pin(run(p, l, s)),
};

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
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let _kv = host.open_kv().await?;
    let api = AuthServiceServer::new(AuthApi);
    let serve = Serve {
        routes: tonic::service::Routes::new(api),
        http: Some(facade::router(&platform)?),
    };
    let result = host.serve(serve, listeners, shutdown).await;
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
