//! Qualification: every incentive of the active campaigns the customer can use now on this
//! cart, with its value (the cart-effect engine, each incentive on its own), best first; and
//! every one that does not, with a machine-readable reason.
//!
//! Order of checks (the first that fails is the reason): kill switch → dates → recurring
//! windows → segments → code → event type → cart items → budget → per-customer limit →
//! rule → effect;
//! then among qualifying exclusive incentives only the most valuable stays. The index
//! ([`crate::campaigns::Index`]) picks the candidates: only they reach the budget, rule and
//! effect checks; the others are classified by the cheap checks alone, and only when the
//! caller asks for every reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tessera_effects::{Cart, apply, wire};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;

use crate::campaigns::{Compiled, Index, Presence, cart_keys};
use crate::counters::core::{Usage, UsageMap, Verdict, check_limits, period_start};
use crate::facts::{self, Facts, Settings};
use crate::rules;

/// What the request brings, prepared once.
pub struct Input<'a> {
    pub facts: &'a Facts,
    pub segments: &'a BTreeSet<String>,
    pub cart: &'a Cart,
    pub currency: &'a str,
    pub codes: &'a [String],
    /// The catalog codes among `codes` that may be used now.
    pub pool_codes: &'a [crate::pool_codes::core::Unlocked],
    pub event: Option<&'a pb::Event>,
    pub tier: Option<&'a str>,
    pub now: i64,
    pub settings: &'a Settings,
}

fn reject(reason: pb::Reason, detail: impl Into<String>) -> Verdict {
    Err((reason, detail.into()))
}

/// The checks that need neither counters, rules nor the engine: the first that fails.
pub fn cheap_reason(
    index: &Index,
    i: usize,
    input: &Input,
    present: &Presence,
) -> Option<pb::Reason> {
    let p = &index.pre[i];
    let c = &index.campaigns[i];
    Some(if !p.active {
        pb::Reason::Disabled
    } else if input.now < p.starts_at {
        pb::Reason::NotStarted
    } else if input.now >= p.ends_at {
        pb::Reason::Ended
    } else if p.windowed && !c.in_window(input.now, input.settings.time_zone) {
        pb::Reason::OutsideTimeWindow
    } else if !p.segments.is_empty() && !p.segments.iter().any(|s| present.has(*s)) {
        pb::Reason::NotInSegment
    } else if p.needs_code && unlocking_code(c, input).is_none() {
        pb::Reason::CodeRequired
    } else if p.event.is_some_and(|e| !present.has(e)) {
        pb::Reason::RuleFalse
    } else if !p
        .items
        .iter()
        .all(|group| group.iter().any(|k| present.has(*k)))
    {
        pb::Reason::NoMatchingItems
    } else {
        return None;
    })
}

/// The code of the input that unlocks campaign `c`: one it lists, or a catalog code of one
/// of its pools.
fn unlocking_code(c: &Compiled, input: &Input) -> Option<String> {
    c.def
        .codes
        .iter()
        .find(|code| input.codes.contains(code))
        .or_else(|| {
            input
                .pool_codes
                .iter()
                .find(|p| c.def.pool_ids.contains(&p.pool_id))
                .map(|p| &p.code)
        })
        .cloned()
}

/// What a cheap reason means for this campaign, in words.
pub fn cheap_detail(c: &Compiled, reason: pb::Reason) -> String {
    match reason {
        pb::Reason::Disabled => format!("campaign is {}", c.def.status().as_str_name()),
        pb::Reason::NotStarted => "campaign has not started".into(),
        pb::Reason::Ended => "campaign has ended".into(),
        pb::Reason::OutsideTimeWindow => "outside the campaign's hours".into(),
        pb::Reason::NotInSegment => {
            format!("customer is in none of: {}", c.def.segments.join(", "))
        }
        pb::Reason::CodeRequired => "needs a code".into(),
        pb::Reason::RuleFalse => format!(
            "needs a '{}' event",
            c.rule
                .as_ref()
                .and_then(|r| r.event_type.as_deref())
                .unwrap_or_default()
        ),
        _ => "no cart line matches the reward".into(),
    }
}

