//! The durable work queue every service shares, and the command outbox built on it.
//!
//! An item is written with [`push`] inside the caller's transaction, so it exists exactly
//! when the change that asked for it does. Workers ([`Worker`]) claim items in batches under
//! a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas claim different items; one
//! writer at a time on SQLite). A claim is fenced: it stamps the items with a token of its
//! own, and only that token can complete or retry them, so a worker whose lease ran out
//! cannot settle what another worker took over. A failed item comes back after a backoff
//! that grows per item, with jitter; after `max_attempts`, or at once for a failure that
//! retrying cannot fix, it is dead-lettered with its reason, stays visible
//! ([`Queue::dead`]) and can be replayed ([`Queue::replay`]).
//!
//! Items are de-duplicated by `(queue, tenant, key)` while they wait, so the same follow-up
//! asked twice runs once; work that is moved rather than asked again (a scheduled job whose
//! time changed) is [`put`] in place of the waiting item, or [`withdraw`]n. A handler whose
//! effects are local can [`settle`] its item in its own transaction, under the claim's
//! fence, so those effects commit exactly once. Time comes from a [`Clock`] (tests move it). Each carries the `traceparent` of the request that wrote it; the
//! worker's span is that request's child.
//!
//! [`commands`] is the command outbox: "tell service X to call Y with this request, key K",
//! delivered by a [`commands::Relay`] to any service's gRPC API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use sea_orm::{ConnectionTrait, QueryResult, Value};
use tessera_runtime::{Error, telemetry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{Clock, SystemClock};
use crate::db::{Backend, Db, db_error, insert_rows, now_micros, stmt};

pub mod commands;

/// An item to add to a queue.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// The queue (e.g. `commands`).
    pub queue: &'static str,
    pub tenant: String,
    /// De-duplication key: while an item with this key waits in the queue, another push of
    /// it is dropped.
    pub key: String,
    /// What the item is (for a command, the gRPC method's path).
    pub kind: String,
    pub payload: Vec<u8>,
    /// Not before this time (µs since the epoch); `None`: at once.
    pub not_before: Option<i64>,
    /// In a grouped queue ([`Groups`]), the group it belongs to (unique across tenants: an
    /// id); empty otherwise.
    pub group: String,
}

impl NewItem {
    /// The item that works on row `id` of `tenant` (its key and its payload), due now.
    pub fn for_row(queue: &'static str, kind: &str, tenant: &str, id: &str) -> Self {
        Self {
            queue,
            tenant: tenant.to_string(),
            key: id.to_string(),
            kind: kind.to_string(),
            payload: id.as_bytes().to_vec(),
            not_before: None,
            group: String::new(),
        }
    }
}

/// Puts on `queue` an item ([`NewItem::for_row`]) per `(tenant_id, id)` row that `sql`
/// selects: work recorded before the queue carried it, adopted at start. A row whose item
/// waits or is held is skipped. Returns how many were new.
pub async fn adopt(
    db: &Db,
    sql: &str,
    values: Vec<Value>,
    queue: &'static str,
    kind: &str,
) -> Result<u64, Error> {
    adopt_rows(db, sql, values, |row| {
        let tenant: String = row.try_get_by_index(0)?;
        let id: String = row.try_get_by_index(1)?;
        Ok(NewItem::for_row(queue, kind, &tenant, &id))
    })
    .await
}

/// Like [`adopt`], with the item of each selected row made by `item`.
pub async fn adopt_rows(
    db: &Db,
    sql: &str,
    values: Vec<Value>,
    item: impl Fn(&QueryResult) -> Result<NewItem, sea_orm::DbErr>,
) -> Result<u64, Error> {
    let conn = db.conn();
    let rows = conn
        .query_all_raw(stmt(conn, sql, values))
        .await
        .map_err(db_error)?;
    let items = rows
        .iter()
        .map(item)
        .collect::<Result<Vec<_>, sea_orm::DbErr>>()
        .map_err(db_error)?;
    if items.is_empty() {
        return Ok(0);
    }
    push(conn, items).await
}

/// A claimed item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: i64,
    pub tenant: String,
    pub key: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub traceparent: String,
    /// Claims so far, this one included.
    pub attempts: i32,
    pub created_at: i64,
    /// The fencing token of the claim that holds it.
    pub token: String,
    /// Its group, in a grouped queue.
    pub group: String,
    /// The service and queue that hold it (metric labels).
    pub service: &'static str,
    pub queue: &'static str,
}

