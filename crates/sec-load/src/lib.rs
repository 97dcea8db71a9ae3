//! End-to-end load generator: starts the whole platform in-process on loopback port 0
//! (the same `secd::run_all` the launcher and the test harness use), drives registered
//! [`scenarios`] with concurrent workers, and reports throughput and latency percentiles.
//!
//! Adding a scenario: one module in `src/scenarios/` implementing [`Scenario`], plus one
//! line in [`scenarios::all`].

pub mod platform;
pub mod report;
pub mod runner;
pub mod scenarios;

pub use platform::{Backends, Target};
pub use runner::{RunParams, ScenarioResult};
pub use scenarios::Scenario;
