//! `sec.audit.v1.AuditService`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sec_common::auth::Caller;
use sec_common::clock::SharedClock;
use sec_common::error::Error;
use sec_common::events::EventBus;
use sec_proto::audit::v1::audit_service_server::AuditService;
use sec_proto::audit::v1::{
    AcknowledgeAlertRequest, AcknowledgeAlertResponse, CreateLegalHoldRequest,
    CreateLegalHoldResponse, EventFilter, ExportChunk, ExportEventsRequest, ExportFormat,
    GetChainHeadRequest, GetChainHeadResponse, GetMonitorRequest, GetMonitorResponse,
    GetReportRequest, ListAlertsRequest, ListAlertsResponse, ListEventsRequest, ListEventsResponse,
    ListLegalHoldsRequest, ListLegalHoldsResponse, Order, PrunedRange, ReleaseLegalHoldRequest,
    ReleaseLegalHoldResponse, ReportFormat, ReportKind, RunRetentionRequest, RunRetentionResponse,
    SearchEventsRequest, SearchEventsResponse, VerifyChainRequest, VerifyChainResponse,
};
use sec_proto::common::v1::{PageRequest, PageResponse};
use tonic::{Request, Response, Status};

use crate::chain::{Checkpoint, hex};
use crate::checkpointer::Checkpointer;
use crate::reports::{IncidentSource, Kind, ReportError, Scope};
use crate::retention::{Retention, RetentionError};
use crate::sensitive::Sensitive;
use crate::store::{AuditStore, Cursor, EventQuery, LegalHold, Release, TypeMatch};
use crate::verify::VerifyError;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
/// Bounds on one filter: a caller's filter is a query plan, not a payload channel.
const MAX_TYPES: usize = 20;
const MAX_DETAILS: usize = 10;
const MAX_VALUE_CHARS: usize = 512;
const DEFAULT_EXPORT: u32 = 100_000;
const MAX_EXPORT: u32 = 1_000_000;
/// Bytes per streamed piece of a report (well under the 4 MiB message limit).
const REPORT_CHUNK: usize = 256 * 1024;
const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];
const OUTCOMES: [&str; 3] = ["success", "failure", "denied"];

pub struct AuditApi {
    pub store: Arc<dyn AuditStore>,
    pub chain: Arc<Checkpointer>,
    /// `audit.sensitive_fields`: a filter on one of them matches its stored HMACs.
    pub sensitive: Option<Arc<Sensitive>>,
    /// The alert store, for the incident report.
    pub incidents: Option<Arc<dyn IncidentSource>>,
    pub retention: Arc<Retention>,
    /// Where the hold events go.
    pub events: EventBus,
    pub clock: SharedClock,
    /// Alerts and monitoring (ListAlerts, AcknowledgeAlert, GetMonitor).
    pub monitor: crate::alerts::api::Monitor,
}

/// A report's range when the request leaves it open: the 30 days before `until`.
const DEFAULT_REPORT_DAYS: i64 = 30;

fn report_scope(r: &GetReportRequest, now: DateTime<Utc>) -> Result<Scope, Error> {
    let kind = match ReportKind::try_from(r.kind) {
        Ok(ReportKind::Access) => Kind::Access,
        Ok(ReportKind::Changes) => Kind::Changes,
        Ok(ReportKind::Incidents) => Kind::Incidents,
        Ok(ReportKind::Unspecified) | Err(_) => {
            return Err(Error::invalid("kind", "access, changes or incidents"));
        }
    };
    let time = |t: &Option<prost_types::Timestamp>, field: &str| {
        t.as_ref()
            .map(|t| {
                micros(t, field).and_then(|us| {
                    DateTime::from_timestamp_micros(us)
                        .ok_or_else(|| Error::invalid(field, "timestamp out of range"))
                })
            })
            .transpose()
    };
    let until = time(&r.until, "until")?.unwrap_or(now);
    let since =
        time(&r.since, "since")?.unwrap_or(until - chrono::TimeDelta::days(DEFAULT_REPORT_DAYS));
    if since >= until {
        return Err(Error::invalid("until", "until must be after since"));
    }
    Ok(Scope {
        kind,
        since,
        until,
        subject: bounded("subject", &r.subject)?,
        actor_id: bounded("actor_id", &r.actor_id)?,
    })
}

