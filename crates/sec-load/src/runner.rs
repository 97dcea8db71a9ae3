//! Drives one scenario: `concurrency` workers call it in a loop through a warm-up, then
//! for a bounded measurement window (or until `max_requests` measured calls).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::platform::Target;
use crate::scenarios::Scenario;

/// A call taking longer than this counts as an error (and the worker moves on).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Histogram range: 1 ns .. 60 s, 3 significant digits.
const HIST_MAX_NS: u64 = 60_000_000_000;

#[derive(Debug, Clone, Serialize)]
pub struct RunParams {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop measuring after this many calls (the duration still bounds the run).
    pub max_requests: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    /// Successful calls per second over the measurement window.
    pub throughput_ops_s: f64,
    /// Latency of successful calls, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    pub ok: u64,
    pub errors: u64,
    /// The first error seen, to tell a broken scenario from a slow one.
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub concurrency: usize,
}

struct WorkerOut {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

/// Runs `S` against `target` and summarizes the measured calls.
pub async fn run<S: Scenario>(target: &Target, p: &RunParams) -> anyhow::Result<ScenarioResult> {
    anyhow::ensure!(p.concurrency > 0, "concurrency must be at least 1");
    let client = S::setup(target)
        .await
        .with_context(|| format!("{}: setup", S::NAME))?;
    // Fail fast on a scenario that cannot work at all, with its error.
    S::call(&mut client.clone())
        .await
        .with_context(|| format!("{}: first call", S::NAME))?;

    let measure_from = Instant::now() + p.warmup;
    let stop_at = measure_from + p.duration;
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..p.concurrency {
        let mut client = client.clone();
        let issued = Arc::clone(&issued);
        let max = p.max_requests;
        workers.spawn(async move {
            let mut out = WorkerOut {
                hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 3)?,
                ok: 0,
                errors: 0,
                first_error: None,
                last_done: None,
            };
            loop {
                let start = Instant::now();
                if start >= stop_at {
                    break;
                }
                let measured = start >= measure_from;
                if measured
                    && let Some(max) = max
                    && issued.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let r = tokio::time::timeout(CALL_TIMEOUT, S::call(&mut client)).await;
                let done = Instant::now();
                if !measured {
                    continue;
                }
                out.last_done = Some(done);
                match r {
                    Ok(Ok(())) => {
                        let ns = u64::try_from((done - start).as_nanos()).unwrap_or(u64::MAX);
                        out.hist.saturating_record(ns.max(1));
                        out.ok += 1;
                    }
                    Ok(Err(e)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                    Err(_) => {
                        out.errors += 1;
                        out.first_error
                            .get_or_insert_with(|| format!("timed out after {CALL_TIMEOUT:?}"));
                    }
                }
            }
            anyhow::Ok(out)
        });
    }

    let mut hist = Histogram::<u64>::new_with_bounds(1, HIST_MAX_NS, 3)?;
    let (mut ok, mut errors, mut first_error, mut last_done) = (0, 0, None, measure_from);
    while let Some(w) = workers.join_next().await {
        let w = w.context("worker panicked")??;
        hist.add(&w.hist)?;
        ok += w.ok;
        errors += w.errors;
        if first_error.is_none() {
            first_error = w.first_error;
        }
        if let Some(t) = w.last_done {
            last_done = last_done.max(t);
        }
    }
    let elapsed = (last_done - measure_from).as_secs_f64();
    let ms = |ns: u64| ns as f64 / 1e6;
    let q = |quantile: f64| {
        if hist.is_empty() {
            0.0
        } else {
            ms(hist.value_at_quantile(quantile))
        }
    };
    Ok(ScenarioResult {
        scenario: S::NAME.to_owned(),
        throughput_ops_s: if elapsed > 0.0 {
            ok as f64 / elapsed
        } else {
            0.0
        },
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        mean_ms: if hist.is_empty() {
            0.0
        } else {
            hist.mean() / 1e6
        },
        max_ms: if hist.is_empty() { 0.0 } else { ms(hist.max()) },
        ok,
        errors,
        first_error,
        elapsed_s: elapsed,
        concurrency: p.concurrency,
    })
}
