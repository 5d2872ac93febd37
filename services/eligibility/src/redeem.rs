//! Validation, redemption and two-phase checkout.
//!
//! One computation serves Validate, Redeem and Reserve ([`plan`]): the candidates (the
//! automatic campaigns, or the ones the caller names, plus those the codes unlock) are
//! evaluated as in qualification, stacked by the tenant's and the campaigns' policy
//! ([`stack`]) and applied together by the cart-effect engine.
//!
//! Redeem and Reserve then [`commit`] in one transaction: they take the customer's, the
//! period's and the code's uses under their row locks, write the redemption and its event,
//! and take the campaigns' budgets last (sorted, so concurrent redemptions queue instead of
//! deadlocking), from slices spread over rows (`counters::take_budget`). N concurrent
//! redemptions of the last unit give exactly one winner: row locks on PostgreSQL, one writer
//! at a time on SQLite.
//!
//! What was counted is stored with the redemption, so a rollback or an expired reservation
//! gives back exactly that and nothing else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{Datelike, NaiveDate, TimeZone};
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_effects::engine::div_half_even;
use tessera_effects::{Application, Cart, Effect, Outcome, Target, apply, wire};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error};
use tessera_store::db::Backend;
use tessera_store::outbox::{self, micros_to_timestamp};
use tessera_store::{Db, db_error, stmt};

use crate::campaigns::{Compiled, Index};
use crate::counters::{Keys, count_campaign, give_back_uses, raw, take_budget, take_use};
use crate::facts::Settings;
use crate::qualify::{self, Input, Notes, UsageMap};
use crate::{cashback, pool_codes, spends};

/// Unknown codes one customer may try in [`ATTEMPT_WINDOW_MICROS`].
pub const MAX_FAILED_ATTEMPTS_PER_CUSTOMER: i64 = 10;
/// Unknown codes one caller (API key, principal) may try in the window, all customers.
pub const MAX_FAILED_ATTEMPTS_PER_PRINCIPAL: i64 = 100;
/// The window of [`MAX_FAILED_ATTEMPTS`]: 15 minutes.
pub const ATTEMPT_WINDOW_MICROS: i64 = 15 * 60 * 1_000_000;
/// Default hold of a reservation.
pub const DEFAULT_HOLD_SECONDS: u32 = 900;

/// An incentive chosen (or a candidate for it).
#[derive(Clone)]
pub struct Pick {
    pub campaign: Arc<Compiled>,
    /// The code that unlocked it.
    pub code: String,
    /// The caller asked for it (by code or id): if it cannot apply, the call fails.
    pub strict: bool,
    /// Its value on the cart on its own (the selection order's tie-break).
    pub own_value: i64,
    /// A gift card unlocked by its code: the value its wallet account holds, which caps the
    /// card's face value.
    pub card: Option<i64>,
    /// A catalog code unlocked it: the uses that code allows.
    pub pooled: Option<i64>,
}

impl Pick {
    pub(crate) fn id(&self) -> &str {
        &self.campaign.def.id
    }

    fn reward_id(&self) -> &str {
        self.campaign
            .application
            .as_ref()
            .map_or("", |a| a.reward_id.as_str())
    }
}

/// What a checkout would get.
pub struct Plan {
    /// The points it was planned with (the wallet's balance, see [`Cart::points_balance`]).
    pub points_balance: i64,
    /// Applied, in application order.
    pub picks: Vec<Pick>,
    /// Their combined effect; adjustments labelled by campaign id.
    pub outcome: Outcome,
    pub notes: Notes,
}

/// Checks a checkout; returns the engine's cart.
pub fn check_checkout(
    v: &mut Violations,
    checkout: Option<&pb::Checkout>,
    settings: &Settings,
) -> Cart {
    let Some(c) = checkout else {
        v.add("checkout", "is required");
        return Cart::default();
    };
    tessera_store::api::check_customer_id(v, "checkout.customer_id", &c.customer_id);
    if c.order_id.len() > 128 {
        v.add("checkout.order_id", "must be at most 128 characters");
    }
    let cart = qualify::check_cart(v, "checkout.cart", c.cart.as_ref(), settings);
    if c.codes.len() > 20 {
        v.add("checkout.codes", "must hold at most 20 codes");
    }
    for (i, code) in c.codes.iter().enumerate() {
        if code.is_empty() || code.len() > 64 {
            v.add(format!("checkout.codes.{i}"), "must be 1 to 64 characters");
        }
    }
    if c.campaign_ids.len() > 100 {
        v.add("checkout.campaign_ids", "must hold at most 100 ids");
    }
    for (i, id) in c.campaign_ids.iter().enumerate() {
        if id.is_empty() || id.len() > 128 {
            v.add(
                format!("checkout.campaign_ids.{i}"),
                "must be 1 to 128 characters",
            );
        }
    }
    if c.program_id.len() > 64 {
        v.add("checkout.program_id", "must be at most 64 characters");
    }
    cart
}

