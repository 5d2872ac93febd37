//! Migrations. Each service declares its own list (the plumbing tables from [`plumbing`]
//! first, then its domain tables) as [`Migration`]s built with sea-query's schema builder,
//! so one definition produces correct DDL for SQLite and PostgreSQL. [`run`] applies them at
//! start and from `tessera migrate`; on PostgreSQL it holds an advisory lock so replicas
//! starting together migrate once.

use sea_orm::ConnectionTrait;
use sea_orm_migration::sea_query::{
    Alias, ColumnDef, Index, IndexCreateStatement, Table, TableCreateStatement,
};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::db::{Backend, Db};

/// One migration: tables and indexes created in order, each `IF NOT EXISTS`.
pub struct Migration {
    pub name: &'static str,
    pub tables: fn() -> Vec<TableCreateStatement>,
    pub indexes: fn() -> Vec<IndexCreateStatement>,
}

impl MigrationName for Migration {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), sea_orm::DbErr> {
        for table in (self.tables)() {
            manager.create_table(table).await?;
        }
        for index in (self.indexes)() {
            manager.create_index(index).await?;
        }
        Ok(())
    }
}

/// A migration that replaces an index: drops `drop` (if it exists) on `table`, then creates
/// `create`. For an index whose columns must change once databases already have it.
pub struct ReplaceIndex {
    pub name: &'static str,
    pub table: &'static str,
    pub drop: &'static str,
    pub create: fn() -> IndexCreateStatement,
}

impl MigrationName for ReplaceIndex {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for ReplaceIndex {
    async fn up(&self, manager: &SchemaManager) -> Result<(), sea_orm::DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(self.drop)
                    .table(Alias::new(self.table))
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        manager.create_index((self.create)()).await
    }
}

/// A migration that adds columns to existing tables: `(table, column)` pairs; every column
/// must be nullable or carry a default (SQLite's `ADD COLUMN` needs one for old rows).
/// Skips a column that is already there, so a half-applied run can be repeated.
pub struct AddColumns {
    pub name: &'static str,
    pub columns: fn() -> Vec<(&'static str, ColumnDef)>,
}

impl MigrationName for AddColumns {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddColumns {
    async fn up(&self, manager: &SchemaManager) -> Result<(), sea_orm::DbErr> {
        for (table, mut column) in (self.columns)() {
            let name = column.get_column_name();
            if manager.has_column(table, &name).await? {
                continue;
            }
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(table))
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

/// A migration that drops columns no longer used: `(table, column)` pairs. Skips a column
/// that is already gone, so a half-applied run can be repeated. A dropped column must not
/// be in an index.
pub struct DropColumns {
    pub name: &'static str,
    pub columns: &'static [(&'static str, &'static str)],
}

impl MigrationName for DropColumns {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for DropColumns {
    async fn up(&self, manager: &SchemaManager) -> Result<(), sea_orm::DbErr> {
        for (table, column) in self.columns {
            if !manager.has_column(*table, *column).await? {
                continue;
            }
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(*table))
                        .drop_column(Alias::new(*column))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

/// A migration of plain SQL statements (data fills), run in order; each must be safe to
/// run again (a half-applied run is repeated).
pub struct Statements {
    pub name: &'static str,
    pub sql: &'static [&'static str],
}

impl MigrationName for Statements {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Statements {
    async fn up(&self, manager: &SchemaManager) -> Result<(), sea_orm::DbErr> {
        for sql in self.sql {
            manager.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// Column helpers, so table definitions read like DDL.
pub mod col {
    use super::{Alias, ColumnDef};

    pub fn text(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name))
            .text()
            .not_null()
            .to_owned()
    }
    /// `TEXT NOT NULL DEFAULT ''`: for columns added to tables that have rows.
    pub fn text_empty(name: &str) -> ColumnDef {
        text(name).default("").to_owned()
    }
    pub fn text_null(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name)).text().null().to_owned()
    }
    pub fn big(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name))
            .big_integer()
            .not_null()
            .to_owned()
    }
    /// `BIGINT NOT NULL DEFAULT 0`: for columns added to tables that have rows.
    pub fn big_zero(name: &str) -> ColumnDef {
        big(name).default(0i64).to_owned()
    }
    pub fn big_null(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name))
            .big_integer()
            .null()
            .to_owned()
    }
    pub fn int(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name))
            .integer()
            .not_null()
            .to_owned()
    }
    pub fn int_null(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name)).integer().null().to_owned()
    }
    pub fn blob_null(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name)).blob().null().to_owned()
    }
    pub fn blob(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name))
            .blob()
            .not_null()
            .to_owned()
    }
    /// Auto-increment 64-bit primary key.
    pub fn serial(name: &str) -> ColumnDef {
        ColumnDef::new(Alias::new(name))
            .big_integer()
            .not_null()
            .auto_increment()
            .primary_key()
            .to_owned()
    }
}

