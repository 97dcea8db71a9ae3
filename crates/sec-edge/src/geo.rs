//! Country allow/deny rules from a MaxMind-format database (GeoLite2/GeoIP2 Country or
//! City, DB-IP), global, per client and per route.
//!
//! Why it refuses to start without a usable database: a country deny list that silently
//! allows everyone because the file is missing is worse than no list. The operator
//! either fixes the file or says what degraded means (`degraded = "allow" | "deny"`),
//! and the degraded state is a gauge (`sec_edge_geo_degraded`) and
//! [`GeoControl::degraded`] for the host's readiness. The file is re-read when its size
//! or modification time changes; a new file that does not open keeps the old one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::ip::BlockReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GeoPolicy {
    Allow,
    Deny,
}

/// Country lists of one scope (ISO 3166-1 alpha-2 codes, upper case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CountryLists {
    /// Non-empty: only these countries pass in this scope.
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// `[edge.geo]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// Path of the MaxMind DB. Required when any country list is set.
    pub database: Option<PathBuf>,
    /// What to do when the database is missing or corrupt at start; unset: start fails.
    pub degraded: Option<GeoPolicy>,
    /// Addresses with no country in the database (private ranges, new allocations).
    pub unknown: GeoPolicy,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub clients: BTreeMap<String, CountryLists>,
    pub routes: BTreeMap<String, CountryLists>,
}

impl Default for GeoConfig {
    fn default() -> Self {
        Self {
            database: None,
            degraded: None,
            unknown: GeoPolicy::Allow,
            allow: Vec::new(),
            deny: Vec::new(),
            clients: BTreeMap::new(),
            routes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct GeoError {
    pub field: String,
    pub reason: String,
}

fn gerr(field: impl Into<String>, reason: impl Into<String>) -> GeoError {
    GeoError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Most country codes in one list.
const MAX_COUNTRIES: usize = 300;

#[derive(Debug, Clone, Default)]
struct Scope {
    allow: Vec<[u8; 2]>,
    deny: Vec<[u8; 2]>,
}

fn parse_codes(field: &str, v: &[String]) -> Result<Vec<[u8; 2]>, GeoError> {
    if v.len() > MAX_COUNTRIES {
        return Err(gerr(field, format!("at most {MAX_COUNTRIES} countries")));
    }
    v.iter()
        .enumerate()
        .map(|(i, c)| match c.as_bytes() {
            [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => Ok([*a, *b]),
            _ => Err(gerr(
                format!("{field}[{i}]"),
                "not an ISO 3166-1 alpha-2 country code (two upper-case letters)",
            )),
        })
        .collect()
}

fn parse_scope(prefix: &str, l: &CountryLists) -> Result<Scope, GeoError> {
    Ok(Scope {
        allow: parse_codes(&format!("{prefix}allow"), &l.allow)?,
        deny: parse_codes(&format!("{prefix}deny"), &l.deny)?,
    })
}

/// The country of an address per the database: `None` when unknown.
type Reader = maxminddb::Reader<Vec<u8>>;

fn country_of(r: &Reader, ip: IpAddr) -> Option<[u8; 2]> {
    let c: maxminddb::geoip2::Country<'_> = r.lookup(ip).ok()??;
    let iso = c
        .country
        .and_then(|c| c.iso_code)
        .or_else(|| c.registered_country.and_then(|c| c.iso_code))?;
    match iso.as_bytes() {
        [a, b] => Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()]),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        len: m.len(),
        modified: m.modified().ok(),
    })
}

fn open(path: &Path) -> Result<Reader, String> {
    let r = Reader::open_readfile(path).map_err(|e| e.to_string())?;
    // A database without country data would answer "unknown" for everyone.
    if !r
        .metadata
        .database_type
        .to_ascii_lowercase()
        .contains("country")
        && !r
            .metadata
            .database_type
            .to_ascii_lowercase()
            .contains("city")
        && !r
            .metadata
            .database_type
            .to_ascii_lowercase()
            .contains("geo")
    {
        return Err(format!(
            "database type {:?} has no country data",
            r.metadata.database_type
        ));
    }
    Ok(r)
}

#[derive(Clone, Debug, Default)]
struct GeoMetrics {
    degraded: Gauge,
    reloads: Counter,
    reload_failures: Counter,
}

/// The live geolocation rules and database.
pub struct GeoControl {
    path: Option<PathBuf>,
    reader: RwLock<Option<Arc<Reader>>>,
    stamp: RwLock<Option<FileStamp>>,
    degraded_policy: Option<GeoPolicy>,
    unknown: GeoPolicy,
    global: Scope,
    clients: BTreeMap<String, Scope>,
    routes: BTreeMap<String, Scope>,
    metrics: GeoMetrics,
}

impl std::fmt::Debug for GeoControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoControl")
            .field("path", &self.path)
            .field("degraded", &self.degraded())
            .finish_non_exhaustive()
    }
}

