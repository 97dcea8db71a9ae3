//! Dialling the services: endpoints and TLS from the configuration, the admin token, and
//! the one way every failed call is reported (`secctl: <code>: <message>`, exit 1).

use std::path::Path;

use anyhow::Context as _;
use sec_common::config::Config;
use sec_common::grpc::{BearerToken, channel};
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type CryptoClient = CryptoServiceClient<InterceptedService<Channel, BearerToken>>;

/// The URL `secctl` dials for `service` (`http(s)://…` from the configuration).
pub fn endpoint(config: &Config, service: &str) -> anyhow::Result<String> {
    let addrs = config.service_addrs(service)?;
    Ok(addrs.endpoint_url(config.tls.enabled()))
}

/// A lazily connecting channel to `service`, with the admin token on every call.
pub fn authed_channel(
    config: &Config,
    service: &str,
) -> anyhow::Result<InterceptedService<Channel, BearerToken>> {
    let token = sec_common::auth::client_token(&config.data_dir)
        .context("no token: set SEC_TOKEN or run where the data directory holds admin.token")?;
    let ch = channel(&endpoint(config, service)?, &config.tls)?;
    Ok(InterceptedService::new(ch, BearerToken::new(Some(&token))?))
}

pub fn crypto(config: &Config) -> anyhow::Result<CryptoClient> {
    Ok(CryptoServiceClient::new(authed_channel(config, "crypto")?))
}

/// A failed call as the operator sees it: the gRPC code by name, then the server's message.
#[derive(Debug)]
pub struct RpcError(pub tonic::Status);

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for RpcError {}

/// The one helper every call goes through: unwraps the response or turns the status
/// into an [`RpcError`].
pub trait Rpc<T> {
    fn rpc(self) -> anyhow::Result<T>;
}

impl<T> Rpc<T> for Result<tonic::Response<T>, tonic::Status> {
    fn rpc(self) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|s| RpcError(s).into())
    }
}

/// All of `path`, or of stdin when `None`.
pub async fn read_input(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) => tokio::fs::read(p)
            .await
            .with_context(|| format!("reading {}", p.display())),
        None => tokio::task::spawn_blocking(|| {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
                .context("reading stdin")?;
            anyhow::Ok(buf)
        })
        .await
        .context("reading stdin")?,
    }
}

/// A text input (ciphertext, backup) with surrounding whitespace trimmed.
pub async fn read_text_input(path: Option<&Path>, what: &str) -> anyhow::Result<String> {
    let bytes = read_input(path).await?;
    let s = String::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8 text"))?;
    let t = s.trim();
    anyhow::ensure!(!t.is_empty(), "no {what} given (empty input)");
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_error_names_the_code() {
        let r: Result<tonic::Response<()>, _> = Err(tonic::Status::invalid_argument(
            "ciphertext does not verify",
        ));
        let e = r.rpc().unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "InvalidArgument: ciphertext does not verify"
        );
    }
}
