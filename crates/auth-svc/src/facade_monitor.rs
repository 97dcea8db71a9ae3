//! `GET /security/monitor` (admin only): audit-svc's `GetMonitor` over HTTP — open
//! alerts (count and the newest 20), ingest lag, dead letters per reason, the chain's
//! head and the age of its newest signed checkpoint. Same credentials, forwarding and
//! timeout as `GET /security/audit` ([`crate::facade_audit`]). It takes no parameters:
//! a query string is refused with 400.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use sec_common::error::Error;
use sec_proto::audit::v1::GetMonitorRequest;

use crate::facade::{Facade, error_response, no_store};
use crate::facade_audit::{admin_audit_client, audit_call};

/// `GET /security/monitor`.
#[utoipa::path(
    get,
    path = "/security/monitor",
    tag = "platform",
    summary = "Alerts and audit pipeline health (admin)",
    description = "Open alerts (count and the newest 20), ingest lag, dead-letter counts per reason, the audit chain's head position and the age of its newest signed checkpoint. No parameters.",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{open_alerts, newest_open: [...], ingest_lag_seconds, dead_letters: {reason: count}, chain_head_seq, checkpoint_age_seconds}`", content_type = "application/json", body = Object),
        (status = 400, description = "A query string was given", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 401, description = "No or invalid credentials", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 403, description = "The caller is not the admin", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 503, description = "audit-svc is unreachable", body = crate::oauth::openapi::OAuthErrorBody),
    ),
)]
pub(crate) async fn monitor(
    State(f): State<Arc<Facade>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut client = match admin_audit_client(&f, &headers).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if query.is_some_and(|q| !q.is_empty()) {
        return error_response(
            Error::invalid("query", "`/security/monitor` takes no parameters"),
            "Bearer",
        );
    }
    match audit_call(client.get_monitor(GetMonitorRequest {})).await {
        Ok(m) => no_store(axum::Json(sec_common::events::json::monitor_json(&m)).into_response()),
        Err(resp) => resp,
    }
}
