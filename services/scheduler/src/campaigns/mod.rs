//! Campaigns: the source of truth. A campaign is stored whole (protobuf) with its state and
//! versions; every change bumps `version`, marks it for the sync to eligibility, records a
//! transition when the state moves, writes its outbox event and (re)schedules the jobs that
//! start and end it, all in one transaction.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::error::{Code, Violations};
use tessera_runtime::{Error, RequestContext};
use tessera_store::outbox::{enqueue, micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, stmt};

pub(crate) mod core;
pub(crate) mod store;

pub use self::core::*;
pub use self::store::*;
use crate::jobs::{self, NewJob};
use pb::CampaignState as State;

/// Job kinds of a campaign's own schedule.
pub const START_JOB: &str = "campaign.start";
pub const END_JOB: &str = "campaign.end";
/// The wallet's points-expiry sweep of a tenant (recurring).
pub const EXPIRE_JOB: &str = "wallet.expire_due";
/// Job kind: confirm the wallet's pending credits whose activation date came (cashback
/// after its return window).
pub const ACTIVATE_JOB: &str = "wallet.activate_due";
/// The wallet's tier re-evaluation of a programme (recurring; the payload is its id).
pub const TIERS_JOB: &str = "wallet.evaluate_tiers";
/// The recompute of a segment a live campaign targets (recurring; the payload is its id).
pub const SEGMENT_JOB: &str = "eligibility.recompute_segment";

/// Checks the parts eligibility does not: id, name, type, channels.
pub fn check(v: &mut Violations, c: &pb::Campaign) {
    if c.id.is_empty() || c.id.len() > 128 || !c.id.bytes().all(|b| b.is_ascii_graphic()) {
        v.add("campaign.id", "must be 1 to 128 visible ASCII characters");
    }
    let name = c.name.chars().count();
    if name == 0 || name > 200 {
        v.add("campaign.name", "must be 1 to 200 characters");
    }
    if c.r#type() == pb::CampaignType::Unspecified {
        v.add("campaign.type", "is required");
    }
    if c.description.chars().count() > 2000 {
        v.add("campaign.description", "must be at most 2000 characters");
    }
    if c.channels.len() > 20 {
        v.add("campaign.channels", "must have at most 20 entries");
    }
    for (i, ch) in c.channels.iter().enumerate() {
        if ch.is_empty() || ch.len() > 64 || !ch.bytes().all(|b| b.is_ascii_graphic()) {
            v.add(
                format!("campaign.channels.{i}"),
                "must be 1 to 64 visible ASCII characters",
            );
        }
    }
    if c.definition.is_none() {
        v.add("campaign.definition", "is required");
    }
    crate::issues::check(v, c);
}

