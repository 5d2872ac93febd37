//! The notification service: the event intake every service's outbox relay publishes to
//! (each event stored once, de-duplicated by tenant and event id, since relays deliver at
//! least once), and webhooks: endpoints per tenant with event-type filters and rotating
//! secrets, deliveries written with the events that cause them and sent at least once,
//! signed per the Standard Webhooks specification, with retries, a dead-letter list and
//! replay; messages to customers (e-mail, SMS, push) from templates per tenant, campaign
//! and locale, sent only with the consent their purpose needs; and the documented event
//! catalogue.

mod catalogue;
mod channels;
mod deliveries;
mod endpoints;
mod messages;
mod migrations;
mod resolver;
mod service;
pub mod signing;
mod templates;

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::notification::v1::notification_service_server::NotificationServiceServer;
use tessera_runtime::component::{self, Component};
use tessera_runtime::sealing::Keyring;
use tessera_runtime::{Config, grpc};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use migrations::Migrator;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "notification";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.notification.v1.NotificationService";

/// ` AND <column op> $n` for each filter with a value (its value appended to `values`);
/// filters without one are left out.
pub(crate) fn and_given(values: &mut Vec<sea_orm::Value>, filters: &[(&str, &str)]) -> String {
    let mut sql = String::new();
    for (column, value) in filters {
        if !value.is_empty() {
            values.push((*value).into());
            sql.push_str(&format!(" AND {column} ${}", values.len()));
        }
    }
    sql
}

/// Applies notification's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the notification service.
pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let keyring = Keyring::from_config(config)?;
    let dispatcher = deliveries::Dispatcher::worker(
        db.clone(),
        SERVICE,
        config.webhooks.clone(),
        keyring.clone(),
    )?;
    let adopted = deliveries::adopt(&db).await?;
    if adopted > 0 {
        tracing::info!(adopted, "pending webhook deliveries moved onto the queue");
    }
    let eligibility = EligibilityServiceClient::new(grpc::channel(
        &config.peers.eligibility_url,
        config.peer_timeout(),
    )?);
    let tokens = messages::Tokens::load(&db, &keyring).await?;
    let sender = messages::Sender::worker(
        db.clone(),
        SERVICE,
        config.channels.clone(),
        eligibility,
        tokens.clone(),
    )?;
    let adopted = messages::adopt_queued(&db).await?;
    if adopted > 0 {
        tracing::info!(adopted, "queued messages moved onto the queue");
    }
    let service = service::Notification {
        db: db.clone(),
        webhooks: config.webhooks.clone(),
        tokens,
        send: sender.waker(),
        idempotency: Idempotency::new(
            db.clone(),
            Duration::from_secs(config.idempotency.in_flight_lease_secs),
        )
        .sealing(keyring.clone()),
        dispatch: dispatcher.waker(),
        keyring: keyring.clone(),
    };
    let retention = tessera_store::retention::Purger::start(
        db.clone(),
        SERVICE,
        retention_rules(),
        &config.retention,
    )
    .await?;
    Ok(Component::new(SERVICE)
        .customer_data(customer_data(db.clone()))
        .dead_letters(Arc::new(tessera_store::queue::DeadLetters::new(
            db.clone(),
            SERVICE,
        )))
        .grpc(GRPC_NAME, move |routes| {
            routes.add_service(NotificationServiceServer::new(service));
        })
        .task(tokio::spawn(retention.run(shutdown.clone())))
        .task(tokio::spawn(reseal(db.clone(), keyring)))
        .task(tokio::spawn(dispatcher.run(shutdown.clone())))
        .task(tokio::spawn(sender.run(shutdown)))
        .probe(db.probe()))
}

/// What notification keeps, besides the plumbing tables: received events (while none of their
/// deliveries is pending), settled deliveries and their attempts, finished messages.
pub fn retention_rules() -> Vec<tessera_store::retention::Rule> {
    use tessera_runtime::config::Kept::{Events, Messages};
    vec![
        tessera_store::retention::Rule::new(
            "events",
            "received_at",
            "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.tenant_id = events.tenant_id \
             AND d.event_id = events.event_id AND d.status = 'pending')",
            Events,
        ),
        tessera_store::retention::Rule::new(
            "deliveries",
            "created_at",
            "status <> 'pending'",
            Events,
        ),
        tessera_store::retention::Rule {
            tenanted: false,
            ..tessera_store::retention::Rule::new("delivery_attempts", "at", "", Events)
        },
        tessera_store::retention::Rule::new(
            "messages",
            "finished_at",
            "status <> 'queued'",
            Messages,
        ),
    ]
}

/// Brings the stored webhook secrets under the current master key (once, at start: after
/// a master-key rotation, the first replica with the new key re-wraps them).
async fn reseal(db: Db, keyring: Keyring) {
    match endpoints::reseal(&db, &keyring).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            secrets = n,
            key = keyring.current_id(),
            "webhook secrets sealed under the current master key"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "webhook secrets not re-sealed; retried at the next start")
        }
    }
}

/// What notification keeps about a customer (GDPR): the message log and unsubscribes,
/// deleted on erasure.
fn customer_data(db: Db) -> Arc<dyn tessera_runtime::ops::CustomerData> {
    use tessera_store::privacy::{CustomerData, Erase::Delete, Personal};
    let events: tessera_store::privacy::Hook = Arc::new(|txn, tenant, customer, pseudonym| {
        Box::pin(pseudonymize_events(txn, tenant, customer, pseudonym))
    });
    Arc::new(CustomerData::new(
        db,
        vec![
            Personal::new(
                "messages",
                "customer_id",
                "id, channel, template, campaign_id, cause, status, reason, recipient, subject, \
                 created_at, finished_at",
                Delete,
            ),
            Personal::new(
                "subscriptions",
                "customer_id",
                "channel, subscribed, updated_at",
                Delete,
            ),
        ],
    )
    .with_hook(events))
}

/// Erasure: the received events that name the customer (`data.customer_id`) keep their
/// facts under the pseudonym, so the stored copy no longer names them and a delivery still
/// pending sends the pseudonym.
async fn pseudonymize_events(
    txn: &sea_orm::DatabaseTransaction,
    tenant: &str,
    customer: &str,
    pseudonym: &str,
) -> Result<u64, tessera_runtime::Error> {
    use sea_orm::ConnectionTrait;
    use tessera_store::{db_error, stmt};
    let naming = match txn.get_database_backend() {
        sea_orm::DbBackend::Postgres => "convert_from(data, 'UTF8')::jsonb ->> 'customer_id' = $2",
        _ => "json_extract(CAST(data AS TEXT), '$.customer_id') = $2",
    };
    let rows = txn
        .query_all_raw(stmt(
            txn,
            &format!("SELECT seq, data FROM events WHERE tenant_id = $1 AND {naming}"),
            [tenant.into(), customer.into()],
        ))
        .await
        .map_err(db_error)?;
    for row in &rows {
        let seq: i64 = row.try_get_by_index(0).map_err(db_error)?;
        let data: Vec<u8> = row.try_get_by_index(1).map_err(db_error)?;
        let mut event: serde_json::Value =
            serde_json::from_slice(&data).map_err(tessera_runtime::Error::internal)?;
        event["customer_id"] = pseudonym.into();
        let data = serde_json::to_vec(&event).map_err(tessera_runtime::Error::internal)?;
        txn.execute_raw(stmt(
            txn,
            "UPDATE events SET data = $3 WHERE tenant_id = $1 AND seq = $2",
            [tenant.into(), seq.into(), data.into()],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(rows.len() as u64)
}

/// Runs notification alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
