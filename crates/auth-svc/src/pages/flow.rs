//! What `/authorize`, the login form and the consent form share: the validated request,
//! the pending request kept in the KV while the user logs in or consents, the browser's
//! session at session-svc, the decisions (log in again? ask for consent?), issuing the
//! code, and answering the client in its response mode.
//!
//! The pending request lives server-side under a random id, so the forms carry only that
//! id and a CSRF token: nothing of the client's request travels through hidden fields a
//! user could edit. It is consumed once (the KV `delete` that returns true wins).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sec_common::error::ErrorCode;
use sec_edge::layer::ClientIp;
use sec_proto::session::v1::{
    BindingResult, CreateRequest, GetRequest, RevokeRequest, Session, revoke_request,
};
use serde::{Deserialize, Serialize};

use super::cookies::{self, Cookie};
use super::html::{self, escape};
use crate::engine::AuthServer;
use crate::oauth::error::OAuthError;
use crate::store::{CodeGrant, CodeRow, ConsentRow, UserStatus};

/// Longest user agent kept with a session.
const MAX_USER_AGENT: usize = 512;

/// How the client wants the answer (OAuth 2.0 Multiple Response Types, Form Post).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseMode {
    Query,
    FormPost,
}

/// `prompt` (OIDC Core §3.1.2.1): `none` never shows a page; `login` forces a fresh
/// login; `consent` always asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    pub none: bool,
    pub login: bool,
    pub consent: bool,
}

/// Where the answer to the client goes: only ever built from a registered redirect URI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub redirect_uri: String,
    pub mode: ResponseMode,
    pub state: Option<String>,
}

/// A validated authorization request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequest {
    pub client_id: String,
    pub target: Target,
    pub scopes: Vec<String>,
    pub nonce: Option<String>,
    /// S256 challenge (the only method accepted).
    pub code_challenge: Option<String>,
    pub prompt: Prompt,
    pub max_age: Option<u64>,
}

/// A request waiting for the login or consent form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub req: AuthRequest,
    /// The handle (SHA-256 of the id, from session-svc) of the session that logged in for
    /// this request, or that was found valid: the consent form must come from it.
    pub session_handle: Option<String>,
    /// Unix µs after which the pending request is void (the KV TTL, checked as well).
    pub expires_us: i64,
}

fn pending_key(id: &str) -> String {
    format!("authz:{id}")
}

/// The caller's browser: its cookies, address and user agent.
#[derive(Debug, Clone, Default)]
pub struct Browser {
    pub session_id: Option<String>,
    pub csrf: Option<String>,
    pub ip: String,
    pub user_agent: String,
}

impl Browser {
    pub fn from_parts(server: &AuthServer, parts: &Parts) -> Self {
        Self::new(server, &parts.headers, &parts.extensions)
    }

    /// The address is the edge layer's ([`ClientIp`]: forwarding headers honoured from
    /// trusted proxies only), else the socket peer; never a header alone.
    pub fn new(server: &AuthServer, headers: &HeaderMap, extensions: &Extensions) -> Self {
        let cfg = &server.cfg;
        Self {
            session_id: cookies::read(headers, Cookie::Session.name(cfg)),
            csrf: cookies::read(headers, Cookie::Csrf.name(cfg)),
            ip: client_ip(extensions)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(MAX_USER_AGENT).collect())
                .unwrap_or_default(),
        }
    }
}

/// The caller's address as the edge layer resolved it, else the socket peer.
pub fn client_ip(extensions: &Extensions) -> Option<IpAddr> {
    extensions.get::<ClientIp>().map(|c| c.0).or_else(|| {
        extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_canonical())
    })
}

/// A page's answer before it is rendered: `Set-Cookie` values to add.
#[derive(Debug, Default)]
pub struct SetCookies(pub Vec<HeaderValue>);

