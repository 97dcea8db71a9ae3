//! `sec.auth.v1.AuthService`: validation and proto mapping; authorization is the host's
//! (every RPC is `Access::Admin` in [`crate::ACCESS`]); the logic lives in `clients.rs`
//! and `users.rs`.
//!
//! Mapping rules:
//! - client `type` unspecified: public when the auth method is `none`, else confidential;
//!   `token_endpoint_auth_method` empty: `none` for public clients, `client_secret_basic`
//!   for confidential ones; unknown strings are INVALID_ARGUMENT naming the field.
//! - paging: the page token is base64url of the last key returned (client id, or the
//!   lowercase username); page size 0 means 50, at most 1000.
//! - versions: `expected_version` must be the version read; a concurrent change is
//!   ABORTED.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use sec_common::auth::Caller;
use sec_common::error::Error;
use sec_common::events::to_timestamp;
use sec_proto::auth::v1 as pb;
use sec_proto::auth::v1::auth_service_server::AuthService;
use sec_proto::common::v1::{PageRequest, PageResponse};
use tonic::{Request, Response, Status};

use crate::clients::NewClient;
use crate::engine::AuthServer;
use crate::store::{
    AuthMethod, ClientRow, ClientSettings, GrantType, UserProfile, UserRow, UserStatus, fold_case,
};
use crate::users::{NewUser, UserUpdate, parse_claims};

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;
const MAX_PAGE_TOKEN_BYTES: usize = 512;
const MAX_LIST_ITEMS: usize = 64;

pub struct AuthApi {
    server: Arc<AuthServer>,
}

impl AuthApi {
    pub fn new(server: Arc<AuthServer>) -> Self {
        Self { server }
    }
}

fn ts(us: i64) -> Option<prost_types::Timestamp> {
    DateTime::from_timestamp_micros(us).map(to_timestamp)
}

fn version_in(v: u64, field: &str) -> Result<i64, Error> {
    match i64::try_from(v) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(Error::invalid(
            field,
            "must be the version read (a positive number)",
        )),
    }
}

fn version_out(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// (page size, key to start after).
pub fn page_in(page: Option<&PageRequest>) -> Result<(u32, Option<String>), Error> {
    let Some(p) = page else {
        return Ok((DEFAULT_PAGE_SIZE, None));
    };
    let size = match p.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    if p.page_token.is_empty() {
        return Ok((size, None));
    }
    let bad = || Error::invalid("page.page_token", "not a token this API returned");
    if p.page_token.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(bad());
    }
    let raw = URL_SAFE_NO_PAD.decode(&p.page_token).map_err(|_| bad())?;
    let key = String::from_utf8(raw).map_err(|_| bad())?;
    if key.is_empty() {
        return Err(bad());
    }
    Ok((size, Some(key)))
}

/// The page response for `rows` fetched with `size + 1`: truncates to `size` and names the
/// last key when there is more.
fn page_out<T>(rows: &mut Vec<T>, size: u32, key: impl Fn(&T) -> String) -> PageResponse {
    let size = size as usize;
    let next_page_token = if rows.len() > size {
        rows.truncate(size);
        rows.last()
            .map(|r| URL_SAFE_NO_PAD.encode(key(r)))
            .unwrap_or_default()
    } else {
        String::new()
    };
    PageResponse { next_page_token }
}

pub fn client_to_proto(c: &ClientRow) -> pb::Client {
    let s = &c.settings;
    pb::Client {
        client_id: c.client_id.clone(),
        name: s.name.clone(),
        r#type: if s.public {
            pb::ClientType::Public
        } else {
            pb::ClientType::Confidential
        } as i32,
        token_endpoint_auth_method: s.auth_method.as_str().into(),
        grant_types: s.grant_types.iter().map(|g| g.as_str().into()).collect(),
        redirect_uris: s.redirect_uris.clone(),
        post_logout_redirect_uris: s.post_logout_redirect_uris.clone(),
        scopes: s.scopes.clone(),
        jwks_json: s.jwks_json.clone().unwrap_or_default(),
        access_token_ttl_seconds: s.access_ttl_seconds,
        refresh_token_ttl_seconds: s.refresh_ttl_seconds,
        id_token_ttl_seconds: s.id_ttl_seconds,
        trusted: s.trusted,
        rate_limit_tier: s.rate_limit_tier.clone(),
        require_pkce: s.require_pkce,
        dynamically_registered: s.dynamically_registered,
        created_at: ts(c.created_us),
        updated_at: ts(c.updated_us),
        secret_rotated_at: c.secret_rotated_us.and_then(ts),
        version: version_out(c.version),
    }
}

