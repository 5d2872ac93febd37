//! A campaign compiled for evaluation, without storage: its rule, effect, windows, earning
//! rules and triggers checked and compiled once.

use std::collections::{BTreeMap, HashSet};

use chrono::{Datelike, Timelike};
use chrono_tz::Tz;
use tessera_effects::{Application, Effect, Selector, wire};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_store::outbox::timestamp_to_micros;

use crate::rules::{self, AttrType, Rule, Schema, Scope};

/// A campaign compiled for evaluation.
#[derive(Debug)]
pub struct Compiled {
    pub def: pb::Campaign,
    pub version: i64,
    pub rule: Option<Rule>,
    /// What it does at checkout (none: a loyalty campaign that only earns).
    pub application: Option<Application>,
    /// Its earning rules, with their compiled conditions.
    pub earning: Vec<(pb::EarningRule, Option<Rule>)>,
    /// Its real-time triggers, with their compiled conditions.
    pub triggers: Vec<(pb::Trigger, Rule)>,
    pub starts_at: i64,
    pub ends_at: Option<i64>,
    pub time_zone: Option<Tz>,
    /// Its recurring windows; empty: always.
    pub windows: Vec<Window>,
    /// Its happy hours (earning multiplied by `happy_hour_milli`).
    pub happy_hours: Vec<Window>,
    pub happy_hour_milli: i64,
    /// Groups of cart keys: one key of every group must be in the cart (a buy-X-get-Y
    /// needs both sides); no groups: any cart.
    pub item_keys: Vec<Vec<String>>,
}

impl Compiled {
    pub fn active(&self) -> bool {
        self.def.status() == pb::CampaignStatus::Active
    }

    pub fn has_limits(&self) -> bool {
        self.def.limits.as_ref().is_some_and(|l| {
            l.max_redemptions > 0
                || l.max_discount_total > 0
                || l.max_redemptions_per_customer > 0
                || l.max_order_value_total > 0
        })
    }

    /// Whether its effect spends the customer's points (pay with points, an exchange).
    pub fn spends_points(&self) -> bool {
        self.application.as_ref().is_some_and(|a| {
            matches!(
                a.effect,
                Effect::PayWithPoints { .. } | Effect::PointsExchange { .. }
            )
        })
    }

    /// Whether its effect pays with a gift card's value.
    pub fn is_gift_card(&self) -> bool {
        self.application
            .as_ref()
            .is_some_and(|a| matches!(a.effect, Effect::GiftCard { .. }))
    }

    /// Whether it is a multi-use gift card: its code is spent until the card's value is gone,
    /// however many checkouts that takes.
    pub fn is_multi_use_card(&self) -> bool {
        matches!(
            self.def.effect.as_ref().and_then(|e| e.kind.as_ref()),
            Some(tessera_proto::catalog::v1::effect::Kind::GiftCard(g)) if g.multi_use
        )
    }

    /// Whether it has a campaign-wide budget (redemptions, discount, order value): every
    /// redemption of it takes from the budget's slices.
    pub fn has_budget(&self) -> bool {
        self.def.limits.as_ref().is_some_and(|l| {
            l.max_redemptions > 0 || l.max_discount_total > 0 || l.max_order_value_total > 0
        })
    }

    /// Whether `now` (µs) is inside a window (in the campaign's zone or `tenant_zone`).
    pub fn in_window(&self, now: i64, tenant_zone: Tz) -> bool {
        self.windows.is_empty()
            || any_open(&self.windows, now, self.time_zone.unwrap_or(tenant_zone))
    }

    /// The earning multiplier at `now` (thousandths): the happy-hour rate inside a happy
    /// hour, else 1000.
    pub fn earn_multiplier_milli(&self, now: i64, tenant_zone: Tz) -> i64 {
        if self.happy_hour_milli > 0
            && any_open(
                &self.happy_hours,
                now,
                self.time_zone.unwrap_or(tenant_zone),
            )
        {
            self.happy_hour_milli
        } else {
            1000
        }
    }
}

/// A recurring window, compiled.
#[derive(Debug)]
pub enum Window {
    /// `(weekday mask, start minute, end minute)` on the zone's wall clock.
    Weekly(u8, u32, u32),
    /// Opens each time the expression fires (wall clock), for a duration (µs).
    Cron(Box<croner::Cron>, i64),
}

impl Window {
    fn is_open(&self, local: &chrono::DateTime<Tz>) -> bool {
        match self {
            Window::Weekly(days, start, end) => {
                let day = 1u8 << local.weekday().num_days_from_monday();
                let minute = local.hour() * 60 + local.minute();
                days & day != 0 && (*start..*end).contains(&minute)
            }
            Window::Cron(cron, duration) => {
                cron.find_previous_occurrence(local, true)
                    .is_ok_and(|opened| {
                        (*local - opened)
                            .num_microseconds()
                            .is_some_and(|d| d < *duration)
                    })
            }
        }
    }
}

