//! The login page (rendered by `/authorize`) and `POST /login`.
//!
//! A plain form that works without JavaScript: labelled `username` and `password`
//! inputs inside `<main>`, the pending request's id and a CSRF token as hidden fields,
//! and on failure one visible message (`role="alert"`) that does not say which of the
//! two was wrong (nor whether the account is disabled or locked: that would confirm it
//! exists). Lockout, failure counts and login events live in `verify_login`, the seam
//! for MFA.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;

use super::csrf::{self, Purpose};
use super::flow::{self, Browser, SetCookies};
use super::html::{self, escape, hidden};
use crate::engine::AuthServer;
use crate::oauth::params::Params;
use crate::store::ClientRow;
use crate::users::LoginFailure;
use sec_edge::FailureReason;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/login", post(login_post))
}

/// The one message of a failed login.
pub const LOGIN_FAILED: &str = "The username or password is incorrect.";

/// The login page for pending request `request_id`.
pub fn login_page(
    server: &AuthServer,
    browser: &Browser,
    request_id: &str,
    client: &ClientRow,
    redirect_uri: &str,
    error: Option<&str>,
    mut out: SetCookies,
) -> Response {
    let secret = match flow::csrf_secret(server, browser, &mut out) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let token = csrf::token(&server.page_key, Purpose::Login, request_id, &secret);
    let body = render(&client.settings.name, request_id, &token, error);
    out.apply(html::page_response(
        StatusCode::OK,
        html::document("Sign in", &body, ""),
        &html::csp_with_redirect(redirect_uri),
    ))
}

/// The body of the login page (every value escaped).
pub fn render(
    client_name: &str,
    request_id: &str,
    csrf_token: &str,
    error: Option<&str>,
) -> String {
    let alert = error
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(m)))
        .unwrap_or_default();
    format!(
        "<p>to continue to <strong>{client}</strong></p>{alert}\
<form method=\"post\" action=\"/login\">{req}{csrf}\
<label for=\"username\">Username</label>\
<input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" \
autocapitalize=\"none\" spellcheck=\"false\" required autofocus>\
<label for=\"password\">Password</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form>",
        client = escape(client_name),
        req = hidden("request", request_id),
        csrf = hidden("csrf", csrf_token),
    )
}

/// The login form's submission.
#[utoipa::path(
    post,
    path = "/login",
    tag = "pages",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
                 description = "`request` (pending request id), `csrf`, `username`, `password`"),
    responses(
        (status = 200, description = "The consent page, the form_post page, or the login page again with an error", content_type = "text/html"),
        (status = 303, description = "To the client's redirect URI with the code"),
        (status = 400, description = "Unknown, expired or used pending request", content_type = "text/html"),
        (status = 403, description = "Missing or invalid CSRF token", content_type = "text/html"),
    )
)]
pub async fn login_post(State(server): State<Arc<AuthServer>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match super::authorize::read_body(&server, body).await {
        Ok(b) => b,
        Err(r) => {
            server.metrics.request("login", "too_large");
            return r;
        }
    };
    let Ok(form) = Params::from_form(&parts.headers, &body, server.cfg.max_param_bytes) else {
        server.metrics.request("login", "bad_request");
        return html::error_page(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            "The form is malformed.",
        );
    };
    let browser = Browser::from_parts(&server, &parts);
    let request_id = form.get("request").unwrap_or_default();
    let csrf_ok = browser.csrf.as_deref().is_some_and(|secret| {
        csrf::verify(
            &server.page_key,
            Purpose::Login,
            request_id,
            secret,
            form.get("csrf").unwrap_or_default(),
        )
    });
    if !csrf_ok {
        server.metrics.request("login", "csrf");
        return flow::csrf_page();
    }
    let mut pending = match flow::load_pending(&server, request_id).await {
        Ok(p) => p,
        Err(r) => {
            server.metrics.request("login", "expired");
            return r;
        }
    };
    let client = match server.find_client(&pending.req.client_id).await {
        Ok(Some(c)) => c,
        // Deleted meanwhile: its redirect URI is no longer trusted.
        Ok(None) => {
            server.metrics.request("login", "bad_request");
            return html::error_page(
                StatusCode::BAD_REQUEST,
                "Invalid request",
                "The client is not known.",
            );
        }
        Err(e) => return flow::unavailable("looking up the client", &e),
    };
    let (Some(username), Some(password)) = (form.get("username"), form.get("password")) else {
        server.metrics.request("login", "failed");
        return login_page(
            &server,
            &browser,
            request_id,
            &client,
            &pending.req.target.redirect_uri,
            Some(LOGIN_FAILED),
            SetCookies::default(),
        );
    };
    let user = match server.verify_login(username, password, &browser.ip).await {
        Ok(u) => u,
        Err(LoginFailure::Unavailable(e)) => {
            server.metrics.request("login", "unavailable");
            return flow::unavailable("checking a password", &e);
        }
        Err(LoginFailure::InvalidCredentials | LoginFailure::Disabled | LoginFailure::Locked) => {
            server.metrics.request("login", "failed");
            let mut resp = login_page(
                &server,
                &browser,
                request_id,
                &client,
                &pending.req.target.redirect_uri,
                Some(LOGIN_FAILED),
                SetCookies::default(),
            );
            crate::edge::mark_failure(&mut resp, FailureReason::LoginFailure);
            return resp;
        }
    };

    let mut out = SetCookies::default();
    let session = match flow::create_session(
        &server,
        &browser,
        &user.user_id,
        &client.client_id,
        &mut out,
    )
    .await
    {
        Ok(s) => s,
        Err(r) => return r,
    };
    server.metrics.request("login", "ok");
    let consent = match flow::consent_needed(
        &server,
        client.settings.trusted,
        &user.user_id,
        &pending.req,
    )
    .await
    {
        Ok(c) => c,
        Err(r) => return out.apply(r),
    };
    if consent {
        pending.session_handle = Some(session.handle.clone());
        if let Err(r) = flow::save_pending(&server, request_id, &pending).await {
            return out.apply(r);
        }
        server.metrics.request("authorize", "consent_page");
        return super::consent::consent_page(
            &server,
            &browser,
            request_id,
            &client,
            &pending.req.target.redirect_uri,
            &pending.req.scopes,
            out,
        );
    }
    if let Err(r) = flow::consume_pending(&server, request_id).await {
        return out.apply(r);
    }
    out.apply(flow::issue_code(&server, &pending.req, &session, &browser).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_form_is_labelled_and_escaped() {
        let b = render("<Evil & Co>", "req1", "tok", None);
        assert!(b.contains("&lt;Evil &amp; Co&gt;") && !b.contains("<Evil"));
        assert!(b.contains("<label for=\"username\">") && b.contains("id=\"username\""));
        assert!(b.contains("<label for=\"password\">") && b.contains("id=\"password\""));
        assert!(b.contains("type=\"password\""));
        assert!(b.contains("name=\"csrf\" value=\"tok\""));
        assert!(b.contains("name=\"request\" value=\"req1\""));
        assert!(b.contains("action=\"/login\"") && !b.contains("<script"));
        assert!(!b.contains("role=\"alert\""));
        let b = render("App", "r", "t", Some(LOGIN_FAILED));
        assert!(b.contains(&format!(
            "<p class=\"error\" role=\"alert\">{LOGIN_FAILED}</p>"
        )));
    }
}
