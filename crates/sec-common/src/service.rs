//! What every service shares: the [`Platform`] it runs on (config, clock, event bus,
//! authenticator), its [`Listeners`], and [`ServiceHost`], which runs the lifecycle the
//! same way for all of them: admin endpoints, gRPC with health and reflection, the
//! started/stopped events, and graceful drain on shutdown.
//!
//! A service crate is a library with `run(platform, listeners, shutdown)`; its `main.rs`
//! calls [`standalone_main`], and `secd` and the test harness call the same `run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
use crate::auth::Authenticator;
use crate::clock::SharedClock;
use crate::config::{Config, ProcessEnv, ServiceAddrs};
use crate::events::{ActorKind, EventBus, SecurityEvent, new_event};
use crate::spec::ServiceSpec;

/// Exit code for a configuration error (EX_CONFIG would be 78; 64 is EX_USAGE, which the
/// conventions ask for: the operator must fix how the program is invoked).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Shared resources of the services in one process.
#[derive(Clone)]
pub struct Platform {
    pub config: Arc<Config>,
    pub clock: SharedClock,
    pub events: EventBus,
    pub auth: Arc<Authenticator>,
    /// In-process credentials of the services in this process (empty for a standalone
    /// binary, whose calls authenticate with mTLS).
    pub credentials: crate::auth::ServiceCredentials,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("events", &self.events)
            .finish()
    }
}

impl Platform {
    /// Connects the event bus: NATS JetStream when `events.nats_url` is set, else the
    /// in-process bus; either way with the durable outbox in `events.outbox_dir`, by
    /// default `<data_dir>/outbox/<client_name>`. Fails when that outbox is held by
    /// another process.
    pub async fn connect(
        mut config: Config,
        auth: Authenticator,
        clock: SharedClock,
        client_name: &str,
    ) -> anyhow::Result<Self> {
        // An event the broker refuses for good is kept here rather than blocking the bus.
        if config.events.dead_letter_file.is_none() {
            config.events.dead_letter_file = Some(config.data_dir.join("events.deadletter"));
        }
        // Accepted events survive a crash of this process. One directory per process (it
        // is locked): standalone services may share a data_dir, as their SQLite files do.
        if config.events.outbox_dir.is_none() {
            config.events.outbox_dir = Some(
                config
                    .data_dir
                    .join("outbox")
                    .join(outbox_dir_name(client_name)),
            );
        }
        let transport: Arc<dyn crate::events::EventTransport> = match &config.events.nats_url {
            Some(url) => Arc::new(
                crate::events::nats::NatsTransport::connect(
                    url.expose(),
                    &config.events,
                    client_name,
                )
                .await
                .context("connecting to NATS")?,
            ),
            None => Arc::new(crate::events::memory::MemoryTransport::new(
                config.events.spool_capacity,
            )),
        };
        let events = EventBus::with_outbox(transport, &config.events, clock.clone())?;
        Ok(Self {
            config: Arc::new(config),
            clock,
            events,
            auth: Arc::new(auth),
            credentials: crate::auth::ServiceCredentials::default(),
        })
    }

    /// Publishes an event; a refusal (spool full) is logged loudly and counted, never
    /// silently dropped, and never fails the caller's operation.
    pub fn emit(&self, event: SecurityEvent) {
        if let Err(e) = self.events.publish(event) {
            tracing::error!(error = %e, "security event not accepted by the bus");
        }
    }

    /// Shares in-process service credentials (the authenticator must accept them too:
    /// `Authenticator::with_service_credentials`).
    pub fn with_credentials(mut self, credentials: crate::auth::ServiceCredentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// The bearer token service `name` sends to the services of this process, if any.
    pub fn credential(&self, name: &str) -> Option<&str> {
        self.credentials.token(name)
    }

    /// The addresses of `service` (this one, or a peer it calls) from the configuration.
    pub fn addrs(&self, service: &str) -> anyhow::Result<&ServiceAddrs> {
        Ok(self.config.service_addrs(service)?)
    }
}

/// `client_name` as a directory name: letters, digits, `-` and `_` kept, the rest `_`.
fn outbox_dir_name(client_name: &str) -> String {
    let name: String = client_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "process".into()
    } else {
        name
    }
}