/// Whether one of `windows` is open at `now` (µs) in `zone`.
pub fn any_open(windows: &[Window], now: i64, zone: Tz) -> bool {
    let local = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(now)
        .unwrap_or_default()
        .with_timezone(&zone);
    windows.iter().any(|w| w.is_open(&local))
}

/// Checks and compiles recurring windows; `field` names the list (`campaign.windows`).
pub(crate) fn compile_windows(
    v: &mut Violations,
    field: &str,
    list: &[pb::TimeWindow],
    zone: Tz,
    now: i64,
) -> Vec<Window> {
    let mut windows = Vec::new();
    for (i, w) in list.iter().enumerate() {
        if !w.cron.is_empty() {
            if !w.days.is_empty() || w.start_minute != 0 || w.end_minute != 0 {
                v.add(
                    format!("{field}.{i}.cron"),
                    "is set alone: no days, start_minute or end_minute with it",
                );
            }
            if !(1..=10_080).contains(&w.duration_minutes) {
                v.add(
                    format!("{field}.{i}.duration_minutes"),
                    "must be 1 to 10080 with a cron expression",
                );
            }
            match w.cron.parse::<croner::Cron>() {
                Err(e) => v.add(
                    format!("{field}.{i}.cron"),
                    format!("is not a cron expression: {e}"),
                ),
                Ok(cron) => {
                    let local = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(now)
                        .unwrap_or_default()
                        .with_timezone(&zone);
                    if cron.find_next_occurrence(&local, false).is_err() {
                        v.add(format!("{field}.{i}.cron"), "never fires");
                    } else {
                        windows.push(Window::Cron(
                            Box::new(cron),
                            i64::from(w.duration_minutes) * 60_000_000,
                        ));
                    }
                }
            }
            continue;
        }
        if w.duration_minutes != 0 {
            v.add(
                format!("{field}.{i}.duration_minutes"),
                "is only for a cron window",
            );
        }
        let mut mask = 0u8;
        for (j, d) in w.days.iter().enumerate() {
            match pb::Weekday::try_from(*d) {
                Ok(day) if day != pb::Weekday::Unspecified => mask |= 1 << (*d - 1),
                _ => v.add(format!("{field}.{i}.days.{j}"), "is not a weekday"),
            }
        }
        if w.start_minute >= 1440 {
            v.add(format!("{field}.{i}.start_minute"), "must be 0 to 1439");
        }
        if w.end_minute > 1440 || w.end_minute <= w.start_minute {
            v.add(
                format!("{field}.{i}.end_minute"),
                "must be after start_minute and at most 1440",
            );
        }
        windows.push(Window::Weekly(
            if mask == 0 { 0x7f } else { mask },
            w.start_minute,
            w.end_minute,
        ));
    }
    windows
}

/// The cart keys a selector needs (one of them): empty when it matches any line.
fn selector_keys(s: &Selector) -> Vec<String> {
    if s.skus.is_empty() && s.categories.is_empty() && s.collections.is_empty() {
        return Vec::new();
    }
    s.skus
        .iter()
        .map(|k| format!("sku:{k}"))
        .chain(s.categories.iter().map(|k| format!("cat:{k}")))
        .chain(s.collections.iter().map(|k| format!("col:{k}")))
        .collect()
}

/// The cart keys an effect needs to do anything: one of each group.
fn effect_keys(e: &Effect) -> Vec<Vec<String>> {
    let groups = match e {
        Effect::AmountOff { selector, .. }
        | Effect::PercentOff { selector, .. }
        | Effect::FixedPrice { selector, .. } => vec![selector_keys(selector)],
        Effect::BuyXGetY { buy, get, .. } => vec![selector_keys(buy), selector_keys(get)],
        Effect::Bundle { components, .. } => {
            components.iter().map(|(s, _)| selector_keys(s)).collect()
        }
        Effect::PointsExchange { reward, .. } => effect_keys(reward),
        _ => Vec::new(),
    };
    groups.into_iter().filter(|g| !g.is_empty()).collect()
}

fn check_id(v: &mut Violations, field: &str, id: &str) {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        v.add(field, "must be 1 to 128 visible ASCII characters");
    }
}