/// A dead-lettered item, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadItem {
    pub id: i64,
    pub queue: String,
    pub key: String,
    pub kind: String,
    pub attempts: i32,
    pub error: String,
    pub created_at: i64,
    pub dead_at: i64,
}

/// Adds items in the caller's transaction (one multi-row insert). Returns how many were
/// new (a key already waiting is skipped).
pub async fn push<C: ConnectionTrait>(
    txn: &C,
    items: impl IntoIterator<Item = NewItem>,
) -> Result<u64, Error> {
    insert(
        txn,
        items,
        "ON CONFLICT (queue, tenant_id, dedupe_key) DO NOTHING",
    )
    .await
}

/// Adds an item, or replaces the one of its key (waiting, held or dead-lettered): kind,
/// payload and due time become the new ones and its attempts start again. A claim holding
/// the old one loses it (it can no longer settle it). For work that moves, such as a job
/// whose time changed.
pub async fn put<C: ConnectionTrait>(txn: &C, item: NewItem) -> Result<(), Error> {
    insert(
        txn,
        [item],
        "ON CONFLICT (queue, tenant_id, dedupe_key) DO UPDATE SET kind = excluded.kind, \
         payload = excluded.payload, traceparent = excluded.traceparent, attempts = 0, \
         next_attempt_at = excluded.next_attempt_at, grp = excluded.grp, lease_token = NULL, \
         dead_at = NULL, last_error = NULL",
    )
    .await
    .map(drop)
}

/// Removes the item of a key, whatever its state; a claim holding it loses it. Returns
/// whether there was one.
pub async fn withdraw<C: ConnectionTrait>(
    txn: &C,
    queue: &str,
    tenant: &str,
    key: &str,
) -> Result<bool, Error> {
    let gone = txn
        .execute_raw(stmt(
            txn,
            "DELETE FROM work_queue WHERE queue = $1 AND tenant_id = $2 AND dedupe_key = $3",
            [queue.into(), tenant.into(), key.into()],
        ))
        .await
        .map_err(db_error)?;
    Ok(gone.rows_affected() > 0)
}

/// In a handler's own transaction: whether its claim still holds `item`, locking the item
/// until that transaction ends (so nothing can take it over or move it meanwhile). When
/// false, the claim was overtaken (its lease ran out and another worker took the item, or
/// the item was moved or withdrawn): the handler must write nothing.
pub async fn holds<C: ConnectionTrait>(txn: &C, item: &Item) -> Result<bool, Error> {
    let held = txn
        .execute_raw(stmt(
            txn,
            "UPDATE work_queue SET lease_token = lease_token WHERE id = $1 AND lease_token = $2",
            [item.id.into(), item.token.clone().into()],
        ))
        .await
        .map_err(db_error)?;
    Ok(held.rows_affected() > 0)
}

