//! `GET /security/audit` (admin only): audit-svc's `SearchEvents` over HTTP. The admin's
//! bearer token is forwarded, so audit-svc applies its own authorization as well; this
//! module only translates query parameters into the filter and the answer into JSON.
//!
//! Parameters (all optional; a repeated one matches any of its values):
//! `since`, `until` (RFC 3339), `type` (exact, or a prefix ending in `*`), `actor`,
//! `subject`, `ip` (address or CIDR block), `service`, `severity`, `outcome`,
//! `detail.<key>` (exact value of a detail), `order` (`newest`, default, or `oldest`),
//! `limit` (1–1000, default 50) and `cursor` (the previous answer's `next_cursor`).
//! Anything else is refused with 400, so a misspelt filter never silently widens a search.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use sec_common::error::{Error, ErrorCode};
use sec_common::grpc::BearerToken;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_proto::audit::v1::{DetailMatch, EventFilter, Order, SearchEventsRequest};
use sec_proto::common::v1::PageRequest;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::facade::{Facade, error_response, from_status, no_store, require_admin};

/// Most parameters in one query string.
const MAX_PARAMS: usize = 64;
/// How long the facade waits for audit-svc.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Names the parameter in the message itself: the HTTP body carries only the message.
fn invalid(field: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(field, format!("`{field}`: {why}"))
}

fn timestamp(field: &str, v: &str) -> Result<prost_types::Timestamp, Error> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| sec_common::events::to_timestamp(t.to_utc()))
        .map_err(|_| invalid(field, "an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"))
}

/// The query string as a search request.
pub(crate) fn request_from(query: &str) -> Result<SearchEventsRequest, Error> {
    let mut filter = EventFilter::default();
    let mut req = SearchEventsRequest::default();
    let mut page = PageRequest::default();
    let mut single = std::collections::HashSet::new();
    for (n, (k, v)) in form_urlencoded::parse(query.as_bytes()).enumerate() {
        if n >= MAX_PARAMS {
            return Err(invalid(
                "query",
                format!("more than {MAX_PARAMS} parameters"),
            ));
        }
        let (k, v) = (k.as_ref(), v.into_owned());
        let repeatable = matches!(k, "type" | "severity" | "outcome") || k.starts_with("detail.");
        if !repeatable && !single.insert(k.to_owned()) {
            return Err(invalid(k, "given more than once"));
        }
        match k {
            "since" => filter.since = Some(timestamp(k, &v)?),
            "until" => filter.until = Some(timestamp(k, &v)?),
            "type" => filter.event_types.push(v),
            "actor" => filter.actor_id = v,
            "subject" => filter.subject = v,
            "ip" => filter.ip = v,
            "service" => filter.service = v,
            "severity" => filter.severities.push(v),
            "outcome" => filter.outcomes.push(v),
            "order" => {
                req.order = match v.as_str() {
                    "newest" => Order::NewestFirst,
                    "oldest" => Order::OldestFirst,
                    _ => return Err(invalid(k, "`newest` or `oldest`")),
                } as i32;
            }
            "limit" => {
                page.page_size = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| invalid(k, "a number from 1 to 1000"))?;
            }
            "cursor" => page.page_token = v,
            _ => match k.strip_prefix("detail.") {
                Some(key) => filter.details.push(DetailMatch {
                    path: key.to_owned(),
                    value: v,
                }),
                None => return Err(invalid(k, "unknown parameter")),
            },
        }
    }
    req.filter = Some(filter);
    req.page = Some(page);
    Ok(req)
}

/// audit-svc with the admin's bearer token forwarded, or the refusal to answer with
/// (401 without valid credentials, 403 for anyone but the admin).
pub(crate) async fn admin_audit_client(
    f: &Facade,
    headers: &HeaderMap,
) -> Result<AuditServiceClient<InterceptedService<Channel, BearerToken>>, Response> {
    let token = require_admin(&f.auth, headers).await?;
    let bearer = BearerToken::new(Some(&token)).map_err(|_| {
        error_response(
            Error::new(ErrorCode::Unauthenticated, "invalid credentials"),
            r#"Bearer error="invalid_token""#,
        )
    })?;
    Ok(AuditServiceClient::with_interceptor(
        f.audit.clone(),
        bearer,
    ))
}

