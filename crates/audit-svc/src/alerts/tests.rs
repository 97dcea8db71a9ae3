//! Alerts on both backends: windows and groups, redelivery, dedup while open, ack and
//! re-raise, parallel acks and parallel evaluators (replicas), webhooks (signature,
//! retries, giving up), and the raised event reaching the trail through ingest.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sec_common::clock::{Clock as _, ManualClock, SharedClock};
use sec_common::config::EventsConfig;
use sec_common::error::ErrorCode;
use sec_common::events::memory::MemoryTransport;
use sec_common::events::{Actor, ActorKind, EventBus, SecurityEvent, new_event, to_timestamp};
use sec_common::storage::Db;
use sec_testkit::{Backend, backend_url};

use super::engine::{AlertEngine, AlertMetrics};
use super::store::{AlertQuery, AlertStatus, AlertStore};
use super::webhook::{Deliverer, Webhook, verify_signature};
use super::*;
use crate::store::AuditStore;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .to_utc()
}

struct Ctx {
    name: &'static str,
    db: Db,
    events: Arc<dyn AuditStore>,
    alerts: Arc<dyn AlertStore>,
    clock: Arc<ManualClock>,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl Ctx {
    async fn close(self) {
        if let (Db::Postgres(pool), Some(schema)) = (&self.db, &self.schema) {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(pool)
                .await
                .unwrap();
        }
    }

    fn bus(&self) -> EventBus {
        EventBus::with_clock(
            Arc::new(MemoryTransport::new(10_000)),
            &EventsConfig::default(),
            self.clock.clone(),
        )
    }

    fn engine(&self, rules: Vec<Rule>, webhooks: &[&str], bus: &EventBus) -> AlertEngine {
        let metrics = AlertMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
            &rules,
        );
        AlertEngine::new(
            rules,
            webhooks.iter().map(|s| (*s).to_owned()).collect(),
            self.alerts.clone(),
            bus.clone(),
            self.clock.clone(),
            metrics,
        )
    }
}

async fn sqlite() -> Ctx {
    let dir = tempfile::tempdir().unwrap();
    let pool = sec_common::storage::connect_sqlite(&dir.path().join("audit.db"), 4)
        .await
        .unwrap();
    crate::MIGRATIONS.sqlite.run(&pool).await.unwrap();
    let clock = ManualClock::new(t0());
    let db = Db::Sqlite(pool);
    Ctx {
        name: "sqlite",
        events: crate::event_store(&db, clock.clone()),
        alerts: crate::alert_store(&db),
        db,
        clock,
        _dir: Some(dir),
        schema: None,
    }
}

async fn postgres() -> Option<Ctx> {
    let url = backend_url(Backend::Postgres)?;
    let schema = format!("audit_al{}", uuid::Uuid::new_v4().simple());
    let pool = sec_common::storage::connect_postgres(&url, &schema, 8)
        .await
        .unwrap();
    crate::MIGRATIONS.postgres.run(&pool).await.unwrap();
    let clock = ManualClock::new(t0());
    let db = Db::Postgres(pool);
    let events = crate::event_store(&db, clock.clone());
    // Partitions for the months the tests' clock moves through (the service creates
    // them ahead of its own clock).
    let months: Vec<chrono::NaiveDate> = (2..=4)
        .map(|m| chrono::NaiveDate::from_ymd_opt(2026, m, 1).unwrap())
        .collect();
    events.ensure_partitions(&months).await.unwrap();
    Some(Ctx {
        name: "postgres",
        events,
        alerts: crate::alert_store(&db),
        db,
        clock,
        _dir: None,
        schema: Some(schema),
    })
}

/// A fresh SQLite context, and a PostgreSQL one when available.
async fn backends() -> Vec<Ctx> {
    let mut v = vec![sqlite().await];
    v.extend(postgres().await);
    v
}

fn rule(name: &str, ty: &str, threshold: u32, window: u64, group: &str) -> Rule {
    RuleConfig {
        name: name.into(),
        event_type: ty.into(),
        threshold,
        window_seconds: window,
        group_by: group.into(),
        severity: "high".into(),
    }
    .compile()
    .unwrap()
}

fn login_rule() -> Rule {
    rule("login-failures", "sec.auth.login.failed", 5, 60, "actor_id")
}

