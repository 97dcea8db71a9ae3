//! Edge protection costs: an IP/CIDR lookup with 100,000 entries (target < 1 µs), an
//! in-process rate-limit check (target p99 < 20 µs; criterion reports the median), a
//! check against Redis when one is reachable (target p99 < 1 ms), and a request through
//! an axum router with the layer on and off, and a geolocation (MaxMind DB) lookup and
//! country decision.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: a failure should abort the run

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use ipnet::{IpNet, Ipv4Net};
use sec_edge::ip::IpSet;
use sec_edge::layer::{EdgeLayer, EdgeState};
use sec_edge::limiter::{CheckRequest, EdgeMetrics, Limiter, LimiterOptions};
use sec_edge::rules::{RuleSet, StoreKind};
use sec_edge::{ClientIpResolver, IpControl, IpListsConfig, IpTables};
use tower::ServiceExt as _;

const N: u32 = 100_000;

/// A spread of addresses: multiplying by an odd constant permutes the u32 space.
fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(i.wrapping_mul(2_654_435_761))
}

fn ip_lookup(c: &mut Criterion) {
    let mut set = IpSet::new();
    for i in 0..N {
        // Half /32 hosts, half /24 networks.
        let net = if i % 2 == 0 {
            Ipv4Net::from(addr(i))
        } else {
            Ipv4Net::new(addr(i), 24).unwrap().trunc()
        };
        set.insert(IpNet::V4(net));
    }
    let hits: Vec<IpAddr> = (0..1024).map(|i| IpAddr::V4(addr(i * 2))).collect();
    let misses: Vec<IpAddr> = (0..1024).map(|i| IpAddr::V4(addr(N * 3 + i))).collect();
    let mut g = c.benchmark_group("ip_lookup_100k");
    let mut i = 0;
    g.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 1) % hits.len();
            black_box(set.contains(black_box(hits[i])))
        });
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            i = (i + 1) % misses.len();
            black_box(set.contains(black_box(misses[i])))
        });
    });
    g.finish();
}

const RULES: &str = r#"
    [[rules]]
    id = "per-ip"
    match = { route_prefix = "/v1/" }
    key = ["ip"]
    limit = { rate = 1000000, per = "second", burst = 1000 }
    on_store_error = "fail_open"

    [[rules]]
    id = "per-client"
    match = { route = "/v1/login" }
    key = ["client_id"]
    limit = { rate = 1000000, per = "second", burst = 1000 }
    on_store_error = "fail_open"
"#;

fn request(ip: IpAddr) -> CheckRequest<'static> {
    CheckRequest {
        route: "/v1/login",
        method: "POST",
        endpoint: None,
        client_id: Some("app1"),
        user: None,
        ip,
        headers: None,
        trusted_client: false,
    }
}

