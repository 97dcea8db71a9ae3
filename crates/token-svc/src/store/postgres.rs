//! PostgreSQL store: the shared implementation over a PostgreSQL pool. Compare-and-set
//! updates rely on row locks: of two concurrent `UPDATE … WHERE rotated_at IS NULL`, the
//! second re-checks its condition after the first commits and matches nothing.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{
    KeyRow, KeyState, RefreshRow, RevocationKind, RevocationRow, StoreError, TokenStore,
    impl_store, is_unique_violation, opt_time, time_from_us, time_to_us,
};

#[derive(Debug, Clone)]
pub struct PgTokenStore {
    pool: PgPool,
}

impl PgTokenStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl_store!(PgTokenStore, sqlx::postgres::PgRow);

#[cfg(test)]
mod tests {
    use super::*;
    use sec_testkit::{Backend, backend_url};

    #[tokio::test]
    async fn contract_postgres() {
        let Some(url) = backend_url(Backend::Postgres) else {
            return;
        };
        let schema = format!("token_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 20)
            .await
            .unwrap();
        sqlx::migrate!("../../migrations/token/postgres")
            .run(&pool)
            .await
            .unwrap();
        super::super::contract::run(std::sync::Arc::new(PgTokenStore::new(pool.clone()))).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
