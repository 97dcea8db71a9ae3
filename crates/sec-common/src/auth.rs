//! Caller authentication and per-RPC authorization.
//!
//! Nothing is open by default. Every service declares an [`AccessTable`] per gRPC service
//! (`method → Admin | Service | Anyone`); [`ServiceHost`](crate::service::ServiceHost)
//! enforces it for every route through [`AccessLayer`], and a method missing from the
//! table is refused. A caller is:
//! - [`Caller::Admin`]: presents the admin bearer token (also when it comes over mTLS);
//! - [`Caller::Service`]: a trusted mTLS peer identity, or the in-process service
//!   credential `secd` generates at start;
//! - [`Caller::Anonymous`]: no credentials (only `Anyone` methods let it through).
//!
//! The admin token and service credentials are machine secrets with 256 random bits, so
//! they are stored as SHA-256 digests and compared in constant time: a slow KDF adds
//! nothing against brute force, and refusing a wrong token must cost no more than a hash
//! (an argon2id per bogus token let 16 callers slow every admin call 150-fold).
//! argon2id is for human passwords only ([`crate::password`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use anyhow::Context as _;
use base64::Engine as _;
use futures::future::BoxFuture;
use tonic::metadata::MetadataMap;

use crate::config::Config;
use crate::error::{Error, ErrorCode};
use crate::tls::{PeerIdentity, identity_from_der};

/// The admin token, in the data directory (mode 0600).
pub const TOKEN_FILE: &str = "admin.token";
/// Its SHA-256 digest (`sha256:<hex>`), in the data directory.
pub const HASH_FILE: &str = "admin.token.sha256";
/// Where installations before template v2 kept an argon2id hash instead; migrated at start.
pub const LEGACY_HASH_FILE: &str = "admin.token.argon2id";
const TOKEN_PREFIX: &str = "sec_";
const HASH_PREFIX: &str = "sha256:";

/// Who is calling, once authenticated. Handlers get it with [`Caller::of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin bearer token (with or without an mTLS identity).
    Admin,
    /// Another platform service: its mTLS identity, or `internal` for the in-process
    /// service credential.
    Service(String),
    /// No credentials; reaches only methods declared [`Access::Anyone`].
    Anonymous,
}

impl Caller {
    /// The caller of a request that passed the host's [`AccessLayer`]. A request that did
    /// not (which would be a wiring bug) is treated as unauthenticated.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("unauthenticated"))
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }

    /// The service identity, for per-service checks (admin and anonymous have none).
    pub fn service_identity(&self) -> Option<&str> {
        match self {
            Caller::Service(id) => Some(id),
            _ => None,
        }
    }

    /// Refuses anyone but the admin, for handlers whose check depends on the request.
    pub fn require_admin(&self, what: &str) -> Result<(), Error> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Anonymous => Err(Error::new(
                ErrorCode::Unauthenticated,
                "missing credentials: send `authorization: Bearer <token>`",
            )),
            Caller::Service(_) => Err(Error::denied(format!("{what} needs the admin credential"))),
        }
    }

    /// The caller as the actor of a security event.
    pub fn actor(&self) -> crate::events::Actor {
        use crate::events::{Actor, ActorKind};
        let (kind, id) = match self {
            Caller::Admin => (ActorKind::User, "admin".to_owned()),
            Caller::Service(id) => (ActorKind::Service, id.clone()),
            Caller::Anonymous => (ActorKind::Anonymous, String::new()),
        };
        Actor {
            kind: kind as i32,
            id,
        }
    }

    /// Whether this caller may call a method declared with `access`.
    pub fn allowed(&self, access: Access) -> bool {
        match access {
            Access::Anyone => true,
            Access::Service => matches!(self, Caller::Admin | Caller::Service(_)),
            Access::Admin => matches!(self, Caller::Admin),
        }
    }
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The admin credential only.
    Admin,
    /// The admin or a trusted platform service.
    Service,
    /// Anyone, without credentials (health, reflection, public endpoints).
    Anyone,
}

