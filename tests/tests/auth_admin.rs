//! auth-svc's admin API (`sec.auth.v1.AuthService`) over gRPC on the whole platform,
//! embedded and (when reachable, or required) on PostgreSQL + Redis + NATS: client and
//! user round trips, refusals for callers that are not the admin, errors naming the
//! field, compare-and-set under parallel updates (one winner, the rest ABORTED), secrets
//! shown once and replaced by rotation, paging, and disabling a user ending their
//! sessions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use sec_common::error::error_info;
use sec_common::grpc::BearerToken;
use sec_proto::auth::v1 as pb;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_proto::common::v1::PageRequest;
use sec_proto::session::v1 as spb;
use sec_proto::session::v1::session_service_client::SessionServiceClient;
use sec_tests::{Backends, TestPlatform};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Api = AuthServiceClient<InterceptedService<Channel, BearerToken>>;

fn admin(tp: &TestPlatform) -> Api {
    AuthServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap())
}

fn web_client(id: &str) -> pb::Client {
    pb::Client {
        client_id: id.into(),
        name: format!("{id} app"),
        r#type: pb::ClientType::Confidential as i32,
        grant_types: vec!["authorization_code".into(), "refresh_token".into()],
        redirect_uris: vec!["https://app.example/cb".into()],
        scopes: vec!["openid".into(), "profile".into()],
        require_pkce: true,
        ..Default::default()
    }
}

