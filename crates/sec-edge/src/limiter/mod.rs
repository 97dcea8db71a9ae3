//! The limiter: matches a request against the rule set, bypasses trusted callers, builds
//! one hashed key per matching rule and asks the store (Redis or in-process) about all of
//! them at once. Every matching enforcing rule must pass; shadow rules are evaluated and
//! counted but never refuse.

pub mod local;
pub mod redis;

use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;

use crate::ip::{IpListError, IpSet};
use crate::rules::{KeyPart, RequestMatch, Rule, RuleError, RuleSet, StoreErrorPolicy, StoreKind};

pub use local::LocalStore;
pub use redis::{RedisStore, StoreError};

/// A rate-limit key: a truncated SHA-256 of the rule id and the key parts' values, so a
/// caller's header value never becomes a raw store key or label.
pub type KeyHash = [u8; 16];

/// One matching rule of a request, with its key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item {
    /// Index into the rule set the check uses.
    pub rule: usize,
    pub key: KeyHash,
}

/// What a store says about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreOutcome {
    pub allowed: bool,
    pub remaining: u64,
    /// Until the key is back at full capacity.
    pub reset: Duration,
    /// Until a refused request could pass (zero when allowed).
    pub retry_after: Duration,
}

impl Default for StoreOutcome {
    fn default() -> Self {
        Self {
            allowed: true,
            remaining: 0,
            reset: Duration::ZERO,
            retry_after: Duration::ZERO,
        }
    }
}

/// A request, as the limiter sees it.
#[derive(Debug, Clone, Copy)]
pub struct CheckRequest<'a> {
    pub route: &'a str,
    pub method: &'a str,
    /// A gRPC endpoint checked through the (future) check API.
    pub endpoint: Option<&'a str>,
    /// Authenticated client id (from the host, e.g. auth-svc), if any.
    pub client_id: Option<&'a str>,
    /// Authenticated user, if any.
    pub user: Option<&'a str>,
    /// The resolved client address.
    pub ip: IpAddr,
    pub headers: Option<&'a HeaderMap>,
    /// The host's per-client "trusted" flag: bypasses every rule (counted).
    pub trusted_client: bool,
}

/// One rule's result for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOutcome {
    pub rule_id: Arc<str>,
    /// The policy: `quota` requests per `window_secs` (the `q` and `w` of `RateLimit-Policy`).
    pub quota: u32,
    pub window_secs: u64,
    pub shadow: bool,
    pub allowed: bool,
    pub remaining: u64,
    pub reset: Duration,
    pub retry_after: Duration,
    /// The store failed and the rule's `on_store_error` policy decided.
    pub store_error: bool,
    /// The key's hash (never the raw key parts): for statistics and event sampling.
    pub key: KeyHash,
}

/// The limiter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    pub bypassed: bool,
    /// Every matching rule (shadow ones included), in configuration order.
    pub rules: Vec<RuleOutcome>,
}

impl Decision {
    /// The longest retry-after among the enforcing rules that refused.
    pub fn retry_after(&self) -> Duration {
        self.rules
            .iter()
            .filter(|r| !r.shadow && !r.allowed)
            .map(|r| r.retry_after)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// What the store-error hook is told: the host turns it into an event.
#[derive(Debug, Clone)]
pub struct StoreErrorReport {
    pub rule_id: Arc<str>,
    pub policy: StoreErrorPolicy,
    pub error: String,
}

pub type StoreErrorHook = Arc<dyn Fn(&StoreErrorReport) + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    /// A validated rule id (`[a-z0-9_.-]{1,64}`).
    rule: String,
    /// allowed | limited | bypassed | shadow_limited | store_error
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Edge metrics: per-rule outcomes, IP blocks by reason, local-tier refusals.
#[derive(Clone, Debug, Default)]
pub struct EdgeMetrics {
    rule: Family<RuleLabels, Counter>,
    ip_blocked: Family<ReasonLabels, Counter>,
    local_tier: Counter,
}

impl EdgeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "sec_edge_ratelimit_decisions",
            "Rate-limit decisions by rule and outcome (allowed, limited, bypassed, shadow_limited, store_error)",
            m.rule.clone(),
        );
        registry.register(
            "sec_edge_ip_blocked",
            "Requests refused by the IP lists, by reason",
            m.ip_blocked.clone(),
        );
        registry.register(
            "sec_edge_ratelimit_local_tier_refusals",
            "Requests refused by the local tier without a Redis round trip",
            m.local_tier.clone(),
        );
        m
    }

    fn count(&self, rule: &str, outcome: &'static str) {
        self.rule
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
                outcome,
            })
            .inc();
    }

    /// The count for `rule` and `outcome` (tests, stats).
    pub fn rule_count(&self, rule: &str, outcome: &'static str) -> u64 {
        self.rule
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
                outcome,
            })
            .get()
    }

    pub fn ip_blocked(&self, reason: &'static str) {
        self.ip_blocked
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn ip_blocked_count(&self, reason: &'static str) -> u64 {
        self.ip_blocked
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    pub fn local_tier_count(&self) -> u64 {
        self.local_tier.get()
    }
}

pub enum Store {
    InProcess(LocalStore),
    Redis(RedisStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::InProcess(_) => "in-process",
            Store::Redis(_) => "redis",
        })
    }
}

