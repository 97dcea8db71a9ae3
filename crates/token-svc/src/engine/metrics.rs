//! Prometheus metrics. Every label comes from a closed set (token kind, reason), never
//! from a caller's string.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
}

impl TokenMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            issued: Family::default(),
            validated: Counter::default(),
            rejected: Family::default(),
            rotations: Counter::default(),
            active_families: Gauge::default(),
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

    pub(crate) fn set_active_families(&self, n: u64) {
        self.active_families
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
