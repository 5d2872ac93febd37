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

use super::core::Firing;

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
    pub grants: Vec<super::core::Grant>,
    pub firings: Vec<Firing>,
}
