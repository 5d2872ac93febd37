//! Event intake and the event log.

use std::sync::Arc;

use sea_orm::ConnectionTrait;
use tessera_proto::common::v1::PageResponse;
use tessera_proto::notification::v1::{
    self as pb, notification_service_server::NotificationService,
};
use tessera_runtime::config::WebhooksConfig;
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error};
use tessera_store::api::{check_id, check_idempotency_key, page_response};
use tessera_store::idempotency::Idempotency;
use tessera_store::outbox::{micros_to_timestamp, timestamp_to_micros};
use tessera_store::{Db, db_error, insert_rows, now_micros, stmt};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::{catalogue, deliveries, endpoints, messages, signing, templates};

/// Most events accepted in one `PublishEvents` call.
const MAX_BATCH: usize = 1000;

pub struct Notification {
    pub db: Db,
    pub webhooks: WebhooksConfig,
    pub idempotency: Idempotency,
    /// Wakes the webhook dispatcher.
    pub dispatch: Arc<Notify>,
    /// Signs and reads unsubscribe links.
    pub tokens: messages::Tokens,
    /// Seals webhook signing secrets.
    pub keyring: tessera_runtime::sealing::Keyring,
    /// Wakes the message sender.
    pub send: Arc<Notify>,
}

/// An endpoint's concurrency limit: as given, or the default.
fn concurrency(given: u32) -> u32 {
    if given == 0 {
        endpoints::DEFAULT_CONCURRENCY
    } else {
        given
    }
}

/// Event types: dot-separated lower-case words, e.g. `points.credited`.
fn valid_event_type(t: &str) -> bool {
    t.len() <= 100
        && t.contains('.')
        && t.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
}

fn validate(tenant: &str, request: &pb::PublishEventsRequest) -> Result<(), Error> {
    let mut v = Violations::new();
    if request.events.is_empty() {
        v.add("events", "must contain at least one event");
    }
    if request.events.len() > MAX_BATCH {
        v.add("events", format!("must contain at most {MAX_BATCH} events"));
    }
    for (i, e) in request.events.iter().enumerate() {
        if uuid::Uuid::parse_str(&e.id).is_err() {
            v.add(format!("events[{i}].id"), "must be a UUID");
        }
        if e.tenant_id != tenant {
            v.add(
                format!("events[{i}].tenant_id"),
                "must be the caller's tenant",
            );
        }
        if !valid_event_type(&e.r#type) {
            v.add(
                format!("events[{i}].type"),
                "must be dot-separated lower-case words, e.g. points.credited",
            );
        }
        if e.source.is_empty() || e.source.len() > 64 {
            v.add(format!("events[{i}].source"), "must be 1 to 64 characters");
        }
        if e.occurred_at.is_none() {
            v.add(format!("events[{i}].occurred_at"), "is required");
        }
        if serde_json::from_slice::<serde_json::Value>(&e.data).is_err() {
            v.add(format!("events[{i}].data"), "must be a JSON document");
        }
    }
    v.finish()
}

