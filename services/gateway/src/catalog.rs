//! Catalog routes: `/v1/rewards…`, `/v1/code-pools…`, `/v1/codes/{code}…` and
//! `/v1/customers/{id}/rewards…`.
//!
//! Bodies and answers are the catalog's protobuf messages in their canonical JSON mapping,
//! transcoded through the descriptor set ([`crate::transcode`]): one schema for gRPC and
//! HTTP, so a new effect kind needs no gateway change.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::Error;
use utoipa::IntoParams;

use crate::AppState;
use crate::api::{Api, Content, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::query::{QueryResult, enum_value, page_reply, page_request, strict};
use crate::transcode::{self, from_json, to_json, with};

/// Roles that define rewards and pools (a junior marketer's effects within the tenant's
/// access policy, which the catalog enforces).
const AUTHORS: [Role; 3] = [Role::Admin, Role::Marketer, Role::JuniorMarketer];
/// Roles that read the access policy.
const POLICY_READERS: [Role; 5] = [
    Role::Admin,
    Role::Marketer,
    Role::JuniorMarketer,
    Role::SupportAgent,
    Role::Analyst,
];
/// Roles that hand rewards to customers (a support agent's "sorry" reward from the tenant's
/// list, a touchpoint).
const PUBLISHERS: [Role; 4] = [
    Role::Admin,
    Role::Marketer,
    Role::SupportAgent,
    Role::Touchpoint,
];

fn message(name: &str) -> String {
    format!("tessera.catalog.v1.{name}")
}

/// `200 OK` (or `201 Created`) with the catalog message `name` as JSON.
fn reply<T: prost::Message>(
    status: http::StatusCode,
    name: &str,
    m: &T,
) -> Result<Response, ApiError> {
    transcode::reply(status, &message(name), m)
}

pub fn routes(api: &mut Api) {
    const REWARD: &str = "tessera.catalog.v1.Reward";
    const POOL_MSG: &str = "tessera.catalog.v1.CodePool";
    const CODE: &str = "tessera.catalog.v1.Code";
    const PUBLICATION: &str = "tessera.catalog.v1.Publication";
    const POLICY: &str = "tessera.catalog.v1.AccessPolicy";
    const SET: [&str; 2] = ["id", "idempotency_key"];
    api.tag(
        "rewards",
        "Rewards: what an incentive gives (its effects), and previews of them on a cart.",
    )
    .add(
        Op::post("/v1/rewards", create_reward)
            .summary("Create a reward")
            .roles(&AUTHORS)
            .idempotent()
            .body_proto("tessera.catalog.v1.RewardInput", &[])
            .answer_proto(201, "The reward.", REWARD),
    )
    .add(
        Op::get("/v1/rewards", list_rewards)
            .summary("List rewards")
            .roles(&Role::ALL)
            .query::<ListQuery>()
            .answer_page(REWARD),
    )
    .add(
        Op::post("/v1/rewards/preview", preview)
            .summary("Preview effects on a cart")
            .describe("Applies effects to a cart without saving anything.")
            .roles(&Role::ALL)
            .body_proto("tessera.catalog.v1.PreviewEffectsRequest", &[])
            .answer_proto(
                200,
                "The cart after the effects.",
                "tessera.catalog.v1.Outcome",
            ),
    )
    .add(
        Op::get("/v1/rewards/{id}", get_reward)
            .summary("Get a reward")
            .roles(&Role::ALL)
            .answer_proto(200, "The reward.", REWARD),
    )
    .add(
        Op::put("/v1/rewards/{id}", update_reward)
            .summary("Update a reward")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/rewards/{id}")
            .body_proto("tessera.catalog.v1.UpdateRewardRequest", &SET)
            .answer_proto(200, "The reward.", REWARD),
    )
    .add(
        Op::post("/v1/rewards/{id}/status", set_reward_status)
            .summary("Enable or disable a reward")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/rewards/{id}")
            .body_proto("tessera.catalog.v1.SetRewardStatusRequest", &SET)
            .answer_proto(200, "The reward.", REWARD),
    );
    api.tag(
        "codes",
        "Code pools, their generation and import jobs, and single codes.",
    )
    .add(
        Op::post("/v1/code-pools", create_pool)
            .summary("Create a code pool")
            .roles(&AUTHORS)
            .idempotent()
            .body_proto("tessera.catalog.v1.CodePoolInput", &[])
            .answer_proto(201, "The pool.", POOL_MSG),
    )
    .add(
        Op::get("/v1/code-pools", list_pools)
            .summary("List code pools")
            .roles(&Role::ALL)
            .query::<ListQuery>()
            .answer_page(POOL_MSG),
    )
    .add(
        Op::get("/v1/code-pools/jobs/{id}", get_job)
            .summary("Get a generation job")
            .roles(&Role::ALL)
            .answer_proto(
                200,
                "The job and its progress.",
                "tessera.catalog.v1.GenerationJob",
            ),
    )
    .add(
        Op::get("/v1/code-pools/{id}", get_pool)
            .summary("Get a code pool")
            .roles(&Role::ALL)
            .answer_proto(200, "The pool.", POOL_MSG),
    )
    .add(
        Op::put("/v1/code-pools/{id}", update_pool)
            .summary("Update a code pool")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/code-pools/{id}")
            .body_proto("tessera.catalog.v1.CodePoolInput", &[])
            .answer_proto(200, "The pool.", POOL_MSG),
    )
    .add(
        Op::post("/v1/code-pools/{id}/status", set_pool_status)
            .summary("Enable or disable a code pool")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/code-pools/{id}")
            .body_proto("tessera.catalog.v1.SetCodePoolStatusRequest", &SET)
            .answer_proto(200, "The pool.", POOL_MSG),
    )
    .add(
        Op::post("/v1/code-pools/{id}/generate", generate)
            .summary("Generate codes")
            .describe("Starts a durable generation job; poll it at `/v1/code-pools/jobs/{id}`.")
            .roles(&AUTHORS)
            .idempotent()
            .body_proto(
                "tessera.catalog.v1.GenerateCodesRequest",
                &["pool_id", "idempotency_key"],
            )
            .answer_proto(202, "The job.", "tessera.catalog.v1.GenerationJob"),
    )
    .add(
        Op::get("/v1/code-pools/{id}/codes.csv", export)
            .summary("Export a pool's codes as CSV")
            .roles(&AUTHORS)
            .answer_with(200, "The codes, streamed.", Content::Csv),
    )
    .add(
        Op::post("/v1/code-pools/{id}/codes.csv", import)
            .summary("Import codes from CSV")
            .roles(&AUTHORS)
            .idempotent()
            .query::<ImportQuery>()
            .body_csv()
            .answer_proto(
                200,
                "What was imported and which rows were refused.",
                "tessera.catalog.v1.ImportCodesResponse",
            ),
    )
    .add(
        Op::get("/v1/codes/{code}", get_code)
            .summary("Get a code")
            .roles(&Role::ALL)
            .answer_proto(200, "The code.", CODE),
    )
    .add(
        Op::post("/v1/codes/{code}/status", set_code_status)
            .summary("Enable or disable a code")
            .roles(&AUTHORS)
            .idempotent()
            .before("/v1/codes/{code}")
            .body_proto(
                "tessera.catalog.v1.SetCodeStatusRequest",
                &["code", "idempotency_key"],
            )
            .answer_proto(200, "The code.", CODE),
    );
    api.tag(
        "access policy",
        "What junior marketers may give and which rewards support agents may hand out.",
    )
    .add(
        Op::get("/v1/access-policy", get_policy)
            .summary("The tenant's access policy")
            .roles(&POLICY_READERS)
            .answer_proto(200, "The policy (the defaults when none was set).", POLICY),
    )
    .add(
        Op::put("/v1/access-policy", put_policy)
            .summary("Replace the tenant's access policy")
            .describe(
                "Junior marketers' rewards and campaigns may give at most \
                 `junior_max_percent_bp` (percent-off, buy-x-get-y, cashback) and \
                 `junior_max_amount` (amount-off, cashback, gift card); support agents may \
                 publish only `support_reward_ids`. The services refuse anything else with \
                 403 and the field named.",
            )
            .roles(&[Role::Admin])
            .idempotent()
            .before("/v1/access-policy")
            .body_proto(POLICY, &["updated_at"])
            .answer_proto(200, "The policy.", POLICY),
    );
    api.tag("customer rewards", "Rewards published to a customer.")
        .add(
            Op::get("/v1/customers/{id}/rewards", customer_rewards)
                .summary("List a customer's rewards")
                .roles(&Role::ALL)
                .query::<ListQuery>()
                .answer_page("tessera.catalog.v1.CustomerReward"),
        )
        .add(
            Op::post("/v1/customers/{id}/rewards", publish)
                .summary("Publish a reward to a customer")
                .roles(&PUBLISHERS)
                .idempotent()
                .body_proto(
                    "tessera.catalog.v1.PublishRewardRequest",
                    &["customer_id", "idempotency_key"],
                )
                .answer_proto(201, "The publication.", PUBLICATION),
        )
        .add(
            Op::post("/v1/customers/{id}/rewards/{publication}/shown", mark_shown)
                .summary("Record that a customer saw a reward")
                .roles(&PUBLISHERS)
                .idempotent()
                .body_proto(
                    "tessera.catalog.v1.MarkShownRequest",
                    &["customer_id", "publication_id", "idempotency_key"],
                )
                .answer_proto(200, "The publication.", PUBLICATION),
        );
}

/// Everything a catalog handler starts from.
struct Call {
    state: Arc<AppState>,
    ctx: tessera_runtime::RequestContext,
}

impl Call {
    fn new(state: Arc<AppState>, principal: &Principal, request_id: &RequestId) -> Self {
        Self {
            state,
            ctx: principal.context(request_id),
        }
    }

    fn client(
        &self,
    ) -> pb::catalog_service_client::CatalogServiceClient<tessera_runtime::grpc::Channel> {
        self.state.catalog.clone()
    }
}

async fn create_reward(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let reward = from_json(&message("RewardInput"), body)?;
    let r = call
        .client()
        .create_reward(call.ctx.request(pb::CreateRewardRequest {
            idempotency_key: key,
            reward: Some(reward),
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::CREATED,
        "Reward",
        &r.reward.unwrap_or_default(),
    )
}

async fn update_reward(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let request: pb::UpdateRewardRequest = from_json(
        &message("UpdateRewardRequest"),
        with(with(body, "id", id), "idempotency_key", key),
    )?;
    let r = call
        .client()
        .update_reward(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "Reward",
        &r.reward.unwrap_or_default(),
    )
}

async fn get_reward(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let r = call
        .client()
        .get_reward(call.ctx.request(pb::GetRewardRequest { id }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "Reward",
        &r.reward.unwrap_or_default(),
    )
}

/// Query of the list routes.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Page size, 1..=100 (default 20).
    #[serde(default)]
    limit: u32,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default)]
    starting_after: String,
    /// Rewards: `active` or `disabled`; customer rewards: `available`, `scheduled`,
    /// `redeemed`, `expired` or `disabled`.
    #[serde(default)]
    status: String,
    /// Rewards: the effect kind.
    #[serde(default)]
    effect_kind: String,
    /// Pools: the reward.
    #[serde(default)]
    reward_id: String,
}

fn page(q: &ListQuery) -> Option<tessera_proto::common::v1::PageRequest> {
    page_request(q.limit, &q.starting_after)
}

async fn list_rewards(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let q = strict(query)?;
    let request = pb::ListRewardsRequest {
        page: page(&q),
        status: enum_value(
            "status",
            &message("RewardStatus"),
            "REWARD_STATUS_",
            &q.status,
        )?,
        effect_kind: q.effect_kind,
    };
    let r = call
        .client()
        .list_rewards(call.ctx.request(request))
        .await?
        .into_inner();
    let items = r
        .rewards
        .iter()
        .map(|x| to_json(&message("Reward"), x))
        .collect::<Result<_, _>>()?;
    page_reply(items, r.page)
}

async fn set_reward_status(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let request: pb::SetRewardStatusRequest = from_json(
        &message("SetRewardStatusRequest"),
        with(with(body, "id", id), "idempotency_key", key),
    )?;
    let r = call
        .client()
        .set_reward_status(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "Reward",
        &r.reward.unwrap_or_default(),
    )
}

async fn preview(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let request: pb::PreviewEffectsRequest = from_json(&message("PreviewEffectsRequest"), body)?;
    let r = call
        .client()
        .preview_effects(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "Outcome",
        &r.outcome.unwrap_or_default(),
    )
}

async fn create_pool(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let pool = from_json(&message("CodePoolInput"), body)?;
    let r = call
        .client()
        .create_code_pool(call.ctx.request(pb::CreateCodePoolRequest {
            idempotency_key: key,
            pool: Some(pool),
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::CREATED,
        "CodePool",
        &r.pool.unwrap_or_default(),
    )
}

async fn list_pools(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let q = strict(query)?;
    let request = pb::ListCodePoolsRequest {
        page: page(&q),
        reward_id: q.reward_id,
    };
    let r = call
        .client()
        .list_code_pools(call.ctx.request(request))
        .await?
        .into_inner();
    let items = r
        .pools
        .iter()
        .map(|x| to_json(&message("CodePool"), x))
        .collect::<Result<_, _>>()?;
    page_reply(items, r.page)
}

async fn get_pool(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let r = call
        .client()
        .get_code_pool(call.ctx.request(pb::GetCodePoolRequest { id }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "CodePool",
        &r.pool.unwrap_or_default(),
    )
}

async fn update_pool(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let pool = from_json(&message("CodePoolInput"), body)?;
    let request = pb::UpdateCodePoolRequest {
        idempotency_key: key,
        id,
        pool: Some(pool),
    };
    let r = call
        .client()
        .update_code_pool(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "CodePool",
        &r.pool.unwrap_or_default(),
    )
}

async fn set_pool_status(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let request: pb::SetCodePoolStatusRequest = from_json(
        &message("SetCodePoolStatusRequest"),
        with(with(body, "id", id), "idempotency_key", key),
    )?;
    let r = call
        .client()
        .set_code_pool_status(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "CodePool",
        &r.pool.unwrap_or_default(),
    )
}

async fn generate(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let request: pb::GenerateCodesRequest = from_json(
        &message("GenerateCodesRequest"),
        with(with(body, "pool_id", id), "idempotency_key", key),
    )?;
    let r = call
        .client()
        .generate_codes(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::ACCEPTED,
        "GenerationJob",
        &r.job.unwrap_or_default(),
    )
}

async fn get_job(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let r = call
        .client()
        .get_generation_job(call.ctx.request(pb::GetGenerationJobRequest { id }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "GenerationJob",
        &r.job.unwrap_or_default(),
    )
}

/// Streams the pool's codes as `text/csv`.
async fn export(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(pool_id): Path<String>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let stream = call
        .client()
        .export_codes(call.ctx.request(pb::ExportCodesRequest { pool_id }))
        .await?
        .into_inner()
        .map(|chunk| chunk.map(|c| c.chunk));
    Ok((
        [(http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Query of the CSV import.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// Import the good rows and report the bad ones (default: all or nothing).
    #[serde(default)]
    allow_partial: bool,
}

/// Imports a `text/csv` body, streamed to the catalog in chunks as it arrives.
async fn import(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(pool_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    query: QueryResult<ImportQuery>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let call = Call::new(state, &principal, &request_id);
    let q = strict(query)?;
    let is_csv = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/csv"))
        });
    if !is_csv {
        return Err(Error::invalid_field("Content-Type", "must be text/csv").into());
    }
    let header = pb::ImportCodesRequest {
        part: Some(pb::import_codes_request::Part::Header(pb::ImportHeader {
            idempotency_key: key,
            pool_id,
            allow_partial: q.allow_partial,
        })),
    };
    let chunks = body.into_data_stream().filter_map(|chunk| async move {
        chunk.ok().map(|bytes| pb::ImportCodesRequest {
            part: Some(pb::import_codes_request::Part::Chunk(bytes.to_vec())),
        })
    });
    let messages = futures::stream::iter([header]).chain(chunks);
    let r = call
        .client()
        .import_codes(call.ctx.request(messages))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, "ImportCodesResponse", &r)
}

async fn get_code(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(code): Path<String>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let r = call
        .client()
        .get_code(call.ctx.request(pb::GetCodeRequest { code }))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, "Code", &r.code.unwrap_or_default())
}

async fn set_code_status(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(code): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let request: pb::SetCodeStatusRequest = from_json(
        &message("SetCodeStatusRequest"),
        with(with(body, "code", code), "idempotency_key", key),
    )?;
    let r = call
        .client()
        .set_code_status(call.ctx.request(request))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, "Code", &r.code.unwrap_or_default())
}

async fn customer_rewards(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let q = strict(query)?;
    let request = pb::ListCustomerRewardsRequest {
        customer_id,
        status: enum_value(
            "status",
            &message("CustomerRewardStatus"),
            "CUSTOMER_REWARD_STATUS_",
            &q.status,
        )?,
        page: page(&q),
    };
    let r = call
        .client()
        .list_customer_rewards(call.ctx.request(request))
        .await?
        .into_inner();
    let items = r
        .rewards
        .iter()
        .map(|x| to_json(&message("CustomerReward"), x))
        .collect::<Result<_, _>>()?;
    page_reply(items, r.page)
}

async fn publish(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let body = with(
        with(body, "customer_id", customer_id),
        "idempotency_key",
        key,
    );
    let request: pb::PublishRewardRequest = from_json(&message("PublishRewardRequest"), body)?;
    let r = call
        .client()
        .publish_reward(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::CREATED,
        "Publication",
        &r.publication.unwrap_or_default(),
    )
}

async fn mark_shown(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path((customer_id, publication_id)): Path<(String, String)>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let body = with(body, "publication_id", publication_id);
    let body = with(
        with(body, "customer_id", customer_id),
        "idempotency_key",
        key,
    );
    let request: pb::MarkShownRequest = from_json(&message("MarkShownRequest"), body)?;
    let r = call
        .client()
        .mark_shown(call.ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "Publication",
        &r.publication.unwrap_or_default(),
    )
}

async fn get_policy(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let r = call
        .client()
        .get_access_policy(call.ctx.request(pb::GetAccessPolicyRequest {}))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "AccessPolicy",
        &r.policy.unwrap_or_default(),
    )
}

async fn put_policy(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let call = Call::new(state, &principal, &request_id);
    let policy = from_json(&message("AccessPolicy"), body)?;
    let r = call
        .client()
        .put_access_policy(call.ctx.request(pb::PutAccessPolicyRequest {
            idempotency_key: key,
            policy: Some(policy),
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        "AccessPolicy",
        &r.policy.unwrap_or_default(),
    )
}
