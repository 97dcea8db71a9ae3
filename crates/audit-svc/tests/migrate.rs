//! `audit-svc migrate` (the command every service binary shares, `sec_common::service`):
//! applies the service's migrations and says so, applies nothing the second time, exits
//! 64 on a bad configuration and non-zero when the database fails; on SQLite, and on
//! PostgreSQL when one is reachable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_audit-svc");

/// `audit-svc migrate` with `env` on a clean `SEC_*` environment.
fn migrate(env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("migrate");
    for (k, _) in std::env::vars() {
        if k.starts_with("SEC_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The versions of audit-svc's migrations for one backend, from their file names.
fn migration_versions(backend: &str) -> Vec<i64> {
    let dir = format!(
        "{}/../../migrations/audit/{backend}",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut v: Vec<i64> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .map(|n| n.split('_').next().unwrap().parse().unwrap())
        .collect();
    v.sort_unstable();
    v
}

/// Runs it twice with `env`: the first applies every migration, the second none.
fn twice(env: &[(&str, &str)], backend: &str, target: &str) {
    let versions = migration_versions(backend);
    assert!(!versions.is_empty());
    let first = migrate(env);
    let out = text(&first.stdout);
    assert_eq!(first.status.code(), Some(0), "{out}{}", text(&first.stderr));
    for v in &versions {
        assert!(
            out.contains(&format!("audit: applied migration {v} ")),
            "{out}"
        );
    }
    assert!(
        out.contains(&format!(
            "audit: {target}: {} migrations applied now, 0 before",
            versions.len()
        )),
        "{out}"
    );

    let second = migrate(env);
    let out = text(&second.stdout);
    assert_eq!(
        second.status.code(),
        Some(0),
        "{out}{}",
        text(&second.stderr)
    );
    assert!(!out.contains("applied migration"), "{out}");
    assert!(
        out.contains(&format!(
            "audit: {target} is up to date ({} migrations already applied)",
            versions.len()
        )),
        "{out}"
    );
}

#[test]
fn migrate_on_sqlite_applies_everything_once_then_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let db = format!("{data}/audit.db");
    twice(&[("SEC_DATA_DIR", data)], "sqlite", &format!("SQLite {db}"));
    // The file the service itself opens at start.
    assert!(std::path::Path::new(&db).is_file());
}

#[test]
fn migrate_refuses_a_bad_configuration_with_64_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = migrate(&[
        ("SEC_DATA_DIR", data.to_str().unwrap()),
        ("SEC_STORAGE__MAX_CONNECTIONS", "0"),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("storage.max_connections"), "{stderr}");
    assert!(!data.exists(), "nothing created");
}

#[test]
fn migrate_needs_only_the_database_not_what_serving_needs() {
    // TLS files that do not exist stop `serve` and `check-config` (preflight); migrating
    // does not read them, so a migration Job or init container needs the database alone.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = migrate(&[
        ("SEC_DATA_DIR", data.to_str().unwrap()),
        ("SEC_TLS__CERT_FILE", "/nonexistent/tls.crt"),
        ("SEC_TLS__KEY_FILE", "/nonexistent/tls.key"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn migrate_fails_non_zero_when_the_database_is_unreachable_without_echoing_the_url() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    drop(held); // nothing listens there now
    let url = format!("postgres://sec:s3cret-pw@127.0.0.1:{port}/sec");
    let out = migrate(&[("SEC_STORAGE__DATABASE_URL", &url)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("audit-svc migrate failed"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
}

#[test]
fn migrate_on_postgres_applies_everything_once_then_nothing() {
    let Some(url) = sec_testkit::backend_url(sec_testkit::Backend::Postgres) else {
        return;
    };
    let prefix = format!("m{}_", uuid::Uuid::new_v4().simple());
    let schema = format!("{prefix}audit");
    twice(
        &[
            ("SEC_STORAGE__DATABASE_URL", url.as_str()),
            ("SEC_STORAGE__POSTGRES_SCHEMA_PREFIX", prefix.as_str()),
        ],
        "postgres",
        &format!("PostgreSQL schema \"{schema}\""),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{schema}\"._sqlx_migrations WHERE success"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            usize::try_from(applied).unwrap(),
            migration_versions("postgres").len()
        );
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{schema}\" CASCADE"
        )))
        .execute(&pool)
        .await
        .unwrap();
    });
}
