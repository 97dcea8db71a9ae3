//! Rate-limit rules: the serde shape read from configuration, and the validated form the
//! limiter uses. A set is validated whole; the first problem is reported with the path
//! of the offending field (`rules[2].limit.burst: ...`) and the caller keeps its old set.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// Most rules one set may hold (each request is matched against all of them).
pub const MAX_RULES: usize = 256;
/// Most key parts one rule may combine.
pub const MAX_KEY_PARTS: usize = 8;
/// Longest route, endpoint or header name a rule may name.
pub const MAX_MATCH_LEN: usize = 256;

/// What happens to a rule's check when the shared store (Redis) cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreErrorPolicy {
    /// Let the request through (counted, and the store-error hook fires).
    FailOpen,
    /// Refuse the request with 429 (counted, and the store-error hook fires).
    FailClosed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    Second,
    Minute,
    Hour,
    Day,
}

impl Per {
    pub fn seconds(self) -> u64 {
        match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3_600,
            Per::Day => 86_400,
        }
    }
}

/// `rate` requests per `per`, with up to `burst` admitted at once on a fresh key.
///
/// GCRA (as governor): one request is released every `per / rate`, and the bucket holds
/// `burst` of them. Over any window of length `per` at most `rate + burst` requests pass.
/// `burst` counts the request itself (governor's `max_burst`), so `burst = 1` means no
/// burst beyond the steady rate; NGINX's `burst=N` is `burst = N + 1` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub rate: u32,
    pub per: Per,
    pub burst: u32,
}

/// Where a rule applies: exactly one of `route`, `route_prefix` or `endpoint`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// An exact HTTP path, e.g. `/v1/login`.
    pub route: Option<String>,
    /// An HTTP path prefix, e.g. `/v1/`.
    pub route_prefix: Option<String>,
    /// A gRPC method for the check API, e.g. `sec.auth.v1.AuthService/Login`.
    pub endpoint: Option<String>,
    /// HTTP methods (upper case); empty: any method.
    pub methods: Vec<String>,
}

/// One rule as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub id: String,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    /// Key parts: `client_id`, `user`, `ip`, `ip_prefix`, `header:<name>`.
    pub key: Vec<String>,
    pub limit: LimitConfig,
    #[serde(default)]
    pub shadow: bool,
    /// Required when the store is Redis; ignored by the in-process store.
    pub on_store_error: Option<StoreErrorPolicy>,
}

/// The `[edge]` rate-limit settings: the rules and the options they share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub rules: Vec<RuleConfig>,
    /// Prefix length of the `ip_prefix` key part for IPv4 (default 24).
    pub ipv4_prefix: u8,
    /// Prefix length of the `ip_prefix` key part for IPv6 (default 64).
    pub ipv6_prefix: u8,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RuleError {
    /// Path of the offending field, e.g. `rules[2].limit.burst`.
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> RuleError {
    RuleError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyPart {
    ClientId,
    User,
    Ip,
    IpPrefix,
    /// A header name, validated and lower-cased.
    Header(http::HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    Exact(String),
    Prefix(String),
    Endpoint(String),
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `[a-z0-9_.-]{1,64}`: safe as a metric label and inside a store key.
    pub id: Arc<str>,
    pub route: RouteMatch,
    /// Upper-case methods; empty: any.
    pub methods: Vec<String>,
    pub key: Vec<KeyPart>,
    pub limit: LimitConfig,
    pub shadow: bool,
    pub on_store_error: Option<StoreErrorPolicy>,
}

impl Rule {
    /// Time between two released requests (`per / rate`), at least 1 µs.
    pub fn emission_interval(&self) -> Duration {
        let per = Duration::from_secs(self.limit.per.seconds());
        (per / self.limit.rate.max(1)).max(Duration::from_micros(1))
    }

    /// The window of the `RateLimit-Policy` field, in seconds.
    pub fn window_secs(&self) -> u64 {
        self.limit.per.seconds()
    }

    /// What to do when the store fails; fail closed if unset (never reached with Redis:
    /// validation requires the field there).
    pub fn store_error_policy(&self) -> StoreErrorPolicy {
        self.on_store_error.unwrap_or(StoreErrorPolicy::FailClosed)
    }

    /// Whether this rule applies to `req` (route or endpoint, and method).
    pub fn matches_request(&self, req: &RequestMatch<'_>) -> bool {
        let route_ok = match (&self.route, req.endpoint) {
            (RouteMatch::Endpoint(e), Some(got)) => e == got,
            (RouteMatch::Endpoint(_), None) => false,
            (RouteMatch::Exact(r), None) => r == req.route,
            (RouteMatch::Prefix(p), None) => req.route.starts_with(p.as_str()),
            (_, Some(_)) => false,
        };
        route_ok
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(req.method)))
    }
}

/// What a rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct RequestMatch<'a> {
    pub route: &'a str,
    pub method: &'a str,
    /// Set for checks made on behalf of a gRPC endpoint (then `route` is ignored).
    pub endpoint: Option<&'a str>,
}

