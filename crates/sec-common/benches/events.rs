//! In-process costs of security-event logging: `new_event`, protobuf encoding, and
//! `EventBus::publish` on the in-process bus (the "logging overhead on a request"
//! budget is < 0.05 ms; `publish` only hands the event to the spool), and with the
//! durable outbox services run with (`publish_outbox`: one `write` per event too).
//!
//! Run with `cargo bench -p sec-common --bench events`; results land in `target/criterion`.

// A benchmark binary is not a test for clippy, but failing loudly on a broken setup is
// exactly what a bench should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message as _;
use sec_common::clock::SystemClock;
use sec_common::config::EventsConfig;
use sec_common::events::memory::MemoryTransport;
use sec_common::events::{EventBus, SecurityEvent, new_event};

const SERVICE: &str = "audit";
const EVENT_TYPE: &str = "sec.audit.bench.recorded";
/// Events published per timed chunk; the spool is flushed (untimed) between chunks.
const CHUNK: u64 = 10_000;

fn event() -> SecurityEvent {
    new_event(&SystemClock, SERVICE, EVENT_TYPE)
}

fn bench_new_event(c: &mut Criterion) {
    let mut g = c.benchmark_group("events");
    g.bench_function("new_event", |b| b.iter(|| black_box(event())));
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut ev = event();
    ev.subject = "user:0190c2a4-7d3e-7b7a-9f6e-3c1d2b4a5e6f".into();
    ev.source_ip = "127.0.0.1".into();
    ev.details.insert("key_id".into(), "k-0001".into());
    let mut g = c.benchmark_group("events");
    g.bench_function("encode_to_vec", |b| {
        b.iter(|| black_box(black_box(&ev).encode_to_vec()))
    });
    g.finish();
}

fn bench_publish(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let _g = rt.enter();
    let bus = EventBus::in_process(&EventsConfig {
        spool_capacity: 1_000_000,
        ..Default::default()
    });
    publish_case(c, &rt, &bus, "publish");
}

/// `publish` as a service does it: the in-process broker behind a durable outbox in a
/// temporary directory (one `write` per event, no fsync), settled as the consumer acks.
/// Also prints the percentiles of single publishes, which criterion does not give.
fn bench_publish_outbox(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let _g = rt.enter();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = EventsConfig {
        spool_capacity: 1_000_000,
        outbox_dir: Some(dir.path().join("outbox")),
        outbox_max_bytes: 4 * 1024 * 1024 * 1024,
        ..Default::default()
    };
    let bus = EventBus::with_outbox(
        Arc::new(MemoryTransport::new(cfg.spool_capacity)),
        &cfg,
        Arc::new(SystemClock),
    )
    .expect("outbox");
    publish_case(c, &rt, &bus, "publish_outbox");
    percentiles(&rt, &bus, "publish_outbox");
}

/// The consumer audit-svc would be: keeps the in-process broker from filling up.
fn drain(rt: &tokio::runtime::Runtime, bus: &EventBus) {
    let drain = bus.clone();
    rt.spawn(async move {
        loop {
            match drain.fetch(1000, Duration::from_millis(10)).await {
                Ok(batch) => {
                    for d in batch {
                        let _ = d.ack().await;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
}

fn publish_case(c: &mut Criterion, rt: &tokio::runtime::Runtime, bus: &EventBus, name: &str) {
    drain(rt, bus);
    let mut g = c.benchmark_group("events");
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                // Fresh events (unique ids, as in production), built outside the timing.
                let events: Vec<SecurityEvent> = (0..n).map(|_| event()).collect();
                let start = Instant::now();
                for ev in events {
                    bus.publish(ev).expect("spool accepted the event");
                }
                timed += start.elapsed();
                left -= n;
                // Keep the spool from filling: wait (untimed) until the broker stored all.
                let pending = rt.block_on(bus.flush(Duration::from_secs(30)));
                assert_eq!(pending, 0, "the in-process broker did not keep up");
            }
            timed
        })
    });
    g.finish();
}

/// Times 20 chunks of single publishes and prints p50/p99/p99.9/max (the budget is a
/// p99, criterion reports means and medians).
fn percentiles(rt: &tokio::runtime::Runtime, bus: &EventBus, name: &str) {
    let mut samples = Vec::with_capacity(20 * CHUNK as usize);
    for _ in 0..20 {
        let events: Vec<SecurityEvent> = (0..CHUNK).map(|_| event()).collect();
        for ev in events {
            let start = Instant::now();
            bus.publish(ev).expect("spool accepted the event");
            samples.push(start.elapsed());
        }
        let pending = rt.block_on(bus.flush(Duration::from_secs(30)));
        assert_eq!(pending, 0, "the in-process broker did not keep up");
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "events/{name} single publishes: n={} p50={:?} p99={:?} p99.9={:?} max={:?}",
        samples.len(),
        at(0.50),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
}

criterion_group!(
    benches,
    bench_new_event,
    bench_encode,
    bench_publish,
    bench_publish_outbox
);
criterion_main!(benches);
