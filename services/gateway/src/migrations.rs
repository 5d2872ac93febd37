//! The gateway's tables: API keys, the audit log and erasure jobs (plus the shared
//! plumbing tables).

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{AddColumns, Migration, col, index, plumbing, table};

/// The gateway's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(api_keys()));
        all.push(Box::new(audit_log()));
        all.push(Box::new(audit_before()));
        all.push(Box::new(audit_retention()));
        all.push(Box::new(erasures()));
        all
    }
}

fn api_keys() -> Migration {
    Migration {
        name: "m0100_api_keys",
        tables: || {
            vec![table(
                "api_keys",
                vec![
                    col::text("id"),
                    col::text("tenant_id"),
                    col::text("name"),
                    col::text("role"),
                    col::text("key_hash"),
                    col::big("created_at"),
                    col::big_null("revoked_at"),
                ],
                &["id"],
            )]
        },
        indexes: || {
            vec![
                index("api_keys_hash", "api_keys", &["key_hash"], true),
                index("api_keys_tenant", "api_keys", &["tenant_id"], false),
            ]
        },
    }
}

fn audit_log() -> Migration {
    Migration {
        name: "m0101_audit_log",
        tables: || {
            vec![table(
                "audit_log",
                vec![
                    col::text("id"),
                    col::text("tenant_id"),
                    col::text("principal"),
                    col::text("role"),
                    col::text("method"),
                    col::text("route"),
                    col::text("path"),
                    col::int("status"),
                    col::text("request_id"),
                    col::big("at"),
                    col::text("request"),
                    col::text("after"),
                ],
                &["id"],
            )]
        },
        indexes: || {
            vec![index(
                "audit_log_by_tenant",
                "audit_log",
                &["tenant_id", "id"],
                false,
            )]
        },
    }
}

/// The state before: the column added to the log.
fn audit_before() -> AddColumns {
    AddColumns {
        name: "m0102_audit_before",
        columns: || vec![("audit_log", col::text_null("before_state"))],
    }
}

/// What retention purges the log by (`tessera_store::retention`).
fn audit_retention() -> Migration {
    Migration {
        name: "m0103_audit_retention",
        tables: Vec::new,
        indexes: || {
            vec![index(
                "audit_log_age",
                "audit_log",
                &["tenant_id", "at"],
                false,
            )]
        },
    }
}

fn erasures() -> Migration {
    Migration {
        name: "m0104_erasures",
        tables: || {
            vec![
                table(
                    "erasures",
                    vec![
                        col::text("tenant_id"),
                        col::text("id"),
                        col::text("customer_hash"),
                        col::text("pseudonym"),
                        col::big("created_at"),
                    ],
                    &["tenant_id", "id"],
                ),
                table(
                    "erasure_parts",
                    vec![
                        col::text("tenant_id"),
                        col::text("erasure_id"),
                        col::text("service"),
                        col::text("status"),
                        col::text("error"),
                        col::big("updated_at"),
                    ],
                    &["tenant_id", "erasure_id", "service"],
                ),
            ]
        },
        indexes: Vec::new,
    }
}
