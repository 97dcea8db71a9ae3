//! session-svc's `[session]` section: timeouts, per-user limits, binding defaults and
//! size limits.

use std::collections::BTreeMap;

use sec_common::config::ServiceConfig;
use serde::{Deserialize, Serialize};

/// Longest absolute lifetime accepted: 90 days.
const MAX_LIFETIME_SECONDS: u64 = 90 * 86_400;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitPolicy {
    /// A new session beyond the limit evicts the user's oldest (earliest created).
    EvictOldest,
    /// A new session beyond the limit is refused (RESOURCE_EXHAUSTED).
    Refuse,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BindingPolicy {
    Record,
    StepUp,
    Deny,
}

impl BindingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::StepUp => "step_up",
            Self::Deny => "deny",
        }
    }
}

/// Timeouts that override the global ones for one client id.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTimeouts {
    pub idle_timeout_seconds: u64,
    pub absolute_lifetime_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// A session not touched for this long ends (sliding).
    pub idle_timeout_seconds: u64,
    /// A session ends this long after creation, whatever its activity.
    pub absolute_lifetime_seconds: u64,
    /// Per-client overrides, keyed by client id.
    pub clients: BTreeMap<String, ClientTimeouts>,
    /// Concurrent sessions per user (1..=1000).
    pub max_sessions_per_user: u32,
    pub limit_policy: LimitPolicy,
    /// Binding defaults for sessions created without an explicit binding.
    pub bind_ip: bool,
    pub bind_user_agent: bool,
    pub binding_policy: BindingPolicy,
    /// IP prefix compared when bound: /24 and /64 tolerate address changes inside one
    /// network (carrier NAT, privacy addresses).
    pub ipv4_prefix_len: u8,
    pub ipv6_prefix_len: u8,
    /// Attribute map limits (decoded sizes).
    pub max_attributes: usize,
    pub max_attribute_key_bytes: usize,
    pub max_attribute_value_bytes: usize,
    pub max_attributes_total_bytes: usize,
    /// Longest user agent stored (longer ones are refused).
    pub max_user_agent_bytes: usize,
    /// Redis store only: after each write, `WAIT <n> <redis_wait_timeout_ms>` so the write
    /// is on `n` replicas before it is acknowledged (0 = no WAIT).
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout_ms: u64,
    /// Timeout of each Redis call: a dead Redis fails calls fast (UNAVAILABLE).
    pub redis_timeout_ms: u64,
    /// How often the active-session gauges are recomputed (a SCAN over the sessions).
    pub gauge_refresh_seconds: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout_seconds: 30 * 60,
            absolute_lifetime_seconds: 12 * 3600,
            clients: BTreeMap::new(),
            max_sessions_per_user: 10,
            limit_policy: LimitPolicy::EvictOldest,
            bind_ip: false,
            bind_user_agent: false,
            binding_policy: BindingPolicy::Record,
            ipv4_prefix_len: 24,
            ipv6_prefix_len: 64,
            max_attributes: 16,
            max_attribute_key_bytes: 64,
            max_attribute_value_bytes: 1024,
            max_attributes_total_bytes: 4096,
            max_user_agent_bytes: 512,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 1000,
            redis_timeout_ms: 1000,
            gauge_refresh_seconds: 30,
        }
    }
}

fn check_timeouts(prefix: &str, idle: u64, abs: u64) -> Result<(), (String, String)> {
    if idle == 0 || idle > MAX_LIFETIME_SECONDS {
        return Err((
            format!("{prefix}idle_timeout_seconds"),
            "must be between 1 second and 90 days".into(),
        ));
    }
    if abs < idle || abs > MAX_LIFETIME_SECONDS {
        return Err((
            format!("{prefix}absolute_lifetime_seconds"),
            "must be at least the idle timeout and at most 90 days".into(),
        ));
    }
    Ok(())
}

impl ServiceConfig for SessionConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let invalid = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        check_timeouts(
            "",
            self.idle_timeout_seconds,
            self.absolute_lifetime_seconds,
        )?;
        if self.clients.len() > 1000 {
            return invalid("clients", "at most 1000 client overrides");
        }
        for (client, t) in &self.clients {
            if crate::engine::validate_client_id(client).is_err() {
                return invalid(
                    "clients",
                    "a client id is empty, too long or has bad characters",
                );
            }
            check_timeouts(
                &format!("clients.{client}."),
                t.idle_timeout_seconds,
                t.absolute_lifetime_seconds,
            )?;
        }
        if !(1..=1000).contains(&self.max_sessions_per_user) {
            return invalid("max_sessions_per_user", "must be between 1 and 1000");
        }
        if !(8..=32).contains(&self.ipv4_prefix_len) {
            return invalid("ipv4_prefix_len", "must be between 8 and 32");
        }
        if !(16..=128).contains(&self.ipv6_prefix_len) {
            return invalid("ipv6_prefix_len", "must be between 16 and 128");
        }
        if self.max_attributes > 16 {
            return invalid("max_attributes", "must be at most 16");
        }
        if !(1..=64).contains(&self.max_attribute_key_bytes) {
            return invalid("max_attribute_key_bytes", "must be between 1 and 64");
        }
        if !(1..=1024).contains(&self.max_attribute_value_bytes) {
            return invalid("max_attribute_value_bytes", "must be between 1 and 1024");
        }
        if !(1..=4096).contains(&self.max_attributes_total_bytes) {
            return invalid("max_attributes_total_bytes", "must be between 1 and 4096");
        }
        if !(16..=2048).contains(&self.max_user_agent_bytes) {
            return invalid("max_user_agent_bytes", "must be between 16 and 2048");
        }
        if self.redis_wait_replicas > 16 {
            return invalid("redis_wait_replicas", "must be at most 16");
        }
        if self.redis_wait_replicas > 0 && !(1..=60_000).contains(&self.redis_wait_timeout_ms) {
            return invalid("redis_wait_timeout_ms", "must be between 1 and 60000");
        }
        if !(10..=60_000).contains(&self.redis_timeout_ms) {
            return invalid("redis_timeout_ms", "must be between 10 and 60000");
        }
        if !(1..=3600).contains(&self.gauge_refresh_seconds) {
            return invalid("gauge_refresh_seconds", "must be between 1 and 3600");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        SessionConfig::default().validate().unwrap();
        let bad = |f: fn(&mut SessionConfig), key: &str| {
            let mut c = SessionConfig::default();
            f(&mut c);
            assert_eq!(c.validate().unwrap_err().0, key);
        };
        bad(|c| c.idle_timeout_seconds = 0, "idle_timeout_seconds");
        bad(
            |c| c.absolute_lifetime_seconds = 10,
            "absolute_lifetime_seconds",
        );
        bad(|c| c.max_sessions_per_user = 0, "max_sessions_per_user");
        bad(|c| c.max_attributes = 17, "max_attributes");
        bad(|c| c.ipv4_prefix_len = 33, "ipv4_prefix_len");
        bad(
            |c| {
                c.clients.insert(
                    "web".into(),
                    ClientTimeouts {
                        idle_timeout_seconds: 100,
                        absolute_lifetime_seconds: 50,
                    },
                );
            },
            "clients.web.absolute_lifetime_seconds",
        );
        bad(
            |c| {
                c.clients.insert(
                    "bad client".into(),
                    ClientTimeouts {
                        idle_timeout_seconds: 100,
                        absolute_lifetime_seconds: 500,
                    },
                );
            },
            "clients",
        );
    }
}
