//! auth-svc against real third-party relying parties: the Rust `openidconnect` crate (in
//! this file), npm `openid-client` and Python `authlib` (scripts in
//! `tests/interop/oidc/`, installed by the tests under the target directory), and headless
//! Chromium driven through `puppeteer-core`.
//!
//! Every client runs the same list against a platform on an ephemeral port, with the issuer
//! set to the facade's URL: discovery; authorization code with PKCE S256 through the real
//! login form and consent page (the client builds the URL, a cookie-keeping user agent
//! fills the forms and stops at the redirect, whose `iss` it checks, RFC 9207); token
//! exchange; ID-token validation by the library (signature from `/jwks`, iss, aud, nonce);
//! userinfo; introspection of the JWT access token and of the refresh token; refresh with
//! rotation; reuse detection (the old refresh token refused, then the new one: the family
//! is revoked); revocation of both kinds, seen by introspection and userinfo; client
//! credentials; a public client with PKCE. Each step prints `ok <step>`, and the test asserts
//! every step of [`STEPS`] was reached.
//!
//! Gate: these tests print `*** SKIPPED` unless `SEC_TEST_INTEROP` is set; with
//! `SEC_TEST_INTEROP=required` (CI) a missing tool (node, python3, chromium) fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreErrorResponseType, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreRevocableToken, CoreSubjectIdentifierType, CoreTokenResponse,
    CoreUserInfoClaims,
};
use openidconnect::{
    AccessToken, AccessTokenHash, AdditionalProviderMetadata, AuthorizationCode, ClientId,
    ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet, EndpointSet, HttpRequest,
    HttpResponse, IntrospectionUrl, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    ProviderMetadata, RedirectUrl, RequestTokenError, RevocationUrl, Scope, SubjectIdentifier,
    TokenIntrospectionResponse, TokenResponse, UserInfoError, http, url,
};
use sec_proto::auth::v1 as pb;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_tests::{Backends, TestPlatform};
use token_svc::TokenConfig;

/// What every client reaches, in order.
const STEPS: &[&str] = &[
    "discovery",
    "authorize_login_form",
    "token_exchange",
    "id_token_validated",
    "userinfo",
    "introspect_access_active",
    "introspect_refresh_active",
    "refresh_rotated",
    "reuse_old_refused",
    "reuse_family_revoked",
    "revoke_access",
    "revoke_refresh",
    "client_credentials",
    "public_client_pkce",
];

const SCOPE: &str = "openid profile email offline_access";
/// Never dereferenced: every flow stops at the `Location` header.
const REDIRECT_URI: &str = "http://127.0.0.1:9/cb";

// ---------------------------------------------------------------------------------------
// The platform and what the clients are given
// ---------------------------------------------------------------------------------------

/// What a relying party is given: the issuer, two clients and a user (the JSON every
/// script reads on stdin).
#[derive(Debug, Clone)]
struct RpInput {
    issuer: String,
    conf_id: String,
    conf_secret: String,
    public_id: String,
    username: String,
    password: String,
    sub: String,
    email: String,
}

impl RpInput {
    fn json(&self) -> String {
        serde_json::json!({
            "issuer": self.issuer,
            "scope": SCOPE,
            "confidential": {
                "client_id": self.conf_id,
                "client_secret": self.conf_secret,
                "redirect_uri": REDIRECT_URI,
            },
            "public": { "client_id": self.public_id, "redirect_uri": REDIRECT_URI },
            "user": {
                "username": self.username,
                "password": self.password,
                "sub": self.sub,
                "email": self.email,
            },
        })
        .to_string()
    }

    /// The fixture line `oidc_provider.mjs` prints.
    fn from_json(v: &serde_json::Value) -> Self {
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap().to_owned();
        Self {
            issuer: s("/issuer"),
            conf_id: s("/confidential/client_id"),
            conf_secret: s("/confidential/client_secret"),
            public_id: s("/public/client_id"),
            username: s("/user/username"),
            password: s("/user/password"),
            sub: s("/user/sub"),
            email: s("/user/email"),
        }
    }
}

struct Fixture {
    tp: TestPlatform,
    rp: RpInput,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0_u8; bytes];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A platform whose issuer is the facade's URL (set by the harness), without a refresh
