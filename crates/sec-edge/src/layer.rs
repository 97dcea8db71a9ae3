//! A tower layer for axum routers: resolves the client address, applies the IP lists
//! (403), then the rate limits (429), and adds the IETF `RateLimit-Policy` / `RateLimit`
//! fields (draft-ietf-httpapi-ratelimit-headers-09/10) to limited responses and,
//! when configured, to successful ones.
//!
//! The seam for auth-svc: the host authenticates first (an outer layer, or a layer added
//! *after* this one in axum's `Router::layer` order) and inserts an [`EdgeIdentity`]
//! request extension with the client id, user and per-client trusted flag. Without it
//! the request is anonymous: rules keyed by `client_id`/`user` do not apply to it.
//! The socket peer comes from axum's `ConnectInfo<SocketAddr>` (serve with
//! `into_make_service_with_connect_info::<SocketAddr>()`); without it every request is
//! treated as coming from `0.0.0.0`, i.e. as one client.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http::{HeaderValue, Request, StatusCode};

use crate::client_ip::ClientIpResolver;
use crate::ip::{BlockReason, IpControl};
use crate::limiter::{CheckRequest, Decision, Limiter};

/// Who the caller is, as the host established it (inserted as a request extension).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeIdentity {
    pub client_id: Option<String>,
    pub user: Option<String>,
    /// The per-client bypass flag from auth-svc's client record.
    pub trusted: bool,
}

/// The resolved client address, inserted for the handlers behind the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// What the runtime ([`crate::EdgeRuntime`]) adds to the layer: geolocation, events,
/// statistics and auto-block counting. The part-1 layer works without it.
pub trait EdgeHooks: Send + Sync {
    /// A further admission check after the IP lists (geolocation).
    fn check_ip(&self, ip: IpAddr, client: Option<&str>, route: &str) -> Result<(), BlockReason>;
    /// A request was refused by the IP lists or [`check_ip`](Self::check_ip).
    fn blocked(&self, ip: IpAddr, reason: BlockReason);
    /// The limiter decided (limited or not).
    fn decided(&self, ip: IpAddr, decision: &Decision);
    /// The handler answered with `status` (4xx floods count towards auto-block).
    fn responded(&self, ip: IpAddr, status: StatusCode);
}

pub struct EdgeState {
    pub resolver: ClientIpResolver,
    pub ip: Arc<IpControl>,
    pub limiter: Arc<Limiter>,
    /// Add `RateLimit-Policy` and `RateLimit` to responses that were not limited too.
    pub headers_on_success: bool,
    /// The runtime's hooks (None: lists and limits only).
    pub hooks: Option<Arc<dyn EdgeHooks>>,
}

impl std::fmt::Debug for EdgeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeState")
            .field("headers_on_success", &self.headers_on_success)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct EdgeLayer {
    state: Arc<EdgeState>,
}

impl EdgeLayer {
    pub fn new(state: EdgeState) -> Self {
        Self {
            state: Arc::new(state),
        }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
    state: Arc<EdgeState>,
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `RateLimit-Policy` and `RateLimit` values for the enforcing rules of `d`, e.g.
/// `"login";q=10;w=60` and `"login";r=3;t=42` (structured-field lists, one member per
/// policy; the policy name is a validated rule id, so it needs no escaping).
pub fn ratelimit_fields(d: &Decision) -> Option<(String, String)> {
    let mut policy = String::new();
    let mut current = String::new();
    // Shadow rules never limit, and a rule that failed open has no state to report.
    for r in d
        .rules
        .iter()
        .filter(|r| !(r.shadow || (r.store_error && r.allowed)))
    {
        if !policy.is_empty() {
            policy.push_str(", ");
            current.push_str(", ");
        }
        let _ = write!(
            policy,
            "\"{}\";q={};w={}",
            r.rule_id, r.quota, r.window_secs
        );
        let _ = write!(
            current,
            "\"{}\";r={};t={}",
            r.rule_id,
            r.remaining,
            secs_ceil(r.reset)
        );
    }
    (!policy.is_empty()).then_some((policy, current))
}

fn add_fields(resp: &mut Response, d: &Decision) {
    if d.bypassed {
        return; // no limit applied
    }
    if let Some((policy, current)) = ratelimit_fields(d)
        && let (Ok(p), Ok(c)) = (
            HeaderValue::from_str(&policy),
            HeaderValue::from_str(&current),
        )
    {
        resp.headers_mut().insert("ratelimit-policy", p);
        resp.headers_mut().insert("ratelimit", c);
    }
}

fn limited(d: &Decision) -> Response {
    let retry = secs_ceil(d.retry_after()).max(1);
    let mut resp = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(serde_json::json!({"error": "rate_limited", "retry_after": retry})),
    )
        .into_response();
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(retry));
    add_fields(&mut resp, d);
    resp
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({"error": "ip_denied"})),
    )
        .into_response()
}

impl<S> tower::Service<Request<Body>> for EdgeService<S>
where
    S: tower::Service<Request<Body>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
            let ip = state.resolver.resolve(peer, req.headers());
            req.extensions_mut().insert(ClientIp(ip));
            let ident = req
                .extensions()
                .get::<EdgeIdentity>()
                .cloned()
                .unwrap_or_default();
            let route = req.uri().path().to_owned();
            let admitted = state
                .ip
                .check(ip, ident.client_id.as_deref(), &route)
                .and_then(|()| match &state.hooks {
                    Some(h) => h.check_ip(ip, ident.client_id.as_deref(), &route),
                    None => Ok(()),
                });
            if let Err(reason) = admitted {
                state.limiter.metrics().ip_blocked(reason.as_str());
                if let Some(h) = &state.hooks {
                    h.blocked(ip, reason);
                }
                return Ok(forbidden());
            }
            let decision = state
                .limiter
                .check(&CheckRequest {
                    route: &route,
                    method: req.method().as_str(),
                    endpoint: None,
                    client_id: ident.client_id.as_deref(),
                    user: ident.user.as_deref(),
                    ip,
                    headers: Some(req.headers()),
                    trusted_client: ident.trusted,
                })
                .await;
            if let Some(h) = &state.hooks {
                h.decided(ip, &decision);
            }
            if !decision.allowed {
                return Ok(limited(&decision));
            }
            let mut resp = inner.call(req).await?;
            if let Some(h) = &state.hooks {
                h.responded(ip, resp.status());
            }
            if state.headers_on_success {
                add_fields(&mut resp, &decision);
            }
            Ok(resp)
        })
    }
}
