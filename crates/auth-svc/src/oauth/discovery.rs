//! Discovery: `GET /.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §3)
//! and `GET /.well-known/oauth-authorization-server` (RFC 8414), one document for both.
//!
//! Every URL is `issuer` + path ([`OAuthConfig::url`]), so a client that fetched the
//! document from the issuer finds every endpoint under it (RFC 8414 §3.3 requires the
//! `issuer` to be exactly the one the client used). The signing algorithms are the ones
//! token-svc's JWKS publishes, read through the same in-memory cache as `/jwks`; when
//! token-svc is unreachable the document still answers, with the algorithms token-svc
//! can sign with, rather than failing discovery for every client.
//!
//! Booleans whose default in the specifications is `true` but which we do not support
//! (`request_uri_parameter_supported`) are stated explicitly.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::jwks::JwksCache;
use crate::config::OAuthConfig;
use crate::engine::AuthServer;

/// What token-svc can sign with, when its JWKS cannot be read.
pub const FALLBACK_SIGNING_ALGS: &[&str] = &["ES256", "EdDSA", "RS256", "PS256"];
/// What a `private_key_jwt` client assertion may be signed with.
pub const CLIENT_ASSERTION_ALGS: &[&str] = &["ES256", "EdDSA", "RS256", "PS256"];
/// How long clients and intermediaries may cache the document.
pub const MAX_AGE_SECONDS: u32 = 300;

/// Claims an ID token or `/userinfo` may carry (OIDC Core §2, §5.1).
pub const CLAIMS_SUPPORTED: &[&str] = &[
    "sub",
    "iss",
    "aud",
    "exp",
    "iat",
    "auth_time",
    "nonce",
    "acr",
    "amr",
    "azp",
    "sid",
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
    "updated_at",
    "email",
    "email_verified",
];

pub fn routes() -> Router<Arc<AuthServer>> {
    // One cache per router, i.e. per server: separate platforms in one process (tests)
    // never share keys.
    let cache = Arc::new(JwksCache::new());
    let for_oauth = cache.clone();
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move |s: State<Arc<AuthServer>>| openid_configuration(s, cache.clone())),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            get(move |s: State<Arc<AuthServer>>| {
                oauth_authorization_server(s, for_oauth.clone())
            }),
        )
}

/// OpenID Provider Metadata (OIDC Discovery 1.0 §3).
#[utoipa::path(
    get,
    path = "/.well-known/openid-configuration",
    tag = "discovery",
    summary = "OpenID Provider metadata (OIDC Discovery 1.0)",
    responses(
        (status = 200, description = "The provider metadata", content_type = "application/json", body = Object),
    ),
)]
pub async fn openid_configuration(
    State(server): State<Arc<AuthServer>>,
    cache: Arc<JwksCache>,
) -> Response {
    serve(&server, &cache).await
}

/// Authorization Server Metadata (RFC 8414): the same document.
#[utoipa::path(
    get,
    path = "/.well-known/oauth-authorization-server",
    tag = "discovery",
    summary = "OAuth 2.0 authorization server metadata (RFC 8414)",
    responses(
        (status = 200, description = "The server metadata", content_type = "application/json", body = Object),
    ),
)]
pub async fn oauth_authorization_server(
    State(server): State<Arc<AuthServer>>,
    cache: Arc<JwksCache>,
) -> Response {
    serve(&server, &cache).await
}

async fn serve(server: &AuthServer, cache: &JwksCache) -> Response {
    let algs = match cache.get(server).await {
        Ok(j) => j.algs.clone(),
        Err(_) => Vec::new(),
    };
    server.metrics.request("discovery", "ok");
    let mut resp = axum::Json(document(&server.cfg, &algs)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    // Metadata is public; browser-based clients fetch it cross-origin.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// The metadata document for `cfg`; `signing_algs` are those of the published keys (empty:
/// the fallback list).
pub fn document(cfg: &OAuthConfig, signing_algs: &[String]) -> Value {
    let signing: Vec<&str> = if signing_algs.is_empty() {
        FALLBACK_SIGNING_ALGS.to_vec()
    } else {
        signing_algs.iter().map(String::as_str).collect()
    };
    let scopes: Vec<String> = cfg.scope_registry().into_iter().map(|(n, _, _)| n).collect();
    // `none`: public clients (PKCE) authenticate with their client_id only.
    let token_auth = [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "none",
    ];
    let confidential_auth = ["client_secret_basic", "client_secret_post", "private_key_jwt"];
    json!({
        "issuer": cfg.issuer,
        "authorization_endpoint": cfg.url("/authorize"),
        "token_endpoint": cfg.url("/token"),
        "userinfo_endpoint": cfg.url("/userinfo"),
        "jwks_uri": cfg.url("/jwks"),
        "registration_endpoint": cfg.url("/register"),
        "revocation_endpoint": cfg.url("/revoke"),
        "introspection_endpoint": cfg.url("/introspect"),
        "end_session_endpoint": cfg.url("/logout"),
        "scopes_supported": scopes,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query", "form_post"],
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": signing,
        "token_endpoint_auth_methods_supported": token_auth,
        "token_endpoint_auth_signing_alg_values_supported": CLIENT_ASSERTION_ALGS,
        "revocation_endpoint_auth_methods_supported": token_auth,
        "revocation_endpoint_auth_signing_alg_values_supported": CLIENT_ASSERTION_ALGS,
        "introspection_endpoint_auth_methods_supported": confidential_auth,
        "introspection_endpoint_auth_signing_alg_values_supported": CLIENT_ASSERTION_ALGS,
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": CLAIMS_SUPPORTED,
        "claim_types_supported": ["normal"],
        "authorization_response_iss_parameter_supported": true,
        "prompt_values_supported": ["none", "login", "consent"],
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "require_request_uri_registration": false,
        "claims_parameter_supported": false,
        "frontchannel_logout_supported": false,
        "backchannel_logout_supported": false,
        "service_documentation": cfg.url("/security"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_is_under_the_issuer() {
        let cfg = OAuthConfig {
            issuer: "https://login.example.com/".into(),
            ..OAuthConfig::default()
        };
        let d = document(&cfg, &[]);
        assert_eq!(d["issuer"], "https://login.example.com/");
        for (k, path) in [
            ("authorization_endpoint", "/authorize"),
            ("token_endpoint", "/token"),
            ("userinfo_endpoint", "/userinfo"),
            ("jwks_uri", "/jwks"),
            ("registration_endpoint", "/register"),
            ("revocation_endpoint", "/revoke"),
            ("introspection_endpoint", "/introspect"),
            ("end_session_endpoint", "/logout"),
        ] {
            assert_eq!(d[k], format!("https://login.example.com{path}"), "{k}");
        }
        assert_eq!(
            d["id_token_signing_alg_values_supported"],
            json!(["ES256", "EdDSA", "RS256", "PS256"])
        );
        assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(d["request_uri_parameter_supported"], false);
        assert_eq!(d["authorization_response_iss_parameter_supported"], true);
    }

    #[test]
    fn scopes_and_algorithms_come_from_the_registry_and_the_keys() {
        let mut cfg = OAuthConfig::default();
        cfg.scopes.insert("orders:read".into(), "Read orders".into());
        let d = document(&cfg, &["EdDSA".to_owned()]);
        assert_eq!(
            d["scopes_supported"],
            json!(["openid", "profile", "email", "offline_access", "orders:read"])
        );
        assert_eq!(d["id_token_signing_alg_values_supported"], json!(["EdDSA"]));
    }
}
