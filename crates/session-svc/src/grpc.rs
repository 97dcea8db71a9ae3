//! `sec.session.v1.SessionService`: request mapping over the [`Engine`]. Who may call
//! what is declared once in [`crate::ACCESS`] and enforced by the host.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sec_common::events::{from_timestamp, to_timestamp};
use sec_proto::session::v1 as pb;
use sec_proto::session::v1::session_service_server::SessionService;
use tonic::{Request, Response, Status, Streaming};

use crate::config::BindingPolicy;
use crate::engine::{Binding, BindingResult, Engine, NewSession, SessionError, handle_of};
use crate::store::{ImportOutcome, Record};

pub struct SessionApi {
    pub engine: Arc<Engine>,
}

fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    chrono::DateTime::from_timestamp_millis(ms).map(to_timestamp)
}

fn policy_to_proto(p: BindingPolicy) -> pb::BindingPolicy {
    match p {
        BindingPolicy::Record => pb::BindingPolicy::Record,
        BindingPolicy::StepUp => pb::BindingPolicy::StepUp,
        BindingPolicy::Deny => pb::BindingPolicy::Deny,
    }
}

pub fn session_to_proto(handle: &str, r: &Record) -> pb::Session {
    let b = Binding::decode(r.binding);
    pb::Session {
        handle: handle.to_owned(),
        user_id: r.user.clone(),
        client_id: r.client.clone(),
        auth_time: ts(r.auth_time),
        amr: r
            .amr
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        acr: r.acr.clone(),
        created_at: ts(r.created),
        last_seen_at: ts(r.last_seen),
        expires_at: ts(r.expires.min(r.absolute)),
        absolute_expires_at: ts(r.absolute),
        source_ip: r.ip.clone(),
        user_agent: r.user_agent.clone(),
        attributes: r.attributes.clone().into_iter().collect(),
        binding: Some(pb::Binding {
            ip: b.ip,
            user_agent: b.user_agent,
            policy: policy_to_proto(b.policy) as i32,
        }),
    }
}

fn binding_to_proto(b: BindingResult) -> pb::BindingResult {
    match b {
        BindingResult::Ok => pb::BindingResult::Ok,
        BindingResult::ChangedRecorded => pb::BindingResult::ChangedRecorded,
        BindingResult::StepUpRequired => pb::BindingResult::StepUpRequired,
    }
}

