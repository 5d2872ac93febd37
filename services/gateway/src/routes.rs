//! Routes. Each handler: authenticate, check the role, parse strictly, call one service.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_proto::wallet::v1::{self as pb, AssetKind};
use tessera_runtime::Code;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::api::{Api, Content, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::{RequestId, observe};
use crate::query::{PageQuery, page_request, rfc3339, strict};
use crate::readiness;

pub fn router(state: Arc<AppState>, timeout: Duration, public_metrics: bool) -> Router {
    let mut api = Api::default();
    api.tag(
        "operations",
        "Health, readiness, metrics and this document.",
    )
    .add(
        Op::get("/healthz", healthz)
            .summary("Liveness")
            .answer::<Status>(200, "The process answers."),
    )
    .add(
        Op::get("/readyz", readiness::readyz)
            .summary("Readiness")
            .describe(
                "The gateway's database and the services it calls are serving; answers within \
                 a second, naming what is down (the segment cache is reported, not required).",
            )
            .answer::<readiness::Readiness>(200, "Ready.")
            .answer::<readiness::Readiness>(503, "Not ready; `checks` says what is not."),
    );
    // With `metrics_addr` set, metrics are served there, off the public port.
    if public_metrics {
        api.add(
            Op::get("/metrics", metrics)
                .summary("Prometheus metrics")
                .answer_with(200, "Prometheus text exposition.", Content::Text),
        );
    }
    api.add(
        Op::get("/openapi.json", openapi)
            .summary("This document")
            .answer_with(
                200,
                "OpenAPI 3.1.",
                Content::Json(Box::new(crate::api::object())),
            ),
    );
    api.tag("wallet", "Balances, history, cashback status and tiers; agents' corrections.")
        .add(
            Op::post("/v1/customers/{id}/points", credit_points)
                .summary("Credit points")
                .roles(&AGENTS)
                .idempotent()
                .before("/v1/customers/{id}/wallet")
                .body::<CreditPoints>()
                .answer::<Posted>(201, "The transaction and the new balance."),
        )
        .add(
            Op::get("/v1/customers/{id}/wallet", wallet)
                .summary("A customer's balances")
                .roles(&Role::ALL)
                .answer::<Wallet>(200, "Every balance of the customer."),
        )
        .add(
            Op::get("/v1/customers/{id}/wallet/transactions", transactions)
                .summary("A customer's wallet history, newest first")
                .roles(&Role::ALL)
                .query::<TransactionsQuery>()
                .answer::<TransactionPage>(200, "A page of transactions."),
        )
        .add(
            Op::post("/v1/customers/{id}/wallet/adjustments", adjust)
                .summary("Correct a customer's points")
                .roles(&AGENTS)
                .idempotent()
                .before("/v1/customers/{id}/wallet")
                .body::<Adjustment>()
                .answer::<Posted>(201, "The transaction and the new balance."),
        )
        .add(
            Op::post("/v1/customers/{id}/wallet/refunds", refund)
                .summary("Refund a spend or claw back a credit")
                .roles(&AGENTS)
                .idempotent()
                .before("/v1/customers/{id}/wallet")
                .body::<Refund>()
                .answer::<Posted>(201, "The reversal and the new balance."),
        )
        .add(
            Op::get("/v1/customers/{id}/wallet/cashback", cashback)
                .summary("A customer's cashback and other pending value, with status history")
                .roles(&Role::ALL)
                .query::<PageQuery>()
                .answer::<CashbackPage>(200, "A page of credits, newest first."),
        )
        .add(
            Op::get("/v1/customers/{id}/wallet/tier", tier)
                .summary("A customer's tier")
                .describe("The tier, what qualifies the customer, what the next tier needs, and the latest changes.")
                .roles(&Role::ALL)
                .query::<TierQuery>()
                .answer::<TierStatus>(200, "The tier status."),
        )
        .add(
            Op::get("/v1/customers/{id}/cockpit", cockpit)
                .summary("What a customer sees of themselves, in one answer")
                .roles(&Role::ALL)
                .answer::<Cockpit>(200, "Balances, tier, usable rewards and referral status."),
        );
    crate::catalog::routes(&mut api);
    crate::eligibility::routes(&mut api);
    crate::campaigns::routes(&mut api);
    crate::webhooks::routes(&mut api);
    crate::messages::routes(&mut api);
    crate::key_routes::routes(&mut api);
    crate::queues::routes(&mut api);
    crate::privacy::routes(&mut api);
    api.tag("audit", "The append-only record of admin mutations.")
        .add(
            Op::get("/v1/audit-log", crate::audit::list)
                .summary("Search the audit log")
                .roles(&[Role::Admin, Role::Analyst])
                .query::<crate::audit::AuditQuery>()
                .answer::<crate::audit::AuditPage>(200, "A page of entries, newest first."),
        );
    let (routes, document, reads) = api.finish();
    let document = serde_json::to_string(&document).expect("the OpenAPI document serializes");
    let _ = state.openapi.set(document.into());
    let auditor = Arc::new(crate::audit::Auditor {
        state: state.clone(),
        reader: routes.clone().with_state(state.clone()),
        reads,
    });
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            auditor,
            crate::audit::record,
        ))
        .with_state(state)
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            deadline(timeout, req, next)
        }))
        .layer(middleware::from_fn(observe))
}

