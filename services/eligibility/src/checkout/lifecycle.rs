//! What happens to a redemption after it is committed: a reservation confirmed, a
//! redemption rolled back (in whole or by returned lines, giving back exactly what it
//! counted), and reservations that expire.

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_effects::engine::div_half_even;
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error};
use tessera_store::outbox::{self};
use tessera_store::{Db, db_error, stmt};

use super::commit::*;
use super::plan::*;
use crate::counters::{Keys, count_campaign, give_back_uses};
use crate::{cashback, pool_codes, spends};

/// Confirms a reservation (REDEEMED stays as it is: a confirm replayed with a new key).
pub async fn confirm(
    txn: &DatabaseTransaction,
    tenant: &str,
    id: &str,
    now: i64,
) -> Result<pb::Redemption, Error> {
    let (mut r, counted) = load(txn, tenant, id, true)
        .await?
        .ok_or_else(|| Error::not_found(format!("redemption `{id}`")))?;
    match r.status() {
        pb::RedemptionStatus::Redeemed => return Ok(r),
        pb::RedemptionStatus::Reserved => {}
        other => {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!("redemption `{id}` is {}", status_name(other)),
            )
            .with_reason("NOT_RESERVED"));
        }
    }
    let expires = r.expires_at.as_ref().map_or(0, outbox::timestamp_to_micros);
    if expires <= now {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!("reservation `{id}` expired"),
        )
        .with_reason("RESERVATION_EXPIRED"));
    }
    r.set_status(pb::RedemptionStatus::Redeemed);
    r.expires_at = None;
    store(txn, tenant, &r, &counted).await?;
    spends::capture_later(txn, tenant, &r).await?;
    let (currency, days) = (&counted.currency, counted.cashback_days);
    cashback::credit(txn, tenant, &r, currency, days, now).await?;
    outbox::enqueue(txn, tenant, "redemption.succeeded", &event_data(&r)).await?;
    Ok(r)
}

/// Checks returned lines against what the redemption holds; returns them merged with the
/// ones returned before.
pub fn check_returns(
    v: &mut Violations,
    lines: &[pb::ReturnedLine],
    r: &pb::Redemption,
    counted: &Counted,
) -> BTreeMap<String, i64> {
    let mut returned: BTreeMap<String, i64> = r
        .returned
        .iter()
        .map(|l| (l.line_id.clone(), l.quantity))
        .collect();
    for (i, l) in lines.iter().enumerate() {
        let Some((_, quantity, _)) = counted.lines.iter().find(|(id, _, _)| *id == l.line_id)
        else {
            v.add(
                format!("lines.{i}.line_id"),
                "is not a line of the redemption",
            );
            continue;
        };
        let before = returned.get(&l.line_id).copied().unwrap_or(0);
        if l.quantity < 1 || before + l.quantity > *quantity {
            v.add(
                format!("lines.{i}.quantity"),
                format!(
                    "must be 1 to {} (units not yet returned)",
                    quantity - before
                ),
            );
            continue;
        }
        returned.insert(l.line_id.clone(), before + l.quantity);
    }
    returned
}

