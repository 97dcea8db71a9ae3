//! Where clients, users, authorization codes, remembered consents and the service's own
//! sealed secrets live: one trait, a PostgreSQL and a SQLite implementation, and one
//! contract suite both must pass.
//!
//! Like token-svc: times are unix microseconds on both backends and the same SQL runs on
//! both (`$n` placeholders), so one macro writes both implementations. Every
//! read-modify-write is one conditional `UPDATE` (compare-and-set on `version`, or on
//! `used_us IS NULL` for codes); the loser learns it lost.
//!
//! The settings of a client and the profile of a user are stored as a JSON document
//! beside the columns that are looked up or constrained (ids, username, email, status,
//! hashes), so adding a setting needs no migration.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A unique constraint refused the write (the id, username or email is taken).
    #[error("already exists")]
    Conflict,
    /// The row's version is not the expected one: someone else changed it first.
    #[error("changed concurrently")]
    VersionMismatch,
    #[error("not found")]
    NotFound,
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// How a client authenticates at the token endpoint (RFC 7591 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    /// Public clients.
    None,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "client_secret_basic" => AuthMethod::ClientSecretBasic,
            "client_secret_post" => AuthMethod::ClientSecretPost,
            "private_key_jwt" => AuthMethod::PrivateKeyJwt,
            "none" => AuthMethod::None,
            _ => return None,
        })
    }

    /// Uses a server-generated secret.
    pub fn has_secret(self) -> bool {
        matches!(
            self,
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    AuthorizationCode,
    ClientCredentials,
    RefreshToken,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::AuthorizationCode => "authorization_code",
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "authorization_code" => GrantType::AuthorizationCode,
            "client_credentials" => GrantType::ClientCredentials,
            "refresh_token" => GrantType::RefreshToken,
            _ => return None,
        })
    }
}

/// A client's settings: everything an administrator (or RFC 7591 registration) sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientSettings {
    pub name: String,
    /// Public client: no secret, PKCE always, no client_credentials.
    pub public: bool,
    pub auth_method: AuthMethod,
    pub grant_types: Vec<GrantType>,
    pub redirect_uris: Vec<String>,
    #[serde(default)]
    pub post_logout_redirect_uris: Vec<String>,
    pub scopes: Vec<String>,
    /// JWK Set JSON for private_key_jwt.
    #[serde(default)]
    pub jwks_json: Option<String>,
    /// 0: server default.
    #[serde(default)]
    pub access_ttl_seconds: u32,
    #[serde(default)]
    pub refresh_ttl_seconds: u32,
    #[serde(default)]
    pub id_ttl_seconds: u32,
    #[serde(default)]
    pub trusted: bool,
    #[serde(default)]
    pub rate_limit_tier: String,
    pub require_pkce: bool,
    #[serde(default)]
    pub dynamically_registered: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientRow {
    pub client_id: String,
    pub settings: ClientSettings,
    /// HMAC-SHA-256 of the client secret under the server key (`sec_common::secret`).
    pub secret_hash: Option<Vec<u8>>,
    /// Keyed hash (`AuthServer::secrets`) of the RFC 7592 registration access token, for dynamically registered
    /// clients.
    pub registration_token_hash: Option<Vec<u8>>,
    /// Starts at 1; every update adds 1.
    pub version: i64,
    pub created_us: i64,
    pub updated_us: i64,
    pub secret_rotated_us: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    Active,
    Disabled,
    Locked,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Disabled => "disabled",
            UserStatus::Locked => "locked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => UserStatus::Active,
            "disabled" => UserStatus::Disabled,
            "locked" => UserStatus::Locked,
            _ => return None,
        })
    }
}

/// The parts of a user that are not looked up by the database.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UserProfile {
    #[serde(default)]
    pub email_verified: bool,
    #[serde(default)]
    pub roles: Vec<String>,
    /// OIDC profile claims (name, given_name, ...): strings only.
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserRow {
    pub user_id: String,
    /// As entered; uniqueness and lookups use its lowercase form.
    pub username: String,
    pub email: Option<String>,
    pub status: UserStatus,
    /// argon2id PHC string; `None`: no password set (cannot log in with one).
    pub password_phc: Option<String>,
    pub profile: UserProfile,
    pub version: i64,
    pub created_us: i64,
    pub updated_us: i64,
    pub password_changed_us: Option<i64>,
}

/// What an authorization code stands for (RFC 6749 §4.1.2: bound to the client, the
/// redirect URI and the PKCE challenge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeGrant {
    pub client_id: String,
    pub redirect_uri: String,
    /// BASE64URL(SHA-256(verifier)); `None` only for a confidential client that does not
    /// require PKCE and sent no challenge.
    pub code_challenge: Option<String>,
    pub user_id: String,
    pub scope: String,
    pub nonce: Option<String>,
    /// Unix seconds of the user's authentication.
    pub auth_time: i64,
    pub amr: Vec<String>,
    pub acr: String,
    /// OIDC `sid`: the session handle the code was issued in.
    pub session_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CodeRow {
    /// SHA-256 of the code (the code itself is never stored).
    pub code_hash: Vec<u8>,
    pub grant: CodeGrant,
    pub created_us: i64,
    pub expires_us: i64,
    pub used_us: Option<i64>,
    /// Recorded after the exchange, so a replay can revoke what the code produced.
    pub family_id: Option<String>,
    pub access_jti: Option<String>,
    /// Unix µs when the access token expires (bounds its denylist entry).
    pub access_expires_us: Option<i64>,
}

