//! The supervised task that signs the chain's head every
//! `audit.checkpoint_interval_seconds`, and the shared access to the signer that
//! `VerifyChain` uses.
//!
//! Ingest never waits for crypto-svc: the signer is made on first use, and while
//! crypto-svc is unreachable events are still stored and chained; the next checkpoint
//! then covers them all.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;
use sec_common::service::Platform;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::chain::{CheckpointSigner, Report, SignError};
use crate::store::AuditStore;
use crate::verify::{VerifyError, checkpoint_now, verify};

/// The first checkpoint after a start comes sooner.
const FIRST: Duration = Duration::from_secs(5);
/// Bound on the checkpoint signed at shutdown.
const FINAL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Default)]
struct Metrics {
    checkpoints: Counter,
    failures: Counter,
    signer_errors: Counter,
    checkpoint_seq: Gauge<i64, std::sync::atomic::AtomicI64>,
    checkpoint_time: Gauge<f64, AtomicU64>,
}

/// How the signer is obtained: crypto-svc in production, a fixed one in tests.
enum SignerSource {
    Crypto {
        channel: Channel,
        credential: Option<String>,
    },
    #[cfg_attr(not(test), allow(dead_code))]
    Fixed,
}

pub struct Checkpointer {
    store: Arc<dyn AuditStore>,
    origin: String,
    clock: SharedClock,
    source: SignerSource,
    signer: OnceCell<Arc<dyn CheckpointSigner>>,
    metrics: Metrics,
    interval: Duration,
}

impl Checkpointer {
    pub fn new(
        store: Arc<dyn AuditStore>,
        origin: String,
        interval: Duration,
        platform: &Platform,
        (channel, credential): (Channel, Option<String>),
        registry: &mut Registry,
    ) -> Arc<Self> {
        let this = Self {
            store,
            origin,
            clock: platform.clock.clone(),
            source: SignerSource::Crypto {
                channel,
                credential,
            },
            signer: OnceCell::new(),
            metrics: Metrics::default(),
            interval,
        };
        this.register(registry);
        Arc::new(this)
    }

    /// A checkpointer over a given signer (tests).
    #[cfg(test)]
    pub fn with_signer(
        store: Arc<dyn AuditStore>,
        origin: &str,
        clock: SharedClock,
        signer: Arc<dyn CheckpointSigner>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            origin: origin.to_owned(),
            clock,
            source: SignerSource::Fixed,
            signer: OnceCell::new_with(Some(signer)),
            metrics: Metrics::default(),
            interval: Duration::from_secs(60),
        })
    }

    fn register(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "sec_audit_checkpoints",
            "Signed checkpoints of the audit hash chain",
            m.checkpoints.clone(),
        );
        registry.register(
            "sec_audit_chain_verify_failures",
            "Times the chain did not verify before signing a checkpoint (tampering or corruption)",
            m.failures.clone(),
        );
        registry.register(
            "sec_audit_checkpoint_signer_errors",
            "Checkpoints not signed because crypto-svc could not be used",
            m.signer_errors.clone(),
        );
        registry.register(
            "sec_audit_checkpoint_seq",
            "Position of the newest signed checkpoint",
            m.checkpoint_seq.clone(),
        );
        registry.register(
            "sec_audit_checkpoint_timestamp_seconds",
            "Time of the newest signed checkpoint (Unix seconds)",
            m.checkpoint_time.clone(),
        );
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The signer, made on first use.
    pub async fn signer(&self) -> Result<&Arc<dyn CheckpointSigner>, SignError> {
        self.signer
            .get_or_try_init(|| async {
                match &self.source {
                    SignerSource::Crypto {
                        channel,
                        credential,
                    } => crate::signer::CryptoSigner::ensure(channel.clone(), credential.clone())
                        .await
                        .map(|s| Arc::new(s) as Arc<dyn CheckpointSigner>)
                        .map_err(|e| SignError(format!("{e:#}"))),
                    SignerSource::Fixed => Err(SignError("no signer".into())),
                }
            })
            .await
    }

    /// `VerifyChain`.
    pub async fn verify(&self, from: u64, to: u64) -> Result<Report, VerifyError> {
        let signer = self.signer().await?;
        let report = verify(self.store.as_ref(), signer.as_ref(), &self.origin, from, to).await?;
        if report.failure.is_some() {
            self.metrics.failures.inc();
        }
        Ok(report)
    }

    /// Signs the head if it moved; logs what happened.
    pub async fn tick(&self) {
        let signer = match self.signer().await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.signer_errors.inc();
                tracing::warn!(error = %e, "cannot reach the checkpoint key in crypto-svc; will retry");
                return;
            }
        };
        let now = self.clock.now().timestamp_micros();
        match checkpoint_now(self.store.as_ref(), signer.as_ref(), &self.origin, now).await {
            Ok(Ok(Some(cp))) => {
                self.metrics.checkpoints.inc();
                self.metrics
                    .checkpoint_seq
                    .set(i64::try_from(cp.seq).unwrap_or(i64::MAX));
                self.metrics.checkpoint_time.set(now as f64 / 1e6);
                tracing::debug!(seq = cp.seq, "audit chain checkpoint signed");
            }
            Ok(Ok(None)) => {}
            Ok(Err(f)) => {
                self.metrics.failures.inc();
                tracing::error!(
                    problem = f.problem.as_str(),
                    seq = f.seq,
                    detail = %f.detail,
                    "audit chain does not verify; no checkpoint signed"
                );
            }
            Err(VerifyError::Signer(e)) => {
                self.metrics.signer_errors.inc();
                tracing::warn!(error = %e, "checkpoint not signed; will retry");
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint failed; will retry"),
        }
    }

    /// The supervised loop.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut wait = FIRST;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            self.tick().await;
            wait = self.interval;
        }
    }

    /// One last checkpoint at shutdown, bounded in time.
    pub async fn final_checkpoint(&self) {
        if tokio::time::timeout(FINAL_TIMEOUT, self.tick())
            .await
            .is_err()
        {
            tracing::warn!("no checkpoint at shutdown: crypto-svc did not answer in time");
        }
    }
}
