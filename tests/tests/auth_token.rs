//! auth-svc's token endpoint, revocation, introspection and UserInfo, end to end over
//! HTTP against the whole platform (auth-svc → token-svc), on the embedded backends and,
//! when present, PostgreSQL + Redis + NATS.
//!
//! Clients and users are created through the admin gRPC API; authorization codes are
//! inserted through auth-svc's store (the login and consent pages have their own suite).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::net::SocketAddr;

use auth_svc::OAuthConfig;
use auth_svc::engine::AuthServer;
use auth_svc::store::{AuthStore, CodeGrant, CodeRow};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sec_common::jwt::{self, TokenType};
use sec_proto::auth::v1 as apb;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_tests::{Backends, TestPlatform};
use serde_json::{Value, json};
use token_svc::TokenConfig;

const PASSWORD: &str = "correct horse battery staple 42";
const REDIRECT: &str = "https://app.example/cb";
/// RFC 7636 Appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

// ---------------------------------------------------------------------------------------
// HTTP

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    /// An RFC 6749 error with this status and code, never cached.
    #[track_caller]
    fn assert_error(&self, status: u16, error: &str) {
        assert_eq!(
            (self.status, self.error().as_str()),
            (status, error),
            "{}",
            self.body
        );
        assert_eq!(self.header("cache-control"), Some("no-store"));
    }
}

/// One HTTP/1.1 request on loopback.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let buf = String::from_utf8(buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

// ---------------------------------------------------------------------------------------
// Platform and fixtures

struct Ctx {
    tp: TestPlatform,
    store: std::sync::Arc<dyn AuthStore>,
    issuer: String,
    /// client_credentials, client_secret_basic.
    svc: (String, String),
    /// client_credentials, client_secret_post.
    post: (String, String),
    /// authorization_code + refresh_token, client_secret_basic.
    web: (String, String),
    /// Another authorization_code client.
    other: (String, String),
    /// Trusted resource server (sees every token at /introspect).
    rs: (String, String),
    /// private_key_jwt.
    pkjwt: String,
    pk: EcdsaKeyPair,
    alice: String,
}

