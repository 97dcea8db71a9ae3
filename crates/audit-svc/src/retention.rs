//! Retention and rotation of the audit trail (`[audit.retention]`, see
//! `crates/audit-svc/docs/retention.md`).
//!
//! On PostgreSQL `security_events` is partitioned by receipt month; audit-svc creates
//! partitions ahead. A run removes what is past its rule (the longest matching type
//! prefix, else `default_days`) and under no legal hold: a partition whose every row is
//! removable is dropped whole, other removable rows (and everything on SQLite) are
//! deleted by range. Before anything is removed the chain is verified over the removed
//! positions and checkpointed at the head, each removed run of positions is recorded with
//! the hash at its end, and the records of the run are signed together, so verification
//! accepts exactly these gaps (see `docs/chain.md`). With `export_dir` set, removed rows
//! are first written there (JSON Lines, fsynced, with a SHA-256 sidecar); an export that
//! fails removes nothing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use chrono::{Datelike as _, NaiveDate};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::chain::{Prune, PruneRun, hex};
use crate::checkpointer::Checkpointer;
use crate::store::{AuditStore, Cutoffs, RetentionPlan, StoreError};
use crate::verify::{VerifyError, checkpoint_now, verify};

/// PCI DSS 10.5.1: audit trail history is kept at least 12 months.
pub const PCI_MINIMUM_DAYS: u32 = 365;
/// Runs of positions removed (and signed) per retention run; the rest waits for the
/// next run.
pub const MAX_RANGES: usize = 1000;
const MAX_RULES: usize = 64;
const MAX_DAYS: u32 = 36_500;
const DAY_US: i64 = 86_400_000_000;
/// Rows read per export query.
const EXPORT_PAGE: u32 = 2000;

/// One rule: events whose type starts with `prefix` are kept `days` days after receipt.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub prefix: String,
    pub days: u32,
}

/// `[audit.retention]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days an event is kept after receipt when no rule matches its type. At least 365
    /// (PCI DSS 10.5.1) unless `allow_under_pci_minimum`.
    pub default_days: u32,
    /// Allows `default_days` below 365. The database's own floor
    /// (`audit_retention_floor`, owner only) still applies on PostgreSQL.
    pub allow_under_pci_minimum: bool,
    /// Per type prefix; the longest matching prefix wins.
    pub rules: Vec<RetentionRule>,
    /// When set, removed rows are exported here first (JSON Lines + `.sha256`).
    pub export_dir: Option<PathBuf>,
    /// How often retention runs (and partitions are created ahead), seconds. 60 ..= 86400.
    pub interval_seconds: u64,
    /// Monthly partitions kept created ahead of the current month (PostgreSQL). 1 ..= 24.
    pub partitions_ahead: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            default_days: 400,
            allow_under_pci_minimum: false,
            rules: Vec::new(),
            export_dir: None,
            interval_seconds: 3600,
            partitions_ahead: 3,
        }
    }
}

impl RetentionConfig {
    /// `(key below retention, message)` of the first invalid setting.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("retention.{k}"), m.to_owned()));
        if self.default_days == 0 || self.default_days > MAX_DAYS {
            return err("default_days", "must be between 1 and 36500");
        }
        if self.default_days < PCI_MINIMUM_DAYS && !self.allow_under_pci_minimum {
            return err(
                "default_days",
                "below 365 days (PCI DSS 10.5.1 keeps 12 months); set allow_under_pci_minimum = true to allow it",
            );
        }
        if self.rules.len() > MAX_RULES {
            return err("rules", "at most 64 rules");
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.rules {
            if !valid_prefix(&r.prefix) {
                return err(
                    "rules",
                    "a prefix is 1 to 128 characters of a-z, 0-9, `.`, `_` and `-`",
                );
            }
            if !seen.insert(r.prefix.as_str()) {
                return err("rules", "a prefix appears twice");
            }
            if r.days == 0 || r.days > MAX_DAYS {
                return err("rules", "days must be between 1 and 36500");
            }
        }
        if let Some(d) = &self.export_dir
            && !d.is_absolute()
        {
            return err("export_dir", "must be an absolute path");
        }
        if !(60..=86_400).contains(&self.interval_seconds) {
            return err("interval_seconds", "must be between 60 and 86400");
        }
        if !(1..=24).contains(&self.partitions_ahead) {
            return err("partitions_ahead", "must be between 1 and 24");
        }
        Ok(())
    }

