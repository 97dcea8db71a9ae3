//! audit-svc's `[audit]` section: limits applied at ingest, and how often the hash chain's
//! head is signed.

use sec_common::config::ServiceConfig;
use serde::{Deserialize, Serialize};

const KIB: usize = 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Largest total size of an event's details (keys plus values, bytes) that is
    /// stored; a larger event is dead-lettered as `too_large`. Also bounds the payload
    /// bytes kept per row of `dead_letters`. 1 KiB ..= 1 MiB.
    pub max_details_bytes: usize,
    /// How often the chain's head is signed in a checkpoint (when it moved), seconds.
    /// Records appended since the newest checkpoint are the ones a holder of the
    /// database credentials could still forge unnoticed: keep it short. 5 ..= 3600.
    pub checkpoint_interval_seconds: u64,
    /// Detail fields stored as keyed HMACs (`details.<key>`), never in plain text: they
    /// can be matched exactly in searches but not read. At most 32.
    pub sensitive_fields: Vec<String>,
    /// `[audit.retention]`: how long events are kept, partitions, export.
    pub retention: crate::retention::RetentionConfig,
    /// `[audit.alerts]`: threshold rules and webhooks (see `docs/alerts.md`).
    pub alerts: crate::alerts::AlertsConfig,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            max_details_bytes: 16 * KIB,
            checkpoint_interval_seconds: 60,
            sensitive_fields: vec!["details.username".into(), "details.email".into()],
            retention: crate::retention::RetentionConfig::default(),
            alerts: crate::alerts::AlertsConfig::default(),
        }
    }
}

impl ServiceConfig for AuditConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if !(KIB..=KIB * KIB).contains(&self.max_details_bytes) {
            return Err((
                "max_details_bytes".into(),
                "must be between 1024 (1 KiB) and 1048576 (1 MiB)".into(),
            ));
        }
        if !(5..=3600).contains(&self.checkpoint_interval_seconds) {
            return Err((
                "checkpoint_interval_seconds".into(),
                "must be between 5 and 3600".into(),
            ));
        }
        if self.sensitive_fields.len() > MAX_SENSITIVE_FIELDS {
            return Err((
                "sensitive_fields".into(),
                format!("at most {MAX_SENSITIVE_FIELDS} fields"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.sensitive_fields {
            let key = f
                .strip_prefix(crate::sensitive::DETAILS_PREFIX)
                .filter(|k| {
                    (1..=64).contains(&k.len())
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                })
                .ok_or_else(|| {
                    (
                        "sensitive_fields".to_owned(),
                        format!(
                            "`{f}` is not `details.<key>` with a key of 1 to 64 characters [A-Za-z0-9_.-]"
                        ),
                    )
                })?;
            if !seen.insert(key) {
                return Err(("sensitive_fields".into(), format!("`{f}` is listed twice")));
            }
        }
        self.retention.validate()?;
        self.alerts
            .validate()
            .map_err(|(k, m)| (format!("alerts.{k}"), m))?;
        Ok(())
    }
}

/// Most `sensitive_fields`.
const MAX_SENSITIVE_FIELDS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated() {
        assert_eq!(AuditConfig::default().max_details_bytes, 16 * 1024);
        assert!(AuditConfig::default().validate().is_ok());
        for ok in [1024, 1024 * 1024] {
            assert!(
                AuditConfig {
                    max_details_bytes: ok,
                    ..AuditConfig::default()
                }
                .validate()
                .is_ok()
            );
        }
        for bad in [0, 1023, 1024 * 1024 + 1] {
            let (key, _) = AuditConfig {
                max_details_bytes: bad,
                ..AuditConfig::default()
            }
            .validate()
            .unwrap_err();
            assert_eq!(key, "max_details_bytes");
        }
        for bad in [0, 4, 3601] {
            let (key, _) = AuditConfig {
                checkpoint_interval_seconds: bad,
                ..AuditConfig::default()
            }
            .validate()
            .unwrap_err();
            assert_eq!(key, "checkpoint_interval_seconds");
        }
    }

    #[test]
    fn sensitive_fields_are_detail_keys() {
        let with = |f: &[&str]| AuditConfig {
            sensitive_fields: f.iter().map(|s| (*s).to_owned()).collect(),
            ..AuditConfig::default()
        };
        assert!(with(&[]).validate().is_ok());
        assert!(
            with(&["details.email", "details.phone-number"])
                .validate()
                .is_ok()
        );
        for bad in [
            &["email"][..],
            &["actor_id"],
            &["details."],
            &["details.a b"],
            &["details.email", "details.email"],
        ] {
            let (key, msg) = with(bad).validate().unwrap_err();
            assert_eq!(key, "sensitive_fields", "{bad:?}");
            assert!(!msg.is_empty());
        }
        let many: Vec<String> = (0..33).map(|i| format!("details.f{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(with(&refs).validate().is_err());
    }

    #[test]
    fn section_is_read_from_toml_and_env() {
        let specs = [&crate::SPEC];
        let vars: std::collections::BTreeMap<String, String> =
            [("SEC_AUDIT__MAX_DETAILS_BYTES".to_owned(), "4096".to_owned())]
                .into_iter()
                .collect();
        let cfg = sec_common::spec::load_config(None, &vars, &specs).unwrap();
        assert_eq!(
            cfg.section::<AuditConfig>("audit")
                .unwrap()
                .max_details_bytes,
            4096
        );
        let vars: std::collections::BTreeMap<String, String> =
            [("SEC_AUDIT__MAX_DETAILS_BYTES".to_owned(), "10".to_owned())]
                .into_iter()
                .collect();
        let err = sec_common::spec::load_config(None, &vars, &specs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit.max_details_bytes"), "{err}");
    }
}