impl SetCookies {
    pub fn apply(self, mut resp: Response) -> Response {
        for c in self.0 {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        resp
    }
}

/// The browser's CSRF secret, made (and set as a cookie) when it has none.
pub fn csrf_secret(
    server: &AuthServer,
    browser: &Browser,
    out: &mut SetCookies,
) -> Result<String, Response> {
    if let Some(c) = &browser.csrf {
        return Ok(c.clone());
    }
    let fresh = AuthServer::random_value().map_err(|e| internal("csrf secret", &e))?;
    out.0
        .push(cookies::set(&server.cfg, Cookie::Csrf, &fresh, None));
    Ok(fresh)
}

/// A 500 page; the cause goes to the log only.
pub fn internal(context: &'static str, cause: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %cause, "{context}");
    html::error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "An internal error occurred.",
    )
}

/// A 503 page: a dependency is down.
pub fn unavailable(context: &'static str, cause: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %cause, "{context}");
    html::error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Temporarily unavailable",
        "The service is temporarily unavailable. Please try again in a moment.",
    )
}

/// The page for a pending request that is unknown, expired or already used.
pub fn expired_page() -> Response {
    html::error_page(
        StatusCode::BAD_REQUEST,
        "Sign-in request expired",
        "This sign-in request has expired or was already used.",
    )
}

/// The 403 page of a form posted without a valid CSRF token.
pub fn csrf_page() -> Response {
    html::error_page(
        StatusCode::FORBIDDEN,
        "Request refused",
        "The form could not be verified (it may have expired or come from another site).",
    )
}

/// Stores `pending` under `id` for what is left of its lifetime.
pub async fn save_pending(server: &AuthServer, id: &str, p: &Pending) -> Result<(), Response> {
    let left_us = p.expires_us - server.now_us();
    let left = u64::try_from(left_us / 1_000_000).unwrap_or(0);
    if left == 0 {
        return Err(expired_page());
    }
    let json = serde_json::to_vec(p).map_err(|e| internal("encoding a pending request", &e))?;
    server
        .kv
        .set(&pending_key(id), &json, Some(Duration::from_secs(left)))
        .await
        .map_err(|e| unavailable("storing a pending request", &e))
}

/// A new pending request; returns its id.
pub async fn new_pending(
    server: &AuthServer,
    req: AuthRequest,
    session_handle: Option<String>,
) -> Result<String, Response> {
    let id = AuthServer::random_value().map_err(|e| internal("pending id", &e))?;
    let ttl_us = i64::try_from(server.cfg.login_ttl_seconds)
        .unwrap_or(600)
        .saturating_mul(1_000_000);
    let p = Pending {
        req,
        session_handle,
        expires_us: server.now_us().saturating_add(ttl_us),
    };
    save_pending(server, &id, &p).await?;
    Ok(id)
}

/// The pending request `id`, if it exists and has not expired.
pub async fn load_pending(server: &AuthServer, id: &str) -> Result<Pending, Response> {
    if id.is_empty() || id.len() > 64 {
        return Err(expired_page());
    }
    let raw = server
        .kv
        .get(&pending_key(id))
        .await
        .map_err(|e| unavailable("reading a pending request", &e))?
        .ok_or_else(expired_page)?;
    let p: Pending =
        serde_json::from_slice(&raw).map_err(|e| internal("decoding a pending request", &e))?;
    if p.expires_us <= server.now_us() {
        return Err(expired_page());
    }
    Ok(p)
}

/// Consumes the pending request: only the caller that deletes it may go on.
pub async fn consume_pending(server: &AuthServer, id: &str) -> Result<(), Response> {
    match server.kv.delete(&pending_key(id)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(expired_page()),
        Err(e) => Err(unavailable("consuming a pending request", &e)),
    }
}