/// A failed login of `user` at t0 + `secs`.
fn failed(user: &str, secs: i64) -> SecurityEvent {
    let at = t0() + TimeDelta::seconds(secs);
    let mut e = new_event(
        ManualClock::new(at).as_ref(),
        "auth",
        "sec.auth.login.failed",
    );
    e.actor = Some(Actor {
        kind: ActorKind::User as i32,
        id: user.into(),
    });
    e.subject = user.into();
    e.time = Some(to_timestamp(at));
    e
}

async fn store_and_evaluate(c: &Ctx, engine: &AlertEngine, batch: &[SecurityEvent]) -> usize {
    c.events.insert_batch(batch).await.unwrap();
    engine.evaluate(batch).await.unwrap().len()
}

async fn alerts_of(c: &Ctx, status: Option<AlertStatus>) -> Vec<store::Alert> {
    c.alerts
        .list(&AlertQuery {
            status,
            limit: 100,
            ..AlertQuery::default()
        })
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn threshold_inside_the_window_per_group_and_redelivery() {
    for c in backends().await {
        let bus = c.bus();
        let engine = c.engine(vec![login_rule()], &[], &bus);
        // 4 failures of alice in 4 s, 4 of bob: below the threshold.
        let first: Vec<_> = (0..4)
            .flat_map(|i| [failed("alice", i), failed("bob", i)])
            .collect();
        assert_eq!(
            store_and_evaluate(&c, &engine, &first).await,
            0,
            "{}",
            c.name
        );
        // A 5th for alice 70 s later: the first four are outside its window.
        let late = [failed("alice", 70)];
        assert_eq!(
            store_and_evaluate(&c, &engine, &late).await,
            0,
            "{}",
            c.name
        );
        // A 5th for bob inside his window: bob only.
        let bob5 = [failed("bob", 30)];
        assert_eq!(
            store_and_evaluate(&c, &engine, &bob5).await,
            1,
            "{}",
            c.name
        );
        let open = alerts_of(&c, Some(AlertStatus::Open)).await;
        assert_eq!(open.len(), 1);
        assert_eq!(
            (
                open[0].group_key.as_str(),
                open[0].count,
                open[0].rule.as_str()
            ),
            ("bob", 5, "login-failures")
        );
        assert_eq!(open[0].event_ids.len(), 5);
        assert_eq!(open[0].first_seen_us, (t0()).timestamp_micros());
        assert_eq!(
            open[0].last_seen_us,
            (t0() + TimeDelta::seconds(30)).timestamp_micros()
        );
        assert_eq!(engine.metrics.raised("login-failures"), 1);
        assert_eq!(engine.metrics.open(), 1);

        // Redelivery of everything (already stored): nothing new, nothing recounted.
        let all: Vec<_> = first.iter().chain(&late).chain(&bob5).cloned().collect();
        assert_eq!(c.events.insert_batch(&all).await.unwrap(), 0);
        assert!(engine.evaluate(&all).await.unwrap().is_empty());
        assert!(engine.evaluate(&all).await.unwrap().is_empty());
        let open = alerts_of(&c, None).await;
        assert_eq!(open.len(), 1, "{}: redelivery raises nothing", c.name);
        assert_eq!(
            open[0].count, 5,
            "{}: redelivery does not double count",
            c.name
        );
        assert_eq!(engine.metrics.raised("login-failures"), 1);

        // The raised event was published, with the alert's facts.
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let got = bus
            .fetch_all(100, Duration::from_millis(200))
            .await
            .unwrap();
        let raised: Vec<_> = got
            .deliveries
            .iter()
            .filter(|d| d.event.r#type == RAISED)
            .collect();
        assert_eq!(raised.len(), 1);
        let d = &raised[0].event.details;
        assert_eq!(d["alert_id"], open[0].id.to_string());
        assert_eq!(
            (
                d["rule"].as_str(),
                d["group"].as_str(),
                d["count"].as_str(),
                d["severity"].as_str()
            ),
            ("login-failures", "bob", "5", "high")
        );
        c.close().await;
    }
}

#[tokio::test]
async fn open_alert_is_updated_and_after_ack_a_new_one_is_raised() {
    for c in backends().await {
        let bus = c.bus();
        let engine = c.engine(vec![login_rule()], &[], &bus);
        let five: Vec<_> = (0..5).map(|i| failed("carol", i)).collect();
        assert_eq!(store_and_evaluate(&c, &engine, &five).await, 1);
        // Two more within the window: the open alert grows, nothing new is raised.
        let two = [failed("carol", 10), failed("carol", 11)];
        assert_eq!(store_and_evaluate(&c, &engine, &two).await, 0, "{}", c.name);
        let open = alerts_of(&c, None).await;
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].count, 7, "{}", c.name);
        assert_eq!(
            open[0].last_seen_us,
            (t0() + TimeDelta::seconds(11)).timestamp_micros()
        );
        assert_eq!(open[0].event_ids.len(), 7);
        let first = open[0].id;

        let admin = Actor {
            kind: ActorKind::User as i32,
            id: "admin".into(),
        };
        let acked = engine
            .acknowledge(first, admin.clone(), "looked at it")
            .await
            .unwrap();
        assert_eq!(acked.status, AlertStatus::Acknowledged);
        assert_eq!(acked.acknowledged_by.as_deref(), Some("admin"));
        assert_eq!(acked.note.as_deref(), Some("looked at it"));
        assert_eq!(engine.metrics.open(), 0);
        let again = engine
            .acknowledge(first, admin.clone(), "")
            .await
            .unwrap_err();
        assert_eq!(again.code, ErrorCode::Aborted);
        let missing = engine
            .acknowledge(uuid::Uuid::new_v4(), admin.clone(), "")
            .await
            .unwrap_err();
        assert_eq!(missing.code, ErrorCode::NotFound);

        // One more failure: the window holds 8, but 7 were covered by the acknowledged
        // alert, so no new alert yet.
        assert_eq!(
            store_and_evaluate(&c, &engine, &[failed("carol", 20)]).await,
            0
        );
        // Four more: five new ones, a new alert.
        let four: Vec<_> = (21..25).map(|i| failed("carol", i)).collect();
        assert_eq!(
            store_and_evaluate(&c, &engine, &four).await,
            1,
            "{}",
            c.name
        );
        let open = alerts_of(&c, Some(AlertStatus::Open)).await;
        assert_eq!(open.len(), 1);
        assert_ne!(open[0].id, first);
        assert_eq!(open[0].count, 5);
        assert_eq!(alerts_of(&c, None).await.len(), 2);
        assert_eq!(engine.metrics.raised("login-failures"), 2);

        // The acknowledgement event names the actor.
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let got = bus
            .fetch_all(100, Duration::from_millis(200))
            .await
            .unwrap();
        let ack: Vec<_> = got
            .deliveries
            .iter()
            .filter(|d| d.event.r#type == ACKNOWLEDGED)
            .collect();
        assert_eq!(ack.len(), 1);
        assert_eq!(ack[0].event.actor.as_ref().unwrap().id, "admin");
        assert_eq!(ack[0].event.details["alert_id"], first.to_string());
        c.close().await;
    }
}

#[tokio::test]
async fn parallel_acknowledgements_exactly_one_wins() {
    for c in backends().await {
        let bus = c.bus();
        let engine = Arc::new(c.engine(vec![login_rule()], &[], &bus));
        let five: Vec<_> = (0..5).map(|i| failed("dave", i)).collect();
        assert_eq!(store_and_evaluate(&c, &engine, &five).await, 1);
        let id = alerts_of(&c, None).await[0].id;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let actor = Actor {
                        kind: ActorKind::User as i32,
                        id: format!("admin{i}"),
                    };
                    engine.acknowledge(id, actor, "mine").await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => {
                    won += 1;
                    assert_eq!(a.status, AlertStatus::Acknowledged);
                }
                Err(e) => assert_eq!(e.code, ErrorCode::Aborted, "{}: {e:?}", c.name),
            }
        }
        assert_eq!(won, 1, "{}", c.name);
        c.close().await;
    }
}

