//! The gRPC handlers of `tessera.scheduler.v1.SchedulerService`.

use std::sync::Arc;

use sea_orm::ConnectionTrait;

use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::scheduler::v1 as pb;
use tessera_proto::scheduler::v1::scheduler_service_server::SchedulerService;
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_runtime::{Error, RequestContext};
use tessera_store::api::{check_customer_id, check_idempotency_key, page_response};
use tessera_store::idempotency::Idempotency;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Db, db_error, stmt};
use tonic::{Request, Response, Status};

use crate::campaigns::{self, Action};
use crate::jobs::Clock;
use crate::{distributions, issues};

pub struct Scheduler {
    pub db: Db,
    pub idempotency: Idempotency,
    /// Delivers queued commands (the snapshot a request just wrote) before it answers.
    pub commands: Arc<tessera_store::queue::Worker>,
    pub catalog: CatalogServiceClient<tessera_runtime::grpc::Channel>,
    pub eligibility: EligibilityServiceClient<tessera_runtime::grpc::Channel>,
    pub clock: Arc<dyn Clock>,
    /// Wakes this replica's job worker (a job was scheduled).
    pub jobs_wake: Arc<tokio::sync::Notify>,
}

/// Roles that write campaigns, move them through their states and distribute them (the
/// gateway checks the same; this is the scheduler's own check).
const AUTHORS: [&str; 3] = ["admin", "marketer", "junior_marketer"];

/// A page limit and a cursor that is a campaign id (any visible ASCII).
fn page(v: &mut Violations, page: Option<tessera_proto::common::v1::PageRequest>) -> (u32, String) {
    let page = page.unwrap_or_default();
    let limit = v.page_limit(page.limit);
    if page.starting_after.len() > 128 {
        v.add(
            "page.starting_after",
            "is not a cursor returned by this API",
        );
    }
    (limit, page.starting_after)
}

