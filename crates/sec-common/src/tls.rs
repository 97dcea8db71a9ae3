//! TLS for the platform's gRPC servers and clients.
//!
//! One crypto stack: every rustls configuration built here uses the aws-lc-rs provider
//! explicitly (never the process default, never ring). Servers speak TLS 1.3 only unless
//! told otherwise, advertise ALPN `h2`, and can require client certificates (mutual TLS).
//! Clients trust only the platform CA bundle they are given: no platform or webpki roots.
//!
//! [`tls_incoming`] turns a TCP listener into a stream of finished TLS connections for
//! `tonic::transport::Server::serve_with_incoming_shutdown`; handshakes run concurrently
//! so a slow or hostile peer cannot stall the accept loop. [`peer_identity`] extracts the
//! caller's identity from its verified client certificate.

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{debug, warn};
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

/// A TLS handshake (server or client side) must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many server-side handshakes are in flight; further connections wait in the
/// kernel backlog until a slot frees up.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Finished TLS connections buffered between the handshake tasks and the server.
const INCOMING_BUFFER: usize = 32;

/// Pause after a failed `accept()` (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// ALPN protocol id of HTTP/2, which gRPC requires.
const ALPN_H2: &[u8] = b"h2";

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS13_AND_TLS12: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// TLS for gRPC servers and clients. All paths are PEM files. Everything optional:
/// no `cert_file` => plaintext (allowed only for the dev launcher on loopback; the caller decides).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Our certificate chain, leaf first (server; also the client identity for mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// Our private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: Option<PathBuf>,
    /// Server side: if set, REQUIRE client certificates chained to this CA bundle (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// Client side: CA bundle to verify servers. Platform/webpki roots are never used, so
    /// this is required whenever a client speaks TLS.
    pub ca_file: Option<PathBuf>,
    /// Default false: TLS 1.3 only (server side).
    pub allow_tls12: bool,
}

/// Why a TLS configuration could not be built. Messages name the offending file; they
/// never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured file could not be read.
    #[error("cannot read tls file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },
    /// A configured file is not valid PEM.
    #[error("tls file {} is not valid pem", path.display())]
    InvalidPem {
        /// The file.
        path: PathBuf,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("no certificates found in {}", path.display())]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key section.
    #[error("no private key found in {}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A CA bundle holds a certificate that cannot serve as a trust anchor.
    #[error("ca bundle {} holds an unusable certificate: {error}", path.display())]
    InvalidCa {
        /// The CA bundle.
        path: PathBuf,
        /// What rustls/webpki objected to.
        error: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA bundle.
    #[error("cannot build client certificate verifier from {}: {error}", path.display())]
    ClientVerifier {
        /// The client CA bundle.
        path: PathBuf,
        /// What rustls objected to.
        error: VerifierBuilderError,
    },
    /// The certificate chain and private key were rejected (unsupported key, or the key
    /// does not belong to the leaf certificate).
    #[error("certificate {} and key {} were rejected: {error}", cert.display(), key.display())]
    CertificateKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls objected to.
        error: rustls::Error,
    },
    /// A configuration that cannot work, e.g. a certificate without its key.
    #[error("incomplete tls configuration: {0}")]
    Incomplete(&'static str),
    /// The server name a client should verify is not a valid DNS name or IP address.
    #[error("invalid tls server name {0:?}")]
    InvalidServerName(String),
    /// Any other rustls configuration error.
    #[error("tls configuration rejected: {0}")]
    Rustls(rustls::Error),
}

