//! Redeem and Reserve commit a plan ([`super::plan`]) in one transaction: they take the
//! customer's, the period's and the code's uses under their row locks, write the redemption
//! and its event, and take the campaigns' budgets last (sorted, so concurrent redemptions
//! queue instead of deadlocking), from slices spread over rows (`counters::take_budget`). N
//! concurrent redemptions of the last unit give exactly one winner: row locks on
//! PostgreSQL, one writer at a time on SQLite.
//!
//! What was counted is stored with the redemption ([`Counted`]), so a rollback or an
//! expired reservation gives back exactly that and nothing else.

use std::collections::BTreeMap;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_effects::{Cart, Outcome, Target};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::{Code, Error};
use tessera_store::db::Backend;
use tessera_store::outbox::{self, micros_to_timestamp};
use tessera_store::{db_error, stmt};

use super::plan::*;
use crate::counters::core::{period_name, period_start};
use crate::counters::{Keys, count_campaign, raw, take_budget, take_use};
use crate::facts::Settings;
use crate::{cashback, pool_codes, spends};

/// Default hold of a reservation.
pub const DEFAULT_HOLD_SECONDS: u32 = 900;

// ---------------------------------------------------------------------------------------
// Counters.

fn keys_for<'k>(
    tenant: &'k str,
    customer: &'k str,
    p: &'k Pick,
    periods: &BTreeMap<String, i64>,
) -> Keys<'k> {
    Keys {
        tenant,
        customer,
        campaign: &p.campaign.def.id,
        code: &p.code,
        period: periods.get(p.id()).copied(),
    }
}

/// Takes the customer's, the period's and the code's uses of one campaign, each within its
/// limit: `Err` with the reason when this order would break one.
async fn take_uses(
    txn: &DatabaseTransaction,
    keys: &Keys<'_>,
    p: &Pick,
) -> Result<Result<(), (pb::Reason, String)>, Error> {
    let l = p.campaign.def.limits.unwrap_or_default();
    let customer = take_use(
        txn,
        "customer_usage",
        &keys.customer(),
        "redemptions",
        l.max_redemptions_per_customer,
    )
    .await?;
    if let Some(used) = customer {
        return Ok(Err((
            pb::Reason::CustomerLimitReached,
            format!(
                "customer used it {used} of {} times",
                l.max_redemptions_per_customer
            ),
        )));
    }
    if let Some(start) = keys.period {
        let period = take_use(
            txn,
            "customer_period_usage",
            &keys.period(start),
            "redemptions",
            l.max_redemptions_per_customer_per_period,
        )
        .await?;
        if let Some(used) = period {
            return Ok(Err((
                pb::Reason::CustomerLimitReached,
                format!(
                    "customer used it {used} of {} times this {}",
                    l.max_redemptions_per_customer_per_period,
                    period_name(l.period())
                ),
            )));
        }
    }
    if !keys.code.is_empty() {
        // A catalog code allows its own uses; a code listed in the campaign, the campaign's.
        let (max, reason) = match p.pooled {
            Some(max) => (max, pb::Reason::CodeUsed),
            None => (l.max_uses_per_code, pb::Reason::BudgetExhausted),
        };
        let code = take_use(txn, "code_usage", &keys.code(), "uses", max).await?;
        if let Some(used) = code {
            return Ok(Err((reason, format!("code used {used} of {max} times"))));
        }
    }
    Ok(Ok(()))
}

/// Where a redemption is stored.
pub fn status_name(s: pb::RedemptionStatus) -> &'static str {
    match s {
        pb::RedemptionStatus::Reserved => "reserved",
        pb::RedemptionStatus::Redeemed => "redeemed",
        pb::RedemptionStatus::RolledBack => "rolled_back",
        pb::RedemptionStatus::Expired => "expired",
        pb::RedemptionStatus::Unspecified => "unspecified",
    }
}

/// A checkout to commit.
#[derive(Clone, Copy)]
pub struct Commit<'a> {
    pub tenant: &'a str,
    pub checkout: &'a pb::Checkout,
    pub cart: &'a Cart,
    pub input_settings: &'a Settings,
    pub now: i64,
    /// `Some(seconds)`: a reservation held that long.
    pub hold: Option<u32>,
    /// The redemption's id.
    pub id: &'a str,
    /// The wallet, for what the redemption spends from it.
    pub holder: &'a spends::Holder,
    /// What the plan spends from the wallet, held already.
    pub held: &'a [pb::WalletSpend],
}

