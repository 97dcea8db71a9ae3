//! Test support shared by every crate's backend suites: a dev-dependency only, so none
//! of it can reach a production binary.
//!
//! Backend URLs come from `SEC_TEST_DATABASE_URL`, `SEC_TEST_REDIS_URL` and
//! `SEC_TEST_NATS_URL`, defaulting to the local servers. When `SEC_TEST_BACKENDS=required`
//! an unreachable backend fails the test; otherwise the suite is skipped with a loud line
//! on stderr naming it.

use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Redis,
    Nats,
}

impl Backend {
    fn var(self) -> &'static str {
        match self {
            Backend::Postgres => "SEC_TEST_DATABASE_URL",
            Backend::Redis => "SEC_TEST_REDIS_URL",
            Backend::Nats => "SEC_TEST_NATS_URL",
        }
    }

    fn default_url(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres://postgres@127.0.0.1:5432/test",
            Backend::Redis => "redis://127.0.0.1:6379/",
            Backend::Nats => "nats://127.0.0.1:4222",
        }
    }
}

/// Whether `SEC_TEST_BACKENDS=required` is set.
pub fn backends_required() -> bool {
    std::env::var("SEC_TEST_BACKENDS").is_ok_and(|v| v == "required")
}

/// The backend's URL if it answers on TCP. If it does not: `None` after printing a SKIP
/// line, or a test failure when backends are required.
#[allow(clippy::panic)] // test support: failing the test is the point
#[track_caller]
pub fn backend_url(backend: Backend) -> Option<String> {
    let url = std::env::var(backend.var()).unwrap_or_else(|_| backend.default_url().to_owned());
    if reachable(&url) {
        return Some(url);
    }
    let caller = std::panic::Location::caller();
    if backends_required() {
        panic!(
            "{backend:?} is required (SEC_TEST_BACKENDS=required) but not reachable at {} ({})",
            host_port(&url).unwrap_or_default(),
            backend.var()
        );
    }
    skipped(&format!(
        "backend suite at {}:{}: {backend:?} not reachable ({}); set {} or start it, \
         and SEC_TEST_BACKENDS=required to make this a failure",
        caller.file(),
        caller.line(),
        host_port(&url).unwrap_or_default(),
        backend.var()
    ));
    None
}

/// Prints `*** SKIPPED <what> ***` where `make test` shows it: straight to the process's
/// stderr, which the test harness does not capture (`eprintln!` in a passing test is).
pub fn skipped(what: &str) {
    let line = format!("\n*** SKIPPED {what} ***\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Runs a service binary with `env` on top of a clean `SEC_*` environment, its gRPC port
/// set to one this test holds, and asserts it refused its configuration before binding
/// anything: exit 64 (a bind attempt would have failed with "address in use" and exit 1)
/// with `key` named on stderr, and no secret value of `env` echoed.
#[allow(clippy::panic)] // test support: failing the test is the point
#[track_caller]
pub fn assert_config_error(
    bin: &str,
    args: &[&str],
    service: &str,
    env: &[(&str, &str)],
    key: &str,
) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = held.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let data = std::env::temp_dir().join(format!("sec-cfg-{}-{}", std::process::id(), port));
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SEC_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SEC_DATA_DIR", &data)
        .env(
            format!("SEC_SERVICES__{}__GRPC_ADDR", service.to_uppercase()),
            &port,
        )
        .env("SEC_FACADE__HTTP_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let _ = std::fs::remove_dir_all(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{bin} {args:?} with {env:?}: expected exit 64 before binding; stderr: {stderr}"
    );
    assert!(stderr.contains(key), "stderr must name `{key}`: {stderr}");
    drop(held);
}

fn host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    Some(rest.split(['/', '?']).next()?.to_owned())
}

fn reachable(url: &str) -> bool {
    let Some(hp) = host_port(url) else {
        return false;
    };
    let Ok(mut addrs) = hp.to_socket_addrs() else {
        return false;
    };
    addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_strips_credentials() {
        assert_eq!(
            host_port("postgres://u:p@db:5432/x?sslmode=require").unwrap(),
            "db:5432"
        );
        assert_eq!(
            host_port("nats://127.0.0.1:4222").unwrap(),
            "127.0.0.1:4222"
        );
    }
}