#[tonic::async_trait]
impl NotificationService for Notification {
    async fn publish_events(
        &self,
        request: Request<pb::PublishEventsRequest>,
    ) -> Result<Response<pb::PublishEventsResponse>, Status> {
        let ctx = context_of(&request)?;
        if ctx.role != "system" {
            return Err(
                Error::new(Code::PermissionDenied, "only services may publish events").into(),
            );
        }
        let request = request.into_inner();
        validate(&ctx.tenant_id, &request)?;
        let received_at = now_micros();
        let txn = self.db.begin_write().await?;
        // One multi-row insert; a redelivered event id is skipped.
        let rows = request
            .events
            .iter()
            .map(|e| {
                vec![
                    ctx.tenant_id.clone().into(),
                    e.id.clone().into(),
                    e.r#type.clone().into(),
                    e.source.clone().into(),
                    e.occurred_at.as_ref().map_or(0, timestamp_to_micros).into(),
                    received_at.into(),
                    e.data.clone().into(),
                    e.traceparent.clone().into(),
                ]
            })
            .collect();
        let accepted = u32::try_from(
            insert_rows(
                &txn,
                "INSERT INTO events (tenant_id, event_id, event_type, source, occurred_at, \
                 received_at, data, traceparent)",
                "ON CONFLICT (tenant_id, event_id) DO NOTHING",
                rows,
            )
            .await?,
        )
        .unwrap_or(u32::MAX);
        // Their webhook deliveries, in the same transaction (a redelivered event adds none).
        let events: Vec<deliveries::NewEvent> = request
            .events
            .iter()
            .map(|e| deliveries::NewEvent {
                id: &e.id,
                event_type: &e.r#type,
            })
            .collect();
        let queued = deliveries::fan_out(&txn, &ctx.tenant_id, &events, received_at).await?;
        // Messages the events ask for (issued incentives, reminders), and erasures.
        let mut wanted = Vec::new();
        for e in &request.events {
            if e.r#type == "customer.erased" {
                let data: serde_json::Value =
                    serde_json::from_slice(&e.data).map_err(Error::internal)?;
                if let Some(customer) = data["customer_id"].as_str() {
                    messages::erase(&txn, &ctx.tenant_id, customer).await?;
                }
            }
            wanted.extend(messages::from_event(&e.id, &e.r#type, &e.data));
        }
        let to_send = messages::queue(&txn, &ctx.tenant_id, wanted, received_at).await?;
        txn.commit().await.map_err(db_error)?;
        if queued > 0 {
            self.dispatch.notify_one();
        }
        if to_send > 0 {
            self.send.notify_one();
        }
        let total = u32::try_from(request.events.len()).unwrap_or(u32::MAX);
        tracing::debug!(accepted, duplicates = total - accepted, "events received");
        Ok(Response::new(pb::PublishEventsResponse {
            accepted,
            duplicates: total - accepted,
        }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let page = request.page.unwrap_or_default();
        let mut v = Violations::new();
        let limit = v.page_limit(page.limit);
        let after = if page.starting_after.is_empty() {
            i64::MAX
        } else {
            page.starting_after.parse::<i64>().unwrap_or_else(|_| {
                v.add(
                    "page.starting_after",
                    "is not a cursor returned by this API",
                );
                0
            })
        };
        if !request.r#type.is_empty() && !valid_event_type(&request.r#type) {
            v.add(
                "type",
                "must be dot-separated lower-case words, e.g. points.credited",
            );
        }
        v.finish()?;
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT seq, event_id, event_type, source, occurred_at, data, traceparent \
                 FROM events WHERE tenant_id = $1 AND seq < $2 AND ($3 = '' OR event_type = $3) \
                 ORDER BY seq DESC LIMIT $4",
                [
                    ctx.tenant_id.clone().into(),
                    after.into(),
                    request.r#type.clone().into(),
                    i64::from(limit + 1).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let has_more = rows.len() > limit as usize;
        let mut events = Vec::new();
        let mut last_seq = 0i64;
        for row in rows.iter().take(limit as usize) {
            let get = || -> Result<(i64, pb::Event), sea_orm::DbErr> {
                Ok((
                    row.try_get_by_index(0)?,
                    pb::Event {
                        id: row.try_get_by_index(1)?,
                        tenant_id: ctx.tenant_id.clone(),
                        r#type: row.try_get_by_index(2)?,
                        source: row.try_get_by_index(3)?,
                        occurred_at: Some(micros_to_timestamp(row.try_get_by_index(4)?)),
                        data: row.try_get_by_index(5)?,
                        traceparent: row.try_get_by_index(6)?,
                    },
                ))
            };
            let (seq, event) = get().map_err(db_error)?;
            last_seq = seq;
            events.push(event);
        }
        Ok(Response::new(pb::ListEventsResponse {
            events,
            page: Some(PageResponse {
                next_cursor: if has_more {
                    last_seq.to_string()
                } else {
                    String::new()
                },
                has_more,
            }),
        }))
    }

    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        endpoints::check(
            &mut v,
            &request.description,
            &request.event_types,
            request.max_concurrency,
        );
        v.finish()?;
        endpoints::check_url(&request.url, &self.webhooks.allowed_hosts, "url").await?;
        let now = now_micros();
        let endpoint = pb::WebhookEndpoint {
            id: uuid::Uuid::now_v7().to_string(),
            url: request.url.clone(),
            description: request.description.clone(),
            event_types: request.event_types.clone(),
            enabled: true,
            max_concurrency: concurrency(request.max_concurrency),
            created_at: Some(micros_to_timestamp(now)),
            updated_at: Some(micros_to_timestamp(now)),
            ..Default::default()
        };
        let tenant = ctx.tenant_id.clone();
        let keyring = self.keyring.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.CreateWebhookEndpoint",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let secret = signing::new_secret();
                        endpoints::create(txn, &keyring, &tenant, &endpoint, &secret, now).await?;
                        Ok(pb::CreateWebhookEndpointResponse {
                            endpoint: Some(endpoint),
                            secret,
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn update_webhook_endpoint(
        &self,
        request: Request<pb::UpdateWebhookEndpointRequest>,
    ) -> Result<Response<pb::UpdateWebhookEndpointResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "id", &request.id);
        endpoints::check(
            &mut v,
            &request.description,
            &request.event_types,
            request.max_concurrency,
        );
        v.finish()?;
        endpoints::check_url(&request.url, &self.webhooks.allowed_hosts, "url").await?;
        let endpoint = pb::WebhookEndpoint {
            id: request.id.clone(),
            url: request.url.clone(),
            description: request.description.clone(),
            event_types: request.event_types.clone(),
            enabled: request.enabled,
            max_concurrency: concurrency(request.max_concurrency),
            ..Default::default()
        };
        let tenant = ctx.tenant_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.UpdateWebhookEndpoint",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        endpoints::update(txn, &tenant, &endpoint, now_micros()).await?;
                        Ok(pb::UpdateWebhookEndpointResponse {
                            endpoint: Some(
                                endpoints::get(txn, &tenant, &endpoint.id).await?.endpoint,
                            ),
                        })
                    })
                },
            )
            .await?;
        self.dispatch.notify_one();
        Ok(Response::new(response))
    }

    async fn get_webhook_endpoint(
        &self,
        request: Request<pb::GetWebhookEndpointRequest>,
    ) -> Result<Response<pb::GetWebhookEndpointResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let stored = endpoints::get(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetWebhookEndpointResponse {
            endpoint: Some(stored.endpoint),
        }))
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        let ctx = context_of(&request)?;
        let mut v = Violations::new();
        let (limit, after) = tessera_store::api::page(&mut v, request.into_inner().page);
        v.finish()?;
        let (endpoints, more) =
            endpoints::list(self.db.conn(), &ctx.tenant_id, &after, limit).await?;
        let page = page_response(more, endpoints.last().map(|e| e.id.as_str()));
        Ok(Response::new(pb::ListWebhookEndpointsResponse {
            endpoints,
            page,
        }))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "id", &request.id);
        if !(0..=7 * 86_400).contains(&request.overlap_seconds) {
            v.add("overlap_seconds", "must be 0 to 604800 (7 days)");
        }
        v.finish()?;
        let overlap = if request.overlap_seconds == 0 {
            86_400
        } else {
            request.overlap_seconds
        };
        let (tenant, id) = (ctx.tenant_id.clone(), request.id.clone());
        let keyring = self.keyring.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.RotateWebhookSecret",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let now = now_micros();
                        let until = now + overlap * 1_000_000;
                        let secret = signing::new_secret();
                        endpoints::rotate(txn, &keyring, &tenant, &id, &secret, until, now).await?;
                        Ok(pb::RotateWebhookSecretResponse {
                            secret,
                            previous_valid_until: Some(micros_to_timestamp(until)),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let page = request.page.unwrap_or_default();
        let limit = v.page_limit(page.limit);
        if !page.starting_after.is_empty() && !page.starting_after.starts_with("msg_") {
            v.add(
                "page.starting_after",
                "is not a cursor returned by this API",
            );
        }
        let status = pb::DeliveryStatus::try_from(request.status).unwrap_or_else(|_| {
            v.add("status", "is not a delivery status");
            pb::DeliveryStatus::Unspecified
        });
        v.finish()?;
        let (deliveries, more) = deliveries::list(
            self.db.conn(),
            &ctx.tenant_id,
            &request.endpoint_id,
            status,
            &page.starting_after,
            limit,
        )
        .await?;
        let page = page_response(more, deliveries.last().map(|d| d.id.as_str()));
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries,
            page,
        }))
    }

    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let delivery = deliveries::get(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetDeliveryResponse {
            delivery: Some(delivery),
        }))
    }

    async fn replay_deliveries(
        &self,
        request: Request<pb::ReplayDeliveriesRequest>,
    ) -> Result<Response<pb::ReplayDeliveriesResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.delivery_ids.is_empty() == request.endpoint_id.is_empty() {
            v.add("delivery_ids", "give either delivery_ids or endpoint_id");
        }
        if request.delivery_ids.len() > 1000 {
            v.add("delivery_ids", "must hold at most 1000 ids");
        }
        v.finish()?;
        let (tenant, ids, endpoint) = (
            ctx.tenant_id.clone(),
            request.delivery_ids.clone(),
            request.endpoint_id.clone(),
        );
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.ReplayDeliveries",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let replayed =
                            deliveries::replay(txn, &tenant, &ids, &endpoint, now_micros()).await?;
                        Ok(pb::ReplayDeliveriesResponse { replayed })
                    })
                },
            )
            .await?;
        self.dispatch.notify_one();
        Ok(Response::new(response))
    }

    async fn list_event_types(
        &self,
        _request: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        Ok(Response::new(pb::ListEventTypesResponse {
            event_types: catalogue::event_types().to_vec(),
        }))
    }

    async fn put_brand(
        &self,
        request: Request<pb::PutBrandRequest>,
    ) -> Result<Response<pb::PutBrandResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        let brand = request.brand.clone().unwrap_or_default();
        templates::check_brand(&mut v, &brand);
        v.finish()?;
        let tenant = ctx.tenant_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.PutBrand",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        templates::put_brand(txn, &tenant, &brand, now_micros()).await?;
                        Ok(pb::PutBrandResponse { brand: Some(brand) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_brand(
        &self,
        request: Request<pb::GetBrandRequest>,
    ) -> Result<Response<pb::GetBrandResponse>, Status> {
        let ctx = context_of(&request)?;
        let brand = templates::brand(self.db.conn(), &ctx.tenant_id).await?;
        Ok(Response::new(pb::GetBrandResponse { brand: Some(brand) }))
    }

    async fn put_template(
        &self,
        request: Request<pb::PutTemplateRequest>,
    ) -> Result<Response<pb::PutTemplateResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        match &request.template {
            Some(t) => templates::check(&mut v, t),
            None => v.add("template", "is required"),
        }
        v.finish()?;
        let (tenant, template) = (
            ctx.tenant_id.clone(),
            request.template.clone().unwrap_or_default(),
        );
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.PutTemplate",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let template =
                            templates::put(txn, &tenant, &template, now_micros()).await?;
                        Ok(pb::PutTemplateResponse {
                            template: Some(template),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let ctx = context_of(&request)?;
        let name = request.into_inner().name;
        let templates = templates::list(self.db.conn(), &ctx.tenant_id, &name).await?;
        Ok(Response::new(pb::ListTemplatesResponse { templates }))
    }

    async fn delete_template(
        &self,
        request: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if !templates::is_name(&request.name) {
            v.add("name", "must be 1 to 64 of a-z, 0-9, _ and -");
        }
        v.finish()?;
        let (tenant, r) = (ctx.tenant_id.clone(), request.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.DeleteTemplate",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        templates::delete(txn, &tenant, &r).await?;
                        Ok(pb::DeleteTemplateResponse {})
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        tessera_store::api::check_customer_id(&mut v, "customer_id", &request.customer_id);
        if request.channel() == pb::Channel::Unspecified {
            v.add("channel", "is required (EMAIL, SMS or PUSH)");
        }
        if !templates::is_name(&request.template) {
            v.add("template", "must be 1 to 64 of a-z, 0-9, _ and -");
        }
        if request.campaign_id.len() > 64 {
            v.add("campaign_id", "must be at most 64 characters");
        }
        let variables = if request.variables.is_empty() {
            serde_json::json!({})
        } else {
            match serde_json::from_slice::<serde_json::Value>(&request.variables) {
                Ok(vars @ serde_json::Value::Object(_)) if request.variables.len() <= 65_536 => {
                    vars
                }
                _ => {
                    v.add("variables", "must be a JSON object of at most 64 KiB");
                    serde_json::Value::Null
                }
            }
        };
        v.finish()?;
        let tenant = ctx.tenant_id.clone();
        let r = request.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.SendMessage",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let key = messages::new_id();
                        let message = messages::NewMessage {
                            customer_id: r.customer_id.clone(),
                            channel: r.channel(),
                            template: r.template.clone(),
                            campaign_id: r.campaign_id.clone(),
                            cause: "api".into(),
                            variables,
                            dedupe_key: key.clone(),
                        };
                        messages::queue(txn, &tenant, vec![message], now_micros()).await?;
                        Ok(pb::SendMessageResponse {
                            message: Some(messages::by_key(txn, &tenant, &key).await?),
                        })
                    })
                },
            )
            .await?;
        self.send.notify_one();
        Ok(Response::new(response))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let page = request.page.clone().unwrap_or_default();
        let limit = v.page_limit(page.limit);
        if !page.starting_after.is_empty() && !page.starting_after.starts_with("mes_") {
            v.add(
                "page.starting_after",
                "is not a cursor returned by this API",
            );
        }
        if request.customer_id.is_empty() && request.cause.is_empty() {
            v.add("customer_id", "is required (or give cause)");
        }
        if pb::MessageStatus::try_from(request.status).is_err() {
            v.add("status", "is not a message status");
        }
        v.finish()?;
        let (messages, more) = messages::list(
            self.db.conn(),
            &ctx.tenant_id,
            &request,
            &page.starting_after,
            limit,
        )
        .await?;
        let page = page_response(more, messages.last().map(|m| m.id.as_str()));
        Ok(Response::new(pb::ListMessagesResponse { messages, page }))
    }

    async fn summarize_messages(
        &self,
        request: Request<pb::SummarizeMessagesRequest>,
    ) -> Result<Response<pb::SummarizeMessagesResponse>, Status> {
        let ctx = context_of(&request)?;
        let cause = request.into_inner().cause;
        let mut v = Violations::new();
        if cause.is_empty() || cause.len() > 200 {
            v.add("cause", "must be 1 to 200 characters");
        }
        v.finish()?;
        let counts = messages::summarize(self.db.conn(), &ctx.tenant_id, &cause).await?;
        Ok(Response::new(pb::SummarizeMessagesResponse { counts }))
    }

    async fn set_subscription(
        &self,
        request: Request<pb::SetSubscriptionRequest>,
    ) -> Result<Response<pb::SetSubscriptionResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        tessera_store::api::check_customer_id(&mut v, "customer_id", &request.customer_id);
        if request.channel() == pb::Channel::Unspecified {
            v.add("channel", "is required (EMAIL, SMS or PUSH)");
        }
        v.finish()?;
        let (tenant, r) = (ctx.tenant_id.clone(), request.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "notification.SetSubscription",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        messages::set_subscription(
                            txn,
                            &tenant,
                            &r.customer_id,
                            r.channel(),
                            r.subscribed,
                            now_micros(),
                        )
                        .await?;
                        Ok(pb::SetSubscriptionResponse {})
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        let ctx = context_of(&request)?;
        let token = request.into_inner().token;
        let (tenant, customer, channel) = self
            .tokens
            .verify(&token)
            .filter(|(tenant, _, _)| *tenant == ctx.tenant_id)
            .ok_or_else(|| {
                Error::invalid_field("token", "is not an unsubscribe link of this service")
            })?;
        // Following the link again changes nothing: no idempotency key needed.
        let txn = self.db.begin_write().await?;
        messages::set_subscription(&txn, &tenant, &customer, channel, false, now_micros()).await?;
        txn.commit().await.map_err(db_error)?;
        tracing::info!(%customer, channel = messages::channel_name(channel), "unsubscribed");
        let mut response = pb::UnsubscribeResponse {
            customer_id: customer,
            ..Default::default()
        };
        response.set_channel(channel);
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        assert!(valid_event_type("points.credited"));
        assert!(valid_event_type("redemption.rolled_back"));
        assert!(!valid_event_type("points"));
        assert!(!valid_event_type("Points.Credited"));
        assert!(!valid_event_type("points..x"));
    }
}