/// grace window (so reuse is detected at once), with a confidential client
/// (client_secret_basic; authorization_code, refresh_token, client_credentials; PKCE
/// required), a public client (PKCE, no secret) and a user with a password. Neither client
/// is trusted, so the consent page is shown.
async fn fixture() -> Fixture {
    let mut seed = TestPlatform::seed(Backends::Embedded).unwrap();
    let token = TokenConfig {
        refresh_grace_seconds: 0,
        ..seed
            .config
            .section::<TokenConfig>(token_svc::NAME)
            .unwrap()
            .clone()
    };
    seed.config.set_section(token_svc::NAME, token).unwrap();
    let tp = TestPlatform::start_with(seed, None).await;
    let issuer = format!("http://{}", tp.http);
    assert_eq!(
        tp.config
            .section::<auth_svc::OAuthConfig>(auth_svc::SECTION)
            .unwrap()
            .issuer,
        issuer
    );
    assert_eq!(
        tp.config
            .section::<TokenConfig>(token_svc::NAME)
            .unwrap()
            .issuer,
        issuer
    );
    let mut admin =
        AuthServiceClient::with_interceptor(tp.channel("auth"), tp.admin_bearer().unwrap());
    let scopes: Vec<String> = SCOPE.split(' ').map(str::to_owned).collect();
    let conf = admin
        .create_client(pb::CreateClientRequest {
            client: Some(pb::Client {
                name: "interop confidential".into(),
                r#type: pb::ClientType::Confidential as i32,
                token_endpoint_auth_method: "client_secret_basic".into(),
                grant_types: vec![
                    "authorization_code".into(),
                    "refresh_token".into(),
                    "client_credentials".into(),
                ],
                redirect_uris: vec![REDIRECT_URI.into()],
                scopes: scopes.clone(),
                require_pkce: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!conf.client_secret.is_empty());
    let public = admin
        .create_client(pb::CreateClientRequest {
            client: Some(pb::Client {
                name: "interop public".into(),
                r#type: pb::ClientType::Public as i32,
                token_endpoint_auth_method: "none".into(),
                grant_types: vec!["authorization_code".into(), "refresh_token".into()],
                redirect_uris: vec![REDIRECT_URI.into()],
                scopes,
                require_pkce: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let username = format!("interop-{}", random_hex(4));
    let email = format!("{username}@example.com");
    let password = format!("Pw-{}", random_hex(16));
    let user = admin
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                username: username.clone(),
                email: email.clone(),
                email_verified: true,
                claims_json: r#"{"name":"Ada Interop","given_name":"Ada"}"#.into(),
                ..Default::default()
            }),
            password: password.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    Fixture {
        tp,
        rp: RpInput {
            issuer,
            conf_id: conf.client.unwrap().client_id,
            conf_secret: conf.client_secret,
            public_id: public.client.unwrap().client_id,
            username,
            password,
            sub: user.user_id,
            email,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Gating and third-party tools
// ---------------------------------------------------------------------------------------

/// Whether the interop suite runs at all (`SEC_TEST_INTEROP` set); prints why not.
fn interop_enabled(what: &str) -> bool {
    if std::env::var_os("SEC_TEST_INTEROP").is_some() {
        return true;
    }
    sec_testkit::skipped(&format!("{what} (set SEC_TEST_INTEROP=1 to run it)"));
    false
}

/// A missing tool skips loudly, or fails under `SEC_TEST_INTEROP=required` (as CI sets it).
fn interop_skipped(what: &str) {
    assert!(
        std::env::var("SEC_TEST_INTEROP").as_deref() != Ok("required"),
        "{what}, and SEC_TEST_INTEROP=required"
    );
    sec_testkit::skipped(what);
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/oidc")
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// npm packages of the node client and the browser driver, installed once under the
/// target directory.
fn node_modules(packages: &[&str]) -> PathBuf {
    // The tests of this file run in parallel: two `npm install`s into one prefix at once
    // break each other (a CI run failed so), so one installs while the other waits.
    static NPM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = NPM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = target_dir().join("node-oidc");
    let missing: Vec<&&str> = packages
        .iter()
        .filter(|p| {
            let name = p.rsplit_once('@').map_or(**p, |(n, _)| n);
            !dir.join("node_modules").join(name).exists()
        })
        .collect();
    if !missing.is_empty() {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(packages)
            .status()
            .unwrap();
        assert!(st.success(), "npm install {packages:?} failed");
    }
    dir
}

/// Runs a script with `input` on stdin, bounded in time: (success, stdout + stderr).
async fn run_script(mut cmd: Command, input: String) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let pid = child.id();
        // A hung client must not hang the suite: kill it after 120 s.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if rx
                .recv_timeout(std::time::Duration::from_secs(120))
                .is_err()
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        let _ = watchdog.join();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

/// Every step of [`STEPS`] printed as `ok <step>`, in order.
fn assert_all_steps(who: &str, ok: bool, out: &str) {
    let done: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .map(str::trim)
        .collect();
    assert!(ok, "{who} failed after {done:?}:\n{out}");
    assert_eq!(done, STEPS, "{who}:\n{out}");
}

// ---------------------------------------------------------------------------------------
// The third-party scripts
// ---------------------------------------------------------------------------------------

/// The steps of `browser.mjs`, in order.
const BROWSER_STEPS: &[&str] = &[
    "login_page_headers",
    "login_labels",
    "consent_page_headers",
    "code_with_javascript",
    "code_without_javascript",
    "wrong_password_visible_error",
];

fn chromium() -> Option<String> {
    let c = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    Path::new(&c).exists().then_some(c)
}

/// authlib and requests, installed once under the target directory.
fn python_packages() -> PathBuf {
    let py = target_dir().join("pyenv-oidc");
    if !py.join("authlib").exists() || !py.join("requests").exists() {
        let st = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&py)
            .args(["authlib>=1.6,<2", "requests>=2.31,<3"])
            .status()
            .unwrap();
        assert!(st.success(), "pip install authlib requests failed");
    }
    py
}

async fn run_node_client(dir: &Path, rp: &RpInput) -> (bool, String) {
    let mut cmd = Command::new("node");
    cmd.arg(scripts().join("client_node.mjs"))
        .env("OIDC_NODE_DIR", dir);
    run_script(cmd, rp.json()).await
}

async fn run_authlib_client(py: &Path, rp: &RpInput) -> (bool, String) {
    let mut cmd = Command::new("python3");
    cmd.arg(scripts().join("client_authlib.py"))
        .env("PYTHONPATH", py);
    run_script(cmd, rp.json()).await
}

async fn run_browser(dir: &Path, chromium: &str, rp: &RpInput) -> (bool, String) {
    let mut cmd = Command::new("node");
    cmd.arg(scripts().join("browser.mjs"))
        .env("OIDC_NODE_DIR", dir)
        .env("CHROMIUM", chromium);
    run_script(cmd, rp.json()).await
}

fn assert_browser_steps(ok: bool, out: &str) {
    let done: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("ok ")).collect();
    assert!(ok, "browser test failed after {done:?}:\n{out}");
    assert_eq!(done, BROWSER_STEPS, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openid_client_node_runs_the_relying_party_list() {
    if !interop_enabled("openid-client (npm) against auth-svc") {
        return;
    }
    if !(have("node") && have("npm")) {
        interop_skipped("openid-client interop (node/npm not installed)");
        return;
    }
    let dir = node_modules(&["openid-client@6"]);
    let fx = fixture().await;
    let (ok, out) = run_node_client(&dir, &fx.rp).await;
    println!("openid-client:\n{out}");
    let (r, _) = fx.tp.stop().await;
    r.unwrap();
    assert_all_steps("openid-client", ok, &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_python_runs_the_relying_party_list() {
    if !interop_enabled("authlib (PyPI) against auth-svc") {
        return;
    }
    if !have("python3") {
        interop_skipped("authlib interop (python3 not installed)");
        return;
    }
    let py = python_packages();
    let fx = fixture().await;
    let (ok, out) = run_authlib_client(&py, &fx.rp).await;
    println!("authlib:\n{out}");
    let (r, _) = fx.tp.stop().await;
    r.unwrap();
    assert_all_steps("authlib", ok, &out);
}

/// Headless Chromium (Debian's `chromium`, see `ensure-chromium.sh`) through
/// `puppeteer-core`: the login and consent pages as a person uses them (inputs found by
/// their labels, a main landmark), their security headers (CSP with frame-ancestors,
/// Referrer-Policy, no-store), the session cookie (HttpOnly, SameSite=Lax), the code
/// exchanged; the same with JavaScript disabled; a wrong password shown as a visible error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_consents_through_the_pages() {
    if !interop_enabled("headless Chromium against the login and consent pages") {
        return;
    }
    let Some(chromium) = chromium().filter(|_| have("node") && have("npm")) else {
        interop_skipped("browser test (chromium or node/npm not installed)");
        return;
    };
    let dir = node_modules(&["openid-client@6", "puppeteer-core@25"]);
    let fx = fixture().await;
    let (ok, out) = run_browser(&dir, &chromium, &fx.rp).await;
    println!("chromium:\n{out}");
    let (r, _) = fx.tp.stop().await;
    r.unwrap();
    assert_browser_steps(ok, &out);
}

/// `oidc_provider.mjs` in a child process; killed on drop.
struct ReferenceOp {
    child: std::process::Child,
    /// Kept open: the provider writes to it, and a closed pipe would kill it (EPIPE).
    _stdout: std::io::BufReader<std::process::ChildStdout>,
    rp: RpInput,
}

impl ReferenceOp {
    fn start(dir: &Path) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new("node")
            .arg(scripts().join("oidc_provider.mjs"))
            .arg("reference")
            .env("OIDC_NODE_DIR", dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("oidc-provider did not start ({e}): {line}"));
        Self {
            child,
            _stdout: stdout,
            rp: RpInput::from_json(&v),
        }
    }
}

impl Drop for ReferenceOp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The suite checked against a certified provider: the four relying parties and the
/// browser driver pass every step against panva/node-oidc-provider set up with the same
/// clients, user and endpoint paths (and login and consent forms of the same shape), so a
/// failure against auth-svc is auth-svc's, not the scripts'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_passes_against_oidc_provider_reference() {
    if !interop_enabled("the interop clients against oidc-provider (reference OP)") {
        return;
    }
    if !(have("node") && have("npm")) {
        interop_skipped("reference OP (node/npm not installed)");
        return;
    }
    let chromium = chromium();
    let mut packages = vec!["openid-client@6", "oidc-provider@9"];
    if chromium.is_some() {
        packages.push("puppeteer-core@25");
    }
    let dir = node_modules(&packages);
    let op = ReferenceOp::start(&dir);
    let done = rust_relying_party(&op.rp).await;
    assert_eq!(done, STEPS, "openidconnect");
    let (ok, out) = run_node_client(&dir, &op.rp).await;
    println!("openid-client:\n{out}");
    assert_all_steps("openid-client", ok, &out);
    if have("python3") {
        let (ok, out) = run_authlib_client(&python_packages(), &op.rp).await;
        println!("authlib:\n{out}");
        assert_all_steps("authlib", ok, &out);
    } else {
        interop_skipped("authlib against the reference OP (python3 not installed)");
    }
    if let Some(c) = chromium {
        let (ok, out) = run_browser(&dir, &c, &op.rp).await;
        println!("chromium:\n{out}");
        assert_browser_steps(ok, &out);
    } else {
        interop_skipped("browser test against the reference OP (chromium not installed)");
    }
}

// ---------------------------------------------------------------------------------------
// The Rust relying party: the `openidconnect` crate over a loopback HTTP/1.1 client
// ---------------------------------------------------------------------------------------

/// `revocation_endpoint` and `introspection_endpoint` of the discovery document (RFC 8414),
/// which `openidconnect` leaves to additional metadata.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
struct OAuthEndpoints {
    revocation_endpoint: String,
    introspection_endpoint: String,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}
impl AdditionalProviderMetadata for OAuthEndpoints {}

type Metadata = ProviderMetadata<
    OAuthEndpoints,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

type Rp = CoreClient<
    EndpointSet,      // authorization
    EndpointNotSet,   // device authorization
    EndpointSet,      // introspection
    EndpointSet,      // revocation
    EndpointMaybeSet, // token
    EndpointMaybeSet, // userinfo
>;

/// One HTTP/1.1 exchange on loopback (`Connection: close`; plain or chunked bodies): the
/// `openidconnect` HTTP client, and the user agent's.
async fn send(req: HttpRequest) -> std::io::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let uri = req.uri().clone();
    let host = uri.authority().ok_or_else(|| bad("no authority"))?.as_str();
    // Plain HTTP to loopback only. `https` is accepted for the revocation URL alone: oauth2
    // refuses a non-https revocation endpoint (RFC 7009 §2 requires TLS) and has no switch,
    // so the test hands it the https spelling of the loopback URL and speaks plain HTTP.
    let loopback = host.starts_with("127.0.0.1:") || host.starts_with("[::1]:");
    let revoke = uri.scheme_str() == Some("https") && uri.path() == "/revoke";
    if !(loopback && (uri.scheme_str() == Some("http") || revoke)) {
        return Err(bad("loopback http only"));
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n",
        req.method()
    );
    for (k, v) in req.headers() {
        head.push_str(&format!(
            "{k}: {}\r\n",
            v.to_str().map_err(|_| bad("header"))?
        ));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", req.body().len()));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(req.body()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .map_err(|_| bad("timeout"))??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let mut resp = http::Response::builder().status(status);
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            chunked |=
                k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked");
            resp = resp.header(k, v);
        }
    }
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk size"))?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| bad("chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).ok_or_else(|| bad("chunk"))?);
            rest = rest.get(size + 2..).ok_or_else(|| bad("chunk"))?;
        }
        body = out;
    }
    resp.body(body).map_err(|e| bad(&e.to_string()))
}

/// The attributes of one tag's inner text (`name="v"`, `name='v'`, `name=v`, `name`),
/// lower-cased names, entity-decoded values.
fn attributes(tag: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let b = tag.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' && b[i] != b'/' {
            i += 1;
        }
        if start == i {
            i += 1;
            continue;
        }
        let name = tag[start..i].to_ascii_lowercase();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
                let q = b[i];
                let vs = i + 1;
                i = vs;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                value = tag[vs..i.min(b.len())].to_owned();
                i += 1;
            } else {
                let vs = i;
                while i < b.len() && !b[i].is_ascii_whitespace() {
                    i += 1;
                }
                value = tag[vs..i].to_owned();
            }
        }
        out.insert(name, unescape(&value));
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        let Some(end) = rest.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let ent = &rest[1..end];
        let ch = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                u32::from_str_radix(&ent[2..], 16)
                    .ok()
                    .and_then(char::from_u32)
            }
            _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[derive(Debug, Default)]
