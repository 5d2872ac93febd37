//! The scheduler's durable jobs with several workers on one database: every due job runs
//! once; a dead worker's jobs are taken over after its lease and still run once; a worker
//! that comes back after losing its lease writes nothing; jobs missed while everything was
//! down are caught up with one run. Workers run in this process (three "replicas") with a
//! clock the test moves; each job's effect is a row written in the job's transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_runtime::Error;
use tessera_scheduler::jobs::{
    self, Clock, Executor, Job, ManualClock, NewJob, Outcome, Worker, WorkerConfig,
};
use tessera_store::{Db, db_error, stmt};
use tessera_tests::{Backend, scalar, test_config};

const LEASE: Duration = Duration::from_secs(30);
const HOUR: i64 = 3_600_000_000;

/// Writes one `effects` row per run; a recurring job (`every:` key) comes back an hour later.
/// While `stall` is set, the remote part never returns (a worker hung or killed mid-run).
struct Effects {
    owner: &'static str,
    stall: AtomicBool,
    /// While set, the remote part fails.
    broken: AtomicBool,
}

impl Executor for Effects {
    fn remote<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, Result<serde_json::Value, Error>> {
        Box::pin(async move {
            if self.stall.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if self.broken.load(Ordering::SeqCst) {
                return Err(Error::unavailable("the peer is down"));
            }
            Ok(serde_json::Value::Null)
        })
    }

    fn local<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        job: &'a Job,
        _remote: serde_json::Value,
        now: i64,
    ) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(async move {
            txn.execute_raw(stmt(
                txn,
                "INSERT INTO effects (job_id, owner, ran_at) VALUES ($1, $2, $3)",
                [job.id.clone().into(), self.owner.into(), now.into()],
            ))
            .await
            .map_err(db_error)?;
            Ok(if job.key.starts_with("every:") {
                Outcome::Again(now + HOUR)
            } else {
                Outcome::Done
            })
        })
    }
}

struct Bench {
    db: Db,
    clock: Arc<ManualClock>,
    config: tessera_runtime::Config,
}

impl Bench {
    async fn open(backend: Backend) -> Option<Self> {
        let config = test_config(backend)?;
        let db = Db::open::<tessera_scheduler::Migrator>(&config, tessera_scheduler::SERVICE)
            .await
            .expect("scheduler database");
        db.conn()
            .execute_unprepared(
                "CREATE TABLE effects (job_id TEXT NOT NULL, owner TEXT NOT NULL, ran_at BIGINT NOT NULL)",
            )
            .await
            .expect("effects table");
        Some(Self {
            db,
            clock: Arc::new(ManualClock::new(1_800_000_000_000_000)),
            config,
        })
    }

    fn worker(&self, owner: &'static str, stall: bool) -> (Worker, Arc<Effects>) {
        let effects = Arc::new(Effects {
            owner,
            stall: AtomicBool::new(stall),
            broken: AtomicBool::new(false),
        });
        let worker = Worker::new(
            self.db.clone(),
            owner,
            self.clock.clone(),
            effects.clone(),
            WorkerConfig {
                lease: LEASE,
                batch: 25,
                concurrency: 4,
                poll: Duration::from_millis(20),
                max_attempts: 5,
            },
        );
        (worker, effects)
    }

    async fn schedule(&self, n: usize, prefix: &str) {
        let now = self.clock.now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
            let txn = self.db.begin_write().await.expect("txn");
            for i in chunk {
                jobs::schedule(
                    &txn,
                    &NewJob {
                        tenant_id: "default".into(),
                        key: format!("{prefix}{i}"),
                        kind: "test".into(),
                        campaign_id: String::new(),
                        payload: Vec::new(),
                        due_at: now - 1,
                    },
                    now,
                )
                .await
                .expect("schedule");
            }
            txn.commit().await.expect("commit");
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        scalar(&self.db, sql, vec![]).await
    }

