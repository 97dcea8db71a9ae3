//! `sec.audit.v1.AuditService`.

use std::sync::Arc;

use sec_common::error::Error;
use sec_proto::audit::v1::audit_service_server::AuditService;
use sec_proto::audit::v1::{
    GetChainHeadRequest, GetChainHeadResponse, ListEventsRequest, ListEventsResponse,
    VerifyChainRequest, VerifyChainResponse,
};
use sec_proto::common::v1::PageResponse;
use tonic::{Request, Response, Status};

use crate::chain::{Checkpoint, hex};
use crate::checkpointer::Checkpointer;
use crate::store::{AuditStore, Cursor, EventQuery};
use crate::verify::VerifyError;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

pub struct AuditApi {
    pub store: Arc<dyn AuditStore>,
    pub chain: Arc<Checkpointer>,
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

    async fn verify_chain(
        &self,
        request: Request<VerifyChainRequest>,
    ) -> Result<Response<VerifyChainResponse>, Status> {
        let r = request.into_inner();
        if r.to_seq != 0 && r.to_seq < r.from_seq {
            return Err(Error::invalid("to_seq", "to_seq must not be before from_seq").into());
        }
        let report = self
            .chain
            .verify(r.from_seq, r.to_seq)
            .await
            .map_err(|e| match e {
                VerifyError::Signer(e) => {
                    Error::unavailable("the checkpoint key in crypto-svc is unreachable", &e)
                }
                VerifyError::Store(e) => Error::unavailable("reading the audit chain failed", &e),
            })?;
        let failure = report.failure.clone();
        Ok(Response::new(VerifyChainResponse {
            ok: failure.is_none(),
            from_seq: report.from_seq,
            to_seq: report.to_seq,
            records_checked: report.records,
            checkpoints_checked: report.checkpoints,
            anchor_seq: report.anchor_seq.unwrap_or(0),
            hash: hex(&report.hash),
            problem: failure
                .as_ref()
                .map(|f| f.problem.as_str().to_owned())
                .unwrap_or_default(),
            first_bad_seq: failure.as_ref().map_or(0, |f| f.seq),
            detail: failure.map(|f| f.detail).unwrap_or_default(),
        }))
    }

    async fn get_chain_head(
        &self,
        _request: Request<GetChainHeadRequest>,
    ) -> Result<Response<GetChainHeadResponse>, Status> {
        let unavailable = |e: crate::store::StoreError| {
            Status::from(Error::unavailable("reading the audit chain failed", &e))
        };
        let head = self.store.head().await.map_err(unavailable)?;
        let latest = self
            .store
            .checkpoint_at_or_before(head.seq)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(GetChainHeadResponse {
            seq: head.seq,
            hash: hex(&head.hash),
            latest_checkpoint: latest.map(checkpoint_proto),
        }))
    }
}

fn checkpoint_proto(c: Checkpoint) -> sec_proto::audit::v1::Checkpoint {
    let note = c.note();
    sec_proto::audit::v1::Checkpoint {
        seq: c.seq,
        head_hash: hex(&c.head_hash),
        time: chrono::DateTime::from_timestamp_micros(c.time_us)
            .map(sec_common::events::to_timestamp),
        origin: c.origin,
        key_name: c.key_name,
        key_version: c.key_version,
        signature: c.signature,
        note,
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