/// The access rules of one gRPC service: every method it serves, and who may call it.
#[derive(Debug, Clone, Copy)]
pub struct AccessTable {
    /// Fully qualified gRPC service name (`sec.crypto.v1.CryptoService`).
    pub service: &'static str,
    /// `(method, access)`; a method missing here is refused.
    pub methods: &'static [(&'static str, Access)],
}

/// Standard services every server carries; they answer anyone.
const STANDARD: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The compiled rules of one server: `/<service>/<method>` → access.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    methods: HashMap<String, Access>,
    open_services: Vec<&'static str>,
}

impl AccessPolicy {
    pub fn new(tables: &[AccessTable]) -> Self {
        let mut methods = HashMap::new();
        for t in tables {
            for (m, a) in t.methods {
                methods.insert(format!("/{}/{m}", t.service), *a);
            }
        }
        Self {
            methods,
            open_services: STANDARD.to_vec(),
        }
    }

    /// The rule for a request path; `None` (refused) for anything not declared.
    pub fn lookup(&self, path: &str) -> Option<Access> {
        if let Some(a) = self.methods.get(path) {
            return Some(*a);
        }
        let service = path.strip_prefix('/')?.split('/').next()?;
        self.open_services
            .contains(&service)
            .then_some(Access::Anyone)
    }
}

/// Checks that `tables` list exactly the methods of their services in the descriptor set
/// (`sec_proto::FILE_DESCRIPTOR_SET`): every RPC declared, nothing that does not exist.
/// Each service calls this from a test so a new RPC cannot ship without a rule.
pub fn check_tables_cover(descriptor_set: &[u8], tables: &[AccessTable]) -> Result<(), String> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(descriptor_set)
        .map_err(|e| format!("descriptor set: {e}"))?;
    for t in tables {
        let service = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f.package(), s)))
            .find(|(pkg, s)| format!("{pkg}.{}", s.name()) == t.service)
            .map(|(_, s)| s)
            .ok_or_else(|| format!("{} is not in the descriptor set", t.service))?;
        let declared: Vec<String> = service.method.iter().map(|m| m.name().to_owned()).collect();
        for m in &declared {
            if !t.methods.iter().any(|(n, _)| n == m) {
                return Err(format!("{}/{m} has no access rule", t.service));
            }
        }
        for (n, _) in t.methods {
            if !declared.iter().any(|m| m == n) {
                return Err(format!("{}/{n} is not an RPC of the service", t.service));
            }
        }
    }
    Ok(())
}

