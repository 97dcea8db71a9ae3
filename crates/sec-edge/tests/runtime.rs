//! The runtime over the shared store: rule and list changes made on one replica apply on
//! another (SQLite file, and PostgreSQL when reachable), bad changes are refused naming
//! the field and keep the old set, compare-and-set, auto-block and unblock, expiry,
//! sampled events, stats and the access rules of the gRPC service.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default
)] // test code

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use prometheus_client::registry::Registry;
use sec_common::auth::Caller;
use sec_common::clock::{ManualClock, SharedClock};
use sec_common::storage::Db;
use sec_edge::ip::BlockReason;
use sec_edge::limiter::{EdgeMetrics, Limiter, LimiterOptions};
use sec_edge::rules::{RuleSet, StoreKind};
use sec_edge::runtime::{AutoBlockConfig, EdgeConfig, EdgeDeps, EdgeRuntime, FailureReason};
use sec_edge::store::{StoreError, StoredRule};
use sec_proto::common::v1::SecurityEvent;
use sec_proto::edge::v1 as pb;
use sec_proto::edge::v1::edge_service_server::EdgeService;
use sec_testkit::Backend;

static AUTH_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/auth/sqlite");
static AUTH_POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/auth/postgres");

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

async fn sqlite_db(path: &std::path::Path) -> Db {
    let pool = sec_common::storage::connect_sqlite(path, 4).await.unwrap();
    AUTH_SQLITE.run(&pool).await.unwrap();
    Db::Sqlite(pool)
}

