//! Distributions: a campaign's incentive sent to every member of a segment, as a durable
//! job that handles one page of members per run.
//!
//! Each run's remote part reads a page of members from eligibility (after the stored
//! cursor) and issues the incentive to each (the catalog publication is idempotent by
//! campaign and customer, the issue row unique by them); its local part, fenced like every
//! job's, adds the page's counts and moves the cursor in one transaction. A run that dies
//! mid-page is run again: members it had issued to are found with this distribution as
//! their cause and counted as issued, so the counts stay exact.

use std::collections::BTreeMap;

use futures::StreamExt;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde_json::json;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::common::v1::PageRequest;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::{Code, Error, RequestContext, grpc};
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Db, db_error, stmt};

use crate::jobs::{self, Job, NewJob, Outcome};
use crate::{campaigns, issues};

/// Job kind of a distribution's runs.
pub const JOB: &str = "campaign.distribution";

/// Members handled per run.
const PAGE: u32 = 100;

/// Issues in flight at once within a page.
const CONCURRENCY: usize = 8;

/// The cause issues of a distribution carry.
pub fn cause(id: &str) -> String {
    format!("distribution:{id}")
}

fn state_name(s: pb::DistributionState) -> &'static str {
    match s {
        pb::DistributionState::Completed => "completed",
        pb::DistributionState::Failed => "failed",
        _ => "running",
    }
}

fn state_from(s: &str) -> pb::DistributionState {
    match s {
        "completed" => pb::DistributionState::Completed,
        "failed" => pb::DistributionState::Failed,
        _ => pb::DistributionState::Running,
    }
}

/// Creates a running distribution and its first run, due now.
pub async fn start(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    d: &pb::Distribution,
    now: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO distributions (tenant_id, id, campaign_id, segment_id, state, total, \
         processed, issued, already_issued, failed, failures, error, cursor, principal, \
         created_at, finished_at) \
         VALUES ($1, $2, $3, $4, 'running', $5, 0, 0, 0, 0, '{}', '', '', $6, $7, 0)",
        [
            ctx.tenant_id.clone().into(),
            d.id.clone().into(),
            d.campaign_id.clone().into(),
            d.segment_id.clone().into(),
            i64::try_from(d.total).unwrap_or(i64::MAX).into(),
            ctx.principal.clone().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    jobs::schedule(
        txn,
        &NewJob {
            tenant_id: ctx.tenant_id.clone(),
            key: format!("{JOB}:{}", d.id),
            kind: JOB.into(),
            campaign_id: d.campaign_id.clone(),
            payload: d.id.clone().into_bytes(),
            due_at: now,
        },
        now,
    )
    .await
}

/// A distribution and its cursor.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<(pb::Distribution, String), Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT id, campaign_id, segment_id, state, total, processed, issued, \
             already_issued, failed, failures, error, principal, created_at, finished_at, \
             cursor FROM distributions WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("distribution `{id}`")))?;
    let get = || -> Result<(pb::Distribution, String), sea_orm::DbErr> {
        let count = |i| -> Result<u64, sea_orm::DbErr> {
            Ok(u64::try_from(row.try_get_by_index::<i64>(i)?).unwrap_or_default())
        };
        let state: String = row.try_get_by_index(3)?;
        let failures: String = row.try_get_by_index(9)?;
        let finished: i64 = row.try_get_by_index(13)?;
        let mut d = pb::Distribution {
            id: row.try_get_by_index(0)?,
            campaign_id: row.try_get_by_index(1)?,
            segment_id: row.try_get_by_index(2)?,
            total: count(4)?,
            processed: count(5)?,
            issued: count(6)?,
            already_issued: count(7)?,
            failed: count(8)?,
            failures: serde_json::from_str(&failures).unwrap_or_default(),
            error: row.try_get_by_index(10)?,
            principal: row.try_get_by_index(11)?,
            created_at: Some(micros_to_timestamp(row.try_get_by_index(12)?)),
            finished_at: (finished > 0).then(|| micros_to_timestamp(finished)),
            ..Default::default()
        };
        d.set_state(state_from(&state));
        Ok((d, row.try_get_by_index(14)?))
    };
    get().map_err(db_error)
}

/// What one page came to.
#[derive(Default)]
struct Page {
    issued: u64,
    already: u64,
    failures: BTreeMap<String, u64>,
    next_cursor: String,
    more: bool,
    /// Why the distribution cannot go on.
    stop: Option<String>,
}

