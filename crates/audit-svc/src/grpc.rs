//! `sec.audit.v1.AuditService`.

use std::sync::Arc;

use sec_common::error::Error;
use sec_proto::audit::v1::audit_service_server::AuditService;
use sec_proto::audit::v1::{
    AcknowledgeAlertRequest, AcknowledgeAlertResponse, EventFilter, ExportChunk,
    ExportEventsRequest, ExportFormat, GetChainHeadRequest, GetChainHeadResponse,
    GetMonitorRequest, GetMonitorResponse, ListAlertsRequest, ListAlertsResponse,
    ListEventsRequest, ListEventsResponse, Order, SearchEventsRequest, SearchEventsResponse,
    VerifyChainRequest, VerifyChainResponse,
};
use sec_proto::common::v1::{PageRequest, PageResponse};
use tonic::{Request, Response, Status};

use crate::chain::{Checkpoint, hex};
use crate::checkpointer::Checkpointer;
use crate::store::{AuditStore, Cursor, EventQuery, TypeMatch};
use crate::verify::VerifyError;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
/// Bounds on one filter: a caller's filter is a query plan, not a payload channel.
const MAX_TYPES: usize = 20;
const MAX_DETAILS: usize = 10;
const MAX_VALUE_CHARS: usize = 512;
const DEFAULT_EXPORT: u32 = 100_000;
const MAX_EXPORT: u32 = 1_000_000;
const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];
const OUTCOMES: [&str; 3] = ["success", "failure", "denied"];

pub struct AuditApi {
    pub store: Arc<dyn AuditStore>,
    pub chain: Arc<Checkpointer>,
    /// Alerts and monitoring (ListAlerts, AcknowledgeAlert, GetMonitor).
    pub monitor: crate::alerts::api::Monitor,
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
    page_into(&mut q, req.page.as_ref())?;
    Ok(q)
}

fn bounded(field: &str, v: &str) -> Result<Option<String>, Error> {
    let v = v.trim();
    if v.chars().count() > MAX_VALUE_CHARS {
        return Err(Error::invalid(
            field,
            format!("longer than {MAX_VALUE_CHARS} characters"),
        ));
    }
    Ok((!v.is_empty()).then(|| v.to_owned()))
}

/// `sec.auth.login.failed` or `sec.auth.*`: the event type grammar, or a prefix of it.
fn type_match(field: &str, t: &str) -> Result<TypeMatch, Error> {
    let (body, prefix) = match t.strip_suffix('*') {
        Some(p) => (p, true),
        None => (t, false),
    };
    let ok = !body.is_empty()
        && body.len() <= 128
        && body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !ok {
        return Err(Error::invalid(
            field,
            "an event type (`sec.auth.login.failed`) or a prefix ending in `*` (`sec.auth.*`)",
        ));
    }
    Ok(if prefix {
        TypeMatch::Prefix(body.to_owned())
    } else {
        TypeMatch::Exact(body.to_owned())
    })
}

fn one_of(field: &str, values: &[String], allowed: &[&str]) -> Result<Vec<String>, Error> {
    if values.len() > allowed.len() {
        return Err(Error::invalid(field, "too many values"));
    }
    values
        .iter()
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            if allowed.contains(&v.as_str()) {
                Ok(v)
            } else {
                Err(Error::invalid(
                    field,
                    format!("one of {}", allowed.join(", ")),
                ))
            }
        })
        .collect()
}

/// A detail path: `$.key` or `key`, the key `[A-Za-z0-9_.-]{1,64}` (details are flat).
fn detail_key(path: &str) -> Result<String, Error> {
    let key = path.strip_prefix("$.").unwrap_or(path);
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(Error::invalid(
            "filter.details.path",
            "`$.<key>` or `<key>`, the key of letters, digits, `_`, `-` or `.`",
        ));
    }
    Ok(key.to_owned())
}

