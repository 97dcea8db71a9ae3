//! The platform under load: every service in this process, on 127.0.0.1 port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use sec_common::auth::{Authenticator, generate_token, hash_token};
use sec_common::config::{Config, Secret};
use sec_common::grpc::{BearerToken, channel};
use sec_common::service::Platform;
use sec_common::testing::{Backend, backend_url};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Which backends the platform runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backends {
    /// SQLite files in a temporary directory, in-process KV and event bus.
    Embedded,
    /// PostgreSQL + Redis + NATS from `SEC_TEST_DATABASE_URL`, `SEC_TEST_REDIS_URL`,
    /// `SEC_TEST_NATS_URL` (as the backend test suites), isolated by a run id prefix.
    Production,
}

/// A running platform and what a scenario needs to reach it.
pub struct Target {
    pub config: Config,
    /// The bootstrap admin token (its argon2id hash is in the config).
    pub token: String,
    /// gRPC address of each service by short name (`audit`, `crypto`, ...).
    pub grpc: BTreeMap<&'static str, SocketAddr>,
    /// Admin (health/metrics) address of each service.
    pub admin: BTreeMap<&'static str, SocketAddr>,
    pub platform: Platform,
    /// Suffix of this run's schemas, stream and key prefix (production backends).
    pub run_id: String,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _data_dir: tempfile::TempDir,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("grpc", &self.grpc)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Starts every service and waits until each `/readyz` answers 200 (bounded).
    pub async fn start(backends: Backends) -> anyhow::Result<Self> {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let token = generate_token()?;
        let mut config = Config::default();
        config.auth.admin_token_hash = Some(Secret::new(hash_token(&token)?));
        config.shutdown.grace_seconds = 5;
        if backends == Backends::Production {
            let url = |b: Backend| {
                backend_url(b).with_context(|| format!("{b:?} is not reachable (see above)"))
            };
            config.storage.database_url = Some(Secret::new(url(Backend::Postgres)?));
            config.storage.postgres_schema_prefix = format!("tload{run_id}_");
            config.storage.max_connections = 8;
            config.storage.redis_url = Some(Secret::new(url(Backend::Redis)?));
            config.storage.redis_key_prefix = format!("secload:{run_id}:");
            config.events.nats_url = Some(Secret::new(url(Backend::Nats)?));
            config.events.stream = format!("SECLOAD_{run_id}");
            config.events.subject_prefix = format!("secload.{run_id}");
            config.events.stream_max_age_hours = 1;
        }
        let data_dir = tempfile::tempdir().context("temporary data directory")?;
        config.data_dir = data_dir.path().to_owned();

        let listeners = secd::bind_ephemeral(&mut config).await?;
        let mut grpc = BTreeMap::new();
        let mut admin = BTreeMap::new();
        for (name, l) in &listeners {
            let (g, a) = (l.grpc.local_addr()?, l.admin.local_addr()?);
            anyhow::ensure!(
                g.ip().is_loopback() && a.ip().is_loopback(),
                "{name}-svc is not on loopback ({g}, {a}): refusing to generate load"
            );
            grpc.insert(*name, g);
            admin.insert(*name, a);
        }
        let auth = Authenticator::from_config(&config)?;
        let platform = Platform::connect(
            config.clone(),
            auth,
            sec_common::clock::system(),
            "sec-load",
        )
        .await?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(secd::run_all(platform.clone(), listeners, shutdown.clone()));
        let target = Self {
            config,
            token,
            grpc,
            admin,
            platform,
            run_id,
            shutdown,
            task,
            _data_dir: data_dir,
        };
        if let Err(e) = target.wait_ready().await {
            let _ = target.stop().await;
            return Err(e);
        }
        Ok(target)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (name, addr) in &self.admin {
            while !matches!(http_status(*addr, "/readyz").await, Ok(200)) {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "{name}-svc never became ready"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// A lazily connecting plaintext channel to a service's gRPC port.
    pub fn channel(&self, service: &str) -> anyhow::Result<Channel> {
        let addr = self
            .grpc
            .get(service)
            .with_context(|| format!("no service `{service}`"))?;
        channel(&format!("http://{addr}"), &self.config.tls)
    }

    /// An interceptor sending the admin token.
    pub fn admin_bearer(&self) -> anyhow::Result<BearerToken> {
        BearerToken::new(Some(&self.token))
    }

    /// Stops the platform the way SIGTERM does (bounded) and returns what `run_all` did.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("platform did not stop within 20 s")?
            .context("platform task")?;
        cleanup(&self.config).await;
        r
    }
}

/// Drops this run's PostgreSQL schemas and NATS stream (production backends), as the
/// test harness does; Redis keys under the run's prefix are left to expire.
async fn cleanup(config: &Config) {
    if let Some(url) = &config.storage.database_url {
        match sqlx::PgPool::connect(url.expose()).await {
            Ok(pool) => {
                for svc in sec_common::config::SERVICES {
                    let schema = format!("{}{svc}", config.storage.postgres_schema_prefix);
                    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await {
                        eprintln!("sec-load: dropping schema {schema}: {e}");
                    }
                }
                pool.close().await;
            }
            Err(e) => eprintln!("sec-load: cleanup: PostgreSQL: {e}"),
        }
    }
    if let Some(url) = &config.events.nats_url {
        match async_nats::connect(url.expose()).await {
            Ok(c) => {
                let js = async_nats::jetstream::new(c);
                if let Err(e) = js.delete_stream(&config.events.stream).await {
                    eprintln!("sec-load: deleting stream {}: {e}", config.events.stream);
                }
            }
            Err(e) => eprintln!("sec-load: cleanup: NATS: {e}"),
        }
    }
}

/// Status code of a minimal HTTP/1.1 GET on loopback.
async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}
