//! `GET` and `POST /authorize` (RFC 6749 §4.1.1, RFC 7636, OIDC Core §3.1.2).
//!
//! Two stages, in this order, because the second answers at the redirect URI:
//! 1. what makes a redirect unsafe (malformed or duplicated parameters, an unknown
//!    client, a redirect URI that is not registered for it, compared as exact strings):
//!    an HTML error page, 400, never a redirect (RFC 6749 §4.1.2.1, RFC 9700 §4.1);
//! 2. everything else: an error sent to the registered redirect URI with `state` and
//!    `iss` (RFC 9207), in the requested response mode.
//!
//! Then the browser's session decides: log in (again), ask for consent, or issue the code.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::get;

use super::flow::{
    self, AuthRequest, Browser, Prompt, ResponseMode, SetCookies, Target, error_to_client,
};
use super::html;
use crate::config::OAuthConfig;
use crate::engine::AuthServer;
use crate::oauth::error::OAuthError;
use crate::oauth::params::{Params, scope_list};
use crate::store::{ClientRow, GrantType};

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/authorize", get(authorize_get).post(authorize_post))
}

/// The authorization endpoint, parameters in the query.
#[utoipa::path(
    get,
    path = "/authorize",
    tag = "oauth",
    params(
        ("response_type" = String, Query, description = "`code`"),
        ("client_id" = String, Query, description = "A registered client"),
        ("redirect_uri" = Option<String>, Query, description = "Exactly one of the client's registered URIs"),
        ("scope" = String, Query, description = "Space-separated scopes, all allowed for the client"),
        ("state" = Option<String>, Query, description = "Echoed back"),
        ("nonce" = Option<String>, Query, description = "OIDC nonce, put in the ID token"),
        ("code_challenge" = Option<String>, Query, description = "PKCE S256 challenge (required for public clients)"),
        ("code_challenge_method" = Option<String>, Query, description = "`S256`"),
        ("response_mode" = Option<String>, Query, description = "`query` (default) or `form_post`"),
        ("prompt" = Option<String>, Query, description = "`none`, `login`, `consent`"),
        ("max_age" = Option<u64>, Query, description = "Maximum authentication age, seconds"),
    ),
    responses(
        (status = 200, description = "Login or consent page, or the form_post page", content_type = "text/html"),
        (status = 303, description = "To the redirect URI with `code` or `error`, `state` and `iss`"),
        (status = 400, description = "Unknown client or unregistered redirect URI: an error page, no redirect", content_type = "text/html"),
    )
)]
pub async fn authorize_get(State(server): State<Arc<AuthServer>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let raw = parts.uri.query().unwrap_or("");
    let params = Params::parse(raw.as_bytes(), server.cfg.max_param_bytes);
    authorize(&server, &parts, params).await
}

/// The authorization endpoint, parameters in a form body (OIDC Core §3.1.2.1).
#[utoipa::path(
    post,
    path = "/authorize",
    tag = "oauth",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
                 description = "The same parameters as `GET /authorize`"),
    responses(
        (status = 200, description = "Login or consent page, or the form_post page", content_type = "text/html"),
        (status = 303, description = "To the redirect URI with `code` or `error`, `state` and `iss`"),
        (status = 400, description = "Unknown client or unregistered redirect URI: an error page, no redirect", content_type = "text/html"),
        (status = 413, description = "Body too large", content_type = "text/html"),
    )
)]
pub async fn authorize_post(State(server): State<Arc<AuthServer>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_body(&server, body).await {
        Ok(b) => b,
        Err(r) => {
            server.metrics.request("authorize", "too_large");
            return r;
        }
    };
    let params = Params::from_form(&parts.headers, &body, server.cfg.max_param_bytes);
    authorize(&server, &parts, params).await
}

/// A form body, at most `max_body_bytes`, else a 413 page.
pub async fn read_body(server: &AuthServer, body: Body) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(body, server.cfg.max_body_bytes)
        .await
        .map_err(|_| {
            html::error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request too large",
                "The request is too large.",
            )
        })
}

/// The 400 page of stage 1.
fn refused(server: &AuthServer, message: &str) -> Response {
    server.metrics.request("authorize", "bad_request");
    html::error_page(StatusCode::BAD_REQUEST, "Invalid request", message)
}

