//! The HTTP API (`/api/v1`, JSON): one module per resource, the shared error
//! model, the authenticated caller and the JSON body extractor.

use std::sync::Arc;

use std::sync::LazyLock;

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde::Serialize;
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::context::ControlPlane;

pub mod agent_download;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod branches;
pub mod cloud_providers;
pub mod commands;
pub mod enrollment_tokens;
pub mod error;
pub mod extract;
pub mod governance;
pub mod health;
pub mod infrastructure;
pub mod metrics;
pub mod organizations;
pub mod rate_limit;
pub mod serve;
pub mod servers;
pub mod state_versions;
pub mod terraform_state;
pub mod tokens;
pub mod webhooks;

pub use auth::Caller;
pub use error::{ApiError, ErrorBody};
pub use extract::{page_cursor, page_limit, ApiJson, ApiPath, ApiQuery, Page};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 1 << 20;

/// The OpenAPI description shared by every route: title, the `bearer`
/// security scheme and the error schema.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Tether control plane API",
        description = "Admin API of a Tether control plane (branch). Every `/api/v1` call but \
`GET /api/v1/openapi.json` needs `Authorization: Bearer <token>`. Every `/api/v1` response \
carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`. Errors are \
`{\"error\": code, \"message\": text, ...details}`; lists are `{\"data\": [...], \"next_cursor\": ...}`."
    ),
    modifiers(&BearerSecurity),
    components(schemas(ErrorBody, error::ErrorCode)),
    tags(
        (name = "meta", description = "Health and this document."),
        (name = "enrollment", description = "One-time tokens for adding servers."),
        (name = "servers", description = "The fleet inventory."),
        (name = "health", description = "Health checks pushed to agents and their latest results."),
        (name = "organizations", description = "The organization tree and its quotas."),
        (name = "tokens", description = "API tokens."),
        (name = "audit", description = "The audit log of every write."),
        (name = "commands", description = "Programs run on servers: one server or a fan-out, output, cancel."),
        (name = "branches", description = "Federation with other branches: invites, peers, relayed commands."),
        (name = "provisioning", description = "Cloud credentials, deployments made with Terraform, and what new servers download and report."),
        (name = "webhooks", description = "Signed HTTP callbacks for events, and their delivery log."),
        (name = "alerts", description = "Alert rules and the alerts they raise."),
    )
)]
struct ApiDoc;

/// Adds the `bearer` (JWT) security scheme the operations refer to.
struct BearerSecurity;

impl utoipa::Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An API token: the admin token written at first start \
                         (DATA_DIR/admin.token) or one made with POST /api/v1/tokens.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The routes and their documentation, built together: a handler is
/// registered through `routes!`, which reads its `#[utoipa::path]`, so no route
/// exists without being documented (and no documented route is missing).
struct Documented {
    /// `/health`.
    root: Router<Arc<ControlPlane>>,
    /// `/metrics/fleet` (rate limited like `/api/v1`).
    fleet: Router<Arc<ControlPlane>>,
    /// `/agent/download/...` (rate limited per source address).
    download: Router<Arc<ControlPlane>>,
    /// Routes under `/api/v1`.
    v1: Router<Arc<ControlPlane>>,
    openapi: utoipa::openapi::OpenApi,
}

