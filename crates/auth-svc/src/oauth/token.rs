//! The token endpoint (RFC 6749 §3.2, §4.1.3, §4.4, §6; RFC 7636 §4.6; OIDC Core §3.1.3)
//! and `POST /security/auth`, the JSON variant first-party edge callers use.
//!
//! auth-svc decides *whether* tokens may be issued; token-svc signs them, keeps refresh
//! families (rotation, reuse detection) and the revocation list. So this module is the
//! policy: which client may use which grant, scope rules, code binding (client, redirect
//! URI, PKCE), and what happens on a replayed code (RFC 6749 §4.1.2: deny and revoke
//! what the code produced).
//!
//! `client_credentials` is the benchmarked path: one client lookup and one `IssueTokens`,
//! nothing else (no user lookup, no extra store writes).
//!
//! Every answer carries `Cache-Control: no-store` and `Pragma: no-cache` (RFC 6749 §5.1);
//! errors come from [`OAuthError`], metrics use only static labels, and the
//! `sec.auth.token.granted` event names grant, client and scope — never a token.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sec_common::events::Severity;
use sec_proto::token::v1::{
    Grant, IntrospectRefreshTokenRequest, IssueTokensRequest, IssueTokensResponse,
    RefreshTokensRequest, RevokeTokenRequest, revoke_token_request,
};
use serde::{Deserialize, Serialize};

use super::client_auth::{AuthenticatedClient, authenticate_client};
use super::error::OAuthError;
use super::params::{Params, scope_list};
use crate::engine::AuthServer;
use crate::store::{AuthMethod, ClientRow, CodeRow, CodeUse, GrantType, UserStatus};
use crate::users::LoginFailure;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new()
        .route("/token", post(token))
        .route("/security/auth", post(security_auth))
}

/// A successful token response (RFC 6749 §5.1, OIDC Core §3.1.3.3).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// RFC 6749 §5.2 error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_description: String,
}

/// Reads a form body under `max_body_bytes` and parses it strictly.
pub(crate) async fn read_form(
    server: &AuthServer,
    headers: &HeaderMap,
    body: Body,
) -> Result<Params, OAuthError> {
    let bytes = read_body(server, body).await?;
    Params::from_form(headers, &bytes, server.cfg.max_param_bytes)
}

/// The body, or 413 `invalid_request` beyond `max_body_bytes`.
pub(crate) async fn read_body(server: &AuthServer, body: Body) -> Result<Bytes, OAuthError> {
    axum::body::to_bytes(body, server.cfg.max_body_bytes)
        .await
        .map_err(|_| {
            OAuthError::new(
                "invalid_request",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than {} bytes",
                    server.cfg.max_body_bytes
                ),
            )
        })
}

/// `Cache-Control: no-store` and `Pragma: no-cache` on a response.
pub(crate) fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// The grant types of the token endpoint, as metric labels.
fn grant_label(grant: Option<&str>) -> &'static str {
    match grant {
        Some("authorization_code") => "authorization_code",
        Some("client_credentials") => "client_credentials",
        Some("refresh_token") => "refresh_token",
        Some("password") => "password",
        _ => "unsupported",
    }
}

fn outcome<T>(r: &Result<T, OAuthError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.error,
    }
}

/// Token endpoint: `authorization_code` (with PKCE), `client_credentials`, `refresh_token`.
#[utoipa::path(
    post,
    path = "/token",
    tag = "oauth",
    request_body(
        content = String,
        content_type = "application/x-www-form-urlencoded",
        description = "grant_type and its parameters (RFC 6749 §4.1.3, §4.4.2, §6), client authentication (client_secret_basic, client_secret_post, private_key_jwt, none)"
    ),
    responses(
        (status = 200, description = "Tokens issued", body = TokenResponse),
        (status = 400, description = "invalid_request, invalid_grant, unauthorized_client, unsupported_grant_type, invalid_scope", body = ErrorResponse),
        (status = 401, description = "invalid_client (with WWW-Authenticate: Basic when Basic was used)", body = ErrorResponse),
        (status = 413, description = "Body larger than the configured limit", body = ErrorResponse),
        (status = 503, description = "temporarily_unavailable", body = ErrorResponse)
    )
)]
pub async fn token(
    State(server): State<Arc<AuthServer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut grant = "unsupported";
    let result = async {
        let params = read_form(&server, &headers, body).await?;
        grant = grant_label(params.get("grant_type"));
        let grant_type = params.require("grant_type")?;
        let client = authenticate_client(&server, &headers, &params).await?;
        match GrantType::parse(grant_type) {
            Some(GrantType::AuthorizationCode) => {
                authorization_code(&server, &client, &params).await
            }
            Some(GrantType::ClientCredentials) => {
                require_grant(&client.client, GrantType::ClientCredentials)?;
                client_credentials(&server, &client.client, params.get("scope")).await
            }
            Some(GrantType::RefreshToken) => refresh(&server, &client, &params).await,
            None => Err(OAuthError::unsupported_grant_type(
                "grant_type is not supported",
            )),
        }
    }
    .await;
    respond(&server, grant, result)
}

