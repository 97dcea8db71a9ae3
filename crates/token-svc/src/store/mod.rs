//! Where signing keys, refresh tokens and revocation records live: one trait, a
//! PostgreSQL and a SQLite implementation, and one contract suite ([`contract::run`])
//! both must pass.
//!
//! Both backends store times as unix microseconds and use the same SQL (`$n`
//! placeholders work on both), so one macro ([`impl_store!`]) writes both
//! implementations; `postgres.rs` and `sqlite.rs` instantiate it for their pool.
//! Every read-modify-write is one conditional `UPDATE` (compare-and-set) inside a
//! transaction that starts with its write.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A unique constraint refused the write (another replica won a race).
    #[error("row already exists")]
    Conflict,
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    Next,
    Current,
    Retiring,
    Retired,
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Current => "current",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "next" => KeyState::Next,
            "current" => KeyState::Current,
            "retiring" => KeyState::Retiring,
            "retired" => KeyState::Retired,
            "revoked" => KeyState::Revoked,
            _ => return None,
        })
    }

    /// In the JWKS.
    pub fn published(self) -> bool {
        matches!(
            self,
            KeyState::Next | KeyState::Current | KeyState::Retiring
        )
    }
}

/// A signing key; its private key only sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub kid: String,
    pub alg: String,
    pub state: KeyState,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub unpublish_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub public_key: Vec<u8>,
    pub public_jwk: String,
    pub sealed_private: Vec<u8>,
}

/// One refresh token of a family (`token_type = 'refresh'`). Every token of a family
/// shares the family's absolute expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRow {
    pub id: String,
    /// SHA-256 of the token.
    pub token_hash: Vec<u8>,
    pub family_id: String,
    pub parent_id: Option<String>,
    pub user_id: String,
    pub client_id: String,
    pub scope: String,
    /// The grant (audience, auth_time, acr, amr, sid, extra claims) as JSON.
    pub grant_json: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub successor_id: Option<String>,
    pub is_revoked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationKind {
    Jti,
    Subject,
    Client,
    SigningKey,
}

impl RevocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Jti => "jti",
            RevocationKind::Subject => "subject",
            RevocationKind::Client => "client",
            RevocationKind::SigningKey => "signing_key",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "jti" => RevocationKind::Jti,
            "subject" => RevocationKind::Subject,
            "client" => RevocationKind::Client,
            "signing_key" => RevocationKind::SigningKey,
            _ => return None,
        })
    }
}