fn binding_from_proto(b: pb::Binding, default: BindingPolicy) -> Result<Binding, SessionError> {
    let policy = match pb::BindingPolicy::try_from(b.policy) {
        Ok(pb::BindingPolicy::Unspecified) => default,
        Ok(pb::BindingPolicy::Record) => BindingPolicy::Record,
        Ok(pb::BindingPolicy::StepUp) => BindingPolicy::StepUp,
        Ok(pb::BindingPolicy::Deny) => BindingPolicy::Deny,
        Err(_) => {
            return Err(SessionError::invalid(
                "binding.policy",
                "unknown binding policy",
            ));
        }
    };
    Ok(Binding {
        ip: b.ip,
        user_agent: b.user_agent,
        policy,
    })
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportedSession, Status>> + Send>>;

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let r = req.into_inner();
        let auth_time = match r.auth_time.as_ref() {
            None => None,
            Some(t) => Some(
                from_timestamp(t)
                    .ok_or_else(|| SessionError::invalid("auth_time", "invalid timestamp"))?
                    .timestamp_millis(),
            ),
        };
        let binding = match r.binding {
            None => None,
            Some(b) => Some(binding_from_proto(b, self.engine.default_binding_policy())?),
        };
        let (id, handle, rec) = self
            .engine
            .create(NewSession {
                user: r.user_id,
                client: r.client_id,
                auth_time,
                amr: r.amr,
                acr: r.acr,
                ip: r.source_ip,
                user_agent: r.user_agent,
                attributes: r.attributes,
                binding,
            })
            .await?;
        Ok(Response::new(pb::CreateResponse {
            session_id: id,
            session: Some(session_to_proto(&handle, &rec)),
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let (handle, rec, b) = self
            .engine
            .access(&r.session_id, &r.source_ip, &r.user_agent, false)
            .await?;
        Ok(Response::new(pb::GetResponse {
            session: Some(session_to_proto(&handle, &rec)),
            binding: binding_to_proto(b) as i32,
        }))
    }

    async fn touch(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let (handle, rec, b) = self
            .engine
            .access(&r.session_id, &r.source_ip, &r.user_agent, true)
            .await?;
        Ok(Response::new(pb::GetResponse {
            session: Some(session_to_proto(&handle, &rec)),
            binding: binding_to_proto(b) as i32,
        }))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let (id, handle, rec) = self.engine.rotate(&req.into_inner().session_id).await?;
        Ok(Response::new(pb::CreateResponse {
            session_id: id,
            session: Some(session_to_proto(&handle, &rec)),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let handle = match req.into_inner().target {
            Some(pb::revoke_request::Target::SessionId(id)) => {
                crate::engine::validate_session_id(&id)?;
                handle_of(&id)
            }
            Some(pb::revoke_request::Target::Handle(h)) => {
                crate::engine::validate_handle(&h)?;
                h
            }
            None => {
                return Err(
                    SessionError::invalid("target", "session_id or handle is required").into(),
                );
            }
        };
        let revoked = self.engine.revoke(&handle, "revoked").await?;
        Ok(Response::new(pb::RevokeResponse { revoked }))
    }

    async fn revoke_all_for_user(
        &self,
        req: Request<pb::RevokeAllForUserRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let revoked = self.engine.revoke_user(&req.into_inner().user_id).await?;
        Ok(Response::new(pb::RevokeResponse { revoked }))
    }

    async fn list_for_user(
        &self,
        req: Request<pb::ListForUserRequest>,
    ) -> Result<Response<pb::ListForUserResponse>, Status> {
        let list = self.engine.list_user(&req.into_inner().user_id).await?;
        Ok(Response::new(pb::ListForUserResponse {
            sessions: list.iter().map(|(h, r)| session_to_proto(h, r)).collect(),
        }))
    }

    async fn session_stats(
        &self,
        _req: Request<pb::SessionStatsRequest>,
    ) -> Result<Response<pb::SessionStatsResponse>, Status> {
        let s = self.engine.refresh_gauges().await?;
        let m = &self.engine.metrics;
        Ok(Response::new(pb::SessionStatsResponse {
            active: s.active,
            clients: s
                .by_client
                .into_iter()
                .map(|(client_id, active)| pb::ClientCount { client_id, active })
                .collect(),
            created: m.created.get(),
            expired: m.expired.get(),
            revoked: m.revoked.get(),
            rotated: m.rotated.get(),
            binding_violations: m.binding_violations.get(),
            evictions: m.evictions.get(),
        }))
    }

    type ExportSessionsStream = ExportStream;

    async fn export_sessions(
        &self,
        _req: Request<pb::ExportSessionsRequest>,
    ) -> Result<Response<Self::ExportSessionsStream>, Status> {
        let engine = self.engine.clone();
        // Page by page (bounded memory); a page the client has not taken yet holds the
        // next scan back.
        let stream = futures::stream::unfold(Some(0_u64), move |cursor| {
            let engine = engine.clone();
            async move {
                let cursor = cursor?;
                match engine.export_page(cursor).await {
                    Ok((next, page)) => {
                        let items: Vec<Result<pb::ExportedSession, Status>> = page
                            .into_iter()
                            .map(|(handle, r, remaining_ms)| {
                                Ok(pb::ExportedSession {
                                    handle,
                                    record: r.encode(),
                                    remaining_ms,
                                })
                            })
                            .collect();
                        Some((futures::stream::iter(items), (next != 0).then_some(next)))
                    }
                    Err(e) => Some((futures::stream::iter(vec![Err(e.into())]), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(futures::StreamExt::flatten(stream))))
    }

    async fn import_sessions(
        &self,
        req: Request<Streaming<pb::ExportedSession>>,
    ) -> Result<Response<pb::ImportSessionsResponse>, Status> {
        let mut stream = req.into_inner();
        let mut out = pb::ImportSessionsResponse::default();
        while let Some(item) = stream.message().await? {
            match self.engine.import(&item.handle, &item.record).await? {
                ImportOutcome::Imported => out.imported += 1,
                ImportOutcome::Expired => out.skipped_expired += 1,
                ImportOutcome::Exists => out.skipped_existing += 1,
            }
        }
        Ok(Response::new(out))
    }
}
