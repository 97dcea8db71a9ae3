//! The OAuth 2.0 / OIDC protocol endpoints on the facade.
//!
//! - `params.rs`, `error.rs`: strict parameter parsing and RFC error responses (shared).
//! - `client_auth.rs`: client authentication (basic, post, private_key_jwt, none).
//! - `token.rs`: `/token` (authorization_code + PKCE, client_credentials, refresh_token)
//!   and `POST /security/auth`.
//! - `revoke.rs` (RFC 7009), `introspect.rs` (RFC 7662), `userinfo.rs` (OIDC Core §5.3).
//! - `discovery.rs` (OIDC Discovery, RFC 8414), `jwks.rs`, `register.rs` (RFC 7591/7592),
//!   `openapi.rs` (`/openapi.json`, `/security`).

pub mod client_auth;
pub mod discovery;
pub mod error;
pub mod introspect;
pub mod jwks;
pub mod openapi;
pub mod params;
pub mod register;
pub mod revoke;
pub mod token;
pub mod userinfo;

use std::sync::Arc;

use axum::Router;

use crate::engine::AuthServer;

/// The protocol routes.
pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new()
        .merge(token::routes())
        .merge(revoke::routes())
        .merge(introspect::routes())
        .merge(userinfo::routes())
        .merge(discovery::routes())
        .merge(jwks::routes())
        .merge(register::routes())
        .merge(openapi::routes())
}
