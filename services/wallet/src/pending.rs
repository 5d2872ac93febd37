//! Pending credits: value promised but not yet spendable (cashback waiting out the return
//! window, points confirmed on delivery). A pending credit moves value from the tenant's
//! `issuance` account to its `pending` account; confirming it credits the customer from
//! `pending` (a normal credit with a lot), cancelling it gives the value back to `issuance`.
//! Every status change is recorded with its time, reason and principal, and emitted as
//! `<asset>.status_changed`.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb, CreditStatus};
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::{Backend, db_error, now_micros, outbox, stmt, tuples};

use crate::ledger::{
    self, Asset, Balanced, Credit, Entry, Leg, Owner, account, account_balance, emit, lock_account,
    post,
};

/// Most due credits one `ActivateDue` call confirms.
const ACTIVATE_BATCH: i64 = 1_000;

/// A status as stored and emitted: its protobuf name without the enum prefix, lower case
/// (`paid_out`).
fn status_name(status: CreditStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("CREDIT_STATUS_")
        .to_ascii_lowercase()
}

fn status_of(name: &str) -> CreditStatus {
    CreditStatus::from_str_name(&format!("CREDIT_STATUS_{}", name.to_ascii_uppercase()))
        .unwrap_or(CreditStatus::Unspecified)
}

/// A stored pending credit.
#[derive(Debug, Clone)]
struct PendingRow {
    id: String,
    customer_id: String,
    account_id: String,
    asset: Asset,
    amount: i64,
    reason: String,
    expires_at: Option<i64>,
    activate_at: Option<i64>,
    status: CreditStatus,
    credit_transaction_id: Option<String>,
}

const COLUMNS: &str = "id, customer_id, account_id, asset_kind, asset_code, amount, reason, \
                       expires_at, activate_at, status, credit_transaction_id";

fn row_of(row: &sea_orm::QueryResult) -> Result<PendingRow, Error> {
    (|| {
        Ok::<_, sea_orm::DbErr>(PendingRow {
            id: row.try_get_by_index(0)?,
            customer_id: row.try_get_by_index(1)?,
            account_id: row.try_get_by_index(2)?,
            asset: Asset::stored(row.try_get_by_index(3)?, row.try_get_by_index(4)?),
            amount: row.try_get_by_index(5)?,
            reason: row.try_get_by_index(6)?,
            expires_at: row.try_get_by_index(7)?,
            activate_at: row.try_get_by_index(8)?,
            status: status_of(&row.try_get_by_index::<String>(9)?),
            credit_transaction_id: row.try_get_by_index(10)?,
        })
    })()
    .map_err(db_error)
}

/// Reads and locks (PostgreSQL) a pending credit. Pending credits are locked before accounts.
async fn lock(
    txn: &DatabaseTransaction,
    tenant: &str,
    backend: Backend,
    id: &str,
) -> Result<PendingRow, Error> {
    let lock = backend.row_lock();
    let row = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT {COLUMNS} FROM pending_credits WHERE tenant_id = $1 AND id = $2{lock}"
            ),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("credit `{id}`")))?;
    row_of(&row)
}

fn wrong_status(row: &PendingRow, wanted: CreditStatus) -> Error {
    Error::new(
        Code::FailedPrecondition,
        format!(
            "credit `{}` is {}, not {}",
            row.id,
            status_name(row.status),
            status_name(wanted)
        ),
    )
    .with_reason(match wanted {
        CreditStatus::Confirmed => "CREDIT_NOT_CONFIRMED",
        _ => "CREDIT_NOT_PENDING",
    })
}

