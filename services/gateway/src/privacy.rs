//! GDPR across the suite (admins): `GET /v1/customers/{id}/export` gathers what every
//! service keeps about a customer into one JSON document; `POST /v1/customers/{id}/erasure`
//! erases the customer everywhere and answers with a job, `GET /v1/erasures/{id}` shows each
//! service's part.
//!
//! An erasure is written in one gateway transaction: the job, one part per service, one
//! command per service in the gateway's command outbox (`tessera.ops.v1.PrivacyService/
//! EraseCustomerData`, delivered with retries and backoff, so a service that is down catches
//! up when it is back, and a refusal is dead-lettered and shown), and the gateway's own part:
//! the audit log's entries about the customer lose their bodies. Services delete what is
//! only personal and keep records that must stay (the ledger, redemptions, issued codes)
//! under a pseudonym, so sums stay whole. The job keeps a hash of the customer id, not the id.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tessera_proto::ops::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::queue::commands::{self, Command};
use tessera_store::queue::{BatchContext, Failure, Handler, Item};
use tessera_store::{Backend, Db, db_error, now_micros, stmt};
use utoipa::ToSchema;

use crate::AppState;
use crate::api::{Api, Op};
use crate::error::ApiError;
use crate::extract::IdempotencyKey;
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::routes::rfc3339_micros;

const ADMINS: [Role; 1] = [Role::Admin];
/// The services holding customer data: (name in `PrivacyService`, the command that erases
/// there: `<relay peer>@<method>`).
pub const SERVICES: [(&str, &str); 5] = [
    (
        "catalog",
        "catalog@/tessera.ops.v1.PrivacyService/EraseCustomerData",
    ),
    (
        "eligibility",
        "eligibility@/tessera.ops.v1.PrivacyService/EraseCustomerData",
    ),
    (
        "wallet",
        "wallet@/tessera.ops.v1.PrivacyService/EraseCustomerData",
    ),
    (
        "campaign-scheduler",
        "scheduler@/tessera.ops.v1.PrivacyService/EraseCustomerData",
    ),
    (
        "notification",
        "notification@/tessera.ops.v1.PrivacyService/EraseCustomerData",
    ),
];

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

fn check_customer(id: &str) -> Result<(), ApiError> {
    let mut v = Violations::new();
    tessera_store::api::check_customer_id(&mut v, "id", id);
    v.finish()?;
    Ok(())
}

async fn export(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<CustomerExport>, ApiError> {
    check_customer(&id)?;
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

/// `(path = /v1/customers/{id} or under it, or a body naming the customer)`, for the
/// backend; binds `$2` (the path), `$3` (the path with a trailing `/`), `$4` (the quoted id).
fn about_customer(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "(path = $2 OR substr(path, 1, length($3)) = $3 OR strpos(request, $4) > 0)"
        }
        Backend::Sqlite => {
            "(path = $2 OR substr(path, 1, length($3)) = $3 OR instr(request, $4) > 0)"
        }
    }
}

