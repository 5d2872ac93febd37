//! Credits: points or money into a customer's account, a new lot with the programme's
//! expiry (extended by the customer's tier), tier activity, and pending credits confirmed.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb, AssetKind};
use tessera_runtime::{Error, RequestContext};
use tessera_store::{Backend, db_error, now_micros, stmt};

use super::accounts::*;
use super::lots::*;
use super::postings::*;
use super::queries::account_balance;
use crate::{programs, rules, tiers};

/// A validated credit.
#[derive(Debug, Clone)]
pub struct Credit {
    pub movement: Movement,
    pub customer_id: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
    /// Explicit lot expiry (µs since the epoch); None: the programme's policy.
    pub expires_at: Option<i64>,
    /// Purchase amount behind a points credit (tiers on amount spent).
    pub spent_amount: i64,
    /// Multiply the amount by the member's tier earn rate.
    pub apply_tier_multiplier: bool,
}

impl Credit {
    /// A plain credit of `amount`: no spend recorded, no tier multiplier.
    pub fn plain(
        movement: Movement,
        customer_id: String,
        asset: Asset,
        amount: i64,
        reason: String,
        expires_at: Option<i64>,
    ) -> Self {
        Self {
            movement,
            customer_id,
            asset,
            amount,
            reason,
            expires_at,
            spent_amount: 0,
            apply_tier_multiplier: false,
        }
    }
}

/// When value earned at `now` expires under a programme's policy, on its calendar.
fn programme_expiry(program: &programs::Program, now: i64) -> Result<Option<i64>, Error> {
    let earned =
        chrono::DateTime::from_timestamp_micros(now).ok_or_else(|| Error::internal("clock"))?;
    Ok(program
        .expiry
        .expires_at(earned, program.time_zone)
        .map(|t| t.timestamp_micros()))
}

/// The programme of a points asset (a programme nobody configured when absent).
pub(crate) async fn programme_of(
    txn: &DatabaseTransaction,
    tenant: &str,
    asset: &Asset,
) -> Result<programs::Program, Error> {
    Ok(programs::find(txn, tenant, &asset.code)
        .await?
        .unwrap_or_else(|| programs::Program::unconfigured(&asset.code)))
}

/// The terms a credit earns under: for points, the member's tier when the programme has
/// tiers (before this credit), and the lot's expiry: the explicit one, else the programme's
/// policy on its calendar, extended by the tier. Other assets do not expire by default.
pub(crate) async fn earning_terms(
    txn: &DatabaseTransaction,
    tenant: &str,
    program: Option<&programs::Program>,
    customer_id: &str,
    explicit: Option<i64>,
    now: i64,
) -> Result<(Option<tiers::Level>, Option<i64>), Error> {
    let Some(program) = program else {
        return Ok((None, explicit));
    };
    let level = match &program.tiers {
        Some(policy) => {
            Some(tiers::current_level(txn, tenant, &program.id, policy, customer_id).await?)
        }
        None => None,
    };
    let expires_at = match explicit {
        Some(at) => Some(at),
        None => programme_expiry(program, now)?
            .map(|at| at + level.as_ref().map_or(0, tiers::Level::extension)),
    };
    Ok((level, expires_at))
}

/// Posts a credit: customer account +amount, the movement's system account −amount, a lot
/// with its expiry, one transaction row, one outbox event. A points credit (not an
/// adjustment) also counts toward the member's tier, which is re-evaluated when the
/// programme has tiers; the tier held before the credit sets its earn rate (when asked) and
/// extends its expiry.
pub async fn credit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    credit: &Credit,
) -> Result<pb::CreditResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    rules::check_expiry(txn, tenant, &credit.asset, credit.expires_at, "expires_at").await?;
    let program = match credit.asset.kind {
        AssetKind::Points => Some(programme_of(txn, tenant, &credit.asset).await?),
        _ => None,
    };
    let tier_policy = program.as_ref().and_then(|p| p.tiers.as_ref());
    let (level, expires_at) = earning_terms(
        txn,
        tenant,
        program.as_ref(),
        &credit.customer_id,
        credit.expires_at,
        now,
    )
    .await?;
    let amount = match &level {
        Some(level) if credit.apply_tier_multiplier => level.multiply(credit.amount),
        _ => credit.amount,
    };
    let customer = account(
        txn,
        tenant,
        Owner::Customer(&credit.customer_id),
        &credit.asset,
    )
    .await?;
    let counter = account(
        txn,
        tenant,
        Owner::System(credit.movement.counter_account),
        &credit.asset,
    )
    .await?;
    let entry = Entry::new(
        credit.movement.kind,
        &credit.customer_id,
        &credit.asset,
        amount,
        &credit.reason,
        now,
    );
    entry.write(txn, ctx).await?;
    insert_lot(txn, tenant, &customer, &entry.id, amount, now, expires_at).await?;
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
    if program.is_some() && credit.movement.kind == CREDIT.kind {
        tiers::record_activity(
            txn,
            tenant,
            &credit.asset.code,
            &credit.customer_id,
            amount,
            credit.spent_amount,
            now,
        )
        .await?;
        if let Some(policy) = tier_policy {
            tiers::evaluate(
                txn,
                ctx,
                backend,
                &credit.asset.code,
                policy,
                &credit.customer_id,
            )
            .await?;
        }
    }
    let balance = account_balance(txn, tenant, &credit.customer_id, &credit.asset, now).await?;
    emit(
        txn,
        tenant,
        &credit.asset,
        credit.movement.event,
        serde_json::json!({
            "transaction_id": entry.id,
            "customer_id": credit.customer_id,
            "amount": amount,
            "balance": balance.available,
            "expires_at": expires_at.and_then(chrono::DateTime::from_timestamp_micros),
            "reason": credit.reason,
        }),
    )
    .await?;
    Ok(pb::CreditResponse {
        transaction: Some(entry.to_proto()),
        balance: Some(balance),
    })
}

/// Moves a customer account's `pending` total (credited value waiting for confirmation,
/// kept on the row beside the balance so a balance is one row read).
pub(crate) async fn move_pending(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    delta: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "UPDATE accounts SET pending = pending + $1 WHERE tenant_id = $2 AND id = $3",
        [delta.into(), tenant.into(), account_id.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}
