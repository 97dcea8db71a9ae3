//! A legitimate admin call (`CryptoService/ListKeys`, page size 1) alone, and the same
//! call while 16 other callers send well-formed but wrong bearer tokens as fast as they
//! can. Refusing a bad credential must cost next to nothing, so the two medians should
//! stay close (template v2 target: the flood at most 5× the baseline p50).

use std::sync::Arc;

use sec_common::grpc::BearerToken;
use sec_proto::common::v1::PageRequest;
use sec_proto::crypto::v1::ListKeysRequest;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Scenario;
use crate::platform::Target;

/// Bogus-token callers running beside the measured one.
pub const FLOOD_CALLERS: usize = 16;

type Client = CryptoServiceClient<InterceptedService<Channel, BearerToken>>;

fn list_keys() -> ListKeysRequest {
    ListKeysRequest {
        page: Some(PageRequest {
            page_size: 1,
            ..Default::default()
        }),
    }
}

async fn admin_client(target: &Target) -> anyhow::Result<Client> {
    Ok(CryptoServiceClient::with_interceptor(
        target.channel("crypto")?,
        target.admin_bearer()?,
    ))
}

/// Aborts the flood when the last clone of the measured client is dropped.
pub struct Flood(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Flood {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

pub struct AdminListKeys;

impl Scenario for AdminListKeys {
    type Client = Client;
    const NAME: &'static str = "admin_list_keys";
    const ABOUT: &'static str = "sec.crypto.v1 ListKeys (page_size 1) with the admin token";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        admin_client(target).await
    }

    async fn call(client: &mut Self::Client) -> anyhow::Result<()> {
        client.list_keys(list_keys()).await?;
        Ok(())
    }
}

pub struct AdminListKeysUnderBogusFlood;

impl Scenario for AdminListKeysUnderBogusFlood {
    type Client = (Client, Arc<Flood>);
    const NAME: &'static str = "admin_list_keys_bogus_flood";
    const ABOUT: &'static str =
        "admin ListKeys while 16 callers send random well-formed bearer tokens";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        let mut tasks = Vec::with_capacity(FLOOD_CALLERS);
        for _ in 0..FLOOD_CALLERS {
            // A fresh random token per call, shaped like a real one (`sec_` + 43 chars).
            let channel = target.channel("crypto")?;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok(token) = sec_common::auth::generate_token() else {
                        return;
                    };
                    let Ok(bearer) = BearerToken::new(Some(&token)) else {
                        return;
                    };
                    let mut c = CryptoServiceClient::with_interceptor(channel.clone(), bearer);
                    let refused = c.list_keys(list_keys()).await.is_err();
                    debug_assert!(refused, "a random token must be refused");
                }
            }));
        }
        Ok((admin_client(target).await?, Arc::new(Flood(tasks))))
    }

    async fn call(client: &mut Self::Client) -> anyhow::Result<()> {
        client.0.list_keys(list_keys()).await?;
        Ok(())
    }
}