/// One audit-svc call under [`AUDIT_TIMEOUT`], its failure as the facade's error response.
pub(crate) async fn audit_call<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Response> {
    match tokio::time::timeout(AUDIT_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(error_response(from_status("audit-svc", &s), "Bearer")),
        Err(_) => Err(error_response(
            Error::new(
                ErrorCode::DeadlineExceeded,
                "audit-svc did not answer in time",
            ),
            "Bearer",
        )),
    }
}

/// `GET /security/audit`: audit events matching the query, a page at a time.
#[utoipa::path(
    get,
    path = "/security/audit",
    tag = "platform",
    summary = "Search the audit trail (admin)",
    description = "Filters: since, until (RFC 3339); type (repeatable; exact or prefix ending in `*`); actor; subject; ip (address or CIDR); service; severity, outcome (repeatable); detail.<key>=<value>; order=newest|oldest; limit (1-1000); cursor. Unknown parameters are refused.",
    security(("bearer" = [])),
    params(
        ("since" = Option<String>, Query, description = "Events at or after this RFC 3339 time"),
        ("until" = Option<String>, Query, description = "Events before this RFC 3339 time"),
        ("type" = Option<Vec<String>>, Query, description = "Event type, or prefix ending in `*`"),
        ("actor" = Option<String>, Query, description = "Actor id"),
        ("subject" = Option<String>, Query, description = "Subject"),
        ("ip" = Option<String>, Query, description = "Address or CIDR block"),
        ("service" = Option<String>, Query, description = "Producing service"),
        ("severity" = Option<Vec<String>>, Query, description = "info, low, medium, high, critical"),
        ("outcome" = Option<Vec<String>>, Query, description = "success, failure, denied"),
        ("order" = Option<String>, Query, description = "newest (default) or oldest"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 50)"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, description = "`{events: [...], next_cursor: string|null}`", content_type = "application/json", body = Object),
        (status = 400, description = "A malformed or unknown parameter", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 401, description = "No or invalid credentials", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 403, description = "The caller is not the admin", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 503, description = "audit-svc is unreachable", body = crate::oauth::openapi::OAuthErrorBody),
    ),
)]
pub(crate) async fn search(
    State(f): State<Arc<Facade>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut client = match admin_audit_client(&f, &headers).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let req = match request_from(query.as_deref().unwrap_or_default()) {
        Ok(r) => r,
        Err(e) => return error_response(e, "Bearer"),
    };
    let answer = match audit_call(client.search_events(req)).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let next = answer
        .page
        .map(|p| p.next_page_token)
        .filter(|t| !t.is_empty());
    let body = serde_json::json!({
        "events": answer
            .events
            .iter()
            .map(sec_common::events::json::event_json)
            .collect::<Vec<_>>(),
        "next_cursor": next,
    });
    no_store(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_become_filters() {
        let r = request_from(
            "type=sec.auth.*&type=sec.crypto.key.deleted&actor=alice&ip=192.0.2.0%2F24\
             &severity=high&detail.client_id=c1&order=oldest&limit=10&cursor=abc\
             &since=2026-01-01T00:00:00Z",
        )
        .unwrap();
        let f = r.filter.unwrap();
        assert_eq!(f.event_types, ["sec.auth.*", "sec.crypto.key.deleted"]);
        assert_eq!(f.actor_id, "alice");
        assert_eq!(f.ip, "192.0.2.0/24");
        assert_eq!(f.severities, ["high"]);
        assert_eq!(f.details[0].path, "client_id");
        assert_eq!(f.since.unwrap().seconds, 1_767_225_600);
        assert_eq!(r.order, Order::OldestFirst as i32);
        let p = r.page.unwrap();
        assert_eq!((p.page_size, p.page_token.as_str()), (10, "abc"));
        assert!(request_from("").is_ok());
        for bad in [
            "typo=1",
            "actor=a&actor=b",
            "limit=0",
            "limit=5000",
            "order=sideways",
            "since=yesterday",
        ] {
            let e = request_from(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad}");
        }
        let many = "type=sec.a.b&".repeat(70);
        assert!(request_from(&many).is_err());
    }
}
