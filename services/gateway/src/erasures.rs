//! Erasing a customer across the suite (GDPR), as one job; served over REST
//! (`crate::privacy`) and gRPC (`tessera.ops.v1.ErasureService`, `crate::erasure_grpc`).
//!
//! An erasure is written in one gateway transaction: the job, one part per service, one
//! command per service in the gateway's command outbox (`tessera.ops.v1.PrivacyService/
//! EraseCustomerData`, delivered with retries and backoff, so a service that is down catches
//! up when it is back, and a refusal is dead-lettered and shown), and the gateway's own part:
//! the audit log's entries about the customer lose their bodies. Services delete what is
//! only personal and keep records that must stay (the ledger, redemptions, issued codes)
//! under a pseudonym, so sums stay whole. The job keeps a hash of the customer id, not the id.

use std::sync::Arc;

use sea_orm::ConnectionTrait;
use sha2::{Digest, Sha256};
use tessera_proto::ops::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::queue::commands::{self, Command};
use tessera_store::queue::{BatchContext, Failure, Handler, Item};
use tessera_store::{Backend, Db, db_error, now_micros, stmt};

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

/// An erasure job and each service's part.
pub struct Job {
    pub id: String,
    /// `pending` until every part is `done`; `failed` when a part was refused.
    pub status: &'static str,
    /// Microseconds since the epoch.
    pub created_at: i64,
    pub parts: Vec<Part>,
}

/// One service's part of an erasure.
pub struct Part {
    pub service: String,
    /// `pending`, `done` or `failed`.
    pub status: String,
    /// The last failure (a pending part is retried); empty when none.
    pub error: String,
    /// Microseconds since the epoch.
    pub updated_at: i64,
}

/// Starts and reads erasure jobs.
#[derive(Clone)]
pub struct Erasures {
    db: Db,
    /// Wakes the command worker that carries erasures to the services.
    wake: Arc<tokio::sync::Notify>,
}

/// Checks a customer id in the request field `field`.
pub fn check_customer(field: &str, id: &str) -> Result<(), Error> {
    let mut v = Violations::new();
    tessera_store::api::check_customer_id(&mut v, field, id);
    v.finish()
}

impl Erasures {
    pub fn new(db: Db, wake: Arc<tokio::sync::Notify>) -> Self {
        Self { db, wake }
    }

    /// Starts erasing `customer` of `tenant`: a retry with the same `key` answers the same
    /// job; the same key for another customer is refused.
    pub async fn start(&self, tenant: &str, customer: &str, key: &str) -> Result<Job, Error> {
        let job = tessera_store::idempotency::derived_key("erasure", &[tenant, key]);
        let job: String = job
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(32)
            .collect();
        let customer_hash = hash(tenant, customer);
        let db = &self.db;
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
                .with_reason("IDEMPOTENCY_KEY_REUSED"));
            }
            return self.get(tenant, &job).await;
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
                        customer_id: customer.to_string(),
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
            let mut values = about_values(tenant, customer);
            values.push(format!("/v1/customers/{pseudonym}").into());
            txn.execute_raw(stmt(&txn, &sql, values))
                .await
                .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        self.wake.notify_one();
        self.get(tenant, &job).await
    }

    /// The job `id` of `tenant`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Job, Error> {
        if id.is_empty() || id.len() > 64 {
            return Err(Error::invalid_field("id", "must be 1 to 64 characters"));
        }
        let conn = self.db.conn();
        let created = conn
            .query_one_raw(stmt(
                conn,
                "SELECT created_at FROM erasures WHERE tenant_id = $1 AND id = $2",
                [tenant.into(), id.into()],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::not_found(format!("erasure `{id}`")))?;
        let created_at: i64 = created.try_get_by_index(0).map_err(db_error)?;
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
            parts.push(Part {
                service: r.try_get_by_index(0).map_err(db_error)?,
                status: r.try_get_by_index(1).map_err(db_error)?,
                error: r.try_get_by_index(2).map_err(db_error)?,
                updated_at: r.try_get_by_index(3).map_err(db_error)?,
            });
        }
        let status = if parts.iter().any(|p| p.status == "failed") {
            "failed"
        } else if parts.iter().all(|p| p.status == "done") {
            "done"
        } else {
            "pending"
        };
        Ok(Job {
            id: id.to_string(),
            status,
            created_at,
            parts,
        })
    }
}

fn hash(tenant: &str, customer: &str) -> String {
    let digest = Sha256::digest(format!("{tenant}\n{customer}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(path = /v1/customers/{id} or under it, or a body naming the customer)`, for the
/// backend; binds `$2` (the path), `$3` (the path with a trailing `/`), `$4` (the quoted id).
pub(crate) fn about_customer(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "(path = $2 OR substr(path, 1, length($3)) = $3 OR strpos(request, $4) > 0)"
        }
        Backend::Sqlite => {
            "(path = $2 OR substr(path, 1, length($3)) = $3 OR instr(request, $4) > 0)"
        }
    }
}

/// The values [`about_customer`] binds, after the tenant (`$1`).
pub(crate) fn about_values(tenant: &str, customer: &str) -> Vec<sea_orm::Value> {
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