/// How a handler settles its item in its own transaction ([`settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement<'a> {
    /// Done: the item leaves the queue.
    Done,
    /// Done for now; due again at this time (recurring work), its attempts reset.
    Again(i64),
    /// This attempt failed: due again at this time, with the reason.
    RetryAt(i64, &'a str),
    /// Failed for good: dead-lettered with the reason.
    Dead(&'a str),
}

/// In a handler's own transaction, after [`holds`]: settles `item` with the handler's
/// effects, so both commit together, exactly once. The worker then leaves the item alone.
/// Returns false when that transaction itself had already withdrawn or moved the item
/// ([`withdraw`], [`put`]: a job that cancelled or rescheduled its own key), which is left
/// as it made it.
pub async fn settle<C: ConnectionTrait>(
    txn: &C,
    item: &Item,
    settlement: Settlement<'_>,
) -> Result<bool, Error> {
    let mut values: Vec<Value> = vec![item.id.into(), item.token.clone().into()];
    let outcome = match settlement {
        Settlement::Done | Settlement::Again(_) => "done",
        Settlement::RetryAt(..) => "retry",
        Settlement::Dead(_) => "dead",
    };
    let sql = match settlement {
        Settlement::Done => "DELETE FROM work_queue WHERE id = $1 AND lease_token = $2",
        Settlement::Again(at) => {
            values.push(at.into());
            "UPDATE work_queue SET next_attempt_at = $3, attempts = 0, lease_token = NULL, \
             last_error = NULL WHERE id = $1 AND lease_token = $2"
        }
        Settlement::RetryAt(at, error) => {
            values.extend([at.into(), truncated(error).into()]);
            "UPDATE work_queue SET next_attempt_at = $3, last_error = $4, lease_token = NULL \
             WHERE id = $1 AND lease_token = $2"
        }
        Settlement::Dead(error) => {
            values.extend([now_micros().into(), truncated(error).into()]);
            "UPDATE work_queue SET dead_at = $3, last_error = $4, lease_token = NULL \
             WHERE id = $1 AND lease_token = $2"
        }
    };
    let settled = txn
        .execute_raw(stmt(txn, sql, values))
        .await
        .map_err(db_error)?
        .rows_affected();
    // Counted before the caller commits: a rolled-back settlement is counted too.
    metrics::counter!("tessera_queue_items_total", "service" => item.service, "queue" => item.queue, "outcome" => outcome)
        .increment(settled);
    Ok(settled > 0)
}

/// An error as kept with an item: its first [`MAX_ERROR`] characters.
fn truncated(error: &str) -> String {
    error.chars().take(MAX_ERROR).collect()
}

async fn insert<C: ConnectionTrait>(
    txn: &C,
    items: impl IntoIterator<Item = NewItem>,
    on_conflict: &str,
) -> Result<u64, Error> {
    let now = now_micros();
    let traceparent = telemetry::current_traceparent();
    let rows: Vec<Vec<Value>> = items
        .into_iter()
        .map(|i| {
            vec![
                i.queue.into(),
                i.tenant.into(),
                i.key.into(),
                i.kind.into(),
                i.payload.into(),
                traceparent.clone().into(),
                0i32.into(),
                i.not_before.unwrap_or(now).into(),
                now.into(),
                i.group.into(),
            ]
        })
        .collect();
    insert_rows(
        txn,
        "INSERT INTO work_queue (queue, tenant_id, dedupe_key, kind, payload, traceparent, \
         attempts, next_attempt_at, created_at, grp)",
        on_conflict,
        rows,
    )
    .await
}

/// How a failed item is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Claims before the item is dead-lettered.
    pub max_attempts: i32,
    /// Delay after the first failure; doubled after each further one.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// Instead of doubling, a fixed schedule: entry `n` is the delay before attempt `n + 1`
    /// (entry 0, the first attempt's, is unused); the item is dead after its last entry.
    pub schedule: Vec<Duration>,
}

