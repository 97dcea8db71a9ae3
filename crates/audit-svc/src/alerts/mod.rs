//! Alerts (issue 19 item 7): threshold rules over the stored trail, evaluated after each
//! committed ingest batch, deduplicated per rule and group while open, and delivered to
//! signed webhooks with durable retries. See `crates/audit-svc/docs/alerts.md`.
//!
//! - [`AlertsConfig`]: the `[audit.alerts]` section (rules, webhooks), validated;
//! - [`store`]: the `alerts`, `alert_events` and `alert_webhook_deliveries` tables;
//! - [`engine`]: evaluation, raising, metrics and the `sec.audit.alert.*` events;
//! - [`webhook`]: the signed POST and the supervised delivery worker.

pub mod api;
pub mod engine;
pub mod store;
pub mod webhook;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::TypeMatch;

/// Event types of the alerts themselves: no rule may match them, so an alert can never
/// raise another alert (see [`RuleConfig::event_type`]).
pub const ALERT_TYPE_PREFIX: &str = "sec.audit.alert.";
pub const RAISED: &str = "sec.audit.alert.raised";
pub const ACKNOWLEDGED: &str = "sec.audit.alert.acknowledged";

/// Most rules and webhooks one configuration may hold.
const MAX_RULES: usize = 100;
const MAX_WEBHOOKS: usize = 16;
/// Severities a rule may give its alerts.
pub const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];

/// `[audit.alerts]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The rules; when the section does not list any, [`default_rules`].
    pub rules: Vec<RuleConfig>,
    /// Where raised alerts are POSTed (`[[audit.alerts.webhooks]]`).
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            rules: default_rules(),
            webhooks: Vec::new(),
        }
    }
}

/// `[[audit.alerts.rules]]`: at least `threshold` events of `event_type` with the same
/// `group_by` value within `window_seconds`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `[a-z0-9-]{1,64}`, unique: the alert's `rule` and the metric label.
    pub name: String,
    /// An event type (`sec.auth.login.failed`, must be in the catalog) or a prefix ending
    /// in `*` (`sec.crypto.key.*`). Never one that can match `sec.audit.alert.*`.
    pub event_type: String,
    /// Events needed within the window, >= 1.
    pub threshold: u32,
    /// The sliding window, 1..=86400 seconds.
    pub window_seconds: u64,
    /// `actor_id`, `subject`, `ip_address`, `service` or `details.<key>`.
    pub group_by: String,
    /// `info`, `low`, `medium`, `high` or `critical`.
    pub severity: String,
}

/// `[[audit.alerts.webhooks]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `[a-z0-9-]{1,64}`, unique.
    pub name: String,
    /// `https://…`; plain `http://` only to a loopback host.
    pub url: String,
    /// File holding the HMAC secret (a mounted Kubernetes secret): at least 32 bytes
    /// once surrounding whitespace is trimmed. Read at start; never logged.
    pub secret_file: PathBuf,
    /// Per attempt, 1..=60 seconds.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    10
}

/// Present when the configuration says nothing about rules.
pub fn default_rules() -> Vec<RuleConfig> {
    let rule =
        |name: &str, ty: &str, threshold, window_seconds, group: &str, sev: &str| RuleConfig {
            name: name.into(),
            event_type: ty.into(),
            threshold,
            window_seconds,
            group_by: group.into(),
            severity: sev.into(),
        };
    vec![
        // auth-svc puts the user's id in the actor (and subject) of a failed login when
        // the user exists; unknown usernames carry an anonymous actor with no id.
        rule(
            "login-failures",
            "sec.auth.login.failed",
            5,
            60,
            "actor_id",
            "high",
        ),
        // token-svc: subject = the user whose refresh token family was replayed.
        rule(
            "refresh-reuse",
            "sec.token.refresh.reuse_detected",
            1,
            60,
            "subject",
            "critical",
        ),
        // crypto-svc: subject = the key's name.
        rule(
            "key-deleted",
            "sec.crypto.key.deleted",
            1,
            60,
            "subject",
            "high",
        ),
    ]
}

/// What a rule groups by: a column of `security_events` or one key of its details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    ActorId,
    Subject,
    IpAddress,
    Service,
    /// `[A-Za-z0-9_.-]{1,64}`.
    Detail(String),
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "actor_id" => Self::ActorId,
            "subject" => Self::Subject,
            "ip_address" => Self::IpAddress,
            "service" => Self::Service,
            _ => {
                let key = s.strip_prefix("details.")?;
                if !valid_detail_key(key) {
                    return None;
                }
                Self::Detail(key.to_owned())
            }
        })
    }

    /// The group value of an event as the store keeps it; `None` (not grouped, not
    /// counted) when the event has none.
    pub fn value_of(&self, e: &sec_common::events::SecurityEvent) -> Option<String> {
        let v = match self {
            Self::ActorId => e.actor.as_ref().map(|a| a.id.clone())?,
            Self::Subject => e.subject.clone(),
            Self::Service => e.service.clone(),
            // As stored: only a well-formed address, in its canonical text.
            Self::IpAddress => e.source_ip.parse::<std::net::IpAddr>().ok()?.to_string(),
            Self::Detail(k) => e.details.get(k)?.clone(),
        };
        (!v.is_empty()).then_some(v)
    }
}

