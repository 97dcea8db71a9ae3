//! `sec.edge.v1.EdgeService` over an [`EdgeRuntime`]. Who may call what is declared once
//! in [`ACCESS`] (enforced by the host's `AccessLayer`) and checked again here.
//!
//! Changes validate the whole resulting set before writing, and write compare-and-set on
//! the store's change counter: a bad rule is refused naming the field (`rule.limit.burst`)
//! and the old set stays; a concurrent change makes the loser ABORTED.

use std::net::IpAddr;

use sec_common::auth::{Access, AccessTable, Caller};
use sec_common::error::{Error, ErrorCode};
use sec_proto::edge::v1 as pb;
use sec_proto::edge::v1::edge_service_server::EdgeService;
use tonic::{Request, Response, Status};

use crate::ip::{IpTables, parse_net};
use crate::limiter::CheckRequest;
use crate::rules::{
    LimitConfig, MatchConfig, Per, RuleConfig, RuleSet, StoreErrorPolicy, valid_id,
};
use crate::runtime::EdgeRuntime;
use crate::store::{IpRuleRow, MAX_IP_RULES, MAX_RUNTIME_RULES, StoreError, StoredRule};

pub const ACCESS: AccessTable = AccessTable {
    service: "sec.edge.v1.EdgeService",
    methods: &[
        ("CheckRateLimit", Access::Service),
        ("ListRateLimitRules", Access::Admin),
        ("PutRateLimitRule", Access::Admin),
        ("DeleteRateLimitRule", Access::Admin),
        ("RateLimitStats", Access::Admin),
        ("ListIpRules", Access::Admin),
        ("PutIpRule", Access::Admin),
        ("DeleteIpRule", Access::Admin),
        ("UnblockIp", Access::Admin),
        ("IpStats", Access::Admin),
    ],
};

const MAX_DESCRIPTORS: usize = 16;
const MAX_HITS: u32 = 100;
const MAX_VALUE_LEN: usize = 1_024;

#[derive(Debug, Clone)]
pub struct EdgeGrpc {
    rt: EdgeRuntime,
}

impl EdgeGrpc {
    pub fn new(rt: EdgeRuntime) -> Self {
        Self { rt }
    }
}

/// INVALID_ARGUMENT naming `field` in the ErrorInfo and in the message (which is what a
/// CLI user sees).
fn inv(field: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid(field, format!("{field}: {message}"))
}

fn admin<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    Caller::of(req)?.require_admin(what).map_err(Status::from)
}

fn store_err(e: StoreError) -> Status {
    match e {
        StoreError::Conflict => Error::new(ErrorCode::Aborted, e.to_string()).into(),
        StoreError::Db(e) => Error::unavailable("edge store", &e).into(),
    }
}

fn per_str(p: Per) -> &'static str {
    match p {
        Per::Second => "second",
        Per::Minute => "minute",
        Per::Hour => "hour",
        Per::Day => "day",
    }
}

