//! Redis memory per session: writes N realistic sessions through the real store (the
//! create script, so keys, values, TTLs and the per-user index are exactly what the
//! service writes) into the Redis at `--url`, and prints `INFO memory` used_memory
//! before and after. Run by `scripts/bench-session-memory.sh` against a scratch
//! redis-server of its own; never point it at a shared Redis.
//!
//! Usage: session_memory <redis-url> [sessions] [sessions-per-user]

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench tool

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use deadpool_redis::redis;
use sec_common::storage::RedisPool;
use session_svc::config::LimitPolicy;
use session_svc::engine::handle_of;
use session_svc::store::redis::RedisSessionStore;
use session_svc::store::{Record, SessionStore};

async fn used_memory(pool: &RedisPool) -> u64 {
    let mut c = pool.get().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .expect("usage: session_memory <redis-url> [n] [per-user]");
    let n: usize = args.get(2).map_or(1_000_000, |s| s.parse().unwrap());
    let per_user: usize = args.get(3).map_or(2, |s| s.parse().unwrap());
    let pool = RedisPool::from_url(url).unwrap();
    let store = Arc::new(RedisSessionStore::new(pool.clone(), "sec:session:".into()));
    let before = used_memory(&pool).await;
    let now = sec_common::clock::system().now().timestamp_millis();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Many calls in flight on the multiplexed connections: Redis sees a pipeline.
    for _ in 0..64 {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let id = format!("sess_{i:043}");
                let r = Record {
                    user: format!("user-{:07}@example.com", i / per_user),
                    client: "web-app".into(),
                    auth_time: now,
                    amr: "pwd otp".into(),
                    acr: "urn:sec:aal2".into(),
                    created: now,
                    last_seen: now,
                    expires: now + 1_800_000,
                    absolute: now + 43_200_000,
                    idle_ms: 1_800_000,
                    ip: "203.0.113.45".into(),
                    user_agent:
                        "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
                            .into(),
                    attributes: BTreeMap::from([("tenant".into(), "acme".into())]),
                    binding: 1,
                };
                store
                    .create(&handle_of(&id), &r, 10, LimitPolicy::EvictOldest, now)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = used_memory(&pool).await;
    let sample = store
        .get(&handle_of(&format!("sess_{:043}", 0)), now)
        .await
        .unwrap();
    let value_len = match sample {
        session_svc::store::Lookup::Live(r) => r.encode().len(),
        _ => 0,
    };
    let per = (after - before) as f64 / n as f64;
    println!(
        "{{\"sessions\": {n}, \"sessions_per_user\": {per_user}, \"used_memory_before\": {before}, \"used_memory_after\": {after}, \"bytes_per_session\": {per:.1}, \"record_bytes\": {value_len}}}"
    );
}
