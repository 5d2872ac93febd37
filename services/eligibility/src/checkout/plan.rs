//! One computation serves Validate, Redeem and Reserve ([`plan`]), without storage: the
//! candidates (the automatic campaigns, or the ones the caller names, plus those the codes
//! unlock) are evaluated as in qualification, stacked by the tenant's and the campaigns'
//! policy ([`stack`]) and applied together by the cart-effect engine; [`redemption`] is the
//! record a committed plan leaves, [`Counted`] what it counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tessera_effects::{Application, Cart, Effect, Outcome, Target, apply, wire};
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error};

use crate::campaigns::{Compiled, Index};
use crate::counters::core::UsageMap;
use crate::facts::Settings;
use crate::pool_codes::core::{Unlocked, normalize};
use crate::qualify::{self, Input, Notes};

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
    pooled: &[Unlocked],
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
                let code = normalize(code);
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
pub(crate) fn combine(picks: Vec<Pick>, cart: &Cart, notes: &mut Notes) -> (Vec<Pick>, Outcome) {
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
pub(crate) fn amounts(outcome: &Outcome, id: &str) -> (i64, i64, i64) {
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
        spends: of_plan(plan, &checkout.program_id),
        ..Default::default()
    }
}

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

/// What the plan takes from the wallet, one entry per asset (no hold yet).
pub fn of_plan(plan: &Plan, program: &str) -> Vec<pb::WalletSpend> {
    let mut by_asset: BTreeMap<(i32, String), i64> = BTreeMap::new();
    if plan.outcome.points_spent > 0 && !program.is_empty() {
        by_asset.insert(
            (wpb::AssetKind::Points as i32, program.to_string()),
            plan.outcome.points_spent,
        );
    }
    for p in plan.picks.iter().filter(|p| p.card.is_some()) {
        let paid: i64 = plan
            .outcome
            .adjustments
            .iter()
            .filter(|a| a.reward_id == p.id() && a.target == Target::Tender)
            .map(|a| a.amount)
            .sum();
        if paid > 0 {
            *by_asset
                .entry((wpb::AssetKind::GiftCard as i32, p.code.clone()))
                .or_default() += paid;
        }
    }
    by_asset
        .into_iter()
        .map(|((kind, code), amount)| pb::WalletSpend {
            asset: Some(wpb::Asset { kind, code }),
            amount,
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tessera_proto::catalog::v1 as cpb;

    use super::*;

    /// A percent-off campaign with the stacking fields given.
    fn pick(
        id: usize,
        priority: i32,
        group: u8,
        exclusive: bool,
        strict: bool,
        value: i64,
    ) -> Pick {
        let c = pb::Campaign {
            id: format!("c{id}"),
            status: pb::CampaignStatus::Active.into(),
            priority,
            exclusive,
            stacking_group: if group == 0 {
                String::new()
            } else {
                format!("g{group}")
            },
            not_combinable_with: if id.is_multiple_of(5) {
                vec![format!("c{}", id + 1), "group:g3".into()]
            } else {
                Vec::new()
            },
            effect: Some(cpb::Effect {
                kind: Some(cpb::effect::Kind::PercentOff(cpb::PercentOff {
                    percent_bp: 1_000,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        let mut v = Violations::new();
        let compiled =
            crate::campaigns::compile(&mut v, &c, 1, &BTreeMap::new(), None, 0).expect("compiles");
        Pick {
            campaign: Arc::new(compiled),
            code: String::new(),
            strict,
            own_value: value,
            card: None,
            pooled: None,
        }
    }

    /// Candidates as `(priority, stacking group, exclusive, typed, value)`.
    type Spec = (i32, u8, bool, bool, i64);

    fn specs() -> impl Strategy<Value = Vec<Spec>> {
        prop::collection::vec(
            (
                0i32..3,
                0u8..4,
                prop::bool::weighted(0.1),
                prop::bool::weighted(0.2),
                0i64..1_000,
            ),
            0..12,
        )
    }

    fn picks(specs: &[Spec]) -> Vec<Pick> {
        specs
            .iter()
            .enumerate()
            .map(|(i, &(priority, group, exclusive, strict, value))| {
                pick(i, priority, group, exclusive, strict, value)
            })
            .collect()
    }

    #[test]
    fn a_typed_code_and_then_priority_and_value_decide() {
        let mut notes = Notes::new(pb::Explain::All);
        let chosen = stack(
            vec![
                pick(1, 0, 1, false, false, 500),
                pick(2, 0, 1, false, true, 100),
                pick(3, 2, 2, false, false, 10),
                pick(4, 1, 2, false, false, 900),
            ],
            0,
            &mut notes,
        );
        let ids: Vec<&str> = chosen.iter().map(Pick::id).collect();
        assert_eq!(
            ids,
            ["c2", "c3"],
            "the typed code wins its group; priority before value"
        );
        assert_eq!(notes.rejected.len(), 2);
        assert!(
            notes
                .rejected
                .iter()
                .all(|r| r.reason == pb::Reason::ExcludedByStacking as i32)
        );
    }

    proptest! {
        /// Whatever the candidates: at most `max`, no two of one stacking group, an exclusive
        /// one alone, no pair that excludes each other, every candidate chosen or noted with
        /// its reason, typed codes first, and the same answer in any input order.
        #[test]
        fn stacking_keeps_every_rule(specs in specs(), max in 0u32..4, seed in any::<u64>()) {
            let picks = picks(&specs);
            let mut notes = Notes::new(pb::Explain::All);
            let chosen = stack(picks.clone(), max, &mut notes);
            prop_assert_eq!(chosen.len() + notes.rejected.len(), picks.len());
            if max > 0 {
                prop_assert!(chosen.len() <= max as usize);
            }
            for (i, a) in chosen.iter().enumerate() {
                let c = &a.campaign.def;
                prop_assert!(!c.exclusive || chosen.len() == 1);
                for b in &chosen[i + 1..] {
                    let o = &b.campaign.def;
                    prop_assert!(c.stacking_group.is_empty() || c.stacking_group != o.stacking_group);
                    prop_assert!(!excludes(c, o) && !excludes(o, c));
                    prop_assert!(a.strict || !b.strict, "typed codes come first");
                }
            }
            let mut shuffled = picks;
            let n = shuffled.len();
            for i in 0..n {
                shuffled.swap(i, (seed as usize).wrapping_add(i * 7) % n);
            }
            let again = stack(shuffled, max, &mut Notes::new(pb::Explain::All));
            let ids = |p: &[Pick]| p.iter().map(|p| p.id().to_string()).collect::<Vec<_>>();
            prop_assert_eq!(ids(&chosen), ids(&again));
        }
    }
}