/// The browser's session at session-svc (touched, so the idle timeout slides), if its
/// cookie names a live one whose binding holds. `Err` only when session-svc is down.
pub async fn current_session(
    server: &AuthServer,
    browser: &Browser,
) -> Result<Option<Session>, Response> {
    let Some(id) = &browser.session_id else {
        return Ok(None);
    };
    let got = server
        .sessions
        .clone()
        .touch(GetRequest {
            session_id: id.clone(),
            source_ip: browser.ip.clone(),
            user_agent: browser.user_agent.clone(),
        })
        .await;
    match got {
        Ok(r) => {
            let r = r.into_inner();
            if r.binding == BindingResult::StepUpRequired as i32 {
                return Ok(None);
            }
            Ok(r.session)
        }
        Err(s) => match ErrorCode::from_grpc(s.code()) {
            ErrorCode::Unavailable | ErrorCode::DeadlineExceeded | ErrorCode::Internal => {
                Err(unavailable("reading the browser session", &s))
            }
            // Unknown, expired, revoked, binding refused, malformed id: no session.
            _ => Ok(None),
        },
    }
}

/// Whether the user must log in (again): no session, `prompt=login`, or the session's
/// authentication is older than `max_age` seconds (OIDC Core §3.1.2.1).
pub fn needs_login(
    auth_time: Option<i64>,
    now_secs: i64,
    prompt: Prompt,
    max_age: Option<u64>,
) -> bool {
    let Some(auth_time) = auth_time else {
        return true;
    };
    if prompt.login {
        return true;
    }
    match max_age {
        Some(max) => {
            let age = now_secs.saturating_sub(auth_time);
            i64::try_from(max).is_ok_and(|max| age > max)
        }
        None => false,
    }
}

/// Whether a remembered consent covers `scopes` at `now_us`.
pub fn consent_covers(row: Option<&ConsentRow>, scopes: &[String], now_us: i64) -> bool {
    row.is_some_and(|c| c.expires_us > now_us && scopes.iter().all(|s| c.scopes.contains(s)))
}

/// Whether the consent page must be shown for `req` to `user_id`.
pub async fn consent_needed(
    server: &AuthServer,
    trusted: bool,
    user_id: &str,
    req: &AuthRequest,
) -> Result<bool, Response> {
    if req.prompt.consent {
        return Ok(true);
    }
    if trusted {
        return Ok(false);
    }
    let row = server
        .store
        .get_consent(user_id, &req.client_id)
        .await
        .map_err(|e| unavailable("reading a remembered consent", &e))?;
    Ok(!consent_covers(row.as_ref(), &req.scopes, server.now_us()))
}

/// Remembers consent to `scopes` (with any still-valid scopes remembered before).
pub async fn remember_consent(
    server: &AuthServer,
    user_id: &str,
    client_id: &str,
    scopes: &[String],
) -> Result<(), Response> {
    if server.cfg.consent_ttl_seconds == 0 {
        return Ok(());
    }
    let now = server.now_us();
    let old = server
        .store
        .get_consent(user_id, client_id)
        .await
        .map_err(|e| unavailable("reading a remembered consent", &e))?;
    let mut all: Vec<String> = scopes.to_vec();
    if let Some(o) = old.filter(|o| o.expires_us > now) {
        all.extend(o.scopes);
    }
    all.sort();
    all.dedup();
    let ttl = i64::try_from(server.cfg.consent_ttl_seconds)
        .unwrap_or(0)
        .saturating_mul(1_000_000);
    server
        .store
        .put_consent(&ConsentRow {
            user_id: user_id.to_owned(),
            client_id: client_id.to_owned(),
            scopes: all,
            granted_us: now,
            expires_us: now.saturating_add(ttl),
        })
        .await
        .map_err(|e| unavailable("remembering a consent", &e))
}

/// Whether the session's user may still use it (exists and is active).
pub async fn session_user_active(server: &AuthServer, s: &Session) -> Result<bool, Response> {
    match server.find_user(&s.user_id).await {
        Ok(u) => Ok(u.is_some_and(|u| u.status == UserStatus::Active)),
        Err(e) => Err(unavailable("reading the session's user", &e)),
    }
}