impl Default for RetryPolicy {
    /// 1 s, 2 s, 4 s … up to 5 minutes, dead after 20 claims (about an hour).
    fn default() -> Self {
        Self {
            max_attempts: 20,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            schedule: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// A fixed schedule in seconds (a service's `retry_schedule_secs`): see `schedule`.
    pub fn scheduled(secs: &[u64]) -> Self {
        let schedule: Vec<Duration> = secs.iter().map(|s| Duration::from_secs(*s)).collect();
        Self {
            max_attempts: i32::try_from(schedule.len().max(1)).unwrap_or(i32::MAX),
            schedule,
            ..Self::default()
        }
    }

    /// The delay after `attempts` failed claims, before jitter.
    pub fn delay(&self, attempts: i32) -> Duration {
        if !self.schedule.is_empty() {
            let at = usize::try_from(attempts.max(1)).unwrap_or(usize::MAX);
            return self.schedule[at.min(self.schedule.len() - 1)];
        }
        let exp = u32::try_from(attempts.clamp(1, 31) - 1).unwrap_or(0);
        self.base
            .checked_mul(1u32 << exp.min(20))
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The delay with ±20 % jitter, so items that failed together do not come back together.
    pub fn jittered(&self, attempts: i32) -> Duration {
        self.delay(attempts)
            .mul_f64(rand::rng().random_range(0.8..=1.2))
    }
}

/// Why an item failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Try again after the backoff (dead-lettered after the last attempt).
    Retry(String),
    /// Retrying cannot help: dead-letter it now.
    Permanent(String),
    /// Not a failure: part of a long item was done and saved; the rest is claimed again at
    /// once (by any worker), and this claim does not count as an attempt. Long work is cut
    /// into slices so a lease never has to outlast it and other items get their turn.
    Unfinished,
}

/// One queue of a service's database.
#[derive(Clone)]
pub struct Queue {
    db: Db,
    service: &'static str,
    name: &'static str,
    policy: RetryPolicy,
    clock: Arc<dyn Clock>,
}

/// Most characters of an error kept with an item.
const MAX_ERROR: usize = 500;

impl Queue {
    pub fn new(db: Db, service: &'static str, name: &'static str, policy: RetryPolicy) -> Self {
        Self {
            db,
            service,
            name,
            policy,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same queue on another clock (tests of leases and backoff).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Claims up to `limit` due items for `lease`, oldest due first, and returns them with
    /// the claim's fencing token.
    pub async fn claim(&self, limit: u32, lease: Duration) -> Result<(String, Vec<Item>), Error> {
        let token = uuid::Uuid::new_v4().to_string();
        let now = self.clock.now();
        let until = now + i64::try_from(lease.as_micros()).unwrap_or(i64::MAX / 2);
        let lock = match self.db.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        // A claimed item is due again when its lease ends: a worker that dies leaves it to
        // the next claim, which takes it over with a new token.
        let sql = format!(
            "UPDATE work_queue SET lease_token = $1, next_attempt_at = $2, \
             attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM work_queue WHERE queue = $3 AND dead_at IS NULL \
             AND next_attempt_at <= $4 ORDER BY next_attempt_at, id LIMIT $5{lock}) \
             RETURNING {RETURNED}"
        );
        let values = vec![
            token.clone().into(),
            until.into(),
            self.name.into(),
            now.into(),
            i64::from(limit).into(),
        ];
        self.claimed(token, &sql, values).await
    }

    /// Claims like [`Queue::claim`], in a grouped queue: no more items of a group than its
    /// cap in `groups`, less `busy` (what this process has in flight per group), and none
    /// of a group absent from it.
    pub async fn claim_grouped(
        &self,
        limit: u32,
        lease: Duration,
        groups: &Groups,
        busy: &[(String, u32)],
    ) -> Result<(String, Vec<Item>), Error> {
        let token = uuid::Uuid::new_v4().to_string();
        let now = self.clock.now();
        let until = now + i64::try_from(lease.as_micros()).unwrap_or(i64::MAX / 2);
        let mut values: Vec<Value> = vec![
            token.clone().into(),
            until.into(),
            self.name.into(),
            now.into(),
            i64::from(limit).into(),
        ];
        let mut cases = String::new();
        for (group, n) in busy {
            values.push(group.clone().into());
            cases.push_str(&format!(" WHEN ${} THEN {n}", values.len()));
        }
        let in_flight = if cases.is_empty() {
            "0".to_string()
        } else {
            format!("CASE q.grp{cases} ELSE 0 END")
        };
        // Window functions rule out `FOR UPDATE`: the outer statement re-checks that each
        // item is still due, so of two claims racing for one item only the first takes it.
        let sql = format!(
            "UPDATE work_queue SET lease_token = $1, next_attempt_at = $2, \
             attempts = attempts + 1 \
             WHERE queue = $3 AND dead_at IS NULL AND next_attempt_at <= $4 AND id IN (\
               SELECT id FROM (\
                 SELECT q.id, q.next_attempt_at, ROW_NUMBER() OVER (\
                   PARTITION BY q.grp ORDER BY q.next_attempt_at, q.id) AS rn, \
                   g.cap - {in_flight} AS free \
                 FROM work_queue q JOIN ({relation}) g \
                   ON g.tenant_id = q.tenant_id AND g.grp = q.grp \
                 WHERE q.queue = $3 AND q.dead_at IS NULL AND q.next_attempt_at <= $4\
               ) ranked WHERE rn <= free ORDER BY next_attempt_at, id LIMIT $5) \
             RETURNING {RETURNED}",
            relation = groups.relation,
        );
        self.claimed(token, &sql, values).await
    }

    /// Runs a claiming statement; its items, by id.
    async fn claimed(
        &self,
        token: String,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<(String, Vec<Item>), Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(conn, sql, values))
            .await
            .map_err(db_error)?;
        let mut items = rows
            .iter()
            .map(|row| item_from_row(row, &token, self.service, self.name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)?;
        items.sort_by_key(|i| i.id);
        Ok((token, items))
    }

    /// Done: the items leave the queue (only while `token` still holds them).
    pub async fn complete(&self, token: &str, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let conn = self.db.conn();
        let sql = format!(
            "DELETE FROM work_queue WHERE lease_token = $1 AND id IN ({})",
            Db::placeholders(2, ids.len())
        );
        let values = std::iter::once(Value::from(token.to_string()))
            .chain(ids.iter().map(|id| Value::from(*id)));
        let done = conn
            .execute_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?
            .rows_affected();
        metrics::counter!("tessera_queue_items_total", "service" => self.service, "queue" => self.name, "outcome" => "done")
            .increment(done);
        Ok(done)
    }

    /// Failed: back after the item's backoff, or dead-lettered (last attempt, or a
    /// permanent failure). Only while `token` still holds it.
    pub async fn fail(&self, token: &str, item: &Item, failure: &Failure) -> Result<(), Error> {
        let (error, dead) = match failure {
            Failure::Retry(e) => (e, item.attempts >= self.policy.max_attempts),
            Failure::Permanent(e) => (e, true),
            Failure::Unfinished => return self.again(token, item).await,
        };
        let error = truncated(error);
        let now = self.clock.now();
        let conn = self.db.conn();
        let (sql, at) = if dead {
            (
                "UPDATE work_queue SET dead_at = $3, last_error = $4, lease_token = NULL \
                 WHERE id = $1 AND lease_token = $2",
                now,
            )
        } else {
            let delay = self.policy.jittered(item.attempts);
            (
                "UPDATE work_queue SET next_attempt_at = $3, last_error = $4, \
                 lease_token = NULL WHERE id = $1 AND lease_token = $2",
                now + i64::try_from(delay.as_micros()).unwrap_or(i64::MAX / 2),
            )
        };
        conn.execute_raw(stmt(
            conn,
            sql,
            [
                item.id.into(),
                token.into(),
                at.into(),
                error.clone().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        let outcome = if dead { "dead" } else { "retry" };
        metrics::counter!("tessera_queue_items_total", "service" => self.service, "queue" => self.name, "outcome" => outcome)
            .increment(1);
        if dead {
            tracing::warn!(service = self.service, queue = self.name, id = item.id, key = %item.key, kind = %item.kind, attempts = item.attempts, error = %error, "work item dead-lettered");
        } else {
            tracing::info!(service = self.service, queue = self.name, id = item.id, kind = %item.kind, attempts = item.attempts, error = %error, "work item will be retried");
        }
        Ok(())
    }

    /// An unfinished item: due again now, its attempt given back (only while `token` holds it).
    async fn again(&self, token: &str, item: &Item) -> Result<(), Error> {
        let conn = self.db.conn();
        conn.execute_raw(stmt(
            conn,
            "UPDATE work_queue SET next_attempt_at = $3, attempts = attempts - 1, \
             lease_token = NULL WHERE id = $1 AND lease_token = $2",
            [item.id.into(), token.into(), self.clock.now().into()],
        ))
        .await
        .map_err(db_error)?;
        metrics::counter!("tessera_queue_items_total", "service" => self.service, "queue" => self.name, "outcome" => "unfinished")
            .increment(1);
        Ok(())
    }

    /// Records the queue's gauges: `tessera_queue_depth` (items waiting),
    /// `tessera_queue_oldest_seconds` (how long the longest-waiting due item has been due:
    /// the queue's lag; an item scheduled for later, or backing off, is not late) and
    /// `tessera_queue_dead`.
    pub async fn report(&self) -> Result<(i64, f64, i64), Error> {
        let conn = self.db.conn();
        let now = self.clock.now();
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT COUNT(*) FILTER (WHERE dead_at IS NULL), \
                 MIN(next_attempt_at) FILTER (WHERE dead_at IS NULL AND next_attempt_at <= $2), \
                 COUNT(*) FILTER (WHERE dead_at IS NOT NULL) \
                 FROM work_queue WHERE queue = $1",
                [self.name.into(), now.into()],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::internal("aggregate returned no row"))?;
        let depth: i64 = row.try_get_by_index(0).map_err(db_error)?;
        let oldest: Option<i64> = row.try_get_by_index(1).map_err(db_error)?;
        let dead: i64 = row.try_get_by_index(2).map_err(db_error)?;
        let age = oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6);
        let labels = [("service", self.service), ("queue", self.name)];
        metrics::gauge!("tessera_queue_depth", &labels).set(depth as f64);
        metrics::gauge!("tessera_queue_oldest_seconds", &labels).set(age);
        metrics::gauge!("tessera_queue_dead", &labels).set(dead as f64);
        Ok((depth, age, dead))
    }
}

/// A service's dead letters, in every queue of its database.
#[derive(Clone)]
pub struct DeadLetters {
    db: Db,
    service: &'static str,
}

impl DeadLetters {
    pub fn new(db: Db, service: &'static str) -> Self {
        Self { db, service }
    }

    /// The tenant's dead-lettered items, oldest first, after id `after`.
    pub async fn dead(
        &self,
        tenant: &str,
        queue: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<DeadItem>, Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT id, queue, dedupe_key, kind, attempts, last_error, created_at, dead_at \
                 FROM work_queue WHERE queue = $1 AND tenant_id = $2 AND dead_at IS NOT NULL \
                 AND id > $3 ORDER BY id LIMIT $4",
                [
                    queue.into(),
                    tenant.into(),
                    after.into(),
                    i64::from(limit).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(DeadItem {
                    id: r.try_get_by_index(0)?,
                    queue: r.try_get_by_index(1)?,
                    key: r.try_get_by_index(2)?,
                    kind: r.try_get_by_index(3)?,
                    attempts: r.try_get_by_index(4)?,
                    error: r.try_get_by_index::<Option<String>>(5)?.unwrap_or_default(),
                    created_at: r.try_get_by_index(6)?,
                    dead_at: r.try_get_by_index(7)?,
                })
            })
            .collect::<Result<Vec<_>, sea_orm::DbErr>>()
            .map_err(db_error)
    }

    /// Puts the tenant's dead-lettered items (those of `ids`, or all when empty) back in
    /// the queue, due now, with their attempts reset. Returns how many.
    pub async fn replay(&self, tenant: &str, queue: &str, ids: &[i64]) -> Result<u64, Error> {
        let conn = self.db.conn();
        let mut sql = "UPDATE work_queue SET dead_at = NULL, attempts = 0, next_attempt_at = $3 \
                       WHERE queue = $1 AND tenant_id = $2 AND dead_at IS NOT NULL"
            .to_string();
        if !ids.is_empty() {
            sql.push_str(&format!(" AND id IN ({})", Db::placeholders(4, ids.len())));
        }
        let values = [queue.into(), tenant.into(), now_micros().into()]
            .into_iter()
            .chain(ids.iter().map(|id| Value::from(*id)));
        let n = conn
            .execute_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?
            .rows_affected();
        metrics::counter!("tessera_queue_items_total", "service" => self.service, "queue" => queue.to_string(), "outcome" => "replayed")
            .increment(n);
        Ok(n)
    }
}

impl tessera_runtime::ops::DeadLetters for DeadLetters {
    fn list<'a>(
        &'a self,
        tenant: &'a str,
        queue: &'a str,
        after: i64,
        limit: u32,
    ) -> futures::future::BoxFuture<'a, Result<Vec<tessera_proto::ops::v1::DeadItem>, Error>> {
        Box::pin(async move {
            Ok(self
                .dead(tenant, queue, after, limit)
                .await?
                .into_iter()
                .map(|d| tessera_proto::ops::v1::DeadItem {
                    id: d.id,
                    queue: d.queue,
                    key: d.key,
                    kind: d.kind,
                    attempts: d.attempts,
                    error: d.error,
                    created_at: Some(crate::outbox::micros_to_timestamp(d.created_at)),
                    dead_at: Some(crate::outbox::micros_to_timestamp(d.dead_at)),
                })
                .collect())
        })
    }

    fn replay<'a>(
        &'a self,
        tenant: &'a str,
        queue: &'a str,
        ids: &'a [i64],
    ) -> futures::future::BoxFuture<'a, Result<u64, Error>> {
        Box::pin(self.replay(tenant, queue, ids))
    }
}

