//! The audit log: every mutation made through the gateway by a console role (admin,
//! marketer, junior marketer, support agent) is recorded, refused ones included, with who
//! (key and role), what (method, route, path, the request body), the object before the
//! change (read through the route that shows it, with the caller's key, for the writes that
//! name one), the outcome (status and the answer: the object after the change), when, and
//! the request id. Touchpoint traffic
//! (orders, redemptions) is the services' own history, not audited here. The log is
//! append-only: there is no route to change or delete an entry. `GET /v1/audit-log` reads
//! it (admins and analysts), newest first, filtered by principal, route, method and time.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::DateTime;
use sea_orm::ConnectionTrait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_runtime::Error;
use tessera_store::{db_error, now_micros, stmt};
use tower::ServiceExt;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::ApiError;
use crate::keys::{Principal, Role};
use crate::observe::{Caller, RequestId};
use crate::query::{QueryResult, strict};

/// Bodies are kept up to this size (larger ones are cut, and say so).
const KEEP_BYTES: usize = 16 * 1024;

/// Answers larger than this are not read into the log.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The log's retention rule: entries stay `retention.audit_days` (or the tenant's own).
pub fn retention_rule() -> tessera_store::retention::Rule {
    tessera_store::retention::Rule::new("audit_log", "at", "", tessera_runtime::config::Kept::Audit)
}

/// What the audit middleware needs: the gateway's state, its routes (to read the state
/// before a write, as the caller would) and which write reads where.
pub struct Auditor {
    pub state: Arc<AppState>,
    pub reader: Router,
    pub reads: crate::api::Reads,
}

/// `read` with the parameters `template` matched in `path`
/// (`/v1/rewards/{id}/status`, `/v1/rewards/r1/status`, `/v1/rewards/{id}` → `/v1/rewards/r1`).
fn read_path(template: &str, path: &str, read: &str) -> String {
    let values: HashMap<&str, &str> = template
        .split('/')
        .zip(path.split('/'))
        .filter_map(|(t, v)| Some((t.strip_prefix('{')?.strip_suffix('}')?, v)))
        .collect();
    read.split('/')
        .map(|segment| {
            segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .and_then(|name| values.get(name).copied())
                .unwrap_or(segment)
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The object at `path` as the caller (`headers`' key) sees it now; None when it cannot
/// be read (it does not exist yet, or the caller may not read it).
async fn read_before(
    auditor: &Auditor,
    path: String,
    headers: &http::HeaderMap,
    request_id: &str,
) -> Option<String> {
    let mut request = Request::get(path).body(Body::empty()).ok()?;
    for name in [http::header::AUTHORIZATION.as_str(), "x-api-key"] {
        if let Some(value) = headers.get(name) {
            request.headers_mut().insert(name, value.clone());
        }
    }
    request
        .extensions_mut()
        .insert(RequestId(request_id.to_string()));
    let response = auditor.reader.clone().oneshot(request).await.ok()?;
    if response.status() != http::StatusCode::OK {
        return None;
    }
    let bytes = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
        .await
        .ok()?;
    Some(kept(&bytes))
}

fn audited(role: Role) -> bool {
    matches!(
        role,
        Role::Admin | Role::Marketer | Role::JuniorMarketer | Role::SupportAgent
    )
}

/// Whether the request's key is valid and its role's writes are audited.
async fn audited_key(state: &AppState, headers: &http::HeaderMap) -> bool {
    let Some(key) = crate::extract::api_key(headers) else {
        return false;
    };
    matches!(state.keys.authenticate(key).await, Ok(Some(p)) if audited(p.role))
}

/// A JSON answer with every `secret` (an API key, a webhook signing secret: shown to the
/// caller once) replaced, so the log never holds one.
fn redacted(bytes: &[u8]) -> Vec<u8> {
    fn scrub(value: &mut Value) -> bool {
        match value {
            Value::Object(map) => {
                let mut changed = false;
                for (name, inner) in map.iter_mut() {
                    if name == "secret" && inner.is_string() {
                        *inner = Value::String("[redacted]".into());
                        changed = true;
                    } else {
                        changed |= scrub(inner);
                    }
                }
                changed
            }
            Value::Array(items) => items.iter_mut().fold(false, |c, i| scrub(i) | c),
            _ => false,
        }
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut value) => {
            if scrub(&mut value) {
                serde_json::to_vec(&value).unwrap_or_default()
            } else {
                bytes.to_vec()
            }
        }
        Err(_) => bytes.to_vec(),
    }
}

fn kept(bytes: &[u8]) -> String {
    if bytes.len() <= KEEP_BYTES {
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        format!(
            "{}… ({} bytes, cut)",
            String::from_utf8_lossy(&bytes[..KEEP_BYTES]),
            bytes.len()
        )
    }
}

/// Records the mutations of console roles (a middleware around every route).
pub async fn record(State(auditor): State<Arc<Auditor>>, req: Request, next: Next) -> Response {
    let state = &auditor.state;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mutation = matches!(
        method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH | http::Method::DELETE
    );
    if !mutation || !path.starts_with("/v1/") || path == "/v1/unsubscribe" {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let json_body = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|t| t.starts_with("application/json"));
    let (req, request_text) = if json_body {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, state.max_body_bytes).await else {
            return crate::extract::too_large(state.max_body_bytes).into_response();
        };
        let text = kept(&bytes);
        (Request::from_parts(parts, Body::from(bytes)), text)
    } else {
        (req, "(not JSON: not recorded)".to_string())
    };
    let caller = req.extensions().get::<Caller>().cloned();
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    // The state before, for the writes that name where it is read and for callers whose
    // writes are audited (not for touchpoints' profile syncs, say).
    let before = match auditor
        .reads
        .get(&(method.as_str().to_string(), route.clone()))
    {
        Some(read) if audited_key(state, req.headers()).await => {
            let path = read_path(&route, &path, read);
            read_before(&auditor, path, req.headers(), &request_id).await
        }
        _ => None,
    };
    let response = next.run(req).await;
    let Some(principal) = caller.and_then(|c| c.principal()) else {
        return response;
    };
    if !audited(principal.role) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let (after, body) = match axum::body::to_bytes(body, MAX_ANSWER_BYTES).await {
        Ok(bytes) => (kept(&redacted(&bytes)), Body::from(bytes)),
        Err(_) => ("(answer not readable)".to_string(), Body::empty()),
    };
    let conn = state.db.conn();
    let written = conn
        .execute_raw(stmt(
            conn,
            "INSERT INTO audit_log (id, tenant_id, principal, role, method, route, path, status, \
             request_id, at, request, after, before_state) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            [
                format!("aud_{}", uuid::Uuid::now_v7().simple()).into(),
                principal.tenant_id.clone().into(),
                principal.key_id.clone().into(),
                principal.role.as_str().into(),
                method.as_str().into(),
                route.into(),
                path.into(),
                i32::from(parts.status.as_u16()).into(),
                request_id.into(),
                now_micros().into(),
                request_text.into(),
                after.into(),
                before.into(),
            ],
        ))
        .await;
    if let Err(e) = written {
        metrics::counter!("tessera_audit_failures_total").increment(1);
        tracing::error!(error = %e, "audit entry not written");
    }
    Response::from_parts(parts, body)
}

/// Filters of `GET /v1/audit-log`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Page size, 1..=100 (default 50).
    #[serde(default)]
    limit: u32,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default)]
    starting_after: String,
    /// Only this principal (API key id).
    #[serde(default)]
    principal: String,
    /// Only this route, e.g. `/v1/campaigns/{id}/{action}`.
    #[serde(default)]
    route: String,
    /// Only this method.
    #[serde(default)]
    method: String,
    /// From (RFC 3339).
    #[serde(default)]
    since: String,
    /// Until (RFC 3339, exclusive).
    #[serde(default)]
    until: String,
}

