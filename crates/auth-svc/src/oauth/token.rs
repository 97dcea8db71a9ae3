use std::sync::Arc;

use axum::Router;

use crate::engine::AuthServer;

pub fn routes() -> Router<Arc<AuthServer>> {
    Router::new()
}