fn respond(
    server: &AuthServer,
    grant: &'static str,
    result: Result<TokenResponse, OAuthError>,
) -> Response {
    server.metrics.grant(grant, outcome(&result));
    server.metrics.request("token", outcome(&result));
    match result {
        Ok(t) => no_store((StatusCode::OK, Json(t)).into_response()),
        Err(e) => e.into_response(),
    }
}

fn require_grant(client: &ClientRow, grant: GrantType) -> Result<(), OAuthError> {
    if client.settings.grant_types.contains(&grant) {
        Ok(())
    } else {
        Err(OAuthError::unauthorized_client(format!(
            "the client is not registered for {}",
            grant.as_str()
        )))
    }
}

/// The answer for tokens token-svc issued.
fn response(server: &AuthServer, t: IssueTokensResponse) -> Result<TokenResponse, OAuthError> {
    let access = t.access_token.ok_or_else(|| {
        OAuthError::server_error("issuing tokens", &"token-svc returned no access token")
    })?;
    let expires_in = access
        .expires_at
        .as_ref()
        .map(|e| (e.seconds - server.clock.now().timestamp()).max(0))
        .unwrap_or(0);
    Ok(TokenResponse {
        access_token: access.token,
        token_type: "Bearer".into(),
        expires_in,
        scope: (!t.scope.is_empty()).then_some(t.scope),
        refresh_token: t.refresh_token.map(|r| r.token),
        id_token: t.id_token.map(|i| i.token),
    })
}

/// The user claims for token-svc's ID token: `sub` is the grant's subject, set by
/// token-svc (which refuses reserved claims here).
fn id_claims(mut claims: serde_json::Map<String, serde_json::Value>) -> String {
    claims.remove("sub");
    serde_json::Value::Object(claims).to_string()
}

fn granted_event(
    server: &AuthServer,
    grant: &'static str,
    client_id: &str,
    subject: &str,
    scope: &str,
) {
    let mut e = server.event("sec.auth.token.granted");
    e.subject = subject.to_owned();
    e.details.insert("grant_type".into(), grant.into());
    e.details.insert("client_id".into(), client_id.to_owned());
    e.details.insert("scope".into(), scope.to_owned());
    server.publish(e);
}

// ---------------------------------------------------------------------------------------
// client_credentials

/// RFC 6749 §4.4: confidential clients only; scope within the client's; no refresh or
/// ID token (§4.4.3).
async fn client_credentials(
    server: &AuthServer,
    client: &ClientRow,
    requested: Option<&str>,
) -> Result<TokenResponse, OAuthError> {
    if client.settings.public || client.settings.auth_method == AuthMethod::None {
        return Err(OAuthError::unauthorized_client(
            "public clients cannot use client_credentials",
        ));
    }
    let scope = credentials_scope(&client.settings.scopes, requested)?;
    let req = IssueTokensRequest {
        grant: Some(Grant {
            subject: client.client_id.clone(),
            client_id: client.client_id.clone(),
            scope: scope.join(" "),
            audience: server.cfg.default_audience.clone(),
            ..Grant::default()
        }),
        access_ttl_seconds: client.settings.access_ttl_seconds,
        ..IssueTokensRequest::default()
    };
    let issued = server
        .tokens
        .clone()
        .issue_tokens(req)
        .await
        .map_err(|s| OAuthError::from_peer("issuing client_credentials tokens", &s))?
        .into_inner();
    let resp = response(server, issued)?;
    granted_event(
        server,
        "client_credentials",
        &client.client_id,
        &client.client_id,
        resp.scope.as_deref().unwrap_or_default(),
    );
    Ok(resp)
}

