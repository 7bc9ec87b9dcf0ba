//! `GET /agent/download/{os}/{arch}`: the agent binary provisioned servers
//! install (no token: it is the public build; its SHA-256 is in the
//! server's user-data and in `X-Checksum-Sha256`). Rate limited per source
//! address (`--download-rate-limit` a minute).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorBody};
use super::extract::ApiPath;
use crate::context::ControlPlane;

/// Downloads the agent for a platform (`linux`/`amd64`, `linux`/`arm64`).
#[utoipa::path(
    get,
    path = "/agent/download/{os}/{arch}",
    operation_id = "download_agent",
    tag = "provisioning",
    params(
        ("os" = String, Path, description = "Operating system, e.g. `linux`."),
        ("arch" = String, Path, description = "Architecture, e.g. `amd64` or `arm64`."),
    ),
    responses(
        (status = 200, description = "The binary; `X-Checksum-Sha256` carries its SHA-256.", content_type = "application/octet-stream", body = Vec<u8>,
            headers(("X-Checksum-Sha256" = String, description = "Hex SHA-256 of the body."))),
        (status = 404, description = "`not_found`: no agent for this platform.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests from this address this minute (`--download-rate-limit`); retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn download(
    State(cp): State<Arc<ControlPlane>>,
    ApiPath((os, arch)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    // Hashing a binary not hashed before takes seconds: off the workers.
    let binaries = cp.clone();
    let (os_asked, arch_asked) = (os.clone(), arch.clone());
    let binary =
        tokio::task::spawn_blocking(move || binaries.agent_binaries.find(&os_asked, &arch_asked))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::not_found(format!("no agent binary for {os}/{arch}")))?;
    let bytes = tokio::fs::read(&binary.path)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-checksum-sha256"),
                binary.sha256_hex,
            ),
        ],
        bytes,
    )
        .into_response())
}
