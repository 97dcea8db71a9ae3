//! End-to-end audit ingest: publishers → `EventBus` (durable outbox on) → NATS JetStream → audit-svc's ingest
//! loop → PostgreSQL, hash chain on, on this machine's servers (loopback only).
//!
//!     cargo bench -p audit-svc --bench ingest                    # 60 s at 25,000 events/s
//!     INGEST_SECS=10 INGEST_RATE=30000 cargo bench -p audit-svc --bench ingest
//!
//! Offers `INGEST_RATE` events/s for `INGEST_SECS` (in 5 ms ticks), then waits (bounded)
//! until every accepted event is stored, and reports: accepted, refused, stored, the
//! ingest rate (stored ÷ time from the first publish to the last store), the drain after
//! the window, the publish call's latency percentiles on the caller's path, and whether
//! the chain verifies. Loss is `accepted − stored`; every id is compared.
//!
//! Needs PostgreSQL and NATS (`SEC_TEST_DATABASE_URL`, `SEC_TEST_NATS_URL`, default the
//! local servers); uses a throwaway schema and stream and removes them. Under
//! `cargo test --all-targets` (no `--bench` argument) it does nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use audit_svc::chain::{CheckpointSigner, SignError};
use audit_svc::store::postgres::PgEventStore;
use prometheus_client::registry::Registry;
use sec_common::clock::system;
use sec_common::config::EventsConfig;
use sec_common::events::{EventBus, new_event};
use sec_testkit::{Backend, backend_url};
use tokio_util::sync::CancellationToken;

/// Verification needs a signer only for checkpoints; this run signs none.
struct NoSigner;

