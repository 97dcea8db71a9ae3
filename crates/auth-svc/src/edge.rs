//! Edge protection on the facade ([`sec_edge`]): the two seams between the OAuth handlers
//! and the edge layer.
//!
//! - [`identify`], the outermost layer: a request whose `Authorization: Basic`
//!   credentials are a valid `client_secret_basic` client gets an [`EdgeIdentity`] with
//!   that client id and its `trusted` flag, so rate-limit rules keyed by `client_id` and
//!   the trusted-client bypass apply to it. Credentials that do not verify leave the
//!   request anonymous (per-IP rules still apply): an unverified client id must never
//!   spend another client's quota or claim its bypass.
//! - [`report_failures`], inside the edge layer: a response that carries an
//!   [`AuthFailure`] extension (invalid client authentication, a failed password login)
//!   is counted towards the caller's automatic block, at the address the edge layer
//!   resolved ([`ClientIp`]).
//!
//! Order on the router (`Router::layer` wraps what is already there, so the last added
//! runs first): handlers ← `report_failures` ← edge layer ← `identify`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use sec_edge::layer::ClientIp;
use sec_edge::{EdgeIdentity, EdgeRuntime, FailureReason};

use crate::engine::AuthServer;
use crate::oauth::client_auth::decode_basic;
use crate::store::AuthMethod;

/// A response extension set by a handler whose caller failed to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailure(pub FailureReason);

/// Marks `resp` as an authentication failure of kind `why`.
pub fn mark_failure(resp: &mut Response, why: FailureReason) {
    resp.extensions_mut().insert(AuthFailure(why));
}

/// The outermost layer: who the client is, when it proves it with HTTP Basic.
pub async fn identify(
    State(server): State<Arc<AuthServer>>,
    mut req: Request,
    next: Next,
) -> Response {
    let credentials = basic_credentials(&server, &req);
    if let Some((id, secret)) = credentials
        && let Some(identity) = verified_identity(&server, &id, &secret).await
    {
        req.extensions_mut().insert(identity);
    }
    next.run(req).await
}

/// The client id and secret of the one `Authorization: Basic` header, if well-formed.
fn basic_credentials(server: &AuthServer, req: &Request) -> Option<(String, String)> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    decode_basic(value, server.cfg.max_param_bytes)
}

async fn verified_identity(server: &AuthServer, id: &str, secret: &str) -> Option<EdgeIdentity> {
    let client = server.find_client(id).await.ok()??;
    if client.settings.auth_method != AuthMethod::ClientSecretBasic
        || !server.check_client_secret(&client, secret)
    {
        return None;
    }
    Some(EdgeIdentity {
        trusted: client.settings.trusted,
        client_id: Some(client.client_id),
        user: None,
    })
}

/// Inside the edge layer: feeds marked failures to the automatic block.
pub async fn report_failures(
    State(edge): State<EdgeRuntime>,
    req: Request,
    next: Next,
) -> Response {
    let ip = req.extensions().get::<ClientIp>().map(|c| c.0);
    let resp = next.run(req).await;
    if let (Some(ip), Some(AuthFailure(why))) = (ip, resp.extensions().get::<AuthFailure>())
        && let Err(e) = edge.record_failure(ip, *why).await
    {
        // The failure is still counted locally; only the shared block write failed.
        tracing::warn!(error = %e, reason = why.as_str(), "recording an auto-block failed");
    }
    resp
}