/// The campaigns to evaluate: the named ones (or every automatic candidate of the index)
/// plus every campaign the codes belong to (listed in the campaign, or the pool of a catalog
/// code in `pooled`, resolved already). A code or id the tenant does not have is NOT_FOUND,
/// worded the same whether another tenant has it or nobody does.
pub fn candidates(
    index: &Index,
    checkout: &pb::Checkout,
    pooled: &[pool_codes::Unlocked],
    automatic: impl FnOnce() -> Vec<u32>,
) -> Result<(Vec<u32>, HashMap<u32, String>), Error> {
    let mut out = if checkout.campaign_ids.is_empty() {
        automatic()
    } else {
        let mut named = Vec::with_capacity(checkout.campaign_ids.len());
        for id in &checkout.campaign_ids {
            named.push(
                index
                    .find(id)
                    .ok_or_else(|| Error::not_found(format!("campaign `{id}`")))?,
            );
        }
        named
    };
    let mut unlocked = HashMap::new();
    for code in &checkout.codes {
        let (code, owners) = match index.code_owners(code) {
            [] => {
                let code = pool_codes::core::normalize(code);
                match pooled.iter().find(|p| p.code == code) {
                    Some(p) => (code, index.pool_owners(&p.pool_id)),
                    None => {
                        return Err(Error::not_found(format!("code `{code}`"))
                            .with_reason("CODE_NOT_FOUND"));
                    }
                }
            }
            owners => (code.clone(), owners),
        };
        for &i in owners {
            unlocked.insert(i, code.clone());
            out.push(i);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok((out, unlocked))
}

/// Evaluates, stacks and applies: what the checkout gets now. Fails when something the
/// caller asked for (a code, a named campaign) cannot apply. `cards` holds the wallet value
/// of the gift-card codes among `unlocked` (a card holding nothing does not apply).
pub fn plan(
    index: &Index,
    candidates: &[u32],
    unlocked: &HashMap<u32, String>,
    strict_ids: bool,
    input: &Input,
    usage: &UsageMap,
    cards: &HashMap<String, i64>,
) -> Result<Plan, Error> {
    let present = qualify::presence(index, input);
    let mut notes = Notes::new(pb::Explain::All);
    // Without points, what spends them cannot apply, whatever else holds.
    let no_points = input.cart.points_balance <= 0;
    let evaluated: Vec<u32> = candidates
        .iter()
        .copied()
        .filter(|&i| {
            let c = &index.campaigns[i as usize];
            if no_points && c.spends_points() {
                let why = "the customer has no points to spend".to_string();
                notes.note(&c.def.id, (pb::Reason::InsufficientBalance, why));
                return false;
            }
            true
        })
        .collect();
    let qualified = qualify::evaluate(index, &evaluated, input, &present, usage, &mut notes);
    let mut picks = Vec::with_capacity(qualified.len());
    for (c, q) in qualified {
        let at = index.find(&c.def.id).unwrap_or_default();
        let code = unlocked.get(&at).cloned().unwrap_or_default();
        let card =
            (c.is_gift_card() && !code.is_empty()).then(|| cards.get(&code).copied().unwrap_or(0));
        if card == Some(0) {
            notes.note(
                &c.def.id,
                (
                    pb::Reason::InsufficientBalance,
                    format!("the gift card `{code}` holds no value for this customer"),
                ),
            );
            continue;
        }
        let pooled = input
            .pool_codes
            .iter()
            .find(|p| p.code == code)
            .map(|p| p.max_uses);
        picks.push(Pick {
            strict: strict_ids || unlocked.contains_key(&at),
            own_value: q.value,
            campaign: c,
            code,
            card,
            pooled,
        });
    }
    let picks = stack(picks, input.settings.max_incentives_per_order, &mut notes);
    let (picks, outcome) = combine(picks, input.cart, &mut notes);
    let plan = Plan {
        points_balance: input.cart.points_balance,
        picks,
        outcome,
        notes,
    };
    refuse_strict(index, candidates, unlocked, strict_ids, &plan)?;
    Ok(plan)
}

/// Fails when a code, or a campaign named by the caller, is not in the plan.
fn refuse_strict(
    index: &Index,
    candidates: &[u32],
    unlocked: &HashMap<u32, String>,
    strict_ids: bool,
    plan: &Plan,
) -> Result<(), Error> {
    let applied: HashSet<&str> = plan.picks.iter().map(Pick::id).collect();
    let why = |id: &str| -> (pb::Reason, String) {
        plan.notes
            .rejected
            .iter()
            .rev()
            .find(|r| r.campaign_id == id)
            .map(|r| (r.reason(), r.detail.clone()))
            .unwrap_or((pb::Reason::NoEffect, "does not apply".into()))
    };
    // A code fails when none of its campaigns applies.
    let mut codes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (&i, code) in unlocked {
        codes
            .entry(code.as_str())
            .or_default()
            .push(&index.campaigns[i as usize].def.id);
    }
    for (code, mut owners) in codes {
        owners.sort_unstable();
        if owners.iter().any(|id| applied.contains(id)) {
            continue;
        }
        let (reason, detail) = why(owners[0]);
        return Err(refusal(format!("code `{code}`"), reason, &detail));
    }
    if strict_ids {
        for &i in candidates {
            let id = index.campaigns[i as usize].def.id.as_str();
            if !unlocked.contains_key(&i) && !applied.contains(id) {
                let (reason, detail) = why(id);
                return Err(refusal(format!("campaign `{id}`"), reason, &detail));
            }
        }
    }
    if plan.picks.is_empty() {
        return Err(Error::new(
            Code::FailedPrecondition,
            "no incentive applies to this checkout",
        )
        .with_reason("NOTHING_APPLIES"));
    }
    Ok(())
}

/// FAILED_PRECONDITION with the machine-readable reason (e.g. `ENDED`,
/// `BUDGET_EXHAUSTED`).
pub(crate) fn refusal(what: String, reason: pb::Reason, detail: &str) -> Error {
    let name = reason
        .as_str_name()
        .strip_prefix("REASON_")
        .unwrap_or_default();
    Error::new(
        Code::FailedPrecondition,
        format!("{what} cannot be used: {detail}"),
    )
    .with_reason(name)
}

/// Chooses what applies together. Selection order: what the caller asked for first, then
/// priority (higher first), value on its own (higher first), id. A candidate is left out,
/// with the reason, when the order already has the tenant's maximum, when it is exclusive
/// and something applies or something exclusive applies, when an incentive of its stacking
/// group applies, or when it and an applied one are not combinable (either side's list).
pub fn stack(mut picks: Vec<Pick>, max: u32, notes: &mut Notes) -> Vec<Pick> {
    picks.sort_by(|a, b| {
        b.strict
            .cmp(&a.strict)
            .then(b.campaign.def.priority.cmp(&a.campaign.def.priority))
            .then(b.own_value.cmp(&a.own_value))
            .then(a.id().cmp(b.id()))
    });
    let mut chosen: Vec<Pick> = Vec::with_capacity(picks.len());
    for p in picks {
        match conflict(&chosen, &p, max) {
            Some(why) => notes.note(p.id(), (pb::Reason::ExcludedByStacking, why)),
            None => chosen.push(p),
        }
    }
    chosen
}

fn conflict(chosen: &[Pick], p: &Pick, max: u32) -> Option<String> {
    let c = &p.campaign.def;
    if max > 0 && chosen.len() >= max as usize {
        return Some(format!(
            "the order already has {max} incentives, the most the tenant allows"
        ));
    }
    if c.exclusive && !chosen.is_empty() {
        return Some(format!(
            "it is exclusive and '{}' applies already",
            chosen[0].id()
        ));
    }
    for other in chosen {
        let o = &other.campaign.def;
        if o.exclusive {
            return Some(format!("'{}' is exclusive", o.id));
        }
        if !c.stacking_group.is_empty() && c.stacking_group == o.stacking_group {
            return Some(format!(
                "'{}' of stacking group '{}' applies already",
                o.id, c.stacking_group
            ));
        }
        if excludes(c, o) || excludes(o, c) {
            return Some(format!("not combinable with '{}'", o.id));
        }
    }
    None
}

fn excludes(a: &pb::Campaign, b: &pb::Campaign) -> bool {
    a.not_combinable_with.iter().any(|x| {
        x == &b.id
            || (!b.stacking_group.is_empty()
                && x.strip_prefix("group:") == Some(b.stacking_group.as_str()))
    })
}

/// Applies the picks together (the engine orders them by priority); a pick that does
/// nothing once the others applied is left out with the reason.
fn combine(picks: Vec<Pick>, cart: &Cart, notes: &mut Notes) -> (Vec<Pick>, Outcome) {
    let applications: Vec<Application> = picks
        .iter()
        .filter_map(|p| {
            let mut application = p.campaign.application.clone()?;
            if let (Some(held), Effect::GiftCard { value }) = (p.card, &mut application.effect) {
                *value = (*value).min(held);
            }
            Some(Application {
                reward_id: p.id().to_string(),
                ..application
            })
        })
        .collect();
    let outcome = apply(&applications, cart);
    let used: HashSet<&str> = outcome
        .adjustments
        .iter()
        .map(|a| a.reward_id.as_str())
        .collect();
    let mut kept = Vec::with_capacity(picks.len());
    for p in &picks {
        if used.contains(p.id()) {
            kept.push(p.clone());
        } else {
            let why = outcome
                .skipped
                .iter()
                .find(|(id, _)| id == p.id())
                .map(|(_, why)| why.clone())
                .unwrap_or_else(|| {
                    "nothing left to discount after the incentives before it".into()
                });
            notes.note(p.id(), (pb::Reason::NoEffect, why));
        }
    }
    kept.sort_by(|a, b| {
        b.campaign
            .def
            .priority
            .cmp(&a.campaign.def.priority)
            .then(a.id().cmp(b.id()))
    });
    (kept, outcome)
}

/// What one campaign gave: `(discount, shipping discount, cashback)`.
fn amounts(outcome: &Outcome, id: &str) -> (i64, i64, i64) {
    let mut out = (0, 0, 0);
    for a in outcome.adjustments.iter().filter(|a| a.reward_id == id) {
        match a.target {
            Target::Line(_) => out.0 += a.amount,
            Target::Shipping => out.1 += a.amount,
            Target::Cashback { .. } => out.2 += a.amount,
            _ => {}
        }
    }
    out
}

/// The redemption a plan makes (no id, no status yet).
pub fn redemption(plan: &Plan, checkout: &pb::Checkout, order_value: i64) -> pb::Redemption {
    let reward_of: HashMap<&str, &str> =
        plan.picks.iter().map(|p| (p.id(), p.reward_id())).collect();
    let applied = plan
        .picks
        .iter()
        .map(|p| {
            let (discount, shipping_discount, cashback) = amounts(&plan.outcome, p.id());
            pb::Applied {
                campaign_id: p.id().to_string(),
                reward_id: p.reward_id().to_string(),
                code: p.code.clone(),
                discount,
                shipping_discount,
                cashback,
                released_discount: 0,
            }
        })
        .collect();
    let mut outcome = wire::outcome(plan.outcome.clone());
    for a in &mut outcome.adjustments {
        if let Some(reward) = reward_of.get(a.reward_id.as_str()) {
            a.reward_id = (*reward).to_string();
        }
    }
    let mut not_applied = plan.notes.rejected.clone();
    not_applied.sort_by(|a, b| a.campaign_id.cmp(&b.campaign_id));
    pb::Redemption {
        customer_id: checkout.customer_id.clone(),
        order_id: checkout.order_id.clone(),
        applied,
        outcome: Some(outcome),
        not_applied,
        order_value,
        spends: spends::of_plan(plan, &checkout.program_id),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Counters.

/// What a redemption counted, so it can be given back exactly.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counted {
    /// Per applied campaign: the start of the period its per-period use was counted in.
    #[serde(default)]
    pub periods: BTreeMap<String, i64>,
    /// The cart's lines: `(id, quantity, unit price)`.
    pub lines: Vec<(String, i64, i64)>,
    /// Order value given back by partial rollbacks.
    #[serde(default)]
    pub order_value_released: i64,
    /// Discount per campaign and line, for partial rollbacks.
    #[serde(default)]
    pub line_discounts: BTreeMap<String, BTreeMap<String, i64>>,
    /// The catalog codes whose uses were counted (reported to the catalog when given back).
    #[serde(default)]
    pub pool_codes: Vec<String>,
    /// Those of them that are multi-use gift cards (spent, not used up).
    #[serde(default)]
    pub card_codes: Vec<String>,
    /// The cashback's return window in days, when an applied incentive gives cashback.
    #[serde(default)]
    pub cashback_days: Option<u32>,
    /// The cart's currency (the cashback's).
    #[serde(default)]
    pub currency: String,
}

/// The start (µs) of the tenant-local period holding `now`.
pub fn period_start(period: pb::Period, now: i64, settings: &Settings) -> i64 {
    let local = settings.local(now).date_naive();
    let first = match period {
        pb::Period::Week => {
            local - chrono::Days::new(u64::from(local.weekday().num_days_from_monday()))
        }
        pb::Period::Month => {
            NaiveDate::from_ymd_opt(local.year(), local.month(), 1).unwrap_or(local)
        }
        _ => local,
    };
    let midnight = first.and_hms_opt(0, 0, 0).unwrap_or_default();
    settings
        .time_zone
        .from_local_datetime(&midnight)
        .earliest()
        .map_or(now, |t| t.timestamp_micros())
}

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
                    qualify::period_name(l.period())
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

async fn bump_facts(txn: &DatabaseTransaction, tenant: &str, customer: &str) -> Result<(), Error> {
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

fn event_data(r: &pb::Redemption) -> serde_json::Value {
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

async fn store(
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

// ---------------------------------------------------------------------------------------
// Brute-force guard.

/// Refuses a customer or caller that tried too many unknown codes lately (guessing).
pub async fn check_attempts<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    subjects: &[String],
    now: i64,
) -> Result<(), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT subject, COUNT(*) FROM code_failures WHERE tenant_id = $1 AND at > $2 \
                 AND reason = 'CODE_NOT_FOUND' AND subject IN ({}) GROUP BY subject",
                Db::placeholders(3, subjects.len())
            ),
            [tenant.into(), (now - ATTEMPT_WINDOW_MICROS).into()]
                .into_iter()
                .chain(subjects.iter().map(|s| s.clone().into())),
        ))
        .await
        .map_err(db_error)?;
    for row in rows {
        let subject: String = row.try_get_by_index(0).map_err(db_error)?;
        let failures: i64 = row.try_get_by_index(1).map_err(db_error)?;
        let max = if subject.starts_with("customer:") {
            MAX_FAILED_ATTEMPTS_PER_CUSTOMER
        } else {
            MAX_FAILED_ATTEMPTS_PER_PRINCIPAL
        };
        if failures >= max {
            return Err(Error::new(
                Code::ResourceExhausted,
                "too many unknown codes tried; try again in 15 minutes",
            )
            .with_reason("CODE_ATTEMPTS_EXCEEDED"));
        }
    }
    Ok(())
}

/// Records a failed code attempt (for the limit and the audit log) and the failure event.
pub async fn record_failure(
    db: &Db,
    tenant: &str,
    subjects: &[String],
    checkout: &pb::Checkout,
    err: &Error,
    now: i64,
) -> Result<(), Error> {
    let txn = db.begin_write().await?;
    if !checkout.codes.is_empty() {
        for subject in subjects {
            txn.execute_raw(stmt(
                &txn,
                "INSERT INTO code_failures (tenant_id, subject, code, reason, at) \
                 VALUES ($1, $2, $3, $4, $5)",
                [
                    tenant.into(),
                    subject.clone().into(),
                    checkout.codes.join(",").into(),
                    err.reason.clone().unwrap_or_default().into(),
                    now.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        }
    }
    outbox::enqueue(
        &txn,
        tenant,
        "redemption.failed",
        &json!({
            "customer_id": checkout.customer_id,
            "order_id": checkout.order_id,
            "codes": checkout.codes,
            "campaign_ids": checkout.campaign_ids,
            "reason": err.reason,
            "message": err.message,
        }),
    )
    .await?;
    txn.commit().await.map_err(db_error)
}
