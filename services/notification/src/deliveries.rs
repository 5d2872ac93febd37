//! Webhook deliveries, at least once.
//!
//! When events arrive, one `deliveries` row per (event, matching enabled endpoint) is written
//! in the same transaction (unique per endpoint and event, so a redelivered event is not
//! delivered twice). The [`Dispatcher`] claims due rows under a lease (several replicas share
//! the work; a claimed row's lease is re-checked in the claiming statement), never more per
//! endpoint than its concurrency limit minus what this process already has in flight, and
//! sends each in its own task, so a slow endpoint only ever holds its own slots. Every
//! attempt is logged (status, latency, the start of the answer); a failure is retried on the
//! schedule (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, each ±20 % jitter), then
//! the delivery is dead (the dead-letter list) until replayed. Each attempt carries the same
//! `webhook-id` with a fresh timestamp and signature.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Value};
use serde_json::json;
use tessera_proto::notification::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::config::WebhooksConfig;
use tessera_runtime::sealing::Keyring;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Db, db_error, insert_rows, now_micros, stmt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalogue;
use crate::endpoints::{self, Stored};
use crate::signing;

/// Attempts in all: the first, then one per retry delay.
pub fn max_attempts(schedule: &[u64]) -> i32 {
    i32::try_from(schedule.len()).unwrap_or(i32::MAX)
}

/// An event as the fan-out sees it.
pub struct NewEvent<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
}

/// Writes the deliveries of newly received events to the tenant's matching endpoints.
pub async fn fan_out(
    txn: &DatabaseTransaction,
    tenant: &str,
    events: &[NewEvent<'_>],
    now: i64,
) -> Result<u64, Error> {
    let targets = endpoints::enabled(txn, tenant).await?;
    if targets.is_empty() {
        return Ok(0);
    }
    let mut rows: Vec<Vec<Value>> = Vec::new();
    for e in events {
        for t in targets
            .iter()
            .filter(|t| endpoints::wants(&t.endpoint.event_types, e.event_type))
        {
            rows.push(vec![
                format!("msg_{}", uuid::Uuid::now_v7().simple()).into(),
                tenant.into(),
                t.endpoint.id.clone().into(),
                e.id.into(),
                e.event_type.into(),
                "pending".into(),
                0i32.into(),
                now.into(),
                "".into(),
                0i64.into(),
                now.into(),
            ]);
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let mut written = 0;
    for chunk in rows.chunks(500) {
        written += insert_rows(
            txn,
            "INSERT INTO deliveries (id, tenant_id, endpoint_id, event_id, event_type, status, \
             attempts, next_attempt_at, lease_owner, lease_until, created_at)",
            "ON CONFLICT (endpoint_id, event_id) DO NOTHING",
            chunk.to_vec(),
        )
        .await?;
    }
    Ok(written)
}

fn status_name(s: pb::DeliveryStatus) -> &'static str {
    match s {
        pb::DeliveryStatus::Succeeded => "succeeded",
        pb::DeliveryStatus::Dead => "dead",
        _ => "pending",
    }
}

fn status_from(s: &str) -> pb::DeliveryStatus {
    match s {
        "succeeded" => pb::DeliveryStatus::Succeeded,
        "dead" => pb::DeliveryStatus::Dead,
        _ => pb::DeliveryStatus::Pending,
    }
}

const COLUMNS: &str =
    "id, endpoint_id, event_id, event_type, status, attempts, next_attempt_at, created_at";

fn decode(row: &sea_orm::QueryResult) -> Result<pb::Delivery, Error> {
    let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
    let status = status_from(&text(4)?);
    let mut d = pb::Delivery {
        id: text(0)?,
        endpoint_id: text(1)?,
        event_id: text(2)?,
        event_type: text(3)?,
        attempts: row.try_get_by_index(5).map_err(db_error)?,
        next_attempt_at: (status == pb::DeliveryStatus::Pending)
            .then(|| micros_to_timestamp(row.try_get_by_index(6).unwrap_or_default())),
        created_at: Some(micros_to_timestamp(
            row.try_get_by_index(7).map_err(db_error)?,
        )),
        ..Default::default()
    };
    d.set_status(status);
    Ok(d)
}

/// A page of deliveries, newest first (the cursor is a delivery id: ids grow with time).
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    endpoint: &str,
    status: pb::DeliveryStatus,
    before: &str,
    limit: u32,
) -> Result<(Vec<pb::Delivery>, bool), Error> {
    let mut values: Vec<Value> = vec![tenant.into(), i64::from(limit + 1).into()];
    let filter = crate::and_given(
        &mut values,
        &[
            ("endpoint_id =", endpoint),
            (
                "status =",
                if status == pb::DeliveryStatus::Unspecified {
                    ""
                } else {
                    status_name(status)
                },
            ),
            ("id <", before),
        ],
    );
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM deliveries WHERE tenant_id = $1{filter} \
                 ORDER BY id DESC LIMIT $2"
            ),
            values,
        ))
        .await
        .map_err(db_error)?;
    let mut out = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}

