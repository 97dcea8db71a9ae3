//! Edge protection for the platform's HTTP facade and its gRPC check API:
//! rate limits (GCRA on Redis or in-process through governor), IP allow/deny lists on a
//! prefix table, client IP resolution behind trusted proxies, and a tower layer that
//! applies them; runtime rules and lists shared through the host's database, geolocation,
//! automatic blocks and events ([`EdgeRuntime`]). A library: no ports, no service spec.
//! See README.md.

pub mod client_ip;
pub mod geo;
pub mod grpc;
pub mod ip;
pub mod layer;
pub mod limiter;
pub mod rules;
pub mod runtime;
pub mod store;

pub use client_ip::ClientIpResolver;
pub use geo::{GeoConfig, GeoControl, GeoPolicy};
pub use grpc::{ACCESS, EdgeGrpc};
pub use ip::{IpControl, IpListsConfig, IpTables};
pub use layer::{EdgeIdentity, EdgeLayer, EdgeState};
pub use limiter::{CheckRequest, Decision, EdgeMetrics, Limiter, LimiterOptions};
pub use rules::{RuleSet, RulesConfig, StoreKind};
pub use runtime::{EdgeConfig, EdgeDeps, EdgeRuntime, EmitFn, FailureReason};
pub use store::EdgeStore;