    /// The cutoffs of a run at `now_us`.
    pub fn cutoffs(&self, now_us: i64) -> Cutoffs {
        let mut by_prefix: Vec<(String, i64)> = self
            .rules
            .iter()
            .map(|r| (r.prefix.clone(), now_us - i64::from(r.days) * DAY_US))
            .collect();
        by_prefix.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Cutoffs {
            by_prefix,
            default_us: now_us - i64::from(self.default_days) * DAY_US,
        }
    }
}

/// A type prefix as rules and holds accept it.
pub fn valid_prefix(p: &str) -> bool {
    (1..=128).contains(&p.len())
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// The first days of the current UTC month and the `ahead` months after it.
pub fn months_from(now: chrono::DateTime<chrono::Utc>, ahead: u32) -> Vec<NaiveDate> {
    let mut out = Vec::new();
    let (mut y, mut m) = (now.year(), now.month());
    for _ in 0..=ahead {
        if let Some(d) = NaiveDate::from_ymd_opt(y, m, 1) {
            out.push(d);
        }
        (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("the chain does not verify ({problem} at {seq}): nothing removed")]
    Chain { problem: &'static str, seq: u64 },
    #[error("export failed, nothing removed: {0}")]
    Export(String),
    #[error("no checkpoint covers the cut at {0}: nothing removed")]
    NoCheckpoint(u64),
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub dry_run: bool,
    pub plan: RetentionPlan,
    pub removed_rows: u64,
    pub dropped_partitions: u64,
    pub exported: Vec<PathBuf>,
}

#[derive(Clone, Default)]
struct Metrics {
    partitions: Gauge<i64, AtomicI64>,
    removed_rows: Counter,
    dropped_partitions: Counter,
    held_rows: Gauge<i64, AtomicI64>,
    failures: Counter,
    partition_failures: Counter,
}

pub struct Retention {
    store: Arc<dyn AuditStore>,
    chain: Arc<Checkpointer>,
    clock: SharedClock,
    cfg: RetentionConfig,
    metrics: Metrics,
    /// One run at a time in this process (replicas are serialised by the database).
    running: tokio::sync::Mutex<()>,
}

impl Retention {
    pub fn new(
        store: Arc<dyn AuditStore>,
        chain: Arc<Checkpointer>,
        clock: SharedClock,
        cfg: RetentionConfig,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let this = Self::unregistered(store, chain, clock, cfg);
        let m = &this.metrics;
        registry.register(
            "sec_audit_partitions",
            "Partitions of the audit events table (PostgreSQL)",
            m.partitions.clone(),
        );
        registry.register(
            "sec_audit_retention_removed_rows",
            "Audit events removed by retention",
            m.removed_rows.clone(),
        );
        registry.register(
            "sec_audit_retention_dropped_partitions",
            "Audit event partitions dropped by retention",
            m.dropped_partitions.clone(),
        );
        registry.register(
            "sec_audit_retention_held_rows",
            "Expired audit events kept by a legal hold at the last run",
            m.held_rows.clone(),
        );
        registry.register(
            "sec_audit_retention_failures",
            "Retention runs that failed (nothing was removed)",
            m.failures.clone(),
        );
        registry.register(
            "sec_audit_partition_failures",
            "Times partitions could not be created ahead",
            m.partition_failures.clone(),
        );
        Arc::new(this)
    }

    fn unregistered(
        store: Arc<dyn AuditStore>,
        chain: Arc<Checkpointer>,
        clock: SharedClock,
        cfg: RetentionConfig,
    ) -> Self {
        Self {
            store,
            chain,
            clock,
            cfg,
            metrics: Metrics::default(),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// A runner outside the metrics registry (tests).
    #[cfg(test)]
    pub fn for_test(
        store: Arc<dyn AuditStore>,
        chain: Arc<Checkpointer>,
        clock: SharedClock,
        cfg: RetentionConfig,
    ) -> Arc<Self> {
        Arc::new(Self::unregistered(store, chain, clock, cfg))
    }

    pub fn config(&self) -> &RetentionConfig {
        &self.cfg
    }

    /// Creates the partitions of this month and the configured months ahead.
    pub async fn ensure_partitions(&self) -> Result<u32, StoreError> {
        let months = months_from(self.clock.now(), self.cfg.partitions_ahead);
        let created = self.store.ensure_partitions(&months).await;
        match &created {
            Ok(n) => {
                if *n > 0 {
                    tracing::info!(created = n, "audit event partitions created ahead");
                }
                if let Ok(p) = self.store.partitions().await {
                    self.metrics
                        .partitions
                        .set(i64::try_from(p.len()).unwrap_or(i64::MAX));
                }
            }
            Err(e) => {
                self.metrics.partition_failures.inc();
                tracing::error!(error = %e, "cannot create audit event partitions ahead");
            }
        }
        created
    }

    /// One retention run; `dry_run` only plans.
    pub async fn run(&self, dry_run: bool) -> Result<Outcome, RetentionError> {
        let _one = self.running.lock().await;
        let result = self.run_locked(dry_run).await;
        match &result {
            Ok(o) if !dry_run => {
                self.metrics.removed_rows.inc_by(o.removed_rows);
                self.metrics.dropped_partitions.inc_by(o.dropped_partitions);
                self.metrics
                    .held_rows
                    .set(i64::try_from(o.plan.held_rows).unwrap_or(i64::MAX));
                if o.removed_rows > 0 || o.dropped_partitions > 0 {
                    tracing::info!(
                        rows = o.removed_rows,
                        partitions = o.dropped_partitions,
                        held = o.plan.held_rows,
                        "audit retention removed expired events"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.metrics.failures.inc();
                tracing::error!(error = %e, "audit retention failed");
            }
        }
        result
    }

    async fn run_locked(&self, dry_run: bool) -> Result<Outcome, RetentionError> {
        let now = self.clock.now().timestamp_micros();
        let cutoffs = self.cfg.cutoffs(now);
        let plan = self.store.plan_retention(&cutoffs, MAX_RANGES).await?;
        let mut out = Outcome {
            dry_run,
            dropped_partitions: plan.drops.len() as u64,
            removed_rows: plan.rows(),
            plan,
            exported: Vec::new(),
        };
        if dry_run || out.plan.drops.is_empty() && out.plan.ranges.is_empty() {
            if !dry_run {
                out.dropped_partitions = 0;
            }
            return Ok(out);
        }
        let prunes = out.plan.prunes();
        let signer = self.chain.signer().await.map_err(VerifyError::from)?;
        let origin = self.chain.origin();
        if let (Some(first), Some(last)) = (prunes.first(), prunes.last()) {
            // What is removed verifies first (it cannot be checked afterwards)...
            let report = verify(
                self.store.as_ref(),
                signer.as_ref(),
                origin,
                first.first_seq,
                last.last_seq,
            )
            .await?;
            if let Some(f) = report.failure {
                return Err(RetentionError::Chain {
                    problem: f.problem.as_str(),
                    seq: f.seq,
                });
            }
            // ...and a signed checkpoint at or after the cut.
            if let Err(f) =
                checkpoint_now(self.store.as_ref(), signer.as_ref(), origin, now).await?
            {
                return Err(RetentionError::Chain {
                    problem: f.problem.as_str(),
                    seq: f.seq,
                });
            }
            let covered = self
                .store
                .checkpoint_at_or_before(u64::MAX >> 1)
                .await?
                .is_some_and(|c| c.seq >= last.last_seq);
            if !covered {
                return Err(RetentionError::NoCheckpoint(last.last_seq));
            }
        }
        if let Some(dir) = &self.cfg.export_dir {
            for p in &prunes {
                out.exported.push(self.export(dir, p).await?);
            }
        }
        let mut run = PruneRun {
            id: 0,
            time_us: now,
            origin: origin.to_owned(),
            key_name: String::new(),
            key_version: 0,
            signature: String::new(),
            prunes,
        };
        if !run.prunes.is_empty() {
            let (key_name, key_version, signature) = signer
                .sign(run.statement().as_bytes())
                .await
                .map_err(VerifyError::from)?;
            (run.key_name, run.key_version, run.signature) = (key_name, key_version, signature);
        }
        out.removed_rows = self.store.apply_retention(&run, &out.plan).await?;
        Ok(out)
    }

    /// Writes the rows of `p` to `<dir>/audit-<first>-<last>.jsonl` (one event per line,
    /// `event_json` plus `seq` and `hash`), fsyncs it, then its `.sha256` sidecar.
    async fn export(&self, dir: &Path, p: &Prune) -> Result<PathBuf, RetentionError> {
        let ex = |e: std::io::Error| RetentionError::Export(e.to_string());
        let name = format!("audit-{:020}-{:020}.jsonl", p.first_seq, p.last_seq);
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.partial"));
        let mut file = std::fs::File::create(&tmp).map_err(ex)?;
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut next = p.first_seq;
        let mut rows = 0u64;
        while next <= p.last_seq {
            let page = self.store.chained(next, p.last_seq, EXPORT_PAGE).await?;
            let Some(last) = page.last().map(|c| c.seq) else {
                break;
            };
            let mut buf = Vec::new();
            for c in page {
                let seq = c.seq;
                let hash = hex(&c.hash);
                let mut v = sec_common::events::json::event_json(&crate::store::from_row(c.row)?);
                if let Some(o) = v.as_object_mut() {
                    o.insert("seq".into(), seq.into());
                    o.insert("hash".into(), hash.into());
                }
                serde_json::to_writer(&mut buf, &v)
                    .map_err(|e| RetentionError::Export(e.to_string()))?;
                buf.push(b'\n');
                rows += 1;
            }
            digest.update(&buf);
            file.write_all(&buf).map_err(ex)?;
            next = last + 1;
        }
        if rows != p.rows {
            return Err(RetentionError::Export(format!(
                "read {rows} rows of positions {}..={}, {} planned",
                p.first_seq, p.last_seq, p.rows
            )));
        }
        file.sync_all().map_err(ex)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(ex)?;
        let sum = format!("{}  {name}\n", hex(digest.finish().as_ref()));
        let side = dir.join(format!("{name}.sha256"));
        let mut f = std::fs::File::create(&side).map_err(ex)?;
        f.write_all(sum.as_bytes()).map_err(ex)?;
        f.sync_all().map_err(ex)?;
        // The directory entries themselves.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ex)?;
        Ok(path)
    }

    /// The supervised loop: partitions ahead, then retention, every interval.
    pub async fn task(self: Arc<Self>, stop: CancellationToken) {
        let interval = Duration::from_secs(self.cfg.interval_seconds);
        loop {
            let _ = self.ensure_partitions().await;
            let _ = self.run(false).await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated() {
        assert!(RetentionConfig::default().validate().is_ok());
        let under = RetentionConfig {
            default_days: 90,
            ..Default::default()
        };
        assert_eq!(under.validate().unwrap_err().0, "retention.default_days");
        assert!(
            RetentionConfig {
                allow_under_pci_minimum: true,
                ..under
            }
            .validate()
            .is_ok()
        );
        let rule = |p: &str, d| RetentionRule {
            prefix: p.into(),
            days: d,
        };
        for (rules, ok) in [
            (vec![rule("sec.ratelimit.", 90)], true),
            (vec![rule("sec.ratelimit.", 0)], false),
            (vec![rule("Sec.X", 90)], false),
            (vec![rule("", 90)], false),
            (vec![rule("sec.a", 90), rule("sec.a", 30)], false),
        ] {
            let c = RetentionConfig {
                rules,
                ..Default::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{c:?}");
        }
        for (k, c) in [
            (
                "retention.export_dir",
                RetentionConfig {
                    export_dir: Some("relative".into()),
                    ..Default::default()
                },
            ),
            (
                "retention.interval_seconds",
                RetentionConfig {
                    interval_seconds: 5,
                    ..Default::default()
                },
            ),
            (
                "retention.partitions_ahead",
                RetentionConfig {
                    partitions_ahead: 0,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(c.validate().unwrap_err().0, k);
        }
    }

    #[test]
    fn cutoffs_sort_longest_prefix_first() {
        let c = RetentionConfig {
            rules: vec![
                RetentionRule {
                    prefix: "sec.".into(),
                    days: 500,
                },
                RetentionRule {
                    prefix: "sec.ratelimit.".into(),
                    days: 90,
                },
            ],
            ..Default::default()
        }
        .cutoffs(1000 * DAY_US);
        assert_eq!(c.by_prefix[0], ("sec.ratelimit.".into(), 910 * DAY_US));
        assert_eq!(c.by_prefix[1], ("sec.".into(), 500 * DAY_US));
        assert_eq!(c.default_us, 600 * DAY_US);
    }

    #[test]
    fn months_roll_over_the_year() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-15T10:00:00Z")
            .unwrap()
            .to_utc();
        let m: Vec<String> = months_from(now, 2)
            .iter()
            .map(|d| d.format("%Y-%m-%d").to_string())
            .collect();
        assert_eq!(m, ["2026-11-01", "2026-12-01", "2027-01-01"]);
    }
}
