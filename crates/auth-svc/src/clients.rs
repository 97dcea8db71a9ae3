//! OAuth client management and authentication: validation of settings, server-generated
//! secrets (256 bits, keyed hash, constant-time check), CRUD with compare-and-set.
//!
//! Why the rules are what they are:
//! - Redirect URIs are compared exactly at `/authorize`, so what is registered is what an
//!   attacker could be sent to: https only, plain http only on loopback (RFC 8252 §7.3),
//!   private-use schemes with a dot for native apps (RFC 8252 §7.1), never a fragment or
//!   a wildcard (RFC 6749 §3.1.2, RFC 9700 §4.1.3).
//! - Public clients cannot keep a secret: no secret, no client_credentials, PKCE always.
//! - A client secret carries 256 random bits, so it is stored as a fast keyed hash
//!   (HMAC-SHA-256 under a sealed server key) and checked in constant time: argon2 on the
//!   token endpoint would cap it at a few hundred grants a second for no gain.
//! - Every change is compare-and-set on the row's version: two administrators editing the
//!   same client never silently overwrite each other; the loser gets ABORTED.

use sec_common::error::{Error, ErrorCode};
use sec_common::events::{Actor, Outcome, Severity};
use sec_proto::token::v1::{RevokeTokenRequest, revoke_token_request::Target};
use serde_json::Value;

use crate::engine::AuthServer;
use crate::store::{AuthMethod, ClientRow, ClientSettings, GrantType, StoreError};

/// What `create_client` needs: everything but the server-made parts (secret, times,
/// version).
#[derive(Debug, Clone)]
pub struct NewClient {
    /// `None`: a UUID v4 is generated.
    pub client_id: Option<String>,
    pub settings: ClientSettings,
    /// RFC 7592 registration access token, hashed (dynamic registration only).
    pub registration_token_hash: Option<Vec<u8>>,
}

/// Limits of client settings.
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_REDIRECT_URIS: usize = 20;
pub const MAX_URI_BYTES: usize = 512;
pub const MAX_CLIENT_SCOPES: usize = 50;
pub const MAX_JWKS_BYTES: usize = 16 * 1024;
pub const MAX_JWKS_KEYS: usize = 10;
pub const MAX_TTL_SECONDS: u32 = 365 * 86_400;
pub const MAX_TIER_CHARS: usize = 64;
pub const MAX_CLIENT_ID_CHARS: usize = 128;

/// Maps a store failure to what a caller may see (causes are logged, never returned).
pub(crate) fn store_error(e: StoreError, what: &'static str) -> Error {
    match e {
        StoreError::Conflict => Error::new(ErrorCode::AlreadyExists, format!("{what} exists")),
        StoreError::VersionMismatch => Error::new(
            ErrorCode::Aborted,
            format!("{what} changed concurrently: read it again and retry"),
        ),
        StoreError::NotFound => Error::not_found(format!("{what} not found")),
        StoreError::Db(e) => Error::unavailable("auth store", &e),
        StoreError::Corrupt(m) => Error::internal("auth store row corrupt", &m),
    }
}

/// `client_id` syntax when given by the caller: RFC 3986 unreserved characters.
pub fn valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// One redirect (or post-logout redirect) URI: absolute, no fragment, no wildcard, and
/// https, http on a loopback host, or a private-use scheme containing a dot.
pub fn check_redirect_uri(uri: &str) -> Result<(), &'static str> {
    if uri.len() > MAX_URI_BYTES {
        return Err("is longer than 512 bytes");
    }
    if uri.contains('#') {
        return Err("must not have a fragment");
    }
    if uri.contains('*') {
        return Err("must not contain a wildcard");
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    let u = url::Url::parse(uri).map_err(|_| "must be an absolute URI")?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not carry credentials");
    }
    match u.scheme() {
        "https" => {
            if u.host().is_none() {
                return Err("needs a host");
            }
            Ok(())
        }
        "http" => {
            use url::Host;
            let loopback = match u.host() {
                Some(Host::Ipv4(a)) => a == std::net::Ipv4Addr::LOCALHOST,
                Some(Host::Ipv6(a)) => a == std::net::Ipv6Addr::LOCALHOST,
                Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err("http is allowed only on loopback (127.0.0.1, [::1], localhost)")
            }
        }
        // RFC 8252 §7.1: a reverse-domain private-use scheme for native apps.
        s if s.contains('.') => Ok(()),
        _ => Err("must be https, http on loopback, or a private-use scheme with a dot"),
    }
}