/// A revocation record (`token_type = 'revocation'`), kept until `expires_at`, when
/// every token it could apply to has expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRow {
    pub id: String,
    pub kind: RevocationKind,
    /// The jti, subject, client id or kid.
    pub target: String,
    pub expires_at: DateTime<Utc>,
    /// Subject / client: tokens issued at or before this are revoked.
    pub not_before: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// `Conflict` if the kid exists or the state's slot (one current, one next) is taken.
    async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError>;
    /// Every key, oldest first.
    async fn keys(&self) -> Result<Vec<KeyRow>, StoreError>;
    /// In one transaction, only if `next_kid` is still next and `current_kid` (when
    /// given) still current: next → current (activated now), current → retiring
    /// (deactivated now, unpublished at `unpublish_at`), and `new_next` inserted.
    /// False when another writer changed either row first.
    async fn promote(
        &self,
        next_kid: &str,
        current_kid: Option<&str>,
        new_next: &KeyRow,
        now: DateTime<Utc>,
        unpublish_at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// retiring → retired, only if still retiring.
    async fn retire_key(&self, kid: &str) -> Result<bool, StoreError>;
    /// Any state but revoked → revoked; the state it had, or `None` when unknown or
    /// already revoked.
    async fn revoke_key(
        &self,
        kid: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyState>, StoreError>;

    /// `Conflict` if the hash exists.
    async fn insert_refresh(&self, row: &RefreshRow) -> Result<(), StoreError>;
    async fn refresh_by_hash(&self, hash: &[u8]) -> Result<Option<RefreshRow>, StoreError>;
    /// Marks `id` rotated to `successor` and inserts it, only if `id` is neither rotated
    /// nor revoked (compare-and-set); false when another use won.
    async fn rotate_refresh(
        &self,
        id: &str,
        now: DateTime<Utc>,
        successor: &RefreshRow,
    ) -> Result<bool, StoreError>;
    /// Grace reissue: revokes `expected_successor` (only if it is unused and not revoked),
    /// points `id` at `replacement` and inserts it; false when the successor was used or
    /// replaced meanwhile.
    async fn regrace_refresh(
        &self,
        id: &str,
        expected_successor: &str,
        replacement: &RefreshRow,
    ) -> Result<bool, StoreError>;
    /// Revokes every token of the family; how many were not revoked yet.
    async fn revoke_family(&self, family_id: &str) -> Result<u64, StoreError>;
    /// Revokes every refresh token of a subject or of a client.
    async fn revoke_refresh_of(
        &self,
        kind: RevocationKind,
        target: &str,
    ) -> Result<u64, StoreError>;
    /// Families with a usable (unrotated, unrevoked, unexpired) token.
    async fn active_families(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    async fn insert_revocation(&self, row: &RevocationRow) -> Result<(), StoreError>;
    /// Revocations still in force at `now`, created at or after `since` (all when None),
    /// oldest first.
    async fn revocations(
        &self,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<RevocationRow>, StoreError>;
    /// Deletes refresh tokens and revocations expired at `now`.
    async fn cleanup(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

pub(crate) fn time_from_us(us: i64, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt(format!("{column} out of range")))
}

pub(crate) fn time_to_us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn opt_time(us: Option<i64>, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    us.map(|v| time_from_us(v, column)).transpose()
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Writes `impl TokenStore` for a store type holding `pool: $pool` whose rows are `$row`.
macro_rules! impl_store {
    ($store:ty, $row:ty) => {
        const KEY_COLS: &str = "kid, alg, state, created_at, activated_at, deactivated_at, \
             unpublish_at, revoked_at, public_key, public_jwk, sealed_private";
        const REFRESH_COLS: &str = "id, token_hash, family_id, parent_id, user_id, client_id, \
             scope, grant_json, created_at, expires_at, rotated_at, successor_id, is_revoked";
        const REVOCATION_COLS: &str =
            "id, revocation_kind, target, expires_at, not_before, created_at";

        fn key_from(r: &$row) -> Result<KeyRow, StoreError> {
            use sqlx::Row as _;
            let state: String = r.try_get("state")?;
            Ok(KeyRow {
                kid: r.try_get("kid")?,
                alg: r.try_get("alg")?,
                state: KeyState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt("key state".into()))?,
                created_at: time_from_us(r.try_get("created_at")?, "created_at")?,
                activated_at: opt_time(r.try_get("activated_at")?, "activated_at")?,
                deactivated_at: opt_time(r.try_get("deactivated_at")?, "deactivated_at")?,
                unpublish_at: opt_time(r.try_get("unpublish_at")?, "unpublish_at")?,
                revoked_at: opt_time(r.try_get("revoked_at")?, "revoked_at")?,
                public_key: r.try_get("public_key")?,
                public_jwk: r.try_get("public_jwk")?,
                sealed_private: r.try_get("sealed_private")?,
            })
        }

        fn refresh_from(r: &$row) -> Result<RefreshRow, StoreError> {
            use sqlx::Row as _;
            Ok(RefreshRow {
                id: r.try_get("id")?,
                token_hash: r
                    .try_get::<Option<Vec<u8>>, _>("token_hash")?
                    .unwrap_or_default(),
                family_id: r
                    .try_get::<Option<String>, _>("family_id")?
                    .unwrap_or_default(),
                parent_id: r.try_get("parent_id")?,
                user_id: r.try_get("user_id")?,
                client_id: r.try_get("client_id")?,
                scope: r.try_get("scope")?,
                grant_json: r.try_get("grant_json")?,
                created_at: time_from_us(r.try_get("created_at")?, "created_at")?,
                expires_at: time_from_us(r.try_get("expires_at")?, "expires_at")?,
                rotated_at: opt_time(r.try_get("rotated_at")?, "rotated_at")?,
                successor_id: r.try_get("successor_id")?,
                is_revoked: r.try_get("is_revoked")?,
            })
        }

        fn revocation_from(r: &$row) -> Result<RevocationRow, StoreError> {
            use sqlx::Row as _;
            let kind: Option<String> = r.try_get("revocation_kind")?;
            Ok(RevocationRow {
                id: r.try_get("id")?,
                kind: kind
                    .as_deref()
                    .and_then(RevocationKind::parse)
                    .ok_or_else(|| StoreError::Corrupt("revocation kind".into()))?,
                target: r
                    .try_get::<Option<String>, _>("target")?
                    .unwrap_or_default(),
                expires_at: time_from_us(r.try_get("expires_at")?, "expires_at")?,
                not_before: opt_time(r.try_get("not_before")?, "not_before")?,
                created_at: time_from_us(r.try_get("created_at")?, "created_at")?,
            })
        }

        fn conflict(e: sqlx::Error) -> StoreError {
            if is_unique_violation(&e) {
                StoreError::Conflict
            } else {
                StoreError::Db(e)
            }
        }

        async fn insert_refresh_in<'c, E>(ex: E, row: &RefreshRow) -> Result<(), StoreError>
        where
            E: sqlx::Executor<'c, Database = <$row as sqlx::Row>::Database>,
        {
            sqlx::query(
                "INSERT INTO security_tokens (id, token_type, token_hash, family_id, parent_id,
                   user_id, client_id, scope, grant_json, created_at, expires_at, rotated_at,
                   successor_id, is_revoked)
                 VALUES ($1, 'refresh', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(&row.id)
            .bind(&row.token_hash)
            .bind(&row.family_id)
            .bind(&row.parent_id)
            .bind(&row.user_id)
            .bind(&row.client_id)
            .bind(&row.scope)
            .bind(&row.grant_json)
            .bind(time_to_us(row.created_at))
            .bind(time_to_us(row.expires_at))
            .bind(row.rotated_at.map(time_to_us))
            .bind(&row.successor_id)
            .bind(row.is_revoked)
            .execute(ex)
            .await
            .map_err(conflict)?;
            Ok(())
        }

        async fn insert_key_in<'c, E>(ex: E, key: &KeyRow) -> Result<(), StoreError>
        where
            E: sqlx::Executor<'c, Database = <$row as sqlx::Row>::Database>,
        {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO token_signing_keys ({KEY_COLS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            )))
            .bind(&key.kid)
            .bind(&key.alg)
            .bind(key.state.as_str())
            .bind(time_to_us(key.created_at))
            .bind(key.activated_at.map(time_to_us))
            .bind(key.deactivated_at.map(time_to_us))
            .bind(key.unpublish_at.map(time_to_us))
            .bind(key.revoked_at.map(time_to_us))
            .bind(&key.public_key)
            .bind(&key.public_jwk)
            .bind(&key.sealed_private)
            .execute(ex)
            .await
            .map_err(conflict)?;
            Ok(())
        }

        #[async_trait::async_trait]
        impl TokenStore for $store {
            async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
                insert_key_in(&self.pool, key).await
            }

            async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLS} FROM token_signing_keys ORDER BY created_at, kid"
                )))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(key_from).collect()
            }

            async fn promote(
                &self,
                next_kid: &str,
                current_kid: Option<&str>,
                new_next: &KeyRow,
                now: DateTime<Utc>,
                unpublish_at: DateTime<Utc>,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                // The old current first: the one-current index needs its slot free.
                if let Some(cur) = current_kid {
                    let n = sqlx::query(
                        "UPDATE token_signing_keys
                            SET state = 'retiring', deactivated_at = $2, unpublish_at = $3
                          WHERE kid = $1 AND state = 'current'",
                    )
                    .bind(cur)
                    .bind(time_to_us(now))
                    .bind(time_to_us(unpublish_at))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n != 1 {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                }
                let n = sqlx::query(
                    "UPDATE token_signing_keys SET state = 'current', activated_at = $2
                      WHERE kid = $1 AND state = 'next'",
                )
                .bind(next_kid)
                .bind(time_to_us(now))
                .execute(&mut *tx)
                .await;
                let n = match n {
                    Ok(r) => r.rows_affected(),
                    Err(e) if is_unique_violation(&e) => 0,
                    Err(e) => return Err(e.into()),
                };
                if n != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                match insert_key_in(&mut *tx, new_next).await {
                    Ok(()) => {}
                    Err(StoreError::Conflict) => {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn retire_key(&self, kid: &str) -> Result<bool, StoreError> {
                let n = sqlx::query(
                    "UPDATE token_signing_keys SET state = 'retired'
                      WHERE kid = $1 AND state = 'retiring'",
                )
                .bind(kid)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n == 1)
            }

            async fn revoke_key(
                &self,
                kid: &str,
                now: DateTime<Utc>,
            ) -> Result<Option<KeyState>, StoreError> {
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query(
                    "UPDATE token_signing_keys SET revoked_at = $2
                      WHERE kid = $1 AND state <> 'revoked'",
                )
                .bind(kid)
                .bind(time_to_us(now))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n != 1 {
                    tx.rollback().await?;
                    return Ok(None);
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLS} FROM token_signing_keys WHERE kid = $1"
                )))
                .bind(kid)
                .fetch_one(&mut *tx)
                .await?;
                let before = key_from(&row)?.state;
                sqlx::query("UPDATE token_signing_keys SET state = 'revoked' WHERE kid = $1")
                    .bind(kid)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(before))
            }

            async fn insert_refresh(&self, row: &RefreshRow) -> Result<(), StoreError> {
                insert_refresh_in(&self.pool, row).await
            }

            async fn refresh_by_hash(&self, hash: &[u8]) -> Result<Option<RefreshRow>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {REFRESH_COLS} FROM security_tokens
                      WHERE token_hash = $1 AND token_type = 'refresh'"
                )))
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(refresh_from).transpose()
            }

            async fn rotate_refresh(
                &self,
                id: &str,
                now: DateTime<Utc>,
                successor: &RefreshRow,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query(
                    "UPDATE security_tokens SET rotated_at = $2, successor_id = $3
                      WHERE id = $1 AND token_type = 'refresh'
                        AND rotated_at IS NULL AND NOT is_revoked",
                )
                .bind(id)
                .bind(time_to_us(now))
                .bind(&successor.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                insert_refresh_in(&mut *tx, successor).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn regrace_refresh(
                &self,
                id: &str,
                expected_successor: &str,
                replacement: &RefreshRow,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query(
                    "UPDATE security_tokens SET successor_id = $3
                      WHERE id = $1 AND successor_id = $2 AND NOT is_revoked",
                )
                .bind(id)
                .bind(expected_successor)
                .bind(&replacement.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                let n = sqlx::query(
                    "UPDATE security_tokens SET is_revoked = TRUE
                      WHERE id = $1 AND rotated_at IS NULL AND NOT is_revoked",
                )
                .bind(expected_successor)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                insert_refresh_in(&mut *tx, replacement).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn revoke_family(&self, family_id: &str) -> Result<u64, StoreError> {
                Ok(sqlx::query(
                    "UPDATE security_tokens SET is_revoked = TRUE
                      WHERE family_id = $1 AND token_type = 'refresh' AND NOT is_revoked",
                )
                .bind(family_id)
                .execute(&self.pool)
                .await?
                .rows_affected())
            }

            async fn revoke_refresh_of(
                &self,
                kind: RevocationKind,
                target: &str,
            ) -> Result<u64, StoreError> {
                let sql = match kind {
                    RevocationKind::Subject => {
                        "UPDATE security_tokens SET is_revoked = TRUE
                          WHERE token_type = 'refresh' AND user_id = $1 AND NOT is_revoked"
                    }
                    RevocationKind::Client => {
                        "UPDATE security_tokens SET is_revoked = TRUE
                          WHERE token_type = 'refresh' AND client_id = $1 AND NOT is_revoked"
                    }
                    _ => return Ok(0),
                };
                Ok(sqlx::query(sql)
                    .bind(target)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }

            async fn active_families(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(DISTINCT family_id) FROM security_tokens
                      WHERE token_type = 'refresh' AND rotated_at IS NULL
                        AND NOT is_revoked AND expires_at > $1",
                )
                .bind(time_to_us(now))
                .fetch_one(&self.pool)
                .await?;
                Ok(u64::try_from(n).unwrap_or(0))
            }

            async fn insert_revocation(&self, row: &RevocationRow) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO security_tokens (id, token_type, user_id, client_id,
                       revocation_kind, target, expires_at, not_before, created_at)
                     VALUES ($1, 'revocation', $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&row.id)
                .bind(if row.kind == RevocationKind::Subject {
                    row.target.as_str()
                } else {
                    ""
                })
                .bind(if row.kind == RevocationKind::Client {
                    row.target.as_str()
                } else {
                    ""
                })
                .bind(row.kind.as_str())
                .bind(&row.target)
                .bind(time_to_us(row.expires_at))
                .bind(row.not_before.map(time_to_us))
                .bind(time_to_us(row.created_at))
                .execute(&self.pool)
                .await
                .map_err(conflict)?;
                Ok(())
            }

            async fn revocations(
                &self,
                since: Option<DateTime<Utc>>,
                now: DateTime<Utc>,
            ) -> Result<Vec<RevocationRow>, StoreError> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {REVOCATION_COLS} FROM security_tokens
                      WHERE token_type = 'revocation' AND expires_at > $1 AND created_at >= $2
                      ORDER BY created_at, id"
                )))
                .bind(time_to_us(now))
                .bind(since.map(time_to_us).unwrap_or(i64::MIN))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(revocation_from).collect()
            }

            async fn cleanup(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
                Ok(
                    sqlx::query("DELETE FROM security_tokens WHERE expires_at <= $1")
                        .bind(time_to_us(now))
                        .execute(&self.pool)
                        .await?
                        .rows_affected(),
                )
            }
        }
    };
}
pub(crate) use impl_store;