fn to_pb(r: &RuleConfig, source: &str) -> pb::RateLimitRule {
    pb::RateLimitRule {
        id: r.id.clone(),
        route: r.matches.route.clone().unwrap_or_default(),
        route_prefix: r.matches.route_prefix.clone().unwrap_or_default(),
        endpoint: r.matches.endpoint.clone().unwrap_or_default(),
        methods: r.matches.methods.clone(),
        key: r.key.clone(),
        rate: r.limit.rate,
        per: per_str(r.limit.per).into(),
        burst: r.limit.burst,
        shadow: r.shadow,
        on_store_error: match r.on_store_error {
            Some(StoreErrorPolicy::FailOpen) => "fail_open".into(),
            Some(StoreErrorPolicy::FailClosed) => "fail_closed".into(),
            None => String::new(),
        },
        source: source.into(),
    }
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// The proto rule as a `RuleConfig` (the enumerations checked here, everything else by
/// `RuleSet::build` over the whole set).
fn from_pb(r: &pb::RateLimitRule) -> Result<RuleConfig, Error> {
    if !valid_id(&r.id) {
        return Err(inv("rule.id", "must match [a-z0-9_.-]{1,64}"));
    }
    let per = match r.per.as_str() {
        "second" => Per::Second,
        "minute" => Per::Minute,
        "hour" => Per::Hour,
        "day" => Per::Day,
        _ => {
            return Err(inv("rule.limit.per", "must be second, minute, hour or day"));
        }
    };
    let on_store_error = match r.on_store_error.as_str() {
        "" => None,
        "fail_open" => Some(StoreErrorPolicy::FailOpen),
        "fail_closed" => Some(StoreErrorPolicy::FailClosed),
        _ => {
            return Err(inv(
                "rule.on_store_error",
                "must be fail_open or fail_closed",
            ));
        }
    };
    Ok(RuleConfig {
        id: r.id.clone(),
        matches: MatchConfig {
            route: nonempty(&r.route),
            route_prefix: nonempty(&r.route_prefix),
            endpoint: nonempty(&r.endpoint),
            methods: r.methods.clone(),
        },
        key: r.key.clone(),
        limit: LimitConfig {
            rate: r.rate,
            per,
            burst: r.burst,
        },
        shadow: r.shadow,
        on_store_error,
    })
}

fn ip_to_pb(r: &IpRuleRow, source: &str) -> pb::IpRule {
    pb::IpRule {
        id: r.id.clone(),
        action: r.action.clone(),
        network: r.network.clone(),
        scope: r.scope.clone(),
        reason: r.reason.clone(),
        expires_at_us: r.expires_at.unwrap_or(0),
        created_at_us: r.created_at,
        source: source.into(),
    }
}

fn valid_scope(s: &str) -> bool {
    if s == "global" {
        return true;
    }
    match s.split_once(':') {
        Some(("client", id)) => {
            (1..=256).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
        }
        Some(("route", p)) => {
            p.starts_with('/') && p.len() <= 256 && p.bytes().all(|b| b.is_ascii_graphic())
        }
        _ => false,
    }
}

fn window(w: u32) -> Result<i64, Status> {
    match w {
        0 => Ok(300),
        1..=3600 => Ok(i64::from(w)),
        _ => Err(inv("window_seconds", "at most 3600").into()),
    }
}

fn limit(l: u32) -> Result<usize, Status> {
    match l {
        0 => Ok(10),
        1..=100 => Ok(l as usize),
        _ => Err(inv("limit", "at most 100").into()),
    }
}

#[tonic::async_trait]
impl EdgeService for EdgeGrpc {
    async fn check_rate_limit(
        &self,
        req: Request<pb::CheckRateLimitRequest>,
    ) -> Result<Response<pb::CheckRateLimitResponse>, Status> {
        let caller = Caller::of(&req)?;
        if !caller.allowed(Access::Service) {
            return Err(Error::denied("CheckRateLimit needs a service credential").into());
        }
        let r = req.into_inner();
        if r.endpoint.is_empty() || r.endpoint.len() > 256 {
            return Err(inv("endpoint", "required, at most 256 bytes").into());
        }
        if r.descriptors.len() > MAX_DESCRIPTORS {
            return Err(inv("descriptors", format!("at most {MAX_DESCRIPTORS}")).into());
        }
        if r.hits > MAX_HITS {
            return Err(inv("hits", format!("at most {MAX_HITS}")).into());
        }
        let mut client_id = None;
        let mut user = None;
        let mut ip: Option<IpAddr> = None;
        let mut headers = http::HeaderMap::new();
        for (i, d) in r.descriptors.iter().enumerate() {
            if d.value.len() > MAX_VALUE_LEN {
                return Err(inv(
                    &format!("descriptors[{i}].value"),
                    format!("at most {MAX_VALUE_LEN} bytes"),
                )
                .into());
            }
            let dup = || inv(&format!("descriptors[{i}].key"), "given twice");
            match d.key.as_str() {
                "client_id" => {
                    if client_id.replace(d.value.as_str()).is_some() {
                        return Err(dup().into());
                    }
                }
                "user" => {
                    if user.replace(d.value.as_str()).is_some() {
                        return Err(dup().into());
                    }
                }
                "ip" => {
                    let a: IpAddr = d.value.parse().map_err(|_| {
                        inv(&format!("descriptors[{i}].value"), "not an IP address")
                    })?;
                    if ip.replace(a.to_canonical()).is_some() {
                        return Err(dup().into());
                    }
                }
                k => {
                    let name = k
                        .strip_prefix("header:")
                        .and_then(|n| http::HeaderName::from_bytes(n.as_bytes()).ok());
                    let value = http::HeaderValue::from_str(&d.value)
                        .map_err(|_| inv(&format!("descriptors[{i}].value"), "not a header value"));
                    match name {
                        Some(n) => {
                            if headers.insert(n, value?).is_some() {
                                return Err(dup().into());
                            }
                        }
                        None => {
                            return Err(inv(
                                &format!("descriptors[{i}].key"),
                                "must be client_id, user, ip or header:<name>",
                            )
                            .into());
                        }
                    }
                }
            }
        }
        let check = CheckRequest {
            route: "",
            method: "",
            endpoint: Some(&r.endpoint),
            client_id,
            user,
            // Rules keyed by ip/ip_prefix need the `ip` descriptor; without it every
            // such check shares the unspecified address.
            ip: ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            headers: Some(&headers),
            trusted_client: false,
        };
        let mut decision = self.rt.limiter().check(&check).await;
        for _ in 1..r.hits.max(1) {
            if !decision.allowed {
                break;
            }
            decision = self.rt.limiter().check(&check).await;
        }
        crate::layer::EdgeHooks::decided(&self.rt, check.ip, &decision);
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok(Response::new(pb::CheckRateLimitResponse {
            allowed: decision.allowed,
            retry_after_ms: ms(decision.retry_after()),
            bypassed: decision.bypassed,
            rules: decision
                .rules
                .iter()
                .map(|o| pb::RuleStatus {
                    rule_id: o.rule_id.to_string(),
                    shadow: o.shadow,
                    allowed: o.allowed,
                    remaining: o.remaining,
                    reset_ms: ms(o.reset),
                    retry_after_ms: ms(o.retry_after),
                    store_error: o.store_error,
                })
                .collect(),
        }))
    }

    async fn list_rate_limit_rules(
        &self,
        req: Request<pb::ListRateLimitRulesRequest>,
    ) -> Result<Response<pb::ListRateLimitRulesResponse>, Status> {
        admin(&req, "ListRateLimitRules")?;
        let snap = self.rt.store().load().await.map_err(store_err)?;
        let (merged, runtime_ids) = self.rt.merged_rules(&snap);
        Ok(Response::new(pb::ListRateLimitRulesResponse {
            rules: merged
                .rules
                .iter()
                .map(|r| {
                    let src = if runtime_ids.contains(&r.id) {
                        "runtime"
                    } else {
                        "config"
                    };
                    to_pb(r, src)
                })
                .collect(),
        }))
    }

    async fn put_rate_limit_rule(
        &self,
        req: Request<pb::PutRateLimitRuleRequest>,
    ) -> Result<Response<pb::PutRateLimitRuleResponse>, Status> {
        admin(&req, "PutRateLimitRule")?;
        let rule = req
            .into_inner()
            .rule
            .ok_or_else(|| inv("rule", "required"))?;
        let cfg = from_pb(&rule)?;
        let snap = self.rt.store().load().await.map_err(store_err)?;
        if snap.rules.len() >= MAX_RUNTIME_RULES && !snap.rules.iter().any(|r| r.id == cfg.id) {
            return Err(inv("rule", format!("at most {MAX_RUNTIME_RULES} runtime rules")).into());
        }
        // Validate the whole set the change would produce; name the field of the new rule.
        let (mut merged, _) = self.rt.merged_rules(&snap);
        let idx = match merged.rules.iter().position(|r| r.id == cfg.id) {
            Some(i) => {
                if let Some(slot) = merged.rules.get_mut(i) {
                    *slot = cfg.clone();
                }
                i
            }
            None => {
                merged.rules.push(cfg.clone());
                merged.rules.len() - 1
            }
        };
        if let Err(e) = RuleSet::build(&merged, self.rt.limiter().store_kind()) {
            let own = format!("rules[{idx}]");
            let field = match e.field.strip_prefix(&own) {
                Some(rest) => format!("rule{rest}"),
                None => e.field.clone(),
            };
            return Err(inv(&field, e.reason).into());
        }
        let body =
            serde_json::to_string(&cfg).map_err(|e| Error::internal("serialising a rule", &e))?;
        self.rt
            .store()
            .put_rule(
                &StoredRule {
                    id: cfg.id.clone(),
                    body,
                    updated_at: self.rt.now_us(),
                },
                snap.version,
            )
            .await
            .map_err(store_err)?;
        self.rt.sync_after_write().await;
        Ok(Response::new(pb::PutRateLimitRuleResponse {
            rule: Some(to_pb(&cfg, "runtime")),
        }))
    }

    async fn delete_rate_limit_rule(
        &self,
        req: Request<pb::DeleteRateLimitRuleRequest>,
    ) -> Result<Response<pb::DeleteRateLimitRuleResponse>, Status> {
        admin(&req, "DeleteRateLimitRule")?;
        let id = req.into_inner().id;
        if !valid_id(&id) {
            return Err(inv("id", "must match [a-z0-9_.-]{1,64}").into());
        }
        let snap = self.rt.store().load().await.map_err(store_err)?;
        if !snap.rules.iter().any(|r| r.id == id) {
            return Err(Error::not_found(
                if self.rt.config().ratelimit.rules.iter().any(|r| r.id == id) {
                    "no runtime rule with this id (configuration rules change in the configuration)"
                } else {
                    "no such rule"
                },
            )
            .into());
        }
        // The configuration rule it overrode comes back: check that the result is valid.
        let mut rest = snap.clone();
        rest.rules.retain(|r| r.id != id);
        let (merged, _) = self.rt.merged_rules(&rest);
        if let Err(e) = RuleSet::build(&merged, self.rt.limiter().store_kind()) {
            return Err(
                Error::precondition(format!("the remaining set would not validate: {e}")).into(),
            );
        }
        if !self
            .rt
            .store()
            .delete_rule(&id, snap.version)
            .await
            .map_err(store_err)?
        {
            return Err(Error::not_found("no such rule").into());
        }
        self.rt.sync_after_write().await;
        Ok(Response::new(pb::DeleteRateLimitRuleResponse {}))
    }

    async fn rate_limit_stats(
        &self,
        req: Request<pb::RateLimitStatsRequest>,
    ) -> Result<Response<pb::RateLimitStatsResponse>, Status> {
        admin(&req, "RateLimitStats")?;
        let r = req.into_inner();
        let w = window(r.window_seconds)?;
        let (keys, rules) = self.rt.ratelimit_stats(w, limit(r.limit)?);
        Ok(Response::new(pb::RateLimitStatsResponse {
            keys: keys
                .into_iter()
                .map(|(rule_id, key_hash, limited)| pb::KeyCount {
                    rule_id,
                    key_hash,
                    limited,
                })
                .collect(),
            rules: rules
                .into_iter()
                .map(|(rule_id, limited)| pb::RuleCount { rule_id, limited })
                .collect(),
            window_seconds: u32::try_from(w).unwrap_or(0),
        }))
    }

    async fn list_ip_rules(
        &self,
        req: Request<pb::ListIpRulesRequest>,
    ) -> Result<Response<pb::ListIpRulesResponse>, Status> {
        admin(&req, "ListIpRules")?;
        let snap = self.rt.store().load().await.map_err(store_err)?;
        let now = self.rt.now_us();
        let cfg = &self.rt.config().ip;
        let mut rules = Vec::new();
        let mut push_cfg = |action: &str, scope: String, nets: &[String]| {
            for n in nets {
                rules.push(pb::IpRule {
                    id: format!("{action}:{scope}:{n}"),
                    action: action.into(),
                    network: n.clone(),
                    scope: scope.clone(),
                    reason: "config".into(),
                    expires_at_us: 0,
                    created_at_us: 0,
                    source: "config".into(),
                });
            }
        };
        push_cfg("allow", "global".into(), &cfg.allow);
        push_cfg("deny", "global".into(), &cfg.deny);
        for (id, l) in &cfg.clients {
            push_cfg("allow", format!("client:{id}"), &l.allow);
            push_cfg("deny", format!("client:{id}"), &l.deny);
        }
        for (p, l) in &cfg.routes {
            push_cfg("allow", format!("route:{p}"), &l.allow);
            push_cfg("deny", format!("route:{p}"), &l.deny);
        }
        rules.extend(
            snap.ip_rules
                .iter()
                .filter(|r| r.live_at(now))
                .map(|r| ip_to_pb(r, "runtime")),
        );
        Ok(Response::new(pb::ListIpRulesResponse { rules }))
    }

    async fn put_ip_rule(
        &self,
        req: Request<pb::PutIpRuleRequest>,
    ) -> Result<Response<pb::PutIpRuleResponse>, Status> {
        admin(&req, "PutIpRule")?;
        let r = req
            .into_inner()
            .rule
            .ok_or_else(|| inv("rule", "required"))?;
        if r.action != "allow" && r.action != "deny" {
            return Err(inv("rule.action", "must be allow or deny").into());
        }
        let net = parse_net(&r.network).map_err(|e| inv("rule.network", e))?;
        let scope = if r.scope.is_empty() {
            "global".to_owned()
        } else {
            r.scope.clone()
        };
        if !valid_scope(&scope) {
            return Err(inv("rule.scope", "must be global, client:<id> or route:/<path>").into());
        }
        let now = self.rt.now_us();
        if r.expires_at_us < 0 || (r.expires_at_us != 0 && r.expires_at_us <= now) {
            return Err(inv(
                "rule.expires_at_us",
                "must be 0 (no expiry) or in the future",
            )
            .into());
        }
        let row = IpRuleRow {
            id: format!("{}:{scope}:{net}", r.action),
            action: r.action.clone(),
            network: net.to_string(),
            scope,
            reason: "admin".into(),
            expires_at: (r.expires_at_us != 0).then_some(r.expires_at_us),
            created_at: now,
        };
        let snap = self.rt.store().load().await.map_err(store_err)?;
        if snap.ip_rules.len() >= MAX_IP_RULES && !snap.ip_rules.iter().any(|x| x.id == row.id) {
            return Err(inv("rule", format!("at most {MAX_IP_RULES} runtime IP rules")).into());
        }
        let mut next = snap.clone();
        next.ip_rules.retain(|x| x.id != row.id);
        next.ip_rules.push(row.clone());
        IpTables::build(&self.rt.merged_ip(&next, now)).map_err(|e| inv("rule", e.to_string()))?;
        self.rt
            .store()
            .put_ip_rule(&row, Some(snap.version))
            .await
            .map_err(store_err)?;
        self.rt.sync_after_write().await;
        Ok(Response::new(pb::PutIpRuleResponse {
            rule: Some(ip_to_pb(&row, "runtime")),
        }))
    }

    async fn delete_ip_rule(
        &self,
        req: Request<pb::DeleteIpRuleRequest>,
    ) -> Result<Response<pb::DeleteIpRuleResponse>, Status> {
        admin(&req, "DeleteIpRule")?;
        let id = req.into_inner().id;
        if id.is_empty() || id.len() > 600 {
            return Err(inv("id", "required, at most 600 bytes").into());
        }
        let n = self
            .rt
            .store()
            .delete_ip_rules(std::slice::from_ref(&id))
            .await
            .map_err(store_err)?;
        if n == 0 {
            return Err(Error::not_found("no such runtime IP rule").into());
        }
        self.rt.sync_after_write().await;
        Ok(Response::new(pb::DeleteIpRuleResponse {}))
    }

    async fn unblock_ip(
        &self,
        req: Request<pb::UnblockIpRequest>,
    ) -> Result<Response<pb::UnblockIpResponse>, Status> {
        admin(&req, "UnblockIp")?;
        let ip: IpAddr = req
            .into_inner()
            .ip
            .parse()
            .map_err(|_| inv("ip", "not an IP address"))?;
        let snap = self.rt.store().load().await.map_err(store_err)?;
        let ids: Vec<String> = snap
            .ip_rules
            .iter()
            .filter(|r| r.is_auto_block() && EdgeRuntime::covers(&r.network, ip))
            .map(|r| r.id.clone())
            .collect();
        let n = self
            .rt
            .store()
            .delete_ip_rules(&ids)
            .await
            .map_err(store_err)?;
        if n == 0 {
            return Err(Error::not_found("no automatic block covers this address").into());
        }
        self.rt.sync_after_write().await;
        Ok(Response::new(pb::UnblockIpResponse {
            removed: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    async fn ip_stats(
        &self,
        req: Request<pb::IpStatsRequest>,
    ) -> Result<Response<pb::IpStatsResponse>, Status> {
        admin(&req, "IpStats")?;
        let r = req.into_inner();
        let w = window(r.window_seconds)?;
        let (ips, countries, reasons) = self.rt.ip_stats(w, limit(r.limit)?);
        Ok(Response::new(pb::IpStatsResponse {
            ips: ips
                .into_iter()
                .map(|(ip, blocked)| pb::IpCount {
                    ip: ip.to_string(),
                    blocked,
                })
                .collect(),
            countries: countries
                .into_iter()
                .map(|(country, blocked)| pb::CountryCount { country, blocked })
                .collect(),
            reasons: reasons
                .into_iter()
                .map(|(reason, blocked)| pb::ReasonCount {
                    reason: reason.into(),
                    blocked,
                })
                .collect(),
            window_seconds: u32::try_from(w).unwrap_or(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_table_covers_the_proto() {
        sec_common::auth::check_tables_cover(sec_proto::FILE_DESCRIPTOR_SET, &[super::ACCESS])
            .unwrap();
    }
}
