//! Incentives issued to customers, and their reminder series.
//!
//! A campaign's incentive (a catalog reward, or the next code of a pool) is issued to a
//! customer once: the catalog publication is asked for under a key derived from (campaign,
//! customer), so a retry gets the same publication, and the issue is then written with its
//! reminder jobs and its `campaign.incentive_issued` event in one transaction. Each reminder
//! runs as a durable job: it asks eligibility whether the customer has redeemed the campaign
//! and, if not (and the campaign is still active), emits `campaign.reminder` for
//! notification to deliver.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::error::{Code, Violations};
use tessera_runtime::{Error, RequestContext};
use tessera_store::outbox::{enqueue, micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, stmt};

use crate::campaigns;
use crate::jobs::{self, Job, NewJob, Outcome};

/// Job kind of a reminder step.
pub const REMINDER_JOB: &str = "campaign.reminder";

/// Checks a campaign's incentive and reminders.
pub fn check(v: &mut Violations, c: &pb::Campaign) {
    if let Some(i) = &c.incentive {
        if i.reward_id.is_empty() == i.pool_id.is_empty() {
            v.add(
                "campaign.incentive.reward_id",
                "exactly one of reward_id and pool_id is required",
            );
        }
        for (name, value) in [
            ("reward_id", &i.reward_id),
            ("pool_id", &i.pool_id),
            ("channel", &i.channel),
        ] {
            if value.len() > 128 {
                v.add(
                    format!("campaign.incentive.{name}"),
                    "must be at most 128 characters",
                );
            }
        }
    }
    if c.reminders.len() > 10 {
        v.add("campaign.reminders", "must hold at most 10 steps");
    }
    if !c.reminders.is_empty() && c.incentive.is_none() {
        v.add(
            "campaign.reminders",
            "remind of an incentive: set campaign.incentive",
        );
    }
    let ends = c.definition.as_ref().is_some_and(|d| d.ends_at.is_some());
    for (i, r) in c.reminders.iter().enumerate() {
        let field = |name: &str| format!("campaign.reminders.{i}.{name}");
        match (r.after_seconds, r.before_end_seconds) {
            (a, 0) if a > 0 => {}
            (0, b) if b > 0 && ends => {}
            (0, b) if b > 0 => v.add(
                field("before_end_seconds"),
                "needs the campaign's definition.ends_at",
            ),
            _ => v.add(
                field("after_seconds"),
                "exactly one of after_seconds and before_end_seconds, positive",
            ),
        }
        if r.template.is_empty() || r.template.len() > 128 {
            v.add(field("template"), "must be 1 to 128 characters");
        }
    }
}

/// The issue of a campaign to a customer, if any.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    campaign: &str,
    customer: &str,
) -> Result<Option<pb::Issue>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT publication_id, code, cause, issued_at, reminders FROM issues \
             WHERE tenant_id = $1 AND campaign_id = $2 AND customer_id = $3",
            [tenant.into(), campaign.into(), customer.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map(|row| {
        let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        Ok(pb::Issue {
            campaign_id: campaign.to_string(),
            customer_id: customer.to_string(),
            publication_id: text(0)?,
            code: text(1)?,
            cause: text(2)?,
            issued_at: Some(micros_to_timestamp(
                row.try_get_by_index(3).map_err(db_error)?,
            )),
            reminders: row
                .try_get_by_index::<i32>(4)
                .map_err(db_error)?
                .try_into()
                .unwrap_or_default(),
        })
    })
    .transpose()
}

/// The campaign an incentive can be issued from now: active, with an incentive.
pub fn issuable(c: &pb::Campaign) -> Result<&pb::Incentive, Error> {
    if c.state() != pb::CampaignState::Active {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "campaign `{}` is {}: it issues nothing",
                c.id,
                campaigns::state_name(c.state())
            ),
        )
        .with_reason("CAMPAIGN_NOT_ACTIVE"));
    }
    c.incentive.as_ref().ok_or_else(|| {
        Error::new(
            Code::FailedPrecondition,
            format!("campaign `{}` has no incentive to issue", c.id),
        )
        .with_reason("NO_INCENTIVE")
    })
}