fn valid_detail_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub types: TypeMatch,
    pub group: GroupBy,
    pub threshold: u32,
    pub window_seconds: u64,
    pub severity: &'static str,
}

impl Rule {
    pub fn matches(&self, event_type: &str) -> bool {
        match &self.types {
            TypeMatch::Exact(t) => t == event_type,
            TypeMatch::Prefix(p) => event_type.starts_with(p.as_str()),
        }
    }

    pub fn window_us(&self) -> i64 {
        i64::try_from(self.window_seconds).unwrap_or(i64::MAX / 1_000_000) * 1_000_000
    }
}

/// An event type or prefix a rule may watch: the type grammar, in the catalog when exact,
/// and unable to match the alert events themselves.
fn rule_types(t: &str) -> Result<TypeMatch, String> {
    let (body, prefix) = match t.strip_suffix('*') {
        Some(p) => (p, true),
        None => (t, false),
    };
    let grammar = !body.is_empty()
        && body.len() <= 128
        && body.starts_with("sec.")
        && body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !grammar {
        return Err(
            "an event type (`sec.auth.login.failed`) or a prefix ending in `*` (`sec.auth.*`)"
                .into(),
        );
    }
    // A prefix of `sec.audit.alert.` (`sec.*`, `sec.audit.*`) matches the alerts too.
    let loops = if prefix {
        ALERT_TYPE_PREFIX.starts_with(body) || body.starts_with(ALERT_TYPE_PREFIX)
    } else {
        body.starts_with(ALERT_TYPE_PREFIX)
    };
    if loops {
        return Err("must not match `sec.audit.alert.*`: an alert cannot raise alerts".into());
    }
    if prefix {
        Ok(TypeMatch::Prefix(body.to_owned()))
    } else if sec_common::events::catalog::is_known(body) {
        Ok(TypeMatch::Exact(body.to_owned()))
    } else {
        Err(format!("`{body}` is not in the event catalog"))
    }
}

impl RuleConfig {
    pub fn compile(&self) -> Result<Rule, (String, String)> {
        let bad = |k: &str, m: String| (k.to_owned(), m);
        if !valid_name(&self.name) {
            return Err(bad("name", "1 to 64 of a-z, 0-9 and `-`".into()));
        }
        let types = rule_types(&self.event_type).map_err(|m| bad("event_type", m))?;
        if self.threshold < 1 {
            return Err(bad("threshold", "must be at least 1".into()));
        }
        if !(1..=86_400).contains(&self.window_seconds) {
            return Err(bad("window_seconds", "must be between 1 and 86400".into()));
        }
        let group = GroupBy::parse(&self.group_by).ok_or_else(|| {
            bad(
                "group_by",
                "actor_id, subject, ip_address, service or details.<key> (key of A-Z, a-z, 0-9, `_`, `.`, `-`, at most 64)".into(),
            )
        })?;
        let severity = SEVERITIES
            .iter()
            .find(|s| **s == self.severity)
            .ok_or_else(|| bad("severity", format!("one of {}", SEVERITIES.join(", "))))?;
        Ok(Rule {
            name: self.name.clone(),
            types,
            group,
            threshold: self.threshold,
            window_seconds: self.window_seconds,
            severity,
        })
    }
}

/// Whether `url` may receive alerts: https, or http to a loopback host only.
fn check_url(raw: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not carry credentials (the signature authenticates)".into());
    }
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host".into()),
    };
    match u.scheme() {
        "https" => Ok(u),
        "http" if loopback => Ok(u),
        "http" => Err("must be https unless the host is loopback".into()),
        _ => Err("must be https (or http to a loopback host)".into()),
    }
}

impl WebhookConfig {
    pub fn check(&self) -> Result<url::Url, (String, String)> {
        if !valid_name(&self.name) {
            return Err(("name".into(), "1 to 64 of a-z, 0-9 and `-`".into()));
        }
        let url = check_url(&self.url).map_err(|m| ("url".to_owned(), m))?;
        if self.secret_file.as_os_str().is_empty() {
            return Err(("secret_file".into(), "is required".into()));
        }
        if !(1..=60).contains(&self.timeout_seconds) {
            return Err(("timeout_seconds".into(), "must be between 1 and 60".into()));
        }
        Ok(url)
    }
}

impl AlertsConfig {
    /// `Err((key within [audit.alerts], message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.rules()?;
        if self.webhooks.len() > MAX_WEBHOOKS {
            return Err(("webhooks".into(), format!("at most {MAX_WEBHOOKS}")));
        }
        let mut names = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            w.check()
                .map_err(|(k, m)| (format!("webhooks[{i}].{k}"), m))?;
            if !names.insert(w.name.as_str()) {
                return Err((format!("webhooks[{i}].name"), "used twice".into()));
            }
        }
        Ok(())
    }

    /// The rules, validated.
    pub fn rules(&self) -> Result<Vec<Rule>, (String, String)> {
        if self.rules.len() > MAX_RULES {
            return Err(("rules".into(), format!("at most {MAX_RULES}")));
        }
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            let rule = r
                .compile()
                .map_err(|(k, m)| (format!("rules[{i}].{k}"), m))?;
            if !names.insert(rule.name.clone()) {
                return Err((format!("rules[{i}].name"), "used twice".into()));
            }
            out.push(rule);
        }
        Ok(out)
    }
}
