//! gdpr-svc: consent, privacy notices, access/export/erasure requests, anonymization, retention.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

use sec_common::auth::AccessTable;
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::Migrations;
use sec_proto::gdpr::v1::gdpr_service_server::{GdprService, GdprServiceServer};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "gdpr";

/// Every RPC of the service and who may call it; a method missing here is refused.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.gdpr.v1.GdprService",
    methods: &[],
};

/// gdpr-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50056, 9106),
    http_facade: false,
    access: &[ACCESS],
    calls: &[],
    config: &[],
    preflight: no_preflight,
    migrations: Some(&MIGRATIONS),
    run: |p, l, s| Box::pin(run(p, l, s)),
};

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
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let api = GdprServiceServer::new(GdprApi);
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
