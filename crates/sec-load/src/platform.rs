//! The platform under load: every service in this process, on 127.0.0.1 port 0, started
//! through the same harness as the end-to-end tests (`sec-tests`), so the load run and the
//! tests exercise one start path, one preflight and one configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context as _;
use sec_common::grpc::BearerToken;
use sec_tests::TestPlatform;
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
    tp: TestPlatform,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("grpc", &self.tp.grpc)
            .field("run_id", &self.tp.seed.run_id)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Starts every service and waits until each `/readyz` answers 200 (bounded).
    pub async fn start(backends: Backends) -> anyhow::Result<Self> {
        let b = match backends {
            Backends::Embedded => sec_tests::Backends::Embedded,
            Backends::Production => sec_tests::Backends::Production,
        };
        let seed = TestPlatform::try_seed(b, "tload")?
            .context("a backend is not reachable (see the SKIPPED line above)")?;
        let tp = TestPlatform::try_start_with(seed, None).await?;
        let off_loopback = tp
            .grpc
            .iter()
            .chain(tp.admin.iter())
            .find(|(_, a)| !a.ip().is_loopback())
            .map(|(name, a)| format!("{name}-svc is not on loopback ({a})"));
        if let Some(what) = off_loopback {
            let seed = tp.seed.clone();
            let _ = tp.stop().await;
            TestPlatform::cleanup(&seed).await;
            anyhow::bail!("{what}: refusing to generate load");
        }
        Ok(Self { tp })
    }

    /// gRPC address of each service by short name (`audit`, `crypto`, ...).
    pub fn grpc(&self) -> &BTreeMap<&'static str, SocketAddr> {
        &self.tp.grpc
    }

    /// A lazily connecting plaintext channel to a service's gRPC port.
    pub fn channel(&self, service: &str) -> anyhow::Result<Channel> {
        self.tp.try_channel(service)
    }

    /// An interceptor sending the admin token.
    pub fn admin_bearer(&self) -> anyhow::Result<BearerToken> {
        self.tp.admin_bearer()
    }

    /// Stops the platform the way SIGTERM does (bounded), drops this run's schemas and
    /// stream, and returns what `run_all` did.
    pub async fn stop(self) -> anyhow::Result<()> {
        let seed = self.tp.seed.clone();
        let (r, _) = self.tp.stop().await;
        TestPlatform::cleanup(&seed).await;
        r
    }
}