/// Creates the browser session after a successful login and returns it with its cookie.
/// The browser's previous session, if any, is revoked (one browser, one session).
pub async fn create_session(
    server: &AuthServer,
    browser: &Browser,
    user_id: &str,
    client_id: &str,
    out: &mut SetCookies,
) -> Result<Session, Response> {
    let mut sessions = server.sessions.clone();
    if let Some(old) = &browser.session_id {
        let revoked = sessions
            .revoke(RevokeRequest {
                target: Some(revoke_request::Target::SessionId(old.clone())),
            })
            .await;
        if let Err(s) = revoked
            && s.code() != tonic::Code::NotFound
            && s.code() != tonic::Code::InvalidArgument
        {
            tracing::warn!(error = %s, "revoking the replaced browser session");
        }
    }
    let created = sessions
        .create(CreateRequest {
            user_id: user_id.to_owned(),
            client_id: client_id.to_owned(),
            auth_time: Some(sec_common::events::to_timestamp(server.clock.now())),
            amr: vec!["pwd".into()],
            acr: String::new(),
            source_ip: browser.ip.clone(),
            user_agent: browser.user_agent.clone(),
            attributes: Default::default(),
            binding: None,
        })
        .await
        .map_err(|s| unavailable("creating the browser session", &s))?
        .into_inner();
    let session = created
        .session
        .ok_or_else(|| internal("creating the browser session", &"no session returned"))?;
    out.0.push(cookies::set(
        &server.cfg,
        Cookie::Session,
        &created.session_id,
        Some(server.cfg.session_absolute_seconds),
    ));
    Ok(session)
}

/// Issues the authorization code for `req` in `session` and answers the client.
pub async fn issue_code(
    server: &AuthServer,
    req: &AuthRequest,
    session: &Session,
    browser: &Browser,
) -> Response {
    let code = match AuthServer::random_value() {
        Ok(c) => c,
        Err(e) => return internal("authorization code", &e),
    };
    let now = server.now_us();
    let ttl = i64::try_from(server.cfg.code_ttl_seconds)
        .unwrap_or(60)
        .saturating_mul(1_000_000);
    let scope = req.scopes.join(" ");
    let row = CodeRow {
        code_hash: AuthServer::code_hash(&code),
        grant: CodeGrant {
            client_id: req.client_id.clone(),
            redirect_uri: req.target.redirect_uri.clone(),
            code_challenge: req.code_challenge.clone(),
            user_id: session.user_id.clone(),
            scope: scope.clone(),
            nonce: req.nonce.clone(),
            auth_time: session.auth_time.as_ref().map_or(0, |t| t.seconds),
            amr: session.amr.clone(),
            acr: session.acr.clone(),
            session_id: session.handle.clone(),
        },
        created_us: now,
        expires_us: now.saturating_add(ttl),
        used_us: None,
        family_id: None,
        access_jti: None,
        access_expires_us: None,
    };
    if let Err(e) = server.store.insert_code(&row).await {
        let err = OAuthError::temporarily_unavailable("storing an authorization code", &e);
        return error_to_client(server, &req.target, &err);
    }
    let mut ev = server.event("sec.auth.code.issued");
    ev.subject = session.user_id.clone();
    ev.source_ip = browser.ip.clone();
    ev.details.insert("client_id".into(), req.client_id.clone());
    ev.details.insert("scope".into(), scope);
    server.publish(ev);
    server.metrics.request("authorize", "ok");
    answer_client(
        server,
        &req.target,
        &[("code", code.as_str()), ("iss", server.cfg.issuer.as_str())],
    )
}

/// An error sent back to the client at its (registered) redirect URI, with `iss`.
pub fn error_to_client(server: &AuthServer, target: &Target, err: &OAuthError) -> Response {
    server.metrics.request("authorize", err.error);
    answer_client(
        server,
        target,
        &[
            ("error", err.error),
            ("error_description", err.description.as_str()),
            ("iss", server.cfg.issuer.as_str()),
        ],
    )
}

