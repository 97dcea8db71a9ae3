//! The admin HTTP server every service runs on its admin port: `/healthz` (the process is
//! alive), `/readyz` (backends reachable and not draining) and Prometheus `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::events::EventBus;
use crate::storage::{Db, Kv};

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Something a service needs reachable to do its work.
#[async_trait]
pub trait ReadyCheck: Send + Sync {
    async fn check(&self) -> Result<(), String>;
}

#[async_trait]
impl ReadyCheck for Db {
    async fn check(&self) -> Result<(), String> {
        self.ping().await
    }
}

#[async_trait]
impl ReadyCheck for Kv {
    async fn check(&self) -> Result<(), String> {
        self.ping().await.map_err(|e| e.to_string())
    }
}

#[async_trait]
impl ReadyCheck for EventBus {
    async fn check(&self) -> Result<(), String> {
        self.ready().await
    }
}

type Checks = Vec<(&'static str, Arc<dyn ReadyCheck>)>;

/// Readiness of one service: false while draining or while any check fails.
#[derive(Default)]
pub struct Readiness {
    draining: AtomicBool,
    checks: Mutex<Checks>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn add_check(&self, name: &'static str, check: Arc<dyn ReadyCheck>) {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, check));
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Runs every check (each bounded by a timeout). Returns overall readiness and, per
    /// check, `None` when fine or the failure reason.
    pub async fn report(&self) -> (bool, Vec<(&'static str, Option<String>)>) {
        let checks: Checks = self
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let results = futures::future::join_all(checks.iter().map(|(name, c)| async move {
            let r = match tokio::time::timeout(CHECK_TIMEOUT, c.check()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("timed out".to_owned()),
            };
            (*name, r)
        }))
        .await;
        let ready = !self.is_draining() && results.iter().all(|(_, r)| r.is_none());
        (ready, results)
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    registry: Arc<Registry>,
}

pub fn router(readiness: Arc<Readiness>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            readiness,
            registry,
        })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let (ready, results) = s.readiness.report().await;
    let checks: serde_json::Map<String, serde_json::Value> = results
        .into_iter()
        .map(|(n, r)| {
            (
                n.to_owned(),
                serde_json::Value::String(r.unwrap_or_else(|| "ok".into())),
            )
        })
        .collect();
    let body = serde_json::json!({
        "ready": ready,
        "draining": s.readiness.is_draining(),
        "checks": checks,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Down;
    #[async_trait]
    impl ReadyCheck for Down {
        async fn check(&self) -> Result<(), String> {
            Err("database: connection refused".into())
        }
    }

    async fn get_status(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, buf)
    }

    #[tokio::test]
    async fn readyz_follows_checks_and_draining() {
        let readiness = Readiness::new();
        let mut reg = Registry::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        c.inc();
        reg.register("sec_test_things", "things", c);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            router(readiness.clone(), Arc::new(reg)),
            stop.clone(),
        ));

        assert_eq!(get_status(addr, "/healthz").await.0, 200);
        assert_eq!(get_status(addr, "/readyz").await.0, 200);
        let (code, body) = get_status(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("sec_test_things_total 1"), "{body}");

        readiness.start_draining();
        assert_eq!(
            get_status(addr, "/readyz").await.0,
            503,
            "draining is not ready"
        );
        assert_eq!(get_status(addr, "/healthz").await.0, 200, "but still alive");

        let r2 = Readiness::new();
        r2.add_check("database", Arc::new(Down));
        let (ready, results) = r2.report().await;
        assert!(!ready);
        assert_eq!(
            results[0].1.as_deref(),
            Some("database: connection refused")
        );
        stop.cancel();
    }
}
