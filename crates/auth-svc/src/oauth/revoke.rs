//! Token revocation (RFC 7009).
//!
//! The client authenticates like at `/token`; then the token is handed to token-svc with
//! `requesting_client_id`, which revokes it only if it belongs to that client. Whether a
//! token was unknown, already revoked, malformed or another client's, the answer is the
//! same 200 (RFC 7009 §2.2): a caller learns nothing about tokens it does not own.
//!
//! A JWT (three dot-separated parts) is an access or ID token: token-svc verifies it and
//! denylists its `jti` until it expires. Anything else is taken as a refresh token: its
//! whole family is revoked (RFC 7009 §2.1: revoking a refresh token also ends what it
//! issued, as far as the family goes). `token_type_hint` is only a hint (§2.1): the
//! shape decides, so a wrong hint cannot make a revocation miss.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sec_common::error::ErrorCode;
use sec_proto::token::v1::{RevokeTokenRequest, revoke_token_request::Target};

use super::client_auth::authenticate_client;
use super::error::OAuthError;
use super::token::{ErrorResponse, no_store, read_form};
use crate::engine::AuthServer;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new().route("/revoke", post(revoke))
}

/// Compact JWS shape: three non-empty base64url segments.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut n = 0;
    for part in token.split('.') {
        n += 1;
        if part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    n == 3
}

/// Revokes an access, ID or refresh token of the authenticated client.
#[utoipa::path(
    post,
    path = "/revoke",
    tag = "oauth",
    request_body(
        content = String,
        content_type = "application/x-www-form-urlencoded",
        description = "token (required), token_type_hint (access_token | refresh_token, optional), client authentication"
    ),
    responses(
        (status = 200, description = "Revoked, or nothing to revoke (unknown token or another client's)"),
        (status = 400, description = "invalid_request", body = ErrorResponse),
        (status = 401, description = "invalid_client", body = ErrorResponse),
        (status = 413, description = "Body larger than the configured limit", body = ErrorResponse),
        (status = 503, description = "temporarily_unavailable", body = ErrorResponse)
    )
)]
pub async fn revoke(
    State(server): State<Arc<AuthServer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let params = read_form(&server, &headers, body).await?;
        let client = authenticate_client(&server, &headers, &params).await?;
        let token = params.require("token")?;
        let jwt = looks_like_jwt(token);
        let target = if jwt {
            Target::Token(token.to_owned())
        } else {
            Target::RefreshToken(token.to_owned())
        };
        let req = RevokeTokenRequest {
            target: Some(target),
            requesting_client_id: client.id().to_owned(),
            reason: "client_revoked".into(),
            ..RevokeTokenRequest::default()
        };
        let revoked = match server.tokens.clone().revoke_token(req).await {
            Ok(r) => r.into_inner().revoked,
            // A token token-svc cannot parse is one there is nothing to revoke of.
            Err(s) if ErrorCode::from_grpc(s.code()) == ErrorCode::InvalidArgument => 0,
            Err(s) => return Err(OAuthError::from_peer("revoking a token", &s)),
        };
        if revoked > 0 {
            let mut e = server.event("sec.auth.token.revoked");
            e.subject = client.id().to_owned();
            e.details.insert("client_id".into(), client.id().to_owned());
            e.details.insert(
                "token_kind".into(),
                if jwt { "jwt" } else { "refresh_token" }.into(),
            );
            e.details.insert("revoked".into(), revoked.to_string());
            server.publish(e);
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            server.metrics.request("revoke", "ok");
            no_store(StatusCode::OK.into_response())
        }
        Err(e) => {
            server.metrics.request("revoke", e.error);
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_jwt;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("a-_.b.c"));
        for not in ["", "a.b", "a.b.c.d", "a..c", "a.b.", "a b.c.d", "a.b+c.d", "rt_abcdef"] {
            assert!(!looks_like_jwt(not), "{not}");
        }
    }
}
