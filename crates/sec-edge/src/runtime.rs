//! The one thing a host starts: [`EdgeRuntime::start`] builds the limiter, IP lists and
//! geolocation from `[edge]`, loads the runtime state from the shared database, keeps it
//! in sync (a supervised poll of the change counter), counts failures towards automatic
//! blocks, emits sampled events and keeps the per-replica statistics the admin RPCs
//! answer from.
//!
//! Why configuration is the base and the database overrides by id: an operator can tune
//! a shipped rule at runtime without editing files on every replica, and deleting the
//! runtime rule brings the shipped one back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;
use sec_common::storage::Db;
use sec_common::supervise::Supervisor;
use sec_proto::common::v1::{Outcome, SecurityEvent, Severity};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::client_ip::ClientIpResolver;
use crate::geo::{GeoConfig, GeoControl};
use crate::ip::{BlockReason, IpControl, IpListsConfig, IpTables, ListsConfig, parse_net};
use crate::layer::{EdgeHooks, EdgeLayer, EdgeState};
use crate::limiter::{Decision, EdgeMetrics, KeyHash, Limiter, LimiterOptions, StoreErrorReport};
use crate::rules::{RuleConfig, RulesConfig};
use crate::store::{EdgeStore, IpRuleRow, Snapshot};

/// The host's event sink (auth-svc passes its publisher).
pub type EmitFn = Arc<dyn Fn(SecurityEvent) + Send + Sync>;

/// `[edge.auto_block]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoBlockConfig {
    pub enabled: bool,
    /// Authentication failures (login, client authentication) within `window_secs`
    /// that bring a block.
    pub threshold: u32,
    /// 4xx responses within `window_secs` that bring a block (a flood).
    pub flood_threshold: u32,
    pub window_secs: u64,
    /// How long a block lasts.
    pub block_secs: u64,
    /// Count and block the `ip_prefix` network (/24, /64 per `ratelimit.ipv*_prefix`)
    /// instead of the single address.
    pub by_prefix: bool,
}

impl Default for AutoBlockConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 20,
            flood_threshold: 200,
            window_secs: 300,
            block_secs: 900,
            by_prefix: false,
        }
    }
}

/// `[edge.events]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// `sec.ratelimit.sustained` when a key was limited in this many consecutive windows.
    pub sustained_windows: u32,
    /// At most one `sec.ip.blocked` per address and reason, and one
    /// `sec.ratelimit.store_failed` per rule, in this many seconds.
    pub sample_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            sustained_windows: 3,
            sample_secs: 60,
        }
    }
}

/// The host's `[edge]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Whether the host puts the layers in front of its routes (default true). Off, the
    /// rules, lists and the gRPC API still work (`CheckRateLimit`, administration); only
    /// the facade stops enforcing them, for installations whose gateway does it, and for
    /// measuring what the layers cost.
    pub enabled: bool,
    /// `RateLimit` fields on responses that were not limited too.
    pub headers_on_success: bool,
    pub trusted_proxies: Vec<String>,
    /// How often every replica polls the shared state's change counter.
    pub reload_interval_ms: u64,
    pub ratelimit: RulesConfig,
    pub limiter: LimiterOptions,
    pub ip: IpListsConfig,
    pub geo: GeoConfig,
    pub auto_block: AutoBlockConfig,
    pub events: EventsConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            headers_on_success: true,
            trusted_proxies: Vec::new(),
            reload_interval_ms: 1_000,
            ratelimit: RulesConfig::default(),
            limiter: LimiterOptions::default(),
            ip: IpListsConfig::default(),
            geo: GeoConfig::default(),
            auto_block: AutoBlockConfig::default(),
            events: EventsConfig::default(),
        }
    }
}