fn instant(field: &str, value: &str, default: i64) -> Result<i64, ApiError> {
    if value.is_empty() {
        return Ok(default);
    }
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_micros())
        .map_err(|_| Error::invalid_field(field, "must be an RFC 3339 time").into())
}

/// `GET /v1/audit-log`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    query: QueryResult<AuditQuery>,
) -> Result<Response, ApiError> {
    let q = strict(query)?;
    let limit = match q.limit {
        0 => 50,
        n @ 1..=100 => n,
        _ => return Err(Error::invalid_field("limit", "must be within 1..=100").into()),
    };
    let since = instant("since", &q.since, 0)?;
    let until = instant("until", &q.until, i64::MAX)?;
    let before = if q.starting_after.is_empty() {
        "~".to_string()
    } else {
        q.starting_after.clone()
    };
    let conn = state.db.conn();
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT id, principal, role, method, route, path, status, request_id, at, request, \
             after, before_state FROM audit_log WHERE tenant_id = $1 AND id < $2 AND at >= $3 AND at < $4 \
             AND ($5 = '' OR principal = $5) AND ($6 = '' OR route = $6) \
             AND ($7 = '' OR method = $7) ORDER BY id DESC LIMIT $8",
            [
                principal.tenant_id.clone().into(),
                before.into(),
                since.into(),
                until.into(),
                q.principal.clone().into(),
                q.route.clone().into(),
                q.method.to_ascii_uppercase().into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut data = Vec::new();
    for r in rows.iter().take(limit as usize) {
        let text = |i| -> Result<String, ApiError> {
            r.try_get_by_index::<String>(i)
                .map_err(|e| db_error(e).into())
        };
        let parse = |s: String| serde_json::from_str::<Value>(&s).unwrap_or(Value::String(s));
        let before: Option<String> = r.try_get_by_index(11).map_err(db_error)?;
        let at: i64 = r.try_get_by_index(8).map_err(db_error)?;
        let status: i32 = r.try_get_by_index(6).map_err(db_error)?;
        data.push(Entry {
            id: text(0)?,
            principal: text(1)?,
            role: text(2)?,
            method: text(3)?,
            route: text(4)?,
            path: text(5)?,
            status,
            request_id: text(7)?,
            at: crate::query::rfc3339_micros(at),
            request: parse(text(9)?),
            before: before.map_or(Value::Null, parse),
            after: parse(text(10)?),
        });
    }
    let has_more = rows.len() > limit as usize;
    let next_cursor = data.last().filter(|_| has_more).map(|d| d.id.clone());
    Ok(Json(AuditPage {
        data,
        has_more,
        next_cursor,
    })
    .into_response())
}

/// A page of the audit log.
#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    data: Vec<Entry>,
    has_more: bool,
    /// Pass as `starting_after` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// One admin mutation.
#[derive(Serialize, ToSchema)]
pub struct Entry {
    id: String,
    /// The API key id.
    principal: String,
    role: String,
    method: String,
    /// The route template, e.g. `/v1/campaigns/{id}/{action}`.
    route: String,
    path: String,
    /// The HTTP status of the answer.
    status: i32,
    request_id: String,
    at: Option<String>,
    /// The request body (JSON, or its text).
    request: Value,
    /// The object before the change, for writes to an object that can be read (null when
    /// it did not exist or the caller could not read it).
    before: Value,
    /// The answer's body: the object after the change.
    after: Value,
}
