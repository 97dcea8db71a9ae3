//! `GET`/`POST /logout`: OpenID Connect RP-Initiated Logout 1.0.
//!
//! With a valid `id_token_hint` (verified by token-svc as an ID token whose audience is
//! the client) the browser session is ended at once. Without one, a bare link could log
//! anyone out (logout CSRF), so the user confirms on a page whose form is CSRF-protected.
//! `post_logout_redirect_uri` is followed only when it is registered, exactly, for the
//! client the hint (or `client_id`) names; otherwise an error page, never a redirect.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::get;
use base64::Engine as _;
use sec_proto::session::v1::{GetRequest, RevokeRequest, revoke_request};
use sec_proto::token::v1::{TokenKind, ValidateTokenRequest};
use serde::{Deserialize, Serialize};

use super::cookies::{self, Cookie};
use super::csrf::{self, Purpose};
use super::flow::{self, Browser, SetCookies};
use super::html::{self, escape, hidden};
use crate::engine::AuthServer;
use crate::oauth::params::Params;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/logout", get(logout_get).post(logout_post))
}

/// A logout waiting for the user's confirmation (kept server-side, like a pending
/// authorization request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingLogout {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    state: Option<String>,
}

fn pending_key(id: &str) -> String {
    format!("logout:{id}")
}

/// RP-initiated logout, parameters in the query.
#[utoipa::path(
    get,
    path = "/logout",
    tag = "oidc",
    params(
        ("id_token_hint" = Option<String>, Query, description = "An ID token issued to the client"),
        ("client_id" = Option<String>, Query, description = "Must match the hint's audience"),
        ("post_logout_redirect_uri" = Option<String>, Query, description = "Registered for the client, exactly"),
        ("state" = Option<String>, Query, description = "Echoed to post_logout_redirect_uri"),
    ),
    responses(
        (status = 200, description = "Signed-out page, or a confirmation page without a valid hint", content_type = "text/html"),
        (status = 303, description = "To the registered post_logout_redirect_uri, with `state`"),
        (status = 400, description = "Unregistered post_logout_redirect_uri or mismatched client: an error page", content_type = "text/html"),
    )
)]
pub async fn logout_get(State(server): State<Arc<AuthServer>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let raw = parts.uri.query().unwrap_or("");
    match Params::parse(raw.as_bytes(), server.cfg.max_param_bytes) {
        Ok(p) => start(&server, &parts, &p).await,
        Err(e) => refused(&server, &e.description),
    }
}

/// RP-initiated logout with a form body, and the confirmation form's submission
/// (`logout` id and `csrf`).
#[utoipa::path(
    post,
    path = "/logout",
    tag = "oidc",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
                 description = "The parameters of `GET /logout`, or `logout` and `csrf` from the confirmation page"),
    responses(
        (status = 200, description = "Signed-out page, or a confirmation page", content_type = "text/html"),
        (status = 303, description = "To the registered post_logout_redirect_uri, with `state`"),
        (status = 400, description = "Invalid request or expired confirmation", content_type = "text/html"),
        (status = 403, description = "Missing or invalid CSRF token", content_type = "text/html"),
    )
)]
pub async fn logout_post(State(server): State<Arc<AuthServer>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match super::authorize::read_body(&server, body).await {
        Ok(b) => b,
        Err(r) => {
            server.metrics.request("logout", "too_large");
            return r;
        }
    };
    let form = match Params::from_form(&parts.headers, &body, server.cfg.max_param_bytes) {
        Ok(f) => f,
        Err(e) => return refused(&server, &e.description),
    };
    if form.contains("logout") {
        confirm(&server, &parts, &form).await
    } else {
        start(&server, &parts, &form).await
    }
}

fn refused(server: &AuthServer, message: &str) -> Response {
    server.metrics.request("logout", "bad_request");
    html::error_page(StatusCode::BAD_REQUEST, "Invalid logout request", message)
}

/// What a verified `id_token_hint` says.
struct Hint {
    client_id: String,
    subject: String,
}