impl TlsConfig {
    /// Whether this process serves TLS (a certificate is configured).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// The rustls server configuration: TLS 1.3 only unless `allow_tls12`; ALPN `["h2"]`;
    /// with `client_ca_file`, a client certificate chained to that bundle is REQUIRED.
    /// `Ok(None)` when TLS is not enabled (no `cert_file`).
    ///
    /// # Errors
    /// A file that cannot be read or parsed (the error names it), a key that does not match
    /// the certificate, `key_file` without `cert_file` or vice versa, or `client_ca_file`
    /// without `cert_file` (mutual TLS cannot be required of a plaintext server).
    pub fn server_config(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        let Some(cert_path) = self.cert_file.as_deref() else {
            if self.key_file.is_some() {
                return Err(TlsError::Incomplete("key_file is set but cert_file is not"));
            }
            if self.client_ca_file.is_some() {
                return Err(TlsError::Incomplete(
                    "client_ca_file is set but cert_file is not",
                ));
            }
            return Ok(None);
        };
        let key_path = self
            .key_file
            .as_deref()
            .ok_or(TlsError::Incomplete("cert_file is set but key_file is not"))?;

        let certs = load_certs(cert_path)?;
        let key = load_key(key_path)?;
        let provider = provider();

        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(self.protocol_versions())
            .map_err(TlsError::Rustls)?;
        let builder = match self.client_ca_file.as_deref() {
            Some(ca_path) => {
                let roots = load_roots(ca_path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|error| TlsError::ClientVerifier {
                    path: ca_path.to_path_buf(),
                    error,
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder
                .with_single_cert(certs, key)
                .map_err(|error| TlsError::CertificateKey {
                    cert: cert_path.to_path_buf(),
                    key: key_path.to_path_buf(),
                    error,
                })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];

        debug!(
            cert_file = %cert_path.display(),
            mutual_tls = self.client_ca_file.is_some(),
            allow_tls12 = self.allow_tls12,
            "tls server config loaded"
        );
        Ok(Some(Arc::new(config)))
    }

    /// The tonic client TLS configuration for calling a platform server named `domain`
    /// (the name its certificate must carry), trusting only `ca_file` and, when
    /// `cert_file`/`key_file` are set, presenting them as the client identity (mutual TLS).
    /// `Ok(None)` when neither `ca_file` nor `cert_file` is set (plaintext).
    ///
    /// Every file is read and checked here, so a bad configuration fails at startup rather
    /// than at the first call. Endpoints using the result must use an `https://` URI.
    /// The protocol version is negotiated by the server (tonic's client offers TLS 1.3
    /// and 1.2; platform servers accept 1.3 only unless `allow_tls12`).
    ///
    /// # Errors
    /// TLS enabled without `ca_file`, an unreadable or invalid file (the error names it), a
    /// key that does not match the certificate, or an invalid `domain`.
    pub fn client_config(&self, domain: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        if self.ca_file.is_none() && !self.enabled() {
            if self.key_file.is_some() {
                return Err(TlsError::Incomplete("key_file is set but cert_file is not"));
            }
            return Ok(None);
        }
        let ca_path = self.ca_file.as_deref().ok_or(TlsError::Incomplete(
            "ca_file is required for tls clients (platform roots are not trusted)",
        ))?;
        ServerName::try_from(domain).map_err(|_| TlsError::InvalidServerName(domain.into()))?;

        let ca_pem = read_file(ca_path)?;
        // Validate every anchor now: tonic silently skips unparsable ones.
        roots_from_pem(ca_path, &ca_pem)?;
        let mut config = ClientTlsConfig::new()
            .domain_name(domain)
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .timeout(HANDSHAKE_TIMEOUT);

        match (self.cert_file.as_deref(), self.key_file.as_deref()) {
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read_file(cert_path)?;
                let key_pem = Zeroizing::new(read_file(key_path)?);
                let certs = certs_from_pem(cert_path, &cert_pem)?;
                let key = key_from_pem(key_path, &key_pem)?;
                CertifiedKey::from_der(certs, key, &provider()).map_err(|error| {
                    TlsError::CertificateKey {
                        cert: cert_path.to_path_buf(),
                        key: key_path.to_path_buf(),
                        error,
                    }
                })?;
                config = config.identity(Identity::from_pem(&cert_pem, &*key_pem));
            }
            (Some(_), None) => {
                return Err(TlsError::Incomplete("cert_file is set but key_file is not"));
            }
            (None, Some(_)) => {
                return Err(TlsError::Incomplete("key_file is set but cert_file is not"));
            }
            (None, None) => {}
        }
        Ok(Some(config))
    }

    fn protocol_versions(&self) -> &'static [&'static SupportedProtocolVersion] {
        if self.allow_tls12 {
            TLS13_AND_TLS12
        } else {
            TLS13_ONLY
        }
    }
}

/// The one crypto provider of the platform.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(path, &read_file(path)?)
}

fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(path, error))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = Zeroizing::new(read_file(path)?);
    key_from_pem(path, &pem)
}

fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        other => pem_error(path, other),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    roots_from_pem(path, &read_file(path)?)
}

fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(path, pem)? {
        roots.add(cert).map_err(|error| TlsError::InvalidCa {
            path: path.to_path_buf(),
            error,
        })?;
    }
    Ok(roots)
}