impl Scheduler {
    /// Checks a campaign here and through eligibility's compiler.
    async fn check(
        &self,
        ctx: &RequestContext,
        key: &str,
        c: Option<&pb::Campaign>,
    ) -> Result<pb::Campaign, Error> {
        ctx.require_role(&AUTHORS)?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, key);
        match c {
            Some(c) => campaigns::check(&mut v, c),
            None => v.add("campaign", "is required"),
        }
        v.finish()?;
        let c = c.ok_or_else(|| Error::invalid_field("campaign", "is required"))?;
        // Outputs are ignored; eligibility checks the definition as it will receive it.
        let mut c = pb::Campaign {
            state: 0,
            version: 0,
            synced_version: 0,
            created_at: None,
            updated_at: None,
            ..c.clone()
        };
        c.set_state(pb::CampaignState::Draft);
        crate::sync::validate(
            &self.eligibility,
            &ctx.tenant_id,
            &campaigns::projection(&c),
        )
        .await?;
        if ctx.role == "junior_marketer" {
            // What a junior marketer's campaign gives is capped by the tenant's policy,
            // which the catalog keeps.
            let policy = self
                .catalog
                .clone()
                .get_access_policy(ctx.request(cpb::GetAccessPolicyRequest {}))
                .await
                .map_err(|s| Error::from_status(&s))?
                .into_inner()
                .policy
                .unwrap_or_default();
            let effect = c.definition.as_ref().and_then(|d| d.effect.as_ref());
            tessera_effects::check_junior(&policy, "campaign.definition.effect", effect)?;
        }
        Ok(c)
    }

    async fn act(
        &self,
        request: Request<pb::ChangeCampaignStateRequest>,
    ) -> Result<pb::Campaign, Error> {
        let ctx = RequestContext::from_metadata(request.metadata())?;
        ctx.require_role(&AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.id.is_empty() {
            v.add("id", "is required");
        }
        let action = match pb::CampaignAction::try_from(request.action) {
            Ok(pb::CampaignAction::Start) => Some(Action::Start),
            Ok(pb::CampaignAction::Pause) => Some(Action::Pause),
            Ok(pb::CampaignAction::Resume) => Some(Action::Resume),
            Ok(pb::CampaignAction::Stop) => Some(Action::Stop),
            Ok(pb::CampaignAction::Kill) => Some(Action::Kill),
            _ => {
                v.add("action", "must be start, pause, resume, stop or kill");
                None
            }
        };
        if request.reason.chars().count() > 500 {
            v.add("reason", "must be at most 500 characters");
        }
        if action == Some(Action::Kill) && request.reason.trim().is_empty() {
            v.add("reason", "is required to kill a campaign");
        }
        v.finish()?;
        let action = action.ok_or_else(|| Error::internal("unchecked action"))?;
        let now = self.clock.now();
        let (id, reason, work_ctx) = (request.id.clone(), request.reason.clone(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "scheduler.ChangeCampaignState",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let campaign =
                            campaigns::act(txn, &work_ctx, &id, action, &reason, now).await?;
                        Ok(pb::ChangeCampaignStateResponse {
                            campaign: Some(campaign),
                        })
                    })
                },
            )
            .await?;
        self.after_change(&ctx.tenant_id, &request.id).await;
        self.fresh(&ctx.tenant_id, response.campaign).await
    }

    /// After a change committed: deliver its snapshot to eligibility before answering (a
    /// kill lands at once), waiting at most a second for a relay of another replica or
    /// this one that claimed it first; if eligibility is down the queue retries. Wakes the
    /// job worker.
    async fn after_change(&self, tenant: &str, id: &str) {
        self.jobs_wake.notify_one();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            if let Err(e) = self.commands.run_once().await {
                tracing::warn!(error = %e, "campaign snapshot queued; the relay retries");
                return;
            }
            let behind = campaigns::get(self.db.conn(), tenant, id)
                .await
                .map(|c| c.synced_version < c.version)
                .unwrap_or(false);
            if !behind || std::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The campaign as it is now (after a push, its synced version is current).
    async fn fresh(&self, tenant: &str, c: Option<pb::Campaign>) -> Result<pb::Campaign, Error> {
        let id = c.map(|c| c.id).unwrap_or_default();
        campaigns::get(self.db.conn(), tenant, &id).await
    }
}