/// `[edge]` as a platform configuration section: what can be checked without the
/// backends is checked at load (bad CIDRs, rules, proxies), naming the field; what needs
/// them (Redis failure policies, the geolocation database) at [`EdgeRuntime::start`].
impl sec_common::config::ServiceConfig for EdgeConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        crate::rules::RuleSet::build(&self.ratelimit, crate::rules::StoreKind::InProcess)
            .map_err(|e| (format!("ratelimit.{}", e.field), e.reason))?;
        IpTables::build(&self.ip).map_err(|e| (format!("ip.{}", e.field), e.reason))?;
        ClientIpResolver::new(&self.trusted_proxies).map_err(|e| (e.field, e.reason))?;
        if !(100..=60_000).contains(&self.reload_interval_ms) {
            return Err((
                "reload_interval_ms".into(),
                "must be between 100 and 60000".into(),
            ));
        }
        Ok(())
    }
}

/// Why the host reports a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    LoginFailure,
    ClientAuthFailure,
    /// A 4xx answer (counted by the layer itself).
    Http4xx,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::LoginFailure => "login_failure",
            FailureReason::ClientAuthFailure => "client_auth_failure",
            FailureReason::Http4xx => "http_4xx_flood",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Default)]
struct RuntimeMetrics {
    auto_blocks: Family<ReasonLabel, Counter>,
    reloads: Counter,
    reload_rejected: Counter,
    events: Family<ReasonLabel, Counter>,
}

/// Bound of every per-key map below (statistics, sampling, failure counters).
const MAX_TRACKED: usize = 50_000;
/// Statistics are kept in one-minute buckets for an hour.
const BUCKET_SECS: i64 = 60;
const BUCKETS: usize = 60;

#[derive(Debug, Default)]
struct Bucket {
    start: i64,
    limited: HashMap<(Arc<str>, KeyHash), u64>,
    blocked_ips: HashMap<IpAddr, u64>,
    blocked_countries: HashMap<String, u64>,
    blocked_reasons: HashMap<&'static str, u64>,
}

#[derive(Debug, Default)]
struct Stats {
    buckets: VecDeque<Bucket>,
}

impl Stats {
    fn bucket(&mut self, now_s: i64) -> &mut Bucket {
        let start = now_s - now_s.rem_euclid(BUCKET_SECS);
        if self.buckets.back().is_none_or(|b| b.start != start) {
            self.buckets.push_back(Bucket {
                start,
                ..Default::default()
            });
            while self.buckets.len() > BUCKETS {
                self.buckets.pop_front();
            }
        }
        #[allow(clippy::unwrap_used)] // pushed above when missing
        self.buckets.back_mut().unwrap()
    }

    fn recent(&self, now_s: i64, window_s: i64) -> impl Iterator<Item = &Bucket> {
        self.buckets
            .iter()
            .filter(move |b| b.start + BUCKET_SECS > now_s - window_s)
    }
}

