//! The scenario registry. A scenario is a type implementing [`Scenario`] in its own
//! module here, listed once in [`all`]. See `grpc_health_check.rs` for the template.

use std::future::Future;
use std::pin::Pin;

use crate::platform::Target;
use crate::runner::{self, RunParams, ScenarioResult};

pub mod admin_bogus_token_flood;
pub mod audit_list_events;
pub mod crypto_encrypt_decrypt;
pub mod grpc_health_check;
pub mod session_get;
pub mod token;

/// One kind of request to put under load.
pub trait Scenario: 'static {
    /// What every worker calls with: usually a tonic client (cloning shares its channel).
    type Client: Clone + Send + 'static;
    /// Name on the command line (`--scenario NAME`) and in the report.
    const NAME: &'static str;
    /// One line for `--list`.
    const ABOUT: &'static str;

    /// Runs once before the load: builds the client, seeds data the calls need.
    fn setup(target: &Target) -> impl Future<Output = anyhow::Result<Self::Client>> + Send;

    /// One request; an `Err` counts as an error in the report.
    fn call(client: &mut Self::Client) -> impl Future<Output = anyhow::Result<()>> + Send;
}

type RunFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<ScenarioResult>> + Send + 'a>>;

/// A registered scenario, type-erased.
#[derive(Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub about: &'static str,
    pub run: for<'a> fn(&'a Target, &'a RunParams) -> RunFuture<'a>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

fn run_boxed<'a, S: Scenario>(target: &'a Target, params: &'a RunParams) -> RunFuture<'a> {
    Box::pin(runner::run::<S>(target, params))
}

/// The registry entry of `S`.
pub fn entry<S: Scenario>() -> Entry {
    Entry {
        name: S::NAME,
        about: S::ABOUT,
        run: run_boxed::<S>,
    }
}

/// Every scenario, in the order they run by default.
pub fn all() -> Vec<Entry> {
    vec![
        entry::<grpc_health_check::GrpcHealthCheck>(),
        entry::<audit_list_events::AuditListEvents>(),
        entry::<crypto_encrypt_decrypt::CryptoEncryptDecrypt>(),
        entry::<admin_bogus_token_flood::AdminListKeys>(),
        entry::<admin_bogus_token_flood::AdminListKeysUnderBogusFlood>(),
        entry::<token::TokenIssue>(),
        entry::<token::TokenValidate>(),
        entry::<session_get::SessionGet>(),
    ]
}
