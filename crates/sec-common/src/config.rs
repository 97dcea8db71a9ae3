//! Typed platform configuration: defaults, an optional TOML file, then a `SEC_`-prefixed
//! environment overlay (`SEC_STORAGE__DATABASE_URL` sets `storage.database_url`).
//!
//! Every struct denies unknown fields, so a typo is an error naming the key instead of a
//! silently ignored setting. Secrets (URLs with passwords, token hashes) are wrapped in
//! [`Secret`] so that neither `Debug` nor `check-config` output can print them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::telemetry::TelemetryConfig;
use crate::tls::TlsConfig;

/// Environment variables with the `SEC_` prefix that are not configuration keys: these
/// exact names, and anything starting with `SEC_TEST_` (test-suite settings).
const NON_CONFIG_VARS: [&str; 2] = ["SEC_CONFIG", "SEC_TOKEN"];
const NON_CONFIG_PREFIX: &str = "SEC_TEST_";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded default keeps its SQLite files, generated KEK and bootstrap token.
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    pub events: EventsConfig,
    pub telemetry: TelemetryConfig,
    /// TLS for every gRPC server and client. Off: plaintext (dev on loopback only).
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub shutdown: ShutdownConfig,
    /// The HTTP facade (served by auth-svc).
    pub facade: FacadeConfig,
    /// Where each service listens and is reached, by short name (`crypto`). Defaults come
    /// from the [`ServiceSpec`]s of this process; peers it calls are configured here.
    pub services: BTreeMap<String, ServiceAddrs>,
    /// Each service's own section (`[crypto]`), typed and validated by the service's spec.
    #[serde(skip)]
    pub sections: Sections,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".secdata"),
            storage: StorageConfig::default(),
            events: EventsConfig::default(),
            telemetry: TelemetryConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            shutdown: ShutdownConfig::default(),
            facade: FacadeConfig::default(),
            services: BTreeMap::new(),
            sections: Sections::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `postgres://...`; unset: a SQLite file per service under `data_dir`.
    pub database_url: Option<Secret>,
    /// Each service uses PostgreSQL schema `<prefix><service>` (tests isolate runs with it).
    pub postgres_schema_prefix: String,
    pub max_connections: u32,
    /// `redis://...`; unset: the in-process store (same expiry semantics, one process only).
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key this installation writes.
    pub redis_key_prefix: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            postgres_schema_prefix: String::new(),
            max_connections: 10,
            redis_url: None,
            redis_key_prefix: "sec:".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// `nats://...`; unset: the in-process bus (events reach audit-svc only inside one process).
    pub nats_url: Option<Secret>,
    /// JetStream stream holding every security event.
    pub stream: String,
    /// Events are published to `<subject_prefix>.<service>.<noun>.<verb>`.
    pub subject_prefix: String,
    /// Events kept in memory while the broker is unreachable; beyond it publish fails loudly.
    pub spool_capacity: usize,
    /// How long the broker keeps events (audit-svc keeps them for good).
    pub stream_max_age_hours: u64,
    /// Durable consumer name used by audit-svc.
    pub audit_consumer: String,
    /// Where events the broker refuses for good are appended (JSON lines, bounded); unset:
    /// they are only logged and counted. secd sets `<data_dir>/events.deadletter`.
    pub dead_letter_file: Option<PathBuf>,
    /// Largest event `publish` accepts (encoded protobuf plus headers), far below the NATS
    /// server's `max_payload` (1 MiB by default) so the broker never refuses for size.
    pub max_event_bytes: usize,
    /// Share of the spool one event type may fill; beyond it that type is refused while
    /// other types still get in, so one noisy producer cannot silence the others.
    pub max_type_share_percent: u8,
    /// Directory of this process's durable outbox: every accepted event is written there
    /// before `publish` returns and replayed at the next start if it was not delivered
    /// (a crash while the broker is down loses nothing). One process per directory (it is
    /// locked). Unset: the spool is in memory only. Services set
    /// `<data_dir>/outbox/<process>` (see `Platform::connect`).
    pub outbox_dir: Option<PathBuf>,
    /// Most bytes the outbox may hold on disk; beyond it `publish` refuses (counted in
    /// `sec_events_rejected_total{reason="outbox"}`). At least 1 MiB.
    pub outbox_max_bytes: u64,
    /// `sync_data` after every append: events also survive a power loss or kernel crash,
    /// not only the death of the process. Slow (a disk flush per event, milliseconds on
    /// most disks, against a few microseconds without); off by default.
    pub outbox_fsync: bool,
    /// audit-svc republishes messages it can never store to
    /// `<dead_letter_subject>.<reason>`, kept in the stream `<stream>_DLQ`.
    pub dead_letter_subject: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            stream: "SEC_EVENTS".into(),
            subject_prefix: "sec.events".into(),
            spool_capacity: 100_000,
            stream_max_age_hours: 24 * 7,
            audit_consumer: "audit-svc".into(),
            dead_letter_file: None,
            max_event_bytes: 64 * 1024,
            max_type_share_percent: 25,
            outbox_dir: None,
            outbox_max_bytes: 256 * 1024 * 1024,
            outbox_fsync: false,
            dead_letter_subject: "sec.deadletter".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Argon2id PHC hash of the admin bearer token (production: from a secret). Unset: the
    /// hash kept in `data_dir` by `secd dev`; if there is none either, admin calls are refused.
    pub admin_token_hash: Option<Secret>,
    /// mTLS identities (URI/DNS SAN or CN) of services allowed to call internal RPCs.
    pub trusted_peers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// In-flight work gets this long after SIGTERM before it is cut off.
    pub grace_seconds: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_seconds: 8 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FacadeConfig {
    pub http_addr: SocketAddr,
}

