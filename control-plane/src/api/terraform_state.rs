//! `/terraform/state/{deployment_id}`: the state store of terraform's
//! built-in `http` backend for one deployment: `GET`/`POST`/`DELETE` the
//! state, `LOCK`/`UNLOCK` it (423 with the holder's LockInfo while another
//! run holds it). States are sealed under the master key in the database.
//! Each deployment has its own Basic credentials (user `deployment`, a
//! password derived from an instance secret), handed to terraform only as
//! `TF_HTTP_*` environment variables. The credentials are checked before a
//! byte of the body is read: a caller without them costs no more than its
//! headers. This is terraform's protocol, not the admin API, so it is
//! outside `/api/v1` and its OpenAPI document.
//!
//! Every state written is also kept as a version (the last
//! `STATE_VERSIONS_KEPT`, sealed under their own context, with the SHA-256
//! of the plaintext, its size and terraform's serial); `api/state_versions`
//! lists and restores them.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::Utc;
use uuid::Uuid;

use super::error::ApiError;
use crate::context::ControlPlane;
use crate::provision::job::backend_password;
use crate::store::{
    terraform_state_context, terraform_state_version_context, LockOutcome, StateWrite,
};

/// Largest state accepted.
pub const MAX_STATE_BYTES: usize = 32 << 20;

fn authorized(cp: &ControlPlane, id: Uuid, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value.trim()) else {
        return false;
    };
    let expected = format!("deployment:{}", backend_password(&cp.backend_key, id));
    decoded.len() == expected.len()
        && decoded
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The whole body, at most [`MAX_STATE_BYTES`] (a larger declared length
/// is refused before anything is read).
async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody;
    let too_large =
        || ApiError::payload_too_large(format!("state is larger than {MAX_STATE_BYTES} bytes"));
    if body.size_hint().lower() > MAX_STATE_BYTES as u64 {
        return Err(too_large());
    }
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame
            .map_err(|e| ApiError::invalid_request(format!("could not read the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > MAX_STATE_BYTES {
                return Err(too_large());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// A state to store as the current one and as a new version: sealed twice
/// (current state, version), with its checksum, size and serial.
pub(crate) fn state_write(
    cp: &ControlPlane,
    deployment_id: Uuid,
    plain: &[u8],
    serial: Option<i64>,
    restored_from: Option<i64>,
) -> StateWrite {
    use sha2::Digest;
    let version_id = Uuid::now_v7();
    StateWrite {
        state_sealed: cp
            .sealer
            .seal(plain, &terraform_state_context(deployment_id)),
        version_id,
        version_sealed: cp
            .sealer
            .seal(plain, &terraform_state_version_context(version_id)),
        sha256: hex::encode(sha2::Sha256::digest(plain)),
        size_bytes: i64::try_from(plain.len()).unwrap_or(i64::MAX),
        serial,
        restored_from,
    }
}

fn locked(holder: serde_json::Value) -> Response {
    (StatusCode::LOCKED, axum::Json(holder)).into_response()
}

/// Serves every method of the state endpoint.
pub async fn state(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match serve(&cp, &id, &params, &method, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    cp: &ControlPlane,
    id: &str,
    params: &HashMap<String, String>,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::not_found("no such state"))?;
    if !authorized(cp, id, headers) {
        let mut response =
            ApiError::unauthorized("state credentials are wrong or missing").into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"terraform state\""),
        );
        return Ok(response);
    }
    if cp.store.deployment(None, id).await?.is_none() {
        return Err(ApiError::not_found("no such deployment"));
    }
    // Only now, for a caller holding this deployment's credentials.
    let body = read_body(body).await?;
    let now = Utc::now();
    let lock_id_of = |body: &Bytes| -> Result<(String, serde_json::Value), ApiError> {
        let info: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid_request(format!("LockInfo is not JSON: {e}")))?;
        let lock_id = info
            .get("ID")
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .ok_or_else(|| ApiError::invalid_request("LockInfo has no ID"))?
            .to_string();
        Ok((lock_id, info))
    };
    match method.as_str() {
        "GET" => {
            let sealed = cp
                .store
                .terraform_state(id)
                .await?
                .and_then(|s| s.state_sealed);
            match sealed {
                None => Ok(StatusCode::NO_CONTENT.into_response()),
                Some(sealed) => {
                    let state = cp
                        .sealer
                        .open(&sealed, &terraform_state_context(id))
                        .map_err(ApiError::internal)?;
                    Ok(([(header::CONTENT_TYPE, "application/json")], state).into_response())
                }
            }
        }
        "POST" => {
            let Ok(document) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return Err(ApiError::invalid_request("state is not JSON"));
            };
            let serial = document.get("serial").and_then(serde_json::Value::as_i64);
            let write = state_write(cp, id, &body, serial, None);
            let lock_id = params.get("ID").map(String::as_str);
            match cp
                .store
                .write_terraform_state_version(id, &write, lock_id, now)
                .await?
            {
                LockOutcome::Done => Ok(StatusCode::OK.into_response()),
                LockOutcome::HeldBy(holder) => Ok(locked(holder)),
            }
        }
        "DELETE" => {
            let lock_id = params.get("ID").map(String::as_str);
            match cp
                .store
                .write_terraform_state(id, None, lock_id, now)
                .await?
            {
                LockOutcome::Done => Ok(StatusCode::OK.into_response()),
                LockOutcome::HeldBy(holder) => Ok(locked(holder)),
            }
        }
        "LOCK" => {
            let (lock_id, info) = lock_id_of(&body)?;
            match cp
                .store
                .lock_terraform_state(id, &lock_id, &info, now)
                .await?
            {
                LockOutcome::Done => {
                    tracing::debug!(deployment_id = %id, %lock_id, "state locked");
                    Ok(StatusCode::OK.into_response())
                }
                LockOutcome::HeldBy(holder) => Ok(locked(holder)),
            }
        }
        "UNLOCK" => {
            let (lock_id, _) = lock_id_of(&body)?;
            match cp
                .store
                .unlock_terraform_state(id, Some(&lock_id), now)
                .await?
            {
                LockOutcome::Done => Ok(StatusCode::OK.into_response()),
                LockOutcome::HeldBy(holder) => {
                    Ok((StatusCode::CONFLICT, axum::Json(holder)).into_response())
                }
            }
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}
