//! Users: the identity store the login page checks. argon2id passwords on the blocking
//! pool behind a semaphore (`server.passwords`), rehashed on login when the parameters
//! change.
//!
//! Why it looks like this:
//! - A login for an unknown user (or one without a password) still runs one argon2
//!   verification, against a fixed dummy hash, so the response time does not tell which
//!   usernames exist.
//! - A disabled or locked user is refused only after the password matched: without the
//!   password nobody learns the account's status.
//! - MFA, password policy and lockout come in their own issue. Their seams are
//!   [`LoginPolicy`] (consulted before and after the password check) and
//!   [`AuthServer::check_password_policy`] (every password set goes through it).
//! - Every change is compare-and-set on the row's version; disabling or locking a user
//!   ends their sessions and revokes their tokens at once.

use async_trait::async_trait;
use sec_common::error::{Error, ErrorCode};
use sec_common::events::{Actor, ActorKind, Outcome, SecurityEvent, Severity};
use sec_proto::session::v1::RevokeAllForUserRequest;
use sec_proto::token::v1::{RevokeTokenRequest, revoke_token_request::Target};
use serde_json::{Map, Value};

use crate::clients::store_error;
use crate::engine::AuthServer;
use crate::store::{StoreError, UserProfile, UserRow, UserStatus};

/// Why a password login failed. The facade shows the same message for all of them
/// except `Unavailable`.
#[derive(Debug)]
pub enum LoginFailure {
    /// Unknown user, no password set, or wrong password (indistinguishable to the caller).
    InvalidCredentials,
    Disabled,
    Locked,
    Unavailable(Error),
}

impl LoginFailure {
    /// The metric outcome and event reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            LoginFailure::InvalidCredentials => "invalid_credentials",
            LoginFailure::Disabled => "disabled",
            LoginFailure::Locked => "locked",
            LoginFailure::Unavailable(_) => "error",
        }
    }
}

/// The seam for lockout, throttling and MFA (their own issue). `before_password` runs
/// before any argon2 work (a lockout refuses there, without revealing whether the password
/// was right); `after_failure` / `after_success` see the outcome (failure counters, a
/// second factor that refuses with `LoginFailure::Locked` or asks for more).
#[async_trait]
pub trait LoginPolicy: Send + Sync {
    async fn before_password(
        &self,
        _user: Option<&UserRow>,
        _source_ip: &str,
    ) -> Result<(), LoginFailure> {
        Ok(())
    }
    async fn after_failure(&self, _user: Option<&UserRow>, _source_ip: &str) {}
    async fn after_success(&self, _user: &UserRow, _source_ip: &str) -> Result<(), LoginFailure> {
        Ok(())
    }
}

/// Today's policy: none.
pub struct NoLoginPolicy;

impl LoginPolicy for NoLoginPolicy {}

/// Limits of user fields.
pub const MAX_USERNAME_CHARS: usize = 64;
pub const MAX_EMAIL_BYTES: usize = 254;
pub const MAX_CLAIMS_BYTES: usize = 4 * 1024;
pub const MAX_ROLES: usize = 50;
pub const MAX_ROLE_CHARS: usize = 64;
pub const MIN_PASSWORD_BYTES: usize = 8;
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// OIDC Core §5.1 claims a user's profile may hold (and the `profile` scope releases).
pub const PROFILE_CLAIMS: &[&str] = &[
    "name",
    "given_name",
    "family_name",
    "middle_name",
    "nickname",
    "preferred_username",
    "profile",
    "picture",
    "website",
    "gender",
    "birthdate",
    "zoneinfo",
    "locale",
    "phone_number",
];

/// The argon2id parameters hashes are made with today (argon2's defaults, OWASP's
/// recommendation): m=19456 KiB, t=2, p=1.
pub const CURRENT_ARGON2_PARAMS: (u32, u32, u32) = (19_456, 2, 1);

/// Verified for unknown users so that their logins take as long as real ones. Same
/// parameters as real hashes; no password matches it (its digest is not an argon2 output
/// of any known input, and the verification compares all 32 bytes).
const DUMMY_PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2VjLWF1dGgtZHVtbXk$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// A user to create.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    /// `None`: a UUID v4 is generated.
    pub user_id: Option<String>,
    pub username: String,
    pub email: Option<String>,
    /// `None`: active.
    pub status: Option<UserStatus>,
    pub profile: UserProfile,
}