/// `CREATE TABLE IF NOT EXISTS name (columns…, PRIMARY KEY (pk…))`; an empty `pk` means a
/// column carries its own primary key.
pub fn table(name: &str, columns: Vec<ColumnDef>, pk: &[&str]) -> TableCreateStatement {
    let mut t = Table::create();
    t.table(Alias::new(name)).if_not_exists();
    for mut c in columns {
        t.col(&mut c);
    }
    if !pk.is_empty() {
        let mut index = Index::create();
        for c in pk {
            index.col(Alias::new(*c));
        }
        t.primary_key(&mut index);
    }
    t.to_owned()
}

/// `CREATE [UNIQUE] INDEX IF NOT EXISTS name ON table (columns…)`.
pub fn index(name: &str, table: &str, columns: &[&str], unique: bool) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(name).table(Alias::new(table)).if_not_exists();
    for c in columns {
        i.col(Alias::new(*c));
    }
    if unique {
        i.unique();
    }
    i.to_owned()
}

/// The plumbing tables every service has: idempotency keys, the outbox and the work queue.
pub fn plumbing() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(Migration {
            name: "m0001_idempotency_keys",
            tables: || {
                vec![table(
                    "idempotency_keys",
                    vec![
                        col::text("tenant_id"),
                        col::text("scope"),
                        col::text("key"),
                        col::text("fingerprint"),
                        col::text("state"),
                        col::text("owner"),
                        col::big("locked_until"),
                        col::int_null("response_code"),
                        col::blob_null("response"),
                        col::big("created_at"),
                    ],
                    &["tenant_id", "scope", "key"],
                )]
            },
            indexes: || {
                vec![index(
                    "idempotency_keys_created",
                    "idempotency_keys",
                    &["created_at"],
                    false,
                )]
            },
        }),
        Box::new(Migration {
            name: "m0002_outbox",
            tables: || {
                vec![table(
                    "outbox",
                    vec![
                        col::serial("id"),
                        col::text("event_id"),
                        col::text("tenant_id"),
                        col::text("event_type"),
                        col::blob("payload"),
                        col::text("traceparent"),
                        col::big("occurred_at"),
                        col::int("attempts"),
                        col::big("next_attempt_at"),
                        col::big_null("lease_until"),
                        col::text_null("lease_owner"),
                        col::big_null("delivered_at"),
                        col::text_null("last_error"),
                    ],
                    &[],
                )]
            },
            indexes: || {
                vec![
                    index("outbox_event_id", "outbox", &["event_id"], true),
                    index(
                        "outbox_pending",
                        "outbox",
                        &["delivered_at", "next_attempt_at"],
                        false,
                    ),
                ]
            },
        }),
        Box::new(Migration {
            name: "m0003_work_queue",
            tables: || {
                vec![table(
                    "work_queue",
                    vec![
                        col::serial("id"),
                        col::text("queue"),
                        col::text("tenant_id"),
                        col::text("dedupe_key"),
                        col::text("kind"),
                        col::blob("payload"),
                        col::text("traceparent"),
                        col::int("attempts"),
                        col::big("next_attempt_at"),
                        col::text_null("lease_token"),
                        col::big_null("dead_at"),
                        col::text_null("last_error"),
                        col::big("created_at"),
                    ],
                    &[],
                )]
            },
            indexes: || {
                vec![
                    index(
                        "work_queue_key",
                        "work_queue",
                        &["queue", "tenant_id", "dedupe_key"],
                        true,
                    ),
                    index(
                        "work_queue_due",
                        "work_queue",
                        &["queue", "dead_at", "next_attempt_at", "id"],
                        false,
                    ),
                ]
            },
        }),
        // What retention purges by age (`crate::retention`).
        Box::new(Migration {
            name: "m0004_retention",
            tables: Vec::new,
            indexes: || {
                vec![
                    index(
                        "idempotency_keys_age",
                        "idempotency_keys",
                        &["tenant_id", "created_at"],
                        false,
                    ),
                    index(
                        "work_queue_dead_age",
                        "work_queue",
                        &["tenant_id", "dead_at"],
                        false,
                    ),
                ]
            },
        }),
        // The group of an item in a grouped queue (`crate::queue::Groups`).
        Box::new(AddColumns {
            name: "m0005_work_queue_groups",
            columns: || vec![("work_queue", col::text_empty("grp"))],
        }),
    ]
}

/// Applies the pending migrations of `M` on one dedicated connection. On PostgreSQL,
/// serialised across processes with an advisory lock keyed by the schema.
pub async fn run<M: MigratorTrait>(db: &Db) -> anyhow::Result<()> {
    let session = db.single_session().await?;
    let result = match db.backend() {
        Backend::Sqlite => M::up(&session, None).await,
        Backend::Postgres => {
            let key = db.schema().unwrap_or("public").to_string();
            let lock = |sql: &str| {
                sea_orm::Statement::from_sql_and_values(
                    sea_orm::DbBackend::Postgres,
                    sql,
                    [key.clone().into()],
                )
            };
            session
                .execute_raw(lock("SELECT pg_advisory_lock(hashtext($1))"))
                .await?;
            let result = M::up(&session, None).await;
            session
                .execute_raw(lock("SELECT pg_advisory_unlock(hashtext($1))"))
                .await?;
            result
        }
    };
    session.close().await?;
    Ok(result?)
}
