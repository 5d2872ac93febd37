//! Durable jobs that run once, whatever the number of replicas.
//!
//! A job is a row in `jobs`, named in its tenant by a key (one start job per campaign, one
//! sweep per tenant), due at `due_at`: the record of what is scheduled, what ran and what
//! failed ([`list`](crate::service) shows it). Running it is the shared work queue's part
//! (`tessera_store::queue`, queue `jobs`): scheduling a job [`put`](queue::put)s an item of
//! the same key, due at the job's time, in the same transaction, so moving a job moves its
//! item, and cancelling it withdraws the item. Replicas claim due items with `FOR UPDATE SKIP
//! LOCKED` under a lease; the [`Worker`] runs each job's remote part (a call that is
//! idempotent by the job's id and due time), then commits its local part in one transaction
//! that first checks that its claim still holds the item ([`queue::holds`]) and settles the
//! item in it ([`queue::settle`]). If the lease ran out and another worker took the job, or
//! the job was moved meanwhile, the late worker's transaction writes nothing. So a job's local
//! effects commit exactly once, and its remote effects are asked for at least once under one
//! idempotency key. A job that keeps failing is dead-lettered with its reason (and marked
//! `failed`), listed and replayed like any other dead work.
//!
//! A worker that dies leaves its lease behind; when the lease ends, another worker claims
//! the job. Jobs that came due while every replica was down are simply due: they run once on
//! start, and a recurring job schedules its next run from the time it ran, so a long outage
//! is caught up with one run, not one per missed period.
//!
//! Time comes from a [`Clock`], so tests can move it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_runtime::Error;
use tessera_store::queue::{self, Failure, Handler, Item, NewItem, Queue, RetryPolicy, Settlement};
use tessera_store::{Db, db_error, stmt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use tessera_store::clock::{Clock, ManualClock, SystemClock};

use crate::SERVICE;

/// The work queue that runs jobs.
pub const QUEUE: &str = "jobs";

/// A job to schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub tenant_id: String,
    /// Names the job in its tenant: scheduling the same key again moves it.
    pub key: String,
    pub kind: String,
    pub campaign_id: String,
    pub payload: Vec<u8>,
    pub due_at: i64,
}

/// A job being run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub tenant_id: String,
    pub key: String,
    pub kind: String,
    pub campaign_id: String,
    pub payload: Vec<u8>,
    pub due_at: i64,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

impl Job {
    /// The idempotency key of this run's remote effects: the same for every attempt of one
    /// run, different for the next run of a recurring job.
    pub fn run_key(&self) -> String {
        format!("job-{}-{}", self.id, self.due_at)
    }
}

/// What a job's local part decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished for good.
    Done,
    /// Recurring: run again at this time (µs).
    Again(i64),
}

/// Runs jobs by kind.
pub trait Executor: Send + Sync + 'static {
    /// The remote part, before the transaction (idempotent by [`Job::run_key`]); what it
    /// answers goes to the local part. An error is retried with backoff.
    fn remote<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<serde_json::Value, Error>>;

    /// The local part, in the transaction that completes the job (only if this claim still
    /// holds the job).
    fn local<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        job: &'a Job,
        remote: serde_json::Value,
        now: i64,
    ) -> BoxFuture<'a, Result<Outcome, Error>>;

    /// After the local part committed.
    fn committed(&self, _job: &Job) {}
}

/// The queue item that runs a job.
fn item(job: &NewJob, id: &str) -> NewItem {
    NewItem {
        queue: QUEUE,
        tenant: job.tenant_id.clone(),
        key: job.key.clone(),
        kind: job.kind.clone(),
        payload: id.as_bytes().to_vec(),
        not_before: Some(job.due_at),
        group: String::new(),
    }
}

/// Inserts a job; `on_conflict` says what happens when its key exists. Returns the job's id
/// when a row was written.
async fn insert<C: ConnectionTrait>(
    conn: &C,
    job: &NewJob,
    now: i64,
    on_conflict: &str,
) -> Result<Option<String>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!(
                "INSERT INTO jobs (id, tenant_id, job_key, kind, campaign_id, payload, due_at, \
                 status, attempts, last_error, runs, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, '', 0, $8, $8) \
                 ON CONFLICT (tenant_id, job_key) {on_conflict} RETURNING id"
            ),
            [
                uuid::Uuid::now_v7().to_string().into(),
                job.tenant_id.clone().into(),
                job.key.clone().into(),
                job.kind.clone().into(),
                job.campaign_id.clone().into(),
                job.payload.clone().into(),
                job.due_at.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    row.map(|r| r.try_get_by_index(0))
        .transpose()
        .map_err(db_error)
}

