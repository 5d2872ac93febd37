//! Routes. Each handler: authenticate, check the role, parse strictly, call one service.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_proto::wallet::v1::{self as pb, AssetKind};
use tessera_runtime::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::{RequestId, observe};

/// Health name of the wallet's gRPC service.
const WALLET_GRPC_NAME: &str = "tessera.wallet.v1.WalletService";

pub fn router(state: Arc<AppState>, timeout: Duration) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/customers/{id}/points", post(credit_points))
        .route("/v1/customers/{id}/wallet", get(wallet))
        .route("/v1/customers/{id}/wallet/transactions", get(transactions))
        .route("/v1/customers/{id}/wallet/adjustments", post(adjust))
        .route("/v1/customers/{id}/wallet/refunds", post(refund))
        .route("/v1/customers/{id}/wallet/cashback", get(cashback))
        .route("/v1/customers/{id}/wallet/tier", get(tier))
        .route("/v1/customers/{id}/cockpit", get(cockpit))
        .merge(crate::catalog::routes())
        .merge(crate::eligibility::routes())
        .merge(crate::campaigns::routes())
        .merge(crate::webhooks::routes())
        .merge(crate::messages::routes())
        .route("/v1/audit-log", get(crate::audit::list))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::audit::record,
        ))
        .with_state(state)
        .merge(tessera_runtime::metrics::router())
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            deadline(timeout, req, next)
        }))
        .layer(middleware::from_fn(observe))
}

async fn deadline(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            ApiError::new(Code::DeadlineExceeded, "the request took too long").into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(Code::NotFound, "no such route")
}

/// Liveness: the process answers.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: the gateway's database and the services it calls are serving.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let mut checks = serde_json::Map::new();
    let db = state.db.ping().await.map_err(|e| e.to_string());
    checks.insert(
        "database".into(),
        json!(db.as_ref().map_or_else(|e| e.as_str(), |()| "ok")),
    );
    let wallet = HealthClient::new(state.wallet_channel.clone())
        .check(HealthCheckRequest {
            service: WALLET_GRPC_NAME.into(),
        })
        .await
        .map(|r| r.into_inner().status() == ServingStatus::Serving);
    let wallet_ok = matches!(wallet, Ok(true));
    checks.insert(
        "wallet".into(),
        json!(if wallet_ok { "ok" } else { "unavailable" }),
    );
    let ready = db.is_ok() && wallet_ok;
    let status = if ready {
        http::StatusCode::OK
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "status": if ready { "ready" } else { "not_ready" }, "checks": checks })),
    )
        .into_response()
}

/// Body of `POST /v1/customers/{id}/points`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditPoints {
    /// Points to credit: a positive integer.
    amount: i64,
    /// Why, shown in the customer's history.
    #[serde(default)]
    reason: String,
    /// Loyalty programme id (default `default`).
    #[serde(default = "default_program")]
    program: String,
}

fn default_program() -> String {
    "default".into()
}

fn asset_json(asset: Option<&pb::Asset>) -> Value {
    let asset = asset.cloned().unwrap_or_default();
    let kind = match AssetKind::try_from(asset.kind).unwrap_or(AssetKind::Unspecified) {
        AssetKind::Points => "points",
        AssetKind::Cashback => "cashback",
        AssetKind::GiftCard => "gift_card",
        AssetKind::Unspecified => "unspecified",
    };
    json!({ "kind": kind, "code": asset.code })
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
    })
    .map_or(Value::Null, |t| {
        json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    })
}

fn balance_json(b: &pb::Balance) -> Value {
    json!({
        "asset": asset_json(b.asset.as_ref()),
        "available": b.available,
        "held": b.held,
        "pending": b.pending,
        "expiring": { "30d": b.expiring_30d, "60d": b.expiring_60d, "90d": b.expiring_90d },
    })
}

