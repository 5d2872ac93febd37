//! Expiry: lots past their date are consumed into the expiry account in bounded batches,
//! lapsed holds released first, and customers told a week before their points expire.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb};
use tessera_runtime::{Error, RequestContext};
use tessera_store::{Backend, db_error, now_micros, stmt};

use super::accounts::*;
use super::lots::*;
use super::postings::*;

/// Most accounts one `ExpireDue` call sweeps; a caller repeats the call until it reports
/// nothing expired.
pub const EXPIRE_BATCH: i64 = 5_000;

/// Releases the tenant's lapsed holds, then expires the due lots (of up to [`EXPIRE_BATCH`]
/// accounts): per account, one expiry transaction moving the remaining value to the tenant's
/// expiry account, and one event. Accounts are locked (PostgreSQL) in id order before their
/// lots, like debits do, so a sweep and a debit never deadlock.
pub async fn expire_due(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
) -> Result<pb::ExpireDueResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let holds_released = crate::holds::release_lapsed(txn, ctx, backend).await?;
    let now = now_micros();
    let accounts = txn
        .query_all_raw(stmt(
            txn,
            "SELECT DISTINCT account_id FROM lots WHERE tenant_id = $1 AND remaining > 0 \
             AND expires_at IS NOT NULL AND expires_at <= $2 ORDER BY account_id LIMIT $3",
            [tenant.into(), now.into(), EXPIRE_BATCH.into()],
        ))
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.try_get_by_index::<String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error)?;
    let mut response = pb::ExpireDueResponse {
        holds_released,
        ..Default::default()
    };
    for account_id in accounts {
        let account_row = lock_account(txn, tenant, backend, &account_id).await?;
        let due = query_lots(
            txn,
            "WHERE tenant_id = $1 AND account_id = $2 \
             AND remaining > 0 AND expires_at IS NOT NULL AND expires_at <= $3",
            [tenant.into(), account_id.clone().into(), now.into()],
        )
        .await?;
        let amount: i64 = due.iter().map(|l| l.remaining).sum();
        if amount == 0 {
            continue;
        }
        let entry = Entry::new(
            "expiry",
            &account_row.customer_id,
            &account_row.asset,
            -amount,
            "expired",
            now,
        );
        entry.write(txn, ctx).await?;
        take(txn, tenant, &entry.id, &due, amount).await?;
        let expiry = account(txn, tenant, Owner::System("expiry"), &account_row.asset).await?;
        post(
            txn,
            tenant,
            &entry.id,
            Balanced::new([
                Leg::Customer(&account_id, -amount),
                Leg::System(&expiry, amount),
            ])?,
            now,
        )
        .await?;
        emit(
            txn,
            tenant,
            &account_row.asset,
            "expired",
            serde_json::json!({
                "transaction_id": entry.id,
                "customer_id": account_row.customer_id,
                "amount": amount,
                "lots": due.len(),
            }),
        )
        .await?;
        response.lots_expired += u32::try_from(due.len()).unwrap_or(u32::MAX);
        response.accounts += 1;
        response.amount_expired += amount;
    }
    announce_expiring(txn, tenant, backend, now).await?;
    Ok(response)
}

/// How far ahead a lot's expiry is announced.
pub const EXPIRY_NOTICE_MICROS: i64 = 7 * 86_400 * 1_000_000;

/// Announces, once per lot, value expiring within [`EXPIRY_NOTICE_MICROS`]: one
/// `<asset>.expiring` event per account (the amount, the first expiry and the lots), for
/// notification to remind the customer.
async fn announce_expiring(
    txn: &DatabaseTransaction,
    tenant: &str,
    backend: Backend,
    now: i64,
) -> Result<(), Error> {
    // Lots a spend holds now are skipped (announced by the next sweep): waiting for them
    // while holding others could deadlock with a spend taking its lots in expiry order.
    let skip_locked = match backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let rows = txn
        .query_all_raw(stmt(
            txn,
            &format!(
                "UPDATE lots SET expiry_announced = 1 WHERE id IN (\
                   SELECT id FROM lots WHERE tenant_id = $1 AND remaining > 0 \
                   AND expires_at IS NOT NULL AND expires_at > $2 AND expires_at <= $3 \
                   AND expiry_announced = 0 ORDER BY id LIMIT $4{skip_locked}) \
                 RETURNING account_id, remaining, expires_at"
            ),
            [
                tenant.into(),
                now.into(),
                (now + EXPIRY_NOTICE_MICROS).into(),
                (EXPIRE_BATCH * 10).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    // Per account: amount, first expiry, lots.
    let mut by_account: std::collections::BTreeMap<String, (i64, i64, u32)> =
        std::collections::BTreeMap::new();
    for r in &rows {
        let account: String = r.try_get_by_index(0).map_err(db_error)?;
        let remaining: i64 = r.try_get_by_index(1).map_err(db_error)?;
        let expires_at: i64 = r.try_get_by_index(2).map_err(db_error)?;
        let e = by_account.entry(account).or_insert((0, i64::MAX, 0));
        e.0 += remaining;
        e.1 = e.1.min(expires_at);
        e.2 += 1;
    }
    for (account_id, (amount, first, lots)) in by_account {
        // No row lock: lots are taken before accounts here, the reverse of a spend.
        let account = account_row(txn, tenant, &account_id, "").await?;
        emit(
            txn,
            tenant,
            &account.asset,
            "expiring",
            serde_json::json!({
                "customer_id": account.customer_id,
                "amount": amount,
                "expires_at": chrono::DateTime::from_timestamp_micros(first),
                "lots": lots,
            }),
        )
        .await?;
    }
    Ok(())
}