async fn start(backends: Backends) -> Option<Ctx> {
    let mut seed = TestPlatform::seed(backends)?;
    let token = TokenConfig {
        refresh_grace_seconds: 0,
        ..seed
            .config
            .section::<TokenConfig>(token_svc::NAME)
            .unwrap()
            .clone()
    };
    seed.config.set_section(token_svc::NAME, token).unwrap();
    let mut oauth = seed
        .config
        .section::<OAuthConfig>(auth_svc::SECTION)
        .unwrap()
        .clone();
    oauth.scopes = BTreeMap::from([
        ("api.read".to_owned(), "Read the API".to_owned()),
        ("api.write".to_owned(), "Write the API".to_owned()),
    ]);
    oauth.max_body_bytes = 4096;
    oauth.max_param_bytes = 1024;
    let issuer = oauth.issuer.clone();
    seed.config.set_section(auth_svc::SECTION, oauth).unwrap();
    let tp = TestPlatform::start_with(seed, None).await;

    let db = sec_common::storage::connect_db(&tp.config, auth_svc::NAME, &auth_svc::MIGRATIONS)
        .await
        .unwrap();
    let store = auth_svc::auth_store(&db);

    let mut admin =
        AuthServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap());
    let mut create = async |name: &str,
                            method: &str,
                            grants: &[&str],
                            scopes: &[&str],
                            trusted: bool,
                            jwks: &str| {
        let c = admin
            .create_client(apb::CreateClientRequest {
                client: Some(apb::Client {
                    name: name.into(),
                    r#type: apb::ClientType::Confidential as i32,
                    token_endpoint_auth_method: method.into(),
                    grant_types: grants.iter().map(|g| (*g).to_owned()).collect(),
                    redirect_uris: if grants.contains(&"authorization_code") {
                        vec![REDIRECT.into()]
                    } else {
                        vec![]
                    },
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    jwks_json: jwks.into(),
                    trusted,
                    require_pkce: true,
                    ..apb::Client::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        (c.client.unwrap().client_id, c.client_secret)
    };
    let svc = create(
        "svc",
        "client_secret_basic",
        &["client_credentials"],
        &["api.read", "api.write"],
        false,
        "",
    )
    .await;
    let post = create(
        "post",
        "client_secret_post",
        &["client_credentials"],
        &["api.read"],
        false,
        "",
    )
    .await;
    let web_scopes = ["openid", "profile", "email", "offline_access", "api.read"];
    let web = create(
        "web",
        "client_secret_basic",
        &["authorization_code", "refresh_token"],
        &web_scopes,
        false,
        "",
    )
    .await;
    let other = create(
        "other",
        "client_secret_basic",
        &["authorization_code", "refresh_token"],
        &web_scopes,
        false,
        "",
    )
    .await;
    let rs = create(
        "rs",
        "client_secret_basic",
        &["client_credentials"],
        &["openid", "email", "api.read"],
        true,
        "",
    )
    .await;

    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pk = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pk.public_key().as_ref().to_vec();
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]})
    .to_string();
    let (pkjwt, _) = create(
        "pkjwt",
        "private_key_jwt",
        &["client_credentials"],
        &["api.read"],
        false,
        &jwks,
    )
    .await;

    let alice = admin
        .create_user(apb::CreateUserRequest {
            user: Some(apb::User {
                username: "alice".into(),
                email: "alice@example.com".into(),
                email_verified: true,
                status: apb::UserStatus::Active as i32,
                claims_json: json!({"name": "Alice Liddell"}).to_string(),
                ..apb::User::default()
            }),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user_id;

    Some(Ctx {
        tp,
        store,
        issuer,
        svc,
        post,
        web,
        other,
        rs,
        pkjwt,
        pk,
        alice,
    })
}

async fn stop(ctx: Ctx) {
    let seed = ctx.tp.seed.clone();
    let (r, _) = ctx.tp.stop().await;
    TestPlatform::cleanup(&seed).await;
    r.unwrap();
}

impl Ctx {
    async fn post(&self, path: &str, auth: Option<&str>, body: &str) -> Reply {
        let mut h = vec![FORM];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        http(self.tp.http, "POST", path, &h, body.as_bytes()).await
    }

    async fn token(&self, client: &(String, String), pairs: &[(&str, &str)]) -> Reply {
        self.post("/token", Some(&basic(&client.0, &client.1)), &form(pairs))
            .await
    }

    /// A fresh authorization code for `client_id`, as /authorize would have issued it.
    async fn code(&self, client_id: &str, scope: &str, challenge: Option<&str>) -> String {
        let code = AuthServer::random_value().unwrap();
        let now = self.tp.platform.clock.now().timestamp_micros();
        self.store
            .insert_code(&CodeRow {
                code_hash: AuthServer::code_hash(&code),
                grant: CodeGrant {
                    client_id: client_id.into(),
                    redirect_uri: REDIRECT.into(),
                    code_challenge: challenge.map(str::to_owned),
                    user_id: self.alice.clone(),
                    scope: scope.into(),
                    nonce: Some("n-0S6_WzA2Mj".into()),
                    auth_time: now / 1_000_000,
                    amr: vec!["pwd".into()],
                    acr: "0".into(),
                    session_id: "sid-1".into(),
                },
                created_us: now,
                expires_us: now + 60_000_000,
                used_us: None,
                family_id: None,
                access_jti: None,
                access_expires_us: None,
            })
            .await
            .unwrap();
        code
    }

    async fn exchange(&self, client: &(String, String), code: &str, verifier: Option<&str>) -> Reply {
        let mut p = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
        ];
        if let Some(v) = verifier {
            p.push(("code_verifier", v));
        }
        self.token(client, &p).await
    }

    async fn refresh(&self, client: &(String, String), refresh_token: &str) -> Reply {
        self.token(
            client,
            &[("grant_type", "refresh_token"), ("refresh_token", refresh_token)],
        )
        .await
    }

    async fn introspect(&self, as_client: &(String, String), token: &str) -> Value {
        let r = self
            .post(
                "/introspect",
                Some(&basic(&as_client.0, &as_client.1)),
                &form(&[("token", token)]),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        r.json()
    }

    async fn revoke(&self, as_client: &(String, String), token: &str) -> Reply {
        self.post(
            "/revoke",
            Some(&basic(&as_client.0, &as_client.1)),
            &form(&[("token", token)]),
        )
        .await
    }

    fn assertion(&self, aud: &str, jti: &str) -> String {
        let now = self.tp.platform.clock.now().timestamp();
        let claims = json!({"iss": self.pkjwt, "sub": self.pkjwt, "aud": aud,
                            "exp": now + 60, "iat": now, "jti": jti});
        let rng = SystemRandom::new();
        jwt::encode(
            jwt::Alg::Es256,
            "k1",
            TokenType::Id,
            claims.as_object().unwrap(),
            |input| {
                self.pk
                    .sign(&rng, input)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|_| "sign")
            },
        )
        .unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

async fn client_credentials(ctx: &Ctx) {
    let cc = [("grant_type", "client_credentials")];
    let r = ctx.token(&ctx.svc, &cc).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("pragma"), Some("no-cache"));
    let t = r.json();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["scope"], "api.read api.write");
    assert!(t["expires_in"].as_i64().unwrap() > 0);
    assert!(t.get("refresh_token").is_none() && t.get("id_token").is_none());
    let seen = ctx.introspect(&ctx.svc, t["access_token"].as_str().unwrap()).await;
    assert_eq!(seen["active"], true);
    assert_eq!(seen["client_id"].as_str(), Some(ctx.svc.0.as_str()));
    assert_eq!(seen["sub"].as_str(), Some(ctx.svc.0.as_str()));
    assert_eq!(seen["token_type"], "Bearer");

    // Narrowed scope; client_secret_post.
    let r = ctx
        .token(&ctx.svc, &[("grant_type", "client_credentials"), ("scope", "api.read")])
        .await;
    assert_eq!(r.json()["scope"], "api.read");
    let r = ctx
        .post(
            "/token",
            None,
            &form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &ctx.post.0),
                ("client_secret", &ctx.post.1),
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Unknown client and wrong secret: the same 401 with a Basic challenge.
    let unknown = ctx.token(&("nobody".into(), "x".into()), &cc).await;
    unknown.assert_error(401, "invalid_client");
    assert!(unknown.header("www-authenticate").unwrap().starts_with("Basic"));
    let wrong = ctx.token(&(ctx.svc.0.clone(), "wrong".into()), &cc).await;
    wrong.assert_error(401, "invalid_client");
    assert!(wrong.header("www-authenticate").unwrap().starts_with("Basic"));
    assert_eq!(
        unknown.json()["error_description"],
        wrong.json()["error_description"]
    );
    // A registered method other than the one used: refused like a wrong secret.
    let r = ctx
        .post(
            "/token",
            None,
            &form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &ctx.svc.0),
                ("client_secret", &ctx.svc.1),
            ]),
        )
        .await;
    r.assert_error(401, "invalid_client");
    // Two methods at once.
    let r = ctx
        .post(
            "/token",
            Some(&basic(&ctx.svc.0, &ctx.svc.1)),
            &form(&[("grant_type", "client_credentials"), ("client_secret", &ctx.svc.1)]),
        )
        .await;
    r.assert_error(400, "invalid_request");

    // Grant not registered; scope beyond the client's; user-only scope; unknown grant.
    ctx.token(&ctx.web, &cc)
        .await
        .assert_error(400, "unauthorized_client");
    ctx.token(&ctx.svc, &[("grant_type", "client_credentials"), ("scope", "openid")])
        .await
        .assert_error(400, "invalid_scope");
    ctx.token(&ctx.svc, &[("grant_type", "client_credentials"), ("scope", "api.read profile")])
        .await
        .assert_error(400, "invalid_scope");
    ctx.token(&ctx.svc, &[("grant_type", "urn:example:magic")])
        .await
        .assert_error(400, "unsupported_grant_type");
    ctx.token(&ctx.svc, &[("scope", "api.read")])
        .await
        .assert_error(400, "invalid_request");

    // Duplicate, oversized parameter; wrong content type; oversized body.
    let auth = basic(&ctx.svc.0, &ctx.svc.1);
    ctx.post(
        "/token",
        Some(&auth),
        "grant_type=client_credentials&grant_type=client_credentials",
    )
    .await
    .assert_error(400, "invalid_request");
    let long = "a".repeat(1025);
    ctx.post(
        "/token",
        Some(&auth),
        &form(&[("grant_type", "client_credentials"), ("scope", &long)]),
    )
    .await
    .assert_error(400, "invalid_request");
    let r = http(
        ctx.tp.http,
        "POST",
        "/token",
        &[("Content-Type", "application/json"), ("Authorization", &auth)],
        br#"{"grant_type":"client_credentials"}"#,
    )
    .await;
    r.assert_error(400, "invalid_request");
    let big = format!("grant_type=client_credentials&x={}", "b".repeat(5000));
    let r = ctx.post("/token", Some(&auth), &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.error(), "invalid_request");

    // private_key_jwt: good once, refused when replayed, refused for another audience.
    let token_url = format!("{}/token", ctx.issuer.trim_end_matches('/'));
    let a = ctx.assertion(&token_url, "jti-1");
    let pk_form = |a: &str| {
        form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", a),
        ])
    };
    let r = ctx.post("/token", None, &pk_form(&a)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    ctx.post("/token", None, &pk_form(&a))
        .await
        .assert_error(401, "invalid_client");
    let elsewhere = ctx.assertion("https://elsewhere.example/token", "jti-2");
    ctx.post("/token", None, &pk_form(&elsewhere))
        .await
        .assert_error(401, "invalid_client");
    // The issuer itself is an accepted audience.
    let r = ctx
        .post("/token", None, &pk_form(&ctx.assertion(&ctx.issuer, "jti-3")))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn code_exchange_and_replay(ctx: &Ctx) {
    let scope = "openid profile email offline_access";
    let code = ctx.code(&ctx.web.0, scope, Some(CHALLENGE)).await;
    let r = ctx.exchange(&ctx.web, &code, Some(VERIFIER)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let t = r.json();
    assert_eq!(t["scope"], scope);
    let access = t["access_token"].as_str().unwrap().to_owned();
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();
    let id_token = t["id_token"].as_str().unwrap();
    let (_, id) = jwt::decode_unverified(id_token, 8192).unwrap();
    assert_eq!(id["sub"].as_str(), Some(ctx.alice.as_str()));
    assert_eq!(id["nonce"], "n-0S6_WzA2Mj");
    assert!(id.contains_key("c_hash"));
    let seen = ctx.introspect(&ctx.web, &access).await;
    assert_eq!(seen["active"], true);
    assert_eq!(seen["sub"].as_str(), Some(ctx.alice.as_str()));

    // Replay: refused, and what the first exchange produced is revoked.
    ctx.exchange(&ctx.web, &code, Some(VERIFIER))
        .await
        .assert_error(400, "invalid_grant");
    assert_eq!(ctx.introspect(&ctx.web, &access).await, json!({"active": false}));
    ctx.refresh(&ctx.web, &refresh)
        .await
        .assert_error(400, "invalid_grant");

    // PKCE: wrong verifier, missing verifier, malformed verifier.
    let tampered = VERIFIER.replace('d', "e");
    for verifier in [Some(tampered.as_str()), None, Some("short")] {
        let code = ctx.code(&ctx.web.0, scope, Some(CHALLENGE)).await;
        ctx.exchange(&ctx.web, &code, verifier)
            .await
            .assert_error(400, "invalid_grant");
    }
    // A verifier when no challenge was stored.
    let code = ctx.code(&ctx.web.0, scope, None).await;
    ctx.exchange(&ctx.web, &code, Some(VERIFIER))
        .await
        .assert_error(400, "invalid_grant");
    // Another client's code; another redirect URI; an unknown code.
    let code = ctx.code(&ctx.web.0, scope, Some(CHALLENGE)).await;
    ctx.exchange(&ctx.other, &code, Some(VERIFIER))
        .await
        .assert_error(400, "invalid_grant");
    let code = ctx.code(&ctx.web.0, scope, Some(CHALLENGE)).await;
    ctx.token(
        &ctx.web,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "https://app.example/other"),
            ("code_verifier", VERIFIER),
        ],
    )
    .await
    .assert_error(400, "invalid_grant");
    ctx.exchange(&ctx.web, "not-a-code", Some(VERIFIER))
        .await
        .assert_error(400, "invalid_grant");
    // A client not registered for the grant.
    ctx.exchange(&ctx.svc, &code, Some(VERIFIER))
        .await
        .assert_error(400, "unauthorized_client");

    // Two concurrent exchanges of one code: exactly one wins.
    let code = ctx.code(&ctx.web.0, scope, Some(CHALLENGE)).await;
    let (a, b) = tokio::join!(
        ctx.exchange(&ctx.web, &code, Some(VERIFIER)),
        ctx.exchange(&ctx.web, &code, Some(VERIFIER))
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 400], "{} / {}", a.body, b.body);
}