#[tokio::test]
async fn parallel_replicas_raise_once() {
    for c in backends().await {
        let bus = c.bus();
        // Two replicas, each with its own engine, evaluating the same committed batch.
        let replicas: Vec<_> = (0..4)
            .map(|_| Arc::new(c.engine(vec![login_rule()], &["hook"], &bus)))
            .collect();
        let five: Vec<_> = (0..5).map(|i| failed("erin", i)).collect();
        c.events.insert_batch(&five).await.unwrap();
        let tasks: Vec<_> = replicas
            .iter()
            .map(|e| {
                let (e, five) = (e.clone(), five.clone());
                tokio::spawn(async move { e.evaluate(&five).await.unwrap().len() })
            })
            .collect();
        let mut raised = 0;
        for t in tasks {
            raised += t.await.unwrap();
        }
        assert_eq!(raised, 1, "{}", c.name);
        let all = alerts_of(&c, None).await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].count, 5);
        assert_eq!(all[0].event_ids.len(), 5);
        let deliveries = c.alerts.deliveries(all[0].id).await.unwrap();
        assert_eq!(deliveries.len(), 1, "one delivery per webhook, queued once");
        c.close().await;
    }
}

#[tokio::test]
async fn prefix_rules_and_detail_groups() {
    for c in backends().await {
        let bus = c.bus();
        let by_client = rule(
            "reuse-by-client",
            "sec.token.refresh.*",
            2,
            300,
            "details.client_id",
        );
        let engine = c.engine(vec![by_client], &[], &bus);
        let ev = |client: &str, secs: i64| {
            let at = t0() + TimeDelta::seconds(secs);
            let mut e = new_event(
                ManualClock::new(at).as_ref(),
                "token",
                "sec.token.refresh.reuse_detected",
            );
            e.details.insert("client_id".into(), client.into());
            e
        };
        let batch = [ev("c1", 0), ev("c2", 1), ev("c1", 2)];
        assert_eq!(
            store_and_evaluate(&c, &engine, &batch).await,
            1,
            "{}",
            c.name
        );
        let a = &alerts_of(&c, None).await[0];
        assert_eq!((a.group_key.as_str(), a.count), ("c1", 2));
        c.close().await;
    }
}

