//! Eligibility routes for touchpoints and integrations: qualification (`POST /v1/qualify`),
//! customer profiles (`PUT|GET|DELETE /v1/customers/{id}/profile`), facts (`POST /v1/orders`,
//! `POST /v1/events`), a customer's segments, and checkout: `POST /v1/validate` (dry run),
//! `POST /v1/redemptions`, `GET /v1/redemptions/{id}`, `POST /v1/redemptions/{id}/rollback`,
//! `POST /v1/reservations` and `POST /v1/reservations/{id}/confirm`. Bodies and answers are the eligibility's
//! protobuf messages in their canonical JSON mapping ([`crate::transcode`]).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::Value;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_runtime::RequestContext;
use tessera_runtime::grpc::Channel;

use crate::AppState;
use crate::api::{Api, Op};
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

pub fn routes(api: &mut Api) {
    const REDEMPTION: &str = "tessera.eligibility.v1.Redemption";
    const KEYED: [&str; 1] = ["idempotency_key"];
    api.tag(
        "customers",
        "Customer profiles, orders and events: the facts rules read.",
    )
    .add(
        Op::put("/v1/customers/{id}/profile", upsert_customer)
            .summary("Create or update a customer's profile")
            .roles(&FACT_WRITERS)
            .idempotent()
            .before("/v1/customers/{id}/profile")
            .body_proto("tessera.eligibility.v1.CustomerInput", &["id"])
            .answer_proto(200, "The customer.", "tessera.eligibility.v1.Customer"),
    )
    .add(
        Op::get("/v1/customers/{id}/profile", get_customer)
            .summary("Get a customer's profile and aggregates")
            .roles(&Role::ALL)
            .answer_proto(
                200,
                "The customer.",
                "tessera.eligibility.v1.GetCustomerResponse",
            ),
    )
    .add(
        Op::delete("/v1/customers/{id}/profile", erase_customer)
            .summary("Erase a customer (GDPR)")
            .roles(&[Role::Admin])
            .idempotent()
            .before("/v1/customers/{id}/profile")
            .answer_proto(
                200,
                "What was erased.",
                "tessera.eligibility.v1.EraseCustomerResponse",
            ),
    )
    .add(
        Op::get("/v1/customers/{id}/segments", customer_segments)
            .summary("The segments a customer is in")
            .roles(&Role::ALL)
            .answer_proto(
                200,
                "The segments.",
                "tessera.eligibility.v1.GetCustomerSegmentsResponse",
            ),
    )
    .add(
        Op::post("/v1/orders", record_order)
            .summary("Record an order (paid, returned or cancelled)")
            .describe("Updates the customer's aggregates and runs the earning rules.")
            .roles(&FACT_WRITERS)
            .idempotent()
            .body_proto("tessera.eligibility.v1.Order", &[])
            .answer_proto(
                200,
                "What the order earned.",
                "tessera.eligibility.v1.RecordOrderResponse",
            ),
    )
    .add(
        Op::post("/v1/events", record_event)
            .summary("Record a custom event")
            .roles(&FACT_WRITERS)
            .idempotent()
            .body_proto("tessera.eligibility.v1.Event", &[])
            .answer_proto(
                200,
                "What the event earned.",
                "tessera.eligibility.v1.RecordEventResponse",
            ),
    );
    api.tag("checkout", "Qualification, validation, redemption, reservation and rollback.")
        .add(
            Op::post("/v1/qualify", qualify)
                .summary("What a customer qualifies for")
                .describe("Every incentive the customer can use now with its value, ranked, and every one that does not apply with the reasons.")
                .roles(&ASKERS)
                .body_proto("tessera.eligibility.v1.QualifyRequest", &[])
                .answer_proto(200, "Applicable and not applicable incentives.", "tessera.eligibility.v1.QualifyResponse"),
        )
        .add(
            Op::post("/v1/validate", validate)
                .summary("Validate redeemables on a cart (dry run)")
                .roles(&ASKERS)
                .body_proto("tessera.eligibility.v1.ValidateRequest", &[])
                .answer_proto(200, "What a redemption would apply.", REDEMPTION),
        )
        .add(
            Op::post("/v1/redemptions", redeem)
                .summary("Redeem")
                .roles(&FACT_WRITERS)
                .idempotent()
                .body_proto("tessera.eligibility.v1.RedeemRequest", &KEYED)
                .answer_proto(201, "The redemption.", REDEMPTION),
        )
        .add(
            Op::get("/v1/redemptions/{id}", get_redemption)
                .summary("Get a redemption")
                .roles(&Role::ALL)
                .answer_proto(200, "The redemption.", REDEMPTION),
        )
        .add(
            Op::post("/v1/redemptions/{id}/rollback", rollback)
                .summary("Roll a redemption back, fully or by returned lines")
                .roles(&FACT_WRITERS)
                .idempotent()
                .body_proto(
                    "tessera.eligibility.v1.RollbackRedemptionRequest",
                    &["redemption_id", "idempotency_key"],
                )
                .answer_proto(200, "The redemption after the rollback.", REDEMPTION),
        )
        .add(
            Op::post("/v1/reservations", reserve)
                .summary("Reserve at checkout")
                .describe("Holds budget, code and wallet value for a short time; confirm it or it lapses.")
                .roles(&FACT_WRITERS)
                .idempotent()
                .body_proto("tessera.eligibility.v1.ReserveRequest", &KEYED)
                .answer_proto(201, "The reservation.", REDEMPTION),
        )
        .add(
            Op::post("/v1/reservations/{id}/confirm", confirm)
                .summary("Confirm a reservation")
                .roles(&FACT_WRITERS)
                .idempotent()
                .answer_proto(200, "The redemption.", REDEMPTION),
        );
}

