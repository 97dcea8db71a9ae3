//! The end-to-end test harness: starts the whole platform in-process on port 0 through
//! the same `secd::run_all` the launcher uses, on the embedded backends or on real
//! PostgreSQL/Redis/NATS, and hands out typed gRPC clients.
//!
//! Backend URLs come from `SEC_TEST_DATABASE_URL`, `SEC_TEST_REDIS_URL` and
//! `SEC_TEST_NATS_URL` (default: the local servers). With `SEC_TEST_BACKENDS=required` a
//! missing backend fails the test; otherwise [`TestPlatform::start`] returns `None` after
//! printing which suite it skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;

use crypto_svc::CryptoConfig;
use sec_common::auth::{Authenticator, ServiceCredentials, generate_token, hash_token};
use sec_common::config::{Config, Secret};
use sec_common::grpc::{BearerToken, channel};
use sec_common::service::Platform;
use sec_proto::audit::v1::audit_service_client::AuditServiceClient;
use sec_testkit::{Backend, backend_url};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Which backends a test platform runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// SQLite files, in-process KV and bus: no servers needed.
    Embedded,
    /// PostgreSQL + Redis + NATS JetStream, isolated per test by schema, key and stream prefixes.
    Production,
}

/// Settings that survive a restart of a [`TestPlatform`] (same data, same token).
#[derive(Debug, Clone)]
pub struct Seed {
    pub config: Config,
    pub token: String,
    /// Unique suffix of this run's schemas, stream and key prefix.
    pub run_id: String,
}

pub struct TestPlatform {
    pub config: Config,
    pub token: String,
    /// The in-process service credential (a service caller, not admin).
    pub service_token: String,
    pub seed: Seed,
    pub grpc: BTreeMap<&'static str, SocketAddr>,
    pub admin: BTreeMap<&'static str, SocketAddr>,
    pub http: SocketAddr,
    pub platform: Platform,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _data_dir: Option<tempfile::TempDir>,
}

/// The default configuration of every service in `secd::SERVICES`, as `secd` loads it
/// with no file and no environment.
pub fn default_config() -> anyhow::Result<Config> {
    Ok(sec_common::spec::load_config(
        None,
        &BTreeMap::<String, String>::new(),
        secd::SERVICES,
    )?)
}

impl TestPlatform {
    /// A fresh platform; `None` when the backends are not reachable and not required.
    pub async fn start(backends: Backends) -> Option<Self> {
        let seed = Self::seed(backends)?;
        Some(Self::start_with(seed, None).await)
    }

    /// The configuration of a fresh platform, without starting it.
    #[track_caller]
    pub fn seed(backends: Backends) -> Option<Seed> {
        Self::try_seed(backends, "t").unwrap()
    }

    /// As [`seed`](Self::seed), fallible (for `sec-load`); `tag` starts the schema prefix.
    #[track_caller]
    pub fn try_seed(backends: Backends, tag: &str) -> anyhow::Result<Option<Seed>> {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let token = generate_token()?;
        let mut config = default_config()?;
        config.auth.admin_token_hash = Some(Secret::new(hash_token(&token)));
        config.shutdown.grace_seconds = 5;
        if backends == Backends::Production {
            let pg = backend_url(Backend::Postgres);
            let redis = backend_url(Backend::Redis);
            let nats = backend_url(Backend::Nats);
            let (Some(pg), Some(redis), Some(nats)) = (pg, redis, nats) else {
                return Ok(None);
            };
            config.storage.database_url = Some(Secret::new(pg));
            config.storage.postgres_schema_prefix = format!("{tag}{run_id}_");
            config.storage.max_connections = 4;
            config.storage.redis_url = Some(Secret::new(redis));
            config.storage.redis_key_prefix = format!("sectest:{run_id}:");
            config.events.nats_url = Some(Secret::new(nats));
            config.events.stream = format!("SECTEST_{run_id}");
            config.events.subject_prefix = format!("sectest.{run_id}");
            // Dead letters of this run only (audit-svc's `<stream>_DLQ`), never another's.
            config.events.dead_letter_subject = format!("sectest_dlq.{run_id}");
            config.events.stream_max_age_hours = 1;
            // crypto-svc refuses to start on a real database without a KEK.
            let mut kek = [0_u8; 32];
            aws_lc_rs::rand::fill(&mut kek).map_err(|_| anyhow::anyhow!("random"))?;
            let crypto = CryptoConfig {
                kek: Some(Secret::new(
                    base64::engine::general_purpose::STANDARD.encode(kek),
                )),
                ..config.section::<CryptoConfig>(crypto_svc::NAME)?.clone()
            };
            config.set_section(crypto_svc::NAME, crypto)?;
        }
        Ok(Some(Seed {
            config,
            token,
            run_id,
        }))
    }

    /// Starts the platform from `seed`; with `data_dir`, the embedded data lives there
    /// (so a restart can reuse it), otherwise in a temporary directory.
    pub async fn start_with(seed: Seed, data_dir: Option<PathBuf>) -> Self {
        Self::try_start_with(seed, data_dir).await.unwrap()
    }