/// Bound sockets of one service: gRPC, admin, and (auth-svc only) the HTTP facade.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses. Done after the config is validated.
    pub async fn bind(addrs: &ServiceAddrs, http: Option<SocketAddr>) -> anyhow::Result<Self> {
        let bind = |a: SocketAddr| async move {
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))
        };
        Ok(Self {
            grpc: bind(addrs.grpc_addr).await?,
            admin: bind(addrs.admin_addr).await?,
            http: match http {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }

    /// Port-0 listeners on loopback, for tests.
    pub async fn ephemeral(with_http: bool) -> anyhow::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let addrs = ServiceAddrs {
            grpc_addr: any,
            admin_addr: any,
            endpoint: None,
        };
        Self::bind(&addrs, with_http.then_some(any)).await
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// What a service hands [`ServiceHost::serve`].
pub struct Serve {
    /// The service's own gRPC routes, unwrapped: the host enforces the spec's access
    /// tables on every one of them.
    pub routes: tonic::service::Routes,
    /// The HTTP facade router, for the service that owns it.
    pub http: Option<axum::Router>,
}

/// Runs one service's lifecycle.
pub struct ServiceHost {
    pub name: &'static str,
    pub spec: &'static ServiceSpec,
    pub platform: Platform,
    pub readiness: Arc<Readiness>,
    pub registry: Registry,
    /// Installation id and first start, once the database is open (in the started event).
    instance: Option<(uuid::Uuid, chrono::DateTime<chrono::Utc>)>,
    backends: Vec<(&'static str, &'static str)>,
}

impl std::fmt::Debug for ServiceHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHost")
            .field("name", &self.name)
            .finish()
    }
}

impl ServiceHost {
    pub fn new(spec: &'static ServiceSpec, platform: &Platform) -> Self {
        let name = spec.name;
        let readiness = Readiness::new();
        readiness.add_check("events", Arc::new(platform.events.clone()));
        let mut registry = Registry::default();
        platform.events.register_metrics(&mut registry);
        let backends = vec![("events", platform.events.transport_kind())];
        Self {
            name,
            spec,
            platform: platform.clone(),
            readiness,
            registry,
            instance: None,
            backends,
        }
    }

    /// Opens this service's database (running its migrations), adds it to readiness and
    /// reads the installation identity kept in it.
    pub async fn open_db(
        &mut self,
        migrations: &crate::storage::Migrations,
    ) -> anyhow::Result<crate::storage::Db> {
        debug_assert!(
            self.spec
                .migrations
                .is_some_and(|m| std::ptr::eq(m, migrations)),
            "{}: SPEC.migrations must be the migrations its run opens the database with",
            self.name
        );
        let db = crate::storage::connect_db(&self.platform.config, self.name, migrations).await?;
        self.readiness.add_check("database", Arc::new(db.clone()));
        self.instance =
            Some(crate::storage::ensure_instance(&db, self.platform.clock.now()).await?);
        self.backends.push(("database", db.backend()));
        Ok(db)
    }

    /// The installation identity read by [`Self::open_db`] (`None` before it): stable
    /// across restarts of this database, different between installations.
    pub fn instance_id(&self) -> Option<uuid::Uuid> {
        self.instance.map(|(id, _)| id)
    }

    /// Connects the key-value store (Redis or in-process) and adds it to readiness.
    pub async fn open_kv(&mut self) -> anyhow::Result<crate::storage::Kv> {
        let kv = crate::storage::connect_kv(
            &self.platform.config,
            self.name,
            self.platform.clock.clone(),
        )
        .await?;
        self.readiness.add_check("kv", Arc::new(kv.clone()));
        self.backends.push(("kv", kv.backend()));
        Ok(kv)
    }

    fn lifecycle_event(&self, verb: &str, addr: Option<SocketAddr>) -> SecurityEvent {
        let mut e = new_event(
            self.platform.clock.as_ref(),
            self.name,
            &format!("sec.{}.service.{verb}", self.name),
        );
        e.actor = Some(crate::events::Actor {
            kind: ActorKind::Service as i32,
            id: format!("{}-svc", self.name),
        });
        e.subject = format!("{}-svc", self.name);
        e.details
            .insert("version".into(), env!("CARGO_PKG_VERSION").into());
        if let Some(a) = addr {
            e.details.insert("grpc_addr".into(), a.to_string());
        }
        if let Some((id, since)) = &self.instance {
            e.details.insert("instance_id".into(), id.to_string());
            e.details
                .insert("first_started_at".into(), since.to_rfc3339());
        }
        for (k, v) in &self.backends {
            e.details.insert(format!("{k}_backend"), (*v).into());
        }
        e
    }

