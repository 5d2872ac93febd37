//! Earning rules: a paid order or a custom event earns points from the earning rules of the
//! active loyalty campaigns, credited through the wallet once per order or event.
//!
//! What is earned is decided on the facts as they were before the order or event (so "the
//! friend's first order" means no paid order before it) and written as `earnings` rows in
//! the same transaction as the fact, with its event; per-period caps are counted under a row
//! lock there. The wallet is another service: each row's credit goes to it through the
//! command outbox in that transaction, with an idempotency key derived from the row, so a
//! crash never loses or doubles points. An order recorded as returned raises the rows'
//! reversal target to the returned share and sends the wallet a reversal of that much of
//! the credit (named by the credit's key).

use std::collections::{BTreeSet, HashMap};

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_effects::{Cart, Line};
use tessera_money::Rounding;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_runtime::{Error, RequestContext};
use tessera_store::idempotency::derived_key;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{Db, db_error, outbox, stmt};

use crate::campaigns::{Compiled, Index};
use crate::counters::{add_counter, lock_counter};
use crate::facts::{self, Facts, Settings};
use crate::qualify::{self, Input};
use crate::redeem;
use crate::triggers::{self, Effects};

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
                let start = redeem::period_start(r.period(), input.now, input.settings);
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

/// Writes the grants of `source` (once: an order or event seen again earns nothing more),
/// counting capped rules under their lock; returns what was written.
pub async fn record(
    txn: &DatabaseTransaction,
    tenant: &str,
    source: &str,
    grants: Vec<Grant>,
    now: i64,
) -> Result<Vec<Grant>, Error> {
    let mut written = Vec::new();
    for mut g in grants {
        let keys = || -> Vec<sea_orm::Value> {
            vec![
                tenant.into(),
                source.into(),
                g.campaign.clone().into(),
                g.rule.clone().into(),
                g.customer.clone().into(),
            ]
        };
        let seen = txn
            .query_one_raw(stmt(
                txn,
                "SELECT points FROM earnings WHERE tenant_id = $1 AND source_id = $2 \
                 AND campaign_id = $3 AND rule_id = $4 AND customer_id = $5",
                keys(),
            ))
            .await
            .map_err(db_error)?;
        if seen.is_some() {
            continue;
        }
        if let Some((max, start)) = g.cap {
            let cap_keys = [
                ("tenant_id", tenant.into()),
                ("customer_id", g.customer.clone().into()),
                ("campaign_id", g.campaign.clone().into()),
                ("rule_id", g.rule.clone().into()),
                ("period_start", start.into()),
            ];
            let used = lock_counter(txn, "earning_caps", &cap_keys, &["points"]).await?[0];
            g.points = g.points.min(max - used);
            if g.points <= 0 {
                continue;
            }
            add_counter(txn, "earning_caps", &cap_keys, &[("points", g.points)]).await?;
        }
        let mut values = keys();
        values.extend([g.program.clone().into(), g.points.into(), now.into()]);
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO earnings (tenant_id, source_id, campaign_id, rule_id, customer_id, \
             program_id, points, created_at, transaction_id, reversal_target, reversed, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, 0, '')",
            values.into_iter().chain([QUEUED.into()]),
        ))
        .await
        .map_err(db_error)?;
        let earned = Earned {
            source,
            campaign: &g.campaign,
            rule: &g.rule,
            customer: &g.customer,
        };
        earned.credit(txn, tenant, &g.program, g.points).await?;
        outbox::enqueue(
            txn,
            tenant,
            "loyalty.points_earned",
            &json!({
                "source": source,
                "campaign_id": g.campaign,
                "rule_id": g.rule,
                "customer_id": g.customer,
                "program_id": g.program,
                "points": g.points,
            }),
        )
        .await?;
        written.push(g);
    }
    Ok(written)
}

