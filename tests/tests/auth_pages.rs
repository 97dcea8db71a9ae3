//! The browser side of auth-svc over plain HTTP with a cookie jar, against the whole
//! platform: `/authorize` through the real login and consent forms up to the code,
//! redirect URIs that must never be followed, CSRF, wrong passwords, `prompt=none`,
//! remembered consent, deny, `form_post`, and RP-initiated logout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sec_proto::audit::v1::ListEventsRequest;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_proto::auth::v1::{Client, ClientType, CreateClientRequest, CreateUserRequest, User};
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_proto::token::v1::{Grant, IssueTokensRequest};
use sec_tests::{Backends, TestPlatform};

const REDIRECT: &str = "https://app.example/cb";
const LOGGED_OUT: &str = "https://app.example/bye";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const PASSWORD: &str = "correct horse battery staple";

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of hidden field `name` (our values are base64url: nothing to unescape).
    fn field(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker).unwrap_or_else(|| {
            panic!("no field {name} in {}", self.body);
        }) + marker.len();
        let end = self.body[start..].find('"').unwrap() + start;
        self.body[start..end].to_owned()
    }

    /// The query parameters of the `Location` header.
    fn location_params(&self) -> BTreeMap<String, String> {
        let loc = self.header("location").expect("a Location header");
        let q = loc.split_once('?').map(|(_, q)| q).unwrap_or_default();
        form_urlencoded_parse(q)
    }

    fn assert_page_headers(&self) {
        let csp = self.header("content-security-policy").unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert_eq!(self.header("x-frame-options"), Some("DENY"));
        assert_eq!(self.header("referrer-policy"), Some("no-referrer"));
        assert_eq!(self.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(self.header("cache-control"), Some("no-store"));
    }
}

