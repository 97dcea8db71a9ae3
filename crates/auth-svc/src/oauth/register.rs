//! Dynamic client registration: RFC 7591 `POST /register` and RFC 7592 management
//! (`GET|PUT|DELETE /register/{client_id}`).
//!
//! Who may register: the holder of the initial access token whose SHA-256
//! (`oauth.registration_token_hash`, compared in constant time) is configured, or the
//! admin, or anyone when `oauth.open_registration` is on (off by default). The metadata
//! becomes ordinary [`ClientSettings`] validated by the same rules as the admin API, with
//! `dynamically_registered` set and never `trusted`; clients, secrets, events and
//! compare-and-set all come from `clients.rs`, so a registered client is no different
//! from one an administrator made.
//!
//! The RFC 7592 registration access token is 256 random bits, returned once, stored
//! only as a keyed hash (like client secrets). A wrong token and an unknown client get
//! the same `401 invalid_token`, with the same work done (a keyed-hash check either way),
//! so the endpoint does not tell which clients exist.
//!
//! Metadata is parsed field by field so an error names the RFC 7591 field it is about;
//! unknown fields are ignored (RFC 7591 §2). `jwks_uri` is refused: the server fetches
//! nothing on a client's behalf (no SSRF surface); clients send `jwks` by value.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sec_common::auth::{Caller, bearer, hash_token};
use sec_common::error::{Error, ErrorCode};
use sec_common::events::{Actor, ActorKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::OAuthError;
use crate::clients::NewClient;
use crate::config::OAuthConfig;
use crate::engine::AuthServer;
use crate::store::{AuthMethod, ClientRow, ClientSettings, GrantType};

/// At most this many entries in a list of the metadata (redirect URIs, grant types, ...).
pub const MAX_LIST: usize = 32;
/// Strings of the metadata (a URI, a name) are at most this long.
pub const MAX_STRING: usize = 2_048;
/// At most this many keys in `jwks`.
pub const MAX_JWKS_KEYS: usize = 16;
/// Longer client ids in a management URL are refused before any lookup.
const MAX_CLIENT_ID: usize = 128;
/// Name of a registered client that sent no `client_name`.
const DEFAULT_NAME: &str = "Dynamically registered client";
/// Prefix of registration access tokens (lets secret scanners recognise them).
const REGISTRATION_TOKEN_PREFIX: &str = "reg_";

/// Client metadata a registration request may carry (RFC 7591 §2). Other fields are
/// ignored.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, ToSchema)]
pub struct ClientMetadata {
    /// Exact redirect URIs; required with the `authorization_code` grant.
    pub redirect_uris: Option<Vec<String>>,
    /// `client_secret_basic` (default), `client_secret_post`, `private_key_jwt` or `none`.
    pub token_endpoint_auth_method: Option<String>,
    /// `authorization_code` (default), `refresh_token`, `client_credentials`.
    pub grant_types: Option<Vec<String>>,
    /// Only `code`.
    pub response_types: Option<Vec<String>>,
    pub client_name: Option<String>,
    /// Space-separated scopes from the registry; default: the configured default scopes.
    pub scope: Option<String>,
    /// JWK Set (by value) of a `private_key_jwt` client.
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<Value>,
    /// Not supported: refused with `invalid_client_metadata` (send `jwks`).
    pub jwks_uri: Option<String>,
    pub post_logout_redirect_uris: Option<Vec<String>>,
    /// RFC 7592 update only: must be the client's id.
    pub client_id: Option<String>,
    /// RFC 7592 update only: if present, must be the client's current secret.
    pub client_secret: Option<String>,
}

/// The registration response (RFC 7591 §3.2.1, RFC 7592 §3).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ClientInformation {
    pub client_id: String,
    /// Only in the answer to the registration itself (never stored in the clear).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// 0: the secret does not expire. Present for clients with a secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_expires_at: Option<i64>,
    pub client_id_issued_at: i64,
    pub registration_access_token: String,
    pub registration_client_uri: String,
    pub client_name: String,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub token_endpoint_auth_method: String,
    pub grant_types: Vec<String>,
    pub response_types: Vec<String>,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<Value>,
}

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new()
        .route("/register", post(register))
        .route(
            "/register/{client_id}",
            axum::routing::get(read).put(update).delete(delete),
        )
}