/// A validated rule set. Built whole or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

/// Which store the rules will run on: Redis requires `on_store_error` on every rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Redis,
    InProcess,
}

pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

fn valid_path_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_MATCH_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

impl RuleSet {
    /// Parses and validates a TOML document with the [`RulesConfig`] shape. Type errors
    /// and validation errors both name the field.
    pub fn from_toml(text: &str, store: StoreKind) -> Result<Self, RuleError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err("(document)", e.message().to_owned()))?;
        let cfg: RulesConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| err(e.path().to_string(), e.inner().to_string()))?;
        Self::build(&cfg, store)
    }

    /// Validates `cfg` whole: the first problem is returned with its field path.
    pub fn build(cfg: &RulesConfig, store: StoreKind) -> Result<Self, RuleError> {
        if cfg.rules.len() > MAX_RULES {
            return Err(err("rules", format!("at most {MAX_RULES} rules")));
        }
        if !(8..=32).contains(&cfg.ipv4_prefix) {
            return Err(err("ipv4_prefix", "must be between 8 and 32"));
        }
        if !(16..=128).contains(&cfg.ipv6_prefix) {
            return Err(err("ipv6_prefix", "must be between 16 and 128"));
        }
        let mut rules = Vec::with_capacity(cfg.rules.len());
        let mut seen = std::collections::HashSet::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            if !valid_id(&r.id) {
                return Err(err(at("id"), "must match [a-z0-9_.-]{1,64}"));
            }
            if !seen.insert(r.id.as_str()) {
                return Err(err(at("id"), "duplicate rule id"));
            }
            let m = &r.matches;
            let route = match (&m.route, &m.route_prefix, &m.endpoint) {
                (Some(x), None, None) => {
                    if !x.starts_with('/') || !valid_path_text(x) {
                        return Err(err(at("match.route"), "must be a path starting with /"));
                    }
                    RouteMatch::Exact(x.clone())
                }
                (None, Some(x), None) => {
                    if !x.starts_with('/') || !valid_path_text(x) {
                        return Err(err(
                            at("match.route_prefix"),
                            "must be a path starting with /",
                        ));
                    }
                    RouteMatch::Prefix(x.clone())
                }
                (None, None, Some(x)) => {
                    if !valid_path_text(x) || !x.contains('/') {
                        return Err(err(
                            at("match.endpoint"),
                            "must be a gRPC method name like pkg.Service/Method",
                        ));
                    }
                    RouteMatch::Endpoint(x.clone())
                }
                _ => {
                    return Err(err(
                        at("match"),
                        "exactly one of route, route_prefix or endpoint is required",
                    ));
                }
            };
            let mut methods = Vec::with_capacity(m.methods.len());
            for (j, meth) in m.methods.iter().enumerate() {
                if meth.is_empty()
                    || meth.len() > 16
                    || !meth.bytes().all(|b| b.is_ascii_uppercase())
                {
                    return Err(err(
                        at(&format!("match.methods[{j}]")),
                        "must be an upper-case HTTP method",
                    ));
                }
                methods.push(meth.clone());
            }
            if r.key.is_empty() || r.key.len() > MAX_KEY_PARTS {
                return Err(err(
                    at("key"),
                    format!("between 1 and {MAX_KEY_PARTS} key parts"),
                ));
            }
            let mut key = Vec::with_capacity(r.key.len());
            for (j, part) in r.key.iter().enumerate() {
                let p = match part.as_str() {
                    "client_id" => KeyPart::ClientId,
                    "user" => KeyPart::User,
                    "ip" => KeyPart::Ip,
                    "ip_prefix" => KeyPart::IpPrefix,
                    h => match h.strip_prefix("header:") {
                        Some(name) if !name.is_empty() && name.len() <= MAX_MATCH_LEN => {
                            match http::HeaderName::from_bytes(name.as_bytes()) {
                                Ok(n) => KeyPart::Header(n),
                                Err(_) => {
                                    return Err(err(
                                        at(&format!("key[{j}]")),
                                        "invalid header name",
                                    ));
                                }
                            }
                        }
                        _ => {
                            return Err(err(
                                at(&format!("key[{j}]")),
                                "must be client_id, user, ip, ip_prefix or header:<name>",
                            ));
                        }
                    },
                };
                if key.contains(&p) {
                    return Err(err(at(&format!("key[{j}]")), "duplicate key part"));
                }
                key.push(p);
            }
            if r.limit.rate == 0 {
                return Err(err(at("limit.rate"), "must be at least 1"));
            }
            if r.limit.burst == 0 {
                return Err(err(
                    at("limit.burst"),
                    "must be at least 1 (the request itself)",
                ));
            }
            if u64::from(r.limit.rate) > r.limit.per.seconds() * 1_000_000 {
                return Err(err(
                    at("limit.rate"),
                    "more than one request per microsecond",
                ));
            }
            if store == StoreKind::Redis && r.on_store_error.is_none() {
                return Err(err(
                    at("on_store_error"),
                    "required with a Redis store: fail_open or fail_closed",
                ));
            }
            rules.push(Rule {
                id: Arc::from(r.id.as_str()),
                route,
                methods,
                key,
                limit: r.limit,
                shadow: r.shadow,
                on_store_error: r.on_store_error,
            });
        }
        Ok(Self {
            rules,
            ipv4_prefix: cfg.ipv4_prefix,
            ipv6_prefix: cfg.ipv6_prefix,
        })
    }

    /// Rules that apply to `req`, in configuration order.
    pub fn matching<'s>(&'s self, req: &RequestMatch<'_>) -> Vec<&'s Rule> {
        self.rules
            .iter()
            .filter(|r| r.matches_request(req))
            .collect()
    }

    /// The network of `ip` used by the `ip_prefix` key part.
    pub fn ip_prefix(&self, ip: IpAddr) -> ipnet::IpNet {
        match ip.to_canonical() {
            IpAddr::V4(a) => ipnet::Ipv4Net::new(a, self.ipv4_prefix)
                .map(|n| ipnet::IpNet::V4(n.trunc()))
                .unwrap_or(ipnet::IpNet::V4(ipnet::Ipv4Net::from(a))),
            IpAddr::V6(a) => ipnet::Ipv6Net::new(a, self.ipv6_prefix)
                .map(|n| ipnet::IpNet::V6(n.trunc()))
                .unwrap_or(ipnet::IpNet::V6(ipnet::Ipv6Net::from(a))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[rules]]
        id = "login.ip"
        match = { route = "/v1/login", methods = ["POST"] }
        key = ["ip"]
        limit = { rate = 10, per = "minute", burst = 5 }
        on_store_error = "fail_closed"

        [[rules]]
        id = "api"
        match = { route_prefix = "/v1/" }
        key = ["client_id", "header:x-tenant"]
        limit = { rate = 100, per = "second", burst = 100 }
        shadow = true
        on_store_error = "fail_open"

        [[rules]]
        id = "grpc-check"
        match = { endpoint = "sec.token.v1.TokenService/Issue" }
        key = ["ip_prefix"]
        limit = { rate = 1, per = "day", burst = 1 }
        on_store_error = "fail_open"
    "#;

    #[test]
    fn a_good_set_validates_and_matches_by_route_method_and_endpoint() {
        let s = RuleSet::from_toml(GOOD, StoreKind::Redis).unwrap();
        assert_eq!(s.rules.len(), 3);
        let ids = |req: RequestMatch<'_>| -> Vec<String> {
            s.matching(&req).iter().map(|r| r.id.to_string()).collect()
        };
        let post_login = RequestMatch {
            route: "/v1/login",
            method: "POST",
            endpoint: None,
        };
        assert_eq!(ids(post_login), ["login.ip", "api"]);
        let get_login = RequestMatch {
            method: "GET",
            ..post_login
        };
        assert_eq!(ids(get_login), ["api"]);
        let other = RequestMatch {
            route: "/health",
            method: "GET",
            endpoint: None,
        };
        assert!(ids(other).is_empty());
        let grpc = RequestMatch {
            route: "",
            method: "",
            endpoint: Some("sec.token.v1.TokenService/Issue"),
        };
        assert_eq!(ids(grpc), ["grpc-check"]);
        assert_eq!(s.rules[0].emission_interval(), Duration::from_secs(6));
        assert_eq!(
            s.rules[1].key[1],
            KeyPart::Header(http::HeaderName::from_static("x-tenant"))
        );
    }

    fn broken(replace: &str, with: &str) -> RuleError {
        let text = GOOD.replacen(replace, with, 1);
        assert_ne!(text, GOOD, "the test edit applies");
        RuleSet::from_toml(&text, StoreKind::Redis).unwrap_err()
    }

    #[test]
    fn errors_name_the_offending_field_and_refuse_the_whole_set() {
        let e = broken(
            "rate = 1, per = \"day\", burst = 1",
            "rate = 1, per = \"day\", burst = 0",
        );
        assert_eq!(e.field, "rules[2].limit.burst", "{e}");
        assert!(e.to_string().starts_with("rules[2].limit.burst: "));
        assert_eq!(broken("id = \"api\"", "id = \"API\"").field, "rules[1].id");
        assert_eq!(
            broken("id = \"api\"", "id = \"login.ip\"").field,
            "rules[1].id"
        );
        assert_eq!(
            broken("\"header:x-tenant\"", "\"header:bad header\"").field,
            "rules[1].key[1]"
        );
        assert_eq!(
            broken("\"ip_prefix\"", "\"cookie\"").field,
            "rules[2].key[0]"
        );
        assert_eq!(
            broken("per = \"minute\"", "per = \"fortnight\"").field,
            "rules[0].limit.per"
        );
        assert_eq!(
            broken("rate = 100,", "rate = 0,").field,
            "rules[1].limit.rate"
        );
        assert_eq!(
            broken(
                "route_prefix = \"/v1/\"",
                "route_prefix = \"/v1/\", route = \"/x\""
            )
            .field,
            "rules[1].match"
        );
        assert_eq!(
            broken("methods = [\"POST\"]", "methods = [\"post\"]").field,
            "rules[0].match.methods[0]"
        );
        assert_eq!(
            broken("shadow = true", "shadw = true").field,
            "rules[1].shadw"
        );
    }

    #[test]
    fn redis_requires_an_explicit_store_error_policy_in_process_does_not() {
        let text = GOOD.replacen("on_store_error = \"fail_open\"\n", "", 1);
        let e = RuleSet::from_toml(&text, StoreKind::Redis).unwrap_err();
        assert_eq!(e.field, "rules[1].on_store_error");
        assert!(RuleSet::from_toml(&text, StoreKind::InProcess).is_ok());
    }

    #[test]
    fn ip_prefix_defaults_to_24_and_64_and_is_configurable() {
        let s = RuleSet::from_toml(GOOD, StoreKind::InProcess).unwrap();
        assert_eq!(
            s.ip_prefix("192.0.2.77".parse().unwrap()).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            s.ip_prefix("::ffff:192.0.2.77".parse().unwrap())
                .to_string(),
            "192.0.2.0/24",
            "v4-mapped v6 is keyed as v4"
        );
        assert_eq!(
            s.ip_prefix("2001:db8:1:2:3::4".parse().unwrap())
                .to_string(),
            "2001:db8:1:2::/64"
        );
        let s =
            RuleSet::from_toml(&format!("ipv4_prefix = 16\n{GOOD}"), StoreKind::InProcess).unwrap();
        assert_eq!(
            s.ip_prefix("192.0.2.77".parse().unwrap()).to_string(),
            "192.0.0.0/16"
        );
        let e = RuleSet::from_toml(&format!("ipv6_prefix = 200\n{GOOD}"), StoreKind::InProcess)
            .unwrap_err();
        assert_eq!(e.field, "ipv6_prefix");
    }
}