/// Roles that correct a customer's wallet.
const AGENTS: [Role; 2] = [Role::Admin, Role::SupportAgent];

/// `/openapi.json`.
async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        state.openapi.get().cloned().unwrap_or_default(),
    )
        .into_response()
}

async fn metrics() -> Response {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        tessera_runtime::metrics::render(),
    )
        .into_response()
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
async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
    })
}

/// `{"status": "ok"}`.
#[derive(Serialize, ToSchema)]
struct Status {
    status: String,
}

/// Body of `POST /v1/customers/{id}/points`.
#[derive(Debug, Deserialize, ToSchema)]
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

/// What a balance or transaction is in.
#[derive(Serialize, ToSchema)]
struct Asset {
    /// `points`, `cashback` or `gift_card`.
    kind: String,
    /// The programme (points), currency (cashback) or card code (gift card).
    code: String,
}

impl Asset {
    fn of(asset: Option<&pb::Asset>) -> Self {
        let asset = asset.cloned().unwrap_or_default();
        let kind = match AssetKind::try_from(asset.kind).unwrap_or(AssetKind::Unspecified) {
            AssetKind::Points => "points",
            AssetKind::Cashback => "cashback",
            AssetKind::GiftCard => "gift_card",
            AssetKind::Unspecified => "unspecified",
        };
        Self {
            kind: kind.into(),
            code: asset.code,
        }
    }
}

/// What expires within 30, 60 and 90 days.
#[derive(Serialize, ToSchema)]
struct Expiring {
    #[serde(rename = "30d")]
    d30: i64,
    #[serde(rename = "60d")]
    d60: i64,
    #[serde(rename = "90d")]
    d90: i64,
}

/// One balance (integers: points, or minor units of money).
#[derive(Serialize, ToSchema)]
struct Balance {
    asset: Asset,
    /// What can be spent now.
    available: i64,
    /// Held by reservations at checkout.
    held: i64,
    /// Credited but not yet confirmed (cashback in its return window).
    pending: i64,
    expiring: Expiring,
}

impl From<&pb::Balance> for Balance {
    fn from(b: &pb::Balance) -> Self {
        Self {
            asset: Asset::of(b.asset.as_ref()),
            available: b.available,
            held: b.held,
            pending: b.pending,
            expiring: Expiring {
                d30: b.expiring_30d,
                d60: b.expiring_60d,
                d90: b.expiring_90d,
            },
        }
    }
}

fn balances(list: &[pb::Balance]) -> Vec<Balance> {
    list.iter().map(Balance::from).collect()
}

/// A posted wallet transaction.
#[derive(Serialize, ToSchema)]
struct Transaction {
    id: String,
    customer_id: String,
    asset: Asset,
    /// Signed: credits are positive, debits negative.
    amount: i64,
    /// `credit`, `debit`, `refund`, `adjustment`, `expiry`, …
    kind: String,
    reason: String,
    created_at: Option<String>,
}

impl From<&pb::Transaction> for Transaction {
    fn from(tx: &pb::Transaction) -> Self {
        Self {
            id: tx.id.clone(),
            customer_id: tx.customer_id.clone(),
            asset: Asset::of(tx.asset.as_ref()),
            amount: tx.amount,
            kind: tx.kind.clone(),
            reason: tx.reason.clone(),
            created_at: rfc3339(tx.created_at.as_ref()),
        }
    }
}

/// A posted transaction and the account's new balance.
#[derive(Serialize, ToSchema)]
struct Posted {
    transaction: Option<Transaction>,
    balance: Option<Balance>,
}

