//! SQLite: the shared SQL of [`super`] on a `SqlitePool`.

use sqlx::SqlitePool;

pub struct SqliteAuthStore {
    #[allow(dead_code)]
    pool: SqlitePool,
}

impl SqliteAuthStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}