/// The remote part of a run: one page of members, each issued the incentive.
pub async fn run_page(
    db: &Db,
    catalog: &CatalogServiceClient<grpc::Channel>,
    eligibility: &EligibilityServiceClient<grpc::Channel>,
    job: &Job,
    now: i64,
) -> Result<serde_json::Value, Error> {
    let id = String::from_utf8_lossy(&job.payload).into_owned();
    let (d, cursor) = get(db.conn(), &job.tenant_id, &id).await?;
    let mut page = Page::default();
    if d.state() != pb::DistributionState::Running {
        return Ok(json!({"done": true}));
    }
    let ctx = RequestContext::system(job.tenant_id.clone(), crate::SERVICE);
    let c = match campaigns::get(db.conn(), &job.tenant_id, &d.campaign_id).await {
        Ok(c) if c.state() == pb::CampaignState::Active => c,
        Ok(c) => {
            page.stop = Some(format!(
                "campaign `{}` is {}",
                c.id,
                campaigns::state_name(c.state())
            ));
            return Ok(page.to_json());
        }
        Err(e) => {
            page.stop = Some(e.message);
            return Ok(page.to_json());
        }
    };
    let members = match eligibility
        .clone()
        .list_segment_members(ctx.request(epb::ListSegmentMembersRequest {
            id: d.segment_id.clone(),
            page: Some(PageRequest {
                limit: PAGE,
                starting_after: cursor,
            }),
        }))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            page.stop = Some(format!("segment `{}` is gone", d.segment_id));
            return Ok(page.to_json());
        }
        Err(s) => return Err(Error::from_status(&s)),
    };
    let cause = cause(&id);
    let outcomes: Vec<Result<Result<bool, String>, Error>> =
        futures::stream::iter(members.customer_ids.clone())
            .map(|customer| {
                let (ctx, c, cause) = (&ctx, &c, &cause);
                async move { issue_one(db, catalog, ctx, c, &customer, cause, now).await }
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
    for outcome in outcomes {
        match outcome? {
            Ok(true) => page.issued += 1,
            Ok(false) => page.already += 1,
            Err(reason) => *page.failures.entry(reason).or_default() += 1,
        }
    }
    let p = members.page.unwrap_or_default();
    page.more = p.has_more;
    page.next_cursor = members.customer_ids.last().cloned().unwrap_or_default();
    Ok(page.to_json())
}

impl Page {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "issued": self.issued,
            "already": self.already,
            "failures": self.failures,
            "next_cursor": self.next_cursor,
            "more": self.more,
            "stop": self.stop,
        })
    }
}

/// Issues to one member: Ok(true) issued by this distribution, Ok(false) they had it, an
/// inner Err the reason it cannot be issued to them; an outer Err is worth a retry.
async fn issue_one(
    db: &Db,
    catalog: &CatalogServiceClient<grpc::Channel>,
    ctx: &RequestContext,
    c: &pb::Campaign,
    customer: &str,
    cause: &str,
    now: i64,
) -> Result<Result<bool, String>, Error> {
    if let Some(issue) = issues::get(db.conn(), &ctx.tenant_id, &c.id, customer, "").await? {
        return Ok(Ok(issue.cause == cause));
    }
    let issue = match issues::publish(catalog, ctx, c, customer, "", cause).await {
        Ok(issue) => issue,
        Err(e) if e.is_deterministic() => {
            let reason = e
                .reason
                .clone()
                .unwrap_or_else(|| e.code.as_str().to_string());
            return Ok(Err(reason));
        }
        Err(e) => return Err(e),
    };
    let txn = db.begin_write().await?;
    let (stored, _) = issues::record(&txn, ctx, c, issue, now).await?;
    txn.commit().await.map_err(db_error)?;
    Ok(Ok(stored.cause == cause))
}

/// The local part of a run: adds the page's counts and moves the cursor; the distribution
/// is over when the segment is.
pub async fn settle(
    txn: &DatabaseTransaction,
    job: &Job,
    remote: &serde_json::Value,
    now: i64,
) -> Result<Outcome, Error> {
    if remote["done"].as_bool() == Some(true) {
        return Ok(Outcome::Done);
    }
    let id = String::from_utf8_lossy(&job.payload).into_owned();
    let (d, _) = get(txn, &job.tenant_id, &id).await?;
    let mut failures = d.failures.clone();
    let mut failed = 0;
    if let Some(map) = remote["failures"].as_object() {
        for (reason, n) in map {
            let n = n.as_u64().unwrap_or_default();
            *failures.entry(reason.clone()).or_default() += n;
            failed += n;
        }
    }
    let issued = remote["issued"].as_u64().unwrap_or_default();
    let already = remote["already"].as_u64().unwrap_or_default();
    let stop = remote["stop"].as_str();
    let more = remote["more"].as_bool() == Some(true) && stop.is_none();
    let state = match (stop, more) {
        (Some(_), _) => pb::DistributionState::Failed,
        (None, true) => pb::DistributionState::Running,
        (None, false) => pb::DistributionState::Completed,
    };
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    txn.execute_raw(stmt(
        txn,
        "UPDATE distributions SET processed = processed + $3, issued = issued + $4, \
         already_issued = already_issued + $5, failed = failed + $6, failures = $7, \
         cursor = $8, state = $9, error = $10, finished_at = $11 \
         WHERE tenant_id = $1 AND id = $2",
        [
            job.tenant_id.clone().into(),
            id.clone().into(),
            as_i64(issued + already + failed).into(),
            as_i64(issued).into(),
            as_i64(already).into(),
            as_i64(failed).into(),
            serde_json::to_string(&failures)
                .map_err(Error::internal)?
                .into(),
            remote["next_cursor"].as_str().unwrap_or_default().into(),
            state_name(state).into(),
            stop.unwrap_or_default().into(),
            if more { 0 } else { now }.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    if more {
        Ok(Outcome::Again(now))
    } else {
        tracing::info!(distribution = %id, state = state_name(state), "distribution finished");
        Ok(Outcome::Done)
    }
}

/// Checks that a campaign can be distributed now.
pub fn check_campaign(c: &pb::Campaign) -> Result<(), Error> {
    if c.state() != pb::CampaignState::Active {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "campaign `{}` is {}: only an active campaign is distributed",
                c.id,
                campaigns::state_name(c.state())
            ),
        )
        .with_reason("CAMPAIGN_NOT_ACTIVE"));
    }
    issues::issuable(c).map(|_| ())
}
