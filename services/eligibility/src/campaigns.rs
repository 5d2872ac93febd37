//! The campaign read model and its index.
//!
//! Campaigns are owned by the campaign scheduler; their eligibility-relevant part reaches
//! this service through `PutCampaign` / `RemoveCampaign` and is stored in `campaigns`, with a
//! per-tenant feed version. Each replica keeps an in-memory [`Index`] per tenant (a
//! [`ReadModel`]), compiled once (rules, effects, windows) and rebuilt incrementally when the
//! feed version moves, so a kill switch lands within a second everywhere.
//!
//! The index exists so qualification does not look at every campaign: active campaigns are
//! grouped by the segment they need (or none), then by the cart keys their effect needs
//! (`sku:…`, `cat:…`, `col:…`, or none); code-only campaigns by code and campaigns whose
//! rule needs an event of one type by that type. A qualification visits only the groups of
//! the customer's segments, the cart's keys, the codes given and the event's type.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{Datelike, Timelike};
use chrono_tz::Tz;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_effects::{Application, Effect, Selector, wire};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::outbox::timestamp_to_micros;
use tessera_store::{Db, db_error, stmt};

use crate::readmodel::ReadModel;
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
fn compile_windows(
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

/// A set of strings on the request path (a fast, seeded hash: the keys are bounded).
pub type FastSet = HashSet<String, foldhash::fast::RandomState>;
type FastMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The keys of a cart: `sku:…`, `cat:…`, `col:…`.
pub fn cart_keys(cart: &tessera_effects::Cart) -> FastSet {
    let mut keys = FastSet::default();
    for line in &cart.lines {
        keys.insert(format!("sku:{}", line.sku));
        for c in &line.categories {
            keys.insert(format!("cat:{c}"));
        }
        for c in &line.collections {
            keys.insert(format!("col:{c}"));
        }
    }
    keys
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

#[derive(Debug, Default)]
struct Group {
    by_item: FastMap<Vec<u32>>,
    any_item: Vec<u32>,
}

/// What the cheap checks of one campaign read, laid out flat (segment and cart keys as
/// interned numbers) so classifying every campaign of a large tenant stays a linear scan
/// over one array instead of a walk through each campaign's heap objects.
#[derive(Debug)]
pub struct Pre {
    pub active: bool,
    pub starts_at: i64,
    pub ends_at: i64,
    pub windowed: bool,
    pub segments: Box<[u32]>,
    pub needs_code: bool,
    pub event: Option<u32>,
    pub items: Box<[Box<[u32]>]>,
}

/// What a request brings to the cheap checks, as interned numbers.
pub struct Presence {
    /// `present[k]`: the customer is in segment `k`, or the cart holds key `k`, or the
    /// event is of type `k` (one number space).
    present: Vec<bool>,
}

impl Presence {
    pub fn has(&self, k: u32) -> bool {
        self.present.get(k as usize).copied().unwrap_or(false)
    }
}

/// One tenant's campaigns, compiled and indexed.
#[derive(Debug, Default)]
pub struct Index {
    pub version: i64,
    /// By id.
    pub campaigns: Vec<Arc<Compiled>>,
    /// Per campaign (same order): the cheap checks' inputs.
    pub pre: Vec<Pre>,
    /// Segment ids, cart keys and event types (prefixed `seg:`, `sku:`/`cat:`/`col:`,
    /// `evt:`) → their number.
    names: FastMap<u32>,
    by_segment: FastMap<Group>,
    by_code: FastMap<Vec<u32>>,
    /// Every campaign's codes, live or not (redemption tells a disabled or ended code from
    /// one the tenant does not have).
    all_codes: FastMap<Vec<u32>>,
    /// Every campaign by the catalog pools whose codes unlock it, live or not.
    by_pool: FastMap<Vec<u32>>,
    /// Campaigns whose rule needs an event of one type.
    by_event: FastMap<Vec<u32>>,
    /// Active campaigns with earning rules or triggers (with or without a checkout effect):
    /// what a recorded order or event is looked at by.
    pub earning: Vec<Arc<Compiled>>,
}

impl Index {
    fn build(version: i64, mut campaigns: Vec<Arc<Compiled>>) -> Self {
        campaigns.sort_by(|a, b| a.def.id.cmp(&b.def.id));
        let mut index = Index {
            version,
            ..Default::default()
        };
        index.earning = campaigns
            .iter()
            .filter(|c| c.active() && !(c.earning.is_empty() && c.triggers.is_empty()))
            .cloned()
            .collect();
        // Loyalty campaigns that only earn are no incentive at checkout.
        campaigns.retain(|c| c.application.is_some());
        for (i, c) in campaigns.iter().enumerate() {
            let i = i as u32;
            for code in &c.def.codes {
                index.all_codes.entry(code.clone()).or_default().push(i);
            }
            for pool in &c.def.pool_ids {
                index.by_pool.entry(pool.clone()).or_default().push(i);
            }
            if !c.active() {
                continue;
            }
            // Unlocked by its pools' codes only: never automatic.
            if c.def.codes.is_empty() && !c.def.pool_ids.is_empty() {
                continue;
            }
            if !c.def.codes.is_empty() {
                for code in &c.def.codes {
                    index.by_code.entry(code.clone()).or_default().push(i);
                }
                continue;
            }
            if let Some(t) = c.rule.as_ref().and_then(|r| r.event_type.clone()) {
                index.by_event.entry(t).or_default().push(i);
                continue;
            }
            let segments: Vec<&str> = if c.def.segments.is_empty() {
                vec![""]
            } else {
                c.def.segments.iter().map(String::as_str).collect()
            };
            for s in segments {
                let group = index.by_segment.entry(s.to_string()).or_default();
                // Indexed on the first group; the other groups are checked by the scan.
                match c.item_keys.first() {
                    None => group.any_item.push(i),
                    Some(first) => {
                        for k in first {
                            group.by_item.entry(k.clone()).or_default().push(i);
                        }
                    }
                }
            }
        }
        let mut intern = |name: String| -> u32 {
            let next = index.names.len() as u32;
            *index.names.entry(name).or_insert(next)
        };
        index.pre = campaigns
            .iter()
            .map(|c| Pre {
                active: c.active(),
                starts_at: c.starts_at,
                ends_at: c.ends_at.unwrap_or(i64::MAX),
                windowed: !c.windows.is_empty(),
                segments: c
                    .def
                    .segments
                    .iter()
                    .map(|s| intern(format!("seg:{s}")))
                    .collect(),
                needs_code: !c.def.codes.is_empty() || !c.def.pool_ids.is_empty(),
                event: c
                    .rule
                    .as_ref()
                    .and_then(|r| r.event_type.as_ref())
                    .map(|t| intern(format!("evt:{t}"))),
                items: c
                    .item_keys
                    .iter()
                    .map(|g| g.iter().map(|k| intern(k.clone())).collect())
                    .collect(),
            })
            .collect();
        index.campaigns = campaigns;
        index
    }

    /// The campaign with this id.
    pub fn find(&self, id: &str) -> Option<u32> {
        self.campaigns
            .binary_search_by(|c| c.def.id.as_str().cmp(id))
            .ok()
            .map(|i| i as u32)
    }

    /// The campaigns a code belongs to, live or not.
    pub fn code_owners(&self, code: &str) -> &[u32] {
        self.all_codes.get(code).map_or(&[], Vec::as_slice)
    }

    /// The campaigns a catalog pool's codes unlock, live or not.
    pub fn pool_owners(&self, pool: &str) -> &[u32] {
        self.by_pool.get(pool).map_or(&[], Vec::as_slice)
    }

    /// The request's segments, cart keys and event type as numbers of this index.
    pub fn presence<'a>(
        &self,
        segments: impl IntoIterator<Item = &'a String>,
        keys: &FastSet,
        event_type: Option<&str>,
    ) -> Presence {
        let mut present = vec![false; self.names.len()];
        let mut mark = |name: &str| {
            if let Some(k) = self.names.get(name) {
                present[*k as usize] = true;
            }
        };
        for s in segments {
            mark(&format!("seg:{s}"));
        }
        for k in keys {
            mark(k);
        }
        if let Some(t) = event_type {
            mark(&format!("evt:{t}"));
        }
        Presence { present }
    }

    /// Positions of the campaigns worth evaluating, ascending, without duplicates.
    pub fn candidates(
        &self,
        segments: &FastSet,
        keys: &FastSet,
        codes: &[String],
        event_type: Option<&str>,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        let groups = std::iter::once("")
            .chain(segments.iter().map(String::as_str))
            .filter_map(|s| self.by_segment.get(s));
        for group in groups {
            out.extend_from_slice(&group.any_item);
            if group.by_item.len() < keys.len() {
                for (k, list) in &group.by_item {
                    if keys.contains(k) {
                        out.extend_from_slice(list);
                    }
                }
            } else {
                for k in keys {
                    if let Some(list) = group.by_item.get(k) {
                        out.extend_from_slice(list);
                    }
                }
            }
        }
        for code in codes {
            if let Some(list) = self.by_code.get(code) {
                out.extend_from_slice(list);
            }
        }
        if let Some(list) = event_type.and_then(|t| self.by_event.get(t)) {
            out.extend_from_slice(list);
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The per-tenant indexes of one replica.
pub struct Campaigns {
    db: Db,
    indexes: ReadModel<Index>,
}

impl Campaigns {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            indexes: ReadModel::default(),
        }
    }

    /// Forgets a tenant's index (after this replica changed it).
    pub fn forget(&self, tenant: &str) {
        self.indexes.forget(tenant);
    }

    /// The tenant's index, at most [`crate::readmodel::FRESHNESS`] old.
    pub async fn index(&self, tenant: &str) -> Result<Arc<Index>, Error> {
        if let Some(index) = self.indexes.fresh(tenant) {
            return Ok(index);
        }
        self.current(tenant).await
    }

    /// The tenant's index at the feed's current version (one query when nothing changed):
    /// redemption uses it, so a kill switch refuses the very next redemption.
    pub async fn current(&self, tenant: &str) -> Result<Arc<Index>, Error> {
        let version = feed_version(self.db.conn(), tenant).await?;
        let previous = self.indexes.stale(tenant);
        let index = match previous {
            Some(index) if index.version == version => index,
            previous => Arc::new(self.rebuild(tenant, version, previous).await?),
        };
        self.indexes.store(tenant, index.clone());
        Ok(index)
    }

    async fn rebuild(
        &self,
        tenant: &str,
        version: i64,
        previous: Option<Arc<Index>>,
    ) -> Result<Index, Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT id, version, definition FROM campaigns WHERE tenant_id = $1",
                [tenant.into()],
            ))
            .await
            .map_err(db_error)?;
        let reuse: HashMap<(String, i64), Arc<Compiled>> = previous
            .map(|p| {
                p.campaigns
                    .iter()
                    .map(|c| ((c.def.id.clone(), c.version), c.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let attributes = crate::facts::attributes(conn, tenant).await?;
        let mut campaigns = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get_by_index(0).map_err(db_error)?;
            let v: i64 = row.try_get_by_index(1).map_err(db_error)?;
            if let Some(c) = reuse.get(&(id.clone(), v)) {
                campaigns.push(c.clone());
                continue;
            }
            let bytes: Vec<u8> = row.try_get_by_index(2).map_err(db_error)?;
            let def = pb::Campaign::decode(bytes.as_slice()).map_err(Error::internal)?;
            let mut violations = Violations::new();
            match compile(&mut violations, &def, v, &attributes, None, 0) {
                Some(c) if violations.count() == 0 => campaigns.push(Arc::new(c)),
                _ => tracing::error!(campaign = %id, "stored campaign no longer compiles"),
            }
        }
        Ok(Index::build(version, campaigns))
    }
}

pub async fn feed_version<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<i64, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT version FROM campaign_feed WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map_or(Ok(0), |r| r.try_get_by_index(0).map_err(db_error))
}

/// Bumps the tenant's feed version; returns the new one.
pub async fn bump(txn: &DatabaseTransaction, tenant: &str) -> Result<i64, Error> {
    let row = txn
        .query_one_raw(stmt(
            txn,
            "INSERT INTO campaign_feed (tenant_id, version) VALUES ($1, 1) \
             ON CONFLICT (tenant_id) DO UPDATE SET version = campaign_feed.version + 1 \
             RETURNING version",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("no feed version"))?;
    row.try_get_by_index(0).map_err(db_error)
}

/// Stores a campaign; with a `source_version` (> 0), only over an older one. Returns the
/// read-model version after the change, or None when a newer source version was stored.
pub async fn put(
    txn: &DatabaseTransaction,
    tenant: &str,
    c: &pb::Campaign,
    source_version: i64,
) -> Result<Option<i64>, Error> {
    let stored = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO campaigns (tenant_id, id, definition, version, source_version) \
             VALUES ($1, $2, $3, 0, $4) \
             ON CONFLICT (tenant_id, id) DO UPDATE SET definition = excluded.definition, \
             source_version = excluded.source_version \
             WHERE excluded.source_version = 0 \
             OR campaigns.source_version < excluded.source_version",
            [
                tenant.into(),
                c.id.clone().into(),
                c.encode_to_vec().into(),
                source_version.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if stored.rows_affected() == 0 {
        return Ok(None);
    }
    let version = bump(txn, tenant).await?;
    txn.execute_raw(stmt(
        txn,
        "UPDATE campaigns SET version = $3 WHERE tenant_id = $1 AND id = $2",
        [tenant.into(), c.id.clone().into(), version.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(Some(version))
}

/// Refuses (FAILED_PRECONDITION, naming the limit) a campaign-wide budget below what the
/// campaign has already used.
pub async fn check_budget_not_below_usage<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    c: &pb::Campaign,
) -> Result<(), Error> {
    let Some(limits) = &c.limits else {
        return Ok(());
    };
    let usage = usage(conn, tenant, &[c.id.as_str()]).await?;
    let Some(used) = usage.get(&c.id) else {
        return Ok(());
    };
    let mut below = Vec::new();
    for (field, limit, used) in [
        ("max_redemptions", limits.max_redemptions, used.redemptions),
        (
            "max_discount_total",
            limits.max_discount_total,
            used.discount_total,
        ),
        (
            "max_order_value_total",
            limits.max_order_value_total,
            used.order_value_total,
        ),
    ] {
        if limit > 0 && limit < used {
            below.push(tessera_runtime::error::FieldViolation::new(
                format!("campaign.limits.{field}"),
                format!("is below what the campaign has already used ({used})"),
            ));
        }
    }
    if below.is_empty() {
        return Ok(());
    }
    let mut err = Error::new(
        tessera_runtime::error::Code::FailedPrecondition,
        "a budget is below what the campaign has already used",
    )
    .with_reason("BUDGET_BELOW_USAGE");
    err.field_violations = below;
    Err(err)
}

pub async fn remove(txn: &DatabaseTransaction, tenant: &str, id: &str) -> Result<i64, Error> {
    let removed = txn
        .execute_raw(stmt(
            txn,
            "DELETE FROM campaigns WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    if removed.rows_affected() == 0 {
        return Err(Error::not_found(format!("campaign `{id}`")));
    }
    bump(txn, tenant).await
}

/// Usage counters of some campaigns: the campaign's row and its shards, added up here with
/// saturation (a database's SUM would fail past the largest BIGINT).
pub async fn usage<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    ids: &[&str],
) -> Result<crate::counters::core::UsageMap, Error> {
    let mut out: crate::counters::core::UsageMap = HashMap::new();
    for chunk in ids.chunks(500) {
        let ids = Db::placeholders(2, chunk.len());
        let sql = format!(
            "SELECT campaign_id, redemptions, discount_total, order_value_total \
             FROM campaign_usage WHERE tenant_id = $1 AND campaign_id IN ({ids}) \
             UNION ALL SELECT campaign_id, redemptions, discount_total, order_value_total \
             FROM campaign_usage_shards WHERE tenant_id = $1 AND campaign_id IN ({ids})"
        );
        let values = std::iter::once(tenant.into()).chain(chunk.iter().map(|id| (*id).into()));
        let rows = conn
            .query_all_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?;
        for row in rows {
            let count = |i| row.try_get_by_index::<i64>(i).map_err(db_error);
            let usage = out
                .entry(row.try_get_by_index(0).map_err(db_error)?)
                .or_default();
            usage.redemptions = usage.redemptions.saturating_add(count(1)?);
            usage.discount_total = usage.discount_total.saturating_add(count(2)?);
            usage.order_value_total = usage.order_value_total.saturating_add(count(3)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use tessera_proto::catalog::v1 as cpb;
    use tessera_proto::catalog::v1::effect::Kind;

    use super::*;

    fn selector(categories: &[&str]) -> Option<cpb::Selector> {
        Some(cpb::Selector {
            categories: categories.iter().map(|c| (*c).into()).collect(),
            ..Default::default()
        })
    }

    fn campaign(id: &str, kind: Kind) -> pb::Campaign {
        pb::Campaign {
            id: id.into(),
            status: pb::CampaignStatus::Active.into(),
            effect: Some(cpb::Effect { kind: Some(kind) }),
            ..Default::default()
        }
    }

    fn compiled(c: pb::Campaign) -> Arc<Compiled> {
        let mut v = Violations::new();
        let out = compile(&mut v, &c, 1, &BTreeMap::new(), None, 0).expect("compiles");
        assert_eq!(v.count(), 0);
        Arc::new(out)
    }

    fn set(items: &[&str]) -> FastSet {
        items.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn the_index_visits_only_matching_groups() {
        let shoes = campaign(
            "a-shoes",
            Kind::PercentOff(cpb::PercentOff {
                percent_bp: 1000,
                selector: selector(&["shoes"]),
                ..Default::default()
            }),
        );
        let bogo = campaign(
            "b-bogo",
            Kind::BuyXGetY(cpb::BuyXGetY {
                buy: selector(&["socks"]),
                buy_quantity: 2,
                get: selector(&["hats"]),
                get_quantity: 1,
                percent_bp: 10_000,
                ..Default::default()
            }),
        );
        let mut vip = campaign(
            "c-vip",
            Kind::AmountOff(cpb::AmountOff {
                amount: 500,
                ..Default::default()
            }),
        );
        vip.segments = vec!["vip".into()];
        let mut coded = vip.clone();
        coded.id = "d-code".into();
        coded.segments.clear();
        coded.codes = vec!["SPRING".into()];
        let mut review = vip.clone();
        review.id = "e-review".into();
        review.segments.clear();
        review.rule = r#"event.type == "review""#.into();
        let mut off = vip.clone();
        off.id = "f-off".into();
        off.status = pb::CampaignStatus::Disabled.into();
        let index = Index::build(
            7,
            [shoes, bogo, vip, coded, review, off]
                .into_iter()
                .map(compiled)
                .collect(),
        );
        let ids = |found: Vec<u32>| -> Vec<&str> {
            found
                .into_iter()
                .map(|i| index.campaigns[i as usize].def.id.as_str())
                .collect()
        };
        let keys = set(&["cat:shoes", "cat:socks", "sku:X"]);
        assert_eq!(
            ids(index.candidates(&set(&[]), &keys, &[], None)),
            ["a-shoes", "b-bogo"]
        );
        assert_eq!(
            ids(index.candidates(
                &set(&["vip"]),
                &set(&[]),
                &["SPRING".into()],
                Some("review")
            )),
            ["c-vip", "d-code", "e-review"]
        );
        // A buy-X-get-Y needs both sides in the cart: the second group is in its record.
        let bogo_at = 1;
        assert_eq!(index.pre[bogo_at].items.len(), 2);
        let present = index.presence([].iter(), &keys, None);
        assert!(index.pre[bogo_at].items[0].iter().any(|k| present.has(*k)));
        assert!(!index.pre[bogo_at].items[1].iter().any(|k| present.has(*k)));
        assert!(
            !index.pre[5].active,
            "the disabled campaign is kept, not indexed"
        );
    }

    fn utc(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .expect("RFC 3339")
            .timestamp_micros()
    }

    fn windows(list: Vec<pb::TimeWindow>) -> Vec<Window> {
        let mut v = Violations::new();
        let w = compile_windows(
            &mut v,
            "w",
            &list,
            chrono_tz::Europe::Rome,
            utc("2026-01-01T00:00:00Z"),
        );
        v.finish().expect("valid windows");
        w
    }

    /// Friday 17:00-19:00 Europe/Rome, as weekly hours and as a cron window, on both sides of
    /// both daylight-saving changes of 2026 (29 March, 25 October).
    #[test]
    fn windows_follow_the_wall_clock_across_dst() {
        let weekly = windows(vec![pb::TimeWindow {
            days: vec![pb::Weekday::Friday.into()],
            start_minute: 17 * 60,
            end_minute: 19 * 60,
            ..Default::default()
        }]);
        let cron = windows(vec![pb::TimeWindow {
            cron: "0 17 * * FRI".into(),
            duration_minutes: 120,
            ..Default::default()
        }]);
        let rome = chrono_tz::Europe::Rome;
        for (at, open) in [
            // Winter time (UTC+1), the Friday before the spring change.
            ("2026-03-27T15:59:00Z", false),
            ("2026-03-27T16:00:00Z", true),
            ("2026-03-27T17:59:00Z", true),
            ("2026-03-27T18:00:00Z", false),
            // Summer time (UTC+2), the Friday after.
            ("2026-04-03T14:59:00Z", false),
            ("2026-04-03T15:00:00Z", true),
            ("2026-04-03T16:59:00Z", true),
            ("2026-04-03T17:00:00Z", false),
            // Summer time, the Friday before the autumn change.
            ("2026-10-23T15:00:00Z", true),
            ("2026-10-23T17:00:00Z", false),
            // Winter time again, the Friday after.
            ("2026-10-30T15:30:00Z", false),
            ("2026-10-30T16:00:00Z", true),
            ("2026-10-30T17:59:00Z", true),
            ("2026-10-30T18:00:00Z", false),
            // Not a Friday.
            ("2026-10-29T16:30:00Z", false),
        ] {
            assert_eq!(any_open(&weekly, utc(at), rome), open, "weekly at {at}");
            assert_eq!(any_open(&cron, utc(at), rome), open, "cron at {at}");
        }
    }

    /// A daily window at 02:30 on the night the clocks skip 02:00-03:00 still opens (right
    /// after the gap), and on the night 02:00-03:00 happens twice it opens once.
    #[test]
    fn a_cron_window_in_the_skipped_or_repeated_hour() {
        let nightly = windows(vec![pb::TimeWindow {
            cron: "30 2 * * *".into(),
            duration_minutes: 20,
            ..Default::default()
        }]);
        let rome = chrono_tz::Europe::Rome;
        // 29 March: 02:30 does not exist; 03:00 CEST is 01:00 UTC.
        assert!(any_open(&nightly, utc("2026-03-29T01:05:00Z"), rome));
        assert!(!any_open(&nightly, utc("2026-03-29T01:40:00Z"), rome));
        // 25 October: 02:30 CEST (00:30 UTC) opens it; 02:30 CET (01:30 UTC) does not again.
        assert!(any_open(&nightly, utc("2026-10-25T00:35:00Z"), rome));
        assert!(!any_open(&nightly, utc("2026-10-25T00:55:00Z"), rome));
        assert!(!any_open(&nightly, utc("2026-10-25T01:35:00Z"), rome));
    }

    #[test]
    fn bad_cron_windows_name_the_field() {
        let cases = [
            (
                pb::TimeWindow {
                    cron: "0 0 30 2 *".into(),
                    duration_minutes: 60,
                    ..Default::default()
                },
                "w.0.cron",
            ),
            (
                pb::TimeWindow {
                    cron: "every friday".into(),
                    duration_minutes: 60,
                    ..Default::default()
                },
                "w.0.cron",
            ),
            (
                pb::TimeWindow {
                    cron: "0 17 * * FRI".into(),
                    duration_minutes: 0,
                    ..Default::default()
                },
                "w.0.duration_minutes",
            ),
            (
                pb::TimeWindow {
                    cron: "0 17 * * FRI".into(),
                    duration_minutes: 60,
                    start_minute: 5,
                    ..Default::default()
                },
                "w.0.cron",
            ),
        ];
        for (w, field) in cases {
            let mut v = Violations::new();
            compile_windows(
                &mut v,
                "w",
                std::slice::from_ref(&w),
                chrono_tz::Europe::Rome,
                utc("2026-01-01T00:00:00Z"),
            );
            let err = v.finish().expect_err(field);
            assert_eq!(err.field_violations[0].field, field, "{w:?}: {err:?}");
        }
    }
}