/// The group value computed from a batch's event equals the store's form of the same
/// column (PostgreSQL `host(inet)`, SQLite text), for IPv4, IPv6 and mapped addresses.
#[tokio::test]
async fn address_groups_match_the_stored_form() {
    for c in backends().await {
        let bus = c.bus();
        let engine = c.engine(
            vec![rule(
                "by-address",
                "sec.auth.login.failed",
                2,
                60,
                "ip_address",
            )],
            &[],
            &bus,
        );
        let at = |ip: &str, secs: i64| {
            let mut e = failed("x", secs);
            e.source_ip = ip.into();
            e
        };
        let batch = [
            at("192.0.2.7", 0),
            at("192.0.2.7", 1),
            at("2001:0db8:0000:0000:0000:0000:0000:0001", 2),
            at("2001:db8::1", 3),
            at("::ffff:198.51.100.1", 4),
            at("::ffff:198.51.100.1", 5),
            at("not-an-ip", 6),
            at("not-an-ip", 7),
        ];
        assert_eq!(
            store_and_evaluate(&c, &engine, &batch).await,
            3,
            "{}",
            c.name
        );
        let mut groups: Vec<_> = alerts_of(&c, None)
            .await
            .into_iter()
            .map(|a| (a.group_key, a.count))
            .collect();
        groups.sort();
        assert_eq!(
            groups,
            [
                ("192.0.2.7".to_owned(), 2),
                ("2001:db8::1".to_owned(), 2),
                ("::ffff:198.51.100.1".to_owned(), 2)
            ],
            "{}",
            c.name
        );
        c.close().await;
    }
}

// ---------------------------------------------------------------------------- webhooks

/// What the receiver got: headers and raw body of each request.
type Requests = Arc<Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

#[derive(Clone, Default)]
struct Receiver {
    script: Arc<Mutex<VecDeque<u16>>>,
    got: Requests,
}

async fn receiver(script: &[u16]) -> (String, Receiver) {
    let r = Receiver {
        script: Arc::new(Mutex::new(script.iter().copied().collect())),
        ..Receiver::default()
    };
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(r): axum::extract::State<Receiver>,
                 headers: axum::http::HeaderMap,
                 body: axum::body::Bytes| async move {
                    r.got.lock().unwrap().push((headers, body.to_vec()));
                    let code = r.script.lock().unwrap().pop_front().unwrap_or(200);
                    axum::http::StatusCode::from_u16(code).unwrap()
                },
            ),
        )
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), r)
}

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

fn deliverer(c: &Ctx, engine: &AlertEngine, url: &str) -> Deliverer {
    Deliverer::new(
        vec![Webhook::for_test("ops", url, SECRET)],
        webhook::http_client().unwrap(),
        c.alerts.clone(),
        c.clock.clone() as SharedClock,
        engine.metrics.clone(),
        engine.wake.clone(),
    )
}