/// Checks and compiles a campaign. Rule errors name `campaign.rule` with the position.
pub fn compile(
    v: &mut Violations,
    c: &pb::Campaign,
    version: i64,
    attributes: &BTreeMap<String, AttrType>,
    segments: Option<&HashSet<String>>,
    now: i64,
) -> Option<Compiled> {
    check_id(v, "campaign.id", &c.id);
    if c.name.chars().count() > 200 {
        v.add("campaign.name", "must be at most 200 characters");
    }
    if c.status() == pb::CampaignStatus::Unspecified {
        v.add("campaign.status", "is required");
    }
    let starts_at = c.starts_at.as_ref().map_or(now, timestamp_to_micros);
    let ends_at = c.ends_at.as_ref().map(timestamp_to_micros);
    if ends_at.is_some_and(|e| e <= starts_at) {
        v.add("campaign.ends_at", "must be after starts_at");
    }
    let time_zone = if c.time_zone.is_empty() {
        None
    } else {
        let tz = c.time_zone.parse::<Tz>().ok();
        if tz.is_none() {
            v.add("campaign.time_zone", "must be an IANA time zone");
        }
        tz
    };
    // Windows follow the campaign's zone (or the tenant's, applied at evaluation: the wall
    // clock is checked there; validation only needs some zone to find the next firing).
    let zone = time_zone.unwrap_or(chrono_tz::UTC);
    let windows = compile_windows(v, "campaign.windows", &c.windows, zone, now);
    let happy_hours = compile_windows(v, "campaign.happy_hours", &c.happy_hours, zone, now);
    if !c.happy_hours.is_empty() && !(1001..=100_000).contains(&c.happy_hour_multiplier_milli) {
        v.add(
            "campaign.happy_hour_multiplier_milli",
            "must be 1001 to 100000 with happy hours",
        );
    }
    for (i, s) in c.segments.iter().enumerate() {
        if segments.is_some_and(|known| !known.contains(s)) {
            v.add(
                format!("campaign.segments.{i}"),
                format!("unknown segment '{s}'"),
            );
        }
    }
    for (i, code) in c.codes.iter().enumerate() {
        if code.is_empty() || code.len() > 64 {
            v.add(format!("campaign.codes.{i}"), "must be 1 to 64 characters");
        }
    }
    if c.pool_ids.len() > 20 {
        v.add("campaign.pool_ids", "must hold at most 20 pools");
    }
    for (i, pool) in c.pool_ids.iter().enumerate() {
        tessera_store::api::check_id(v, &format!("campaign.pool_ids.{i}"), pool);
    }
    if c.reward_id.len() > 128 {
        v.add("campaign.reward_id", "must be at most 128 characters");
    }
    if let Some(l) = &c.limits {
        for (name, value) in [
            ("max_redemptions", l.max_redemptions),
            ("max_discount_total", l.max_discount_total),
            (
                "max_redemptions_per_customer",
                l.max_redemptions_per_customer,
            ),
            ("max_order_value_total", l.max_order_value_total),
            (
                "max_redemptions_per_customer_per_period",
                l.max_redemptions_per_customer_per_period,
            ),
            ("max_uses_per_code", l.max_uses_per_code),
        ] {
            if value < 0 {
                v.add(format!("campaign.limits.{name}"), "must not be negative");
            }
        }
        let period = pb::Period::try_from(l.period).unwrap_or_default();
        if l.max_redemptions_per_customer_per_period > 0 && period == pb::Period::Unspecified {
            v.add(
                "campaign.limits.period",
                "must be DAY, WEEK or MONTH when max_redemptions_per_customer_per_period is set",
            );
        }
    }
    if c.not_combinable_with.len() > 100 {
        v.add(
            "campaign.not_combinable_with",
            "must hold at most 100 entries",
        );
    }
    for (i, other) in c.not_combinable_with.iter().enumerate() {
        let name = other.strip_prefix("group:").unwrap_or(other);
        if name.is_empty() || name.len() > 128 {
            v.add(
                format!("campaign.not_combinable_with.{i}"),
                "must be a campaign id or group:NAME, 1 to 128 characters",
            );
        }
    }
    if c.stacking_group.len() > 128 {
        v.add("campaign.stacking_group", "must be at most 128 characters");
    }
    let rule = if c.rule.trim().is_empty() {
        None
    } else {
        match rules::compile(&c.rule, &Schema::new(attributes, Scope::Campaign)) {
            Ok(rule) => Some(rule),
            Err(e) => {
                v.add("campaign.rule", e.to_string());
                None
            }
        }
    };
    let earning = compile_earning(v, c, attributes);
    let triggers = compile_triggers(v, c, attributes);
    let application =
        if c.effect.is_none() && !(c.earning_rules.is_empty() && c.triggers.is_empty()) {
            None
        } else {
            Some(Application {
                reward_id: if c.reward_id.is_empty() {
                    c.id.clone()
                } else {
                    c.reward_id.clone()
                },
                priority: c.priority,
                effect: wire::effect(v, "campaign.effect", c.effect.as_ref())?,
            })
        };
    let item_keys = application
        .as_ref()
        .map(|a| effect_keys(&a.effect))
        .unwrap_or_default();
    Some(Compiled {
        def: c.clone(),
        version,
        rule,
        application,
        earning,
        triggers,
        starts_at,
        ends_at,
        time_zone,
        windows,
        happy_hours,
        happy_hour_milli: c.happy_hour_multiplier_milli,
        item_keys,
    })
}

