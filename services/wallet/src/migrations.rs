//! The wallet's tables: accounts (one per owner and asset, with a balance kept in step with
//! the postings), transactions and their postings, lots (what each credit added and what is
//! left of it, with its expiry) and which lots each debit consumed, programmes; holds,
//! restorations of consumed lots (refunds, releases), reversals, pending credits and their
//! status history; plus the shared plumbing tables.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{
    AddColumns, Migration, ReplaceIndex, Statements, col, index, plumbing, table,
};

/// The wallet's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(Migration {
            name: "m0100_ledger",
            tables: || {
                vec![
                    table(
                        "accounts",
                        vec![
                            col::text("id"),
                            col::text("tenant_id"),
                            col::text("owner_kind"),
                            col::text("owner_id"),
                            col::int("asset_kind"),
                            col::text("asset_code"),
                            col::big("balance"),
                            col::big("version"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "transactions",
                        vec![
                            col::text("id"),
                            col::text("tenant_id"),
                            col::text("kind"),
                            col::text("customer_id"),
                            col::int("asset_kind"),
                            col::text("asset_code"),
                            col::big("amount"),
                            col::text("reason"),
                            col::text("principal"),
                            col::big("created_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "postings",
                        vec![
                            col::serial("id"),
                            col::text("tenant_id"),
                            col::text("transaction_id"),
                            col::text("account_id"),
                            col::big("amount"),
                            col::big("created_at"),
                        ],
                        &[],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "accounts_owner_asset",
                        "accounts",
                        &[
                            "tenant_id",
                            "owner_kind",
                            "owner_id",
                            "asset_kind",
                            "asset_code",
                        ],
                        true,
                    ),
                    index(
                        "postings_transaction",
                        "postings",
                        &["tenant_id", "transaction_id"],
                        false,
                    ),
                    index(
                        "postings_account",
                        "postings",
                        &["tenant_id", "account_id"],
                        false,
                    ),
                    index(
                        "transactions_customer",
                        "transactions",
                        &["tenant_id", "customer_id", "created_at"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0101_lots_and_programs",
            tables: || {
                vec![
                    table(
                        "programs",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("time_zone"),
                            col::text("expiry"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "lots",
                        vec![
                            col::serial("id"),
                            col::text("tenant_id"),
                            col::text("account_id"),
                            col::text("transaction_id"),
                            col::big("amount"),
                            col::big("remaining"),
                            col::big("earned_at"),
                            col::big_null("expires_at"),
                        ],
                        &[],
                    ),
                    table(
                        "lot_consumptions",
                        vec![
                            col::text("tenant_id"),
                            col::text("transaction_id"),
                            col::big("lot_id"),
                            col::big("amount"),
                        ],
                        &["tenant_id", "transaction_id", "lot_id"],
                    ),
                ]
            },
            indexes: || {
                vec![
                    // Replaced by `lots_by_account` (m0105).
                    index(
                        "lots_account",
                        "lots",
                        &["tenant_id", "account_id", "remaining"],
                        false,
                    ),
                    index("lots_due", "lots", &["tenant_id", "expires_at"], false),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0102_holds_pending_reversals",
            tables: || {
                vec![
                    table(
                        "holds",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("customer_id"),
                            col::text("account_id"),
                            col::int("asset_kind"),
                            col::text("asset_code"),
                            col::big("amount"),
                            col::big("captured"),
                            col::text("status"),
                            col::big("expires_at"),
                            col::text_null("capture_transaction_id"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "lot_restorations",
                        vec![
                            col::text("tenant_id"),
                            col::text("transaction_id"),
                            col::text("source_transaction_id"),
                            col::big("lot_id"),
                            col::big("amount"),
                        ],
                        &["tenant_id", "transaction_id", "lot_id"],
                    ),
                    table(
                        "reversals",
                        vec![
                            col::text("tenant_id"),
                            col::text("transaction_id"),
                            col::text("original_id"),
                            col::big("amount"),
                        ],
                        &["tenant_id", "transaction_id"],
                    ),
                    table(
                        "pending_credits",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("customer_id"),
                            col::text("account_id"),
                            col::int("asset_kind"),
                            col::text("asset_code"),
                            col::big("amount"),
                            col::text("reason"),
                            col::big_null("expires_at"),
                            col::big_null("activate_at"),
                            col::text("status"),
                            col::text_null("credit_transaction_id"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "credit_status_history",
                        vec![
                            col::serial("id"),
                            col::text("tenant_id"),
                            col::text("credit_id"),
                            col::text("status"),
                            col::text("reason"),
                            col::text("principal"),
                            col::big("at"),
                        ],
                        &[],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "holds_account",
                        "holds",
                        &["tenant_id", "account_id", "status"],
                        false,
                    ),
                    index(
                        "holds_due",
                        "holds",
                        &["tenant_id", "status", "expires_at"],
                        false,
                    ),
                    index(
                        "holds_capture",
                        "holds",
                        &["tenant_id", "capture_transaction_id"],
                        false,
                    ),
                    index(
                        "lot_restorations_source",
                        "lot_restorations",
                        &["tenant_id", "source_transaction_id"],
                        false,
                    ),
                    index(
                        "reversals_original",
                        "reversals",
                        &["tenant_id", "original_id"],
                        false,
                    ),
                    index(
                        "pending_credits_customer",
                        "pending_credits",
                        &["tenant_id", "customer_id", "id"],
                        false,
                    ),
                    index(
                        "pending_credits_account",
                        "pending_credits",
                        &["tenant_id", "account_id", "status"],
                        false,
                    ),
                    index(
                        "pending_credits_due",
                        "pending_credits",
                        &["tenant_id", "status", "activate_at"],
                        false,
                    ),
                    index(
                        "credit_status_history_credit",
                        "credit_status_history",
                        &["tenant_id", "credit_id"],
                        false,
                    ),
                    index(
                        "lots_transaction",
                        "lots",
                        &["tenant_id", "transaction_id"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0103_tiers",
            tables: || {
                vec![
                    table(
                        "program_tiers",
                        vec![
                            col::text("tenant_id"),
                            col::text("program_id"),
                            col::text("policy"),
                        ],
                        &["tenant_id", "program_id"],
                    ),
                    table(
                        "tier_activity",
                        vec![
                            col::serial("id"),
                            col::text("tenant_id"),
                            col::text("program_id"),
                            col::text("customer_id"),
                            col::big("points"),
                            col::big("spent"),
                            col::big("at"),
                        ],
                        &[],
                    ),
                    table(
                        "member_tiers",
                        vec![
                            col::text("tenant_id"),
                            col::text("program_id"),
                            col::text("customer_id"),
                            col::text("tier_id"),
                            col::big("since"),
                            col::big_null("grace_until"),
                        ],
                        &["tenant_id", "program_id", "customer_id"],
                    ),
                    table(
                        "tier_history",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("program_id"),
                            col::text("customer_id"),
                            col::text("from_tier"),
                            col::text("to_tier"),
                            col::text("direction"),
                            col::big("qualifying"),
                            col::big("at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "tier_activity_member",
                        "tier_activity",
                        &["tenant_id", "program_id", "customer_id", "at"],
                        false,
                    ),
                    index(
                        "tier_history_member",
                        "tier_history",
                        &["tenant_id", "program_id", "customer_id", "id"],
                        false,
                    ),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0104_tenant_rules",
            tables: || {
                vec![table(
                    "tenant_rules",
                    vec![col::text("tenant_id"), col::int("forbid_gift_card_expiry")],
                    &["tenant_id"],
                )]
            },
            indexes: Vec::new,
        }));
        // Not on `remaining`: every spend updates it, and an indexed column makes each update
        // leave a dead index entry for the account's next spend to step over (no HOT updates).
        all.push(Box::new(ReplaceIndex {
            name: "m0105_lots_index_without_remaining",
            table: "lots",
            drop: "lots_account",
            create: || {
                index(
                    "lots_by_account",
                    "lots",
                    &["tenant_id", "account_id"],
                    false,
                )
            },
        }));
        // Lots whose coming expiry was announced (`points.expiring`), so it is announced once.
        all.push(Box::new(AddColumns {
            name: "m0106_lots_expiring_notice",
            columns: || vec![("lots", col::int("expiry_announced").default(0).to_owned())],
        }));
        // What active holds reserve and pending credits wait with, kept on the account row
        // beside its balance, so a balance is one row read (filled from the holds and credits
        // there are).
        all.push(Box::new(AddColumns {
            name: "m0107_account_held_pending",
            columns: || {
                vec![
                    ("accounts", col::big_zero("held")),
                    ("accounts", col::big_zero("pending")),
                ]
            },
        }));
        all.push(Box::new(Statements {
            name: "m0108_account_held_pending_fill",
            sql: &[
                "UPDATE accounts SET held = (SELECT COALESCE(SUM(h.amount), 0) FROM holds h \
                 WHERE h.tenant_id = accounts.tenant_id AND h.account_id = accounts.id \
                 AND h.status = 'active')",
                "UPDATE accounts SET pending = (SELECT COALESCE(SUM(p.amount), 0) \
                 FROM pending_credits p WHERE p.tenant_id = accounts.tenant_id \
                 AND p.account_id = accounts.id AND p.status = 'pending')",
            ],
        }));
        // The liability report's rolled-up days (`liability`) and the postings by time.
        all.push(Box::new(Migration {
            name: "m0109_liability_days",
            tables: || {
                vec![
                    table(
                        "liability_days",
                        vec![
                            col::text("tenant_id"),
                            col::big("day"),
                            col::int("asset_kind"),
                            col::text("asset_code"),
                            col::text("owner"),
                            col::big("amount"),
                        ],
                        &["tenant_id", "day", "asset_kind", "asset_code", "owner"],
                    ),
                    table(
                        "liability_rolled",
                        vec![col::text("tenant_id"), col::big("until_day")],
                        &["tenant_id"],
                    ),
                ]
            },
            indexes: || {
                vec![index(
                    "postings_by_time",
                    "postings",
                    &["tenant_id", "created_at"],
                    false,
                )]
            },
        }));
        all
    }
}