/// A JWK Set of public keys only, within the size and count limits.
fn check_jwks(jwks: &str) -> Result<(), &'static str> {
    if jwks.len() > MAX_JWKS_BYTES {
        return Err("is larger than 16 KiB");
    }
    let v: Value = serde_json::from_str(jwks).map_err(|_| "is not JSON")?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("must be a JWK Set ({\"keys\": [...]})")?;
    if keys.is_empty() {
        return Err("must hold at least one key");
    }
    if keys.len() > MAX_JWKS_KEYS {
        return Err("must hold at most 10 keys");
    }
    for k in keys {
        let k = k.as_object().ok_or("keys must be JSON objects")?;
        if !k.get("kty").is_some_and(Value::is_string) {
            return Err("every key needs a kty");
        }
        if ["d", "p", "q", "k"].iter().any(|m| k.contains_key(*m)) {
            return Err("must hold public keys only (a key has private members)");
        }
    }
    Ok(())
}

impl AuthServer {
    /// Fills what the server decides: the default scopes when none are given, PKCE always
    /// on for public clients.
    pub fn normalize_client_settings(&self, mut s: ClientSettings) -> ClientSettings {
        if s.scopes.is_empty() {
            s.scopes = self.cfg.default_client_scopes.clone();
        }
        if s.public {
            s.require_pkce = true;
        }
        s
    }