fn item_from_row(
    row: &QueryResult,
    token: &str,
    service: &'static str,
    queue: &'static str,
) -> Result<Item, sea_orm::DbErr> {
    Ok(Item {
        id: row.try_get_by_index(0)?,
        tenant: row.try_get_by_index(1)?,
        key: row.try_get_by_index(2)?,
        kind: row.try_get_by_index(3)?,
        payload: row.try_get_by_index(4)?,
        traceparent: row.try_get_by_index(5)?,
        attempts: row.try_get_by_index(6)?,
        created_at: row.try_get_by_index(7)?,
        token: token.to_string(),
        group: row.try_get_by_index(8)?,
        service,
        queue,
    })
}

/// The columns a claim returns, in [`item_from_row`]'s order.
const RETURNED: &str =
    "id, tenant_id, dedupe_key, kind, payload, traceparent, attempts, created_at, grp";

/// What makes a queue grouped: items carry a group (a webhook endpoint, say) and a group's
/// cap lives in the service's own tables. `relation` is a query of the service's database
/// giving `(tenant_id, grp, cap)`: the groups whose items may run now, and how many of each
/// at once per process. An item whose group is absent waits (a paused group).
#[derive(Debug, Clone, Copy)]
pub struct Groups {
    pub relation: &'static str,
}