/// Options the limiter shares across rules.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimiterOptions {
    /// Callers from these networks bypass every rule (counted as `bypassed`).
    pub bypass_cidrs: Vec<String>,
    /// A Redis check that takes longer fails (and the rules' `on_store_error` decides).
    pub store_timeout_ms: u64,
    /// Redis refusals with a retry-after above this are refused locally until then.
    pub local_tier_min_retry_ms: u64,
}

impl Default for LimiterOptions {
    fn default() -> Self {
        Self {
            bypass_cidrs: Vec::new(),
            store_timeout_ms: 100,
            local_tier_min_retry_ms: 1_000,
        }
    }
}

pub struct Limiter {
    rules: RwLock<Arc<RuleSet>>,
    store: Store,
    bypass: IpSet,
    clock: SharedClock,
    metrics: EdgeMetrics,
    hook: Option<StoreErrorHook>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn hash_key(rule: &Rule, req: &CheckRequest<'_>, rules: &RuleSet) -> Option<KeyHash> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut part = |tag: u8, bytes: &[u8]| {
        ctx.update(&[tag]);
        ctx.update(&u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_be_bytes());
        ctx.update(bytes);
    };
    part(0, rule.id.as_bytes());
    for p in &rule.key {
        match p {
            KeyPart::ClientId => part(1, req.client_id?.as_bytes()),
            KeyPart::User => part(2, req.user?.as_bytes()),
            KeyPart::Ip => part(3, req.ip.to_canonical().to_string().as_bytes()),
            KeyPart::IpPrefix => part(4, rules.ip_prefix(req.ip).to_string().as_bytes()),
            KeyPart::Header(name) => {
                let v = req.headers?.get(name)?;
                part(5, name.as_str().as_bytes());
                part(6, v.as_bytes());
            }
        }
    }
    let d = ctx.finish();
    let mut k = [0_u8; 16];
    k.copy_from_slice(d.as_ref().get(..16)?);
    Some(k)
}

impl Limiter {
    /// An in-process limiter (the embedded default).
    pub fn in_process(
        rules: RuleSet,
        opts: &LimiterOptions,
        clock: SharedClock,
        metrics: EdgeMetrics,
    ) -> Result<Self, IpListError> {
        let store = Store::InProcess(LocalStore::new(clock.clone(), &rules));
        Self::with_store(rules, store, opts, clock, metrics)
    }

    /// A limiter on Redis. `rules` must have been validated for [`StoreKind::Redis`].
    pub fn redis(
        rules: RuleSet,
        pool: sec_common::storage::RedisPool,
        key_prefix: String,
        opts: &LimiterOptions,
        clock: SharedClock,
        metrics: EdgeMetrics,
    ) -> Result<Self, IpListError> {
        let store = Store::Redis(RedisStore::new(
            pool,
            key_prefix,
            Duration::from_millis(opts.store_timeout_ms.max(1)),
            Duration::from_millis(opts.local_tier_min_retry_ms),
        ));
        Self::with_store(rules, store, opts, clock, metrics)
    }

