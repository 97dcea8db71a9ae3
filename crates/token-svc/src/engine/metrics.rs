//! Prometheus metrics. Every label comes from a closed set (token kind, reason), never
//! from a caller's string.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use sec_common::clock::SharedClock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug)]
pub struct TokenMetrics {
    issued: Family<KindLabel, Counter>,
    pub(crate) validated: Counter,
    rejected: Family<ReasonLabel, Counter>,
    pub(crate) rotations: Counter,
    active_families: Gauge,
    rotation_interval: Gauge,
    key_age: SigningKeyAge,
}

/// `sec_token_signing_key_age_seconds`, computed at each scrape: the clock's now minus
/// the activation time of the key this replica signs with (as its ring last loaded it,
/// so a replica that missed another's rotation shows the old key's age). No sample
/// before the engine has a current key.
#[derive(Clone, Default)]
struct SigningKeyAge(Arc<Mutex<KeyAgeState>>);

#[derive(Default)]
struct KeyAgeState {
    clock: Option<SharedClock>,
    activated_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for SigningKeyAge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyAge").finish_non_exhaustive()
    }
}

impl SigningKeyAge {
    fn state(&self) -> std::sync::MutexGuard<'_, KeyAgeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn seconds(&self) -> Option<f64> {
        let s = self.state();
        let (clock, at) = (s.clock.as_ref()?, s.activated_at?);
        let age = (clock.now() - at).num_milliseconds().max(0);
        // Milliseconds since activation: exact in an f64 for far longer than any key lives.
        Some(age as f64 / 1000.0)
    }
}

impl Collector for SigningKeyAge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(age) = self.seconds() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(age);
        let m = encoder.encode_descriptor(
            "sec_token_signing_key_age_seconds",
            "Time since the signing key in use was activated (alert when above 1.5 x sec_token_signing_key_rotation_interval_seconds)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(m)
    }
}

impl TokenMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            issued: Family::default(),
            validated: Counter::default(),
            rejected: Family::default(),
            rotations: Counter::default(),
            active_families: Gauge::default(),
            rotation_interval: Gauge::default(),
            key_age: SigningKeyAge::default(),
        };
        registry.register(
            "sec_token_issued",
            "Tokens issued by kind (access, id, refresh)",
            m.issued.clone(),
        );
        registry.register(
            "sec_token_validated",
            "Tokens found valid",
            m.validated.clone(),
        );
        registry.register(
            "sec_token_rejected",
            "Tokens found invalid, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "sec_token_signing_key_rotations",
            "Signing-key rotations (automatic and on demand)",
            m.rotations.clone(),
        );
        registry.register(
            "sec_token_active_refresh_families",
            "Refresh-token families with a usable token (updated by the cleanup loop)",
            m.active_families.clone(),
        );
        registry.register(
            "sec_token_signing_key_rotation_interval_seconds",
            "Configured signing-key rotation period (token.rotation_period_seconds)",
            m.rotation_interval.clone(),
        );
        registry.register_collector(Box::new(m.key_age.clone()));
        m
    }

    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    pub(crate) fn issued(&self, kind: &'static str) {
        self.issued.get_or_create(&KindLabel { kind }).inc();
    }

    pub(crate) fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// What the key-age and interval gauges need from the engine's configuration.
    pub(crate) fn bind(&self, clock: SharedClock, rotation_period_seconds: u64) {
        self.key_age.state().clock = Some(clock);
        self.rotation_interval
            .set(i64::try_from(rotation_period_seconds).unwrap_or(i64::MAX));
    }

    /// The activation time of the key now signing (`None`: no current key).
    pub(crate) fn set_signing_key_activated(&self, at: Option<DateTime<Utc>>) {
        self.key_age.state().activated_at = at;
    }

    /// The age `sec_token_signing_key_age_seconds` reports now, if any.
    pub fn signing_key_age_seconds(&self) -> Option<f64> {
        self.key_age.seconds()
    }

    pub(crate) fn set_active_families(&self, n: u64) {
        self.active_families
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
