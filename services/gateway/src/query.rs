//! What the route modules share: strict query strings, list paging, enum values by their
//! short names, and times as RFC 3339.

use axum::Json;
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_runtime::Error;
use utoipa::IntoParams;

use crate::error::ApiError;
use crate::transcode::POOL;

/// Query of the list routes that only page.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    /// Page size, 1..=100 (default 20).
    #[serde(default)]
    pub limit: u32,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default)]
    pub starting_after: String,
}

/// The page of a list route's `limit` and `starting_after` query parameters.
pub(crate) fn page_request(
    limit: u32,
    starting_after: &str,
) -> Option<tessera_proto::common::v1::PageRequest> {
    Some(tessera_proto::common::v1::PageRequest {
        limit,
        starting_after: starting_after.to_string(),
    })
}

/// An enum value from its short lower-case name (`active` for `REWARD_STATUS_ACTIVE`);
/// `enum_name` is the fully qualified protobuf name.
pub(crate) fn enum_value(
    field: &str,
    enum_name: &str,
    prefix: &str,
    value: &str,
) -> Result<i32, ApiError> {
    if value.is_empty() {
        return Ok(0);
    }
    let descriptor = POOL
        .get_enum_by_name(enum_name)
        .ok_or_else(|| Error::internal(format!("no enum {enum_name}")))?;
    let names: Vec<String> = descriptor
        .values()
        .filter(|v| v.number() != 0)
        .map(|v| v.name().trim_start_matches(prefix).to_ascii_lowercase())
        .collect();
    descriptor
        .get_value_by_name(&format!("{prefix}{}", value.to_ascii_uppercase()))
        .filter(|v| v.number() != 0)
        .map(|v| v.number())
        .ok_or_else(|| {
            Error::invalid_field(field, format!("must be one of {}", names.join(", "))).into()
        })
}

/// The JSON page of a list answer.
pub(crate) fn page_reply(
    items: Vec<Value>,
    page: Option<tessera_proto::common::v1::PageResponse>,
) -> Result<Response, ApiError> {
    let page = page.unwrap_or_default();
    Ok(Json(json!({
        "data": items,
        "has_more": page.has_more,
        "next_cursor": if page.has_more { Some(page.next_cursor) } else { None },
    }))
    .into_response())
}

pub(crate) fn strict<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query
        .map(|q| q.0)
        .map_err(|e| Error::invalid_field("query", e.body_text()).into())
}

pub(crate) type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A protobuf time as RFC 3339 with microseconds, or None.
pub(crate) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.and_then(|t| rfc3339_micros(t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000))
}

/// Microseconds since the epoch as RFC 3339 with microseconds (`…Z`): every time the
/// gateway writes itself.
pub(crate) fn rfc3339_micros(micros: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}