// ---------------------------------------------------------------------------------
// Parsing and mapping (pure).

fn field<T: serde::de::DeserializeOwned>(
    obj: &Map<String, Value>,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, OAuthError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            OAuthError::invalid_client_metadata(format!("`{name}` must be {expected}"))
        }),
    }
}

/// The metadata of a JSON body, each known field type-checked and bounded.
pub fn parse_metadata(body: &[u8]) -> Result<ClientMetadata, OAuthError> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err(OAuthError::invalid_client_metadata(
            "the body must be a JSON object",
        ));
    };
    let list = "an array of strings";
    let text = "a string";
    let m = ClientMetadata {
        redirect_uris: field(&obj, "redirect_uris", list)?,
        token_endpoint_auth_method: field(&obj, "token_endpoint_auth_method", text)?,
        grant_types: field(&obj, "grant_types", list)?,
        response_types: field(&obj, "response_types", list)?,
        client_name: field(&obj, "client_name", text)?,
        scope: field(&obj, "scope", text)?,
        jwks: field(&obj, "jwks", "a JWK Set object")?,
        jwks_uri: field(&obj, "jwks_uri", text)?,
        post_logout_redirect_uris: field(&obj, "post_logout_redirect_uris", list)?,
        client_id: field(&obj, "client_id", text)?,
        client_secret: field(&obj, "client_secret", text)?,
    };
    for (name, l) in [
        ("redirect_uris", &m.redirect_uris),
        ("grant_types", &m.grant_types),
        ("response_types", &m.response_types),
        ("post_logout_redirect_uris", &m.post_logout_redirect_uris),
    ] {
        let l = l.as_deref().unwrap_or(&[]);
        if l.len() > MAX_LIST {
            return Err(OAuthError::invalid_client_metadata(format!(
                "`{name}` has more than {MAX_LIST} entries"
            )));
        }
        if l.iter().any(|s| s.len() > MAX_STRING) {
            return Err(OAuthError::invalid_client_metadata(format!(
                "an entry of `{name}` is longer than {MAX_STRING} bytes"
            )));
        }
    }
    for (name, s) in [
        ("token_endpoint_auth_method", &m.token_endpoint_auth_method),
        ("client_name", &m.client_name),
        ("scope", &m.scope),
        ("client_id", &m.client_id),
        ("client_secret", &m.client_secret),
    ] {
        if s.as_ref().is_some_and(|s| s.len() > MAX_STRING) {
            return Err(OAuthError::invalid_client_metadata(format!(
                "`{name}` is longer than {MAX_STRING} bytes"
            )));
        }
    }
    Ok(m)
}