async fn record_transition(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    c: &pb::Campaign,
    from: State,
    action: &str,
    reason: &str,
    now: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO campaign_transitions (tenant_id, campaign_id, seq, from_state, to_state, \
         action, reason, principal, at) \
         SELECT $1, $2, COALESCE(MAX(seq), 0) + 1, $3, $4, $5, $6, $7, $8 \
         FROM campaign_transitions WHERE tenant_id = $1 AND campaign_id = $2",
        [
            ctx.tenant_id.clone().into(),
            c.id.clone().into(),
            state_name(from).into(),
            state_name(c.state()).into(),
            action.into(),
            reason.into(),
            ctx.principal.clone().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    // One event type per destination, so receivers can subscribe to what they act on.
    let event = match (from, c.state()) {
        (_, State::Draft) => "campaign.created",
        (State::Paused, State::Active) => "campaign.resumed",
        (_, State::Active) => "campaign.started",
        (_, State::Scheduled) => "campaign.scheduled",
        (_, State::Paused) => "campaign.paused",
        (_, State::Killed) => "campaign.killed",
        _ => "campaign.ended",
    };
    enqueue(
        txn,
        &ctx.tenant_id,
        event,
        &serde_json::json!({
            "campaign_id": c.id,
            "from": state_name(from),
            "to": state_name(c.state()),
            "action": action,
            "reason": reason,
            "principal": ctx.principal,
            "version": c.version,
        }),
    )
    .await?;
    Ok(())
}

/// Schedules the start and end jobs a campaign in its state needs, and cancels the others.
async fn reschedule(
    txn: &DatabaseTransaction,
    tenant: &str,
    c: &pb::Campaign,
    now: i64,
) -> Result<(), Error> {
    let live = matches!(c.state(), State::Scheduled | State::Active | State::Paused);
    let job = |kind: &str, due_at: i64| NewJob {
        tenant_id: tenant.to_string(),
        key: format!("{kind}:{}", c.id),
        kind: kind.to_string(),
        campaign_id: c.id.clone(),
        payload: Vec::new(),
        due_at,
    };
    match starts_at(c) {
        Some(at) if c.state() == State::Scheduled => {
            jobs::schedule(txn, &job(START_JOB, at), now).await?
        }
        _ => jobs::cancel(txn, tenant, &format!("{START_JOB}:{}", c.id), now).await?,
    }
    match ends_at(c) {
        Some(at) if live => jobs::schedule(txn, &job(END_JOB, at), now).await?,
        _ => jobs::cancel(txn, tenant, &format!("{END_JOB}:{}", c.id), now).await?,
    }
    // A birthday or anniversary campaign runs daily while it is live (its job finds nothing
    // to do in other states and keeps its pace).
    if live && c.occasion.is_some() {
        let job = NewJob {
            tenant_id: tenant.to_string(),
            key: format!("{}:{}", crate::issues::OCCASION_JOB, c.id),
            kind: crate::issues::OCCASION_JOB.to_string(),
            campaign_id: c.id.clone(),
            payload: Vec::new(),
            due_at: now,
        };
        jobs::ensure(txn, &job, now).await?;
    }
    // A live campaign's segments are recomputed daily (recurring; scheduled once per
    // segment, kept afterwards; a static segment's job stops at its first run).
    let segments = c
        .definition
        .as_ref()
        .map(|d| d.segments.as_slice())
        .unwrap_or_default();
    if live {
        for segment in segments {
            let key = format!("{SEGMENT_JOB}:{segment}");
            let job = NewJob {
                tenant_id: tenant.to_string(),
                key,
                kind: SEGMENT_JOB.to_string(),
                campaign_id: String::new(),
                payload: segment.as_bytes().to_vec(),
                due_at: now,
            };
            jobs::ensure(txn, &job, now).await?;
        }
    }
    // A campaign that earns points needs the wallet's sweeps: points expiry for the tenant,
    // tier re-evaluation per programme (recurring; scheduled once, kept afterwards).
    let earning = c
        .definition
        .as_ref()
        .map(|d| d.earning_rules.as_slice())
        .unwrap_or_default();
    if live && !earning.is_empty() {
        let mut programs: Vec<&str> = earning
            .iter()
            .map(|r| {
                if r.program_id.is_empty() {
                    "default"
                } else {
                    r.program_id.as_str()
                }
            })
            .collect();
        programs.sort_unstable();
        programs.dedup();
        ensure_wallet_sweeps(txn, tenant, &programs, now).await?;
    }
    Ok(())
}

/// Schedules (once) the wallet's recurring sweeps for a tenant: points expiry, pending
/// credits coming due, and tier re-evaluation of each of `programs`.
pub async fn ensure_wallet_sweeps<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    programs: &[&str],
    now: i64,
) -> Result<(), Error> {
    let sweep = |kind: &str, key: String, payload: Vec<u8>| NewJob {
        tenant_id: tenant.to_string(),
        key,
        kind: kind.to_string(),
        campaign_id: String::new(),
        payload,
        due_at: now,
    };
    jobs::ensure(conn, &sweep(EXPIRE_JOB, EXPIRE_JOB.into(), Vec::new()), now).await?;
    jobs::ensure(
        conn,
        &sweep(ACTIVATE_JOB, ACTIVATE_JOB.into(), Vec::new()),
        now,
    )
    .await?;
    for program in programs {
        let key = format!("{TIERS_JOB}:{program}");
        jobs::ensure(
            conn,
            &sweep(TIERS_JOB, key, program.as_bytes().to_vec()),
            now,
        )
        .await?;
    }
    Ok(())
}

