//! Real-time triggers: a paid order or a custom event that matches a trigger of a live
//! campaign ("customer spent more than $500 in 30 days") has the campaign scheduler issue
//! the campaign's incentive to the customer, once per customer per campaign.
//!
//! A trigger's condition sees the customer's facts including the order or event that is
//! being recorded. A firing is a `trigger_firings` row, written in the fact's transaction
//! and unique per (campaign, customer), so a second match fires nothing. The scheduler is
//! another service: each row is then issued with an idempotency key derived from it
//! ([`settle`], right after the commit and again by the sweep until it succeeds).

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::scheduler::v1 as spb;
use tessera_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use tessera_runtime::{Error, RequestContext, grpc};
use tessera_store::idempotency::derived_key;
use tessera_store::{Db, db_error, stmt};

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
        txn.execute_raw(stmt(
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
    }
    Ok(())
}

/// Has the scheduler issue the incentives of the firings that wait for it (of one tenant,
/// or all); returns how many it issued. A refusal (the campaign ended meanwhile) is kept on
/// the row instead of being retried forever.
pub async fn settle(
    db: &Db,
    scheduler: &SchedulerServiceClient<grpc::Channel>,
    tenant: Option<&str>,
) -> Result<usize, Error> {
    let conn = db.conn();
    let (filter, values): (&str, Vec<sea_orm::Value>) = match tenant {
        Some(t) => ("AND tenant_id = $1", vec![t.into()]),
        None => ("", Vec::new()),
    };
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT tenant_id, campaign_id, customer_id, trigger_id FROM trigger_firings \
                 WHERE issued = 0 AND error = '' {filter} LIMIT 100"
            ),
            values,
        ))
        .await
        .map_err(db_error)?;
    let mut issued = 0;
    for row in rows {
        let s = |i: usize| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let (tenant, campaign, customer, trigger) = (s(0)?, s(1)?, s(2)?, s(3)?);
        let ctx = RequestContext::system(tenant.clone(), crate::SERVICE);
        let outcome = scheduler
            .clone()
            .issue_incentive(ctx.request(spb::IssueIncentiveRequest {
                idempotency_key: derived_key("trigger", &[&campaign, &customer]),
                campaign_id: campaign.clone(),
                customer_id: customer.clone(),
                cause: format!("trigger:{trigger}"),
            }))
            .await
            .map_err(|s| Error::from_status(&s));
        let (done, error) = match outcome {
            Ok(_) => (1, String::new()),
            Err(e) if e.is_deterministic() => {
                tracing::warn!(error = %e, %campaign, %customer, "the scheduler refused a trigger's incentive");
                (0, e.message)
            }
            Err(e) => return Err(e),
        };
        conn.execute_raw(stmt(
            conn,
            "UPDATE trigger_firings SET issued = $4, error = $5 \
             WHERE tenant_id = $1 AND campaign_id = $2 AND customer_id = $3",
            [
                tenant.into(),
                campaign.into(),
                customer.into(),
                done.into(),
                error.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        issued += done as usize;
    }
    Ok(issued)
}

/// What a recorded order or event did: points to earn and triggers that fired.
#[derive(Debug, Default)]
pub struct Effects {
    pub grants: Vec<crate::earning::Grant>,
    pub firings: Vec<Firing>,
}
