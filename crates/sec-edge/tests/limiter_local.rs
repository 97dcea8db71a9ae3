//! The in-process limiter (governor GCRA) over simulated time: burst then steady rate,
//! all-or-nothing across rules, shadow, bypass, metrics, rule swaps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sec_common::clock::ManualClock;
use sec_edge::limiter::{CheckRequest, Decision, EdgeMetrics, Limiter, LimiterOptions};
use sec_edge::rules::{RuleSet, RulesConfig, StoreKind};

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn limiter(rules: &str, opts: LimiterOptions) -> (Limiter, Arc<ManualClock>) {
    let clock = ManualClock::new(start());
    let set = RuleSet::from_toml(rules, StoreKind::InProcess).unwrap();
    let l = Limiter::in_process(set, &opts, clock.clone(), EdgeMetrics::default()).unwrap();
    (l, clock)
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

async fn check(l: &Limiter, r: &CheckRequest<'_>) -> Decision {
    l.check(r).await
}

const ONE: &str = r#"
    [[rules]]
    id = "login"
    match = { route = "/v1/login", methods = ["POST"] }
    key = ["ip"]
    limit = { rate = 2, per = "second", burst = 3 }
"#;

#[tokio::test]
async fn burst_then_steady_rate_over_simulated_time() {
    let (l, clock) = limiter(ONE, LimiterOptions::default());
    let r = req("192.0.2.1");
    // A fresh key takes `burst` at once.
    for i in 0..3 {
        let d = check(&l, &r).await;
        assert!(d.allowed, "request {i} of the burst");
        assert_eq!(d.rules[0].remaining, 2 - i, "remaining after {i}");
    }
    let d = check(&l, &r).await;
    assert!(!d.allowed, "burst exhausted");
    assert_eq!(
        d.retry_after(),
        Duration::from_millis(500),
        "one emission interval"
    );
    assert_eq!(d.rules[0].remaining, 0);
    // Another key is independent.
    assert!(check(&l, &req("192.0.2.2")).await.allowed);
    // Steady state: one every 500 ms, never two.
    for _ in 0..5 {
        clock.advance(chrono::Duration::milliseconds(499));
        assert!(!check(&l, &r).await.allowed, "before the interval");
        clock.advance(chrono::Duration::milliseconds(1));
        assert!(check(&l, &r).await.allowed, "at the interval");
        assert!(!check(&l, &r).await.allowed, "only one per interval");
    }
    // After idling long enough the full burst is back (and not more).
    clock.advance(chrono::Duration::seconds(10));
    let n = {
        let mut n = 0;
        while check(&l, &r).await.allowed {
            n += 1;
        }
        n
    };
    assert_eq!(n, 3);
    assert_eq!(l.metrics().rule_count("login", "allowed"), 3 + 1 + 5 + 3);
    assert_eq!(l.metrics().rule_count("login", "limited"), 1 + 10 + 1);
}

#[tokio::test]
async fn never_more_than_rate_plus_burst_in_a_window() {
    let (l, clock) = limiter(
        r#"
        [[rules]]
        id = "w"
        match = { route_prefix = "/" }
        key = ["ip"]
        limit = { rate = 10, per = "minute", burst = 4 }
        "#,
        LimiterOptions::default(),
    );
    let r = req("192.0.2.1");
    let mut passed = 0;
    // One attempt every 100 ms for exactly one window (60 s).
    for _ in 0..600 {
        if check(&l, &r).await.allowed {
            passed += 1;
        }
        clock.advance(chrono::Duration::milliseconds(100));
    }
    assert!(passed <= 10 + 4, "{passed} passed");
    assert_eq!(
        passed,
        4 + 10 - 1,
        "burst, then one per 6 s after the first 6 s"
    );
}

const TWO: &str = r#"
    [[rules]]
    id = "per-ip"
    match = { route_prefix = "/v1/" }
    key = ["ip"]
    limit = { rate = 10, per = "hour", burst = 10 }

    [[rules]]
    id = "per-client"
    match = { route = "/v1/login" }
    key = ["client_id"]
    limit = { rate = 2, per = "hour", burst = 2 }
"#;

#[tokio::test]
async fn a_request_refused_by_one_rule_does_not_consume_the_others() {
    let (l, _clock) = limiter(TWO, LimiterOptions::default());
    let r = req("192.0.2.1");
    assert!(check(&l, &r).await.allowed);
    assert!(check(&l, &r).await.allowed);
    // per-client is exhausted: the next 20 are refused, and per-ip is not consumed.
    for _ in 0..20 {
        let d = check(&l, &r).await;
        assert!(!d.allowed);
        assert_eq!(d.rules.len(), 2);
        assert!(d.rules[0].allowed && !d.rules[1].allowed);
        assert_eq!(d.rules[0].remaining, 8, "per-ip still has 8 of 10");
    }
    // The same IP on another route (only per-ip applies) still has its 8.
    let other = CheckRequest {
        route: "/v1/other",
        ..r
    };
    for i in 0..8 {
        assert!(check(&l, &other).await.allowed, "request {i}");
    }
    assert!(!check(&l, &other).await.allowed);
}

#[tokio::test]
async fn shadow_rules_record_but_never_block() {
    let shadow = TWO.replace(
        "limit = { rate = 2, per = \"hour\", burst = 2 }",
        "limit = { rate = 2, per = \"hour\", burst = 2 }\n    shadow = true",
    );
    let (l, _clock) = limiter(&shadow, LimiterOptions::default());
    let r = req("192.0.2.1");
    for _ in 0..10 {
        assert!(check(&l, &r).await.allowed);
    }
    let d = check(&l, &r).await;
    assert!(!d.allowed, "the enforcing per-ip rule still limits");
    assert_eq!(
        l.metrics().rule_count("per-client", "shadow_limited"),
        9,
        "8 while allowed, 1 on the refused request"
    );
    assert_eq!(l.metrics().rule_count("per-client", "limited"), 0);
    assert_eq!(l.metrics().rule_count("per-ip", "limited"), 1);
}

#[tokio::test]
async fn trusted_clients_and_cidrs_bypass_and_are_counted() {
    let (l, _clock) = limiter(
        ONE,
        LimiterOptions {
            bypass_cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        },
    );
    for _ in 0..10 {
        let d = check(&l, &req("10.1.2.3")).await;
        assert!(d.allowed && d.bypassed);
    }
    let trusted = CheckRequest {
        trusted_client: true,
        ..req("192.0.2.1")
    };
    for _ in 0..10 {
        assert!(check(&l, &trusted).await.allowed);
    }
    assert_eq!(l.metrics().rule_count("login", "bypassed"), 20);
    // Bypasses consumed nothing: the untrusted caller still has its burst.
    let r = req("192.0.2.1");
    for _ in 0..3 {
        assert!(check(&l, &r).await.allowed);
    }
    assert!(!check(&l, &r).await.allowed);
    assert!(
        Limiter::in_process(
            RuleSet::default(),
            &LimiterOptions {
                bypass_cidrs: vec!["10.0.0.0/8".into(), "nope".into()],
                ..Default::default()
            },
            ManualClock::new(start()),
            EdgeMetrics::default()
        )
        .unwrap_err()
        .field
            == "bypass_cidrs[1]"
    );
}

#[tokio::test]
async fn keys_combine_parts_and_rules_without_their_part_do_not_apply() {
    let (l, _clock) = limiter(
        r#"
        [[rules]]
        id = "tenant-user"
        match = { route_prefix = "/" }
        key = ["user", "header:x-tenant", "ip_prefix"]
        limit = { rate = 1, per = "day", burst = 1 }
        "#,
        LimiterOptions::default(),
    );
    let mut h = http::HeaderMap::new();
    h.insert("x-tenant", "t1".parse().unwrap());
    let base = CheckRequest {
        user: Some("alice"),
        headers: Some(&h),
        ..req("192.0.2.1")
    };
    assert!(check(&l, &base).await.allowed);
    assert!(!check(&l, &base).await.allowed);
    // Same /24 prefix: the same key.
    assert!(
        !check(
            &l,
            &CheckRequest {
                ip: "192.0.2.200".parse().unwrap(),
                ..base
            }
        )
        .await
        .allowed
    );
    // Another prefix, user or tenant: another key.
    assert!(
        check(
            &l,
            &CheckRequest {
                ip: "192.0.3.1".parse().unwrap(),
                ..base
            }
        )
        .await
        .allowed
    );
    assert!(
        check(
            &l,
            &CheckRequest {
                user: Some("bob"),
                ..base
            }
        )
        .await
        .allowed
    );
    let mut h2 = http::HeaderMap::new();
    h2.insert("x-tenant", "t2".parse().unwrap());
    assert!(
        check(
            &l,
            &CheckRequest {
                headers: Some(&h2),
                ..base
            }
        )
        .await
        .allowed
    );
    // No user: the rule does not apply at all.
    let d = check(&l, &CheckRequest { user: None, ..base }).await;
    assert!(d.allowed && d.rules.is_empty());
}

#[tokio::test]
async fn rule_updates_are_validated_whole_and_keep_unchanged_state() {
    let (l, _clock) = limiter(ONE, LimiterOptions::default());
    let r = req("192.0.2.1");
    for _ in 0..3 {
        assert!(check(&l, &r).await.allowed);
    }
    let bad: RulesConfig = toml::from_str(&ONE.replace("burst = 3", "burst = 0")).unwrap();
    let e = l.update_rules(&bad).unwrap_err();
    assert_eq!(e.field, "rules[0].limit.burst");
    assert!(!check(&l, &r).await.allowed, "old set (and its state) kept");
    // Same rule plus a new one: the old rule keeps its state.
    let more: RulesConfig = toml::from_str(&format!(
        "{ONE}\n[[rules]]\nid = \"x\"\nmatch = {{ route = \"/x\" }}\nkey = [\"ip\"]\nlimit = {{ rate = 1, per = \"second\", burst = 1 }}\n"
    ))
    .unwrap();
    l.update_rules(&more).unwrap();
    assert_eq!(l.rules().rules.len(), 2);
    assert!(
        !check(&l, &r).await.allowed,
        "unchanged rule kept its state"
    );
}

#[tokio::test]
async fn idle_keys_are_swept_so_memory_follows_live_keys() {
    let (l, clock) = limiter(ONE, LimiterOptions::default());
    let Some(store) = l.local_store() else {
        panic!("in-process limiter");
    };
    for i in 0..5_000_u32 {
        let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        assert!(
            check(
                &l,
                &CheckRequest {
                    ip,
                    ..req("0.0.0.0")
                }
            )
            .await
            .allowed
        );
    }
    assert_eq!(store.key_count("login"), 5_000, "all live");
    // Their TATs (500 ms ahead) pass; new keys arrive until the next sweep.
    clock.advance(chrono::Duration::seconds(10));
    for i in 0..4_000_u32 {
        let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
        assert!(
            check(
                &l,
                &CheckRequest {
                    ip,
                    ..req("0.0.0.0")
                }
            )
            .await
            .allowed
        );
    }
    let n = store.key_count("login");
    assert_eq!(
        n, 4_000,
        "only the live keys are held; the 5,000 idle ones were swept"
    );
}
