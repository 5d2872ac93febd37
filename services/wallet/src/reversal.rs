//! Reversals (refunds and claw-backs) and member-to-member transfers.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::{Backend, db_error, now_micros, stmt};

use crate::ledger::{
    self, Asset, Balanced, Entry, Leg, Owner, account, account_balance, emit, insufficient,
    lock_account, post,
};

/// A validated reversal request.
#[derive(Debug, Clone)]
pub struct Reversal {
    pub transaction_id: String,
    /// When given, the transaction must be this customer's.
    pub customer_id: Option<String>,
    /// 0: all that is left to reverse.
    pub amount: i64,
    pub reason: String,
}

/// The original transaction of a reversal.
struct Original {
    kind: String,
    customer_id: String,
    asset: Asset,
    amount: i64,
}

async fn original(
    txn: &DatabaseTransaction,
    tenant: &str,
    id: &str,
) -> Result<Option<Original>, Error> {
    let row = txn
        .query_one_raw(stmt(
            txn,
            "SELECT kind, customer_id, asset_kind, asset_code, amount FROM transactions \
             WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    (|| {
        Ok::<_, sea_orm::DbErr>(Some(Original {
            kind: row.try_get_by_index(0)?,
            customer_id: row.try_get_by_index(1)?,
            asset: Asset::stored(row.try_get_by_index(2)?, row.try_get_by_index(3)?),
            amount: row.try_get_by_index(4)?,
        }))
    })()
    .map_err(db_error)
}

/// The system account on the other side of `transaction_id`: the one that received value
/// (`receiving`) or gave it.
async fn counter_account(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    receiving: bool,
) -> Result<String, Error> {
    let sign = if receiving { ">" } else { "<" };
    let row = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT p.account_id FROM postings p JOIN accounts a ON a.tenant_id = p.tenant_id \
                 AND a.id = p.account_id WHERE p.tenant_id = $1 AND p.transaction_id = $2 \
                 AND a.owner_kind = 'system' AND p.amount {sign} 0"
            ),
            [tenant.into(), transaction_id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("transaction without its system posting"))?;
    row.try_get_by_index(0).map_err(db_error)
}

/// Reverses all or part of a credit (claw-back), a debit or a capture (refund).
pub async fn reverse(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    reversal: &Reversal,
) -> Result<pb::ReverseResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let id = reversal.transaction_id.as_str();
    let orig = original(txn, tenant, id)
        .await?
        .filter(|o| {
            reversal
                .customer_id
                .as_ref()
                .is_none_or(|c| *c == o.customer_id)
        })
        .ok_or_else(|| Error::not_found(format!("transaction `{id}`")))?;
    // Refunds give back what the source transaction took from lots (a capture's lots were
    // taken by its hold); claw-backs take value out again.
    let (refund, source) = match orig.kind.as_str() {
        "debit" => (true, id.to_string()),
        "capture" => (true, crate::holds::captured_by(txn, tenant, id).await?),
        "credit" => (false, id.to_string()),
        other => {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "a {other} transaction cannot be reversed; only credits, debits and captures \
                     can (correct anything else with an adjustment)"
                ),
            )
            .with_reason("NOT_REVERSIBLE"));
        }
    };
    let customer =
        ledger::find_customer_account(txn, tenant, &orig.customer_id, &orig.asset, Some(backend))
            .await?
            .ok_or_else(|| Error::internal("transaction of a missing account"))?;
    let reversed: i64 = txn
        .query_one_raw(stmt(
            txn,
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM reversals \
             WHERE tenant_id = $1 AND original_id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("no sum"))?
        .try_get_by_index(0)
        .map_err(db_error)?;
    let left = orig.amount.abs() - reversed;
    if left == 0 {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!("transaction `{id}` is already fully reversed"),
        )
        .with_reason("ALREADY_REVERSED"));
    }
    let amount = if reversal.amount == 0 {
        left
    } else {
        reversal.amount
    };
    if amount > left {
        return Err(Error::invalid_field(
            "amount",
            format!("must be at most {left}, what is left to reverse"),
        ));
    }
    let counter = counter_account(txn, tenant, id, refund).await?;
    let entry = if refund {
        let entry = Entry::new(
            "refund",
            &orig.customer_id,
            &orig.asset,
            amount,
            &reversal.reason,
            now,
        );
        entry.write(txn, ctx).await?;
        let restored = ledger::restore(txn, tenant, &entry.id, &source, amount).await?;
        if restored != amount {
            return Err(Error::internal("refund larger than the lots taken"));
        }
        post(
            txn,
            tenant,
            &entry.id,
            Balanced::new([
                Leg::Customer(&customer, amount),
                Leg::System(&counter, -amount),
            ])?,
            now,
        )
        .await?;
        entry
    } else {
        let lots =
            ledger::spendable_for(txn, tenant, &customer, Some(&source), now, amount).await?;
        let entry = Entry::new(
            "clawback",
            &orig.customer_id,
            &orig.asset,
            -amount,
            &reversal.reason,
            now,
        );
        entry.write(txn, ctx).await?;
        ledger::take(txn, tenant, &entry.id, &lots, amount).await?;
        post(
            txn,
            tenant,
            &entry.id,
            Balanced::new([
                Leg::Customer(&customer, -amount),
                Leg::System(&counter, amount),
            ])?,
            now,
        )
        .await?;
        entry
    };
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO reversals (tenant_id, transaction_id, original_id, amount) \
         VALUES ($1, $2, $3, $4)",
        [
            tenant.into(),
            entry.id.clone().into(),
            id.into(),
            amount.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    emit(
        txn,
        tenant,
        &orig.asset,
        if refund { "refunded" } else { "clawed_back" },
        serde_json::json!({
            "transaction_id": entry.id,
            "original_transaction_id": id,
            "customer_id": orig.customer_id,
            "amount": amount,
            "reason": reversal.reason,
        }),
    )
    .await?;
    Ok(pb::ReverseResponse {
        transaction: Some(entry.to_proto()),
        balance: Some(account_balance(txn, tenant, &orig.customer_id, &orig.asset, now).await?),
    })
}

