//! Webhook routes (admins): `POST|GET /v1/webhook-endpoints`, `GET|PUT
//! /v1/webhook-endpoints/{id}`, `POST /v1/webhook-endpoints/{id}/rotate-secret`,
//! `GET /v1/deliveries` (`?endpoint_id=&status=pending|succeeded|dead`),
//! `GET /v1/deliveries/{id}` (with every attempt) and `POST /v1/deliveries/replay`. Bodies
//! and answers are notification's protobuf messages in their canonical JSON mapping.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use tessera_proto::notification::v1 as pb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_runtime::RequestContext;
use tessera_runtime::grpc::Channel;
use utoipa::IntoParams;

use crate::AppState;
use crate::api::{Api, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::query::{QueryResult, enum_value, page_reply, page_request, strict};
use crate::transcode::{from_json, reply, to_json_list, with};

/// Webhooks carry every event of the tenant: admins only.
const ADMINS: [Role; 1] = [Role::Admin];

fn message(name: &str) -> String {
    format!("tessera.notification.v1.{name}")
}

pub fn routes(api: &mut Api) {
    const ENDPOINT: &str = "tessera.notification.v1.WebhookEndpoint";
    const DELIVERY: &str = "tessera.notification.v1.Delivery";
    api.tag(
        "webhooks",
        "Signed event deliveries to the tenant's endpoints, with retries and replay.",
    )
    .add(
        Op::post("/v1/webhook-endpoints", create)
            .summary("Create a webhook endpoint")
            .describe("The answer carries the signing secret, shown once.")
            .roles(&ADMINS)
            .idempotent()
            .body_proto(
                "tessera.notification.v1.CreateWebhookEndpointRequest",
                &["idempotency_key"],
            )
            .answer_proto(
                201,
                "The endpoint and its secret.",
                "tessera.notification.v1.CreateWebhookEndpointResponse",
            ),
    )
    .add(
        Op::get("/v1/webhook-endpoints", list)
            .summary("List webhook endpoints")
            .roles(&ADMINS)
            .query::<ListQuery>()
            .answer_page(ENDPOINT),
    )
    .add(
        Op::get("/v1/webhook-endpoints/{id}", get_one)
            .summary("Get a webhook endpoint")
            .roles(&ADMINS)
            .answer_proto(200, "The endpoint.", ENDPOINT),
    )
    .add(
        Op::put("/v1/webhook-endpoints/{id}", update)
            .summary("Update a webhook endpoint")
            .roles(&ADMINS)
            .idempotent()
            .before("/v1/webhook-endpoints/{id}")
            .body_proto(
                "tessera.notification.v1.UpdateWebhookEndpointRequest",
                &["id", "idempotency_key"],
            )
            .answer_proto(200, "The endpoint.", ENDPOINT),
    )
    .add(
        Op::post("/v1/webhook-endpoints/{id}/rotate-secret", rotate)
            .summary("Rotate an endpoint's signing secret")
            .roles(&ADMINS)
            .idempotent()
            .before("/v1/webhook-endpoints/{id}")
            .body_proto(
                "tessera.notification.v1.RotateWebhookSecretRequest",
                &["id", "idempotency_key"],
            )
            .answer_proto(
                200,
                "The new secret, shown once.",
                "tessera.notification.v1.RotateWebhookSecretResponse",
            ),
    )
    .add(
        Op::get("/v1/deliveries", deliveries)
            .summary("List deliveries")
            .roles(&ADMINS)
            .query::<ListQuery>()
            .answer_page(DELIVERY),
    )
    .add(
        Op::post("/v1/deliveries/replay", replay)
            .summary("Replay deliveries")
            .roles(&ADMINS)
            .idempotent()
            .body_proto(
                "tessera.notification.v1.ReplayDeliveriesRequest",
                &["idempotency_key"],
            )
            .answer_proto(
                200,
                "How many deliveries were queued again.",
                "tessera.notification.v1.ReplayDeliveriesResponse",
            ),
    )
    .add(
        Op::get("/v1/deliveries/{id}", delivery)
            .summary("Get a delivery with every attempt")
            .roles(&ADMINS)
            .answer_proto(200, "The delivery.", DELIVERY),
    );
}

fn call(
    state: &AppState,
    principal: &Principal,
    request_id: &RequestId,
) -> (NotificationServiceClient<Channel>, RequestContext) {
    (state.notification.clone(), principal.context(request_id))
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::CreateWebhookEndpointRequest =
        from_json(&message("CreateWebhookEndpointRequest"), body)?;
    request.idempotency_key = key;
    let r = client
        .create_webhook_endpoint(ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::CREATED,
        &message("CreateWebhookEndpointResponse"),
        &r,
    )
}

async fn update(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::UpdateWebhookEndpointRequest = from_json(
        &message("UpdateWebhookEndpointRequest"),
        with(body, "id", id),
    )?;
    request.idempotency_key = key;
    let r = client
        .update_webhook_endpoint(ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("WebhookEndpoint"),
        &r.endpoint.unwrap_or_default(),
    )
}

async fn get_one(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .get_webhook_endpoint(ctx.request(pb::GetWebhookEndpointRequest { id }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("WebhookEndpoint"),
        &r.endpoint.unwrap_or_default(),
    )
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
    /// Deliveries: of this endpoint.
    #[serde(default)]
    endpoint_id: String,
    /// Deliveries: `pending`, `succeeded` or `dead`.
    #[serde(default)]
    status: String,
}

impl ListQuery {
    fn page(&self) -> Option<tessera_proto::common::v1::PageRequest> {
        page_request(self.limit, &self.starting_after)
    }
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    let r = client
        .list_webhook_endpoints(ctx.request(pb::ListWebhookEndpointsRequest { page: q.page() }))
        .await?
        .into_inner();
    page_reply(
        to_json_list(&message("WebhookEndpoint"), &r.endpoints)?,
        r.page,
    )
}

async fn rotate(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::RotateWebhookSecretRequest =
        from_json(&message("RotateWebhookSecretRequest"), with(body, "id", id))?;
    request.idempotency_key = key;
    let r = client
        .rotate_webhook_secret(ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("RotateWebhookSecretResponse"),
        &r,
    )
}

async fn deliveries(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    let status = enum_value(
        "status",
        &message("DeliveryStatus"),
        "DELIVERY_STATUS_",
        &q.status,
    )?;
    let r = client
        .list_deliveries(ctx.request(pb::ListDeliveriesRequest {
            endpoint_id: q.endpoint_id.clone(),
            status,
            page: q.page(),
        }))
        .await?
        .into_inner();
    page_reply(to_json_list(&message("Delivery"), &r.deliveries)?, r.page)
}

async fn delivery(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .get_delivery(ctx.request(pb::GetDeliveryRequest { id }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("Delivery"),
        &r.delivery.unwrap_or_default(),
    )
}

async fn replay(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::ReplayDeliveriesRequest =
        from_json(&message("ReplayDeliveriesRequest"), body)?;
    request.idempotency_key = key;
    let r = client
        .replay_deliveries(ctx.request(request))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("ReplayDeliveriesResponse"),
        &r,
    )
}
