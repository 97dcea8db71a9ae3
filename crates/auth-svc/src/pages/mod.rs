//! The browser-facing endpoints: `/authorize` (with `prompt`, `max_age`, `response_mode`
//! `query` and `form_post`, RFC 9207 `iss`), the login and consent pages, `/logout`
//! (RP-initiated), with their cookies, CSRF tokens and security headers.

pub mod authorize;
pub mod logout;

use std::sync::Arc;

use axum::Router;

use crate::engine::AuthServer;

/// The page routes.
pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new()
        .merge(authorize::routes())
        .merge(logout::routes())
}
