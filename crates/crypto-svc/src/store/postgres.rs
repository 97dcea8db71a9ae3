//! PostgreSQL key store. Times are TIMESTAMPTZ (microsecond precision), versions BIGINT.
//! A key and its versions are read in one statement, so a reader never sees a key
//! half-way through a rotation.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};

use super::{
    DeleteOutcome, KeyPolicy, KeyRecord, KeyStore, StoreError, VersionRecord, count_from_db,
    count_to_db, is_unique_violation, period_from_db, period_to_db, policy_version_from_db,
    policy_version_to_db, services_from_db, services_to_db, version_from_db, version_to_db,
};

#[derive(Debug, Clone)]
pub struct PgKeyStore {
    pool: PgPool,
}

impl PgKeyStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn key_from(r: &PgRow) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        name: r.try_get("name")?,
        key_type: r.try_get("key_type")?,
        latest_version: version_from_db(r.try_get("latest_version")?, "latest_version")?,
        policy: KeyPolicy {
            min_decryption_version: version_from_db(
                r.try_get("min_decryption_version")?,
                "min_decryption_version",
            )?,
            min_encryption_version: version_from_db(
                r.try_get("min_encryption_version")?,
                "min_encryption_version",
            )?,
            rotation_period_seconds: period_from_db(r.try_get("rotation_period_seconds")?)?,
            deletion_allowed: r.try_get("deletion_allowed")?,
            exportable: r.try_get("exportable")?,
            allowed_services: services_from_db(&r.try_get::<String, _>("allowed_services")?)?,
        },
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        last_rotated_at: r.try_get("last_rotated_at")?,
        policy_version: policy_version_from_db(r.try_get("policy_version")?)?,
        record_mac: r.try_get("record_mac")?,
    })
}

/// The version in columns `v_*`, or `None` when they are NULL (a key without versions,
/// left-joined).
fn version_from(r: &PgRow) -> Result<Option<VersionRecord>, StoreError> {
    let Some(version) = r.try_get::<Option<i64>, _>("v_version")? else {
        return Ok(None);
    };
    Ok(Some(VersionRecord {
        version: version_from_db(version, "version")?,
        created_at: r.try_get("v_created_at")?,
        kek_id: r.try_get("v_kek_id")?,
        wrapped: r.try_get("v_wrapped")?,
        public_key: r.try_get("v_public_key")?,
        encryptions: count_from_db(r.try_get("v_encryptions")?)?,
    }))
}