/// The answer to the client: `params` plus `state`, as a 303 redirect (`query`) or an
/// auto-submitting form (`form_post`).
pub fn answer_client(_server: &AuthServer, target: &Target, params: &[(&str, &str)]) -> Response {
    let mut all: Vec<(&str, &str)> = params.to_vec();
    if let Some(s) = &target.state {
        all.push(("state", s.as_str()));
    }
    match target.mode {
        ResponseMode::Query => {
            let location = with_query(&target.redirect_uri, &all);
            let Ok(location) = HeaderValue::from_str(&location) else {
                return internal("redirect location", &"not a valid header value");
            };
            let mut resp = StatusCode::SEE_OTHER.into_response();
            html::security_headers(resp.headers_mut(), html::DEFAULT_CSP);
            resp.headers_mut().insert(header::LOCATION, location);
            resp
        }
        ResponseMode::FormPost => form_post_page(&target.redirect_uri, &all),
    }
}

/// `uri` with `params` appended to its query (`?` or `&`), any fragment dropped
/// (RFC 6749 §3.1.2: a redirect URI has none).
pub fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let base = uri.split('#').next().unwrap_or(uri);
    let mut enc = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        enc.append_pair(k, v);
    }
    let q = enc.finish();
    let sep = match base.find('?') {
        None => "?",
        Some(i) if i + 1 == base.len() || base.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{base}{sep}{q}")
}

/// The one inline script of the pages: submits the form_post form.
pub const FORM_POST_SCRIPT: &str = "document.forms[0].submit();";

/// The CSP source of [`FORM_POST_SCRIPT`].
pub fn form_post_script_hash() -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, FORM_POST_SCRIPT.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(d.as_ref())
    )
}

/// The CSP `form-action` source that allows exactly `redirect_uri` (scheme, host, port
/// and path; CSP ignores the query), only its origin when the path holds a character a
/// CSP source cannot, or only its scheme for a native app's custom scheme. `None` if it
/// cannot be expressed safely at all.
pub fn form_action_source(redirect_uri: &str) -> Option<String> {
    let safe = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'\'' | b'"'))
    };
    let u = url::Url::parse(redirect_uri).ok()?;
    let src = match u.scheme() {
        "http" | "https" => {
            let host = u.host_str()?;
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            let origin = format!("{}://{host}{port}", u.scheme());
            let full = format!("{origin}{}", u.path());
            if safe(&full) { full } else { origin }
        }
        s => format!("{s}:"),
    };
    safe(&src).then_some(src)
}

