//! The transactional outbox. A service writes its events with [`enqueue`] inside the same
//! transaction as the change they describe, so an event exists exactly when the change does.
//! The [`Relay`] then delivers them to notification's intake RPC and deletes them.
//!
//! Delivery is at least once: a relay claims a batch under a lease (with
//! `FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas share the work), publishes it, and
//! deletes it. If the process dies in between, the lease runs out and the batch is
//! delivered again; notification de-duplicates by event id. Failed deliveries are retried
//! with exponential backoff. Each event carries the `traceparent` of the request that
//! caused it, and its delivery span is that request's child, so one trace covers the request
//! and the event's arrival.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sea_orm::{ConnectionTrait, Value};
use tessera_proto::notification::v1 as pb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_runtime::config::OutboxConfig;
use tessera_runtime::grpc::Channel;
use tessera_runtime::{Error, RequestContext, telemetry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{Backend, Db, db_error, insert_rows, now_micros, stmt};

/// An event stored in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_id: String,
    pub tenant_id: String,
    pub event_type: String,
    pub payload: Vec<u8>,
    pub traceparent: String,
    pub occurred_at: i64,
    /// Delivery attempts so far, this one included.
    pub attempts: i32,
}

/// Writes an event in the caller's transaction. Returns the event id.
pub async fn enqueue<C: ConnectionTrait>(
    txn: &C,
    tenant_id: &str,
    event_type: &str,
    data: &serde_json::Value,
) -> Result<String, Error> {
    let mut ids = enqueue_many(txn, tenant_id, [(event_type, data)]).await?;
    ids.pop().ok_or_else(|| Error::internal("no event id"))
}

/// Writes many events in the caller's transaction with multi-row inserts (group commits).
/// Returns their ids, in order.
pub async fn enqueue_many<'a, C: ConnectionTrait>(
    txn: &C,
    tenant_id: &str,
    events: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>,
) -> Result<Vec<String>, Error> {
    let now = now_micros();
    let traceparent = telemetry::current_traceparent();
    let mut ids = Vec::new();
    let mut rows = Vec::new();
    for (event_type, data) in events {
        let event_id = uuid::Uuid::now_v7().to_string();
        rows.push(vec![
            event_id.clone().into(),
            tenant_id.into(),
            event_type.into(),
            serde_json::to_vec(data).map_err(Error::internal)?.into(),
            traceparent.clone().into(),
            now.into(),
            0i32.into(),
            now.into(),
        ]);
        ids.push(event_id);
    }
    insert_rows(
        txn,
        "INSERT INTO outbox (event_id, tenant_id, event_type, payload, traceparent, \
         occurred_at, attempts, next_attempt_at)",
        "",
        rows,
    )
    .await?;
    Ok(ids)
}

/// Where the relay sends events.
#[async_trait::async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes events that all belong to one tenant and one originating request.
    async fn publish(&self, source: &str, events: &[OutboxEvent]) -> Result<(), Error>;
}

/// Publishes to the notification service's `PublishEvents` RPC.
#[derive(Debug, Clone)]
pub struct NotificationPublisher {
    client: NotificationServiceClient<Channel>,
}

impl NotificationPublisher {
    pub fn new(channel: Channel) -> Self {
        Self {
            client: NotificationServiceClient::new(channel),
        }
    }
}

#[async_trait::async_trait]
impl Publisher for NotificationPublisher {
    async fn publish(&self, source: &str, events: &[OutboxEvent]) -> Result<(), Error> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let ctx = RequestContext::system(first.tenant_id.clone(), source);
        let request = pb::PublishEventsRequest {
            events: events
                .iter()
                .map(|e| pb::Event {
                    id: e.event_id.clone(),
                    tenant_id: e.tenant_id.clone(),
                    r#type: e.event_type.clone(),
                    source: source.to_string(),
                    occurred_at: Some(micros_to_timestamp(e.occurred_at)),
                    data: e.payload.clone(),
                    traceparent: e.traceparent.clone(),
                })
                .collect(),
        };
        self.client
            .clone()
            .publish_events(ctx.request(request))
            .await
            .map(|_| ())
            .map_err(|s| Error::from_status(&s))
    }
}

