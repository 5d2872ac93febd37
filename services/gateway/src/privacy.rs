//! GDPR across the suite over REST (admins): `GET /v1/customers/{id}/export` gathers what
//! every service keeps about a customer into one JSON document; `POST
//! /v1/customers/{id}/erasure` erases the customer everywhere and answers with a job
//! ([`crate::erasures`]), `GET /v1/erasures/{id}` shows each service's part.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use tessera_proto::ops::v1 as pb;
use tessera_runtime::Error;
use tessera_store::{Db, db_error, now_micros, stmt};
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{Api, Op};
use crate::erasures::{self, about_customer, about_values, check_customer};
use crate::error::ApiError;
use crate::extract::IdempotencyKey;
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::query::rfc3339_micros;

const ADMINS: [Role; 1] = [Role::Admin];

pub fn routes(api: &mut Api) {
    api.tag(
        "privacy",
        "A customer's data across the suite: export, and erasure (GDPR).",
    )
    .add(
        Op::get("/v1/customers/{id}/export", export)
            .summary("Export everything the suite keeps about a customer")
            .describe(
                "One JSON document: per service, per table, the customer's rows (the profile \
                 in full). Records kept under a pseudonym after an erasure are no longer the \
                 customer's.",
            )
            .roles(&ADMINS)
            .answer::<CustomerExport>(200, "The customer's data."),
    )
    .add(
        Op::post("/v1/customers/{id}/erasure", erase)
            .summary("Erase a customer across the suite")
            .describe(
                "Answers at once with the job; every service does its part through the \
                 gateway's command outbox (retried until it succeeds). Profile, facts, \
                 consents, messages and audit-log bodies go; the ledger, redemptions and \
                 issued codes stay under a pseudonym, so sums stay whole. A retry with the \
                 same Idempotency-Key answers the same job.",
            )
            .roles(&ADMINS)
            .idempotent()
            .answer::<ErasureJob>(202, "The erasure job, under way."),
    )
    .add(
        Op::get("/v1/erasures/{id}", get_erasure)
            .summary("Get an erasure job")
            .roles(&ADMINS)
            .answer::<ErasureJob>(200, "The job and each service's part."),
    );
}

/// What the suite keeps about a customer.
#[derive(Serialize, ToSchema)]
struct CustomerExport {
    customer_id: String,
    /// RFC 3339.
    exported_at: String,
    /// Service → table → the customer's rows.
    #[schema(value_type = Object)]
    services: BTreeMap<String, serde_json::Value>,
}

/// An erasure across the suite.
#[derive(Serialize, ToSchema)]
struct ErasureJob {
    id: String,
    /// `pending` until every part is `done`; `failed` when a part was refused.
    status: String,
    /// RFC 3339.
    created_at: String,
    parts: Vec<ErasurePart>,
}

/// One service's part of an erasure.
#[derive(Serialize, ToSchema)]
struct ErasurePart {
    service: String,
    /// `pending`, `done` or `failed`.
    status: String,
    /// The last failure (a pending part is retried).
    error: Option<String>,
    /// RFC 3339.
    updated_at: String,
}

async fn export(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<CustomerExport>, ApiError> {
    check_customer("id", &id)?;
    let ctx = principal.context(&request_id);
    let mut services = BTreeMap::new();
    for (name, client) in &state.privacy {
        let data = client
            .clone()
            .export_customer_data(ctx.request(pb::ExportCustomerDataRequest {
                service: (*name).to_string(),
                customer_id: id.clone(),
            }))
            .await?
            .into_inner();
        let data: serde_json::Value =
            serde_json::from_str(&data.data_json).map_err(Error::internal)?;
        services.insert((*name).to_string(), data);
    }
    services.insert(
        "gateway".into(),
        audit_entries(&state.db, &principal.tenant_id, &id).await?,
    );
    Ok(Json(CustomerExport {
        customer_id: id,
        exported_at: rfc3339_micros(now_micros()).unwrap_or_default(),
        services,
    }))
}

async fn audit_entries(db: &Db, tenant: &str, customer: &str) -> Result<serde_json::Value, Error> {
    use sea_orm::{FromQueryResult, JsonValue};
    let conn = db.conn();
    let sql = format!(
        "SELECT id, method, path, status, at FROM audit_log WHERE tenant_id = $1 AND {} \
         ORDER BY id LIMIT 10000",
        about_customer(db.backend())
    );
    let rows = JsonValue::find_by_statement(stmt(conn, &sql, about_values(tenant, customer)))
        .all(conn)
        .await
        .map_err(db_error)?;
    Ok(serde_json::json!({ "audit_log": rows }))
}

async fn erase(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> Result<(http::StatusCode, Json<ErasureJob>), ApiError> {
    check_customer("id", &id)?;
    let job = state
        .erasures
        .start(&principal.tenant_id, &id, &key)
        .await?;
    Ok((http::StatusCode::ACCEPTED, Json(job.into())))
}

async fn get_erasure(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ErasureJob>, ApiError> {
    let job = state.erasures.get(&principal.tenant_id, &id).await?;
    Ok(Json(job.into()))
}

impl From<erasures::Job> for ErasureJob {
    fn from(job: erasures::Job) -> Self {
        Self {
            id: job.id,
            status: job.status.into(),
            created_at: rfc3339_micros(job.created_at).unwrap_or_default(),
            parts: job
                .parts
                .into_iter()
                .map(|p| ErasurePart {
                    service: p.service,
                    status: p.status,
                    error: (!p.error.is_empty()).then_some(p.error),
                    updated_at: rfc3339_micros(p.updated_at).unwrap_or_default(),
                })
                .collect(),
        }
    }
}
