//! `sec.audit.v1.AuditService/ListEvents`, newest 10 events, with the admin token: an
//! authenticated read through the audit store.

use sec_common::grpc::BearerToken;
use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_proto::common::v1::PageRequest;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Scenario;
use crate::platform::Target;

pub struct AuditListEvents;

impl Scenario for AuditListEvents {
    type Client = AuditServiceClient<InterceptedService<Channel, BearerToken>>;
    const NAME: &'static str = "audit_list_events";
    const ABOUT: &'static str = "sec.audit.v1 ListEvents (page_size 10) with the admin token";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        Ok(AuditServiceClient::with_interceptor(
            target.channel("audit")?,
            target.admin_bearer()?,
        ))
    }

    async fn call(client: &mut Self::Client) -> anyhow::Result<()> {
        client
            .list_events(ListEventsRequest {
                page: Some(PageRequest {
                    page_size: 10,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        Ok(())
    }
}