impl Default for FacadeConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// Where one service listens, and where its clients find it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceAddrs {
    /// Port 0 with no `endpoint` means "not configured" for a peer this process calls.
    #[serde(default = "unset_addr")]
    pub grpc_addr: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "unset_addr")]
    pub admin_addr: SocketAddr,
    /// URL clients dial (e.g. `https://crypto-svc.sec.svc:50055`); default derived from grpc_addr.
    #[serde(default)]
    pub endpoint: Option<String>,
}

fn unset_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl ServiceAddrs {
    pub fn local(grpc: u16, admin: u16) -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin)),
            endpoint: None,
        }
    }

    /// The URL a client dials: `endpoint` if set, else `http(s)://<grpc_addr>`.
    pub fn endpoint_url(&self, tls: bool) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => {
                let scheme = if tls { "https" } else { "http" };
                let addr = if self.grpc_addr.ip().is_unspecified() {
                    SocketAddr::new([127, 0, 0, 1].into(), self.grpc_addr.port())
                } else {
                    self.grpc_addr
                };
                format!("{scheme}://{addr}")
            }
        }
    }
}

/// A configuration value that must never be printed: `Debug` and `Serialize` show
/// `[redacted]` (URLs keep scheme and host so an operator can still tell them apart).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call sites are the places that hand it to a driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn redacted(&self) -> String {
        // Keep `scheme://host...` visible for URLs, drop credentials and the rest.
        match self.0.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                let host = host.split(['/', '?']).next().unwrap_or_default();
                format!("{scheme}://[redacted]@{host}")
            }
            None => "[redacted]".into(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Where environment variables come from. Tests pass a map instead of mutating the
/// process environment.
pub trait EnvSource {
    fn vars(&self) -> Vec<(String, String)>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration at `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// A service's own configuration section (`[crypto]`): a typed struct that denies unknown
/// fields, with defaults and checks of its own. The service crate owns the type; its
/// [`ServiceSpec`](crate::spec::ServiceSpec) registers it with [`ConfigSection::of`].
pub trait ServiceConfig:
    serde::de::DeserializeOwned + Serialize + Default + Clone + fmt::Debug + Send + Sync + 'static
{
    /// Checks beyond types: `Err((key within the section, message))`.
    fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

/// A parsed section, type-erased so `Config` can hold every service's.
pub trait Section: std::any::Any + fmt::Debug + Send + Sync {
    fn to_toml(&self) -> toml::Value;
    fn clone_box(&self) -> Box<dyn Section>;
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<T: ServiceConfig> Section for T {
    fn to_toml(&self) -> toml::Value {
        toml::Value::try_from(self).unwrap_or_else(|e| toml::Value::String(format!("<{e}>")))
    }
    fn clone_box(&self) -> Box<dyn Section> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The service sections of a configuration, by section name.
#[derive(Debug, Default)]
pub struct Sections(BTreeMap<&'static str, Box<dyn Section>>);

impl Clone for Sections {
    fn clone(&self) -> Self {
        Self(self.0.iter().map(|(k, v)| (*k, v.clone_box())).collect())
    }
}

impl PartialEq for Sections {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .all(|((ka, a), (kb, b))| ka == kb && a.to_toml() == b.to_toml())
    }
}

/// How a spec hands its section type to the loader (plain function pointers, so a spec
/// can be a `static`).
#[derive(Clone, Copy)]
pub struct ConfigSection {
    defaults: fn() -> toml::Value,
    parse: ParseSection,
    /// The top-level key; `None`: the service's name. auth-svc's is `oauth`, since
    /// `[auth]` is the platform's.
    key: Option<&'static str>,
}

type ParseSection = fn(&str, toml::Value) -> Result<Box<dyn Section>, ConfigError>;

impl fmt::Debug for ConfigSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigSection")
    }
}

impl ConfigSection {
    pub const fn of<T: ServiceConfig>() -> Self {
        Self {
            defaults: section_defaults::<T>,
            parse: parse_section::<T>,
            key: None,
        }
    }

    /// A section under its own top-level key instead of the service's name.
    pub const fn named<T: ServiceConfig>(key: &'static str) -> Self {
        Self {
            defaults: section_defaults::<T>,
            parse: parse_section::<T>,
            key: Some(key),
        }
    }

    /// The top-level key of this section for service `service`.
    pub fn key(&self, service: &'static str) -> &'static str {
        self.key.unwrap_or(service)
    }
}

fn section_defaults<T: ServiceConfig>() -> toml::Value {
    T::default().to_toml()
}

fn parse_section<T: ServiceConfig>(
    name: &str,
    value: toml::Value,
) -> Result<Box<dyn Section>, ConfigError> {
    let parsed: T = serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Invalid {
        key: format!("{name}.{}", e.path()),
        message: e.inner().to_string(),
    })?;
    parsed
        .validate()
        .map_err(|(key, message)| ConfigError::Invalid {
            key: format!("{name}.{key}"),
            message,
        })?;
    Ok(Box::new(parsed))
}

/// What the loader needs to know of one service: its name, default addresses, the peers it
/// calls, and its section.
#[derive(Debug, Clone, Copy)]
pub struct ServiceConfigSpec {
    pub name: &'static str,
    pub default_ports: (u16, u16),
    pub calls: &'static [&'static str],
    pub sections: &'static [ConfigSection],
}

impl Config {
    /// Defaults, overlaid by `file` (if any), overlaid by `SEC_*` variables from `env`.
    /// `services` are the services of this process: their addresses get defaults and their
    /// sections are parsed with their own types. Any other top-level key, or a
    /// `[services.<name>]` that is neither one of them nor a peer they call, is an error.
    pub fn load(
        file: Option<&Path>,
        env: &dyn EnvSource,
        services: &[ServiceConfigSpec],
    ) -> Result<Self, ConfigError> {
        let mut base = Config::default();
        for s in services {
            base.services.insert(
                s.name.to_owned(),
                ServiceAddrs::local(s.default_ports.0, s.default_ports.1),
            );
        }
        let mut template = toml::Table::try_from(&base).map_err(|e| ConfigError::Invalid {
            key: String::new(),
            message: e.to_string(),
        })?;
        for s in services {
            for sec in s.sections {
                // `[auth]` is the platform's; a service section may not shadow one (nor
                // another service's).
                let key = sec.key(s.name);
                if template.contains_key(key) {
                    return Err(ConfigError::Invalid {
                        key: key.to_owned(),
                        message: "a service section may not reuse a platform section's name".into(),
                    });
                }
                template.insert(key.to_owned(), (sec.defaults)());
            }
        }
        // Layers are merged key by key, so `[services.crypto] grpc_addr = ...` keeps the
        // default admin_addr.
        let mut tree = template.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let layer = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_owned(),
                })?;
            deep_merge(&mut tree, layer);
        }
        let mut vars = env.vars();
        vars.sort();
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix("SEC_") else {
                continue;
            };
            // `SEC_TOKEN` is the CLI's credential, but `SEC_TOKEN__ISSUER` is token-svc's key.
            if NON_CONFIG_VARS.contains(&var.as_str())
                || var.starts_with(NON_CONFIG_PREFIX)
                || rest.is_empty()
            {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            let parsed =
                typed_env_value(&template, &path, &value).map_err(|message| ConfigError::Env {
                    var: var.clone(),
                    message,
                })?;
            set_path(&mut tree, &path, parsed).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        // Service sections are the services' to parse; what remains is the common part.
        let mut sections = Sections::default();
        for s in services {
            // Only a service that owns a section takes its key out of the tree.
            for sec in s.sections {
                let key = sec.key(s.name);
                if let Some(value) = tree.remove(key) {
                    sections.0.insert(key, (sec.parse)(key, value)?);
                }
            }
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| ConfigError::Invalid {
                key: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        config.sections = sections;
        for name in config.services.keys() {
            let known = services
                .iter()
                .any(|s| s.name == name || s.calls.contains(&name.as_str()));
            if !known {
                return Err(ConfigError::Invalid {
                    key: format!("services.{name}"),
                    message: "not a service of this process or one it calls".into(),
                });
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The section of service `name`, as its type `T`.
    pub fn section<T: ServiceConfig>(&self, name: &str) -> anyhow::Result<&T> {
        self.sections
            .0
            .get(name)
            .and_then(|s| s.as_any().downcast_ref::<T>())
            .ok_or_else(|| anyhow::anyhow!("configuration has no [{name}] section of that type"))
    }

    /// Sets the section of service `name` (tests, launchers). Checked like a loaded one.
    pub fn set_section<T: ServiceConfig>(
        &mut self,
        name: &'static str,
        value: T,
    ) -> Result<(), ConfigError> {
        value
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                key: format!("{name}.{key}"),
                message,
            })?;
        self.sections.0.insert(name, Box::new(value));
        Ok(())
    }

    /// Addresses of a service or peer by short name; a peer with neither an address nor
    /// an endpoint is an error naming the key to set.
    pub fn service_addrs(&self, name: &str) -> Result<&ServiceAddrs, ConfigError> {
        match self.services.get(name) {
            Some(a) if a.endpoint.is_some() || a.grpc_addr.port() != 0 => Ok(a),
            _ => Err(ConfigError::Invalid {
                key: format!("services.{name}.endpoint"),
                message: format!("{name}-svc is called by this process: set its endpoint"),
            }),
        }
    }

    /// Checks that go beyond types. Run before any port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.events.spool_capacity == 0 {
            return invalid("events.spool_capacity", "must be at least 1");
        }
        if self.events.max_event_bytes == 0 || self.events.max_event_bytes > 1024 * 1024 {
            return invalid("events.max_event_bytes", "must be between 1 byte and 1 MiB");
        }
        if !(1..=100).contains(&self.events.max_type_share_percent) {
            return invalid("events.max_type_share_percent", "must be between 1 and 100");
        }
        if self.events.outbox_max_bytes < 1024 * 1024 {
            return invalid(
                "events.outbox_max_bytes",
                "must be at least 1 MiB (1048576)",
            );
        }
        if self.storage.max_connections == 0 {
            return invalid("storage.max_connections", "must be at least 1");
        }
        if let Some(url) = &self.storage.database_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return invalid(
                    "storage.database_url",
                    "must be a postgres:// URL (unset for the embedded SQLite default)",
                );
            }
        }
        if let Some(url) = &self.storage.redis_url {
            let u = url.expose();
            if u.starts_with("redis+sentinel://") {
                if !crate::storage::sentinel_url_ok(u) {
                    return invalid(
                        "storage.redis_url",
                        "a Sentinel URL is redis+sentinel://[:password@]host:port[,host:port...]/<master>[/<db>]",
                    );
                }
            } else if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return invalid(
                    "storage.redis_url",
                    "must be a redis://, rediss:// or redis+sentinel:// URL",
                );
            }
        }
        if let Some(url) = &self.events.nats_url {
            let u = url.expose();
            if !(u.starts_with("nats://") || u.starts_with("tls://")) {
                return invalid("events.nats_url", "must be a nats:// or tls:// URL");
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return invalid("tls", "cert_file and key_file must be set together");
        }
        if self.tls.client_ca_file.is_some() && self.tls.cert_file.is_none() {
            return invalid(
                "tls.client_ca_file",
                "mutual TLS needs cert_file and key_file",
            );
        }
        let valid_token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !valid_token(&self.events.stream) {
            return invalid("events.stream", "letters, digits, '_' and '-' only");
        }
        if self.events.subject_prefix.is_empty()
            || self.events.subject_prefix.contains(['*', '>', ' '])
        {
            return invalid("events.subject_prefix", "must be a literal NATS subject");
        }
        let (dl, events) = (
            &self.events.dead_letter_subject,
            &self.events.subject_prefix,
        );
        if dl.is_empty() || dl.contains(['*', '>', ' ']) {
            return invalid(
                "events.dead_letter_subject",
                "must be a literal NATS subject",
            );
        }
        if dl == events
            || dl.starts_with(&format!("{events}."))
            || events.starts_with(&format!("{dl}."))
        {
            return invalid(
                "events.dead_letter_subject",
                "must not overlap events.subject_prefix (the dead-letter stream is separate)",
            );
        }
        if !self
            .storage
            .postgres_schema_prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return invalid(
                "storage.postgres_schema_prefix",
                "lowercase letters, digits and '_' only",
            );
        }
        Ok(())
    }

    /// Whether every backend is the embedded one (no server URLs configured).
    pub fn is_embedded(&self) -> bool {
        self.storage.database_url.is_none()
            && self.storage.redis_url.is_none()
            && self.events.nats_url.is_none()
    }

    /// The effective configuration as TOML, secrets redacted: what `check-config` prints.
    pub fn to_redacted_toml(&self) -> String {
        let mut table = match toml::Table::try_from(self) {
            Ok(t) => t,
            Err(e) => return format!("# cannot render: {e}"),
        };
        for (name, section) in &self.sections.0 {
            table.insert((*name).to_owned(), section.to_toml());
        }
        toml::to_string_pretty(&table).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Environment values are strings; give them the type the key has in the defaults
/// (numbers, booleans, arrays as TOML), so `SEC_EVENTS__SPOOL_CAPACITY=10` is a number
/// while `SEC_STORAGE__REDIS_KEY_PREFIX=10` stays a string.
fn typed_env_value(
    template: &toml::Table,
    path: &[String],
    raw: &str,
) -> Result<toml::Value, String> {
    let mut cur: Option<&toml::Value> = None;
    let mut table = Some(template);
    for seg in path {
        cur = table.and_then(|t| t.get(seg));
        table = cur.and_then(toml::Value::as_table);
    }
    let parse_toml = |raw: &str| -> Result<toml::Value, String> {
        format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .ok_or_else(|| format!("`{raw}` is not a valid value here"))
    };
    match cur {
        Some(
            toml::Value::Integer(_)
            | toml::Value::Float(_)
            | toml::Value::Boolean(_)
            | toml::Value::Array(_),
        ) => parse_toml(raw),
        Some(toml::Value::Table(_)) => {
            Err("names a section, not a key; use `__` to reach a key inside it".into())
        }
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}

fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(tree: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut cur = tree;
    for seg in parents {
        let entry = cur
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{seg}` is not a section"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A service section as a service crate would declare it.
    #[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct CryptoLike {
        kek: Option<Secret>,
        max_payload_bytes: usize,
    }

    impl Default for CryptoLike {
        fn default() -> Self {
            Self {
                kek: None,
                max_payload_bytes: 4096,
            }
        }
    }

    impl ServiceConfig for CryptoLike {
        fn validate(&self) -> Result<(), (String, String)> {
            if self.max_payload_bytes == 0 {
                return Err(("max_payload_bytes".into(), "must be at least 1".into()));
            }
            Ok(())
        }
    }

    const SPECS: &[ServiceConfigSpec] = &[
        ServiceConfigSpec {
            name: "crypto",
            default_ports: (50055, 9105),
            calls: &[],
            sections: &[ConfigSection::of::<CryptoLike>()],
        },
        ServiceConfigSpec {
            name: "auth",
            default_ports: (50051, 9101),
            calls: &["crypto", "token"],
            sections: &[],
        },
    ];

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_embedded_platform() {
        let c = Config::load(None, &env(&[]), SPECS).unwrap();
        assert!(c.is_embedded());
        assert_eq!(c.services["crypto"].grpc_addr.port(), 50055);
        assert_eq!(c.facade.http_addr.port(), 8080);
    }

    #[test]
    fn file_then_env_overlay_with_types() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "data_dir = \"/var/lib/sec\"\n[events]\nspool_capacity = 5\nstream = \"A\""
        )
        .unwrap();
        let c = Config::load(
            Some(f.path()),
            &env(&[
                ("SEC_EVENTS__SPOOL_CAPACITY", "7"),
                ("SEC_STORAGE__REDIS_KEY_PREFIX", "10"),
                ("SEC_SERVICES__CRYPTO__GRPC_ADDR", "0.0.0.0:6000"),
                ("SEC_TOKEN", "not-config"),
                ("SEC_TEST_BACKENDS", "required"),
                ("HOME", "/root"),
            ]),
            SPECS,
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/sec"));
        assert_eq!(c.events.spool_capacity, 7, "env wins over file");
        assert_eq!(c.events.stream, "A");
        assert_eq!(c.storage.redis_key_prefix, "10", "string keys stay strings");
        assert_eq!(c.services["crypto"].grpc_addr.port(), 6000);
        assert_eq!(
            c.services["crypto"].endpoint_url(false),
            "http://127.0.0.1:6000"
        );
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[storage]\ndatabse_url = \"postgres://x\"").unwrap();
        let err = Config::load(Some(f.path()), &env(&[]), SPECS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("databse_url"), "{err}");
        assert!(err.contains("storage"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_an_error() {
        let err = Config::load(None, &env(&[("SEC_EVENTS__SPOOL", "1")]), SPECS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spool"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_key() {
        let err =
            Config::load(None, &env(&[("SEC_EVENTS__SPOOL_CAPACITY", "lots")]), SPECS).unwrap_err();
        assert!(
            err.to_string().contains("SEC_EVENTS__SPOOL_CAPACITY"),
            "{err}"
        );
        let err =
            Config::load(None, &env(&[("SEC_EVENTS__SPOOL_CAPACITY", "0")]), SPECS).unwrap_err();
        assert!(err.to_string().contains("events.spool_capacity"), "{err}");
        let err = Config::load(
            None,
            &env(&[("SEC_STORAGE__DATABASE_URL", "mysql://x")]),
            SPECS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("storage.database_url"), "{err}");
        let err = Config::load(None, &env(&[("SEC_TLS__CERT_FILE", "/c.pem")]), SPECS).unwrap_err();
        assert!(err.to_string().contains("key_file"), "{err}");
    }

    #[test]
    fn secrets_are_never_rendered() {
        let c = Config::load(
            None,
            &env(&[
                (
                    "SEC_STORAGE__DATABASE_URL",
                    "postgres://admin:hunter2@db.internal:5432/sec",
                ),
                ("SEC_AUTH__ADMIN_TOKEN_HASH", "$argon2id$v=19$secret"),
            ]),
            SPECS,
        )
        .unwrap();
        let shown = format!("{c:?}\n{}", c.to_redacted_toml());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("argon2id"), "{shown}");
        assert!(
            shown.contains("db.internal:5432"),
            "host stays visible: {shown}"
        );
        assert_eq!(
            c.storage.database_url.unwrap().expose(),
            "postgres://admin:hunter2@db.internal:5432/sec"
        );
    }

    #[test]
    fn service_sections_are_typed_checked_and_owned_by_their_spec() {
        let c = Config::load(
            None,
            &env(&[
                ("SEC_CRYPTO__MAX_PAYLOAD_BYTES", "10"),
                ("SEC_CRYPTO__KEK", "s3cr3t"),
            ]),
            SPECS,
        )
        .unwrap();
        let crypto = c.section::<CryptoLike>("crypto").unwrap();
        assert_eq!(
            crypto.max_payload_bytes, 10,
            "env values get the section's types"
        );
        assert!(
            !c.to_redacted_toml().contains("s3cr3t"),
            "section secrets redacted"
        );
        assert!(c.to_redacted_toml().contains("[crypto]"));

        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[crypto]\nkek_flie = \"/x\"").unwrap();
        let err = Config::load(Some(f.path()), &env(&[]), SPECS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("crypto") && err.contains("kek_flie"), "{err}");

        let err = Config::load(None, &env(&[("SEC_CRYPTO__MAX_PAYLOAD_BYTES", "0")]), SPECS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("crypto.max_payload_bytes"), "{err}");

        // A section of a service this process does not run is a typo, not a setting.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[crytpo]\nkek = \"x\"").unwrap();
        let err = Config::load(Some(f.path()), &env(&[]), SPECS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("crytpo"), "{err}");
    }

    /// The `auth` service has no section of its own: `[auth]` stays the platform's.
    #[test]
    fn a_service_named_like_a_platform_section_leaves_it_alone() {
        let c = Config::load(
            None,
            &env(&[("SEC_AUTH__TRUSTED_PEERS", "[\"spiffe://x\"]")]),
            SPECS,
        )
        .unwrap();
        assert_eq!(c.auth.trusted_peers, ["spiffe://x"]);
        const CLASH: &[ServiceConfigSpec] = &[ServiceConfigSpec {
            name: "auth",
            default_ports: (1, 2),
            calls: &[],
            sections: &[ConfigSection::of::<CryptoLike>()],
        }];
        let err = Config::load(None, &env(&[]), CLASH)
            .unwrap_err()
            .to_string();
        assert!(err.contains("platform section"), "{err}");

        // Under its own key (auth-svc's `[oauth]`) both coexist, each with its own values.
        const NAMED: &[ServiceConfigSpec] = &[ServiceConfigSpec {
            name: "auth",
            default_ports: (1, 2),
            calls: &[],
            sections: &[ConfigSection::named::<CryptoLike>("oauth")],
        }];
        let c = Config::load(
            None,
            &env(&[
                ("SEC_AUTH__TRUSTED_PEERS", "[\"spiffe://y\"]"),
                ("SEC_OAUTH__MAX_PAYLOAD_BYTES", "7"),
            ]),
            NAMED,
        )
        .unwrap();
        assert_eq!(c.auth.trusted_peers, ["spiffe://y"]);
        assert_eq!(
            c.section::<CryptoLike>("oauth").unwrap().max_payload_bytes,
            7
        );
        assert!(c.to_redacted_toml().contains("[oauth]"));
        let err = Config::load(None, &env(&[("SEC_OAUTH__MAX_PAYLOAD_BYTES", "0")]), NAMED)
            .unwrap_err()
            .to_string();
        assert!(err.contains("oauth.max_payload_bytes"), "{err}");
    }

    #[test]
    fn services_are_the_specs_and_the_peers_they_call() {
        let c = Config::load(
            None,
            &env(&[("SEC_SERVICES__TOKEN__ENDPOINT", "https://token:50052")]),
            SPECS,
        )
        .unwrap();
        assert_eq!(c.services["auth"].grpc_addr.port(), 50051);
        assert_eq!(
            c.service_addrs("token").unwrap().endpoint_url(true),
            "https://token:50052"
        );
        let err = Config::load(
            None,
            &env(&[("SEC_SERVICES__TOKNE__ENDPOINT", "https://t:1")]),
            SPECS,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("services.tokne"), "{err}");
        // A peer that is called but not configured is named.
        let only_auth = &SPECS[1..];
        let c = Config::load(None, &env(&[]), only_auth).unwrap();
        let err = c.service_addrs("crypto").unwrap_err().to_string();
        assert!(err.contains("services.crypto.endpoint"), "{err}");
    }

    #[test]
    fn redis_urls_plain_tls_and_sentinel() {
        let check = |url: &str| {
            let mut c = Config::default();
            c.storage.redis_url = Some(Secret::new(url.to_owned()));
            c.validate().map_err(|e| e.to_string())
        };
        check("redis://127.0.0.1:6379").unwrap();
        check("rediss://cache.internal:6380/2").unwrap();
        check("redis+sentinel://:pw@s1:26379,s2:26379,s3:26379/mymaster/0").unwrap();
        let err = check("redis+sentinel://s1:26379").unwrap_err();
        assert!(
            err.contains("storage.redis_url") && err.contains("<master>"),
            "{err}"
        );
        let err = check("http://cache").unwrap_err();
        assert!(err.contains("redis+sentinel://"), "{err}");
    }
}
