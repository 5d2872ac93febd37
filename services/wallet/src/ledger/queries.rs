//! Reads: balances and the transaction history, with filters.

use sea_orm::ConnectionTrait;
use tessera_proto::wallet::v1::{self as pb};
use tessera_runtime::Error;
use tessera_store::{db_error, outbox, stmt};

use super::accounts::*;

/// Balances of every account of one customer, as of `now`: the balance row less value that
/// has expired but not been swept yet, and what expires within 30/60/90 days.
pub async fn balances<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    now: i64,
) -> Result<Vec<pb::Balance>, Error> {
    balances_of(conn, tenant, customer_id, None, now).await
}

/// [`balances`], restricted to one asset when `only` is given (what a write returns).
async fn balances_of<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    only: Option<&Asset>,
    now: i64,
) -> Result<Vec<pb::Balance>, Error> {
    const DAY: i64 = 86_400 * 1_000_000;
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT a.asset_kind, a.asset_code, a.balance, \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at <= $3 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at > $3 AND l.expires_at <= $4 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at > $3 AND l.expires_at <= $5 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at > $3 AND l.expires_at <= $6 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             a.held, a.pending \
             FROM accounts a LEFT JOIN lots l ON l.tenant_id = a.tenant_id AND l.account_id = a.id \
             AND l.remaining > 0 AND l.expires_at IS NOT NULL \
             WHERE a.tenant_id = $1 AND a.owner_kind = 'customer' AND a.owner_id = $2 \
             AND ($7 = 0 OR (a.asset_kind = $7 AND a.asset_code = $8)) \
             GROUP BY a.tenant_id, a.id, a.asset_kind, a.asset_code, a.balance, a.held, a.pending \
             ORDER BY a.asset_kind, a.asset_code",
            [
                tenant.into(),
                customer_id.into(),
                now.into(),
                (now + 30 * DAY).into(),
                (now + 60 * DAY).into(),
                (now + 90 * DAY).into(),
                only.map_or(0, |a| a.kind as i32).into(),
                only.map_or(String::new(), |a| a.code.clone()).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| {
            let balance: i64 = row.try_get_by_index(2)?;
            let expired: i64 = row.try_get_by_index(3)?;
            Ok(pb::Balance {
                asset: Some(pb::Asset {
                    kind: row.try_get_by_index(0)?,
                    code: row.try_get_by_index(1)?,
                }),
                available: balance - expired,
                expiring_30d: row.try_get_by_index(4)?,
                expiring_60d: row.try_get_by_index(5)?,
                expiring_90d: row.try_get_by_index(6)?,
                held: row.try_get_by_index(7)?,
                pending: row.try_get_by_index(8)?,
            })
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_error)
}

/// One page of a customer's transactions, newest first. Transaction ids are UUIDv7 (time
/// ordered), so the cursor is the last id of the previous page.
pub async fn transactions<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    filter: &TransactionFilter,
) -> Result<(Vec<pb::Transaction>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT id, kind, asset_kind, asset_code, amount, reason, created_at FROM transactions \
             WHERE tenant_id = $1 AND customer_id = $2 AND ($3 = '' OR id < $3) \
             AND ($4 = 0 OR asset_kind = $4) AND ($5 = '' OR asset_code = $5) \
             AND ($6 = '' OR kind = $6) AND created_at >= $7 AND created_at < $8 \
             ORDER BY id DESC LIMIT $9",
            [
                tenant.into(),
                filter.customer_id.clone().into(),
                filter.starting_after.clone().into(),
                filter.asset_kind.into(),
                filter.asset_code.clone().into(),
                filter.kind.clone().into(),
                filter.from.into(),
                filter.until.into(),
                i64::from(filter.limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let has_more = rows.len() > filter.limit as usize;
    let page = rows
        .iter()
        .take(filter.limit as usize)
        .map(|row| {
            Ok(pb::Transaction {
                id: row.try_get_by_index(0)?,
                customer_id: filter.customer_id.clone(),
                kind: row.try_get_by_index(1)?,
                asset: Some(pb::Asset {
                    kind: row.try_get_by_index(2)?,
                    code: row.try_get_by_index(3)?,
                }),
                amount: row.try_get_by_index(4)?,
                reason: row.try_get_by_index(5)?,
                created_at: Some(outbox::micros_to_timestamp(row.try_get_by_index(6)?)),
            })
        })
        .collect::<Result<Vec<_>, sea_orm::DbErr>>()
        .map_err(db_error)?;
    Ok((page, has_more))
}

/// Validated filters of `ListTransactions`.
#[derive(Debug, Clone)]
pub struct TransactionFilter {
    pub customer_id: String,
    pub asset_kind: i32,
    pub asset_code: String,
    pub kind: String,
    /// Inclusive lower bound, µs since the epoch.
    pub from: i64,
    /// Exclusive upper bound, µs since the epoch.
    pub until: i64,
    pub starting_after: String,
    pub limit: u32,
}

/// The balance of one customer account (zero when it does not exist).
pub(crate) async fn account_balance<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    asset: &Asset,
    now: i64,
) -> Result<pb::Balance, Error> {
    Ok(balances_of(conn, tenant, customer_id, Some(asset), now)
        .await?
        .into_iter()
        .find(|b| b.asset.as_ref() == Some(&asset.to_proto()))
        .unwrap_or_else(|| pb::Balance {
            asset: Some(asset.to_proto()),
            ..Default::default()
        }))
}