fn transaction_json(tx: &pb::Transaction) -> Value {
    json!({
        "id": tx.id,
        "customer_id": tx.customer_id,
        "asset": asset_json(tx.asset.as_ref()),
        "amount": tx.amount,
        "kind": tx.kind,
        "reason": tx.reason,
        "created_at": rfc3339(tx.created_at.as_ref()),
    })
}

/// `201 Created` with a posted transaction and the account's new balance.
fn created(
    transaction: Option<&pb::Transaction>,
    balance: Option<&pb::Balance>,
) -> (http::StatusCode, Json<Value>) {
    (
        http::StatusCode::CREATED,
        Json(json!({
            "transaction": transaction.map(transaction_json),
            "balance": balance.map(balance_json),
        })),
    )
}

fn points_asset(program: String) -> Option<pb::Asset> {
    Some(pb::Asset {
        kind: AssetKind::Points as i32,
        code: program,
    })
}

/// Credits loyalty points to a customer (admin and support agents).
async fn credit_points(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<CreditPoints>,
) -> Result<(http::StatusCode, Json<Value>), ApiError> {
    principal.require(&[Role::Admin, Role::SupportAgent])?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .credit(ctx.request(pb::CreditRequest {
            idempotency_key: key,
            customer_id,
            asset: points_asset(body.program),
            amount: body.amount,
            reason: body.reason,
            expires_at: None,
            pending: None,
            spent_amount: 0,
            apply_tier_multiplier: false,
        }))
        .await?
        .into_inner();
    Ok(created(
        response.transaction.as_ref(),
        response.balance.as_ref(),
    ))
}

/// A customer's balances (every role that serves customers).
async fn wallet(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(&Role::ALL)?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .get_balance(ctx.request(pb::GetBalanceRequest { customer_id }))
        .await?
        .into_inner();
    Ok(Json(json!({
        "customer_id": response.customer_id,
        "balances": response.balances.iter().map(balance_json).collect::<Vec<_>>(),
    })))
}

/// Query of `GET /v1/customers/{id}/wallet/transactions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransactionsQuery {
    /// Page size, 1..=100 (default 20).
    #[serde(default)]
    limit: u32,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default)]
    starting_after: String,
    /// Only this kind (credit, debit, refund, …).
    #[serde(default)]
    kind: String,
}

/// Cursor pagination parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    /// Page size, 1..=100 (default 20).
    #[serde(default)]
    limit: u32,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default)]
    starting_after: String,
}

fn page_request(
    limit: u32,
    starting_after: String,
) -> Option<tessera_proto::common::v1::PageRequest> {
    Some(tessera_proto::common::v1::PageRequest {
        limit,
        starting_after,
    })
}

/// A page as JSON.
fn page_json(data: Vec<Value>, page: Option<tessera_proto::common::v1::PageResponse>) -> Value {
    let page = page.unwrap_or_default();
    json!({
        "data": data,
        "has_more": page.has_more,
        "next_cursor": if page.has_more { Some(page.next_cursor) } else { None },
    })
}

/// Parses a query string strictly, naming the fault.
fn strict_query<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query
        .map(|q| q.0)
        .map_err(|e| tessera_runtime::Error::invalid_field("query", e.body_text()).into())
}