    /// The platform's store: Redis when `storage.redis_url` is set (keys under
    /// `<redis_key_prefix>edge:`), else in-process. `rules_cfg` is validated for it.
    pub async fn from_platform(
        cfg: &sec_common::config::Config,
        rules_cfg: &crate::rules::RulesConfig,
        opts: &LimiterOptions,
        clock: SharedClock,
        metrics: EdgeMetrics,
    ) -> anyhow::Result<Self> {
        let kv = sec_common::storage::connect_kv(cfg, "edge", clock.clone()).await?;
        match kv {
            sec_common::storage::Kv::Redis { pool, prefix } => {
                let rules = RuleSet::build(rules_cfg, StoreKind::Redis)?;
                Ok(Self::redis(rules, pool, prefix, opts, clock, metrics)?)
            }
            sec_common::storage::Kv::Memory(_) => {
                let rules = RuleSet::build(rules_cfg, StoreKind::InProcess)?;
                Ok(Self::in_process(rules, opts, clock, metrics)?)
            }
        }
    }

    fn with_store(
        rules: RuleSet,
        store: Store,
        opts: &LimiterOptions,
        clock: SharedClock,
        metrics: EdgeMetrics,
    ) -> Result<Self, IpListError> {
        Ok(Self {
            rules: RwLock::new(Arc::new(rules)),
            store,
            bypass: IpSet::parse("bypass_cidrs", &opts.bypass_cidrs)?,
            clock,
            metrics,
            hook: None,
        })
    }

    /// Called once per rule whose store check failed (the host emits an event).
    pub fn with_store_error_hook(mut self, hook: StoreErrorHook) -> Self {
        self.hook = Some(hook);
        self
    }

    pub fn store_kind(&self) -> StoreKind {
        match self.store {
            Store::InProcess(_) => StoreKind::InProcess,
            Store::Redis(_) => StoreKind::Redis,
        }
    }

    /// The in-process store, when this limiter uses one (stats, tests).
    pub fn local_store(&self) -> Option<&LocalStore> {
        match &self.store {
            Store::InProcess(l) => Some(l),
            Store::Redis(_) => None,
        }
    }