    /// Every job ran exactly once: one effect per job, no job without one.
    async fn assert_once(&self, n: i64) {
        assert_eq!(
            self.count("SELECT COUNT(*) FROM effects").await,
            n,
            "effects"
        );
        assert_eq!(
            self.count("SELECT COUNT(*) FROM (SELECT DISTINCT job_id FROM effects) d")
                .await,
            n,
            "distinct jobs with an effect"
        );
        assert_eq!(
            self.count("SELECT COUNT(*) FROM jobs WHERE status <> 'done'")
                .await,
            0,
            "jobs not done"
        );
        assert_eq!(
            self.count("SELECT COUNT(*) FROM job_runs").await,
            n,
            "runs logged"
        );
        assert_eq!(
            self.count("SELECT COUNT(*) FROM work_queue WHERE queue = 'jobs'")
                .await,
            0,
            "queue items left"
        );
    }

    async fn cleanup(self) {
        if self.config.database.url.is_some() {
            let _ = self.db.drop_schema().await;
        }
        let _ = std::fs::remove_dir_all(&self.config.data_dir);
    }
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(bench) = super::Bench::open(tessera_tests::Backend::Embedded).await {
                        super::$name(bench).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(bench) = super::Bench::open(tessera_tests::Backend::Production).await {
                        super::$name(bench).await;
                    }
                }
            )*
        }
    };
}

on_both!(
    three_workers_run_each_of_1000_due_jobs_once,
    a_dead_workers_jobs_are_taken_over_after_the_lease_and_run_once,
    missed_runs_are_caught_up_once_and_moved_jobs_are_not_completed_by_a_late_worker,
    a_job_that_keeps_failing_is_dead_lettered_and_runs_once_replayed,
);

async fn three_workers_run_each_of_1000_due_jobs_once(bench: Bench) {
    bench.schedule(1000, "job-").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for owner in ["a", "b", "c"] {
        let (worker, _) = bench.worker(owner, false);
        tasks.push(tokio::spawn(worker.run(stop.clone())));
    }
    tessera_tests::eventually(Duration::from_secs(60), "every job done", || async {
        (bench
            .count("SELECT COUNT(*) FROM jobs WHERE status = 'done'")
            .await
            == 1000)
            .then_some(())
    })
    .await;
    stop.cancel();
    for t in tasks {
        t.await.expect("worker stops");
    }
    bench.assert_once(1000).await;
    if bench.config.database.url.is_some() {
        // SKIP LOCKED shares the work: every replica took some.
        let owners = bench
            .count("SELECT COUNT(DISTINCT owner) FROM effects")
            .await;
        assert_eq!(owners, 3, "all three workers ran jobs");
    }
    bench.cleanup().await;
}