#[tonic::async_trait]
impl SchedulerService for Scheduler {
    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> Result<Response<pb::CreateCampaignResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let campaign = self
            .check(&ctx, &request.idempotency_key, request.campaign.as_ref())
            .await?;
        let now = self.clock.now();
        let work_ctx = ctx.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "scheduler.CreateCampaign",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let campaign = campaigns::create(txn, &work_ctx, campaign, now).await?;
                        Ok(pb::CreateCampaignResponse {
                            campaign: Some(campaign),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn update_campaign(
        &self,
        request: Request<pb::UpdateCampaignRequest>,
    ) -> Result<Response<pb::UpdateCampaignResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let campaign = self
            .check(&ctx, &request.idempotency_key, request.campaign.as_ref())
            .await?;
        let id = campaign.id.clone();
        let (now, expected, work_ctx) = (self.clock.now(), request.expected_version, ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "scheduler.UpdateCampaign",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let campaign =
                            campaigns::update(txn, &work_ctx, campaign, expected, now).await?;
                        Ok(pb::UpdateCampaignResponse {
                            campaign: Some(campaign),
                        })
                    })
                },
            )
            .await?;
        self.after_change(&ctx.tenant_id, &id).await;
        Ok(Response::new(pb::UpdateCampaignResponse {
            campaign: Some(self.fresh(&ctx.tenant_id, response.campaign).await?),
        }))
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::GetCampaignResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        if request.id.is_empty() {
            return Err(Error::invalid_field("id", "is required").into());
        }
        let campaign = campaigns::get(self.db.conn(), &ctx.tenant_id, &request.id).await?;
        Ok(Response::new(pb::GetCampaignResponse {
            campaign: Some(campaign),
        }))
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let (limit, after) = page(&mut v, request.page);
        let state = match pb::CampaignState::try_from(request.state) {
            Ok(pb::CampaignState::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                v.add("state", "is not a campaign state");
                None
            }
        };
        v.finish()?;
        let (campaigns, more) =
            campaigns::list(self.db.conn(), &ctx.tenant_id, state, &after, limit).await?;
        let page = page_response(more, campaigns.last().map(|c| c.id.as_str()));
        Ok(Response::new(pb::ListCampaignsResponse { campaigns, page }))
    }

    async fn change_campaign_state(
        &self,
        request: Request<pb::ChangeCampaignStateRequest>,
    ) -> Result<Response<pb::ChangeCampaignStateResponse>, Status> {
        let campaign = self.act(request).await?;
        Ok(Response::new(pb::ChangeCampaignStateResponse {
            campaign: Some(campaign),
        }))
    }

    async fn issue_incentive(
        &self,
        request: Request<pb::IssueIncentiveRequest>,
    ) -> Result<Response<pb::IssueIncentiveResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.campaign_id.is_empty() {
            v.add("campaign_id", "is required");
        }
        check_customer_id(&mut v, "customer_id", &request.customer_id);
        if request.cause.chars().count() > 200 {
            v.add("cause", "must be at most 200 characters");
        }
        v.finish()?;
        let conn = self.db.conn();
        let (tenant, customer) = (ctx.tenant_id.clone(), request.customer_id.clone());
        let campaign = campaigns::get(conn, &tenant, &request.campaign_id).await?;
        if let Some(issue) = issues::get(conn, &tenant, &campaign.id, &customer, "").await? {
            return Ok(Response::new(pb::IssueIncentiveResponse {
                issue: Some(issue),
                issued: false,
            }));
        }
        // The publication first (a retry gets the same one), then the issue, its reminders
        // and its event in one transaction.
        let issue = issues::publish(
            &self.catalog,
            &ctx,
            &campaign,
            &customer,
            "",
            &request.cause,
        )
        .await?;
        let (now, work_ctx) = (self.clock.now(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "scheduler.IssueIncentive",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let (issue, issued) =
                            issues::record(txn, &work_ctx, &campaign, issue, now).await?;
                        Ok(pb::IssueIncentiveResponse {
                            issue: Some(issue),
                            issued,
                        })
                    })
                },
            )
            .await?;
        self.jobs_wake.notify_one();
        Ok(Response::new(response))
    }

    async fn distribute_campaign(
        &self,
        request: Request<pb::DistributeCampaignRequest>,
    ) -> Result<Response<pb::DistributeCampaignResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.campaign_id.is_empty() {
            v.add("campaign_id", "is required");
        }
        if request.segment_id.is_empty() || request.segment_id.len() > 128 {
            v.add("segment_id", "must be 1 to 128 characters");
        }
        v.finish()?;
        let campaign = campaigns::get(self.db.conn(), &ctx.tenant_id, &request.campaign_id).await?;
        distributions::check_campaign(&campaign)?;
        let segment = self
            .eligibility
            .clone()
            .get_segment(ctx.request(epb::GetSegmentRequest {
                id: request.segment_id.clone(),
            }))
            .await
            .map_err(|s| Error::from_status(&s))?
            .into_inner()
            .segment
            .unwrap_or_default();
        let now = self.clock.now();
        let distribution = pb::Distribution {
            id: uuid::Uuid::now_v7().to_string(),
            campaign_id: campaign.id.clone(),
            segment_id: request.segment_id.clone(),
            total: u64::try_from(segment.size).unwrap_or_default(),
            ..Default::default()
        };
        let (work_ctx, db_tenant) = (ctx.clone(), ctx.tenant_id.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "scheduler.DistributeCampaign",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        distributions::start(txn, &work_ctx, &distribution, now).await?;
                        let (distribution, _) =
                            distributions::get(txn, &db_tenant, &distribution.id).await?;
                        Ok(pb::DistributeCampaignResponse {
                            distribution: Some(distribution),
                        })
                    })
                },
            )
            .await?;
        self.jobs_wake.notify_one();
        Ok(Response::new(response))
    }

    async fn get_distribution(
        &self,
        request: Request<pb::GetDistributionRequest>,
    ) -> Result<Response<pb::GetDistributionResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let (distribution, _) = distributions::get(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetDistributionResponse {
            distribution: Some(distribution),
        }))
    }

    async fn ensure_wallet_sweeps(
        &self,
        request: Request<pb::EnsureWalletSweepsRequest>,
    ) -> Result<Response<pb::EnsureWalletSweepsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.program_id.len() > 64 {
            v.add("program_id", "must be at most 64 characters");
        }
        v.finish()?;
        // Scheduling a job that exists already changes nothing: a replay is harmless.
        let programs: Vec<&str> = Some(request.program_id.as_str())
            .filter(|p| !p.is_empty())
            .into_iter()
            .collect();
        campaigns::ensure_wallet_sweeps(
            self.db.conn(),
            &ctx.tenant_id,
            &programs,
            self.clock.now(),
        )
        .await?;
        self.jobs_wake.notify_one();
        Ok(Response::new(pb::EnsureWalletSweepsResponse {}))
    }

    async fn list_campaign_history(
        &self,
        request: Request<pb::ListCampaignHistoryRequest>,
    ) -> Result<Response<pb::ListCampaignHistoryResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        if request.id.is_empty() {
            v.add("id", "is required");
        }
        let page_request = request.page.unwrap_or_default();
        let limit = v.page_limit(page_request.limit);
        let after = if page_request.starting_after.is_empty() {
            0
        } else {
            page_request
                .starting_after
                .parse::<i64>()
                .unwrap_or_else(|_| {
                    v.add(
                        "page.starting_after",
                        "is not a cursor returned by this API",
                    );
                    0
                })
        };
        v.finish()?;
        let conn = self.db.conn();
        campaigns::get(conn, &ctx.tenant_id, &request.id).await?;
        let (transitions, more) =
            campaigns::history(conn, &ctx.tenant_id, &request.id, after, limit).await?;
        let last = transitions.last().map(|t| t.seq.to_string());
        Ok(Response::new(pb::ListCampaignHistoryResponse {
            transitions,
            page: page_response(more, last.as_deref()),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let (limit, after) = page(&mut v, request.page);
        v.finish()?;
        let conn = self.db.conn();
        let mut values: Vec<sea_orm::Value> = vec![
            ctx.tenant_id.clone().into(),
            after.into(),
            i64::from(limit + 1).into(),
        ];
        let filter = if request.campaign_id.is_empty() {
            ""
        } else {
            values.push(request.campaign_id.clone().into());
            " AND campaign_id = $4"
        };
        let rows = conn
            .query_all_raw(stmt(
                conn,
                &format!(
                    "SELECT id, kind, campaign_id, due_at, status, attempts, last_error, runs \
                     FROM jobs WHERE tenant_id = $1 AND id > $2{filter} ORDER BY id LIMIT $3"
                ),
                values,
            ))
            .await
            .map_err(db_error)?;
        let mut jobs = Vec::new();
        for row in &rows {
            let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
            jobs.push(pb::Job {
                id: text(0)?,
                kind: text(1)?,
                campaign_id: text(2)?,
                due_at: Some(micros_to_timestamp(
                    row.try_get_by_index(3).map_err(db_error)?,
                )),
                status: text(4)?,
                attempts: row.try_get_by_index(5).map_err(db_error)?,
                last_error: text(6)?,
                runs: row.try_get_by_index(7).map_err(db_error)?,
            });
        }
        let more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        let page = page_response(more, jobs.last().map(|j| j.id.as_str()));
        Ok(Response::new(pb::ListJobsResponse { jobs, page }))
    }
}
