//! OAuth error responses: RFC 6749 §5.2 (token endpoint), RFC 6750 §3 (bearer-protected
//! resources such as `/userinfo`), RFC 7591 §3.2.2 (registration). JSON
//! `{"error", "error_description"}`, `Cache-Control: no-store`, and the right status
//! and `WWW-Authenticate` challenge. Descriptions never carry a secret or an internal
//! cause (those are logged, not returned).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sec_common::error::{ErrorCode, error_info};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// The RFC error code (`invalid_request`, `invalid_client`, ...): also the metric
    /// outcome label, so it is always one of the `&'static str` constructors below.
    pub error: &'static str,
    pub description: String,
    pub status: StatusCode,
    /// `WWW-Authenticate` value, when the error is a challenge.
    pub challenge: Option<String>,
}

impl OAuthError {
    pub fn new(error: &'static str, status: StatusCode, description: impl Into<String>) -> Self {
        Self {
            error,
            description: description.into(),
            status,
            challenge: None,
        }
    }

    pub fn with_challenge(mut self, challenge: impl Into<String>) -> Self {
        self.challenge = Some(challenge.into());
        self
    }

    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new("invalid_request", StatusCode::BAD_REQUEST, d)
    }

    /// Client authentication failed: 401 always (RFC 6749 §5.2 allows it for every
    /// method), with a `Basic` challenge when the client used HTTP Basic (which requires it).
    pub fn invalid_client(d: impl Into<String>, used_basic: bool) -> Self {
        let e = Self::new("invalid_client", StatusCode::UNAUTHORIZED, d);
        if used_basic {
            e.with_challenge(r#"Basic realm="sec-platform", charset="UTF-8""#)
        } else {
            e
        }
    }

    pub fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new("invalid_grant", StatusCode::BAD_REQUEST, d)
    }

    pub fn unauthorized_client(d: impl Into<String>) -> Self {
        Self::new("unauthorized_client", StatusCode::BAD_REQUEST, d)
    }

    pub fn unsupported_grant_type(d: impl Into<String>) -> Self {
        Self::new("unsupported_grant_type", StatusCode::BAD_REQUEST, d)
    }

    pub fn unsupported_token_type(d: impl Into<String>) -> Self {
        Self::new("unsupported_token_type", StatusCode::BAD_REQUEST, d)
    }

    pub fn invalid_scope(d: impl Into<String>) -> Self {
        Self::new("invalid_scope", StatusCode::BAD_REQUEST, d)
    }

    pub fn access_denied(d: impl Into<String>) -> Self {
        Self::new("access_denied", StatusCode::FORBIDDEN, d)
    }

    /// RFC 6750 §3.1: the access token is missing, expired, revoked or malformed.
    pub fn invalid_token(d: impl Into<String>) -> Self {
        let d = d.into();
        let challenge = format!(
            r#"Bearer error="invalid_token", error_description="{}""#,
            quote_safe(&d)
        );
        Self::new("invalid_token", StatusCode::UNAUTHORIZED, d).with_challenge(challenge)
    }

    /// RFC 6750 §3.1: no credentials at all: a bare challenge and no error code in it.
    pub fn missing_token() -> Self {
        Self::new(
            "invalid_request",
            StatusCode::UNAUTHORIZED,
            "send `Authorization: Bearer <access token>`",
        )
        .with_challenge("Bearer")
    }

    pub fn insufficient_scope(scope: &str) -> Self {
        Self::new(
            "insufficient_scope",
            StatusCode::FORBIDDEN,
            format!("the access token needs scope `{scope}`"),
        )
        .with_challenge(format!(
            r#"Bearer error="insufficient_scope", scope="{}""#,
            quote_safe(scope)
        ))
    }

    /// RFC 7591 §3.2.2.
    pub fn invalid_redirect_uri(d: impl Into<String>) -> Self {
        Self::new("invalid_redirect_uri", StatusCode::BAD_REQUEST, d)
    }

    pub fn invalid_client_metadata(d: impl Into<String>) -> Self {
        Self::new("invalid_client_metadata", StatusCode::BAD_REQUEST, d)
    }

    /// Our fault: the cause goes to the log, never to the client.
    pub fn server_error(context: &'static str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "{context}");
        Self::new(
            "server_error",
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
        )
    }

    /// A dependency (token-svc, session-svc, the database) is down: 503, retry later.
    pub fn temporarily_unavailable(context: &'static str, cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "{context}");
        Self::new(
            "temporarily_unavailable",
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is temporarily unavailable; retry later",
        )
    }

    /// A failed call to token-svc or session-svc: `invalid_grant` where the peer says the
    /// grant is bad (ErrorInfo `invalid_grant` / `reuse_detected`), 503 when it is
    /// unreachable, else a server error.
    pub fn from_peer(context: &'static str, status: &tonic::Status) -> Self {
        let code = error_info(status).map(|i| i.code).unwrap_or_default();
        match (code.as_str(), ErrorCode::from_grpc(status.code())) {
            ("invalid_grant" | "reuse_detected", _) => {
                Self::invalid_grant(status.message().to_owned())
            }
            (_, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded) => {
                Self::temporarily_unavailable(context, status)
            }
            _ => Self::server_error(context, status),
        }
    }
}

/// A value safe inside a quoted-string of a `WWW-Authenticate` header (RFC 6750 §3:
/// `%x20-21 / %x23-5B / %x5D-7E`).
fn quote_safe(s: &str) -> String {
    s.chars()
        .filter(|c| matches!(*c as u32, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e))
        .take(200)
        .collect()
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.error,
            "error_description": self.description,
        });
        let mut resp = (self.status, Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            h.insert(header::WWW_AUTHENTICATE, c);
        }
        if self.error == "invalid_client" {
            // Counted towards the caller's automatic block (crate::edge).
            crate::edge::mark_failure(&mut resp, sec_edge::FailureReason::ClientAuthFailure);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_client_with_basic_gets_a_challenge() {
        let r = OAuthError::invalid_client("bad secret", true).into_response();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Basic")
        );
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    }

    #[test]
    fn bearer_challenges_quote_safely() {
        let e = OAuthError::invalid_token("bad \"token\"\\\n");
        assert_eq!(
            e.challenge.as_deref().unwrap(),
            r#"Bearer error="invalid_token", error_description="bad token""#
        );
        let r = OAuthError::insufficient_scope("openid").into_response();
        assert_eq!(r.status(), 403);
    }

    #[test]
    fn peer_errors_map_without_leaking() {
        let e = OAuthError::from_peer("x", &tonic::Status::unavailable("10.1.2.3 refused"));
        assert_eq!(e.error, "temporarily_unavailable");
        assert!(!e.description.contains("10.1.2.3"));
        let e = OAuthError::from_peer("x", &tonic::Status::internal("disk"));
        assert_eq!(
            (e.error, e.description.as_str()),
            ("server_error", "internal error")
        );
    }
}