/// An order recorded as returned: what its earnings give back is the returned share of
/// each (all of it for a full return).
pub async fn mark_returned(
    txn: &DatabaseTransaction,
    tenant: &str,
    order: &pb::Order,
) -> Result<u64, Error> {
    let (total, spend, _) = facts::order_spend(order);
    let returned = (total - spend).max(0);
    if total <= 0 || returned == 0 {
        return Ok(0);
    }
    let source = Source::Order(order).id();
    let rows = txn
        .query_all_raw(stmt(
            txn,
            "SELECT campaign_id, rule_id, customer_id, points, reversal_target FROM earnings \
             WHERE tenant_id = $1 AND source_id = $2",
            [tenant.into(), source.clone().into()],
        ))
        .await
        .map_err(db_error)?;
    let mut changed = 0;
    for row in rows {
        let get = |i: usize| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let points: i64 = row.try_get_by_index(3).map_err(db_error)?;
        let before: i64 = row.try_get_by_index(4).map_err(db_error)?;
        let target = if returned >= total {
            points
        } else {
            tessera_money::ratio(points, returned.into(), total.into(), Rounding::Down)
                .unwrap_or(points)
        };
        if target <= before {
            continue;
        }
        let (campaign, rule, customer) = (get(0)?, get(1)?, get(2)?);
        txn.execute_raw(stmt(
            txn,
            "UPDATE earnings SET reversal_target = $6, reversed = $6 WHERE tenant_id = $1 \
             AND source_id = $2 AND campaign_id = $3 AND rule_id = $4 AND customer_id = $5",
            [
                tenant.into(),
                source.clone().into(),
                campaign.clone().into(),
                rule.clone().into(),
                customer.clone().into(),
                target.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        let earned = Earned {
            source: &source,
            campaign: &campaign,
            rule: &rule,
            customer: &customer,
        };
        earned
            .reverse(txn, tenant, String::new(), target - before, target)
            .await?;
        changed += 1;
    }
    Ok(changed)
}

/// Set as an earnings row's `transaction_id` once its credit is in the command outbox (rows
/// written before that were settled by a sweep: [`adopt_waiting`] moves what they wait for).
const QUEUED: &str = "queued";
const CREDIT: &str = "/tessera.wallet.v1.WalletService/Credit";
const REVERSE: &str = "/tessera.wallet.v1.WalletService/Reverse";

/// One earnings row: what names its wallet commands.
struct Earned<'a> {
    source: &'a str,
    campaign: &'a str,
    rule: &'a str,
    customer: &'a str,
}

impl Earned<'_> {
    /// The idempotency key of its credit: once per source, campaign, rule, customer.
    fn key(&self) -> String {
        derived_key(
            "earn",
            &[self.source, self.campaign, self.rule, self.customer],
        )
    }

    /// Sends the wallet its credit of `points` of `program`, in `txn`.
    async fn credit<C: ConnectionTrait>(
        &self,
        txn: &C,
        tenant: &str,
        program: &str,
        points: i64,
    ) -> Result<(), Error> {
        let key = self.key();
        let request = wpb::CreditRequest {
            idempotency_key: key.clone(),
            customer_id: self.customer.to_string(),
            asset: Some(wpb::Asset {
                kind: wpb::AssetKind::Points as i32,
                code: program.to_string(),
            }),
            amount: points,
            reason: format!(
                "earned: {} / {} ({})",
                self.campaign, self.rule, self.source
            ),
            ..Default::default()
        };
        let command = Command {
            path: CREDIT,
            key,
            request,
        };
        commands::send(txn, tenant, [command]).await?;
        Ok(())
    }

    /// Sends the wallet the reversal of `amount` of its credit (by `transaction_id`, or by
    /// the credit's key when empty) that brings what was taken back to `target`.
    async fn reverse<C: ConnectionTrait>(
        &self,
        txn: &C,
        tenant: &str,
        transaction_id: String,
        amount: i64,
        target: i64,
    ) -> Result<(), Error> {
        let credit_key = self.key();
        let key = format!("{credit_key}:back:{target}");
        let request = wpb::ReverseRequest {
            idempotency_key: key.clone(),
            transaction_id,
            transaction_key: credit_key,
            amount,
            reason: format!("returned: {}", self.source),
            customer_id: self.customer.to_string(),
            ..Default::default()
        };
        let command = Command {
            path: REVERSE,
            key,
            request,
        };
        commands::send(txn, tenant, [command]).await?;
        Ok(())
    }
}

/// Moves what earnings rows written by an older version still wait for (a credit not made,
/// a reversal not done) onto the command outbox, under the keys that version used; run at
/// start. Returns how many rows.
pub async fn adopt_waiting(db: &Db) -> Result<u64, Error> {
    let txn = db.begin_write().await?;
    let rows = txn
        .query_all_raw(stmt(
            &txn,
            "SELECT tenant_id, source_id, campaign_id, rule_id, customer_id, program_id, points, \
             transaction_id, reversal_target, reversed FROM earnings \
             WHERE error = '' AND (transaction_id = '' OR reversal_target > reversed)",
            [],
        ))
        .await
        .map_err(db_error)?;
    for row in &rows {
        let s = |i: usize| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let n = |i: usize| -> Result<i64, Error> { row.try_get_by_index(i).map_err(db_error) };
        let (tenant, source, campaign, rule, customer) = (s(0)?, s(1)?, s(2)?, s(3)?, s(4)?);
        let (points, transaction, target, reversed) = (n(6)?, s(7)?, n(8)?, n(9)?);
        let earned = Earned {
            source: &source,
            campaign: &campaign,
            rule: &rule,
            customer: &customer,
        };
        if transaction.is_empty() {
            earned.credit(&txn, &tenant, &s(5)?, points).await?;
        }
        if target > reversed && transaction != "-" {
            // Named by its id when the old sweep credited it, else (empty) by its key.
            let amount = target - reversed;
            earned
                .reverse(&txn, &tenant, transaction, amount, target)
                .await?;
        }
        txn.execute_raw(stmt(
            &txn,
            "UPDATE earnings SET transaction_id = CASE WHEN transaction_id = '' THEN $6 \
             ELSE transaction_id END, reversed = reversal_target WHERE tenant_id = $1 \
             AND source_id = $2 AND campaign_id = $3 AND rule_id = $4 AND customer_id = $5",
            [
                tenant.into(),
                source.into(),
                campaign.into(),
                rule.into(),
                customer.into(),
                QUEUED.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    }
    txn.commit().await.map_err(db_error)?;
    Ok(rows.len() as u64)
}

/// The facts, segments and tiers the earning rules of `source` see, and what they grant.
/// Reads nothing when the tenant has no earning rules; `settings` when the caller has them.
pub async fn evaluate(
    service: &crate::service::Eligibility,
    ctx: &RequestContext,
    source: &Source<'_>,
    now: i64,
    settings: Option<&Settings>,
) -> Result<Effects, Error> {
    let tenant = ctx.tenant_id.as_str();
    let index = service.campaigns.index(tenant).await?;
    if index.earning.is_empty() {
        return Ok(Effects::default());
    }
    let conn = service.db.conn();
    let loaded;
    let settings = match settings {
        Some(s) => s,
        None => {
            loaded = facts::settings(conn, tenant).await?;
            &loaded
        }
    };
    let facts: Facts = facts::load(conn, ctx, source.customer(), now).await?;
    let (segments, _) = service
        .segments
        .membership(ctx, &facts, now, settings)
        .await?;
    let mut tiers = HashMap::new();
    for program in tier_programs(&index, source) {
        if let Some(tier) = service.tier(ctx, source.customer(), &program).await {
            tiers.insert(program, tier);
        }
    }
    let (cart, currency, event) = match source {
        Source::Order(o) => (order_cart(o), o.currency.as_str(), None),
        Source::Event(e) => (Cart::default(), settings.currency.as_str(), Some(*e)),
    };
    let input = Input {
        facts: &facts,
        segments: &segments,
        cart: &cart,
        currency,
        codes: &[],
        pool_codes: &[],
        event,
        tier: None,
        now,
        settings,
    };
    let grants = grants(&index, source, &input, &tiers);
    let after = triggers::including(&facts, source);
    let firings = triggers::firings(
        &index,
        source,
        &Input {
            facts: &after,
            ..input
        },
    );
    Ok(Effects { grants, firings })
}
