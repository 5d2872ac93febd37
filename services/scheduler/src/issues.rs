//! Incentives issued to customers, and their reminder series.
//!
//! A campaign's incentive (a catalog reward, or the next code of a pool) is issued to a
//! customer once: the catalog publication is asked for under a key derived from (campaign,
//! customer), so a retry gets the same publication, and the issue is then written with its
//! reminder jobs and its `campaign.incentive_issued` event in one transaction. Each reminder
//! runs as a durable job: it asks eligibility whether the customer has redeemed the campaign
//! and, if not (and the campaign is still active), emits `campaign.reminder` for
//! notification to deliver.

use chrono::{Datelike, NaiveDate};
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::error::{Code, Violations};
use tessera_runtime::{Error, RequestContext, grpc};
use tessera_store::Db;
use tessera_store::idempotency::derived_key;
use tessera_store::outbox::{enqueue, micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, stmt};

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
    if let Some(o) = &c.occasion {
        if o.occasion() == epb::Occasion::Unspecified {
            v.add(
                "campaign.occasion.occasion",
                "must be BIRTHDAY or JOINING_ANNIVERSARY",
            );
        }
        if o.days_before > 30 {
            v.add("campaign.occasion.days_before", "must be 0 to 30");
        }
        if c.incentive.is_none() {
            v.add(
                "campaign.occasion",
                "an occasion issues an incentive: set campaign.incentive",
            );
        }
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
    occasion: &str,
) -> Result<Option<pb::Issue>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT publication_id, code, cause, issued_at, reminders FROM issues \
             WHERE tenant_id = $1 AND campaign_id = $2 AND customer_id = $3 AND occasion = $4",
            [
                tenant.into(),
                campaign.into(),
                customer.into(),
                occasion.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    row.map(|row| {
        let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        Ok(pb::Issue {
            campaign_id: campaign.to_string(),
            customer_id: customer.to_string(),
            occasion: occasion.to_string(),
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
                crate::campaigns::core::state_name(c.state())
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

/// Publishes a campaign's incentive to a customer in the catalog, under a key derived from
/// (campaign, customer, occasion): a retry gets the same publication. Returns the issue to
/// record.
pub async fn publish(
    catalog: &CatalogServiceClient<grpc::Channel>,
    ctx: &RequestContext,
    c: &pb::Campaign,
    customer: &str,
    occasion: &str,
    cause: &str,
) -> Result<pb::Issue, Error> {
    let incentive = issuable(c)?;
    let publication = catalog
        .clone()
        .publish_reward(ctx.request(cpb::PublishRewardRequest {
            idempotency_key: derived_key("issue", &[&c.id, customer, occasion]),
            customer_id: customer.to_string(),
            reward_id: incentive.reward_id.clone(),
            code: String::new(),
            pool_id: incentive.pool_id.clone(),
            channel: incentive.channel.clone(),
        }))
        .await
        .map_err(|s| Error::from_status(&s))?
        .into_inner()
        .publication
        .unwrap_or_default();
    Ok(pb::Issue {
        campaign_id: c.id.clone(),
        customer_id: customer.to_string(),
        publication_id: publication.id,
        code: publication.code,
        cause: cause.to_string(),
        occasion: occasion.to_string(),
        ..Default::default()
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
            "INSERT INTO issues (tenant_id, campaign_id, customer_id, occasion, publication_id, \
             code, cause, issued_at, reminders) VALUES ($1, $2, $3, $9, $4, $5, $6, $7, $8) \
             ON CONFLICT (tenant_id, campaign_id, customer_id, occasion) DO NOTHING",
            [
                tenant.into(),
                c.id.clone().into(),
                issue.customer_id.clone().into(),
                issue.publication_id.clone().into(),
                issue.code.clone().into(),
                issue.cause.clone().into(),
                now.into(),
                i32::try_from(steps.len()).unwrap_or_default().into(),
                issue.occasion.clone().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if inserted.rows_affected() == 0 {
        let first = get(txn, tenant, &c.id, &issue.customer_id, &issue.occasion)
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
                key: derived_key(
                    REMINDER_JOB,
                    &[
                        &c.id,
                        &issue.customer_id,
                        &issue.occasion,
                        &step.to_string(),
                    ],
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
            "occasion": issue.occasion,
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
    let campaign = crate::campaigns::store::get(txn, &job.tenant_id, &job.campaign_id)
        .await
        .ok();
    let active = campaign
        .as_ref()
        .is_some_and(|c| c.state() == pb::CampaignState::Active);
    let channel = campaign
        .and_then(|c| c.incentive)
        .map(|i| i.channel)
        .unwrap_or_default();
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
            "channel": channel,
        }),
    )
    .await?;
    Ok(Outcome::Done)
}

/// Job kind of a birthday or anniversary campaign's daily run.
pub const OCCASION_JOB: &str = "campaign.occasion";

/// The campaign's zone (default UTC).
fn zone(c: &pb::Campaign) -> chrono_tz::Tz {
    c.definition
        .as_ref()
        .and_then(|d| d.time_zone.parse().ok())
        .unwrap_or(chrono_tz::UTC)
}

/// The local date at `now` (µs) in `zone`.
fn local_date(now: i64, zone: chrono_tz::Tz) -> NaiveDate {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(now)
        .unwrap_or_default()
        .with_timezone(&zone)
        .date_naive()
}

/// When the daily run of an occasion campaign is next due: just after the next local
/// midnight in its zone.
pub fn next_occasion_run(c: &pb::Campaign, now: i64) -> i64 {
    let zone = zone(c);
    let tomorrow = local_date(now, zone).succ_opt().unwrap_or(NaiveDate::MAX);
    tomorrow
        .and_hms_opt(0, 5, 0)
        .and_then(|t| t.and_local_timezone(zone).earliest())
        .map_or(now + 86_400_000_000, |t| t.timestamp_micros())
}

/// The (month, day) pairs whose customers a run on `date` issues to, `days_before` ahead:
/// the target day, plus 29 February on the 28th of a year without it.
pub fn occasion_days(date: NaiveDate, days_before: u32) -> (i32, Vec<(u32, u32)>) {
    let target = date + chrono::Days::new(u64::from(days_before));
    let mut days = vec![(target.month(), target.day())];
    let leap = NaiveDate::from_ymd_opt(target.year(), 2, 29).is_some();
    if (target.month(), target.day()) == (2, 28) && !leap {
        days.push((2, 29));
    }
    (target.year(), days)
}

/// A birthday or anniversary campaign's daily run: every customer whose occasion comes on
/// the target day gets the incentive, once per year (retries and replicas included).
/// Returns how many it issued.
pub async fn run_occasion(
    db: &Db,
    catalog: &CatalogServiceClient<grpc::Channel>,
    eligibility: &EligibilityServiceClient<grpc::Channel>,
    job: &Job,
    now: i64,
) -> Result<usize, Error> {
    let Ok(c) = crate::campaigns::store::get(db.conn(), &job.tenant_id, &job.campaign_id).await
    else {
        return Ok(0);
    };
    let Some(rule) = c
        .occasion
        .as_ref()
        .filter(|_| c.state() == pb::CampaignState::Active)
    else {
        return Ok(0);
    };
    let ctx = RequestContext::system(job.tenant_id.clone(), crate::SERVICE);
    let (year, days) = occasion_days(local_date(now, zone(&c)), rule.days_before);
    let kind = match rule.occasion() {
        epb::Occasion::JoiningAnniversary => "anniversary",
        _ => "birthday",
    };
    let occasion = format!("{kind}:{year}");
    let mut issued = 0;
    for (month, day) in days {
        let mut after = String::new();
        loop {
            let page = eligibility
                .clone()
                .list_customers_by_occasion(ctx.request(epb::ListCustomersByOccasionRequest {
                    occasion: rule.occasion,
                    month,
                    day,
                    page: Some(tessera_proto::common::v1::PageRequest {
                        limit: 100,
                        starting_after: after.clone(),
                    }),
                }))
                .await
                .map_err(|s| Error::from_status(&s))?
                .into_inner();
            for customer in &page.customer_ids {
                if get(db.conn(), &ctx.tenant_id, &c.id, customer, &occasion)
                    .await?
                    .is_some()
                {
                    continue;
                }
                let issue = publish(catalog, &ctx, &c, customer, &occasion, &occasion).await?;
                let txn = db.begin_write().await?;
                let (_, new) = record(&txn, &ctx, &c, issue, now).await?;
                txn.commit().await.map_err(tessera_store::db_error)?;
                issued += usize::from(new);
            }
            match page.page {
                Some(p) if p.has_more => after = p.next_cursor,
                _ => break,
            }
        }
    }
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("date")
    }

    #[test]
    fn occasion_days_cover_leap_birthdays() {
        assert_eq!(occasion_days(date(2026, 3, 1), 0), (2026, vec![(3, 1)]));
        // A week ahead, across a month and a year.
        assert_eq!(occasion_days(date(2026, 12, 28), 7), (2027, vec![(1, 4)]));
        // 28 February of a year without a 29th also serves those born on the 29th.
        assert_eq!(
            occasion_days(date(2027, 2, 28), 0),
            (2027, vec![(2, 28), (2, 29)])
        );
        assert_eq!(occasion_days(date(2028, 2, 28), 0), (2028, vec![(2, 28)]));
        assert_eq!(occasion_days(date(2028, 2, 29), 0), (2028, vec![(2, 29)]));
    }

    #[test]
    fn the_daily_run_follows_local_midnight_across_dst() {
        let c = pb::Campaign {
            definition: Some(epb::Campaign {
                time_zone: "Europe/Rome".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let micros = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .expect("RFC 3339")
                .timestamp_micros()
        };
        // Winter: 00:05 CET is 23:05 UTC the day before.
        assert_eq!(
            next_occasion_run(&c, micros("2026-03-27T12:00:00Z")),
            micros("2026-03-27T23:05:00Z")
        );
        // The night the clocks go forward (29 March): 00:05 CET still; then CEST.
        assert_eq!(
            next_occasion_run(&c, micros("2026-03-28T12:00:00Z")),
            micros("2026-03-28T23:05:00Z")
        );
        assert_eq!(
            next_occasion_run(&c, micros("2026-03-29T12:00:00Z")),
            micros("2026-03-29T22:05:00Z")
        );
        // And back (25 October).
        assert_eq!(
            next_occasion_run(&c, micros("2026-10-25T12:00:00Z")),
            micros("2026-10-25T23:05:00Z")
        );
    }
}