/// The behaviour both backends must have. Run by each backend's tests on a fresh database.
#[cfg(test)]
pub mod contract {
    use std::sync::Arc;

    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn key(kid: &str, state: KeyState) -> KeyRow {
        KeyRow {
            kid: kid.into(),
            alg: "ES256".into(),
            state,
            created_at: at(0),
            activated_at: None,
            deactivated_at: None,
            unpublish_at: None,
            revoked_at: None,
            public_key: vec![4, 1, 2],
            public_jwk: "{}".into(),
            sealed_private: vec![9; 40],
        }
    }

    fn refresh(id: &str, family: &str) -> RefreshRow {
        RefreshRow {
            id: id.into(),
            token_hash: id.as_bytes().to_vec(),
            family_id: family.into(),
            parent_id: None,
            user_id: "alice".into(),
            client_id: "app".into(),
            scope: "openid".into(),
            grant_json: "{}".into(),
            created_at: at(0),
            expires_at: at(1000),
            rotated_at: None,
            successor_id: None,
            is_revoked: false,
        }
    }

    pub async fn run(store: Arc<dyn TokenStore>) {
        keys(store.as_ref()).await;
        refresh_families(store.as_ref()).await;
        parallel_rotation(store.clone()).await;
        revocations(store.as_ref()).await;
    }

