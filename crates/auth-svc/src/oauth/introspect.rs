//! Token introspection (RFC 7662).
//!
//! Callers: an authenticated client (same methods as `/token`) or the platform's admin
//! bearer token. JWTs (access and ID tokens) are checked by token-svc's `ValidateToken`,
//! which includes the revocation list: a revoked `jti` is inactive here even though the
//! JWT itself still verifies — that is what introspection adds over local validation.
//! Anything else is looked up as a refresh token.
//!
//! A client that is not `trusted` sees only its own tokens as active; for any other
//! token it gets `{"active":false}`, exactly as for an unknown one (RFC 7662 §4: do not
//! tell a caller about tokens it has no business with). The admin and trusted clients
//! (resource servers of the platform) see every token.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sec_common::auth::{Caller, bearer};
use sec_common::error::ErrorCode;
use sec_common::jwt;
use sec_proto::token::v1::{
    IntrospectRefreshTokenRequest, InvalidReason, TokenKind, ValidateTokenRequest,
};
use serde_json::{Map, Value, json};

use super::client_auth::authenticate_client;
use super::error::OAuthError;
use super::revoke::looks_like_jwt;
use super::token::{ErrorResponse, no_store, read_form};
use crate::engine::AuthServer;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/introspect", post(introspect))
}

/// Who is asking: a client id (sees only its own tokens unless trusted) or everything.
enum Viewer {
    All,
    Client(String),
}

impl Viewer {
    fn sees(&self, client_id: &str) -> bool {
        match self {
            Viewer::All => true,
            Viewer::Client(c) => c == client_id,
        }
    }
}

/// RFC 7662 introspection of an access, ID or refresh token.
#[utoipa::path(
    post,
    path = "/introspect",
    tag = "oauth",
    request_body(
        content = String,
        content_type = "application/x-www-form-urlencoded",
        description = "token (required), token_type_hint (optional), client authentication or `Authorization: Bearer <admin token>`"
    ),
    responses(
        (status = 200, description = "`{\"active\":true, scope, client_id, sub, exp, iat, iss, aud, jti, token_type}` or `{\"active\":false}`"),
        (status = 400, description = "invalid_request", body = ErrorResponse),
        (status = 401, description = "invalid_client", body = ErrorResponse),
        (status = 413, description = "Body larger than the configured limit", body = ErrorResponse),
        (status = 503, description = "temporarily_unavailable", body = ErrorResponse)
    )
)]
pub async fn introspect(
    State(server): State<Arc<AuthServer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let params = read_form(&server, &headers, body).await?;
        let viewer = viewer(&server, &headers, &params).await?;
        let token = params.require("token")?;
        if looks_like_jwt(token) {
            introspect_jwt(&server, &viewer, token).await
        } else {
            introspect_refresh(&server, &viewer, token).await
        }
    }
    .await;
    match result {
        Ok(v) => {
            server.metrics.request("introspect", "ok");
            no_store((StatusCode::OK, Json(v)).into_response())
        }
        Err(e) => {
            server.metrics.request("introspect", e.error);
            e.into_response()
        }
    }
}

async fn viewer(
    server: &AuthServer,
    headers: &HeaderMap,
    params: &super::params::Params,
) -> Result<Viewer, OAuthError> {
    let admin_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    if let Some(token) = admin_token {
        return match server.admin.authenticate_token(token).await {
            Ok(Caller::Admin) => Ok(Viewer::All),
            _ => Err(OAuthError::invalid_client("client authentication failed", false)
                .with_challenge(r#"Bearer error="invalid_token""#)),
        };
    }
    let client = authenticate_client(server, headers, params).await?;
    Ok(if client.client.settings.trusted {
        Viewer::All
    } else {
        Viewer::Client(client.id().to_owned())
    })
}

fn inactive() -> Value {
    json!({ "active": false })
}

/// The audience to validate against: the token's own (introspection answers *whether*
/// the token is live; the resource server checks `aud`, which the answer includes).
fn token_audience(token: &str) -> String {
    let Ok((_, claims)) = jwt::decode_unverified(token, jwt::DEFAULT_MAX_TOKEN_BYTES) else {
        return String::new();
    };
    match claims.get("aud") {
        Some(Value::String(a)) => a.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .find_map(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_default(),
        _ => String::new(),
    }
}

async fn introspect_jwt(
    server: &AuthServer,
    viewer: &Viewer,
    token: &str,
) -> Result<Value, OAuthError> {
    let audience = token_audience(token);
    let mut kind = TokenKind::Access;
    let v = loop {
        let req = ValidateTokenRequest {
            token: token.to_owned(),
            kind: kind as i32,
            audience: audience.clone(),
        };
        let v = match server.tokens.clone().validate_token(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if ErrorCode::from_grpc(s.code()) == ErrorCode::InvalidArgument => {
                return Ok(inactive());
            }
            Err(s) => return Err(OAuthError::from_peer("validating a token", &s)),
        };
        if !v.valid && v.reason == InvalidReason::WrongType as i32 && kind == TokenKind::Access {
            kind = TokenKind::Id;
            continue;
        }
        break v;
    };
    if !v.valid {
        return Ok(inactive());
    }
    let claims: Map<String, Value> = serde_json::from_str(&v.claims_json).unwrap_or_default();
    // ID tokens carry the client as `azp` (or as their only audience).
    let client_id = if v.client_id.is_empty() {
        claims
            .get("azp")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or(audience)
    } else {
        v.client_id.clone()
    };
    if !viewer.sees(&client_id) {
        return Ok(inactive());
    }
    let mut out = Map::new();
    out.insert("active".into(), Value::Bool(true));
    for name in ["scope", "sub", "exp", "iat", "nbf", "iss", "aud", "jti"] {
        if let Some(c) = claims.get(name) {
            out.insert(name.into(), c.clone());
        }
    }
    out.insert("client_id".into(), Value::String(client_id));
    if kind == TokenKind::Access {
        out.insert("token_type".into(), Value::String("Bearer".into()));
    }
    Ok(Value::Object(out))
}

async fn introspect_refresh(
    server: &AuthServer,
    viewer: &Viewer,
    token: &str,
) -> Result<Value, OAuthError> {
    let req = IntrospectRefreshTokenRequest {
        refresh_token: token.to_owned(),
    };
    let r = match server.tokens.clone().introspect_refresh_token(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if ErrorCode::from_grpc(s.code()) == ErrorCode::InvalidArgument => {
            return Ok(inactive());
        }
        Err(s) => return Err(OAuthError::from_peer("introspecting a refresh token", &s)),
    };
    if !r.active || !viewer.sees(&r.client_id) {
        return Ok(inactive());
    }
    let mut out = json!({
        "active": true,
        "client_id": r.client_id,
        "sub": r.subject,
        "iss": server.cfg.issuer,
    });
    if !r.scope.is_empty() {
        out["scope"] = Value::String(r.scope);
    }
    if let Some(t) = r.expires_at {
        out["exp"] = json!(t.seconds);
    }
    if let Some(t) = r.issued_at {
        out["iat"] = json!(t.seconds);
    }
    Ok(out)
}
