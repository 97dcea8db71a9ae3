//! Caller authentication for gRPC and the facade's admin endpoints.
//!
//! Nothing is open by default. A call is accepted when it carries the bootstrap admin
//! token (`authorization: Bearer …`), the in-process service credential `secd` generates
//! at start, or comes over mutual TLS from a trusted peer identity. Only the argon2id
//! hash of the admin token is stored; `secd dev` writes the token itself to a file in the
//! data directory readable by its owner alone, as Vault's dev mode prints a root token.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context as _;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine as _;
use tonic::metadata::MetadataMap;

use crate::config::Config;
use crate::error::{Error, ErrorCode};
use crate::tls::{PeerIdentity, peer_identity};

/// The admin token, in the data directory (mode 0600).
pub const TOKEN_FILE: &str = "admin.token";
/// Its argon2id hash, in the data directory.
pub const HASH_FILE: &str = "admin.token.argon2id";
const TOKEN_PREFIX: &str = "sec_";

/// Who is calling, once authenticated. Handlers find it in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The bootstrap admin token.
    Admin,
    /// Another platform service (mTLS identity, or `internal` for the in-process credential).
    Service(String),
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

/// argon2id PHC string of `token`.
pub fn hash_token(token: &str) -> anyhow::Result<String> {
    let mut salt = [0_u8; 16];
    aws_lc_rs::rand::fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("system random generator failed"))?;
    let hash = argon2::Argon2::default()
        .hash_password_with_salt(token.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing token: {e}"))?;
    Ok(hash.to_string())
}

/// Result of [`ensure_bootstrap_token`].
#[derive(Debug)]
pub struct Bootstrap {
    pub token_path: PathBuf,
    /// True on the first start, when the token was just made.
    pub created: bool,
}

/// Creates the bootstrap admin token in `data_dir` unless one exists: the token in
/// [`TOKEN_FILE`] (0600), its hash in [`HASH_FILE`].
pub fn ensure_bootstrap_token(data_dir: &Path) -> anyhow::Result<Bootstrap> {
    let token_path = data_dir.join(TOKEN_FILE);
    let hash_path = data_dir.join(HASH_FILE);
    if hash_path.exists() {
        return Ok(Bootstrap {
            token_path,
            created: false,
        });
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = generate_token()?;
    write_private(&token_path, token.as_bytes())?;
    write_private(&hash_path, hash_token(&token)?.as_bytes())?;
    Ok(Bootstrap {
        token_path,
        created: true,
    })
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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

/// Decides who a caller is. Shared by every service in a process.
pub struct Authenticator {
    admin_hash: Option<String>,
    /// SHA-256 of the admin token once it has verified against the argon2id hash, so the
    /// slow hash runs once per process rather than once per call.
    verified_admin: RwLock<Option<[u8; 32]>>,
    service_digest: Option<[u8; 32]>,
    trusted_peers: Vec<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("admin_token", &self.admin_hash.is_some())
            .field("trusted_peers", &self.trusted_peers)
            .finish()
    }
}

impl Authenticator {
    /// Admin hash from `auth.admin_token_hash`, else from the data directory. Without
    /// either, no admin call is accepted (fail closed) and a warning says so.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let admin_hash = match &cfg.auth.admin_token_hash {
            Some(h) => Some(h.expose().trim().to_owned()),
            None => std::fs::read_to_string(cfg.data_dir.join(HASH_FILE))
                .ok()
                .map(|s| s.trim().to_owned()),
        };
        if let Some(h) = &admin_hash {
            argon2::password_hash::phc::PasswordHash::new(h).map_err(|_| {
                anyhow::anyhow!("auth.admin_token_hash is not an argon2id PHC string")
            })?;
        } else {
            tracing::warn!("no admin token configured: admin calls will be refused");
        }
        Ok(Self {
            admin_hash,
            verified_admin: RwLock::new(None),
            service_digest: None,
            trusted_peers: cfg.auth.trusted_peers.clone(),
        })
    }

    /// Also accept `token` as the in-process service credential.
    pub fn with_service_token(mut self, token: &str) -> Self {
        self.service_digest = Some(sha256(token.as_bytes()));
        self
    }

    /// Authenticates a bearer token (gRPC metadata or HTTP `Authorization` header).
    pub fn authenticate_token(&self, token: &str) -> Result<Caller, Error> {
        let invalid = || Error::new(ErrorCode::Unauthenticated, "invalid credentials");
        let digest = sha256(token.as_bytes());
        if let Some(s) = &self.service_digest
            && ct_eq(s, &digest)
        {
            return Ok(Caller::Service("internal".into()));
        }
        let verified = *self
            .verified_admin
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = verified
            && ct_eq(&v, &digest)
        {
            return Ok(Caller::Admin);
        }
        // Cheap shape check first: a malformed token never reaches the slow hash.
        if !token.starts_with(TOKEN_PREFIX) || token.len() != TOKEN_PREFIX.len() + 43 {
            return Err(invalid());
        }
        let Some(hash) = &self.admin_hash else {
            return Err(invalid());
        };
        if argon2::Argon2::default()
            .verify_password(token.as_bytes(), hash.as_str())
            .is_ok()
        {
            *self
                .verified_admin
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Some(digest);
            return Ok(Caller::Admin);
        }
        Err(invalid())
    }

    /// Authenticates a gRPC call: a trusted mTLS peer, else a bearer token.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerIdentity>,
    ) -> Result<Caller, Error> {
        if let Some(p) = peer
            && self.trusted_peers.iter().any(|t| t == &p.0)
        {
            return Ok(Caller::Service(p.0.clone()));
        }
        match metadata.get("authorization").and_then(|v| v.to_str().ok()) {
            Some(value) => match bearer(value) {
                Some(token) => self.authenticate_token(token),
                None => Err(Error::new(
                    ErrorCode::Unauthenticated,
                    "authorization must be `Bearer <token>`",
                )),
            },
            None if peer.is_some() => Err(Error::denied(
                "peer certificate identity is not trusted for this call",
            )),
            None => Err(Error::new(
                ErrorCode::Unauthenticated,
                "missing credentials: send `authorization: Bearer <token>`",
            )),
        }
    }

    /// A tonic interceptor that refuses unauthenticated calls and puts the [`Caller`]
    /// into the request extensions.
    pub fn interceptor(self: &Arc<Self>) -> AuthInterceptor {
        AuthInterceptor(Arc::clone(self))
    }
}

