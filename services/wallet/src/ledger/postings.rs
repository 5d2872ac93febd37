//! Postings: the only way the ledger is written. A transaction's legs must balance
//! ([`Balanced`]) before [`post`] writes them, with their event in the same transaction.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb};
use tessera_runtime::{Error, RequestContext};
use tessera_store::{db_error, insert_rows, outbox, stmt};

use super::accounts::*;
use crate::legs::Unbalanced;
pub(crate) use crate::legs::{Balanced, Leg};

/// Legs that do not balance are a bug in the ledger's caller: nothing is written.
impl From<Unbalanced> for Error {
    fn from(why: Unbalanced) -> Self {
        Error::internal(format!("the ledger refused a transaction: {why}"))
    }
}

/// Writes transaction rows `(id, tenant_id, kind, customer_id, asset_kind, asset_code,
/// amount, reason, principal, created_at)` in multi-row statements.
pub(crate) async fn write_transactions(
    txn: &DatabaseTransaction,
    rows: Vec<Vec<sea_orm::Value>>,
) -> Result<(), Error> {
    insert_rows(
        txn,
        "INSERT INTO transactions (id, tenant_id, kind, customer_id, asset_kind, asset_code, \
         amount, reason, principal, created_at)",
        "",
        rows,
    )
    .await
    .map(|_| ())
}

/// Posting rows of one or more transactions, each added whole from legs that balance: the
/// only way postings reach the table.
#[derive(Debug, Default)]
pub(crate) struct Postings(Vec<Vec<sea_orm::Value>>);

impl Postings {
    pub(crate) fn with_capacity(transactions: usize) -> Self {
        Self(Vec::with_capacity(transactions * 2))
    }

    /// Adds the rows of transaction `transaction_id`.
    pub(crate) fn add(
        &mut self,
        tenant: &str,
        transaction_id: &str,
        legs: &Balanced<'_>,
        now: i64,
    ) {
        self.0.extend(legs.legs().iter().map(|leg| {
            vec![
                tenant.into(),
                transaction_id.into(),
                leg.account().into(),
                leg.amount().into(),
                now.into(),
            ]
        }));
    }
}

/// Writes posting rows in multi-row statements.
pub(crate) async fn write_postings(
    txn: &DatabaseTransaction,
    postings: Postings,
) -> Result<(), Error> {
    insert_rows(
        txn,
        "INSERT INTO postings (tenant_id, transaction_id, account_id, amount, created_at)",
        "",
        postings.0,
    )
    .await
    .map(|_| ())
}

/// Writes a transaction's postings (one statement) and moves the customer balance rows.
pub(crate) async fn post(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    legs: Balanced<'_>,
    now: i64,
) -> Result<(), Error> {
    let mut postings = Postings::with_capacity(1);
    postings.add(tenant, transaction_id, &legs, now);
    write_postings(txn, postings).await?;
    for leg in legs.legs() {
        let (sql, account, amount) = match *leg {
            Leg::Customer(account, amount) => (
                "UPDATE accounts SET balance = balance + $1, version = version + 1, \
                 updated_at = $2 WHERE tenant_id = $3 AND id = $4",
                account,
                amount,
            ),
            Leg::Held(account, amount) => (
                "UPDATE accounts SET balance = balance + $1, held = held - $1, \
                 version = version + 1, updated_at = $2 WHERE tenant_id = $3 AND id = $4",
                account,
                amount,
            ),
            Leg::System(..) => continue,
        };
        let updated = txn
            .execute_raw(stmt(
                txn,
                sql,
                [amount.into(), now.into(), tenant.into(), account.into()],
            ))
            .await
            .map_err(db_error)?;
        if updated.rows_affected() != 1 {
            return Err(Error::internal("posting to a missing account"));
        }
    }
    Ok(())
}

/// What kind of ledger movement a credit or debit is: its transaction kind, the tenant system
/// account on the other side, and the event verb (`points.<verb>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Movement {
    pub kind: &'static str,
    pub counter_account: &'static str,
    pub event: &'static str,
}

pub const CREDIT: Movement = Movement {
    kind: "credit",
    counter_account: "issuance",
    event: "credited",
};

pub const DEBIT: Movement = Movement {
    kind: "debit",
    counter_account: "redemption",
    event: "debited",
};

/// An agent's correction, either way; the principal and mandatory reason are recorded.
pub const ADJUSTMENT: Movement = Movement {
    kind: "adjustment",
    counter_account: "adjustment",
    event: "adjusted",
};

/// A pending credit confirmed: the value comes from the tenant's pending account.
pub const CONFIRMATION: Movement = Movement {
    kind: "credit",
    counter_account: "pending",
    event: "credited",
};

/// Cashback paid out to the customer.
pub const PAYOUT: Movement = Movement {
    kind: "payout",
    counter_account: "payout",
    event: "paid_out",
};

/// One ledger transaction as the customer's history shows it.
#[derive(Debug, Clone)]
pub(crate) struct Entry<'a> {
    pub id: String,
    pub kind: &'a str,
    pub customer_id: &'a str,
    pub asset: &'a Asset,
    pub amount: i64,
    pub reason: &'a str,
    pub at: i64,
}

impl<'a> Entry<'a> {
    /// A new transaction (fresh time-ordered id) happening `at`.
    pub fn new(
        kind: &'a str,
        customer_id: &'a str,
        asset: &'a Asset,
        amount: i64,
        reason: &'a str,
        at: i64,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            customer_id,
            asset,
            amount,
            reason,
            at,
        }
    }

    /// Records the transaction row (with the acting principal).
    pub async fn write(
        &self,
        txn: &DatabaseTransaction,
        ctx: &RequestContext,
    ) -> Result<(), Error> {
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO transactions (id, tenant_id, kind, customer_id, asset_kind, asset_code, \
             amount, reason, principal, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            [
                self.id.clone().into(),
                ctx.tenant_id.clone().into(),
                self.kind.into(),
                self.customer_id.into(),
                (self.asset.kind as i32).into(),
                self.asset.code.clone().into(),
                self.amount.into(),
                self.reason.into(),
                ctx.principal.clone().into(),
                self.at.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        Ok(())
    }

    pub fn to_proto(&self) -> pb::Transaction {
        pb::Transaction {
            id: self.id.clone(),
            customer_id: self.customer_id.to_string(),
            asset: Some(self.asset.to_proto()),
            amount: self.amount,
            kind: self.kind.into(),
            reason: self.reason.to_string(),
            created_at: Some(outbox::micros_to_timestamp(self.at)),
        }
    }
}

/// Writes the outbox event `<asset prefix>.<verb>` (e.g. `points.credited`) with `data` plus
/// the asset.
pub(crate) async fn emit(
    txn: &DatabaseTransaction,
    tenant: &str,
    asset: &Asset,
    verb: &str,
    mut data: serde_json::Value,
) -> Result<(), Error> {
    data["asset"] = asset.to_json();
    outbox::enqueue(
        txn,
        tenant,
        &format!("{}.{verb}", asset.event_prefix()),
        &data,
    )
    .await
    .map(|_| ())
}
