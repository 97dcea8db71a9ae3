//! auth-svc's metadata endpoints on the real facade of an in-process platform: discovery
//! (OIDC Discovery, RFC 8414), `/jwks` (cache headers, ETag/304, keys that verify
//! token-svc's tokens), RFC 7591/7592 dynamic registration (guards, validation, the whole
//! management life cycle, compare-and-set under parallel updates), `/openapi.json` and
//! `/security` (the document covers every route the router serves); and schemathesis
//! against `/openapi.json` when `SEC_TEST_INTEROP` is set.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use sec_common::auth::hash_token;
use sec_common::grpc::BearerToken;
use sec_proto::auth::v1 as apb;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_proto::token::v1 as tpb;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_tests::{Backends, TestPlatform};
use serde_json::{Value, json};

/// The initial access token the registration tests configure.
const INITIAL_TOKEN: &str = "sec_initial-access-token-for-tests";

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request on loopback (`Connection: close`), with a minimal decoder of
/// `Content-Length` and chunked bodies.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..eol]).unwrap().split(';').next().unwrap().trim(),
                16,
            )
            .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = rest[eol + 2 + size + 2..].to_vec();
        }
        rest = out;
    }
    Resp {
        status,
        headers,
        body: rest,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, &[], b"").await
}

fn issuer(tp: &TestPlatform) -> String {
    format!("http://{}", tp.http)
}

/// A platform whose registration accepts [`INITIAL_TOKEN`].
async fn start_with_initial_token() -> TestPlatform {
    let mut seed = TestPlatform::seed(Backends::Embedded).unwrap();
    let mut oauth = seed
        .config
        .section::<auth_svc::OAuthConfig>(auth_svc::SECTION)
        .unwrap()
        .clone();
    oauth.registration_token_hash = Some(sec_common::config::Secret::new(hash_token(
        INITIAL_TOKEN,
    )));
    seed.config.set_section(auth_svc::SECTION, oauth).unwrap();
    TestPlatform::start_with(seed, None).await
}

fn token_client(
    tp: &TestPlatform,
    bearer: BearerToken,
) -> TokenServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>>
{
    TokenServiceClient::with_interceptor(tp.channel("token"), bearer)
}

// ---------------------------------------------------------------------------------
// Discovery and JWKS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_names_every_endpoint_under_the_issuer() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let iss = issuer(&tp);
    let oidc = get(tp.http, "/.well-known/openid-configuration").await;
    assert_eq!(oidc.status, 200);
    assert_eq!(oidc.header("cache-control"), Some("public, max-age=300"));
    assert!(oidc.header("content-type").unwrap().starts_with("application/json"));
    let d = oidc.json();
    // RFC 8414 serves the same metadata.
    let rfc8414 = get(tp.http, "/.well-known/oauth-authorization-server").await;
    assert_eq!(rfc8414.status, 200);
    assert_eq!(rfc8414.json(), d);

    assert_eq!(d["issuer"], iss.as_str());
    for (key, path) in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("userinfo_endpoint", "/userinfo"),
        ("jwks_uri", "/jwks"),
        ("registration_endpoint", "/register"),
        ("revocation_endpoint", "/revoke"),
        ("introspection_endpoint", "/introspect"),
        ("end_session_endpoint", "/logout"),
    ] {
        assert_eq!(d[key], format!("{iss}{path}"), "{key}");
    }
    assert_eq!(d["response_types_supported"], json!(["code"]));
    assert_eq!(d["response_modes_supported"], json!(["query", "form_post"]));
    assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(d["subject_types_supported"], json!(["public"]));
    assert_eq!(d["authorization_response_iss_parameter_supported"], true);
    assert_eq!(d["request_parameter_supported"], false);
    assert_eq!(d["request_uri_parameter_supported"], false);
    assert_eq!(d["claims_parameter_supported"], false);
    for m in ["client_secret_basic", "client_secret_post", "private_key_jwt"] {
        for key in [
            "token_endpoint_auth_methods_supported",
            "revocation_endpoint_auth_methods_supported",
            "introspection_endpoint_auth_methods_supported",
        ] {
            assert!(d[key].as_array().unwrap().contains(&json!(m)), "{key} {m}");
        }
    }
    let scopes = d["scopes_supported"].as_array().unwrap();
    for s in ["openid", "profile", "email", "offline_access"] {
        assert!(scopes.contains(&json!(s)), "{s}");
    }
    // The signing algorithms are those of the keys /jwks publishes.
    let jwks = get(tp.http, "/jwks").await.json();
    let algs = d["id_token_signing_alg_values_supported"].as_array().unwrap();
    for k in jwks["keys"].as_array().unwrap() {
        assert!(algs.contains(&k["alg"]), "{} not in {algs:?}", k["alg"]);
    }
    let (r, _) = tp.stop().await;
    r.unwrap();
}