fn bump<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u64>, k: K) {
    if m.len() < MAX_TRACKED || m.contains_key(&k) {
        *m.entry(k).or_default() += 1;
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct OverLimit {
    last_window: i64,
    consecutive: u32,
    alerted: bool,
}

#[derive(Debug, Default)]
struct Sampling {
    over: HashMap<(Arc<str>, KeyHash), OverLimit>,
    last_sent: HashMap<String, i64>,
}

#[derive(Debug, Clone, Copy)]
struct FailureWindow {
    start: i64,
    count: u32,
}

#[derive(Debug, Default)]
struct Applied {
    version: i64,
    /// Earliest expiry among the live runtime IP rules (µs): reload then.
    next_expiry: Option<i64>,
}

struct Inner {
    service: &'static str,
    cfg: EdgeConfig,
    store: EdgeStore,
    limiter: Arc<Limiter>,
    ip: Arc<IpControl>,
    geo: Option<Arc<GeoControl>>,
    clock: SharedClock,
    emit: EmitFn,
    metrics: RuntimeMetrics,
    stats: Mutex<Stats>,
    sampling: Arc<Mutex<Sampling>>,
    failures: Mutex<HashMap<(ipnet::IpNet, bool), FailureWindow>>,
    applied: Mutex<Applied>,
}

/// The host's handle: the gRPC service, the axum layer and [`record_failure`](Self::record_failure).
#[derive(Clone)]
pub struct EdgeRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EdgeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeRuntime")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

/// What the host gives the runtime besides configuration.
pub struct EdgeDeps {
    /// The host's service name (`auth`): the `service` of emitted events.
    pub service: &'static str,
    /// The host's database, migrated with `migrations/auth/*/0003_edge.sql`.
    pub db: Db,
    pub clock: SharedClock,
    pub emit: EmitFn,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn should_send(sampling: &Mutex<Sampling>, key: String, now_s: i64, every: i64) -> bool {
    let mut s = lock(sampling);
    if s.last_sent.len() >= MAX_TRACKED {
        s.last_sent.retain(|_, t| now_s - *t < every);
    }
    match s.last_sent.get(&key) {
        Some(t) if now_s - *t < every => false,
        _ => {
            if s.last_sent.len() < MAX_TRACKED {
                s.last_sent.insert(key, now_s);
            }
            true
        }
    }
}

fn hex16(k: &KeyHash) -> String {
    k.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl EdgeRuntime {
    /// Builds everything from `cfg` (the limiter on `platform`'s Redis when configured,
    /// else in-process), applies the stored runtime state, and spawns the sync task
    /// `edge-sync` on `supervisor`. A bad configuration, an unusable geolocation
    /// database without `geo.degraded`, or an unreadable store is an error.
    pub async fn start(
        cfg: &EdgeConfig,
        platform: &sec_common::config::Config,
        deps: EdgeDeps,
        registry: &mut Registry,
        supervisor: &mut Supervisor,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let metrics = EdgeMetrics::register(registry);
        let limiter = Limiter::from_platform(
            platform,
            &cfg.ratelimit,
            &cfg.limiter,
            deps.clock.clone(),
            metrics,
        )
        .await?;
        let rt = Self::with_limiter(cfg, limiter, deps, registry).await?;
        let me = rt.clone();
        let stop = shutdown.clone();
        supervisor.spawn("edge-sync", move || {
            let me = me.clone();
            let stop = stop.clone();
            async move { me.sync_loop(stop).await }
        });
        Ok(rt)
    }

    /// As [`start`](Self::start) with a limiter the caller built, without spawning the
    /// sync task (tests drive [`sync_once`](Self::sync_once); a host uses `start`).
    pub async fn with_limiter(
        cfg: &EdgeConfig,
        limiter: Limiter,
        deps: EdgeDeps,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let ip = Arc::new(IpControl::new(IpTables::build(&cfg.ip)?));
        let geo = GeoControl::start(&cfg.geo, registry)?.map(Arc::new);
        let metrics = RuntimeMetrics::default();
        registry.register(
            "sec_edge_auto_blocks",
            "Temporary blocks created after repeated failures, by reason",
            metrics.auto_blocks.clone(),
        );
        registry.register(
            "sec_edge_state_reloads",
            "Runtime rule/list reloads from the shared store",
            metrics.reloads.clone(),
        );
        registry.register(
            "sec_edge_state_reload_rejected",
            "Stored runtime state that did not validate on reload (the previous set stays)",
            metrics.reload_rejected.clone(),
        );
        registry.register(
            "sec_edge_events",
            "Security events emitted by edge protection, by type",
            metrics.events.clone(),
        );
        let sampling = Arc::new(Mutex::new(Sampling::default()));
        // Store failures come from inside the limiter: a hook that only needs the sink.
        let hook = {
            let emit = deps.emit.clone();
            let clock = deps.clock.clone();
            let sampling = sampling.clone();
            let service = deps.service;
            let every = i64::try_from(cfg.events.sample_secs).unwrap_or(60);
            let counter = metrics.events.clone();
            Arc::new(move |r: &StoreErrorReport| {
                let now_s = clock.now().timestamp();
                if !should_send(&sampling, format!("store:{}", r.rule_id), now_s, every) {
                    return;
                }
                let mut ev =
                    sec_common::events::new_event(&*clock, service, "sec.ratelimit.store_failed");
                ev.subject = r.rule_id.to_string();
                ev.outcome = Outcome::Failure as i32;
                ev.severity = Severity::High as i32;
                ev.details.insert(
                    "policy".into(),
                    match r.policy {
                        crate::rules::StoreErrorPolicy::FailOpen => "fail_open",
                        crate::rules::StoreErrorPolicy::FailClosed => "fail_closed",
                    }
                    .into(),
                );
                counter
                    .get_or_create(&ReasonLabel {
                        reason: "sec.ratelimit.store_failed",
                    })
                    .inc();
                emit(ev);
            })
        };
        let limiter = Arc::new(limiter.with_store_error_hook(hook));
        let rt = Self {
            inner: Arc::new(Inner {
                service: deps.service,
                cfg: cfg.clone(),
                store: EdgeStore::new(deps.db),
                limiter,
                ip,
                geo,
                clock: deps.clock,
                emit: deps.emit,
                metrics,
                stats: Mutex::new(Stats::default()),
                sampling,
                failures: Mutex::new(HashMap::new()),
                applied: Mutex::new(Applied {
                    version: -1,
                    next_expiry: None,
                }),
            }),
        };
        let snap = rt.inner.store.load().await?;
        rt.apply(&snap);
        Ok(rt)
    }

    pub fn config(&self) -> &EdgeConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &EdgeStore {
        &self.inner.store
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.inner.limiter
    }

    pub fn ip_control(&self) -> &Arc<IpControl> {
        &self.inner.ip
    }

    pub fn geo(&self) -> Option<&Arc<GeoControl>> {
        self.inner.geo.as_ref()
    }

    pub(crate) fn now_us(&self) -> i64 {
        self.inner.clock.now().timestamp_micros()
    }

    /// The tower layer for the host's axum router (see the README for the order).
    pub fn layer(&self) -> anyhow::Result<EdgeLayer> {
        Ok(EdgeLayer::new(EdgeState {
            resolver: ClientIpResolver::new(&self.inner.cfg.trusted_proxies)?,
            ip: self.inner.ip.clone(),
            limiter: self.inner.limiter.clone(),
            headers_on_success: self.inner.cfg.headers_on_success,
            hooks: Some(Arc::new(self.clone())),
        }))
    }

    /// The gRPC service (`sec.edge.v1.EdgeService`); its access rules are [`crate::ACCESS`].
    pub fn grpc(
        &self,
    ) -> sec_proto::edge::v1::edge_service_server::EdgeServiceServer<crate::grpc::EdgeGrpc> {
        sec_proto::edge::v1::edge_service_server::EdgeServiceServer::new(
            crate::grpc::EdgeGrpc::new(self.clone()),
        )
    }

    /// The merged rule set (configuration, then runtime overrides by id) for `snap`.
    pub(crate) fn merged_rules(&self, snap: &Snapshot) -> (RulesConfig, Vec<String>) {
        let mut merged = self.inner.cfg.ratelimit.clone();
        let mut runtime_ids = Vec::new();
        for r in &snap.rules {
            match serde_json::from_str::<RuleConfig>(&r.body) {
                Ok(rule) => {
                    runtime_ids.push(rule.id.clone());
                    match merged.rules.iter_mut().find(|x| x.id == rule.id) {
                        Some(slot) => *slot = rule,
                        None => merged.rules.push(rule),
                    }
                }
                Err(e) => {
                    tracing::error!(id = %r.id, error = %e, "stored rate-limit rule is corrupt; ignored")
                }
            }
        }
        (merged, runtime_ids)
    }

    /// The merged IP lists for `snap` at `now_us` (expired rows left out).
    pub(crate) fn merged_ip(&self, snap: &Snapshot, now_us: i64) -> IpListsConfig {
        let mut cfg = self.inner.cfg.ip.clone();
        for r in snap.ip_rules.iter().filter(|r| r.live_at(now_us)) {
            if r.is_auto_block() {
                cfg.blocked.push(r.network.clone());
                continue;
            }
            let lists: &mut ListsConfig = match r.scope.split_once(':') {
                Some(("client", id)) => cfg.clients.entry(id.to_owned()).or_default(),
                Some(("route", path)) => cfg.routes.entry(path.to_owned()).or_default(),
                _ => {
                    let list = if r.action == "allow" {
                        &mut cfg.allow
                    } else {
                        &mut cfg.deny
                    };
                    list.push(r.network.clone());
                    continue;
                }
            };
            if r.action == "allow" {
                lists.allow.push(r.network.clone());
            } else {
                lists.deny.push(r.network.clone());
            }
        }
        cfg
    }

    /// Swaps in `snap`: a part that does not validate keeps the previous one (logged
    /// and counted).
    fn apply(&self, snap: &Snapshot) {
        let now = self.now_us();
        let (rules, _) = self.merged_rules(snap);
        if let Err(e) = self.inner.limiter.update_rules(&rules) {
            self.inner.metrics.reload_rejected.inc();
            tracing::error!(error = %e, "stored rate-limit rules do not validate; keeping the current set");
        }
        let ip = self.merged_ip(snap, now);
        if let Err(e) = self.inner.ip.update(&ip) {
            self.inner.metrics.reload_rejected.inc();
            tracing::error!(error = %e, "stored IP rules do not validate; keeping the current lists");
        }
        let next_expiry = snap
            .ip_rules
            .iter()
            .filter(|r| r.live_at(now))
            .filter_map(|r| r.expires_at)
            .min();
        *lock(&self.inner.applied) = Applied {
            version: snap.version,
            next_expiry,
        };
        self.inner.metrics.reloads.inc();
    }

    /// One poll: reloads when the change counter moved or a runtime rule expired, and
    /// re-reads the geolocation file if it changed. True if state was reloaded.
    pub async fn sync_once(&self) -> anyhow::Result<bool> {
        if let Some(g) = &self.inner.geo {
            let g = g.clone();
            tokio::task::spawn_blocking(move || g.reload_if_changed()).await?;
        }
        let version = self.inner.store.version().await?;
        let now = self.now_us();
        let due = {
            let a = lock(&self.inner.applied);
            a.version != version || a.next_expiry.is_some_and(|e| e <= now)
        };
        if !due {
            return Ok(false);
        }
        let snap = self.inner.store.load().await?;
        self.apply(&snap);
        Ok(true)
    }

    /// After this replica wrote: apply at once. The write is committed either way, so a
    /// failed reload is only logged (the sync task retries).
    pub(crate) async fn sync_after_write(&self) {
        if let Err(e) = self.sync_once().await {
            tracing::warn!(error = %e, "reload after an edge write failed; the sync task retries");
        }
    }

    async fn sync_loop(&self, stop: CancellationToken) {
        let every = Duration::from_millis(self.inner.cfg.reload_interval_ms.clamp(100, 60_000));
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.sync_once().await {
                tracing::warn!(error = %e, "edge state sync failed; retrying");
            }
            ticks += 1;
            if ticks.is_multiple_of(300)
                && let Err(e) = self.inner.store.purge_expired(self.now_us()).await
            {
                tracing::warn!(error = %e, "purging expired edge rules failed");
            }
        }
    }

    /// Counts a failure from `ip`; at the configured threshold within the window, blocks
    /// the address (or its prefix) in the shared store until the block expires, and
    /// returns the blocked network. Every replica refuses it after its next sync; this
    /// one at once.
    pub async fn record_failure(
        &self,
        ip: IpAddr,
        reason: FailureReason,
    ) -> anyhow::Result<Option<ipnet::IpNet>> {
        match self.count_failure(ip, reason) {
            Some(net) => self.block(net, ip, reason).await.map(Some),
            None => Ok(None),
        }
    }

    /// Counts a failure in this replica's window; the network to block when the
    /// threshold is reached (the window then starts over).
    fn count_failure(&self, ip: IpAddr, reason: FailureReason) -> Option<ipnet::IpNet> {
        let ab = &self.inner.cfg.auto_block;
        if !ab.enabled {
            return None;
        }
        let ip = ip.to_canonical();
        let net = if ab.by_prefix {
            self.inner.limiter.rules().ip_prefix(ip)
        } else {
            ipnet::IpNet::from(ip)
        };
        let flood = reason == FailureReason::Http4xx;
        let threshold = if flood {
            ab.flood_threshold
        } else {
            ab.threshold
        }
        .max(1);
        let now_s = self.inner.clock.now().timestamp();
        let window = i64::try_from(ab.window_secs).unwrap_or(i64::MAX).max(1);
        let mut f = lock(&self.inner.failures);
        if f.len() >= MAX_TRACKED {
            f.retain(|_, w| now_s - w.start < window);
        }
        if f.len() >= MAX_TRACKED && !f.contains_key(&(net, flood)) {
            tracing::warn!("auto-block failure table full; failure not counted");
            return None;
        }
        let w = f.entry((net, flood)).or_insert(FailureWindow {
            start: now_s,
            count: 0,
        });
        if now_s - w.start >= window {
            *w = FailureWindow {
                start: now_s,
                count: 0,
            };
        }
        w.count += 1;
        if w.count < threshold {
            return None;
        }
        f.remove(&(net, flood));
        Some(net)
    }

    /// Writes the block for `net` to the shared store and applies it here.
    async fn block(
        &self,
        net: ipnet::IpNet,
        ip: IpAddr,
        reason: FailureReason,
    ) -> anyhow::Result<ipnet::IpNet> {
        let ab = &self.inner.cfg.auto_block;
        let ip = ip.to_canonical();
        let now = self.now_us();
        let block_us = i64::try_from(ab.block_secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        let row = IpRuleRow {
            id: format!("block:{net}"),
            action: "deny".into(),
            network: net.to_string(),
            scope: "global".into(),
            reason: format!("auto_block:{}", reason.as_str()),
            expires_at: Some(now.saturating_add(block_us)),
            created_at: now,
        };
        self.inner.store.put_ip_rule(&row, None).await?;
        self.inner
            .metrics
            .auto_blocks
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        tracing::warn!(network = %net, reason = reason.as_str(), "automatic block");
        let mut ev = sec_common::events::new_event(
            &*self.inner.clock,
            self.inner.service,
            "sec.ip.auto_blocked",
        );
        ev.subject = net.to_string();
        ev.source_ip = ip.to_string();
        ev.outcome = Outcome::Denied as i32;
        ev.severity = Severity::Medium as i32;
        ev.details.insert("reason".into(), reason.as_str().into());
        ev.details.insert(
            "expires_at_us".into(),
            row.expires_at.unwrap_or(0).to_string(),
        );
        self.send(ev);
        self.sync_after_write().await;
        Ok(net)
    }

    fn send(&self, ev: SecurityEvent) {
        let label: &'static str = match ev.r#type.as_str() {
            "sec.ratelimit.exceeded" => "sec.ratelimit.exceeded",
            "sec.ratelimit.sustained" => "sec.ratelimit.sustained",
            "sec.ip.blocked" => "sec.ip.blocked",
            "sec.ip.auto_blocked" => "sec.ip.auto_blocked",
            _ => "other",
        };
        self.inner
            .metrics
            .events
            .get_or_create(&ReasonLabel { reason: label })
            .inc();
        (self.inner.emit)(ev);
    }

    /// Records a limited decision: statistics, the sampled `exceeded` event (first limit
    /// of a key in a rule window) and the `sustained` alert (limited in
    /// `events.sustained_windows` consecutive windows).
    fn observe_decision(&self, ip: IpAddr, d: &Decision) {
        let now_s = self.inner.clock.now().timestamp();
        for r in d.rules.iter().filter(|r| !r.allowed && !r.store_error) {
            bump(
                &mut lock(&self.inner.stats).bucket(now_s).limited,
                (r.rule_id.clone(), r.key),
            );
            let w = i64::try_from(r.window_secs.max(1)).unwrap_or(i64::MAX);
            let window = now_s / w;
            let (first_in_window, sustained) = {
                let mut s = lock(&self.inner.sampling);
                if s.over.len() >= MAX_TRACKED {
                    s.over.retain(|_, o| window - o.last_window <= 1);
                }
                let k = (r.rule_id.clone(), r.key);
                if s.over.len() >= MAX_TRACKED && !s.over.contains_key(&k) {
                    continue;
                }
                let o = s.over.entry(k).or_insert(OverLimit {
                    last_window: window - 2,
                    consecutive: 0,
                    alerted: false,
                });
                let first = o.last_window != window;
                if first {
                    if o.last_window == window - 1 {
                        o.consecutive += 1;
                    } else {
                        o.consecutive = 1;
                        o.alerted = false;
                    }
                    o.last_window = window;
                }
                let sustained =
                    o.consecutive >= self.inner.cfg.events.sustained_windows.max(2) && !o.alerted;
                if sustained {
                    o.alerted = true;
                }
                (first, sustained)
            };
            for (send, ty, sev) in [
                (first_in_window, "sec.ratelimit.exceeded", Severity::Low),
                (sustained, "sec.ratelimit.sustained", Severity::High),
            ] {
                if !send {
                    continue;
                }
                let mut ev =
                    sec_common::events::new_event(&*self.inner.clock, self.inner.service, ty);
                ev.subject = r.rule_id.to_string();
                ev.source_ip = ip.to_string();
                ev.outcome = Outcome::Denied as i32;
                ev.severity = sev as i32;
                ev.details.insert("key_hash".into(), hex16(&r.key));
                ev.details.insert("shadow".into(), r.shadow.to_string());
                ev.details
                    .insert("window_secs".into(), r.window_secs.to_string());
                self.send(ev);
            }
        }
    }

    fn observe_block(&self, ip: IpAddr, reason: BlockReason) {
        let now_s = self.inner.clock.now().timestamp();
        let country = self.inner.geo.as_ref().and_then(|g| g.country(ip));
        {
            let mut st = lock(&self.inner.stats);
            let b = st.bucket(now_s);
            bump(&mut b.blocked_ips, ip);
            bump(&mut b.blocked_reasons, reason.as_str());
            if let Some(c) = &country {
                bump(&mut b.blocked_countries, c.clone());
            }
        }
        let every = i64::try_from(self.inner.cfg.events.sample_secs).unwrap_or(60);
        if !should_send(
            &self.inner.sampling,
            format!("ip:{ip}:{}", reason.as_str()),
            now_s,
            every,
        ) {
            return;
        }
        let mut ev =
            sec_common::events::new_event(&*self.inner.clock, self.inner.service, "sec.ip.blocked");
        ev.subject = ip.to_string();
        ev.source_ip = ip.to_string();
        ev.outcome = Outcome::Denied as i32;
        ev.severity = Severity::Low as i32;
        let reason_str = match reason {
            BlockReason::DenyList | BlockReason::NotAllowed => "deny_list",
            BlockReason::Country => "country",
            BlockReason::AutoBlock => "auto_block",
        };
        ev.details.insert("reason".into(), reason_str.into());
        ev.details
            .insert("list_reason".into(), reason.as_str().into());
        if let Some(c) = country {
            ev.details.insert("country".into(), c);
        }
        self.send(ev);
    }

    /// Most-limited keys and rules over the last `window_s` seconds (this replica).
    #[allow(clippy::type_complexity)]
    pub fn ratelimit_stats(
        &self,
        window_s: i64,
        limit: usize,
    ) -> (Vec<(String, String, u64)>, Vec<(String, u64)>) {
        let now_s = self.inner.clock.now().timestamp();
        let st = lock(&self.inner.stats);
        let mut keys: HashMap<(Arc<str>, KeyHash), u64> = HashMap::new();
        let mut rules: BTreeMap<String, u64> = BTreeMap::new();
        for b in st.recent(now_s, window_s) {
            for ((r, k), n) in &b.limited {
                *keys.entry((r.clone(), *k)).or_default() += n;
                *rules.entry(r.to_string()).or_default() += n;
            }
        }
        let mut keys: Vec<(String, String, u64)> = keys
            .into_iter()
            .map(|((r, k), n)| (r.to_string(), hex16(&k), n))
            .collect();
        keys.sort_by(|a, b| {
            b.2.cmp(&a.2)
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| a.1.cmp(&b.1))
        });
        keys.truncate(limit);
        let mut rules: Vec<(String, u64)> = rules.into_iter().collect();
        rules.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rules.truncate(limit);
        (keys, rules)
    }

    /// Most-blocked addresses, countries and the reasons over the last `window_s` seconds.
    #[allow(clippy::type_complexity)]
    pub fn ip_stats(
        &self,
        window_s: i64,
        limit: usize,
    ) -> (
        Vec<(IpAddr, u64)>,
        Vec<(String, u64)>,
        Vec<(&'static str, u64)>,
    ) {
        let now_s = self.inner.clock.now().timestamp();
        let st = lock(&self.inner.stats);
        let mut ips: HashMap<IpAddr, u64> = HashMap::new();
        let mut countries: BTreeMap<String, u64> = BTreeMap::new();
        let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
        for b in st.recent(now_s, window_s) {
            for (k, n) in &b.blocked_ips {
                *ips.entry(*k).or_default() += n;
            }
            for (k, n) in &b.blocked_countries {
                *countries.entry(k.clone()).or_default() += n;
            }
            for (k, n) in &b.blocked_reasons {
                *reasons.entry(k).or_default() += n;
            }
        }
        let mut ips: Vec<(IpAddr, u64)> = ips.into_iter().collect();
        ips.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ips.truncate(limit);
        let mut countries: Vec<(String, u64)> = countries.into_iter().collect();
        countries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        countries.truncate(limit);
        (ips, countries, reasons.into_iter().collect())
    }

    /// Whether `ip` falls in `net_str` (a stored canonical network).
    pub(crate) fn covers(net_str: &str, ip: IpAddr) -> bool {
        parse_net(net_str).is_ok_and(|n| n.contains(&ip.to_canonical()))
    }
}

impl EdgeHooks for EdgeRuntime {
    fn check_ip(&self, ip: IpAddr, client: Option<&str>, route: &str) -> Result<(), BlockReason> {
        match &self.inner.geo {
            Some(g) => g.check(ip, client, route),
            None => Ok(()),
        }
    }

    fn blocked(&self, ip: IpAddr, reason: BlockReason) {
        self.observe_block(ip, reason);
    }

    fn decided(&self, ip: IpAddr, decision: &Decision) {
        if !decision.rules.iter().all(|r| r.allowed) {
            self.observe_decision(ip, decision);
        }
    }

    fn responded(&self, ip: IpAddr, status: StatusCode) {
        // 401/403 included: an authentication endpoint's failures are also reported
        // by the host with a precise reason; 429 is our own answer and not counted.
        if status.is_client_error()
            && status != StatusCode::TOO_MANY_REQUESTS
            && let Some(net) = self.count_failure(ip, FailureReason::Http4xx)
        {
            // Only the block itself (rare) costs a write, off the request path.
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.block(net, ip, FailureReason::Http4xx).await {
                    tracing::warn!(error = %e, "writing a 4xx-flood block failed");
                }
            });
        }
    }
}
