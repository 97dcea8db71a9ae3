//! `secctl client create|list|get|update|delete|rotate-secret` and
//! `secctl user create|list|get|disable|set-password`: OAuth clients and users of auth-svc.
//!
//! - A client secret is printed once (by `create` and `rotate-secret`); the server keeps
//!   only a keyed hash of it.
//! - `client update` and `user disable` read the current row, apply the change and send
//!   the version they read: if someone changed it meanwhile the server answers ABORTED
//!   and the command fails (exit 1) saying so, instead of overwriting the other change.
//! - Passwords are read from stdin (`--password-stdin`), never from the command line
//!   (where the process list and shell history would keep them).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use sec_common::config::Config;
use sec_proto::auth::v1 as pb;
use sec_proto::auth::v1::auth_service_client::AuthServiceClient;
use sec_proto::common::v1::PageRequest;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::parse_duration;
use crate::output::{Output, print_json, time};
use crate::rpc::{Rpc as _, RpcError, authed_channel, read_input};

pub type AuthClient = AuthServiceClient<InterceptedService<Channel, sec_common::grpc::BearerToken>>;

/// `list` stops after this many rows (each page is at most 1000).
const DEFAULT_LIST_LIMIT: u32 = 1000;
/// A JWK Set file is at most this big (the server's limit is 16 KiB).
const MAX_JWKS_FILE: usize = 64 * 1024;
/// A password read from stdin is at most this big (the server's limit is 1024 bytes).
const MAX_PASSWORD_INPUT: usize = 4096;

