//! token-svc: signing keys and rotation, JWT issue/validate/revoke, refresh families, JWKS.
//!
//! The plumbing is real (storage, migrations, health, admin endpoints, events, drain);
//! the RPCs arrive with this service's own issue.

pub mod config;
pub mod engine;
pub mod keys;
pub mod store;

use sec_common::auth::{Access, AccessTable};
use sec_common::service::{Listeners, Platform, Serve, ServiceHost};
use sec_common::spec::{ServiceSpec, no_preflight};
use sec_common::storage::Migrations;
use sec_proto::token::v1 as pb;
use sec_proto::token::v1::token_service_server::{TokenService, TokenServiceServer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub const NAME: &str = "token";

/// Every RPC of the service and who may call it; a method missing here is refused.
pub const ACCESS: AccessTable = AccessTable {
    service: "sec.token.v1.TokenService",
    methods: &[
        ("GetJwks", Access::Anyone),
        ("IssueTokens", Access::Service),
        ("RefreshTokens", Access::Service),
        ("ValidateToken", Access::Service),
        ("IntrospectRefreshToken", Access::Service),
        ("ListRevocations", Access::Service),
        ("RevokeToken", Access::Service),
        ("ListSigningKeys", Access::Admin),
        ("RotateSigningKey", Access::Admin),
        ("RevokeSigningKey", Access::Admin),
        ("TokenStats", Access::Admin),
    ],
};

/// token-svc as every launcher sees it.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: NAME,
    default_ports: (50052, 9102),
    http_facade: false,
    access: &[ACCESS],
    calls: &[],
    config: None,
    preflight: no_preflight,
    run: |p, l, s| Box::pin(run(p, l, s)),
};

pub static MIGRATIONS: Migrations = Migrations {
    postgres: &sqlx::migrate!("../../migrations/token/postgres"),
    sqlite: &sqlx::migrate!("../../migrations/token/sqlite"),
};

struct TokenApi;

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn get_jwks(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        Err(Status::unimplemented("GetJwks"))
    }
    async fn issue_tokens(
        &self,
        _: Request<pb::IssueTokensRequest>,
    ) -> Result<Response<pb::IssueTokensResponse>, Status> {
        Err(Status::unimplemented("IssueTokens"))
    }
    async fn refresh_tokens(
        &self,
        _: Request<pb::RefreshTokensRequest>,
    ) -> Result<Response<pb::RefreshTokensResponse>, Status> {
        Err(Status::unimplemented("RefreshTokens"))
    }
    async fn validate_token(
        &self,
        _: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        Err(Status::unimplemented("ValidateToken"))
    }
    async fn introspect_refresh_token(
        &self,
        _: Request<pb::IntrospectRefreshTokenRequest>,
    ) -> Result<Response<pb::IntrospectRefreshTokenResponse>, Status> {
        Err(Status::unimplemented("IntrospectRefreshToken"))
    }
    async fn revoke_token(
        &self,
        _: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        Err(Status::unimplemented("RevokeToken"))
    }
    async fn list_revocations(
        &self,
        _: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        Err(Status::unimplemented("ListRevocations"))
    }
    async fn list_signing_keys(
        &self,
        _: Request<pb::ListSigningKeysRequest>,
    ) -> Result<Response<pb::ListSigningKeysResponse>, Status> {
        Err(Status::unimplemented("ListSigningKeys"))
    }
    async fn rotate_signing_key(
        &self,
        _: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        Err(Status::unimplemented("RotateSigningKey"))
    }
    async fn revoke_signing_key(
        &self,
        _: Request<pb::RevokeSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        Err(Status::unimplemented("RevokeSigningKey"))
    }
    async fn token_stats(
        &self,
        _: Request<pb::TokenStatsRequest>,
    ) -> Result<Response<pb::TokenStatsResponse>, Status> {
        Err(Status::unimplemented("TokenStats"))
    }
}

/// Runs token-svc until `shutdown`.
pub async fn run(
    platform: Platform,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut host = ServiceHost::new(&SPEC, &platform);
    let db = host.open_db(&MIGRATIONS).await?;
    let _kv = host.open_kv().await?;
    let api = TokenServiceServer::new(TokenApi);
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