/// Writes the issue (unless the customer has it already: then returns theirs, false) with
/// its reminder jobs and event.
pub async fn record(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    c: &pb::Campaign,
    mut issue: pb::Issue,
    now: i64,
) -> Result<(pb::Issue, bool), Error> {
    let tenant = ctx.tenant_id.as_str();
    let steps = reminder_times(c, now);
    issue.reminders = u32::try_from(steps.len()).unwrap_or_default();
    let inserted = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO issues (tenant_id, campaign_id, customer_id, publication_id, code, \
             cause, issued_at, reminders) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (tenant_id, campaign_id, customer_id) DO NOTHING",
            [
                tenant.into(),
                c.id.clone().into(),
                issue.customer_id.clone().into(),
                issue.publication_id.clone().into(),
                issue.code.clone().into(),
                issue.cause.clone().into(),
                now.into(),
                i32::try_from(steps.len()).unwrap_or_default().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if inserted.rows_affected() == 0 {
        let first = get(txn, tenant, &c.id, &issue.customer_id)
            .await?
            .ok_or_else(|| Error::internal("issue vanished"))?;
        return Ok((first, false));
    }
    for (step, due_at) in steps {
        let r = &c.reminders[step];
        jobs::schedule(
            txn,
            &NewJob {
                tenant_id: tenant.to_string(),
                key: tessera_store::idempotency::derived_key(
                    REMINDER_JOB,
                    &[&c.id, &issue.customer_id, &step.to_string()],
                ),
                kind: REMINDER_JOB.into(),
                campaign_id: c.id.clone(),
                payload: serde_json::to_vec(&json!({
                    "customer_id": issue.customer_id,
                    "step": step,
                    "template": r.template,
                    "publication_id": issue.publication_id,
                    "code": issue.code,
                }))
                .map_err(Error::internal)?,
                due_at,
            },
            now,
        )
        .await?;
    }
    enqueue(
        txn,
        tenant,
        "campaign.incentive_issued",
        &json!({
            "campaign_id": c.id,
            "customer_id": issue.customer_id,
            "publication_id": issue.publication_id,
            "code": issue.code,
            "channel": c.incentive.as_ref().map(|i| i.channel.clone()).unwrap_or_default(),
            "cause": issue.cause,
        }),
    )
    .await?;
    issue.issued_at = Some(micros_to_timestamp(now));
    Ok((issue, true))
}

/// When each reminder step is due for an incentive issued at `now`: steps already past
/// (or after the campaign's end) are left out.
fn reminder_times(c: &pb::Campaign, now: i64) -> Vec<(usize, i64)> {
    let ends_at = c
        .definition
        .as_ref()
        .and_then(|d| d.ends_at.as_ref())
        .map(timestamp_to_micros);
    c.reminders
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let due = if r.after_seconds > 0 {
                now.checked_add(r.after_seconds.checked_mul(1_000_000)?)?
            } else {
                ends_at?.checked_sub(r.before_end_seconds.checked_mul(1_000_000)?)?
            };
            (due > now && ends_at.is_none_or(|end| due < end)).then_some((i, due))
        })
        .collect()
}

/// A reminder's local part: the `campaign.reminder` event, unless the customer redeemed the
/// campaign (`remote` says) or the campaign is no longer active.
pub async fn remind(
    txn: &DatabaseTransaction,
    job: &Job,
    remote: &serde_json::Value,
) -> Result<Outcome, Error> {
    let payload: serde_json::Value =
        serde_json::from_slice(&job.payload).map_err(Error::internal)?;
    let customer = payload["customer_id"].as_str().unwrap_or_default();
    let active = campaigns::get(txn, &job.tenant_id, &job.campaign_id)
        .await
        .is_ok_and(|c| c.state() == pb::CampaignState::Active);
    if !active || remote["redeemed"].as_bool() == Some(true) {
        tracing::info!(job = %job.id, campaign = %job.campaign_id, %customer, active, "reminder not needed");
        return Ok(Outcome::Done);
    }
    enqueue(
        txn,
        &job.tenant_id,
        "campaign.reminder",
        &json!({
            "campaign_id": job.campaign_id,
            "customer_id": customer,
            "step": payload["step"],
            "template": payload["template"],
            "publication_id": payload["publication_id"],
            "code": payload["code"],
        }),
    )
    .await?;
    Ok(Outcome::Done)
}
