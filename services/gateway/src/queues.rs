//! Dead letters of the services' work queues (admins): `GET /v1/queues/{service}/dead`
//! lists what a service could not deliver or do after its retries (a command to another
//! service, say), `POST /v1/queues/{service}/replay` puts it back. Answers are
//! `tessera.ops.v1` messages in their canonical JSON mapping.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use tessera_proto::ops::v1 as pb;
use tessera_runtime::error::Error;
use utoipa::IntoParams;

use crate::AppState;
use crate::api::{Api, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::query::{QueryResult, strict};
use crate::transcode::{from_json, reply};

/// Dead letters carry every kind of work of the tenant: admins only.
const ADMINS: [Role; 1] = [Role::Admin];

pub fn routes(api: &mut Api) {
    api.tag(
        "queues",
        "Work a service could not complete after its retries (dead letters), and replay.",
    )
    .add(
        Op::get("/v1/queues/{service}/dead", dead)
            .summary("List a service's dead-lettered work")
            .describe("`service`: catalog, eligibility, wallet, campaign-scheduler, notification or gateway. `queue`: `commands` (the command outbox; the gateway's carries erasures), `generation` (catalog code generation), `jobs` (campaign-scheduler jobs), `messages` (notification). Oldest first; page with `after_id`.")
            .roles(&ADMINS)
            .query::<DeadQuery>()
            .answer_proto(
                200,
                "The dead items and the cursor of the next page.",
                "tessera.ops.v1.ListDeadItemsResponse",
            ),
    )
    .add(
        Op::post("/v1/queues/{service}/replay", replay)
            .summary("Replay a service's dead-lettered work")
            .describe("Empty `ids`: every dead item of the queue.")
            .roles(&ADMINS)
            .idempotent()
            .body_proto(
                "tessera.ops.v1.ReplayDeadItemsRequest",
                &["idempotency_key", "service"],
            )
            .answer_proto(
                200,
                "How many items went back in the queue.",
                "tessera.ops.v1.ReplayDeadItemsResponse",
            ),
    );
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    /// The queue (default `commands`).
    #[serde(default)]
    queue: String,
    /// Items after this id (the previous page's `next_after_id`).
    #[serde(default)]
    after_id: i64,
    /// Page size, 1..=500 (default 100).
    #[serde(default)]
    limit: u32,
}

/// Where a service's dead letters are: the gateway's own in process, the others' over gRPC.
enum Queues {
    Own(Arc<tessera_runtime::ops::Queues>),
    Remote(pb::queue_service_client::QueueServiceClient<tessera_runtime::grpc::Channel>),
}

fn queues_of(state: &AppState, service: &str) -> Result<Queues, ApiError> {
    if service == crate::SERVICE {
        return Ok(Queues::Own(state.own_queues.clone()));
    }
    state
        .queues
        .get(service)
        .cloned()
        .map(Queues::Remote)
        .ok_or_else(|| {
            let known: Vec<&str> = state
                .queues
                .keys()
                .copied()
                .chain([crate::SERVICE])
                .collect();
            Error::invalid_field("service", format!("must be one of {}", known.join(", "))).into()
        })
}

impl Queues {
    async fn dead(
        self,
        request: tonic::Request<pb::ListDeadItemsRequest>,
    ) -> Result<pb::ListDeadItemsResponse, tonic::Status> {
        use pb::queue_service_server::QueueService;
        Ok(match self {
            Queues::Own(q) => q.list_dead_items(request).await?,
            Queues::Remote(mut c) => c.list_dead_items(request).await?,
        }
        .into_inner())
    }

    async fn replay(
        self,
        request: tonic::Request<pb::ReplayDeadItemsRequest>,
    ) -> Result<pb::ReplayDeadItemsResponse, tonic::Status> {
        use pb::queue_service_server::QueueService;
        Ok(match self {
            Queues::Own(q) => q.replay_dead_items(request).await?,
            Queues::Remote(mut c) => c.replay_dead_items(request).await?,
        }
        .into_inner())
    }
}

async fn dead(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(service): Path<String>,
    query: QueryResult<DeadQuery>,
) -> Result<Response, ApiError> {
    let q = strict(query)?;
    let queues = queues_of(&state, &service)?;
    let r = queues
        .dead(
            principal
                .context(&request_id)
                .request(pb::ListDeadItemsRequest {
                    service,
                    queue: q.queue,
                    after_id: q.after_id,
                    limit: q.limit,
                }),
        )
        .await?;
    reply(
        http::StatusCode::OK,
        "tessera.ops.v1.ListDeadItemsResponse",
        &r,
    )
}

async fn replay(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(service): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let queues = queues_of(&state, &service)?;
    let mut request: pb::ReplayDeadItemsRequest =
        from_json("tessera.ops.v1.ReplayDeadItemsRequest", body)?;
    request.idempotency_key = key;
    request.service = service;
    let r = queues
        .replay(principal.context(&request_id).request(request))
        .await?;
    reply(
        http::StatusCode::OK,
        "tessera.ops.v1.ReplayDeadItemsResponse",
        &r,
    )
}