async fn refresh_rotation(ctx: &Ctx) {
    let code = ctx.code(&ctx.web.0, "openid email offline_access", Some(CHALLENGE)).await;
    let t = ctx.exchange(&ctx.web, &code, Some(VERIFIER)).await.json();
    let r1 = t["refresh_token"].as_str().unwrap().to_owned();

    // Another client cannot use it.
    ctx.refresh(&ctx.other, &r1)
        .await
        .assert_error(400, "invalid_grant");

    let r = ctx.refresh(&ctx.web, &r1).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let t2 = r.json();
    let r2 = t2["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    assert!(t2["id_token"].is_string(), "openid: a new ID token");

    // Narrowing works; widening does not.
    let r = ctx
        .token(
            &ctx.web,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &r2),
                ("scope", "openid profile"),
            ],
        )
        .await;
    r.assert_error(400, "invalid_scope");
    let r = ctx
        .token(
            &ctx.web,
            &[("grant_type", "refresh_token"), ("refresh_token", &r2), ("scope", "email")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let t3 = r.json();
    assert_eq!(t3["scope"], "email");
    assert!(t3.get("id_token").is_none(), "no openid: no ID token");
    let r3 = t3["refresh_token"].as_str().unwrap().to_owned();

    // Reuse of a rotated token revokes the family: the newest one is dead too.
    ctx.refresh(&ctx.web, &r1)
        .await
        .assert_error(400, "invalid_grant");
    ctx.refresh(&ctx.web, &r3)
        .await
        .assert_error(400, "invalid_grant");
    assert_eq!(ctx.introspect(&ctx.web, &r3).await, json!({"active": false}));
}

async fn revocation_and_introspection(ctx: &Ctx) {
    let code = ctx.code(&ctx.web.0, "openid offline_access", Some(CHALLENGE)).await;
    let t = ctx.exchange(&ctx.web, &code, Some(VERIFIER)).await.json();
    let access = t["access_token"].as_str().unwrap().to_owned();
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();

    // Another client sees neither as active; the trusted resource server and the admin do.
    for token in [&access, &refresh] {
        assert_eq!(ctx.introspect(&ctx.other, token).await, json!({"active": false}));
        assert_eq!(ctx.introspect(&ctx.rs, token).await["active"], true);
    }
    let r = ctx
        .post(
            "/introspect",
            Some(&format!("Bearer {}", ctx.tp.token)),
            &form(&[("token", &refresh)]),
        )
        .await;
    assert_eq!(r.json()["client_id"].as_str(), Some(ctx.web.0.as_str()));
    let r = ctx
        .post("/introspect", Some("Bearer not-the-admin"), &form(&[("token", &refresh)]))
        .await;
    assert_eq!(r.status, 401);
    ctx.post("/introspect", Some(&basic(&ctx.web.0, &ctx.web.1)), "")
        .await
        .assert_error(400, "invalid_request");

    // Revocation by another client: 200, and nothing happens.
    for token in [&access, &refresh] {
        let r = ctx.revoke(&ctx.other, token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(ctx.introspect(&ctx.web, token).await["active"], true);
    }
    // Unknown tokens: 200.
    assert_eq!(ctx.revoke(&ctx.web, "no-such-token").await.status, 200);
    assert_eq!(ctx.revoke(&ctx.web, "a.b.c").await.status, 200);
    // Unauthenticated: 401.
    ctx.post("/revoke", Some(&basic(&ctx.web.0, "wrong")), &form(&[("token", &access)]))
        .await
        .assert_error(401, "invalid_client");

    // The owner revokes the JWT access token: introspection says inactive at once.
    let r = ctx.revoke(&ctx.web, &access).await;
    assert_eq!((r.status, r.header("cache-control")), (200, Some("no-store")));
    assert_eq!(ctx.introspect(&ctx.web, &access).await, json!({"active": false}));
    assert_eq!(ctx.introspect(&ctx.rs, &access).await, json!({"active": false}));
    // The refresh token (hint ignored when wrong): family revoked.
    let r = ctx
        .post(
            "/revoke",
            Some(&basic(&ctx.web.0, &ctx.web.1)),
            &form(&[("token", &refresh), ("token_type_hint", "access_token")]),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(ctx.introspect(&ctx.web, &refresh).await, json!({"active": false}));
    ctx.refresh(&ctx.web, &refresh)
        .await
        .assert_error(400, "invalid_grant");
}

async fn userinfo(ctx: &Ctx) {
    let code = ctx.code(&ctx.web.0, "openid email", Some(CHALLENGE)).await;
    let t = ctx.exchange(&ctx.web, &code, Some(VERIFIER)).await.json();
    let access = t["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {access}");

    let r = http(ctx.tp.http, "GET", "/userinfo", &[("Authorization", &bearer)], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let claims = r.json();
    assert_eq!(claims["sub"].as_str(), Some(ctx.alice.as_str()));
    assert_eq!(claims["email"], "alice@example.com");
    assert!(claims.get("name").is_none(), "profile was not granted");

    // The token in the form body; both places at once.
    let r = ctx.post("/userinfo", None, &form(&[("access_token", &access)])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = ctx
        .post("/userinfo", Some(&bearer), &form(&[("access_token", &access)]))
        .await;
    r.assert_error(400, "invalid_request");

    // No token; a bad one; one without openid.
    let r = http(ctx.tp.http, "GET", "/userinfo", &[], b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = http(
        ctx.tp.http,
        "GET",
        "/userinfo",
        &[("Authorization", "Bearer a.b.c")],
        b"",
    )
    .await;
    r.assert_error(401, "invalid_token");
    assert!(r.header("www-authenticate").unwrap().contains("invalid_token"));
    let cc = ctx
        .token(&ctx.svc, &[("grant_type", "client_credentials")])
        .await
        .json();
    let r = http(
        ctx.tp.http,
        "GET",
        "/userinfo",
        &[(
            "Authorization",
            &format!("Bearer {}", cc["access_token"].as_str().unwrap()),
        )],
        b"",
    )
    .await;
    r.assert_error(403, "insufficient_scope");

    // A revoked token gets nothing.
    assert_eq!(ctx.revoke(&ctx.web, &access).await.status, 200);
    let r = http(ctx.tp.http, "GET", "/userinfo", &[("Authorization", &bearer)], b"").await;
    r.assert_error(401, "invalid_token");
}

async fn security_auth(ctx: &Ctx) {
    let call = |body: Value| async move {
        http(
            ctx.tp.http,
            "POST",
            "/security/auth",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .await
    };
    let password = |client: &(String, String), pw: &str| {
        json!({"grant_type": "password", "client_id": client.0, "client_secret": client.1,
               "username": "ALICE", "password": pw, "scope": "openid email"})
    };
    let r = call(password(&ctx.rs, PASSWORD)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let t = r.json();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["scope"], "openid email");
    let (_, id) = jwt::decode_unverified(t["id_token"].as_str().unwrap(), 8192).unwrap();
    assert_eq!(id["sub"].as_str(), Some(ctx.alice.as_str()));
    assert_eq!(id["email"], "alice@example.com");

    call(password(&ctx.rs, "wrong password"))
        .await
        .assert_error(400, "invalid_grant");
    // Only trusted clients; the client's secret is checked first.
    call(password(&ctx.svc, PASSWORD))
        .await
        .assert_error(400, "unauthorized_client");
    call(password(&(ctx.rs.0.clone(), "wrong".into()), PASSWORD))
        .await
        .assert_error(401, "invalid_client");
    let mut beyond = password(&ctx.rs, PASSWORD);
    beyond["scope"] = json!("api.write");
    call(beyond).await.assert_error(400, "invalid_scope");

    let r = call(json!({"grant_type": "client_credentials", "client_id": ctx.svc.0,
                        "client_secret": ctx.svc.1}))
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["scope"], "api.read api.write");

    call(json!({"grant_type": "implicit", "client_id": ctx.svc.0, "client_secret": ctx.svc.1}))
        .await
        .assert_error(400, "unsupported_grant_type");
    call(json!({"grant_type": "client_credentials", "client_id": ctx.svc.0,
                "client_secret": ctx.svc.1, "extra": 1}))
    .await
    .assert_error(400, "invalid_request");
    let r = ctx
        .post(
            "/security/auth",
            None,
            &form(&[("grant_type", "client_credentials")]),
        )
        .await;
    r.assert_error(400, "invalid_request");
}

/// Last: a disabled user gets no new tokens by any grant, and UserInfo refuses them.
async fn disabled_user(ctx: &Ctx) {
    let code = ctx.code(&ctx.web.0, "openid offline_access", Some(CHALLENGE)).await;
    let t = ctx.exchange(&ctx.web, &code, Some(VERIFIER)).await.json();
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();
    let pending = ctx.code(&ctx.web.0, "openid", Some(CHALLENGE)).await;

    let mut admin =
        AuthServiceClient::with_interceptor(ctx.tp.channel("auth"), ctx.tp.admin_bearer().unwrap());
    let user = admin
        .get_user(apb::GetUserRequest {
            key: Some(apb::get_user_request::Key::UserId(ctx.alice.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    let version = user.version;
    admin
        .update_user(apb::UpdateUserRequest {
            user: Some(apb::User {
                status: apb::UserStatus::Disabled as i32,
                ..user
            }),
            expected_version: version,
        })
        .await
        .unwrap();

    ctx.exchange(&ctx.web, &pending, Some(VERIFIER))
        .await
        .assert_error(400, "invalid_grant");
    ctx.refresh(&ctx.web, &refresh)
        .await
        .assert_error(400, "invalid_grant");
    let r = http(
        ctx.tp.http,
        "POST",
        "/security/auth",
        &[("Content-Type", "application/json")],
        json!({"grant_type": "password", "client_id": ctx.rs.0, "client_secret": ctx.rs.1,
               "username": "alice", "password": PASSWORD})
        .to_string()
        .as_bytes(),
    )
    .await;
    r.assert_error(400, "invalid_grant");
}

async fn all(ctx: &Ctx) {
    client_credentials(ctx).await;
    code_exchange_and_replay(ctx).await;
    refresh_rotation(ctx).await;
    revocation_and_introspection(ctx).await;
    userinfo(ctx).await;
    security_auth(ctx).await;
    disabled_user(ctx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoints_embedded() {
    let ctx = start(Backends::Embedded).await.unwrap();
    all(&ctx).await;
    stop(ctx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoints_production_backends() {
    let Some(ctx) = start(Backends::Production).await else {
        return;
    };
    all(&ctx).await;
    stop(ctx).await;
}