async fn authorize(
    server: &AuthServer,
    parts: &Parts,
    params: Result<Params, OAuthError>,
) -> Response {
    // Stage 1: nothing is sent to a redirect URI until it is known to be the client's.
    let params = match params {
        Ok(p) => p,
        Err(e) => return refused(server, &e.description),
    };
    let Some(client_id) = params.get("client_id") else {
        return refused(server, "The request names no client (`client_id`).");
    };
    let client = match server.find_client(client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return refused(server, "The client is not known."),
        Err(e) => return flow::unavailable("looking up the client", &e),
    };
    let redirect_uri = match check_redirect(&client, &params) {
        Ok(u) => u,
        Err(m) => return refused(server, m),
    };

    // Stage 2: errors go to the client.
    let req = match check_request(&server.cfg, &client, &redirect_uri, &params) {
        Ok(r) => r,
        Err((target, e)) => return error_to_client(server, &target, &e),
    };

    let browser = Browser::from_parts(server, parts);
    let session = match flow::current_session(server, &browser).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let session = match session {
        Some(s) => match flow::session_user_active(server, &s).await {
            Ok(true) => Some(s),
            Ok(false) => None,
            Err(r) => return r,
        },
        None => None,
    };
    let now = server.clock.now().timestamp();
    let auth_time = session
        .as_ref()
        .map(|s| s.auth_time.as_ref().map_or(0, |t| t.seconds));
    let session = match session {
        Some(s) if !flow::needs_login(auth_time, now, req.prompt, req.max_age) => s,
        _ => {
            if req.prompt.none {
                let e = OAuthError::new(
                    "login_required",
                    StatusCode::BAD_REQUEST,
                    "the user must log in",
                );
                return error_to_client(server, &req.target, &e);
            }
            let id = match flow::new_pending(server, req, None).await {
                Ok(id) => id,
                Err(r) => return r,
            };
            server.metrics.request("authorize", "login_page");
            return super::login::login_page(
                server,
                &browser,
                &id,
                &client,
                None,
                SetCookies::default(),
            );
        }
    };

    let consent = match flow::consent_needed(
        server,
        client.settings.trusted,
        &session.user_id,
        &req,
    )
    .await
    {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !consent {
        return flow::issue_code(server, &req, &session, &browser).await;
    }
    if req.prompt.none {
        let e = OAuthError::new(
            "consent_required",
            StatusCode::BAD_REQUEST,
            "the user must consent",
        );
        return error_to_client(server, &req.target, &e);
    }
    let scopes = req.scopes.clone();
    let id = match flow::new_pending(server, req, Some(session.handle.clone())).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    server.metrics.request("authorize", "consent_page");
    super::consent::consent_page(
        server,
        &browser,
        &id,
        &client,
        &scopes,
        SetCookies::default(),
    )
}

/// The redirect URI: exactly one of the client's registered URIs (string comparison, no
/// normalization), or the only one when omitted outside OpenID Connect (which requires
/// it, OIDC Core §3.1.2.1). The error is the page's message.
pub fn check_redirect(client: &ClientRow, params: &Params) -> Result<String, &'static str> {
    let registered = &client.settings.redirect_uris;
    match params.get("redirect_uri") {
        Some(u) => registered
            .iter()
            .find(|r| r.as_str() == u)
            .cloned()
            .ok_or("The redirect URI is not registered for this client."),
        None => {
            let openid = params
                .get("scope")
                .is_some_and(|s| s.split(' ').any(|t| t == "openid"));
            match registered.as_slice() {
                [only] if !openid => Ok(only.clone()),
                _ => Err("The request must name its redirect URI (`redirect_uri`)."),
            }
        }
    }
}