/// What a worker does with one item.
#[async_trait::async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, item: &Item) -> Result<(), Failure>;

    /// Handles one claim's items: by default each on its own, `concurrency` at a time, in
    /// a span that continues the trace of the request that pushed it. A handler that can
    /// do several items in one call (a group commit in the target) overrides it.
    async fn handle_all(
        &self,
        items: Vec<Item>,
        ctx: &BatchContext,
    ) -> Vec<(Item, Result<(), Failure>)> {
        futures::stream::iter(items)
            .map(|item| async move {
                let result = self.handle(&item).instrument(ctx.span_of(&item)).await;
                (item, result)
            })
            .buffer_unordered(ctx.concurrency.max(1))
            .collect()
            .await
    }
}

/// What [`Handler::handle_all`] knows of the claim it handles.
#[derive(Debug, Clone, Copy)]
pub struct BatchContext {
    pub service: &'static str,
    pub queue: &'static str,
    /// Items to handle at once.
    pub concurrency: usize,
}

impl BatchContext {
    /// The span of one item's handling: a consumer span, child of the request that pushed
    /// the item. Records the item's attempts too.
    pub fn span_of(&self, item: &Item) -> tracing::Span {
        let (service, queue) = (self.service, self.queue);
        metrics::histogram!("tessera_queue_attempts", "service" => service, "queue" => queue)
            .record(f64::from(item.attempts));
        let span = tracing::info_span!(
            "queue.handle",
            otel.kind = "consumer",
            service,
            queue,
            kind = %item.kind,
            tenant = %item.tenant,
            attempt = item.attempts,
        );
        telemetry::set_parent_from_traceparent(&span, &item.traceparent);
        span
    }
}