/// When a redemption's wallet holds may end: `now` for a redemption, the end of a
/// reservation held `hold` seconds.
pub fn deadline(now: i64, hold: Option<u32>) -> i64 {
    now + hold.map_or(0, |s| i64::from(s) * 1_000_000)
}

/// A campaign that did not fit under its lock.
type Refused = (Pick, (pb::Reason, String));

/// Commits a plan in `txn`: one live redemption per order; the customer's, period's and
/// code's limits checked under their locks; the redemption, its counts and its event
/// written; and last the campaigns' budgets taken from their slices, so the rows
/// redemptions of a campaign share stay locked only for the commit. A requested
/// incentive that no longer fits fails the call; an automatic one is dropped and the rest
/// applied again (inside a savepoint, so what was written for it goes).
pub async fn commit(
    txn: &DatabaseTransaction,
    job: Commit<'_>,
    mut plan: Plan,
) -> Result<pb::Redemption, Error> {
    if plan.outcome.points_spent > 0 && job.checkout.program_id.is_empty() {
        return Err(Error::invalid_field(
            "checkout.program_id",
            "is required: the incentives spend points, taken from this programme's balance",
        ));
    }
    let id = job.id;
    // Two redemptions of one order queue on its row; the second returns the first.
    if !job.checkout.order_id.is_empty()
        && let Some(existing) = claim_order(txn, job.tenant, &job.checkout.order_id, id).await?
    {
        return Ok(existing);
    }
    let mut held = job.held.to_vec();
    loop {
        let guarded = plan
            .picks
            .iter()
            .any(|p| !p.strict && p.campaign.has_budget());
        let outcome = if guarded {
            // A budget that refuses undoes the attempt. Kept, the savepoint is released by the
            // commit: the budget's rows, locked last, wait for one round trip less.
            raw(txn, "SAVEPOINT redeem_attempt").await?;
            let outcome = attempt(txn, &job, &plan, id, &held).await?;
            if outcome.is_err() {
                raw(txn, "ROLLBACK TO SAVEPOINT redeem_attempt").await?;
            }
            outcome
        } else {
            attempt(txn, &job, &plan, id, &held).await?
        };
        let (p, (reason, detail)) = match outcome {
            Ok(mut record) => {
                if !spends::same(&record.spends, &held) {
                    // An incentive dropped under its lock changed what is spent: the caller
                    // releases what it held, this holds what is spent now.
                    let wanted = std::mem::take(&mut record.spends);
                    let customer = record.customer_id.as_str();
                    let again = format!("{id}:replanned");
                    let until = deadline(job.now, job.hold);
                    held = spends::hold(job.holder, &again, customer, wanted, until).await?;
                    record.spends.clone_from(&held);
                    txn.execute_raw(stmt(
                        txn,
                        "UPDATE redemptions SET record = $3 WHERE tenant_id = $1 AND id = $2",
                        [job.tenant.into(), id.into(), record.encode_to_vec().into()],
                    ))
                    .await
                    .map_err(db_error)?;
                    spends::record(txn, job.tenant, &record, job.hold.is_some()).await?;
                }
                return Ok(record);
            }
            Err(refused) => refused,
        };
        if p.strict {
            let what = if p.code.is_empty() {
                format!("campaign `{}`", p.id())
            } else {
                format!("code `{}`", p.code)
            };
            return Err(refusal(what, reason, &detail));
        }
        plan.notes.note(p.id(), (reason, detail));
        let rest: Vec<Pick> = plan
            .picks
            .into_iter()
            .filter(|q| q.id() != p.id())
            .collect();
        let cart = Cart {
            points_balance: plan.points_balance,
            ..job.cart.clone()
        };
        let (picks, outcome) = combine(rest, &cart, &mut plan.notes);
        plan.picks = picks;
        plan.outcome = outcome;
        if plan.picks.is_empty() {
            return Err(Error::new(
                Code::FailedPrecondition,
                "no incentive applies to this checkout",
            )
            .with_reason("NOTHING_APPLIES"));
        }
    }
}