/// A validated transfer.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub from: String,
    pub to: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
}

/// Moves value from one member to another: the sender's lots are spent first-to-expire and
/// arrive as lots of the receiver with the same expiry. Two transactions (one per member),
/// each balanced through the tenant's `transfer` account.
pub async fn transfer(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    t: &Transfer,
) -> Result<pb::TransferResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let Some(sender) = ledger::find_customer_account(txn, tenant, &t.from, &t.asset, None).await?
    else {
        return Err(insufficient(0, t.amount));
    };
    let receiver = account(txn, tenant, Owner::Customer(&t.to), &t.asset).await?;
    // Both accounts, in id order, so two opposite transfers cannot deadlock.
    let mut ids = [sender.as_str(), receiver.as_str()];
    ids.sort_unstable();
    for id in ids {
        lock_account(txn, tenant, backend, id).await?;
    }
    let lots = ledger::spendable_for(txn, tenant, &sender, None, now, t.amount).await?;
    let outgoing = Entry::new("transfer_out", &t.from, &t.asset, -t.amount, &t.reason, now);
    let incoming = Entry::new("transfer_in", &t.to, &t.asset, t.amount, &t.reason, now);
    outgoing.write(txn, ctx).await?;
    incoming.write(txn, ctx).await?;
    for (lot, part) in ledger::take(txn, tenant, &outgoing.id, &lots, t.amount).await? {
        ledger::insert_lot(
            txn,
            tenant,
            &receiver,
            &incoming.id,
            part,
            now,
            lot.expires_at,
        )
        .await?;
    }
    let transfer = account(txn, tenant, Owner::System("transfer"), &t.asset).await?;
    post(
        txn,
        tenant,
        &outgoing.id,
        Balanced::new([
            Leg::Customer(&sender, -t.amount),
            Leg::System(&transfer, t.amount),
        ])?,
        now,
    )
    .await?;
    post(
        txn,
        tenant,
        &incoming.id,
        Balanced::new([
            Leg::System(&transfer, -t.amount),
            Leg::Customer(&receiver, t.amount),
        ])?,
        now,
    )
    .await?;
    emit(
        txn,
        tenant,
        &t.asset,
        "transferred",
        serde_json::json!({
            "outgoing_transaction_id": outgoing.id,
            "incoming_transaction_id": incoming.id,
            "from_customer_id": t.from,
            "to_customer_id": t.to,
            "amount": t.amount,
            "reason": t.reason,
        }),
    )
    .await?;
    Ok(pb::TransferResponse {
        outgoing: Some(outgoing.to_proto()),
        incoming: Some(incoming.to_proto()),
        from_balance: Some(account_balance(txn, tenant, &t.from, &t.asset, now).await?),
        to_balance: Some(account_balance(txn, tenant, &t.to, &t.asset, now).await?),
    })
}