fn about_values(tenant: &str, customer: &str) -> Vec<sea_orm::Value> {
    let path = format!("/v1/customers/{customer}");
    vec![
        tenant.into(),
        path.clone().into(),
        format!("{path}/").into(),
        serde_json::Value::String(customer.to_string())
            .to_string()
            .into(),
    ]
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

fn hash(tenant: &str, customer: &str) -> String {
    let digest = Sha256::digest(format!("{tenant}\n{customer}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

async fn erase(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> Result<(http::StatusCode, Json<ErasureJob>), ApiError> {
    check_customer(&id)?;
    let tenant = principal.tenant_id.as_str();
    let job = tessera_store::idempotency::derived_key("erasure", &[tenant, &key]);
    let job: String = job
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let customer_hash = hash(tenant, &id);
    let db = &state.db;
    let conn = db.conn();
    let existing = conn
        .query_one_raw(stmt(
            conn,
            "SELECT customer_hash FROM erasures WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), job.clone().into()],
        ))
        .await
        .map_err(db_error)?;
    if let Some(row) = existing {
        let stored: String = row.try_get_by_index(0).map_err(db_error)?;
        if stored != customer_hash {
            return Err(Error::new(
                tessera_runtime::Code::FailedPrecondition,
                "idempotency key was already used with a different request",
            )
            .with_reason("IDEMPOTENCY_KEY_REUSED")
            .into());
        }
        return Ok((
            http::StatusCode::ACCEPTED,
            Json(load(db, tenant, &job).await?),
        ));
    }
    let pseudonym = format!("erased-{}", uuid::Uuid::now_v7().simple());
    let now = now_micros();
    let txn = db.begin_write().await?;
    let inserted = txn
        .execute_raw(stmt(
            &txn,
            "INSERT INTO erasures (tenant_id, id, customer_hash, pseudonym, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, id) DO NOTHING",
            [
                tenant.into(),
                job.clone().into(),
                customer_hash.into(),
                pseudonym.clone().into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .rows_affected();
    if inserted == 1 {
        for (service, status) in SERVICES
            .iter()
            .map(|(s, _)| (*s, "pending"))
            .chain([("gateway", "done")])
        {
            txn.execute_raw(stmt(
                &txn,
                "INSERT INTO erasure_parts (tenant_id, erasure_id, service, status, error, \
                 updated_at) VALUES ($1, $2, $3, $4, '', $5)",
                [
                    tenant.into(),
                    job.clone().into(),
                    service.into(),
                    status.into(),
                    now.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        }
        let sends: Vec<Command<pb::EraseCustomerDataRequest>> = SERVICES
            .iter()
            .map(|(service, kind)| Command {
                path: kind,
                key: format!("erasure:{job}:{service}"),
                request: pb::EraseCustomerDataRequest {
                    idempotency_key: format!("erasure-{job}"),
                    service: (*service).to_string(),
                    customer_id: id.clone(),
                    pseudonym: pseudonym.clone(),
                },
            })
            .collect();
        commands::send(&txn, tenant, sends).await?;
        // The gateway's own part: the audit log keeps that a request was made, not its
        // bodies, and no longer names the customer in its paths.
        let sql = format!(
            "UPDATE audit_log SET request = '', after = '', before_state = NULL, \
             path = replace(path, $2, $5) WHERE tenant_id = $1 AND {}",
            about_customer(db.backend())
        );
        let mut values = about_values(tenant, &id);
        values.push(format!("/v1/customers/{pseudonym}").into());
        txn.execute_raw(stmt(&txn, &sql, values))
            .await
            .map_err(db_error)?;
    }
    txn.commit().await.map_err(db_error)?;
    state.erasures_wake.notify_one();
    Ok((
        http::StatusCode::ACCEPTED,
        Json(load(db, tenant, &job).await?),
    ))
}

async fn get_erasure(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ErasureJob>, ApiError> {
    if id.is_empty() || id.len() > 64 {
        return Err(Error::invalid_field("id", "must be 1 to 64 characters").into());
    }
    Ok(Json(load(&state.db, &principal.tenant_id, &id).await?))
}

async fn load(db: &Db, tenant: &str, id: &str) -> Result<ErasureJob, Error> {
    let conn = db.conn();
    let created = conn
        .query_one_raw(stmt(
            conn,
            "SELECT created_at FROM erasures WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("erasure `{id}`")))?;
    let created: i64 = created.try_get_by_index(0).map_err(db_error)?;
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT service, status, error, updated_at FROM erasure_parts \
             WHERE tenant_id = $1 AND erasure_id = $2 ORDER BY service",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    let mut parts = Vec::with_capacity(rows.len());
    for r in &rows {
        let error: String = r.try_get_by_index(2).map_err(db_error)?;
        parts.push(ErasurePart {
            service: r.try_get_by_index(0).map_err(db_error)?,
            status: r.try_get_by_index(1).map_err(db_error)?,
            error: (!error.is_empty()).then_some(error),
            updated_at: rfc3339_micros(r.try_get_by_index(3).map_err(db_error)?)
                .unwrap_or_default(),
        });
    }
    let status = if parts.iter().any(|p| p.status == "failed") {
        "failed"
    } else if parts.iter().all(|p| p.status == "done") {
        "done"
    } else {
        "pending"
    };
    Ok(ErasureJob {
        id: id.to_string(),
        status: status.into(),
        created_at: rfc3339_micros(created).unwrap_or_default(),
        parts,
    })
}

/// The gateway's command relay, noting each erasure part's outcome on its job.
pub struct Parts {
    pub relay: Arc<dyn Handler>,
    pub db: Db,
}

#[async_trait::async_trait]
impl Handler for Parts {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        self.relay.handle(item).await
    }

    async fn handle_all(
        &self,
        items: Vec<Item>,
        ctx: &BatchContext,
    ) -> Vec<(Item, Result<(), Failure>)> {
        let results = self.relay.handle_all(items, ctx).await;
        for (item, result) in &results {
            let Some((job, service)) = item
                .key
                .strip_prefix("erasure:")
                .and_then(|k| k.split_once(':'))
            else {
                continue;
            };
            let (status, error) = match result {
                Ok(()) => ("done", String::new()),
                Err(Failure::Permanent(e)) => ("failed", e.clone()),
                Err(Failure::Retry(e)) => ("pending", e.clone()),
                Err(Failure::Unfinished) => ("pending", String::new()),
            };
            let conn = self.db.conn();
            let noted = conn
                .execute_raw(stmt(
                    conn,
                    "UPDATE erasure_parts SET status = $4, error = $5, updated_at = $6 \
                     WHERE tenant_id = $1 AND erasure_id = $2 AND service = $3",
                    [
                        item.tenant.clone().into(),
                        job.into(),
                        service.into(),
                        status.into(),
                        error.chars().take(500).collect::<String>().into(),
                        now_micros().into(),
                    ],
                ))
                .await;
            if let Err(e) = noted {
                tracing::warn!(job, service, error = %e, "erasure part not noted");
            }
        }
        results
    }
}
