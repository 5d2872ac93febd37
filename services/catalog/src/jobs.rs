//! Bulk code generation as a background job with progress.
//!
//! A job row records what was asked and how many codes exist so far; the work itself is an
//! item of the service's durable queue (`generation`), pushed in the transaction that
//! records the job. The [`Generator`] handles it in slices: batches of random codes from
//! the pool's pattern, inserted with `ON CONFLICT DO NOTHING` (so codes stay unique per
//! tenant), adding what was really inserted to the job's count in the same transaction
//! under the job row's lock. Progress is exact; after a slice the item goes back to the
//! queue ([`Failure::Unfinished`]), so a lease never has to outlast a million codes, jobs of
//! several tenants take turns, and a job whose worker died (crash, deploy) is resumed by
//! any replica where it stopped once the lease ends.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::outbox::{self, micros_to_timestamp};
use tessera_store::queue::{
    self, Failure, Handler, Item, NewItem, Queue, RetryPolicy, Worker, WorkerConfig, push,
};
use tessera_store::{Db, db_error, now_micros, stmt};
use tokio::sync::Notify;

use crate::codes::{self, code_row, insert_codes, pool_window};
use crate::pattern::Pattern;

/// The queue generation work waits in.
const QUEUE: &str = "generation";
/// What a generation item is.
const KIND: &str = "catalog.generate";

const RUNNING: &str = "running";
const SUCCEEDED: &str = "succeeded";
const FAILED: &str = "failed";

/// Codes per batch (one transaction).
const BATCH: i64 = 10_000;
/// How long a worker's claim on a job lasts: a slice takes far less.
const LEASE: Duration = Duration::from_secs(30);
/// How long one slice of a job runs before the job goes back to the queue.
const SLICE: Duration = Duration::from_secs(2);
/// Batches in a row that add no new code before the job gives up (pattern exhausted). The
/// last batches of a job are small (what is left), and in a pool a quarter full one code
/// collides a quarter of the time: five in a row gave up about once in 800 jobs.
const MAX_EMPTY_BATCHES: u32 = 20;
/// Most codes one job may generate.
pub const MAX_COUNT: i64 = 1_000_000;

const COLUMNS: &str = "id, pool_id, requested, generated, status, error, created_at, finished_at";

fn from_row(row: &QueryResult) -> Result<pb::GenerationJob, Error> {
    let status: String = row.try_get_by_index(4).map_err(db_error)?;
    let finished: Option<i64> = row.try_get_by_index(7).map_err(db_error)?;
    Ok(pb::GenerationJob {
        id: row.try_get_by_index(0).map_err(db_error)?,
        pool_id: row.try_get_by_index(1).map_err(db_error)?,
        requested: row.try_get_by_index(2).map_err(db_error)?,
        generated: row.try_get_by_index(3).map_err(db_error)?,
        status: match status.as_str() {
            RUNNING => pb::JobStatus::Running,
            SUCCEEDED => pb::JobStatus::Succeeded,
            _ => pb::JobStatus::Failed,
        }
        .into(),
        error: row.try_get_by_index(5).map_err(db_error)?,
        created_at: Some(micros_to_timestamp(
            row.try_get_by_index(6).map_err(db_error)?,
        )),
        finished_at: finished.map(micros_to_timestamp),
    })
}

/// A job of the tenant, or NOT_FOUND.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::GenerationJob, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM generation_jobs WHERE tenant_id = $1 AND id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("generation job `{id}`")))?;
    from_row(&row)
}

/// The pool's pattern, as stored.
fn pattern_of(pool: &pb::CodePool) -> Result<Pattern, Error> {
    let mut v = Violations::new();
    let pattern = pool.definition.as_ref().and_then(|d| d.pattern.as_ref());
    Pattern::parse(&mut v, "pattern", pattern)
        .ok_or_else(|| Error::internal(format!("stored pattern of pool `{}` is invalid", pool.id)))
}

/// Records a new job for `count` codes of a pool (its runner starts after the commit).
/// Refused when the pattern cannot comfortably yield that many more codes: random drawing
/// needs the pattern's capacity to be at least twice the pool's codes.
pub async fn create(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    pool_id: &str,
    count: i64,
) -> Result<pb::GenerationJob, Error> {
    let pool = codes::get_pool(txn, &ctx.tenant_id, pool_id).await?;
    if pool.status != pb::PoolStatus::Active as i32 {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!("code pool `{pool_id}` is disabled"),
        )
        .with_reason("POOL_DISABLED"));
    }
    let capacity = pattern_of(&pool)?.capacity();
    let wanted = u128::try_from(count + pool.code_count).unwrap_or(0);
    if wanted.saturating_mul(2) > capacity {
        return Err(Error::invalid_field(
            "count",
            format!(
                "the pool's pattern yields {capacity} codes; with the {} it has, at most {} more \
                 can be generated (half the pattern's capacity)",
                pool.code_count,
                (capacity / 2).saturating_sub(u128::try_from(pool.code_count).unwrap_or(0))
            ),
        ));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_micros();
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO generation_jobs (tenant_id, id, pool_id, requested, generated, status, \
         error, owner, lease_until, created_at) VALUES ($1, $2, $3, $4, 0, $5, '', NULL, 0, $6)",
        [
            ctx.tenant_id.clone().into(),
            id.clone().into(),
            pool_id.into(),
            count.into(),
            RUNNING.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    push(txn, [work(&ctx.tenant_id, &id)]).await?;
    let data = serde_json::json!({
        "job_id": id, "pool_id": pool_id, "requested": count, "principal": ctx.principal,
    });
    outbox::enqueue(txn, &ctx.tenant_id, "code_pool.generation_started", &data).await?;
    get(txn, &ctx.tenant_id, &id).await
}

/// The queue item that runs job `id`.
fn work(tenant: &str, id: &str) -> NewItem {
    NewItem::for_row(QUEUE, KIND, tenant, id)
}

/// Puts running jobs without a queue item (recorded before generation used the queue)
/// on the queue; returns how many were new.
pub async fn adopt_running(db: &Db) -> Result<u64, Error> {
    let sql = "SELECT tenant_id, id FROM generation_jobs WHERE status = $1";
    queue::adopt(db, sql, vec![RUNNING.into()], QUEUE, KIND).await
}

/// Runs generation jobs: the handler of the `generation` queue.
pub struct Generator {
    db: Db,
    relay_wake: Arc<Notify>,
}

impl Generator {
    /// The worker that runs the jobs of `db` (two at a time per replica).
    pub fn worker(db: Db, service: &'static str, relay_wake: Arc<Notify>) -> Worker {
        let queue = Queue::new(db.clone(), service, QUEUE, RetryPolicy::default());
        let config = WorkerConfig {
            batch: 2,
            concurrency: 2,
            lease: LEASE,
            poll: Duration::from_secs(1),
        };
        Worker::new(queue, Arc::new(Self { db, relay_wake }), config)
    }
}

#[async_trait::async_trait]
impl Handler for Generator {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        let id = String::from_utf8_lossy(&item.payload);
        match self.slice(&item.tenant, &id).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::Unfinished),
            Err(e) if e.code == Code::NotFound => Err(Failure::Permanent(e.message)),
            Err(e) => Err(Failure::Retry(e.message)),
        }
    }
}