async fn raise_one(c: &Ctx, engine: &AlertEngine, user: &str) -> store::Alert {
    let five: Vec<_> = (0..5).map(|i| failed(user, i)).collect();
    assert_eq!(store_and_evaluate(c, engine, &five).await, 1);
    alerts_of(c, None).await.remove(0)
}

#[tokio::test]
async fn webhook_is_signed_and_retried_until_delivered() {
    for c in backends().await {
        let bus = c.bus();
        let engine = c.engine(vec![login_rule()], &["ops"], &bus);
        let (url, recv) = receiver(&[503, 503]).await;
        let worker = deliverer(&c, &engine, &url);
        let alert = raise_one(&c, &engine, "frank").await;

        // Attempt 1: 503, retried about a second later.
        assert_eq!(worker.tick().await.unwrap(), 1);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        assert_eq!(
            (d[0].status.as_str(), d[0].attempts),
            ("pending", 1),
            "{}",
            c.name
        );
        assert_eq!(d[0].last_error.as_deref(), Some("HTTP 503"));
        let wait = d[0].next_attempt_us - c.clock.now().timestamp_micros();
        assert!((500_000..=1_000_000).contains(&wait), "{wait}");
        assert_eq!(worker.tick().await.unwrap(), 0, "not due yet");
        // Attempt 2 (503, then 1-2 s), attempt 3 delivered.
        c.clock.advance(TimeDelta::seconds(1));
        assert_eq!(worker.tick().await.unwrap(), 1);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        let wait = d[0].next_attempt_us - c.clock.now().timestamp_micros();
        assert!((1_000_000..=2_000_000).contains(&wait), "{wait}");
        c.clock.advance(TimeDelta::seconds(2));
        assert_eq!(worker.tick().await.unwrap(), 1);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        assert_eq!(
            (d[0].status.as_str(), d[0].attempts),
            ("delivered", 3),
            "{}",
            c.name
        );
        c.clock.advance(TimeDelta::seconds(600));
        assert_eq!(worker.tick().await.unwrap(), 0, "delivered is final");
        assert_eq!(engine.metrics.deliveries("retry"), 2);
        assert_eq!(engine.metrics.deliveries("delivered"), 1);

        // Three identical, signed requests; the receiver verifies each.
        let got = recv.got.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        let now = c.clock.now().timestamp();
        for (headers, body) in &got {
            assert_eq!(
                headers["x-sec-delivery"].to_str().unwrap(),
                d[0].id.to_string()
            );
            let sig = headers["x-sec-signature"].to_str().unwrap();
            assert!(verify_signature(SECRET, sig, body, now, 3600), "{sig}");
            assert!(!verify_signature(
                b"another secret of at least 32 bytes!",
                sig,
                body,
                now,
                3600
            ));
            let json: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(json["alert"]["id"], alert.id.to_string());
            assert_eq!(json["alert"]["rule"], "login-failures");
            assert_eq!(json["alert"]["group"], "frank");
            assert_eq!(json["delivery_id"], d[0].id.to_string());
        }
        c.close().await;
    }
}

#[tokio::test]
async fn webhook_gives_up_on_4xx_and_after_ten_attempts() {
    for c in backends().await {
        let bus = c.bus();
        let engine = c.engine(vec![login_rule()], &["ops"], &bus);
        let (url, recv) = receiver(&[404]).await;
        let worker = deliverer(&c, &engine, &url);
        let alert = raise_one(&c, &engine, "gina").await;
        assert_eq!(worker.tick().await.unwrap(), 1);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        assert_eq!(
            (d[0].status.as_str(), d[0].attempts),
            ("failed", 1),
            "{}",
            c.name
        );
        c.clock.advance(TimeDelta::seconds(3600));
        assert_eq!(worker.tick().await.unwrap(), 0, "failed is final");
        assert_eq!(recv.got.lock().unwrap().len(), 1);
        assert_eq!(engine.metrics.deliveries("failed"), 1);

        // Always 429: ten attempts, then given up.
        let (url, recv) = receiver(&[429; 20]).await;
        let worker = deliverer(&c, &engine, &url);
        let alert = raise_one(&c, &engine, "hank").await;
        for _ in 0..10 {
            assert_eq!(worker.tick().await.unwrap(), 1);
            c.clock.advance(TimeDelta::seconds(301));
        }
        assert_eq!(worker.tick().await.unwrap(), 0);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        assert_eq!(
            (d[0].status.as_str(), d[0].attempts),
            ("failed", 10),
            "{}",
            c.name
        );
        assert!(d[0].last_error.as_deref().unwrap().contains("gave up"));
        assert_eq!(recv.got.lock().unwrap().len(), 10);
        c.close().await;
    }
}