impl GeoControl {
    /// Validates `cfg` and opens the database. A missing or corrupt database is an error
    /// unless `degraded` is configured. `Ok(None)`: no geolocation configured at all.
    pub fn start(cfg: &GeoConfig, registry: &mut Registry) -> Result<Option<Self>, GeoError> {
        let any_rules = !(cfg.allow.is_empty()
            && cfg.deny.is_empty()
            && cfg.clients.is_empty()
            && cfg.routes.is_empty());
        if cfg.database.is_none() {
            if any_rules {
                return Err(gerr("geo.database", "country rules need a database path"));
            }
            return Ok(None);
        }
        let global = parse_scope(
            "geo.",
            &CountryLists {
                allow: cfg.allow.clone(),
                deny: cfg.deny.clone(),
            },
        )?;
        let mut clients = BTreeMap::new();
        for (id, l) in &cfg.clients {
            clients.insert(id.clone(), parse_scope(&format!("geo.clients.{id}."), l)?);
        }
        let mut routes = BTreeMap::new();
        for (r, l) in &cfg.routes {
            if !r.starts_with('/') {
                return Err(gerr(
                    format!("geo.routes.{r}"),
                    "must be a path starting with /",
                ));
            }
            routes.insert(r.clone(), parse_scope(&format!("geo.routes.{r}."), l)?);
        }
        let metrics = GeoMetrics::default();
        registry.register(
            "sec_edge_geo_degraded",
            "1 while the geolocation database is unusable and the degraded policy applies",
            metrics.degraded.clone(),
        );
        registry.register(
            "sec_edge_geo_reloads",
            "Geolocation database reloads after the file changed",
            metrics.reloads.clone(),
        );
        registry.register(
            "sec_edge_geo_reload_failures",
            "Geolocation database files that changed but did not open (the old one stays)",
            metrics.reload_failures.clone(),
        );
        let path = cfg.database.clone();
        let (reader, st) = match path.as_deref().map(|p| (open(p), stamp(p))) {
            Some((Ok(r), st)) => (Some(Arc::new(r)), st),
            Some((Err(e), st)) => {
                if cfg.degraded.is_none() {
                    return Err(gerr(
                        "geo.database",
                        format!(
                            "{e} (set geo.degraded = \"allow\" or \"deny\" to start without it)"
                        ),
                    ));
                }
                tracing::error!(error = %e, "geolocation database unusable: degraded policy applies");
                (None, st)
            }
            None => (None, None),
        };
        let g = Self {
            path,
            reader: RwLock::new(reader),
            stamp: RwLock::new(st),
            degraded_policy: cfg.degraded,
            unknown: cfg.unknown,
            global,
            clients,
            routes,
            metrics,
        };
        g.metrics.degraded.set(i64::from(g.degraded()));
        Ok(Some(g))
    }

