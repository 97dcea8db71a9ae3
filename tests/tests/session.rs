//! session-svc over gRPC as auth-svc calls it (the in-process `auth` credential), on
//! Redis and on the embedded store: the life cycle, precise errors, binding policies,
//! the per-user limit under parallel creates, and parallel Touch/Revoke leaving no
//! zombie session.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::HashMap;

use sec_common::error::error_info;
use sec_common::grpc::BearerToken;
use sec_proto::session::v1::session_service_client::SessionServiceClient;
use sec_proto::session::v1::*;
use sec_tests::{Backends, TestPlatform};
use session_svc::SessionConfig;
use session_svc::config::LimitPolicy;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = SessionServiceClient<InterceptedService<Channel, BearerToken>>;

async fn platform(backends: Backends, f: impl FnOnce(&mut SessionConfig)) -> Option<TestPlatform> {
    let mut seed = TestPlatform::seed(backends)?;
    let mut cfg = seed
        .config
        .section::<SessionConfig>(session_svc::NAME)
        .unwrap()
        .clone();
    f(&mut cfg);
    seed.config.set_section(session_svc::NAME, cfg).unwrap();
    Some(TestPlatform::start_with(seed, None).await)
}

fn as_auth(tp: &TestPlatform) -> Client {
    SessionServiceClient::with_interceptor(tp.channel("session"), tp.as_service("auth"))
}

fn as_admin(tp: &TestPlatform) -> Client {
    SessionServiceClient::with_interceptor(tp.channel("session"), tp.admin_bearer().unwrap())
}

fn new_session(user: &str) -> CreateRequest {
    CreateRequest {
        user_id: user.into(),
        client_id: "web".into(),
        amr: vec!["pwd".into(), "otp".into()],
        acr: "aal2".into(),
        source_ip: "192.0.2.10".into(),
        user_agent: "Firefox/140".into(),
        attributes: HashMap::from([("tenant".into(), "acme".into())]),
        ..Default::default()
    }
}

fn get(id: &str, ip: &str, ua: &str) -> GetRequest {
    GetRequest {
        session_id: id.into(),
        source_ip: ip.into(),
        user_agent: ua.into(),
    }
}

fn reason(s: &tonic::Status) -> (String, String) {
    let i = error_info(s).unwrap();
    (i.code, i.field)
}

