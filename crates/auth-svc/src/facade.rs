//! The HTTP facade edge traffic reaches: OAuth/OIDC endpoints, login pages and JSON
//! under `/security/*` arrive with their issues; today it answers `/healthz`.

use axum::Router;
use axum::routing::get;

pub fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(sec_common::telemetry::TraceContextLayer)
}