/// How a worker claims.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Items per claim.
    pub batch: u32,
    /// Items of one claim handled at once.
    pub concurrency: usize,
    /// How long a claim holds its items.
    pub lease: Duration,
    /// Poll interval when nothing wakes the worker.
    pub poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch: 200,
            concurrency: 16,
            lease: Duration::from_secs(60),
            poll: Duration::from_millis(500),
        }
    }
}

/// How often a worker records its queue's gauges.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a woken worker waits for more commits before it claims.
const LINGER: Duration = Duration::from_millis(2);

/// Runs a [`Handler`] over a [`Queue`]: claims a batch, handles its items concurrently,
/// completes the successes in one statement and retries or dead-letters the failures.
/// Clones share the queue, the handler and the wake-up.
#[derive(Clone)]
pub struct Worker {
    queue: Queue,
    handler: Arc<dyn Handler>,
    config: WorkerConfig,
    wake: Arc<Notify>,
    groups: Option<Groups>,
}

impl Worker {
    pub fn new(queue: Queue, handler: Arc<dyn Handler>, config: WorkerConfig) -> Self {
        Self {
            queue,
            handler,
            config,
            wake: Arc::new(Notify::new()),
            groups: None,
        }
    }

    /// A worker of a grouped queue. Each item is handled in its own task and settled as
    /// soon as it is done, and the worker claims again as slots free up: a slow group
    /// holds only its own slots (its cap), never a whole claim. `config.concurrency` caps
    /// the items in flight; `config.batch`, those of one claim.
    pub fn grouped(
        queue: Queue,
        handler: Arc<dyn Handler>,
        config: WorkerConfig,
        groups: Groups,
    ) -> Self {
        Self {
            groups: Some(groups),
            ..Self::new(queue, handler, config)
        }
    }