#[tokio::test]
async fn unreachable_webhook_is_retried_and_a_restarted_worker_resumes() {
    for c in backends().await {
        let bus = c.bus();
        let engine = c.engine(vec![login_rule()], &["ops"], &bus);
        // Nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let worker = deliverer(&c, &engine, &format!("http://127.0.0.1:{port}/hook"));
        let alert = raise_one(&c, &engine, "ivan").await;
        assert_eq!(worker.tick().await.unwrap(), 1);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        assert_eq!(
            (d[0].status.as_str(), d[0].attempts),
            ("pending", 1),
            "{}",
            c.name
        );
        assert_eq!(d[0].last_error.as_deref(), Some("cannot connect"));
        drop(worker);
        // "Restart": a new worker on the same table, the receiver now up.
        let (url, recv) = receiver(&[]).await;
        let worker = deliverer(&c, &engine, &url);
        c.clock.advance(TimeDelta::seconds(2));
        assert_eq!(worker.tick().await.unwrap(), 1);
        let d = c.alerts.deliveries(alert.id).await.unwrap();
        assert_eq!(
            (d[0].status.as_str(), d[0].attempts),
            ("delivered", 2),
            "{}",
            c.name
        );
        assert_eq!(recv.got.lock().unwrap().len(), 1);
        c.close().await;
    }
}

// ---------------------------------------------------------------------------- ingest

