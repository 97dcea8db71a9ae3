//! PostgreSQL: the shared SQL of [`super`] on a `PgPool`. Compare-and-set updates rely on
//! row locks: of two concurrent `UPDATE … WHERE version = $n` (or `used_us IS NULL`), the
//! second re-checks its condition after the first commits and matches nothing.

use sqlx::PgPool;

use super::{
    AuthStore, ClientRow, CodeRow, CodeUse, ConsentRow, StoreError, UserRow, UserStatus, conflict,
    fold_case, from_json, impl_store, like_prefix, scopes_text, to_json,
};

#[derive(Debug, Clone)]
pub struct PgAuthStore {
    pool: PgPool,
}

impl PgAuthStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl_store!(
    PgAuthStore,
    sqlx::postgres::PgRow,
    "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT"
);

#[cfg(test)]
mod tests {
    use super::*;
    use sec_testkit::{Backend, backend_url};

    /// The contract suite on a scratch schema; skipped with a printed line when PostgreSQL
    /// is not reachable, a failure when `SEC_TEST_BACKENDS=required`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn contract_postgres() {
        let Some(url) = backend_url(Backend::Postgres) else {
            return;
        };
        let schema = format!("auth_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 20)
            .await
            .unwrap();
        sqlx::migrate!("../../migrations/auth/postgres")
            .run(&pool)
            .await
            .unwrap();
        super::super::contract::run(std::sync::Arc::new(PgAuthStore::new(pool.clone()))).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
