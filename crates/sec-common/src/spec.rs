//! A service declares itself once, in its own crate: a [`ServiceSpec`] with its name, the
//! gRPC services it serves, its per-RPC access tables, its configuration section, the
//! checks that must pass before any port is bound, and its `run`. `secd`, the test
//! harness, `sec-load` and the service's own binary all consume the same value, so adding
//! a service is its crate plus one line in `secd::SERVICES`.

use std::future::Future;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

use crate::auth::AccessTable;
use crate::config::{Config, ConfigError, ConfigSection, ServiceConfigSpec};
use crate::service::{Listeners, Platform};

/// What a service's `run` returns.
pub type ServiceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One service, as every launcher sees it.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Short name (`crypto`): config keys, schema, metrics and event prefixes.
    pub name: &'static str,
    /// Default gRPC and admin ports on loopback (the embedded default).
    pub default_ports: (u16, u16),
    /// Whether the service serves the HTTP facade (`facade.http_addr`).
    pub http_facade: bool,
    /// The access table of each gRPC service it serves; their names are what health and
    /// reflection report.
    pub access: &'static [AccessTable],
    /// Other services it calls (their `services.<name>` must be configured).
    pub calls: &'static [&'static str],
    /// Its configuration sections: usually one, `[<name>]`; none for a service without
    /// settings of its own; auth-svc has `[oauth]` and the edge layers' `[edge]`.
    pub config: &'static [ConfigSection],
    /// Fallible configuration it needs to start (files, keys), checked before any port
    /// is bound; an error is a configuration error (exit 64).
    pub preflight: fn(&Config) -> Result<(), ConfigError>,
    /// Its embedded SQL migrations (the ones its `run` hands `ServiceHost::open_db`), so
    /// that `<bin> migrate` can apply them without starting the service; `None` for a
    /// service without a database.
    pub migrations: Option<&'static crate::storage::Migrations>,
    pub run: fn(Platform, Listeners, CancellationToken) -> ServiceFuture,
}

impl ServiceSpec {
    /// The fully qualified gRPC service names it serves.
    pub fn grpc_names(&self) -> Vec<&'static str> {
        self.access.iter().map(|t| t.service).collect()
    }

    /// What the configuration loader needs of it.
    pub fn config_spec(&self) -> ServiceConfigSpec {
        ServiceConfigSpec {
            name: self.name,
            default_ports: self.default_ports,
            calls: self.calls,
            sections: self.config,
        }
    }
}

/// A preflight for services that need nothing beyond the common checks.
pub fn no_preflight(_: &Config) -> Result<(), ConfigError> {
    Ok(())
}

/// Loads the configuration for `specs` (defaults, file, `SEC_*` env).
pub fn load_config(
    file: Option<&std::path::Path>,
    env: &dyn crate::config::EnvSource,
    specs: &[&ServiceSpec],
) -> Result<Config, ConfigError> {
    let cs: Vec<ServiceConfigSpec> = specs.iter().map(|s| s.config_spec()).collect();
    Config::load(file, env, &cs)
}

/// Every check that can fail on configuration, run before any port is bound: the common
/// ones (TLS files, the admin credential, peers' endpoints) and each spec's own.
pub fn preflight(config: &Config, specs: &[&ServiceSpec]) -> Result<(), ConfigError> {
    let invalid = |key: &str, e: &dyn std::fmt::Display| ConfigError::Invalid {
        key: key.into(),
        message: format!("{e:#}"),
    };
    config
        .tls
        .server_config()
        .map_err(|e| invalid("tls", &format!("{e:#}")))?;
    if config.tls.enabled() {
        config
            .tls
            .client_config("localhost")
            .map_err(|e| invalid("tls", &format!("{e:#}")))?;
    }
    crate::auth::Authenticator::from_config(config)
        .map_err(|e| invalid("auth.admin_token_hash", &format!("{e:#}")))?;
    for s in specs {
        // A peer served by this same process gets its address when it binds.
        for peer in s
            .calls
            .iter()
            .filter(|p| !specs.iter().any(|s| s.name == **p))
        {
            config.service_addrs(peer)?;
        }
        (s.preflight)(config)?;
    }
    Ok(())
}