/// One try at writing `plan`; `Ok(Err(..))` names the first incentive that did not fit.
async fn attempt(
    txn: &DatabaseTransaction,
    job: &Commit<'_>,
    plan: &Plan,
    id: &str,
    held: &[pb::WalletSpend],
) -> Result<Result<pb::Redemption, Refused>, Error> {
    let Commit {
        tenant,
        checkout,
        cart,
        input_settings: settings,
        now,
        hold,
        ..
    } = *job;
    let order_value: i64 = cart.lines.iter().map(tessera_effects::Line::total).sum();
    let periods: BTreeMap<String, i64> = plan
        .picks
        .iter()
        .filter_map(|p| {
            let l = p.campaign.def.limits.as_ref()?;
            (l.max_redemptions_per_customer_per_period > 0)
                .then(|| (p.id().to_string(), period_start(l.period(), now, settings)))
        })
        .collect();
    let mut by_id: Vec<&Pick> = plan.picks.iter().collect();
    by_id.sort_by(|a, b| a.id().cmp(b.id()));
    // The customer's own rows first (they are not shared).
    for p in &by_id {
        let keys = keys_for(tenant, &checkout.customer_id, p, &periods);
        if let Err(why) = take_uses(txn, &keys, p).await? {
            return Ok(Err(((*p).clone(), why)));
        }
    }
    let mut record = redemption(plan, checkout, order_value);
    // What was held before the transaction, unless this attempt spends otherwise.
    let as_held = spends::same(&record.spends, held);
    if as_held {
        record.spends = held.to_vec();
    }
    record.id = id.to_string();
    record.created_at = Some(micros_to_timestamp(now));
    let (status, expires_at) = match hold {
        Some(seconds) => (
            pb::RedemptionStatus::Reserved,
            now + i64::from(seconds) * 1_000_000,
        ),
        None => (pb::RedemptionStatus::Redeemed, 0),
    };
    record.set_status(status);
    if hold.is_some() {
        record.expires_at = Some(micros_to_timestamp(expires_at));
    }
    let counted = Counted {
        periods: periods.clone(),
        lines: cart
            .lines
            .iter()
            .map(|l| (l.id.clone(), l.quantity, l.unit_price))
            .collect(),
        order_value_released: 0,
        line_discounts: line_discounts(&plan.outcome),
        pool_codes: by_id
            .iter()
            .filter(|p| p.pooled.is_some())
            .map(|p| p.code.clone())
            .collect(),
        card_codes: by_id
            .iter()
            .filter(|p| p.pooled == Some(0))
            .map(|p| p.code.clone())
            .collect(),
        cashback_days: cashback::pending_days(&plan.picks),
        currency: checkout
            .cart
            .as_ref()
            .map(|c| c.currency.clone())
            .unwrap_or_default(),
    };
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO redemptions (tenant_id, id, customer_id, order_id, status, created_at, \
         expires_at, record, counted) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            tenant.into(),
            id.into(),
            checkout.customer_id.clone().into(),
            checkout.order_id.clone().into(),
            status_name(status).into(),
            now.into(),
            expires_at.into(),
            record.encode_to_vec().into(),
            serde_json::to_string(&counted)
                .map_err(Error::internal)?
                .into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    // The customer's redemption counts are facts rules read.
    bump_facts(txn, tenant, &checkout.customer_id).await?;
    let event = if hold.is_some() {
        "redemption.reserved"
    } else {
        "redemption.succeeded"
    };
    outbox::enqueue(txn, tenant, event, &event_data(&record)).await?;
    pool_codes::report_uses(txn, tenant, &record, &counted, 1, "take", now).await?;
    if hold.is_none() {
        let (currency, days) = (&counted.currency, counted.cashback_days);
        cashback::credit(txn, tenant, &record, currency, days, now).await?;
    }
    if as_held {
        spends::record(txn, tenant, &record, hold.is_some()).await?;
    }
    // The shared rows last.
    for p in &by_id {
        let keys = keys_for(tenant, &checkout.customer_id, p, &periods);
        let (discount, _, _) = amounts(&plan.outcome, p.id());
        if p.campaign.has_budget() {
            if let Err(why) = take_budget(txn, &keys, &p.campaign, discount, order_value).await? {
                return Ok(Err(((*p).clone(), why)));
            }
        } else {
            count_campaign(txn, &keys, 1, discount, order_value).await?;
        }
    }
    Ok(Ok(record))
}