/// `201 Created` with a posted transaction and the account's new balance.
fn created(
    transaction: Option<&pb::Transaction>,
    balance: Option<&pb::Balance>,
) -> (http::StatusCode, Json<Posted>) {
    (
        http::StatusCode::CREATED,
        Json(Posted {
            transaction: transaction.map(Transaction::from),
            balance: balance.map(Balance::from),
        }),
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
) -> Result<(http::StatusCode, Json<Posted>), ApiError> {
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
) -> Result<Json<Wallet>, ApiError> {
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .get_balance(ctx.request(pb::GetBalanceRequest { customer_id }))
        .await?
        .into_inner();
    Ok(Json(Wallet {
        customer_id: response.customer_id,
        balances: balances(&response.balances),
    }))
}

/// A customer's balances.
#[derive(Serialize, ToSchema)]
struct Wallet {
    customer_id: String,
    balances: Vec<Balance>,
}

/// Query of `GET /v1/customers/{id}/wallet/transactions`.
#[derive(Debug, Deserialize, IntoParams)]
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

/// `has_more` and `next_cursor` of a page.
fn cursor(page: Option<tessera_proto::common::v1::PageResponse>) -> (bool, Option<String>) {
    let page = page.unwrap_or_default();
    (page.has_more, page.has_more.then_some(page.next_cursor))
}

/// A page of a customer's transactions.
#[derive(Serialize, ToSchema)]
struct TransactionPage {
    data: Vec<Transaction>,
    has_more: bool,
    /// Pass as `starting_after` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// A page of a customer's pending-value credits.
#[derive(Serialize, ToSchema)]
struct CashbackPage {
    data: Vec<Credit>,
    has_more: bool,
    /// Pass as `starting_after` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// A credit that was pending (cashback in its return window), with its history.
#[derive(Serialize, ToSchema)]
struct Credit {
    id: String,
    asset: Asset,
    amount: i64,
    /// `pending`, `confirmed`, `paid_out` or `cancelled`.
    status: String,
    reason: String,
    /// When it confirms by itself (null: only when activated).
    activate_at: Option<String>,
    /// Every status it went through, oldest first.
    history: Vec<StatusChange>,
}

/// One status a credit went through.
#[derive(Serialize, ToSchema)]
struct StatusChange {
    status: String,
    at: Option<String>,
    reason: String,
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
) -> Result<Json<TransactionPage>, ApiError> {
    let query = strict(query)?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .list_transactions(ctx.request(pb::ListTransactionsRequest {
            customer_id,
            kind: query.kind,
            page: page_request(query.limit, &query.starting_after),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let (has_more, next_cursor) = cursor(response.page);
    Ok(Json(TransactionPage {
        data: response
            .transactions
            .iter()
            .map(Transaction::from)
            .collect(),
        has_more,
        next_cursor,
    }))
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
) -> Result<Json<CashbackPage>, ApiError> {
    let query = strict(query)?;
    let ctx = principal.context(&request_id);
    let response = state
        .wallet
        .clone()
        .get_cashback_status(ctx.request(pb::GetCashbackStatusRequest {
            customer_id,
            credit_id: String::new(),
            page: page_request(query.limit, &query.starting_after),
        }))
        .await?
        .into_inner();
    let data = response
        .credits
        .iter()
        .map(|c| Credit {
            id: c.id.clone(),
            asset: Asset::of(c.asset.as_ref()),
            amount: c.amount,
            status: credit_status_name(c.status),
            reason: c.reason.clone(),
            activate_at: rfc3339(c.activate_at.as_ref()),
            history: c
                .history
                .iter()
                .map(|h| StatusChange {
                    status: credit_status_name(h.status),
                    at: rfc3339(h.at.as_ref()),
                    reason: h.reason.clone(),
                })
                .collect(),
        })
        .collect();
    let (has_more, next_cursor) = cursor(response.page);
    Ok(Json(CashbackPage {
        data,
        has_more,
        next_cursor,
    }))
}

/// Query of `GET /v1/customers/{id}/wallet/tier`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct TierQuery {
    /// Loyalty programme id (default `default`).
    #[serde(default = "default_program")]
    program: String,
}

/// A tier of a programme.
#[derive(Serialize, ToSchema)]
struct Tier {
    id: String,
    name: String,
    /// What qualifies: points earned or amount spent over the programme's window.
    threshold: i64,
    /// Earn multiplier in thousandths (1500: ×1.5).
    earn_multiplier_permille: u32,
    /// Days added to the expiry of points earned in this tier.
    expiry_extension_days: u32,
}

impl Tier {
    fn of(t: Option<&pb::Tier>) -> Option<Self> {
        t.map(|t| Self {
            id: t.id.clone(),
            name: t.name.clone(),
            threshold: t.threshold,
            earn_multiplier_permille: t.earn_multiplier_permille,
            expiry_extension_days: t.expiry_extension_days,
        })
    }
}

/// A customer's tier, what qualifies them, and what the next tier needs.
#[derive(Serialize, ToSchema)]
struct TierStatus {
    customer_id: String,
    program: String,
    tier: Option<Tier>,
    /// Points earned or amount spent in the window.
    qualifying: i64,
    since: Option<String>,
    /// Until when a downgrade waits.
    grace_until: Option<String>,
    next_tier: Option<Tier>,
    /// What is missing to reach the next tier.
    to_next_tier: i64,
    /// The latest changes, newest first.
    history: Vec<TierChange>,
}

/// An up- or downgrade.
#[derive(Serialize, ToSchema)]
struct TierChange {
    from: String,
    to: String,
    /// `up` or `down`.
    direction: String,
    qualifying: i64,
    at: Option<String>,
}

/// A customer's tier in a programme, what qualifies them, what the next tier needs, and the
/// latest tier changes.
async fn tier(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    query: Result<axum::extract::Query<TierQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TierStatus>, ApiError> {
    let query = strict(query)?;
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
    Ok(Json(TierStatus {
        customer_id: status.customer_id,
        program: status.program_id,
        tier: Tier::of(status.tier.as_ref()),
        qualifying: status.qualifying,
        since: rfc3339(status.since.as_ref()),
        grace_until: rfc3339(status.grace_until.as_ref()),
        next_tier: Tier::of(status.next_tier.as_ref()),
        to_next_tier: status.to_next_tier,
        history: history
            .changes
            .iter()
            .map(|c| TierChange {
                from: c.from_tier.clone(),
                to: c.to_tier.clone(),
                direction: c.direction.clone(),
                qualifying: c.qualifying,
                at: rfc3339(c.at.as_ref()),
            })
            .collect(),
    }))
}

/// Body of `POST /v1/customers/{id}/wallet/refunds`.
#[derive(Debug, Deserialize, ToSchema)]
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
) -> Result<(http::StatusCode, Json<Posted>), ApiError> {
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
            ..Default::default()
        }))
        .await?
        .into_inner();
    Ok(created(
        response.transaction.as_ref(),
        response.balance.as_ref(),
    ))
}

/// Body of `POST /v1/customers/{id}/wallet/adjustments`.
#[derive(Debug, Deserialize, ToSchema)]
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
) -> Result<(http::StatusCode, Json<Posted>), ApiError> {
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
) -> Result<Json<Cockpit>, ApiError> {
    use tessera_proto::catalog::v1 as cpb;
    use tessera_proto::eligibility::v1 as epb;
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
            page: page_request(100, ""),
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
            Some(CockpitTier {
                program: t.program_id,
                tier: Tier::of(t.tier.as_ref()),
                qualifying: t.qualifying,
                grace_until: rfc3339(t.grace_until.as_ref()),
                next_tier: Tier::of(t.next_tier.as_ref()),
                to_next_tier: t.to_next_tier,
            })
        }
        Err(s) if absent(&s) => None,
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
            referred_by.map(|by| Referral {
                referred_by: by,
                first_order_placed: ordered,
            })
        }
        Err(s) if absent(&s) => None,
        Err(s) => return Err(s.into()),
    };
    Ok(Json(Cockpit {
        customer_id,
        balances: balances(&balance.balances),
        tier,
        rewards: crate::transcode::to_json_list(
            "tessera.catalog.v1.CustomerReward",
            &rewards.rewards,
        )?,
        referral,
    }))
}

/// A customer's own summary.
#[derive(Serialize, ToSchema)]
struct Cockpit {
    customer_id: String,
    /// Balances with what expires in 30/60/90 days.
    balances: Vec<Balance>,
    /// The tier in the `default` programme; null without tiers.
    tier: Option<CockpitTier>,
    /// The rewards the customer can use now.
    #[schema(schema_with = customer_rewards)]
    rewards: Vec<Value>,
    /// Who referred the customer; null when nobody did.
    referral: Option<Referral>,
}

fn customer_rewards() -> utoipa::openapi::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(utoipa::openapi::Ref::from_schema_name(
            "tessera.catalog.v1.CustomerReward",
        ))
        .build()
}

/// The cockpit's tier.
#[derive(Serialize, ToSchema)]
struct CockpitTier {
    program: String,
    tier: Option<Tier>,
    qualifying: i64,
    grace_until: Option<String>,
    next_tier: Option<Tier>,
    to_next_tier: i64,
}

/// A referred customer's referral.
#[derive(Serialize, ToSchema)]
struct Referral {
    referred_by: String,
    /// Whether the first order (which rewards both) is placed.
    first_order_placed: bool,
}