    async fn keys(s: &dyn TokenStore) {
        s.insert_key(&key("a", KeyState::Current)).await.unwrap();
        s.insert_key(&key("b", KeyState::Next)).await.unwrap();
        // One current, one next: a second of either is refused.
        assert!(matches!(
            s.insert_key(&key("c", KeyState::Next)).await,
            Err(StoreError::Conflict)
        ));
        assert!(matches!(
            s.insert_key(&key("a", KeyState::Retired)).await,
            Err(StoreError::Conflict)
        ));
        let got = s.keys().await.unwrap();
        assert_eq!(
            got,
            vec![key("a", KeyState::Current), key("b", KeyState::Next)]
        );

        // Promotion is a compare-and-set: a stale view (wrong current) changes nothing.
        assert!(
            !s.promote("b", Some("zz"), &key("c", KeyState::Next), at(5), at(99))
                .await
                .unwrap()
        );
        assert!(
            s.promote("b", Some("a"), &key("c", KeyState::Next), at(5), at(99))
                .await
                .unwrap()
        );
        // The loser of a race re-reads: the same promotion again does nothing.
        assert!(
            !s.promote("b", Some("a"), &key("d", KeyState::Next), at(6), at(99))
                .await
                .unwrap()
        );
        let got = s.keys().await.unwrap();
        let state = |kid: &str| got.iter().find(|k| k.kid == kid).map(|k| k.state);
        assert_eq!(state("a"), Some(KeyState::Retiring));
        assert_eq!(state("b"), Some(KeyState::Current));
        assert_eq!(state("c"), Some(KeyState::Next));
        assert_eq!(state("d"), None);
        let a = got.iter().find(|k| k.kid == "a").unwrap();
        assert_eq!(
            (a.deactivated_at, a.unpublish_at),
            (Some(at(5)), Some(at(99)))
        );
        assert_eq!(
            got.iter().find(|k| k.kid == "b").unwrap().activated_at,
            Some(at(5))
        );

        assert!(s.retire_key("a").await.unwrap());
        assert!(!s.retire_key("a").await.unwrap());
        assert!(
            !s.retire_key("b").await.unwrap(),
            "only a retiring key retires"
        );
        assert_eq!(
            s.revoke_key("c", at(7)).await.unwrap(),
            Some(KeyState::Next)
        );
        assert_eq!(s.revoke_key("c", at(8)).await.unwrap(), None);
        assert_eq!(s.revoke_key("nope", at(8)).await.unwrap(), None);
        let c = s
            .keys()
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.kid == "c")
            .unwrap();
        assert_eq!((c.state, c.revoked_at), (KeyState::Revoked, Some(at(7))));
        // The next slot is free again after a revocation.
        s.insert_key(&key("e", KeyState::Next)).await.unwrap();
    }

    async fn refresh_families(s: &dyn TokenStore) {
        s.insert_refresh(&refresh("r1", "f1")).await.unwrap();
        assert!(matches!(
            s.insert_refresh(&refresh("r1", "f1")).await,
            Err(StoreError::Conflict)
        ));
        assert_eq!(
            s.refresh_by_hash(b"r1").await.unwrap(),
            Some(refresh("r1", "f1"))
        );
        assert_eq!(s.refresh_by_hash(b"zz").await.unwrap(), None);
        assert_eq!(s.active_families(at(1)).await.unwrap(), 1);

        let mut r2 = refresh("r2", "f1");
        r2.parent_id = Some("r1".into());
        assert!(s.rotate_refresh("r1", at(2), &r2).await.unwrap());
        assert!(
            !s.rotate_refresh("r1", at(3), &refresh("r2b", "f1"))
                .await
                .unwrap()
        );
        assert_eq!(s.refresh_by_hash(b"r2b").await.unwrap(), None);
        let r1 = s.refresh_by_hash(b"r1").await.unwrap().unwrap();
        assert_eq!(
            (r1.rotated_at, r1.successor_id.as_deref()),
            (Some(at(2)), Some("r2"))
        );
        assert_eq!(s.active_families(at(3)).await.unwrap(), 1);

        // Grace: the unused successor is replaced (and revoked).
        let r3 = refresh("r3", "f1");
        assert!(s.regrace_refresh("r1", "r2", &r3).await.unwrap());
        assert!(s.refresh_by_hash(b"r2").await.unwrap().unwrap().is_revoked);
        assert!(
            !s.regrace_refresh("r1", "r2", &refresh("r4", "f1"))
                .await
                .unwrap()
        );
        // A successor already used cannot be replaced.
        assert!(
            s.rotate_refresh("r3", at(4), &refresh("r5", "f1"))
                .await
                .unwrap()
        );
        assert!(
            !s.regrace_refresh("r1", "r3", &refresh("r6", "f1"))
                .await
                .unwrap()
        );

        assert_eq!(s.revoke_family("f1").await.unwrap(), 3);
        assert_eq!(s.revoke_family("f1").await.unwrap(), 0);
        assert!(
            !s.rotate_refresh("r5", at(5), &refresh("r7", "f1"))
                .await
                .unwrap()
        );
        assert_eq!(s.active_families(at(5)).await.unwrap(), 0);

        let mut other = refresh("o1", "f2");
        other.user_id = "bob".into();
        s.insert_refresh(&other).await.unwrap();
        assert_eq!(
            s.revoke_refresh_of(RevocationKind::Subject, "carol")
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            s.revoke_refresh_of(RevocationKind::Subject, "bob")
                .await
                .unwrap(),
            1
        );
        s.insert_refresh(&refresh("o2", "f3")).await.unwrap();
        assert_eq!(
            s.revoke_refresh_of(RevocationKind::Client, "app")
                .await
                .unwrap(),
            1
        );
    }

    /// 16 concurrent rotations of one token: exactly one wins.
    async fn parallel_rotation(s: Arc<dyn TokenStore>) {
        s.insert_refresh(&refresh("p0", "fp")).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.rotate_refresh("p0", at(1), &refresh(&format!("p1-{i}"), "fp"))
                    .await
                    .unwrap()
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await.unwrap());
        }
        assert_eq!(wins, 1);
    }

    async fn revocations(s: &dyn TokenStore) {
        let rev = |id: &str, kind, target: &str, created: i64, exp: i64| RevocationRow {
            id: id.into(),
            kind,
            target: target.into(),
            expires_at: at(exp),
            not_before: (kind != RevocationKind::Jti).then(|| at(created)),
            created_at: at(created),
        };
        let a = rev("v1", RevocationKind::Jti, "j1", 10, 100);
        let b = rev("v2", RevocationKind::Subject, "alice", 20, 200);
        let c = rev("v3", RevocationKind::Client, "app", 30, 40);
        for r in [&a, &b, &c] {
            s.insert_revocation(r).await.unwrap();
        }
        assert_eq!(
            s.revocations(None, at(35)).await.unwrap(),
            vec![a.clone(), b.clone(), c.clone()]
        );
        assert_eq!(
            s.revocations(Some(at(20)), at(35)).await.unwrap(),
            vec![b.clone(), c.clone()]
        );
        // Expired ones are no longer in force.
        assert_eq!(s.revocations(None, at(150)).await.unwrap(), vec![b.clone()]);
        let removed = s.cleanup(at(150)).await.unwrap();
        assert!(removed >= 2, "{removed}");
        assert_eq!(s.revocations(None, at(0)).await.unwrap(), vec![b]);
        // Refresh rows expired at 1000 go too.
        s.cleanup(at(1000)).await.unwrap();
        assert_eq!(s.refresh_by_hash(b"r1").await.unwrap(), None);
    }
}
