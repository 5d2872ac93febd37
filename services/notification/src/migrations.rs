//! Notification's tables: received events, webhook endpoints, deliveries and their attempt
//! log, brands, templates, messages, subscriptions and the service's own secrets (plus the
//! shared plumbing tables).

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{DropColumns, Migration, col, index, plumbing, table};

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
