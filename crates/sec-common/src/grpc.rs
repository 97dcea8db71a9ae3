//! gRPC server and client plumbing: every server gets `grpc.health.v1`, server
//! reflection (v1 and v1alpha, for grpcurl and friends), W3C trace-context extraction
//! and optional (mutual) TLS; clients get TLS and a bearer-token interceptor.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::telemetry::TraceContextLayer;
use crate::tls::TlsConfig;

/// Adds health and reflection to a service's routes. Reflection lists exactly the
/// services served here. Returns the reporter that flips health on drain.
pub async fn add_standard_services(
    routes: Routes,
    served: &[&str],
) -> anyhow::Result<(Routes, HealthReporter)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in served {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;

    let mut v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sec_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    let mut v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sec_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection");
    for name in served {
        v1 = v1.with_service_name(*name);
        v1alpha = v1alpha.with_service_name(*name);
    }
    let routes = routes
        .add_service(health)
        .add_service(v1.build_v1().context("building reflection v1")?)
        .add_service(
            v1alpha
                .build_v1alpha()
                .context("building reflection v1alpha")?,
        );
    Ok((routes, reporter))
}

/// Marks every served service NOT_SERVING (on drain).
pub async fn set_not_serving(reporter: &HealthReporter, served: &[&str]) {
    for name in served {
        reporter
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// Serves `routes` on `listener` (TLS when `tls` is given) until `stop`; then stops
/// accepting and lets in-flight calls finish (the caller bounds that with its grace).
pub async fn serve(
    routes: Routes,
    access: crate::auth::AccessLayer,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut builder = Server::builder()
        .layer(TraceContextLayer)
        .layer(access)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    let router = builder.add_routes(routes);
    let signal = stop.clone().cancelled_owned();
    match tls {
        Some(cfg) => {
            let incoming = crate::tls::tls_incoming(listener, cfg, stop);
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await?;
        }
        None => {
            // serve_with_incoming ignores the builder's tcp_nodelay: set it on the stream,
            // or small responses wait on delayed ACKs (~40 ms p99 stalls).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await?;
        }
    }
    Ok(())
}

/// A lazily connecting channel to `url` (`http://` plaintext, `https://` with `tls`).
pub fn channel(url: &str, tls: &TlsConfig) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid endpoint {url}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let host = url
            .trim_start_matches("https://")
            .split([':', '/'])
            .next()
            .unwrap_or("localhost")
            .to_owned();
        let client_tls = tls
            .client_config(&host)?
            .ok_or_else(|| anyhow::anyhow!("https endpoint {url} needs tls.ca_file"))?;
        endpoint = endpoint.tls_config(client_tls)?;
    }
    Ok(endpoint.connect_lazy())
}

/// Client interceptor adding `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let value = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("token is not valid ASCII"))?,
            ),
            None => None,
        };
        Ok(Self(value))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken([redacted])")
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        crate::telemetry::inject_grpc(req.metadata_mut());
        Ok(req)
    }
}