/// A customer's wallet history, newest first.
async fn transactions(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    query: Result<
        axum::extract::Query<TransactionsQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Json<Value>, ApiError> {
    principal.require(&Role::ALL)?;
    let query = strict_query(query)?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .list_transactions(ctx.request(pb::ListTransactionsRequest {
            customer_id,
            kind: query.kind,
            page: page_request(query.limit, query.starting_after),
            ..Default::default()
        }))
        .await?
        .into_inner();
    Ok(Json(page_json(
        response.transactions.iter().map(transaction_json).collect(),
        response.page,
    )))
}

/// A credit status as the wallet stores and emits it (`paid_out`).
fn credit_status_name(status: i32) -> String {
    pb::CreditStatus::try_from(status)
        .unwrap_or(pb::CreditStatus::Unspecified)
        .as_str_name()
        .trim_start_matches("CREDIT_STATUS_")
        .to_ascii_lowercase()
}

/// A customer's pending-value credits (cashback) with their status history, newest first.
async fn cashback(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    query: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    principal.require(&Role::ALL)?;
    let query = strict_query(query)?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .get_cashback_status(ctx.request(pb::GetCashbackStatusRequest {
            customer_id,
            credit_id: String::new(),
            page: page_request(query.limit, query.starting_after),
        }))
        .await?
        .into_inner();
    let data = response
        .credits
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "asset": asset_json(c.asset.as_ref()),
                "amount": c.amount,
                "status": credit_status_name(c.status),
                "reason": c.reason,
                "activate_at": rfc3339(c.activate_at.as_ref()),
                "history": c.history.iter().map(|h| json!({
                    "status": credit_status_name(h.status),
                    "at": rfc3339(h.at.as_ref()),
                    "reason": h.reason,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(page_json(data, response.page)))
}

/// Query of `GET /v1/customers/{id}/wallet/tier`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierQuery {
    /// Loyalty programme id (default `default`).
    #[serde(default = "default_program")]
    program: String,
}

fn tier_json(t: Option<&pb::Tier>) -> Value {
    t.map_or(Value::Null, |t| {
        json!({
            "id": t.id,
            "name": t.name,
            "threshold": t.threshold,
            "earn_multiplier_permille": t.earn_multiplier_permille,
            "expiry_extension_days": t.expiry_extension_days,
        })
    })
}

/// A customer's tier in a programme, what qualifies them, what the next tier needs, and the
/// latest tier changes.
async fn tier(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    query: Result<axum::extract::Query<TierQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    principal.require(&Role::ALL)?;
    let query = strict_query(query)?;
    let ctx = principal.context(&request_id);
    let mut wallet = state.wallet.clone();
    let status = wallet
        .get_tier(ctx.request(pb::GetTierRequest {
            customer_id: customer_id.clone(),
            program_id: query.program.clone(),
        }))
        .await?
        .into_inner();
    let history = wallet
        .list_tier_history(ctx.request(pb::ListTierHistoryRequest {
            customer_id,
            program_id: query.program,
            page: None,
        }))
        .await?
        .into_inner();
    Ok(Json(json!({
        "customer_id": status.customer_id,
        "program": status.program_id,
        "tier": tier_json(status.tier.as_ref()),
        "qualifying": status.qualifying,
        "since": rfc3339(status.since.as_ref()),
        "grace_until": rfc3339(status.grace_until.as_ref()),
        "next_tier": tier_json(status.next_tier.as_ref()),
        "to_next_tier": status.to_next_tier,
        "history": history.changes.iter().map(|c| json!({
            "from": c.from_tier,
            "to": c.to_tier,
            "direction": c.direction,
            "qualifying": c.qualifying,
            "at": rfc3339(c.at.as_ref()),
        })).collect::<Vec<_>>(),
    })))
}

/// Body of `POST /v1/customers/{id}/wallet/refunds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Refund {
    /// The customer's credit, debit or capture to reverse.
    transaction_id: String,
    /// How much; absent or 0: all that is left.
    #[serde(default)]
    amount: i64,
    /// Why; required.
    reason: String,
}

/// An agent's refund (of a spend) or claw-back (of a credit) for a customer (admin and
/// support agents).
async fn refund(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Refund>,
) -> Result<(http::StatusCode, Json<Value>), ApiError> {
    principal.require(&[Role::Admin, Role::SupportAgent])?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .reverse(ctx.request(pb::ReverseRequest {
            idempotency_key: key,
            transaction_id: body.transaction_id,
            amount: body.amount,
            reason: body.reason,
            customer_id,
        }))
        .await?
        .into_inner();
    Ok(created(
        response.transaction.as_ref(),
        response.balance.as_ref(),
    ))
}

/// Body of `POST /v1/customers/{id}/wallet/adjustments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    /// Signed, non-zero points: positive credits, negative debits.
    amount: i64,
    /// Why; required.
    reason: String,
    /// Loyalty programme id (default `default`).
    #[serde(default = "default_program")]
    program: String,
}