    /// Serves until `shutdown`, then drains: readiness and health go false, servers stop
    /// accepting, in-flight calls get `shutdown.grace_seconds`, and a stopped event is sent.
    pub async fn serve(
        self,
        serve: Serve,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let name = self.name;
        let grace = Duration::from_secs(self.platform.config.shutdown.grace_seconds);
        let grpc_addr = listeners.grpc_addr();

        let started = self.lifecycle_event("started", Some(grpc_addr));
        let stopped = self.lifecycle_event("stopped", None);
        let admin_stop = CancellationToken::new();
        let admin_router = crate::admin::router(self.readiness.clone(), Arc::new(self.registry));
        let admin = tokio::spawn(crate::admin::serve(
            listeners.admin,
            admin_router,
            admin_stop.clone(),
        ));

        let grpc_names = self.spec.grpc_names();
        let (routes, health) =
            crate::grpc::add_standard_services(serve.routes, &grpc_names).await?;
        let tls = self.platform.config.tls.server_config()?;
        let access = crate::auth::AccessLayer::new(
            self.platform.auth.clone(),
            crate::auth::AccessPolicy::new(self.spec.access),
        );
        let grpc = tokio::spawn(crate::grpc::serve(
            routes,
            access,
            listeners.grpc,
            tls,
            shutdown.clone(),
        ));
        let http = match (serve.http, listeners.http) {
            (Some(router), Some(listener)) => {
                let stop = shutdown.clone();
                Some(tokio::spawn(async move {
                    axum::serve(
                        listener,
                        router.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                }))
            }
            _ => None,
        };
        tracing::info!(service = name, grpc = %grpc_addr, "service started");
        self.platform.emit(started);

        // Wait for shutdown, or for a server to fail on its own.
        let mut grpc = grpc;
        let early = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut grpc => Some(r),
        };
        self.readiness.start_draining();
        crate::grpc::set_not_serving(&health, &grpc_names).await;
        let mut result = Ok(());
        match early {
            Some(r) => {
                result = flatten(r).context("gRPC server stopped unexpectedly");
                shutdown.cancel();
            }
            None => match tokio::time::timeout(grace, &mut grpc).await {
                Ok(r) => result = flatten(r),
                Err(_) => {
                    tracing::warn!(
                        service = name,
                        grace_s = grace.as_secs(),
                        "grace period over, cutting off in-flight calls"
                    );
                    grpc.abort();
                }
            },
        }
        if let Some(mut h) = http {
            match tokio::time::timeout(grace, &mut h).await {
                Ok(Ok(Err(e))) => tracing::error!(service = name, error = %e, "http facade failed"),
                Ok(_) => {}
                Err(_) => h.abort(),
            }
        }
        self.platform.emit(stopped);
        admin_stop.cancel();
        let _ = admin.await;
        tracing::info!(service = name, "service stopped");
        result
    }
}

fn flatten(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    r.map_err(|e| anyhow::anyhow!("server task failed: {e}"))?
}

/// Command line shared by every service binary.
#[derive(Debug, clap::Parser)]
pub struct ServiceArgs {
    /// TOML configuration file (optional; `SEC_*` variables overlay it).
    #[arg(long, short, env = "SEC_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<ServiceCommand>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// Start the service (the default).
    Serve,
    /// Validate the configuration and print it (secrets redacted), then exit.
    CheckConfig,
    /// Apply the service's database migrations, print what was done, then exit (run
    /// again: nothing to do). Exit 64 on a bad configuration, 1 if the database fails.
    Migrate,
}

/// `<bin> migrate`: applies `spec`'s migrations to the database `config` names (the
/// schema or SQLite file the service itself opens), under the same lock, and reports
/// what it did. `None` for a service without a database. Touches nothing else: no
/// port, no broker, no peer.
pub async fn migrate(
    spec: &ServiceSpec,
    config: &Config,
) -> anyhow::Result<Option<crate::storage::MigrationReport>> {
    match spec.migrations {
        Some(m) => Ok(Some(
            crate::storage::migrate_db(config, spec.name, m).await?,
        )),
        None => Ok(None),
    }
}

fn migrate_main(spec: &ServiceSpec, config: &Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(migrate(spec, config)) {
        Ok(Some(report)) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!("{}: no database, nothing to migrate", spec.name);
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Errors never carry the database URL (storage.rs keeps it out of them).
            eprintln!("{}-svc migrate failed: {e:#}", spec.name);
            ExitCode::FAILURE
        }
    }
}