/// OAuth 2.0 Form Post Response Mode: a page whose form posts `params` to `redirect_uri`
/// by itself (one inline script allowed by its hash), or with a button without script.
pub fn form_post_page(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    let Some(action) = form_action_source(redirect_uri) else {
        return internal("form_post", &"redirect URI not expressible in a CSP");
    };
    let fields: String = params.iter().map(|(k, v)| html::hidden(k, v)).collect();
    let body = format!(
        "<form method=\"post\" action=\"{}\">{fields}<noscript>\
<p>Your browser does not run scripts: press the button to continue.</p>\
<button type=\"submit\">Continue</button></noscript></form>\
<script>{FORM_POST_SCRIPT}</script>",
        escape(redirect_uri)
    );
    let csp = format!(
        "default-src 'none'; script-src {}; style-src 'unsafe-inline'; form-action {action}; \
         frame-ancestors 'none'; base-uri 'none'",
        form_post_script_hash()
    );
    html::page_response(
        StatusCode::OK,
        html::document("Returning to the application", &body, ""),
        &csp,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_append_to_an_existing_query() {
        let p = [("code", "a b&c"), ("state", "s")];
        assert_eq!(
            with_query("https://c.example/cb", &p),
            "https://c.example/cb?code=a+b%26c&state=s"
        );
        assert_eq!(
            with_query("https://c.example/cb?x=1", &p),
            "https://c.example/cb?x=1&code=a+b%26c&state=s"
        );
        assert_eq!(
            with_query("https://c.example/cb?", &p),
            "https://c.example/cb?code=a+b%26c&state=s"
        );
        assert_eq!(
            with_query("https://c.example/cb?x=1&", &[("a", "1")]),
            "https://c.example/cb?x=1&a=1"
        );
        assert_eq!(
            with_query("https://c.example/cb#frag", &[("a", "1")]),
            "https://c.example/cb?a=1"
        );
    }

    #[test]
    fn login_is_needed_without_session_on_prompt_login_and_past_max_age() {
        let none = Prompt::default();
        let login = Prompt {
            login: true,
            ..Prompt::default()
        };
        assert!(needs_login(None, 1_000, none, None));
        assert!(!needs_login(Some(900), 1_000, none, None));
        assert!(needs_login(Some(900), 1_000, login, None));
        assert!(!needs_login(Some(900), 1_000, none, Some(100)));
        assert!(needs_login(Some(899), 1_000, none, Some(100)));
        assert!(needs_login(Some(999), 1_000, none, Some(0)));
        assert!(!needs_login(Some(1_000), 1_000, none, Some(0)));
        assert!(!needs_login(Some(0), 1_000, none, Some(u64::MAX)));
    }

    #[test]
    fn remembered_consent_must_cover_every_scope_and_be_unexpired() {
        let row = ConsentRow {
            user_id: "u".into(),
            client_id: "c".into(),
            scopes: vec!["email".into(), "openid".into()],
            granted_us: 0,
            expires_us: 100,
        };
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert!(consent_covers(Some(&row), &s(&["openid"]), 50));
        assert!(consent_covers(Some(&row), &s(&["openid", "email"]), 50));
        assert!(!consent_covers(Some(&row), &s(&["openid", "profile"]), 50));
        assert!(!consent_covers(Some(&row), &s(&["openid"]), 100));
        assert!(!consent_covers(None, &s(&["openid"]), 50));
    }

    #[tokio::test]
    async fn form_post_page_posts_only_to_the_redirect_uri() {
        let r = form_post_page(
            "https://c.example:8443/cb?x=1",
            &[("code", "abc"), ("state", "\"><script>x</script>")],
        );
        assert_eq!(r.status(), 200);
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.contains("form-action https://c.example:8443/cb;"),
            "{csp}"
        );
        assert!(csp.contains(&form_post_script_hash()), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("'unsafe-inline'; form-action 'self'"));
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains("action=\"https://c.example:8443/cb?x=1\""),
            "{body}"
        );
        assert!(body.contains("name=\"code\" value=\"abc\""));
        assert!(
            !body.contains("<script>x</script>"),
            "state escaped: {body}"
        );
        assert!(body.contains("<noscript>"));
        assert!(body.contains(&format!("<script>{FORM_POST_SCRIPT}</script>")));
        // The hash is of exactly that script.
        assert_eq!(
            form_post_script_hash(),
            "'sha256-".to_owned()
                + &base64::engine::general_purpose::STANDARD.encode(
                    aws_lc_rs::digest::digest(
                        &aws_lc_rs::digest::SHA256,
                        b"document.forms[0].submit();"
                    )
                    .as_ref()
                )
                + "'"
        );
    }

    #[test]
    fn form_action_sources() {
        assert_eq!(
            form_action_source("https://c.example/cb").as_deref(),
            Some("https://c.example/cb")
        );
        assert_eq!(
            form_action_source("com.example.app:/cb").as_deref(),
            Some("com.example.app:")
        );
        assert_eq!(form_action_source("not a url"), None);
        // A path a CSP source cannot hold falls back to the origin, never raw.
        assert_eq!(
            form_action_source("https://c.example/a;b'c,d").as_deref(),
            Some("https://c.example")
        );
    }
}
