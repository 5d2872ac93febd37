//! Webhook deliveries, at least once.
//!
//! When events arrive, one `deliveries` row per (event, matching enabled endpoint) is written
//! in the same transaction (unique per endpoint and event, so a redelivered event is not
//! delivered twice), with an item on the shared work queue (queue [`QUEUE`]) grouped by
//! endpoint. The queue's grouped worker claims due items (several replicas share the work),
//! never more per endpoint than its concurrency limit minus what this process already has in
//! flight, none for a disabled endpoint, and sends each in its own task, so a slow endpoint
//! only ever holds its own slots. The [`Dispatcher`] sends one; the attempt is logged
//! (status, latency, the start of the answer) and the delivery and its queue item are
//! settled in one transaction, under the claim's fence. A failure is retried on the schedule
//! (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, each ±20 % jitter), then the
//! delivery is dead (the dead-letter list) until replayed. Each attempt carries the same
//! `webhook-id` with a fresh timestamp and signature.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseTransaction, Value};
use serde_json::json;
use tessera_proto::notification::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::config::WebhooksConfig;
use tessera_runtime::sealing::Keyring;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::queue::{
    self, Failure, Groups, Handler, Item, NewItem, Queue, RetryPolicy, Settlement,
};
use tessera_store::{Db, db_error, insert_rows, now_micros, stmt};
use tracing::Instrument;

use crate::catalogue;
use crate::endpoints::{self, Stored};
use crate::signing;

/// The work queue that sends deliveries, grouped by endpoint.
pub const QUEUE: &str = "webhooks";

/// The endpoints whose deliveries may be sent now, each with its concurrency limit.
const ENDPOINTS: Groups = Groups {
    relation: "SELECT tenant_id, id AS grp, max_concurrency AS cap FROM webhook_endpoints \
               WHERE enabled = 1",
};