/// Moves a credit to `status`: the row, the history entry and the event.
async fn change_status(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    row: &PendingRow,
    status: CreditStatus,
    reason: &str,
    credit_transaction_id: Option<&str>,
    now: i64,
) -> Result<(), Error> {
    let tenant = ctx.tenant_id.as_str();
    if row.status == CreditStatus::Pending {
        ledger::move_pending(txn, tenant, &row.account_id, -row.amount).await?;
    }
    txn.execute_raw(stmt(
        txn,
        "UPDATE pending_credits SET status = $1, updated_at = $2, \
         credit_transaction_id = COALESCE($3, credit_transaction_id) WHERE tenant_id = $4 AND id = $5",
        [
            status_name(status).into(),
            now.into(),
            credit_transaction_id.map(str::to_string).into(),
            tenant.into(),
            row.id.clone().into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    record_history(txn, ctx, &row.id, status, reason, now).await?;
    emit(
        txn,
        tenant,
        &row.asset,
        "status_changed",
        serde_json::json!({
            "credit_id": row.id,
            "customer_id": row.customer_id,
            "amount": row.amount,
            "status": status_name(status),
            "previous_status": status_name(row.status),
            "reason": reason,
        }),
    )
    .await
}

async fn record_history(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    credit_id: &str,
    status: CreditStatus,
    reason: &str,
    now: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO credit_status_history (tenant_id, credit_id, status, reason, principal, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        [
            ctx.tenant_id.clone().into(),
            credit_id.into(),
            status_name(status).into(),
            reason.into(),
            ctx.principal.clone().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Records a pending credit (the customer's account is created so balances list it).
pub async fn create(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    credit: &Credit,
    activate_at: Option<i64>,
) -> Result<pb::CreditResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    crate::rules::check_expiry(txn, tenant, &credit.asset, credit.expires_at, "expires_at").await?;
    let customer = account(
        txn,
        tenant,
        Owner::Customer(&credit.customer_id),
        &credit.asset,
    )
    .await?;
    let issuance = account(txn, tenant, Owner::System("issuance"), &credit.asset).await?;
    let pending = account(txn, tenant, Owner::System("pending"), &credit.asset).await?;
    let entry = Entry::new(
        "pending_credit",
        &credit.customer_id,
        &credit.asset,
        credit.amount,
        &credit.reason,
        now,
    );
    entry.write(txn, ctx).await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::System(&issuance, -credit.amount),
            Leg::System(&pending, credit.amount),
        ])?,
        now,
    )
    .await?;
    ledger::move_pending(txn, tenant, &customer, credit.amount).await?;
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO pending_credits (tenant_id, id, customer_id, account_id, asset_kind, \
         asset_code, amount, reason, expires_at, activate_at, status, credit_transaction_id, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', NULL, $11, $11)",
        [
            tenant.into(),
            entry.id.clone().into(),
            credit.customer_id.clone().into(),
            customer.into(),
            (credit.asset.kind as i32).into(),
            credit.asset.code.clone().into(),
            credit.amount.into(),
            credit.reason.clone().into(),
            credit.expires_at.into(),
            activate_at.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    record_history(
        txn,
        ctx,
        &entry.id,
        CreditStatus::Pending,
        &credit.reason,
        now,
    )
    .await?;
    emit(
        txn,
        tenant,
        &credit.asset,
        "status_changed",
        serde_json::json!({
            "credit_id": entry.id,
            "customer_id": credit.customer_id,
            "amount": credit.amount,
            "status": "pending",
            "activate_at": activate_at.and_then(chrono::DateTime::from_timestamp_micros),
            "reason": credit.reason,
        }),
    )
    .await?;
    Ok(pb::CreditResponse {
        transaction: Some(entry.to_proto()),
        balance: Some(account_balance(txn, tenant, &credit.customer_id, &credit.asset, now).await?),
    })
}

/// Confirms a pending credit: a normal credit (lot, programme expiry) from `pending`.
pub async fn activate(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    id: &str,
    reason: &str,
) -> Result<pb::PendingCredit, Error> {
    let tenant = ctx.tenant_id.as_str();
    let row = lock(txn, tenant, backend, id).await?;
    if row.status != CreditStatus::Pending {
        return Err(wrong_status(&row, CreditStatus::Pending));
    }
    let credited = ledger::credit(
        txn,
        ctx,
        backend,
        &Credit::plain(
            ledger::CONFIRMATION,
            row.customer_id.clone(),
            row.asset.clone(),
            row.amount,
            row.reason.clone(),
            row.expires_at,
        ),
    )
    .await?;
    let transaction_id = credited.transaction.map(|t| t.id).unwrap_or_default();
    let now = now_micros();
    change_status(
        txn,
        ctx,
        &row,
        CreditStatus::Confirmed,
        reason,
        Some(&transaction_id),
        now,
    )
    .await?;
    get(txn, tenant, id).await
}

/// Cancels a pending credit: its value goes back to `issuance`.
pub async fn cancel(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    id: &str,
    reason: &str,
) -> Result<pb::PendingCredit, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let row = lock(txn, tenant, backend, id).await?;
    if row.status != CreditStatus::Pending {
        return Err(wrong_status(&row, CreditStatus::Pending));
    }
    let entry = Entry::new(
        "pending_cancelled",
        &row.customer_id,
        &row.asset,
        -row.amount,
        reason,
        now,
    );
    entry.write(txn, ctx).await?;
    let pending = account(txn, tenant, Owner::System("pending"), &row.asset).await?;
    let issuance = account(txn, tenant, Owner::System("issuance"), &row.asset).await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::System(&pending, -row.amount),
            Leg::System(&issuance, row.amount),
        ])?,
        now,
    )
    .await?;
    change_status(txn, ctx, &row, CreditStatus::Cancelled, reason, None, now).await?;
    get(txn, tenant, id).await
}

/// Pays a confirmed cashback credit out: what is left of its lot moves to `payout`.
pub async fn pay_out(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    id: &str,
    reason: &str,
) -> Result<pb::PendingCredit, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let row = lock(txn, tenant, backend, id).await?;
    if row.asset.kind != pb::AssetKind::Cashback {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!("credit `{id}` is not cashback; only cashback is paid out"),
        )
        .with_reason("NOT_CASHBACK"));
    }
    if row.status != CreditStatus::Confirmed {
        return Err(wrong_status(&row, CreditStatus::Confirmed));
    }
    lock_account(txn, tenant, backend, &row.account_id).await?;
    let credit_transaction = row.credit_transaction_id.clone().unwrap_or_default();
    let lot = ledger::query_lots(
        txn,
        "WHERE tenant_id = $1 AND transaction_id = $2 \
         AND remaining > 0 AND (expires_at IS NULL OR expires_at > $3)",
        [tenant.into(), credit_transaction.into(), now.into()],
    )
    .await?
    .pop();
    let Some(lot) = lot else {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!("nothing of credit `{id}` is left to pay out"),
        )
        .with_reason("NOTHING_TO_PAY_OUT"));
    };
    let amount = lot.remaining;
    let entry = Entry::new(
        ledger::PAYOUT.kind,
        &row.customer_id,
        &row.asset,
        -amount,
        reason,
        now,
    );
    entry.write(txn, ctx).await?;
    ledger::take(txn, tenant, &entry.id, &[lot], amount).await?;
    let payout = account(
        txn,
        tenant,
        Owner::System(ledger::PAYOUT.counter_account),
        &row.asset,
    )
    .await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::Customer(&row.account_id, -amount),
            Leg::System(&payout, amount),
        ])?,
        now,
    )
    .await?;
    change_status(txn, ctx, &row, CreditStatus::PaidOut, reason, None, now).await?;
    get(txn, tenant, id).await
}

