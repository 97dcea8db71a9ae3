//! Supervised background tasks. A service's loops (rotation, event ticks, ingest) used to
//! be bare `tokio::spawn`s: one that panicked or returned died without a word and the
//! service kept answering as if healthy. Under a [`Supervisor`] a task that ends or
//! panics before shutdown makes the `/readyz` check named after it fail, is counted in
//! `sec_<service>_task_restarts_total{task}` and is restarted with exponential backoff.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{Readiness, ReadyCheck};

/// Restart delays: doubling from `initial` up to `max`; back to `initial` once a task has
/// run for at least `max` (it was healthy, this is a new failure).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    fn delay(&self, failures: u32) -> Duration {
        self.initial
            .saturating_mul(2_u32.saturating_pow(failures.min(16)))
            .min(self.max)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: &'static str,
}

/// The readiness check of one task: failing from the moment it ends until it runs again.
struct TaskUp(Arc<AtomicBool>);

#[async_trait]
impl ReadyCheck for TaskUp {
    async fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("background task stopped; restarting".to_owned())
        }
    }
}

/// Runs a service's background tasks until [`stop`](Self::stop) or the shutdown token.
pub struct Supervisor {
    readiness: Arc<Readiness>,
    restarts: Family<TaskLabel, Counter>,
    stop: CancellationToken,
    backoff: Backoff,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor for `service` (its spec name: the metric is
    /// `sec_<service>_task_restarts_total`), reporting to `readiness`, whose tasks stop
    /// when `shutdown` is cancelled.
    pub fn new(
        service: &'static str,
        registry: &mut Registry,
        readiness: Arc<Readiness>,
        shutdown: &CancellationToken,
    ) -> Self {
        let restarts = Family::<TaskLabel, Counter>::default();
        registry.register(
            format!("sec_{service}_task_restarts"),
            "Background tasks restarted after ending or panicking before shutdown",
            restarts.clone(),
        );
        Self {
            readiness,
            restarts,
            stop: shutdown.child_token(),
            backoff: Backoff::default(),
            tasks: Vec::new(),
        }
    }

    /// Replaces the restart delays (tests use short ones).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Runs `factory()` as the task `name` (a static string: it is a readiness check name
    /// and a metric label), and runs it again whenever it returns or panics before
    /// shutdown. The task should itself return on the `shutdown` token.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, factory: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let up = Arc::new(AtomicBool::new(true));
        self.readiness.add_check(name, Arc::new(TaskUp(up.clone())));
        let counter = self
            .restarts
            .get_or_create(&TaskLabel { task: name })
            .clone();
        let stop = self.stop.clone();
        let backoff = self.backoff;
        self.tasks.push(tokio::spawn(async move {
            let mut failures = 0_u32;
            loop {
                up.store(true, Ordering::SeqCst);
                let started = tokio::time::Instant::now();
                let mut run = tokio::spawn(factory());
                let outcome = tokio::select! {
                    _ = stop.cancelled() => {
                        run.abort();
                        return;
                    }
                    r = &mut run => r,
                };
                if stop.is_cancelled() {
                    return;
                }
                up.store(false, Ordering::SeqCst);
                match outcome {
                    Err(e) if e.is_panic() => {
                        tracing::error!(task = name, "background task panicked; restarting")
                    }
                    _ => tracing::error!(task = name, "background task ended; restarting"),
                }
                if started.elapsed() >= backoff.max {
                    failures = 0;
                }
                let delay = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                counter.inc();
            }
        }));
    }

    /// Stops every task and waits for them to end.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Retries `f` every second until it succeeds (`Some`) or `stop` (`None`: a shutdown
/// during start is a clean exit): a peer (crypto-svc, token-svc) may start after us.
pub async fn until_ok<T, F, Fut>(what: &str, stop: &CancellationToken, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0_u32;
    loop {
        if stop.is_cancelled() {
            return None;
        }
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tries += 1;
                if tries % 10 == 1 {
                    tracing::warn!(error = %e, "{what} failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use tokio::sync::Notify;

    use super::*;

    async fn check(readiness: &Readiness, name: &str) -> Option<String> {
        let (_, results) = readiness.report().await;
        results
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r)
            .unwrap()
    }

    fn metrics(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    /// Yields until `cond` holds; virtual time does not move meanwhile.
    async fn until(mut cond: impl AsyncFnMut() -> bool) {
        for _ in 0..10_000 {
            if cond().await {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never held");
    }

    /// A task that panics (then one that returns) is reported by its readiness check,
    /// counted and restarted after the backoff, and readiness comes back; at shutdown
    /// nothing is restarted.
    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_ends_is_restarted_and_readiness_follows() {
        let readiness = Readiness::new();
        let mut registry = Registry::default();
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new("demo", &mut registry, readiness.clone(), &shutdown)
            .with_backoff(Backoff {
                initial: Duration::from_secs(5),
                max: Duration::from_secs(60),
            });
        let runs = Arc::new(AtomicU32::new(0));
        let fail = Arc::new(Notify::new());
        let (r, f) = (runs.clone(), fail.clone());
        sup.spawn("worker", move || {
            let (r, f) = (r.clone(), f.clone());
            async move {
                let run = r.fetch_add(1, Ordering::SeqCst) + 1;
                f.notified().await;
                match run {
                    1 => panic!("fake task failure"),
                    2 => (), // returns before shutdown
                    _ => std::future::pending().await,
                }
            }
        });
        until(async || runs.load(Ordering::SeqCst) == 1).await;
        assert_eq!(check(&readiness, "worker").await, None);
        assert!(readiness.report().await.0);

        for (n, expected_restarts) in [(1_u32, 1), (2, 2)] {
            fail.notify_one();
            until(async || check(&readiness, "worker").await.is_some()).await;
            assert!(
                !readiness.report().await.0,
                "not ready while task {n} is down"
            );
            assert_eq!(
                runs.load(Ordering::SeqCst),
                n,
                "not restarted before the backoff"
            );
            // The backoff elapses (virtual time) and the task runs again.
            tokio::time::sleep(Duration::from_secs(5 * u64::from(n) + 1)).await;
            until(async || runs.load(Ordering::SeqCst) == n + 1).await;
            assert_eq!(check(&readiness, "worker").await, None);
            assert!(readiness.report().await.0, "ready again after restart {n}");
            assert!(
                metrics(&registry).contains(&format!(
                    "sec_demo_task_restarts_total{{task=\"worker\"}} {expected_restarts}"
                )),
                "{}",
                metrics(&registry)
            );
        }

        shutdown.cancel();
        sup.stop().await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "nothing restarted after shutdown"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_max() {
        let b = Backoff::default();
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(3), Duration::from_secs(8));
        assert_eq!(b.delay(10), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }
}