/// The outcome of [`AuthStore::consume_code`].
#[derive(Debug, Clone, PartialEq)]
pub enum CodeUse {
    /// First use, now marked used.
    Fresh(CodeRow),
    /// Used before (a replay): the caller revokes what it produced.
    Replayed(CodeRow),
    /// Unknown or expired.
    Invalid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsentRow {
    pub user_id: String,
    pub client_id: String,
    /// Sorted, de-duplicated.
    pub scopes: Vec<String>,
    pub granted_us: i64,
    pub expires_us: i64,
}

#[async_trait]
pub trait AuthStore: Send + Sync {
    async fn ping(&self) -> Result<(), StoreError>;

    // Clients.
    /// `Conflict` when the id is taken.
    async fn insert_client(&self, c: &ClientRow) -> Result<(), StoreError>;
    async fn get_client(&self, client_id: &str) -> Result<Option<ClientRow>, StoreError>;
    /// Ordered by client_id, starting after `after`.
    async fn list_clients(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ClientRow>, StoreError>;
    /// Writes `c` (its `version` is the new one) if the stored version is
    /// `expected_version`: else `VersionMismatch`, or `NotFound`.
    async fn update_client(&self, c: &ClientRow, expected_version: i64) -> Result<(), StoreError>;
    /// Deletes the client and its codes and consents. False when there was none.
    async fn delete_client(&self, client_id: &str) -> Result<bool, StoreError>;

    // Users.
    /// `Conflict` when the id, username or email (ignoring case) is taken.
    async fn insert_user(&self, u: &UserRow) -> Result<(), StoreError>;
    async fn get_user(&self, user_id: &str) -> Result<Option<UserRow>, StoreError>;
    /// Case-insensitive.
    async fn get_user_by_username(&self, username: &str) -> Result<Option<UserRow>, StoreError>;
    /// Ordered by lowercase username, after `after` (a lowercase username); `prefix`
    /// matches the start of the username or email, ignoring case.
    async fn list_users(
        &self,
        after: Option<&str>,
        prefix: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UserRow>, StoreError>;
    /// CAS like `update_client`; `Conflict` when the new username or email is taken.
    async fn update_user(&self, u: &UserRow, expected_version: i64) -> Result<(), StoreError>;

    // Authorization codes.
    async fn insert_code(&self, c: &CodeRow) -> Result<(), StoreError>;
    /// Marks the code used if it is unused and unexpired at `now_us` (one conditional
    /// UPDATE: of two concurrent exchanges exactly one gets `Fresh`).
    async fn consume_code(&self, code_hash: &[u8], now_us: i64) -> Result<CodeUse, StoreError>;
    /// Records what the exchange issued.
    async fn record_code_tokens(
        &self,
        code_hash: &[u8],
        family_id: Option<&str>,
        access_jti: &str,
        access_expires_us: i64,
    ) -> Result<(), StoreError>;

    // Remembered consent.
    async fn get_consent(
        &self,
        user_id: &str,
        client_id: &str,
    ) -> Result<Option<ConsentRow>, StoreError>;
    /// Inserts or replaces.
    async fn put_consent(&self, c: &ConsentRow) -> Result<(), StoreError>;
    async fn delete_consents_for_user(&self, user_id: &str) -> Result<u64, StoreError>;

    // The service's own sealed secrets (the client-secret hashing key, ...).
    /// Stores `sealed` under `name` unless a value is there already; returns the value
    /// that is stored (ours or the one another replica stored first).
    async fn get_or_insert_secret(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Deletes codes expired before `now_us` (used ones after their replay window,
    /// `now_us - keep_used_us`) and expired consents. Returns rows deleted.
    async fn delete_expired(&self, now_us: i64, keep_used_us: i64) -> Result<u64, StoreError>;
}

pub mod postgres;
pub mod sqlite;

/// The lowercase form uniqueness and lookups use (usernames are ASCII; emails may not be,
/// so this is Rust's Unicode lowercase, the same on both backends).
pub fn fold_case(s: &str) -> String {
    s.to_lowercase()
}

/// `LIKE` pattern matching values starting with `prefix` (its `%`, `_` and `\` escaped).
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Consent scopes as stored: sorted, de-duplicated, space-separated.
pub(crate) fn scopes_text(scopes: &[String]) -> String {
    let mut v: Vec<&str> = scopes.iter().map(String::as_str).collect();
    v.sort_unstable();
    v.dedup();
    v.join(" ")
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

pub(crate) fn conflict(e: sqlx::Error) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict
    } else {
        StoreError::Db(e)
    }
}

pub(crate) fn to_json<T: Serialize>(v: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    s: &str,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Writes `impl AuthStore` for a store type holding `pool` whose rows are `$row`;
/// `$now_us` is the backend's SQL for "now in unix µs", used only for
/// `service_secrets.created_us` (a record of when, never compared, and the trait passes
/// no time there).
macro_rules! impl_store {
    ($store:ty, $row:ty, $now_us:expr) => {
        const CLIENT_COLS: &str = "client_id, version, settings, secret_hash, \
             registration_token_hash, created_us, updated_us, secret_rotated_us";
        const USER_COLS: &str = "user_id, username, email, status, password_phc, profile, \
             version, created_us, updated_us, password_changed_us";
        const CODE_COLS: &str = "code_hash, grant_json, created_us, expires_us, used_us, \
             family_id, access_jti, access_expires_us";

        fn client_from(r: &$row) -> Result<ClientRow, StoreError> {
            use sqlx::Row as _;
            let settings: String = r.try_get("settings")?;
            Ok(ClientRow {
                client_id: r.try_get("client_id")?,
                settings: from_json(&settings, "client settings")?,
                secret_hash: r.try_get("secret_hash")?,
                registration_token_hash: r.try_get("registration_token_hash")?,
                version: r.try_get("version")?,
                created_us: r.try_get("created_us")?,
                updated_us: r.try_get("updated_us")?,
                secret_rotated_us: r.try_get("secret_rotated_us")?,
            })
        }

        fn user_from(r: &$row) -> Result<UserRow, StoreError> {
            use sqlx::Row as _;
            let status: String = r.try_get("status")?;
            let profile: String = r.try_get("profile")?;
            Ok(UserRow {
                user_id: r.try_get("user_id")?,
                username: r.try_get("username")?,
                email: r.try_get("email")?,
                status: UserStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt("user status".into()))?,
                password_phc: r.try_get("password_phc")?,
                profile: from_json(&profile, "user profile")?,
                version: r.try_get("version")?,
                created_us: r.try_get("created_us")?,
                updated_us: r.try_get("updated_us")?,
                password_changed_us: r.try_get("password_changed_us")?,
            })
        }

        fn code_from(r: &$row) -> Result<CodeRow, StoreError> {
            use sqlx::Row as _;
            let grant: String = r.try_get("grant_json")?;
            Ok(CodeRow {
                code_hash: r.try_get("code_hash")?,
                grant: from_json(&grant, "code grant")?,
                created_us: r.try_get("created_us")?,
                expires_us: r.try_get("expires_us")?,
                used_us: r.try_get("used_us")?,
                family_id: r.try_get("family_id")?,
                access_jti: r.try_get("access_jti")?,
                access_expires_us: r.try_get("access_expires_us")?,
            })
        }

        fn consent_from(r: &$row) -> Result<ConsentRow, StoreError> {
            use sqlx::Row as _;
            let scopes: String = r.try_get("scopes")?;
            Ok(ConsentRow {
                user_id: r.try_get("user_id")?,
                client_id: r.try_get("client_id")?,
                scopes: scopes.split_whitespace().map(str::to_owned).collect(),
                granted_us: r.try_get("granted_us")?,
                expires_us: r.try_get("expires_us")?,
            })
        }

        impl $store {
            /// After a compare-and-set matched nothing: `NotFound` when the row is gone,
            /// else `VersionMismatch`.
            async fn cas_miss(&self, table_sql: &'static str, id: &str) -> StoreError {
                match sqlx::query_scalar::<_, i64>(table_sql)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                {
                    Ok(Some(_)) => StoreError::VersionMismatch,
                    Ok(None) => StoreError::NotFound,
                    Err(e) => StoreError::Db(e),
                }
            }
        }

        #[async_trait::async_trait]
        impl AuthStore for $store {
            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn insert_client(&self, c: &ClientRow) -> Result<(), StoreError> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO oauth_clients ({CLIENT_COLS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                )))
                .bind(&c.client_id)
                .bind(c.version)
                .bind(to_json(&c.settings, "client settings")?)
                .bind(&c.secret_hash)
                .bind(&c.registration_token_hash)
                .bind(c.created_us)
                .bind(c.updated_us)
                .bind(c.secret_rotated_us)
                .execute(&self.pool)
                .await
                .map_err(conflict)?;
                Ok(())
            }

            async fn get_client(&self, client_id: &str) -> Result<Option<ClientRow>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CLIENT_COLS} FROM oauth_clients WHERE client_id = $1"
                )))
                .bind(client_id)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(client_from).transpose()
            }

            async fn list_clients(
                &self,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<ClientRow>, StoreError> {
                // Client ids are never empty, so '' is "from the start".
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CLIENT_COLS} FROM oauth_clients WHERE client_id > $1
                      ORDER BY client_id LIMIT $2"
                )))
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(client_from).collect()
            }

            async fn update_client(
                &self,
                c: &ClientRow,
                expected_version: i64,
            ) -> Result<(), StoreError> {
                let n = sqlx::query(
                    "UPDATE oauth_clients
                        SET version = $2, settings = $3, secret_hash = $4,
                            registration_token_hash = $5, updated_us = $6,
                            secret_rotated_us = $7
                      WHERE client_id = $1 AND version = $8",
                )
                .bind(&c.client_id)
                .bind(c.version)
                .bind(to_json(&c.settings, "client settings")?)
                .bind(&c.secret_hash)
                .bind(&c.registration_token_hash)
                .bind(c.updated_us)
                .bind(c.secret_rotated_us)
                .bind(expected_version)
                .execute(&self.pool)
                .await?
                .rows_affected();
                if n == 1 {
                    return Ok(());
                }
                Err(self
                    .cas_miss(
                        "SELECT version FROM oauth_clients WHERE client_id = $1",
                        &c.client_id,
                    )
                    .await)
            }

            async fn delete_client(&self, client_id: &str) -> Result<bool, StoreError> {
                // The client row first: SQLite then holds the write lock for the rest.
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query("DELETE FROM oauth_clients WHERE client_id = $1")
                    .bind(client_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query("DELETE FROM auth_codes WHERE client_id = $1")
                    .bind(client_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM consents WHERE client_id = $1")
                    .bind(client_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(n > 0)
            }

            async fn insert_user(&self, u: &UserRow) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO users (user_id, username, username_lower, email, email_lower,
                       status, password_phc, profile, version, created_us, updated_us,
                       password_changed_us)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&u.user_id)
                .bind(&u.username)
                .bind(fold_case(&u.username))
                .bind(&u.email)
                .bind(u.email.as_deref().map(fold_case))
                .bind(u.status.as_str())
                .bind(&u.password_phc)
                .bind(to_json(&u.profile, "user profile")?)
                .bind(u.version)
                .bind(u.created_us)
                .bind(u.updated_us)
                .bind(u.password_changed_us)
                .execute(&self.pool)
                .await
                .map_err(conflict)?;
                Ok(())
            }

            async fn get_user(&self, user_id: &str) -> Result<Option<UserRow>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {USER_COLS} FROM users WHERE user_id = $1"
                )))
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(user_from).transpose()
            }

            async fn get_user_by_username(
                &self,
                username: &str,
            ) -> Result<Option<UserRow>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {USER_COLS} FROM users WHERE username_lower = $1"
                )))
                .bind(fold_case(username))
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(user_from).transpose()
            }

            async fn list_users(
                &self,
                after: Option<&str>,
                prefix: Option<&str>,
                limit: u32,
            ) -> Result<Vec<UserRow>, StoreError> {
                // Usernames are never empty, so '' is "from the start"; '%' matches all.
                let pattern = prefix
                    .map(|p| like_prefix(&fold_case(p)))
                    .unwrap_or_else(|| "%".into());
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {USER_COLS} FROM users
                      WHERE username_lower > $1
                        AND (username_lower LIKE $2 ESCAPE '\\'
                             OR email_lower LIKE $2 ESCAPE '\\')
                      ORDER BY username_lower LIMIT $3"
                )))
                .bind(after.unwrap_or(""))
                .bind(pattern)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(user_from).collect()
            }

            async fn update_user(&self, u: &UserRow, expected_version: i64) -> Result<(), StoreError> {
                let n = sqlx::query(
                    "UPDATE users
                        SET username = $2, username_lower = $3, email = $4, email_lower = $5,
                            status = $6, password_phc = $7, profile = $8, version = $9,
                            updated_us = $10, password_changed_us = $11
                      WHERE user_id = $1 AND version = $12",
                )
                .bind(&u.user_id)
                .bind(&u.username)
                .bind(fold_case(&u.username))
                .bind(&u.email)
                .bind(u.email.as_deref().map(fold_case))
                .bind(u.status.as_str())
                .bind(&u.password_phc)
                .bind(to_json(&u.profile, "user profile")?)
                .bind(u.version)
                .bind(u.updated_us)
                .bind(u.password_changed_us)
                .bind(expected_version)
                .execute(&self.pool)
                .await
                .map_err(conflict)?
                .rows_affected();
                if n == 1 {
                    return Ok(());
                }
                Err(self
                    .cas_miss("SELECT version FROM users WHERE user_id = $1", &u.user_id)
                    .await)
            }

            async fn insert_code(&self, c: &CodeRow) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO auth_codes (code_hash, client_id, grant_json, created_us,
                       expires_us, used_us, family_id, access_jti, access_expires_us)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&c.code_hash)
                .bind(&c.grant.client_id)
                .bind(to_json(&c.grant, "code grant")?)
                .bind(c.created_us)
                .bind(c.expires_us)
                .bind(c.used_us)
                .bind(&c.family_id)
                .bind(&c.access_jti)
                .bind(c.access_expires_us)
                .execute(&self.pool)
                .await
                .map_err(conflict)?;
                Ok(())
            }

            async fn consume_code(
                &self,
                code_hash: &[u8],
                now_us: i64,
            ) -> Result<CodeUse, StoreError> {
                // One statement: of concurrent exchanges exactly one matches the unused row.
                let won = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE auth_codes SET used_us = $2
                      WHERE code_hash = $1 AND used_us IS NULL AND expires_us > $2
                      RETURNING {CODE_COLS}"
                )))
                .bind(code_hash)
                .bind(now_us)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(r) = won {
                    return Ok(CodeUse::Fresh(code_from(&r)?));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CODE_COLS} FROM auth_codes WHERE code_hash = $1"
                )))
                .bind(code_hash)
                .fetch_optional(&self.pool)
                .await?;
                match row.as_ref().map(code_from).transpose()? {
                    // Used before: a replay, whether or not it has expired since (it is
                    // kept for the replay window so what it produced can be revoked).
                    Some(c) if c.used_us.is_some() => Ok(CodeUse::Replayed(c)),
                    _ => Ok(CodeUse::Invalid),
                }
            }

            async fn record_code_tokens(
                &self,
                code_hash: &[u8],
                family_id: Option<&str>,
                access_jti: &str,
                access_expires_us: i64,
            ) -> Result<(), StoreError> {
                let n = sqlx::query(
                    "UPDATE auth_codes SET family_id = $2, access_jti = $3, access_expires_us = $4
                      WHERE code_hash = $1",
                )
                .bind(code_hash)
                .bind(family_id)
                .bind(access_jti)
                .bind(access_expires_us)
                .execute(&self.pool)
                .await?
                .rows_affected();
                if n == 1 {
                    Ok(())
                } else {
                    Err(StoreError::NotFound)
                }
            }

            async fn get_consent(
                &self,
                user_id: &str,
                client_id: &str,
            ) -> Result<Option<ConsentRow>, StoreError> {
                let row = sqlx::query(
                    "SELECT user_id, client_id, scopes, granted_us, expires_us FROM consents
                      WHERE user_id = $1 AND client_id = $2",
                )
                .bind(user_id)
                .bind(client_id)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(consent_from).transpose()
            }

            async fn put_consent(&self, c: &ConsentRow) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO consents (user_id, client_id, scopes, granted_us, expires_us)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (user_id, client_id) DO UPDATE
                        SET scopes = excluded.scopes, granted_us = excluded.granted_us,
                            expires_us = excluded.expires_us",
                )
                .bind(&c.user_id)
                .bind(&c.client_id)
                .bind(scopes_text(&c.scopes))
                .bind(c.granted_us)
                .bind(c.expires_us)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn delete_consents_for_user(&self, user_id: &str) -> Result<u64, StoreError> {
                Ok(sqlx::query("DELETE FROM consents WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }

            async fn get_or_insert_secret(
                &self,
                name: &str,
                sealed: &[u8],
            ) -> Result<Vec<u8>, StoreError> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO service_secrets (name, sealed, created_us)
                     VALUES ($1, $2, {})
                     ON CONFLICT (name) DO NOTHING",
                    $now_us
                )))
                .bind(name)
                .bind(sealed)
                .execute(&self.pool)
                .await?;
                Ok(
                    sqlx::query_scalar("SELECT sealed FROM service_secrets WHERE name = $1")
                        .bind(name)
                        .fetch_one(&self.pool)
                        .await?,
                )
            }

            async fn delete_expired(&self, now_us: i64, keep_used_us: i64) -> Result<u64, StoreError> {
                let mut tx = self.pool.begin().await?;
                let codes = sqlx::query(
                    "DELETE FROM auth_codes
                      WHERE (used_us IS NULL AND expires_us < $1)
                         OR (used_us IS NOT NULL AND expires_us < $2)",
                )
                .bind(now_us)
                .bind(now_us.saturating_sub(keep_used_us))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let consents = sqlx::query("DELETE FROM consents WHERE expires_us < $1")
                    .bind(now_us)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(codes + consents)
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

    const T0: i64 = 1_800_000_000_000_000;

    pub fn settings(name: &str) -> ClientSettings {
        ClientSettings {
            name: name.into(),
            public: false,
            auth_method: AuthMethod::ClientSecretBasic,
            grant_types: vec![GrantType::AuthorizationCode, GrantType::RefreshToken],
            redirect_uris: vec!["https://app.example/cb".into()],
            post_logout_redirect_uris: vec![],
            scopes: vec!["openid".into(), "profile".into()],
            jwks_json: None,
            access_ttl_seconds: 0,
            refresh_ttl_seconds: 0,
            id_ttl_seconds: 0,
            trusted: false,
            rate_limit_tier: String::new(),
            require_pkce: true,
            dynamically_registered: false,
        }
    }

    pub fn client(id: &str) -> ClientRow {
        ClientRow {
            client_id: id.into(),
            settings: settings(id),
            secret_hash: Some(vec![1; 32]),
            registration_token_hash: None,
            version: 1,
            created_us: T0,
            updated_us: T0,
            secret_rotated_us: None,
        }
    }

    fn user(id: &str, username: &str, email: Option<&str>) -> UserRow {
        let mut claims = serde_json::Map::new();
        claims.insert("name".into(), serde_json::Value::String(username.into()));
        UserRow {
            user_id: id.into(),
            username: username.into(),
            email: email.map(str::to_owned),
            status: UserStatus::Active,
            password_phc: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
            profile: UserProfile {
                email_verified: true,
                roles: vec!["admin".into()],
                claims,
            },
            version: 1,
            created_us: T0,
            updated_us: T0,
            password_changed_us: Some(T0),
        }
    }

    fn code(hash: &[u8], client_id: &str, expires_us: i64) -> CodeRow {
        CodeRow {
            code_hash: hash.to_vec(),
            grant: CodeGrant {
                client_id: client_id.into(),
                redirect_uri: "https://app.example/cb".into(),
                code_challenge: Some("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into()),
                user_id: "u1".into(),
                scope: "openid profile".into(),
                nonce: Some("n".into()),
                auth_time: 1_800_000_000,
                amr: vec!["pwd".into()],
                acr: "0".into(),
                session_id: "sid".into(),
            },
            created_us: T0,
            expires_us,
            used_us: None,
            family_id: None,
            access_jti: None,
            access_expires_us: None,
        }
    }

    pub async fn run(store: Arc<dyn AuthStore>) {
        store.ping().await.unwrap();
        clients(store.as_ref()).await;
        client_cas_race(store.clone()).await;
        users(store.as_ref()).await;
        user_cas_race(store.clone()).await;
        codes(store.as_ref()).await;
        code_single_use(store.clone()).await;
        consents(store.as_ref()).await;
        secrets(store.clone()).await;
        cleanup(store.as_ref()).await;
    }

    async fn clients(s: &dyn AuthStore) {
        let a = client("app-a");
        s.insert_client(&a).await.unwrap();
        assert!(matches!(
            s.insert_client(&a).await,
            Err(StoreError::Conflict)
        ));
        assert_eq!(s.get_client("app-a").await.unwrap(), Some(a.clone()));
        assert_eq!(s.get_client("nope").await.unwrap(), None);
        for id in ["app-b", "app-c", "app-d", "app-e"] {
            s.insert_client(&client(id)).await.unwrap();
        }
        // Paging: in client_id order, after the last id of the previous page.
        let p1 = s.list_clients(None, 2).await.unwrap();
        let ids = |v: &[ClientRow]| v.iter().map(|c| c.client_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&p1), ["app-a", "app-b"]);
        let p2 = s.list_clients(Some("app-b"), 2).await.unwrap();
        assert_eq!(ids(&p2), ["app-c", "app-d"]);
        let p3 = s.list_clients(Some("app-d"), 2).await.unwrap();
        assert_eq!(ids(&p3), ["app-e"]);
        assert!(s.list_clients(Some("app-e"), 2).await.unwrap().is_empty());

        // Compare-and-set: the right version writes, a stale one is told, a gone row too.
        let mut b = a.clone();
        b.settings.name = "renamed".into();
        b.version = 2;
        b.updated_us = T0 + 5;
        b.secret_hash = Some(vec![2; 32]);
        b.secret_rotated_us = Some(T0 + 5);
        s.update_client(&b, 1).await.unwrap();
        assert_eq!(s.get_client("app-a").await.unwrap(), Some(b.clone()));
        let mut stale = a.clone();
        stale.version = 2;
        assert!(matches!(
            s.update_client(&stale, 1).await,
            Err(StoreError::VersionMismatch)
        ));
        assert_eq!(s.get_client("app-a").await.unwrap(), Some(b));
        assert!(matches!(
            s.update_client(&client("ghost"), 0).await,
            Err(StoreError::NotFound)
        ));

        // Delete takes the client's codes and consents with it.
        s.insert_code(&code(b"del-code", "app-e", T0 + 1_000_000))
            .await
            .unwrap();
        s.put_consent(&ConsentRow {
            user_id: "u9".into(),
            client_id: "app-e".into(),
            scopes: vec!["openid".into()],
            granted_us: T0,
            expires_us: T0 + 1_000_000,
        })
        .await
        .unwrap();
        assert!(s.delete_client("app-e").await.unwrap());
        assert!(!s.delete_client("app-e").await.unwrap());
        assert_eq!(s.get_client("app-e").await.unwrap(), None);
        assert_eq!(
            s.consume_code(b"del-code", T0).await.unwrap(),
            CodeUse::Invalid
        );
        assert_eq!(s.get_consent("u9", "app-e").await.unwrap(), None);
    }

    /// 8 concurrent updates from the same version: exactly one wins, the rest are told.
    async fn client_cas_race(s: Arc<dyn AuthStore>) {
        s.insert_client(&client("race")).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client("race");
                c.settings.name = format!("writer {i}");
                c.version = 2;
                s.update_client(&c, 1).await
            }));
        }
        let (mut wins, mut lost) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => wins += 1,
                Err(StoreError::VersionMismatch) => lost += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!((wins, lost), (1, 7));
        assert_eq!(s.get_client("race").await.unwrap().unwrap().version, 2);
    }

    async fn users(s: &dyn AuthStore) {
        let alice = user("u1", "Alice", Some("Alice@Example.com"));
        s.insert_user(&alice).await.unwrap();
        assert_eq!(s.get_user("u1").await.unwrap(), Some(alice.clone()));
        assert_eq!(s.get_user("nope").await.unwrap(), None);
        // Username and email are unique ignoring case; the id too.
        for dup in [
            user("u2", "ALICE", None),
            user("u2", "alice2", Some("alice@example.COM")),
            user("u1", "other", None),
        ] {
            assert!(
                matches!(s.insert_user(&dup).await, Err(StoreError::Conflict)),
                "{dup:?}"
            );
        }
        // Many users without an email are fine.
        s.insert_user(&user("u2", "bob", None)).await.unwrap();
        s.insert_user(&user("u3", "carol", None)).await.unwrap();
        s.insert_user(&user("u4", "Alfred", Some("fred@corp.example")))
            .await
            .unwrap();
        s.insert_user(&user("u5", "al_x", None)).await.unwrap();
        assert_eq!(
            s.get_user_by_username("aLiCe").await.unwrap(),
            Some(alice.clone())
        );
        assert_eq!(s.get_user_by_username("nobody").await.unwrap(), None);

        let names = |v: &[UserRow]| v.iter().map(|u| u.username.clone()).collect::<Vec<_>>();
        // Ordered by lowercase username, paged after a lowercase username.
        let all = s.list_users(None, None, 100).await.unwrap();
        assert_eq!(names(&all), ["al_x", "Alfred", "Alice", "bob", "carol"]);
        let p1 = s.list_users(None, None, 2).await.unwrap();
        assert_eq!(names(&p1), ["al_x", "Alfred"]);
        let p2 = s.list_users(Some("alfred"), None, 2).await.unwrap();
        assert_eq!(names(&p2), ["Alice", "bob"]);
        // Prefix on username or email, ignoring case; LIKE wildcards are literal.
        let al = s.list_users(None, Some("AL"), 100).await.unwrap();
        assert_eq!(names(&al), ["al_x", "Alfred", "Alice"]);
        let fred = s.list_users(None, Some("FRED@"), 100).await.unwrap();
        assert_eq!(names(&fred), ["Alfred"]);
        let underscore = s.list_users(None, Some("al_"), 100).await.unwrap();
        assert_eq!(names(&underscore), ["al_x"]);
        assert!(s.list_users(None, Some("%"), 100).await.unwrap().is_empty());

        // CAS update; a rename onto a taken name (any case) is a conflict.
        let mut a2 = alice.clone();
        a2.status = UserStatus::Disabled;
        a2.email = Some("new@example.com".into());
        a2.version = 2;
        a2.updated_us = T0 + 9;
        s.update_user(&a2, 1).await.unwrap();
        assert_eq!(s.get_user("u1").await.unwrap(), Some(a2.clone()));
        assert!(matches!(
            s.update_user(&a2, 1).await,
            Err(StoreError::VersionMismatch)
        ));
        let mut clash = a2.clone();
        clash.username = "BOB".into();
        clash.version = 3;
        assert!(matches!(
            s.update_user(&clash, 2).await,
            Err(StoreError::Conflict)
        ));
        assert!(matches!(
            s.update_user(&user("ghost", "ghost", None), 1).await,
            Err(StoreError::NotFound)
        ));
        // The old email is free again.
        s.insert_user(&user("u6", "dave", Some("ALICE@example.com")))
            .await
            .unwrap();
    }

    async fn user_cas_race(s: Arc<dyn AuthStore>) {
        s.insert_user(&user("ur", "racer", None)).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut u = user("ur", "racer", None);
                u.profile.roles = vec![format!("r{i}")];
                u.version = 2;
                s.update_user(&u, 1).await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => wins += 1,
                Err(StoreError::VersionMismatch) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(wins, 1);
    }

    async fn codes(s: &dyn AuthStore) {
        let c = code(b"c1", "app-a", T0 + 60_000_000);
        s.insert_code(&c).await.unwrap();
        assert!(matches!(s.insert_code(&c).await, Err(StoreError::Conflict)));
        assert_eq!(
            s.consume_code(b"unknown", T0).await.unwrap(),
            CodeUse::Invalid
        );
        let CodeUse::Fresh(got) = s.consume_code(b"c1", T0 + 1).await.unwrap() else {
            panic!("first use must be fresh")
        };
        assert_eq!(got.grant, c.grant);
        assert_eq!(got.used_us, Some(T0 + 1));
        // A replay before the tokens are recorded: replayed, nothing to revoke yet.
        let CodeUse::Replayed(r) = s.consume_code(b"c1", T0 + 2).await.unwrap() else {
            panic!("second use must be a replay")
        };
        assert_eq!((r.family_id, r.access_jti), (None, None));
        s.record_code_tokens(b"c1", Some("fam-1"), "jti-1", T0 + 300)
            .await
            .unwrap();
        let CodeUse::Replayed(r) = s.consume_code(b"c1", T0 + 3).await.unwrap() else {
            panic!("replay")
        };
        assert_eq!(
            (
                r.family_id.as_deref(),
                r.access_jti.as_deref(),
                r.access_expires_us,
                r.used_us
            ),
            (Some("fam-1"), Some("jti-1"), Some(T0 + 300), Some(T0 + 1))
        );
        assert!(matches!(
            s.record_code_tokens(b"nope", None, "j", 1).await,
            Err(StoreError::NotFound)
        ));
        // Expired and unused: invalid, at and after its expiry.
        s.insert_code(&code(b"c2", "app-a", T0 + 10)).await.unwrap();
        assert_eq!(
            s.consume_code(b"c2", T0 + 10).await.unwrap(),
            CodeUse::Invalid
        );
        assert_eq!(
            s.consume_code(b"c2", T0 + 11).await.unwrap(),
            CodeUse::Invalid
        );
    }

    /// 8 parallel exchanges of one code: exactly one `Fresh`, seven `Replayed`.
    async fn code_single_use(s: Arc<dyn AuthStore>) {
        s.insert_code(&code(b"race-code", "app-a", T0 + 60_000_000))
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.consume_code(b"race-code", T0 + 5).await.unwrap()
            }));
        }
        let (mut fresh, mut replayed) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                CodeUse::Fresh(_) => fresh += 1,
                CodeUse::Replayed(_) => replayed += 1,
                CodeUse::Invalid => panic!("a known unexpired code is never invalid"),
            }
        }
        assert_eq!((fresh, replayed), (1, 7));
    }

    async fn consents(s: &dyn AuthStore) {
        let c = ConsentRow {
            user_id: "u1".into(),
            client_id: "app-a".into(),
            scopes: vec!["profile".into(), "openid".into(), "profile".into()],
            granted_us: T0,
            expires_us: T0 + 100,
        };
        s.put_consent(&c).await.unwrap();
        let got = s.get_consent("u1", "app-a").await.unwrap().unwrap();
        assert_eq!(got.scopes, ["openid", "profile"], "sorted, de-duplicated");
        // Replace, not add.
        let c2 = ConsentRow {
            scopes: vec!["email".into()],
            granted_us: T0 + 50,
            expires_us: T0 + 500,
            ..c.clone()
        };
        s.put_consent(&c2).await.unwrap();
        assert_eq!(s.get_consent("u1", "app-a").await.unwrap(), Some(c2));
        assert_eq!(s.get_consent("u1", "app-b").await.unwrap(), None);
        s.put_consent(&ConsentRow {
            client_id: "app-b".into(),
            ..c.clone()
        })
        .await
        .unwrap();
        assert_eq!(s.delete_consents_for_user("u1").await.unwrap(), 2);
        assert_eq!(s.get_consent("u1", "app-a").await.unwrap(), None);
    }

    /// Replicas starting together: every caller gets the one value stored first.
    async fn secrets(s: Arc<dyn AuthStore>) {
        let mut tasks = Vec::new();
        for i in 0..8_u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.get_or_insert_secret("client-secret-key", &[i; 48])
                    .await
                    .unwrap()
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        assert!(got.iter().all(|v| v == &got[0] && v.len() == 48));
        assert_eq!(
            s.get_or_insert_secret("client-secret-key", &[99; 48])
                .await
                .unwrap(),
            got[0]
        );
        assert_eq!(
            s.get_or_insert_secret("page-key", &[7; 48]).await.unwrap(),
            vec![7; 48]
        );
    }

    async fn cleanup(s: &dyn AuthStore) {
        let now = T0 + 1_000_000_000;
        let keep = 600_000_000;
        // Unused and expired: goes. Used, expired within the replay window: stays.
        s.insert_code(&code(b"old-unused", "app-a", now - 1))
            .await
            .unwrap();
        s.insert_code(&code(b"used-recent", "app-a", now - 10))
            .await
            .unwrap();
        s.insert_code(&code(b"live", "app-a", now + 1_000))
            .await
            .unwrap();
        assert!(matches!(
            s.consume_code(b"used-recent", now - 20).await.unwrap(),
            CodeUse::Fresh(_)
        ));
        s.put_consent(&ConsentRow {
            user_id: "u7".into(),
            client_id: "app-a".into(),
            scopes: vec!["openid".into()],
            granted_us: T0,
            expires_us: now - 1,
        })
        .await
        .unwrap();
        s.put_consent(&ConsentRow {
            user_id: "u8".into(),
            client_id: "app-a".into(),
            scopes: vec!["openid".into()],
            granted_us: T0,
            expires_us: now + 1,
        })
        .await
        .unwrap();
        // c1, c2 (earlier tests) and race-code expired long ago: c2 unused, the others used.
        let n = s.delete_expired(now, keep).await.unwrap();
        assert!(n >= 3, "{n}");
        assert_eq!(
            s.consume_code(b"old-unused", now - 100).await.unwrap(),
            CodeUse::Invalid
        );
        assert!(matches!(
            s.consume_code(b"used-recent", now).await.unwrap(),
            CodeUse::Replayed(_)
        ));
        assert!(matches!(
            s.consume_code(b"live", now).await.unwrap(),
            CodeUse::Fresh(_)
        ));
        assert_eq!(s.get_consent("u7", "app-a").await.unwrap(), None);
        assert!(s.get_consent("u8", "app-a").await.unwrap().is_some());
        // After the replay window the used code goes too.
        s.delete_expired(now + keep, keep).await.unwrap();
        assert_eq!(
            s.consume_code(b"used-recent", now).await.unwrap(),
            CodeUse::Invalid
        );
    }
}