/// Confirms the tenant's pending credits whose activation time has passed (up to a batch).
pub async fn activate_due(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
) -> Result<u32, Error> {
    let ids = txn
        .query_all_raw(stmt(
            txn,
            "SELECT id FROM pending_credits WHERE tenant_id = $1 AND status = 'pending' \
             AND activate_at IS NOT NULL AND activate_at <= $2 ORDER BY id LIMIT $3",
            [
                ctx.tenant_id.clone().into(),
                now_micros().into(),
                ACTIVATE_BATCH.into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.try_get_by_index::<String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error)?;
    let mut activated = 0;
    for id in ids {
        match activate(txn, ctx, backend, &id, "activation date reached").await {
            Ok(_) => activated += 1,
            Err(e) if e.code == Code::FailedPrecondition => {}
            Err(e) => return Err(e),
        }
    }
    Ok(activated)
}

/// One credit with its history.
async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::PendingCredit, Error> {
    let (mut page, _) = list(conn, tenant, None, Some(id), "", 1).await?;
    page.pop()
        .ok_or_else(|| Error::not_found(format!("credit `{id}`")))
}

/// A page of a customer's pending-value credits (or one credit), newest first, with their
/// status histories.
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: Option<&str>,
    credit_id: Option<&str>,
    starting_after: &str,
    limit: u32,
) -> Result<(Vec<pb::PendingCredit>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM pending_credits WHERE tenant_id = $1 \
                 AND ($2 = '' OR customer_id = $2) AND ($3 = '' OR id = $3) \
                 AND ($4 = '' OR id < $4) ORDER BY id DESC LIMIT $5"
            ),
            [
                tenant.into(),
                customer_id.unwrap_or("").into(),
                credit_id.unwrap_or("").into(),
                starting_after.into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let has_more = rows.len() > limit as usize;
    let rows: Vec<PendingRow> = rows
        .iter()
        .take(limit as usize)
        .map(row_of)
        .collect::<Result<_, _>>()?;
    let mut credits: Vec<pb::PendingCredit> = rows
        .iter()
        .map(|r| pb::PendingCredit {
            id: r.id.clone(),
            customer_id: r.customer_id.clone(),
            asset: Some(r.asset.to_proto()),
            amount: r.amount,
            status: r.status as i32,
            reason: r.reason.clone(),
            activate_at: r.activate_at.map(outbox::micros_to_timestamp),
            history: Vec::new(),
        })
        .collect();
    if credits.is_empty() {
        return Ok((credits, has_more));
    }
    let ids: Vec<sea_orm::Value> = credits.iter().map(|c| c.id.clone().into()).collect();
    let history = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT credit_id, status, reason, principal, at FROM credit_status_history \
                 WHERE tenant_id = $1 AND credit_id IN {} ORDER BY id",
                tuples(2, ids.len(), 1)
            ),
            std::iter::once(tenant.into()).chain(ids),
        ))
        .await
        .map_err(db_error)?;
    for row in history {
        let credit_id: String = row.try_get_by_index(0).map_err(db_error)?;
        let change = pb::StatusChange {
            status: status_of(&row.try_get_by_index::<String>(1).map_err(db_error)?) as i32,
            reason: row.try_get_by_index(2).map_err(db_error)?,
            principal: row.try_get_by_index(3).map_err(db_error)?,
            at: Some(outbox::micros_to_timestamp(
                row.try_get_by_index(4).map_err(db_error)?,
            )),
        };
        if let Some(credit) = credits.iter_mut().find(|c| c.id == credit_id) {
            credit.history.push(change);
        }
    }
    Ok((credits, has_more))
}