/// Stage 2: the request against the client and the registry. Errors carry where they go.
pub fn check_request(
    cfg: &OAuthConfig,
    client: &ClientRow,
    redirect_uri: &str,
    params: &Params,
) -> Result<AuthRequest, (Target, OAuthError)> {
    let state = params.get("state").map(str::to_owned);
    let mut target = Target {
        redirect_uri: redirect_uri.to_owned(),
        mode: ResponseMode::Query,
        state,
    };
    let fail = |t: &Target, e: OAuthError| Err((t.clone(), e));
    match params.get("response_mode") {
        None | Some("query") => {}
        Some("form_post") => target.mode = ResponseMode::FormPost,
        Some(_) => {
            return fail(
                &target,
                OAuthError::invalid_request("response_mode must be `query` or `form_post`"),
            );
        }
    }
    if params.contains("request") {
        return fail(
            &target,
            OAuthError::new(
                "request_not_supported",
                StatusCode::BAD_REQUEST,
                "request objects are not supported",
            ),
        );
    }
    if params.contains("request_uri") {
        return fail(
            &target,
            OAuthError::new(
                "request_uri_not_supported",
                StatusCode::BAD_REQUEST,
                "request_uri is not supported",
            ),
        );
    }
    match params.get("response_type") {
        Some("code") => {}
        Some(_) => {
            return fail(
                &target,
                OAuthError::new(
                    "unsupported_response_type",
                    StatusCode::BAD_REQUEST,
                    "only response_type `code` is supported",
                ),
            );
        }
        None => {
            return fail(
                &target,
                OAuthError::invalid_request("missing parameter `response_type`"),
            );
        }
    }
    if !client
        .settings
        .grant_types
        .contains(&GrantType::AuthorizationCode)
    {
        return fail(
            &target,
            OAuthError::unauthorized_client("the client may not use the authorization code grant"),
        );
    }
    let Some(scopes) = params.get("scope").and_then(scope_list) else {
        return fail(
            &target,
            OAuthError::invalid_scope("scope is missing or malformed"),
        );
    };
    if scopes.is_empty() {
        return fail(&target, OAuthError::invalid_scope("scope is required"));
    }
    if let Some(s) = scopes
        .iter()
        .find(|s| !cfg.is_registered_scope(s) || !client.settings.scopes.contains(s))
    {
        let mut shown: String = s.chars().take(64).collect();
        shown.retain(|c| c.is_ascii_graphic());
        return fail(
            &target,
            OAuthError::invalid_scope(format!("scope `{shown}` is not allowed for this client")),
        );
    }
    let code_challenge = match (
        params.get("code_challenge"),
        params.get("code_challenge_method"),
    ) {
        (Some(c), Some("S256")) if is_s256_challenge(c) => Some(c.to_owned()),
        (Some(_), Some("S256")) => {
            return fail(
                &target,
                OAuthError::invalid_request(
                    "code_challenge must be 43 base64url characters (S256)",
                ),
            );
        }
        (Some(_), _) => {
            return fail(
                &target,
                OAuthError::invalid_request("code_challenge_method must be `S256`"),
            );
        }
        (None, Some(_)) => {
            return fail(
                &target,
                OAuthError::invalid_request("code_challenge_method without code_challenge"),
            );
        }
        (None, None) if client.settings.public || client.settings.require_pkce => {
            return fail(
                &target,
                OAuthError::invalid_request("code_challenge is required (PKCE, S256)"),
            );
        }
        (None, None) => None,
    };
    let prompt = match params.get("prompt").map(parse_prompt) {
        None => Prompt::default(),
        Some(Ok(p)) => p,
        Some(Err(m)) => return fail(&target, OAuthError::invalid_request(m)),
    };
    let max_age = match params.get("max_age") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => {
                return fail(
                    &target,
                    OAuthError::invalid_request("max_age must be a non-negative integer"),
                );
            }
        },
    };
    Ok(AuthRequest {
        client_id: client.client_id.clone(),
        target,
        scopes,
        nonce: params.get("nonce").map(str::to_owned),
        code_challenge,
        prompt,
        max_age,
    })
}

