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

pub(crate) mod core;
pub(crate) mod triggers;

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_effects::Cart;
use tessera_money::Rounding;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_runtime::{Error, RequestContext};
use tessera_store::idempotency::derived_key;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{Db, db_error, outbox, stmt};

use crate::counters::{add_counter, lock_counter};
use crate::facts::{self, Facts, Settings};
use crate::qualify::Input;

pub use self::core::{Grant, Source};
use self::core::{grants, order_cart, tier_programs};
use self::triggers::Effects;

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
    service: &crate::app::Eligibility,
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
    let after = self::core::including(&facts, source);
    let firings = self::core::firings(
        &index,
        source,
        &Input {
            facts: &after,
            ..input
        },
    );
    Ok(Effects { grants, firings })
}
