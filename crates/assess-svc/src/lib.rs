//! assess-svc: security checks, compliance mapping, reports.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::auth::AccessTable;
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::Migrations;
use sec_proto::assess::v1::assess_service_server::{AssessService, AssessServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "assess";

/// Every RPC of the service and who may call it; a method missing here is refused.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.assess.v1.AssessService",
    methods: &[],
};

/// assess-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50057, 9107),
    http_facade: false,
    access: &[ACCESS],
    calls: &[],
    config: &[],
    preflight: no_preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

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
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let api = AssessServiceServer::new(AssessApi);
    let serve = Serve {
        routes: tonic::service::Routes::new(api),
        http: None,
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