/// Maps a PEM parse error without its details: for key files those could echo key bytes.
fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    match error {
        pem::Error::Io(error) => TlsError::Read {
            path: path.to_path_buf(),
            error,
        },
        pem::Error::NoItemsFound => TlsError::NoCertificates {
            path: path.to_path_buf(),
        },
        _ => TlsError::InvalidPem {
            path: path.to_path_buf(),
        },
    }
}

/// Accepts TCP connections and performs TLS handshakes concurrently: each handshake runs
/// in its own task with a 10 s timeout (at most 1024 at once), and finished streams are fed
/// through a channel, so a slow or failing handshake never blocks the accept loop. Failed
/// handshakes are logged at debug (peer address and error) and dropped. The stream ends
/// when `shutdown` is cancelled; dropping the stream stops accepting and closes the listener.
///
/// The accept loop starts on the first poll (so this may be called outside a runtime).
/// Usable with `tonic::transport::Server::serve_with_incoming_shutdown`; `peer_certs()` and
/// [`peer_identity`] work on requests served this way.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let stop = shutdown.clone().cancelled_owned();
    futures::stream::once(async move {
        let (tx, rx) = mpsc::channel(INCOMING_BUFFER);
        tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(config),
            tx,
            shutdown,
        ));
        ReceiverStream::new(rx)
    })
    .flatten()
    .take_until(stop)
}