    /// Checks client settings; the error names the field at fault. Empty scopes are
    /// accepted (they become the configured defaults), as is a public client without
    /// `require_pkce` (it is forced on): see [`AuthServer::normalize_client_settings`].
    pub fn validate_client_settings(&self, s: &ClientSettings) -> Result<(), Error> {
        let n = s.name.chars().count();
        if n == 0 || n > MAX_NAME_CHARS {
            return Err(Error::invalid("name", "must be 1 to 200 characters"));
        }
        if s.name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "name",
                "must not contain control characters",
            ));
        }
        for (field, uris) in [
            ("redirect_uris", &s.redirect_uris),
            ("post_logout_redirect_uris", &s.post_logout_redirect_uris),
        ] {
            if uris.len() > MAX_REDIRECT_URIS {
                return Err(Error::invalid(field, "at most 20 URIs"));
            }
            for u in uris {
                check_redirect_uri(u)
                    .map_err(|m| Error::invalid(field, format!("each URI {m}")))?;
            }
        }
        if s.scopes.len() > MAX_CLIENT_SCOPES {
            return Err(Error::invalid("scopes", "at most 50 scopes"));
        }
        if let Some(bad) = s.scopes.iter().find(|x| !self.cfg.is_registered_scope(x)) {
            let shown: String = bad.chars().take(64).collect();
            return Err(Error::invalid(
                "scopes",
                format!("scope {shown:?} is not in the registry"),
            ));
        }
        if s.grant_types.is_empty() {
            return Err(Error::invalid("grant_types", "at least one grant type"));
        }
        if s.grant_types.contains(&GrantType::AuthorizationCode) && s.redirect_uris.is_empty() {
            return Err(Error::invalid(
                "redirect_uris",
                "authorization_code needs at least one redirect URI",
            ));
        }
        if s.public {
            if s.auth_method != AuthMethod::None {
                return Err(Error::invalid(
                    "token_endpoint_auth_method",
                    "a public client authenticates with `none`",
                ));
            }
            if s.grant_types.contains(&GrantType::ClientCredentials) {
                return Err(Error::invalid(
                    "grant_types",
                    "a public client cannot use client_credentials",
                ));
            }
        } else if s.auth_method == AuthMethod::None {
            return Err(Error::invalid(
                "token_endpoint_auth_method",
                "a confidential client needs client_secret_basic, client_secret_post or private_key_jwt",
            ));
        }
        match (&s.jwks_json, s.auth_method) {
            (None, AuthMethod::PrivateKeyJwt) => {
                return Err(Error::invalid(
                    "jwks_json",
                    "private_key_jwt needs the client's JWK Set",
                ));
            }
            (Some(j), _) => check_jwks(j).map_err(|m| Error::invalid("jwks_json", m))?,
            (None, _) => {}
        }
        for (field, v) in [
            ("access_token_ttl_seconds", s.access_ttl_seconds),
            ("refresh_token_ttl_seconds", s.refresh_ttl_seconds),
            ("id_token_ttl_seconds", s.id_ttl_seconds),
        ] {
            if v > MAX_TTL_SECONDS {
                return Err(Error::invalid(field, "at most one year"));
            }
        }
        if s.rate_limit_tier.len() > MAX_TIER_CHARS
            || !s
                .rate_limit_tier
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(Error::invalid(
                "rate_limit_tier",
                "at most 64 characters of [a-z0-9_-]",
            ));
        }
        Ok(())
    }

    /// Creates a client; returns it and, for secret-based methods, its secret (shown once).
    pub async fn create_client(
        &self,
        new: NewClient,
        actor: Actor,
    ) -> Result<(ClientRow, Option<String>), Error> {
        let settings = self.normalize_client_settings(new.settings);
        self.validate_client_settings(&settings)?;
        let client_id = match new.client_id {
            Some(id) if !valid_client_id(&id) => {
                return Err(Error::invalid(
                    "client_id",
                    "must be 1 to 128 characters of [A-Za-z0-9._~-]",
                ));
            }
            Some(id) => id,
            None => uuid::Uuid::new_v4().to_string(),
        };
        let secret = if settings.auth_method.has_secret() {
            Some(new_secret()?)
        } else {
            None
        };
        let now = self.now_us();
        let row = ClientRow {
            client_id,
            secret_hash: secret.as_deref().map(|s| self.secrets.hash(s).to_vec()),
            registration_token_hash: new.registration_token_hash,
            version: 1,
            created_us: now,
            updated_us: now,
            secret_rotated_us: secret.as_ref().map(|_| now),
            settings,
        };
        self.store.insert_client(&row).await.map_err(|e| match e {
            StoreError::Conflict => {
                Error::new(ErrorCode::AlreadyExists, "client_id is taken").with_field("client_id")
            }
            e => store_error(e, "client"),
        })?;
        let mut e = self.client_event("sec.auth.client.created", &row.client_id, actor);
        e.details.insert(
            "auth_method".into(),
            row.settings.auth_method.as_str().into(),
        );
        e.details.insert(
            "type".into(),
            if row.settings.public {
                "public"
            } else {
                "confidential"
            }
            .into(),
        );
        if row.settings.dynamically_registered {
            e.details
                .insert("dynamically_registered".into(), "true".into());
        }
        self.publish(e);
        Ok((row, secret))
    }

    /// The client as stored now (management reads and compare-and-set), or NotFound.
    pub async fn get_client(&self, client_id: &str) -> Result<ClientRow, Error> {
        self.load_client(client_id)
            .await?
            .ok_or_else(|| Error::not_found("client not found"))
    }

    /// The client for authenticating it: from the cache when it was read within
    /// `oauth.client_cache_ttl_ms`, else from the store.
    pub async fn find_client(&self, client_id: &str) -> Result<Option<ClientRow>, Error> {
        if let Some(c) = self.client_cache.get(client_id, self.now_us()) {
            return Ok(Some(c));
        }
        self.load_client(client_id).await
    }

    async fn load_client(&self, client_id: &str) -> Result<Option<ClientRow>, Error> {
        if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_CHARS {
            return Ok(None);
        }
        let now = self.now_us();
        let generation = self.client_cache.generation();
        let row = self
            .store
            .get_client(client_id)
            .await
            .map_err(|e| store_error(e, "client"))?;
        match &row {
            Some(r) => self.client_cache.put(r, now, generation),
            None => self.client_cache.forget(client_id),
        }
        Ok(row)
    }

    /// Up to `limit` clients after `after`, in client_id order.
    pub async fn list_clients(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ClientRow>, Error> {
        self.store
            .list_clients(after, limit)
            .await
            .map_err(|e| store_error(e, "client"))
    }

    /// Replaces the settings if the stored version is `expected_version` (else ABORTED).
    /// Moving to a method without a secret drops the secret; moving to a secret method
    /// from one without leaves the client without a secret until it is rotated.
    pub async fn update_client(
        &self,
        client_id: &str,
        settings: ClientSettings,
        expected_version: i64,
        actor: Actor,
    ) -> Result<ClientRow, Error> {
        let settings = self.normalize_client_settings(settings);
        self.validate_client_settings(&settings)?;
        let current = self.get_client(client_id).await?;
        if current.version != expected_version {
            return Err(store_error(StoreError::VersionMismatch, "client"));
        }
        let mut row = current.clone();
        if !settings.auth_method.has_secret() {
            row.secret_hash = None;
        }
        // Registration is a fact about the client's origin, not an editable setting.
        let dynamically_registered = current.settings.dynamically_registered;
        row.settings = ClientSettings {
            dynamically_registered,
            ..settings
        };
        let changed = changed_fields(&current.settings, &row.settings);
        row.version = expected_version + 1;
        row.updated_us = self.now_us();
        self.store
            .update_client(&row, expected_version)
            .await
            .map_err(|e| store_error(e, "client"))?;
        self.client_cache.forget(client_id);
        let mut e = self.client_event("sec.auth.client.updated", client_id, actor);
        e.details.insert("fields".into(), changed.join(","));
        e.details.insert("version".into(), row.version.to_string());
        self.publish(e);
        Ok(row)
    }

    /// Deletes the client (its codes and consents too), then revokes every token issued
    /// to it. If token-svc cannot be reached the delete still stands (the client can no
    /// longer authenticate, so its refresh tokens are useless); the event says so.
    pub async fn delete_client(&self, client_id: &str, actor: Actor) -> Result<(), Error> {
        let existed = self
            .store
            .delete_client(client_id)
            .await
            .map_err(|e| store_error(e, "client"))?;
        self.client_cache.forget(client_id);
        if !existed {
            return Err(Error::not_found("client not found"));
        }
        let revoked = self
            .tokens
            .clone()
            .revoke_token(RevokeTokenRequest {
                target: Some(Target::ClientId(client_id.to_owned())),
                reason: "client deleted".into(),
                ..Default::default()
            })
            .await;
        let mut e = self.client_event("sec.auth.client.deleted", client_id, actor);
        match revoked {
            Ok(_) => {
                e.details.insert("tokens_revoked".into(), "true".into());
            }
            Err(status) => {
                tracing::warn!(client_id, error = %status.message(), "revoking a deleted client's tokens failed");
                e.details.insert("tokens_revoked".into(), "false".into());
                e.severity = Severity::Medium as i32;
            }
        }
        self.publish(e);
        Ok(())
    }

    /// A new secret for a secret-based client; the old one stops working at once.
    pub async fn rotate_client_secret(
        &self,
        client_id: &str,
        actor: Actor,
    ) -> Result<(ClientRow, String), Error> {
        let current = self.get_client(client_id).await?;
        if !current.settings.auth_method.has_secret() {
            return Err(Error::precondition(format!(
                "the client authenticates with {}, which uses no secret",
                current.settings.auth_method.as_str()
            )));
        }
        let secret = new_secret()?;
        let now = self.now_us();
        let mut row = current.clone();
        row.secret_hash = Some(self.secrets.hash(&secret).to_vec());
        row.secret_rotated_us = Some(now);
        row.updated_us = now;
        row.version = current.version + 1;
        self.store
            .update_client(&row, current.version)
            .await
            .map_err(|e| store_error(e, "client"))?;
        self.client_cache.forget(client_id);
        let e = self.client_event("sec.auth.client.secret_rotated", client_id, actor);
        self.publish(e);
        Ok((row, secret))
    }

    /// Whether `secret` is the client's current secret (HMAC, constant-time compare).
    pub fn check_client_secret(&self, c: &ClientRow, secret: &str) -> bool {
        c.secret_hash
            .as_deref()
            .is_some_and(|h| self.secrets.verify(secret, h))
    }

    fn client_event(
        &self,
        event_type: &str,
        client_id: &str,
        actor: Actor,
    ) -> sec_common::events::SecurityEvent {
        let mut e = self.event(event_type);
        e.actor = Some(actor);
        e.subject = client_id.to_owned();
        e.outcome = Outcome::Success as i32;
        e
    }
}

