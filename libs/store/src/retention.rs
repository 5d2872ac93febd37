//! Retention: every table that grows with use says how long its rows stay ([`Rule`]), and
//! each service purges what is past its time from its own durable queue (queue
//! `retention`): one item per period (`retention.interval_minutes`), claimed by one replica,
//! worked in slices of bounded deletes (at most `retention.batch_rows` rows per statement,
//! the oldest first, one tenant at a time, so no statement holds many locks or runs long; paced, so requests writing beside it
//! wait for one batch at most), handed back between slices ([`Failure::Unfinished`]), and
//! the next period's item pushed when the purge is done.
//!
//! What is purged is what nobody needs any more: settled idempotency keys after their
//! replay window (at least a day), dead letters after they were left unreplayed, delivered
//! events and settled webhook deliveries with their attempts, finished messages, finished
//! jobs, old code-guess failures, and the audit log last (400 days by default). A setting of
//! 0 keeps that class forever; a tenant may have periods of its own
//! (`retention.tenants.<tenant>`), the others keep the global ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use tessera_runtime::Error;
use tessera_runtime::config::{Kept, RetentionConfig};

use crate::db::{Backend, Db, db_error, now_micros, stmt};
use crate::queue::{
    Failure, Handler, Item, NewItem, Queue, RetryPolicy, Worker, WorkerConfig, push,
};

/// How long one slice of a purge runs before it goes back to the queue.
const SLICE: Duration = Duration::from_secs(1);
/// The queue purges wait in.
const QUEUE: &str = "retention";

/// How long the rows of one table stay.
#[derive(Debug, Clone)]
pub struct Rule {
    pub table: &'static str,
    /// The column holding the time the row's age counts from (µs since the epoch).
    pub at: &'static str,
    /// What else a row must be to go (settled, finished…), as SQL; `""`: nothing else.
    pub when: &'static str,
    /// Whether the table has a `tenant_id` (deletes are then bound to one tenant at a time).
    pub tenanted: bool,
    /// Which retention period applies (`retention.*`, per tenant).
    pub kept: Kept,
}

impl Rule {
    /// A tenant-scoped table's rule.
    pub fn new(table: &'static str, at: &'static str, when: &'static str, kept: Kept) -> Self {
        Self {
            table,
            at,
            when,
            tenanted: true,
            kept,
        }
    }
}

/// The rules of the plumbing tables every service has: settled idempotency keys and dead
/// letters.
fn plumbing() -> Vec<Rule> {
    vec![
        Rule::new(
            "idempotency_keys",
            "created_at",
            "state = 'done'",
            Kept::IdempotencyKeys,
        ),
        Rule::new(
            "work_queue",
            "dead_at",
            "dead_at IS NOT NULL",
            Kept::DeadLetters,
        ),
    ]
}

/// Purges one service's tables: the handler of its `retention` queue.
pub struct Purger {
    db: Db,
    service: &'static str,
    rules: Vec<Rule>,
    config: RetentionConfig,
    interval: Duration,
    /// Per table and tenant, the age below which this period's purge has deleted every
    /// row it could: the next batch starts there instead of stepping again over the index
    /// entries of rows already gone. Cleared when a period's purge is done.
    cursors: Mutex<HashMap<(&'static str, Option<String>), i64>>,
}

impl Purger {
    /// A purger of the plumbing tables and the service's own `rules`.
    pub fn new(db: Db, service: &'static str, rules: Vec<Rule>, config: &RetentionConfig) -> Self {
        let mut all = plumbing();
        all.extend(rules);
        Self {
            db,
            service,
            rules: all,
            config: config.clone(),
            interval: Duration::from_secs(config.interval_minutes.max(1) * 60),
            cursors: Mutex::new(HashMap::new()),
        }
    }

    /// The worker that purges `db` (the plumbing and `rules`) every
    /// `config.interval_minutes`, and the
    /// first period's item pushed (a period's item is pushed once, whatever the replicas).
    pub async fn start(
        db: Db,
        service: &'static str,
        rules: Vec<Rule>,
        config: &RetentionConfig,
    ) -> Result<Worker, Error> {
        let purger = Self::new(db.clone(), service, rules, config);
        push(db.conn(), [purger.period_item(now_micros(), true)]).await?;
        let queue = Queue::new(db, service, QUEUE, RetryPolicy::default());
        let config = WorkerConfig {
            batch: 1,
            concurrency: 1,
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(5),
        };
        Ok(Worker::new(queue, Arc::new(purger), config))
    }

    /// The item of the period holding `at` (due now when `now`), else of the next one.
    fn period_item(&self, at: i64, now: bool) -> NewItem {
        let period = i64::try_from(self.interval.as_micros()).unwrap_or(i64::MAX);
        let slot = at / period + i64::from(!now);
        NewItem {
            queue: QUEUE,
            tenant: String::new(),
            key: format!("purge@{slot}"),
            kind: "retention.purge".into(),
            payload: Vec::new(),
            not_before: (!now).then_some(slot * period),
            group: String::new(),
        }
    }