impl AuditApi {
    /// A filter from a request, with values of sensitive fields turned into what is
    /// stored for them (their HMAC under each key version).
    async fn search_query(
        &self,
        filter: Option<EventFilter>,
        order: i32,
    ) -> Result<EventQuery, Error> {
        let mut q = filter_query(&filter.unwrap_or_default(), order)?;
        if let Some(sensitive) = &self.sensitive {
            for (key, values) in &mut q.details {
                if sensitive.is_sensitive(key) {
                    let mut stored = Vec::new();
                    for v in values.iter() {
                        stored.extend(sensitive.match_values(v).await.map_err(|e| {
                            Error::unavailable("cannot match a sensitive field now", &e)
                        })?);
                    }
                    *values = stored;
                }
            }
        }
        Ok(q)
    }
}

/// Most active legal holds.
const MAX_ACTIVE_HOLDS: usize = 1000;
const MAX_HOLD_NAME: usize = 128;
const MAX_HOLD_REASON: usize = 1024;

fn ts_proto(us: i64) -> Option<prost_types::Timestamp> {
    chrono::DateTime::from_timestamp_micros(us).map(sec_common::events::to_timestamp)
}

fn hold_proto(h: LegalHold) -> sec_proto::audit::v1::LegalHold {
    sec_proto::audit::v1::LegalHold {
        id: h.id.to_string(),
        name: h.name,
        reason: h.reason,
        type_prefix: h.type_prefix,
        actor_id: h.actor_id,
        subject: h.subject,
        since: h.since_us.and_then(ts_proto),
        until: h.until_us.and_then(ts_proto),
        created_at: ts_proto(h.created_us),
        created_by: h.created_by,
        released_at: h.released_us.and_then(ts_proto),
        released_by: h.released_by.unwrap_or_default(),
    }
}

/// Validates a hold request into a hold (id and creation filled in).
pub fn hold_from(
    r: &CreateLegalHoldRequest,
    id: uuid::Uuid,
    now_us: i64,
    by: &str,
) -> Result<LegalHold, Error> {
    let name = r.name.trim();
    if name.is_empty()
        || name.len() > MAX_HOLD_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(Error::invalid(
            "name",
            "1 to 128 characters of A-Z, a-z, 0-9, `.`, `_` and `-`",
        ));
    }
    let reason = r.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_HOLD_REASON {
        return Err(Error::invalid("reason", "1 to 1024 characters"));
    }
    let prefix = r.type_prefix.trim();
    if !prefix.is_empty() && !crate::retention::valid_prefix(prefix) {
        return Err(Error::invalid(
            "type_prefix",
            "1 to 128 characters of a-z, 0-9, `.`, `_` and `-`",
        ));
    }
    let since_us = r.since.as_ref().map(|t| micros(t, "since")).transpose()?;
    let until_us = r.until.as_ref().map(|t| micros(t, "until")).transpose()?;
    if let (Some(s), Some(u)) = (since_us, until_us)
        && s >= u
    {
        return Err(Error::invalid("until", "until must be after since"));
    }
    Ok(LegalHold {
        id,
        name: name.to_owned(),
        reason: reason.to_owned(),
        type_prefix: prefix.to_owned(),
        actor_id: bounded("actor_id", &r.actor_id)?.unwrap_or_default(),
        subject: bounded("subject", &r.subject)?.unwrap_or_default(),
        since_us,
        until_us,
        created_us: now_us,
        created_by: by.to_owned(),
        released_us: None,
        released_by: None,
    })
}

fn caller_name(c: &Caller) -> String {
    match c {
        Caller::Admin => "admin".into(),
        Caller::Service(id) => format!("service:{id}"),
        Caller::Anonymous => "anonymous".into(),
    }
}

