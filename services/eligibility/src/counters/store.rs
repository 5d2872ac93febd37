//! The usage counters of redemptions: per customer, per period, per code and per campaign
//! (its row and its shards), and the campaigns' budgets cut into slices over the shards
//! ([`take_budget`]). Every counter is a row taken under its lock, so N concurrent
//! redemptions of the last unit give exactly one winner; what a redemption counted is
//! given back exactly on rollback.

use sea_orm::{ConnectionTrait, DatabaseTransaction, Value};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_store::db::Backend;
use tessera_store::{Db, db_error, stmt};

use super::core::{Usage, check_limits};
use crate::campaigns::Compiled;
/// Locks one counter row (creating it at zero first if needed) and reads `cols`.
pub(crate) async fn lock_counter(
    txn: &DatabaseTransaction,
    table: &str,
    keys: &[(&str, Value)],
    cols: &[&str],
) -> Result<Vec<i64>, Error> {
    let lock = Backend::of(txn).row_lock();
    let filter = keys
        .iter()
        .enumerate()
        .map(|(i, (k, _))| format!("{k} = ${}", i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let select = format!(
        "SELECT {} FROM {table} WHERE {filter}{lock}",
        cols.join(", ")
    );
    let values = || keys.iter().map(|(_, v)| v.clone());
    for attempt in 0..2 {
        let row = txn
            .query_one_raw(stmt(txn, &select, values()))
            .await
            .map_err(db_error)?;
        if let Some(row) = row {
            return cols
                .iter()
                .enumerate()
                .map(|(i, _)| row.try_get_by_index::<i64>(i).map_err(db_error))
                .collect();
        }
        if attempt == 0 {
            let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
            let insert = format!(
                "INSERT INTO {table} ({}, {}) VALUES ({}, {}) ON CONFLICT DO NOTHING",
                names.join(", "),
                cols.join(", "),
                Db::placeholders(1, keys.len()),
                vec!["0"; cols.len()].join(", "),
            );
            txn.execute_raw(stmt(txn, &insert, values()))
                .await
                .map_err(db_error)?;
        }
    }
    Err(Error::internal(format!("counter row of {table} vanished")))
}

/// SQL for `count + delta` (a non-negative count) that saturates at the largest BIGINT
/// instead of failing every later redemption (PostgreSQL) or turning into a float (SQLite):
/// a saturated budget is used up.
pub(crate) fn saturating_sum(count: &str, delta: &str) -> String {
    format!(
        "CASE WHEN {delta} <= 0 THEN {count} + {delta} WHEN {count} > {max} - {delta} \
         THEN {max} ELSE {count} + {delta} END",
        max = i64::MAX
    )
}

/// Adds `deltas` to a counter row (created at the deltas if missing).
pub(crate) async fn add_counter(
    txn: &DatabaseTransaction,
    table: &str,
    keys: &[(&str, Value)],
    deltas: &[(&str, i64)],
) -> Result<(), Error> {
    let names: Vec<&str> = keys
        .iter()
        .map(|(k, _)| *k)
        .chain(deltas.iter().map(|(c, _)| *c))
        .collect();
    let updates = deltas
        .iter()
        .map(|(c, _)| {
            format!(
                "{c} = {}",
                saturating_sum(&format!("{table}.{c}"), &format!("excluded.{c}"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {updates}",
        names.join(", "),
        Db::placeholders(1, names.len()),
        keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
    );
    let values = keys
        .iter()
        .map(|(_, v)| v.clone())
        .chain(deltas.iter().map(|(_, d)| Value::from(*d)));
    txn.execute_raw(stmt(txn, &sql, values))
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Keys of the counters one applied campaign touches.
pub(crate) struct Keys<'a> {
    pub tenant: &'a str,
    pub customer: &'a str,
    pub campaign: &'a str,
    pub code: &'a str,
    pub period: Option<i64>,
}

impl Keys<'_> {
    pub(crate) fn campaign(&self) -> [(&'static str, Value); 2] {
        [
            ("tenant_id", self.tenant.into()),
            ("campaign_id", self.campaign.into()),
        ]
    }
    pub(crate) fn customer(&self) -> [(&'static str, Value); 3] {
        [
            ("tenant_id", self.tenant.into()),
            ("customer_id", self.customer.into()),
            ("campaign_id", self.campaign.into()),
        ]
    }
    pub(crate) fn period(&self, start: i64) -> [(&'static str, Value); 4] {
        [
            ("tenant_id", self.tenant.into()),
            ("customer_id", self.customer.into()),
            ("campaign_id", self.campaign.into()),
            ("period_start", start.into()),
        ]
    }
    pub(crate) fn code(&self) -> [(&'static str, Value); 2] {
        [
            ("tenant_id", self.tenant.into()),
            ("code", self.code.into()),
        ]
    }
}

/// Gives back the customer's, the period's and the code's uses of one applied campaign.
pub(crate) async fn give_back_uses(
    txn: &DatabaseTransaction,
    keys: &Keys<'_>,
) -> Result<(), Error> {
    let sign = -1;
    add_counter(
        txn,
        "customer_usage",
        &keys.customer(),
        &[("redemptions", sign)],
    )
    .await?;
    if let Some(start) = keys.period {
        add_counter(
            txn,
            "customer_period_usage",
            &keys.period(start),
            &[("redemptions", sign)],
        )
        .await?;
    }
    if !keys.code.is_empty() {
        add_counter(txn, "code_usage", &keys.code(), &[("uses", sign)]).await?;
    }
    Ok(())
}

/// Shards of a campaign's counts. A budgeted campaign's remaining budgets are also cut into
/// as many slices, one per shard.
pub(crate) const USAGE_SHARDS: u8 = 32;

pub(crate) fn random_shard() -> i32 {
    i32::from(uuid::Uuid::new_v4().as_bytes()[0] % USAGE_SHARDS)
}

/// The campaign's counters: `uses` redemptions, `discount` and `order_value` added (negative
/// to give back), without a check, on a shard picked at random (a campaign every checkout
/// applies would otherwise queue all of them on its one row).
pub(crate) async fn count_campaign(
    txn: &DatabaseTransaction,
    keys: &Keys<'_>,
    uses: i64,
    discount: i64,
    order_value: i64,
) -> Result<(), Error> {
    let [tenant, campaign] = keys.campaign();
    add_counter(
        txn,
        "campaign_usage_shards",
        &[tenant, campaign, ("shard", random_shard().into())],
        &[
            ("redemptions", uses),
            ("discount_total", discount),
            ("order_value_total", order_value),
        ],
    )
    .await
}

/// The counter columns of `campaign_usage` and its shards.
pub(crate) const COUNTS: [&str; 3] = ["redemptions", "discount_total", "order_value_total"];

/// Takes one redemption, `discount` and `order_value` from the campaign's budgets: `Err`
/// with the reason when this order does not fit any more.
///
/// Budgets are escrowed in slices so that concurrent redemptions do not queue on one row
/// (each would hold it through its commit's WAL flush, which caps a campaign at one
/// redemption per flush). The usual case is one conditional update of a shard picked at
/// random: it counts the redemption there and takes it from that shard's slice. Only when
/// the slice is short, or was cut from another version of the campaign, does the exact
/// path lock the campaign's row and every shard.
///
/// Invariant, per budget: what all shards and the campaign's row count, plus what the
/// current slices have left, is at most the budget. So a slice that covers an order proves
/// the order fits, and the exact path, which sees everything, decides the rest.
pub(crate) async fn take_budget(
    txn: &DatabaseTransaction,
    keys: &Keys<'_>,
    c: &Compiled,
    discount: i64,
    order_value: i64,
) -> Result<Result<(), (pb::Reason, String)>, Error> {
    let l = c.def.limits.unwrap_or_default();
    let cut_from = format!(
        "{}:{}/{}/{}",
        c.version, l.max_redemptions, l.max_discount_total, l.max_order_value_total
    );
    let budgeted = |max: i64, amount: i64| if max > 0 { amount } else { 0 };
    // A used-up discount budget refuses even an order it gives nothing to: such an order
    // needs 1 left in the slice, and takes nothing.
    let need_discount = budgeted(l.max_discount_total, discount.max(1));
    // An update that waited for the shard and then found its slice short still holds the
    // shard's lock (PostgreSQL locks the newer row before checking it again). Holding it
    // while the exact path waits for the campaign's row could deadlock with an exact path
    // that holds the row and waits for this shard, so a short slice rolls back to here.
    raw(txn, "SAVEPOINT budget_slice").await?;
    let sliced = txn
        .execute_raw(stmt(
            txn,
            &format!(
                "UPDATE campaign_usage_shards SET redemptions = redemptions + 1, \
                 discount_total = {}, order_value_total = {}, \
                 left_redemptions = left_redemptions - $6, left_discount = left_discount - $7, \
                 left_order_value = left_order_value - $8 \
                 WHERE tenant_id = $1 AND campaign_id = $2 AND shard = $3 AND budget = $9 \
                 AND left_redemptions >= $6 AND left_discount >= $10 AND left_order_value >= $8",
                saturating_sum("discount_total", "$4"),
                saturating_sum("order_value_total", "$5"),
            ),
            [
                keys.tenant.into(),
                keys.campaign.into(),
                random_shard().into(),
                discount.into(),
                order_value.into(),
                budgeted(l.max_redemptions, 1).into(),
                budgeted(l.max_discount_total, discount).into(),
                budgeted(l.max_order_value_total, order_value).into(),
                cut_from.clone().into(),
                need_discount.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if sliced.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    raw(txn, "ROLLBACK TO SAVEPOINT budget_slice").await?;
    take_budget_exactly(txn, keys, c, &cut_from, discount, order_value).await
}

/// The exact path of [`take_budget`]: with the campaign's row and then every shard locked
/// (nothing can take from a slice meanwhile), checks this order against all that was
/// counted, counts it on the campaign's row, and cuts what the budgets have left after it
/// into fresh slices, one per shard.
pub(crate) async fn take_budget_exactly(
    txn: &DatabaseTransaction,
    keys: &Keys<'_>,
    c: &Compiled,
    cut_from: &str,
    discount: i64,
    order_value: i64,
) -> Result<Result<(), (pb::Reason, String)>, Error> {
    let campaign = keys.campaign();
    let [redemptions, discount_total, order_value_total] =
        <[i64; 3]>::try_from(lock_counter(txn, "campaign_usage", &campaign, &COUNTS).await?)
            .map_err(|_| Error::internal("campaign_usage counts"))?;
    let mut usage = Usage {
        redemptions,
        discount_total,
        order_value_total,
        customer_period: 0,
    };
    for [r, d, o] in lock_shards(txn, keys).await? {
        usage.redemptions = usage.redemptions.saturating_add(r);
        usage.discount_total = usage.discount_total.saturating_add(d);
        usage.order_value_total = usage.order_value_total.saturating_add(o);
    }
    if let Err(why) = check_limits(c.def.limits.as_ref(), usage, 0, discount, order_value) {
        return Ok(Err(why));
    }
    let [tenant, campaign] = campaign;
    add_counter(
        txn,
        "campaign_usage",
        &[tenant, campaign],
        &[
            (COUNTS[0], 1),
            (COUNTS[1], discount),
            (COUNTS[2], order_value),
        ],
    )
    .await?;
    let l = c.def.limits.unwrap_or_default();
    let left = |max: i64, used: i64| if max > 0 { (max - used).max(0) } else { 0 };
    let slice = |at: usize| {
        format!(
            "${at} / {USAGE_SHARDS} + CASE WHEN shard < ${at} % {USAGE_SHARDS} THEN 1 ELSE 0 END"
        )
    };
    txn.execute_raw(stmt(
        txn,
        &format!(
            "UPDATE campaign_usage_shards SET budget = $3, left_redemptions = {}, \
             left_discount = {}, left_order_value = {} \
             WHERE tenant_id = $1 AND campaign_id = $2",
            slice(4),
            slice(5),
            slice(6)
        ),
        [
            keys.tenant.into(),
            keys.campaign.into(),
            cut_from.into(),
            left(l.max_redemptions, usage.redemptions.saturating_add(1)).into(),
            left(
                l.max_discount_total,
                usage.discount_total.saturating_add(discount),
            )
            .into(),
            left(
                l.max_order_value_total,
                usage.order_value_total.saturating_add(order_value),
            )
            .into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(Ok(()))
}

/// Locks every shard of the campaign (creating the missing ones at zero) and reads their
/// counts.
pub(crate) async fn lock_shards(
    txn: &DatabaseTransaction,
    keys: &Keys<'_>,
) -> Result<Vec<[i64; 3]>, Error> {
    let select = format!(
        "SELECT {} FROM campaign_usage_shards WHERE tenant_id = $1 AND campaign_id = $2 \
         ORDER BY shard{}",
        COUNTS.join(", "),
        Backend::of(txn).row_lock()
    );
    let values = || [keys.tenant.into(), keys.campaign.into()];
    let mut rows = txn
        .query_all_raw(stmt(txn, &select, values()))
        .await
        .map_err(db_error)?;
    if rows.len() < usize::from(USAGE_SHARDS) {
        let missing = (0..USAGE_SHARDS)
            .map(|shard| format!("($1, $2, {shard}, 0, 0, 0)"))
            .collect::<Vec<_>>()
            .join(", ");
        txn.execute_raw(stmt(
            txn,
            &format!(
                "INSERT INTO campaign_usage_shards (tenant_id, campaign_id, shard, {}) \
                 VALUES {missing} ON CONFLICT DO NOTHING",
                COUNTS.join(", ")
            ),
            values(),
        ))
        .await
        .map_err(db_error)?;
        rows = txn
            .query_all_raw(stmt(txn, &select, values()))
            .await
            .map_err(db_error)?;
    }
    rows.iter()
        .map(|row| {
            Ok([
                row.try_get_by_index(0).map_err(db_error)?,
                row.try_get_by_index(1).map_err(db_error)?,
                row.try_get_by_index(2).map_err(db_error)?,
            ])
        })
        .collect()
}

/// Adds one use to a counter row unless it holds `max` already (0: no limit), in one
/// conditional upsert; returns the uses before when it is full.
pub(crate) async fn take_use(
    txn: &DatabaseTransaction,
    table: &str,
    keys: &[(&str, Value)],
    column: &str,
    max: i64,
) -> Result<Option<i64>, Error> {
    if max <= 0 {
        add_counter(txn, table, keys, &[(column, 1)]).await?;
        return Ok(None);
    }
    let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
    let sql = format!(
        "INSERT INTO {table} ({names}, {column}) VALUES ({values}, 1) \
         ON CONFLICT ({names}) DO UPDATE SET {column} = {table}.{column} + 1 \
         WHERE {table}.{column} < ${max_at}",
        names = names.join(", "),
        values = Db::placeholders(1, keys.len()),
        max_at = keys.len() + 1,
    );
    let values = keys
        .iter()
        .map(|(_, v)| v.clone())
        .chain(std::iter::once(Value::from(max)));
    let taken = txn
        .execute_raw(stmt(txn, &sql, values))
        .await
        .map_err(db_error)?;
    if taken.rows_affected() == 1 {
        return Ok(None);
    }
    Ok(Some(lock_counter(txn, table, keys, &[column]).await?[0]))
}

/// Runs a statement without parameters (savepoints).
pub(crate) async fn raw(txn: &DatabaseTransaction, sql: &str) -> Result<(), Error> {
    txn.execute_unprepared(sql).await.map_err(db_error)?;
    Ok(())
}
