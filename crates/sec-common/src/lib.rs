//! Shared runtime pieces of every platform service: configuration, telemetry, shutdown,
//! health and metrics, error codes, the injectable clock, the event bus, storage
//! bootstrap, TLS and caller authentication. Deliberately lean: no service logic here.

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