/// The queue item that sends a delivery.
fn work(tenant: &str, id: &str, endpoint: &str, event_type: &str, at: i64) -> NewItem {
    NewItem {
        queue: QUEUE,
        tenant: tenant.to_string(),
        key: id.to_string(),
        kind: event_type.to_string(),
        payload: id.as_bytes().to_vec(),
        not_before: Some(at),
        group: endpoint.to_string(),
    }
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
    let mut items = Vec::new();
    for e in events {
        for t in targets
            .iter()
            .filter(|t| endpoints::wants(&t.endpoint.event_types, e.event_type))
        {
            let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            items.push(work(tenant, &id, &t.endpoint.id, e.event_type, now));
            rows.push(vec![
                id.into(),
                tenant.into(),
                t.endpoint.id.clone().into(),
                e.id.into(),
                e.event_type.into(),
                "pending".into(),
                0i32.into(),
                now.into(),
                now.into(),
            ]);
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let written = insert_rows(
        txn,
        "INSERT INTO deliveries (id, tenant_id, endpoint_id, event_id, event_type, status, \
         attempts, next_attempt_at, created_at)",
        "ON CONFLICT (endpoint_id, event_id) DO NOTHING",
        rows,
    )
    .await?;
    // An item whose delivery was not written (the pair existed) finds nothing to send.
    queue::push(txn, items).await?;
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
/// endpoint, whose pending deliveries are also due at once instead of at their next retry
/// (the endpoint is back; the grouped claim keeps them within its concurrency limit).
/// Returns how many.
pub async fn replay(
    txn: &DatabaseTransaction,
    tenant: &str,
    ids: &[String],
    endpoint: &str,
    now: i64,
) -> Result<u32, Error> {
    let mut rows = Vec::new();
    let again = "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $3 \
                 WHERE tenant_id = $1";
    let returning = "RETURNING id, endpoint_id, event_type";
    if !endpoint.is_empty() {
        rows.extend(
            txn.query_all_raw(stmt(
                txn,
                &format!("{again} AND endpoint_id = $2 AND status = 'dead' {returning}"),
                [tenant.into(), endpoint.into(), now.into()],
            ))
            .await
            .map_err(db_error)?,
        );
    }
    for id in ids {
        rows.extend(
            txn.query_all_raw(stmt(
                txn,
                &format!("{again} AND id = $2 AND status <> 'pending' {returning}"),
                [tenant.into(), id.clone().into(), now.into()],
            ))
            .await
            .map_err(db_error)?,
        );
    }
    for row in &rows {
        let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        queue::put(txn, work(tenant, &text(0)?, &text(1)?, &text(2)?, now)).await?;
    }
    let mut brought_forward = 0;
    if !endpoint.is_empty() {
        // Waiting for a retry, not in flight (a claimed item holds a token).
        brought_forward = txn
            .execute_raw(stmt(
                txn,
                "UPDATE work_queue SET next_attempt_at = $4 WHERE queue = $1 \
                 AND tenant_id = $2 AND grp = $3 AND dead_at IS NULL \
                 AND lease_token IS NULL AND next_attempt_at > $4",
                [QUEUE.into(), tenant.into(), endpoint.into(), now.into()],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        txn.execute_raw(stmt(
            txn,
            "UPDATE deliveries SET next_attempt_at = $3 WHERE tenant_id = $1 \
             AND endpoint_id = $2 AND status = 'pending' AND next_attempt_at > $3",
            [tenant.into(), endpoint.into(), now.into()],
        ))
        .await
        .map_err(db_error)?;
    }
    let replayed = u64::try_from(rows.len()).unwrap_or(u64::MAX) + brought_forward;
    Ok(u32::try_from(replayed).unwrap_or(u32::MAX))
}

/// Puts pending deliveries written before deliveries ran on the shared queue onto it (at
/// start).
pub async fn adopt(db: &Db) -> Result<u64, Error> {
    queue::adopt_rows(
        db,
        "SELECT d.tenant_id, d.id, d.endpoint_id, d.event_type, d.next_attempt_at \
         FROM deliveries d WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM work_queue q \
         WHERE q.queue = $1 AND q.tenant_id = d.tenant_id AND q.dedupe_key = d.id)",
        vec![QUEUE.into()],
        |row| {
            let text = |i| row.try_get_by_index::<String>(i);
            Ok(work(
                &text(0)?,
                &text(1)?,
                &text(2)?,
                &text(3)?,
                row.try_get_by_index(4)?,
            ))
        },
    )
    .await
}

/// A delivery to attempt.
struct Claimed {
    id: String,
    tenant: String,
    endpoint: String,
    event: String,
}

/// Sends deliveries: the handler of queue [`QUEUE`].
pub struct Dispatcher {
    db: Db,
    http: reqwest::Client,
    config: WebhooksConfig,
    /// Opens the endpoints' sealed signing secrets.
    keyring: Keyring,
    /// The queue's retry schedule: a failed attempt is settled with its next time.
    policy: RetryPolicy,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Dispatcher {
    /// The grouped queue worker that sends deliveries, endpoint by endpoint within their
    /// limits.
    pub fn worker(
        db: Db,
        service: &'static str,
        config: WebhooksConfig,
        keyring: Keyring,
    ) -> anyhow::Result<queue::Worker> {
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
        let policy = RetryPolicy::scheduled(&config.retry_schedule_secs);
        let queue = Queue::new(db.clone(), service, QUEUE, policy.clone());
        let batch = config.batch_size.max(1);
        let worker_config = queue::WorkerConfig {
            batch,
            concurrency: batch as usize,
            // The answer's deadline plus time to record it: a process that dies
            // mid-attempt has its deliveries sent again (same webhook-id) once this passes.
            lease: Duration::from_secs(config.timeout_secs + 5),
            poll: Duration::from_millis(250),
        };
        let dispatcher = Self {
            db,
            http,
            config,
            keyring,
            policy,
        };
        Ok(queue::Worker::grouped(
            queue,
            Arc::new(dispatcher),
            worker_config,
            ENDPOINTS,
        ))
    }

    /// The delivery an item sends, if it is still to send (pending, or dead and replayed
    /// from the dead letters).
    async fn claimed(&self, item: &Item) -> Result<Option<Claimed>, Error> {
        let conn = self.db.conn();
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT id, endpoint_id, event_id FROM deliveries \
                 WHERE tenant_id = $1 AND id = $2 AND status IN ('pending', 'dead')",
                [item.tenant.clone().into(), item.key.clone().into()],
            ))
            .await
            .map_err(db_error)?;
        row.map(|r| {
            Ok(Claimed {
                id: r.try_get_by_index(0)?,
                tenant: item.tenant.clone(),
                endpoint: r.try_get_by_index(1)?,
                event: r.try_get_by_index(2)?,
            })
        })
        .transpose()
        .map_err(db_error)
    }

    /// One attempt: sign, send, log, and settle the delivery (succeeded, retry later, dead).
    async fn send(&self, item: &Item, c: &Claimed) -> Result<(), Error> {
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
            Ok(()) => {
                // The attempt's CLIENT span, in the trace of the request that made the event;
                // its context goes to the receiver as `traceparent`.
                let host = reqwest::Url::parse(&endpoint.endpoint.url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                let span = tracing::info_span!(
                    "webhook.deliver",
                    otel.name = "POST",
                    otel.kind = "client",
                    http.request.method = "POST",
                    server.address = %host,
                    http.response.status_code = tracing::field::Empty,
                    webhook.id = %c.id,
                );
                let mut trace = reqwest::header::HeaderMap::new();
                span.in_scope(|| tessera_runtime::telemetry::inject_headers(&mut trace));
                let sent = self
                    .http
                    .post(&endpoint.endpoint.url)
                    .headers(trace)
                    .header("content-type", "application/json")
                    .header("user-agent", "Tessera-Webhooks/1")
                    .header("webhook-id", &c.id)
                    .header("webhook-timestamp", sent_at.to_string())
                    .header("webhook-signature", &signature)
                    .body(body)
                    .send()
                    .instrument(span.clone())
                    .await;
                match sent {
                    Ok(response) => {
                        let status = i32::from(response.status().as_u16());
                        span.record("http.response.status_code", status);
                        let text = response.text().await.unwrap_or_default();
                        (status, text.chars().take(500).collect())
                    }
                    Err(e) => (0, e.to_string().chars().take(500).collect()),
                }
            }
        };
        let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let ok = (200..300).contains(&status_code);
        self.settle(item, c, ok, status_code, latency_ms, &excerpt)
            .await
    }

    /// Logs the attempt and settles the delivery and its queue item together.
    async fn settle(
        &self,
        item: &Item,
        c: &Claimed,
        ok: bool,
        status_code: i32,
        latency_ms: i64,
        excerpt: &str,
    ) -> Result<(), Error> {
        let now = now_micros();
        let number = item.attempts;
        let error = format!("HTTP {status_code}: {excerpt}");
        let (status, next, settlement) = if ok {
            ("succeeded", now, Settlement::Done)
        } else if number >= self.policy.max_attempts {
            ("dead", now, Settlement::Dead(&error))
        } else {
            let delay = self.policy.jittered(number);
            let at = now + micros(delay);
            ("pending", at, Settlement::RetryAt(at, &error))
        };
        let txn = self.db.begin_write().await?;
        if !queue::holds(&txn, item).await? {
            txn.rollback().await.map_err(db_error)?;
            tracing::info!(delivery = %c.id, "delivery taken over; this attempt is not recorded");
            return Ok(());
        }
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
            "UPDATE deliveries SET status = $3, attempts = $4, next_attempt_at = $5 \
             WHERE tenant_id = $1 AND id = $2",
            [
                c.tenant.clone().into(),
                c.id.clone().into(),
                status.into(),
                number.into(),
                next.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        queue::settle(&txn, item, settlement).await?;
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

#[async_trait::async_trait]
impl Handler for Dispatcher {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        let sent = match self.claimed(item).await {
            Ok(Some(c)) => self.send(item, &c).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        sent.map_err(|e| Failure::Retry(e.to_string()))
    }
}