#[async_trait]
impl KeyStore for PgKeyStore {
    async fn insert(&self, key: &KeyRecord, versions: &[VersionRecord]) -> Result<(), StoreError> {
        let period = period_to_db(key.policy.rotation_period_seconds)?;
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO crypto_keys
               (name, key_type, latest_version, min_decryption_version, min_encryption_version,
                rotation_period_seconds, deletion_allowed, exportable,
                created_at, updated_at, last_rotated_at, policy_version, record_mac,
                allowed_services)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                     $12, $13, $14)",
        )
        .bind(&key.name)
        .bind(&key.key_type)
        .bind(version_to_db(key.latest_version))
        .bind(version_to_db(key.policy.min_decryption_version))
        .bind(version_to_db(key.policy.min_encryption_version))
        .bind(period)
        .bind(key.policy.deletion_allowed)
        .bind(key.policy.exportable)
        .bind(key.created_at)
        .bind(key.updated_at)
        .bind(key.last_rotated_at)
        .bind(policy_version_to_db(key.policy_version)?)
        .bind(key.record_mac.as_deref())
        .bind(services_to_db(&key.policy.allowed_services))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(StoreError::AlreadyExists),
            r => r?,
        };
        for v in versions {
            sqlx::query(
                "INSERT INTO crypto_key_versions
                   (key_name, version, created_at, kek_id, wrapped, public_key, encryptions)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&key.name)
            .bind(version_to_db(v.version))
            .bind(v.created_at)
            .bind(&v.kek_id)
            .bind(&v.wrapped)
            .bind(v.public_key.as_deref())
            .bind(count_to_db(v.encryptions)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<(KeyRecord, Vec<VersionRecord>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT k.name, k.key_type, k.latest_version, k.min_decryption_version,
                    k.min_encryption_version, k.rotation_period_seconds, k.deletion_allowed,
                    k.exportable, k.created_at, k.updated_at, k.last_rotated_at,
                    k.policy_version, k.record_mac, k.allowed_services,
                    v.version AS v_version, v.created_at AS v_created_at,
                    v.kek_id AS v_kek_id, v.wrapped AS v_wrapped, v.public_key AS v_public_key,
                    v.encryptions AS v_encryptions
             FROM crypto_keys k
             LEFT JOIN crypto_key_versions v ON v.key_name = k.name
             WHERE k.name = $1
             ORDER BY v.version",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let key = key_from(first)?;
        let mut versions = Vec::with_capacity(rows.len());
        for r in &rows {
            versions.extend(version_from(r)?);
        }
        Ok(Some((key, versions)))
    }

    async fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, key_type, latest_version, min_decryption_version,
                    min_encryption_version, rotation_period_seconds, deletion_allowed,
                    exportable, created_at, updated_at, last_rotated_at, policy_version,
                    record_mac, allowed_services
             FROM crypto_keys
             WHERE ($1::text IS NULL OR name > $1)
             ORDER BY name
             LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from).collect()
    }

    async fn add_version(
        &self,
        name: &str,
        expected_latest: u32,
        expected_policy_version: u64,
        version: &VersionRecord,
        now: DateTime<Utc>,
        mac: Option<&str>,
    ) -> Result<(), StoreError> {
        if expected_latest.checked_add(1) != Some(version.version) {
            return Err(StoreError::Conflict);
        }
        let mut tx = self.pool.begin().await?;
        // The row lock taken here serialises racing writers: the loser re-checks
        // `latest_version` and `policy_version` once the winner commits and matches nothing.
        let updated = sqlx::query(
            "UPDATE crypto_keys
             SET latest_version = $1, updated_at = $2, last_rotated_at = $2,
                 policy_version = policy_version + 1, record_mac = $3
             WHERE name = $4 AND latest_version = $5 AND policy_version = $6",
        )
        .bind(version_to_db(version.version))
        .bind(now)
        .bind(mac)
        .bind(name)
        .bind(version_to_db(expected_latest))
        .bind(policy_version_to_db(expected_policy_version)?)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            let (exists,): (bool,) =
                sqlx::query_as("SELECT EXISTS (SELECT 1 FROM crypto_keys WHERE name = $1)")
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await?;
            return Err(if exists {
                StoreError::Conflict
            } else {
                StoreError::NotFound
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO crypto_key_versions
               (key_name, version, created_at, kek_id, wrapped, public_key, encryptions)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(name)
        .bind(version_to_db(version.version))
        .bind(version.created_at)
        .bind(&version.kek_id)
        .bind(&version.wrapped)
        .bind(version.public_key.as_deref())
        .bind(count_to_db(version.encryptions)?)
        .execute(&mut *tx)
        .await;
        match inserted {
            // A stray row for that version already exists: the key is not as expected.
            Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict),
            r => r?,
        };
        tx.commit().await?;
        Ok(())
    }

    async fn update_policy(
        &self,
        name: &str,
        expected_policy_version: u64,
        policy: &KeyPolicy,
        now: DateTime<Utc>,
        mac: Option<&str>,
    ) -> Result<(), StoreError> {
        // One statement: the row lock makes a racing writer wait, then re-check
        // `policy_version` against the committed row, so exactly one of them matches.
        let updated = sqlx::query(
            "UPDATE crypto_keys
             SET min_decryption_version = $1, min_encryption_version = $2,
                 rotation_period_seconds = $3, deletion_allowed = $4, exportable = $5,
                 updated_at = $6, policy_version = policy_version + 1, record_mac = $7,
                 allowed_services = $10
             WHERE name = $8 AND policy_version = $9",
        )
        .bind(version_to_db(policy.min_decryption_version))
        .bind(version_to_db(policy.min_encryption_version))
        .bind(period_to_db(policy.rotation_period_seconds)?)
        .bind(policy.deletion_allowed)
        .bind(policy.exportable)
        .bind(now)
        .bind(mac)
        .bind(name)
        .bind(policy_version_to_db(expected_policy_version)?)
        .bind(services_to_db(&policy.allowed_services))
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() > 0 {
            return Ok(());
        }
        let (exists,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM crypto_keys WHERE name = $1)")
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
        Err(if exists {
            StoreError::Conflict
        } else {
            StoreError::NotFound
        })
    }

    async fn set_mac(
        &self,
        name: &str,
        policy_version: u64,
        mac: &str,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE crypto_keys SET record_mac = $1 WHERE name = $2 AND policy_version = $3",
        )
        .bind(mac)
        .bind(name)
        .bind(policy_version_to_db(policy_version)?)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() > 0)
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        // Versions go with the key (ON DELETE CASCADE).
        let deleted = sqlx::query("DELETE FROM crypto_keys WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn delete_if_allowed(&self, name: &str) -> Result<DeleteOutcome, StoreError> {
        // The condition is part of the DELETE: a concurrent update that clears
        // `deletion_allowed` holds the row lock until it commits, and the DELETE then
        // re-evaluates its WHERE against the committed row.
        let deleted = sqlx::query("DELETE FROM crypto_keys WHERE name = $1 AND deletion_allowed")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if deleted.rows_affected() > 0 {
            return Ok(DeleteOutcome::Deleted);
        }
        let (exists,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM crypto_keys WHERE name = $1)")
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
        Ok(if exists {
            DeleteOutcome::Protected
        } else {
            DeleteOutcome::NotFound
        })
    }

    async fn versions_not_wrapped_by(
        &self,
        kek_id: &str,
        format_prefix: &[u8],
        limit: u32,
    ) -> Result<Vec<(String, VersionRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_name, version AS v_version, created_at AS v_created_at,
                    kek_id AS v_kek_id, wrapped AS v_wrapped, public_key AS v_public_key,
                    encryptions AS v_encryptions
             FROM crypto_key_versions
             WHERE kek_id <> $1 OR substring(wrapped from 1 for length($3)) <> $3
             ORDER BY key_name, version
             LIMIT $2",
        )
        .bind(kek_id)
        .bind(i64::from(limit))
        .bind(format_prefix)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let name: String = r.try_get("key_name")?;
            let v = version_from(r)?
                .ok_or_else(|| StoreError::Corrupt("version row without a version".into()))?;
            out.push((name, v));
        }
        Ok(out)
    }

    async fn rewrap_version(
        &self,
        name: &str,
        version: u32,
        old_kek_id: &str,
        new_kek_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE crypto_key_versions
             SET kek_id = $1, wrapped = $2
             WHERE key_name = $3 AND version = $4 AND kek_id = $5",
        )
        .bind(new_kek_id)
        .bind(wrapped)
        .bind(name)
        .bind(version_to_db(version))
        .bind(old_kek_id)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() > 0)
    }

    async fn reserve_encryptions(
        &self,
        name: &str,
        version: u32,
        n: u64,
    ) -> Result<u64, StoreError> {
        // One atomic statement: concurrent reservations (any replica) get disjoint ranges.
        let total: Option<i64> = sqlx::query_scalar(
            "UPDATE crypto_key_versions SET encryptions = encryptions + $1
             WHERE key_name = $2 AND version = $3
             RETURNING encryptions",
        )
        .bind(count_to_db(n)?)
        .bind(name)
        .bind(version_to_db(version))
        .fetch_optional(&self.pool)
        .await?;
        count_from_db(total.ok_or(StoreError::NotFound)?)
    }

    async fn kek_usage(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kek_id, COUNT(*) FROM crypto_key_versions GROUP BY kek_id ORDER BY kek_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(kek, n)| Ok((kek, count_from_db(n)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sec_testkit::{Backend, backend_url};

    #[tokio::test]
    async fn contract_postgres() {
        let Some(url) = backend_url(Backend::Postgres) else {
            return;
        };
        let schema = format!("crypto_t{}", uuid::Uuid::new_v4().simple());
        let pool = sec_common::storage::connect_postgres(&url, &schema, 4)
            .await
            .unwrap();
        sqlx::migrate!("../../migrations/crypto/postgres")
            .run(&pool)
            .await
            .unwrap();
        super::super::contract::run(&PgKeyStore::new(pool.clone())).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
