//! Debits: value out of a customer's account, taken from its lots.

use sea_orm::DatabaseTransaction;
use tessera_proto::wallet::v1::{self as pb};
use tessera_runtime::{Error, RequestContext};
use tessera_store::{Backend, now_micros};

use super::accounts::*;
use super::lots::*;
use super::postings::*;
use super::queries::account_balance;

/// A validated debit.
#[derive(Debug, Clone)]
pub struct Debit {
    pub movement: Movement,
    pub customer_id: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
}

/// Spends from a customer's account, consuming spendable lots first-to-expire first, under
/// the account's lock (see [`lock_account`]).
pub async fn debit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    debit: &Debit,
) -> Result<pb::DebitResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let Some(customer) =
        find_customer_account(txn, tenant, &debit.customer_id, &debit.asset, Some(backend)).await?
    else {
        return Err(insufficient(0, debit.amount));
    };
    let lots = spendable_for(txn, tenant, &customer, None, now, debit.amount).await?;
    let entry = Entry::new(
        debit.movement.kind,
        &debit.customer_id,
        &debit.asset,
        -debit.amount,
        &debit.reason,
        now,
    );
    entry.write(txn, ctx).await?;
    take(txn, tenant, &entry.id, &lots, debit.amount).await?;
    let counter = account(
        txn,
        tenant,
        Owner::System(debit.movement.counter_account),
        &debit.asset,
    )
    .await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::Customer(&customer, -debit.amount),
            Leg::System(&counter, debit.amount),
        ])?,
        now,
    )
    .await?;
    let balance = account_balance(txn, tenant, &debit.customer_id, &debit.asset, now).await?;
    emit(
        txn,
        tenant,
        &debit.asset,
        debit.movement.event,
        serde_json::json!({
            "transaction_id": entry.id,
            "customer_id": debit.customer_id,
            "amount": debit.amount,
            "balance": balance.available,
            "reason": debit.reason,
        }),
    )
    .await?;
    Ok(pb::DebitResponse {
        transaction: Some(entry.to_proto()),
        balance: Some(balance),
    })
}