/// Validates a SearchEvents/ExportEvents filter into a store query (no limit or cursor).
pub fn filter_query(f: &EventFilter, order: i32) -> Result<EventQuery, Error> {
    let mut q = EventQuery {
        since_us: f
            .since
            .as_ref()
            .map(|t| micros(t, "filter.since"))
            .transpose()?,
        until_us: f
            .until
            .as_ref()
            .map(|t| micros(t, "filter.until"))
            .transpose()?,
        ..Default::default()
    };
    if let (Some(s), Some(u)) = (q.since_us, q.until_us)
        && s >= u
    {
        return Err(Error::invalid("filter.until", "until must be after since"));
    }
    if f.event_types.len() > MAX_TYPES {
        return Err(Error::invalid(
            "filter.event_types",
            format!("at most {MAX_TYPES}"),
        ));
    }
    q.types = f
        .event_types
        .iter()
        .map(|t| type_match("filter.event_types", t.trim()))
        .collect::<Result<_, _>>()?;
    q.actor_id = bounded("filter.actor_id", &f.actor_id)?;
    q.subject = bounded("filter.subject", &f.subject)?;
    q.service = bounded("filter.service", &f.service)?;
    if let Some(ip) = bounded("filter.ip", &f.ip)? {
        q.ip = Some(match ip.parse::<ipnet::IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => ip
                .parse::<std::net::IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| {
                    Error::invalid(
                        "filter.ip",
                        "an address (`192.0.2.7`) or a CIDR block (`192.0.2.0/24`)",
                    )
                })?,
        });
    }
    q.severities = one_of("filter.severities", &f.severities, &SEVERITIES)?;
    q.outcomes = one_of("filter.outcomes", &f.outcomes, &OUTCOMES)?;
    if f.details.len() > MAX_DETAILS {
        return Err(Error::invalid(
            "filter.details",
            format!("at most {MAX_DETAILS}"),
        ));
    }
    for d in &f.details {
        let value = d.value.clone();
        if value.chars().count() > MAX_VALUE_CHARS {
            return Err(Error::invalid("filter.details.value", "too long"));
        }
        q.details.push((detail_key(&d.path)?, value));
    }
    q.oldest_first = match Order::try_from(order) {
        Ok(Order::Unspecified | Order::NewestFirst) => false,
        Ok(Order::OldestFirst) => true,
        Err(_) => return Err(Error::invalid("order", "unknown order")),
    };
    Ok(q)
}

fn page_into(q: &mut EventQuery, page: Option<&PageRequest>) -> Result<(), Error> {
    let page = page.cloned().unwrap_or_default();
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
    Ok(())
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ExportEventsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<ExportChunk, Status>> + Send + 'static>,
    >;

    async fn search_events(
        &self,
        request: Request<SearchEventsRequest>,
    ) -> Result<Response<SearchEventsResponse>, Status> {
        let r = request.into_inner();
        let mut q = filter_query(&r.filter.unwrap_or_default(), r.order)?;
        page_into(&mut q, r.page.as_ref())?;
        let (events, next) = self
            .store
            .list(&q)
            .await
            .map_err(|e| Error::unavailable("searching audit events failed", &e))?;
        Ok(Response::new(SearchEventsResponse {
            events,
            page: Some(PageResponse {
                next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
            }),
        }))
    }

    async fn export_events(
        &self,
        request: Request<ExportEventsRequest>,
    ) -> Result<Response<Self::ExportEventsStream>, Status> {
        let r = request.into_inner();
        let mut q = filter_query(&r.filter.unwrap_or_default(), r.order)?;
        let csv = match ExportFormat::try_from(r.format) {
            Ok(ExportFormat::Unspecified | ExportFormat::Jsonl) => false,
            Ok(ExportFormat::Csv) => true,
            Err(_) => return Err(Error::invalid("format", "JSONL or CSV").into()),
        };
        let mut left = match r.limit {
            0 => DEFAULT_EXPORT,
            n if n > MAX_EXPORT => {
                return Err(Error::invalid("limit", format!("at most {MAX_EXPORT}")).into());
            }
            n => n,
        };
        let store = self.store.clone();
        // A page per chunk; the channel's bound is the backpressure on a slow reader.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ExportChunk, Status>>(4);
        tokio::spawn(async move {
            if csv
                && tx
                    .send(Ok(ExportChunk {
                        data: sec_common::events::json::CSV_HEADER.as_bytes().to_vec(),
                    }))
                    .await
                    .is_err()
            {
                return;
            }
            while left > 0 {
                q.limit = left.min(MAX_PAGE);
                let (events, next) = match store.list(&q).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx
                            .send(Err(
                                Error::unavailable("exporting audit events failed", &e).into()
                            ))
                            .await;
                        return;
                    }
                };
                left = left.saturating_sub(events.len() as u32);
                let mut data = Vec::with_capacity(events.len() * 400);
                for e in &events {
                    if csv {
                        data.extend_from_slice(sec_common::events::json::csv_row(e).as_bytes());
                    } else {
                        data.extend_from_slice(
                            sec_common::events::json::event_json(e)
                                .to_string()
                                .as_bytes(),
                        );
                        data.push(b'\n');
                    }
                }
                if !data.is_empty() && tx.send(Ok(ExportChunk { data })).await.is_err() {
                    return; // the caller went away
                }
                match next {
                    Some(c) => q.after = Some(c),
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

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

    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        Ok(Response::new(
            self.monitor.list_alerts(request.get_ref()).await?,
        ))
    }

    async fn acknowledge_alert(
        &self,
        request: Request<AcknowledgeAlertRequest>,
    ) -> Result<Response<AcknowledgeAlertResponse>, Status> {
        let actor = sec_common::auth::Caller::of(&request)?.actor();
        Ok(Response::new(
            self.monitor.acknowledge(request.get_ref(), actor).await?,
        ))
    }

    async fn get_monitor(
        &self,
        _request: Request<GetMonitorRequest>,
    ) -> Result<Response<GetMonitorResponse>, Status> {
        Ok(Response::new(
            self.monitor.get_monitor(self.store.as_ref()).await?,
        ))
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
