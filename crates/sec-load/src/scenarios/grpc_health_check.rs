//! `grpc.health.v1.Health/Check` on crypto-svc: the cheapest authenticated-free round
//! trip, i.e. the floor of the gRPC stack (HTTP/2, tonic, tower layers) on loopback.

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::Scenario;
use crate::platform::Target;

pub struct GrpcHealthCheck;

impl Scenario for GrpcHealthCheck {
    type Client = HealthClient<Channel>;
    const NAME: &'static str = "grpc_health_check";
    const ABOUT: &'static str = "grpc.health.v1 Check of sec.crypto.v1.CryptoService on crypto-svc";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        Ok(HealthClient::new(target.channel("crypto")?))
    }

    async fn call(client: &mut Self::Client) -> anyhow::Result<()> {
        let r = client
            .check(HealthCheckRequest {
                service: "sec.crypto.v1.CryptoService".into(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            r.status == ServingStatus::Serving as i32,
            "status {}",
            r.status
        );
        Ok(())
    }
}
