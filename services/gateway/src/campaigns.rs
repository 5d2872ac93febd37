//! Campaign routes for marketers and integrations: `POST|GET /v1/campaigns`,
//! `GET|PUT /v1/campaigns/{id}` (`?expected_version=` guards an edit), the state changes
//! `POST /v1/campaigns/{id}/{start|pause|resume|stop|kill}` (body `{"reason": "..."}`), and
//! `GET /v1/campaigns/{id}/history` and `/jobs`; distribution: `POST
//! /v1/campaigns/{id}/distributions` (`{"segment_id": …}`) sends the campaign's incentive
//! to a segment, `GET /v1/distributions/{id}` reports progress and, under `messages`, how
//! the messages it caused ended; `GET /v1/campaigns/{id}/codes.csv` exports the codes of
//! the campaign's pool with customer and status. Bodies and answers are the scheduler's
//! protobuf messages in their canonical JSON mapping ([`crate::transcode`]).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::notification::v1 as npb;
use tessera_proto::scheduler::v1 as pb;
use tessera_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_runtime::{Error, RequestContext};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::api::{Api, Content, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::query::{PageQuery, QueryResult, enum_value, page_reply, page_request, strict};
use crate::transcode::{from_json, reply, to_json, to_json_list, with};

/// Roles that write campaigns and move them through their states (a junior marketer's
/// effects within the tenant's access policy, which the scheduler enforces).
const AUTHORS: [Role; 3] = [Role::Admin, Role::Marketer, Role::JuniorMarketer];

fn message(name: &str) -> String {
    format!("tessera.scheduler.v1.{name}")
}

pub fn routes(api: &mut Api) {
    const CAMPAIGN: &str = "tessera.scheduler.v1.Campaign";
    api.tag(
        "campaigns",
        "Campaigns, their life cycle, jobs, distribution and codes.",
    )
    .add(
        Op::post("/v1/campaigns", create)
            .summary("Create a campaign")
            .roles(&AUTHORS)
            .idempotent()
            .body_proto(CAMPAIGN, &[])
            .answer_proto(201, "The campaign, in draft.", CAMPAIGN),
    )
    .add(
        Op::get("/v1/campaigns", list)
            .summary("List campaigns")
            .roles(&Role::ALL)
            .query::<ListQuery>()
            .answer_page(CAMPAIGN),
    )
    .add(
        Op::get("/v1/campaigns/{id}", get_one)
            .summary("Get a campaign")
            .roles(&Role::ALL)
            .answer_proto(200, "The campaign.", CAMPAIGN),
    )
    .add(
        Op::put("/v1/campaigns/{id}", update)
            .summary("Update a campaign")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/campaigns/{id}")
            .query::<UpdateQuery>()
            .body_proto(CAMPAIGN, &["id"])
            .answer_proto(200, "The campaign.", CAMPAIGN),
    )
    .add(
        Op::get("/v1/campaigns/{id}/history", history)
            .summary("A campaign's state changes")
            .roles(&Role::ALL)
            .query::<PageQuery>()
            .answer_page("tessera.scheduler.v1.Transition"),
    )
    .add(
        Op::get("/v1/campaigns/{id}/jobs", jobs)
            .summary("A campaign's scheduled jobs")
            .roles(&Role::ALL)
            .query::<PageQuery>()
            .answer_page("tessera.scheduler.v1.Job"),
    )
    .add(
        Op::post("/v1/campaigns/{id}/distributions", distribute)
            .summary("Send a campaign's incentive to a segment")
            .roles(&AUTHORS)
            .idempotent()
            .body::<DistributeBody>()
            .answer_proto(
                202,
                "The distribution, started.",
                "tessera.scheduler.v1.Distribution",
            ),
    )
    .add(
        Op::get("/v1/campaigns/{id}/codes.csv", codes_csv)
            .summary("Export the codes of a campaign's pool as CSV")
            .roles(&Role::ALL)
            .answer_with(
                200,
                "`code,status,redemptions,max_uses,customer_id,starts_at,ends_at`",
                Content::Csv,
            ),
    )
    .add(
        Op::get("/v1/distributions/{id}", distribution)
            .summary("A distribution's progress and result")
            .roles(&Role::ALL)
            .answer_proto_with(
                200,
                "The distribution; under `messages`, how the messages it caused ended.",
                "tessera.scheduler.v1.Distribution",
                "messages",
                "tessera.notification.v1.MessageCount",
            ),
    )
    .add(
        Op::post("/v1/campaigns/{id}/{action}", act)
            .summary("Start, pause, resume, stop or kill a campaign")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/campaigns/{id}")
            .path_enum("action", &["start", "pause", "resume", "stop", "kill"])
            .body_optional::<ActionBody>()
            .answer_proto(200, "The campaign.", CAMPAIGN),
    );
}

fn call(
    state: &AppState,
    principal: &Principal,
    request_id: &RequestId,
) -> (SchedulerServiceClient<Channel>, RequestContext) {
    (state.scheduler.clone(), principal.context(request_id))
}

fn campaign(status: http::StatusCode, c: Option<pb::Campaign>) -> Result<Response, ApiError> {
    reply(status, &message("Campaign"), &c.unwrap_or_default())
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let c: pb::Campaign = from_json(&message("Campaign"), body)?;
    let r = client
        .create_campaign(ctx.request(pb::CreateCampaignRequest {
            idempotency_key: key,
            campaign: Some(c),
        }))
        .await?
        .into_inner();
    campaign(http::StatusCode::CREATED, r.campaign)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct UpdateQuery {
    /// Refuse the edit (409) unless the campaign is at this version.
    #[serde(default)]
    expected_version: i64,
}

async fn update(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    query: QueryResult<UpdateQuery>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    let c: pb::Campaign = from_json(&message("Campaign"), with(body, "id", id))?;
    let r = client
        .update_campaign(ctx.request(pb::UpdateCampaignRequest {
            idempotency_key: key,
            campaign: Some(c),
            expected_version: q.expected_version,
        }))
        .await?
        .into_inner();
    campaign(http::StatusCode::OK, r.campaign)
}

async fn get_one(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .get_campaign(ctx.request(pb::GetCampaignRequest { id }))
        .await?
        .into_inner();
    campaign(http::StatusCode::OK, r.campaign)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Page size, 1..=100 (default 20).
    #[serde(default)]
    limit: u32,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default)]
    starting_after: String,
    /// Campaigns: `draft`, `scheduled`, `active`, `paused`, `killed` or `ended`.
    #[serde(default)]
    state: String,
}

