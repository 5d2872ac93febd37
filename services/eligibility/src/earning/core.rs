//! What earns, without storage: the source (a paid order or a custom event), the points its
//! rules grant on the facts before it ([`grants`]), and the triggers it fires
//! ([`firings`], on the facts including it).

use std::collections::{BTreeSet, HashMap};

use tessera_effects::{Cart, Line};
use tessera_money::Rounding;
use tessera_proto::eligibility::v1 as pb;

use crate::campaigns::{Compiled, Index};
use crate::facts::{self, Facts, order_spend};
use crate::qualify::{self, Input};

/// What earns.
pub enum Source<'a> {
    Order(&'a pb::Order),
    Event(&'a pb::Event),
}

impl Source<'_> {
    /// The id earnings are keyed by: once per order or event.
    pub fn id(&self) -> String {
        match self {
            Source::Order(o) => format!("order:{}", o.id),
            Source::Event(e) => format!("event:{}", e.id),
        }
    }

    fn trigger(&self) -> pb::EarningTrigger {
        match self {
            Source::Order(_) => pb::EarningTrigger::OrderPaid,
            Source::Event(_) => pb::EarningTrigger::Event,
        }
    }

    pub(crate) fn customer(&self) -> &str {
        match self {
            Source::Order(o) => &o.customer_id,
            Source::Event(e) => &e.customer_id,
        }
    }
}

/// Points one rule gives one customer.
#[derive(Debug, Clone)]
pub struct Grant {
    pub campaign: String,
    pub rule: String,
    pub customer: String,
    pub program: String,
    pub points: i64,
    /// `(max points, start of the current period)` per customer.
    pub cap: Option<(i64, i64)>,
}

/// The programme a rule credits.
fn program(r: &pb::EarningRule) -> &str {
    if r.program_id.is_empty() {
        "default"
    } else {
        &r.program_id
    }
}

/// The programmes whose tier the rules of `index` read for this source.
pub fn tier_programs(index: &Index, source: &Source) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for c in &index.earning {
        for (r, condition) in &c.earning {
            let reads = condition
                .as_ref()
                .is_some_and(|x| x.reads.iter().any(|v| v == "tier"));
            if r.trigger() == source.trigger()
                && (!r.tier_points_per_unit_milli.is_empty() || reads)
            {
                out.insert(program(r).to_string());
            }
        }
    }
    out
}

/// An order's lines as the engine's cart (what rules see as `order`).
pub fn order_cart(o: &pb::Order) -> Cart {
    Cart {
        lines: o
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| Line {
                id: format!("l{i}"),
                sku: l.sku.clone(),
                categories: l.categories.clone(),
                collections: Vec::new(),
                quantity: l.quantity,
                unit_price: l.unit_amount,
                on_sale: l.discounted,
            })
            .collect(),
        ..Default::default()
    }
}

/// Whether a rule or trigger `on` (with its event type) looks at `source`.
pub(crate) fn listens(source: &Source, on: pb::EarningTrigger, event_type: &str) -> bool {
    match source {
        Source::Order(_) => on == pb::EarningTrigger::OrderPaid,
        Source::Event(e) => on == pb::EarningTrigger::Event && e.r#type == event_type,
    }
}

pub(crate) fn holds(rule: &crate::rules::Rule, scope: &cel::Context) -> bool {
    matches!(rule.program.execute(scope), Ok(cel::Value::Bool(true)))
}

/// Whether the campaign is live for this customer now: dates, hours, segments, its rule.
pub(crate) fn campaign_live(c: &Compiled, input: &Input, base: &cel::Context) -> bool {
    let now = input.now;
    now >= c.starts_at
        && c.ends_at.is_none_or(|end| now < end)
        && c.in_window(now, input.settings.time_zone)
        && (c.def.segments.is_empty() || c.def.segments.iter().any(|s| input.segments.contains(s)))
        && c.rule.as_ref().is_none_or(|r| holds(r, base))
}

