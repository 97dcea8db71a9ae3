//! token-svc: `IssueTokens` (an access token only: stateless, one ES256 signature) and
//! `ValidateToken` of one access token (signature check plus the in-memory revocation
//! replica). Both call as the admin, which token-svc lets issue like `auth`.

use sec_common::grpc::BearerToken;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_proto::token::v1::{Grant, IssueTokensRequest, ValidateTokenRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Scenario;
use crate::platform::Target;

type Client = TokenServiceClient<InterceptedService<Channel, BearerToken>>;

fn request() -> IssueTokensRequest {
    IssueTokensRequest {
        grant: Some(Grant {
            subject: "load-user".into(),
            client_id: "load-client".into(),
            scope: "openid profile".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn client(target: &Target) -> anyhow::Result<Client> {
    Ok(TokenServiceClient::with_interceptor(
        target.channel("token")?,
        target.admin_bearer()?,
    ))
}

pub struct TokenIssue;

impl Scenario for TokenIssue {
    type Client = Client;
    const NAME: &'static str = "token_issue";
    const ABOUT: &'static str = "sec.token.v1 IssueTokens, access token only (ES256)";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        client(target)
    }

    async fn call(c: &mut Self::Client) -> anyhow::Result<()> {
        let r = c.issue_tokens(request()).await?.into_inner();
        anyhow::ensure!(r.access_token.is_some(), "no access token");
        Ok(())
    }
}

#[derive(Clone)]
pub struct ValidateClient {
    client: Client,
    token: String,
}

pub struct TokenValidate;

impl Scenario for TokenValidate {
    type Client = ValidateClient;
    const NAME: &'static str = "token_validate";
    const ABOUT: &'static str = "sec.token.v1 ValidateToken of one ES256 access token";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        let mut c = client(target)?;
        let token = c
            .issue_tokens(IssueTokensRequest {
                // Long enough to stay valid through the run.
                access_ttl_seconds: 3600,
                ..request()
            })
            .await?
            .into_inner()
            .access_token
            .ok_or_else(|| anyhow::anyhow!("no access token"))?
            .token;
        Ok(ValidateClient { client: c, token })
    }

    async fn call(c: &mut Self::Client) -> anyhow::Result<()> {
        let r = c
            .client
            .validate_token(ValidateTokenRequest {
                token: c.token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(r.valid, "token not valid: reason {}", r.reason);
        Ok(())
    }
}