pub fn client(config: &Config) -> anyhow::Result<AuthClient> {
    Ok(AuthServiceClient::new(authed_channel(config, "auth")?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientTypeArg {
    Confidential,
    Public,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMethodArg {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    None,
}

impl AuthMethodArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GrantArg {
    AuthorizationCode,
    ClientCredentials,
    RefreshToken,
}

impl GrantArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationCode => "authorization_code",
            Self::ClientCredentials => "client_credentials",
            Self::RefreshToken => "refresh_token",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Active,
    Disabled,
    Locked,
}

/// Settings `client create` and `client update` share. On update, a flag that is given
/// replaces that setting (a repeated flag replaces the whole list); the rest stay.
#[derive(Debug, clap::Args)]
pub struct ClientSettingsArgs {
    /// Display name (shown on the consent page).
    #[arg(long)]
    pub name: Option<String>,
    /// Token endpoint authentication (default: client_secret_basic for confidential
    /// clients, none for public ones).
    #[arg(long, value_enum)]
    pub auth_method: Option<AuthMethodArg>,
    /// Allowed grant (repeat for several).
    #[arg(long = "grant", value_enum)]
    pub grants: Vec<GrantArg>,
    /// Exact redirect URI (repeat for several).
    #[arg(long = "redirect-uri")]
    pub redirect_uris: Vec<String>,
    /// RP-initiated logout redirect URI (repeat for several).
    #[arg(long = "post-logout-redirect-uri")]
    pub post_logout_redirect_uris: Vec<String>,
    /// Allowed scope (repeat for several; none on create: the configured defaults).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// File with the client's JWK Set (private_key_jwt).
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,
    /// Access token lifetime (e.g. 15m; 0: server default).
    #[arg(long, value_parser = parse_duration)]
    pub access_ttl: Option<u64>,
    #[arg(long, value_parser = parse_duration)]
    pub refresh_ttl: Option<u64>,
    #[arg(long, value_parser = parse_duration)]
    pub id_ttl: Option<u64>,
    /// First-party client: skips consent.
    #[arg(long)]
    pub trusted: Option<bool>,
    /// Edge rate-limit tier.
    #[arg(long)]
    pub rate_limit_tier: Option<String>,
    /// PKCE S256 required (default true; always true for public clients).
    #[arg(long)]
    pub require_pkce: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create a client; prints its secret once (confidential secret-based clients).
    Create {
        /// Client id (default: a generated UUID).
        #[arg(long)]
        id: Option<String>,
        #[arg(long = "type", value_enum, default_value_t = ClientTypeArg::Confidential)]
        client_type: ClientTypeArg,
        #[command(flatten)]
        settings: ClientSettingsArgs,
    },
    /// Every client, in id order.
    List {
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: u32,
    },
    Get {
        client_id: String,
    },
    /// Change settings: reads the client, applies the flags, writes it back if nobody
    /// changed it meanwhile (else exit 1).
    Update {
        client_id: String,
        #[arg(long = "type", value_enum)]
        client_type: Option<ClientTypeArg>,
        /// Only if the client is still at this version (default: the version just read).
        #[arg(long)]
        expected_version: Option<u64>,
        #[command(flatten)]
        settings: ClientSettingsArgs,
    },
    /// Delete a client and revoke every token issued to it.
    Delete {
        client_id: String,
    },
    /// A new secret (printed once); the old one stops working at once.
    RotateSecret {
        client_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user.
    Create {
        username: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        email_verified: bool,
        /// Role (repeat for several).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// OIDC profile claims as a JSON object of strings, e.g. '{"name":"Ada"}'.
        #[arg(long)]
        claims: Option<String>,
        /// Read an initial password from stdin (first line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Users in username order, optionally those whose username or email starts with
    /// `--prefix`.
    List {
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: u32,
    },
    /// A user by id, or by `--username`.
    Get {
        #[arg(required_unless_present = "username")]
        user_id: Option<String>,
        #[arg(long, conflicts_with = "user_id")]
        username: Option<String>,
    },
    /// Disable (or `--status locked`) a user: their sessions end, their tokens are revoked.
    Disable {
        user_id: String,
        #[arg(long, value_enum, default_value_t = StatusArg::Disabled)]
        status: StatusArg,
    },
    /// Set a user's password, read from stdin (first line). Ends their sessions unless
    /// `--keep-sessions`.
    SetPassword {
        user_id: String,
        /// Required: the password comes from stdin, never from the command line.
        #[arg(long, required = true)]
        password_stdin: bool,
        #[arg(long)]
        keep_sessions: bool,
    },
}

fn ttl(v: Option<u64>, flag: &str) -> anyhow::Result<Option<u32>> {
    v.map(|s| u32::try_from(s).with_context(|| format!("--{flag} is too long")))
        .transpose()
}

/// Applies the given flags to `c`.
fn apply(c: &mut pb::Client, a: ClientSettingsArgs) -> anyhow::Result<()> {
    if let Some(n) = a.name {
        c.name = n;
    }
    if let Some(m) = a.auth_method {
        c.token_endpoint_auth_method = m.as_str().into();
    }
    if !a.grants.is_empty() {
        c.grant_types = a.grants.iter().map(|g| g.as_str().to_owned()).collect();
    }
    if !a.redirect_uris.is_empty() {
        c.redirect_uris = a.redirect_uris;
    }
    if !a.post_logout_redirect_uris.is_empty() {
        c.post_logout_redirect_uris = a.post_logout_redirect_uris;
    }
    if !a.scopes.is_empty() {
        c.scopes = a.scopes;
    }
    if let Some(p) = a.jwks_file {
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        anyhow::ensure!(bytes.len() <= MAX_JWKS_FILE, "{} is too large", p.display());
        c.jwks_json = String::from_utf8(bytes).context("the JWK Set is not UTF-8")?;
    }
    if let Some(v) = ttl(a.access_ttl, "access-ttl")? {
        c.access_token_ttl_seconds = v;
    }
    if let Some(v) = ttl(a.refresh_ttl, "refresh-ttl")? {
        c.refresh_token_ttl_seconds = v;
    }
    if let Some(v) = ttl(a.id_ttl, "id-ttl")? {
        c.id_token_ttl_seconds = v;
    }
    if let Some(t) = a.trusted {
        c.trusted = t;
    }
    if let Some(t) = a.rate_limit_tier {
        c.rate_limit_tier = t;
    }
    if let Some(p) = a.require_pkce {
        c.require_pkce = p;
    }
    Ok(())
}

fn type_name(t: i32) -> &'static str {
    match pb::ClientType::try_from(t) {
        Ok(pb::ClientType::Public) => "public",
        Ok(pb::ClientType::Confidential) => "confidential",
        _ => "unspecified",
    }
}

pub fn client_json(c: &pb::Client) -> Value {
    json!({
        "client_id": c.client_id,
        "name": c.name,
        "type": type_name(c.r#type),
        "token_endpoint_auth_method": c.token_endpoint_auth_method,
        "grant_types": c.grant_types,
        "redirect_uris": c.redirect_uris,
        "post_logout_redirect_uris": c.post_logout_redirect_uris,
        "scopes": c.scopes,
        "jwks_json": c.jwks_json,
        "access_token_ttl_seconds": c.access_token_ttl_seconds,
        "refresh_token_ttl_seconds": c.refresh_token_ttl_seconds,
        "id_token_ttl_seconds": c.id_token_ttl_seconds,
        "trusted": c.trusted,
        "rate_limit_tier": c.rate_limit_tier,
        "require_pkce": c.require_pkce,
        "dynamically_registered": c.dynamically_registered,
        "created_at": time(c.created_at.as_ref()),
        "updated_at": time(c.updated_at.as_ref()),
        "secret_rotated_at": time(c.secret_rotated_at.as_ref()),
        "version": c.version,
    })
}

fn client_detail(c: &pb::Client) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(" ")
        }
    };
    let mut s = String::new();
    for (k, v) in [
        ("client_id", c.client_id.clone()),
        ("name", c.name.clone()),
        ("type", type_name(c.r#type).into()),
        ("auth method", c.token_endpoint_auth_method.clone()),
        ("grants", list(&c.grant_types)),
        ("redirect uris", list(&c.redirect_uris)),
        ("logout uris", list(&c.post_logout_redirect_uris)),
        ("scopes", list(&c.scopes)),
        ("require pkce", c.require_pkce.to_string()),
        ("trusted", c.trusted.to_string()),
        ("rate-limit tier", c.rate_limit_tier.clone()),
        ("version", c.version.to_string()),
        ("created", time(c.created_at.as_ref())),
        ("updated", time(c.updated_at.as_ref())),
        ("secret rotated", time(c.secret_rotated_at.as_ref())),
    ] {
        s.push_str(&format!("{k:<16} {v}\n"));
    }
    s
}

fn print_client_with_secret(out: Output, r: &pb::ClientWithSecret) -> anyhow::Result<()> {
    let c = r.client.clone().unwrap_or_default();
    match out {
        Output::Json => {
            let mut v = client_json(&c);
            v["client_secret"] = r.client_secret.clone().into();
            print_json(&v)
        }
        Output::Table => {
            print!("{}", client_detail(&c));
            if !r.client_secret.is_empty() {
                println!(
                    "client secret    {}\n(shown once: store it now; only a keyed hash is kept)",
                    r.client_secret
                );
            }
            Ok(())
        }
    }
}

pub fn user_json(u: &pb::User) -> Value {
    let claims: Value = serde_json::from_str(&u.claims_json).unwrap_or_else(|_| json!({}));
    json!({
        "user_id": u.user_id,
        "username": u.username,
        "email": u.email,
        "email_verified": u.email_verified,
        "status": status_name(u.status),
        "roles": u.roles,
        "claims": claims,
        "has_password": u.has_password,
        "created_at": time(u.created_at.as_ref()),
        "updated_at": time(u.updated_at.as_ref()),
        "password_changed_at": time(u.password_changed_at.as_ref()),
        "version": u.version,
    })
}

fn status_name(s: i32) -> &'static str {
    match pb::UserStatus::try_from(s) {
        Ok(pb::UserStatus::Active) => "active",
        Ok(pb::UserStatus::Disabled) => "disabled",
        Ok(pb::UserStatus::Locked) => "locked",
        _ => "unspecified",
    }
}

fn user_detail(u: &pb::User) -> String {
    let mut s = String::new();
    for (k, v) in [
        ("user_id", u.user_id.clone()),
        ("username", u.username.clone()),
        ("email", u.email.clone()),
        ("email verified", u.email_verified.to_string()),
        ("status", status_name(u.status).into()),
        ("roles", u.roles.join(" ")),
        ("claims", u.claims_json.clone()),
        ("has password", u.has_password.to_string()),
        ("version", u.version.to_string()),
        ("created", time(u.created_at.as_ref())),
        ("password changed", time(u.password_changed_at.as_ref())),
    ] {
        s.push_str(&format!("{k:<16} {v}\n"));
    }
    s
}

fn print_user(out: Output, u: &pb::User) -> anyhow::Result<()> {
    match out {
        Output::Json => print_json(&user_json(u)),
        Output::Table => {
            print!("{}", user_detail(u));
            Ok(())
        }
    }
}

/// The first line of stdin, without its line ending.
async fn password_from_stdin() -> anyhow::Result<String> {
    let bytes = read_input(None).await?;
    anyhow::ensure!(
        bytes.len() <= MAX_PASSWORD_INPUT,
        "the password on stdin is too long"
    );
    let text = String::from_utf8(bytes).context("the password is not UTF-8")?;
    let line = text.lines().next().unwrap_or_default().to_owned();
    anyhow::ensure!(!line.is_empty(), "no password on stdin");
    Ok(line)
}

/// An ABORTED update as the operator should read it.
fn explain_aborted(e: anyhow::Error, what: &str) -> anyhow::Error {
    match e.downcast_ref::<RpcError>() {
        Some(RpcError(s)) if s.code() == tonic::Code::Aborted => anyhow::anyhow!(
            "Aborted: the {what} changed since it was read (concurrent update); nothing was written, read it again and retry"
        ),
        _ => e,
    }
}

pub async fn run_client(
    config: &Config,
    out: Output,
    cmd: ClientCommand,
) -> anyhow::Result<ExitCode> {
    let mut api = client(config)?;
    match cmd {
        ClientCommand::Create {
            id,
            client_type,
            settings,
        } => {
            let mut c = pb::Client {
                client_id: id.unwrap_or_default(),
                r#type: match client_type {
                    ClientTypeArg::Confidential => pb::ClientType::Confidential,
                    ClientTypeArg::Public => pb::ClientType::Public,
                } as i32,
                grant_types: vec!["authorization_code".into(), "refresh_token".into()],
                require_pkce: true,
                ..Default::default()
            };
            anyhow::ensure!(settings.name.is_some(), "--name is required");
            apply(&mut c, settings)?;
            let r = api
                .create_client(pb::CreateClientRequest { client: Some(c) })
                .await
                .rpc()?;
            print_client_with_secret(out, &r)?;
        }
        ClientCommand::List { limit } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let want = limit.saturating_sub(u32::try_from(all.len()).unwrap_or(u32::MAX));
                if want == 0 {
                    break;
                }
                let r = api
                    .list_clients(pb::ListClientsRequest {
                        page: Some(PageRequest {
                            page_size: want.min(1000),
                            page_token: token,
                        }),
                    })
                    .await
                    .rpc()?;
                all.extend(r.clients);
                token = r.page.unwrap_or_default().next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            match out {
                Output::Json => {
                    print_json(&all.iter().map(client_json).collect::<Vec<_>>().into())?
                }
                Output::Table => {
                    println!(
                        "{:<38} {:<32} {:<12} {:<20} {:>7}",
                        "CLIENT_ID", "NAME", "TYPE", "AUTH_METHOD", "VERSION"
                    );
                    for c in &all {
                        println!(
                            "{:<38} {:<32} {:<12} {:<20} {:>7}",
                            c.client_id,
                            c.name.chars().take(32).collect::<String>(),
                            type_name(c.r#type),
                            c.token_endpoint_auth_method,
                            c.version
                        );
                    }
                }
            }
        }
        ClientCommand::Get { client_id } => {
            let c = api
                .get_client(pb::GetClientRequest { client_id })
                .await
                .rpc()?;
            match out {
                Output::Json => print_json(&client_json(&c))?,
                Output::Table => print!("{}", client_detail(&c)),
            }
        }
        ClientCommand::Update {
            client_id,
            client_type,
            expected_version,
            settings,
        } => {
            let mut c = api
                .get_client(pb::GetClientRequest {
                    client_id: client_id.clone(),
                })
                .await
                .rpc()?;
            let version = expected_version.unwrap_or(c.version);
            if let Some(t) = client_type {
                c.r#type = match t {
                    ClientTypeArg::Confidential => pb::ClientType::Confidential,
                    ClientTypeArg::Public => pb::ClientType::Public,
                } as i32;
            }
            apply(&mut c, settings)?;
            let c = api
                .update_client(pb::UpdateClientRequest {
                    client: Some(c),
                    expected_version: version,
                })
                .await
                .rpc()
                .map_err(|e| explain_aborted(e, "client"))?;
            match out {
                Output::Json => print_json(&client_json(&c))?,
                Output::Table => print!("{}", client_detail(&c)),
            }
        }
        ClientCommand::Delete { client_id } => {
            api.delete_client(pb::DeleteClientRequest {
                client_id: client_id.clone(),
            })
            .await
            .rpc()?;
            match out {
                Output::Json => print_json(&json!({ "deleted": client_id }))?,
                Output::Table => println!("deleted {client_id}"),
            }
        }
        ClientCommand::RotateSecret { client_id } => {
            let r = api
                .rotate_client_secret(pb::RotateClientSecretRequest { client_id })
                .await
                .rpc()?;
            print_client_with_secret(out, &r)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_user(config: &Config, out: Output, cmd: UserCommand) -> anyhow::Result<ExitCode> {
    let mut api = client(config)?;
    match cmd {
        UserCommand::Create {
            username,
            email,
            email_verified,
            roles,
            claims,
            password_stdin,
        } => {
            if let Some(c) = &claims {
                serde_json::from_str::<serde_json::Map<String, Value>>(c)
                    .context("--claims must be a JSON object")?;
            }
            let password = if password_stdin {
                password_from_stdin().await?
            } else {
                String::new()
            };
            let u = api
                .create_user(pb::CreateUserRequest {
                    user: Some(pb::User {
                        username,
                        email: email.unwrap_or_default(),
                        email_verified,
                        roles,
                        claims_json: claims.unwrap_or_default(),
                        ..Default::default()
                    }),
                    password,
                })
                .await
                .rpc()?;
            print_user(out, &u)?;
        }
        UserCommand::List { prefix, limit } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let want = limit.saturating_sub(u32::try_from(all.len()).unwrap_or(u32::MAX));
                if want == 0 {
                    break;
                }
                let r = api
                    .list_users(pb::ListUsersRequest {
                        page: Some(PageRequest {
                            page_size: want.min(1000),
                            page_token: token,
                        }),
                        prefix: prefix.clone().unwrap_or_default(),
                    })
                    .await
                    .rpc()?;
                all.extend(r.users);
                token = r.page.unwrap_or_default().next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            match out {
                Output::Json => print_json(&all.iter().map(user_json).collect::<Vec<_>>().into())?,
                Output::Table => {
                    println!(
                        "{:<38} {:<24} {:<32} {:<9} {:>7}",
                        "USER_ID", "USERNAME", "EMAIL", "STATUS", "VERSION"
                    );
                    for u in &all {
                        println!(
                            "{:<38} {:<24} {:<32} {:<9} {:>7}",
                            u.user_id,
                            u.username,
                            u.email,
                            status_name(u.status),
                            u.version
                        );
                    }
                }
            }
        }
        UserCommand::Get { user_id, username } => {
            use pb::get_user_request::Key;
            let key = match (user_id, username) {
                (_, Some(n)) => Key::Username(n),
                (Some(id), None) => Key::UserId(id),
                (None, None) => anyhow::bail!("give a user id or --username"),
            };
            let u = api
                .get_user(pb::GetUserRequest { key: Some(key) })
                .await
                .rpc()?;
            print_user(out, &u)?;
        }
        UserCommand::Disable { user_id, status } => {
            use pb::get_user_request::Key;
            let mut u = api
                .get_user(pb::GetUserRequest {
                    key: Some(Key::UserId(user_id)),
                })
                .await
                .rpc()?;
            let version = u.version;
            u.status = match status {
                StatusArg::Active => pb::UserStatus::Active,
                StatusArg::Disabled => pb::UserStatus::Disabled,
                StatusArg::Locked => pb::UserStatus::Locked,
            } as i32;
            let u = api
                .update_user(pb::UpdateUserRequest {
                    user: Some(u),
                    expected_version: version,
                })
                .await
                .rpc()
                .map_err(|e| explain_aborted(e, "user"))?;
            print_user(out, &u)?;
        }
        UserCommand::SetPassword {
            user_id,
            password_stdin: _,
            keep_sessions,
        } => {
            let password = password_from_stdin().await?;
            let r = api
                .set_password(pb::SetPasswordRequest {
                    user_id,
                    password,
                    keep_sessions,
                })
                .await
                .rpc()?;
            print_user(out, &r.user.unwrap_or_default())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