fn form_urlencoded_parse(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A browser: a cookie jar and HTTP/1.1 over a fresh connection per request.
#[derive(Clone)]
struct Browser {
    addr: SocketAddr,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            cookies: BTreeMap::new(),
        }
    }

    async fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let cookie = if self.cookies.is_empty() {
            String::new()
        } else {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("Cookie: {}\r\n", jar.join("; "))
        };
        let body_head = body
            .map(|b| {
                format!(
                    "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                    b.len()
                )
            })
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pages-test\r\n{cookie}{body_head}Connection: close\r\n\r\n{}",
            self.addr,
            body.unwrap_or_default()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        for (k, v) in &headers {
            if k != "set-cookie" {
                continue;
            }
            let first = v.split(';').next().unwrap();
            let (name, value) = first.split_once('=').unwrap();
            if v.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        Resp {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn get(&mut self, path: &str) -> Resp {
        self.send("GET", path, None).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        self.send("POST", path, Some(&encode(form))).await
    }

    fn has_session(&self) -> bool {
        self.cookies.contains_key("sec_session")
    }
}

/// The auth-svc events of the audit trail once every type of `want` is there (bounded
/// wait for the asynchronous delivery).
async fn events(tp: &TestPlatform, want: &[&str]) -> Vec<sec_proto::common::v1::SecurityEvent> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let events = tp
            .audit()
            .list_events(ListEventsRequest {
                event_type: "sec.auth.*".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        if want.iter().all(|w| events.iter().any(|e| e.r#type == *w)) {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events missing: {:?}",
            events.iter().map(|e| &e.r#type).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `audit.sensitive_fields` (default: `details.username`): the trail holds the login
/// events' usernames only as crypto-svc HMACs, and a search by the plain username still
/// finds exactly them.
async fn sensitive_username_is_an_hmac(tp: &TestPlatform) {
    let evs = events(tp, &["sec.auth.login.failed", "sec.auth.login.succeeded"]).await;
    let logins: Vec<_> = evs
        .iter()
        .filter(|e| e.r#type.starts_with("sec.auth.login."))
        .collect();
    for e in &logins {
        let stored = &e.details["username"];
        assert!(stored.starts_with("sec:v1:"), "{e:?}");
        assert!(
            !format!("{e:?}").contains("alice"),
            "plain username stored: {e:?}"
        );
    }
    assert_eq!(logins[0].details["username"], logins[1].details["username"]);
    let search = |value: &str| {
        let mut audit = tp.audit();
        let value = value.to_owned();
        async move {
            audit
                .search_events(sec_proto::audit::v1::SearchEventsRequest {
                    filter: Some(sec_proto::audit::v1::EventFilter {
                        details: vec![sec_proto::audit::v1::DetailMatch {
                            path: "username".into(),
                            value,
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    let found = search("alice").await;
    assert_eq!(found.len(), logins.len(), "{found:?}");
    assert!(
        found
            .iter()
            .all(|e| e.r#type.starts_with("sec.auth.login."))
    );
    assert!(search("bob").await.is_empty());
    // the stored value itself is not a search key for it
    assert!(search(&logins[0].details["username"]).await.is_empty());
}

struct Setup {
    tp: TestPlatform,
    client_id: String,
    user_id: String,
}

async fn setup(trusted: bool) -> Setup {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let mut admin =
        AuthServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap());
    let client = admin
        .create_client(CreateClientRequest {
            client: Some(Client {
                name: "Pages <Test> App".into(),
                r#type: ClientType::Public as i32,
                token_endpoint_auth_method: "none".into(),
                grant_types: vec!["authorization_code".into()],
                redirect_uris: vec![REDIRECT.into(), "https://app.example/cb2?x=1".into()],
                post_logout_redirect_uris: vec![LOGGED_OUT.into()],
                scopes: vec!["openid".into(), "email".into()],
                trusted,
                require_pkce: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .client
        .unwrap();
    let user = admin
        .create_user(CreateUserRequest {
            user: Some(User {
                username: "alice".into(),
                email: "alice@example.com".into(),
                ..Default::default()
            }),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    Setup {
        tp,
        client_id: client.client_id,
        user_id: user.user_id,
    }
}

fn authorize_path(client_id: &str, extra: &[(&str, &str)]) -> String {
    let mut p = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", REDIRECT),
        ("scope", "openid email"),
        ("state", "st<8>"),
        ("nonce", "n-1"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    p.extend_from_slice(extra);
    format!("/authorize?{}", encode(&p))
}

/// Logs in through the form; returns the page that follows.
async fn login(b: &mut Browser, page: &Resp, password: &str) -> Resp {
    let (req, csrf) = (page.field("request"), page.field("csrf"));
    b.post(
        "/login",
        &[
            ("request", &req),
            ("csrf", &csrf),
            ("username", "alice"),
            ("password", password),
        ],
    )
    .await
}

fn assert_code_redirect(r: &Resp, issuer: &str) -> String {
    assert_eq!(r.status, 303, "{}", r.body);
    let loc = r.header("location").unwrap();
    assert!(loc.starts_with(&format!("{REDIRECT}?")), "{loc}");
    let q = r.location_params();
    assert_eq!(q.get("state").map(String::as_str), Some("st<8>"));
    assert_eq!(q.get("iss").map(String::as_str), Some(issuer));
    assert!(!q.contains_key("error"), "{q:?}");
    let code = q.get("code").unwrap().clone();
    assert_eq!(code.len(), 43);
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_flow_through_login_and_consent_then_remembered() {
    let s = setup(false).await;
    let issuer =
        s.tp.config
            .section::<auth_svc::OAuthConfig>("oauth")
            .unwrap()
            .issuer
            .clone();
    let mut b = Browser::new(s.tp.http);

    let page = b.get(&authorize_path(&s.client_id, &[])).await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.assert_page_headers();
    assert!(page.body.contains("<main>") && page.body.contains("<label for=\"username\">"));
    assert!(
        page.body.contains("Pages &lt;Test&gt; App"),
        "client name escaped"
    );
    assert!(b.cookies.contains_key("sec_csrf"));
    assert!(
        !page.body.contains(CHALLENGE),
        "no request parameter in the page"
    );

    // Wrong password: the page again, with an error that names neither field, no session.
    let wrong = login(&mut b, &page, "wrong password").await;
    assert_eq!(wrong.status, 200);
    assert!(wrong.body.contains("role=\"alert\""), "{}", wrong.body);
    assert!(wrong.body.contains("username or password is incorrect"));
    assert!(!b.has_session());

    // Right password: session cookie, then the consent page listing the scopes.
    let consent = login(&mut b, &wrong, PASSWORD).await;
    assert_eq!(consent.status, 200, "{}", consent.body);
    consent.assert_page_headers();
    assert!(b.has_session());
    let set_cookie = consent.header("set-cookie").unwrap();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"));
    assert!(
        consent.body.contains("Read your email address"),
        "{}",
        consent.body
    );
    assert!(consent.body.contains("value=\"allow\""));
    let (req, csrf) = (consent.field("request"), consent.field("csrf"));
    let allowed = b
        .post(
            "/consent",
            &[
                ("request", &req),
                ("csrf", &csrf),
                ("decision", "allow"),
                ("remember", "yes"),
            ],
        )
        .await;
    let code = assert_code_redirect(&allowed, &issuer);
    allowed.assert_page_headers();
    let evs = events(&s.tp, &["sec.auth.code.issued", "sec.auth.consent.granted"]).await;
    let issued = evs
        .iter()
        .find(|e| e.r#type == "sec.auth.code.issued")
        .unwrap();
    assert_eq!(issued.subject, s.user_id);
    assert_eq!(issued.details["client_id"], s.client_id);
    assert_eq!(issued.details["scope"], "openid email");
    for e in &evs {
        assert!(!format!("{e:?}").contains(&code), "never the code: {e:?}");
    }
    sensitive_username_is_an_hmac(&s.tp).await;

    // The pending request was consumed: the same form again is refused.
    let again = b
        .post(
            "/consent",
            &[("request", &req), ("csrf", &csrf), ("decision", "allow")],
        )
        .await;
    assert_eq!(again.status, 400);
    assert!(again.header("location").is_none());

    // Second run: session and remembered consent: straight to the client.
    let direct = b.get(&authorize_path(&s.client_id, &[])).await;
    let code2 = assert_code_redirect(&direct, &issuer);
    assert_ne!(code2, allowed.location_params()["code"]);

    // prompt=none works silently now; prompt=consent shows the page again.
    let silent = b
        .get(&authorize_path(&s.client_id, &[("prompt", "none")]))
        .await;
    assert_code_redirect(&silent, &issuer);
    let asked = b
        .get(&authorize_path(&s.client_id, &[("prompt", "consent")]))
        .await;
    assert_eq!(asked.status, 200);
    assert!(asked.body.contains("value=\"deny\""));
    // prompt=login asks for the password again.
    let relogin = b
        .get(&authorize_path(&s.client_id, &[("prompt", "login")]))
        .await;
    assert!(relogin.body.contains("name=\"password\""));
    // A redirect URI with a query keeps it and gets ours appended with `&`.
    let path = authorize_path(&s.client_id, &[])
        .replace(&enc(REDIRECT), &enc("https://app.example/cb2?x=1"));
    let with_query = b.get(&path).await;
    assert_eq!(with_query.status, 303, "{}", with_query.body);
    let loc = with_query.header("location").unwrap();
    assert!(loc.starts_with("https://app.example/cb2?x=1&"), "{loc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_redirect_uris_never_redirect() {
    let s = setup(false).await;
    let mut b = Browser::new(s.tp.http);
    for bad in [
        "https://app.example:8443/cb",
        "https://app.example/cb/extra",
        "https://app.example/cb/../cb",
        "https://evil.example@app.example/cb",
        "https://app.example@evil.example/cb",
        "https://app.example%2Fcb",
        "https://app.example/%63b",
        "https://app.example/cb#x",
        "https://app.example/cb?",
        "http://app.example/cb",
        "https://APP.example/cb",
        "https://app.example.evil.example/cb",
        "//evil.example/cb",
    ] {
        let path = authorize_path(&s.client_id, &[]).replace(&enc(REDIRECT), &enc(bad));
        let r = b.get(&path).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.header("location").is_none(), "{bad}");
        r.assert_page_headers();
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
    }
    // Unknown client, missing client, duplicated parameter, oversized value: 400 pages.
    for path in [
        authorize_path("nobody", &[]),
        authorize_path(&s.client_id, &[]).replace("client_id=", "x="),
        authorize_path(&s.client_id, &[("redirect_uri", REDIRECT)]),
        authorize_path(&s.client_id, &[("state", &"x".repeat(5000))]),
    ] {
        let r = b.get(&path).await;
        assert_eq!(r.status, 400, "{path}");
        assert!(r.header("location").is_none(), "{path}");
    }
    // An oversized form body: 413, not read further.
    let big = "x".repeat(64 * 1024);
    let r = b
        .post("/authorize", &[("client_id", &s.client_id), ("pad", &big)])
        .await;
    assert_eq!(r.status, 413);
    assert!(r.header("location").is_none());
    // After the redirect URI is known, errors go to it, with state and iss.
    let r = b
        .get(&authorize_path(
            &s.client_id,
            &[("code_challenge_method", "plain")],
        ))
        .await;
    assert_eq!(r.status, 400, "duplicate parameter is a page");
    let plain = format!(
        "/authorize?{}",
        encode(&[
            ("response_type", "code"),
            ("client_id", &s.client_id),
            ("redirect_uri", REDIRECT),
            ("scope", "openid"),
            ("state", "s1"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "plain"),
        ])
    );
    let r = b.get(&plain).await;
    assert_eq!(r.status, 303);
    let q = r.location_params();
    assert_eq!(q["error"], "invalid_request");
    assert_eq!(q["state"], "s1");
    assert!(q.contains_key("iss"));
    let wide = b
        .get(
            &authorize_path(&s.client_id, &[])
                .replace(&enc("openid email"), &enc("openid profile")),
        )
        .await;
    assert_eq!(wide.location_params()["error"], "invalid_scope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_a_valid_csrf_token_are_forbidden() {
    let s = setup(false).await;
    let mut b = Browser::new(s.tp.http);
    let page = b.get(&authorize_path(&s.client_id, &[])).await;
    let req = page.field("request");
    let csrf = page.field("csrf");
    let creds = [("username", "alice"), ("password", PASSWORD)];
    for form in [
        vec![("request", req.as_str())],
        vec![("request", req.as_str()), ("csrf", "AAAA")],
        vec![("request", "other"), ("csrf", csrf.as_str())],
    ] {
        let mut f = form.clone();
        f.extend_from_slice(&creds);
        let r = b.post("/login", &f).await;
        assert_eq!(r.status, 403, "{f:?}");
        assert!(!b.has_session());
    }
    // The right token from another browser (without the CSRF cookie) is refused too.
    let mut other = Browser::new(s.tp.http);
    let mut f = vec![("request", req.as_str()), ("csrf", csrf.as_str())];
    f.extend_from_slice(&creds);
    assert_eq!(other.post("/login", &f).await.status, 403);
    // A login token does not work on the consent form.
    let r = b
        .post(
            "/consent",
            &[("request", &req), ("csrf", &csrf), ("decision", "allow")],
        )
        .await;
    assert_eq!(r.status, 403);
    // And the genuine form still works.
    assert_eq!(login(&mut b, &page, PASSWORD).await.status, 200);
    assert!(b.has_session());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_none_without_session_and_deny_go_back_to_the_client() {
    let s = setup(false).await;
    let issuer =
        s.tp.config
            .section::<auth_svc::OAuthConfig>("oauth")
            .unwrap()
            .issuer
            .clone();
    let mut b = Browser::new(s.tp.http);
    let r = b
        .get(&authorize_path(&s.client_id, &[("prompt", "none")]))
        .await;
    assert_eq!(r.status, 303);
    let q = r.location_params();
    assert_eq!(q["error"], "login_required");
    assert_eq!(q["state"], "st<8>");
    assert_eq!(q["iss"], issuer);
    assert!(r.header("location").unwrap().starts_with(REDIRECT));

    let page = b.get(&authorize_path(&s.client_id, &[])).await;
    let consent = login(&mut b, &page, PASSWORD).await;
    // Logged in but no consent yet: prompt=none says consent_required.
    let r = b
        .get(&authorize_path(&s.client_id, &[("prompt", "none")]))
        .await;
    assert_eq!(r.location_params()["error"], "consent_required");
    let denied = b
        .post(
            "/consent",
            &[
                ("request", &consent.field("request")),
                ("csrf", &consent.field("csrf")),
                ("decision", "deny"),
            ],
        )
        .await;
    assert_eq!(denied.status, 303);
    let q = denied.location_params();
    assert_eq!(q["error"], "access_denied");
    assert_eq!(q["iss"], issuer);
    assert!(!q.contains_key("code"));
    let evs = events(&s.tp, &["sec.auth.consent.denied"]).await;
    assert!(!evs.iter().any(|e| e.r#type == "sec.auth.code.issued"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_post_answers_with_a_self_submitting_form() {
    let s = setup(true).await;
    let mut b = Browser::new(s.tp.http);
    let page = b
        .get(&authorize_path(
            &s.client_id,
            &[("response_mode", "form_post")],
        ))
        .await;
    // Trusted client: no consent page after login.
    let r = login(&mut b, &page, PASSWORD).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.contains(&format!("form-action {REDIRECT}")), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(r.body.contains(&format!("action=\"{REDIRECT}\"")));
    assert_eq!(r.field("code").len(), 43);
    assert_eq!(r.field("state"), "st&lt;8&gt;");
    assert!(r.body.contains("<noscript>"));
    assert!(r.header("location").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_with_and_without_a_registered_redirect() {
    let s = setup(true).await;
    let mut b = Browser::new(s.tp.http);
    let page = b.get(&authorize_path(&s.client_id, &[])).await;
    assert_eq!(login(&mut b, &page, PASSWORD).await.status, 303);
    assert!(b.has_session());

    // An ID token for the client, as /token would issue it.
    let mut tokens =
        TokenServiceClient::with_interceptor(s.tp.channel("token"), s.tp.as_service("auth"));
    let issued = tokens
        .issue_tokens(IssueTokensRequest {
            grant: Some(Grant {
                subject: s.user_id.clone(),
                client_id: s.client_id.clone(),
                scope: "openid".into(),
                ..Default::default()
            }),
            id_token: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let hint = issued.id_token.unwrap().token;

    // Unregistered post-logout URI: an error page, no redirect, still logged in.
    for bad in [
        "https://evil.example/bye",
        "https://app.example/bye/",
        REDIRECT,
    ] {
        let r = b
            .get(&format!(
                "/logout?{}",
                encode(&[("id_token_hint", &hint), ("post_logout_redirect_uri", bad)])
            ))
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.header("location").is_none());
        assert!(b.has_session());
    }
    // A tampered hint is no hint: it cannot vouch for a redirect, and logs nobody out.
    let (signed, sig) = hint.rsplit_once('.').unwrap();
    let mid = sig.len() / 2;
    let flipped = if &sig[mid..=mid] == "A" { "B" } else { "A" };
    let tampered = format!("{signed}.{}{flipped}{}", &sig[..mid], &sig[mid + 1..]);
    let r = b
        .get(&format!(
            "/logout?{}",
            encode(&[
                ("id_token_hint", &tampered),
                ("post_logout_redirect_uri", LOGGED_OUT)
            ])
        ))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.header("location").is_none());
    let r = b
        .get(&format!(
            "/logout?{}",
            encode(&[("id_token_hint", &tampered)])
        ))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("name=\"logout\""), "a confirmation page");
    assert!(b.has_session());

    // Mismatched client_id: an error page.
    let r = b
        .get(&format!(
            "/logout?{}",
            encode(&[("id_token_hint", &hint), ("client_id", "someone-else")])
        ))
        .await;
    assert_eq!(r.status, 400);

    // Registered: logged out, cookie cleared, redirected with state.
    let r = b
        .get(&format!(
            "/logout?{}",
            encode(&[
                ("id_token_hint", &hint),
                ("post_logout_redirect_uri", LOGGED_OUT),
                ("state", "bye-1"),
            ])
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some(format!("{LOGGED_OUT}?state=bye-1").as_str())
    );
    assert!(!b.has_session());
    let again = b
        .get(&authorize_path(&s.client_id, &[("prompt", "none")]))
        .await;
    assert_eq!(again.location_params()["error"], "login_required");

    // Without a hint: a confirmation page, CSRF-protected, then the signed-out page.
    let page = b.get(&authorize_path(&s.client_id, &[])).await;
    assert_eq!(login(&mut b, &page, PASSWORD).await.status, 303);
    let confirm = b.get("/logout").await;
    assert_eq!(confirm.status, 200);
    confirm.assert_page_headers();
    assert!(b.has_session(), "a bare GET does not log out");
    let id = confirm.field("logout");
    let forged = b
        .post("/logout", &[("logout", &id), ("csrf", "AAAA")])
        .await;
    assert_eq!(forged.status, 403);
    assert!(b.has_session());
    let done = b
        .post(
            "/logout",
            &[("logout", &id), ("csrf", &confirm.field("csrf"))],
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("signed out"));
    assert!(!b.has_session());
    let again = b
        .get(&authorize_path(&s.client_id, &[("prompt", "none")]))
        .await;
    assert_eq!(again.location_params()["error"], "login_required");
    let evs = events(&s.tp, &["sec.auth.logout"]).await;
    let logouts: Vec<_> = evs
        .iter()
        .filter(|e| e.r#type == "sec.auth.logout")
        .collect();
    assert!(
        logouts.iter().all(|e| e.subject == s.user_id),
        "{logouts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_yields_one_code_under_parallel_submissions() {
    let s = setup(false).await;
    let mut b = Browser::new(s.tp.http);
    let page = b.get(&authorize_path(&s.client_id, &[])).await;
    let consent = login(&mut b, &page, PASSWORD).await;
    let (req, csrf) = (consent.field("request"), consent.field("csrf"));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (mut b, req, csrf) = (b.clone(), req.clone(), csrf.clone());
        tasks.push(tokio::spawn(async move {
            b.post(
                "/consent",
                &[("request", &req), ("csrf", &csrf), ("decision", "allow")],
            )
            .await
            .status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![303, 400, 400, 400, 400, 400]);
}