/// The scope of a client_credentials grant: the requested one if the client has every
/// scope of it, else `invalid_scope`; by default the client's scopes without the
/// user-only `openid` and `offline_access`.
pub fn credentials_scope(
    client_scopes: &[String],
    requested: Option<&str>,
) -> Result<Vec<String>, OAuthError> {
    const USER_ONLY: [&str; 2] = ["openid", "offline_access"];
    match requested {
        None => Ok(client_scopes
            .iter()
            .filter(|s| !USER_ONLY.contains(&s.as_str()))
            .cloned()
            .collect()),
        Some(raw) => {
            let list =
                scope_list(raw).ok_or_else(|| OAuthError::invalid_scope("malformed scope"))?;
            for s in &list {
                if USER_ONLY.contains(&s.as_str()) {
                    return Err(OAuthError::invalid_scope(format!(
                        "`{s}` needs a user; client_credentials has none"
                    )));
                }
                if !client_scopes.contains(s) {
                    return Err(OAuthError::invalid_scope(
                        "the requested scope exceeds the client's",
                    ));
                }
            }
            Ok(list)
        }
    }
}

// ---------------------------------------------------------------------------------------
// authorization_code

/// RFC 7636 §4.1: `code_verifier` = 43..=128 of `[A-Za-z0-9-._~]`.
pub fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// RFC 7636 §4.6 (S256 only): BASE64URL(SHA256(verifier)) == challenge, in constant time.
/// A verifier without a stored challenge, or a challenge without a verifier, fails.
pub fn pkce_ok(challenge: Option<&str>, verifier: Option<&str>) -> bool {
    match (challenge, verifier) {
        (None, None) => true,
        (Some(c), Some(v)) if valid_verifier(v) => {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, v.as_bytes());
            let computed = URL_SAFE_NO_PAD.encode(d.as_ref());
            aws_lc_rs::constant_time::verify_slices_are_equal(computed.as_bytes(), c.as_bytes())
                .is_ok()
        }
        _ => false,
    }
}