/// Rolls back: in full (`returned` None) or for returned lines (the merged totals from
/// [`check_returns`]). `status` is ROLLED_BACK, or EXPIRED for a reservation that ran out.
pub async fn rollback(
    txn: &DatabaseTransaction,
    tenant: &str,
    mut r: pb::Redemption,
    mut counted: Counted,
    returned: Option<BTreeMap<String, i64>>,
    status: pb::RedemptionStatus,
    reason: &str,
) -> Result<pb::Redemption, Error> {
    let reserved = r.status() == pb::RedemptionStatus::Reserved;
    let whole = returned.as_ref().is_none_or(|ret| {
        counted
            .lines
            .iter()
            .all(|(id, q, _)| ret.get(id).copied().unwrap_or(0) >= *q)
    });
    let mut applied = std::mem::take(&mut r.applied);
    let mut by_id: Vec<usize> = (0..applied.len()).collect();
    by_id.sort_by(|&x, &y| applied[x].campaign_id.cmp(&applied[y].campaign_id));
    let mut released = Vec::new();
    for k in by_id {
        let a = &mut applied[k];
        let release = if whole {
            a.discount - a.released_discount
        } else {
            let ret = returned.as_ref().cloned().unwrap_or_default();
            let total: i64 = counted
                .line_discounts
                .get(&a.campaign_id)
                .map(|lines| {
                    lines
                        .iter()
                        .map(|(line, amount)| {
                            let quantity = counted
                                .lines
                                .iter()
                                .find(|(id, _, _)| id == line)
                                .map_or(1, |(_, q, _)| *q)
                                .max(1);
                            let back = ret.get(line).copied().unwrap_or(0);
                            div_half_even(
                                i128::from(*amount) * i128::from(back),
                                i128::from(quantity),
                            )
                        })
                        .sum()
                })
                .unwrap_or(0);
            total - a.released_discount
        };
        a.released_discount += release;
        released.push((a.campaign_id.clone(), a.code.clone(), release));
    }
    let value_back = if whole {
        r.order_value - counted.order_value_released
    } else {
        let ret = returned.clone().unwrap_or_default();
        let total: i64 = counted
            .lines
            .iter()
            .map(|(id, _, price)| price * ret.get(id).copied().unwrap_or(0))
            .sum();
        total - counted.order_value_released
    };
    counted.order_value_released += value_back;
    for (campaign, code, release) in &released {
        let keys = Keys {
            tenant,
            customer: &r.customer_id,
            campaign,
            code,
            period: counted.periods.get(campaign).copied(),
        };
        if whole {
            give_back_uses(txn, &keys).await?;
        }
        count_campaign(txn, &keys, -i64::from(whole), -release, -value_back).await?;
    }
    if whole {
        let now = tessera_store::now_micros();
        pool_codes::report_uses(txn, tenant, &r, &counted, -1, "give-back", now).await?;
        if !reserved {
            cashback::cancel(txn, tenant, &r, reason).await?;
        }
    }
    r.applied = applied;
    if let Some(ret) = &returned {
        r.returned = ret
            .iter()
            .map(|(line_id, quantity)| pb::ReturnedLine {
                line_id: line_id.clone(),
                quantity: *quantity,
            })
            .collect();
    }
    if whole {
        r.set_status(status);
        r.expires_at = None;
        if !r.order_id.is_empty() {
            txn.execute_raw(stmt(
                txn,
                "DELETE FROM redemption_orders WHERE tenant_id = $1 AND order_id = $2 \
                 AND redemption_id = $3",
                [
                    tenant.into(),
                    r.order_id.clone().into(),
                    r.id.clone().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        }
        bump_facts(txn, tenant, &r.customer_id).await?;
    }
    if reserved {
        spends::release_later(txn, tenant, &r).await?;
    } else {
        spends::refund_later(txn, tenant, &mut r, counted.order_value_released, whole).await?;
    }
    store(txn, tenant, &r, &counted).await?;
    let event = if status == pb::RedemptionStatus::Expired {
        "redemption.expired"
    } else {
        "redemption.rolled_back"
    };
    let mut data = event_data(&r);
    data["partial"] = json!(!whole);
    data["reason"] = json!(reason);
    data["order_value_released"] = json!(value_back);
    data["discount_released"] = json!(released.iter().map(|(_, _, d)| d).sum::<i64>());
    outbox::enqueue(txn, tenant, event, &data).await?;
    Ok(r)
}

/// Releases reservations whose hold ended (every tenant; each in its own transaction, safe
/// with several replicas). Returns how many it released.
pub async fn expire_due(db: &Db, now: i64) -> Result<usize, Error> {
    let rows = db
        .conn()
        .query_all_raw(stmt(
            db.conn(),
            "SELECT tenant_id, id FROM redemptions WHERE status = 'reserved' \
             AND expires_at <= $1 ORDER BY expires_at LIMIT 100",
            [now.into()],
        ))
        .await
        .map_err(db_error)?;
    let mut released = 0;
    for row in rows {
        let tenant: String = row.try_get_by_index(0).map_err(db_error)?;
        let id: String = row.try_get_by_index(1).map_err(db_error)?;
        let txn = db.begin_write().await?;
        match load(&txn, &tenant, &id, true).await? {
            Some((r, counted)) if r.status() == pb::RedemptionStatus::Reserved => {
                rollback(
                    &txn,
                    &tenant,
                    r,
                    counted,
                    None,
                    pb::RedemptionStatus::Expired,
                    "reservation expired",
                )
                .await?;
                txn.commit().await.map_err(db_error)?;
                released += 1;
            }
            _ => txn.rollback().await.map_err(db_error)?,
        }
    }
    Ok(released)
}