/// Schedules a job, or moves the job of the same key to a new time and payload (pending
/// again, attempts reset). Its queue item moves too, so a worker still running the old
/// version cannot complete it.
pub async fn schedule<C: ConnectionTrait>(conn: &C, job: &NewJob, now: i64) -> Result<(), Error> {
    let id = insert(
        conn,
        job,
        now,
        "DO UPDATE SET kind = excluded.kind, campaign_id = excluded.campaign_id, \
         payload = excluded.payload, due_at = excluded.due_at, status = 'pending', \
         attempts = 0, last_error = '', updated_at = excluded.updated_at",
    )
    .await?
    .ok_or_else(|| Error::internal("an upserted job returned no row"))?;
    queue::put(conn, item(job, &id)).await
}

/// Schedules a job unless one of that key exists (pending, done or failed).
pub async fn ensure<C: ConnectionTrait>(conn: &C, job: &NewJob, now: i64) -> Result<(), Error> {
    if let Some(id) = insert(conn, job, now, "DO NOTHING").await? {
        queue::push(conn, [item(job, &id)]).await?;
    }
    Ok(())
}

/// Cancels a pending job (its queue item is withdrawn: a worker running it cannot complete
/// it).
pub async fn cancel<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    key: &str,
    now: i64,
) -> Result<(), Error> {
    let cancelled = conn
        .execute_raw(stmt(
            conn,
            "UPDATE jobs SET status = 'cancelled', updated_at = $3 \
             WHERE tenant_id = $1 AND job_key = $2 AND status = 'pending'",
            [tenant.into(), key.into(), now.into()],
        ))
        .await
        .map_err(db_error)?;
    if cancelled.rows_affected() > 0 {
        queue::withdraw(conn, QUEUE, tenant, key).await?;
    }
    Ok(())
}

/// Puts pending jobs scheduled before jobs ran on the shared queue onto it (at start).
pub async fn adopt(db: &Db) -> Result<u64, Error> {
    queue::adopt_rows(
        db,
        "SELECT j.tenant_id, j.id, j.job_key, j.kind, j.due_at FROM jobs j \
         WHERE j.status = 'pending' AND NOT EXISTS (SELECT 1 FROM work_queue q \
         WHERE q.queue = $1 AND q.tenant_id = j.tenant_id AND q.dedupe_key = j.job_key)",
        vec![QUEUE.into()],
        |row| {
            let id: String = row.try_get_by_index(1)?;
            Ok(NewItem {
                queue: QUEUE,
                tenant: row.try_get_by_index(0)?,
                key: row.try_get_by_index(2)?,
                kind: row.try_get_by_index(3)?,
                payload: id.into_bytes(),
                not_before: Some(row.try_get_by_index(4)?),
                group: String::new(),
            })
        },
    )
    .await
}

/// How a worker runs.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// How long a claim lasts before another worker may take the job.
    pub lease: Duration,
    /// Jobs claimed at once.
    pub batch: u32,
    /// Jobs of a batch run at the same time.
    pub concurrency: usize,
    /// Time between polls when nothing woke the worker.
    pub poll: Duration,
    /// Attempts before a job is dead-lettered and marked failed.
    pub max_attempts: i32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            batch: 50,
            concurrency: 4,
            poll: Duration::from_millis(500),
            max_attempts: 10,
        }
    }
}

/// Claims and runs due jobs: a [`queue::Worker`] on queue [`QUEUE`] whose handler runs jobs.
pub struct Worker {
    queue: Queue,
    runner: Arc<Runner>,
    inner: queue::Worker,
    config: WorkerConfig,
}

/// The handler: one job per item.
struct Runner {
    db: Db,
    owner: String,
    clock: Arc<dyn Clock>,
    executor: Arc<dyn Executor>,
    max_attempts: i32,
}

impl Worker {
    pub fn new(
        db: Db,
        owner: impl Into<String>,
        clock: Arc<dyn Clock>,
        executor: Arc<dyn Executor>,
        config: WorkerConfig,
    ) -> Self {
        // 2 s, 4 s … up to about 8.5 minutes between attempts.
        let policy = RetryPolicy {
            max_attempts: config.max_attempts,
            base: Duration::from_secs(2),
            cap: Duration::from_secs(512),
            schedule: Vec::new(),
        };
        let queue = Queue::new(db.clone(), SERVICE, QUEUE, policy).with_clock(clock.clone());
        let runner = Arc::new(Runner {
            db,
            owner: owner.into(),
            clock,
            executor,
            max_attempts: config.max_attempts,
        });
        let inner = queue::Worker::new(
            queue.clone(),
            runner.clone(),
            queue::WorkerConfig {
                batch: config.batch,
                concurrency: config.concurrency,
                lease: config.lease,
                poll: config.poll,
            },
        );
        Self {
            queue,
            runner,
            inner,
            config,
        }
    }

    /// Notified when a job is scheduled in this process (to run it without waiting a poll).
    pub fn waker(&self) -> Arc<Notify> {
        self.inner.waker()
    }

