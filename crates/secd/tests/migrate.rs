//! Every service of `secd::SERVICES` carries its migrations in its SPEC, so `<name>-svc
//! migrate` has something to run: on a fresh SQLite data directory the first run applies
//! every migration of every service, the second none, and the services then start on
//! what it made (their own start applies nothing new).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;

use sec_common::service::migrate;

#[tokio::test]
async fn every_service_migrates_on_sqlite_once_then_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let env: BTreeMap<String, String> = [(
        "SEC_DATA_DIR".to_owned(),
        dir.path().to_str().unwrap().to_owned(),
    )]
    .into();
    let config = sec_common::spec::load_config(None, &env, secd::SERVICES).unwrap();
    for spec in secd::SERVICES {
        let m = spec
            .migrations
            .unwrap_or_else(|| panic!("{}: SPEC.migrations is not set", spec.name));
        let ups = m
            .sqlite
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .count();
        assert!(ups > 0, "{}", spec.name);

        let first = migrate(spec, &config).await.unwrap().unwrap();
        assert_eq!(
            (first.applied.len(), first.already_applied),
            (ups, 0),
            "{first}"
        );
        assert!(
            first.target.ends_with(&format!("{}.db", spec.name)),
            "{first}"
        );
        let second = migrate(spec, &config).await.unwrap().unwrap();
        assert_eq!(
            (second.applied.len(), second.already_applied),
            (0, ups),
            "{second}"
        );
        // What the service opens at start finds every migration applied.
        let db = sec_common::storage::connect_db(&config, spec.name, m)
            .await
            .unwrap();
        let third = migrate(spec, &config).await.unwrap().unwrap();
        assert!(third.applied.is_empty(), "{third}");
        db.close().await;
    }
}