async fn authorization_code(
    server: &AuthServer,
    client: &AuthenticatedClient,
    params: &Params,
) -> Result<TokenResponse, OAuthError> {
    require_grant(&client.client, GrantType::AuthorizationCode)?;
    let code = params.require("code")?;
    let redirect_uri = params.require("redirect_uri")?;
    let verifier = params.get("code_verifier");
    let code_hash = AuthServer::code_hash(code);

    let row = match server.store.consume_code(&code_hash, server.now_us()).await {
        Ok(CodeUse::Fresh(row)) => row,
        Ok(CodeUse::Invalid) => {
            return Err(OAuthError::invalid_grant(
                "the authorization code is invalid or expired",
            ));
        }
        Ok(CodeUse::Replayed(row)) => {
            revoke_code_tokens(server, &row).await;
            return Err(OAuthError::invalid_grant(
                "the authorization code is invalid or expired",
            ));
        }
        Err(e) => {
            return Err(OAuthError::temporarily_unavailable(
                "consuming an authorization code",
                &e,
            ));
        }
    };
    let g = &row.grant;
    if g.client_id != client.id() {
        return Err(OAuthError::invalid_grant(
            "the authorization code was issued to another client",
        ));
    }
    if g.redirect_uri != redirect_uri {
        return Err(OAuthError::invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    if !pkce_ok(g.code_challenge.as_deref(), verifier) {
        return Err(OAuthError::invalid_grant("PKCE verification failed"));
    }
    let user = match server.find_user(&g.user_id).await {
        Ok(Some(u)) if u.status == UserStatus::Active => u,
        Ok(_) => return Err(OAuthError::invalid_grant("the user is not active")),
        Err(e) => return Err(OAuthError::temporarily_unavailable("looking up a user", &e)),
    };
    let scopes = scope_list(&g.scope).unwrap_or_default();
    let openid = scopes.iter().any(|s| s == "openid");
    let claims = server.user_claims(&user, &scopes);
    let settings = &client.client.settings;
    let req = IssueTokensRequest {
        grant: Some(Grant {
            subject: user.user_id.clone(),
            client_id: client.id().to_owned(),
            scope: scopes.join(" "),
            audience: server.cfg.default_audience.clone(),
            auth_time: g.auth_time,
            acr: g.acr.clone(),
            amr: g.amr.clone(),
            session_id: g.session_id.clone(),
            extra_claims_json: String::new(),
        }),
        access_ttl_seconds: settings.access_ttl_seconds,
        id_token: openid,
        nonce: g.nonce.clone().unwrap_or_default(),
        authorization_code: code.to_owned(),
        id_claims_json: if openid {
            id_claims(claims)
        } else {
            String::new()
        },
        id_ttl_seconds: settings.id_ttl_seconds,
        refresh_token: settings.grant_types.contains(&GrantType::RefreshToken),
        refresh_ttl_seconds: settings.refresh_ttl_seconds,
    };
    let issued = server
        .tokens
        .clone()
        .issue_tokens(req)
        .await
        .map_err(|s| OAuthError::from_peer("issuing authorization_code tokens", &s))?
        .into_inner();

    // Recorded so that a replay of this code can revoke what it produced; if that
    // cannot be recorded, the tokens are revoked now rather than left unrevocable.
    let access = issued.access_token.as_ref();
    let jti = access.map(|a| a.jti.clone()).unwrap_or_default();
    let exp_us = access
        .and_then(|a| a.expires_at.as_ref())
        .map(|t| t.seconds.saturating_mul(1_000_000))
        .unwrap_or(0);
    let family = issued.refresh_token.as_ref().map(|r| r.family_id.clone());
    if let Err(e) = server
        .store
        .record_code_tokens(&code_hash, family.as_deref(), &jti, exp_us)
        .await
    {
        let mut produced = row.clone();
        produced.family_id = family;
        produced.access_jti = Some(jti);
        produced.access_expires_us = Some(exp_us);
        revoke_produced(server, &produced, "code_record_failed").await;
        return Err(OAuthError::temporarily_unavailable(
            "recording the tokens of a code",
            &e,
        ));
    }
    let resp = response(server, issued)?;
    granted_event(
        server,
        "authorization_code",
        client.id(),
        &user.user_id,
        resp.scope.as_deref().unwrap_or_default(),
    );
    Ok(resp)
}

/// A code presented again: revoke the refresh family and the access token it produced
/// (RFC 6749 §4.1.2, RFC 9700 §4.5) and raise a warning.
async fn revoke_code_tokens(server: &AuthServer, row: &CodeRow) {
    revoke_produced(server, row, "code_replayed").await;
    let mut e = server.failure_event("sec.auth.code.replayed");
    e.severity = Severity::Medium as i32;
    e.subject = row.grant.user_id.clone();
    e.details
        .insert("client_id".into(), row.grant.client_id.clone());
    e.details.insert(
        "revoked".into(),
        (row.family_id.is_some() || row.access_jti.is_some()).to_string(),
    );
    server.publish(e);
}

async fn revoke_produced(server: &AuthServer, row: &CodeRow, reason: &str) {
    use revoke_token_request::Target;
    let mut targets = Vec::new();
    if let Some(f) = &row.family_id {
        targets.push((Target::FamilyId(f.clone()), None));
    }
    if let Some(j) = row.access_jti.as_ref().filter(|j| !j.is_empty()) {
        let exp = row.access_expires_us.map(|us| prost_types::Timestamp {
            seconds: us.div_euclid(1_000_000),
            nanos: 0,
        });
        targets.push((Target::Jti(j.clone()), exp));
    }
    for (target, expires_at) in targets {
        let req = RevokeTokenRequest {
            target: Some(target),
            expires_at,
            requesting_client_id: String::new(),
            reason: reason.to_owned(),
        };
        if let Err(s) = server.tokens.clone().revoke_token(req).await {
            tracing::error!(error = %s, "revoking the tokens of a replayed code failed");
        }
    }
}

// ---------------------------------------------------------------------------------------
// refresh_token

/// RFC 6749 §6. token-svc rotates and detects reuse; here: the client's grant, the
/// user still active, and the ID token again when the scope has `openid`.
async fn refresh(
    server: &AuthServer,
    client: &AuthenticatedClient,
    params: &Params,
) -> Result<TokenResponse, OAuthError> {
    require_grant(&client.client, GrantType::RefreshToken)?;
    let refresh_token = params.require("refresh_token")?;
    let narrowed = match params.get("scope") {
        Some(raw) => {
            let list =
                scope_list(raw).ok_or_else(|| OAuthError::invalid_scope("malformed scope"))?;
            (!list.is_empty()).then(|| list.join(" "))
        }
        None => None,
    };
    // What the family is (scope, user): needed for the ID token and the user check. An
    // inactive token still goes to RefreshTokens, which detects reuse of a rotated one.
    let family = server
        .tokens
        .clone()
        .introspect_refresh_token(IntrospectRefreshTokenRequest {
            refresh_token: refresh_token.to_owned(),
        })
        .await
        .map_err(|s| OAuthError::from_peer("introspecting a refresh token", &s))?
        .into_inner();
    let mut id_token = false;
    let mut id_claims_json = String::new();
    if family.active && family.client_id == client.id() {
        if let Some(n) = &narrowed {
            let granted: Vec<&str> = family.scope.split(' ').collect();
            if n.split(' ').any(|s| !granted.contains(&s)) {
                // RFC 6749 §6: the scope may only narrow; the token stays usable.
                return Err(OAuthError::invalid_scope(
                    "the requested scope exceeds the one originally granted",
                ));
            }
        }
        let scope = narrowed.clone().unwrap_or_else(|| family.scope.clone());
        let scopes = scope_list(&scope).unwrap_or_default();
        let user = match server.find_user(&family.subject).await {
            Ok(u) => u,
            Err(e) => return Err(OAuthError::temporarily_unavailable("looking up a user", &e)),
        };
        match user {
            Some(u) if u.status == UserStatus::Active => {
                if scopes.iter().any(|s| s == "openid") {
                    id_token = true;
                    id_claims_json = id_claims(server.user_claims(&u, &scopes));
                }
            }
            _ => {
                let req = RevokeTokenRequest {
                    target: Some(revoke_token_request::Target::FamilyId(
                        family.family_id.clone(),
                    )),
                    reason: "user_inactive".into(),
                    ..RevokeTokenRequest::default()
                };
                if let Err(s) = server.tokens.clone().revoke_token(req).await {
                    tracing::error!(error = %s, "revoking the family of an inactive user failed");
                }
                return Err(OAuthError::invalid_grant("the user is not active"));
            }
        }
    }
    let req = RefreshTokensRequest {
        refresh_token: refresh_token.to_owned(),
        client_id: client.id().to_owned(),
        scope: narrowed.unwrap_or_default(),
        access_ttl_seconds: client.client.settings.access_ttl_seconds,
        id_token,
        id_claims_json,
    };
    let refreshed = server
        .tokens
        .clone()
        .refresh_tokens(req)
        .await
        .map_err(|s| OAuthError::from_peer("refreshing tokens", &s))?
        .into_inner();
    let issued = refreshed.tokens.ok_or_else(|| {
        OAuthError::server_error("refreshing tokens", &"token-svc returned no tokens")
    })?;
    let resp = response(server, issued)?;
    granted_event(
        server,
        "refresh_token",
        client.id(),
        &family.subject,
        resp.scope.as_deref().unwrap_or_default(),
    );
    Ok(resp)
}

// ---------------------------------------------------------------------------------------
// POST /security/auth

/// The JSON body of `POST /security/auth`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityAuthRequest {
    /// `password` (trusted confidential clients only) or `client_credentials`.
    pub grant_type: String,
    pub client_id: String,
    pub client_secret: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Space-separated; default: the client's scopes.
    #[serde(default)]
    pub scope: Option<String>,
}

/// First-party JSON token endpoint: the resource-owner password grant for trusted
/// confidential clients, or client credentials.
#[utoipa::path(
    post,
    path = "/security/auth",
    tag = "oauth",
    request_body(content = SecurityAuthRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Tokens issued", body = TokenResponse),
        (status = 400, description = "invalid_request, invalid_grant, unauthorized_client, unsupported_grant_type, invalid_scope", body = ErrorResponse),
        (status = 401, description = "invalid_client", body = ErrorResponse),
        (status = 413, description = "Body larger than the configured limit", body = ErrorResponse),
        (status = 503, description = "temporarily_unavailable", body = ErrorResponse)
    )
)]
pub async fn security_auth(
    State(server): State<Arc<AuthServer>>,
    parts: axum::http::request::Parts,
    body: Body,
) -> Response {
    let headers = &parts.headers;
    let source_ip = crate::pages::flow::client_ip(&parts.extensions)
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let mut grant = "unsupported";
    let mut login_failed = false;
    let result = async {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(OAuthError::invalid_request(
                "the body must be application/json",
            ));
        }
        let bytes = read_body(&server, body).await?;
        let req: SecurityAuthRequest = serde_json::from_slice(&bytes)
            .map_err(|_| OAuthError::invalid_request("the body is not a valid request"))?;
        grant = grant_label(Some(&req.grant_type));
        let max = server.cfg.max_param_bytes;
        let too_long = [
            Some(&req.client_id),
            Some(&req.client_secret),
            req.username.as_ref(),
            req.password.as_ref(),
            req.scope.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|v| v.len() > max);
        if too_long {
            return Err(OAuthError::invalid_request(format!(
                "a field is longer than {max} bytes"
            )));
        }
        let client = json_client(&server, &req.client_id, &req.client_secret).await?;
        match req.grant_type.as_str() {
            "client_credentials" => {
                require_grant(&client, GrantType::ClientCredentials)?;
                client_credentials(&server, &client, req.scope.as_deref()).await
            }
            "password" => password(&server, &client, &req, &source_ip, &mut login_failed).await,
            _ => Err(OAuthError::unsupported_grant_type(
                "grant_type must be password or client_credentials",
            )),
        }
    }
    .await;
    server.metrics.grant(grant, outcome(&result));
    server.metrics.request("security_auth", outcome(&result));
    match result {
        Ok(t) => no_store((StatusCode::OK, Json(t)).into_response()),
        Err(e) => {
            let mut resp = e.into_response();
            if login_failed {
                crate::edge::mark_failure(&mut resp, sec_edge::FailureReason::LoginFailure);
            }
            resp
        }
    }
}

