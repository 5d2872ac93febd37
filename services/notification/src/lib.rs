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
mod resolver;
mod service;
pub mod signing;
mod templates;

use std::sync::Arc;
use std::time::Duration;

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::notification::v1::notification_service_server::NotificationServiceServer;
use tessera_runtime::component::{self, Component};
use tessera_runtime::sealing::Keyring;
use tessera_runtime::{Config, grpc};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tessera_store::migrate::{DropColumns, Migration, col, index, plumbing, table};
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
        all.push(Box::new(Migration {
            name: "m0102_channels",
            tables: || {
                vec![
                    table(
                        "brands",
                        vec![
                            col::text("tenant_id"),
                            col::blob("brand"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id"],
                    ),
                    table(
                        "templates",
                        vec![
                            col::text("tenant_id"),
                            col::text("name"),
                            col::int("channel"),
                            col::text("campaign_id"),
                            col::text("locale"),
                            col::int("purpose"),
                            col::text("subject"),
                            col::text("body_text"),
                            col::text("body_html"),
                            col::big("version"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "name", "channel", "campaign_id", "locale"],
                    ),
                    // The delivery log: one row per message, kept with its outcome.
                    table(
                        "messages",
                        vec![
                            col::text("id"),
                            col::text("tenant_id"),
                            col::text("customer_id"),
                            col::int("channel"),
                            col::text("template"),
                            col::text("campaign_id"),
                            col::text("cause"),
                            col::blob("variables"),
                            col::text("dedupe_key"),
                            col::big("created_at"),
                            col::text("status").default("queued").to_owned(),
                            col::text_empty("reason"),
                            col::text_empty("detail"),
                            col::int("purpose").default(0).to_owned(),
                            col::text_empty("recipient"),
                            col::text_empty("subject"),
                            col::int("attempts").default(0).to_owned(),
                            col::big_zero("next_attempt_at"),
                            col::text_empty("lease_owner"),
                            col::big_zero("lease_until"),
                            col::big_zero("finished_at"),
                        ],
                        &["id"],
                    ),
                    table(
                        "subscriptions",
                        vec![
                            col::text("tenant_id"),
                            col::text("customer_id"),
                            col::int("channel"),
                            col::int("subscribed"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "customer_id", "channel"],
                    ),
                    table(
                        "notification_secrets",
                        vec![col::text("name"), col::blob("value")],
                        &["name"],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "messages_dedupe",
                        "messages",
                        &["tenant_id", "dedupe_key"],
                        true,
                    ),
                    index(
                        "messages_by_customer",
                        "messages",
                        &["tenant_id", "customer_id", "id"],
                        false,
                    ),
                    index(
                        "messages_by_cause",
                        "messages",
                        &["tenant_id", "cause", "id"],
                        false,
                    ),
                    index(
                        "messages_due",
                        "messages",
                        &["status", "next_attempt_at"],
                        false,
                    ),
                ]
            },
        }));
        // What retention purges by age (`tessera_store::retention`).
        all.push(Box::new(Migration {
            name: "m0103_retention",
            tables: Vec::new,
            indexes: || {
                vec![
                    index("events_age", "events", &["tenant_id", "received_at"], false),
                    index(
                        "deliveries_age",
                        "deliveries",
                        &["tenant_id", "created_at"],
                        false,
                    ),
                    index("delivery_attempts_age", "delivery_attempts", &["at"], false),
                    index(
                        "messages_finished",
                        "messages",
                        &["tenant_id", "finished_at"],
                        false,
                    ),
                ]
            },
        }));
        // Deliveries and messages run on the shared work queue, whose items carry the
        // lease: their own lease columns go.
        all.push(Box::new(DropColumns {
            name: "m0104_leases_on_queue",
            columns: &[
                ("deliveries", "lease_owner"),
                ("deliveries", "lease_until"),
                ("messages", "lease_owner"),
                ("messages", "lease_until"),
            ],
        }));
        all
    }
}

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
        retention_rules(&config.retention),
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
pub fn retention_rules(
    config: &tessera_runtime::config::RetentionConfig,
) -> Vec<tessera_store::retention::Rule> {
    let events = tessera_store::retention::days(config.events_days);
    vec![
        tessera_store::retention::Rule::new(
            "events",
            "received_at",
            "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.tenant_id = events.tenant_id \
             AND d.event_id = events.event_id AND d.status = 'pending')",
            events,
        ),
        tessera_store::retention::Rule::new(
            "deliveries",
            "created_at",
            "status <> 'pending'",
            events,
        ),
        tessera_store::retention::Rule {
            tenanted: false,
            ..tessera_store::retention::Rule::new("delivery_attempts", "at", "", events)
        },
        tessera_store::retention::Rule::new(
            "messages",
            "finished_at",
            "status <> 'queued'",
            tessera_store::retention::days(config.messages_days),
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
    ))
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
