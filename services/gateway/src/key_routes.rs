//! API key routes (admins of the tenant): `POST /v1/api-keys` makes a key with a role and
//! shows it this once; `GET /v1/api-keys` lists them (never the keys themselves);
//! `DELETE /v1/api-keys/{id}` revokes one, except the tenant's last admin key.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{Api, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{KeyInfo, NewKey, Principal, Role};
use crate::query::{PageQuery, QueryResult, strict};

pub fn routes(api: &mut Api) {
    const ADMINS: [Role; 1] = [Role::Admin];
    api.tag("api keys", "The tenant's API keys, each with a role.")
        .add(
            Op::post("/v1/api-keys", create)
                .summary("Create an API key")
                .describe(
                    "The key is in the answer this once and stored only as a hash. A retry \
                     with the same Idempotency-Key and body answers 200 with the key's \
                     description and `secret: null`.",
                )
                .roles(&ADMINS)
                .idempotent()
                .body::<NewKey>()
                .answer::<CreatedKey>(201, "The key, shown this once.")
                .answer::<CreatedKey>(200, "A retry: the key made before, without the key."),
        )
        .add(
            Op::get("/v1/api-keys", list)
                .summary("List the tenant's API keys")
                .roles(&ADMINS)
                .query::<PageQuery>()
                .answer::<KeyPage>(200, "A page of keys, by id."),
        )
        .add(
            Op::delete("/v1/api-keys/{id}", revoke)
                .summary("Revoke an API key")
                .describe("Idempotent. The tenant's last admin key cannot be revoked (422).")
                .roles(&ADMINS)
                .idempotent()
                .before("/v1/api-keys/{id}")
                .answer::<KeyInfo>(200, "The key, revoked."),
        )
        .add(
            Op::get("/v1/api-keys/{id}", get_one)
                .summary("Get an API key's description")
                .roles(&ADMINS)
                .answer::<KeyInfo>(200, "The key's description."),
        )
        .add(
            Op::get("/v1/auth/self", whoami)
                .summary("Who the calling key is")
                .describe(
                    "The tenant, key id and role of the key sent. gRPC services running \
                     alone ask this to authenticate callers that send the same key.",
                )
                .roles(&Role::ALL)
                .answer::<Identity>(200, "The calling key's identity."),
        );
}

/// The identity of the calling key.
#[derive(Serialize, ToSchema)]
struct Identity {
    tenant_id: String,
    key_id: String,
    role: String,
}

async fn whoami(principal: Principal) -> Json<Identity> {
    Json(Identity {
        tenant_id: principal.tenant_id,
        key_id: principal.key_id,
        role: principal.role.as_str().to_string(),
    })
}

/// A new key and its description.
#[derive(Serialize, ToSchema)]
struct CreatedKey {
    /// The key to send as `Authorization: Bearer <key>`; null on a retry.
    secret: Option<String>,
    info: KeyInfo,
}

/// A page of keys.
#[derive(Serialize, ToSchema)]
struct KeyPage {
    data: Vec<KeyInfo>,
    has_more: bool,
    /// Pass as `starting_after` for the next page; null on the last.
    next_cursor: Option<String>,
}

async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<NewKey>,
) -> Result<(http::StatusCode, Json<CreatedKey>), ApiError> {
    let mut v = Violations::new();
    let length = body.name.trim().chars().count();
    if !(1..=100).contains(&length) {
        v.add("name", "must be 1 to 100 characters");
    }
    if Role::parse(&body.role).is_none() {
        let roles: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        v.add("role", format!("must be one of {}", roles.join(", ")));
    }
    v.finish()?;
    let (info, key) = state.keys.create(&principal.tenant_id, &body, &key).await?;
    let status = if key.is_some() {
        http::StatusCode::CREATED
    } else {
        http::StatusCode::OK
    };
    Ok((status, Json(CreatedKey { secret: key, info })))
}

async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    query: QueryResult<PageQuery>,
) -> Result<Json<KeyPage>, ApiError> {
    let q = strict(query)?;
    let mut v = Violations::new();
    let limit = v.page_limit(q.limit);
    v.finish()?;
    let (data, has_more) = state
        .keys
        .list(&principal.tenant_id, limit, &q.starting_after)
        .await?;
    let next_cursor = data.last().filter(|_| has_more).map(|k| k.id.clone());
    Ok(Json(KeyPage {
        data,
        has_more,
        next_cursor,
    }))
}

async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    let info = state.keys.get(&principal.tenant_id, &id).await?;
    Ok(Json(info.ok_or_else(|| not_found(&id))?))
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(_): IdempotencyKey,
) -> Result<Json<KeyInfo>, ApiError> {
    let info = state.keys.revoke_checked(&principal.tenant_id, &id).await?;
    Ok(Json(info.ok_or_else(|| not_found(&id))?))
}

fn not_found(id: &str) -> ApiError {
    Error::not_found(format!("API key `{id}`")).into()
}
