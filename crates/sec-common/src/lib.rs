//! Shared runtime pieces of every platform service: configuration, telemetry, shutdown,
//! health and metrics, error codes, the injectable clock, the event bus, storage
//! bootstrap, TLS and caller authentication. Deliberately lean: no service logic here.

/// The allocator of every binary that links the platform (services, `secd`, `secctl`,
/// tests): glibc's malloc and free were a sixth of the CPU of a token grant under load
/// (perf during `scripts/bench-auth.sh`); mimalloc raised the grant's throughput by a fifth.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod auth;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod error;
pub mod events;
pub mod fsutil;
pub mod grpc;
pub mod jwt;
pub mod password;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod spec;
pub mod storage;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod verifier;
