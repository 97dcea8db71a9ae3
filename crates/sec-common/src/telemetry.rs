//! Logging, tracing and W3C trace-context propagation shared by every service.
//!
//! [`init`] installs the process-wide `tracing` subscriber (a `fmt` layer in pretty or JSON
//! form behind an `EnvFilter`, plus an OpenTelemetry layer exporting over OTLP/gRPC when an
//! endpoint is configured) and the global W3C `traceparent` propagator. The `inject_*` /
//! `extract_*` helpers move the current trace context across HTTP, gRPC and NATS
//! boundaries, and [`TraceContextLayer`] does the extraction side automatically for tonic
//! servers and axum routers.

use std::io::IsTerminal;
use std::str::FromStr;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Instrumentation scope name of the tracer feeding the `tracing` → OpenTelemetry bridge.
const TRACER_SCOPE: &str = "sec-common";
/// Upper bound for flushing pending spans at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for one OTLP export call.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Multi-line, human-oriented output (ANSI colours when stderr is a terminal).
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The `[telemetry]` section of a service configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `pretty` (default, for humans) or `json` (for log shippers).
    pub log_format: LogFormat,
    /// An `EnvFilter` directive, default `"info"`. (`RUST_LOG`, if set in the process env, wins.)
    pub log_level: String,
    /// OTLP/gRPC endpoint, e.g. `"http://127.0.0.1:4317"`. `None`/empty: no trace export.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_level: "info".to_owned(),
            otlp_endpoint: None,
        }
    }
}

/// Keeps the tracer provider of [`init`] alive; flushes and shuts it down on
/// [`TelemetryGuard::shutdown`] (or, best-effort, on drop).
///
/// Shutting down blocks the calling thread for up to a few seconds while pending spans
/// are exported; call it from a multi-threaded Tokio runtime (the default for the
/// services) or from `spawn_blocking`, never from a current-thread runtime that also
/// drives the exporter's connection.
#[derive(Debug)]
#[must_use = "dropping the guard shuts down trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// A guard that owns nothing (second `init`, or no exporter configured).
    fn noop() -> Self {
        Self { provider: None }
    }

    /// Flushes pending spans and shuts the tracer provider down.
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(error = %err, "telemetry shutdown failed; some spans may be lost");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// Installs the global tracing subscriber and the global W3C TraceContext propagator.
///
/// * logs: a `fmt` layer (pretty or JSON, written to stderr) filtered by `RUST_LOG` when set
///   in the environment, else by `cfg.log_level`;
/// * traces: when `cfg.otlp_endpoint` is set and non-empty, a `tracing-opentelemetry` layer
///   feeding an SDK tracer provider with an OTLP/gRPC batch exporter; `service_name`
///   becomes the resource's `service.name`. Exporting requires a Tokio runtime context;
/// * propagation: the W3C `traceparent` propagator is always installed, so trace ids
///   propagate even without export.
///
/// A second call (or any call after some other global subscriber was installed) does not
/// panic: it returns `Ok` with a guard that does nothing.
///
/// # Errors
///
/// An invalid `log_level` directive, an OTLP endpoint configured outside a Tokio runtime,
/// or an exporter that cannot be built from the endpoint.
pub fn init(cfg: &TelemetryConfig, service_name: &str) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = env_filter(&cfg.log_level)?;

    if tracing::dispatcher::has_been_set() {
        return Ok(TelemetryGuard::noop());
    }

    let endpoint = cfg
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let provider = endpoint
        .map(|endpoint| build_provider(endpoint, service_name))
        .transpose()?;

    let fmt_layer = match cfg.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .pretty()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .boxed(),
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(TRACER_SCOPE)));

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    if installed.is_err() {
        // Lost a race with another initialiser (or a `log` logger was already set):
        // leave the existing setup alone.
        if let Some(provider) = provider {
            let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
        return Ok(TelemetryGuard::noop());
    }

    if let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    tracing::info!(
        service = service_name,
        log_format = ?cfg.log_format,
        trace_export = provider.is_some(),
        "telemetry initialised"
    );
    Ok(TelemetryGuard { provider })
}

