//! SQLite store (the embedded default): the shared implementation over a SQLite pool.
//! Every write transaction starts with its write, so SQLite serialises them and a
//! waiting writer never fails on a stale snapshot.

use chrono::{DateTime, Utc};
use sqlx::SqlitePool;

use super::{
    KeyRow, KeyState, RefreshRow, RevocationKind, RevocationRow, StoreError, TokenStore,
    impl_store, is_unique_violation, opt_time, time_from_us, time_to_us,
};

#[derive(Debug, Clone)]
pub struct SqliteTokenStore {
    pool: SqlitePool,
}

impl SqliteTokenStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

impl_store!(SqliteTokenStore, sqlx::sqlite::SqliteRow);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contract_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let pool = sec_common::storage::connect_sqlite(&dir.path().join("token.db"), 4)
            .await
            .unwrap();
        sqlx::migrate!("../../migrations/token/sqlite")
            .run(&pool)
            .await
            .unwrap();
        super::super::contract::run(std::sync::Arc::new(SqliteTokenStore::new(pool))).await;
    }
}
