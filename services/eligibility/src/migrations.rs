//! The eligibility's tables: tenant settings, declared attributes, customer profiles (kept as
//! their protobuf encoding with a facts version), orders and custom events (the facts the
//! aggregates are computed from), event schemas, segments with their members and recompute
//! jobs, the campaign read model and the usage counters qualification checks; plus the
//! shared plumbing tables.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{AddColumns, Migration, col, index, plumbing, table};

/// The eligibility's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(Migration {
            name: "m0200_eligibility",
            tables: || {
                vec![
                    table(
                        "settings",
                        vec![
                            col::text("tenant_id"),
                            col::text("time_zone"),
                            col::text("currency"),
                        ],
                        &["tenant_id"],
                    ),
                    table(
                        "attributes",
                        vec![col::text("tenant_id"), col::text("name"), col::text("type")],
                        &["tenant_id", "name"],
                    ),
                    table(
                        "customers",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::blob("profile"),
                            col::big("facts_version"),
                            col::big("lifetime_spend"),
                            col::big("orders_total"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "orders",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("customer_id"),
                            col::text("status"),
                            col::blob("body"),
                            // What the order adds to the customer's spend: total minus
                            // returned, 0 when cancelled.
                            col::big("spend"),
                            col::int("counts"),
                            col::big("occurred_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "events",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("customer_id"),
                            col::text("type"),
                            col::blob("body"),
                            col::big("occurred_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "event_schemas",
                        vec![
                            col::text("tenant_id"),
                            col::text("type"),
                            col::blob("definition"),
                        ],
                        &["tenant_id", "type"],
                    ),
                    table(
                        "segments",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::blob("definition"),
                            col::text("kind"),
                            col::big("version"),
                            col::big("size"),
                            col::big_null("computed_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "segment_members",
                        vec![
                            col::text("tenant_id"),
                            col::text("segment_id"),
                            col::text("customer_id"),
                        ],
                        &["tenant_id", "segment_id", "customer_id"],
                    ),
                    table(
                        "segment_jobs",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("segment_id"),
                            col::big("segment_version"),
                            col::text("status"),
                            col::big("total"),
                            col::big("processed"),
                            col::big("members"),
                            col::text("error"),
                            col::big("created_at"),
                            col::big_null("finished_at"),
                            col::big("heartbeat"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "segment_feed",
                        vec![col::text("tenant_id"), col::big("version")],
                        &["tenant_id"],
                    ),
                    table(
                        "campaigns",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::blob("definition"),
                            col::big("version"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "campaign_feed",
                        vec![col::text("tenant_id"), col::big("version")],
                        &["tenant_id"],
                    ),
                    // Usage counters: written by redemption (inside its transaction), read
                    // by qualification.
                    table(
                        "campaign_usage",
                        vec![
                            col::text("tenant_id"),
                            col::text("campaign_id"),
                            col::big("redemptions"),
                            col::big("discount_total"),
                        ],
                        &["tenant_id", "campaign_id"],
                    ),
                    table(
                        "customer_usage",
                        vec![
                            col::text("tenant_id"),
                            col::text("customer_id"),
                            col::text("campaign_id"),
                            col::big("redemptions"),
                        ],
                        &["tenant_id", "customer_id", "campaign_id"],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "orders_by_customer",
                        "orders",
                        &["tenant_id", "customer_id", "occurred_at"],
                        false,
                    ),
                    index(
                        "events_by_customer",
                        "events",
                        &["tenant_id", "customer_id", "occurred_at"],
                        false,
                    ),
                    index(
                        "members_by_customer",
                        "segment_members",
                        &["tenant_id", "customer_id"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(AddColumns {
            name: "m0201_budgets",
            columns: || {
                vec![
                    ("campaign_usage", col::big_zero("order_value_total")),
                    ("settings", col::big_zero("max_incentives_per_order")),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0202_redemptions",
            tables: || {
                vec![
                    // A redemption (or reservation): its answer as protobuf, and what it
                    // counted (JSON), so a rollback or an expiry gives back exactly that.
                    table(
                        "redemptions",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("customer_id"),
                            col::text("order_id"),
                            col::text("status"),
                            col::big("created_at"),
                            col::big("expires_at"),
                            col::blob("record"),
                            col::text("counted"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    // One live redemption per order.
                    table(
                        "redemption_orders",
                        vec![
                            col::text("tenant_id"),
                            col::text("order_id"),
                            col::text("redemption_id"),
                        ],
                        &["tenant_id", "order_id"],
                    ),
                    table(
                        "code_usage",
                        vec![col::text("tenant_id"), col::text("code"), col::big("uses")],
                        &["tenant_id", "code"],
                    ),
                    table(
                        "customer_period_usage",
                        vec![
                            col::text("tenant_id"),
                            col::text("customer_id"),
                            col::text("campaign_id"),
                            col::big("period_start"),
                            col::big("redemptions"),
                        ],
                        &["tenant_id", "customer_id", "campaign_id", "period_start"],
                    ),
                    // What orders and events earned, waiting for (or settled by) the wallet.
                    table(
                        "earnings",
                        vec![
                            col::text("tenant_id"),
                            col::text("source_id"),
                            col::text("campaign_id"),
                            col::text("rule_id"),
                            col::text("customer_id"),
                            col::text("program_id"),
                            col::big("points"),
                            col::big("created_at"),
                            col::text("transaction_id"),
                            col::big("reversal_target"),
                            col::big("reversed"),
                            col::text("error"),
                        ],
                        &[
                            "tenant_id",
                            "source_id",
                            "campaign_id",
                            "rule_id",
                            "customer_id",
                        ],
                    ),
                    table(
                        "earning_caps",
                        vec![
                            col::text("tenant_id"),
                            col::text("customer_id"),
                            col::text("campaign_id"),
                            col::text("rule_id"),
                            col::big("period_start"),
                            col::big("points"),
                        ],
                        &[
                            "tenant_id",
                            "customer_id",
                            "campaign_id",
                            "rule_id",
                            "period_start",
                        ],
                    ),
                    // Failed code attempts: the brute-force limit counts them; the audit
                    // log reads them.
                    table(
                        "code_failures",
                        vec![
                            col::serial("id"),
                            col::text("tenant_id"),
                            col::text("subject"),
                            col::text("code"),
                            col::text("reason"),
                            col::big("at"),
                        ],
                        &[],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "redemptions_by_expiry",
                        "redemptions",
                        &["status", "expires_at"],
                        false,
                    ),
                    index(
                        "code_failures_by_subject",
                        "code_failures",
                        &["tenant_id", "subject", "at"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(AddColumns {
            name: "m0203_campaign_source_version",
            columns: || vec![("campaigns", col::big_zero("source_version"))],
        }));
        all.push(Box::new(Migration {
            name: "m0204_trigger_firings",
            tables: || {
                // A campaign's trigger fires once per customer; `issued` turns 1 when the
                // scheduler has issued the incentive (`error`: it refused).
                vec![table(
                    "trigger_firings",
                    vec![
                        col::text("tenant_id"),
                        col::text("campaign_id"),
                        col::text("customer_id"),
                        col::text("trigger_id"),
                        col::text("source_id"),
                        col::big("fired_at"),
                        col::int("issued"),
                        col::text("error"),
                    ],
                    &["tenant_id", "campaign_id", "customer_id"],
                )]
            },
            indexes: || {
                vec![index(
                    "trigger_firings_waiting",
                    "trigger_firings",
                    &["issued"],
                    false,
                )]
            },
        }));
        // Month and day (`MM-DD`) of a customer's birthday and of the day they joined (in the
        // tenant's zone), so a birthday campaign finds its customers by index.
        all.push(Box::new(AddColumns {
            name: "m0205_customer_occasions",
            columns: || {
                vec![
                    ("customers", col::text_empty("birthday_md")),
                    ("customers", col::text_empty("joined_md")),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0206_customer_occasion_indexes",
            tables: Vec::new,
            indexes: || {
                vec![
                    index(
                        "customers_by_birthday",
                        "customers",
                        &["tenant_id", "birthday_md", "id"],
                        false,
                    ),
                    index(
                        "customers_by_joining",
                        "customers",
                        &["tenant_id", "joined_md", "id"],
                        false,
                    ),
                ]
            },
        }));
        // Wallet value a redemption spends: one row per asset, with the wallet hold and
        // what is left to do with it (`due`: a capture, release or refund waits).
        all.push(Box::new(Migration {
            name: "m0207_redemption_spends",
            tables: || {
                vec![table(
                    "redemption_spends",
                    vec![
                        col::text("tenant_id"),
                        col::text("redemption_id"),
                        col::int("asset_kind"),
                        col::text("asset_code"),
                        col::text("customer_id"),
                        col::big("amount"),
                        col::text("hold_id"),
                        col::text("state"),
                        col::text("capture_tx"),
                        col::big("refund_target"),
                        col::big("refunded"),
                        col::int("due"),
                        col::text("error"),
                    ],
                    &["tenant_id", "redemption_id", "asset_kind", "asset_code"],
                )]
            },
            indexes: || {
                vec![index(
                    "redemption_spends_due",
                    "redemption_spends",
                    &["due"],
                    false,
                )]
            },
        }));
        // The counts of campaigns without a budget, spread over shards so concurrent
        // redemptions do not queue on one row; a campaign's usage is its `campaign_usage` row
        // plus its shards.
        all.push(Box::new(Migration {
            name: "m0208_campaign_usage_shards",
            tables: || {
                vec![table(
                    "campaign_usage_shards",
                    vec![
                        col::text("tenant_id"),
                        col::text("campaign_id"),
                        col::int("shard"),
                        col::big("redemptions"),
                        col::big("discount_total"),
                        col::big("order_value_total"),
                    ],
                    &["tenant_id", "campaign_id", "shard"],
                )]
            },
            indexes: Vec::new,
        }));
        // A budgeted campaign's remaining budgets are cut into slices, one per shard, so a
        // redemption takes from one shard's slice without locking the campaign's row; `budget`
        // names the campaign version and limits the slices were cut from
        // ("version:redemptions/discount/order value").
        all.push(Box::new(AddColumns {
            name: "m0209_budget_slices",
            columns: || {
                vec![
                    ("campaign_usage_shards", col::big_zero("left_redemptions")),
                    ("campaign_usage_shards", col::big_zero("left_discount")),
                    ("campaign_usage_shards", col::big_zero("left_order_value")),
                    ("campaign_usage_shards", col::text_empty("budget")),
                ]
            },
        }));
        // The catalog's codes and the kill switches of its pools and rewards, as the catalog
        // sends them (`pool_codes`): each row at the highest revision received.
        all.push(Box::new(Migration {
            name: "m0210_catalog_codes",
            tables: || {
                vec![
                    table(
                        "catalog_codes",
                        vec![
                            col::text("tenant_id"),
                            col::text("code"),
                            col::text("pool_id"),
                            col::text("reward_id"),
                            col::text("customer_id"),
                            col::big("max_uses"),
                            col::big_null("starts_at"),
                            col::big_null("ends_at"),
                            col::int("disabled"),
                            col::big("rev"),
                        ],
                        &["tenant_id", "code"],
                    ),
                    table(
                        "catalog_switches",
                        vec![
                            col::text("tenant_id"),
                            col::text("kind"),
                            col::text("id"),
                            col::int("disabled"),
                            col::big("rev"),
                        ],
                        &["tenant_id", "kind", "id"],
                    ),
                ]
            },
            indexes: Vec::new,
        }));
        // What retention purges by age (`tessera_store::retention`).
        all.push(Box::new(Migration {
            name: "m0211_retention",
            tables: Vec::new,
            indexes: || {
                vec![index(
                    "code_failures_age",
                    "code_failures",
                    &["tenant_id", "at"],
                    false,
                )]
            },
        }));
        all
    }
}