    /// Wakes the worker right after a commit that pushed items, instead of at its next poll.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Works until `shutdown`; the work in hand is finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(groups) = self.groups {
            return self.run_grouped(groups, shutdown).await;
        }
        let mut reported: Option<Instant> = None;
        loop {
            self.report(&mut reported).await;
            let (handled, unfinished) = match self.pass().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(queue = self.queue.name, error = %e, "queue pass failed");
                    (0, false)
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if handled < self.config.batch as usize && !unfinished {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.wake.notified() => tokio::time::sleep(LINGER).await,
                    () = tokio::time::sleep(self.config.poll) => {},
                }
            }
        }
        tracing::info!(
            service = self.queue.service,
            queue = self.queue.name,
            "queue worker stopped"
        );
    }

    /// Records the queue's gauges when they are due.
    async fn report(&self, reported: &mut Option<Instant>) {
        if reported.is_none_or(|t| t.elapsed() >= REPORT_INTERVAL) {
            if let Err(e) = self.queue.report().await {
                tracing::warn!(queue = self.queue.name, error = %e, "queue gauges not measured");
            }
            *reported = Some(Instant::now());
        }
    }

    /// The loop of a grouped queue ([`Worker::grouped`]).
    async fn run_grouped(self, groups: Groups, shutdown: CancellationToken) {
        let busy: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        let mut reported: Option<Instant> = None;
        let ctx = self.context();
        loop {
            self.report(&mut reported).await;
            while tasks.try_join_next().is_some() {}
            let asked = self
                .config
                .concurrency
                .saturating_sub(tasks.len())
                .min(self.config.batch as usize);
            let mut claimed = 0;
            if asked > 0 {
                let snapshot: Vec<(String, u32)> = lock(&busy)
                    .iter()
                    .map(|(group, n)| (group.clone(), *n))
                    .collect();
                let limit = u32::try_from(asked).unwrap_or(u32::MAX);
                match self
                    .queue
                    .claim_grouped(limit, self.config.lease, &groups, &snapshot)
                    .await
                {
                    Ok((token, items)) => {
                        claimed = items.len();
                        for item in items {
                            *lock(&busy).entry(item.group.clone()).or_default() += 1;
                            let (queue, handler, busy) =
                                (self.queue.clone(), self.handler.clone(), busy.clone());
                            let token = token.clone();
                            tasks.spawn(async move {
                                let result = handler.handle(&item).instrument(ctx.span_of(&item)).await;
                                let settled = match &result {
                                    Ok(()) => queue.complete(&token, &[item.id]).await.map(drop),
                                    Err(failure) => queue.fail(&token, &item, failure).await,
                                };
                                if let Err(e) = settled {
                                    tracing::warn!(queue = queue.name, id = item.id, error = %e, "work item not settled; its lease brings it back");
                                }
                                let mut busy = lock(&busy);
                                if let Some(n) = busy.get_mut(&item.group) {
                                    *n = n.saturating_sub(1);
                                    if *n == 0 {
                                        busy.remove(&item.group);
                                    }
                                }
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(queue = self.queue.name, error = %e, "queue claim failed")
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if claimed < asked || asked == 0 {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.wake.notified() => tokio::time::sleep(LINGER).await,
                    () = tokio::time::sleep(self.config.poll) => {},
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {},
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        tracing::info!(
            service = self.queue.service,
            queue = self.queue.name,
            "queue worker stopped"
        );
    }

    fn context(&self) -> BatchContext {
        BatchContext {
            service: self.queue.service,
            queue: self.queue.name,
            concurrency: self.config.concurrency,
        }
    }

    /// One claim, handled and settled. Returns how many items it held.
    pub async fn run_once(&self) -> Result<usize, Error> {
        self.pass().await.map(|(count, _)| count)
    }

    /// One claim, handled and settled: how many items it held, and whether some of them
    /// are unfinished (so the next claim should not wait).
    async fn pass(&self) -> Result<(usize, bool), Error> {
        let (batch, lease) = (self.config.batch, self.config.lease);
        let (token, items) = match &self.groups {
            Some(groups) => self.queue.claim_grouped(batch, lease, groups, &[]).await?,
            None => self.queue.claim(batch, lease).await?,
        };
        if items.is_empty() {
            return Ok((0, false));
        }
        let count = items.len();
        let results = self.handler.handle_all(items, &self.context()).await;
        let mut done = Vec::with_capacity(results.len());
        let mut unfinished = false;
        for (item, result) in &results {
            match result {
                Ok(()) => done.push(item.id),
                Err(failure) => {
                    unfinished |= *failure == Failure::Unfinished;
                    self.queue.fail(&token, item, failure).await?;
                }
            }
        }
        self.queue.complete(&token, &done).await?;
        Ok((count, unfinished))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_secs(1));
        assert_eq!(p.delay(4), Duration::from_secs(8));
        assert_eq!(p.delay(30), Duration::from_secs(300));
        assert_eq!(p.delay(i32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn a_schedule_gives_each_retry_its_delay() {
        let p = RetryPolicy::scheduled(&[0, 5, 300]);
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.delay(1), Duration::from_secs(5));
        assert_eq!(p.delay(2), Duration::from_secs(300));
        assert_eq!(p.delay(9), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let p = RetryPolicy::default();
        for attempts in 1..12 {
            let d = p.delay(attempts).as_secs_f64();
            for _ in 0..50 {
                let j = p.jittered(attempts).as_secs_f64();
                assert!(j >= d * 0.8 - 1e-9 && j <= d * 1.2 + 1e-9, "{j} vs {d}");
            }
        }
    }
}