async fn a_dead_workers_jobs_are_taken_over_after_the_lease_and_run_once(bench: Bench) {
    bench.schedule(300, "job-").await;
    // The doomed replica claims a batch and hangs in it; then it is killed.
    let (doomed, effects) = bench.worker("doomed", true);
    let doomed = Arc::new(doomed);
    let claimed = doomed.claim().await.expect("claim");
    assert_eq!(claimed.len(), 25);
    let hung = {
        let (doomed, claimed) = (doomed.clone(), claimed.clone());
        tokio::spawn(async move {
            for job in &claimed {
                doomed.execute(job).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    hung.abort();

    // The two survivors run everything else, but not the leased batch.
    let (b, _) = bench.worker("b", false);
    let (c, _) = bench.worker("c", false);
    let (ran_b, ran_c) = tokio::join!(b.run_due(), c.run_due());
    assert_eq!(ran_b.expect("b") + ran_c.expect("c"), 275);
    assert_eq!(
        bench
            .count("SELECT COUNT(*) FROM jobs WHERE status = 'pending'")
            .await,
        25
    );

    // After the lease, the survivors take the dead replica's jobs over.
    bench.clock.advance(LEASE + Duration::from_secs(1));
    let (ran_b, ran_c) = tokio::join!(b.run_due(), c.run_due());
    assert_eq!(ran_b.expect("b") + ran_c.expect("c"), 25);

    // The replica comes back (it was only hung) and finishes what it had claimed: its
    // token is stale, so nothing it does is written.
    effects.stall.store(false, Ordering::SeqCst);
    for job in &claimed {
        assert!(
            !doomed.execute(job).await,
            "a stale claim completes nothing"
        );
    }
    bench.assert_once(300).await;
    assert_eq!(
        bench
            .count("SELECT COUNT(*) FROM effects WHERE owner = 'doomed'")
            .await,
        0
    );
    bench.cleanup().await;
}

async fn missed_runs_are_caught_up_once_and_moved_jobs_are_not_completed_by_a_late_worker(
    bench: Bench,
) {
    let (worker, _) = bench.worker("a", false);
    // A recurring hourly job, then five hours with every replica down.
    bench.schedule(1, "every:").await;
    assert_eq!(worker.run_due().await.expect("run"), 1);
    bench.clock.advance(Duration::from_secs(5 * 3600));
    assert_eq!(
        worker.run_due().await.expect("catch up"),
        1,
        "one run for five missed"
    );
    assert_eq!(worker.run_due().await.expect("nothing due"), 0);
    let next = bench.count("SELECT due_at FROM jobs").await;
    assert_eq!(
        next,
        bench.clock.now() + HOUR,
        "next run an hour after the catch-up"
    );
    bench.clock.advance(Duration::from_secs(3600));
    assert_eq!(worker.run_due().await.expect("hourly"), 1);
    assert_eq!(bench.count("SELECT runs FROM jobs").await, 3);

    // A job claimed, then moved (its campaign's start changed) before the claim completed:
    // the claim no longer holds it; it runs once, at its new time.
    bench.schedule(1, "once-").await;
    let claimed = worker.claim().await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let now = bench.clock.now();
    jobs::schedule(
        bench.db.conn(),
        &NewJob {
            tenant_id: "default".into(),
            key: "once-0".into(),
            kind: "test".into(),
            campaign_id: String::new(),
            payload: Vec::new(),
            due_at: now + HOUR,
        },
        now,
    )
    .await
    .expect("move");
    assert!(
        !worker.execute(&claimed[0]).await,
        "the moved job is not completed"
    );
    assert_eq!(worker.run_due().await.expect("not due yet"), 0);
    bench.clock.advance(Duration::from_secs(3600));
    // The moved job, and the hourly one again.
    assert_eq!(worker.run_due().await.expect("due"), 2);
    assert_eq!(
        bench
            .count("SELECT COUNT(*) FROM effects e JOIN jobs j ON j.id = e.job_id WHERE j.job_key = 'once-0'")
            .await,
        1
    );
    assert_eq!(bench.count("SELECT COUNT(*) FROM effects").await, 5);
    bench.cleanup().await;
}

async fn a_job_that_keeps_failing_is_dead_lettered_and_runs_once_replayed(bench: Bench) {
    let (worker, effects) = bench.worker("a", false);
    effects.broken.store(true, Ordering::SeqCst);
    bench.schedule(1, "job-").await;
    // Five attempts (the test's limit), each after its backoff.
    for attempt in 1..=5 {
        assert_eq!(
            worker.run_due().await.expect("attempt"),
            1,
            "attempt {attempt}"
        );
        let (attempts, failed) = (
            bench
                .count("SELECT CAST(attempts AS BIGINT) FROM jobs")
                .await,
            bench
                .count("SELECT COUNT(*) FROM jobs WHERE status = 'failed'")
                .await,
        );
        assert_eq!(
            (attempts, failed),
            (i64::from(attempt), i64::from(attempt == 5))
        );
        bench.clock.advance(Duration::from_secs(600));
    }
    assert_eq!(
        worker.run_due().await.expect("dead"),
        0,
        "dead work is not claimed"
    );
    let dead = tessera_store::queue::DeadLetters::new(bench.db.clone(), "campaign-scheduler");
    let listed = dead
        .dead("default", "jobs", 0, 10)
        .await
        .expect("dead letters");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "job-0");
    assert!(
        listed[0].error.starts_with("unavailable"),
        "{}",
        listed[0].error
    );

    // The peer is back; an operator replays the job: it runs once and is done.
    effects.broken.store(false, Ordering::SeqCst);
    assert_eq!(
        dead.replay("default", "jobs", &[]).await.expect("replay"),
        1
    );
    assert_eq!(worker.run_due().await.expect("replayed"), 1);
    bench.assert_once(1).await;
    bench.cleanup().await;
}