/// The settings `m` asks for (RFC 7591 §2 defaults), before `validate_client_settings`.
pub fn to_settings(cfg: &OAuthConfig, m: &ClientMetadata) -> Result<ClientSettings, OAuthError> {
    fn bad(d: impl Into<String>) -> OAuthError {
        OAuthError::invalid_client_metadata(d)
    }
    if m.jwks_uri.is_some() {
        return Err(bad(
            "`jwks_uri` is not supported: send the keys by value in `jwks`",
        ));
    }
    let auth_method = match m.token_endpoint_auth_method.as_deref() {
        None => AuthMethod::ClientSecretBasic,
        Some(s) => AuthMethod::parse(s).ok_or_else(|| {
            bad("`token_endpoint_auth_method` must be client_secret_basic, client_secret_post, private_key_jwt or none")
        })?,
    };
    let mut grant_types: Vec<GrantType> = Vec::new();
    for g in m
        .grant_types
        .clone()
        .unwrap_or_else(|| vec!["authorization_code".into()])
    {
        let g = GrantType::parse(&g).ok_or_else(|| {
            bad("`grant_types` may contain authorization_code, refresh_token and client_credentials only")
        })?;
        if !grant_types.contains(&g) {
            grant_types.push(g);
        }
    }
    if grant_types.is_empty() {
        return Err(bad("`grant_types` must not be empty"));
    }
    let code = grant_types.contains(&GrantType::AuthorizationCode);
    // RFC 7591 §2.1: response types and grant types must agree.
    if let Some(rts) = &m.response_types {
        if rts.iter().any(|r| r != "code") {
            return Err(bad("`response_types` may contain `code` only"));
        }
        if code != rts.iter().any(|r| r == "code") {
            return Err(bad(
                "`response_types` must be [\"code\"] exactly when `grant_types` has authorization_code",
            ));
        }
    }
    let scopes = match &m.scope {
        None => cfg.default_client_scopes.clone(),
        Some(s) => {
            let l = super::params::scope_list(s)
                .ok_or_else(|| bad("`scope` is not a space-separated list of scope tokens"))?;
            if let Some(unknown) = l.iter().find(|s| !cfg.is_registered_scope(s)) {
                return Err(bad(format!(
                    "`scope`: `{unknown}` is not a registered scope"
                )));
            }
            if l.len() > MAX_LIST {
                return Err(bad(format!("`scope` has more than {MAX_LIST} scopes")));
            }
            l
        }
    };
    let jwks_json = match &m.jwks {
        None => None,
        Some(j) => {
            let keys = j.get("keys").and_then(Value::as_array).ok_or_else(|| {
                bad("`jwks` must be a JWK Set: an object with a `keys` array")
            })?;
            if keys.is_empty() || keys.len() > MAX_JWKS_KEYS {
                return Err(bad(format!(
                    "`jwks` must have between 1 and {MAX_JWKS_KEYS} keys"
                )));
            }
            Some(j.to_string())
        }
    };
    if auth_method == AuthMethod::PrivateKeyJwt && jwks_json.is_none() {
        return Err(bad("`jwks` is required with private_key_jwt"));
    }
    let name = m
        .client_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_NAME.to_owned());
    Ok(ClientSettings {
        name,
        public: auth_method == AuthMethod::None,
        auth_method,
        grant_types,
        redirect_uris: m.redirect_uris.clone().unwrap_or_default(),
        post_logout_redirect_uris: m.post_logout_redirect_uris.clone().unwrap_or_default(),
        scopes,
        jwks_json,
        access_ttl_seconds: 0,
        refresh_ttl_seconds: 0,
        id_ttl_seconds: 0,
        trusted: false,
        rate_limit_tier: String::new(),
        require_pkce: true,
        dynamically_registered: true,
    })
}

/// The RFC 7591 name of a `ClientSettings` field (as `validate_client_settings` names it).
fn rfc_field(settings_field: &str) -> &'static str {
    match settings_field {
        f if f.starts_with("post_logout_redirect_uris") => "post_logout_redirect_uris",
        f if f.starts_with("redirect_uris") => "redirect_uris",
        f if f.starts_with("token_endpoint_auth_method")
            || f.starts_with("auth_method")
            || f.starts_with("public") =>
        {
            "token_endpoint_auth_method"
        }
        f if f.starts_with("grant_types") => "grant_types",
        f if f.starts_with("scopes") => "scope",
        f if f.starts_with("jwks") => "jwks",
        f if f.starts_with("name") => "client_name",
        _ => "client metadata",
    }
}

/// A refusal of `validate_client_settings` / `create_client` / `update_client` as the
/// RFC 7591 §3.2.2 error (the field named), or the platform error it is.
fn from_client_error(context: &'static str, e: &Error) -> OAuthError {
    match e.code {
        ErrorCode::InvalidArgument | ErrorCode::FailedPrecondition => {
            let field = rfc_field(e.field.as_deref().unwrap_or(""));
            let description = format!("`{field}`: {}", e.message);
            if field == "redirect_uris" {
                OAuthError::invalid_redirect_uri(description)
            } else {
                OAuthError::invalid_client_metadata(description)
            }
        }
        ErrorCode::Unavailable | ErrorCode::DeadlineExceeded => {
            OAuthError::temporarily_unavailable(context, e)
        }
        _ => OAuthError::server_error(context, e),
    }
}