struct Form {
    action: String,
    method: String,
    inputs: Vec<HashMap<String, String>>,
    /// Submit buttons: attributes plus `text`.
    buttons: Vec<HashMap<String, String>>,
}

/// Each `<tag ...>` of `html` with its attribute text and the position after it.
fn tags<'a>(
    html: &'a str,
    lower: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (usize, &'a str, usize)> + 'a {
    let open = format!("<{name}");
    let mut from = 0;
    std::iter::from_fn(move || {
        loop {
            let p = from + lower[from..].find(&open)?;
            let after = p + open.len();
            let next = lower.as_bytes().get(after).copied().unwrap_or(b'>');
            let end = after + lower[after..].find('>')?;
            from = end + 1;
            if next.is_ascii_whitespace() || next == b'>' || next == b'/' {
                return Some((p, &html[after..end], end + 1));
            }
        }
    })
}

fn forms(html: &str) -> Vec<Form> {
    let lower = html.to_ascii_lowercase();
    let mut out = Vec::new();
    for (_, attrs, body_start) in tags(html, &lower, "form") {
        let a = attributes(attrs);
        let body_end = lower[body_start..]
            .find("</form")
            .map_or(html.len(), |e| body_start + e);
        let body = &html[body_start..body_end];
        let lbody = &lower[body_start..body_end];
        let mut f = Form {
            action: a.get("action").cloned().unwrap_or_default(),
            method: a
                .get("method")
                .cloned()
                .unwrap_or_else(|| "get".into())
                .to_ascii_lowercase(),
            ..Form::default()
        };
        for (_, t, _) in tags(body, lbody, "input") {
            let i = attributes(t);
            if i.get("type")
                .is_some_and(|t| t.eq_ignore_ascii_case("submit"))
            {
                let mut b = i.clone();
                b.insert("text".into(), i.get("value").cloned().unwrap_or_default());
                f.buttons.push(b);
            }
            f.inputs.push(i);
        }
        for (_, t, after) in tags(body, lbody, "button") {
            let mut b = attributes(t);
            let end = lbody[after..].find("</button").map_or(after, |e| after + e);
            let mut text = String::new();
            let mut in_tag = false;
            for c in body[after..end].chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            if b.get("type")
                .is_none_or(|t| t.eq_ignore_ascii_case("submit"))
            {
                b.insert("text".into(), text.trim().to_owned());
                f.buttons.push(b);
            }
        }
        out.push(f);
    }
    out
}

fn is_approve(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    [
        "approve",
        "allow",
        "accept",
        "grant",
        "authorize",
        "authorise",
        "consent",
        "yes",
        "continue",
    ]
    .iter()
    .any(|w| s.contains(w))
}

fn is_deny(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    ["deny", "cancel", "reject", "decline", "refuse"]
        .iter()
        .any(|w| s.contains(w))
        || s.split(|c: char| !c.is_alphanumeric()).any(|w| w == "no")
}

fn button_text(b: &HashMap<String, String>) -> String {
    ["name", "value", "text"]
        .iter()
        .filter_map(|k| b.get(*k))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The fields a browser submits: named inputs (checked boxes only) and the pressed button.
fn fields(f: &Form, button: Option<&HashMap<String, String>>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in &f.inputs {
        let ty = i
            .get("type")
            .map_or("text".to_owned(), |t| t.to_ascii_lowercase());
        let Some(name) = i.get("name") else { continue };
        if matches!(ty.as_str(), "submit" | "button" | "image") {
            continue;
        }
        if matches!(ty.as_str(), "checkbox" | "radio") && !i.contains_key("checked") {
            continue;
        }
        let default = if ty == "checkbox" { "on" } else { "" };
        out.push((
            name.clone(),
            i.get("value").cloned().unwrap_or_else(|| default.into()),
        ));
    }
    if let Some(b) = button
        && let Some(n) = b.get("name")
    {
        out.push((n.clone(), b.get("value").cloned().unwrap_or_default()));
    }
    out
}

/// The browser of the flow: a cookie jar, and the login and consent forms filled in.
struct UserAgent {
    jar: HashMap<String, String>,
    username: String,
    password: String,
}

impl UserAgent {
    async fn request(
        &mut self,
        method: &str,
        url: &url::Url,
        form: Option<String>,
    ) -> HttpResponse {
        let mut b = http::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header("accept", "text/html");
        if !self.jar.is_empty() {
            let c: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            b = b.header("cookie", c.join("; "));
        }
        if form.is_some() {
            b = b.header("content-type", "application/x-www-form-urlencoded");
        }
        let resp = send(b.body(form.unwrap_or_default().into_bytes()).unwrap())
            .await
            .unwrap();
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let mut parts = c.split(';');
            let (k, v) = parts.next().unwrap().split_once('=').unwrap();
            let gone = v.trim().is_empty()
                || parts.any(|a| a.trim().to_ascii_lowercase().starts_with("max-age=0"));
            if gone {
                self.jar.remove(k.trim());
            } else {
                self.jar.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        resp
    }

    /// From the authorization URL to the redirect back to `redirect_uri` (returned).
    async fn authorize(&mut self, auth_url: &url::Url, redirect_uri: &str) -> url::Url {
        let mut url = auth_url.clone();
        let mut method = "GET";
        let mut body: Option<String> = None;
        for _ in 0..12 {
            let resp = self.request(method, &url, body.take()).await;
            let status = resp.status().as_u16();
            if (300..400).contains(&status) {
                let loc = resp.headers()["location"].to_str().unwrap();
                let next = url.join(loc).unwrap();
                if next.as_str().starts_with(redirect_uri) {
                    let q: HashMap<_, _> = next.query_pairs().into_owned().collect();
                    assert!(!q.contains_key("error"), "authorization error: {q:?}");
                    return next;
                }
                assert_eq!(
                    next.origin(),
                    auth_url.origin(),
                    "redirect off the server: {next}"
                );
                url = next;
                method = "GET";
                continue;
            }
            let html = String::from_utf8_lossy(resp.body()).into_owned();
            assert_eq!(status, 200, "page {url}: {html}");
            let all = forms(&html);
            let login = all.iter().find(|f| {
                f.inputs.iter().any(|i| {
                    i.get("type")
                        .is_some_and(|t| t.eq_ignore_ascii_case("password"))
                })
            });
            let (form, data) = if let Some(f) = login {
                assert!(
                    f.inputs
                        .iter()
                        .any(|i| i.get("name").is_some_and(|n| n == "username")),
                    "login form has a username input"
                );
                assert!(
                    f.inputs.iter().any(|i| i
                        .get("type")
                        .is_some_and(|t| t.eq_ignore_ascii_case("hidden"))),
                    "login form has a hidden CSRF field"
                );
                let button = f.buttons.iter().find(|b| !is_deny(&button_text(b)));
                let mut data: Vec<_> = fields(f, button)
                    .into_iter()
                    .filter(|(k, _)| k != "username" && k != "password")
                    .collect();
                data.push(("username".into(), self.username.clone()));
                data.push(("password".into(), self.password.clone()));
                (f, data)
            } else {
                let (f, b) = all
                    .iter()
                    .flat_map(|f| f.buttons.iter().map(move |b| (f, b)))
                    .find(|(_, b)| is_approve(&button_text(b)) && !is_deny(&button_text(b)))
                    .unwrap_or_else(|| {
                        panic!("a consent form with an approve button at {url}: {html}")
                    });
                (f, fields(f, Some(b)))
            };
            let encoded = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&data)
                .finish();
            url = if form.action.is_empty() {
                url.clone()
            } else {
                url.join(&form.action).unwrap()
            };
            if form.method == "post" {
                method = "POST";
                body = Some(encoded);
            } else {
                method = "GET";
                url.set_query(Some(&encoded));
            }
        }
        panic!("too many hops before the redirect back");
    }
}

fn step(done: &mut Vec<&'static str>, name: &'static str) {
    println!("ok {name}");
    done.push(name);
}

fn is_invalid_grant<T: std::fmt::Debug, RE: std::error::Error>(
    r: &Result<
        T,
        RequestTokenError<RE, openidconnect::StandardErrorResponse<CoreErrorResponseType>>,
    >,
) -> bool {
    matches!(r, Err(RequestTokenError::ServerResponse(e)) if *e.error() == CoreErrorResponseType::InvalidGrant)
}

/// Authorization code + PKCE S256 through the pages; the crate builds the URL and validates
/// the ID token (signature from the discovered JWKS, iss, aud, exp, nonce, at_hash).
async fn code_flow(
    rp: &Rp,
    ua: &mut UserAgent,
    issuer: &str,
) -> (CoreTokenResponse, openidconnect::core::CoreIdTokenClaims) {
    let http = |r: HttpRequest| send(r);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = rp.authorize_url(
        CoreAuthenticationFlow::AuthorizationCode,
        CsrfToken::new_random,
        Nonce::new_random,
    );
    for s in SCOPE.split(' ').filter(|s| *s != "openid") {
        req = req.add_scope(Scope::new(s.into()));
    }
    let (auth_url, state, nonce) = req.set_pkce_challenge(challenge).url();
    assert!(auth_url.as_str().contains("code_challenge_method=S256"));
    let back = ua.authorize(&auth_url, REDIRECT_URI).await;
    let q: HashMap<_, _> = back.query_pairs().into_owned().collect();
    assert_eq!(
        q.get("iss").map(String::as_str),
        Some(issuer),
        "RFC 9207 iss in {back}"
    );
    assert_eq!(q.get("state"), Some(state.secret()), "state echoed");
    let code = AuthorizationCode::new(q["code"].clone());
    let tokens = rp
        .exchange_code(code)
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    let id_token = tokens.id_token().expect("an ID token");
    let claims = id_token
        .claims(&rp.id_token_verifier(), &nonce)
        .expect("the ID token validates")
        .clone();
    if let Some(expected) = claims.access_token_hash() {
        let actual = AccessTokenHash::from_token(
            tokens.access_token(),
            id_token.signing_alg().unwrap(),
            id_token.signing_key(&rp.id_token_verifier()).unwrap(),
        )
        .unwrap();
        assert_eq!(&actual, expected, "at_hash");
    }
    (tokens, claims)
}

/// The same list as the scripts, with `openidconnect` (4.x) as the relying party.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openidconnect_crate_runs_the_relying_party_list() {
    if !interop_enabled("openidconnect (crates.io) against auth-svc") {
        return;
    }
    let fx = fixture().await;
    let done = rust_relying_party(&fx.rp).await;
    let (r, _) = fx.tp.stop().await;
    r.unwrap();
    assert_eq!(done, STEPS);
}

async fn rust_relying_party(fx: &RpInput) -> Vec<&'static str> {
    let http = |r: HttpRequest| send(r);
    let mut done = Vec::new();
    let issuer = IssuerUrl::new(fx.issuer.clone()).unwrap();
    let md = Metadata::discover_async(issuer, &http).await.unwrap();
    assert_eq!(md.issuer().as_str(), fx.issuer);
    let extra = md.additional_metadata().clone();
    assert!(
        extra.authorization_response_iss_parameter_supported,
        "RFC 9207 advertised"
    );
    let build = |id: &str, secret: Option<&str>| -> Rp {
        CoreClient::from_provider_metadata(
            md.clone(),
            ClientId::new(id.into()),
            secret.map(|s| ClientSecret::new(s.into())),
        )
        .set_redirect_uri(RedirectUrl::new(REDIRECT_URI.into()).unwrap())
        .set_revocation_url(
            RevocationUrl::new(extra.revocation_endpoint.replacen("http://", "https://", 1))
                .unwrap(),
        )
        .set_introspection_url(IntrospectionUrl::new(extra.introspection_endpoint.clone()).unwrap())
    };
    let rp = build(&fx.conf_id, Some(&fx.conf_secret));
    step(&mut done, "discovery");

    let mut ua = UserAgent {
        jar: HashMap::new(),
        username: fx.username.clone(),
        password: fx.password.clone(),
    };
    let (t1, claims) = code_flow(&rp, &mut ua, &fx.issuer).await;
    step(&mut done, "authorize_login_form");
    let r1 = t1.refresh_token().expect("a refresh token").clone();
    assert_eq!(t1.token_type().as_ref().to_ascii_lowercase(), "bearer");
    step(&mut done, "token_exchange");
    assert_eq!(claims.subject().as_str(), fx.sub);
    assert_eq!(claims.issuer().as_str(), fx.issuer);
    assert!(claims.audiences().iter().any(|a| **a == fx.conf_id));
    step(&mut done, "id_token_validated");

    let sub = SubjectIdentifier::new(fx.sub.clone());
    let info: CoreUserInfoClaims = rp
        .user_info(t1.access_token().clone(), Some(sub.clone()))
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(info.email().map(|e| e.as_str()), Some(fx.email.as_str()));
    step(&mut done, "userinfo");

    let ia = rp
        .introspect(t1.access_token())
        .set_token_type_hint("access_token")
        .request_async(&http)
        .await
        .unwrap();
    assert!(ia.active());
    assert_eq!(ia.sub(), Some(fx.sub.as_str()));
    assert_eq!(
        ia.client_id().map(|c| c.as_str()),
        Some(fx.conf_id.as_str())
    );
    assert!(ia.scopes().unwrap().iter().any(|s| s.as_str() == "openid"));
    step(&mut done, "introspect_access_active");
    let as_access = AccessToken::new(r1.secret().clone());
    let ir = rp
        .introspect(&as_access)
        .set_token_type_hint("refresh_token")
        .request_async(&http)
        .await
        .unwrap();
    assert!(ir.active());
    assert_eq!(
        ir.client_id().map(|c| c.as_str()),
        Some(fx.conf_id.as_str())
    );
    step(&mut done, "introspect_refresh_active");

    let t2 = rp
        .exchange_refresh_token(&r1)
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    let r2 = t2.refresh_token().expect("a rotated refresh token").clone();
    assert_ne!(
        r2.secret(),
        r1.secret(),
        "rotation gives a new refresh token"
    );
    let _: CoreUserInfoClaims = rp
        .user_info(t2.access_token().clone(), Some(sub.clone()))
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    step(&mut done, "refresh_rotated");

    let reuse = rp
        .exchange_refresh_token(&r1)
        .unwrap()
        .request_async(&http)
        .await;
    assert!(is_invalid_grant(&reuse), "old refresh token: {reuse:?}");
    step(&mut done, "reuse_old_refused");
    let after = rp
        .exchange_refresh_token(&r2)
        .unwrap()
        .request_async(&http)
        .await;
    assert!(
        is_invalid_grant(&after),
        "new refresh token after reuse: {after:?}"
    );
    step(&mut done, "reuse_family_revoked");

    // Revocation: a second authorization (the browser session is reused).
    let (t3, _) = code_flow(&rp, &mut ua, &fx.issuer).await;
    rp.revoke_token(CoreRevocableToken::AccessToken(t3.access_token().clone()))
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert!(
        !rp.introspect(t3.access_token())
            .request_async(&http)
            .await
            .unwrap()
            .active()
    );
    let refused: Result<CoreUserInfoClaims, _> = rp
        .user_info(t3.access_token().clone(), Some(sub.clone()))
        .unwrap()
        .request_async(&http)
        .await;
    assert!(
        matches!(&refused, Err(UserInfoError::Response(s, _, _)) if s.as_u16() == 401),
        "userinfo with a revoked token: {refused:?}"
    );
    step(&mut done, "revoke_access");
    // RFC 7009 §2.1 lets revoking an access token revoke its refresh token too: a fresh
    // grant for the refresh token's turn.
    let (t4, _) = code_flow(&rp, &mut ua, &fx.issuer).await;
    let r3 = t4.refresh_token().unwrap().clone();
    let r3_access = AccessToken::new(r3.secret().clone());
    assert!(
        rp.introspect(&r3_access)
            .request_async(&http)
            .await
            .unwrap()
            .active()
    );
    rp.revoke_token(CoreRevocableToken::RefreshToken(r3.clone()))
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert!(
        !rp.introspect(&r3_access)
            .request_async(&http)
            .await
            .unwrap()
            .active()
    );
    let revoked = rp
        .exchange_refresh_token(&r3)
        .unwrap()
        .request_async(&http)
        .await;
    assert!(
        is_invalid_grant(&revoked),
        "revoked refresh token: {revoked:?}"
    );
    step(&mut done, "revoke_refresh");

    let cc = rp
        .exchange_client_credentials()
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert!(cc.refresh_token().is_none() && cc.id_token().is_none());
    let ic = rp
        .introspect(cc.access_token())
        .request_async(&http)
        .await
        .unwrap();
    assert!(ic.active());
    assert_eq!(
        ic.client_id().map(|c| c.as_str()),
        Some(fx.conf_id.as_str())
    );
    rp.revoke_token(CoreRevocableToken::AccessToken(cc.access_token().clone()))
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert!(
        !rp.introspect(cc.access_token())
            .request_async(&http)
            .await
            .unwrap()
            .active()
    );
    step(&mut done, "client_credentials");

    let public = build(&fx.public_id, None);
    let (tp, pclaims) = code_flow(&public, &mut ua, &fx.issuer).await;
    assert!(pclaims.audiences().iter().any(|a| **a == fx.public_id));
    assert!(!tp.access_token().secret().is_empty());
    step(&mut done, "public_client_pkce");
    done
}

