//! In-process costs of security-event logging: `new_event`, protobuf encoding, and
//! `EventBus::publish` on the in-process bus (the "logging overhead on a request"
//! budget is < 0.05 ms; `publish` only hands the event to the spool).
//!
//! Run with `cargo bench -p sec-common --bench events`; results land in `target/criterion`.

// A benchmark binary is not a test for clippy, but failing loudly on a broken setup is
// exactly what a bench should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message as _;
use sec_common::clock::SystemClock;
use sec_common::config::EventsConfig;
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

    // The consumer audit-svc would be: keeps the in-process broker from filling up.
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

    let mut g = c.benchmark_group("events");
    g.bench_function("publish", |b| {
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

criterion_group!(benches, bench_new_event, bench_encode, bench_publish);
criterion_main!(benches);