/// Checks and compiles a campaign's earning rules.
fn compile_earning(
    v: &mut Violations,
    c: &pb::Campaign,
    attributes: &BTreeMap<String, AttrType>,
) -> Vec<(pb::EarningRule, Option<Rule>)> {
    if c.earning_rules.len() > 20 {
        v.add("campaign.earning_rules", "must hold at most 20 rules");
    }
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in c.earning_rules.iter().enumerate() {
        let field = |name: &str| format!("campaign.earning_rules.{i}.{name}");
        if r.id.is_empty() || r.id.len() > 64 || !ids.insert(r.id.as_str()) {
            v.add(
                field("id"),
                "must be 1 to 64 characters, unique in the campaign",
            );
        }
        match r.trigger() {
            pb::EarningTrigger::OrderPaid => {}
            pb::EarningTrigger::Event if !r.event_type.is_empty() => {}
            pb::EarningTrigger::Event => v.add(field("event_type"), "is required for EVENT"),
            pb::EarningTrigger::Unspecified => {
                v.add(field("trigger"), "must be ORDER_PAID or EVENT")
            }
        }
        if r.referral && r.trigger() != pb::EarningTrigger::OrderPaid {
            v.add(field("referral"), "needs the ORDER_PAID trigger");
        }
        let rates = std::iter::once(("points_per_unit_milli".to_string(), r.points_per_unit_milli))
            .chain(
                r.tier_points_per_unit_milli
                    .iter()
                    .map(|(tier, rate)| (format!("tier_points_per_unit_milli.{tier}"), *rate)),
            );
        for (name, value) in [
            ("points".to_string(), r.points),
            ("advocate_points".to_string(), r.advocate_points),
            (
                "max_points_per_customer_per_period".to_string(),
                r.max_points_per_customer_per_period,
            ),
        ]
        .into_iter()
        .chain(rates)
        {
            if !(0..=1_000_000_000).contains(&value) {
                v.add(field(&name), "must be 0 to 1,000,000,000");
            }
        }
        if r.points == 0 && r.points_per_unit_milli == 0 && r.tier_points_per_unit_milli.is_empty()
        {
            v.add(
                field("points"),
                "the rule must give points (fixed or per unit)",
            );
        }
        if r.max_points_per_customer_per_period > 0 && r.period() == pb::Period::Unspecified {
            v.add(
                field("period"),
                "must be DAY, WEEK or MONTH when a cap is set",
            );
        }
        if r.program_id.len() > 64 {
            v.add(field("program_id"), "must be at most 64 characters");
        }
        let condition = if r.condition.trim().is_empty() {
            None
        } else {
            match rules::compile(&r.condition, &Schema::new(attributes, Scope::Campaign)) {
                Ok(rule) => Some(rule),
                Err(e) => {
                    v.add(field("condition"), e.to_string());
                    None
                }
            }
        };
        out.push((r.clone(), condition));
    }
    out
}

/// Checks and compiles a campaign's real-time triggers.
fn compile_triggers(
    v: &mut Violations,
    c: &pb::Campaign,
    attributes: &BTreeMap<String, AttrType>,
) -> Vec<(pb::Trigger, Rule)> {
    if c.triggers.len() > 20 {
        v.add("campaign.triggers", "must hold at most 20 triggers");
    }
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for (i, t) in c.triggers.iter().enumerate() {
        let field = |name: &str| format!("campaign.triggers.{i}.{name}");
        if t.id.is_empty() || t.id.len() > 64 || !ids.insert(t.id.as_str()) {
            v.add(
                field("id"),
                "must be 1 to 64 characters, unique in the campaign",
            );
        }
        match t.on() {
            pb::EarningTrigger::OrderPaid if t.event_type.is_empty() => {}
            pb::EarningTrigger::OrderPaid => v.add(field("event_type"), "is only for EVENT"),
            pb::EarningTrigger::Event if !t.event_type.is_empty() => {}
            pb::EarningTrigger::Event => v.add(field("event_type"), "is required for EVENT"),
            pb::EarningTrigger::Unspecified => v.add(field("on"), "must be ORDER_PAID or EVENT"),
        }
        if t.condition.trim().is_empty() {
            v.add(field("condition"), "is required");
            continue;
        }
        match rules::compile(&t.condition, &Schema::new(attributes, Scope::Campaign)) {
            Ok(rule) => out.push((t.clone(), rule)),
            Err(e) => v.add(field("condition"), e.to_string()),
        }
    }
    out
}