/// The hand-written HTML form reader the Rust relying party relies on.
#[test]
fn form_reader_reads_login_and_consent_forms() {
    let login = r#"<main><form method="post" action="/login?x=1&amp;y=2">
      <input type="hidden" name="csrf" value="a&quot;b">
      <label for="u">Username</label><input id="u" name="username" autocomplete=username>
      <input type=password name='password'>
      <button type="submit">Sign in</button></form></main>"#;
    let f = &forms(login)[0];
    assert_eq!(f.action, "/login?x=1&y=2");
    assert_eq!(f.method, "post");
    assert_eq!(f.inputs.len(), 3);
    assert_eq!(f.inputs[0]["value"], "a\"b");
    assert_eq!(f.inputs[2]["type"], "password");
    assert_eq!(
        fields(f, f.buttons.first()),
        vec![
            ("csrf".to_owned(), "a\"b".to_owned()),
            ("username".to_owned(), String::new()),
            ("password".to_owned(), String::new())
        ]
    );
    let consent = r#"<form method="post"><input type="hidden" name="t" value="1">
      <button name="decision" value="deny">Deny</button>
      <button name="decision" value="approve"><span>Allow</span></button></form>
      <form><input type="checkbox" name="remember"></form>"#;
    let fs = forms(consent);
    assert_eq!(fs.len(), 2);
    let b: Vec<String> = fs[0].buttons.iter().map(button_text).collect();
    assert_eq!(b, ["decision deny Deny", "decision approve Allow"]);
    assert!(is_deny(&b[0]) && !is_approve(&b[0]));
    assert!(is_approve(&b[1]) && !is_deny(&b[1]));
    assert!(
        fields(&fs[1], None).is_empty(),
        "unchecked boxes are not sent"
    );
    assert_eq!(unescape("&#x41;&#66;&amp;&bogus;"), "AB&&bogus;");
}