fn cheap(index: &Index, i: usize, input: &Input, present: &Presence) -> Verdict {
    match cheap_reason(index, i, input, present) {
        Some(reason) => Err((reason, cheap_detail(&index.campaigns[i], reason))),
        None => Ok(()),
    }
}

/// How often the customer redeemed the campaign (the counters redemption keeps).
fn customer_redemptions(facts: &Facts, c: &Compiled) -> i64 {
    facts
        .aggregates
        .redemptions
        .get(&c.def.id)
        .copied()
        .unwrap_or(0)
}

/// The variables every rule of one qualification shares.
pub fn base_context(input: &Input) -> cel::Context<'static, 'static> {
    let mut ctx = cel::Context::with_env(rules::ENV.clone());
    ctx.add_variable_from_value("customer", input.facts.customer_value());
    ctx.add_variable_from_value("order", order_value(input.cart, input.currency));
    ctx.add_variable_from_value("event", facts::event_value(input.event, input.now));
    ctx.add_variable_from_value(
        "segments",
        input.segments.iter().cloned().collect::<Vec<_>>(),
    );
    ctx.add_variable_from_value("tier", input.tier.unwrap_or_default().to_string());
    ctx.add_variable_from_value(
        "now",
        cel::Value::Timestamp(input.settings.local(input.now)),
    );
    ctx
}

fn order_value(cart: &Cart, currency: &str) -> cel::Value {
    use std::collections::HashMap;
    let lines: Vec<cel::Value> = cart
        .lines
        .iter()
        .map(|l| {
            HashMap::from([
                ("sku", cel::Value::from(l.sku.clone())),
                ("categories", l.categories.clone().into()),
                ("collections", l.collections.clone().into()),
                ("quantity", cel::Value::Int(l.quantity)),
                ("unit_price", cel::Value::Int(l.unit_price)),
                ("total", cel::Value::Int(l.total())),
                ("on_sale", cel::Value::Bool(l.on_sale)),
            ])
            .into()
        })
        .collect();
    let subtotal: i64 = cart.lines.iter().map(tessera_effects::Line::total).sum();
    let quantity: i64 = cart.lines.iter().map(|l| l.quantity).sum();
    HashMap::from([
        ("currency", cel::Value::from(currency.to_string())),
        ("subtotal", cel::Value::Int(subtotal)),
        ("total", cel::Value::Int(subtotal)),
        ("shipping", cel::Value::Int(cart.shipping)),
        ("quantity", cel::Value::Int(quantity)),
        ("lines", lines.into()),
    ])
    .into()
}

fn rule(c: &Compiled, base: &cel::Context, usage: Usage, facts: &Facts) -> Verdict {
    let Some(rule) = &c.rule else {
        return Ok(());
    };
    let mut scope = base.new_inner_scope();
    let mine = customer_redemptions(facts, c);
    scope.add_variable_from_value(
        "campaign",
        std::collections::HashMap::from([
            ("id", cel::Value::from(c.def.id.clone())),
            ("redemptions", cel::Value::Int(usage.redemptions)),
            ("discount_total", cel::Value::Int(usage.discount_total)),
            ("customer_redemptions", cel::Value::Int(mine)),
        ]),
    );
    match rule.program.execute(&scope) {
        Ok(cel::Value::Bool(true)) => Ok(()),
        Ok(cel::Value::Bool(false)) => reject(pb::Reason::RuleFalse, rule.source.clone()),
        Ok(other) => reject(
            pb::Reason::RuleError,
            format!("the rule gave {other:?}, not a bool"),
        ),
        Err(e) => reject(pb::Reason::RuleError, e.to_string()),
    }
}