    /// As [`start_with`](Self::start_with), fallible: the same preflight as `secd`, then
    /// every service through `secd::run_all`, ready when each `/readyz` answers 200.
    pub async fn try_start_with(seed: Seed, data_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = seed.config.clone();
        let temp = match data_dir {
            Some(d) => {
                config.data_dir = d;
                None
            }
            None => {
                let t = tempfile::tempdir()?;
                config.data_dir = t.path().to_owned();
                Some(t)
            }
        };
        sec_common::spec::preflight(&config, secd::SERVICES)?;
        let listeners = secd::bind_ephemeral(&mut config).await?;
        let mut grpc = BTreeMap::new();
        let mut admin = BTreeMap::new();
        for (name, l) in &listeners {
            grpc.insert(*name, l.grpc.local_addr()?);
            admin.insert(*name, l.admin.local_addr()?);
        }
        let http = config.facade.http_addr;
        // The issuer is the facade's URL: discovery, RFC 9207 `iss` and the tokens' `iss`
        // must all name the port the facade really listens on. A seed that set its own
        // issuer keeps it (a restart test needs one that survives the new port).
        let issuer = format!("http://{http}");
        let mut oauth = config
            .section::<auth_svc::OAuthConfig>(auth_svc::SECTION)?
            .clone();
        let mut tokens = config
            .section::<token_svc::TokenConfig>(token_svc::NAME)?
            .clone();
        if oauth.issuer == auth_svc::OAuthConfig::default().issuer {
            oauth.issuer = issuer.clone();
            config.set_section(auth_svc::SECTION, oauth)?;
        }
        if tokens.issuer == token_svc::TokenConfig::default().issuer {
            tokens.issuer = issuer;
            config.set_section(token_svc::NAME, tokens)?;
        }
        let service_token = generate_token()?;
        let credentials = ServiceCredentials::generate(secd::SERVICES.iter().map(|s| s.name))?;
        let auth = Authenticator::from_config(&config)?
            .with_service_token(&service_token)
            .with_service_credentials(&credentials);
        let platform = Platform::connect(
            config.clone(),
            auth,
            sec_common::clock::system(),
            "sec-tests",
        )
        .await?
        .with_credentials(credentials);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(secd::run_all(platform.clone(), listeners, shutdown.clone()));
        let tp = Self {
            config,
            token: seed.token.clone(),
            service_token,
            seed,
            grpc,
            admin,
            http,
            platform,
            shutdown,
            task,
            _data_dir: temp,
        };
        if let Err(e) = tp.wait_ready().await {
            let seed = tp.seed.clone();
            let _ = tp.stop().await;
            Self::cleanup(&seed).await;
            return Err(e);
        }
        Ok(tp)
    }

    /// Waits until every service's `/readyz` answers 200 (bounded).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (name, addr) in &self.admin {
            loop {
                if matches!(http_get(*addr, "/readyz").await, Ok((200, _))) {
                    break;
                }
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
    pub fn channel(&self, service: &str) -> Channel {
        self.try_channel(service).unwrap()
    }

    pub fn try_channel(&self, service: &str) -> anyhow::Result<Channel> {
        let addr = self
            .grpc
            .get(service)
            .with_context(|| format!("no service `{service}`"))?;
        channel(&format!("http://{addr}"), &self.config.tls)
    }

    /// An interceptor sending the in-process credential of service `name` (a call as
    /// that service, e.g. `token`).
    pub fn as_service(&self, name: &str) -> BearerToken {
        BearerToken::new(self.platform.credential(name)).unwrap()
    }

    /// An interceptor sending the admin token.
    pub fn admin_bearer(&self) -> anyhow::Result<BearerToken> {
        BearerToken::new(Some(&self.token))
    }

    /// An audit client authenticated with the admin token.
    pub fn audit(&self) -> AuditServiceClient<InterceptedService<Channel, BearerToken>> {
        AuditServiceClient::with_interceptor(self.channel("audit"), self.admin_bearer().unwrap())
    }

    /// Stops the platform the way SIGTERM does and returns what `run_all` returned.
    pub async fn stop(self) -> (anyhow::Result<()>, Option<tempfile::TempDir>) {
        self.shutdown.cancel();
        let r = match tokio::time::timeout(Duration::from_secs(20), self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(anyhow::anyhow!("platform task: {e}")),
            Err(_) => Err(anyhow::anyhow!("platform did not stop within 20 s")),
        };
        (r, self._data_dir)
    }

    /// Drops this run's PostgreSQL schemas and NATS streams (production backends).
    pub async fn cleanup(seed: &Seed) {
        let pg = seed
            .config
            .storage
            .database_url
            .as_ref()
            .map(|u| sqlx::PgPool::connect_lazy(u.expose()));
        if let Some(Ok(pool)) = pg {
            for svc in secd::SERVICES {
                let schema = format!("{}{}", seed.config.storage.postgres_schema_prefix, svc.name);
                let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
            }
        }
        let Some(url) = &seed.config.events.nats_url else {
            return;
        };
        if let Ok(c) = async_nats::connect(url.expose()).await {
            let js = async_nats::jetstream::new(c);
            let stream = &seed.config.events.stream;
            let _ = js.delete_stream(stream).await;
            let _ = js.delete_stream(format!("{stream}_DLQ")).await;
        }
    }
}

/// A minimal HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// An HTTP answer: status, lower-cased header names, body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on loopback with `headers` and `body` (Content-Length set).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let buf = String::from_utf8_lossy(&buf);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_owned(),
    })
}