/// Verifies the JWS `token` with the key of `jwks` its header names.
fn verify_with_jwks(token: &str, jwks: &Value) -> bool {
    use aws_lc_rs::signature as sig;
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    };
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&b64(parts[0])).unwrap();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap_or_else(|| panic!("no key {} in /jwks", header["kid"]));
    let signed = format!("{}.{}", parts[0], parts[1]);
    let signature = b64(parts[2]);
    let s = |k: &str| key[k].as_str().unwrap();
    match header["alg"].as_str().unwrap() {
        "ES256" => {
            let mut point = vec![4_u8];
            point.extend(b64(s("x")));
            point.extend(b64(s("y")));
            sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        }
        "EdDSA" => sig::UnparsedPublicKey::new(&sig::ED25519, b64(s("x")))
            .verify(signed.as_bytes(), &signature)
            .is_ok(),
        alg @ ("RS256" | "PS256") => {
            let params = if alg == "RS256" {
                &sig::RSA_PKCS1_2048_8192_SHA256
            } else {
                &sig::RSA_PSS_2048_8192_SHA256
            };
            sig::RsaPublicKeyComponents {
                n: b64(s("n")),
                e: b64(s("e")),
            }
            .verify(params, signed.as_bytes(), &signature)
            .is_ok()
        }
        other => panic!("unexpected alg {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_is_cacheable_revalidates_with_etag_and_verifies_tokens() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let mut auth = token_client(&tp, tp.as_service("auth"));
    let upstream = auth
        .get_jwks(tpb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();

    let r = get(tp.http, "/jwks").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/jwk-set+json"));
    assert_eq!(
        r.header("cache-control").unwrap(),
        format!("public, max-age={}", upstream.max_age_seconds)
    );
    let etag = r.header("etag").unwrap().to_owned();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &r.body);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(etag, format!("\"{hex}\""), "the ETag is the SHA-256 of the body");
    let jwks = r.json();
    let published: Value = serde_json::from_str(&upstream.jwks_json).unwrap();
    assert_eq!(jwks, published, "the JWK Set is token-svc's");
    for k in jwks["keys"].as_array().unwrap() {
        assert!(k.get("d").is_none(), "no private key material");
    }

    // Revalidation: the same ETag (strong or weak, alone or in a list) → 304, no body.
    for inm in [etag.clone(), format!("W/{etag}"), format!("\"other\", {etag}")] {
        let r = http(tp.http, "GET", "/jwks", &[("If-None-Match", &inm)], b"").await;
        assert_eq!(r.status, 304, "{inm}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        assert!(r.header("cache-control").unwrap().starts_with("public, max-age="));
    }
    let r = http(tp.http, "GET", "/jwks", &[("If-None-Match", "\"stale\"")], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), jwks);

    // A flood answers from the cache: every answer is identical.
    let answers = futures::future::join_all((0..50).map(|_| get(tp.http, "/jwks"))).await;
    for a in &answers {
        assert_eq!((a.status, a.header("etag")), (200, Some(etag.as_str())));
    }

    // A token token-svc issues verifies with a key from /jwks; a tampered one does not.
    let issued = auth
        .issue_tokens(tpb::IssueTokensRequest {
            grant: Some(tpb::Grant {
                subject: "alice".into(),
                client_id: "app".into(),
                scope: "openid".into(),
                ..Default::default()
            }),
            id_token: true,
            nonce: "n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let access = issued.access_token.unwrap().token;
    assert!(verify_with_jwks(&access, &jwks));
    assert!(verify_with_jwks(&issued.id_token.unwrap().token, &jwks));
    let mut parts: Vec<String> = access.split('.').map(str::to_owned).collect();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory"}"#);
    assert!(!verify_with_jwks(&parts.join("."), &jwks));
    let (r, _) = tp.stop().await;
    r.unwrap();
}

// ---------------------------------------------------------------------------------
// Registration.

async fn register(tp: &TestPlatform, bearer: Option<&str>, body: &Value) -> Resp {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(tp.http, "POST", "/register", &headers, body.to_string().as_bytes()).await
}

fn assert_bearer_401(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", String::from_utf8_lossy(&r.body));
    assert!(
        r.header("www-authenticate").unwrap().starts_with("Bearer"),
        "{what}"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
}

fn web_client() -> Value {
    json!({
        "client_name": "Registered app",
        "redirect_uris": ["https://app.example/cb"],
        "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_method": "client_secret_basic",
        "scope": "openid profile",
        "software_id": "ignored: unknown fields are ignored (RFC 7591 §2)",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_closed_by_default() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let cfg = tp
        .config
        .section::<auth_svc::OAuthConfig>(auth_svc::SECTION)
        .unwrap();
    assert!(!cfg.open_registration && cfg.registration_token_hash.is_none());
    let body = web_client();
    let r = register(&tp, None, &body).await;
    assert_bearer_401(&r, "no token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    for bad in [INITIAL_TOKEN, "sec_wrong", tp.service_token.as_str()] {
        let r = register(&tp, Some(bad), &body).await;
        assert_bearer_401(&r, bad);
        assert_eq!(r.json()["error"], "invalid_token");
    }
    let r = http(
        tp.http,
        "POST",
        "/register",
        &[("Content-Type", "application/json"), ("Authorization", "Basic YTpi")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_bearer_401(&r, "basic");
    // The admin token may always register.
    let r = register(&tp, Some(&tp.token), &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let (r, _) = tp.stop().await;
    r.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_life_cycle_with_the_registration_access_token() {
    let tp = start_with_initial_token().await;
    let iss = issuer(&tp);
    let r = register(&tp, Some("sec_not-the-initial-token"), &web_client()).await;
    assert_bearer_401(&r, "wrong initial token");

    let r = register(&tp, Some(INITIAL_TOKEN), &web_client()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let info = r.json();
    let client_id = info["client_id"].as_str().unwrap().to_owned();
    let secret = info["client_secret"].as_str().unwrap().to_owned();
    let reg_token = info["registration_access_token"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 43, "≥ 256 bits");
    assert_eq!(info["client_secret_expires_at"], 0);
    assert!(info["client_id_issued_at"].as_i64().unwrap() > 1_700_000_000);
    let uri = info["registration_client_uri"].as_str().unwrap().to_owned();
    assert_eq!(uri, format!("{iss}/register/{client_id}"));
    let path = uri.strip_prefix(&iss).unwrap().to_owned();
    assert_eq!(info["redirect_uris"], json!(["https://app.example/cb"]));
    assert_eq!(info["scope"], "openid profile");
    assert_eq!(info["response_types"], json!(["code"]));
    assert_eq!(info["token_endpoint_auth_method"], "client_secret_basic");
    assert!(info.get("software_id").is_none());

    // The admin API sees an ordinary, dynamically registered, untrusted client.
    let mut admin = AuthServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap());
    let c = admin
        .get_client(apb::GetClientRequest {
            client_id: client_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.dynamically_registered && !c.trusted);
    assert_eq!(c.name, "Registered app");
    assert!(c.require_pkce);

    // The secret works at /token when the token endpoint is there.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"))
    );
    let t = http(
        tp.http,
        "POST",
        "/token",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Authorization", &basic),
        ],
        b"grant_type=client_credentials&scope=profile",
    )
    .await;
    if t.status != 404 {
        assert_eq!(t.status, 200, "{}", String::from_utf8_lossy(&t.body));
        assert!(t.json()["access_token"].is_string());
    }

    // RFC 7592 read.
    let bearer = format!("Bearer {reg_token}");
    let read = http(tp.http, "GET", &path, &[("Authorization", &bearer)], b"").await;
    assert_eq!(read.status, 200);
    let got = read.json();
    assert_eq!(got["client_id"], client_id.as_str());
    assert_eq!(got["registration_access_token"], reg_token.as_str());
    assert!(got.get("client_secret").is_none(), "the secret is shown once");
    assert_eq!(got["redirect_uris"], info["redirect_uris"]);

    // Wrong token, another client's token, unknown client: the same 401.
    let other = register(&tp, Some(INITIAL_TOKEN), &web_client()).await.json();
    let other_token = format!("Bearer {}", other["registration_access_token"].as_str().unwrap());
    let unknown = "/register/no-such-client".to_owned();
    let admin_bearer = format!("Bearer {}", tp.token);
    let mut bodies = Vec::new();
    for (p, auth) in [
        (path.as_str(), "Bearer reg_wrong"),
        (path.as_str(), other_token.as_str()),
        (unknown.as_str(), bearer.as_str()),
        (path.as_str(), admin_bearer.as_str()),
    ] {
        for method in ["GET", "DELETE"] {
            let r = http(tp.http, method, p, &[("Authorization", auth)], b"").await;
            assert_bearer_401(&r, &format!("{method} {p}"));
            bodies.push(r.json());
        }
    }
    let r = http(tp.http, "GET", &path, &[], b"").await;
    assert_bearer_401(&r, "no token");
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");

    // RFC 7592 update: replaces the metadata; client_id must match.
    let json_auth = [("Content-Type", "application/json"), ("Authorization", bearer.as_str())];
    let mut update = web_client();
    update["client_id"] = json!(client_id);
    update["client_name"] = json!("Renamed app");
    update["redirect_uris"] = json!(["https://app.example/cb", "https://app.example/cb2"]);
    let r = http(tp.http, "PUT", &path, &json_auth, update.to_string().as_bytes()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let updated = r.json();
    assert_eq!(updated["client_name"], "Renamed app");
    assert_eq!(updated["redirect_uris"].as_array().unwrap().len(), 2);
    let c = admin
        .get_client(apb::GetClientRequest {
            client_id: client_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.name, "Renamed app");

    for (mutate, what) in [
        (json!({"client_id": "someone-else"}), "client_id"),
        (json!({"client_id": null}), "client_id"),
        (json!({"client_secret": "cs_wrong"}), "client_secret"),
        (json!({"token_endpoint_auth_method": "none"}), "token_endpoint_auth_method"),
        (json!({"redirect_uris": ["https://evil.example/cb#frag"]}), "redirect_uris"),
    ] {
        let mut b = update.clone();
        for (k, v) in mutate.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = http(tp.http, "PUT", &path, &json_auth, b.to_string().as_bytes()).await;
        assert_eq!(r.status, 400, "{what}: {}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert!(
            e["error"] == "invalid_client_metadata" || e["error"] == "invalid_redirect_uri",
            "{e}"
        );
        assert!(e["error_description"].as_str().unwrap().contains(what), "{e}");
    }

    // Parallel updates: compare-and-set, no update is lost silently.
    let before = admin
        .get_client(apb::GetClientRequest {
            client_id: client_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    let bodies: Vec<String> = (0..8)
        .map(|i| {
            let mut b = update.clone();
            b["client_name"] = json!(format!("writer {i}"));
            b.to_string()
        })
        .collect();
    let results = futures::future::join_all(
        bodies
            .iter()
            .map(|b| http(tp.http, "PUT", &path, &json_auth, b.as_bytes())),
    )
    .await;
    let mut winners = Vec::new();
    for r in &results {
        match r.status {
            200 => winners.push(r.json()["client_name"].as_str().unwrap().to_owned()),
            409 => assert_eq!(r.json()["error"], "invalid_request"),
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(!winners.is_empty());
    let after = admin
        .get_client(apb::GetClientRequest {
            client_id: client_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.version - before,
        winners.len() as u64,
        "every 200 is one version, every loser got 409"
    );
    assert!(winners.contains(&after.name));

    // RFC 7592 delete: 204, then the token and the client are gone.
    let r = http(tp.http, "DELETE", &path, &[("Authorization", &bearer)], b"").await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let r = http(tp.http, "GET", &path, &[("Authorization", &bearer)], b"").await;
    assert_bearer_401(&r, "after delete");
    let gone = admin
        .get_client(apb::GetClientRequest { client_id })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let (r, _) = tp.stop().await;
    r.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refuses_bad_metadata_naming_the_field() {
    let tp = start_with_initial_token().await;
    let base = web_client();
    for (field, value, error) in [
        ("redirect_uris", json!(["https://app.example/cb#fragment"]), "invalid_redirect_uri"),
        ("redirect_uris", json!(["/relative/cb"]), "invalid_redirect_uri"),
        ("redirect_uris", json!(["javascript:alert(1)"]), "invalid_redirect_uri"),
        ("redirect_uris", json!("https://app.example/cb"), "invalid_client_metadata"),
        ("grant_types", json!(["implicit"]), "invalid_client_metadata"),
        ("response_types", json!(["token"]), "invalid_client_metadata"),
        ("token_endpoint_auth_method", json!("tls_client_auth"), "invalid_client_metadata"),
        ("scope", json!("openid not-a-registered-scope"), "invalid_client_metadata"),
        ("jwks_uri", json!("http://169.254.169.254/keys"), "invalid_client_metadata"),
    ] {
        let mut b = base.clone();
        b[field] = value.clone();
        let r = register(&tp, Some(INITIAL_TOKEN), &b).await;
        assert_eq!(r.status, 400, "{field}={value}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let e = r.json();
        assert_eq!(e["error"], error, "{field}={value}: {e}");
        assert!(
            e["error_description"].as_str().unwrap().contains(field),
            "{field}: {e}"
        );
    }
    // Not JSON, not an object, oversized.
    let auth = format!("Bearer {INITIAL_TOKEN}");
    let r = http(
        tp.http,
        "POST",
        "/register",
        &[("Content-Type", "application/x-www-form-urlencoded"), ("Authorization", &auth)],
        b"redirect_uris=https://a/cb",
    )
    .await;
    assert_eq!((r.status, r.json()["error"].clone()), (400, json!("invalid_client_metadata")));
    let r = http(
        tp.http,
        "POST",
        "/register",
        &[("Content-Type", "application/json"), ("Authorization", &auth)],
        b"[1,2]",
    )
    .await;
    assert_eq!(r.status, 400);
    let mut huge = base.clone();
    huge["client_name"] = json!("x".repeat(64 * 1024));
    let r = register(&tp, Some(INITIAL_TOKEN), &huge).await;
    assert_eq!(r.status, 413);
    let (r, _) = tp.stop().await;
    r.unwrap();
}

// ---------------------------------------------------------------------------------
// OpenAPI and the /security index.

/// Every (method, path) the facade may serve: the issue's endpoints. A route the router
/// answers must be in the document, and everything in the document must be answered.
const CANDIDATES: &[(&str, &str)] = &[
    ("GET", "/.well-known/openid-configuration"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/jwks"),
    ("POST", "/register"),
    ("GET", "/register/{client_id}"),
    ("PUT", "/register/{client_id}"),
    ("DELETE", "/register/{client_id}"),
    ("GET", "/openapi.json"),
    ("GET", "/security"),
    ("GET", "/healthz"),
    ("GET", "/security/keys"),
    ("POST", "/security/auth"),
    ("GET", "/authorize"),
    ("POST", "/authorize"),
    ("POST", "/token"),
    ("GET", "/userinfo"),
    ("POST", "/userinfo"),
    ("POST", "/revoke"),
    ("POST", "/introspect"),
    ("GET", "/logout"),
    ("POST", "/logout"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("GET", "/consent"),
    ("POST", "/consent"),
];

fn concrete(path: &str) -> String {
    path.replace("{client_id}", "no-such-client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_covers_every_route_the_router_serves() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let r = get(tp.http, "/openapi.json").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."), "{}", doc["openapi"]);
    assert_eq!(doc["servers"][0]["url"], issuer(&tp).as_str());
    let paths = doc["paths"].as_object().unwrap();

    // Documented → served (not 404/405), and no server error on a bare request.
    let mut documented = Vec::new();
    for (path, item) in paths {
        for (method, _) in item.as_object().unwrap() {
            let m = method.to_ascii_uppercase();
            if !["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&m.as_str()) {
                continue;
            }
            let r = http(tp.http, &m, &concrete(path), &[], b"").await;
            assert!(
                ![404, 405].contains(&r.status) && r.status < 500,
                "{m} {path} is documented but answers {}",
                r.status
            );
            documented.push((m, path.clone()));
        }
    }
    // Served → documented.
    for (m, path) in CANDIDATES {
        let r = http(tp.http, m, &concrete(path), &[], b"").await;
        if ![404, 405].contains(&r.status) {
            assert!(
                documented.contains(&((*m).to_owned(), (*path).to_owned())),
                "{m} {path} is served ({}) but not in /openapi.json",
                r.status
            );
        }
    }

    // /security is the same list.
    let r = get(tp.http, "/security").await;
    assert_eq!(r.status, 200);
    let idx = r.json();
    let endpoints = idx["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), documented.len());
    for e in endpoints {
        let key = (
            e["method"].as_str().unwrap().to_owned(),
            e["path"].as_str().unwrap().to_owned(),
        );
        assert!(documented.contains(&key), "{e}");
        assert!(["none", "optional", "required"].contains(&e["auth"].as_str().unwrap()));
        assert!(!e["description"].as_str().unwrap().is_empty(), "{e}");
    }
    let find = |m: &str, p: &str| {
        endpoints
            .iter()
            .find(|e| e["method"] == m && e["path"] == p)
            .unwrap()
    };
    assert_eq!(find("GET", "/jwks")["auth"], "none");
    assert_eq!(find("GET", "/security/keys")["auth"], "required");
    assert_eq!(find("POST", "/register")["auth"], "optional");
    let (r, _) = tp.stop().await;
    r.unwrap();
}

// ---------------------------------------------------------------------------------
// schemathesis.

/// schemathesis (PyPI, installed by the script into a venv under the target directory)
/// against `/openapi.json`: no server error on any generated request. Runs when
/// `SEC_TEST_INTEROP` is set; `required` fails when the tool cannot be installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors() {
    let Ok(mode) = std::env::var("SEC_TEST_INTEROP") else {
        sec_testkit::skipped("schemathesis (set SEC_TEST_INTEROP=1 or required)");
        return;
    };
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/schemathesis/run.sh");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_owned();
    let base = issuer(&tp);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script)
            .arg(base)
            .env("SEC_TARGET_DIR", target)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (r, _) = tp.stop().await;
    r.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("schemathesis:\n{text}");
    if out.status.code() == Some(3) {
        assert!(mode != "required", "schemathesis could not be installed: {text}");
        sec_testkit::skipped("schemathesis (could not be installed)");
        return;
    }
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
}
