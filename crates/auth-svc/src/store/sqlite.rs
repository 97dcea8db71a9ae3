//! SQLite (the embedded default): the shared SQL of [`super`] on a `SqlitePool`. SQLite
//! serialises writers, so a conditional `UPDATE` sees the winner's commit; the pool's busy
//! timeout makes a waiting writer wait instead of failing.

use sqlx::SqlitePool;

use super::{
    AuthStore, ClientRow, CodeRow, CodeUse, ConsentRow, StoreError, UserRow, UserStatus, conflict,
    fold_case, from_json, impl_store, like_prefix, scopes_text, to_json,
};

#[derive(Debug, Clone)]
pub struct SqliteAuthStore {
    pool: SqlitePool,
}

impl SqliteAuthStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

impl_store!(
    SqliteAuthStore,
    sqlx::sqlite::SqliteRow,
    "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn contract_sqlite() {
        let path = std::env::temp_dir().join(format!("auth-store-{}.db", uuid::Uuid::new_v4()));
        let pool = sec_common::storage::connect_sqlite(&path, 4).await.unwrap();
        sqlx::migrate!("../../migrations/auth/sqlite")
            .run(&pool)
            .await
            .unwrap();
        super::super::contract::run(std::sync::Arc::new(SqliteAuthStore::new(pool.clone()))).await;
        pool.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
