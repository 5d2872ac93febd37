//! The wallet's tables: accounts (one per owner and asset, with a balance kept in step with
//! the postings), transactions and their postings; plus the shared plumbing tables.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{Migration, col, index, plumbing, table};

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
        all
    }
}
