//! Eligibility routes for touchpoints and integrations: qualification (`POST /v1/qualify`),
//! customer profiles (`PUT|GET|DELETE /v1/customers/{id}/profile`), facts (`POST /v1/orders`,
//! `POST /v1/events`) and a customer's segments. Bodies and answers are the eligibility's
//! protobuf messages in their canonical JSON mapping ([`crate::transcode`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use serde_json::Value;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_runtime::RequestContext;
use tessera_runtime::grpc::Channel;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::transcode::{from_json, reply, with};

/// Roles that write customer facts (CRM sync, touchpoints reporting orders and events).
const FACT_WRITERS: [Role; 2] = [Role::Admin, Role::Touchpoint];
/// Roles that ask what a customer qualifies for.
const ASKERS: [Role; 4] = [
    Role::Admin,
    Role::Marketer,
    Role::SupportAgent,
    Role::Touchpoint,
];

fn message(name: &str) -> String {
    format!("tessera.eligibility.v1.{name}")
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/qualify", post(qualify))
        .route(
            "/v1/customers/{id}/profile",
            put(upsert_customer)
                .get(get_customer)
                .delete(erase_customer),
        )
        .route("/v1/customers/{id}/segments", get(customer_segments))
        .route("/v1/orders", post(record_order))
        .route("/v1/events", post(record_event))
}

fn call(
    state: &AppState,
    principal: &Principal,
    roles: &[Role],
    request_id: &RequestId,
) -> Result<(EligibilityServiceClient<Channel>, RequestContext), ApiError> {
    principal.require(roles)?;
    Ok((state.eligibility.clone(), principal.context(request_id)))
}

async fn qualify(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &ASKERS, &request_id)?;
    let request: pb::QualifyRequest = from_json(&message("QualifyRequest"), body)?;
    let r = client.qualify(ctx.request(request)).await?.into_inner();
    reply(http::StatusCode::OK, &message("QualifyResponse"), &r)
}

async fn upsert_customer(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &FACT_WRITERS, &request_id)?;
    let customer: pb::CustomerInput = from_json(&message("CustomerInput"), with(body, "id", id))?;
    let r = client
        .upsert_customer(ctx.request(pb::UpsertCustomerRequest {
            idempotency_key: key,
            customer: Some(customer),
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("Customer"),
        &r.customer.unwrap_or_default(),
    )
}

async fn get_customer(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &Role::ALL, &request_id)?;
    let r = client
        .get_customer(ctx.request(pb::GetCustomerRequest { id }))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, &message("GetCustomerResponse"), &r)
}

async fn erase_customer(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &[Role::Admin], &request_id)?;
    let r = client
        .erase_customer(ctx.request(pb::EraseCustomerRequest {
            idempotency_key: key,
            id,
        }))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, &message("EraseCustomerResponse"), &r)
}

async fn customer_segments(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &Role::ALL, &request_id)?;
    let r = client
        .get_customer_segments(ctx.request(pb::GetCustomerSegmentsRequest { customer_id }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("GetCustomerSegmentsResponse"),
        &r,
    )
}

async fn record_order(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &FACT_WRITERS, &request_id)?;
    let order: pb::Order = from_json(&message("Order"), body)?;
    let r = client
        .record_order(ctx.request(pb::RecordOrderRequest {
            idempotency_key: key,
            order: Some(order),
        }))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, &message("RecordOrderResponse"), &r)
}

async fn record_event(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &FACT_WRITERS, &request_id)?;
    let event: pb::Event = from_json(&message("Event"), body)?;
    let r = client
        .record_event(ctx.request(pb::RecordEventRequest {
            idempotency_key: key,
            event: Some(event),
        }))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, &message("RecordEventResponse"), &r)
}
