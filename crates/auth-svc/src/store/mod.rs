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
    /// SHA-256 of the RFC 7592 registration access token, for dynamically registered
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

/// PLACEHOLDER until the SQL implementation lands (the admin helper replaces this whole
/// macro): every method fails, so nothing built on it can pass a test.
macro_rules! pending_store {
    ($t:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::AuthStore for $t {
            async fn ping(&self) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn insert_client(&self, _c: &ClientRow) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn get_client(&self, _id: &str) -> Result<Option<ClientRow>, StoreError> {
                Err(pending())
            }
            async fn list_clients(
                &self,
                _a: Option<&str>,
                _l: u32,
            ) -> Result<Vec<ClientRow>, StoreError> {
                Err(pending())
            }
            async fn update_client(&self, _c: &ClientRow, _v: i64) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn delete_client(&self, _id: &str) -> Result<bool, StoreError> {
                Err(pending())
            }
            async fn insert_user(&self, _u: &UserRow) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn get_user(&self, _id: &str) -> Result<Option<UserRow>, StoreError> {
                Err(pending())
            }
            async fn get_user_by_username(&self, _u: &str) -> Result<Option<UserRow>, StoreError> {
                Err(pending())
            }
            async fn list_users(
                &self,
                _a: Option<&str>,
                _p: Option<&str>,
                _l: u32,
            ) -> Result<Vec<UserRow>, StoreError> {
                Err(pending())
            }
            async fn update_user(&self, _u: &UserRow, _v: i64) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn insert_code(&self, _c: &CodeRow) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn consume_code(&self, _h: &[u8], _n: i64) -> Result<CodeUse, StoreError> {
                Err(pending())
            }
            async fn record_code_tokens(
                &self,
                _h: &[u8],
                _f: Option<&str>,
                _j: &str,
                _e: i64,
            ) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn get_consent(
                &self,
                _u: &str,
                _c: &str,
            ) -> Result<Option<ConsentRow>, StoreError> {
                Err(pending())
            }
            async fn put_consent(&self, _c: &ConsentRow) -> Result<(), StoreError> {
                Err(pending())
            }
            async fn delete_consents_for_user(&self, _u: &str) -> Result<u64, StoreError> {
                Err(pending())
            }
            async fn get_or_insert_secret(
                &self,
                _n: &str,
                _s: &[u8],
            ) -> Result<Vec<u8>, StoreError> {
                Err(pending())
            }
            async fn delete_expired(&self, _n: i64, _k: i64) -> Result<u64, StoreError> {
                Err(pending())
            }
        }
    };
}

fn pending() -> StoreError {
    StoreError::Corrupt("the auth store is not implemented yet".into())
}

pending_store!(postgres::PgAuthStore);
pending_store!(sqlite::SqliteAuthStore);
