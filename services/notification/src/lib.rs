//! The notification service: the event intake every service's outbox relay publishes to
//! (each event stored once, de-duplicated by tenant and event id, since relays deliver at
//! least once), and webhooks: endpoints per tenant with event-type filters and rotating
//! secrets, deliveries written with the events that cause them and sent at least once,
//! signed per the Standard Webhooks specification, with retries, a dead-letter list and
//! replay.

mod deliveries;
mod endpoints;
mod service;
pub mod signing;

use std::time::Duration;

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_proto::notification::v1::notification_service_server::NotificationServiceServer;
use tessera_runtime::Config;
use tessera_runtime::component::{self, Component};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tessera_store::migrate::{Migration, col, index, plumbing, table};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "notification";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.notification.v1.NotificationService";

/// Notification's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(Migration {
            name: "m0100_events",
            tables: || {
                vec![table(
                    "events",
                    vec![
                        col::serial("seq"),
                        col::text("tenant_id"),
                        col::text("event_id"),
                        col::text("event_type"),
                        col::text("source"),
                        col::big("occurred_at"),
                        col::big("received_at"),
                        col::blob("data"),
                        col::text("traceparent"),
                    ],
                    &[],
                )]
            },
            indexes: || {
                vec![
                    index(
                        "events_tenant_event",
                        "events",
                        &["tenant_id", "event_id"],
                        true,
                    ),
                    index(
                        "events_tenant_type",
                        "events",
                        &["tenant_id", "event_type", "seq"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0101_webhooks",
            tables: || {
                vec![
                    table(
                        "webhook_endpoints",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("url"),
                            col::text("description"),
                            col::text("event_types"),
                            col::int("enabled"),
                            col::text("disabled_reason"),
                            col::int("max_concurrency"),
                            col::big("created_at"),
                            col::big("updated_at"),
                            col::big("failing_since"),
                            col::text("secret"),
                            col::text("previous_secret"),
                            col::big("previous_until"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    // One per (endpoint, event); its id is the `webhook-id` header.
                    table(
                        "deliveries",
                        vec![
                            col::text("id"),
                            col::text("tenant_id"),
                            col::text("endpoint_id"),
                            col::text("event_id"),
                            col::text("event_type"),
                            col::text("status"),
                            col::int("attempts"),
                            col::big("next_attempt_at"),
                            col::text("lease_owner"),
                            col::big("lease_until"),
                            col::big("created_at"),
                        ],
                        &["id"],
                    ),
                    table(
                        "delivery_attempts",
                        vec![
                            col::text("delivery_id"),
                            col::int("number"),
                            col::big("at"),
                            col::int("status_code"),
                            col::big("latency_ms"),
                            col::text("response_excerpt"),
                        ],
                        &["delivery_id", "number"],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "deliveries_by_endpoint_event",
                        "deliveries",
                        &["endpoint_id", "event_id"],
                        true,
                    ),
                    index(
                        "deliveries_due",
                        "deliveries",
                        &["status", "next_attempt_at"],
                        false,
                    ),
                    index(
                        "deliveries_by_tenant",
                        "deliveries",
                        &["tenant_id", "endpoint_id", "status", "id"],
                        false,
                    ),
                ]
            },
        }));
        all
    }
}

/// Applies notification's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the notification service.
pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let dispatcher = deliveries::Dispatcher::new(db.clone(), config.webhooks.clone())?;
    let service = service::Notification {
        db: db.clone(),
        webhooks: config.webhooks.clone(),
        idempotency: Idempotency::new(
            db.clone(),
            Duration::from_secs(config.idempotency.in_flight_lease_secs),
        ),
        dispatch: dispatcher.waker(),
    };
    Ok(Component::new(SERVICE)
        .grpc(GRPC_NAME, move |routes| {
            routes.add_service(NotificationServiceServer::new(service));
        })
        .task(tokio::spawn(dispatcher.run(shutdown)))
        .probe(db.probe()))
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
