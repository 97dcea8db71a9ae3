//! The consent page (rendered by `/authorize` or after login) and `POST /consent`.
//!
//! Skipped for trusted clients and when a remembered, unexpired consent covers every
//! requested scope (unless `prompt=consent`). The page lists each scope with its
//! description from the registry; Allow issues the code, Deny sends `access_denied` to
//! the client. The form is CSRF-protected like the login form, and must come from the
//! session that was shown the page (the pending request records its handle).

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
use crate::oauth::error::OAuthError;
use crate::oauth::params::Params;
use crate::store::ClientRow;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/consent", post(consent_post))
}

/// The consent page for pending request `request_id`.
pub fn consent_page(
    server: &AuthServer,
    browser: &Browser,
    request_id: &str,
    client: &ClientRow,
    scopes: &[String],
    mut out: SetCookies,
) -> Response {
    let secret = match flow::csrf_secret(server, browser, &mut out) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let token = csrf::token(&server.page_key, Purpose::Consent, request_id, &secret);
    let registry = server.cfg.scope_registry();
    let described: Vec<(String, String)> = scopes
        .iter()
        .map(|s| {
            let d = registry
                .iter()
                .find(|(n, _, _)| n == s)
                .map_or_else(|| s.clone(), |(_, d, _)| d.clone());
            (s.clone(), d)
        })
        .collect();
    let body = render(
        &client.settings.name,
        request_id,
        &token,
        &described,
        server.cfg.consent_ttl_seconds > 0,
    );
    out.apply(html::page_response(
        StatusCode::OK,
        html::document("Allow access?", &body, ""),
        html::DEFAULT_CSP,
    ))
}

/// The body of the consent page: `scopes` are (name, description); every value escaped.
pub fn render(
    client_name: &str,
    request_id: &str,
    csrf_token: &str,
    scopes: &[(String, String)],
    offer_remember: bool,
) -> String {
    let items: String = scopes
        .iter()
        .map(|(n, d)| format!("<li>{} <small>({})</small></li>", escape(d), escape(n)))
        .collect();
    let remember = if offer_remember {
        "<p><input type=\"checkbox\" id=\"remember\" name=\"remember\" value=\"yes\">\
<label for=\"remember\" style=\"display:inline;font-weight:normal\">Remember this decision</label></p>"
    } else {
        ""
    };
    format!(
        "<p><strong>{client}</strong> asks to:</p><ul class=\"scopes\">{items}</ul>\
<form method=\"post\" action=\"/consent\">{req}{csrf}{remember}\
<button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
<button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
        client = escape(client_name),
        req = hidden("request", request_id),
        csrf = hidden("csrf", csrf_token),
    )
}

/// The consent form's submission.
#[utoipa::path(
    post,
    path = "/consent",
    tag = "pages",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
                 description = "`request` (pending request id), `csrf`, `decision` (`allow`|`deny`), optional `remember`"),
    responses(
        (status = 200, description = "The form_post page", content_type = "text/html"),
        (status = 303, description = "To the client's redirect URI with the code, or `access_denied`"),
        (status = 400, description = "Unknown, expired or used pending request, or no session", content_type = "text/html"),
        (status = 403, description = "Missing or invalid CSRF token", content_type = "text/html"),
    )
)]
pub async fn consent_post(State(server): State<Arc<AuthServer>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match super::authorize::read_body(&server, body).await {
        Ok(b) => b,
        Err(r) => {
            server.metrics.request("consent", "too_large");
            return r;
        }
    };
    let Ok(form) = Params::from_form(&parts.headers, &body, server.cfg.max_param_bytes) else {
        server.metrics.request("consent", "bad_request");
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
            Purpose::Consent,
            request_id,
            secret,
            form.get("csrf").unwrap_or_default(),
        )
    });
    if !csrf_ok {
        server.metrics.request("consent", "csrf");
        return flow::csrf_page();
    }
    let allow = match form.get("decision") {
        Some("allow") => true,
        Some("deny") => false,
        _ => {
            server.metrics.request("consent", "bad_request");
            return html::error_page(
                StatusCode::BAD_REQUEST,
                "Invalid request",
                "Choose Allow or Deny.",
            );
        }
    };
    let pending = match flow::load_pending(&server, request_id).await {
        Ok(p) => p,
        Err(r) => {
            server.metrics.request("consent", "expired");
            return r;
        }
    };
    let session = match flow::current_session(&server, &browser).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    // The consent must come from the session the page was shown to.
    let Some(session) = session.filter(|s| pending.session_handle.as_deref() == Some(&s.handle))
    else {
        server.metrics.request("consent", "no_session");
        return html::error_page(
            StatusCode::BAD_REQUEST,
            "Session ended",
            "Your sign-in session has ended or changed. Return to the application and start again.",
        );
    };
    if let Err(r) = flow::consume_pending(&server, request_id).await {
        server.metrics.request("consent", "expired");
        return r;
    }
    let req = pending.req;
    let scope = req.scopes.join(" ");
    if !allow {
        let mut ev = server.failure_event("sec.auth.consent.denied");
        ev.subject = session.user_id.clone();
        ev.source_ip = browser.ip.clone();
        ev.details.insert("client_id".into(), req.client_id.clone());
        ev.details.insert("scope".into(), scope);
        server.publish(ev);
        server.metrics.request("consent", "denied");
        return flow::error_to_client(
            &server,
            &req.target,
            &OAuthError::access_denied("the user denied the request"),
        );
    }
    if form.get("remember") == Some("yes") {
        if let Err(r) =
            flow::remember_consent(&server, &session.user_id, &req.client_id, &req.scopes).await
        {
            return r;
        }
    }
    let mut ev = server.event("sec.auth.consent.granted");
    ev.subject = session.user_id.clone();
    ev.source_ip = browser.ip.clone();
    ev.details.insert("client_id".into(), req.client_id.clone());
    ev.details.insert("scope".into(), scope);
    ev.details.insert(
        "remembered".into(),
        (form.get("remember") == Some("yes") && server.cfg.consent_ttl_seconds > 0).to_string(),
    );
    server.publish(ev);
    server.metrics.request("consent", "granted");
    flow::issue_code(&server, &req, &session, &browser).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consent_form_lists_scopes_escaped() {
        let scopes = vec![
            ("openid".to_owned(), "Sign you in".to_owned()),
            ("x".to_owned(), "<b>bold</b>".to_owned()),
        ];
        let b = render("A \"quoted\" app", "req1", "tok", &scopes, true);
        assert!(b.contains("<li>Sign you in <small>(openid)</small></li>"), "{b}");
        assert!(b.contains("&lt;b&gt;bold&lt;/b&gt;") && !b.contains("<b>bold"));
        assert!(b.contains("A &quot;quoted&quot; app"));
        assert!(b.contains("value=\"allow\"") && b.contains("value=\"deny\""));
        assert!(b.contains("name=\"csrf\" value=\"tok\""));
        assert!(b.contains("<label for=\"remember\""));
        assert!(!render("A", "r", "t", &scopes, false).contains("remember"));
    }
}
