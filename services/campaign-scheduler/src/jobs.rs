//! Durable jobs that run once, whatever the number of replicas.
//!
//! A job is a row in `jobs`, named in its tenant by a key (one start job per campaign, one
//! sweep per tenant), due at `due_at`. A [`Worker`] claims due jobs in batches: one
//! `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)` (PostgreSQL; SQLite has one
//! writer) sets a lease and bumps the job's fencing token. It then runs the job's remote part
//! (a call that is idempotent by the job's id and due time) and commits its local part in
//! one transaction that first re-checks the token: if the lease ran out and another worker
//! took the job, the token moved and the late worker's transaction writes nothing. So a
//! job's local effects commit exactly once, and its remote effects are asked for at least
//! once under one idempotency key.
//!
//! A worker that dies leaves its lease behind; when the lease ends, another worker claims
//! the job. Jobs that came due while every replica was down are simply due: they run once on
//! start, and a recurring job schedules its next run from the time it ran, so a long outage
//! is caught up with one run, not one per missed period.
//!
//! Time comes from a [`Clock`], so tests can move it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_runtime::Error;
use tessera_store::{Backend, Db, db_error, now_micros, stmt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Where a worker gets the time (µs since the epoch).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        now_micros()
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now: i64) -> Self {
        Self(AtomicI64::new(now))
    }

    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.0.fetch_add(by, Ordering::SeqCst);
    }

    pub fn set(&self, now: i64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

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

/// A claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub tenant_id: String,
    pub key: String,
    pub kind: String,
    pub campaign_id: String,
    pub payload: Vec<u8>,
    pub due_at: i64,
    /// The fencing token of this claim.
    pub fence: i64,
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

/// Inserts a job; `on_conflict` says what happens when its key exists.
async fn insert<C: ConnectionTrait>(
    conn: &C,
    job: &NewJob,
    now: i64,
    on_conflict: &str,
) -> Result<(), Error> {
    conn.execute_raw(stmt(
        conn,
        &format!(
            "INSERT INTO jobs (id, tenant_id, job_key, kind, campaign_id, payload, due_at, \
             status, attempts, lease_owner, lease_until, fence, last_error, runs, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, '', 0, 0, '', 0, $8, \
             $8) ON CONFLICT (tenant_id, job_key) {on_conflict}"
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
    Ok(())
}

/// Schedules a job, or moves the job of the same key to a new time and payload (pending
/// again, attempts reset). Its token moves too, so a worker still running the old version
/// cannot complete it.
pub async fn schedule<C: ConnectionTrait>(conn: &C, job: &NewJob, now: i64) -> Result<(), Error> {
    insert(
        conn,
        job,
        now,
        "DO UPDATE SET kind = excluded.kind, campaign_id = excluded.campaign_id, \
         payload = excluded.payload, due_at = excluded.due_at, status = 'pending', \
         attempts = 0, lease_owner = '', lease_until = 0, fence = jobs.fence + 1, \
         last_error = '', updated_at = excluded.updated_at",
    )
    .await
}

/// Schedules a job unless one of that key exists (pending, done or failed).
pub async fn ensure<C: ConnectionTrait>(conn: &C, job: &NewJob, now: i64) -> Result<(), Error> {
    insert(conn, job, now, "DO NOTHING").await
}

/// Cancels a pending job (its token moves: a worker running it cannot complete it).
pub async fn cancel<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    key: &str,
    now: i64,
) -> Result<(), Error> {
    conn.execute_raw(stmt(
        conn,
        "UPDATE jobs SET status = 'cancelled', lease_owner = '', lease_until = 0, \
         fence = fence + 1, updated_at = $3 \
         WHERE tenant_id = $1 AND job_key = $2 AND status = 'pending'",
        [tenant.into(), key.into(), now.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
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
    /// Attempts before a job is marked failed.
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

/// Claims and runs due jobs.
pub struct Worker {
    db: Db,
    owner: String,
    clock: Arc<dyn Clock>,
    executor: Arc<dyn Executor>,
    config: WorkerConfig,
    wake: Arc<Notify>,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Worker {
    pub fn new(
        db: Db,
        owner: impl Into<String>,
        clock: Arc<dyn Clock>,
        executor: Arc<dyn Executor>,
        config: WorkerConfig,
    ) -> Self {
        Self {
            db,
            owner: owner.into(),
            clock,
            executor,
            config,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Notified when a job is scheduled in this process (to run it without waiting a poll).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Polls until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.run_due().await {
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, owner = %self.owner, "job worker failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }

    /// Claims and runs batches until nothing is due; returns how many jobs completed.
    pub async fn run_due(&self) -> Result<usize, Error> {
        let mut completed = 0;
        loop {
            let jobs = self.claim().await?;
            if jobs.is_empty() {
                return Ok(completed);
            }
            // At most `concurrency` at a time (no closure: the futures borrow the jobs).
            let mut running = FuturesUnordered::new();
            for job in &jobs {
                if running.len() >= self.config.concurrency.max(1)
                    && let Some(done) = running.next().await
                {
                    completed += usize::from(done);
                }
                running.push(self.execute(job));
            }
            while let Some(done) = running.next().await {
                completed += usize::from(done);
            }
        }
    }

    /// Claims up to a batch of due jobs.
    pub async fn claim(&self) -> Result<Vec<Job>, Error> {
        let now = self.clock.now();
        let lock = match self.db.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET lease_owner = $1, lease_until = $2, fence = fence + 1, \
             attempts = attempts + 1, updated_at = $3 \
             WHERE id IN (SELECT id FROM jobs WHERE status = 'pending' AND due_at <= $3 \
             AND lease_until < $3 ORDER BY due_at LIMIT $4{lock}) \
             RETURNING id, tenant_id, job_key, kind, campaign_id, payload, due_at, fence, attempts"
        );
        let txn = self.db.begin_write().await?;
        let rows = txn
            .query_all_raw(stmt(
                &txn,
                &sql,
                [
                    self.owner.clone().into(),
                    (now + micros(self.config.lease)).into(),
                    now.into(),
                    i64::from(self.config.batch).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        rows.iter()
            .map(|row| {
                Ok(Job {
                    id: row.try_get_by_index(0)?,
                    tenant_id: row.try_get_by_index(1)?,
                    key: row.try_get_by_index(2)?,
                    kind: row.try_get_by_index(3)?,
                    campaign_id: row.try_get_by_index(4)?,
                    payload: row.try_get_by_index(5)?,
                    due_at: row.try_get_by_index(6)?,
                    fence: row.try_get_by_index(7)?,
                    attempts: row.try_get_by_index(8)?,
                })
            })
            .collect::<Result<Vec<_>, sea_orm::DbErr>>()
            .map_err(db_error)
    }

    /// Runs one claimed job; true when it completed (this claim still held it).
    pub async fn execute(&self, job: &Job) -> bool {
        let outcome = match self.executor.remote(job).await {
            Ok(remote) => self.complete(job, remote).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(completed) => completed,
            Err(e) => {
                tracing::warn!(job = %job.id, kind = %job.kind, error = %e, "job failed, will retry");
                if let Err(e) = self.fail(job, &e).await {
                    tracing::warn!(job = %job.id, error = %e, "could not record a job failure");
                }
                false
            }
        }
    }

    async fn complete(&self, job: &Job, remote: serde_json::Value) -> Result<bool, Error> {
        let txn = self.db.begin_write().await?;
        let now = self.clock.now();
        // The fence check: this claim still holds the job (locks its row until commit).
        let held = txn
            .execute_raw(stmt(
                &txn,
                "UPDATE jobs SET updated_at = $4 \
                 WHERE id = $1 AND fence = $2 AND lease_owner = $3 AND status = 'pending'",
                [
                    job.id.clone().into(),
                    job.fence.into(),
                    self.owner.clone().into(),
                    now.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        if held.rows_affected() == 0 {
            txn.rollback().await.map_err(db_error)?;
            tracing::info!(job = %job.id, fence = job.fence, "job taken over or moved; this run is dropped");
            return Ok(false);
        }
        let outcome = self.executor.local(&txn, job, remote, now).await?;
        let (status, due_at) = match outcome {
            Outcome::Done => ("done", job.due_at),
            Outcome::Again(next) => ("pending", next),
        };
        txn.execute_raw(stmt(
            &txn,
            "UPDATE jobs SET status = $2, due_at = $3, lease_owner = '', lease_until = 0, \
             attempts = 0, last_error = '', runs = runs + 1 WHERE id = $1",
            [job.id.clone().into(), status.into(), due_at.into()],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            &txn,
            "INSERT INTO job_runs (job_id, tenant_id, kind, owner, fence, due_at, ran_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                job.id.clone().into(),
                job.tenant_id.clone().into(),
                job.kind.clone().into(),
                self.owner.clone().into(),
                job.fence.into(),
                job.due_at.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.executor.committed(job);
        Ok(true)
    }

    /// Releases the claim with a later due time (exponential backoff), or marks the job
    /// failed after the last attempt.
    async fn fail(&self, job: &Job, err: &Error) -> Result<(), Error> {
        let now = self.clock.now();
        let backoff = Duration::from_secs(1 << job.attempts.clamp(0, 9) as u32);
        let conn = self.db.conn();
        conn.execute_raw(stmt(
            conn,
            "UPDATE jobs SET lease_owner = '', lease_until = 0, last_error = $3, due_at = $4, \
             status = CASE WHEN attempts >= $5 THEN 'failed' ELSE 'pending' END, updated_at = $6 \
             WHERE id = $1 AND fence = $2 AND status = 'pending'",
            [
                job.id.clone().into(),
                job.fence.into(),
                err.to_string().into(),
                (now + micros(backoff)).into(),
                self.config.max_attempts.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        Ok(())
    }
}