fn new_secret() -> Result<String, Error> {
    sec_common::secret::generate_secret("cs_")
        .map_err(|e| Error::internal("generating a client secret", &*e))
}

/// Names of the settings that differ (for the event; values are not put there).
fn changed_fields(a: &ClientSettings, b: &ClientSettings) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_follow_rfc_8252_and_9700() {
        for ok in [
            "https://app.example/cb",
            "https://app.example:8443/cb?x=1",
            "http://127.0.0.1:51000/cb",
            "http://[::1]/cb",
            "http://localhost:3000/cb",
            "com.example.app:/oauth2redirect",
        ] {
            assert_eq!(check_redirect_uri(ok), Ok(()), "{ok}");
        }
        for bad in [
            "https://app.example/cb#frag",
            "https://app.example/cb#",
            "https://*.example/cb",
            "http://app.example/cb",
            "http://10.0.0.1/cb",
            "/relative/cb",
            "javascript:alert(1)",
            "data:text/html,x",
            "myapp:/cb",
            "https://user:pw@app.example/cb",
            "https://app.example/c b",
        ] {
            assert!(check_redirect_uri(bad).is_err(), "{bad}");
        }
        let long = format!("https://app.example/{}", "a".repeat(MAX_URI_BYTES));
        assert!(check_redirect_uri(&long).is_err());
    }

    #[test]
    fn jwks_must_be_a_small_set_of_public_keys() {
        let pubkey = r#"{"kty":"EC","crv":"P-256","x":"a","y":"b"}"#;
        assert_eq!(check_jwks(&format!(r#"{{"keys":[{pubkey}]}}"#)), Ok(()));
        assert!(check_jwks(r#"{"keys":[]}"#).is_err());
        assert!(check_jwks(r#"[]"#).is_err());
        assert!(check_jwks("not json").is_err());
        for private in ["d", "p", "q", "k"] {
            let j = format!(r#"{{"keys":[{{"kty":"RSA","n":"x","e":"AQAB","{private}":"s"}}]}}"#);
            assert!(check_jwks(&j).is_err(), "{private}");
        }
        let eleven = [pubkey; 11].join(",");
        assert!(check_jwks(&format!(r#"{{"keys":[{eleven}]}}"#)).is_err());
        let big = format!(
            r#"{{"keys":[{pubkey}],"pad":"{}"}}"#,
            "x".repeat(MAX_JWKS_BYTES)
        );
        assert!(check_jwks(&big).is_err());
    }

    #[test]
    fn client_ids() {
        assert!(valid_client_id("my-app_1.0~x"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id("a b"));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id(&"a".repeat(129)));
    }

    use std::sync::Arc;

    use sec_common::events::ActorKind;

    use crate::store::contract::settings;
    use crate::users::test_server;

    fn admin() -> Actor {
        Actor {
            kind: ActorKind::User as i32,
            id: "admin".into(),
        }
    }

    fn new(id: Option<&str>, s: ClientSettings) -> NewClient {
        NewClient {
            client_id: id.map(str::to_owned),
            settings: s,
            registration_token_hash: None,
        }
    }

    #[tokio::test]
    async fn settings_refusals_name_the_field() {
        let t = test_server::new().await;
        let s = &t.server;
        let field = |c: ClientSettings| {
            s.validate_client_settings(&s.normalize_client_settings(c))
                .unwrap_err()
                .field
                .unwrap_or_default()
        };
        let base = || settings("app");
        s.validate_client_settings(&base()).unwrap();
        assert_eq!(
            field(ClientSettings {
                name: String::new(),
                ..base()
            }),
            "name"
        );
        assert_eq!(
            field(ClientSettings {
                name: "x".repeat(201),
                ..base()
            }),
            "name"
        );
        assert_eq!(
            field(ClientSettings {
                redirect_uris: vec!["http://evil.example/cb".into()],
                ..base()
            }),
            "redirect_uris"
        );
        assert_eq!(
            field(ClientSettings {
                redirect_uris: (0..21).map(|i| format!("https://a.example/{i}")).collect(),
                ..base()
            }),
            "redirect_uris"
        );
        assert_eq!(
            field(ClientSettings {
                post_logout_redirect_uris: vec!["https://a.example/#x".into()],
                ..base()
            }),
            "post_logout_redirect_uris"
        );
        assert_eq!(
            field(ClientSettings {
                scopes: vec!["admin:all".into()],
                ..base()
            }),
            "scopes"
        );
        assert_eq!(
            field(ClientSettings {
                grant_types: vec![],
                ..base()
            }),
            "grant_types"
        );
        assert_eq!(
            field(ClientSettings {
                redirect_uris: vec![],
                ..base()
            }),
            "redirect_uris"
        );
        let public = || ClientSettings {
            public: true,
            auth_method: AuthMethod::None,
            require_pkce: false,
            ..base()
        };
        assert!(s.normalize_client_settings(public()).require_pkce);
        s.validate_client_settings(&s.normalize_client_settings(public()))
            .unwrap();
        assert_eq!(
            field(ClientSettings {
                auth_method: AuthMethod::ClientSecretBasic,
                ..public()
            }),
            "token_endpoint_auth_method"
        );
        assert_eq!(
            field(ClientSettings {
                grant_types: vec![GrantType::ClientCredentials],
                ..public()
            }),
            "grant_types"
        );
        assert_eq!(
            field(ClientSettings {
                auth_method: AuthMethod::None,
                ..base()
            }),
            "token_endpoint_auth_method"
        );
        assert_eq!(
            field(ClientSettings {
                auth_method: AuthMethod::PrivateKeyJwt,
                ..base()
            }),
            "jwks_json"
        );
        assert_eq!(
            field(ClientSettings {
                auth_method: AuthMethod::PrivateKeyJwt,
                jwks_json: Some(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into()),
                ..base()
            }),
            "jwks_json"
        );
        assert_eq!(
            field(ClientSettings {
                access_ttl_seconds: MAX_TTL_SECONDS + 1,
                ..base()
            }),
            "access_token_ttl_seconds"
        );
        assert_eq!(
            field(ClientSettings {
                rate_limit_tier: "Gold".into(),
                ..base()
            }),
            "rate_limit_tier"
        );
        // No scopes: the configured defaults.
        let d = s.normalize_client_settings(ClientSettings {
            scopes: vec![],
            ..base()
        });
        assert_eq!(d.scopes, s.cfg.default_client_scopes);
    }

    #[tokio::test]
    async fn secrets_are_shown_once_checked_in_constant_time_and_rotated() {
        let t = test_server::new().await;
        let s = &t.server;
        let (c, secret) = s
            .create_client(new(Some("web"), settings("web")), admin())
            .await
            .unwrap();
        let secret = secret.expect("a confidential client gets a secret");
        assert!(secret.starts_with("cs_") && secret.len() >= 46, "{secret}");
        assert_ne!(c.secret_hash.as_deref(), Some(secret.as_bytes()));
        assert!(s.check_client_secret(&c, &secret));
        assert!(!s.check_client_secret(&c, "cs_wrong"));
        assert!(!s.check_client_secret(&c, ""));

        let (rotated, new_secret) = s.rotate_client_secret("web", admin()).await.unwrap();
        assert_eq!(rotated.version, 2);
        let stored = s.get_client("web").await.unwrap();
        assert!(s.check_client_secret(&stored, &new_secret));
        assert!(
            !s.check_client_secret(&stored, &secret),
            "the old secret is dead"
        );
        assert_eq!(t.events_of("sec.auth.client.secret_rotated").len(), 1);
        for e in t.events.lock().unwrap().iter() {
            let shown = format!("{e:?}");
            assert!(!shown.contains(&secret) && !shown.contains(&new_secret));
        }

        // Public clients: no secret; private_key_jwt: none either, and no rotation.
        let public = ClientSettings {
            public: true,
            auth_method: AuthMethod::None,
            ..settings("spa")
        };
        let (p, none) = s.create_client(new(None, public), admin()).await.unwrap();
        assert!(none.is_none() && p.secret_hash.is_none());
        assert!(uuid::Uuid::parse_str(&p.client_id).is_ok());
        assert!(!s.check_client_secret(&p, ""));
        assert_eq!(
            s.rotate_client_secret(&p.client_id, admin())
                .await
                .unwrap_err()
                .code,
            ErrorCode::FailedPrecondition
        );

        assert_eq!(
            s.create_client(new(Some("web"), settings("web")), admin())
                .await
                .unwrap_err()
                .code,
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            s.create_client(new(Some("bad id"), settings("x")), admin())
                .await
                .unwrap_err()
                .field
                .as_deref(),
            Some("client_id")
        );
    }

    #[tokio::test]
    async fn updates_are_compare_and_set_and_delete_stands_without_token_svc() {
        let t = test_server::new().await;
        let s = Arc::clone(&t.server);
        s.create_client(new(Some("cas"), settings("cas")), admin())
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = settings("cas");
                c.name = format!("writer {i}");
                s.update_client("cas", c, 1, admin()).await
            }));
        }
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(c) => {
                    wins += 1;
                    assert_eq!(c.version, 2);
                }
                Err(e) => assert_eq!(e.code, ErrorCode::Aborted),
            }
        }
        assert_eq!(wins, 1);
        let updated = t.events_of("sec.auth.client.updated");
        assert_eq!(updated.len(), 1);
        assert_eq!(updated[0].details["fields"], "name");
        assert_eq!(
            s.update_client("nope", settings("x"), 1, admin())
                .await
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        // Moving to private_key_jwt drops the secret.
        let jwt = ClientSettings {
            auth_method: AuthMethod::PrivateKeyJwt,
            jwks_json: Some(r#"{"keys":[{"kty":"EC","crv":"P-256","x":"a","y":"b"}]}"#.into()),
            ..settings("cas")
        };
        let c = s.update_client("cas", jwt, 2, admin()).await.unwrap();
        assert!(c.secret_hash.is_none());

        s.delete_client("cas", admin()).await.unwrap();
        assert_eq!(
            s.get_client("cas").await.unwrap_err().code,
            ErrorCode::NotFound
        );
        let deleted = t.events_of("sec.auth.client.deleted");
        assert_eq!(deleted[0].details["tokens_revoked"], "false");
        assert_eq!(
            s.delete_client("cas", admin()).await.unwrap_err().code,
            ErrorCode::NotFound
        );
    }
}