/// `Bearer <token>` (scheme case-insensitive, RFC 6750 §2.1).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[derive(Clone)]
pub struct AuthInterceptor(Arc<Authenticator>);

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let peer = peer_identity(&req);
        let caller = self.0.authenticate(req.metadata(), peer.as_ref())?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller a handler is serving (set by [`AuthInterceptor`]).
pub fn caller<T>(req: &tonic::Request<T>) -> Result<&Caller, tonic::Status> {
    req.extensions()
        .get::<Caller>()
        .ok_or_else(|| tonic::Status::unauthenticated("unauthenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn auth_with_token() -> (Arc<Authenticator>, String) {
        let token = generate_token().unwrap();
        let cfg = Config {
            auth: crate::config::AuthConfig {
                admin_token_hash: Some(crate::config::Secret::new(hash_token(&token).unwrap())),
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

    fn req(auth: Option<&str>) -> tonic::Request<()> {
        let mut r = tonic::Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn admin_token_accepted_and_cached() {
        let (auth, token) = auth_with_token();
        let mut i = auth.interceptor();
        let r = i.call(req(Some(&format!("Bearer {token}")))).unwrap();
        assert_eq!(r.extensions().get::<Caller>(), Some(&Caller::Admin));
        // second call takes the cached path; lower-case scheme is fine too
        assert!(i.call(req(Some(&format!("bearer {token}")))).is_ok());
        assert_eq!(
            auth.authenticate_token("svc-cred").unwrap(),
            Caller::Service("internal".into())
        );
    }

    #[test]
    fn missing_wrong_and_tampered_tokens_refused() {
        let (auth, token) = auth_with_token();
        let mut i = auth.interceptor();
        assert_eq!(
            i.call(req(None)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            i.call(req(Some("Basic abc"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        let err = i
            .call(req(Some(&format!("Bearer {tampered}"))))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(!err.message().contains(&tampered), "token never echoed");
        // the cache holds only the verified token
        assert!(i.call(req(Some(&format!("Bearer {token}")))).is_ok());
        assert!(i.call(req(Some(&format!("Bearer {tampered}")))).is_err());
    }

    #[test]
    fn no_admin_hash_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: dir.path().into(),
            ..Default::default()
        };
        let auth = Authenticator::from_config(&cfg).unwrap();
        let token = generate_token().unwrap();
        assert!(auth.authenticate_token(&token).is_err());
    }

    #[test]
    fn trusted_peer_is_a_service_and_untrusted_peer_is_denied() {
        let (auth, _) = auth_with_token();
        let md = MetadataMap::new();
        let ok = auth
            .authenticate(&md, Some(&PeerIdentity("spiffe://sec/token-svc".into())))
            .unwrap();
        assert_eq!(ok, Caller::Service("spiffe://sec/token-svc".into()));
        let err = auth
            .authenticate(&md, Some(&PeerIdentity("spiffe://evil".into())))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied);
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
        assert!(!hash.contains(&token) && hash.starts_with("$argon2id$"));
        let again = ensure_bootstrap_token(dir.path()).unwrap();
        assert!(!again.created);
        assert_eq!(
            std::fs::read_to_string(&again.token_path).unwrap(),
            token,
            "second start reuses it"
        );
        let cfg = Config {
            data_dir: dir.path().into(),
            ..Default::default()
        };
        assert_eq!(
            Authenticator::from_config(&cfg)
                .unwrap()
                .authenticate_token(&token)
                .unwrap(),
            Caller::Admin
        );
    }
}
