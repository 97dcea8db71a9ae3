//! The HTTP facade edge traffic reaches: `/healthz`, and JSON under `/security/*`.
//! OAuth/OIDC endpoints and login pages arrive with their issues.
//!
//! `GET /security/keys` (admin only) lists crypto-svc's keys with their public parts. It
//! reaches crypto-svc over gRPC like any other client (this crate never links
//! crypto-svc), forwarding the caller's bearer token, so crypto-svc applies its own
//! authorization as well.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sec_common::auth::{Authenticator, Caller, bearer};
use sec_common::error::{Error, ErrorCode};
use sec_common::grpc::{BearerToken, channel};
use sec_common::service::Platform;

use crate::engine::AuthServer;
use sec_proto::common::v1::PageRequest;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{Key, ListKeysRequest};
use tonic::transport::Channel;

/// At most this many keys in one `/security/keys` answer.
pub const MAX_KEYS: usize = 1000;
const PAGE_SIZE: u32 = 200;
/// Bound on the whole listing (all pages).
const LIST_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) struct Facade {
    pub(crate) auth: Arc<Authenticator>,
    /// Lazily connecting: crypto-svc may start after (or restart independently of) us.
    crypto: Channel,
    /// Lazily connecting, like `crypto`.
    pub(crate) audit: Channel,
}

/// The facade's routes: the admin JSON here, the protocol endpoints of [`crate::oauth`]
/// and the pages of [`crate::pages`]. Fails only on an invalid crypto-svc endpoint or TLS
/// setting.
pub fn router(platform: &Platform, server: Arc<AuthServer>) -> anyhow::Result<Router> {
    let protocol = crate::oauth::routes()
        .merge(crate::pages::routes())
        .with_state(server);
    Ok(admin_router(platform)?.merge(protocol))
}

/// `router` behind edge protection (see [`crate::edge`] for the order of the layers).
pub fn protected(
    router: Router,
    edge: &sec_edge::EdgeRuntime,
    server: Arc<AuthServer>,
) -> anyhow::Result<Router> {
    if !edge.config().enabled {
        tracing::warn!("edge.enabled = false: the facade enforces no rate limits or IP rules");
        return Ok(router);
    }
    Ok(router
        .layer(axum::middleware::from_fn_with_state(
            edge.clone(),
            crate::edge::report_failures,
        ))
        .layer(edge.layer()?)
        .layer(axum::middleware::from_fn_with_state(
            server,
            crate::edge::identify,
        )))
}

/// `/healthz` and `/security/keys`.
fn admin_router(platform: &Platform) -> anyhow::Result<Router> {
    let cfg = &platform.config;
    let crypto = channel(
        &cfg.service_addrs("crypto")?.endpoint_url(cfg.tls.enabled()),
        &cfg.tls,
    )?;
    let audit = channel(
        &cfg.service_addrs("audit")?.endpoint_url(cfg.tls.enabled()),
        &cfg.tls,
    )?;
    let state = Arc::new(Facade {
        auth: Arc::clone(&platform.auth),
        crypto,
        audit,
    });
    Ok(Router::new()
        .route("/healthz", get(healthz))
        .route("/security/keys", get(list_keys))
        .route("/security/audit", get(crate::facade_audit::search))
        .route("/security/monitor", get(crate::facade_monitor::monitor))
        .with_state(state)
        .layer(sec_common::telemetry::TraceContextLayer))
}

/// An error response: the platform's JSON body, a `WWW-Authenticate` challenge on 401
/// (RFC 6750 §3), and `Cache-Control: no-store`.
pub(crate) fn error_response(e: Error, challenge: &'static str) -> Response {
    let unauthenticated = e.code == ErrorCode::Unauthenticated;
    let mut resp = e.into_response();
    if unauthenticated {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    no_store(resp)
}

pub(crate) fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The admin token from `Authorization: Bearer …`, checked: one SHA-256 and a
/// constant-time compare, so a flood of bogus tokens costs the facade nothing.
pub(crate) async fn require_admin(
    auth: &Arc<Authenticator>,
    headers: &HeaderMap,
) -> Result<String, Response> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(error_response(
            Error::new(
                ErrorCode::Unauthenticated,
                "missing credentials: send `Authorization: Bearer <token>`",
            ),
            "Bearer",
        ));
    };
    let invalid = |message: &'static str| {
        error_response(
            Error::new(ErrorCode::Unauthenticated, message),
            r#"Bearer error="invalid_token""#,
        )
    };
    let Some(token) = value.to_str().ok().and_then(bearer) else {
        return Err(invalid("authorization must be `Bearer <token>`"));
    };
    match auth.authenticate_token(token).await {
        Ok(Caller::Admin) => Ok(token.to_owned()),
        Ok(_) => Err(error_response(
            Error::denied("this endpoint needs the admin credential"),
            "Bearer",
        )),
        Err(e) if e.code == ErrorCode::Unauthenticated => Err(invalid("invalid credentials")),
        Err(e) => Err(error_response(e, "Bearer")),
    }
}