async fn life_cycle(backends: Backends) {
    let Some(tp) = platform(backends, |c| c.max_sessions_per_user = 3).await else {
        return;
    };
    let mut c = as_auth(&tp);
    let created = c.create(new_session("alice")).await.unwrap().into_inner();
    let id = created.session_id.clone();
    assert!(id.starts_with("sess_") && id.len() == 48);
    let s = created.session.unwrap();
    assert_eq!(s.handle.len(), 64);
    assert!(!s.handle.contains(&id[5..]), "the handle is not the id");
    assert_eq!(s.amr, ["pwd", "otp"]);
    assert_eq!(s.attributes["tenant"], "acme");

    let got = c
        .get(get(&id, "192.0.2.10", "Firefox/140"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.binding, BindingResult::Ok as i32);
    assert_eq!(got.session.unwrap().user_id, "alice");
    let touched = c
        .touch(get(&id, "192.0.2.10", "Firefox/140"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        touched.session.unwrap().last_seen_at.unwrap().seconds >= s.created_at.unwrap().seconds
    );

    // Fixation defence: after Rotate the old id is dead, the new one alive.
    let rotated = c
        .rotate(RotateRequest {
            session_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.session_id, id);
    let e = c.get(get(&id, "", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(reason(&e).0, "session_not_found");
    let new_id = rotated.session_id;
    c.get(get(&new_id, "", "")).await.unwrap();

    // Listing shows handles only; revoke by handle.
    let second = c.create(new_session("alice")).await.unwrap().into_inner();
    let listed = c
        .list_for_user(ListForUserRequest {
            user_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 2);
    let h2 = second.session.unwrap().handle;
    assert!(listed.iter().any(|s| s.handle == h2));
    let r = c
        .revoke(RevokeRequest {
            target: Some(revoke_request::Target::Handle(h2.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked, 1);
    assert_eq!(
        c.get(get(&second.session_id, "", ""))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let again = c
        .revoke(RevokeRequest {
            target: Some(revoke_request::Target::Handle(h2)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revoked, 0, "revoking twice is harmless");

    // Log out everywhere.
    c.create(new_session("alice")).await.unwrap();
    let all = c
        .revoke_all_for_user(RevokeAllForUserRequest {
            user_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.revoked, 2);
    assert_eq!(
        c.get(get(&new_id, "", "")).await.unwrap_err().code(),
        Code::NotFound
    );

    // Precise errors.
    let e = c.get(get("sess_short", "", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason(&e), ("invalid_argument".into(), "session_id".into()));
    let e = c.get(get(&"x".repeat(10_000), "", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut big = new_session("bob");
    big.attributes = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let e = c.create(big).await.unwrap_err();
    assert_eq!(reason(&e), ("invalid_argument".into(), "attributes".into()));
    let mut big = new_session("bob");
    big.attributes = HashMap::from([("k".into(), "v".repeat(1025))]);
    assert_eq!(
        c.create(big).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad = new_session("bob smith");
    bad.client_id = "web".into();
    assert_eq!(
        reason(&c.create(bad).await.unwrap_err()).1,
        "user_id",
        "user ids are validated before they name a key"
    );
    let unknown = format!("sess_{}", "A".repeat(43));
    let e = c.touch(get(&unknown, "", "")).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).0.as_str()),
        (Code::NotFound, "session_not_found")
    );

    // Access: statistics and backup are the admin's; no token, no call.
    assert_eq!(
        c.session_stats(SessionStatsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let mut anon = SessionServiceClient::with_interceptor(
        tp.channel("session"),
        BearerToken::new(None).unwrap(),
    );
    assert_eq!(
        anon.create(new_session("eve")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut admin = as_admin(&tp);
    c.create(new_session("carol")).await.unwrap();
    let stats = admin
        .session_stats(SessionStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.active, 1);
    assert_eq!(stats.clients[0].client_id, "web");
    assert!(
        stats.created >= 4 && stats.rotated == 1 && stats.revoked >= 3,
        "{stats:?}"
    );
    let _ = tp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_life_cycle_on_redis() {
    life_cycle(Backends::Production).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_life_cycle_embedded() {
    life_cycle(Backends::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_policies_and_limits() {
    let Some(tp) = platform(Backends::Production, |c| {
        c.max_sessions_per_user = 4;
        c.limit_policy = LimitPolicy::Refuse;
    })
    .await
    else {
        return;
    };
    let mut c = as_auth(&tp);
    let bound = |policy: BindingPolicy| {
        let mut r = new_session("dave");
        r.binding = Some(Binding {
            ip: true,
            user_agent: true,
            policy: policy as i32,
        });
        r
    };
    // record: a change inside the /24 is no change; outside it is recorded.
    let rec = c
        .create(bound(BindingPolicy::Record))
        .await
        .unwrap()
        .into_inner();
    let ok = c
        .get(get(&rec.session_id, "192.0.2.99", "Firefox/140"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.binding, BindingResult::Ok as i32);
    let changed = c
        .touch(get(&rec.session_id, "198.51.100.1", "Firefox/140"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.binding, BindingResult::ChangedRecorded as i32);
    assert_eq!(changed.session.unwrap().source_ip, "198.51.100.1");
    // step-up: reported, nothing changes.
    let su = c
        .create(bound(BindingPolicy::StepUp))
        .await
        .unwrap()
        .into_inner();
    let r = c
        .get(get(&su.session_id, "192.0.2.10", "Chrome/1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.binding, BindingResult::StepUpRequired as i32);
    assert_eq!(r.session.unwrap().user_agent, "Firefox/140");
    // deny: refused, and the session is gone for good.
    let deny = c
        .create(bound(BindingPolicy::Deny))
        .await
        .unwrap()
        .into_inner();
    let e = c
        .get(get(&deny.session_id, "203.0.113.5", "Firefox/140"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e).0, "session_binding_violation");
    let e = c
        .get(get(&deny.session_id, "192.0.2.10", "Firefox/140"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "revoked on violation");

    // Parallel creates never exceed the limit (refuse policy): 2 live, 4 allowed.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(
            async move { c.create(new_session("dave")).await },
        ));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert_eq!(reason(&e).0, "session_limit_reached");
            }
        }
    }
    assert_eq!(ok, 2);
    let listed = c
        .list_for_user(ListForUserRequest {
            user_id: "dave".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 4);
    let _ = tp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_touch_and_revoke_leave_no_zombie() {
    let Some(tp) = platform(Backends::Production, |c| c.max_sessions_per_user = 50).await else {
        return;
    };
    let c = as_auth(&tp);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            c.clone()
                .create(new_session("zed"))
                .await
                .unwrap()
                .into_inner()
                .session_id,
        );
    }
    let mut tasks = Vec::new();
    for id in &ids {
        for _ in 0..4 {
            let (mut c, id) = (c.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                let _ = c.touch(get(&id, "", "")).await;
            }));
        }
        let (mut c, id) = (c.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            c.revoke(RevokeRequest {
                target: Some(revoke_request::Target::SessionId(id)),
            })
            .await
            .unwrap();
        }));
    }
    let mut all = c.clone();
    tasks.push(tokio::spawn(async move {
        all.revoke_all_for_user(RevokeAllForUserRequest {
            user_id: "zed".into(),
        })
        .await
        .unwrap();
    }));
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c;
    for id in &ids {
        assert_eq!(
            c.get(get(id, "", "")).await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            c.touch(get(id, "", "")).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    let listed = c
        .list_for_user(ListForUserRequest {
            user_id: "zed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(listed.is_empty(), "index empty: {listed:?}");
    let _ = tp.stop().await;
}