/// One delivery with its attempts.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::Delivery, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM deliveries WHERE tenant_id = $1 AND id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("delivery `{id}`")))?;
    let mut d = decode(&row)?;
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT number, at, status_code, latency_ms, response_excerpt \
             FROM delivery_attempts WHERE delivery_id = $1 ORDER BY number",
            [id.into()],
        ))
        .await
        .map_err(db_error)?;
    for r in rows {
        d.history.push(pb::DeliveryAttempt {
            number: r.try_get_by_index(0).map_err(db_error)?,
            at: Some(micros_to_timestamp(
                r.try_get_by_index(1).map_err(db_error)?,
            )),
            status_code: r.try_get_by_index(2).map_err(db_error)?,
            latency_ms: r.try_get_by_index(3).map_err(db_error)?,
            response_excerpt: r.try_get_by_index(4).map_err(db_error)?,
        });
    }
    Ok(d)
}

/// Queues deliveries again (not pending ones): the listed ids, or every dead delivery of an
/// endpoint. Returns how many.
pub async fn replay(
    txn: &DatabaseTransaction,
    tenant: &str,
    ids: &[String],
    endpoint: &str,
    now: i64,
) -> Result<u32, Error> {
    let mut replayed = 0u64;
    if !endpoint.is_empty() {
        replayed += txn
            .execute_raw(stmt(
                txn,
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $3, \
                 lease_until = 0 WHERE tenant_id = $1 AND endpoint_id = $2 AND status = 'dead'",
                [tenant.into(), endpoint.into(), now.into()],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
    }
    for id in ids {
        replayed += txn
            .execute_raw(stmt(
                txn,
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $3, \
                 lease_until = 0 WHERE tenant_id = $1 AND id = $2 AND status <> 'pending'",
                [tenant.into(), id.clone().into(), now.into()],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
    }
    Ok(u32::try_from(replayed).unwrap_or(u32::MAX))
}

/// A claimed delivery.
struct Claimed {
    id: String,
    tenant: String,
    endpoint: String,
    event: String,
    attempts: i32,
}

/// Claims and sends due deliveries.
#[derive(Clone)]
pub struct Dispatcher {
    db: Db,
    owner: String,
    http: reqwest::Client,
    config: WebhooksConfig,
    /// Deliveries this process has in flight, per endpoint.
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
    wake: Arc<Notify>,
    /// Opens the endpoints' sealed signing secrets.
    keyring: Keyring,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Dispatcher {
    pub fn new(db: Db, config: WebhooksConfig, keyring: Keyring) -> anyhow::Result<Self> {
        // Connections go only to addresses the SSRF guard checked in the same lookup (no
        // DNS-rebinding window between the check and the connection).
        let resolver =
            crate::resolver::Guarded::new(crate::resolver::system(), config.allowed_hosts.clone());
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(resolver))
            .timeout(Duration::from_secs(config.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self {
            db,
            owner: format!("notification-{}", uuid::Uuid::new_v4().simple()),
            http,
            config,
            in_flight: Arc::default(),
            wake: Arc::new(Notify::new()),
            keyring,
        })
    }

    /// Wakes the dispatcher (new deliveries were written).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Claims and sends until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let claimed = match self.claim().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook claim failed");
                    Vec::new()
                }
            };
            let idle = claimed.is_empty();
            for c in claimed {
                let this = self.clone();
                tokio::spawn(async move {
                    let endpoint = c.endpoint.clone();
                    if let Err(e) = this.send(&c).await {
                        tracing::warn!(delivery = %c.id, error = %e, "webhook attempt not recorded; the lease will bring it back");
                    }
                    this.release_slot(&endpoint);
                    this.wake.notify_one();
                });
            }
            if !idle {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    fn release_slot(&self, endpoint: &str) {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = in_flight.get_mut(endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(endpoint);
            }
        }
    }

    /// Claims due deliveries of enabled endpoints, at most each endpoint's free slots.
    async fn claim(&self) -> Result<Vec<Claimed>, Error> {
        let now = now_micros();
        // The answer's deadline plus time to record it: a process that dies mid-attempt has
        // its deliveries sent again (same webhook-id) once this passes.
        let lease_until = now + micros(Duration::from_secs(self.config.timeout_secs + 5));
        let busy: Vec<(String, u32)> = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        // Free slots per endpoint: its limit minus what is in flight here.
        let mut values: Vec<Value> = vec![
            self.owner.clone().into(),
            lease_until.into(),
            now.into(),
            i64::from(self.config.batch_size).into(),
        ];
        let mut busy_cases = String::new();
        for (endpoint, n) in &busy {
            values.push(endpoint.clone().into());
            busy_cases.push_str(&format!(" WHEN ${} THEN {n}", values.len()));
        }
        let in_flight = if busy_cases.is_empty() {
            "0".to_string()
        } else {
            format!("CASE d.endpoint_id{busy_cases} ELSE 0 END")
        };
        let sql = format!(
            "UPDATE deliveries SET lease_owner = $1, lease_until = $2 \
             WHERE status = 'pending' AND lease_until < $3 AND id IN (\
               SELECT id FROM (\
                 SELECT d.id, d.next_attempt_at, ROW_NUMBER() OVER (\
                   PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) AS rn, \
                   w.max_concurrency - {in_flight} AS free \
                 FROM deliveries d JOIN webhook_endpoints w \
                   ON w.tenant_id = d.tenant_id AND w.id = d.endpoint_id \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= $3 \
                   AND d.lease_until < $3 AND w.enabled = 1\
               ) ranked WHERE rn <= free ORDER BY next_attempt_at LIMIT $4) \
             RETURNING id, tenant_id, endpoint_id, event_id, attempts"
        );
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?;
        let claimed = rows
            .iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.try_get_by_index(0)?,
                    tenant: r.try_get_by_index(1)?,
                    endpoint: r.try_get_by_index(2)?,
                    event: r.try_get_by_index(3)?,
                    attempts: r.try_get_by_index(4)?,
                })
            })
            .collect::<Result<Vec<_>, sea_orm::DbErr>>()
            .map_err(db_error)?;
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in &claimed {
            *in_flight.entry(c.endpoint.clone()).or_default() += 1;
        }
        Ok(claimed)
    }

    /// One attempt: sign, send, log, and settle the delivery (succeeded, retry later, dead).
    async fn send(&self, c: &Claimed) -> Result<(), Error> {
        let conn = self.db.conn();
        let endpoint: Stored = endpoints::get(conn, &c.tenant, &c.endpoint).await?;
        let event = conn
            .query_one_raw(stmt(
                conn,
                "SELECT event_type, occurred_at, data FROM events \
                 WHERE tenant_id = $1 AND event_id = $2",
                [c.tenant.clone().into(), c.event.clone().into()],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::internal(format!("event {} is gone", c.event)))?;
        let event_type: String = event.try_get_by_index(0).map_err(db_error)?;
        let occurred_at: i64 = event.try_get_by_index(1).map_err(db_error)?;
        let data: Vec<u8> = event.try_get_by_index(2).map_err(db_error)?;
        let data: serde_json::Value = serde_json::from_slice(&data).map_err(Error::internal)?;
        let timestamp = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(occurred_at)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let body = serde_json::to_vec(&json!({
            "type": event_type,
            "version": catalogue::current_version(&event_type),
            "timestamp": timestamp,
            "event_id": c.event,
            "data": data,
        }))
        .map_err(Error::internal)?;
        let now = now_micros();
        let sent_at = now / 1_000_000;
        let secrets = endpoint.signing_secrets(&self.keyring, &c.tenant, now)?;
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let signature = signing::header(&secrets, &c.id, sent_at, &body);
        let started = Instant::now();
        let guard =
            endpoints::check_url(&endpoint.endpoint.url, &self.config.allowed_hosts, "url").await;
        let (status_code, excerpt) = match guard {
            Err(e) => (
                0,
                format!(
                    "refused: {}",
                    e.field_violations
                        .first()
                        .map_or(e.message.clone(), |v| v.description.clone())
                ),
            ),
            Ok(()) => match self
                .http
                .post(&endpoint.endpoint.url)
                .header("content-type", "application/json")
                .header("user-agent", "Tessera-Webhooks/1")
                .header("webhook-id", &c.id)
                .header("webhook-timestamp", sent_at.to_string())
                .header("webhook-signature", &signature)
                .body(body)
                .send()
                .await
            {
                Ok(response) => {
                    let status = i32::from(response.status().as_u16());
                    let text = response.text().await.unwrap_or_default();
                    (status, text.chars().take(500).collect())
                }
                Err(e) => (0, e.to_string().chars().take(500).collect()),
            },
        };
        let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let ok = (200..300).contains(&status_code);
        self.settle(c, ok, status_code, latency_ms, &excerpt).await
    }

    async fn settle(
        &self,
        c: &Claimed,
        ok: bool,
        status_code: i32,
        latency_ms: i64,
        excerpt: &str,
    ) -> Result<(), Error> {
        let now = now_micros();
        let number = c.attempts + 1;
        let schedule = &self.config.retry_schedule_secs;
        let (status, next) = if ok {
            ("succeeded", now)
        } else if number >= max_attempts(schedule) {
            ("dead", now)
        } else {
            let delay = schedule[usize::try_from(number).unwrap_or(0)] as f64;
            let jitter = rand::rng().random_range(0.8..1.2);
            ("pending", now + (delay * jitter * 1_000_000.0) as i64)
        };
        let txn = self.db.begin_write().await?;
        txn.execute_raw(stmt(
            &txn,
            // Numbered across replays: the log keeps every attempt ever made.
            "INSERT INTO delivery_attempts (delivery_id, number, at, status_code, latency_ms, \
             response_excerpt) SELECT $1, COALESCE(MAX(number), 0) + 1, $2, $3, $4, $5 \
             FROM delivery_attempts WHERE delivery_id = $1",
            [
                c.id.clone().into(),
                now.into(),
                status_code.into(),
                latency_ms.into(),
                excerpt.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            &txn,
            "UPDATE deliveries SET status = $3, attempts = $4, next_attempt_at = $5, \
             lease_until = 0 WHERE id = $1 AND lease_owner = $2",
            [
                c.id.clone().into(),
                self.owner.clone().into(),
                status.into(),
                number.into(),
                next.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        let disable_after = micros(Duration::from_secs(self.config.disable_after_failing_secs));
        if endpoints::record_health(&txn, &c.tenant, &c.endpoint, ok, now, disable_after).await? {
            tracing::warn!(endpoint = %c.endpoint, "webhook endpoint disabled after failing too long");
        }
        txn.commit().await.map_err(db_error)?;
        metrics::counter!("tessera_webhook_attempts_total", "outcome" => if ok { "delivered" } else { "failed" })
            .increment(1);
        Ok(())
    }
}
