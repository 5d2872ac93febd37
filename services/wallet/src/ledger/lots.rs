//! Lots: every credit creates one; debits, holds and expiry consume them first to expire,
//! first in (recorded in `lot_consumptions`), and a reversal restores them.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_runtime::Error;
use tessera_store::{db_error, stmt};

use super::accounts::*;

/// A lot with value left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lot {
    pub id: i64,
    pub remaining: i64,
    pub expires_at: Option<i64>,
}

/// The spendable lots of an account (value left, not expired as of `now`), in the order they
/// are spent: lots of `prefer` (a transaction) first, then first-to-expire first, never-expiring
/// last.
pub(crate) async fn spendable_lots(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    prefer: Option<&str>,
    now: i64,
) -> Result<Vec<Lot>, Error> {
    query_lots(
        txn,
        "WHERE tenant_id = $1 AND account_id = $2 \
         AND remaining > 0 AND (expires_at IS NULL OR expires_at > $3) \
         ORDER BY CASE WHEN transaction_id = $4 THEN 0 ELSE 1 END, \
         CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, expires_at, earned_at, id",
        [
            tenant.into(),
            account_id.into(),
            now.into(),
            prefer.unwrap_or("").into(),
        ],
    )
    .await
}

/// [`spendable_lots`] that hold at least `amount`, else the refusal of the spend.
pub(crate) async fn spendable_for(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    prefer: Option<&str>,
    now: i64,
    amount: i64,
) -> Result<Vec<Lot>, Error> {
    let lots = spendable_lots(txn, tenant, account_id, prefer, now).await?;
    let available: i64 = lots.iter().map(|l| l.remaining).sum();
    if available < amount {
        return Err(insufficient(available, amount));
    }
    Ok(lots)
}

/// Lots selected by `filter` (the SQL after `FROM lots`).
pub(crate) async fn query_lots(
    txn: &DatabaseTransaction,
    filter: &str,
    values: impl IntoIterator<Item = sea_orm::Value>,
) -> Result<Vec<Lot>, Error> {
    let rows = txn
        .query_all_raw(stmt(
            txn,
            &format!("SELECT id, remaining, expires_at FROM lots {filter}"),
            values,
        ))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|r| {
            Ok(Lot {
                id: r.try_get_by_index(0)?,
                remaining: r.try_get_by_index(1)?,
                expires_at: r.try_get_by_index(2)?,
            })
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_error)
}

/// Takes `amount` out of `lots` in their order for a transaction, recording which lot paid
/// for it so a refund or release can restore it. Returns what each lot gave. The caller has
/// checked that the lots hold enough.
pub(crate) async fn take(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    lots: &[Lot],
    amount: i64,
) -> Result<Vec<(Lot, i64)>, Error> {
    let plan = crate::allocation::allocate(lots.iter().map(|l| (l, l.remaining)), amount)
        .map_err(|_| Error::internal("lots short of a checked amount"))?;
    let mut taken = Vec::with_capacity(plan.len());
    for (lot, part) in plan {
        txn.execute_raw(stmt(
            txn,
            "UPDATE lots SET remaining = remaining - $1 WHERE tenant_id = $2 AND id = $3",
            [part.into(), tenant.into(), lot.id.into()],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO lot_consumptions (tenant_id, transaction_id, lot_id, amount) \
             VALUES ($1, $2, $3, $4)",
            [
                tenant.into(),
                transaction_id.into(),
                lot.id.into(),
                part.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        taken.push((*lot, part));
    }
    Ok(taken)
}

/// Gives back up to `amount` of what transaction `source` took from lots (net of what earlier
/// restorations gave back), latest-to-expire first, each lot keeping its original expiry.
/// Returns the amount restored.
pub(crate) async fn restore(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    source: &str,
    amount: i64,
) -> Result<i64, Error> {
    let rows = txn
        .query_all_raw(stmt(
            txn,
            "SELECT c.lot_id, c.amount - CAST(COALESCE((SELECT SUM(r.amount) FROM lot_restorations r \
             WHERE r.tenant_id = c.tenant_id AND r.source_transaction_id = c.transaction_id \
             AND r.lot_id = c.lot_id), 0) AS BIGINT) \
             FROM lot_consumptions c JOIN lots l ON l.tenant_id = c.tenant_id AND l.id = c.lot_id \
             WHERE c.tenant_id = $1 AND c.transaction_id = $2 \
             ORDER BY CASE WHEN l.expires_at IS NULL THEN 0 ELSE 1 END, l.expires_at DESC, l.id DESC",
            [tenant.into(), source.into()],
        ))
        .await
        .map_err(db_error)?;
    let nets = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get_by_index::<i64>(0)?,
                row.try_get_by_index::<i64>(1)?,
            ))
        })
        .collect::<Result<Vec<(i64, i64)>, sea_orm::DbErr>>()
        .map_err(db_error)?;
    // Up to `amount`: no more than the spend took and has not been given back.
    let open = tessera_money::sum(nets.iter().map(|(_, net)| (*net).max(0)))
        .map_err(|_| Error::internal("lot consumptions out of range"))?;
    let plan = crate::allocation::allocate(nets, amount.min(open))
        .map_err(|_| Error::internal("lot consumptions short of their own sum"))?;
    let mut restored = 0;
    for (lot, part) in plan {
        restored += part;
        txn.execute_raw(stmt(
            txn,
            "UPDATE lots SET remaining = remaining + $1 WHERE tenant_id = $2 AND id = $3",
            [part.into(), tenant.into(), lot.into()],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO lot_restorations (tenant_id, transaction_id, source_transaction_id, \
             lot_id, amount) VALUES ($1, $2, $3, $4, $5)",
            [
                tenant.into(),
                transaction_id.into(),
                source.into(),
                lot.into(),
                part.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(restored)
}

/// A new lot: `amount` of value earned `earned_at`, expiring `expires_at`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_lot(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    transaction_id: &str,
    amount: i64,
    earned_at: i64,
    expires_at: Option<i64>,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO lots (tenant_id, account_id, transaction_id, amount, remaining, earned_at, expires_at) \
         VALUES ($1, $2, $3, $4, $4, $5, $6)",
        [
            tenant.into(),
            account_id.into(),
            transaction_id.into(),
            amount.into(),
            earned_at.into(),
            expires_at.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}