/// The `aud` of a JWT, read without verification: only to ask token-svc to verify the
/// token for that audience.
fn unverified_audience(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match v.get("aud")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => a.first()?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Verifies the hint at token-svc. `Ok(None)`: not a valid ID token (expired, forged,
/// another issuer...).
async fn verify_hint(server: &AuthServer, token: &str) -> Result<Option<Hint>, Response> {
    let Some(audience) = unverified_audience(token) else {
        return Ok(None);
    };
    let r = server
        .tokens
        .clone()
        .validate_token(ValidateTokenRequest {
            token: token.to_owned(),
            kind: TokenKind::Id as i32,
            audience: audience.clone(),
        })
        .await
        .map_err(|s| flow::unavailable("validating an id_token_hint", &s))?
        .into_inner();
    if !r.valid {
        return Ok(None);
    }
    let claims: serde_json::Value = serde_json::from_str(&r.claims_json).unwrap_or_default();
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(s)) => *s == audience,
        Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(&audience)),
        _ => false,
    };
    if !aud_ok {
        return Ok(None);
    }
    Ok(Some(Hint {
        client_id: audience,
        subject: r.subject,
    }))
}

async fn start(server: &AuthServer, parts: &Parts, p: &Params) -> Response {
    let hint = match p.get("id_token_hint") {
        Some(t) => match verify_hint(server, t).await {
            Ok(h) => h,
            Err(r) => return r,
        },
        None => None,
    };
    if let (Some(h), Some(c)) = (&hint, p.get("client_id")) {
        if h.client_id != c {
            return refused(server, "client_id does not match the ID token.");
        }
    }
    let client_id = hint
        .as_ref()
        .map(|h| h.client_id.clone())
        .or_else(|| p.get("client_id").map(str::to_owned));
    let redirect_uri = match p.get("post_logout_redirect_uri") {
        None => None,
        Some(uri) => {
            let Some(cid) = &client_id else {
                return refused(
                    server,
                    "A post-logout redirect needs a valid id_token_hint or client_id.",
                );
            };
            let client = match server.find_client(cid).await {
                Ok(Some(c)) => c,
                Ok(None) => return refused(server, "The client is not known."),
                Err(e) => return flow::unavailable("looking up the client", &e),
            };
            if !client
                .settings
                .post_logout_redirect_uris
                .iter()
                .any(|r| r == uri)
            {
                return refused(
                    server,
                    "The post-logout redirect URI is not registered for this client.",
                );
            }
            Some(uri.to_owned())
        }
    };
    let pending = PendingLogout {
        client_id,
        redirect_uri,
        state: p.get("state").map(str::to_owned),
    };
    let browser = Browser::from_parts(server, parts);
    if let Some(h) = &hint {
        // The hint's user must be the browser's (or there is no session left): else ask.
        let same_user = match &browser.session_id {
            None => true,
            Some(id) => match session_user(server, &browser, id).await {
                Ok(u) => u.is_none_or(|u| u == h.subject),
                Err(r) => return r,
            },
        };
        if same_user {
            return finish(server, &browser, &pending).await;
        }
    }
    confirmation_page(server, &browser, &pending).await
}

/// The user of the browser's session, if it is live.
async fn session_user(
    server: &AuthServer,
    browser: &Browser,
    id: &str,
) -> Result<Option<String>, Response> {
    let r = server
        .sessions
        .clone()
        .get(GetRequest {
            session_id: id.to_owned(),
            source_ip: browser.ip.clone(),
            user_agent: browser.user_agent.clone(),
        })
        .await;
    match r {
        Ok(r) => Ok(r.into_inner().session.map(|s| s.user_id)),
        Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => {
            Err(flow::unavailable("reading the browser session", &s))
        }
        Err(_) => Ok(None),
    }
}

async fn confirmation_page(
    server: &AuthServer,
    browser: &Browser,
    pending: &PendingLogout,
) -> Response {
    let id = match AuthServer::random_value() {
        Ok(id) => id,
        Err(e) => return flow::internal("logout id", &e),
    };
    let json = match serde_json::to_vec(pending) {
        Ok(j) => j,
        Err(e) => return flow::internal("encoding a pending logout", &e),
    };
    let ttl = Duration::from_secs(server.cfg.login_ttl_seconds);
    if let Err(e) = server.kv.set(&pending_key(&id), &json, Some(ttl)).await {
        return flow::unavailable("storing a pending logout", &e);
    }
    let mut out = SetCookies::default();
    let secret = match flow::csrf_secret(server, browser, &mut out) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let token = csrf::token(&server.page_key, Purpose::Logout, &id, &secret);
    server.metrics.request("logout", "confirm_page");
    out.apply(html::page_response(
        StatusCode::OK,
        html::document("Sign out?", &render_confirmation(&id, &token), ""),
        html::DEFAULT_CSP,
    ))
}