/// Loads and preflights the configuration for `specs`, or prints the error and returns
/// the exit code to use (64). Nothing is bound yet when this runs.
pub fn load_config(
    path: Option<&std::path::Path>,
    specs: &[&ServiceSpec],
) -> Result<Config, ExitCode> {
    crate::spec::load_config(path, &ProcessEnv, specs)
        .and_then(|c| crate::spec::preflight(&c, specs).map(|()| c))
        .map_err(|e| {
            eprintln!("configuration error: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        })
}

/// The whole `main` of a service binary: flags, config (validated and preflighted before
/// any port is bound; exit 64 when bad), telemetry, platform, listeners, `run`, drain.
pub fn standalone_main(spec: &'static ServiceSpec) -> ExitCode {
    use clap::Parser as _;
    let service = spec.name;
    let args = ServiceArgs::parse();
    if matches!(args.command, Some(ServiceCommand::Migrate)) {
        // The configuration is loaded and validated, but not preflighted: migrating needs
        // only the database, not the TLS files, admin credential, peers or keys a start
        // needs (a migration Job or init container gets the database URL alone).
        return match crate::spec::load_config(args.config.as_deref(), &ProcessEnv, &[spec]) {
            Ok(config) => migrate_main(spec, &config),
            Err(e) => {
                eprintln!("configuration error: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        };
    }
    let config = match load_config(args.config.as_deref(), &[spec]) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if matches!(args.command, Some(ServiceCommand::CheckConfig)) {
        print!("{}", config.to_redacted_toml());
        eprintln!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        let telemetry = match crate::telemetry::init(&config.telemetry, &format!("{service}-svc")) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("telemetry: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let result = async {
            let addrs = config
                .services
                .get(service)
                .cloned()
                .with_context(|| format!("services.{service} is not configured"))?;
            let http = spec.http_facade.then_some(config.facade.http_addr);
            if config.events.nats_url.is_none() {
                tracing::warn!("no events.nats_url: events stay inside this process; run audit-svc in the same process (secd) or configure NATS");
            }
            let auth = Authenticator::from_config(&config)?;
            let platform = Platform::connect(config, auth, crate::clock::system(), &format!("{service}-svc")).await?;
            let listeners = Listeners::bind(&addrs, http).await?;
            let shutdown = crate::shutdown::on_signal();
            (spec.run)(platform.clone(), listeners, shutdown).await?;
            drain_events(&platform).await;
            anyhow::Ok(())
        }
        .await;
        telemetry.shutdown();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{service}-svc failed: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    // Services have drained and events are flushed: bound the runtime teardown.
    rt.shutdown_timeout(Duration::from_millis(500));
    code
}

/// Waits for the event spool to reach the broker before exit; logs what could not.
pub async fn drain_events(platform: &Platform) {
    let grace = Duration::from_secs(platform.config.shutdown.grace_seconds.max(1));
    let left = platform.events.flush(grace).await;
    if left > 0 {
        tracing::error!(
            pending = left,
            "exiting with security events the broker has not stored"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connect(data_dir: &std::path::Path, name: &str) -> anyhow::Result<Platform> {
        let config = Config {
            data_dir: data_dir.to_owned(),
            ..Config::default()
        };
        let auth = Authenticator::from_config(&config)?;
        Platform::connect(config, auth, crate::clock::system(), name).await
    }

    #[tokio::test]
    async fn each_process_gets_its_own_locked_outbox_under_data_dir() {
        let data = tempfile::tempdir().unwrap();
        let secd = connect(data.path(), "secd").await.unwrap();
        let dir = data.path().join("outbox").join("secd");
        assert_eq!(
            secd.config.events.outbox_dir.as_deref(),
            Some(dir.as_path())
        );
        assert!(dir.join("LOCK").exists());
        // Standalone services sharing a data_dir each have their own.
        let crypto = connect(data.path(), "crypto-svc").await.unwrap();
        assert!(data.path().join("outbox").join("crypto-svc").is_dir());
        // A second process of the same name on the same data is refused, by name.
        let err = connect(data.path(), "secd").await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&dir.display().to_string()) && msg.contains("in use"),
            "{msg}"
        );
        drop((secd, crypto));
        connect(data.path(), "secd").await.unwrap();
        assert_eq!(outbox_dir_name("a b/../c"), "a_b____c");
        assert_eq!(outbox_dir_name(""), "process");
    }
}