/// The campaigns whose rules read `tier` (so the caller knows whether to fetch it).
pub fn reads_tier(index: &Index, candidates: &[u32]) -> bool {
    candidates.iter().any(|i| {
        index.campaigns[*i as usize]
            .rule
            .as_ref()
            .is_some_and(|r| r.reads.iter().any(|v| v == "tier"))
    })
}

/// Rejections, with their counts per reason; the list only when the caller wants it.
pub struct Notes {
    explain: pb::Explain,
    pub rejected: Vec<pb::Rejected>,
    pub counts: BTreeMap<i32, i64>,
}

impl Notes {
    pub fn new(explain: pb::Explain) -> Self {
        Self {
            explain,
            rejected: Vec::new(),
            counts: BTreeMap::new(),
        }
    }

    pub fn note(&mut self, id: &str, (reason, detail): (pb::Reason, String)) {
        *self.counts.entry(reason as i32).or_default() += 1;
        if self.explain != pb::Explain::Counts {
            self.rejected.push(pb::Rejected {
                campaign_id: id.to_string(),
                reason: reason.into(),
                detail,
            });
        }
    }
}

/// The request's segments, cart keys and event type, as numbers of `index`.
pub fn presence(index: &Index, input: &Input) -> Presence {
    index.presence(
        input.segments,
        &cart_keys(input.cart),
        input.event.map(|e| e.r#type.as_str()),
    )
}

/// Evaluates the candidates one by one: those that apply on their own, by value descending
/// (then priority, then id); the others go to `notes`.
pub fn evaluate(
    index: &Index,
    candidates: &[u32],
    input: &Input,
    present: &Presence,
    usage: &UsageMap,
    notes: &mut Notes,
) -> Vec<(Arc<Compiled>, pb::Qualified)> {
    let base = base_context(input);
    let mut qualified: Vec<(Arc<Compiled>, pb::Qualified)> = Vec::new();
    for &i in candidates {
        let c = &index.campaigns[i as usize];
        let u = usage.get(&c.def.id).copied().unwrap_or_default();
        let verdict = cheap(index, i as usize, input, present)
            .and_then(|()| {
                check_limits(
                    c.def.limits.as_ref(),
                    u,
                    customer_redemptions(input.facts, c),
                    0,
                    0,
                )
            })
            .and_then(|()| rule(c, &base, u, input.facts));
        if let Err(why) = verdict {
            notes.note(&c.def.id, why);
            continue;
        }
        let Some(application) = &c.application else {
            continue;
        };
        let outcome = apply(std::slice::from_ref(application), input.cart);
        let value = outcome.discount + outcome.shipping_discount + outcome.cashback;
        let does_something = !outcome.adjustments.is_empty();
        if !does_something {
            let why = outcome
                .skipped
                .first()
                .map(|(_, why)| why.clone())
                .unwrap_or_else(|| "does nothing on this cart".into());
            notes.note(&c.def.id, (pb::Reason::NoEffect, why));
            continue;
        }
        let code = unlocking_code(c, input).unwrap_or_default();
        qualified.push((
            c.clone(),
            pb::Qualified {
                campaign_id: c.def.id.clone(),
                reward_id: application.reward_id.clone(),
                code,
                value,
                outcome: Some(wire::outcome(outcome)),
                exclusive: c.def.exclusive,
            },
        ));
    }
    qualified.sort_by(|(a, qa), (b, qb)| {
        qb.value
            .cmp(&qa.value)
            .then(b.def.priority.cmp(&a.def.priority))
            .then(qa.campaign_id.cmp(&qb.campaign_id))
    });
    qualified
}

/// Qualifies `input` against `index`. `usage` holds the counters of the candidates with
/// limits.
pub fn qualify(
    index: &Index,
    candidates: &[u32],
    input: &Input,
    usage: &UsageMap,
    explain: pb::Explain,
) -> pb::QualifyResponse {
    let present = presence(index, input);
    let mut notes = Notes::new(explain);
    let qualified = evaluate(index, candidates, input, &present, usage, &mut notes);
    // Only the most valuable exclusive incentive stays.
    let mut best_exclusive: Option<String> = None;
    let mut kept = Vec::with_capacity(qualified.len());
    for (_, q) in qualified {
        if q.exclusive {
            if let Some(best) = &best_exclusive {
                let why = format!("the exclusive incentive of '{best}' is worth more");
                notes.note(&q.campaign_id, (pb::Reason::ExcludedByStacking, why));
                continue;
            }
            best_exclusive = Some(q.campaign_id.clone());
        }
        kept.push(q);
    }
    // The campaigns the index left out: classified by the cheap checks.
    let mut is_candidate = vec![false; index.campaigns.len()];
    for &i in candidates {
        is_candidate[i as usize] = true;
    }
    for (i, c) in index.campaigns.iter().enumerate() {
        if is_candidate[i] {
            continue;
        }
        let reason = cheap_reason(index, i, input, &present).unwrap_or(pb::Reason::NoMatchingItems);
        let detail = if explain == pb::Explain::Counts {
            String::new()
        } else {
            cheap_detail(c, reason)
        };
        notes.note(&c.def.id, (reason, detail));
    }
    let Notes {
        mut rejected,
        counts,
        ..
    } = notes;
    rejected.sort_by(|a, b| a.campaign_id.cmp(&b.campaign_id));
    pb::QualifyResponse {
        qualified: kept,
        rejected,
        reason_counts: counts
            .into_iter()
            .map(|(reason, count)| pb::ReasonCount { reason, count })
            .collect(),
        campaigns_version: index.version,
        segments_cached: false,
    }
}

/// Checks the cart of a qualification: the engine's checks plus the tenant's currency.
pub fn check_cart(
    v: &mut tessera_runtime::error::Violations,
    field: &str,
    cart: Option<&tessera_proto::catalog::v1::Cart>,
    settings: &Settings,
) -> Cart {
    let engine_cart = wire::cart(v, field, cart);
    if let Some(c) = cart
        && c.currency != settings.currency
    {
        v.add(
            format!("{field}.currency"),
            format!("must be the tenant's currency, {}", settings.currency),
        );
    }
    engine_cart
}

/// Candidates, with the usage counters they need.
pub async fn usage_for(
    conn: &impl sea_orm::ConnectionTrait,
    tenant: &str,
    index: &Index,
    candidates: &[u32],
    customer: (&str, i64, &Settings),
) -> Result<UsageMap, Error> {
    let ids: Vec<&str> = candidates
        .iter()
        .map(|i| &index.campaigns[*i as usize])
        .filter(|c| {
            c.has_limits()
                || c.rule
                    .as_ref()
                    .is_some_and(|r| r.reads.iter().any(|v| v == "campaign"))
        })
        .map(|c| c.def.id.as_str())
        .collect();
    let mut out = if ids.is_empty() {
        UsageMap::default()
    } else {
        crate::campaigns::usage(conn, tenant, &ids).await?
    };
    // The customer's uses in the current period, for the campaigns that limit them.
    let (customer, now, settings) = customer;
    for &i in candidates {
        let c = &index.campaigns[i as usize];
        let Some(l) = c
            .def
            .limits
            .filter(|l| l.max_redemptions_per_customer_per_period > 0)
        else {
            continue;
        };
        let start = period_start(l.period(), now, settings);
        let row = conn
            .query_one_raw(tessera_store::stmt(
                conn,
                "SELECT redemptions FROM customer_period_usage WHERE tenant_id = $1 \
                 AND customer_id = $2 AND campaign_id = $3 AND period_start = $4",
                [
                    tenant.into(),
                    customer.into(),
                    c.def.id.clone().into(),
                    start.into(),
                ],
            ))
            .await
            .map_err(tessera_store::db_error)?;
        if let Some(row) = row {
            out.entry(c.def.id.clone()).or_default().customer_period =
                row.try_get_by_index(0).map_err(tessera_store::db_error)?;
        }
    }
    Ok(out)
}