/// `RUST_LOG` when present and valid, else the configured directive (empty means `info`).
fn env_filter(log_level: &str) -> anyhow::Result<EnvFilter> {
    if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some()
        && let Ok(filter) = EnvFilter::try_from_default_env()
    {
        return Ok(filter);
    }
    let directive = match log_level.trim() {
        "" => "info",
        other => other,
    };
    EnvFilter::try_new(directive)
        .map_err(|err| anyhow::anyhow!("invalid telemetry log_level {directive:?}: {err}"))
}

fn build_provider(endpoint: &str, service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    // The tonic channel spawns its connection worker on the current runtime.
    if tokio::runtime::Handle::try_current().is_err() {
        anyhow::bail!("telemetry otlp_endpoint is set but init was called outside a tokio runtime");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|err| anyhow::anyhow!("building the otlp span exporter failed: {err}"))?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

// ---------------------------------------------------------------------------------------
// Carriers
// ---------------------------------------------------------------------------------------

/// `http::HeaderMap` as an OpenTelemetry carrier. Invalid names/values are skipped.
struct HttpHeaderCarrier<'a>(&'a mut http::HeaderMap);

impl Injector for HttpHeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HttpHeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let values: Vec<&str> = self
            .0
            .get_all(key)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then_some(values)
    }
}

/// tonic `MetadataMap` as a carrier: ASCII entries only, invalid keys/values skipped.
struct GrpcMetadataCarrier<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for GrpcMetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        // `MetadataValue` admits obs-text bytes; gRPC ASCII metadata must be plain ASCII.
        if !value.is_ascii() {
            return;
        }
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct GrpcMetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for GrpcMetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let values: Vec<&str> = self
            .0
            .get_all(key)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then_some(values)
    }
}

/// `async_nats::HeaderMap` as a carrier. Invalid names/values are skipped (the NATS
/// infallible conversions would panic on them).
struct NatsHeaderCarrier<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            async_nats::HeaderName::from_str(key),
            async_nats::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct NatsHeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl NatsHeaderExtractor<'_> {
    /// NATS header names are case-sensitive; propagation field names are lowercase but a
    /// foreign publisher may have capitalised them, so fall back to a case-insensitive scan.
    fn values(&self, key: &str) -> Option<&Vec<async_nats::HeaderValue>> {
        self.0
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(*name) == key)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
            })
            .map(|(_, values)| values)
    }
}

impl Extractor for NatsHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.values(key)
            .and_then(|values| values.first())
            .map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        self.values(key)
            .map(|values| values.iter().map(async_nats::HeaderValue::as_str).collect())
            .filter(|values: &Vec<&str>| !values.is_empty())
    }
}

// ---------------------------------------------------------------------------------------
// Propagation helpers
// ---------------------------------------------------------------------------------------

/// The OpenTelemetry context of the current `tracing` span, falling back to the
/// attached OpenTelemetry context when the span carries none.
fn current_context() -> Context {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        cx
    } else {
        Context::current()
    }
}

fn inject_context(cx: &Context, injector: &mut dyn Injector) {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(cx, injector);
    });
}

fn extract_context(extractor: &dyn Extractor) -> Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(extractor))
}

fn inject_context_http(cx: &Context, headers: &mut http::HeaderMap) {
    inject_context(cx, &mut HttpHeaderCarrier(headers));
}

fn inject_context_grpc(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    inject_context(cx, &mut GrpcMetadataCarrier(metadata));
}

fn inject_context_nats(cx: &Context, headers: &mut async_nats::HeaderMap) {
    inject_context(cx, &mut NatsHeaderCarrier(headers));
}

/// Writes the current span's trace context (`traceparent`, …) into HTTP headers.
pub fn inject_http(headers: &mut http::HeaderMap) {
    inject_context_http(&current_context(), headers);
}

/// Reads a remote parent context from HTTP headers (empty context when absent/invalid).
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    extract_context(&HttpHeaderExtractor(headers))
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_grpc(metadata: &mut tonic::metadata::MetadataMap) {
    inject_context_grpc(&current_context(), metadata);
}

/// Reads a remote parent context from incoming gRPC metadata.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> Context {
    extract_context(&GrpcMetadataExtractor(metadata))
}

