//! The API's error model (`docs/api.md`, *Errors*): every failure is a JSON body
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

/// Error codes (`docs/api.md`, *Errors*) and the HTTP status each comes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400 (also 405, 408 and 413): malformed request, or a body that
    /// did not arrive within `--http-body-timeout` (408).
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
    /// 409: a cloud credential that live deployments use cannot be deleted
    /// without `force` (`deployment_ids`, `deployment_count`).
    CredentialInUse,
    /// 422: well-formed but invalid input.
    ValidationError,
    /// 422: the organization would be deeper than the tree allows
    /// (`max_depth`, `depth`).
    OrganizationDepthExceeded,
    /// 429: rate limit exceeded; see `Retry-After`.
    RateLimitExceeded,
    /// 500: a failure of the control plane.
    InternalError,
    /// 503: a peer branch the request must reach is unreachable.
    BranchUnreachable,
}

impl ErrorCode {
    /// The code as it appears in the body's `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::CredentialInUse => "credential_in_use",
            ErrorCode::ValidationError => "validation_error",
            ErrorCode::OrganizationDepthExceeded => "organization_depth_exceeded",
            ErrorCode::RateLimitExceeded => "rate_limit_exceeded",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::BranchUnreachable => "branch_unreachable",
        }
    }

    /// The HTTP status an answer with this code carries (`invalid_request`
    /// also comes as 405, 408 and 413: see [`ApiError::method_not_allowed`],
    /// [`ApiError::request_timeout`] and [`ApiError::payload_too_large`]).
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::QuotaExceeded => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict | ErrorCode::CredentialInUse => StatusCode::CONFLICT,
            ErrorCode::ValidationError | ErrorCode::OrganizationDepthExceeded => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::RateLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::BranchUnreachable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An API error response: a code, a message, and details that depend on the
/// code. The status follows from the code ([`ErrorCode::status`]).
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    /// `code.status()`, except for the 405/408/413 forms of
    /// `invalid_request`, which only their constructors make.
    status: StatusCode,
    message: String,
    details: Map<String, Value>,
}

impl ApiError {
    /// An error with `code` and the status that code comes with.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            message: message.into(),
            details: Map::new(),
        }
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// 405 `invalid_request`: a known route called with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..Self::invalid_request("method not allowed on this route")
        }
    }

    /// 408 `invalid_request`: the body did not arrive in time.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            ..Self::invalid_request(message)
        }
    }

    /// 413 `invalid_request`: the body is larger than the route accepts.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..Self::invalid_request(message)
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationError, message)
    }

    /// 503 `branch_unreachable`: a peer branch did not answer in time.
    pub fn branch_unreachable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BranchUnreachable, message)
    }

    /// A failure of ours. The cause is logged; the caller sees a generic text.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error serving an API request");
        Self::new(ErrorCode::InternalError, "internal error")
    }

    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(self.code.as_str().into()));
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
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::payload_too_large("request body is too large")
            }
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
    ApiError::method_not_allowed()
}
impl From<crate::store::QuotaExceeded> for ApiError {
    fn from(q: crate::store::QuotaExceeded) -> Self {
        ApiError::new(ErrorCode::QuotaExceeded, q.to_string())
            .with_detail("organization_id", q.organization_id.to_string())
            .with_detail("resource", q.resource)
            .with_detail("limit", q.limit)
            .with_detail("usage", q.usage)
            .with_detail("requested", q.requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_serialises_as_the_text_of_its_body_field() {
        for code in [
            ErrorCode::InvalidRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::QuotaExceeded,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::CredentialInUse,
            ErrorCode::ValidationError,
            ErrorCode::OrganizationDepthExceeded,
            ErrorCode::RateLimitExceeded,
            ErrorCode::InternalError,
            ErrorCode::BranchUnreachable,
        ] {
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(Value::String(code.as_str().into())),
                "{code:?}"
            );
        }
    }

    #[test]
    fn an_error_answers_with_the_status_of_its_code() {
        let response = ApiError::new(ErrorCode::QuotaExceeded, "over").into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let response = ApiError::validation("bad").into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn the_size_method_and_time_forms_of_invalid_request_keep_their_code() {
        for (error, status) in [
            (
                ApiError::method_not_allowed(),
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (
                ApiError::request_timeout("slow"),
                StatusCode::REQUEST_TIMEOUT,
            ),
            (
                ApiError::payload_too_large("big"),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
        ] {
            assert_eq!(error.code(), ErrorCode::InvalidRequest);
            assert_eq!(error.status(), status);
        }
    }
}