/// Two pools on one SQLite file: two replicas sharing only the database.
async fn sqlite_pair() -> (Db, Db) {
    let dir = std::env::temp_dir().join(format!("sec-edge-rt-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("auth.db");
    let a = sqlite_db(&path).await;
    let b = sqlite_db(&path).await;
    (a, b)
}

async fn postgres_pair() -> Option<(Db, Db)> {
    let url = sec_testkit::backend_url(Backend::Postgres)?;
    let schema = format!("edge_{}", uuid::Uuid::new_v4().simple());
    let a = sec_common::storage::connect_postgres(&url, &schema, 4)
        .await
        .unwrap();
    AUTH_POSTGRES.run(&a).await.unwrap();
    let b = sec_common::storage::connect_postgres(&url, &schema, 4)
        .await
        .unwrap();
    Some((Db::Postgres(a), Db::Postgres(b)))
}

type Events = Arc<Mutex<Vec<SecurityEvent>>>;

fn base_config() -> EdgeConfig {
    let mut cfg = EdgeConfig::default();
    cfg.ratelimit = toml::from_str(
        r#"
[[rules]]
id = "login.ip"
match = { route = "/v1/login" }
key = ["ip"]
limit = { rate = 10, per = "minute", burst = 5 }
"#,
    )
    .unwrap();
    cfg.auto_block = AutoBlockConfig {
        threshold: 3,
        window_secs: 60,
        block_secs: 600,
        ..AutoBlockConfig::default()
    };
    cfg
}

async fn runtime(cfg: &EdgeConfig, db: Db, clock: SharedClock) -> (EdgeRuntime, Events) {
    let events: Events = Arc::default();
    let sink = events.clone();
    let mut reg = Registry::default();
    let metrics = EdgeMetrics::register(&mut reg);
    let limiter = Limiter::in_process(
        RuleSet::build(&cfg.ratelimit, StoreKind::InProcess).unwrap(),
        &LimiterOptions::default(),
        clock.clone(),
        metrics,
    )
    .unwrap();
    let rt = EdgeRuntime::with_limiter(
        cfg,
        limiter,
        EdgeDeps {
            service: "auth",
            db,
            clock,
            emit: Arc::new(move |e| sink.lock().unwrap().push(e)),
        },
        &mut reg,
    )
    .await
    .unwrap();
    (rt, events)
}

fn as_caller<T>(msg: T, caller: Caller) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(caller);
    r
}

fn admin<T>(msg: T) -> tonic::Request<T> {
    as_caller(msg, Caller::Admin)
}

fn field_of(s: &tonic::Status) -> String {
    sec_common::error::error_info(s)
        .map(|i| i.field)
        .unwrap_or_default()
}

fn rule(id: &str, rate: u32, burst: u32) -> pb::RateLimitRule {
    pb::RateLimitRule {
        id: id.into(),
        endpoint: "sec.test.v1.Svc/Call".into(),
        key: vec!["client_id".into()],
        rate,
        per: "second".into(),
        burst,
        ..Default::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rule_ids(rt: &EdgeRuntime) -> Vec<String> {
    rt.limiter()
        .rules()
        .rules
        .iter()
        .map(|r| r.id.to_string())
        .collect()
}

async fn propagation(a_db: Db, b_db: Db) {
    let clock = ManualClock::new(start());
    let cfg = base_config();
    let (a, _) = runtime(&cfg, a_db, clock.clone()).await;
    let (b, _) = runtime(&cfg, b_db, clock.clone()).await;
    let ga = sec_edge::EdgeGrpc::new(a.clone());

    // A rule put on A applies on B after its next poll (not before).
    ga.put_rate_limit_rule(admin(pb::PutRateLimitRuleRequest {
        rule: Some(rule("svc.call", 5, 2)),
    }))
    .await
    .unwrap();
    assert!(rule_ids(&a).contains(&"svc.call".to_owned()));
    assert!(!rule_ids(&b).contains(&"svc.call".to_owned()));
    assert!(b.sync_once().await.unwrap());
    assert!(rule_ids(&b).contains(&"svc.call".to_owned()));
    assert!(!b.sync_once().await.unwrap(), "nothing changed: no reload");

    // A runtime rule overrides the configuration rule of the same id; deleting it
    // brings the configuration rule back, on both.
    let mut over = rule("login.ip", 1, 1);
    over.endpoint.clear();
    over.route = "/v1/login".into();
    over.key = vec!["ip".into()];
    ga.put_rate_limit_rule(admin(pb::PutRateLimitRuleRequest { rule: Some(over) }))
        .await
        .unwrap();
    b.sync_once().await.unwrap();
    let limit_of = |rt: &EdgeRuntime| {
        rt.limiter()
            .rules()
            .rules
            .iter()
            .find(|r| &*r.id == "login.ip")
            .map(|r| r.limit.rate)
    };
    assert_eq!(limit_of(&b), Some(1));
    let listed = ga
        .list_rate_limit_rules(admin(pb::ListRateLimitRulesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|r| r.source == "runtime"));
    ga.delete_rate_limit_rule(admin(pb::DeleteRateLimitRuleRequest {
        id: "login.ip".into(),
    }))
    .await
    .unwrap();
    b.sync_once().await.unwrap();
    assert_eq!(limit_of(&b), Some(10));

    // An IP deny put on A refuses on B after its poll.
    ga.put_ip_rule(admin(pb::PutIpRuleRequest {
        rule: Some(pb::IpRule {
            action: "deny".into(),
            network: "203.0.113.0/24".into(),
            scope: "route:/v1/login".into(),
            ..Default::default()
        }),
    }))
    .await
    .unwrap();
    assert_eq!(
        b.ip_control().check(ip("203.0.113.9"), None, "/v1/login"),
        Ok(())
    );
    b.sync_once().await.unwrap();
    assert_eq!(
        b.ip_control().check(ip("203.0.113.9"), None, "/v1/login"),
        Err(BlockReason::DenyList)
    );
    assert_eq!(
        b.ip_control().check(ip("203.0.113.9"), None, "/other"),
        Ok(())
    );

    // A temporary allow-list entry expires on every replica without another write.
    let exp = clock.now_us() + 30_000_000;
    ga.put_ip_rule(admin(pb::PutIpRuleRequest {
        rule: Some(pb::IpRule {
            action: "allow".into(),
            network: "198.51.100.0/24".into(),
            scope: "client:partner".into(),
            expires_at_us: exp,
            ..Default::default()
        }),
    }))
    .await
    .unwrap();
    b.sync_once().await.unwrap();
    assert_eq!(
        b.ip_control().check(ip("192.0.2.1"), Some("partner"), "/x"),
        Err(BlockReason::NotAllowed)
    );
    clock.advance(chrono::TimeDelta::seconds(31));
    assert!(b.sync_once().await.unwrap(), "an expiry triggers a reload");
    assert_eq!(
        b.ip_control().check(ip("192.0.2.1"), Some("partner"), "/x"),
        Ok(())
    );
}

trait NowUs {
    fn now_us(&self) -> i64;
}
impl NowUs for Arc<ManualClock> {
    fn now_us(&self) -> i64 {
        sec_common::clock::Clock::now(&**self).timestamp_micros()
    }
}

#[tokio::test]
async fn rule_and_list_changes_propagate_between_replicas_on_sqlite() {
    let (a, b) = sqlite_pair().await;
    propagation(a, b).await;
}

#[tokio::test]
async fn rule_and_list_changes_propagate_between_replicas_on_postgres() {
    let Some((a, b)) = postgres_pair().await else {
        return;
    };
    propagation(a, b).await;
}

#[tokio::test]
async fn bad_rules_and_networks_are_refused_naming_the_field_and_keep_the_old_set() {
    let (db, _) = sqlite_pair().await;
    let clock = ManualClock::new(start());
    let (rt, _) = runtime(&base_config(), db, clock).await;
    let g = sec_edge::EdgeGrpc::new(rt.clone());
    g.put_rate_limit_rule(admin(pb::PutRateLimitRuleRequest {
        rule: Some(rule("svc.call", 5, 2)),
    }))
    .await
    .unwrap();
    let before = rule_ids(&rt);
    let version = rt.store().version().await.unwrap();

    let cases: Vec<(pb::RateLimitRule, &str)> = vec![
        (rule("svc.call", 5, 0), "rule.limit.burst"),
        (
            pb::RateLimitRule {
                per: "fortnight".into(),
                ..rule("svc.call", 5, 2)
            },
            "rule.limit.per",
        ),
        (rule("Bad Id", 5, 2), "rule.id"),
        (
            pb::RateLimitRule {
                key: vec!["cookie".into()],
                ..rule("svc.other", 5, 2)
            },
            "rule.key[0]",
        ),
    ];
    for (r, field) in cases {
        let e = g
            .put_rate_limit_rule(admin(pb::PutRateLimitRuleRequest { rule: Some(r) }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(field_of(&e), field, "{e:?}");
    }
    let e = g
        .put_rate_limit_rule(admin(pb::PutRateLimitRuleRequest { rule: None }))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "rule");

    for (net, scope, field) in [
        ("10.0.0.1/8", "global", "rule.network"),
        ("300.1.1.1", "global", "rule.network"),
        ("10.0.0.0/8", "tenant:x", "rule.scope"),
        ("10.0.0.0/8", "route:no-slash", "rule.scope"),
    ] {
        let e = g
            .put_ip_rule(admin(pb::PutIpRuleRequest {
                rule: Some(pb::IpRule {
                    action: "deny".into(),
                    network: net.into(),
                    scope: scope.into(),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(field_of(&e), field, "{net} {scope}: {e:?}");
    }
    let e = g
        .put_ip_rule(admin(pb::PutIpRuleRequest {
            rule: Some(pb::IpRule {
                action: "block".into(),
                network: "10.0.0.0/8".into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "rule.action");

    // Nothing was written, nothing changed.
    assert_eq!(rt.store().version().await.unwrap(), version);
    assert_eq!(rule_ids(&rt), before);
    assert_eq!(rt.ip_control().check(ip("10.1.2.3"), None, "/"), Ok(()));

    // A corrupt stored rule (written behind the API's back) is ignored on reload, and
    // an invalid merged set keeps the current one.
    let v = rt.store().version().await.unwrap();
    rt.store()
        .put_rule(
            &StoredRule {
                id: "svc.call".into(),
                body: r#"{"id":"svc.call","match":{"endpoint":"x/y"},"key":["ip"],"limit":{"rate":1,"per":"second","burst":0},"shadow":false,"on_store_error":null}"#.into(),
                updated_at: 0,
            },
            v,
        )
        .await
        .unwrap();
    rt.sync_once().await.unwrap();
    assert_eq!(rule_ids(&rt), before);
    let burst = rt
        .limiter()
        .rules()
        .rules
        .iter()
        .find(|r| &*r.id == "svc.call")
        .map(|r| r.limit.burst);
    assert_eq!(burst, Some(2), "the previous valid set stays");
}

#[tokio::test]
async fn writes_are_compare_and_set_and_parallel_admins_never_both_win_on_one_version() {
    let (db, _) = sqlite_pair().await;
    let clock = ManualClock::new(start());
    let (rt, _) = runtime(&base_config(), db, clock).await;
    let v = rt.store().version().await.unwrap();
    let r = |id: &str| StoredRule {
        id: id.into(),
        body: "{}".into(),
        updated_at: 0,
    };
    let (ra, rb) = (r("a"), r("b"));
    let (x, y) = tokio::join!(rt.store().put_rule(&ra, v), rt.store().put_rule(&rb, v));
    let wins = [x.is_ok(), y.is_ok()].iter().filter(|w| **w).count();
    assert_eq!(wins, 1, "exactly one write on version {v} wins");
    assert!(matches!(x.err().or(y.err()), Some(StoreError::Conflict)));
    assert_eq!(rt.store().version().await.unwrap(), v + 1);
    assert!(matches!(
        rt.store().delete_rule("a", v).await,
        Err(StoreError::Conflict)
    ));

    // Through the API: parallel puts of different rules all end in a valid state, each
    // either applied or ABORTED.
    let g = Arc::new(sec_edge::EdgeGrpc::new(rt.clone()));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            g.put_rate_limit_rule(admin(pb::PutRateLimitRuleRequest {
                rule: Some(rule(&format!("p{i}"), 5, 2)),
            }))
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}"),
        }
    }
    assert!(ok >= 1);
    let stored = rt.store().load().await.unwrap();
    assert_eq!(
        stored
            .rules
            .iter()
            .filter(|r| r.id.starts_with('p'))
            .count(),
        ok
    );
}

#[tokio::test]
async fn repeated_failures_block_on_every_replica_until_unblocked_or_expired() {
    let (a_db, b_db) = sqlite_pair().await;
    let clock = ManualClock::new(start());
    let cfg = base_config();
    let (a, events) = runtime(&cfg, a_db, clock.clone()).await;
    let (b, _) = runtime(&cfg, b_db, clock.clone()).await;
    let bad = ip("192.0.2.50");
    assert_eq!(
        a.record_failure(bad, FailureReason::LoginFailure)
            .await
            .unwrap(),
        None
    );
    // Failures outside the window do not add up.
    clock.advance(chrono::TimeDelta::seconds(61));
    assert_eq!(
        a.record_failure(bad, FailureReason::LoginFailure)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        a.record_failure(bad, FailureReason::ClientAuthFailure)
            .await
            .unwrap(),
        None
    );
    let blocked = a
        .record_failure(bad, FailureReason::LoginFailure)
        .await
        .unwrap();
    assert_eq!(blocked, Some("192.0.2.50/32".parse().unwrap()));
    assert_eq!(
        a.ip_control().check(bad, None, "/v1/login"),
        Err(BlockReason::AutoBlock)
    );
    assert_eq!(a.ip_control().check(ip("192.0.2.51"), None, "/"), Ok(()));
    b.sync_once().await.unwrap();
    assert_eq!(
        b.ip_control().check(bad, None, "/"),
        Err(BlockReason::AutoBlock)
    );
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.r#type == "sec.ip.auto_blocked"
                && e.details.get("reason").map(String::as_str) == Some("login_failure"))
    );

    // Visible in ListIpRules (on the other replica), removable with UnblockIp there.
    let gb = sec_edge::EdgeGrpc::new(b.clone());
    let listed = gb
        .list_ip_rules(admin(pb::ListIpRulesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .rules;
    let block = listed
        .iter()
        .find(|r| r.reason == "auto_block:login_failure")
        .expect("the block is listed");
    assert_eq!(block.network, "192.0.2.50/32");
    assert_eq!(
        block.expires_at_us,
        clock.now_us() + 600_000_000,
        "expires block_secs after it was made"
    );
    let e = gb
        .unblock_ip(admin(pb::UnblockIpRequest {
            ip: "192.0.2.99".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let n = gb
        .unblock_ip(admin(pb::UnblockIpRequest {
            ip: "192.0.2.50".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(n, 1);
    assert_eq!(b.ip_control().check(bad, None, "/"), Ok(()));
    a.sync_once().await.unwrap();
    assert_eq!(a.ip_control().check(bad, None, "/"), Ok(()));

    // Blocked again, it expires by itself.
    for _ in 0..3 {
        a.record_failure(bad, FailureReason::LoginFailure)
            .await
            .unwrap();
    }
    assert_eq!(
        a.ip_control().check(bad, None, "/"),
        Err(BlockReason::AutoBlock)
    );
    clock.advance(chrono::TimeDelta::seconds(601));
    a.sync_once().await.unwrap();
    assert_eq!(a.ip_control().check(bad, None, "/"), Ok(()));
}

#[tokio::test]
async fn prefix_mode_blocks_the_whole_prefix() {
    let (db, _) = sqlite_pair().await;
    let clock = ManualClock::new(start());
    let mut cfg = base_config();
    cfg.auto_block.by_prefix = true;
    let (rt, _) = runtime(&cfg, db, clock).await;
    for last in 1..=3 {
        rt.record_failure(
            ip(&format!("198.51.100.{last}")),
            FailureReason::LoginFailure,
        )
        .await
        .unwrap();
    }
    assert_eq!(
        rt.ip_control().check(ip("198.51.100.200"), None, "/"),
        Err(BlockReason::AutoBlock)
    );
}

#[tokio::test]
async fn check_api_answers_limits_samples_events_and_feeds_stats() {
    let (db, _) = sqlite_pair().await;
    let clock = ManualClock::new(start());
    let mut cfg = base_config();
    cfg.ratelimit.rules.push(
        toml::from_str(
            r#"
id = "svc.call"
match = { endpoint = "sec.test.v1.Svc/Call" }
key = ["client_id"]
limit = { rate = 1, per = "second", burst = 2 }
"#,
        )
        .unwrap(),
    );
    let (rt, events) = runtime(&cfg, db, clock.clone()).await;
    let g = sec_edge::EdgeGrpc::new(rt.clone());
    let check = |client: &str| {
        as_caller(
            pb::CheckRateLimitRequest {
                endpoint: "sec.test.v1.Svc/Call".into(),
                descriptors: vec![
                    pb::Descriptor {
                        key: "client_id".into(),
                        value: client.into(),
                    },
                    pb::Descriptor {
                        key: "ip".into(),
                        value: "192.0.2.7".into(),
                    },
                ],
                hits: 0,
            },
            Caller::Service("session".into()),
        )
    };
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(
            g.check_rate_limit(check("app-1"))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_eq!(
        answers.iter().map(|a| a.allowed).collect::<Vec<_>>(),
        [true, true, false, false, false, false]
    );
    let refused = &answers[2];
    assert_eq!(refused.rules.len(), 1);
    assert_eq!(refused.rules[0].rule_id, "svc.call");
    assert!(refused.retry_after_ms > 0 && refused.retry_after_ms <= 1000);
    // Another key is independent.
    assert!(
        g.check_rate_limit(check("app-2"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );

    let exceeded = |evs: &Events| {
        evs.lock()
            .unwrap()
            .iter()
            .filter(|e| e.r#type == "sec.ratelimit.exceeded")
            .count()
    };
    assert_eq!(
        exceeded(&events),
        1,
        "one per rule and key per window, not per request"
    );
    let ev = events.lock().unwrap()[0].clone();
    assert!(
        !ev.details.values().any(|v| v.contains("app-1")),
        "no raw key"
    );

    // Over the limit in three consecutive windows: one sustained alert.
    for _ in 0..3 {
        clock.advance(chrono::TimeDelta::seconds(1));
        for _ in 0..4 {
            g.check_rate_limit(check("app-1")).await.unwrap();
        }
    }
    let sustained = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.r#type == "sec.ratelimit.sustained")
        .count();
    assert_eq!(sustained, 1);

    let stats = g
        .rate_limit_stats(admin(pb::RateLimitStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.rules[0].rule_id, "svc.call");
    assert_eq!(stats.keys.len(), 1, "only app-1 was limited");
    assert_eq!(stats.keys[0].key_hash.len(), 16);
    assert!(!stats.keys[0].key_hash.contains("app"));

    // Bad check requests name the field.
    let mut bad = check("app-1");
    bad.get_mut().descriptors[1].value = "not-an-ip".into();
    assert_eq!(
        field_of(&g.check_rate_limit(bad).await.unwrap_err()),
        "descriptors[1].value"
    );
    let mut bad = check("app-1");
    bad.get_mut().descriptors.push(pb::Descriptor {
        key: "client_id".into(),
        value: "again".into(),
    });
    assert_eq!(
        field_of(&g.check_rate_limit(bad).await.unwrap_err()),
        "descriptors[2].key"
    );
    let mut bad = check("app-1");
    bad.get_mut().hits = 1_000;
    assert_eq!(
        field_of(&g.check_rate_limit(bad).await.unwrap_err()),
        "hits"
    );
}

#[tokio::test]
async fn admin_rpcs_refuse_services_and_the_check_refuses_anonymous_callers() {
    let (db, _) = sqlite_pair().await;
    let (rt, _) = runtime(&base_config(), db, ManualClock::new(start())).await;
    let g = sec_edge::EdgeGrpc::new(rt.clone());
    let e = g
        .put_rate_limit_rule(as_caller(
            pb::PutRateLimitRuleRequest {
                rule: Some(rule("x", 1, 1)),
            },
            Caller::Service("session".into()),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = g
        .unblock_ip(as_caller(
            pb::UnblockIpRequest {
                ip: "192.0.2.1".into(),
            },
            Caller::Anonymous,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = g
        .check_rate_limit(as_caller(
            pb::CheckRateLimitRequest {
                endpoint: "a/b".into(),
                ..Default::default()
            },
            Caller::Anonymous,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

async fn call(app: &axum::Router, peer: &str, path: &str) -> http::StatusCode {
    use tower::ServiceExt as _;
    let mut req = http::Request::builder()
        .uri(path)
        .body(axum::body::Body::empty())
        .unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(
        format!("{peer}:40000")
            .parse::<std::net::SocketAddr>()
            .unwrap(),
    ));
    app.clone().oneshot(req).await.unwrap().status()
}

#[tokio::test]
async fn the_layer_samples_block_events_and_turns_a_4xx_flood_into_a_block() {
    let (db, _) = sqlite_pair().await;
    let clock = ManualClock::new(start());
    let mut cfg = base_config();
    cfg.ip.deny = vec!["203.0.113.0/24".into()];
    cfg.auto_block.flood_threshold = 5;
    let (rt, events) = runtime(&cfg, db, clock.clone()).await;
    let app = axum::Router::new()
        .route("/ok", axum::routing::get(|| async { "ok" }))
        .fallback(|| async { http::StatusCode::NOT_FOUND })
        .layer(rt.layer().unwrap());

    for _ in 0..5 {
        assert_eq!(
            call(&app, "203.0.113.4", "/ok").await,
            http::StatusCode::FORBIDDEN
        );
    }
    let blocked = |evs: &Events| {
        evs.lock()
            .unwrap()
            .iter()
            .filter(|e| e.r#type == "sec.ip.blocked")
            .map(|e| e.details.get("reason").cloned().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        blocked(&events),
        ["deny_list"],
        "sampled: one per address and reason"
    );
    clock.advance(chrono::TimeDelta::seconds(61));
    call(&app, "203.0.113.4", "/ok").await;
    assert_eq!(blocked(&events).len(), 2, "again after the sampling period");

    // 4xx answers from one address: blocked at the flood threshold.
    for _ in 0..5 {
        assert_eq!(
            call(&app, "192.0.2.9", "/missing").await,
            http::StatusCode::NOT_FOUND
        );
    }
    // The count runs in a spawned task: wait for its write (bounded, not a clock move).
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while rt.ip_control().check(ip("192.0.2.9"), None, "/ok").is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the flood block was written");
    assert_eq!(
        call(&app, "192.0.2.9", "/ok").await,
        http::StatusCode::FORBIDDEN
    );
    assert_eq!(call(&app, "192.0.2.10", "/ok").await, http::StatusCode::OK);
    assert!(blocked(&events).contains(&"auto_block".to_owned()));
    let stats = rt.ip_stats(300, 10);
    assert_eq!(stats.0[0], (ip("203.0.113.4"), 6));
}

#[test]
fn the_edge_section_parses_with_defaults_and_refuses_unknown_keys() {
    let cfg: EdgeConfig = toml::from_str(
        r#"
reload_interval_ms = 500
[ratelimit]
[[ratelimit.rules]]
id = "a"
match = { route = "/x" }
key = ["ip"]
limit = { rate = 1, per = "second", burst = 1 }
[geo]
degraded = "allow"
[auto_block]
threshold = 5
"#,
    )
    .unwrap();
    assert_eq!(cfg.reload_interval_ms, 500);
    assert_eq!(cfg.auto_block.threshold, 5);
    assert_eq!(cfg.auto_block.block_secs, 900);
    assert_eq!(cfg.ratelimit.rules.len(), 1);
    assert!(toml::from_str::<EdgeConfig>("[geo]\ndegraded = \"maybe\"").is_err());
    assert!(toml::from_str::<EdgeConfig>("reload_interval = 5").is_err());
}