fn call(
    state: &AppState,
    principal: &Principal,
    request_id: &RequestId,
) -> (EligibilityServiceClient<Channel>, RequestContext) {
    (state.eligibility.clone(), principal.context(request_id))
}

async fn qualify(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
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
    let (mut client, ctx) = call(&state, &principal, &request_id);
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
    let (mut client, ctx) = call(&state, &principal, &request_id);
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
    let (mut client, ctx) = call(&state, &principal, &request_id);
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
    let (mut client, ctx) = call(&state, &principal, &request_id);
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
    let (mut client, ctx) = call(&state, &principal, &request_id);
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
    let (mut client, ctx) = call(&state, &principal, &request_id);
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

/// The redemption of a checkout answer.
fn redemption(status: http::StatusCode, r: Option<pb::Redemption>) -> Result<Response, ApiError> {
    reply(status, &message("Redemption"), &r.unwrap_or_default())
}

/// `POST /v1/validate`: body `{"checkout": {...}}`.
async fn validate(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let request: pb::ValidateRequest = from_json(&message("ValidateRequest"), body)?;
    let r = client.validate(ctx.request(request)).await?.into_inner();
    redemption(http::StatusCode::OK, r.redemption)
}

/// `POST /v1/redemptions`: body `{"checkout": {...}}`, `Idempotency-Key` header.
async fn redeem(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::RedeemRequest = from_json(&message("RedeemRequest"), body)?;
    request.idempotency_key = key;
    let r = client.redeem(ctx.request(request)).await?.into_inner();
    redemption(http::StatusCode::CREATED, r.redemption)
}

/// `POST /v1/reservations`: body `{"checkout": {...}, "holdSeconds": 600}`.
async fn reserve(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::ReserveRequest = from_json(&message("ReserveRequest"), body)?;
    request.idempotency_key = key;
    let r = client.reserve(ctx.request(request)).await?.into_inner();
    redemption(http::StatusCode::CREATED, r.redemption)
}

async fn confirm(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(redemption_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .confirm(ctx.request(pb::ConfirmRequest {
            idempotency_key: key,
            redemption_id,
        }))
        .await?
        .into_inner();
    redemption(http::StatusCode::OK, r.redemption)
}

/// `POST /v1/redemptions/{id}/rollback`: body `{"reason": "...", "lines": [...]}`.
async fn rollback(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let mut request: pb::RollbackRedemptionRequest = from_json(
        &message("RollbackRedemptionRequest"),
        with(body, "redemptionId", id),
    )?;
    request.idempotency_key = key;
    let r = client
        .rollback_redemption(ctx.request(request))
        .await?
        .into_inner();
    redemption(http::StatusCode::OK, r.redemption)
}

async fn get_redemption(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(redemption_id): Path<String>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .get_redemption(ctx.request(pb::GetRedemptionRequest { redemption_id }))
        .await?
        .into_inner();
    redemption(http::StatusCode::OK, r.redemption)
}
