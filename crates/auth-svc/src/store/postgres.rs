//! PostgreSQL: the shared SQL of [`super`] on a `PgPool`.

use sqlx::PgPool;

pub struct PgAuthStore {
    #[allow(dead_code)]
    pool: PgPool,
}

impl PgAuthStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}