pub(crate) async fn bump_facts(
    txn: &DatabaseTransaction,
    tenant: &str,
    customer: &str,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "UPDATE customers SET facts_version = facts_version + 1 \
         WHERE tenant_id = $1 AND id = $2",
        [tenant.into(), customer.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

fn line_discounts(outcome: &Outcome) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for a in &outcome.adjustments {
        if let Target::Line(line) = &a.target {
            *out.entry(a.reward_id.clone())
                .or_default()
                .entry(line.clone())
                .or_default() += a.amount;
        }
    }
    out
}

pub(crate) fn event_data(r: &pb::Redemption) -> serde_json::Value {
    let outcome = r.outcome.clone().unwrap_or_default();
    json!({
        "redemption_id": r.id,
        "customer_id": r.customer_id,
        "order_id": r.order_id,
        "status": r.status().as_str_name(),
        "order_value": r.order_value,
        "discount": outcome.discount,
        "shipping_discount": outcome.shipping_discount,
        "cashback": outcome.cashback,
        "total_due": outcome.total_due,
        "applied": r.applied.iter().map(|a| json!({
            "campaign_id": a.campaign_id,
            "reward_id": a.reward_id,
            "code": a.code,
            "discount": a.discount,
            "released_discount": a.released_discount,
        })).collect::<Vec<_>>(),
        "spends": r.spends.iter().map(|s| {
            let asset = s.asset.clone().unwrap_or_default();
            json!({
                "asset_kind": asset.kind().as_str_name(),
                "asset_code": asset.code,
                "amount": s.amount,
                "refunded": s.refunded,
            })
        }).collect::<Vec<_>>(),
    })
}

/// Takes the order for redemption `id`; returns the live redemption that holds it already.
async fn claim_order(
    txn: &DatabaseTransaction,
    tenant: &str,
    order: &str,
    id: &str,
) -> Result<Option<pb::Redemption>, Error> {
    let inserted = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO redemption_orders (tenant_id, order_id, redemption_id) \
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            [tenant.into(), order.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    if inserted.rows_affected() == 1 {
        return Ok(None);
    }
    let lock = Backend::of(txn).row_lock();
    let holder: String = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT redemption_id FROM redemption_orders \
                 WHERE tenant_id = $1 AND order_id = $2{lock}"
            ),
            [tenant.into(), order.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("order row vanished"))?
        .try_get_by_index(0)
        .map_err(db_error)?;
    if let Some((existing, _)) = load(txn, tenant, &holder, false).await?
        && matches!(
            existing.status(),
            pb::RedemptionStatus::Reserved | pb::RedemptionStatus::Redeemed
        )
    {
        return Ok(Some(existing));
    }
    txn.execute_raw(stmt(
        txn,
        "UPDATE redemption_orders SET redemption_id = $3 WHERE tenant_id = $1 AND order_id = $2",
        [tenant.into(), order.into(), id.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(None)
}

/// A stored redemption and what it counted; `lock` takes its row for the transaction.
pub async fn load<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
    lock: bool,
) -> Result<Option<(pb::Redemption, Counted)>, Error> {
    let lock = if lock {
        Backend::of(conn).row_lock()
    } else {
        ""
    };
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!(
                "SELECT record, counted FROM redemptions WHERE tenant_id = $1 AND id = $2{lock}"
            ),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let record: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let counted: String = row.try_get_by_index(1).map_err(db_error)?;
    Ok(Some((
        pb::Redemption::decode(record.as_slice()).map_err(Error::internal)?,
        serde_json::from_str(&counted).map_err(Error::internal)?,
    )))
}

pub(crate) async fn store(
    txn: &DatabaseTransaction,
    tenant: &str,
    r: &pb::Redemption,
    counted: &Counted,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "UPDATE redemptions SET status = $3, record = $4, counted = $5 \
         WHERE tenant_id = $1 AND id = $2",
        [
            tenant.into(),
            r.id.clone().into(),
            status_name(r.status()).into(),
            r.encode_to_vec().into(),
            serde_json::to_string(counted)
                .map_err(Error::internal)?
                .into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Brute-force guard.
