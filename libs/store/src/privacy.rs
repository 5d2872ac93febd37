//! The personal data a service keeps about a customer, declared table by table
//! ([`Personal`]): exported as JSON, erased in one transaction. A table's rows about the
//! customer are either deleted (what is only personal: a profile, facts, messages) or kept
//! under a pseudonym (records that must stay for their sums and counts: the ledger,
//! redemptions, issued codes). Every statement binds the tenant.

use std::sync::Arc;

use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseTransaction, FromQueryResult, JsonValue};
use tessera_runtime::Error;

use crate::db::{Db, db_error, stmt};

/// What erasure does to a table's rows about the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erase {
    Delete,
    /// The customer column is set to the pseudonym.
    Pseudonymize,
}

/// One table holding data about customers.
#[derive(Debug, Clone)]
pub struct Personal {
    pub table: &'static str,
    /// The column naming the customer.
    pub column: &'static str,
    /// What else marks a row as the customer's (`owner_kind = 'customer'`), or `""`.
    pub when: &'static str,
    /// The columns an export shows (text and numbers).
    pub export: &'static str,
    pub erase: Erase,
}

impl Personal {
    pub const fn new(
        table: &'static str,
        column: &'static str,
        export: &'static str,
        erase: Erase,
    ) -> Self {
        Self {
            table,
            column,
            when: "",
            export,
            erase,
        }
    }

    fn filter(&self) -> String {
        let when = if self.when.is_empty() {
            String::new()
        } else {
            format!(" AND {}", self.when)
        };
        format!("tenant_id = $1 AND {} = $2{when}", self.column)
    }
}

/// A step a service adds to its erasure, in the same transaction, after the tables
/// (rewriting records that carry the customer id inside them).
pub type Hook = Arc<
    dyn for<'a> Fn(
            &'a DatabaseTransaction,
            &'a str,
            &'a str,
            &'a str,
        ) -> BoxFuture<'a, Result<u64, Error>>
        + Send
        + Sync,
>;

/// A service's personal data.
#[derive(Clone)]
pub struct CustomerData {
    db: Db,
    tables: Vec<Personal>,
    hook: Option<Hook>,
}

impl CustomerData {
    pub fn new(db: Db, tables: Vec<Personal>) -> Self {
        Self {
            db,
            tables,
            hook: None,
        }
    }

    /// Runs `hook` after the tables, in the erasure's transaction.
    pub fn with_hook(mut self, hook: Hook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Table → the customer's rows.
    pub async fn export(&self, tenant: &str, customer: &str) -> Result<serde_json::Value, Error> {
        let conn = self.db.conn();
        let mut out = serde_json::Map::new();
        for t in &self.tables {
            let sql = format!(
                "SELECT {} FROM {} WHERE {} LIMIT 10000",
                t.export,
                t.table,
                t.filter()
            );
            let rows =
                JsonValue::find_by_statement(stmt(conn, &sql, [tenant.into(), customer.into()]))
                    .all(conn)
                    .await
                    .map_err(db_error)?;
            if !rows.is_empty() {
                out.insert(t.table.to_string(), JsonValue::Array(rows));
            }
        }
        Ok(JsonValue::Object(out))
    }

    /// Deletes or pseudonymizes the customer's rows in one transaction; (deleted, kept).
    pub async fn erase(
        &self,
        tenant: &str,
        customer: &str,
        pseudonym: &str,
    ) -> Result<(u64, u64), Error> {
        let txn = self.db.begin_write().await?;
        let (mut deleted, mut kept) = (0, 0);
        for t in &self.tables {
            match t.erase {
                Erase::Delete => {
                    let sql = format!("DELETE FROM {} WHERE {}", t.table, t.filter());
                    deleted += txn
                        .execute_raw(stmt(&txn, &sql, [tenant.into(), customer.into()]))
                        .await
                        .map_err(db_error)?
                        .rows_affected();
                }
                Erase::Pseudonymize => {
                    let sql = format!(
                        "UPDATE {} SET {} = $3 WHERE {}",
                        t.table,
                        t.column,
                        t.filter()
                    );
                    kept += txn
                        .execute_raw(stmt(
                            &txn,
                            &sql,
                            [tenant.into(), customer.into(), pseudonym.into()],
                        ))
                        .await
                        .map_err(db_error)?
                        .rows_affected();
                }
            }
        }
        if let Some(hook) = &self.hook {
            kept += hook(&txn, tenant, customer, pseudonym).await?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok((deleted, kept))
    }
}

impl tessera_runtime::ops::CustomerData for CustomerData {
    fn export<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, Error>> {
        Box::pin(self.export(tenant, customer))
    }

    fn erase<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
        pseudonym: &'a str,
    ) -> BoxFuture<'a, Result<(u64, u64), Error>> {
        Box::pin(self.erase(tenant, customer, pseudonym))
    }
}