#[async_trait]
impl CheckpointSigner for NoSigner {
    async fn sign(&self, _: &[u8]) -> Result<(String, u32, String), SignError> {
        Err(SignError("no signer in the bench".into()))
    }
    async fn verify(&self, _: &str, _: &[u8], _: &str) -> Result<bool, SignError> {
        Err(SignError("no signer in the bench".into()))
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Events stored so far: the chain is gap-free from 1 and nothing is pruned here, so the
/// head's position is the count (one row read; `count(*)` would scan the table and
/// compete with the ingest it measures).
async fn stored_count(store: &PgEventStore) -> usize {
    let head = audit_svc::store::ChainStore::head(store).await.unwrap();
    usize::try_from(head.seq).unwrap()
}

/// `<name>_sum` and `<name>_count` of a histogram in the text exposition.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let (Some(pg), Some(nats)) = (backend_url(Backend::Postgres), backend_url(Backend::Nats))
    else {
        println!("audit ingest bench SKIPPED: PostgreSQL or NATS not reachable");
        return;
    };
    let secs = env_u64("INGEST_SECS", 60);
    let rate = env_u64("INGEST_RATE", 25_000);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let schema = format!("bench_audit_{run_id}");
    let pool = sec_common::storage::connect_postgres(&pg, &schema, 8)
        .await
        .unwrap();
    audit_svc::MIGRATIONS.postgres.run(&pool).await.unwrap();
    let store = Arc::new(PgEventStore::new(pool.clone(), system()));

    let outbox = tempfile::tempdir().unwrap();
    let cfg = EventsConfig {
        outbox_dir: Some(outbox.path().join("outbox")),
        stream: format!("BENCH_{run_id}"),
        subject_prefix: format!("bench.{run_id}"),
        audit_consumer: format!("bench-{run_id}"),
        stream_max_age_hours: 1,
        spool_capacity: 200_000,
        max_type_share_percent: 100,
        ..EventsConfig::default()
    };
    let transport = Arc::new(
        sec_common::events::nats::NatsTransport::connect(&nats, &cfg, "ingest-bench")
            .await
            .unwrap(),
    );
    // As in production: every accepted event is in the on-disk outbox before publish returns.
    let bus = EventBus::with_outbox(transport, &cfg, system()).unwrap();
    let mut registry = Registry::default();
    let metrics = audit_svc::pipeline::IngestMetrics::register(&mut registry);
    let stop = CancellationToken::new();
    let ingest = tokio::spawn(audit_svc::pipeline::run(
        audit_svc::pipeline::Ingest {
            bus: bus.clone(),
            store: store.clone(),
            dead_letters: Arc::new(audit_svc::store::dead_letter::PgDeadLetters::new(
                pool.clone(),
                system(),
            )),
            metrics,
            clock: system(),
            limits: audit_svc::pipeline::Limits {
                subject_prefix: cfg.subject_prefix.clone(),
                max_details_bytes: 16 * 1024,
            },
            sensitive: None,
            alerts: None,
        },
        stop.clone(),
    ));

    // The offered load: `rate` events/s in 5 ms ticks, each publish call timed.
    println!(
        "audit ingest bench: {rate} events/s offered for {secs} s (publisher -> NATS -> PostgreSQL, hash chain on)"
    );
    let per_tick = (rate / 200).max(1);
    let mut latencies: Vec<u32> = Vec::with_capacity((rate * secs) as usize);
    let mut accepted = Vec::with_capacity((rate * secs) as usize);
    let mut refused = 0_u64;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let clock = system();
    let mut last_report = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let n = stored_count(store.as_ref()).await;
            println!(
                "  t={:.0}s accepted {} stored {n} (bus pending {})",
                start.elapsed().as_secs_f64(),
                accepted.len(),
                bus.pending()
            );
        }
        for i in 0..per_tick {
            let mut e = new_event(clock.as_ref(), "auth", "sec.auth.login.failed");
            e.subject = format!("user:u{}", i % 1000);
            e.source_ip = "192.0.2.10".into();
            e.details.insert("client_id".into(), "bench".into());
            let id = e.id.clone();
            let t = Instant::now();
            let r = bus.publish(e);
            latencies.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
            match r {
                Ok(()) => accepted.push(id),
                Err(_) => refused += 1,
            }
        }
    }
    let window = start.elapsed();
    println!(
        "  offered {} in {:.1} s: accepted {}, refused {refused}",
        accepted.len() as u64 + refused,
        window.as_secs_f64(),
        accepted.len()
    );

    // Drain: every accepted event stored (bounded).
    let count = || stored_count(store.as_ref());
    let drain_limit = Duration::from_secs(120);
    let drain_start = Instant::now();
    let mut stored = count().await;
    while stored < accepted.len() && drain_start.elapsed() < drain_limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = count().await;
    }
    let total = start.elapsed();
    let drain = drain_start.elapsed();
    stop.cancel();
    let _ = ingest.await;

    // Exactly the accepted ids, once each.
    let ids: Vec<uuid::Uuid> = accepted
        .iter()
        .map(|s| uuid::Uuid::parse_str(s).unwrap())
        .collect();
    let mut found = 0_usize;
    for chunk in ids.chunks(50_000) {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(DISTINCT id) FROM security_events WHERE id = ANY($1)")
                .bind(chunk)
                .fetch_one(&pool)
                .await
                .unwrap();
        found += n as usize;
    }
    let head = audit_svc::store::ChainStore::head(store.as_ref())
        .await
        .unwrap();
    let verified = audit_svc::verify::verify(store.as_ref(), &NoSigner, "bench", 0, 0)
        .await
        .unwrap();
    latencies.sort_unstable();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let (insert_s, batches) = histogram(&text, "sec_audit_ingest_batch_seconds");
    let rate_stored = stored as f64 / total.as_secs_f64();
    println!(
        "  stored {stored} ({found} of the accepted ids, {} lost); chain head {}; chain {}",
        accepted.len().saturating_sub(found),
        head.seq,
        if verified.failure.is_none() {
            "verifies"
        } else {
            "DOES NOT VERIFY"
        }
    );
    println!(
        "  ingest: {rate_stored:.0} events/s (stored / {:.1} s from first publish to last store; drain after the window {:.1} s)",
        total.as_secs_f64(),
        drain.as_secs_f64()
    );
    println!(
        "  store: {batches:.0} batches, mean {:.1} ms each, {:.0}% of the time from first publish to last store",
        insert_s * 1000.0 / batches.max(1.0),
        insert_s * 100.0 / total.as_secs_f64()
    );
    println!(
        "  publish on the caller's path: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us ({} calls)",
        pct(&latencies, 0.50),
        pct(&latencies, 0.99),
        pct(&latencies, 0.999),
        pct(&latencies, 1.0),
        latencies.len()
    );
    // The workspace's target/bench, where `make bench` collects results (cargo runs a
    // bench in its package's directory).
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("audit-ingest.json"),
        serde_json::json!({
            "offered_rate": rate,
            "seconds": secs,
            "accepted": accepted.len(),
            "refused": refused,
            "stored": stored,
            "lost": accepted.len().saturating_sub(found),
            "ingest_events_per_second": rate_stored,
            "drain_seconds": drain.as_secs_f64(),
            "publish_p50_us": pct(&latencies, 0.50),
            "publish_p99_us": pct(&latencies, 0.99),
            "publish_p999_us": pct(&latencies, 0.999),
            "chain_verifies": verified.failure.is_none(),
            "store_batches": batches,
            "store_seconds": insert_s,
        })
        .to_string(),
    );

    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
    if let Ok(client) = async_nats::connect(&nats).await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(&cfg.stream).await;
    }
}