/// A failed call to a peer service (`peer`: `crypto-svc`, `audit-svc`) as the facade's
/// caller sees it: the same code, the peer's caller-facing message, and bland messages
/// where the cause is ours to log.
pub(crate) fn from_status(peer: &'static str, status: &tonic::Status) -> Error {
    match ErrorCode::from_grpc(status.code()) {
        ErrorCode::Unavailable => Error::unavailable(peer, status),
        ErrorCode::Internal => Error::internal(peer, status),
        ErrorCode::DeadlineExceeded => Error::new(
            ErrorCode::DeadlineExceeded,
            format!("{peer} did not answer in time"),
        ),
        code => Error::new(code, status.message().to_owned()),
    }
}

/// `GET /healthz`: the facade answers (liveness only; readiness is `/readyz` on the
/// admin port).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "platform",
    summary = "Liveness of the facade",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)),
)]
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /security/keys`: every key (up to [`MAX_KEYS`]) with its versions and, for
/// asymmetric keys, their public keys. Never any key material.
#[utoipa::path(
    get,
    path = "/security/keys",
    tag = "platform",
    summary = "crypto-svc's keys with their public parts (admin)",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The keys (at most 1000) and whether the list was truncated", content_type = "application/json", body = Object),
        (status = 401, description = "No or invalid credentials", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 403, description = "The caller is not the admin", body = crate::oauth::openapi::OAuthErrorBody),
        (status = 503, description = "crypto-svc is unreachable", body = crate::oauth::openapi::OAuthErrorBody),
    ),
)]
pub(crate) async fn list_keys(State(f): State<Arc<Facade>>, headers: HeaderMap) -> Response {
    let token = match require_admin(&f.auth, &headers).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let bearer = match BearerToken::new(Some(&token)) {
        Ok(b) => b,
        Err(_) => {
            return error_response(
                Error::new(ErrorCode::Unauthenticated, "invalid credentials"),
                r#"Bearer error="invalid_token""#,
            );
        }
    };
    let mut client = CryptoServiceClient::with_interceptor(f.crypto.clone(), bearer);
    let listing = async {
        let mut keys: Vec<Key> = Vec::new();
        let mut page_token = String::new();
        loop {
            let resp = client
                .list_keys(ListKeysRequest {
                    page: Some(PageRequest {
                        page_size: PAGE_SIZE,
                        page_token,
                    }),
                })
                .await
                .map_err(|s| from_status("crypto-svc", &s))?
                .into_inner();
            let got = resp.keys.len();
            keys.extend(resp.keys);
            page_token = resp.page.map(|p| p.next_page_token).unwrap_or_default();
            if keys.len() >= MAX_KEYS {
                keys.truncate(MAX_KEYS);
                return Ok((keys, true));
            }
            if page_token.is_empty() || got == 0 {
                return Ok((keys, false));
            }
        }
    };
    let (keys, truncated) = match tokio::time::timeout(LIST_TIMEOUT, listing).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error_response(e, "Bearer"),
        Err(_) => {
            return error_response(
                Error::new(
                    ErrorCode::DeadlineExceeded,
                    "crypto-svc did not answer in time",
                ),
                "Bearer",
            );
        }
    };
    let body = serde_json::json!({
        "keys": keys.iter().map(key_json).collect::<Vec<_>>(),
        "truncated": truncated,
    });
    no_store(axum::Json(body).into_response())
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> serde_json::Value {
    t.and_then(sec_common::events::from_timestamp)
        .map(|t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into()
        })
        .unwrap_or(serde_json::Value::Null)
}

/// The public view of a key. Field by field on purpose: a field added to `Key` later is
/// not published until someone decides it may be.
fn key_json(k: &Key) -> serde_json::Value {
    let c = k.config.clone().unwrap_or_default();
    let versions: Vec<_> = k
        .versions
        .iter()
        .map(|v| {
            let mut o = serde_json::json!({
                "version": v.version,
                "created_at": rfc3339(v.created_at.as_ref()),
            });
            if !v.public_key_pem.is_empty() {
                o["public_key_pem"] = v.public_key_pem.clone().into();
            }
            o
        })
        .collect();
    serde_json::json!({
        "name": k.name,
        "type": k.type_name,
        "latest_version": k.latest_version,
        "min_decryption_version": c.min_decryption_version,
        "min_encryption_version": c.min_encryption_version,
        "rotation_period_seconds": c.rotation_period_seconds,
        "deletion_allowed": c.deletion_allowed,
        "exportable": c.exportable,
        "integrity_failed": k.integrity_failed,
        "created_at": rfc3339(k.created_at.as_ref()),
        "last_rotated_at": rfc3339(k.last_rotated_at.as_ref()),
        "versions": versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sec_proto::crypto::v1::{KeyConfig, KeyVersion};

    #[test]
    fn key_json_has_the_public_parts_only() {
        let k = Key {
            name: "signer".into(),
            r#type: 8,
            type_name: "ed25519".into(),
            latest_version: 2,
            config: Some(KeyConfig {
                rotation_period_seconds: 86_400,
                ..Default::default()
            }),
            versions: vec![
                KeyVersion {
                    version: 1,
                    created_at: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                    public_key_pem: "-----BEGIN PUBLIC KEY-----\n".into(),
                    encryptions: 0,
                },
                KeyVersion {
                    version: 2,
                    created_at: None,
                    public_key_pem: String::new(),
                    encryptions: 0,
                },
            ],
            operations: vec!["sign".into()],
            ..Default::default()
        };
        let j = key_json(&k);
        assert_eq!(j["type"], "ed25519");
        assert_eq!(j["rotation_period_seconds"], 86_400);
        assert_eq!(
            j["versions"][0]["created_at"],
            "2023-11-14T22:13:20.000000Z"
        );
        assert_eq!(
            j["versions"][0]["public_key_pem"],
            "-----BEGIN PUBLIC KEY-----\n"
        );
        assert!(j["versions"][1].get("public_key_pem").is_none());
        assert!(j["last_rotated_at"].is_null());
        assert_eq!(j["integrity_failed"], false);
        let fields: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            fields.len(),
            12,
            "only the documented fields are published: {fields:?}"
        );
    }

    #[test]
    fn grpc_errors_keep_their_code_and_hide_internal_causes() {
        let e = from_status(
            "crypto-svc",
            &tonic::Status::unavailable("tcp connect error 10.0.0.7:50055"),
        );
        assert_eq!(e.code.http(), http_status(503));
        assert!(!e.message.contains("10.0.0.7"));
        let e = from_status(
            "crypto-svc",
            &tonic::Status::internal("sqlite: disk I/O error"),
        );
        assert_eq!(e.code.http(), http_status(500));
        assert_eq!(e.message, "internal error");
        let e = from_status(
            "crypto-svc",
            &tonic::Status::permission_denied("admin only"),
        );
        assert_eq!(e.code.http(), http_status(403));
        assert_eq!(e.message, "admin only");
    }

    fn http_status(code: u16) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(code).unwrap()
    }

    /// A facade whose crypto-svc endpoint is a port nothing listens on, with an admin
    /// token and an in-process service credential. Its data (the event outbox) lives in
    /// the returned directory, not in the crate's working directory.
    async fn facade() -> (Router, String, tempfile::TempDir) {
        use sec_common::auth::{generate_token, hash_token};
        let token = generate_token().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = sec_common::config::Config {
            data_dir: data.path().to_owned(),
            ..sec_common::config::Config::default()
        };
        config.auth.admin_token_hash = Some(sec_common::config::Secret::new(hash_token(&token)));
        for peer in ["crypto", "audit"] {
            config.services.insert(
                peer.into(),
                sec_common::config::ServiceAddrs {
                    grpc_addr: closed.local_addr().unwrap(),
                    admin_addr: closed.local_addr().unwrap(),
                    endpoint: None,
                },
            );
        }
        drop(closed);
        let auth = Authenticator::from_config(&config)
            .unwrap()
            .with_service_token("svc-credential");
        let platform = Platform::connect(config, auth, sec_common::clock::system(), "t")
            .await
            .unwrap();
        (admin_router(&platform).unwrap(), token, data)
    }

    async fn get(app: &Router, auth: Option<&str>) -> (u16, HeaderMap, serde_json::Value) {
        use tower::ServiceExt as _;
        let mut req = axum::http::Request::get("/security/keys");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let resp = app
            .clone()
            .oneshot(req.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn refusals_and_an_unreachable_crypto_svc() {
        let (app, token, _data) = facade().await;
        let (status, headers, body) = get(&app, None).await;
        assert_eq!(status, 401);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(body["error"], "unauthenticated");
        assert!(body["error_description"].is_string());

        for bad in ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer sec_nope"] {
            let (status, headers, body) = get(&app, Some(bad)).await;
            assert_eq!(status, 401, "{bad}");
            assert!(
                headers[header::WWW_AUTHENTICATE]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
            assert_eq!(body["error"], "unauthenticated");
        }

        let (status, _, body) = get(&app, Some("Bearer svc-credential")).await;
        assert_eq!(status, 403, "a service caller is not an admin");
        assert_eq!(body["error"], "permission_denied");

        let (status, headers, body) = get(&app, Some(&format!("Bearer {token}"))).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "unavailable");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert!(headers.get(header::WWW_AUTHENTICATE).is_none());
    }
}