/// What `source` earns under the active campaigns, on the facts before it. `tiers` holds
/// the customer's tier per programme (for rates and conditions).
pub fn grants(
    index: &Index,
    source: &Source,
    input: &Input,
    tiers: &HashMap<String, String>,
) -> Vec<Grant> {
    let base = qualify::base_context(input);
    let spend = match source {
        Source::Order(o) => facts::order_spend(o).1,
        Source::Event(_) => 0,
    };
    let first_order = input.facts.aggregates.orders_total == 0;
    let mut out = Vec::new();
    for c in &index.earning {
        if !campaign_live(c, input, &base) {
            continue;
        }
        for (r, condition) in &c.earning {
            if !listens(source, r.trigger(), &r.event_type) {
                continue;
            }
            let tier = tiers
                .get(program(r))
                .map(String::as_str)
                .unwrap_or_default();
            let mut scope = base.new_inner_scope();
            scope.add_variable_from_value("tier", tier.to_string());
            if condition.as_ref().is_some_and(|x| !holds(x, &scope)) {
                continue;
            }
            if r.referral && !first_order {
                continue;
            }
            let rate = r
                .tier_points_per_unit_milli
                .get(tier)
                .copied()
                .unwrap_or(r.points_per_unit_milli);
            // Whole currency units of 100 minor units, rounded down.
            let per_unit = tessera_money::ratio(spend.max(0), rate.into(), 100_000, Rounding::Down)
                .unwrap_or(i64::MAX);
            let points = r.points.saturating_add(per_unit);
            // Happy hours multiply what the customer earns (rounded down).
            let multiplier = c.earn_multiplier_milli(input.now, input.settings.time_zone);
            let points = tessera_money::ratio(points, multiplier.into(), 1000, Rounding::Down)
                .unwrap_or(i64::MAX);
            let cap = (r.max_points_per_customer_per_period > 0).then(|| {
                let start =
                    crate::counters::core::period_start(r.period(), input.now, input.settings);
                (r.max_points_per_customer_per_period, start)
            });
            let grant = |customer: &str, points: i64| Grant {
                campaign: c.def.id.clone(),
                rule: r.id.clone(),
                customer: customer.to_string(),
                program: program(r).to_string(),
                points,
                cap,
            };
            if points > 0 {
                out.push(grant(source.customer(), points));
            }
            if r.referral && r.advocate_points > 0 {
                let advocate = match input
                    .facts
                    .profile
                    .attributes
                    .get("referred_by")
                    .and_then(|v| v.kind.as_ref())
                {
                    Some(pb::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                };
                if let Some(advocate) = advocate
                    && advocate != source.customer()
                {
                    out.push(grant(&advocate, r.advocate_points));
                }
            }
        }
    }
    out
}

/// A trigger that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub campaign: String,
    pub trigger: String,
    pub customer: String,
}

/// The customer's facts with the fact being recorded counted in (a paid order's spend and
/// count, an event's count), for trigger conditions.
pub fn including(facts: &Facts, source: &Source) -> Facts {
    let mut facts = facts.clone();
    let a = &mut facts.aggregates;
    match source {
        Source::Order(o) => {
            let spend = order_spend(o).1;
            for total in [
                &mut a.lifetime_spend,
                &mut a.spend_30d,
                &mut a.spend_90d,
                &mut a.spend_365d,
            ] {
                *total = total.saturating_add(spend);
            }
            for count in [
                &mut a.orders_total,
                &mut a.orders_30d,
                &mut a.orders_90d,
                &mut a.orders_365d,
            ] {
                *count += 1;
            }
        }
        Source::Event(e) => {
            for counts in [&mut a.events_30d, &mut a.events_90d, &mut a.events_365d] {
                *counts.entry(e.r#type.clone()).or_default() += 1;
            }
        }
    }
    facts
}

/// The triggers `source` fires, on `input` (whose facts include the source).
pub fn firings(index: &Index, source: &Source, input: &Input) -> Vec<Firing> {
    let base = qualify::base_context(input);
    let mut out = Vec::new();
    for c in index.earning.iter().filter(|c| !c.triggers.is_empty()) {
        if !campaign_live(c, input, &base) {
            continue;
        }
        if let Some((t, _)) = c.triggers.iter().find(|(t, condition)| {
            listens(source, t.on(), &t.event_type) && holds(condition, &base)
        }) {
            out.push(Firing {
                campaign: c.def.id.clone(),
                trigger: t.id.clone(),
                customer: source.customer().to_string(),
            });
        }
    }
    out
}