/// What an update replaces (username and id never change).
#[derive(Debug, Clone)]
pub struct UserUpdate {
    pub email: Option<String>,
    pub status: UserStatus,
    pub profile: UserProfile,
}

/// Whether a PHC string was made with other parameters (or another algorithm) than today's.
pub fn needs_rehash(phc: &str) -> bool {
    let mut parts = phc.split('$');
    // "", "argon2id", "v=19", "m=..,t=..,p=..", salt, hash
    let (Some(""), Some(alg), Some(ver), Some(params)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return true;
    };
    if alg != "argon2id" || ver != "v=19" {
        return true;
    }
    let (mut m, mut t, mut p) = (None, None, None);
    for kv in params.split(',') {
        match kv.split_once('=') {
            Some(("m", v)) => m = v.parse::<u32>().ok(),
            Some(("t", v)) => t = v.parse::<u32>().ok(),
            Some(("p", v)) => p = v.parse::<u32>().ok(),
            _ => return true,
        }
    }
    let (cm, ct, cp) = CURRENT_ARGON2_PARAMS;
    (m, t, p) != (Some(cm), Some(ct), Some(cp))
}

pub fn valid_username(u: &str) -> bool {
    (1..=MAX_USERNAME_CHARS).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

fn check_email(e: &str) -> Result<(), Error> {
    let bad = |m: &'static str| Err(Error::invalid("email", m));
    if e.len() > MAX_EMAIL_BYTES {
        return bad("at most 254 bytes");
    }
    if e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain whitespace or control characters");
    }
    match e.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(())
        }
        _ => bad("must be local@domain with exactly one @"),
    }
}

fn check_profile(p: &UserProfile) -> Result<(), Error> {
    if p.roles.len() > MAX_ROLES {
        return Err(Error::invalid("roles", "at most 50 roles"));
    }
    for r in &p.roles {
        let n = r.chars().count();
        if n == 0 || n > MAX_ROLE_CHARS || r.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::invalid(
                "roles",
                "each role is 1 to 64 characters without whitespace",
            ));
        }
    }
    for (k, v) in &p.claims {
        if !PROFILE_CLAIMS.contains(&k.as_str()) {
            let shown: String = k.chars().take(64).collect();
            return Err(Error::invalid(
                "claims_json",
                format!("{shown:?} is not an OIDC profile claim (OIDC Core §5.1)"),
            ));
        }
        if !v.is_string() {
            return Err(Error::invalid(
                "claims_json",
                "claim values must be strings",
            ));
        }
    }
    let size = serde_json::to_string(&p.claims).map_or(usize::MAX, |s| s.len());
    if size > MAX_CLAIMS_BYTES {
        return Err(Error::invalid("claims_json", "at most 4 KiB"));
    }
    Ok(())
}

/// Parses `claims_json` (empty: no claims) into a JSON object of strings.
pub fn parse_claims(json: &str) -> Result<Map<String, Value>, Error> {
    if json.trim().is_empty() {
        return Ok(Map::new());
    }
    if json.len() > MAX_CLAIMS_BYTES {
        return Err(Error::invalid("claims_json", "at most 4 KiB"));
    }
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Error::invalid(
            "claims_json",
            "must be a JSON object of strings",
        )),
    }
}

impl AuthServer {
    /// The login policy (lockout, MFA): none yet. The issue that brings one adds it to
    /// [`AuthServer`] and returns it here.
    pub fn login_policy(&self) -> &dyn LoginPolicy {
        &NoLoginPolicy
    }

    /// Every password set (create, set_password) passes here. Today: 8 to 1024 bytes.
    /// The password-policy issue adds its rules (length, breached lists, user context).
    pub fn check_password_policy(
        &self,
        password: &str,
        _user: Option<&UserRow>,
    ) -> Result<(), Error> {
        if password.len() < MIN_PASSWORD_BYTES || password.len() > MAX_PASSWORD_BYTES {
            return Err(Error::invalid("password", "must be 8 to 1024 bytes"));
        }
        Ok(())
    }

