//! One error-code enum for the whole platform, mapped to both `tonic::Code` and an HTTP
//! status, so a failure reads the same over gRPC, the facade and the CLI.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use prost::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Aborted,
    Internal,
}

impl ErrorCode {
    pub fn grpc(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::ResourceExhausted => tonic::Code::ResourceExhausted,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Self::Aborted => tonic::Code::Aborted,
            Self::Internal => tonic::Code::Internal,
        }
    }

    pub fn http(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::InvalidArgument => S::BAD_REQUEST,
            Self::NotFound => S::NOT_FOUND,
            Self::AlreadyExists | Self::Aborted => S::CONFLICT,
            // 409 rather than 400: the request was well-formed, the resource's state forbids it.
            Self::FailedPrecondition => S::CONFLICT,
            Self::PermissionDenied => S::FORBIDDEN,
            Self::Unauthenticated => S::UNAUTHORIZED,
            Self::ResourceExhausted => S::TOO_MANY_REQUESTS,
            Self::Unavailable => S::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded => S::GATEWAY_TIMEOUT,
            Self::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable snake_case name, used in JSON bodies and `ErrorInfo.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::FailedPrecondition => "failed_precondition",
            Self::PermissionDenied => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Aborted => "aborted",
            Self::Internal => "internal",
        }
    }

    /// The inverse of [`ErrorCode::grpc`], for clients turning a `Status` back into a code.
    pub fn from_grpc(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::InvalidArgument,
            tonic::Code::NotFound => Self::NotFound,
            tonic::Code::AlreadyExists => Self::AlreadyExists,
            tonic::Code::FailedPrecondition => Self::FailedPrecondition,
            tonic::Code::PermissionDenied => Self::PermissionDenied,
            tonic::Code::Unauthenticated => Self::Unauthenticated,
            tonic::Code::ResourceExhausted => Self::ResourceExhausted,
            tonic::Code::Unavailable => Self::Unavailable,
            tonic::Code::DeadlineExceeded => Self::DeadlineExceeded,
            tonic::Code::Aborted | tonic::Code::Cancelled => Self::Aborted,
            _ => Self::Internal,
        }
    }
}

/// An error fit to show a caller: a code, a message written for them (never SQL, stack
/// traces, key material or tokens), and optionally the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub field: Option<String>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn invalid(field: &str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message).with_field(field)
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn precondition(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }

    pub fn denied(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    /// For failures whose details are for the log only: logs `source` and returns a bland error.
    pub fn internal(context: &'static str, source: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %source, "{context}");
        Self::new(ErrorCode::Internal, "internal error")
    }

    pub fn unavailable(context: &'static str, source: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %source, "{context}");
        Self::new(ErrorCode::Unavailable, "backend unavailable, retry later")
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let info = sec_proto::common::v1::ErrorInfo {
            code: e.code.as_str().to_owned(),
            field: e.field.unwrap_or_default(),
        };
        tonic::Status::with_details(e.code.grpc(), e.message, info.encode_to_vec().into())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.code.as_str(),
            "error_description": self.message,
        });
        (self.code.http(), axum::Json(body)).into_response()
    }
}

/// `ErrorInfo` carried in a status from one of our servers, if any.
pub fn error_info(status: &tonic::Status) -> Option<sec_proto::common::v1::ErrorInfo> {
    sec_proto::common::v1::ErrorInfo::decode(status.details())
        .ok()
        .filter(|i| !i.code.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_consistently() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::AlreadyExists,
            ErrorCode::FailedPrecondition,
            ErrorCode::PermissionDenied,
            ErrorCode::Unauthenticated,
            ErrorCode::ResourceExhausted,
            ErrorCode::Unavailable,
            ErrorCode::DeadlineExceeded,
            ErrorCode::Aborted,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_grpc(code.grpc()), code);
        }
        assert_eq!(
            ErrorCode::PermissionDenied.http(),
            http::StatusCode::FORBIDDEN
        );
        assert_eq!(
            ErrorCode::Unauthenticated.http(),
            http::StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ErrorCode::ResourceExhausted.grpc(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn status_carries_code_and_field() {
        let status: tonic::Status = Error::invalid("name", "key name must not be empty").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "key name must not be empty");
        let info = error_info(&status).unwrap();
        assert_eq!(info.code, "invalid_argument");
        assert_eq!(info.field, "name");
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let e = Error::internal("db failed", &"relation \"keys\" does not exist");
        assert_eq!(e.message, "internal error");
        assert_eq!(e.code.http(), http::StatusCode::INTERNAL_SERVER_ERROR);
    }
}
