//! The tenant's liability, read from the postings: balances of the customer, `holds` and
//! `pending` accounts at the end of the range, and what moved through the `issuance`,
//! `adjustment`, `redemption`, `expiry` and `payout` accounts within it.
//!
//! Incremental: the sums of whole past days are rolled up once into `liability_days` (per
//! asset and account owner), so a report reads the rolled days plus at most a day or two of
//! live postings, whatever the length of the ledger's history. A day is rolled once it ended
//! an hour ago (a posting is stamped before its transaction commits, so a late commit still
//! lands in an open day). Both ends of the range are read the same way: the balance before
//! a time is the rolled days before its day plus that day's postings before it.

use std::collections::{BTreeMap, HashMap};

use sea_orm::ConnectionTrait;
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::Error;
use tessera_store::{Db, db_error, now_micros, stmt};

/// One day, in µs.
const DAY: i64 = 86_400 * 1_000_000;
/// How long after its end a day is rolled up.
const GRACE: i64 = 3_600 * 1_000_000;

/// Sums are grouped by asset and by owner (`""` for every customer account, else the
/// system account's name).
type Group = (i32, String, String);

const OWNER: &str = "CASE WHEN a.owner_kind = 'customer' THEN '' ELSE a.owner_id END";

/// Liability per asset over `[from, until)` (µs since the epoch).
pub async fn liability(
    db: &Db,
    tenant: &str,
    from: i64,
    until: i64,
) -> Result<Vec<pb::Liability>, Error> {
    let rolled = roll_up(db, tenant, now_micros()).await?;
    let conn = db.conn();
    let closing = balance_before(conn, tenant, until, rolled).await?;
    let opening = balance_before(conn, tenant, from, rolled).await?;
    let mut assets: BTreeMap<(i32, String), pb::Liability> = BTreeMap::new();
    for ((kind, code, owner), closing) in closing {
        let moved = closing
            - opening
                .get(&(kind, code.clone(), owner.clone()))
                .copied()
                .unwrap_or(0);
        let entry = assets
            .entry((kind, code.clone()))
            .or_insert_with(|| pb::Liability {
                asset: Some(pb::Asset { kind, code }),
                ..Default::default()
            });
        match owner.as_str() {
            "" => entry.outstanding += closing,
            "holds" => {
                entry.outstanding += closing;
                entry.held += closing;
            }
            "pending" => entry.pending += closing,
            // Value leaving the issuer's accounts is issued value.
            "issuance" | "adjustment" => entry.issued -= moved,
            "redemption" => entry.redeemed += moved,
            "expiry" => entry.expired += moved,
            "payout" => entry.paid_out += moved,
            // `transfer` nets to zero within every transfer.
            _ => {}
        }
    }
    Ok(assets.into_values().collect())
}

/// The sum of every posting before `at`, per group: the rolled days before `at`'s day (or
/// before `rolled`, the first day not rolled), plus the live postings from there to `at`.
async fn balance_before<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    at: i64,
    rolled: i64,
) -> Result<HashMap<Group, i64>, Error> {
    if at <= 0 {
        return Ok(HashMap::new());
    }
    let day = (at / DAY).min(rolled);
    let mut sums = grouped(
        conn,
        "SELECT asset_kind, asset_code, owner, CAST(SUM(amount) AS BIGINT) FROM liability_days \
         WHERE tenant_id = $1 AND day < $2 GROUP BY asset_kind, asset_code, owner",
        vec![tenant.into(), day.into()],
    )
    .await?;
    let live = grouped(
        conn,
        &format!(
            "SELECT a.asset_kind, a.asset_code, {OWNER}, CAST(SUM(p.amount) AS BIGINT) \
             FROM postings p JOIN accounts a ON a.tenant_id = p.tenant_id AND a.id = p.account_id \
             WHERE p.tenant_id = $1 AND p.created_at >= $2 AND p.created_at < $3 \
             GROUP BY a.asset_kind, a.asset_code, {OWNER}"
        ),
        vec![tenant.into(), (day * DAY).into(), at.into()],
    )
    .await?;
    for (group, amount) in live {
        *sums.entry(group).or_default() += amount;
    }
    Ok(sums)
}

async fn grouped<C: ConnectionTrait>(
    conn: &C,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<HashMap<Group, i64>, Error> {
    let rows = conn
        .query_all_raw(stmt(conn, sql, values))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| {
            let group = (
                row.try_get_by_index(0)?,
                row.try_get_by_index(1)?,
                row.try_get_by_index(2)?,
            );
            let amount: Option<i64> = row.try_get_by_index(3)?;
            Ok((group, amount.unwrap_or(0)))
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_error)
}

/// Rolls up the tenant's whole days that ended an hour before `now` and are not rolled yet;
/// returns the first day not rolled. Concurrent reports roll a day once (its rows are keyed
/// by day and group, and the mark only moves forward).
async fn roll_up(db: &Db, tenant: &str, now: i64) -> Result<i64, Error> {
    let target = (now - GRACE) / DAY;
    let conn = db.conn();
    let done = conn
        .query_one_raw(stmt(
            conn,
            "SELECT until_day FROM liability_rolled WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?
        .map(|r| r.try_get_by_index::<i64>(0))
        .transpose()
        .map_err(db_error)?;
    if done.is_some_and(|d| d >= target) {
        return Ok(done.unwrap_or(target));
    }
    let txn = db.begin_write().await?;
    let first = done.unwrap_or(0);
    txn.execute_raw(stmt(
        &txn,
        &format!(
            "INSERT INTO liability_days (tenant_id, day, asset_kind, asset_code, owner, amount) \
             SELECT p.tenant_id, p.created_at / {DAY}, a.asset_kind, a.asset_code, {OWNER}, \
             CAST(SUM(p.amount) AS BIGINT) \
             FROM postings p JOIN accounts a ON a.tenant_id = p.tenant_id AND a.id = p.account_id \
             WHERE p.tenant_id = $1 AND p.created_at >= $2 AND p.created_at < $3 \
             GROUP BY p.tenant_id, p.created_at / {DAY}, a.asset_kind, a.asset_code, {OWNER} \
             ON CONFLICT (tenant_id, day, asset_kind, asset_code, owner) DO NOTHING"
        ),
        [tenant.into(), (first * DAY).into(), (target * DAY).into()],
    ))
    .await
    .map_err(db_error)?;
    txn.execute_raw(stmt(
        &txn,
        "INSERT INTO liability_rolled (tenant_id, until_day) VALUES ($1, $2) \
         ON CONFLICT (tenant_id) DO UPDATE SET until_day = excluded.until_day \
         WHERE liability_rolled.until_day < excluded.until_day",
        [tenant.into(), target.into()],
    ))
    .await
    .map_err(db_error)?;
    txn.commit().await.map_err(db_error)?;
    Ok(target)
}
