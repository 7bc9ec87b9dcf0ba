//! What every API handler shares below the router: the JSON, query and
//! path extractors whose rejections are API errors, list pages, and the
//! control-character check of names and filters.

use axum::extract::FromRequest;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;

/// Whether a text has control characters (NUL included): names and filters
/// never need them, and PostgreSQL cannot store or compare NUL in text.
pub(crate) fn has_control_chars(text: &str) -> bool {
    text.chars().any(char::is_control)
}

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

/// Checks a list's `limit` (default `default`, at most `max`).
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid_request(format!(
            "limit must be between 1 and {max}"
        )))
    }
}

/// Parses a list's opaque `cursor` (an id or a sequence number).
pub fn page_cursor<T: std::str::FromStr>(cursor: Option<&str>) -> Result<Option<T>, ApiError> {
    cursor
        .map(|c| {
            c.parse()
                .map_err(|_| ApiError::invalid_request("cursor is not valid"))
        })
        .transpose()
}

/// A page of a list: `{ "data": [...], "next_cursor": ... }`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The page of `rows` read with `limit + 1` (the extra row only tells
    /// that another page follows): the first `limit` rows as views, and,
    /// when more follow, the cursor of the last one shown.
    pub fn from_rows<R>(
        mut rows: Vec<R>,
        limit: u32,
        cursor: impl Fn(&R) -> String,
        view: impl FnMut(R) -> T,
    ) -> Self {
        let limit = limit as usize;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if has_more {
            rows.last().map(cursor)
        } else {
            None
        };
        Self {
            data: rows.into_iter().map(view).collect(),
            next_cursor,
        }
    }
}