async fn write(
    txn: &DatabaseTransaction,
    tenant: &str,
    c: &pb::Campaign,
    now: i64,
) -> Result<(), Error> {
    // The new snapshot goes to eligibility with this transaction; a draft has nothing to
    // send, so it is never behind.
    let sent = crate::sync::send(txn, tenant, c).await?;
    txn.execute_raw(stmt(
        txn,
        "UPDATE campaigns SET campaign = $3, state = $4, version = $5, sync_pending = $7, \
         synced_version = CASE WHEN $7 = 0 THEN $5 ELSE synced_version END, \
         updated_at = $6 WHERE tenant_id = $1 AND id = $2",
        [
            tenant.into(),
            c.id.clone().into(),
            stored(c).into(),
            state_name(c.state()).into(),
            c.version.into(),
            now.into(),
            i32::from(sent).into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Creates a campaign in DRAFT.
pub async fn create(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    mut c: pb::Campaign,
    now: i64,
) -> Result<pb::Campaign, Error> {
    c.set_state(State::Draft);
    c.version = 1;
    let inserted = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO campaigns (tenant_id, id, state, version, synced_version, sync_pending, \
             campaign, created_at, updated_at) VALUES ($1, $2, 'draft', 1, 0, 0, $3, $4, $4) \
             ON CONFLICT (tenant_id, id) DO NOTHING",
            [
                ctx.tenant_id.clone().into(),
                c.id.clone().into(),
                stored(&c).into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if inserted.rows_affected() == 0 {
        return Err(Error::new(
            Code::AlreadyExists,
            format!("campaign `{}` already exists", c.id),
        ));
    }
    record_transition(txn, ctx, &c, State::Unspecified, "create", "", now).await?;
    get(txn, &ctx.tenant_id, &c.id).await
}

/// Replaces a campaign's definition (not once it ended or was killed).
pub async fn update(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    mut c: pb::Campaign,
    expected_version: i64,
    now: i64,
) -> Result<pb::Campaign, Error> {
    let current = load(txn, &ctx.tenant_id, &c.id, true)
        .await?
        .ok_or_else(|| Error::not_found(format!("campaign `{}`", c.id)))?;
    if matches!(current.state(), State::Ended | State::Killed) {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "campaign `{}` is {}: it can no longer change",
                c.id,
                state_name(current.state())
            ),
        )
        .with_reason("ILLEGAL_TRANSITION"));
    }
    if expected_version != 0 && expected_version != current.version {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "campaign `{}` is at version {}, not {expected_version}",
                c.id, current.version
            ),
        )
        .with_reason("VERSION_MISMATCH"));
    }
    c.state = current.state;
    c.version = current.version + 1;
    write(txn, &ctx.tenant_id, &c, now).await?;
    reschedule(txn, &ctx.tenant_id, &c, now).await?;
    enqueue(
        txn,
        &ctx.tenant_id,
        "campaign.updated",
        &serde_json::json!({
            "campaign_id": c.id,
            "version": c.version,
            "principal": ctx.principal,
        }),
    )
    .await?;
    get(txn, &ctx.tenant_id, &c.id).await
}

/// Applies an action; the caller has checked it is allowed to.
pub async fn act(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    id: &str,
    action: Action,
    reason: &str,
    now: i64,
) -> Result<pb::Campaign, Error> {
    let mut c = load(txn, &ctx.tenant_id, id, true)
        .await?
        .ok_or_else(|| Error::not_found(format!("campaign `{id}`")))?;
    let from = c.state();
    let to = next_state(from, action, &c, now)?;
    let definition = c.definition.get_or_insert_default();
    let start = definition.starts_at.as_ref().map(timestamp_to_micros);
    match (action, to) {
        // Started by hand without a start, or before its start: it starts now.
        (Action::Start, State::Active) if start.is_none_or(|s| s > now) => {
            definition.starts_at = Some(micros_to_timestamp(now));
        }
        // Stopped: it ends now (eligibility reports ENDED from then on); one stopped before
        // its start counts as started just before.
        (Action::Stop, _) => {
            let start = start.map_or(now - 1, |s| s.min(now - 1));
            definition.starts_at = Some(micros_to_timestamp(start));
            definition.ends_at = Some(micros_to_timestamp(now));
        }
        _ => {}
    }
    c.set_state(to);
    c.version += 1;
    write(txn, &ctx.tenant_id, &c, now).await?;
    reschedule(txn, &ctx.tenant_id, &c, now).await?;
    record_transition(txn, ctx, &c, from, action.as_str(), reason, now).await?;
    get(txn, &ctx.tenant_id, id).await
}

/// Runs a campaign's start or end job, in the job's transaction: the transition happens if
/// the campaign is still waiting for it (a job that finds nothing to do is simply done).
pub async fn run_job(txn: &DatabaseTransaction, job: &jobs::Job, now: i64) -> Result<(), Error> {
    let action = match job.kind.as_str() {
        START_JOB => Action::StartsAt,
        END_JOB => Action::EndsAt,
        other => return Err(Error::internal(format!("not a campaign job: {other}"))),
    };
    let ctx = RequestContext::system(job.tenant_id.clone(), crate::SERVICE);
    let ctx = RequestContext {
        principal: "scheduler".into(),
        ..ctx
    };
    match act(txn, &ctx, &job.campaign_id, action, "", now).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.code, Code::FailedPrecondition | Code::NotFound) => {
            tracing::info!(job = %job.id, campaign = %job.campaign_id, reason = %e, "campaign job found nothing to do");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
