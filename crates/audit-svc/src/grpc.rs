//! `sec.audit.v1.AuditService`.

use std::sync::Arc;

use sec_common::error::Error;
use sec_proto::audit::v1::audit_service_server::AuditService;
use sec_proto::audit::v1::{ListEventsRequest, ListEventsResponse};
use sec_proto::common::v1::PageResponse;
use tonic::{Request, Response, Status};

use crate::store::{Cursor, EventQuery, EventStore};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

pub struct AuditApi {
    pub store: Arc<dyn EventStore>,
}

fn micros(t: &prost_types::Timestamp, field: &str) -> Result<i64, Error> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(field, "timestamp nanos out of range"));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .ok_or_else(|| Error::invalid(field, "timestamp out of range"))
}

/// Validates a request into a store query.
pub fn query_from(req: &ListEventsRequest) -> Result<EventQuery, Error> {
    let mut q = EventQuery::default();
    let ty = req.event_type.trim();
    if !ty.is_empty() {
        match ty.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => q.type_prefix = Some(prefix.to_owned()),
            None if !ty.contains('*') => q.event_type = Some(ty.to_owned()),
            _ => {
                return Err(Error::invalid(
                    "event_type",
                    "`*` is allowed only at the end, as a prefix match",
                ));
            }
        }
    }
    q.since_us = req.since.as_ref().map(|t| micros(t, "since")).transpose()?;
    q.until_us = req.until.as_ref().map(|t| micros(t, "until")).transpose()?;
    if let (Some(s), Some(u)) = (q.since_us, q.until_us)
        && s >= u
    {
        return Err(Error::invalid("until", "until must be after since"));
    }
    let page = req.page.clone().unwrap_or_default();
    q.limit = match page.page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    if !page.page_token.is_empty() {
        q.after = Some(
            Cursor::decode(&page.page_token)
                .ok_or_else(|| Error::invalid("page.page_token", "invalid page token"))?,
        );
    }
    Ok(q)
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let q = query_from(request.get_ref())?;
        let (events, next) = self
            .store
            .list(&q)
            .await
            .map_err(|e| Error::unavailable("listing audit events failed", &e))?;
        Ok(Response::new(ListEventsResponse {
            events,
            page: Some(PageResponse {
                next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sec_proto::common::v1::PageRequest;

    #[test]
    fn requests_validate_into_queries() {
        let q = query_from(&ListEventsRequest {
            event_type: "sec.crypto.*".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.type_prefix.as_deref(), Some("sec.crypto."));
        assert_eq!(q.limit, DEFAULT_PAGE);
        let q = query_from(&ListEventsRequest {
            page: Some(PageRequest {
                page_size: 1_000_000,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.limit, MAX_PAGE);
        for bad in [
            ListEventsRequest {
                event_type: "sec.*.key".into(),
                ..Default::default()
            },
            ListEventsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 0,
                }),
                until: Some(prost_types::Timestamp {
                    seconds: 5,
                    nanos: 0,
                }),
                ..Default::default()
            },
            ListEventsRequest {
                page: Some(PageRequest {
                    page_size: 1,
                    page_token: "garbage!".into(),
                }),
                ..Default::default()
            },
            ListEventsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -1,
                }),
                ..Default::default()
            },
        ] {
            let e = query_from(&bad).unwrap_err();
            assert_eq!(
                e.code,
                sec_common::error::ErrorCode::InvalidArgument,
                "{bad:?}"
            );
        }
    }
}