    /// No usable database: the degraded policy decides.
    pub fn degraded(&self) -> bool {
        self.reader
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Re-reads the file if it changed; true if a new database was loaded.
    pub fn reload_if_changed(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let now = stamp(path);
        if now == *self.stamp.read().unwrap_or_else(PoisonError::into_inner) {
            return false;
        }
        *self.stamp.write().unwrap_or_else(PoisonError::into_inner) = now;
        match open(path) {
            Ok(r) => {
                *self.reader.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(r));
                self.metrics.reloads.inc();
                self.metrics.degraded.set(0);
                tracing::info!(path = %path.display(), "geolocation database reloaded");
                true
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                tracing::error!(path = %path.display(), error = %e, "geolocation database did not reload; keeping the previous one");
                false
            }
        }
    }

    /// The country code of `ip`, if known.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let r = self
            .reader
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        country_of(&r, ip.to_canonical()).map(|c| String::from_utf8_lossy(&c).into_owned())
    }

    /// The decision for `ip` from `client` to `route`.
    pub fn check(&self, ip: IpAddr, client: Option<&str>, route: &str) -> Result<(), BlockReason> {
        let reader = self
            .reader
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(reader) = reader else {
            return match self.degraded_policy {
                Some(GeoPolicy::Allow) => Ok(()),
                _ => Err(BlockReason::Country),
            };
        };
        let scopes = [
            Some(&self.global),
            client.and_then(|c| self.clients.get(c)),
            self.routes.get(route),
        ];
        let Some(cc) = country_of(&reader, ip.to_canonical()) else {
            return match self.unknown {
                GeoPolicy::Allow => Ok(()),
                GeoPolicy::Deny => Err(BlockReason::Country),
            };
        };
        for s in scopes.into_iter().flatten() {
            if s.deny.contains(&cc) || (!s.allow.is_empty() && !s.allow.contains(&cc)) {
                return Err(BlockReason::Country);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_without_database_or_with_a_missing_one_refuse_to_start() {
        let mut reg = Registry::default();
        let cfg = GeoConfig {
            deny: vec!["KP".into()],
            ..Default::default()
        };
        assert_eq!(
            GeoControl::start(&cfg, &mut reg).unwrap_err().field,
            "geo.database"
        );
        let cfg = GeoConfig {
            database: Some("/nonexistent/geo.mmdb".into()),
            deny: vec!["KP".into()],
            ..Default::default()
        };
        assert_eq!(
            GeoControl::start(&cfg, &mut reg).unwrap_err().field,
            "geo.database"
        );
        assert!(
            GeoControl::start(&GeoConfig::default(), &mut reg)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn degraded_policy_is_explicit_and_visible() {
        let mut reg = Registry::default();
        let dir = std::env::temp_dir().join(format!("sec-edge-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corrupt = dir.join("corrupt.mmdb");
        std::fs::write(&corrupt, b"not a maxmind database").unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for (policy, want) in [
            (GeoPolicy::Allow, Ok(())),
            (GeoPolicy::Deny, Err(BlockReason::Country)),
        ] {
            let cfg = GeoConfig {
                database: Some(corrupt.clone()),
                degraded: Some(policy),
                allow: vec!["DE".into()],
                ..Default::default()
            };
            let g = GeoControl::start(&cfg, &mut reg).unwrap().unwrap();
            assert!(g.degraded());
            assert_eq!(g.metrics.degraded.get(), 1);
            assert_eq!(g.check(ip, None, "/"), want);
            // Still corrupt after a rewrite: stays degraded.
            std::fs::write(&corrupt, b"still not a database!").unwrap();
            assert!(!g.reload_if_changed());
            assert!(g.degraded());
        }
    }

    #[test]
    fn country_codes_are_validated_naming_the_field() {
        let mut reg = Registry::default();
        let cfg = GeoConfig {
            database: Some("/nonexistent".into()),
            degraded: Some(GeoPolicy::Deny),
            clients: BTreeMap::from([(
                "app".to_owned(),
                CountryLists {
                    allow: vec!["DE".into(), "germany".into()],
                    deny: vec![],
                },
            )]),
            ..Default::default()
        };
        assert_eq!(
            GeoControl::start(&cfg, &mut reg).unwrap_err().field,
            "geo.clients.app.allow[1]"
        );
    }
}