impl Generator {
    /// Runs job `job_id` for up to [`SLICE`]; returns whether it is over.
    async fn slice(&self, tenant: &str, job_id: &str) -> Result<bool, Error> {
        let job = get(self.db.conn(), tenant, job_id).await?;
        let pool = codes::get_pool(self.db.conn(), tenant, &job.pool_id).await?;
        let pattern = pattern_of(&pool)?;
        let max_uses = i64::from(pool.definition.as_ref().map_or(1, |d| d.max_uses.max(1)));
        let window = pool_window(&pool);
        let started = Instant::now();
        let mut empty_batches = 0;
        while started.elapsed() < SLICE {
            let txn = self.db.begin_write().await?;
            let lock = self.db.backend().row_lock();
            let row = txn
                .query_one_raw(stmt(
                    &txn,
                    &format!(
                        "SELECT requested, generated, status FROM generation_jobs \
                         WHERE tenant_id = $1 AND id = $2{lock}"
                    ),
                    [tenant.into(), job_id.into()],
                ))
                .await
                .map_err(db_error)?
                .ok_or_else(|| Error::not_found(format!("generation job `{job_id}`")))?;
            let requested: i64 = row.try_get_by_index(0).map_err(db_error)?;
            let generated: i64 = row.try_get_by_index(1).map_err(db_error)?;
            let status: String = row.try_get_by_index(2).map_err(db_error)?;
            if status != RUNNING {
                return Ok(true);
            }
            let left = requested - generated;
            if left <= 0 || empty_batches >= MAX_EMPTY_BATCHES {
                let (status, error) = if left <= 0 {
                    (SUCCEEDED, String::new())
                } else {
                    (
                        FAILED,
                        "the pattern yields no new codes; use a longer pattern".to_string(),
                    )
                };
                self.finish(
                    &txn,
                    tenant,
                    job_id,
                    &job.pool_id,
                    status,
                    &error,
                    generated,
                )
                .await?;
                txn.commit().await.map_err(db_error)?;
                self.relay_wake.notify_one();
                return Ok(true);
            }
            let batch = left.min(BATCH);
            let mut drawn = HashSet::with_capacity(batch as usize);
            {
                let mut rng = rand::rng();
                while (drawn.len() as i64) < batch {
                    drawn.insert(pattern.draw(&mut rng));
                }
            }
            let drawn = drawn.into_iter().collect();
            let now = now_micros();
            let inserted = insert_codes(&txn, tenant, drawn, |code| {
                code_row(tenant, &pool, code, max_uses, window, Some(job_id), now)
            })
            .await?;
            let inserted = i64::try_from(inserted).unwrap_or(0);
            empty_batches = if inserted == 0 { empty_batches + 1 } else { 0 };
            txn.execute_raw(stmt(
                &txn,
                "UPDATE generation_jobs SET generated = generated + $3 \
                 WHERE tenant_id = $1 AND id = $2",
                [tenant.into(), job_id.into(), inserted.into()],
            ))
            .await
            .map_err(db_error)?;
            txn.commit().await.map_err(db_error)?;
        }
        Ok(false)
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        txn: &DatabaseTransaction,
        tenant: &str,
        job_id: &str,
        pool_id: &str,
        status: &str,
        error: &str,
        generated: i64,
    ) -> Result<(), Error> {
        txn.execute_raw(stmt(
            txn,
            "UPDATE generation_jobs SET status = $3, error = $4, finished_at = $5 \
             WHERE tenant_id = $1 AND id = $2",
            [
                tenant.into(),
                job_id.into(),
                status.into(),
                error.into(),
                now_micros().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        let event = if status == SUCCEEDED {
            "code_pool.generated"
        } else {
            "code_pool.generation_failed"
        };
        let data = serde_json::json!({
            "job_id": job_id, "pool_id": pool_id, "generated": generated, "error": error,
        });
        outbox::enqueue(txn, tenant, event, &data).await?;
        Ok(())
    }
}