    /// Works until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        self.inner.run(shutdown).await;
    }

    /// Claims and runs batches until nothing is due; returns how many jobs it claimed.
    pub async fn run_due(&self) -> Result<usize, Error> {
        let mut claimed = 0;
        loop {
            match self.inner.run_once().await? {
                0 => return Ok(claimed),
                n => claimed += n,
            }
        }
    }

    /// Claims up to a batch of due jobs' items (tests drive [`Worker::execute`] with them).
    pub async fn claim(&self) -> Result<Vec<Item>, Error> {
        let (batch, lease) = (self.config.batch, self.config.lease);
        Ok(self.queue.claim(batch, lease).await?.1)
    }

    /// Runs one claimed job and settles its item; true when its local part committed (this
    /// claim still held it).
    pub async fn execute(&self, item: &Item) -> bool {
        match self.runner.run(item).await {
            Ok(committed) => committed,
            Err(e) => {
                let failure = self.runner.failed(item, &e).await;
                if let Err(e) = self.queue.fail(&item.token, item, &failure).await {
                    tracing::warn!(item = item.id, error = %e, "could not record a job failure");
                }
                false
            }
        }
    }
}

#[async_trait::async_trait]
impl Handler for Runner {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        match self.run(item).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(item, &e).await),
        }
    }
}

impl Runner {
    /// The job an item runs, if it is still to run (pending, or failed and replayed).
    async fn job(&self, item: &Item) -> Result<Option<Job>, Error> {
        let id = String::from_utf8_lossy(&item.payload);
        let conn = self.db.conn();
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT id, job_key, kind, campaign_id, payload, due_at FROM jobs \
                 WHERE tenant_id = $1 AND id = $2 AND status IN ('pending', 'failed')",
                [item.tenant.clone().into(), id.as_ref().into()],
            ))
            .await
            .map_err(db_error)?;
        row.map(|row| {
            Ok(Job {
                id: row.try_get_by_index(0)?,
                tenant_id: item.tenant.clone(),
                key: row.try_get_by_index(1)?,
                kind: row.try_get_by_index(2)?,
                campaign_id: row.try_get_by_index(3)?,
                payload: row.try_get_by_index(4)?,
                due_at: row.try_get_by_index(5)?,
                attempts: item.attempts,
            })
        })
        .transpose()
        .map_err(db_error)
    }

    /// Runs the job of `item`: true when its local part committed, false when there was
    /// nothing to run or the claim had been overtaken.
    async fn run(&self, item: &Item) -> Result<bool, Error> {
        let Some(job) = self.job(item).await? else {
            return Ok(false);
        };
        let remote = self.executor.remote(&job).await?;
        let txn = self.db.begin_write().await?;
        // The fence: this claim still holds the item (locked until commit).
        if !queue::holds(&txn, item).await? {
            txn.rollback().await.map_err(db_error)?;
            tracing::info!(job = %job.id, "job taken over or moved; this run is dropped");
            return Ok(false);
        }
        let now = self.clock.now();
        let outcome = self.executor.local(&txn, &job, remote, now).await?;
        let (status, due_at, again) = match outcome {
            Outcome::Done => ("done", job.due_at, Settlement::Done),
            Outcome::Again(next) => ("pending", next, Settlement::Again(next)),
        };
        queue::settle(&txn, item, again).await?;
        txn.execute_raw(stmt(
            &txn,
            "UPDATE jobs SET status = $3, due_at = $4, attempts = 0, last_error = '', \
             runs = runs + 1, updated_at = $5 WHERE tenant_id = $1 AND id = $2",
            [
                job.tenant_id.clone().into(),
                job.id.clone().into(),
                status.into(),
                due_at.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            &txn,
            "INSERT INTO job_runs (job_id, tenant_id, kind, owner, attempt, due_at, ran_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                job.id.clone().into(),
                job.tenant_id.clone().into(),
                job.kind.clone().into(),
                self.owner.clone().into(),
                i64::from(job.attempts).into(),
                job.due_at.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.executor.committed(&job);
        Ok(true)
    }

    /// Records a failed attempt on the job (failed after the last one) and says how the
    /// queue takes it: retried after its backoff, dead-lettered after the last attempt.
    async fn failed(&self, item: &Item, err: &Error) -> Failure {
        tracing::warn!(item = item.id, kind = %item.kind, attempt = item.attempts, error = %err, "job failed");
        let conn = self.db.conn();
        let recorded = conn
            .execute_raw(stmt(
                conn,
                "UPDATE jobs SET attempts = $3, last_error = $4, updated_at = $5, \
                 status = CASE WHEN $3 >= $6 THEN 'failed' ELSE status END \
                 WHERE tenant_id = $1 AND id = $2 AND status IN ('pending', 'failed')",
                [
                    item.tenant.clone().into(),
                    String::from_utf8_lossy(&item.payload).as_ref().into(),
                    item.attempts.into(),
                    err.to_string().into(),
                    self.clock.now().into(),
                    self.max_attempts.into(),
                ],
            ))
            .await;
        if let Err(e) = recorded {
            tracing::warn!(item = item.id, error = %e, "could not record a job failure");
        }
        Failure::Retry(err.to_string())
    }
}