/// `/register/<client_id>` with the id percent-encoded as a path segment.
fn client_uri(cfg: &OAuthConfig, client_id: &str) -> String {
    let mut seg = String::with_capacity(client_id.len());
    for b in client_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            seg.push(char::from(b));
        } else {
            seg.push_str(&format!("%{b:02X}"));
        }
    }
    cfg.url(&format!("/register/{seg}"))
}

/// What the registrant sees of `row`.
pub fn information(
    cfg: &OAuthConfig,
    row: &ClientRow,
    client_secret: Option<String>,
    registration_access_token: &str,
) -> ClientInformation {
    let s = &row.settings;
    let code = s.grant_types.contains(&GrantType::AuthorizationCode);
    ClientInformation {
        client_id: row.client_id.clone(),
        client_secret,
        client_secret_expires_at: s.auth_method.has_secret().then_some(0),
        client_id_issued_at: row.created_us.div_euclid(1_000_000),
        registration_access_token: registration_access_token.to_owned(),
        registration_client_uri: client_uri(cfg, &row.client_id),
        client_name: s.name.clone(),
        redirect_uris: s.redirect_uris.clone(),
        post_logout_redirect_uris: s.post_logout_redirect_uris.clone(),
        token_endpoint_auth_method: s.auth_method.as_str().to_owned(),
        grant_types: s
            .grant_types
            .iter()
            .map(|g| g.as_str().to_owned())
            .collect(),
        response_types: if code { vec!["code".into()] } else { vec![] },
        scope: s.scopes.join(" "),
        jwks: s
            .jwks_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok()),
    }
}

/// Whether `token`'s SHA-256 is the configured initial access token hash (`sha256:<hex>`,
/// as `secd hash-token` prints; the prefix and hex case are not significant). Constant
/// time in the compared bytes.
fn is_initial_access_token(configured: &str, token: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim();
        s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase()
    };
    let want = norm(configured);
    let got = norm(&hash_token(token));
    want.len() == 64
        && aws_lc_rs::constant_time::verify_slices_are_equal(want.as_bytes(), got.as_bytes())
            .is_ok()
}

// ---------------------------------------------------------------------------------
// Handlers.