/// A fresh 256-bit random token, `sec_` + base64url.
pub fn generate_token() -> anyhow::Result<String> {
    let mut bytes = [0_u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("system random generator failed"))?;
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The stored form of a machine token: `sha256:<hex>`. The same value as
/// `printf %s "$TOKEN" | sha256sum`, so an operator can make it without our tools.
pub fn hash_token(token: &str) -> String {
    let d = sha256(token.as_bytes());
    let mut out = String::with_capacity(HASH_PREFIX.len() + 64);
    out.push_str(HASH_PREFIX);
    for b in d {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.trim().strip_prefix(HASH_PREFIX)?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0_u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Result of [`ensure_bootstrap_token`].
#[derive(Debug)]
pub struct Bootstrap {
    pub token_path: PathBuf,
    /// True on the first start, when the token was just made.
    pub created: bool,
    /// True when an argon2id hash of an older installation was replaced by its digest.
    pub migrated: bool,
}

/// Creates the bootstrap admin token in `data_dir` unless one exists: the token in
/// [`TOKEN_FILE`] (0600), its digest in [`HASH_FILE`]. An installation from before
/// template v2 (argon2id hash in [`LEGACY_HASH_FILE`]) is migrated: the token file is
/// checked against the old hash once, here, off any async worker, and the digest replaces
/// it. The token itself does not change, so clients keep working.
pub fn ensure_bootstrap_token(data_dir: &Path) -> anyhow::Result<Bootstrap> {
    let token_path = data_dir.join(TOKEN_FILE);
    let hash_path = data_dir.join(HASH_FILE);
    let legacy_path = data_dir.join(LEGACY_HASH_FILE);
    if hash_path.exists() {
        return Ok(Bootstrap {
            token_path,
            created: false,
            migrated: false,
        });
    }
    if legacy_path.exists() {
        let legacy = std::fs::read_to_string(&legacy_path)
            .with_context(|| format!("reading {}", legacy_path.display()))?;
        let token = std::fs::read_to_string(&token_path).with_context(|| {
            format!(
                "{} holds an argon2id hash from an older version but {} is missing: \
                 restore the token file, or delete both to make a new token",
                legacy_path.display(),
                token_path.display()
            )
        })?;
        let token = token.trim();
        anyhow::ensure!(
            crate::password::verify_blocking(token, legacy.trim()),
            "{} does not match {}: restore the token file, or delete both to make a new token",
            token_path.display(),
            legacy_path.display()
        );
        crate::fsutil::write_secret_atomic(&hash_path, hash_token(token).as_bytes())?;
        std::fs::remove_file(&legacy_path)
            .with_context(|| format!("removing {}", legacy_path.display()))?;
        return Ok(Bootstrap {
            token_path,
            created: false,
            migrated: true,
        });
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = generate_token()?;
    crate::fsutil::write_secret_atomic(&token_path, token.as_bytes())?;
    crate::fsutil::write_secret_atomic(&hash_path, hash_token(&token).as_bytes())?;
    Ok(Bootstrap {
        token_path,
        created: true,
        migrated: false,
    })
}

/// The token a CLI should send: `SEC_TOKEN`, else the bootstrap token file in `data_dir`.
pub fn client_token(data_dir: &Path) -> Option<String> {
    if let Ok(t) = std::env::var("SEC_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_owned());
    }
    std::fs::read_to_string(data_dir.join(TOKEN_FILE))
        .ok()
        .map(|t| t.trim().to_owned())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0_u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// How the admin credential is checked.
enum AdminCheck {
    None,
    /// SHA-256 digest of the token.
    Digest([u8; 32]),
    /// An argon2id PHC string configured before template v2. Checked on the blocking pool
    /// (one at a time; a check that finds the pool busy is refused rather than queued),
    /// and the digest of the token that verified is kept, so the slow path runs once.
    Legacy {
        phc: String,
        verified: RwLock<Option<[u8; 32]>>,
    },
}

/// Decides who a caller is. Shared by every service in a process.
pub struct Authenticator {
    admin: AdminCheck,
    /// In-process service credentials: digest → the service's name.
    service_digests: Vec<([u8; 32], String)>,
    trusted_peers: Vec<String>,
    legacy_slot: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("admin_token", &!matches!(self.admin, AdminCheck::None))
            .field("trusted_peers", &self.trusted_peers)
            .finish()
    }
}

impl Authenticator {
    /// Admin digest from `auth.admin_token_hash`, else from the data directory. Without
    /// either, no admin call is accepted (fail closed) and a warning says so. An error
    /// here is a configuration error (exit 64).
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let configured = match &cfg.auth.admin_token_hash {
            Some(h) => Some(h.expose().trim().to_owned()),
            None => std::fs::read_to_string(cfg.data_dir.join(HASH_FILE))
                .ok()
                .map(|s| s.trim().to_owned()),
        };
        let admin = match configured {
            None => {
                tracing::warn!("no admin token configured: admin calls will be refused");
                AdminCheck::None
            }
            Some(h) if h.starts_with("$argon2id$") => {
                argon2::password_hash::phc::PasswordHash::new(&h).map_err(|_| {
                    anyhow::anyhow!("auth.admin_token_hash: not a valid argon2id PHC string")
                })?;
                tracing::warn!(
                    "auth.admin_token_hash is an argon2id hash (before template v2); it still \
                     works, but replace it with `secd hash-token` output (sha256:<hex>)"
                );
                AdminCheck::Legacy {
                    phc: h,
                    verified: RwLock::new(None),
                }
            }
            Some(h) => AdminCheck::Digest(parse_hash(&h).ok_or_else(|| {
                anyhow::anyhow!(
                    "auth.admin_token_hash: expected `sha256:` and 64 hex digits (see `secd hash-token`)"
                )
            })?),
        };
        Ok(Self {
            admin,
            service_digests: Vec::new(),
            trusted_peers: cfg.auth.trusted_peers.clone(),
            legacy_slot: tokio::sync::Semaphore::new(1),
        })
    }

    /// Also accept `token` as a service credential of no particular service (`internal`).
    pub fn with_service_token(self, token: &str) -> Self {
        self.with_service_credential("internal", token)
    }

    /// Also accept `token` as the in-process credential of service `name`: its calls
    /// authenticate as `Caller::Service(name)`, as an mTLS identity would.
    pub fn with_service_credential(mut self, name: &str, token: &str) -> Self {
        self.service_digests
            .push((sha256(token.as_bytes()), name.to_owned()));
        self
    }

    /// Accepts every credential of `creds`.
    pub fn with_service_credentials(self, creds: &ServiceCredentials) -> Self {
        creds.0.iter().fold(self, |a, (name, token)| {
            a.with_service_credential(name, token)
        })
    }

    /// Authenticates a bearer token (gRPC metadata or HTTP `Authorization` header). Costs
    /// one SHA-256 and constant-time compares, except for a legacy argon2id hash.
    pub async fn authenticate_token(&self, token: &str) -> Result<Caller, Error> {
        let invalid = || Error::new(ErrorCode::Unauthenticated, "invalid credentials");
        let digest = sha256(token.as_bytes());
        // Compare against every credential so timing does not tell which one matched.
        let mut service = None;
        for (d, name) in &self.service_digests {
            if ct_eq(d, &digest) {
                service = Some(name);
            }
        }
        let admin = match &self.admin {
            AdminCheck::None => false,
            AdminCheck::Digest(d) => ct_eq(d, &digest),
            AdminCheck::Legacy { phc, verified } => {
                let cached = *verified.read().unwrap_or_else(PoisonError::into_inner);
                match cached {
                    Some(v) => ct_eq(&v, &digest),
                    // Only a well-formed token may reach the slow hash.
                    None if token.starts_with(TOKEN_PREFIX)
                        && token.len() == TOKEN_PREFIX.len() + 43 =>
                    {
                        let ok = self.legacy_verify(token, phc).await?;
                        if ok {
                            *verified.write().unwrap_or_else(PoisonError::into_inner) =
                                Some(digest);
                        }
                        ok
                    }
                    None => false,
                }
            }
        };
        match (admin, service) {
            (true, _) => Ok(Caller::Admin),
            (false, Some(name)) => Ok(Caller::Service(name.clone())),
            (false, None) => Err(invalid()),
        }
    }

    async fn legacy_verify(&self, token: &str, phc: &str) -> Result<bool, Error> {
        let Ok(_permit) = self.legacy_slot.try_acquire() else {
            return Err(Error::new(
                ErrorCode::Unavailable,
                "credential check busy, retry (configure a sha256 admin_token_hash)",
            ));
        };
        let (token, phc) = (token.to_owned(), phc.to_owned());
        tokio::task::spawn_blocking(move || crate::password::verify_blocking(&token, &phc))
            .await
            .map_err(|e| Error::internal("checking a credential", &e))
    }

    /// Authenticates a call: the admin token wins (also over mTLS), then a trusted mTLS
    /// peer, then the in-process service credential. No credentials: `Anonymous`.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<&PeerIdentity>,
    ) -> Result<Caller, Error> {
        let trusted_peer = peer.filter(|p| self.trusted_peers.iter().any(|t| t == &p.0));
        match authorization {
            Some(value) => {
                let Some(token) = bearer(value) else {
                    return Err(Error::new(
                        ErrorCode::Unauthenticated,
                        "authorization must be `Bearer <token>`",
                    ));
                };
                match self.authenticate_token(token).await {
                    Ok(Caller::Admin) => Ok(Caller::Admin),
                    // A trusted peer keeps its own identity over the shared credential.
                    Ok(_) | Err(_) if trusted_peer.is_some() => Ok(Caller::Service(
                        trusted_peer.map(|p| p.0.clone()).unwrap_or_default(),
                    )),
                    other => other,
                }
            }
            None => match (trusted_peer, peer) {
                (Some(p), _) => Ok(Caller::Service(p.0.clone())),
                (None, Some(_)) => Err(Error::denied(
                    "peer certificate identity is not trusted for this call",
                )),
                (None, None) => Ok(Caller::Anonymous),
            },
        }
    }

    /// Authenticates a gRPC request's metadata (for code outside the host's layer).
    pub async fn authenticate_metadata(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerIdentity>,
    ) -> Result<Caller, Error> {
        let auth = metadata.get("authorization").and_then(|v| v.to_str().ok());
        self.authenticate(auth, peer).await
    }
}

/// The credentials services in one process (`secd`, the test harness) use to call each
/// other: one fresh 256-bit token per service, living only as long as the process, so a
/// call from token-svc to crypto-svc authenticates as `token` without mTLS.
#[derive(Clone, Default)]
pub struct ServiceCredentials(std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl ServiceCredentials {
    /// A fresh credential for each of `names`.
    pub fn generate<'a>(names: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Self> {
        let mut m = std::collections::BTreeMap::new();
        for n in names {
            m.insert(n.to_owned(), generate_token()?);
        }
        Ok(Self(m))
    }

    /// The token service `name` sends (`authorization: Bearer …`) when it calls another.
    pub fn token(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// `Bearer <token>` (scheme case-insensitive, RFC 6750 §2.1).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The decision for one request: the caller, or the status that refuses it.
pub async fn authorize(
    auth: &Authenticator,
    policy: &AccessPolicy,
    path: &str,
    authorization: Option<&str>,
    peer: Option<&PeerIdentity>,
) -> Result<Caller, Error> {
    let Some(access) = policy.lookup(path) else {
        // Deny by default: a method without a rule is refused, whoever calls.
        return Err(Error::denied("this method is not open to any caller"));
    };
    let caller = match auth.authenticate(authorization, peer).await {
        Ok(c) => c,
        // Health and reflection answer even a caller with a bad credential.
        Err(_) if access == Access::Anyone => Caller::Anonymous,
        Err(e) => return Err(e),
    };
    if caller.allowed(access) {
        return Ok(caller);
    }
    Err(match caller {
        Caller::Anonymous => Error::new(
            ErrorCode::Unauthenticated,
            "missing credentials: send `authorization: Bearer <token>`",
        ),
        _ => Error::denied("this method needs the admin credential"),
    })
}

/// Tower layer that enforces an [`AccessPolicy`] on every gRPC request and puts the
/// [`Caller`] into the request extensions. [`ServiceHost`](crate::service::ServiceHost)
/// installs it on every server; services never wrap their own interceptor.
#[derive(Clone)]
pub struct AccessLayer {
    auth: Arc<Authenticator>,
    policy: Arc<AccessPolicy>,
}

impl AccessLayer {
    pub fn new(auth: Arc<Authenticator>, policy: AccessPolicy) -> Self {
        Self {
            auth,
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    layer: AccessLayer,
}

/// The mTLS identity of the peer of an HTTP/2 request served by tonic over TLS.
pub fn http_peer_identity<B>(req: &http::Request<B>) -> Option<PeerIdentity> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    identity_from_der(certs.first()?.as_ref())
}

impl<S, B> tower::Service<http::Request<B>> for AccessService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's clone-and-swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let peer = http_peer_identity(&req);
            let authorization = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let decision = authorize(
                &layer.auth,
                &layer.policy,
                req.uri().path(),
                authorization,
                peer.as_ref(),
            )
            .await;
            match decision {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "sec.test.v1.TestService";
    const TABLE: AccessTable = AccessTable {
        service: SVC,
        methods: &[
            ("Manage", Access::Admin),
            ("Use", Access::Service),
            ("Open", Access::Anyone),
        ],
    };

    fn auth_with_token() -> (Arc<Authenticator>, String) {
        let token = generate_token().unwrap();
        let cfg = Config {
            auth: crate::config::AuthConfig {
                admin_token_hash: Some(crate::config::Secret::new(hash_token(&token))),
                trusted_peers: vec!["spiffe://sec/token-svc".into()],
            },
            ..Default::default()
        };
        (
            Arc::new(
                Authenticator::from_config(&cfg)
                    .unwrap()
                    .with_service_token("svc-cred"),
            ),
            token,
        )
    }

    fn path(m: &str) -> String {
        format!("/{SVC}/{m}")
    }

    #[test]
    fn digest_matches_sha256sum_format() {
        // printf %s abc | sha256sum
        assert_eq!(
            hash_token("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(parse_hash(&hash_token("x")).is_some());
        assert!(parse_hash("sha256:zz").is_none());
        assert!(parse_hash("ba7816bf").is_none());
    }

    #[tokio::test]
    async fn admin_service_and_anonymous_callers() {
        let (auth, token) = auth_with_token();
        let bearer = format!("Bearer {token}");
        assert_eq!(
            auth.authenticate(Some(&bearer), None).await.unwrap(),
            Caller::Admin
        );
        assert_eq!(
            auth.authenticate(Some(&format!("bearer {token}")), None)
                .await
                .unwrap(),
            Caller::Admin
        );
        assert_eq!(
            auth.authenticate(Some("Bearer svc-cred"), None)
                .await
                .unwrap(),
            Caller::Service("internal".into())
        );
        assert_eq!(
            auth.authenticate(None, None).await.unwrap(),
            Caller::Anonymous
        );
    }

    #[tokio::test]
    async fn each_in_process_service_authenticates_as_itself() {
        let creds = ServiceCredentials::generate(["token", "assess"]).unwrap();
        let (auth, _) = auth_with_token();
        let auth = Arc::try_unwrap(auth)
            .unwrap()
            .with_service_credentials(&creds);
        for name in ["token", "assess"] {
            let t = creds.token(name).unwrap();
            assert_eq!(
                auth.authenticate(Some(&format!("Bearer {t}")), None)
                    .await
                    .unwrap(),
                Caller::Service(name.into())
            );
        }
        assert_ne!(creds.token("token"), creds.token("assess"));
        assert!(!format!("{creds:?}").contains(creds.token("token").unwrap()));
    }

    #[tokio::test]
    async fn wrong_malformed_and_tampered_tokens_refused_without_echo() {
        let (auth, token) = auth_with_token();
        let err = auth
            .authenticate(Some("Basic abc"), None)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated);
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        let err = auth
            .authenticate(Some(&format!("Bearer {tampered}")), None)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated);
        assert!(!err.message.contains(&tampered), "token never echoed");
        assert!(
            auth.authenticate(Some(&format!("Bearer {token}")), None)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn no_admin_hash_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: dir.path().into(),
            ..Default::default()
        };
        let auth = Authenticator::from_config(&cfg).unwrap();
        let token = generate_token().unwrap();
        assert!(auth.authenticate_token(&token).await.is_err());
    }

    #[test]
    fn bad_configured_hash_is_a_config_error() {
        let cfg = Config {
            auth: crate::config::AuthConfig {
                admin_token_hash: Some(crate::config::Secret::new("sha256:abcd")),
                trusted_peers: vec![],
            },
            ..Default::default()
        };
        let err = Authenticator::from_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token_hash"), "{err}");
        assert!(!err.contains("abcd"), "the value is not echoed: {err}");
    }

    #[tokio::test]
    async fn trusted_peer_is_a_service_untrusted_peer_denied_and_admin_token_wins() {
        let (auth, token) = auth_with_token();
        let good = PeerIdentity("spiffe://sec/token-svc".into());
        let evil = PeerIdentity("spiffe://evil".into());
        assert_eq!(
            auth.authenticate(None, Some(&good)).await.unwrap(),
            Caller::Service("spiffe://sec/token-svc".into())
        );
        assert_eq!(
            auth.authenticate(None, Some(&evil)).await.unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        // mTLS identity plus the admin token: admin rights.
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {token}")), Some(&good))
                .await
                .unwrap(),
            Caller::Admin
        );
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {token}")), Some(&evil))
                .await
                .unwrap(),
            Caller::Admin
        );
    }

    #[tokio::test]
    async fn access_table_is_enforced_and_unlisted_methods_are_refused() {
        let (auth, token) = auth_with_token();
        let policy = AccessPolicy::new(&[TABLE]);
        let admin = format!("Bearer {token}");
        let svc = "Bearer svc-cred";
        let check = |m: &str, a: Option<&str>| {
            let p = path(m);
            let auth = auth.clone();
            let policy = policy.clone();
            let a = a.map(str::to_owned);
            async move { authorize(&auth, &policy, &p, a.as_deref(), None).await }
        };
        assert_eq!(check("Manage", Some(&admin)).await.unwrap(), Caller::Admin);
        assert_eq!(
            check("Manage", Some(svc)).await.unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            check("Manage", None).await.unwrap_err().code,
            ErrorCode::Unauthenticated
        );
        assert!(check("Use", Some(svc)).await.is_ok());
        assert!(check("Use", Some(&admin)).await.is_ok());
        assert_eq!(
            check("Use", None).await.unwrap_err().code,
            ErrorCode::Unauthenticated
        );
        assert_eq!(check("Open", None).await.unwrap(), Caller::Anonymous);
        assert_eq!(
            check("Open", Some("Bearer wrong")).await.unwrap(),
            Caller::Anonymous
        );
        // Deny by default: a method with no rule is refused even for the admin.
        for who in [Some(admin.as_str()), Some(svc), None] {
            assert_eq!(
                check("Unlisted", who).await.unwrap_err().code,
                ErrorCode::PermissionDenied
            );
        }
        let other = authorize(
            &auth,
            &policy,
            "/sec.other.v1.Other/Manage",
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(other.unwrap_err().code, ErrorCode::PermissionDenied);
        // Health and reflection are open.
        assert_eq!(
            authorize(&auth, &policy, "/grpc.health.v1.Health/Check", None, None)
                .await
                .unwrap(),
            Caller::Anonymous
        );
    }

    #[test]
    fn tables_must_cover_the_descriptor() {
        let crypto_all_but_one = AccessTable {
            service: "sec.audit.v1.AuditService",
            methods: &[],
        };
        let err =
            check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, &[crypto_all_but_one]).unwrap_err();
        assert!(err.contains("has no access rule"), "{err}");
        let bogus = AccessTable {
            service: "sec.nope.v1.Nope",
            methods: &[],
        };
        assert!(check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, &[bogus]).is_err());
    }

    #[test]
    fn bootstrap_token_created_once_private_and_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let b = ensure_bootstrap_token(dir.path()).unwrap();
        assert!(b.created);
        let token = std::fs::read_to_string(&b.token_path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&b.token_path)
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "token readable by its owner alone");
        }
        let hash = std::fs::read_to_string(dir.path().join(HASH_FILE)).unwrap();
        assert!(!hash.contains(&token) && hash.starts_with("sha256:"));
        let again = ensure_bootstrap_token(dir.path()).unwrap();
        assert!(!again.created);
        assert_eq!(std::fs::read_to_string(&again.token_path).unwrap(), token);
    }

    /// An installation from before template v2 kept an argon2id hash: its token keeps
    /// working, and the hash is replaced by the digest at the next start.
    #[tokio::test]
    async fn legacy_argon2id_installation_is_migrated_and_keeps_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = generate_token().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), &token).unwrap();
        std::fs::write(
            dir.path().join(LEGACY_HASH_FILE),
            crate::password::hash_blocking(&token).unwrap(),
        )
        .unwrap();
        let b = ensure_bootstrap_token(dir.path()).unwrap();
        assert!(b.migrated && !b.created);
        assert!(!dir.path().join(LEGACY_HASH_FILE).exists());
        let cfg = Config {
            data_dir: dir.path().into(),
            ..Default::default()
        };
        let auth = Authenticator::from_config(&cfg).unwrap();
        assert_eq!(
            auth.authenticate_token(&token).await.unwrap(),
            Caller::Admin
        );

        // A configured argon2id hash (production secret) also still works.
        let cfg = Config {
            auth: crate::config::AuthConfig {
                admin_token_hash: Some(crate::config::Secret::new(
                    crate::password::hash_blocking(&token).unwrap(),
                )),
                trusted_peers: vec![],
            },
            ..Default::default()
        };
        let auth = Authenticator::from_config(&cfg).unwrap();
        assert_eq!(
            auth.authenticate_token(&token).await.unwrap(),
            Caller::Admin
        );
        assert!(auth.authenticate_token("sec_nope").await.is_err());
    }
}