fn documented() -> Documented {
    let (v1, v1_doc) = OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .routes(routes!(enrollment_tokens::create))
        .routes(routes!(servers::list))
        .routes(routes!(servers::get, servers::remove))
        .routes(routes!(organizations::list, organizations::create))
        .routes(routes!(
            organizations::get,
            organizations::patch,
            organizations::delete
        ))
        .routes(routes!(organizations::hierarchy))
        .routes(routes!(tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(audit::list))
        .routes(routes!(metrics::server_metrics))
        .routes(routes!(metrics::server_containers))
        .routes(routes!(cloud_providers::list, cloud_providers::create))
        .routes(routes!(cloud_providers::delete, cloud_providers::update))
        .routes(routes!(cloud_providers::validate))
        .routes(routes!(infrastructure::provision))
        .routes(routes!(infrastructure::list))
        .routes(routes!(infrastructure::get, infrastructure::destroy))
        .routes(routes!(infrastructure::force_unlock))
        .routes(routes!(state_versions::list))
        .routes(routes!(state_versions::restore))
        .routes(routes!(infrastructure::events))
        .routes(routes!(infrastructure::boot_stage))
        .routes(routes!(governance::catalog))
        .routes(routes!(governance::approve))
        .routes(routes!(governance::reject))
        .routes(routes!(governance::get_policy, governance::put_policy))
        .routes(routes!(governance::cost_report))
        .routes(routes!(branches::create_invite))
        .routes(routes!(branches::list, branches::accept))
        .routes(routes!(branches::get, branches::delete))
        .routes(routes!(branches::relay_command))
        .routes(routes!(branches::server_health))
        .routes(routes!(branches::run_server_health))
        .routes(routes!(webhooks::list, webhooks::create))
        .routes(routes!(webhooks::get, webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(alerts::list_rules, alerts::create_rule))
        .routes(routes!(alerts::get_rule, alerts::delete_rule))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(health::server_health))
        .routes(routes!(health::run_now))
        .routes(routes!(health::list_checks, health::create_check))
        .routes(routes!(
            health::get_check,
            health::update_check,
            health::delete_check
        ))
        .routes(routes!(commands::run_on_server))
        .routes(routes!(commands::fan_out))
        .routes(routes!(commands::get))
        .routes(routes!(commands::cancel))
        .routes(routes!(commands::output))
        .split_for_parts();
    let (fleet, fleet_doc) = OpenApiRouter::new()
        .routes(routes!(metrics::fleet))
        .split_for_parts();
    let (download, download_doc) = OpenApiRouter::new()
        .routes(routes!(agent_download::download))
        .split_for_parts();
    let (root, mut openapi) = OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(health))
        .split_for_parts();
    openapi.merge(fleet_doc);
    openapi.merge(download_doc);
    Documented {
        root,
        fleet,
        download,
        v1,
        openapi: openapi.nest("/api/v1", v1_doc),
    }
}

/// The OpenAPI 3.1 document of every route, as utoipa builds it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().openapi
}

/// The OpenAPI 3.1 document of every route, as `GET /api/v1/openapi.json`
/// serves it: [`openapi`] in JSON, with the keys of Link Objects spelt as
/// the specification spells them (utoipa 5 writes `operation_id`,
/// `operation_ref` and `request_body` there).
pub fn openapi_document() -> serde_json::Value {
    let mut doc = serde_json::to_value(openapi()).unwrap_or_default();
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        let responses = paths
            .values_mut()
            .filter_map(|item| item.as_object_mut())
            .flat_map(|item| item.values_mut())
            .filter_map(|op| op.get_mut("responses"))
            .filter_map(|r| r.as_object_mut())
            .flat_map(|r| r.values_mut());
        for response in responses {
            let links = response.get_mut("links").and_then(|l| l.as_object_mut());
            for link in links.into_iter().flat_map(|l| l.values_mut()) {
                let Some(link) = link.as_object_mut() else {
                    continue;
                };
                for (from, to) in [
                    ("operation_id", "operationId"),
                    ("operation_ref", "operationRef"),
                    ("request_body", "requestBody"),
                ] {
                    if let Some(value) = link.remove(from) {
                        link.insert(to.into(), value);
                    }
                }
            }
        }
    }
    doc
}

/// The whole HTTP surface of a control plane.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    let Documented {
        root,
        fleet,
        download,
        v1,
        ..
    } = documented();
    let v1 = v1
        .method_not_allowed_fallback(error::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            cp.clone(),
            rate_limit::enforce,
        ));
    let fleet = fleet.route_layer(axum::middleware::from_fn_with_state(
        cp.clone(),
        rate_limit::enforce,
    ));
    let download = download.route_layer(axum::middleware::from_fn_with_state(
        cp.clone(),
        rate_limit::enforce_download,
    ));
    // Terraform's http backend uses LOCK/UNLOCK methods: served outside the
    // documented API (see `terraform_state`, which reads its body itself,
    // bounded, once the credentials are checked).
    let state_backend = Router::new().route(
        "/terraform/state/{id}",
        axum::routing::any(terraform_state::state),
    );
    root.nest("/api/v1", v1)
        .merge(fleet)
        .merge(download)
        .merge(state_backend)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            cp.clone(),
            serve::body_deadline,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(cp)
}

/// Liveness probe (no token, no rate limit).
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "meta",
    responses(
        (status = 200, description = "The control plane is up.", body = HealthStatus),
    )
)]
async fn health() -> Json<HealthStatus> {
    Json(HealthStatus {
        status: "ok".into(),
    })
}

/// The answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthStatus {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: String,
}

/// This document (OpenAPI 3.1). Needs no token; rate limited like every `/api/v1` call.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "get_openapi_document",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of every route.", content_type = "application/json", body = Object),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute; retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
    )
)]
async fn openapi_json() -> impl IntoResponse {
    static DOCUMENT: LazyLock<String> =
        LazyLock::new(|| serde_json::to_string_pretty(&openapi_document()).unwrap_or_default());
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}