type IncomingSender = mpsc::Sender<Result<TlsStream<TcpStream>, io::Error>>;

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: IncomingSender,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            () = tx.closed() => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            () = tx.closed() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                if let Err(error) = tcp.set_nodelay(true) {
                    debug!(%peer, %error, "cannot set tcp_nodelay");
                }
                tokio::spawn(handshake(
                    acceptor.clone(),
                    tcp,
                    peer,
                    tx.clone(),
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(error) => {
                warn!(%error, "tcp accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
    debug!("tls accept loop stopped");
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    tx: IncomingSender,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let outcome = tokio::select! {
        () = shutdown.cancelled() => return,
        outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => outcome,
    };
    drop(permit);
    match outcome {
        Ok(Ok(stream)) => {
            tokio::select! {
                () = shutdown.cancelled() => {}
                sent = tx.send(Ok(stream)) => {
                    if sent.is_err() {
                        debug!(%peer, "tls connection dropped: server no longer accepting");
                    }
                }
            }
        }
        Ok(Err(error)) => debug!(%peer, %error, "tls handshake failed"),
        Err(_) => {
            debug!(%peer, timeout_secs = HANDSHAKE_TIMEOUT.as_secs(), "tls handshake timed out")
        }
    }
}

/// Identity of a mutual-TLS caller, from its leaf certificate: the first URI SAN
/// (e.g. `spiffe://sec/crypto-svc`), else the first DNS SAN, else the subject CN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

impl PeerIdentity {
    /// The identity as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The caller's identity from a tonic request's peer certificates (`request.peer_certs()`,
/// verified by the server's client-certificate verifier). `None` on plaintext connections,
/// without a client certificate, or when the certificate names no identity.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = request.peer_certs()?;
    identity_from_der(certs.first()?.as_ref())
}

/// Parses the identity from a DER leaf certificate: first URI SAN, else first DNS SAN,
/// else subject CN. `None` for anything unparsable (including trailing bytes or a
/// malformed SAN extension) or a certificate without any of these names.
pub fn identity_from_der(der: &[u8]) -> Option<PeerIdentity> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    if let Some(san) = cert.subject_alternative_name().ok()? {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|name| match name {
            GeneralName::URI(uri) if !uri.is_empty() => Some(*uri),
            _ => None,
        });
        let dns = || {
            names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) if !dns.is_empty() => Some(*dns),
                _ => None,
            })
        };
        if let Some(name) = uri.or_else(dns) {
            return Some(PeerIdentity(name.to_owned()));
        }
    }
    cert.subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(|cn| PeerIdentity(cn.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::{Endpoint, Server};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    type Ca = CertifiedIssuer<'static, KeyPair>;

    /// A throwaway PKI in a temporary directory.
    struct Pki {
        dir: tempfile::TempDir,
        client_der: Vec<u8>,
        server_der: Vec<u8>,
        ca_der: Vec<u8>,
    }

    impl Pki {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Server config: TLS with the good server cert; mutual TLS when `mtls`.
        fn server(&self, mtls: bool) -> TlsConfig {
            TlsConfig {
                cert_file: Some(self.path("server.pem")),
                key_file: Some(self.path("server.key")),
                client_ca_file: mtls.then(|| self.path("ca.pem")),
                ..TlsConfig::default()
            }
        }

        /// Client config trusting the platform CA, optionally presenting `identity`
        /// (`"client"` or `"rogue"`).
        fn client(&self, identity: Option<&str>) -> TlsConfig {
            TlsConfig {
                cert_file: identity.map(|name| self.path(&format!("{name}.pem"))),
                key_file: identity.map(|name| self.path(&format!("{name}.key"))),
                ca_file: Some(self.path("ca.pem")),
                ..TlsConfig::default()
            }
        }
    }

    fn new_ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// Issues a leaf; returns (cert PEM, key PEM, cert DER).
    fn issue(
        ca: &Ca,
        cn: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write =
            |name: &str, contents: &str| fs::write(dir.path().join(name), contents).unwrap();

        let ca = new_ca("sec test ca");
        let rogue_ca = new_ca("rogue ca");
        write("ca.pem", &ca.pem());

        let (cert, key, server_der) = issue(
            &ca,
            "sec test server",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write("server.pem", &cert);
        write("server.key", &key);

        let (cert, key, client_der) = issue(
            &ca,
            "sec test client",
            vec![SanType::URI("spiffe://sec/test-client".try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write("client.pem", &cert);
        write("client.key", &key);

        let (cert, key, _) = issue(
            &rogue_ca,
            "rogue client",
            vec![SanType::URI("spiffe://sec/test-client".try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write("rogue.pem", &cert);
        write("rogue.key", &key);

        Pki {
            dir,
            client_der,
            server_der,
            ca_der: ca.der().to_vec(),
        }
    }

    type Seen = Arc<Mutex<Vec<Option<PeerIdentity>>>>;

    struct TestServer {
        addr: SocketAddr,
        seen: Seen,
        shutdown: CancellationToken,
        handle: JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl TestServer {
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.handle)
                .await
                .expect("server stops after shutdown")
                .unwrap()
                .unwrap();
        }
    }

    /// Serves `grpc.health.v1` over [`tls_incoming`], recording the [`peer_identity`] of
    /// every request that reaches the service.
    async fn serve_health(config: &TlsConfig) -> TestServer {
        let server_config = config.server_config().unwrap().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let seen: Seen = Arc::default();

        let (_reporter, health) = tonic_health::server::health_reporter();
        let record = Arc::clone(&seen);
        let health = InterceptedService::new(health, move |req: tonic::Request<()>| {
            record.lock().unwrap().push(peer_identity(&req));
            Ok(req)
        });
        let incoming = tls_incoming(listener, server_config, shutdown.clone());
        let signal = shutdown.clone().cancelled_owned();
        let handle = tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, signal),
        );
        TestServer {
            addr,
            seen,
            shutdown,
            handle,
        }
    }

    /// One health `Check` call to `addr` (connecting to 127.0.0.1, verifying "localhost").
    async fn health_check(addr: SocketAddr, client: &TlsConfig) -> Result<(), String> {
        let tls = client.client_config("localhost").unwrap().unwrap();
        let call = async {
            let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
                .map_err(|e| format!("endpoint: {e}"))?
                .tls_config(tls)
                .map_err(|e| format!("tls config: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|status| format!("call: {status:?}"))?;
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(15), call)
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()))
    }

    #[tokio::test]
    async fn mtls_client_with_valid_certificate_is_served_and_identified() {
        let pki = pki();
        let server = serve_health(&pki.server(true)).await;

        health_check(server.addr, &pki.client(Some("client")))
            .await
            .unwrap();

        let seen = server.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![Some(PeerIdentity("spiffe://sec/test-client".to_owned()))]
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn mtls_refuses_client_without_certificate() {
        let pki = pki();
        let server = serve_health(&pki.server(true)).await;

        let result = health_check(server.addr, &pki.client(None)).await;
        assert!(result.is_err(), "call without client cert must fail");
        assert!(
            server.seen.lock().unwrap().is_empty(),
            "request reached the service"
        );

        // The server is still healthy for a legitimate client afterwards.
        health_check(server.addr, &pki.client(Some("client")))
            .await
            .unwrap();
        server.stop().await;
    }

    #[tokio::test]
    async fn mtls_refuses_client_certificate_from_other_ca() {
        let pki = pki();
        let server = serve_health(&pki.server(true)).await;

        let result = health_check(server.addr, &pki.client(Some("rogue"))).await;
        assert!(result.is_err(), "call with rogue client cert must fail");
        assert!(
            server.seen.lock().unwrap().is_empty(),
            "request reached the service"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn server_only_tls_serves_anonymous_clients_without_identity() {
        let pki = pki();
        let server = serve_health(&pki.server(false)).await;

        health_check(server.addr, &pki.client(None)).await.unwrap();
        assert_eq!(server.seen.lock().unwrap().clone(), vec![None]);
        server.stop().await;
    }

    #[tokio::test]
    async fn client_rejects_server_not_signed_by_its_ca() {
        let pki = pki();
        let server = serve_health(&pki.server(false)).await;

        // Trust the rogue client's cert as "CA": the server chain does not lead there.
        let client = TlsConfig {
            ca_file: Some(pki.path("rogue.pem")),
            ..TlsConfig::default()
        };
        assert!(health_check(server.addr, &client).await.is_err());
        server.stop().await;
    }

    /// Raw TLS server over [`tls_incoming`] that echoes one byte per connection.
    async fn echo_server(config: Arc<ServerConfig>) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let mut incoming = Box::pin(tls_incoming(listener, config, shutdown.clone()));
        tokio::spawn(async move {
            while let Some(stream) = incoming.next().await {
                let mut stream = stream.unwrap();
                tokio::spawn(async move {
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).await.is_ok() {
                        let _ = stream.write_all(&byte).await;
                        let _ = stream.flush().await;
                    }
                });
            }
        });
        (addr, shutdown)
    }

    /// Handshakes with a rustls client limited to `versions`, then round-trips one byte.
    async fn raw_handshake(
        pki: &Pki,
        addr: SocketAddr,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Result<rustls::ProtocolVersion, String> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(pki.ca_der.clone())).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let attempt = async {
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            assert_eq!(&byte, b"x");
            Ok(tls.get_ref().1.protocol_version().unwrap())
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()))
    }

    #[tokio::test]
    async fn default_server_config_is_tls13_only() {
        let pki = pki();
        let (addr, shutdown) =
            echo_server(pki.server(false).server_config().unwrap().unwrap()).await;

        let tls12 = raw_handshake(&pki, addr, &[&rustls::version::TLS12]).await;
        assert!(tls12.is_err(), "tls 1.2 handshake must fail: {tls12:?}");

        // Control: the same client setup succeeds over TLS 1.3.
        let tls13 = raw_handshake(&pki, addr, &[&rustls::version::TLS13]).await;
        assert_eq!(tls13, Ok(rustls::ProtocolVersion::TLSv1_3));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn allow_tls12_accepts_tls12() {
        let pki = pki();
        let config = TlsConfig {
            allow_tls12: true,
            ..pki.server(false)
        };
        let (addr, shutdown) = echo_server(config.server_config().unwrap().unwrap()).await;

        let tls12 = raw_handshake(&pki, addr, &[&rustls::version::TLS12]).await;
        assert_eq!(tls12, Ok(rustls::ProtocolVersion::TLSv1_2));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn stalled_handshake_does_not_block_accept_loop() {
        let pki = pki();
        let (addr, shutdown) =
            echo_server(pki.server(false).server_config().unwrap().unwrap()).await;

        // Connections that never send a ClientHello (and one that sends garbage).
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

        let started = std::time::Instant::now();
        let result = raw_handshake(&pki, addr, &[&rustls::version::TLS13]).await;
        assert_eq!(result, Ok(rustls::ProtocolVersion::TLSv1_3));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(idle);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn incoming_stream_ends_on_shutdown() {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let config = pki.server(false).server_config().unwrap().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, config, shutdown.clone()));

        shutdown.cancel();
        let next = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(next, Ok(None)), "stream must end on shutdown");
    }

    #[test]
    fn server_config_properties() {
        let pki = pki();
        let config = pki.server(false).server_config().unwrap().unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(TlsConfig::default().server_config().unwrap().is_none());
        assert!(pki.server(true).server_config().unwrap().is_some());
    }

    #[test]
    fn missing_key_file_error_names_the_path() {
        let pki = pki();
        let missing = pki.path("does-not-exist.key");
        let config = TlsConfig {
            key_file: Some(missing.clone()),
            ..pki.server(true)
        };
        let error = config.server_config().unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error:?}");
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn bad_files_are_reported_without_key_material() {
        let pki = pki();
        // A certificate file given as the key: no private key in it.
        let config = TlsConfig {
            key_file: Some(pki.path("server.pem")),
            ..pki.server(false)
        };
        let error = config.server_config().unwrap_err();
        assert!(matches!(error, TlsError::NoPrivateKey { .. }), "{error:?}");

        // A key file given as the certificate: no certificates in it.
        let config = TlsConfig {
            cert_file: Some(pki.path("server.key")),
            ..pki.server(false)
        };
        let error = config.server_config().unwrap_err();
        assert!(
            matches!(error, TlsError::NoCertificates { .. }),
            "{error:?}"
        );

        // Mismatched key: rejected, message names both files and no key bytes.
        let config = TlsConfig {
            key_file: Some(pki.path("client.key")),
            ..pki.server(false)
        };
        let error = config.server_config().unwrap_err();
        assert!(
            matches!(error, TlsError::CertificateKey { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("client.key"), "{message}");
        let key_pem = fs::read_to_string(pki.path("client.key")).unwrap();
        let key_body = key_pem.lines().nth(1).unwrap();
        assert!(!message.contains(key_body));

        // Corrupt base64 in a key file.
        let corrupt = pki.path("corrupt.key");
        fs::write(
            &corrupt,
            "-----BEGIN PRIVATE KEY-----\n!!!!secret!!!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let config = TlsConfig {
            key_file: Some(corrupt),
            ..pki.server(false)
        };
        let error = config.server_config().unwrap_err();
        assert!(matches!(error, TlsError::InvalidPem { .. }), "{error:?}");
        assert!(!error.to_string().contains("secret"));
    }

    #[test]
    fn incomplete_configs_are_rejected() {
        let pki = pki();
        let no_key = TlsConfig {
            key_file: None,
            ..pki.server(false)
        };
        assert!(matches!(
            no_key.server_config(),
            Err(TlsError::Incomplete(_))
        ));

        let mtls_without_cert = TlsConfig {
            client_ca_file: Some(pki.path("ca.pem")),
            ..TlsConfig::default()
        };
        assert!(matches!(
            mtls_without_cert.server_config(),
            Err(TlsError::Incomplete(_))
        ));

        // A TLS client needs the platform CA: no fallback to public roots.
        let client_without_ca = TlsConfig {
            ca_file: None,
            ..pki.client(Some("client"))
        };
        assert!(matches!(
            client_without_ca.client_config("localhost"),
            Err(TlsError::Incomplete(_))
        ));
        assert!(matches!(
            pki.client(None).client_config("not a host name"),
            Err(TlsError::InvalidServerName(_))
        ));
        assert!(
            TlsConfig::default()
                .client_config("localhost")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn identity_from_der_prefers_uri_then_dns_then_cn() {
        let pki = pki();
        assert_eq!(
            identity_from_der(&pki.client_der),
            Some(PeerIdentity("spiffe://sec/test-client".to_owned()))
        );
        assert_eq!(
            identity_from_der(&pki.server_der),
            Some(PeerIdentity("localhost".to_owned()))
        );
        assert_eq!(
            identity_from_der(&pki.ca_der),
            Some(PeerIdentity("sec test ca".to_owned()))
        );
    }

    #[test]
    fn identity_from_der_rejects_garbage() {
        assert_eq!(identity_from_der(b""), None);
        assert_eq!(identity_from_der(b"definitely not a certificate"), None);
        let pki = pki();
        let mut trailing = pki.client_der.clone();
        trailing.push(0);
        assert_eq!(identity_from_der(&trailing), None);
        assert_eq!(
            identity_from_der(&pki.client_der[..pki.client_der.len() - 1]),
            None
        );
    }

    #[test]
    fn config_deserializes_strictly() {
        let config: TlsConfig = toml::from_str(
            r#"
            cert_file = "/etc/sec/tls/server.pem"
            key_file = "/etc/sec/tls/server.key"
            client_ca_file = "/etc/sec/tls/ca.pem"
            "#,
        )
        .unwrap();
        assert!(config.enabled());
        assert!(!config.allow_tls12);
        assert_eq!(config.ca_file, None);
        assert!(toml::from_str::<TlsConfig>("cert = \"/x\"").is_err());
        assert_eq!(
            toml::from_str::<TlsConfig>("").unwrap(),
            TlsConfig::default()
        );
    }
}