fn json_response(status: StatusCode, info: &ClientInformation) -> Response {
    let mut resp = (status, axum::Json(info)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn no_content() -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The bearer token of the request: `Ok(None)` when there is no `Authorization`.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, OAuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(OAuthError::invalid_request("more than one Authorization header")
            .with_challenge(r#"Bearer error="invalid_request""#));
    }
    v.to_str()
        .ok()
        .and_then(bearer)
        .map(Some)
        .ok_or_else(|| OAuthError::invalid_token("authorization must be `Bearer <token>`"))
}

/// Who is registering (RFC 7591 §3: the initial access token, here also the admin token),
/// as the actor of the client's creation event.
async fn registrant(server: &AuthServer, headers: &HeaderMap) -> Result<Actor, OAuthError> {
    let Some(token) = bearer_token(headers)? else {
        if server.cfg.open_registration {
            return Ok(Actor {
                kind: ActorKind::Anonymous as i32,
                id: "open-registration".into(),
            });
        }
        return Err(OAuthError::missing_token());
    };
    if let Some(h) = &server.cfg.registration_token_hash {
        if is_initial_access_token(h.expose(), token) {
            return Ok(Actor {
                kind: ActorKind::Client as i32,
                id: "initial-access-token".into(),
            });
        }
    }
    match server.admin.authenticate_token(token).await {
        Ok(Caller::Admin) => Ok(Caller::Admin.actor()),
        Ok(_) => Err(OAuthError::invalid_token(
            "not an initial access token for registration",
        )),
        Err(e) if e.code == ErrorCode::Unauthenticated => Err(OAuthError::invalid_token(
            "invalid initial access token",
        )),
        Err(e) => Err(OAuthError::temporarily_unavailable(
            "checking a registration token",
            &e,
        )),
    }
}

/// The client a registration access token manages (RFC 7592 §2). Unknown client and
/// wrong token are the same `401 invalid_token`, after the same keyed-hash check.
async fn managed_client(
    server: &AuthServer,
    headers: &HeaderMap,
    client_id: &str,
) -> Result<(ClientRow, String), OAuthError> {
    let token = bearer_token(headers)?.ok_or_else(OAuthError::missing_token)?;
    let invalid = || OAuthError::invalid_token("invalid registration access token");
    let row = if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID {
        None
    } else {
        server
            .find_client(client_id)
            .await
            .map_err(|e| from_client_error("reading a registered client", &e))?
    };
    let ok = match row.as_ref().and_then(|r| r.registration_token_hash.as_deref()) {
        Some(stored) => server.secrets.verify(token, stored),
        None => {
            // Same work as a real check, so timing does not reveal the client exists.
            let _ = server.secrets.verify(token, &[0_u8; 32]);
            false
        }
    };
    match row {
        Some(row) if ok => Ok((row, token.to_owned())),
        _ => Err(invalid()),
    }
}

/// Reads a JSON body of at most `max_body_bytes`.
async fn json_body(cfg: &OAuthConfig, headers: &HeaderMap, body: Body) -> Result<ClientMetadata, OAuthError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(OAuthError::invalid_client_metadata(
            "the body must be application/json",
        ));
    }
    let bytes = axum::body::to_bytes(body, cfg.max_body_bytes)
        .await
        .map_err(|_| {
            OAuthError::new(
                "invalid_request",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {} bytes", cfg.max_body_bytes),
            )
        })?;
    parse_metadata(&bytes)
}

fn outcome(server: &AuthServer, endpoint: &'static str, r: Result<Response, OAuthError>) -> Response {
    match r {
        Ok(resp) => {
            server.metrics.request(endpoint, "ok");
            resp
        }
        Err(e) => {
            server.metrics.request(endpoint, e.error);
            e.into_response()
        }
    }
}

/// `POST /register` (RFC 7591 §3.1).
#[utoipa::path(
    post,
    path = "/register",
    tag = "registration",
    summary = "Register a client (RFC 7591)",
    security(("bearer" = []), ()),
    request_body(content = ClientMetadata, content_type = "application/json"),
    responses(
        (status = 201, description = "The registered client, its secret and registration access token", body = ClientInformation),
        (status = 400, description = "invalid_client_metadata or invalid_redirect_uri", body = super::openapi::OAuthErrorBody),
        (status = 401, description = "No or invalid initial access token", body = super::openapi::OAuthErrorBody),
        (status = 413, description = "The body is too large", body = super::openapi::OAuthErrorBody),
    ),
)]
pub async fn register(
    State(server): State<Arc<AuthServer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let actor = registrant(&server, &headers).await?;
        let m = json_body(&server.cfg, &headers, body).await?;
        let settings = to_settings(&server.cfg, &m)?;
        server
            .validate_client_settings(&settings)
            .map_err(|e| from_client_error("validating a registration", &e))?;
        let token = sec_common::secret::generate_secret(REGISTRATION_TOKEN_PREFIX)
            .map_err(|e| OAuthError::server_error("making a registration token", &e))?;
        let (row, secret) = server
            .create_client(
                NewClient {
                    client_id: None,
                    settings,
                    registration_token_hash: Some(server.secrets.hash(&token).to_vec()),
                },
                actor,
            )
            .await
            .map_err(|e| from_client_error("registering a client", &e))?;
        Ok(json_response(
            StatusCode::CREATED,
            &information(&server.cfg, &row, secret, &token),
        ))
    }
    .await;
    outcome(&server, "register", r)
}