fn check_list(field: &str, v: &[String]) -> Result<(), Error> {
    if v.len() > MAX_LIST_ITEMS {
        return Err(Error::invalid(field, "too many entries"));
    }
    Ok(())
}

/// The settings a request's `Client` describes (not yet validated against the rules).
pub fn client_from_proto(c: &pb::Client) -> Result<ClientSettings, Error> {
    let method = match c.token_endpoint_auth_method.as_str() {
        "" => None,
        m => Some(AuthMethod::parse(m).ok_or_else(|| {
            Error::invalid(
                "token_endpoint_auth_method",
                "one of client_secret_basic, client_secret_post, private_key_jwt, none",
            )
        })?),
    };
    let public = match pb::ClientType::try_from(c.r#type) {
        Ok(pb::ClientType::Public) => true,
        Ok(pb::ClientType::Confidential) => false,
        Ok(pb::ClientType::Unspecified) => method == Some(AuthMethod::None),
        Err(_) => return Err(Error::invalid("type", "unknown client type")),
    };
    let auth_method = method.unwrap_or(if public {
        AuthMethod::None
    } else {
        AuthMethod::ClientSecretBasic
    });
    check_list("grant_types", &c.grant_types)?;
    check_list("redirect_uris", &c.redirect_uris)?;
    check_list("post_logout_redirect_uris", &c.post_logout_redirect_uris)?;
    check_list("scopes", &c.scopes)?;
    let mut grant_types = Vec::new();
    for g in &c.grant_types {
        let g = GrantType::parse(g).ok_or_else(|| {
            Error::invalid(
                "grant_types",
                "each of authorization_code, client_credentials, refresh_token",
            )
        })?;
        if !grant_types.contains(&g) {
            grant_types.push(g);
        }
    }
    let mut scopes: Vec<String> = Vec::new();
    for s in &c.scopes {
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    Ok(ClientSettings {
        name: c.name.clone(),
        public,
        auth_method,
        grant_types,
        redirect_uris: c.redirect_uris.clone(),
        post_logout_redirect_uris: c.post_logout_redirect_uris.clone(),
        scopes,
        jwks_json: (!c.jwks_json.is_empty()).then(|| c.jwks_json.clone()),
        access_ttl_seconds: c.access_token_ttl_seconds,
        refresh_ttl_seconds: c.refresh_token_ttl_seconds,
        id_ttl_seconds: c.id_token_ttl_seconds,
        trusted: c.trusted,
        rate_limit_tier: c.rate_limit_tier.clone(),
        require_pkce: c.require_pkce,
        dynamically_registered: false,
    })
}

pub fn user_to_proto(u: &UserRow) -> pb::User {
    pb::User {
        user_id: u.user_id.clone(),
        username: u.username.clone(),
        email: u.email.clone().unwrap_or_default(),
        email_verified: u.profile.email_verified,
        status: match u.status {
            UserStatus::Active => pb::UserStatus::Active,
            UserStatus::Disabled => pb::UserStatus::Disabled,
            UserStatus::Locked => pb::UserStatus::Locked,
        } as i32,
        roles: u.profile.roles.clone(),
        claims_json: serde_json::Value::Object(u.profile.claims.clone()).to_string(),
        has_password: u.password_phc.is_some(),
        created_at: ts(u.created_us),
        updated_at: ts(u.updated_us),
        password_changed_at: u.password_changed_us.and_then(ts),
        version: version_out(u.version),
    }
}

fn status_from_proto(s: i32) -> Result<Option<UserStatus>, Error> {
    match pb::UserStatus::try_from(s) {
        Ok(pb::UserStatus::Unspecified) => Ok(None),
        Ok(pb::UserStatus::Active) => Ok(Some(UserStatus::Active)),
        Ok(pb::UserStatus::Disabled) => Ok(Some(UserStatus::Disabled)),
        Ok(pb::UserStatus::Locked) => Ok(Some(UserStatus::Locked)),
        Err(_) => Err(Error::invalid("status", "unknown user status")),
    }
}

fn profile_from_proto(u: &pb::User) -> Result<UserProfile, Error> {
    check_list("roles", &u.roles)?;
    Ok(UserProfile {
        email_verified: u.email_verified,
        roles: u.roles.clone(),
        claims: parse_claims(&u.claims_json)?,
    })
}

fn non_empty(e: &str) -> Option<String> {
    (!e.is_empty()).then(|| e.to_owned())
}

fn actor_of<T>(req: &Request<T>) -> Result<sec_common::events::Actor, Status> {
    Ok(Caller::of(req)?.actor())
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn create_client(
        &self,
        req: Request<pb::CreateClientRequest>,
    ) -> Result<Response<pb::ClientWithSecret>, Status> {
        let actor = actor_of(&req)?;
        let c = req
            .into_inner()
            .client
            .ok_or_else(|| Error::invalid("client", "required"))?;
        let settings = client_from_proto(&c)?;
        let new = NewClient {
            client_id: non_empty(&c.client_id),
            settings,
            registration_token_hash: None,
        };
        let (row, secret) = self.server.create_client(new, actor).await?;
        Ok(Response::new(pb::ClientWithSecret {
            client: Some(client_to_proto(&row)),
            client_secret: secret.unwrap_or_default(),
        }))
    }

    async fn get_client(
        &self,
        req: Request<pb::GetClientRequest>,
    ) -> Result<Response<pb::Client>, Status> {
        let id = req.into_inner().client_id;
        if id.is_empty() {
            return Err(Error::invalid("client_id", "required").into());
        }
        let row = self.server.get_client(&id).await?;
        Ok(Response::new(client_to_proto(&row)))
    }

    async fn list_clients(
        &self,
        req: Request<pb::ListClientsRequest>,
    ) -> Result<Response<pb::ListClientsResponse>, Status> {
        let (size, after) = page_in(req.get_ref().page.as_ref())?;
        let mut rows = self.server.list_clients(after.as_deref(), size + 1).await?;
        let page = page_out(&mut rows, size, |c| c.client_id.clone());
        Ok(Response::new(pb::ListClientsResponse {
            clients: rows.iter().map(client_to_proto).collect(),
            page: Some(page),
        }))
    }

    async fn update_client(
        &self,
        req: Request<pb::UpdateClientRequest>,
    ) -> Result<Response<pb::Client>, Status> {
        let actor = actor_of(&req)?;
        let r = req.into_inner();
        let c = r
            .client
            .ok_or_else(|| Error::invalid("client", "required"))?;
        if c.client_id.is_empty() {
            return Err(Error::invalid("client.client_id", "required").into());
        }
        let expected = version_in(r.expected_version, "expected_version")?;
        let settings = client_from_proto(&c)?;
        let row = self
            .server
            .update_client(&c.client_id, settings, expected, actor)
            .await?;
        Ok(Response::new(client_to_proto(&row)))
    }

    async fn delete_client(
        &self,
        req: Request<pb::DeleteClientRequest>,
    ) -> Result<Response<pb::DeleteClientResponse>, Status> {
        let actor = actor_of(&req)?;
        let id = req.into_inner().client_id;
        if id.is_empty() {
            return Err(Error::invalid("client_id", "required").into());
        }
        self.server.delete_client(&id, actor).await?;
        Ok(Response::new(pb::DeleteClientResponse {}))
    }

    async fn rotate_client_secret(
        &self,
        req: Request<pb::RotateClientSecretRequest>,
    ) -> Result<Response<pb::ClientWithSecret>, Status> {
        let actor = actor_of(&req)?;
        let id = req.into_inner().client_id;
        if id.is_empty() {
            return Err(Error::invalid("client_id", "required").into());
        }
        let (row, secret) = self.server.rotate_client_secret(&id, actor).await?;
        Ok(Response::new(pb::ClientWithSecret {
            client: Some(client_to_proto(&row)),
            client_secret: secret,
        }))
    }

    async fn create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let actor = actor_of(&req)?;
        let r = req.into_inner();
        let u = r.user.ok_or_else(|| Error::invalid("user", "required"))?;
        let new = NewUser {
            user_id: non_empty(&u.user_id),
            username: u.username.clone(),
            email: non_empty(&u.email),
            status: status_from_proto(u.status)?,
            profile: profile_from_proto(&u)?,
        };
        let password = zeroize::Zeroizing::new(r.password);
        let password = (!password.is_empty()).then_some(password.as_str());
        let row = self.server.create_user(new, password, actor).await?;
        Ok(Response::new(user_to_proto(&row)))
    }

    async fn get_user(
        &self,
        req: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        use pb::get_user_request::Key;
        let row = match req.into_inner().key {
            Some(Key::UserId(id)) if !id.is_empty() => self.server.get_user(&id).await?,
            Some(Key::Username(name)) if !name.is_empty() => {
                self.server.get_user_by_username(&name).await?
            }
            _ => return Err(Error::invalid("key", "user_id or username is required").into()),
        };
        Ok(Response::new(user_to_proto(&row)))
    }

    async fn list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let r = req.into_inner();
        let (size, after) = page_in(r.page.as_ref())?;
        let prefix = (!r.prefix.is_empty()).then_some(r.prefix.as_str());
        let mut rows = self
            .server
            .list_users(after.as_deref(), prefix, size + 1)
            .await?;
        let page = page_out(&mut rows, size, |u| fold_case(&u.username));
        Ok(Response::new(pb::ListUsersResponse {
            users: rows.iter().map(user_to_proto).collect(),
            page: Some(page),
        }))
    }

    async fn update_user(
        &self,
        req: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let actor = actor_of(&req)?;
        let r = req.into_inner();
        let u = r.user.ok_or_else(|| Error::invalid("user", "required"))?;
        if u.user_id.is_empty() {
            return Err(Error::invalid("user.user_id", "required").into());
        }
        let expected = version_in(r.expected_version, "expected_version")?;
        let status = status_from_proto(u.status)?
            .ok_or_else(|| Error::invalid("user.status", "required"))?;
        let update = UserUpdate {
            email: non_empty(&u.email),
            status,
            profile: profile_from_proto(&u)?,
        };
        let row = self
            .server
            .update_user(&u.user_id, update, expected, actor)
            .await?;
        Ok(Response::new(user_to_proto(&row)))
    }

    async fn set_password(
        &self,
        req: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        let actor = actor_of(&req)?;
        let r = req.into_inner();
        let password = zeroize::Zeroizing::new(r.password);
        if r.user_id.is_empty() {
            return Err(Error::invalid("user_id", "required").into());
        }
        let row = self
            .server
            .set_password(&r.user_id, &password, r.keep_sessions, actor)
            .await?;
        Ok(Response::new(pb::SetPasswordResponse {
            user: Some(user_to_proto(&row)),
        }))
    }

    async fn list_scopes(
        &self,
        _req: Request<pb::ListScopesRequest>,
    ) -> Result<Response<pb::ListScopesResponse>, Status> {
        let scopes = self
            .server
            .cfg
            .scope_registry()
            .into_iter()
            .map(|(name, description, builtin)| pb::Scope {
                name,
                description,
                builtin,
            })
            .collect();
        Ok(Response::new(pb::ListScopesResponse { scopes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bad_ones_name_the_field() {
        assert_eq!(page_in(None).unwrap(), (50, None));
        let p = |size, token: &str| PageRequest {
            page_size: size,
            page_token: token.into(),
        };
        assert_eq!(page_in(Some(&p(5000, ""))).unwrap(), (1000, None));
        let mut rows: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let out = page_out(&mut rows, 2, Clone::clone);
        assert_eq!(rows, ["a", "b"]);
        let (_, after) = page_in(Some(&p(2, &out.next_page_token))).unwrap();
        assert_eq!(after.as_deref(), Some("b"));
        let mut last: Vec<String> = vec!["c".into()];
        assert!(
            page_out(&mut last, 2, Clone::clone)
                .next_page_token
                .is_empty()
        );
        for bad in ["!!", "", &"A".repeat(600)] {
            if bad.is_empty() {
                continue;
            }
            assert_eq!(
                page_in(Some(&p(1, bad))).unwrap_err().field.as_deref(),
                Some("page.page_token")
            );
        }
    }

    #[test]
    fn client_mapping_defaults_and_refusals() {
        let mut c = pb::Client {
            name: "x".into(),
            grant_types: vec!["client_credentials".into(), "client_credentials".into()],
            ..Default::default()
        };
        let s = client_from_proto(&c).unwrap();
        assert!(!s.public);
        assert_eq!(s.auth_method, AuthMethod::ClientSecretBasic);
        assert_eq!(s.grant_types, [GrantType::ClientCredentials]);
        c.token_endpoint_auth_method = "none".into();
        assert!(client_from_proto(&c).unwrap().public);
        c.token_endpoint_auth_method = "client_secret_jwt".into();
        assert_eq!(
            client_from_proto(&c).unwrap_err().field.as_deref(),
            Some("token_endpoint_auth_method")
        );
        c.token_endpoint_auth_method = String::new();
        c.grant_types = vec!["implicit".into()];
        assert_eq!(
            client_from_proto(&c).unwrap_err().field.as_deref(),
            Some("grant_types")
        );
        c.grant_types = vec![];
        c.r#type = 9;
        assert_eq!(
            client_from_proto(&c).unwrap_err().field.as_deref(),
            Some("type")
        );
    }
}
