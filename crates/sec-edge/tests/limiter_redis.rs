//! The Redis limiter on a real server (skipped loudly without one, failing with
//! `SEC_TEST_BACKENDS=required`): GCRA semantics, two replicas under concurrency,
//! all-or-nothing, the local tier, and fail-open / fail-closed on an unreachable store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_redis::redis;
use sec_common::clock::{ManualClock, SharedClock};
use sec_edge::limiter::{CheckRequest, EdgeMetrics, Limiter, LimiterOptions};
use sec_edge::rules::{RuleSet, StoreKind};
use sec_testkit::{Backend, backend_url};

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn pool(url: &str) -> sec_common::storage::RedisPool {
    sec_common::storage::RedisPool::from_url(url).unwrap()
}

fn unique_prefix(test: &str) -> String {
    format!("sectest:edge:{test}:{}:", uuid::Uuid::new_v4().simple())
}

fn replica(url: &str, prefix: &str, rules: &str, clock: SharedClock) -> Limiter {
    let set = RuleSet::from_toml(rules, StoreKind::Redis).unwrap();
    Limiter::redis(
        set,
        pool(url),
        prefix.to_owned(),
        &LimiterOptions::default(),
        clock,
        EdgeMetrics::default(),
    )
    .unwrap()
}

fn req(ip: &str) -> CheckRequest<'static> {
    CheckRequest {
        route: "/v1/login",
        method: "POST",
        endpoint: None,
        client_id: Some("app1"),
        user: None,
        ip: ip.parse::<IpAddr>().unwrap(),
        headers: None,
        trusted_client: false,
    }
}

const ONE: &str = r#"
    [[rules]]
    id = "login"
    match = { route = "/v1/login" }
    key = ["ip"]
    limit = { rate = 2, per = "second", burst = 3 }
    on_store_error = "fail_closed"
"#;

async fn keys(url: &str, prefix: &str) -> Vec<String> {
    let mut c = pool(url).get().await.unwrap();
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn gcra_burst_then_steady_rate_with_expiring_keys() {
    let Some(url) = backend_url(Backend::Redis) else {
        return;
    };
    let prefix = unique_prefix("gcra");
    let clock = ManualClock::new(start());
    let l = replica(&url, &prefix, ONE, clock.clone());
    let r = req("192.0.2.1");
    for i in 0..3 {
        let d = l.check(&r).await;
        assert!(d.allowed, "request {i} of the burst");
        assert_eq!(d.rules[0].remaining, 2 - i);
        assert!(!d.rules[0].store_error);
    }
    let d = l.check(&r).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after(), Duration::from_millis(500));
    assert_eq!(
        d.rules[0].reset,
        Duration::from_millis(1500),
        "full again in 3 intervals"
    );
    for _ in 0..5 {
        clock.advance(chrono::Duration::milliseconds(499));
        assert!(!l.check(&r).await.allowed, "before the interval");
        clock.advance(chrono::Duration::milliseconds(1));
        assert!(l.check(&r).await.allowed, "at the interval");
        assert!(!l.check(&r).await.allowed, "one per interval");
    }
    // One key, named by rule id and a hash: the IP is not in it.
    let ks = keys(&url, &prefix).await;
    assert_eq!(ks.len(), 1, "{ks:?}");
    assert!(ks[0].starts_with(&format!("{prefix}rl:login:")));
    assert!(!ks[0].contains("192.0.2.1"));
    let mut c = pool(&url).get().await.unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&ks[0])
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        (1..=1500).contains(&pttl),
        "expires at the emission horizon (1.5 s), got {pttl} ms"
    );
    assert_eq!(l.metrics().rule_count("login", "allowed"), 8);
}