fn client_actor(client_id: &str) -> Actor {
    Actor {
        kind: ActorKind::Client as i32,
        id: client_id.to_owned(),
    }
}

/// `GET /register/{client_id}` (RFC 7592 §2.1).
#[utoipa::path(
    get,
    path = "/register/{client_id}",
    tag = "registration",
    summary = "Read a registered client (RFC 7592)",
    security(("bearer" = [])),
    params(("client_id" = String, Path, description = "The registered client")),
    responses(
        (status = 200, description = "The client's current metadata", body = ClientInformation),
        (status = 401, description = "Invalid registration access token or unknown client", body = super::openapi::OAuthErrorBody),
    ),
)]
pub async fn read(
    State(server): State<Arc<AuthServer>>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let (row, token) = managed_client(&server, &headers, &client_id).await?;
        Ok(json_response(
            StatusCode::OK,
            &information(&server.cfg, &row, None, &token),
        ))
    }
    .await;
    outcome(&server, "register_read", r)
}

/// `PUT /register/{client_id}` (RFC 7592 §2.2): replaces the metadata; omitted fields
/// take their defaults. Settings only an administrator sets (trust, rate-limit tier,
/// lifetimes) are kept.
#[utoipa::path(
    put,
    path = "/register/{client_id}",
    tag = "registration",
    summary = "Replace a registered client's metadata (RFC 7592)",
    security(("bearer" = [])),
    params(("client_id" = String, Path, description = "The registered client")),
    request_body(content = ClientMetadata, content_type = "application/json"),
    responses(
        (status = 200, description = "The client's new metadata", body = ClientInformation),
        (status = 400, description = "invalid_client_metadata or invalid_redirect_uri", body = super::openapi::OAuthErrorBody),
        (status = 401, description = "Invalid registration access token or unknown client", body = super::openapi::OAuthErrorBody),
        (status = 409, description = "Changed concurrently: read it again and retry", body = super::openapi::OAuthErrorBody),
        (status = 413, description = "The body is too large", body = super::openapi::OAuthErrorBody),
    ),
)]
pub async fn update(
    State(server): State<Arc<AuthServer>>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let (row, token) = managed_client(&server, &headers, &client_id).await?;
        let m = json_body(&server.cfg, &headers, body).await?;
        if m.client_id.as_deref() != Some(row.client_id.as_str()) {
            return Err(OAuthError::invalid_client_metadata(
                "`client_id` is required and must be this client's id",
            ));
        }
        if let Some(secret) = &m.client_secret {
            if !server.check_client_secret(&row, secret) {
                return Err(OAuthError::invalid_client_metadata(
                    "`client_secret` is not this client's current secret",
                ));
            }
        }
        let mut settings = to_settings(&server.cfg, &m)?;
        let old = &row.settings;
        if settings.public != old.public
            || settings.auth_method.has_secret() != old.auth_method.has_secret()
        {
            return Err(OAuthError::invalid_client_metadata(
                "`token_endpoint_auth_method` cannot change between secret, key and public methods; register a new client",
            ));
        }
        settings.trusted = old.trusted;
        settings.rate_limit_tier.clone_from(&old.rate_limit_tier);
        settings.access_ttl_seconds = old.access_ttl_seconds;
        settings.refresh_ttl_seconds = old.refresh_ttl_seconds;
        settings.id_ttl_seconds = old.id_ttl_seconds;
        server
            .validate_client_settings(&settings)
            .map_err(|e| from_client_error("validating a registration update", &e))?;
        let updated = server
            .update_client(
                &row.client_id,
                settings,
                row.version,
                client_actor(&row.client_id),
            )
            .await
            .map_err(|e| match e.code {
                ErrorCode::Aborted => OAuthError::new(
                    "invalid_request",
                    StatusCode::CONFLICT,
                    "the client was changed concurrently; read it again and retry",
                ),
                ErrorCode::NotFound => OAuthError::invalid_token("invalid registration access token"),
                _ => from_client_error("updating a registered client", &e),
            })?;
        Ok(json_response(
            StatusCode::OK,
            &information(&server.cfg, &updated, None, &token),
        ))
    }
    .await;
    outcome(&server, "register_update", r)
}