/// Writes the current span's trace context into NATS message headers.
pub fn inject_nats(headers: &mut async_nats::HeaderMap) {
    inject_context_nats(&current_context(), headers);
}

/// Reads a remote parent context from NATS message headers.
pub fn extract_nats(headers: &async_nats::HeaderMap) -> Context {
    extract_context(&NatsHeaderExtractor(headers))
}

/// 32-hex-digit W3C trace id of the current span, if it has a valid one.
pub fn current_trace_id() -> Option<String> {
    let cx = current_context();
    let span = cx.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

// ---------------------------------------------------------------------------------------
// Server-side tower layer
// ---------------------------------------------------------------------------------------

/// Tower layer for tonic servers and axum routers: each request runs inside an
/// `info_span!("request")` named after the URI path, whose OpenTelemetry parent is the
/// W3C context carried by the request headers (if any).
///
/// The incoming context is also made the current OpenTelemetry context while the request
/// runs, so [`current_trace_id`] and the `inject_*` helpers see the caller's trace even
/// when no OTLP exporter (hence no OpenTelemetry layer) is installed: security events and
/// outgoing calls then carry the caller's trace id with or without export.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// The service produced by [`TraceContextLayer`].
#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S> TraceContextService<S> {
    /// Wraps `inner` directly (equivalent to `TraceContextLayer.layer(inner)`).
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WithContext<Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let parent = extract_http(req.headers());
        let path = req.uri().path();
        let span = tracing::info_span!("request", otel.name = %path, rpc.path = %path);
        let current = if parent.span().span_context().is_valid() {
            // Fails only when the span is disabled or no OpenTelemetry layer is installed;
            // either way there is nothing to parent (the attached context still carries it).
            let _ = span.set_parent(parent.clone());
            parent
        } else {
            Context::current()
        };
        let future = {
            let _entered = span.enter();
            let _attached = current.clone().attach();
            self.inner.call(req)
        };
        future.instrument(span).with_context(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use std::convert::Infallible;
    use tower::{Layer as _, ServiceExt as _};

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN_ID: &str = "00f067aa0ba902b7";
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn use_w3c_propagator() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }

    fn remote_context() -> Context {
        let span_context = SpanContext::new(
            TraceId::from_hex(TRACE_ID).unwrap(),
            SpanId::from_hex(SPAN_ID).unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(span_context)
    }

    fn assert_same_parent(cx: &Context) {
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid(), "extracted context has no valid span");
        assert!(sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), TRACE_ID);
        assert_eq!(sc.span_id().to_string(), SPAN_ID);
        assert!(sc.is_sampled());
    }

    /// A subscriber with the OpenTelemetry layer over an exporter-less SDK provider.
    fn otel_subscriber() -> (impl tracing::Subscriber + Send + Sync, SdkTracerProvider) {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        (subscriber, provider)
    }

    #[test]
    fn http_round_trip_preserves_trace_id() {
        use_w3c_propagator();
        let mut headers = http::HeaderMap::new();
        inject_context_http(&remote_context(), &mut headers);
        assert_eq!(headers.get("traceparent").unwrap(), TRACEPARENT);
        assert_same_parent(&extract_http(&headers));
    }

    #[test]
    fn grpc_round_trip_preserves_trace_id() {
        use_w3c_propagator();
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_context_grpc(&remote_context(), &mut metadata);
        assert_eq!(
            metadata.get("traceparent").unwrap().to_str().unwrap(),
            TRACEPARENT
        );
        assert_same_parent(&extract_grpc(&metadata));
    }

    #[test]
    fn nats_round_trip_preserves_trace_id() {
        use_w3c_propagator();
        let mut headers = async_nats::HeaderMap::new();
        inject_context_nats(&remote_context(), &mut headers);
        assert_eq!(headers.get("traceparent").unwrap().as_str(), TRACEPARENT);
        assert_same_parent(&extract_nats(&headers));
    }

    #[test]
    fn nats_extract_tolerates_capitalised_header() {
        use_w3c_propagator();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Traceparent", TRACEPARENT);
        assert_same_parent(&extract_nats(&headers));
    }

    #[test]
    fn malformed_traceparent_yields_no_valid_span() {
        use_w3c_propagator();
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zzzzzzzzzzzzzzzz-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", http::HeaderValue::from_static(bad));
            assert!(
                !extract_http(&headers).span().span_context().is_valid(),
                "{bad} should not parse"
            );

            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("traceparent", bad.parse().unwrap());
            assert!(!extract_grpc(&metadata).span().span_context().is_valid());

            let mut nats = async_nats::HeaderMap::new();
            nats.insert("traceparent", bad);
            assert!(!extract_nats(&nats).span().span_context().is_valid());
        }
        assert!(
            !extract_http(&http::HeaderMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }

    #[test]
    fn grpc_injector_skips_non_ascii_values() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        let mut carrier = GrpcMetadataCarrier(&mut metadata);
        carrier.set("x-bad", "caf\u{e9}".to_owned());
        carrier.set("trace-bin", "abc".to_owned());
        carrier.set("x-good", "ok".to_owned());
        assert!(metadata.get("x-bad").is_none());
        assert_eq!(metadata.len(), 1);
        assert_eq!(metadata.get("x-good").unwrap(), "ok");
    }

    #[test]
    fn nats_injector_skips_invalid_entries() {
        let mut headers = async_nats::HeaderMap::new();
        let mut carrier = NatsHeaderCarrier(&mut headers);
        carrier.set("bad:name", "v".to_owned());
        carrier.set("x-bad", "a\r\nb".to_owned());
        carrier.set("x-good", "ok".to_owned());
        assert_eq!(headers.len(), 1);
        assert_eq!(headers.get("x-good").unwrap().as_str(), "ok");
    }

    #[test]
    fn config_defaults_and_deserialization() {
        let default = TelemetryConfig::default();
        assert_eq!(default.log_format, LogFormat::Pretty);
        assert_eq!(default.log_level, "info");
        assert_eq!(default.otlp_endpoint, None);

        let empty: TelemetryConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, default);

        let cfg: TelemetryConfig = serde_json::from_str(
            r#"{"log_format":"json","log_level":"debug,hyper=warn","otlp_endpoint":"http://127.0.0.1:4317"}"#,
        )
        .unwrap();
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.log_level, "debug,hyper=warn");
        assert_eq!(cfg.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));

        let round: TelemetryConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(round, cfg);
    }

    #[test]
    fn config_rejects_unknown_keys_and_formats() {
        let err = serde_json::from_str::<TelemetryConfig>(r#"{"log_level":"info","colour":true}"#)
            .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        assert!(serde_json::from_str::<TelemetryConfig>(r#"{"log_format":"Pretty"}"#).is_err());
        assert!(serde_json::from_str::<TelemetryConfig>(r#"{"log_format":"xml"}"#).is_err());
    }

    #[test]
    fn invalid_log_level_is_rejected() {
        // Only meaningful when RUST_LOG does not override the configured level.
        if std::env::var_os(EnvFilter::DEFAULT_ENV).is_none() {
            assert!(env_filter("info,[[[").is_err());
            assert!(env_filter("debug,hyper=warn").is_ok());
            assert!(env_filter("").is_ok());
        }
    }

    #[test]
    fn current_trace_id_follows_the_current_span() {
        use_w3c_propagator();
        let (subscriber, _provider) = otel_subscriber();
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_trace_id(), None);
            let span = tracing::info_span!("work");
            span.set_parent(remote_context()).unwrap();
            let _entered = span.enter();
            assert_eq!(current_trace_id().as_deref(), Some(TRACE_ID));

            // inject_* writes the current span, which is a child of the remote parent.
            let mut headers = http::HeaderMap::new();
            inject_http(&mut headers);
            let injected = extract_http(&headers);
            let span_ref = injected.span();
            let sc = span_ref.span_context();
            assert_eq!(sc.trace_id().to_string(), TRACE_ID);
            assert_ne!(sc.span_id().to_string(), SPAN_ID);
        });
    }

    /// Trace id and span id the handler observes as its current span.
    type Seen = (TraceId, SpanId);

    fn call_layered(req: http::Request<()>) -> Seen {
        let svc = TraceContextLayer.layer(tower::service_fn(|_req: http::Request<()>| async {
            let cx = tracing::Span::current().context();
            let span = cx.span();
            let sc = span.span_context();
            Ok::<Seen, Infallible>((sc.trace_id(), sc.span_id()))
        }));
        futures::executor::block_on(svc.oneshot(req)).unwrap()
    }

    #[test]
    fn layer_parents_request_span_on_incoming_traceparent() {
        use_w3c_propagator();
        let (subscriber, _provider) = otel_subscriber();
        tracing::subscriber::with_default(subscriber, || {
            let req = http::Request::builder()
                .uri("http://svc.local/sec.auth.v1.AuthService/Login")
                .header("traceparent", TRACEPARENT)
                .body(())
                .unwrap();
            let (trace_id, span_id) = call_layered(req);
            assert_eq!(trace_id.to_string(), TRACE_ID);
            assert_ne!(span_id, SpanId::INVALID);
            assert_ne!(span_id.to_string(), SPAN_ID, "request span must be a child");

            // Without a traceparent the request starts a fresh trace.
            let req = http::Request::builder().uri("/healthz").body(()).unwrap();
            let (fresh, _) = call_layered(req);
            assert_ne!(fresh, TraceId::INVALID);
            assert_ne!(fresh.to_string(), TRACE_ID);

            // A malformed traceparent is ignored rather than poisoning the span.
            let req = http::Request::builder()
                .uri("/healthz")
                .header("traceparent", "00-nope-01")
                .body(())
                .unwrap();
            let (ignored, _) = call_layered(req);
            assert_ne!(ignored, TraceId::INVALID);
            assert_ne!(ignored.to_string(), TRACE_ID);
        });
    }

    #[test]
    fn layered_service_is_clone_and_drives_readiness() {
        let svc = TraceContextLayer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>("ok")
        }));
        let clone = svc.clone();
        let req = http::Request::new(());
        assert_eq!(
            futures::executor::block_on(clone.oneshot(req)).unwrap(),
            "ok"
        );
    }

    const INIT_CHILD_ENV: &str = "SEC_COMMON_TELEMETRY_INIT_CHILD";

    /// `init` installs process-global state, so it is exercised in a child process running
    /// only [`init_child`]: the rest of this test binary keeps a clean global dispatcher.
    #[test]
    fn init_twice_does_not_panic() {
        let module = module_path!();
        let module = module.split_once("::").map_or(module, |(_, rest)| rest);
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("{module}::init_child"), "--nocapture"])
            .args(["--test-threads", "1"])
            .env(INIT_CHILD_ENV, "1")
            .env_remove(EnvFilter::DEFAULT_ENV)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "child failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(stdout.contains("1 passed"), "child did not run\n{stdout}");
        assert!(stdout.contains("init child ok"), "child skipped\n{stdout}");
    }

    #[test]
    fn init_child() {
        if std::env::var_os(INIT_CHILD_ENV).is_none() {
            return;
        }
        let cfg = TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "off".to_owned(),
            otlp_endpoint: Some("http://127.0.0.1:1".to_owned()),
        };

        // Export needs a tokio runtime; outside one init fails cleanly (and installs nothing).
        assert!(init(&cfg, "test-svc").is_err());
        assert!(!tracing::dispatcher::has_been_set());

        let bad = TelemetryConfig {
            log_level: "info,[[[".to_owned(),
            ..TelemetryConfig::default()
        };
        assert!(init(&bad, "test-svc").is_err());

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let first = rt.block_on(async { init(&cfg, "test-svc") }).unwrap();
        assert!(first.provider.is_some());
        assert!(tracing::dispatcher::has_been_set());

        let second = init(&TelemetryConfig::default(), "test-svc").unwrap();
        assert!(second.provider.is_none());
        second.shutdown();

        let fields: Vec<String> = opentelemetry::global::get_text_map_propagator(|p| {
            p.fields().map(str::to_owned).collect()
        });
        assert!(fields.iter().any(|f| f == "traceparent"), "{fields:?}");

        first.shutdown();
        drop(rt);
        println!("init child ok");
    }
}