#[tokio::test]
async fn two_replicas_under_concurrency_never_pass_more_than_rate_plus_burst() {
    let Some(url) = backend_url(Backend::Redis) else {
        return;
    };
    let prefix = unique_prefix("replicas");
    let rules = r#"
        [[rules]]
        id = "shared"
        match = { route_prefix = "/" }
        key = ["ip"]
        limit = { rate = 10, per = "minute", burst = 5 }
        on_store_error = "fail_closed"
    "#;
    let clock = ManualClock::new(start());
    // Two pools: two "replicas" sharing only Redis (and a synchronised clock).
    let a = Arc::new(replica(&url, &prefix, rules, clock.clone()));
    let b = Arc::new(replica(&url, &prefix, rules, clock.clone()));
    let passed = Arc::new(AtomicUsize::new(0));
    // One window (60 s) in 1 s steps; 16 parallel clients per step, split over both.
    for _ in 0..60 {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            let passed = passed.clone();
            tasks.push(tokio::spawn(async move {
                let d = l.check(&req("198.51.100.7")).await;
                assert!(!d.rules[0].store_error);
                if d.allowed {
                    passed.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        clock.advance(chrono::Duration::seconds(1));
    }
    let n = passed.load(Ordering::SeqCst);
    assert!(n <= 10 + 5, "{n} passed: more than rate + burst");
    assert_eq!(
        n,
        5 + 9,
        "the burst, then one every 6 s after the first 6 s"
    );
}

const TWO: &str = r#"
    [[rules]]
    id = "per-ip"
    match = { route_prefix = "/v1/" }
    key = ["ip"]
    limit = { rate = 10, per = "hour", burst = 10 }
    on_store_error = "fail_open"

    [[rules]]
    id = "per-client"
    match = { route = "/v1/login" }
    key = ["client_id"]
    limit = { rate = 2, per = "hour", burst = 2 }
    on_store_error = "fail_closed"

    [[rules]]
    id = "watch"
    match = { route = "/v1/login" }
    key = ["ip_prefix"]
    limit = { rate = 1, per = "hour", burst = 1 }
    shadow = true
    on_store_error = "fail_open"
"#;

#[tokio::test]
async fn all_or_nothing_and_shadow_in_one_round_trip() {
    let Some(url) = backend_url(Backend::Redis) else {
        return;
    };
    let prefix = unique_prefix("multi");
    let clock = ManualClock::new(start());
    let l = replica(&url, &prefix, TWO, clock.clone());
    let r = req("192.0.2.1");
    assert!(l.check(&r).await.allowed);
    let d = l.check(&r).await;
    assert!(d.allowed, "the shadow rule refuses, but never blocks");
    assert!(!d.rules[2].allowed && d.rules[2].shadow);
    let d = l.check(&r).await;
    assert!(!d.allowed, "per-client exhausted");
    assert!(d.rules[0].allowed && !d.rules[1].allowed);
    assert_eq!(d.rules[0].remaining, 8, "per-ip was not consumed");
    // per-client's retry-after (30 min) is long: the local tier refuses from now on,
    // reporting only the rule that refused.
    for _ in 0..19 {
        let d = l.check(&r).await;
        assert!(!d.allowed);
        assert_eq!(d.rules.len(), 1);
        assert_eq!(&*d.rules[0].rule_id, "per-client");
    }
    assert_eq!(l.metrics().local_tier_count(), 19);
    let other = CheckRequest {
        route: "/v1/other",
        ..r
    };
    for i in 0..8 {
        assert!(l.check(&other).await.allowed, "request {i}");
    }
    assert!(!l.check(&other).await.allowed);
    let m = l.metrics();
    assert_eq!(m.rule_count("watch", "shadow_limited"), 2);
    assert_eq!(m.rule_count("per-client", "limited"), 20);
}

#[tokio::test]
async fn keys_far_over_their_limit_are_refused_locally_without_a_round_trip() {
    let Some(url) = backend_url(Backend::Redis) else {
        return;
    };
    let prefix = unique_prefix("tier");
    let clock = ManualClock::new(start());
    let rules = ONE.replace(
        "rate = 2, per = \"second\", burst = 3",
        "rate = 1, per = \"hour\", burst = 1",
    );
    let l = replica(&url, &prefix, &rules, clock.clone());
    let r = req("192.0.2.1");
    assert!(l.check(&r).await.allowed);
    let d = l.check(&r).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after(), Duration::from_secs(3600));
    assert_eq!(l.metrics().local_tier_count(), 0);
    // Wipe Redis: a refusal now can only come from the local tier.
    let mut c = pool(&url).get().await.unwrap();
    for k in keys(&url, &prefix).await {
        let _: i64 = redis::cmd("DEL").arg(k).query_async(&mut c).await.unwrap();
    }
    clock.advance(chrono::Duration::minutes(30));
    let d = l.check(&r).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after(), Duration::from_secs(1800));
    assert_eq!(l.metrics().local_tier_count(), 1);
    // Once the retry-after has passed, Redis decides again.
    clock.advance(chrono::Duration::minutes(31));
    assert!(l.check(&r).await.allowed);
}

#[tokio::test]
async fn unreachable_store_applies_each_rules_policy_counts_it_and_fires_the_hook() {
    // A port nothing listens on: the reserved port 1 on loopback.
    let clock = ManualClock::new(start());
    let set = RuleSet::from_toml(TWO, StoreKind::Redis).unwrap();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = reports.clone();
    let l = Limiter::redis(
        set,
        pool("redis://127.0.0.1:1/"),
        "sectest:edge:down:".into(),
        &LimiterOptions::default(),
        clock,
        EdgeMetrics::default(),
    )
    .unwrap()
    .with_store_error_hook(Arc::new(move |r| {
        seen.lock().unwrap().push((r.rule_id.to_string(), r.policy));
    }));
    // /v1/login: per-client fails closed, so the request is refused.
    let d = l.check(&req("192.0.2.1")).await;
    assert!(!d.allowed);
    assert!(d.rules.iter().all(|r| r.store_error));
    assert_eq!(d.retry_after(), Duration::from_secs(1));
    // /v1/other: only per-ip (fail open) applies: allowed.
    let other = CheckRequest {
        route: "/v1/other",
        ..req("192.0.2.1")
    };
    let d = l.check(&other).await;
    assert!(d.allowed);
    assert!(d.rules[0].store_error);
    let m = l.metrics();
    assert_eq!(m.rule_count("per-ip", "store_error"), 2);
    assert_eq!(m.rule_count("per-client", "store_error"), 1);
    assert_eq!(m.rule_count("per-client", "limited"), 1);
    assert_eq!(m.rule_count("per-ip", "allowed"), 1);
    let reports = reports.lock().unwrap();
    assert_eq!(
        reports.len(),
        4,
        "one report per rule and check: {reports:?}"
    );
    assert!(reports.contains(&(
        "per-client".to_owned(),
        sec_edge::rules::StoreErrorPolicy::FailClosed
    )));
}

#[tokio::test]
async fn the_platform_config_picks_the_store_and_redis_requires_a_failure_policy() {
    let rules_cfg: sec_edge::RulesConfig = toml::from_str(ONE).unwrap();
    let clock: SharedClock = ManualClock::new(start());
    // Embedded default: in process.
    let cfg = sec_common::config::Config::default();
    let l = Limiter::from_platform(
        &cfg,
        &rules_cfg,
        &LimiterOptions::default(),
        clock.clone(),
        EdgeMetrics::default(),
    )
    .await
    .unwrap();
    assert_eq!(l.store_kind(), StoreKind::InProcess);
    let Some(url) = backend_url(Backend::Redis) else {
        return;
    };
    let mut cfg = sec_common::config::Config::default();
    cfg.storage.redis_url = Some(sec_common::config::Secret::new(url.clone()));
    cfg.storage.redis_key_prefix = unique_prefix("platform");
    let l = Limiter::from_platform(
        &cfg,
        &rules_cfg,
        &LimiterOptions::default(),
        clock.clone(),
        EdgeMetrics::default(),
    )
    .await
    .unwrap();
    assert_eq!(l.store_kind(), StoreKind::Redis);
    assert!(l.check(&req("192.0.2.1")).await.allowed);
    let ks = keys(&url, &cfg.storage.redis_key_prefix).await;
    assert_eq!(ks.len(), 1);
    assert!(
        ks[0].starts_with(&format!("{}edge:rl:login:", cfg.storage.redis_key_prefix)),
        "{ks:?}"
    );
    // Without on_store_error the set is refused for Redis, naming the field.
    let no_policy: sec_edge::RulesConfig =
        toml::from_str(&ONE.replace("on_store_error = \"fail_closed\"", "")).unwrap();
    let e = Limiter::from_platform(
        &cfg,
        &no_policy,
        &LimiterOptions::default(),
        clock,
        EdgeMetrics::default(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().starts_with("rules[0].on_store_error: "),
        "{e}"
    );
}