/// `DELETE /register/{client_id}` (RFC 7592 §2.3): deletes the client and revokes its
/// tokens.
#[utoipa::path(
    delete,
    path = "/register/{client_id}",
    tag = "registration",
    summary = "Delete a registered client and revoke its tokens (RFC 7592)",
    security(("bearer" = [])),
    params(("client_id" = String, Path, description = "The registered client")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Invalid registration access token or unknown client", body = super::openapi::OAuthErrorBody),
    ),
)]
pub async fn delete(
    State(server): State<Arc<AuthServer>>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let (row, _) = managed_client(&server, &headers, &client_id).await?;
        server
            .delete_client(&row.client_id, client_actor(&row.client_id))
            .await
            .map_err(|e| match e.code {
                ErrorCode::NotFound => OAuthError::invalid_token("invalid registration access token"),
                _ => from_client_error("deleting a registered client", &e),
            })?;
        Ok(no_content())
    }
    .await;
    outcome(&server, "register_delete", r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(body: Value) -> Result<ClientSettings, OAuthError> {
        let m = parse_metadata(body.to_string().as_bytes())?;
        to_settings(&OAuthConfig::default(), &m)
    }

    #[test]
    fn defaults_follow_rfc_7591() {
        let s = settings(json!({"redirect_uris": ["https://app.example/cb"]})).unwrap();
        assert_eq!(s.auth_method, AuthMethod::ClientSecretBasic);
        assert_eq!(s.grant_types, vec![GrantType::AuthorizationCode]);
        assert_eq!(s.scopes, vec!["openid".to_owned()]);
        assert!(s.dynamically_registered && s.require_pkce);
        assert!(!s.trusted && !s.public);
        assert_eq!(s.rate_limit_tier, "");
        assert_eq!(s.name, DEFAULT_NAME);
    }

    #[test]
    fn public_and_key_clients() {
        let s = settings(json!({
            "redirect_uris": ["http://127.0.0.1/cb"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token", "authorization_code"],
            "scope": "openid profile openid",
            "client_name": "CLI",
            "unknown_field": {"ignored": true},
        }))
        .unwrap();
        assert!(s.public);
        assert_eq!(
            s.grant_types,
            vec![GrantType::AuthorizationCode, GrantType::RefreshToken]
        );
        assert_eq!(s.scopes, vec!["openid".to_owned(), "profile".to_owned()]);
        assert_eq!(s.name, "CLI");
        let e = settings(json!({"token_endpoint_auth_method": "private_key_jwt",
                                "grant_types": ["client_credentials"]}))
        .unwrap_err();
        assert!(e.description.contains("`jwks`"), "{}", e.description);
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "abc"}]});
        let s = settings(json!({"token_endpoint_auth_method": "private_key_jwt",
                                "grant_types": ["client_credentials"], "response_types": [],
                                "jwks": jwks}))
        .unwrap();
        assert_eq!(s.jwks_json.as_deref(), Some(jwks.to_string().as_str()));
    }

    #[test]
    fn refusals_name_the_field() {
        for (body, field) in [
            (json!({"redirect_uris": "https://a/cb"}), "redirect_uris"),
            (json!({"redirect_uris": [1]}), "redirect_uris"),
            (json!({"grant_types": ["implicit"]}), "grant_types"),
            (json!({"grant_types": []}), "grant_types"),
            (json!({"response_types": ["token"]}), "response_types"),
            (
                json!({"grant_types": ["client_credentials"], "response_types": ["code"]}),
                "response_types",
            ),
            (json!({"token_endpoint_auth_method": "tls_client_auth"}), "token_endpoint_auth_method"),
            (json!({"scope": "openid admin:all"}), "scope"),
            (json!({"scope": "bad\"scope"}), "scope"),
            (json!({"jwks_uri": "https://internal/keys"}), "jwks_uri"),
            (json!({"jwks": {"keys": []}}), "jwks"),
            (json!({"jwks": "{}"}), "jwks"),
            (json!({"client_name": "x".repeat(MAX_STRING + 1)}), "client_name"),
            (
                json!({"redirect_uris": (0..=MAX_LIST).map(|i| format!("https://a/{i}")).collect::<Vec<_>>()}),
                "redirect_uris",
            ),
        ] {
            let e = settings(body.clone()).unwrap_err();
            assert_eq!(e.error, "invalid_client_metadata", "{body}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.description.contains(&format!("`{field}`")), "{body}: {}", e.description);
        }
        for raw in ["", "[]", "null", "\"x\"", "{bad"] {
            let e = parse_metadata(raw.as_bytes()).unwrap_err();
            assert_eq!(e.error, "invalid_client_metadata", "{raw}");
        }
    }

    #[test]
    fn validation_errors_map_to_rfc_7591_codes() {
        let e = from_client_error(
            "x",
            &Error::invalid("redirect_uris[0]", "must be an absolute URI without a fragment"),
        );
        assert_eq!(e.error, "invalid_redirect_uri");
        assert!(e.description.starts_with("`redirect_uris`"), "{}", e.description);
        let e = from_client_error("x", &Error::invalid("post_logout_redirect_uris", "bad"));
        assert_eq!(e.error, "invalid_client_metadata");
        assert!(e.description.contains("post_logout_redirect_uris"));
        let e = from_client_error("x", &Error::invalid("token_endpoint_auth_method", "bad"));
        assert!(e.description.starts_with("`token_endpoint_auth_method`"));
        let e = from_client_error("x", &Error::invalid("jwks_json", "bad"));
        assert!(e.description.starts_with("`jwks`"));
        let e = from_client_error("x", &Error::invalid("scopes", "unknown scope"));
        assert!(e.description.starts_with("`scope`"));
        let e = from_client_error("x", &Error::new(ErrorCode::Internal, "sqlite: disk"));
        assert_eq!((e.error, e.description.as_str()), ("server_error", "internal error"));
    }

    #[test]
    fn initial_access_tokens_compare_by_hash() {
        let token = "sec_initial";
        let h = hash_token(token);
        assert!(is_initial_access_token(&h, token));
        assert!(is_initial_access_token(&h.to_ascii_uppercase().replace("SHA256:", "sha256:"), token));
        assert!(is_initial_access_token(h.trim_start_matches("sha256:"), token));
        assert!(!is_initial_access_token(&h, "sec_other"));
        assert!(!is_initial_access_token("", ""));
        assert!(!is_initial_access_token("sha256:", token));
    }

    #[test]
    fn information_echoes_the_settings() {
        let cfg = OAuthConfig {
            issuer: "https://id.example".into(),
            ..OAuthConfig::default()
        };
        let s = settings(json!({"redirect_uris": ["https://app.example/cb"],
                                "grant_types": ["authorization_code", "refresh_token"]}))
        .unwrap();
        let row = ClientRow {
            client_id: "c 1".into(),
            settings: s,
            secret_hash: None,
            registration_token_hash: None,
            version: 1,
            created_us: 1_700_000_000_123_456,
            updated_us: 0,
            secret_rotated_us: None,
        };
        let i = information(&cfg, &row, Some("cs".into()), "reg_x");
        let j = serde_json::to_value(&i).unwrap();
        assert_eq!(j["registration_client_uri"], "https://id.example/register/c%201");
        assert_eq!(j["client_id_issued_at"], 1_700_000_000);
        assert_eq!(j["client_secret_expires_at"], 0);
        assert_eq!(j["response_types"], json!(["code"]));
        assert_eq!(j["grant_types"], json!(["authorization_code", "refresh_token"]));
        assert_eq!(j["token_endpoint_auth_method"], "client_secret_basic");
        assert!(j.get("jwks").is_none());
        let read = serde_json::to_value(information(&cfg, &row, None, "reg_x")).unwrap();
        assert!(read.get("client_secret").is_none());
    }
}