    pub async fn create_user(
        &self,
        new: NewUser,
        password: Option<&str>,
        actor: Actor,
    ) -> Result<UserRow, Error> {
        let user_id = match new.user_id {
            Some(id) if !crate::clients::valid_client_id(&id) => {
                return Err(Error::invalid(
                    "user_id",
                    "must be 1 to 128 characters of [A-Za-z0-9._~-]",
                ));
            }
            Some(id) => id,
            None => uuid::Uuid::new_v4().to_string(),
        };
        if !valid_username(&new.username) {
            return Err(Error::invalid(
                "username",
                "must be 1 to 64 characters of [A-Za-z0-9._@-]",
            ));
        }
        if let Some(e) = &new.email {
            check_email(e)?;
        }
        check_profile(&new.profile)?;
        let phc = match password {
            Some(p) => {
                self.check_password_policy(p, None)?;
                Some(self.passwords.hash(p).await?)
            }
            None => None,
        };
        let now = self.now_us();
        let row = UserRow {
            user_id,
            username: new.username,
            email: new.email,
            status: new.status.unwrap_or(UserStatus::Active),
            password_changed_us: phc.as_ref().map(|_| now),
            password_phc: phc,
            profile: new.profile,
            version: 1,
            created_us: now,
            updated_us: now,
        };
        self.store.insert_user(&row).await.map_err(|e| match e {
            StoreError::Conflict => Error::new(
                ErrorCode::AlreadyExists,
                "the user id, username or email is taken",
            )
            .with_field("username"),
            e => store_error(e, "user"),
        })?;
        let mut e = self.user_event("sec.auth.user.created", &row.user_id, actor);
        e.details
            .insert("status".into(), row.status.as_str().into());
        self.publish(e);
        Ok(row)
    }

    pub async fn get_user(&self, user_id: &str) -> Result<UserRow, Error> {
        self.find_user(user_id)
            .await?
            .ok_or_else(|| Error::not_found("user not found"))
    }

    pub async fn find_user(&self, user_id: &str) -> Result<Option<UserRow>, Error> {
        if user_id.is_empty() || user_id.len() > 128 {
            return Ok(None);
        }
        self.store
            .get_user(user_id)
            .await
            .map_err(|e| store_error(e, "user"))
    }

    /// By username, ignoring case; NotFound.
    pub async fn get_user_by_username(&self, username: &str) -> Result<UserRow, Error> {
        if !valid_username(username) {
            return Err(Error::not_found("user not found"));
        }
        self.store
            .get_user_by_username(username)
            .await
            .map_err(|e| store_error(e, "user"))?
            .ok_or_else(|| Error::not_found("user not found"))
    }

