//! The UserInfo endpoint (OIDC Core §5.3) as an RFC 6750 protected resource.
//!
//! The access token comes in the `Authorization: Bearer` header, or on POST as the
//! `access_token` form field (RFC 6750 §2.2); both at once is `invalid_request`
//! (§2: "MUST NOT use more than one method"). It is checked by token-svc (signature,
//! expiry, revocation), must carry `openid` (else 403 `insufficient_scope`), and its
//! user must still exist and be active — a disabled user's still-valid token gets
//! nothing (401 `invalid_token`). Only the claims its scopes release are returned.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sec_common::auth::bearer;
use sec_proto::token::v1::{TokenKind, ValidateTokenRequest};

use super::error::OAuthError;
use super::params::{Params, scope_list};
use super::token::{ErrorResponse, no_store, read_body};
use crate::engine::AuthServer;
use crate::store::UserStatus;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/userinfo", get(userinfo_get).post(userinfo_post))
}

/// Claims about the user of an access token (bearer in the header).
#[utoipa::path(
    get,
    path = "/userinfo",
    tag = "oidc",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The user's claims released by the token's scopes (`sub` always)"),
        (status = 400, description = "invalid_request", body = ErrorResponse),
        (status = 401, description = "invalid_token, or no token (WWW-Authenticate: Bearer)", body = ErrorResponse),
        (status = 403, description = "insufficient_scope (needs openid)", body = ErrorResponse),
        (status = 503, description = "temporarily_unavailable", body = ErrorResponse)
    )
)]
pub async fn userinfo_get(State(server): State<Arc<AuthServer>>, headers: HeaderMap) -> Response {
    let result = async {
        let token = header_token(&headers)?.ok_or_else(OAuthError::missing_token)?;
        claims(&server, &token).await
    }
    .await;
    finish(&server, result)
}

/// Claims about the user of an access token (bearer in the header or the `access_token`
/// form field).
#[utoipa::path(
    post,
    path = "/userinfo",
    tag = "oidc",
    security(("bearer" = [])),
    request_body(
        content = String,
        content_type = "application/x-www-form-urlencoded",
        description = "access_token (when not in the Authorization header)"
    ),
    responses(
        (status = 200, description = "The user's claims released by the token's scopes (`sub` always)"),
        (status = 400, description = "invalid_request (e.g. token in header and body)", body = ErrorResponse),
        (status = 401, description = "invalid_token, or no token (WWW-Authenticate: Bearer)", body = ErrorResponse),
        (status = 403, description = "insufficient_scope (needs openid)", body = ErrorResponse),
        (status = 413, description = "Body larger than the configured limit", body = ErrorResponse),
        (status = 503, description = "temporarily_unavailable", body = ErrorResponse)
    )
)]
pub async fn userinfo_post(
    State(server): State<Arc<AuthServer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let in_header = header_token(&headers)?;
        let bytes = read_body(&server, body).await.map_err(bearer_request)?;
        let in_body = if bytes.is_empty() {
            None
        } else {
            let params = Params::from_form(&headers, &bytes, server.cfg.max_param_bytes)
                .map_err(bearer_request)?;
            params.get("access_token").map(str::to_owned)
        };
        let token = match (in_header, in_body) {
            (Some(_), Some(_)) => {
                return Err(bearer_request(OAuthError::invalid_request(
                    "send the access token in one place only",
                )));
            }
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return Err(OAuthError::missing_token()),
        };
        claims(&server, &token).await
    }
    .await;
    finish(&server, result)
}

fn finish(server: &AuthServer, result: Result<serde_json::Value, OAuthError>) -> Response {
    match result {
        Ok(v) => {
            server.metrics.request("userinfo", "ok");
            no_store((StatusCode::OK, Json(v)).into_response())
        }
        Err(e) => {
            server.metrics.request("userinfo", e.error);
            e.into_response()
        }
    }
}

/// RFC 6750 §3.1 `invalid_request`: 400 with a Bearer challenge naming it.
fn bearer_request(mut e: OAuthError) -> OAuthError {
    if e.error == "invalid_request" {
        e.status = StatusCode::BAD_REQUEST;
        e.challenge = Some(r#"Bearer error="invalid_request""#.into());
    }
    e
}

/// The bearer token of the `Authorization` header; another scheme is `invalid_request`.
fn header_token(headers: &HeaderMap) -> Result<Option<String>, OAuthError> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(bearer_request(OAuthError::invalid_request(
            "more than one Authorization header",
        )));
    }
    value
        .to_str()
        .ok()
        .and_then(bearer)
        .map(|t| Some(t.to_owned()))
        .ok_or_else(|| {
            bearer_request(OAuthError::invalid_request(
                "send `Authorization: Bearer <access token>`",
            ))
        })
}

async fn claims(server: &AuthServer, token: &str) -> Result<serde_json::Value, OAuthError> {
    let req = ValidateTokenRequest {
        token: token.to_owned(),
        kind: TokenKind::Access as i32,
        audience: server
            .cfg
            .default_audience
            .first()
            .cloned()
            .unwrap_or_default(),
    };
    let v = match server.tokens.clone().validate_token(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            return Err(OAuthError::invalid_token("the access token is invalid"));
        }
        Err(s) => return Err(OAuthError::from_peer("validating an access token", &s)),
    };
    if !v.valid {
        return Err(OAuthError::invalid_token(
            "the access token is invalid, expired or revoked",
        ));
    }
    let scopes = scope_list(&v.scope).unwrap_or_default();
    if !scopes.iter().any(|s| s == "openid") {
        return Err(OAuthError::insufficient_scope("openid"));
    }
    let user = match server.find_user(&v.subject).await {
        Ok(Some(u)) if u.status == UserStatus::Active => u,
        Ok(_) => return Err(OAuthError::invalid_token("the user is not active")),
        Err(e) => return Err(OAuthError::temporarily_unavailable("looking up a user", &e)),
    };
    let mut claims = server.user_claims(&user, &scopes);
    claims.insert("sub".into(), serde_json::Value::String(user.user_id.clone()));
    Ok(serde_json::Value::Object(claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(header_token(&h).unwrap(), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(header_token(&h).unwrap().as_deref(), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        let e = header_token(&h).unwrap_err();
        assert_eq!((e.error, e.status.as_u16()), ("invalid_request", 400));
        assert!(e.challenge.unwrap().starts_with("Bearer error="));
        h.append(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(header_token(&h).is_err());
    }
}