    pub fn metrics(&self) -> &EdgeMetrics {
        &self.metrics
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Validates `cfg` whole for this limiter's store and swaps it in; on error the
    /// current set stays.
    pub fn update_rules(&self, cfg: &crate::rules::RulesConfig) -> Result<(), RuleError> {
        let set = RuleSet::build(cfg, self.store_kind())?;
        if let Store::InProcess(l) = &self.store {
            l.set_rules(&set);
        }
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(())
    }

    pub async fn check(&self, req: &CheckRequest<'_>) -> Decision {
        let rules = self.rules();
        let m = RequestMatch {
            route: req.route,
            method: req.method,
            endpoint: req.endpoint,
        };
        let mut items = Vec::new();
        for (i, r) in rules.rules.iter().enumerate() {
            if !r.matches_request(&m) {
                continue;
            }
            // A rule whose key part the request lacks (no user, no header) does not apply.
            if let Some(key) = hash_key(r, req, &rules) {
                items.push(Item { rule: i, key });
            }
        }
        if items.is_empty() {
            return Decision {
                allowed: true,
                bypassed: false,
                rules: Vec::new(),
            };
        }
        let outcome_of = |it: &Item, o: StoreOutcome, store_error: bool| {
            let r = rules.rules.get(it.rule);
            RuleOutcome {
                rule_id: r.map(|r| r.id.clone()).unwrap_or_else(|| Arc::from("")),
                quota: r.map_or(0, |r| r.limit.rate),
                window_secs: r.map_or(0, Rule::window_secs),
                shadow: r.is_some_and(|r| r.shadow),
                allowed: o.allowed,
                remaining: o.remaining,
                reset: o.reset,
                retry_after: o.retry_after,
                store_error,
                key: it.key,
            }
        };
        if req.trusted_client || self.bypass.contains(req.ip) {
            let mut out = Vec::with_capacity(items.len());
            for it in &items {
                let o = outcome_of(it, StoreOutcome::default(), false);
                self.metrics.count(&o.rule_id, "bypassed");
                out.push(o);
            }
            return Decision {
                allowed: true,
                bypassed: true,
                rules: out,
            };
        }
        let outcomes: Vec<RuleOutcome> = match &self.store {
            Store::InProcess(l) => l
                .check(&rules, &items)
                .into_iter()
                .zip(&items)
                .map(|(o, it)| outcome_of(it, o, false))
                .collect(),
            Store::Redis(r) => {
                let now_us = self.clock.now().timestamp_micros();
                match r.check(&rules, &items, now_us).await {
                    Ok(redis::RedisCheck::Remote(v)) => v
                        .into_iter()
                        .zip(&items)
                        .map(|(o, it)| outcome_of(it, o, false))
                        .collect(),
                    Ok(redis::RedisCheck::Local(idx, wait)) => {
                        self.metrics.local_tier.inc();
                        // Only the refusing rule was evaluated: the others are not
                        // reported (nor counted) for this request.
                        items
                            .get(idx)
                            .map(|it| {
                                let o = StoreOutcome {
                                    allowed: false,
                                    remaining: 0,
                                    reset: wait,
                                    retry_after: wait,
                                };
                                outcome_of(it, o, false)
                            })
                            .into_iter()
                            .collect()
                    }
                    Err(e) => items
                        .iter()
                        .map(|it| {
                            let policy = rules
                                .rules
                                .get(it.rule)
                                .map_or(StoreErrorPolicy::FailClosed, Rule::store_error_policy);
                            let o = match policy {
                                StoreErrorPolicy::FailOpen => StoreOutcome::default(),
                                StoreErrorPolicy::FailClosed => StoreOutcome {
                                    allowed: false,
                                    remaining: 0,
                                    reset: Duration::from_secs(1),
                                    retry_after: Duration::from_secs(1),
                                },
                            };
                            let out = outcome_of(it, o, true);
                            if let Some(h) = &self.hook {
                                h(&StoreErrorReport {
                                    rule_id: out.rule_id.clone(),
                                    policy,
                                    error: e.0.clone(),
                                });
                            }
                            out
                        })
                        .collect(),
                }
            }
        };
        let allowed = outcomes.iter().all(|o| o.shadow || o.allowed);
        for o in &outcomes {
            if o.store_error {
                self.metrics.count(&o.rule_id, "store_error");
                tracing::warn!(rule = %o.rule_id, allowed = o.allowed, "rate-limit store unavailable; rule policy applied");
            }
            let outcome = match (o.shadow, o.allowed) {
                (true, false) => "shadow_limited",
                (false, false) => "limited",
                (_, true) if allowed => "allowed",
                // Passed, but the request was refused by another rule.
                (_, true) => continue,
            };
            self.metrics.count(&o.rule_id, outcome);
        }
        Decision {
            allowed,
            bypassed: false,
            rules: outcomes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_are_registered_with_rule_labels_and_never_caller_values() {
        let mut registry = Registry::default();
        let metrics = EdgeMetrics::register(&mut registry);
        let rules = RuleSet::from_toml(
            r#"
            [[rules]]
            id = "tenant"
            match = { route_prefix = "/" }
            key = ["header:x-tenant"]
            limit = { rate = 1, per = "day", burst = 1 }
            "#,
            StoreKind::InProcess,
        )
        .unwrap();
        let l = Limiter::in_process(
            rules,
            &LimiterOptions::default(),
            sec_common::clock::system(),
            metrics,
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-tenant", "evil\"label".parse().unwrap());
        let req = CheckRequest {
            route: "/x",
            method: "GET",
            endpoint: None,
            client_id: None,
            user: None,
            ip: "192.0.2.1".parse().unwrap(),
            headers: Some(&h),
            trusted_client: false,
        };
        assert!(l.check(&req).await.allowed);
        assert!(!l.check(&req).await.allowed);
        l.metrics().ip_blocked("deny_list");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"sec_edge_ratelimit_decisions_total{rule="tenant",outcome="allowed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sec_edge_ratelimit_decisions_total{rule="tenant",outcome="limited"} 1"#
            )
        );
        assert!(text.contains(r#"sec_edge_ip_blocked_total{reason="deny_list"} 1"#));
        assert!(!text.contains("evil"), "header values never become labels");
    }
}