impl AuditApi {
    /// `sec.audit.hold.created` / `.released`; the hold's name and id only (the reason
    /// may name people).
    fn hold_event(&self, ty: &'static str, h: &LegalHold, by: &str) {
        let mut e = sec_common::events::new_event(self.clock.as_ref(), crate::NAME, ty);
        e.actor = Some(sec_common::events::Actor {
            kind: sec_common::events::ActorKind::User as i32,
            id: by.to_owned(),
        });
        e.subject = format!("legal_hold:{}", h.id);
        e.details.insert("name".into(), h.name.clone());
        if let Err(err) = self.events.publish(e) {
            tracing::warn!(error = %err, event_type = ty, "legal hold event not published");
        }
    }
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
        q.details.push((detail_key(&d.path)?, vec![value]));
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
    type GetReportStream = Self::ExportEventsStream;

    async fn get_report(
        &self,
        request: Request<GetReportRequest>,
    ) -> Result<Response<Self::GetReportStream>, Status> {
        let r = request.into_inner();
        let scope = report_scope(&r, self.clock.now())?;
        let csv = match ReportFormat::try_from(r.format) {
            Ok(ReportFormat::Unspecified | ReportFormat::Json) => false,
            Ok(ReportFormat::Csv) => true,
            Err(_) => return Err(Error::invalid("format", "JSON or CSV").into()),
        };
        let report = crate::reports::build(
            self.store.as_ref(),
            self.incidents.as_deref(),
            &scope,
            self.clock.now(),
            csv,
        )
        .await
        .map_err(|e| match e {
            ReportError::TooLarge(m) => Error::precondition(m),
            ReportError::Store(e) => Error::unavailable("building the report failed", &e),
        })?;
        let chunks: Vec<Result<ExportChunk, Status>> = report
            .chunks(REPORT_CHUNK)
            .map(|c| Ok(ExportChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn search_events(
        &self,
        request: Request<SearchEventsRequest>,
    ) -> Result<Response<SearchEventsResponse>, Status> {
        let r = request.into_inner();
        let mut q = self.search_query(r.filter, r.order).await?;
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
        let mut q = self.search_query(r.filter, r.order).await?;
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

    async fn run_retention(
        &self,
        request: Request<RunRetentionRequest>,
    ) -> Result<Response<RunRetentionResponse>, Status> {
        let dry_run = request.get_ref().dry_run;
        let out = self
            .retention
            .run(dry_run)
            .await
            .map_err(retention_status)?;
        let mut ranges: Vec<PrunedRange> = out
            .plan
            .drops
            .iter()
            .filter_map(|(name, p)| {
                p.as_ref().map(|p| PrunedRange {
                    first_seq: p.first_seq,
                    last_seq: p.last_seq,
                    rows: p.rows,
                    reason: p.reason.clone(),
                    partition: name.clone(),
                })
            })
            .chain(out.plan.ranges.iter().map(|p| PrunedRange {
                first_seq: p.first_seq,
                last_seq: p.last_seq,
                rows: p.rows,
                reason: p.reason.clone(),
                partition: String::new(),
            }))
            .collect();
        ranges.sort_by_key(|r| r.first_seq);
        Ok(Response::new(RunRetentionResponse {
            dry_run,
            ranges,
            removed_rows: out.removed_rows,
            dropped_partitions: out.dropped_partitions,
            held_rows: out.plan.held_rows,
            partitions: out.plan.partitions,
            exported: out
                .exported
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        }))
    }

    async fn create_legal_hold(
        &self,
        request: Request<CreateLegalHoldRequest>,
    ) -> Result<Response<CreateLegalHoldResponse>, Status> {
        let by = caller_name(&Caller::of(&request)?);
        let now = self.clock.now().timestamp_micros();
        let hold = hold_from(request.get_ref(), self.clock.new_uuid_v7(), now, &by)?;
        let unavailable = |e: crate::store::StoreError| {
            Status::from(Error::unavailable("legal holds failed", &e))
        };
        let active = self
            .store
            .list_holds(false, MAX_ACTIVE_HOLDS as u32)
            .await
            .map_err(unavailable)?;
        if active.len() >= MAX_ACTIVE_HOLDS {
            return Err(Error::new(
                sec_common::error::ErrorCode::ResourceExhausted,
                "at most 1000 active legal holds",
            )
            .into());
        }
        if !self.store.create_hold(&hold).await.map_err(unavailable)? {
            return Err(Error::new(
                sec_common::error::ErrorCode::AlreadyExists,
                "an active legal hold has that name",
            )
            .with_field("name")
            .into());
        }
        self.hold_event("sec.audit.hold.created", &hold, &by);
        Ok(Response::new(CreateLegalHoldResponse {
            hold: Some(hold_proto(hold)),
        }))
    }

    async fn release_legal_hold(
        &self,
        request: Request<ReleaseLegalHoldRequest>,
    ) -> Result<Response<ReleaseLegalHoldResponse>, Status> {
        let by = caller_name(&Caller::of(&request)?);
        let id = uuid::Uuid::parse_str(request.get_ref().id.trim())
            .map_err(|_| Error::invalid("id", "not a hold id"))?;
        let now = self.clock.now().timestamp_micros();
        match self
            .store
            .release_hold(id, &by, now)
            .await
            .map_err(|e| Error::unavailable("legal holds failed", &e))?
        {
            Release::Released => {}
            Release::AlreadyReleased => {
                return Err(Error::new(
                    sec_common::error::ErrorCode::Aborted,
                    "the hold was released already",
                )
                .into());
            }
            Release::NotFound => return Err(Error::not_found("no such legal hold").into()),
        }
        let holds = self
            .store
            .list_holds(true, MAX_ACTIVE_HOLDS as u32)
            .await
            .map_err(|e| Error::unavailable("legal holds failed", &e))?;
        if let Some(h) = holds.iter().find(|h| h.id == id) {
            self.hold_event("sec.audit.hold.released", h, &by);
        }
        Ok(Response::new(ReleaseLegalHoldResponse {
            released_at: ts_proto(now),
        }))
    }

    async fn list_legal_holds(
        &self,
        request: Request<ListLegalHoldsRequest>,
    ) -> Result<Response<ListLegalHoldsResponse>, Status> {
        let holds = self
            .store
            .list_holds(request.get_ref().include_released, MAX_ACTIVE_HOLDS as u32)
            .await
            .map_err(|e| Error::unavailable("legal holds failed", &e))?;
        Ok(Response::new(ListLegalHoldsResponse {
            holds: holds.into_iter().map(hold_proto).collect(),
        }))
    }
}

fn retention_status(e: RetentionError) -> Status {
    match e {
        RetentionError::Chain { .. } | RetentionError::NoCheckpoint(_) => {
            Error::precondition(e.to_string()).into()
        }
        RetentionError::Verify(VerifyError::Signer(e)) => {
            Error::unavailable("the checkpoint key in crypto-svc is unreachable", &e).into()
        }
        RetentionError::Verify(VerifyError::Store(e)) | RetentionError::Store(e) => {
            Error::unavailable("retention failed in the database", &e).into()
        }
        RetentionError::Export(e) => Error::internal("retention export failed", &e).into(),
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
    fn hold_requests_are_validated() {
        let id = uuid::Uuid::new_v4();
        let ok = CreateLegalHoldRequest {
            name: "case-2026.01_a".into(),
            reason: "litigation hold, ticket LEG-7".into(),
            type_prefix: "sec.auth.".into(),
            actor_id: "alice".into(),
            since: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            until: Some(prost_types::Timestamp {
                seconds: 20,
                nanos: 0,
            }),
            ..Default::default()
        };
        let h = hold_from(&ok, id, 5, "admin").unwrap();
        assert_eq!(
            (h.since_us, h.until_us, h.created_by.as_str()),
            (Some(10_000_000), Some(20_000_000), "admin")
        );
        let bad = |f: fn(&mut CreateLegalHoldRequest), field: &str| {
            let mut r = ok.clone();
            f(&mut r);
            let e = hold_from(&r, id, 5, "admin").unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
        };
        bad(|r| r.name = String::new(), "name");
        bad(|r| r.name = "a b".into(), "name");
        bad(|r| r.name = "x".repeat(129), "name");
        bad(|r| r.reason = " ".into(), "reason");
        bad(|r| r.reason = "x".repeat(1025), "reason");
        bad(|r| r.type_prefix = "SEC.*".into(), "type_prefix");
        bad(|r| r.actor_id = "x".repeat(513), "actor_id");
        bad(
            |r| {
                r.until = Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 0,
                })
            },
            "until",
        );
    }

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