    pub async fn list_users(
        &self,
        after: Option<&str>,
        prefix: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UserRow>, Error> {
        if prefix.is_some_and(|p| p.len() > MAX_EMAIL_BYTES) {
            return Err(Error::invalid("prefix", "at most 254 bytes"));
        }
        self.store
            .list_users(after, prefix, limit)
            .await
            .map_err(|e| store_error(e, "user"))
    }

    /// Replaces email, status and profile if the stored version is `expected_version`
    /// (else ABORTED). To disabled or locked: the user's sessions end and tokens are
    /// revoked.
    pub async fn update_user(
        &self,
        user_id: &str,
        update: UserUpdate,
        expected_version: i64,
        actor: Actor,
    ) -> Result<UserRow, Error> {
        if let Some(e) = &update.email {
            check_email(e)?;
        }
        check_profile(&update.profile)?;
        let current = self.get_user(user_id).await?;
        if current.version != expected_version {
            return Err(store_error(StoreError::VersionMismatch, "user"));
        }
        let mut row = current.clone();
        row.email = update.email;
        row.status = update.status;
        row.profile = update.profile;
        row.version = expected_version + 1;
        row.updated_us = self.now_us();
        self.store
            .update_user(&row, expected_version)
            .await
            .map_err(|e| match e {
                StoreError::Conflict => {
                    Error::new(ErrorCode::AlreadyExists, "the email is taken").with_field("email")
                }
                e => store_error(e, "user"),
            })?;
        let event_type = match (current.status, row.status) {
            (before, UserStatus::Disabled) if before != UserStatus::Disabled => {
                "sec.auth.user.disabled"
            }
            (before, UserStatus::Locked) if before != UserStatus::Locked => "sec.auth.user.locked",
            _ => "sec.auth.user.updated",
        };
        let mut e = self.user_event(event_type, user_id, actor);
        e.details
            .insert("status".into(), row.status.as_str().into());
        e.details.insert("version".into(), row.version.to_string());
        if row.status != UserStatus::Active {
            let (sessions, tokens) = self.end_user_access(user_id, true).await;
            e.details
                .insert("sessions_revoked".into(), sessions.to_string());
            e.details
                .insert("tokens_revoked".into(), tokens.to_string());
            if !(sessions && tokens) {
                e.severity = Severity::Medium as i32;
            }
        }
        self.publish(e);
        Ok(row)
    }

    /// Sets the password (argon2id). Ends the user's sessions unless `keep_sessions`.
    /// Not a read-modify-write of anything the caller read, so a concurrent change of
    /// another field is retried on the fresh row (the new hash is kept).
    pub async fn set_password(
        &self,
        user_id: &str,
        password: &str,
        keep_sessions: bool,
        actor: Actor,
    ) -> Result<UserRow, Error> {
        let mut current = self.get_user(user_id).await?;
        self.check_password_policy(password, Some(&current))?;
        let phc = self.passwords.hash(password).await?;
        let mut attempts = 0;
        let row = loop {
            let now = self.now_us();
            let mut row = current.clone();
            row.password_phc = Some(phc.clone());
            row.password_changed_us = Some(now);
            row.updated_us = now;
            row.version = current.version + 1;
            match self.store.update_user(&row, current.version).await {
                Ok(()) => break row,
                Err(StoreError::VersionMismatch) if attempts < 3 => {
                    attempts += 1;
                    current = self.get_user(user_id).await?;
                }
                Err(e) => return Err(store_error(e, "user")),
            }
        };
        let mut e = self.user_event("sec.auth.user.password_changed", user_id, actor);
        if keep_sessions {
            e.details.insert("sessions_revoked".into(), "kept".into());
        } else {
            let (sessions, _) = self.end_user_access(user_id, false).await;
            e.details
                .insert("sessions_revoked".into(), sessions.to_string());
        }
        self.publish(e);
        Ok(row)
    }

    /// Ends the user's sessions and (if `tokens`) revokes their tokens; whether each
    /// worked (failures are logged: the status change itself stands).
    async fn end_user_access(&self, user_id: &str, tokens: bool) -> (bool, bool) {
        let sessions = match self
            .sessions
            .clone()
            .revoke_all_for_user(RevokeAllForUserRequest {
                user_id: user_id.to_owned(),
            })
            .await
        {
            Ok(_) => true,
            Err(s) => {
                tracing::warn!(user_id, error = %s.message(), "ending a user's sessions failed");
                false
            }
        };
        if !tokens {
            return (sessions, false);
        }
        let revoked = match self
            .tokens
            .clone()
            .revoke_token(RevokeTokenRequest {
                target: Some(Target::Subject(user_id.to_owned())),
                reason: "user disabled".into(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => true,
            Err(s) => {
                tracing::warn!(user_id, error = %s.message(), "revoking a user's tokens failed");
                false
            }
        };
        (sessions, revoked)
    }

    /// Checks a username and password. Emits `sec.auth.login.succeeded` /
    /// `sec.auth.login.failed` and counts the outcome; rehashes the password when the
    /// argon2 parameters changed.
    pub async fn verify_login(
        &self,
        username: &str,
        password: &str,
        source_ip: &str,
    ) -> Result<UserRow, LoginFailure> {
        let result = self.verify_login_inner(username, password, source_ip).await;
        match &result {
            Ok(u) => {
                self.metrics.login("success");
                let mut e = self.event("sec.auth.login.succeeded");
                e.actor = Some(user_actor(&u.user_id));
                e.subject = u.user_id.clone();
                e.source_ip = source_ip.to_owned();
                e.details.insert("username".into(), u.username.clone());
                e.details.insert("method".into(), "password".into());
                self.publish(e);
            }
            Err((failure, reason, user)) => {
                self.metrics.login(failure.as_str());
                let mut e = self.failure_event("sec.auth.login.failed");
                e.source_ip = source_ip.to_owned();
                e.details.insert("reason".into(), (*reason).into());
                e.details.insert("method".into(), "password".into());
                if let Some(u) = user {
                    e.actor = Some(user_actor(&u.user_id));
                    e.subject = u.user_id.clone();
                    e.details.insert("username".into(), u.username.clone());
                } else {
                    e.actor = Some(Actor {
                        kind: ActorKind::Anonymous as i32,
                        id: String::new(),
                    });
                }
                if matches!(failure, LoginFailure::Disabled | LoginFailure::Locked) {
                    e.outcome = Outcome::Denied as i32;
                }
                self.publish(e);
            }
        }
        result.map_err(|(f, _, _)| f)
    }

    /// The check itself; the failure carries its event reason and the user when known.
    async fn verify_login_inner(
        &self,
        username: &str,
        password: &str,
        source_ip: &str,
    ) -> Result<UserRow, (LoginFailure, &'static str, Option<UserRow>)> {
        if password.len() > MAX_PASSWORD_BYTES {
            // No password this long can be set: refuse without spending argon2 on it.
            return Err((LoginFailure::InvalidCredentials, "password_too_long", None));
        }
        let user = if valid_username(username) {
            self.store
                .get_user_by_username(username)
                .await
                .map_err(|e| {
                    let e = store_error(e, "user");
                    (LoginFailure::Unavailable(e), "error", None)
                })?
        } else {
            None
        };
        let policy = self.login_policy();
        policy
            .before_password(user.as_ref(), source_ip)
            .await
            .map_err(|f| {
                let reason = f.as_str();
                (f, reason, user.clone())
            })?;
        let (phc, reason) = match &user {
            None => (DUMMY_PHC, "unknown_user"),
            Some(u) => match &u.password_phc {
                None => (DUMMY_PHC, "no_password"),
                Some(p) => (p.as_str(), "wrong_password"),
            },
        };
        let ok = self
            .passwords
            .verify(password, phc)
            .await
            .map_err(|e| (LoginFailure::Unavailable(e), "error", user.clone()))?;
        let user = match user {
            Some(u) if ok && u.password_phc.is_some() => u,
            other => {
                policy.after_failure(other.as_ref(), source_ip).await;
                return Err((LoginFailure::InvalidCredentials, reason, other));
            }
        };
        match user.status {
            UserStatus::Active => {}
            UserStatus::Disabled => {
                return Err((LoginFailure::Disabled, "disabled", Some(user)));
            }
            UserStatus::Locked => return Err((LoginFailure::Locked, "locked", Some(user))),
        }
        policy.after_success(&user, source_ip).await.map_err(|f| {
            let reason = f.as_str();
            (f, reason, Some(user.clone()))
        })?;
        Ok(self.rehash_if_needed(user, password).await)
    }

    /// After a successful login with an outdated hash: stores a fresh one (CAS; if the
    /// user changed meanwhile the rehash waits for the next login).
    async fn rehash_if_needed(&self, user: UserRow, password: &str) -> UserRow {
        if !user.password_phc.as_deref().is_some_and(needs_rehash) {
            return user;
        }
        let phc = match self.passwords.hash(password).await {
            Ok(p) => p,
            Err(_) => return user,
        };
        let mut row = user.clone();
        row.password_phc = Some(phc);
        row.version = user.version + 1;
        row.updated_us = self.now_us();
        match self.store.update_user(&row, user.version).await {
            Ok(()) => row,
            Err(StoreError::VersionMismatch) => user,
            Err(e) => {
                tracing::warn!(error = %e, "storing a rehashed password failed");
                user
            }
        }
    }

    /// The OIDC claims of `u` released by `scopes`: `sub` always; `profile` → the profile
    /// claims, `preferred_username` (the username) and `updated_at` (unix seconds);
    /// `email` → `email` and `email_verified` when the user has an email.
    pub fn user_claims(&self, u: &UserRow, scopes: &[String]) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("sub".into(), Value::String(u.user_id.clone()));
        if scopes.iter().any(|s| s == "profile") {
            for (k, v) in &u.profile.claims {
                if PROFILE_CLAIMS.contains(&k.as_str()) && v.is_string() {
                    out.insert(k.clone(), v.clone());
                }
            }
            out.insert(
                "preferred_username".into(),
                Value::String(u.username.clone()),
            );
            out.insert("updated_at".into(), Value::from(u.updated_us / 1_000_000));
        }
        if scopes.iter().any(|s| s == "email")
            && let Some(email) = &u.email
        {
            out.insert("email".into(), Value::String(email.clone()));
            out.insert(
                "email_verified".into(),
                Value::Bool(u.profile.email_verified),
            );
        }
        out
    }

    fn user_event(&self, event_type: &str, user_id: &str, actor: Actor) -> SecurityEvent {
        let mut e = self.event(event_type);
        e.actor = Some(actor);
        e.subject = user_id.to_owned();
        e
    }
}

fn user_actor(user_id: &str) -> Actor {
    Actor {
        kind: ActorKind::User as i32,
        id: user_id.to_owned(),
    }
}

/// An [`AuthServer`] on a fresh SQLite store with a manual clock and collected events, for
/// unit tests. Its token-svc and session-svc channels point at a closed port, so calls to
/// them fail the way an unreachable peer does.
#[cfg(test)]
pub(crate) mod test_server {
    use std::sync::{Arc, Mutex};

    use sec_common::clock::{ManualClock, SharedClock};
    use sec_common::events::SecurityEvent;
    use sec_common::grpc::BearerToken;
    use sec_proto::session::v1::session_service_client::SessionServiceClient;
    use sec_proto::token::v1::token_service_client::TokenServiceClient;

    use crate::engine::{AuthMetrics, AuthServer};

    pub struct TestServer {
        pub server: Arc<AuthServer>,
        pub events: Arc<Mutex<Vec<SecurityEvent>>>,
        path: std::path::PathBuf,
    }

    impl TestServer {
        pub fn events_of(&self, event_type: &str) -> Vec<SecurityEvent> {
            self.events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.r#type == event_type)
                .cloned()
                .collect()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
            }
        }
    }

    pub async fn new() -> TestServer {
        let path = std::env::temp_dir().join(format!("auth-unit-{}.db", uuid::Uuid::new_v4()));
        let pool = sec_common::storage::connect_sqlite(&path, 4).await.unwrap();
        sqlx::migrate!("../../migrations/auth/sqlite")
            .run(&pool)
            .await
            .unwrap();
        let clock = ManualClock::new(chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap());
        let shared: SharedClock = clock;
        let dead = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let bearer = BearerToken::new(None).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let server = Arc::new(AuthServer {
            cfg: crate::OAuthConfig::default(),
            store: Arc::new(crate::store::sqlite::SqliteAuthStore::new(pool)),
            tokens: TokenServiceClient::with_interceptor(dead.clone(), bearer.clone()),
            sessions: SessionServiceClient::with_interceptor(dead, bearer),
            secrets: sec_common::secret::KeyedHasher::new(&[7; 32]).unwrap(),
            page_key: sec_common::secret::KeyedHasher::new(&[8; 32]).unwrap(),
            passwords: sec_common::password::PasswordHasher::new(2),
            kv: sec_common::storage::Kv::Memory(Arc::new(sec_common::storage::MemoryKv::new(
                shared.clone(),
            ))),
            clock: shared,
            emit: Arc::new(move |e| sink.lock().unwrap().push(e)),
            metrics: AuthMetrics::default(),
            client_cache: crate::engine::ClientCache::new(0),
            admin:
                Arc::new(
                    sec_common::auth::Authenticator::from_config(
                        &sec_common::config::Config::default(),
                    )
                    .unwrap(),
                ),
        });
        TestServer {
            server,
            events,
            path,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sec_common::error::ErrorCode;
    use sec_common::events::ActorKind;

    use super::*;

    fn admin() -> Actor {
        Actor {
            kind: ActorKind::User as i32,
            id: "admin".into(),
        }
    }

    fn new_user(name: &str, email: Option<&str>) -> NewUser {
        NewUser {
            username: name.into(),
            email: email.map(str::to_owned),
            ..NewUser::default()
        }
    }

    #[test]
    fn needs_rehash_compares_parameters() {
        assert!(!needs_rehash(DUMMY_PHC));
        assert!(needs_rehash(
            "$argon2id$v=19$m=8192,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        ));
        assert!(needs_rehash(
            "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        ));
        assert!(needs_rehash("garbage"));
        let current = sec_common::password::hash_blocking("pw-current").unwrap();
        assert!(!needs_rehash(&current), "{current}");
    }

    #[tokio::test]
    async fn user_fields_are_validated_naming_the_field() {
        let t = test_server::new().await;
        let s = &t.server;
        let field = |r: Result<UserRow, Error>| r.unwrap_err().field.unwrap_or_default();
        assert_eq!(
            field(
                s.create_user(new_user("bad name", None), None, admin())
                    .await
            ),
            "username"
        );
        assert_eq!(
            field(
                s.create_user(new_user(&"a".repeat(65), None), None, admin())
                    .await
            ),
            "username"
        );
        for bad in [
            "nope",
            "a@b@c",
            "@x",
            "x@",
            &format!("{}@x.io", "a".repeat(250)),
        ] {
            assert_eq!(
                field(s.create_user(new_user("u", Some(bad)), None, admin()).await),
                "email",
                "{bad}"
            );
        }
        let mut u = new_user("u", None);
        u.profile.claims.insert("is_admin".into(), "yes".into());
        assert_eq!(field(s.create_user(u, None, admin()).await), "claims_json");
        let mut u = new_user("u", None);
        u.profile.claims.insert("name".into(), Value::from(5));
        assert_eq!(field(s.create_user(u, None, admin()).await), "claims_json");
        let mut u = new_user("u", None);
        u.profile
            .claims
            .insert("name".into(), Value::String("x".repeat(5000)));
        assert_eq!(field(s.create_user(u, None, admin()).await), "claims_json");
        let mut u = new_user("u", None);
        u.profile.roles = (0..51).map(|i| format!("r{i}")).collect();
        assert_eq!(field(s.create_user(u, None, admin()).await), "roles");
        assert_eq!(
            field(
                s.create_user(new_user("u", None), Some("short"), admin())
                    .await
            ),
            "password"
        );
        assert_eq!(
            field(
                s.create_user(new_user("u", None), Some(&"p".repeat(1025)), admin())
                    .await
            ),
            "password"
        );
        assert!(parse_claims("[1]").is_err());
        assert!(parse_claims("").unwrap().is_empty());
        assert!(t.events_of("sec.auth.user.created").is_empty());
    }

    #[tokio::test]
    async fn usernames_and_emails_are_unique_ignoring_case() {
        let t = test_server::new().await;
        let s = &t.server;
        let a = s
            .create_user(new_user("Alice", Some("alice@example.com")), None, admin())
            .await
            .unwrap();
        assert_eq!(a.version, 1);
        for dup in [
            new_user("ALICE", None),
            new_user("other", Some("ALICE@example.com")),
        ] {
            let e = s.create_user(dup, None, admin()).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::AlreadyExists);
        }
        assert_eq!(
            s.get_user_by_username("aLiCe").await.unwrap().user_id,
            a.user_id
        );
        let created = t.events_of("sec.auth.user.created");
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].subject, a.user_id);
        assert_eq!(created[0].actor.as_ref().unwrap().id, "admin");
    }

    #[tokio::test]
    async fn login_outcomes_events_and_no_status_oracle() {
        let t = test_server::new().await;
        let s = &t.server;
        let u = s
            .create_user(new_user("bob", None), Some("correct horse"), admin())
            .await
            .unwrap();
        let ok = s
            .verify_login("BOB", "correct horse", "192.0.2.1")
            .await
            .unwrap();
        assert_eq!(ok.user_id, u.user_id);
        assert!(matches!(
            s.verify_login("bob", "wrong horse", "192.0.2.1").await,
            Err(LoginFailure::InvalidCredentials)
        ));
        assert!(matches!(
            s.verify_login("nobody", "correct horse", "192.0.2.1").await,
            Err(LoginFailure::InvalidCredentials)
        ));
        assert!(matches!(
            s.verify_login("bad name!", "x", "192.0.2.1").await,
            Err(LoginFailure::InvalidCredentials)
        ));
        let succeeded = t.events_of("sec.auth.login.succeeded");
        assert_eq!(succeeded.len(), 1);
        assert_eq!(succeeded[0].subject, u.user_id);
        assert_eq!(succeeded[0].source_ip, "192.0.2.1");
        let failed = t.events_of("sec.auth.login.failed");
        let reasons: Vec<&str> = failed
            .iter()
            .map(|e| e.details["reason"].as_str())
            .collect();
        assert_eq!(reasons, ["wrong_password", "unknown_user", "unknown_user"]);
        // The username only when the user exists; never the password.
        assert_eq!(
            failed[0].details.get("username").map(String::as_str),
            Some("bob")
        );
        assert_eq!(failed[0].subject, u.user_id);
        assert!(!failed[1].details.contains_key("username"));
        for e in t.events.lock().unwrap().iter() {
            assert!(!format!("{e:?}").contains("horse"), "{e:?}");
        }

        // Disabled: refused, but only a caller with the right password learns it.
        let d = s
            .update_user(
                &u.user_id,
                UserUpdate {
                    email: None,
                    status: UserStatus::Disabled,
                    profile: u.profile.clone(),
                },
                ok.version,
                admin(),
            )
            .await
            .unwrap();
        assert_eq!(d.status, UserStatus::Disabled);
        assert!(matches!(
            s.verify_login("bob", "wrong horse", "192.0.2.1").await,
            Err(LoginFailure::InvalidCredentials)
        ));
        assert!(matches!(
            s.verify_login("bob", "correct horse", "192.0.2.1").await,
            Err(LoginFailure::Disabled)
        ));
        // The peers are down here: the status change stands and its event says so.
        let disabled = t.events_of("sec.auth.user.disabled");
        assert_eq!(disabled.len(), 1);
        assert_eq!(disabled[0].details["sessions_revoked"], "false");
        assert_eq!(disabled[0].details["tokens_revoked"], "false");

        // No password set: never logs in, not even with an empty one.
        s.create_user(new_user("nopw", None), None, admin())
            .await
            .unwrap();
        assert!(matches!(
            s.verify_login("nopw", "", "192.0.2.1").await,
            Err(LoginFailure::InvalidCredentials)
        ));
    }

    #[tokio::test]
    async fn login_rehashes_outdated_parameters() {
        use argon2::password_hash::PasswordHasher as _;
        let t = test_server::new().await;
        let s = &t.server;
        let old = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(8192, 1, 1, None).unwrap(),
        )
        .hash_password_with_salt(b"old params pw", b"saltsaltsaltsalt")
        .unwrap()
        .to_string();
        assert!(needs_rehash(&old));
        let u = s
            .create_user(new_user("carol", None), None, admin())
            .await
            .unwrap();
        let mut row = u.clone();
        row.password_phc = Some(old.clone());
        row.version = 2;
        s.store.update_user(&row, 1).await.unwrap();
        let after = s
            .verify_login("carol", "old params pw", "192.0.2.1")
            .await
            .unwrap();
        let phc = after.password_phc.unwrap();
        assert!(!needs_rehash(&phc), "{phc}");
        assert_eq!(
            s.get_user(&u.user_id).await.unwrap().password_phc,
            Some(phc)
        );
        // And the new hash still verifies.
        s.verify_login("carol", "old params pw", "192.0.2.1")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn update_is_compare_and_set_and_set_password_changes_the_hash() {
        let t = test_server::new().await;
        let s = Arc::clone(&t.server);
        let u = s
            .create_user(new_user("dave", None), Some("first password"), admin())
            .await
            .unwrap();
        let upd = || UserUpdate {
            email: Some("dave@example.com".into()),
            status: UserStatus::Active,
            profile: UserProfile::default(),
        };
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (s, id) = (s.clone(), u.user_id.clone());
            let up = upd();
            tasks.push(tokio::spawn(async move {
                s.update_user(&id, up, 1, admin()).await
            }));
        }
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(e) => assert_eq!(e.code, ErrorCode::Aborted),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(
            s.update_user("ghost", upd(), 1, admin())
                .await
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );

        let before = s.get_user(&u.user_id).await.unwrap();
        let after = s
            .set_password(&u.user_id, "second password", true, admin())
            .await
            .unwrap();
        assert_ne!(after.password_phc, before.password_phc);
        assert_eq!(after.version, before.version + 1);
        assert!(after.password_changed_us.is_some());
        assert!(s.verify_login("dave", "first password", "").await.is_err());
        s.verify_login("dave", "second password", "").await.unwrap();
        let e = t.events_of("sec.auth.user.password_changed");
        assert_eq!(e[0].details["sessions_revoked"], "kept");
        assert_eq!(
            s.set_password(&u.user_id, "short", false, admin())
                .await
                .unwrap_err()
                .field
                .as_deref(),
            Some("password")
        );
    }

    #[tokio::test]
    async fn claims_follow_scopes() {
        let t = test_server::new().await;
        let s = &t.server;
        let mut n = new_user("erin", Some("erin@example.com"));
        n.profile.email_verified = true;
        n.profile
            .claims
            .insert("given_name".into(), Value::String("Erin".into()));
        let u = s.create_user(n, None, admin()).await.unwrap();
        let c = s.user_claims(&u, &["openid".into()]);
        assert_eq!(c.len(), 1);
        assert_eq!(c["sub"], Value::String(u.user_id.clone()));
        let c = s.user_claims(&u, &["openid".into(), "profile".into()]);
        assert_eq!(c["given_name"], "Erin");
        assert_eq!(c["preferred_username"], "erin");
        assert_eq!(c["updated_at"], 1_800_000_000);
        assert!(!c.contains_key("email"));
        let c = s.user_claims(&u, &["email".into()]);
        assert_eq!(c["email"], "erin@example.com");
        assert_eq!(c["email_verified"], true);
        assert!(!c.contains_key("given_name"));
    }
}