fn items<T: prost::Message>(name: &str, list: &[T]) -> Result<Vec<Value>, ApiError> {
    to_json_list(&message(name), list)
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    let request = pb::ListCampaignsRequest {
        page: page_request(q.limit, &q.starting_after),
        state: enum_value(
            "state",
            &message("CampaignState"),
            "CAMPAIGN_STATE_",
            &q.state,
        )?,
    };
    let r = client
        .list_campaigns(ctx.request(request))
        .await?
        .into_inner();
    page_reply(items("Campaign", &r.campaigns)?, r.page)
}

fn page(q: PageQuery) -> Option<tessera_proto::common::v1::PageRequest> {
    page_request(q.limit, &q.starting_after)
}

async fn history(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    query: QueryResult<PageQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let page = page(strict(query)?);
    let r = client
        .list_campaign_history(ctx.request(pb::ListCampaignHistoryRequest { id, page }))
        .await?
        .into_inner();
    page_reply(items("Transition", &r.transitions)?, r.page)
}

async fn jobs(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    query: QueryResult<PageQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let page = page(strict(query)?);
    let r = client
        .list_jobs(ctx.request(pb::ListJobsRequest {
            page,
            campaign_id: id,
        }))
        .await?
        .into_inner();
    page_reply(items("Job", &r.jobs)?, r.page)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    /// Why, kept in the campaign's history.
    #[serde(default)]
    reason: String,
}

/// `POST /v1/campaigns/{id}/{start|pause|resume|stop|kill}`.
async fn act(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path((id, action)): Path<(String, String)>,
    IdempotencyKey(key): IdempotencyKey,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    // The body is optional: `{"reason": "..."}` or nothing.
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::from(Error::invalid_field("body", e.to_string())))?
    };
    let action = match action.as_str() {
        "start" => pb::CampaignAction::Start,
        "pause" => pb::CampaignAction::Pause,
        "resume" => pb::CampaignAction::Resume,
        "stop" => pb::CampaignAction::Stop,
        "kill" => pb::CampaignAction::Kill,
        _ => {
            return Err(Error::not_found(format!(
                "action `{action}` (one of start, pause, resume, stop, kill)"
            ))
            .into());
        }
    };
    let r = client
        .change_campaign_state(ctx.request(pb::ChangeCampaignStateRequest {
            idempotency_key: key,
            id,
            action: action.into(),
            reason: body.reason,
        }))
        .await?
        .into_inner();
    campaign(http::StatusCode::OK, r.campaign)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DistributeBody {
    /// The segment whose members get the incentive.
    segment_id: String,
}

async fn distribute(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(campaign_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<DistributeBody>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .distribute_campaign(ctx.request(pb::DistributeCampaignRequest {
            idempotency_key: key,
            campaign_id,
            segment_id: body.segment_id,
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::ACCEPTED,
        &message("Distribution"),
        &r.distribution.unwrap_or_default(),
    )
}

/// A distribution, with its messages counted by state and reason under `messages`.
async fn distribution(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let d = client
        .get_distribution(ctx.request(pb::GetDistributionRequest { id }))
        .await?
        .into_inner()
        .distribution
        .unwrap_or_default();
    let counts = state
        .notification
        .clone()
        .summarize_messages(ctx.request(npb::SummarizeMessagesRequest {
            cause: format!("distribution:{}", d.id),
        }))
        .await?
        .into_inner()
        .counts;
    let mut body = to_json(&message("Distribution"), &d)?;
    body["messages"] = Value::Array(to_json_list(
        "tessera.notification.v1.MessageCount",
        &counts,
    )?);
    Ok((http::StatusCode::OK, axum::Json(body)).into_response())
}

/// The codes of the campaign's pool as `text/csv`
/// (`code,status,redemptions,max_uses,customer_id,starts_at,ends_at`).
async fn codes_csv(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let c = client
        .get_campaign(ctx.request(pb::GetCampaignRequest { id }))
        .await?
        .into_inner()
        .campaign
        .unwrap_or_default();
    let pool_id = c
        .incentive
        .map(|i| i.pool_id)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            ApiError::from(
                Error::new(
                    tessera_runtime::Code::FailedPrecondition,
                    format!(
                        "campaign `{}` issues no codes (its incentive has no pool)",
                        c.id
                    ),
                )
                .with_reason("NO_CODE_POOL"),
            )
        })?;
    let stream = state
        .catalog
        .clone()
        .export_codes(ctx.request(cpb::ExportCodesRequest { pool_id }))
        .await?
        .into_inner()
        .map(|chunk| chunk.map(|c| c.chunk));
    Ok((
        [
            (
                http::header::CONTENT_TYPE,
                "text/csv; charset=utf-8".to_string(),
            ),
            (
                http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"campaign-{}-codes.csv\"", c.id),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
