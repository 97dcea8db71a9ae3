//! session-svc `Get` of one live session (id hashed, store read, expiry and binding
//! checks): the call auth-svc makes on every authenticated request.

use sec_common::grpc::BearerToken;
use sec_proto::session::v1::session_service_client::SessionServiceClient;
use sec_proto::session::v1::{CreateRequest, GetRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Scenario;
use crate::platform::Target;

pub struct SessionGet;

impl Scenario for SessionGet {
    type Client = (
        SessionServiceClient<InterceptedService<Channel, BearerToken>>,
        String,
    );
    const NAME: &'static str = "session_get";
    const ABOUT: &'static str =
        "sec.session.v1 Get of a live session with IP and user agent (store: the platform's KV)";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        let mut c = SessionServiceClient::with_interceptor(
            target.channel("session")?,
            target.admin_bearer()?,
        );
        let id = c
            .create(CreateRequest {
                user_id: "load-user".into(),
                client_id: "load".into(),
                source_ip: "192.0.2.1".into(),
                user_agent: "sec-load".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .session_id;
        Ok((c, id))
    }

    async fn call((c, id): &mut Self::Client) -> anyhow::Result<()> {
        let r = c
            .get(GetRequest {
                session_id: id.clone(),
                source_ip: "192.0.2.1".into(),
                user_agent: "sec-load".into(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(r.session.is_some(), "no session returned");
        Ok(())
    }
}