fn check(c: &mut Criterion) {
    let clock = sec_common::clock::system();
    let local = Limiter::in_process(
        RuleSet::from_toml(RULES, StoreKind::InProcess).unwrap(),
        &LimiterOptions::default(),
        clock.clone(),
        EdgeMetrics::default(),
    )
    .unwrap();
    let ips: Vec<IpAddr> = (0..10_000).map(|i| IpAddr::V4(addr(i))).collect();
    let mut g = c.benchmark_group("ratelimit_check");
    let mut i = 0;
    g.bench_function("in_process_2_rules", |b| {
        b.iter(|| {
            i = (i + 1) % ips.len();
            black_box(futures::executor::block_on(local.check(&request(ips[i]))))
        });
    });
    let url =
        std::env::var("SEC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = sec_common::storage::RedisPool::from_url(&url).unwrap();
    let reachable = rt.block_on(async {
        match pool.get().await {
            Ok(mut c) => deadpool_redis::redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            Err(_) => false,
        }
    });
    if reachable {
        let redis = Limiter::redis(
            RuleSet::from_toml(RULES, StoreKind::Redis).unwrap(),
            pool,
            format!("secbench:edge:{}:", uuid::Uuid::new_v4().simple()),
            &LimiterOptions::default(),
            clock,
            EdgeMetrics::default(),
        )
        .unwrap();
        g.bench_function("redis_2_rules", |b| {
            b.iter(|| {
                i = (i + 1) % ips.len();
                let d = rt.block_on(redis.check(&request(ips[i])));
                assert!(!d.rules[0].store_error);
                black_box(d)
            });
        });
    } else {
        eprintln!(
            "\n*** SKIPPED ratelimit_check/redis_2_rules: Redis not reachable at {url} ***\n"
        );
    }
    g.finish();
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter = Arc::new(
        Limiter::in_process(
            RuleSet::from_toml(RULES, StoreKind::InProcess).unwrap(),
            &LimiterOptions::default(),
            sec_common::clock::system(),
            EdgeMetrics::default(),
        )
        .unwrap(),
    );
    let deny: Vec<String> = (0..N).map(|i| format!("{}", addr(i + N))).collect();
    let ip = Arc::new(IpControl::new(
        IpTables::build(&IpListsConfig {
            deny,
            ..Default::default()
        })
        .unwrap(),
    ));
    let base = Router::new().route("/v1/login", get(|| async { "ok" }));
    let on = base.clone().layer(EdgeLayer::new(EdgeState {
        resolver: ClientIpResolver::new(&["10.0.0.0/8".into()]).unwrap(),
        ip,
        limiter,
        headers_on_success: true,
        hooks: None,
    }));
    let ips: Vec<IpAddr> = (0..10_000).map(|i| IpAddr::V4(addr(i))).collect();
    let mut g = c.benchmark_group("router_request");
    for (name, router) in [("layer_off", base), ("layer_on", on)] {
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % ips.len();
                let mut r = http::Request::builder()
                    .uri("/v1/login")
                    .body(Body::empty())
                    .unwrap();
                r.extensions_mut()
                    .insert(ConnectInfo(SocketAddr::new(ips[i], 40000)));
                let resp = rt.block_on(router.clone().oneshot(r)).unwrap();
                assert!(resp.status().is_success());
                black_box(resp)
            });
        });
    }
    g.finish();
}

/// A country database: `SEC_EDGE_GEO_DB`, or one written with
/// `scripts/edge-geo-testdb.py` (1,000 /24s) when `target/pyenv-geo` holds mmdb-writer
/// (the geo tests install it). Otherwise the bench says so and is skipped.
fn geo_db() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SEC_EDGE_GEO_DB") {
        return Some(p.into());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let py = target.join("pyenv-geo");
    if !py.join("mmdb_writer").exists() {
        return None;
    }
    let out = target.join("bench-geo.mmdb");
    let codes = ["DE", "SE", "GB", "FR", "US", "KP", "BR", "JP"];
    let entries: Vec<String> = (0..1000_u32)
        .map(|i| {
            let a = addr(i).octets();
            format!(
                "{}.{}.{}.0/24={}",
                a[0],
                a[1],
                a[2],
                codes[i as usize % codes.len()]
            )
        })
        .collect();
    let st = std::process::Command::new("python3")
        .arg(root.join("scripts/edge-geo-testdb.py"))
        .arg(&out)
        .args(&entries)
        .env("PYTHONPATH", &py)
        .status()
        .ok()?;
    st.success().then_some(out)
}

fn geo(c: &mut Criterion) {
    let Some(db) = geo_db() else {
        eprintln!(
            "geo_lookup: skipped (no SEC_EDGE_GEO_DB and no target/pyenv-geo; run the geo tests once)"
        );
        return;
    };
    let mut reg = prometheus_client::registry::Registry::default();
    let g = sec_edge::GeoControl::start(
        &sec_edge::GeoConfig {
            database: Some(db),
            deny: vec!["KP".into()],
            ..Default::default()
        },
        &mut reg,
    )
    .unwrap()
    .unwrap();
    let hit = IpAddr::V4(addr(7));
    let miss = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let mut group = c.benchmark_group("geo_lookup");
    group.bench_function("country_hit", |b| {
        b.iter(|| black_box(g.country(black_box(hit))))
    });
    group.bench_function("check_hit", |b| {
        b.iter(|| black_box(g.check(black_box(hit), None, "/v1/login")))
    });
    group.bench_function("check_unknown", |b| {
        b.iter(|| black_box(g.check(black_box(miss), None, "/v1/login")))
    });
    group.finish();
}

criterion_group!(benches, ip_lookup, check, layer, geo);
criterion_main!(benches);
