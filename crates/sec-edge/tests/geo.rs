//! Geolocation on real MaxMind-format files written by the PyPI `mmdb-writer` package
//! (`scripts/edge-geo-testdb.py`, installed under `target/`): country allow/deny per
//! scope, the unknown-country policy, reload when the file changes, and a bad new file
//! keeping the old one. Without python3/pip the test skips loudly, and fails under
//! `SEC_TEST_INTEROP=required` (as CI sets it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default
)] // test code

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use prometheus_client::registry::Registry;
use sec_edge::geo::{CountryLists, GeoConfig, GeoControl, GeoPolicy};
use sec_edge::ip::BlockReason;

fn interop_skipped(what: &str) {
    assert!(
        std::env::var("SEC_TEST_INTEROP").as_deref() != Ok("required"),
        "{what}, and SEC_TEST_INTEROP=required"
    );
    sec_testkit::skipped(what);
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// The `mmdb-writer` install, or `None` (skipped) without python3/pip.
fn pyenv() -> Option<PathBuf> {
    // The tests of this file run in parallel threads: one installs, the others wait
    // (two concurrent `pip install --target` into one directory collide).
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let py = target_dir().join("pyenv-geo");
    if py.join("mmdb_writer").exists() {
        return Some(py);
    }
    let ok = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&py)
        .arg("mmdb-writer>=0.2,<0.3")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        interop_skipped("geolocation tests (python3 -m pip install mmdb-writer failed)");
        return None;
    }
    Some(py)
}

fn write_db(py: &Path, out: &Path, entries: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/edge-geo-testdb.py");
    let st = Command::new("python3")
        .arg(script)
        .arg(out)
        .args(entries)
        .env("PYTHONPATH", py)
        .status()
        .unwrap();
    assert!(st.success(), "edge-geo-testdb.py failed");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn country_rules_unknown_policy_and_reload_on_real_mmdb_files() {
    let Some(py) = pyenv() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("sec-edge-geo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("country.mmdb");
    write_db(
        &py,
        &db,
        &[
            "81.2.69.0/24=GB",
            "89.160.20.0/24=SE",
            "2001:db8::/32=DE",
            "203.0.113.0/24=KP",
            "192.0.2.0/24=-",
        ],
    );
    let mut reg = Registry::default();
    let cfg = GeoConfig {
        database: Some(db.clone()),
        unknown: GeoPolicy::Deny,
        deny: vec!["KP".into()],
        clients: [(
            "eu-app".to_owned(),
            CountryLists {
                allow: vec!["SE".into(), "DE".into()],
                deny: vec![],
            },
        )]
        .into(),
        routes: [(
            "/admin".to_owned(),
            CountryLists {
                allow: vec!["GB".into()],
                deny: vec![],
            },
        )]
        .into(),
        ..GeoConfig::default()
    };
    let g = GeoControl::start(&cfg, &mut reg).unwrap().unwrap();
    assert!(!g.degraded());
    assert_eq!(g.country(ip("81.2.69.10")).as_deref(), Some("GB"));
    assert_eq!(g.country(ip("2001:db8::1")).as_deref(), Some("DE"));
    // IPv4-mapped IPv6 is looked up as IPv4.
    assert_eq!(g.country(ip("::ffff:89.160.20.5")).as_deref(), Some("SE"));

    // Global deny.
    assert_eq!(
        g.check(ip("203.0.113.5"), None, "/"),
        Err(BlockReason::Country)
    );
    assert_eq!(g.check(ip("81.2.69.10"), None, "/"), Ok(()));
    // Per client allow list.
    assert_eq!(g.check(ip("89.160.20.5"), Some("eu-app"), "/"), Ok(()));
    assert_eq!(g.check(ip("2001:db8::1"), Some("eu-app"), "/"), Ok(()));
    assert_eq!(
        g.check(ip("81.2.69.10"), Some("eu-app"), "/"),
        Err(BlockReason::Country)
    );
    // Per route allow list.
    assert_eq!(g.check(ip("81.2.69.10"), None, "/admin"), Ok(()));
    assert_eq!(
        g.check(ip("89.160.20.5"), None, "/admin"),
        Err(BlockReason::Country)
    );
    // Unknown: a record without a country, and an address with no record at all.
    assert_eq!(
        g.check(ip("192.0.2.1"), None, "/"),
        Err(BlockReason::Country)
    );
    assert_eq!(
        g.check(ip("198.18.0.1"), None, "/"),
        Err(BlockReason::Country)
    );
    let lenient = GeoControl::start(
        &GeoConfig {
            unknown: GeoPolicy::Allow,
            ..cfg.clone()
        },
        &mut reg,
    )
    .unwrap()
    .unwrap();
    assert_eq!(lenient.check(ip("198.18.0.1"), None, "/"), Ok(()));

    // The file changes: the new mapping applies without a restart.
    assert!(!g.reload_if_changed(), "unchanged file: no reload");
    let next = dir.join("next.mmdb");
    write_db(&py, &next, &["81.2.69.0/24=KP", "89.160.20.0/24=SE"]);
    std::fs::rename(&next, &db).unwrap();
    assert!(g.reload_if_changed());
    assert_eq!(
        g.check(ip("81.2.69.10"), None, "/"),
        Err(BlockReason::Country)
    );

    // A corrupt replacement keeps the previous database.
    std::fs::write(&db, b"truncated download").unwrap();
    assert!(!g.reload_if_changed());
    assert!(!g.degraded());
    assert_eq!(g.country(ip("81.2.69.10")).as_deref(), Some("KP"));
}

#[test]
fn a_degraded_start_recovers_when_a_good_file_appears() {
    let Some(py) = pyenv() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("sec-edge-geo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("country.mmdb");
    let mut reg = Registry::default();
    let g = GeoControl::start(
        &GeoConfig {
            database: Some(db.clone()),
            degraded: Some(GeoPolicy::Deny),
            allow: vec!["SE".into()],
            ..GeoConfig::default()
        },
        &mut reg,
    )
    .unwrap()
    .unwrap();
    assert!(g.degraded());
    assert_eq!(
        g.check(ip("89.160.20.5"), None, "/"),
        Err(BlockReason::Country)
    );
    write_db(&py, &db, &["89.160.20.0/24=SE"]);
    assert!(g.reload_if_changed());
    assert!(!g.degraded());
    assert_eq!(g.check(ip("89.160.20.5"), None, "/"), Ok(()));
}