/// The body of the confirmation page.
fn render_confirmation(id: &str, csrf_token: &str) -> String {
    format!(
        "<p>Do you want to sign out?</p><form method=\"post\" action=\"/logout\">{}{}\
<button type=\"submit\">Sign out</button></form>",
        hidden("logout", id),
        hidden("csrf", csrf_token)
    )
}

/// The confirmation form's submission.
async fn confirm(server: &AuthServer, parts: &Parts, form: &Params) -> Response {
    let browser = Browser::from_parts(server, parts);
    let id = form.get("logout").unwrap_or_default();
    let ok = browser.csrf.as_deref().is_some_and(|secret| {
        csrf::verify(
            &server.page_key,
            Purpose::Logout,
            id,
            secret,
            form.get("csrf").unwrap_or_default(),
        )
    });
    if !ok {
        server.metrics.request("logout", "csrf");
        return flow::csrf_page();
    }
    let raw = match server.kv.get(&pending_key(id)).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            server.metrics.request("logout", "expired");
            return expired();
        }
        Err(e) => return flow::unavailable("reading a pending logout", &e),
    };
    match server.kv.delete(&pending_key(id)).await {
        Ok(true) => {}
        Ok(false) => {
            server.metrics.request("logout", "expired");
            return expired();
        }
        Err(e) => return flow::unavailable("consuming a pending logout", &e),
    }
    let pending: PendingLogout = match serde_json::from_slice(&raw) {
        Ok(p) => p,
        Err(e) => return flow::internal("decoding a pending logout", &e),
    };
    finish(server, &browser, &pending).await
}

fn expired() -> Response {
    html::error_page(
        StatusCode::BAD_REQUEST,
        "Sign-out request expired",
        "This sign-out request has expired or was already used.",
    )
}

/// Ends the browser session, clears the cookie, and redirects or shows the signed-out
/// page.
async fn finish(server: &AuthServer, browser: &Browser, p: &PendingLogout) -> Response {
    let mut user = None;
    if let Some(id) = &browser.session_id {
        user = match session_user(server, browser, id).await {
            Ok(u) => u,
            Err(r) => return r,
        };
        let revoked = server
            .sessions
            .clone()
            .revoke(RevokeRequest {
                target: Some(revoke_request::Target::SessionId(id.clone())),
            })
            .await;
        if let Err(s) = revoked {
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) {
                return flow::unavailable("ending the browser session", &s);
            }
        }
    }
    let mut ev = server.event("sec.auth.logout");
    ev.subject = user.unwrap_or_default();
    ev.source_ip = browser.ip.clone();
    if let Some(c) = &p.client_id {
        ev.details.insert("client_id".into(), c.clone());
    }
    ev.details.insert(
        "redirect".into(),
        p.redirect_uri.is_some().to_string(),
    );
    server.publish(ev);
    server.metrics.request("logout", "ok");
    let out = SetCookies(vec![cookies::clear(&server.cfg, Cookie::Session)]);
    if let Some(uri) = &p.redirect_uri {
        let mut params: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = &p.state {
            params.push(("state", s.as_str()));
        }
        let target = flow::Target {
            redirect_uri: uri.clone(),
            mode: flow::ResponseMode::Query,
            state: None,
        };
        return out.apply(flow::answer_client(server, &target, &params));
    }
    out.apply(html::page_response(
        StatusCode::OK,
        html::document(
            "Signed out",
            &format!("<p>{}</p>", escape("You are signed out.")),
            "",
        ),
        html::DEFAULT_CSP,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_is_read_from_the_payload_only_to_pick_the_verifier() {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let t = format!("h.{}.s", enc(r#"{"aud":"app"}"#));
        assert_eq!(unverified_audience(&t).as_deref(), Some("app"));
        let t = format!("h.{}.s", enc(r#"{"aud":["a","b"]}"#));
        assert_eq!(unverified_audience(&t).as_deref(), Some("a"));
        assert_eq!(unverified_audience("garbage"), None);
        assert_eq!(unverified_audience(&format!("h.{}.s", enc("{}"))), None);
    }

    #[test]
    fn the_confirmation_form_carries_only_its_id_and_token() {
        let b = render_confirmation("id\"1", "tok");
        assert!(b.contains("name=\"logout\" value=\"id&quot;1\""));
        assert!(b.contains("name=\"csrf\" value=\"tok\""));
        assert!(b.contains("method=\"post\" action=\"/logout\""));
        assert!(!b.contains("post_logout_redirect_uri"));
    }
}
