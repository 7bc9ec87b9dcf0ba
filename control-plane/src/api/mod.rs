//! The HTTP API (`/api/v1`, JSON): one module per resource, the shared error
//! model, the authenticated caller and the JSON body extractor.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest};
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::app::ControlPlane;

pub mod audit;
pub mod auth;
pub mod enrollment_tokens;
pub mod error;
pub mod organizations;
pub mod rate_limit;
pub mod servers;
pub mod tokens;

pub use auth::Caller;
pub use error::ApiError;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 1 << 20;

/// A JSON request body whose rejections are API errors.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Query parameters whose rejections are API errors.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters whose rejections are API errors.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The whole HTTP surface of a control plane.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    let v1 = Router::new()
        .route("/enrollment-tokens", post(enrollment_tokens::create))
        .route("/servers", get(servers::list))
        .route("/servers/{id}", get(servers::get).delete(servers::remove))
        .route(
            "/organizations",
            get(organizations::list).post(organizations::create),
        )
        .route(
            "/organizations/{id}",
            get(organizations::get)
                .patch(organizations::patch)
                .delete(organizations::delete),
        )
        .route(
            "/organizations/{id}/hierarchy",
            get(organizations::hierarchy),
        )
        .route("/tokens", post(tokens::create))
        .route("/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/audit-log", get(audit::list))
        .method_not_allowed_fallback(error::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            cp.clone(),
            rate_limit::enforce,
        ));
    Router::new()
        .route("/health", get(health))
        .nest("/api/v1", v1)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http())
        .with_state(cp)
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// A page of a list: `{ "data": [...], "next_cursor": ... }`.
#[derive(Debug, serde::Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}