/// BASE64URL(SHA-256(verifier)) without padding: exactly 43 characters.
pub fn is_s256_challenge(c: &str) -> bool {
    c.len() == 43
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `prompt`: space-separated `none`, `login`, `consent`; `none` alone.
pub fn parse_prompt(raw: &str) -> Result<Prompt, &'static str> {
    let mut p = Prompt::default();
    for v in raw.split(' ').filter(|v| !v.is_empty()) {
        match v {
            "none" => p.none = true,
            "login" => p.login = true,
            "consent" => p.consent = true,
            _ => return Err("prompt values are `none`, `login` and `consent`"),
        }
    }
    if p.none && (p.login || p.consent) {
        return Err("prompt `none` cannot be combined with another value");
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuthMethod, ClientSettings};

    fn client(public: bool, require_pkce: bool) -> ClientRow {
        ClientRow {
            client_id: "app".into(),
            settings: ClientSettings {
                name: "App".into(),
                public,
                auth_method: if public {
                    AuthMethod::None
                } else {
                    AuthMethod::ClientSecretBasic
                },
                grant_types: vec![GrantType::AuthorizationCode],
                redirect_uris: vec!["https://app.example/cb".into()],
                post_logout_redirect_uris: vec![],
                scopes: vec!["openid".into(), "email".into(), "custom".into()],
                jwks_json: None,
                access_ttl_seconds: 0,
                refresh_ttl_seconds: 0,
                id_ttl_seconds: 0,
                trusted: false,
                rate_limit_tier: String::new(),
                require_pkce,
                dynamically_registered: false,
            },
            secret_hash: None,
            registration_token_hash: None,
            version: 1,
            created_us: 0,
            updated_us: 0,
            secret_rotated_us: None,
        }
    }

    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn params(extra: &str) -> Params {
        let base = format!(
            "response_type=code&client_id=app&scope=openid%20email&state=xyz\
             &code_challenge={CHALLENGE}&code_challenge_method=S256{extra}"
        );
        Params::parse(base.as_bytes(), 2048).unwrap()
    }

    fn check(c: &ClientRow, p: &Params) -> Result<AuthRequest, (Target, OAuthError)> {
        check_request(&OAuthConfig::default(), c, "https://app.example/cb", p)
    }

    fn err(c: &ClientRow, extra: &str) -> (Target, &'static str) {
        let (t, e) = check(c, &params(extra)).unwrap_err();
        (t, e.error)
    }

    #[test]
    fn redirect_uri_is_an_exact_registered_string() {
        let c = client(true, true);
        let p = |q: &str| Params::parse(q.as_bytes(), 2048).unwrap();
        assert_eq!(
            check_redirect(&c, &p("redirect_uri=https://app.example/cb")).unwrap(),
            "https://app.example/cb"
        );
        for bad in [
            "https://app.example/cb/",
            "https://app.example/cb/x",
            "https://app.example:444/cb",
            "https://app.example/cb?x=1",
            "https://evil@app.example/cb",
            "https://app.example%2Fcb",
            "https://APP.example/cb",
            "http://app.example/cb",
            "https://app.example.evil/cb",
        ] {
            let q = form_urlencoded::Serializer::new(String::new())
                .append_pair("redirect_uri", bad)
                .finish();
            assert!(check_redirect(&c, &p(&q)).is_err(), "{bad}");
        }
        // Omitted: the only registered URI, except for OpenID requests.
        assert_eq!(
            check_redirect(&c, &p("scope=email")).unwrap(),
            "https://app.example/cb"
        );
        assert!(check_redirect(&c, &p("scope=openid%20email")).is_err());
        let mut two = c.clone();
        two.settings.redirect_uris.push("https://app.example/b".into());
        assert!(check_redirect(&two, &p("scope=email")).is_err());
    }

    #[test]
    fn a_good_request_is_accepted() {
        let r = check(&client(true, true), &params("&nonce=n1&prompt=login&max_age=0")).unwrap();
        assert_eq!(r.scopes, vec!["openid".to_owned(), "email".to_owned()]);
        assert_eq!(r.code_challenge.as_deref(), Some(CHALLENGE));
        assert_eq!(r.target.state.as_deref(), Some("xyz"));
        assert_eq!(r.target.mode, ResponseMode::Query);
        assert_eq!(r.nonce.as_deref(), Some("n1"));
        assert!(r.prompt.login && !r.prompt.none);
        assert_eq!(r.max_age, Some(0));
        let r = check(&client(true, true), &params("&response_mode=form_post")).unwrap();
        assert_eq!(r.target.mode, ResponseMode::FormPost);
    }

    #[test]
    fn errors_carry_the_rfc_code_and_state() {
        let c = client(true, true);
        let (t, e) = err(&c, "&response_mode=fragment");
        assert_eq!((t.mode, e), (ResponseMode::Query, "invalid_request"));
        assert_eq!(t.state.as_deref(), Some("xyz"));
        assert_eq!(err(&c, "&request=eyJ").1, "request_not_supported");
        assert_eq!(
            err(&c, "&request_uri=https://x").1,
            "request_uri_not_supported"
        );
        let token = Params::parse(
            format!("response_type=token&scope=openid&code_challenge={CHALLENGE}&code_challenge_method=S256").as_bytes(),
            2048,
        )
        .unwrap();
        assert_eq!(
            check(&c, &token).unwrap_err().1.error,
            "unsupported_response_type"
        );
        let mut cc = c.clone();
        cc.settings.grant_types = vec![GrantType::ClientCredentials];
        assert_eq!(err(&cc, "").1, "unauthorized_client");
        let (t, e) = err(&c, "&prompt=none%20login&response_mode=form_post");
        assert_eq!((t.mode, e), (ResponseMode::FormPost, "invalid_request"));
        assert_eq!(err(&c, "&prompt=select_account").1, "invalid_request");
        for bad in ["-1", "1.5", "x", "+3", "99999999999999999999999"] {
            assert_eq!(err(&c, &format!("&max_age={bad}")).1, "invalid_request");
        }
    }

    #[test]
    fn scopes_must_be_registered_and_allowed() {
        let c = client(true, true);
        let p = |scope: &str| {
            Params::parse(
                format!("response_type=code&scope={scope}&code_challenge={CHALLENGE}&code_challenge_method=S256").as_bytes(),
                2048,
            )
            .unwrap()
        };
        // Allowed for the client but not in the registry.
        assert_eq!(
            check(&c, &p("openid%20custom")).unwrap_err().1.error,
            "invalid_scope"
        );
        // In the registry but not allowed for the client.
        assert_eq!(
            check(&c, &p("openid%20profile")).unwrap_err().1.error,
            "invalid_scope"
        );
        assert_eq!(check(&c, &p("")).unwrap_err().1.error, "invalid_scope");
        assert_eq!(check(&c, &p("a%22b")).unwrap_err().1.error, "invalid_scope");
        let mut cfg = OAuthConfig::default();
        cfg.scopes.insert("custom".into(), "Custom".into());
        assert!(check_request(&cfg, &c, "https://app.example/cb", &p("custom")).is_ok());
    }

    #[test]
    fn pkce_is_s256_only_and_required_for_public_clients() {
        let public = client(true, false);
        let p = |q: &str| {
            Params::parse(
                format!("response_type=code&scope=openid{q}").as_bytes(),
                2048,
            )
            .unwrap()
        };
        assert_eq!(check(&public, &p("")).unwrap_err().1.error, "invalid_request");
        let strict = client(false, true);
        assert_eq!(check(&strict, &p("")).unwrap_err().1.error, "invalid_request");
        // A confidential client without require_pkce may omit it.
        let relaxed = client(false, false);
        assert_eq!(check(&relaxed, &p("")).unwrap().code_challenge, None);
        for q in [
            format!("&code_challenge={CHALLENGE}"),
            format!("&code_challenge={CHALLENGE}&code_challenge_method=plain"),
            "&code_challenge_method=S256".to_owned(),
            format!("&code_challenge={}&code_challenge_method=S256", &CHALLENGE[..42]),
            format!("&code_challenge={CHALLENGE}A&code_challenge_method=S256"),
            "&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw+cM&code_challenge_method=S256".to_owned(),
        ] {
            assert_eq!(
                check(&relaxed, &p(&q)).unwrap_err().1.error,
                "invalid_request",
                "{q}"
            );
        }
    }

    #[test]
    fn prompt_values() {
        assert_eq!(parse_prompt("").unwrap(), Prompt::default());
        let p = parse_prompt("login consent").unwrap();
        assert!(p.login && p.consent && !p.none);
        assert!(parse_prompt("none").unwrap().none);
        assert!(parse_prompt("none consent").is_err());
        assert!(parse_prompt("bogus").is_err());
    }
}
