//! Message routes: the brand (`GET|PUT /v1/brand`), templates (`GET|PUT|DELETE
//! /v1/templates`), sending a message to a customer and their delivery log
//! (`POST|GET /v1/customers/{id}/messages`), marketing subscriptions
//! (`PUT /v1/customers/{id}/subscriptions/{channel}`), the unsubscribe link of marketing
//! messages (`GET|POST /v1/unsubscribe?token=`, no API key: the token is signed) and the
//! event catalogue (`GET /v1/event-types`).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_proto::notification::v1 as pb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_runtime::{Error, RequestContext};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::api::{Api, Content, Op};
use crate::error::ApiError;
use crate::extract::{IdempotencyKey, StrictJson};
use crate::keys::{Principal, Role};
use crate::observe::RequestId;
use crate::query::{QueryResult, enum_value, page_reply, page_request, strict};
use crate::transcode::{from_json, reply, to_json_list};

/// Brand and templates: what campaigns say.
const AUTHORS: [Role; 2] = [Role::Admin, Role::Marketer];
/// Who may message a customer or change their subscriptions.
const SENDERS: [Role; 3] = [Role::Admin, Role::Marketer, Role::SupportAgent];
/// Who may read a customer's delivery log.
const READERS: [Role; 4] = [
    Role::Admin,
    Role::Marketer,
    Role::SupportAgent,
    Role::Analyst,
];

fn message(name: &str) -> String {
    format!("tessera.notification.v1.{name}")
}

pub fn routes(api: &mut Api) {
    const CHANNELS: [&str; 3] = ["email", "sms", "push"];
    api.tag("messages", "Brand, templates, messages to customers, subscriptions and the event catalogue.")
        .add(
            Op::get("/v1/brand", get_brand)
                .summary("The tenant's brand")
                .roles(&READERS)
                .answer_proto(200, "The brand.", "tessera.notification.v1.Brand"),
        )
        .add(
            Op::put("/v1/brand", put_brand)
                .summary("Set the tenant's brand")
                .roles(&AUTHORS)
                .idempotent()
                .before("/v1/brand")
                .body_proto("tessera.notification.v1.Brand", &[])
                .answer_proto(200, "The brand.", "tessera.notification.v1.Brand"),
        )
        .add(
            Op::get("/v1/templates", list_templates)
                .summary("List templates")
                .roles(&READERS)
                .query::<TemplateQuery>()
                .answer_page("tessera.notification.v1.Template"),
        )
        .add(
            Op::put("/v1/templates", put_template)
                .summary("Create or replace a template")
                .describe("Compiled when saved: a syntax error is refused with the field and line.")
                .roles(&AUTHORS)
                .idempotent()
                .body_proto("tessera.notification.v1.Template", &[])
                .answer_proto(200, "The template.", "tessera.notification.v1.Template"),
        )
        .add(
            Op::delete("/v1/templates", delete_template)
                .summary("Delete a template")
                .roles(&AUTHORS)
                .idempotent()
                .query::<TemplateQuery>()
                .answer_with(204, "Deleted.", Content::Empty),
        )
        .add(
            Op::post("/v1/customers/{id}/messages", send)
                .summary("Send a customer a message")
                .roles(&SENDERS)
                .idempotent()
                .body::<SendBody>()
                .answer_proto(202, "The message, queued.", "tessera.notification.v1.Message"),
        )
        .add(
            Op::get("/v1/customers/{id}/messages", list)
                .summary("A customer's delivery log")
                .roles(&READERS)
                .query::<ListQuery>()
                .answer_page("tessera.notification.v1.Message"),
        )
        .add(
            Op::put("/v1/customers/{id}/subscriptions/{channel}", subscription)
                .summary("Subscribe a customer to marketing on a channel, or not")
                .roles(&[Role::Admin, Role::SupportAgent, Role::Touchpoint])
                .idempotent()
                .path_enum("channel", &CHANNELS)
                .body::<SubscriptionBody>()
                .answer::<Subscription>(200, "The subscription."),
        )
        .add(
            Op::get("/v1/unsubscribe", unsubscribe_page)
                .summary("The unsubscribe link's page")
                .describe("No API key: the token is signed. Link scanners follow GETs, so this only shows a form that posts.")
                .query::<TokenQuery>()
                .answer_with(200, "A form that posts the token.", Content::Html),
        )
        .add(
            Op::post("/v1/unsubscribe", unsubscribe)
                .summary("Unsubscribe (RFC 8058 one-click)")
                .describe("No API key: the token names tenant, customer and channel, and is signed.")
                .query::<TokenQuery>()
                .answer_proto(200, "Unsubscribed.", "tessera.notification.v1.UnsubscribeResponse"),
        )
        .add(
            Op::get("/v1/event-types", event_types)
                .summary("The event catalogue")
                .describe("Every event type with its source, description and JSON Schema per version.")
                .roles(&Role::ALL)
                .answer_page("tessera.notification.v1.EventType"),
        );
}

fn call(
    state: &AppState,
    principal: &Principal,
    request_id: &RequestId,
) -> (NotificationServiceClient<Channel>, RequestContext) {
    (state.notification.clone(), principal.context(request_id))
}

async fn get_brand(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .get_brand(ctx.request(pb::GetBrandRequest {}))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("Brand"),
        &r.brand.unwrap_or_default(),
    )
}

