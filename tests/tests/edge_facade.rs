//! Edge protection on the facade, end to end: auth-svc serves sec-edge's layers in front
//! of the OAuth endpoints and `sec.edge.v1` next to `sec.auth.v1`.
//!
//! - Rate limits by verified client (HTTP Basic), per source address, with the IETF
//!   `RateLimit` fields and a 429 JSON body; a trusted client bypasses them.
//! - Failed client authentication brings an automatic block (403) that the admin API
//!   lists and removes.
//! - On PostgreSQL + Redis + NATS, two replicas share one limit: parallel callers spread
//!   over both never get more than rate + burst through, and a rule put through one
//!   replica applies on the other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sec_proto::auth::v1 as apb;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_proto::edge::v1 as epb;
use sec_proto::edge::v1::edge_service_client::EdgeServiceClient;
use sec_tests::{Backends, HttpReply, Seed, TestPlatform, http_request};

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

fn edge_config(text: &str) -> sec_edge::EdgeConfig {
    toml::from_str(text).unwrap()
}

fn with_edge(mut seed: Seed, text: &str) -> Seed {
    seed.config
        .set_section(auth_svc::EDGE_SECTION, edge_config(text))
        .unwrap();
    seed
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

async fn grant(addr: SocketAddr, id: &str, secret: &str) -> HttpReply {
    let auth = basic(id, secret);
    http_request(
        addr,
        "POST",
        "/token",
        &[FORM, ("Authorization", &auth)],
        b"grant_type=client_credentials",
    )
    .await
    .unwrap()
}

async fn client(tp: &TestPlatform, name: &str, trusted: bool) -> (String, String) {
    let mut admin =
        AuthServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap());
    let c = admin
        .create_client(apb::CreateClientRequest {
            client: Some(apb::Client {
                name: name.into(),
                r#type: apb::ClientType::Confidential as i32,
                token_endpoint_auth_method: "client_secret_basic".into(),
                grant_types: vec!["client_credentials".into()],
                trusted,
                ..apb::Client::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    (c.client.unwrap().client_id, c.client_secret)
}

fn edge_admin(
    tp: &TestPlatform,
) -> EdgeServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        sec_common::grpc::BearerToken,
    >,
> {
    EdgeServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap())
}

const EMBEDDED_EDGE: &str = r#"
[[ratelimit.rules]]
id = "token-per-client"
match = { route = "/token" }
key = ["client_id"]
limit = { rate = 1, per = "hour", burst = 3 }

[[ratelimit.rules]]
id = "jwks-per-ip"
match = { route = "/jwks" }
key = ["ip"]
limit = { rate = 1, per = "hour", burst = 5 }

[auto_block]
enabled = true
threshold = 4
window_secs = 300
block_secs = 900
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_bypass_and_auto_block_through_the_facade() {
    let seed = with_edge(
        TestPlatform::seed(Backends::Embedded).unwrap(),
        EMBEDDED_EDGE,
    );
    let tp = TestPlatform::start_with(seed, None).await;
    let http = tp.http;
    let (plain, plain_secret) = client(&tp, "plain", false).await;
    let (trusted, trusted_secret) = client(&tp, "trusted", true).await;

    // A verified client gets its burst, with the draft's fields on every answer...
    for left in (0..3).rev() {
        let r = grant(http, &plain, &plain_secret).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"token-per-client\";q=1;w=3600")
        );
        let current = r.header("ratelimit").unwrap();
        assert!(
            current.starts_with(&format!("\"token-per-client\";r={left};t=")),
            "{current}"
        );
    }
    // ...then 429 with Retry-After and a JSON error, before the handler runs.
    let r = grant(http, &plain, &plain_secret).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");

    // The trusted client is not limited, however often it asks.
    for _ in 0..6 {
        let r = grant(http, &trusted, &trusted_secret).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // A wrong secret is not the client: it does not spend (or claim) the client's quota.
    let r = grant(http, &trusted, "cs_not-the-secret").await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Per address: the JWKS endpoint allows its burst from one address.
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(
            http_request(http, "GET", "/jwks", &[], b"")
                .await
                .unwrap()
                .status,
        );
    }
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429]);

    // The limiter's admin view knows the rules and who was limited.
    let mut admin = edge_admin(&tp);
    let rules = admin
        .list_rate_limit_rules(epb::ListRateLimitRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules;
    let ids: Vec<_> = rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["token-per-client", "jwks-per-ip"]);
    let stats = admin
        .rate_limit_stats(epb::RateLimitStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats
            .rules
            .iter()
            .any(|r| r.rule_id == "jwks-per-ip" && r.limited == 2),
        "{stats:?}"
    );

    // Failed client authentication from one address: the wrong secret above was the
    // first; the fourth brings a block.
    for _ in 0..3 {
        let r = grant(http, &plain, "cs_wrong").await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    }
    let r = grant(http, &trusted, &trusted_secret).await;
    assert_eq!(
        r.status, 403,
        "blocked, even with good credentials: {}",
        r.body
    );
    let blocks: Vec<_> = admin
        .list_ip_rules(epb::ListIpRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules
        .into_iter()
        .filter(|r| r.id.starts_with("block:"))
        .collect();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0].reason, "auto_block:client_auth_failure");
    assert!(blocks[0].expires_at_us > 0);

    // An admin lifts it; the address is served again at once.
    let removed = admin
        .unblock_ip(epb::UnblockIpRequest {
            ip: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 1);
    let r = grant(http, &trusted, &trusted_secret).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The edge API is admin-only: a platform service may only ask CheckRateLimit.
    let mut as_token =
        EdgeServiceClient::with_interceptor(tp.channel("auth"), tp.as_service("token"));
    let denied = as_token
        .list_ip_rules(epb::ListIpRulesRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let (r, _) = tp.stop().await;
    r.unwrap();
}

const SHARED_EDGE: &str = r#"
reload_interval_ms = 200

[[ratelimit.rules]]
id = "jwks-shared"
match = { route = "/jwks" }
key = ["ip"]
limit = { rate = 1, per = "hour", burst = 10 }
on_store_error = "fail_closed"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_limit_on_redis() {
    let Some(seed) = TestPlatform::seed(Backends::Production) else {
        return;
    };
    let seed = with_edge(seed, SHARED_EDGE);
    let a = TestPlatform::start_with(seed.clone(), None).await;
    let b = TestPlatform::start_with(seed.clone(), None).await;

    // 40 callers at once, half on each replica, one address: rate + burst at most.
    let calls = (0..40).map(|i| {
        let addr = if i % 2 == 0 { a.http } else { b.http };
        tokio::spawn(async move {
            http_request(addr, "GET", "/jwks", &[], b"")
                .await
                .unwrap()
                .status
        })
    });
    let codes: Vec<u16> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok = codes.iter().filter(|c| **c == 200).count();
    let limited = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(ok + limited, 40, "{codes:?}");
    // The burst is 10; one more may have been released by the steady rate meanwhile.
    assert!((10..=11).contains(&ok), "{ok} got through: {codes:?}");

    // A rule put through replica A applies on replica B after its next sync.
    let mut admin = edge_admin(&a);
    admin
        .put_rate_limit_rule(epb::PutRateLimitRuleRequest {
            rule: Some(epb::RateLimitRule {
                id: "discovery-shared".into(),
                route: "/.well-known/openid-configuration".into(),
                key: vec!["ip".into()],
                rate: 1,
                per: "hour".into(),
                burst: 2,
                on_store_error: "fail_closed".into(),
                ..epb::RateLimitRule::default()
            }),
        })
        .await
        .unwrap();
    let path = "/.well-known/openid-configuration";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let status = http_request(b.http, "GET", path, &[], b"")
            .await
            .unwrap()
            .status;
        seen.push(status);
        if status == 429 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica B never applied the rule: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A's own requests share the same key in Redis: it is limited too.
    let r = http_request(a.http, "GET", path, &[], b"").await.unwrap();
    assert_eq!(r.status, 429, "{}", r.body);

    let (ra, _) = a.stop().await;
    let (rb, _) = b.stop().await;
    TestPlatform::cleanup(&seed).await;
    ra.unwrap();
    rb.unwrap();
}
