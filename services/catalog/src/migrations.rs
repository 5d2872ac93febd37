//! The catalog's tables: rewards (the definition kept as its protobuf encoding, so a new
//! effect kind needs no migration), code pools, codes (unique per tenant), generation jobs,
//! publications and where they were shown, gift-card loads waiting for the wallet; plus the
//! shared plumbing tables.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{AddColumns, Migration, col, index, plumbing, table};

/// The catalog's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(Migration {
            name: "m0100_catalog",
            tables: || {
                vec![
                    table(
                        "rewards",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::blob("definition"),
                            col::text("effect_kind"),
                            col::text("status"),
                            col::big("starts_at"),
                            col::big_null("ends_at"),
                            col::big("version"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "code_pools",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("reward_id"),
                            col::blob("definition"),
                            col::text("status"),
                            col::big("created_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "codes",
                        vec![
                            col::text("tenant_id"),
                            col::text("code"),
                            col::text("pool_id"),
                            col::text("reward_id"),
                            // Lifecycle: active, published or redeemed; `disabled` is the
                            // kill switch on top of it.
                            col::text("state"),
                            col::int("disabled"),
                            col::big("redemptions"),
                            col::big("max_uses"),
                            col::text_null("customer_id"),
                            col::big_null("starts_at"),
                            col::big_null("ends_at"),
                            col::text_null("job_id"),
                            col::big("created_at"),
                        ],
                        &["tenant_id", "code"],
                    ),
                    table(
                        "generation_jobs",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("pool_id"),
                            col::big("requested"),
                            col::big("generated"),
                            col::text("status"),
                            col::text("error"),
                            col::text_null("owner"),
                            col::big("lease_until"),
                            col::big("created_at"),
                            col::big_null("finished_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "publications",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("customer_id"),
                            col::text("reward_id"),
                            col::text_null("code"),
                            col::text("channel"),
                            col::big("created_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "publication_views",
                        vec![
                            col::text("tenant_id"),
                            col::text("publication_id"),
                            col::text("channel"),
                            col::big("shown_at"),
                        ],
                        &["tenant_id", "publication_id", "channel"],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "rewards_by_status",
                        "rewards",
                        &["tenant_id", "status", "id"],
                        false,
                    ),
                    index(
                        "pools_by_reward",
                        "code_pools",
                        &["tenant_id", "reward_id", "id"],
                        false,
                    ),
                    index(
                        "codes_by_pool",
                        "codes",
                        &["tenant_id", "pool_id", "code"],
                        false,
                    ),
                    index(
                        "codes_free",
                        "codes",
                        &["tenant_id", "pool_id", "state", "code"],
                        false,
                    ),
                    index("codes_by_job", "codes", &["tenant_id", "job_id"], false),
                    index(
                        "jobs_by_status",
                        "generation_jobs",
                        &["status", "lease_until"],
                        false,
                    ),
                    index(
                        "publications_by_customer",
                        "publications",
                        &["tenant_id", "customer_id", "id"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0101_wallet_commands",
            tables: || {
                vec![table(
                    "wallet_commands",
                    vec![
                        col::text("tenant_id"),
                        col::text("id"),
                        col::text("customer_id"),
                        col::text("card_code"),
                        col::big("amount"),
                        col::int("attempts"),
                        col::text("last_error"),
                        col::big("next_attempt_at"),
                        col::big("created_at"),
                    ],
                    &["tenant_id", "id"],
                )]
            },
            indexes: || {
                vec![index(
                    "wallet_commands_due",
                    "wallet_commands",
                    &["next_attempt_at"],
                    false,
                )]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0102_access_policies",
            tables: || {
                vec![table(
                    "access_policies",
                    vec![
                        col::text("tenant_id"),
                        col::blob("policy"),
                        col::big("updated_at"),
                    ],
                    &["tenant_id"],
                )]
            },
            indexes: Vec::new,
        }));
        // Codes and pools carry a revision: eligibility keeps the newest state it was sent
        // (`rev` 0: never sent, which a start sends; see `sync`). A code shows its last
        // redemption, as eligibility reports it.
        all.push(Box::new(AddColumns {
            name: "m0103_code_sync",
            columns: || {
                vec![
                    ("codes", col::big_zero("rev")),
                    ("codes", col::text_null("redeemed_by")),
                    ("codes", col::text_null("order_id")),
                    ("codes", col::big_null("redeemed_at")),
                    ("codes", col::text_null("redemption_id")),
                    ("code_pools", col::big_zero("rev")),
                ]
            },
        }));
        // What retention purges by age (`tessera_store::retention`).
        all.push(Box::new(Migration {
            name: "m0104_retention",
            tables: Vec::new,
            indexes: || {
                vec![index(
                    "generation_jobs_finished",
                    "generation_jobs",
                    &["tenant_id", "finished_at"],
                    false,
                )]
            },
        }));
        all
    }
}
