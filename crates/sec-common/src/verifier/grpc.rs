//! The verifier's sources over token-svc's gRPC API (`GetJwks`, `ListRevocations`).

use std::time::Duration;

use async_trait::async_trait;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_proto::token::v1::{GetJwksRequest, ListRevocationsRequest, revocation::Target};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{JwksDocument, JwksSource, Revocation, RevocationPage, RevocationSource, SourceError};
use crate::events::from_timestamp;
use crate::grpc::BearerToken;

/// Longest a call to token-svc may take before the loop retries.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// token-svc as the verifier's JWKS and revocation source. `ListRevocations` needs a
/// trusted service's credentials (the bearer token).
#[derive(Clone, Debug)]
pub struct GrpcTokenSource {
    client: TokenServiceClient<InterceptedService<Channel, BearerToken>>,
}

impl GrpcTokenSource {
    pub fn new(channel: Channel, bearer: BearerToken) -> Self {
        Self {
            client: TokenServiceClient::with_interceptor(channel, bearer),
        }
    }
}

fn unavailable(s: &tonic::Status) -> SourceError {
    // The status message is token-svc's, never a token: fine to carry.
    SourceError::Unavailable(format!("{:?}: {}", s.code(), s.message()))
}

#[async_trait]
impl JwksSource for GrpcTokenSource {
    async fn fetch_jwks(&self) -> Result<JwksDocument, SourceError> {
        let mut req = tonic::Request::new(GetJwksRequest {});
        req.set_timeout(CALL_TIMEOUT);
        let r = self
            .client
            .clone()
            .get_jwks(req)
            .await
            .map_err(|s| unavailable(&s))?
            .into_inner();
        Ok(JwksDocument {
            jwks_json: r.jwks_json,
            max_age: Duration::from_secs(u64::from(r.max_age_seconds)),
        })
    }
}

#[async_trait]
impl RevocationSource for GrpcTokenSource {
    async fn list_revocations(&self, cursor: &str) -> Result<RevocationPage, SourceError> {
        let mut req = tonic::Request::new(ListRevocationsRequest {
            cursor: cursor.to_owned(),
        });
        req.set_timeout(CALL_TIMEOUT);
        let r = self
            .client
            .clone()
            .list_revocations(req)
            .await
            .map_err(|s| unavailable(&s))?
            .into_inner();
        let time = |t: Option<&prost_types::Timestamp>| t.and_then(from_timestamp);
        let mut revocations = Vec::with_capacity(r.revocations.len());
        for rev in &r.revocations {
            let item = match &rev.target {
                Some(Target::Jti(jti)) => {
                    time(rev.expires_at.as_ref()).map(|expires_at| Revocation::Jti {
                        jti: jti.clone(),
                        expires_at,
                    })
                }
                Some(Target::Subject(subject)) => {
                    time(rev.not_before.as_ref()).map(|not_before| Revocation::Subject {
                        subject: subject.clone(),
                        not_before,
                    })
                }
                Some(Target::ClientId(client_id)) => {
                    time(rev.not_before.as_ref()).map(|not_before| Revocation::Client {
                        client_id: client_id.clone(),
                        not_before,
                    })
                }
                Some(Target::Kid(kid)) => Some(Revocation::Kid { kid: kid.clone() }),
                None => None,
            };
            // An entry we cannot read is an error, not a silent skip: skipping could
            // forget a revocation.
            revocations.push(item.ok_or_else(|| {
                SourceError::Invalid("revocation without a target or its time".into())
            })?);
        }
        let as_of = time(r.as_of.as_ref())
            .ok_or_else(|| SourceError::Invalid("answer without as_of".into()))?;
        Ok(RevocationPage {
            revocations,
            cursor: r.cursor,
            snapshot: r.snapshot,
            as_of,
        })
    }
}
