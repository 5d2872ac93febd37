//! Real-time triggers: a paid order or a custom event that matches a trigger of a live
//! campaign ("customer spent more than $500 in 30 days") has the campaign scheduler issue
//! the campaign's incentive to the customer, once per customer per campaign.
//!
//! A trigger's condition sees the customer's facts including the order or event that is
//! being recorded. A firing is a `trigger_firings` row, written in the fact's transaction
//! and unique per (campaign, customer), so a second match fires nothing. The scheduler is
//! another service: a new firing sends it `IssueIncentive` through the command outbox in
//! the same transaction, with an idempotency key derived from the firing.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::scheduler::v1 as spb;
use tessera_runtime::Error;
use tessera_store::idempotency::derived_key;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{db_error, stmt};

use crate::campaigns::Index;
use crate::earning::{Source, campaign_live, holds, listens};
use crate::facts::{Facts, order_spend};
use crate::qualify::{self, Input};

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

/// Writes the firings (a campaign fires once per customer: later matches write nothing).
pub async fn record(
    txn: &DatabaseTransaction,
    tenant: &str,
    source: &str,
    firings: &[Firing],
    now: i64,
) -> Result<(), Error> {
    for f in firings {
        let fired = txn
            .execute_raw(stmt(
                txn,
                "INSERT INTO trigger_firings (tenant_id, campaign_id, customer_id, trigger_id, \
             source_id, fired_at, issued, error) VALUES ($1, $2, $3, $4, $5, $6, 0, '') \
             ON CONFLICT (tenant_id, campaign_id, customer_id) DO NOTHING",
                [
                    tenant.into(),
                    f.campaign.clone().into(),
                    f.customer.clone().into(),
                    f.trigger.clone().into(),
                    source.into(),
                    now.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        if fired.rows_affected() == 0 {
            continue;
        }
        let key = derived_key("trigger", &[&f.campaign, &f.customer]);
        let request = spb::IssueIncentiveRequest {
            idempotency_key: key.clone(),
            campaign_id: f.campaign.clone(),
            customer_id: f.customer.clone(),
            cause: format!("trigger:{}", f.trigger),
        };
        commands::send(
            txn,
            tenant,
            [Command {
                path: ISSUE,
                key,
                request,
            }],
        )
        .await?;
    }
    Ok(())
}

/// The scheduler's issue of a campaign's incentive.
const ISSUE: &str = "/tessera.scheduler.v1.SchedulerService/IssueIncentive";

/// What a recorded order or event did: points to earn and triggers that fired.
#[derive(Debug, Default)]
pub struct Effects {
    pub grants: Vec<crate::earning::Grant>,
    pub firings: Vec<Firing>,
}