/// Microseconds since the epoch → protobuf timestamp.
pub fn micros_to_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// Protobuf timestamp → microseconds since the epoch (the inverse of
/// [`micros_to_timestamp`]).
pub fn timestamp_to_micros(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds.saturating_mul(1_000_000) + i64::from(ts.nanos) / 1_000
}

/// Delivers a service's outbox.
#[derive(Clone)]
pub struct Relay {
    db: Db,
    source: &'static str,
    publisher: Arc<dyn Publisher>,
    config: OutboxConfig,
    wake: Arc<Notify>,
    owner: String,
}

/// How often the relay measures its backlog for the lag gauges.
const LAG_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a woken relay waits for more commits before it claims a batch.
const LINGER: Duration = Duration::from_millis(5);

/// Backoff after `attempts` failed deliveries: 1 s, 2 s, 4 s … capped at 5 minutes.
fn backoff(attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.clamp(1, 10) - 1).unwrap_or(0);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(300))
}

impl Relay {
    pub fn new(
        db: Db,
        source: &'static str,
        publisher: Arc<dyn Publisher>,
        config: OutboxConfig,
    ) -> Self {
        Self {
            db,
            source,
            publisher,
            config,
            wake: Arc::new(Notify::new()),
            owner: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Handle to wake the relay right after a commit, instead of waiting for the next poll.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Delivers until `shutdown`; the batch in hand is finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut last_report: Option<std::time::Instant> = None;
        loop {
            if last_report.is_none_or(|t| t.elapsed() >= LAG_REPORT_INTERVAL) {
                if let Err(err) = self.report_lag().await {
                    tracing::warn!(source = self.source, error = %err, "outbox lag not measured");
                }
                last_report = Some(std::time::Instant::now());
            }
            let delivered = match self.run_once().await {
                Ok(n) => n,
                Err(err) => {
                    tracing::warn!(source = self.source, error = %err, "outbox relay pass failed");
                    0
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if delivered < self.config.batch_size as usize {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    // Woken by a commit: linger a moment so the events of requests
                    // committing together leave in one delivery.
                    () = self.wake.notified() => tokio::time::sleep(LINGER).await,
                    () = tokio::time::sleep(poll) => {},
                }
            }
        }
        tracing::info!(source = self.source, "outbox relay stopped");
    }

    /// One pass: claim a batch, publish it, settle it. Returns how many were delivered.
    pub async fn run_once(&self) -> Result<usize, Error> {
        let batch = self.claim().await?;
        if batch.is_empty() {
            return Ok(0);
        }
        // One delivery per tenant: its span is a child of the first event's request and
        // links to the other requests it carries events of.
        let mut by_tenant: std::collections::BTreeMap<String, Vec<OutboxEvent>> =
            std::collections::BTreeMap::new();
        for event in batch {
            by_tenant
                .entry(event.tenant_id.clone())
                .or_default()
                .push(event);
        }
        let groups: Vec<Vec<OutboxEvent>> = by_tenant.into_values().collect();
        let results: Vec<(Vec<OutboxEvent>, Result<(), Error>)> = futures::stream::iter(groups)
            .map(|group| async move {
                let span = tracing::info_span!(
                    "outbox.publish",
                    otel.kind = "producer",
                    source = self.source,
                    tenant = %group[0].tenant_id,
                    events = group.len(),
                );
                telemetry::batch_parent(&span, group.iter().map(|e| e.traceparent.as_str()));
                let result = self
                    .publisher
                    .publish(self.source, &group)
                    .instrument(span)
                    .await;
                (group, result)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut delivered = Vec::new();
        for (group, result) in results {
            let outcome = if result.is_ok() {
                "delivered"
            } else {
                "failed"
            };
            metrics::counter!(
                "tessera_outbox_deliveries_total",
                "service" => self.source,
                "outcome" => outcome
            )
            .increment(group.len() as u64);
            match result {
                Ok(()) => delivered.extend(group.iter().map(|e| e.id)),
                Err(err) => {
                    tracing::warn!(source = self.source, error = %err, events = group.len(), "outbox delivery failed, will retry");
                    self.retry_later(&group, &err.to_string()).await?;
                }
            }
        }
        self.mark_delivered(&delivered).await?;
        Ok(delivered.len())
    }

    async fn claim(&self) -> Result<Vec<OutboxEvent>, Error> {
        let now = now_micros();
        let lease_until = now
            + i64::try_from(Duration::from_secs(self.config.lease_secs).as_micros())
                .unwrap_or(i64::MAX);
        let lock = match self.db.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE outbox SET lease_owner = $1, lease_until = $2, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM outbox WHERE delivered_at IS NULL \
             AND next_attempt_at <= $3 AND (lease_until IS NULL OR lease_until < $3) \
             ORDER BY id LIMIT $4{lock}) \
             RETURNING id, event_id, tenant_id, event_type, payload, traceparent, occurred_at, attempts"
        );
        let txn = self.db.begin_write().await?;
        let rows = txn
            .query_all_raw(stmt(
                &txn,
                &sql,
                [
                    self.owner.clone().into(),
                    lease_until.into(),
                    now.into(),
                    i64::from(self.config.batch_size).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        let mut events = rows
            .iter()
            .map(|row| {
                Ok(OutboxEvent {
                    id: row.try_get_by_index(0)?,
                    event_id: row.try_get_by_index(1)?,
                    tenant_id: row.try_get_by_index(2)?,
                    event_type: row.try_get_by_index(3)?,
                    payload: row.try_get_by_index(4)?,
                    traceparent: row.try_get_by_index(5)?,
                    occurred_at: row.try_get_by_index(6)?,
                    attempts: row.try_get_by_index(7)?,
                })
            })
            .collect::<Result<Vec<_>, sea_orm::DbErr>>()
            .map_err(db_error)?;
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    /// Delivered events leave the outbox (notification keeps them): the table holds only
    /// what is still to send, so claims stay cheap however many events went through.
    async fn mark_delivered(&self, ids: &[i64]) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let conn = self.db.conn();
        let sql = format!(
            "DELETE FROM outbox WHERE lease_owner = $1 AND id IN ({})",
            Db::placeholders(2, ids.len())
        );
        let mut values: Vec<Value> = vec![self.owner.clone().into()];
        values.extend(ids.iter().map(|id| Value::from(*id)));
        conn.execute_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn retry_later(&self, group: &[OutboxEvent], error: &str) -> Result<(), Error> {
        let conn = self.db.conn();
        let sql = format!(
            "UPDATE outbox SET lease_until = NULL, lease_owner = NULL, last_error = $1, \
             next_attempt_at = $2 WHERE lease_owner = $3 AND id IN ({})",
            Db::placeholders(4, group.len())
        );
        let attempts = group.iter().map(|e| e.attempts).max().unwrap_or(1);
        let delay = i64::try_from(backoff(attempts).as_micros()).unwrap_or(i64::MAX);
        let mut values: Vec<Value> = vec![
            error.chars().take(500).collect::<String>().into(),
            (now_micros() + delay).into(),
            self.owner.clone().into(),
        ];
        values.extend(group.iter().map(|e| Value::from(e.id)));
        conn.execute_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Records `tessera_outbox_pending{service}` (events not yet delivered) and
    /// `tessera_outbox_lag_seconds{service}` (age of the oldest of them).
    async fn report_lag(&self) -> Result<(), Error> {
        let conn = self.db.conn();
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT COUNT(*), MIN(occurred_at) FROM outbox WHERE delivered_at IS NULL",
                [],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::internal("aggregate returned no row"))?;
        let pending: i64 = row.try_get_by_index(0).map_err(db_error)?;
        let oldest: Option<i64> = row.try_get_by_index(1).map_err(db_error)?;
        let lag = oldest.map_or(0.0, |t| (now_micros() - t).max(0) as f64 / 1e6);
        metrics::gauge!("tessera_outbox_pending", "service" => self.source).set(pending as f64);
        metrics::gauge!("tessera_outbox_lag_seconds", "service" => self.source).set(lag);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }

    #[test]
    fn timestamps_convert_exactly() {
        let ts = micros_to_timestamp(1_700_000_000_123_456);
        assert_eq!(ts.seconds, 1_700_000_000);
        assert_eq!(ts.nanos, 123_456_000);
    }
}