/// An agent's correction of a customer's points (admin and support agents).
async fn adjust(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Adjustment>,
) -> Result<(http::StatusCode, Json<Value>), ApiError> {
    principal.require(&[Role::Admin, Role::SupportAgent])?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .adjust(ctx.request(pb::AdjustRequest {
            idempotency_key: key,
            customer_id,
            asset: points_asset(body.program),
            amount: body.amount,
            reason: body.reason,
        }))
        .await?
        .into_inner();
    Ok(created(
        response.transaction.as_ref(),
        response.balance.as_ref(),
    ))
}

/// `GET /v1/customers/{id}/cockpit`: what a customer sees of themselves in one answer
/// (their balances with what expires in 30/60/90 days, their tier in the `default`
/// programme and what the next one needs, the rewards they can use now, referral status),
/// read from wallet, catalog and eligibility at once. A part that does not exist yet (no
/// tiers, no profile) is null.
async fn cockpit(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    use tessera_proto::catalog::v1 as cpb;
    use tessera_proto::eligibility::v1 as epb;
    principal.require(&Role::ALL)?;
    let ctx = principal.context(&request_id);
    let (mut wallet, mut tiers, mut catalog, mut eligibility) = (
        state.wallet.clone(),
        state.wallet.clone(),
        state.catalog.clone(),
        state.eligibility.clone(),
    );
    let (balance, tier, rewards, customer) = tokio::join!(
        wallet.get_balance(ctx.request(pb::GetBalanceRequest {
            customer_id: customer_id.clone(),
        })),
        tiers.get_tier(ctx.request(pb::GetTierRequest {
            customer_id: customer_id.clone(),
            program_id: default_program(),
        })),
        catalog.list_customer_rewards(ctx.request(cpb::ListCustomerRewardsRequest {
            customer_id: customer_id.clone(),
            status: cpb::CustomerRewardStatus::Available.into(),
            page: crate::catalog::page_request(100, ""),
        })),
        eligibility.get_customer(ctx.request(epb::GetCustomerRequest {
            id: customer_id.clone(),
        })),
    );
    // Missing parts are null; any other failure fails the answer.
    let absent = |s: &tonic::Status| {
        matches!(
            s.code(),
            tonic::Code::NotFound | tonic::Code::FailedPrecondition
        )
    };
    let balance = balance?.into_inner();
    let tier = match tier {
        Ok(t) => {
            let t = t.into_inner();
            json!({
                "program": t.program_id,
                "tier": tier_json(t.tier.as_ref()),
                "qualifying": t.qualifying,
                "grace_until": rfc3339(t.grace_until.as_ref()),
                "next_tier": tier_json(t.next_tier.as_ref()),
                "to_next_tier": t.to_next_tier,
            })
        }
        Err(s) if absent(&s) => Value::Null,
        Err(s) => return Err(s.into()),
    };
    let rewards = rewards?.into_inner();
    let referral = match customer {
        Ok(c) => {
            let c = c.into_inner();
            let referred_by = c
                .customer
                .and_then(|c| c.profile)
                .and_then(|p| p.attributes.get("referred_by").cloned())
                .and_then(|v| match v.kind {
                    Some(epb::value::Kind::StringValue(s)) if !s.is_empty() => Some(s),
                    _ => None,
                });
            let ordered = c.aggregates.is_some_and(|a| a.orders_total > 0);
            referred_by.map_or(
                Value::Null,
                |by| json!({"referred_by": by, "first_order_placed": ordered}),
            )
        }
        Err(s) if absent(&s) => Value::Null,
        Err(s) => return Err(s.into()),
    };
    Ok(Json(json!({
        "customer_id": customer_id,
        "balances": balance.balances.iter().map(balance_json).collect::<Vec<_>>(),
        "tier": tier,
        "rewards": crate::transcode::to_json_list(
            "tessera.catalog.v1.CustomerReward",
            &rewards.rewards,
        )?,
        "referral": referral,
    })))
}
