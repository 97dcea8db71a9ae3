//! The tower layer on an axum router: 429 with Retry-After, RateLimit fields and a JSON
//! body; 403 for denied addresses; fields on success; client IP behind trusted proxies;
//! the host's identity extension.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use http::{Request, StatusCode};
use sec_common::clock::ManualClock;
use sec_edge::layer::{ClientIp, EdgeIdentity, EdgeLayer, EdgeState};
use sec_edge::limiter::{EdgeMetrics, Limiter, LimiterOptions};
use sec_edge::rules::{RuleSet, StoreKind};
use sec_edge::{ClientIpResolver, IpControl, IpListsConfig, IpTables};
use tower::ServiceExt as _;

const RULES: &str = r#"
    [[rules]]
    id = "login"
    match = { route = "/v1/login", methods = ["POST"] }
    key = ["ip"]
    limit = { rate = 10, per = "minute", burst = 2 }

    [[rules]]
    id = "per-client"
    match = { route_prefix = "/v1/" }
    key = ["client_id"]
    limit = { rate = 100, per = "hour", burst = 50 }

    [[rules]]
    id = "shadowed"
    match = { route_prefix = "/v1/" }
    key = ["ip"]
    limit = { rate = 1, per = "day", burst = 1 }
    shadow = true
"#;

struct App {
    router: Router,
    limiter: Arc<Limiter>,
}

fn app(headers_on_success: bool) -> App {
    let clock = ManualClock::new(
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    );
    let limiter = Arc::new(
        Limiter::in_process(
            RuleSet::from_toml(RULES, StoreKind::InProcess).unwrap(),
            &LimiterOptions::default(),
            clock,
            EdgeMetrics::default(),
        )
        .unwrap(),
    );
    let ip = Arc::new(IpControl::new(
        IpTables::build(&IpListsConfig {
            deny: vec!["203.0.113.0/24".into()],
            ..Default::default()
        })
        .unwrap(),
    ));
    let state = EdgeState {
        resolver: ClientIpResolver::new(&["10.0.0.0/8".into()]).unwrap(),
        ip,
        limiter: limiter.clone(),
        headers_on_success,
        hooks: None,
    };
    let router =
        Router::new()
            .route("/v1/login", post(|| async { "ok" }))
            .route(
                "/v1/whoami",
                get(
                    |axum::Extension(ClientIp(ip)): axum::Extension<ClientIp>| async move {
                        ip.to_string()
                    },
                ),
            )
            .layer(EdgeLayer::new(state));
    App { router, limiter }
}

fn request(method: &str, path: &str, peer: &str, xff: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(x) = xff {
        b = b.header("x-forwarded-for", x);
    }
    let mut r = b.body(Body::empty()).unwrap();
    let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
    r.extensions_mut().insert(ConnectInfo(peer));
    r
}

async fn body_json(resp: axum::response::Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn header(resp: &axum::response::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn limited_requests_get_429_with_retry_after_ratelimit_fields_and_json() {
    let a = app(true);
    for i in 0..2 {
        let resp = a
            .router
            .clone()
            .oneshot(request("POST", "/v1/login", "192.0.2.1", None))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        // Fields on success: enforcing rules only (no shadow rule); per-client does not
        // apply to an anonymous request.
        assert_eq!(
            header(&resp, "ratelimit-policy").unwrap(),
            "\"login\";q=10;w=60"
        );
        assert_eq!(
            header(&resp, "ratelimit").unwrap(),
            format!("\"login\";r={};t={}", 1 - i, 6 * (i + 1))
        );
    }
    let resp = a
        .router
        .clone()
        .oneshot(request("POST", "/v1/login", "192.0.2.1", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&resp, "retry-after").unwrap(), "6");
    assert_eq!(
        header(&resp, "ratelimit-policy").unwrap(),
        "\"login\";q=10;w=60"
    );
    assert_eq!(header(&resp, "ratelimit").unwrap(), "\"login\";r=0;t=12");
    assert_eq!(
        body_json(resp).await,
        serde_json::json!({"error": "rate_limited", "retry_after": 6})
    );
    // Another client address is unaffected.
    let resp = a
        .router
        .clone()
        .oneshot(request("POST", "/v1/login", "192.0.2.2", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(a.limiter.metrics().rule_count("login", "limited"), 1);
}

#[tokio::test]
async fn success_headers_are_configurable() {
    let a = app(false);
    let resp = a
        .router
        .clone()
        .oneshot(request("POST", "/v1/login", "192.0.2.1", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "ratelimit").is_none());
    assert!(header(&resp, "ratelimit-policy").is_none());
}

#[tokio::test]
async fn denied_addresses_get_403_json_also_behind_a_trusted_proxy() {
    let a = app(true);
    let resp = a
        .router
        .clone()
        .oneshot(request("POST", "/v1/login", "203.0.113.9", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        body_json(resp).await,
        serde_json::json!({"error": "ip_denied"})
    );
    // Through the trusted proxy, the forwarded client address decides.
    let resp = a
        .router
        .clone()
        .oneshot(request(
            "GET",
            "/v1/whoami",
            "10.0.0.5",
            Some("203.0.113.9"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A spoofed header from an untrusted peer neither blocks nor hides it.
    let resp = a
        .router
        .clone()
        .oneshot(request(
            "GET",
            "/v1/whoami",
            "192.0.2.77",
            Some("203.0.113.9"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
    assert_eq!(
        &bytes[..],
        b"192.0.2.77",
        "handlers see the resolved address"
    );
    assert_eq!(a.limiter.metrics().ip_blocked_count("deny_list"), 2);
}

#[tokio::test]
async fn the_host_identity_extension_keys_client_rules_and_trusted_clients_bypass() {
    let a = app(true);
    let with_identity = |ident: EdgeIdentity, ip: &str| {
        let mut r = request("POST", "/v1/login", ip, None);
        r.extensions_mut().insert(ident);
        r
    };
    // A trusted client is never limited, and bypasses are counted.
    for _ in 0..5 {
        let resp = a
            .router
            .clone()
            .oneshot(with_identity(
                EdgeIdentity {
                    client_id: Some("internal".into()),
                    user: None,
                    trusted: true,
                },
                "192.0.2.9",
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(header(&resp, "ratelimit").is_none(), "no limits applied");
    }
    assert_eq!(a.limiter.metrics().rule_count("login", "bypassed"), 5);
    // An identified client: the per-client rule applies (remaining counts down).
    let resp = a
        .router
        .clone()
        .oneshot(with_identity(
            EdgeIdentity {
                client_id: Some("app1".into()),
                user: None,
                trusted: false,
            },
            "192.0.2.10",
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "ratelimit-policy").unwrap(),
        "\"login\";q=10;w=60, \"per-client\";q=100;w=3600"
    );
    assert_eq!(
        header(&resp, "ratelimit").unwrap(),
        "\"login\";r=1;t=6, \"per-client\";r=49;t=36"
    );
}