    /// Deletes what is due, for up to [`SLICE`]; returns whether nothing is left.
    pub async fn purge(&self) -> Result<bool, Error> {
        let started = Instant::now();
        let now = now_micros();
        for rule in &self.rules {
            if self.config.tenants.is_empty() && self.config.keep(rule.kept, None).is_none() {
                continue; // kept forever by everyone
            }
            let tenants = if rule.tenanted {
                self.tenants(rule.table)
                    .await?
                    .into_iter()
                    .map(Some)
                    .collect()
            } else {
                vec![None]
            };
            for tenant in tenants {
                let Some(keep) = self.config.keep(rule.kept, tenant.as_deref()) else {
                    continue;
                };
                let cutoff = now - i64::try_from(keep.as_micros()).unwrap_or(i64::MAX / 2);
                let key = (rule.table, tenant.clone());
                loop {
                    if started.elapsed() >= SLICE {
                        return Ok(false);
                    }
                    let from = self.cursor(&key).unwrap_or(i64::MIN);
                    let batch = Instant::now();
                    let (deleted, reached) = self
                        .purge_batch(rule, tenant.as_deref(), from, cutoff)
                        .await?;
                    if deleted == 0 {
                        break;
                    }
                    self.set_cursor(key.clone(), reached);
                    metrics::counter!("tessera_retention_purged_total", "service" => self.service, "table" => rule.table)
                        .increment(deleted);
                    // Paced: busy `busy_percent` of the time at most, so the requests
                    // writing beside the purge (one writer at a time on SQLite) wait for one
                    // batch at most, and the database has room for them.
                    tokio::time::sleep(batch.elapsed().mul_f64(self.idle_per_busy())).await;
                    if deleted < self.batch_rows() {
                        break;
                    }
                }
            }
        }
        self.lock_cursors().clear();
        Ok(true)
    }

    fn batch_rows(&self) -> u64 {
        self.config.batch_rows.max(1)
    }

    /// How long a purge sleeps for each unit of time it worked.
    fn idle_per_busy(&self) -> f64 {
        let busy = self.config.busy_percent.clamp(1, 100) as f64;
        (100.0 - busy) / busy
    }

    fn lock_cursors(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(&'static str, Option<String>), i64>> {
        self.cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cursor(&self, key: &(&'static str, Option<String>)) -> Option<i64> {
        self.lock_cursors().get(key).copied()
    }

    fn set_cursor(&self, key: (&'static str, Option<String>), reached: i64) {
        self.lock_cursors().insert(key, reached);
    }

    /// The tenants with rows in `table`, read off its `(tenant_id, …)` index one tenant at a
    /// time (a loose index scan), so finding them costs one probe per tenant, not a scan.
    async fn tenants(&self, table: &str) -> Result<Vec<String>, Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                &format!(
                    "WITH RECURSIVE t(tenant) AS (SELECT MIN(tenant_id) FROM {table} \
                     UNION ALL SELECT (SELECT MIN(tenant_id) FROM {table} WHERE tenant_id > t.tenant) \
                     FROM t WHERE t.tenant IS NOT NULL) \
                     SELECT tenant FROM t WHERE tenant IS NOT NULL"
                ),
                [],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| r.try_get_by_index(0).map_err(db_error))
            .collect()
    }

    /// One bounded delete of `rule`'s rows aged from `from` up to `cutoff` (exclusive), the
    /// oldest first, of `tenant` when the table has tenants (over its `(tenant_id, age)`
    /// index); how many went, and the age of the youngest that went.
    async fn purge_batch(
        &self,
        rule: &Rule,
        tenant: Option<&str>,
        from: i64,
        cutoff: i64,
    ) -> Result<(u64, i64), Error> {
        let conn = self.db.conn();
        // The rows to delete by physical id: `ctid = ANY(ARRAY(…))` is a TID scan on
        // PostgreSQL (`ctid IN (…)` would scan the table for every batch).
        let (row_id, open, close) = match self.db.backend() {
            Backend::Postgres => ("ctid", "= ANY(ARRAY(", "))"),
            Backend::Sqlite => ("rowid", "IN (", ")"),
        };
        let when = if rule.when.is_empty() {
            String::new()
        } else {
            format!(" AND {}", rule.when)
        };
        let (table, at, limit) = (rule.table, rule.at, self.batch_rows());
        let mut values: Vec<sea_orm::Value> = vec![from.into(), cutoff.into()];
        let scope = match tenant {
            Some(tenant) => {
                values.push(tenant.into());
                "tenant_id = $3 AND "
            }
            None => "",
        };
        let sql = format!(
            "DELETE FROM {table} WHERE {row_id} {open}SELECT {row_id} FROM {table} \
             WHERE {scope}{at} >= $1 AND {at} < $2{when} ORDER BY {at} LIMIT {limit}{close} \
             RETURNING {at}"
        );
        let rows = conn
            .query_all_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?;
        let mut reached = from;
        for row in &rows {
            reached = reached.max(row.try_get_by_index::<i64>(0).map_err(db_error)?);
        }
        Ok((rows.len() as u64, reached))
    }
}

#[async_trait::async_trait]
impl Handler for Purger {
    async fn handle(&self, _item: &Item) -> Result<(), Failure> {
        match self.purge().await {
            Ok(false) => Err(Failure::Unfinished),
            Ok(true) => {
                // The next period's purge; one item per period, whichever replica pushes it.
                push(self.db.conn(), [self.period_item(now_micros(), false)])
                    .await
                    .map_err(|e| Failure::Retry(e.message))?;
                Ok(())
            }
            Err(e) => Err(Failure::Retry(e.message)),
        }
    }
}
