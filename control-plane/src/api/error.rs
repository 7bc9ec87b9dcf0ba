//! The API's error model (DESIGN.md §5): every failure is a JSON body
//! `{"error": code, "message": text, ...details}` with a fixed status per code.
//! Extractor rejections (malformed JSON, wrong types, unknown fields, oversized
//! bodies, bad paths and queries) are mapped here too, so no route answers a
//! plain-text error.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};

/// The body of every error answer, as documented in the OpenAPI document:
/// `{"error": code, "message": text}`, plus details that depend on the code
/// (for instance `limit` and `usage` of `quota_exceeded`, `retry_after_seconds`
/// of `rate_limit_exceeded`, `required_scope` of `forbidden`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": "not_found", "message": "no such server"}))]
pub struct ErrorBody {
    /// Machine-readable error code; the HTTP status follows from it.
    pub error: ErrorCode,
    /// Human-readable explanation (never contains a secret).
    pub message: String,
}

/// Error codes of DESIGN.md §5 and the HTTP status each comes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400 (also 405 and 413): malformed request.
    InvalidRequest,
    /// 401: missing, invalid, expired or revoked token.
    Unauthorized,
    /// 403: the token lacks a scope, or the action is not allowed.
    Forbidden,
    /// 403: an organization quota (own or inherited) would be exceeded.
    QuotaExceeded,
    /// 404: no such resource, or not visible to the caller.
    NotFound,
    /// 409: the resource's state forbids the action.
    Conflict,
    /// 422: well-formed but invalid input.
    ValidationError,
    /// 429: rate limit exceeded; see `Retry-After`.
    RateLimitExceeded,
    /// 500: a failure of the control plane.
    InternalError,
    /// 503: a peer branch the request must reach is unreachable.
    BranchUnreachable,
}

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_error",
            message,
        )
    }

    /// 503 `branch_unreachable`: a peer branch did not answer in time.
    pub fn branch_unreachable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "branch_unreachable",
            message,
        )
    }

    /// A failure of ours. The cause is logged; the caller sees a generic text.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error serving an API request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }

    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(self.code.into()));
        body.insert("message".into(), Value::String(self.message));
        body.extend(self.details);
        (self.status, Json(Value::Object(body))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::internal(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::validation(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::invalid_request(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                Self::invalid_request("expected a JSON body with Content-Type: application/json")
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "request body is too large",
            ),
            other => Self::invalid_request(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::invalid_request(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::not_found(format!("no such resource ({})", rejection.body_text()))
    }
}

/// Answers unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Answers known routes called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        "method not allowed on this route",
    )
}