fn field_of(s: &tonic::Status) -> String {
    error_info(s).map(|i| i.field).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_admin_embedded() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    scenario(&tp).await;
    let _ = tp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_admin_production() {
    let Some(tp) = TestPlatform::start(Backends::Production).await else {
        return;
    };
    scenario(&tp).await;
    let seed = tp.seed.clone();
    let _ = tp.stop().await;
    TestPlatform::cleanup(&seed).await;
}

async fn scenario(tp: &TestPlatform) {
    refusals_for_non_admins(tp).await;
    clients(tp).await;
    parallel_updates_have_one_winner(tp).await;
    users(tp).await;
    disabling_ends_sessions(tp).await;
}

async fn refusals_for_non_admins(tp: &TestPlatform) {
    // Another platform service is not the admin.
    let mut svc = AuthServiceClient::with_interceptor(tp.channel("auth"), tp.as_service("token"));
    let e = svc
        .create_client(pb::CreateClientRequest {
            client: Some(web_client("sneaky")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = svc
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // No credentials at all; a wrong token.
    let mut anon = AuthServiceClient::new(tp.channel("auth"));
    let e = anon
        .list_clients(pb::ListClientsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong = AuthServiceClient::with_interceptor(
        tp.channel("auth"),
        BearerToken::new(Some("not-the-admin-token")).unwrap(),
    );
    let e = wrong
        .list_scopes(pb::ListScopesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Nothing was created by the refused call.
    let e = admin(tp)
        .get_client(pb::GetClientRequest {
            client_id: "sneaky".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

async fn clients(tp: &TestPlatform) {
    let mut api = admin(tp);
    // Create: the secret comes back once; a get never shows it.
    let created = api
        .create_client(pb::CreateClientRequest {
            client: Some(web_client("web")),
        })
        .await
        .unwrap()
        .into_inner();
    let c = created.client.unwrap();
    assert_eq!(c.client_id, "web");
    assert_eq!(c.version, 1);
    assert_eq!(c.token_endpoint_auth_method, "client_secret_basic");
    assert!(created.client_secret.starts_with("cs_"), "secret format");
    assert!(created.client_secret.len() >= 46, "256 bits, base64url");
    assert!(c.created_at.is_some() && c.secret_rotated_at.is_some());
    let got = api
        .get_client(pb::GetClientRequest {
            client_id: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, c);
    assert!(!format!("{got:?}").contains(&created.client_secret));

    // Rotation: a different secret, a new version.
    let rotated = api
        .rotate_client_secret(pb::RotateClientSecretRequest {
            client_id: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.client_secret, created.client_secret);
    assert!(rotated.client_secret.starts_with("cs_"));
    assert_eq!(rotated.client.unwrap().version, 2);

    // Duplicate id; an unregistered scope; an http redirect off loopback; an unknown
    // auth method; a public client asking for client_credentials.
    let e = api
        .create_client(pb::CreateClientRequest {
            client: Some(web_client("web")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    for (mutate, field) in [
        (
            Box::new(|c: &mut pb::Client| c.scopes = vec!["root".into()])
                as Box<dyn Fn(&mut pb::Client)>,
            "scopes",
        ),
        (
            Box::new(|c: &mut pb::Client| c.redirect_uris = vec!["http://evil.example/cb".into()]),
            "redirect_uris",
        ),
        (
            Box::new(|c: &mut pb::Client| c.redirect_uris = vec!["https://app.example/*".into()]),
            "redirect_uris",
        ),
        (
            Box::new(|c: &mut pb::Client| c.token_endpoint_auth_method = "magic".into()),
            "token_endpoint_auth_method",
        ),
        (
            Box::new(|c: &mut pb::Client| {
                c.r#type = pb::ClientType::Public as i32;
                c.grant_types = vec!["client_credentials".into()];
            }),
            "grant_types",
        ),
        (
            Box::new(|c: &mut pb::Client| c.name = "n".repeat(201)),
            "name",
        ),
    ] {
        let mut c = web_client("bad");
        mutate(&mut c);
        let e = api
            .create_client(pb::CreateClientRequest { client: Some(c) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert_eq!(field_of(&e), field, "{e:?}");
    }

    // A public client: no secret, PKCE forced on, default scopes when none given.
    let spa = api
        .create_client(pb::CreateClientRequest {
            client: Some(pb::Client {
                client_id: String::new(),
                name: "spa".into(),
                r#type: pb::ClientType::Public as i32,
                grant_types: vec!["authorization_code".into()],
                redirect_uris: vec!["http://127.0.0.1:5173/cb".into()],
                require_pkce: false,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(spa.client_secret.is_empty());
    let spa = spa.client.unwrap();
    assert!(uuid::Uuid::parse_str(&spa.client_id).is_ok());
    assert!(spa.require_pkce);
    assert_eq!(spa.token_endpoint_auth_method, "none");
    assert_eq!(spa.scopes, ["openid"]);
    let e = api
        .rotate_client_secret(pb::RotateClientSecretRequest {
            client_id: spa.client_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Paging: every client exactly once across pages of 2.
    for id in ["page-a", "page-b", "page-c"] {
        api.create_client(pb::CreateClientRequest {
            client: Some(web_client(id)),
        })
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = api
            .list_clients(pb::ListClientsRequest {
                page: Some(PageRequest {
                    page_size: 2,
                    page_token: token,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.clients.len() <= 2);
        seen.extend(r.clients.into_iter().map(|c| c.client_id));
        token = r.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "ordered, no duplicates");
    assert_eq!(seen.len(), 5, "{seen:?}");
    let e = api
        .list_clients(pb::ListClientsRequest {
            page: Some(PageRequest {
                page_size: 2,
                page_token: "%%%".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "page.page_token");

    // Delete: gone, and a second delete is NotFound.
    api.delete_client(pb::DeleteClientRequest {
        client_id: "page-c".into(),
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let e = api
            .get_client(pb::GetClientRequest {
                client_id: "page-c".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let e = api
        .delete_client(pb::DeleteClientRequest {
            client_id: "page-c".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let scopes = api
        .list_scopes(pb::ListScopesRequest {})
        .await
        .unwrap()
        .into_inner()
        .scopes;
    assert!(
        scopes
            .iter()
            .any(|s| s.name == "openid" && s.builtin && !s.description.is_empty())
    );
}

/// Eight administrators update the same client from the same read: exactly one wins,
/// the others are told (ABORTED) and nothing of theirs is written.
async fn parallel_updates_have_one_winner(tp: &TestPlatform) {
    let mut api = admin(tp);
    let c = api
        .create_client(pb::CreateClientRequest {
            client: Some(web_client("contended")),
        })
        .await
        .unwrap()
        .into_inner()
        .client
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut api = admin(tp);
        let mut c = c.clone();
        c.name = format!("writer {i}");
        tasks.push(tokio::spawn(async move {
            api.update_client(pb::UpdateClientRequest {
                client: Some(c),
                expected_version: 1,
            })
            .await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => winners.push(r.into_inner()),
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let now = api
        .get_client(pb::GetClientRequest {
            client_id: "contended".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.version, 2);
    assert_eq!(now.name, winners[0].name);
    // A stale version is refused too.
    let e = api
        .update_client(pb::UpdateClientRequest {
            client: Some(c),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
}

async fn users(tp: &TestPlatform) {
    let mut api = admin(tp);
    let u = api
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                username: "Ada".into(),
                email: "ada@example.com".into(),
                email_verified: true,
                roles: vec!["engineer".into()],
                claims_json: r#"{"name":"Ada Lovelace","given_name":"Ada"}"#.into(),
                ..Default::default()
            }),
            password: "analytical engine".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.status, pb::UserStatus::Active as i32);
    assert!(u.has_password && u.password_changed_at.is_some());
    assert_eq!(u.version, 1);
    // Unique ignoring case (username and email).
    for (username, email) in [("ADA", ""), ("other", "ADA@example.com")] {
        let e = api
            .create_user(pb::CreateUserRequest {
                user: Some(pb::User {
                    username: username.into(),
                    email: email.into(),
                    ..Default::default()
                }),
                password: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{username}");
    }
    for (user, password, field) in [
        (
            pb::User {
                username: "has space".into(),
                ..Default::default()
            },
            "",
            "username",
        ),
        (
            pb::User {
                username: "x".into(),
                claims_json: r#"{"is_admin":"true"}"#.into(),
                ..Default::default()
            },
            "",
            "claims_json",
        ),
        (
            pb::User {
                username: "x".into(),
                ..Default::default()
            },
            "short",
            "password",
        ),
    ] {
        let e = api
            .create_user(pb::CreateUserRequest {
                user: Some(user),
                password: password.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), field_of(&e).as_str()),
            (Code::InvalidArgument, field)
        );
    }
    let by_name = api
        .get_user(pb::GetUserRequest {
            key: Some(pb::get_user_request::Key::Username("aDA".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_name, u);
    let e = api
        .get_user(pb::GetUserRequest {
            key: Some(pb::get_user_request::Key::UserId("nobody".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    for name in ["adam", "bob"] {
        api.create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                username: name.into(),
                ..Default::default()
            }),
            password: String::new(),
        })
        .await
        .unwrap();
    }
    let listed = api
        .list_users(pb::ListUsersRequest {
            page: None,
            prefix: "AD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    let names: Vec<&str> = listed.iter().map(|u| u.username.as_str()).collect();
    assert_eq!(names, ["Ada", "adam"]);
    let first = api
        .list_users(pb::ListUsersRequest {
            page: Some(PageRequest {
                page_size: 1,
                page_token: String::new(),
            }),
            prefix: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.users.len(), 1);
    let second = api
        .list_users(pb::ListUsersRequest {
            page: Some(PageRequest {
                page_size: 1,
                page_token: first.page.unwrap().next_page_token,
            }),
            prefix: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(second.users[0].user_id, first.users[0].user_id);

    // SetPassword: a new hash; too short is refused naming the field.
    let r = api
        .set_password(pb::SetPasswordRequest {
            user_id: u.user_id.clone(),
            password: "difference engine".into(),
            keep_sessions: true,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(r.version, 2);
    let e = api
        .set_password(pb::SetPasswordRequest {
            user_id: u.user_id.clone(),
            password: "1234567".into(),
            keep_sessions: true,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "password");
}

async fn disabling_ends_sessions(tp: &TestPlatform) {
    let mut api = admin(tp);
    let u = api
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                username: "grace".into(),
                ..Default::default()
            }),
            password: "compiler compiler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut sessions =
        SessionServiceClient::with_interceptor(tp.channel("session"), tp.as_service("auth"));
    for _ in 0..2 {
        sessions
            .create(spb::CreateRequest {
                user_id: u.user_id.clone(),
                client_id: "web".into(),
                amr: vec!["pwd".into()],
                source_ip: "192.0.2.1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let live = |mut s: SessionServiceClient<InterceptedService<Channel, BearerToken>>,
                user_id: String| async move {
        s.list_for_user(spb::ListForUserRequest { user_id })
            .await
            .unwrap()
            .into_inner()
            .sessions
            .len()
    };
    assert_eq!(live(sessions.clone(), u.user_id.clone()).await, 2);

    let mut disabled = u.clone();
    disabled.status = pb::UserStatus::Disabled as i32;
    let d = api
        .update_user(pb::UpdateUserRequest {
            user: Some(disabled.clone()),
            expected_version: u.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.status, pb::UserStatus::Disabled as i32);
    assert_eq!(d.version, u.version + 1);
    assert_eq!(live(sessions.clone(), u.user_id.clone()).await, 0);
    // The same update again is stale.
    let e = api
        .update_user(pb::UpdateUserRequest {
            user: Some(disabled),
            expected_version: u.version,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
}
