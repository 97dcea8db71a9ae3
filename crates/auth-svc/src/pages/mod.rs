//! The browser-facing endpoints: `/authorize` (with `prompt`, `max_age`, `response_mode`
//! `query` and `form_post`, RFC 9207 `iss`), the login and consent pages, `/logout`
//! (RP-initiated), with their cookies, CSRF tokens and security headers.
//!
//! - `authorize.rs`: request validation (redirect-unsafe errors as pages, the rest to the
//!   client) and the session decision;
//! - `login.rs`, `consent.rs`: the two forms; `logout.rs`: RP-Initiated Logout;
//! - `flow.rs`: the pending request, session-svc calls, issuing the code, answering the
//!   client (`query` redirect or `form_post` page);
//! - `html.rs` (escaping, page shell, security headers), `cookies.rs`, `csrf.rs`.

pub mod authorize;
pub mod consent;
pub mod cookies;
pub mod csrf;
pub mod flow;
pub mod html;
pub mod login;
pub mod logout;

use std::sync::Arc;

use axum::Router;

use crate::engine::AuthServer;

/// The page routes.
pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new()
        .merge(authorize::routes())
        .merge(login::routes())
        .merge(consent::routes())
        .merge(logout::routes())
}