/// Through the real ingest loop: five failed logins raise an alert, and its
/// `sec.audit.alert.raised` comes back over the bus into the trail, where it raises
/// nothing (no rule may watch alert events).
#[tokio::test]
async fn raised_event_reaches_the_trail_through_ingest() {
    for c in backends().await {
        let bus = c.bus();
        let everything = rule("everything-auth", "sec.auth.*", 1, 60, "service");
        let engine = Arc::new(c.engine(vec![login_rule(), everything], &[], &bus));
        let metrics = crate::pipeline::IngestMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(crate::pipeline::run(
            crate::pipeline::Ingest {
                bus: bus.clone(),
                store: c.events.clone(),
                dead_letters: crate::dead_letter_store(&c.db, c.clock.clone()),
                metrics,
                clock: c.clock.clone(),
                limits: crate::pipeline::Limits {
                    subject_prefix: EventsConfig::default().subject_prefix,
                    max_details_bytes: 16 * 1024,
                },
                sensitive: None,
                alerts: Some(engine.clone()),
            },
            stop.clone(),
        ));
        for i in 0..5 {
            bus.publish(failed("judy", i)).unwrap();
        }
        let mut stored = Vec::new();
        for _ in 0..100 {
            stored = c
                .events
                .list(&crate::store::EventQuery {
                    event_type: Some(RAISED.into()),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
                .0;
            if stored.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            stored.len(),
            2,
            "{}: both rules' raised events are in the trail",
            c.name
        );
        let rules: std::collections::BTreeSet<_> =
            stored.iter().map(|e| e.details["rule"].clone()).collect();
        assert_eq!(
            rules.into_iter().collect::<Vec<_>>(),
            ["everything-auth", "login-failures"]
        );
        // The alert events themselves raised nothing more.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(alerts_of(&c, None).await.len(), 2, "{}", c.name);
        stop.cancel();
        task.await.unwrap();
        c.close().await;
    }
}

#[tokio::test]
async fn monitor_reports_open_alerts_dead_letters_and_the_chain() {
    let c = sqlite().await;
    let bus = c.bus();
    let engine = Arc::new(c.engine(vec![login_rule()], &[], &bus));
    raise_one(&c, &engine, "kim").await;
    let dead_letters = crate::dead_letter_store(&c.db, c.clock.clone());
    dead_letters
        .record(&crate::store::dead_letter::DeadLetter::new(
            sec_common::events::DeadLetterReason::TooLarge,
            "big",
            None,
            None,
            Some("s:1".into()),
            b"xx",
            1024,
        ))
        .await
        .unwrap();
    let monitor = api::Monitor {
        engine: engine.clone(),
        dead_letters,
        ingest: crate::pipeline::IngestMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
        ),
        clock: c.clock.clone(),
    };
    let m = monitor.get_monitor(c.events.as_ref()).await.unwrap();
    assert_eq!(m.open_alerts, 1);
    assert_eq!(m.newest_open.len(), 1);
    assert_eq!(m.newest_open[0].group, "kim");
    assert_eq!(m.chain_head_seq, 5);
    assert_eq!(m.checkpoint_age_seconds, None);
    let too_large = m
        .dead_letters
        .iter()
        .find(|d| d.reason == "too_large")
        .unwrap();
    assert_eq!(too_large.count, 1);

    // ListAlerts pages and filters; AcknowledgeAlert validates its id.
    raise_one(&c, &engine, "lee").await;
    let page = monitor
        .list_alerts(&sec_proto::audit::v1::ListAlertsRequest {
            page: Some(sec_proto::common::v1::PageRequest {
                page_size: 1,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.alerts.len(), 1);
    let token = page.page.unwrap().next_page_token;
    assert!(!token.is_empty());
    let rest = monitor
        .list_alerts(&sec_proto::audit::v1::ListAlertsRequest {
            page: Some(sec_proto::common::v1::PageRequest {
                page_size: 1,
                page_token: token,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.alerts.len(), 1);
    assert_ne!(rest.alerts[0].id, page.alerts[0].id);
    for bad in [
        sec_proto::audit::v1::ListAlertsRequest {
            rule: "Bad Rule".into(),
            ..Default::default()
        },
        sec_proto::audit::v1::ListAlertsRequest {
            status: 9,
            ..Default::default()
        },
    ] {
        assert_eq!(
            monitor.list_alerts(&bad).await.unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }
    let acked = monitor
        .list_alerts(&sec_proto::audit::v1::ListAlertsRequest {
            status: sec_proto::audit::v1::AlertStatus::Acknowledged as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(acked.alerts.is_empty());
    let err = monitor
        .acknowledge(
            &sec_proto::audit::v1::AcknowledgeAlertRequest {
                id: "nope".into(),
                note: String::new(),
            },
            Actor::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    c.close().await;
}

// ---------------------------------------------------------------------------- config

#[test]
fn default_rules_are_present_and_valid() {
    let cfg = AlertsConfig::default();
    let rules = cfg.rules().unwrap();
    let names: Vec<_> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["login-failures", "refresh-reuse", "key-deleted"]);
    assert_eq!(rules[0].threshold, 5);
    assert_eq!(rules[0].group, GroupBy::ActorId);
    assert_eq!(rules[1].severity, "critical");
    assert!(cfg.validate().is_ok());
}

#[test]
fn bad_rules_and_webhooks_are_refused() {
    let ok = RuleConfig {
        name: "r".into(),
        event_type: "sec.auth.login.failed".into(),
        threshold: 1,
        window_seconds: 60,
        group_by: "actor_id".into(),
        severity: "low".into(),
    };
    let cases: Vec<(RuleConfig, &str)> = vec![
        (
            RuleConfig {
                name: "Bad".into(),
                ..ok.clone()
            },
            "name",
        ),
        (
            RuleConfig {
                name: "a".repeat(65),
                ..ok.clone()
            },
            "name",
        ),
        (
            RuleConfig {
                event_type: "sec.audit.alert.raised".into(),
                ..ok.clone()
            },
            "event_type",
        ),
        (
            RuleConfig {
                event_type: "sec.audit.*".into(),
                ..ok.clone()
            },
            "event_type",
        ),
        (
            RuleConfig {
                event_type: "sec.*".into(),
                ..ok.clone()
            },
            "event_type",
        ),
        (
            RuleConfig {
                event_type: "sec.audit.alert.r*".into(),
                ..ok.clone()
            },
            "event_type",
        ),
        (
            RuleConfig {
                event_type: "sec.auth.login.fialed".into(),
                ..ok.clone()
            },
            "event_type",
        ),
        (
            RuleConfig {
                event_type: "sec.*.x".into(),
                ..ok.clone()
            },
            "event_type",
        ),
        (
            RuleConfig {
                threshold: 0,
                ..ok.clone()
            },
            "threshold",
        ),
        (
            RuleConfig {
                window_seconds: 0,
                ..ok.clone()
            },
            "window_seconds",
        ),
        (
            RuleConfig {
                window_seconds: 86_401,
                ..ok.clone()
            },
            "window_seconds",
        ),
        (
            RuleConfig {
                group_by: "user".into(),
                ..ok.clone()
            },
            "group_by",
        ),
        (
            RuleConfig {
                group_by: "details.a b".into(),
                ..ok.clone()
            },
            "group_by",
        ),
        (
            RuleConfig {
                group_by: "details.".into(),
                ..ok.clone()
            },
            "group_by",
        ),
        (
            RuleConfig {
                severity: "urgent".into(),
                ..ok.clone()
            },
            "severity",
        ),
    ];
    for (r, field) in cases {
        let (k, _) = r.compile().unwrap_err();
        assert_eq!(k, field, "{r:?}");
    }
    assert!(
        RuleConfig {
            event_type: "sec.auth.*".into(),
            group_by: "details.client_id".into(),
            ..ok.clone()
        }
        .compile()
        .is_ok()
    );
    let dup = AlertsConfig {
        rules: vec![ok.clone(), ok.clone()],
        webhooks: Vec::new(),
    };
    assert_eq!(dup.validate().unwrap_err().0, "rules[1].name");

    let hook = |url: &str| WebhookConfig {
        name: "ops".into(),
        url: url.into(),
        secret_file: "/run/secrets/hook".into(),
        timeout_seconds: 10,
    };
    for good in [
        "https://hooks.example.com/x",
        "http://127.0.0.1:9000/h",
        "http://[::1]/h",
        "http://localhost/h",
    ] {
        assert!(hook(good).check().is_ok(), "{good}");
    }
    for bad in [
        "http://hooks.example.com/x",
        "ftp://127.0.0.1/",
        "https://u:p@example.com/",
        "not a url",
    ] {
        assert_eq!(hook(bad).check().unwrap_err().0, "url", "{bad}");
    }
    let cfg = AlertsConfig {
        rules: Vec::new(),
        webhooks: vec![hook("https://a.example/"), hook("https://b.example/")],
    };
    assert_eq!(cfg.validate().unwrap_err().0, "webhooks[1].name");
    let cfg = AlertsConfig {
        rules: Vec::new(),
        webhooks: vec![WebhookConfig {
            timeout_seconds: 0,
            ..hook("https://a.example/")
        }],
    };
    assert_eq!(cfg.validate().unwrap_err().0, "webhooks[0].timeout_seconds");
}

#[test]
fn section_is_read_from_toml_and_a_short_secret_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "too short\n").unwrap();
    let toml = format!(
        r#"
[audit.alerts]
[[audit.alerts.rules]]
name = "client-failures"
event_type = "sec.auth.client.auth_failed"
threshold = 3
window_seconds = 300
group_by = "details.client_id"
severity = "medium"

[[audit.alerts.webhooks]]
name = "ops"
url = "https://hooks.example.com/sec"
secret_file = "{}"
"#,
        secret.display()
    );
    let path = dir.path().join("sec.toml");
    std::fs::write(&path, toml).unwrap();
    let specs = [&crate::SPEC];
    let cfg = sec_common::spec::load_config(
        Some(&path),
        &std::collections::BTreeMap::<String, String>::new(),
        &specs,
    )
    .unwrap();
    let audit = cfg.section::<crate::AuditConfig>("audit").unwrap();
    let rules = audit.alerts.rules().unwrap();
    assert_eq!(rules.len(), 1, "listing rules replaces the defaults");
    assert_eq!(rules[0].group, GroupBy::Detail("client_id".into()));
    assert_eq!(audit.alerts.webhooks[0].timeout_seconds, 10);
    let err = Webhook::load(&audit.alerts.webhooks[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("fewer than 32 bytes"), "{err}");
    assert!(
        !err.contains("too short"),
        "the secret is never in a message"
    );
    std::fs::write(&secret, format!("{}\n", "s".repeat(40))).unwrap();
    assert!(Webhook::load(&audit.alerts.webhooks[0]).is_ok());

    // A rule on the alerts themselves is refused at load, with its key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[audit.alerts.rules]]\nname = \"loop\"\nevent_type = \"sec.audit.*\"\nthreshold = 1\nwindow_seconds = 60\ngroup_by = \"subject\"\nseverity = \"low\"\n",
    )
    .unwrap();
    let err = sec_common::spec::load_config(
        Some(&bad),
        &std::collections::BTreeMap::<String, String>::new(),
        &specs,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("audit.alerts.rules[0].event_type"), "{err}");
}