/// A confidential client with a secret, authenticated by the JSON body's secret.
async fn json_client(server: &AuthServer, id: &str, secret: &str) -> Result<ClientRow, OAuthError> {
    // Same checks as client_secret_post (one code path for secrets and failures); a
    // client registered for Basic may use this endpoint too, its secret is the same.
    let client = match server.find_client(id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            let _ = server.secrets.hash(secret);
            return Err(OAuthError::invalid_client(
                "client authentication failed",
                false,
            ));
        }
        Err(e) => {
            return Err(OAuthError::temporarily_unavailable(
                "looking up a client",
                &e,
            ));
        }
    };
    if !client.settings.auth_method.has_secret() || !server.check_client_secret(&client, secret) {
        let mut e = server.failure_event("sec.auth.client.auth_failed");
        e.subject = client.client_id.clone();
        e.details.insert(
            "reason".into(),
            if client.settings.auth_method.has_secret() {
                "bad_secret"
            } else {
                "wrong_method"
            }
            .into(),
        );
        server.publish(e);
        server.metrics.request("client_auth", "bad_secret");
        return Err(OAuthError::invalid_client(
            "client authentication failed",
            false,
        ));
    }
    Ok(client)
}

/// The resource-owner password grant (RFC 6749 §4.3), for trusted first-party clients.
async fn password(
    server: &AuthServer,
    client: &ClientRow,
    req: &SecurityAuthRequest,
    source_ip: &str,
    login_failed: &mut bool,
) -> Result<TokenResponse, OAuthError> {
    if !client.settings.trusted || client.settings.public {
        return Err(OAuthError::unauthorized_client(
            "the password grant is for trusted confidential clients only",
        ));
    }
    let (Some(username), Some(password)) = (req.username.as_deref(), req.password.as_deref())
    else {
        return Err(OAuthError::invalid_request(
            "username and password are required",
        ));
    };
    let scopes = match req.scope.as_deref() {
        None => client.settings.scopes.clone(),
        Some(raw) => {
            let list =
                scope_list(raw).ok_or_else(|| OAuthError::invalid_scope("malformed scope"))?;
            if list.iter().any(|s| !client.settings.scopes.contains(s)) {
                return Err(OAuthError::invalid_scope(
                    "the requested scope exceeds the client's",
                ));
            }
            list
        }
    };
    let user = match server.verify_login(username, password, source_ip).await {
        Ok(u) => u,
        Err(LoginFailure::InvalidCredentials | LoginFailure::Disabled | LoginFailure::Locked) => {
            *login_failed = true;
            return Err(OAuthError::invalid_grant("invalid username or password"));
        }
        Err(LoginFailure::Unavailable(e)) => {
            return Err(OAuthError::temporarily_unavailable(
                "checking a password",
                &e,
            ));
        }
    };
    let openid = scopes.iter().any(|s| s == "openid");
    let settings = &client.settings;
    let issue = IssueTokensRequest {
        grant: Some(Grant {
            subject: user.user_id.clone(),
            client_id: client.client_id.clone(),
            scope: scopes.join(" "),
            audience: server.cfg.default_audience.clone(),
            auth_time: server.clock.now().timestamp(),
            acr: "0".into(),
            amr: vec!["pwd".into()],
            ..Grant::default()
        }),
        access_ttl_seconds: settings.access_ttl_seconds,
        id_token: openid,
        id_claims_json: if openid {
            id_claims(server.user_claims(&user, &scopes))
        } else {
            String::new()
        },
        id_ttl_seconds: settings.id_ttl_seconds,
        refresh_token: settings.grant_types.contains(&GrantType::RefreshToken),
        refresh_ttl_seconds: settings.refresh_ttl_seconds,
        ..IssueTokensRequest::default()
    };
    let issued = server
        .tokens
        .clone()
        .issue_tokens(issue)
        .await
        .map_err(|s| OAuthError::from_peer("issuing password tokens", &s))?
        .into_inner();
    let resp = response(server, issued)?;
    granted_event(
        server,
        "password",
        &client.client_id,
        &user.user_id,
        resp.scope.as_deref().unwrap_or_default(),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256() {
        // RFC 7636 Appendix B.
        let v = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let c = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_ok(Some(c), Some(v)));
        assert!(!pkce_ok(Some(c), Some(&v.replace('d', "e"))));
        // Missing on either side fails; neither is fine (no PKCE requested).
        assert!(!pkce_ok(Some(c), None));
        assert!(!pkce_ok(None, Some(v)));
        assert!(pkce_ok(None, None));
        // `plain` is not supported: the challenge equal to the verifier fails.
        assert!(!pkce_ok(Some(v), Some(v)));
    }

    #[test]
    fn verifier_syntax() {
        assert!(valid_verifier(&"a".repeat(43)));
        assert!(valid_verifier(&"A-._~9".repeat(22)[..128]));
        assert!(!valid_verifier(&"a".repeat(42)));
        assert!(!valid_verifier(&"a".repeat(129)));
        assert!(!valid_verifier(&format!("{}+", "a".repeat(43))));
        assert!(!valid_verifier(&format!("{}é", "a".repeat(43))));
    }

    #[test]
    fn client_credentials_scope_defaults_and_bounds() {
        let client: Vec<String> = ["openid", "api.read", "api.write", "offline_access"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            credentials_scope(&client, None).unwrap(),
            vec!["api.read".to_owned(), "api.write".to_owned()]
        );
        assert_eq!(
            credentials_scope(&client, Some("api.read api.read")).unwrap(),
            vec!["api.read".to_owned()]
        );
        for bad in ["api.admin", "openid", "offline_access", "api.read bad\"x"] {
            assert_eq!(
                credentials_scope(&client, Some(bad)).unwrap_err().error,
                "invalid_scope",
                "{bad}"
            );
        }
    }

    #[test]
    fn grant_labels_are_closed() {
        assert_eq!(grant_label(Some("urn:evil")), "unsupported");
        assert_eq!(grant_label(None), "unsupported");
        assert_eq!(grant_label(Some("refresh_token")), "refresh_token");
    }
}