async fn put_brand(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let brand: pb::Brand = from_json(&message("Brand"), body)?;
    let r = client
        .put_brand(ctx.request(pb::PutBrandRequest {
            idempotency_key: key,
            brand: Some(brand),
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("Brand"),
        &r.brand.unwrap_or_default(),
    )
}

async fn put_template(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<Value>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let template: pb::Template = from_json(&message("Template"), body)?;
    let r = client
        .put_template(ctx.request(pb::PutTemplateRequest {
            idempotency_key: key,
            template: Some(template),
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::OK,
        &message("Template"),
        &r.template.unwrap_or_default(),
    )
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct TemplateQuery {
    /// The template's name (`incentive_issued`, …).
    #[serde(default)]
    name: String,
    /// `email`, `sms` or `push` (delete).
    #[serde(default)]
    channel: String,
    #[serde(default)]
    campaign_id: String,
    #[serde(default)]
    locale: String,
}

async fn list_templates(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    query: QueryResult<TemplateQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    let r = client
        .list_templates(ctx.request(pb::ListTemplatesRequest { name: q.name }))
        .await?
        .into_inner();
    page_reply(to_json_list(&message("Template"), &r.templates)?, None)
}

fn channel(value: &str) -> Result<i32, ApiError> {
    enum_value("channel", &message("Channel"), "CHANNEL_", value)
}

async fn delete_template(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    query: QueryResult<TemplateQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    client
        .delete_template(ctx.request(pb::DeleteTemplateRequest {
            idempotency_key: key,
            channel: channel(&q.channel)?,
            name: q.name,
            campaign_id: q.campaign_id,
            locale: q.locale,
        }))
        .await?;
    Ok(http::StatusCode::NO_CONTENT.into_response())
}

/// What `POST /v1/customers/{id}/messages` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// `email`, `sms` or `push`.
    channel: String,
    template: String,
    #[serde(default)]
    campaign_id: String,
    /// What the template sees besides customer and brand.
    #[serde(default)]
    variables: serde_json::Map<String, Value>,
}

async fn send(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<SendBody>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .send_message(ctx.request(pb::SendMessageRequest {
            idempotency_key: key,
            customer_id,
            channel: channel(&body.channel)?,
            template: body.template,
            campaign_id: body.campaign_id,
            variables: serde_json::to_vec(&body.variables).map_err(Error::internal)?,
        }))
        .await?
        .into_inner();
    reply(
        http::StatusCode::ACCEPTED,
        &message("Message"),
        &r.message.unwrap_or_default(),
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
    /// `queued`, `sent`, `skipped` or `failed`.
    #[serde(default)]
    status: String,
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path(customer_id): Path<String>,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let q = strict(query)?;
    let r = client
        .list_messages(ctx.request(pb::ListMessagesRequest {
            customer_id,
            cause: String::new(),
            status: enum_value(
                "status",
                &message("MessageStatus"),
                "MESSAGE_STATUS_",
                &q.status,
            )?,
            page: page_request(q.limit, &q.starting_after),
        }))
        .await?
        .into_inner();
    page_reply(to_json_list(&message("Message"), &r.messages)?, r.page)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscriptionBody {
    subscribed: bool,
}

async fn subscription(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
    Path((customer_id, name)): Path<(String, String)>,
    IdempotencyKey(key): IdempotencyKey,
    StrictJson(body): StrictJson<SubscriptionBody>,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    client
        .set_subscription(ctx.request(pb::SetSubscriptionRequest {
            idempotency_key: key,
            customer_id: customer_id.clone(),
            channel: channel(&name)?,
            subscribed: body.subscribed,
        }))
        .await?;
    Ok(axum::Json(Subscription {
        customer_id,
        channel: name,
        subscribed: body.subscribed,
    })
    .into_response())
}

/// A customer's marketing subscription on a channel.
#[derive(Serialize, ToSchema)]
struct Subscription {
    customer_id: String,
    channel: String,
    subscribed: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    /// The signed token of the link.
    token: String,
}

/// A link scanner may follow a GET: it only shows a page whose button posts.
async fn unsubscribe_page(query: QueryResult<TokenQuery>) -> Result<Response, ApiError> {
    let q = strict(query)?;
    let token: String = q
        .token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    Ok(Html(format!(
        "<!doctype html><title>Unsubscribe</title>\
         <form method=\"post\" action=\"/v1/unsubscribe?token={token}\">\
         <p>Stop receiving these messages?</p><button type=\"submit\">Unsubscribe</button>\
         </form>"
    ))
    .into_response())
}

/// Follows the link: no API key, the signed token names tenant, customer and channel. Mail
/// clients' one-click unsubscribe (RFC 8058) posts here; its form body is not needed.
async fn unsubscribe(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    query: QueryResult<TokenQuery>,
) -> Result<Response, ApiError> {
    let q = strict(query)?;
    let invalid = || {
        ApiError::from(Error::invalid_field(
            "token",
            "is not a valid unsubscribe link",
        ))
    };
    let tenant = unsubscribe_tenant(&q.token).ok_or_else(invalid)?;
    if !tessera_runtime::context::is_valid_tenant_id(&tenant) {
        return Err(invalid());
    }
    let ctx = RequestContext {
        tenant_id: tenant,
        principal: "public:unsubscribe-link".into(),
        role: "public".into(),
        request_id: request_id.0.clone(),
    };
    let r = state
        .notification
        .clone()
        .unsubscribe(ctx.request(pb::UnsubscribeRequest { token: q.token }))
        .await?
        .into_inner();
    reply(http::StatusCode::OK, &message("UnsubscribeResponse"), &r)
}

/// The tenant a token claims (the service checks the signature).
fn unsubscribe_tenant(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split_once('.')?.0)
        .ok()?;
    String::from_utf8(payload)
        .ok()?
        .split('\n')
        .next()
        .map(str::to_string)
}

async fn event_types(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let (mut client, ctx) = call(&state, &principal, &request_id);
    let r = client
        .list_event_types(ctx.request(pb::ListEventTypesRequest {}))
        .await?
        .into_inner();
    page_reply(to_json_list(&message("EventType"), &r.event_types)?, None)
}
