//! The gRPC adapter (`EligibilityService`): read the request context, validate the whole request (all field
//! violations at once), then run the change under its idempotency key, in one transaction
//! with its outbox event. Caches and read models are told after the commit.

use std::collections::HashSet;

use serde_json::json;
use tessera_proto::eligibility::v1::{self as pb, eligibility_service_server::EligibilityService};
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_runtime::{Error, RequestContext};
use tessera_store::api::{check_customer_id, check_idempotency_key, page_response};
use tessera_store::{now_micros, outbox};
use tonic::{Request, Response, Status};

use crate::app::Eligibility;
use crate::campaigns::{self};
use crate::checkout::CheckoutCall;
use crate::earning;
use crate::facts;
use crate::pool_codes;
use crate::qualify::{self, Input};
use crate::rules::{self, Schema, Scope};
use crate::segments::{self};

impl Eligibility {
    /// Creates or replaces a segment; cached memberships are keyed by the tenant's segment
    /// version, which the change moves, so none of them answers afterwards.
    async fn save_segment<Req: prost::Message>(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &Req,
        input: Option<&pb::SegmentInput>,
        create: bool,
    ) -> Result<pb::Segment, Status> {
        let attributes = facts::attributes(self.db.conn(), &ctx.tenant_id).await?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, key);
        segments::check(&mut v, input, &attributes);
        v.finish()?;
        let (input, tenant) = (input.cloned().unwrap_or_default(), ctx.tenant_id.clone());
        let segment = self
            .idempotency
            .run(ctx, scope, key, request, move |txn| {
                Box::pin(async move {
                    if create {
                        segments::create(txn, &tenant, &input).await
                    } else {
                        segments::update(txn, &tenant, &input).await
                    }
                })
            })
            .await?;
        self.segments.forget(&ctx.tenant_id);
        Ok(segment)
    }
}

fn check_campaign_id(v: &mut Violations, id: &str) {
    if id.is_empty() || id.len() > 128 {
        v.add("id", "must be 1 to 128 characters");
    }
}

#[tonic::async_trait]
impl EligibilityService for Eligibility {
    async fn put_settings(
        &self,
        request: Request<pb::PutSettingsRequest>,
    ) -> Result<Response<pb::PutSettingsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        let settings = facts::check_settings(&mut v, request.settings.as_ref());
        v.finish()?;
        let settings = settings.ok_or_else(|| Status::internal("unchecked"))?;
        let tenant = ctx.tenant_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.PutSettings",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        facts::put_settings(txn, &tenant, &settings).await?;
                        Ok(pb::PutSettingsResponse {
                            settings: Some(settings.to_proto()),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_settings(
        &self,
        request: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::GetSettingsResponse>, Status> {
        let ctx = context_of(&request)?;
        let settings = facts::settings(self.db.conn(), &ctx.tenant_id).await?;
        Ok(Response::new(pb::GetSettingsResponse {
            settings: Some(settings.to_proto()),
        }))
    }

    async fn define_attribute(
        &self,
        request: Request<pb::DefineAttributeRequest>,
    ) -> Result<Response<pb::DefineAttributeResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        let attribute = request.attribute.clone().unwrap_or_default();
        if request.attribute.is_none() {
            v.add("attribute", "is required");
        } else {
            facts::check_name(&mut v, "attribute.name", &attribute.name);
        }
        let t = facts::attr_type(attribute.r#type());
        if request.attribute.is_some() && t.is_none() {
            v.add("attribute.type", "is required");
        }
        v.finish()?;
        let t = t.ok_or_else(|| Status::internal("unchecked"))?;
        let tenant = ctx.tenant_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.DefineAttribute",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        facts::define_attribute(txn, &tenant, &attribute.name, t).await?;
                        Ok(pb::DefineAttributeResponse {
                            attribute: Some(attribute),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_attributes(
        &self,
        request: Request<pb::ListAttributesRequest>,
    ) -> Result<Response<pb::ListAttributesResponse>, Status> {
        let ctx = context_of(&request)?;
        let attributes = facts::attributes(self.db.conn(), &ctx.tenant_id).await?;
        Ok(Response::new(pb::ListAttributesResponse {
            attributes: attributes
                .into_iter()
                .map(|(name, t)| pb::AttributeDefinition {
                    name,
                    r#type: facts::proto_type(t).into(),
                })
                .collect(),
        }))
    }

    async fn upsert_customer(
        &self,
        request: Request<pb::UpsertCustomerRequest>,
    ) -> Result<Response<pb::UpsertCustomerResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let attributes = facts::attributes(self.db.conn(), &ctx.tenant_id).await?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        match &request.customer {
            Some(c) => facts::check_customer(&mut v, "customer", c, &attributes),
            None => v.add("customer", "is required"),
        }
        v.finish()?;
        let input = request.customer.clone().unwrap_or_default();
        let tenant = ctx.tenant_id.clone();
        let zone = facts::settings(self.db.conn(), &tenant).await?.time_zone;
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.UpsertCustomer",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let (customer, _) =
                            facts::upsert_customer(txn, &tenant, &input, zone, now_micros())
                                .await?;
                        Ok(pb::UpsertCustomerResponse {
                            customer: Some(customer),
                        })
                    })
                },
            )
            .await?;
        let id = request.customer.map(|c| c.id).unwrap_or_default();
        self.facts_changed(&ctx.tenant_id, &id).await;
        Ok(Response::new(response))
    }

    async fn bulk_upsert_customers(
        &self,
        request: Request<pb::BulkUpsertCustomersRequest>,
    ) -> Result<Response<pb::BulkUpsertCustomersResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let attributes = facts::attributes(self.db.conn(), &ctx.tenant_id).await?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.customers.is_empty() || request.customers.len() > 1000 {
            v.add("customers", "must hold 1 to 1000 profiles");
        }
        let mut seen = HashSet::new();
        for (i, c) in request.customers.iter().enumerate() {
            facts::check_customer(&mut v, &format!("customers.{i}"), c, &attributes);
            if !seen.insert(c.id.as_str()) {
                v.add(format!("customers.{i}.id"), "appears twice in the batch");
            }
        }
        v.finish()?;
        let (inputs, tenant) = (request.customers.clone(), ctx.tenant_id.clone());
        let zone = facts::settings(self.db.conn(), &tenant).await?.time_zone;
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.BulkUpsertCustomers",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let now = now_micros();
                        let (mut created, mut updated) = (0, 0);
                        for input in &inputs {
                            if facts::upsert_customer(txn, &tenant, input, zone, now)
                                .await?
                                .1
                            {
                                created += 1;
                            } else {
                                updated += 1;
                            }
                        }
                        Ok(pb::BulkUpsertCustomersResponse { created, updated })
                    })
                },
            )
            .await?;
        for c in &request.customers {
            self.facts_changed(&ctx.tenant_id, &c.id).await;
        }
        Ok(Response::new(response))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::GetCustomerResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        check_customer_id(&mut v, "id", &id);
        v.finish()?;
        let conn = self.db.conn();
        let customer = facts::get_customer(conn, &ctx.tenant_id, &id)
            .await?
            .ok_or_else(|| Error::not_found(format!("customer `{id}`")))?;
        let facts = facts::load(conn, &ctx, &id, now_micros()).await?;
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(customer),
            aggregates: Some(facts.aggregates),
        }))
    }

    async fn erase_customer(
        &self,
        request: Request<pb::EraseCustomerRequest>,
    ) -> Result<Response<pb::EraseCustomerResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_customer_id(&mut v, "id", &request.id);
        v.finish()?;
        let (id, tenant) = (request.id.clone(), ctx.tenant_id.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.EraseCustomer",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let (orders, events) = facts::erase_customer(txn, &tenant, &id)
                            .await?
                            .ok_or_else(|| Error::not_found(format!("customer `{id}`")))?;
                        // A customer created again under this id starts over at facts
                        // version 1: moving the segment version retires every cached entry
                        // (even one whose invalidation is lost while Redis is away).
                        segments::bump(txn, &tenant).await?;
                        outbox::enqueue(
                            txn,
                            &tenant,
                            "customer.erased",
                            &json!({ "customer_id": id, "orders": orders, "events": events }),
                        )
                        .await?;
                        Ok(pb::EraseCustomerResponse {
                            orders: orders as u32,
                            events: events as u32,
                        })
                    })
                },
            )
            .await?;
        self.segments.forget(&ctx.tenant_id);
        Ok(Response::new(response))
    }

    async fn list_customers_by_occasion(
        &self,
        request: Request<pb::ListCustomersByOccasionRequest>,
    ) -> Result<Response<pb::ListCustomersByOccasionResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        // An anniversary is a year at least: a customer who joined on this day less than
        // half a year ago joined this very day.
        const HALF_A_YEAR: i64 = 183 * 86_400_000_000;
        let (column, joined_before) = match request.occasion() {
            pb::Occasion::Birthday => ("birthday_md", i64::MAX),
            pb::Occasion::JoiningAnniversary => ("joined_md", now_micros() - HALF_A_YEAR),
            pb::Occasion::Unspecified => {
                v.add("occasion", "must be BIRTHDAY or JOINING_ANNIVERSARY");
                ("birthday_md", i64::MAX)
            }
        };
        if !(1..=12).contains(&request.month) {
            v.add("month", "must be 1 to 12");
        }
        if !(1..=31).contains(&request.day) {
            v.add("day", "must be 1 to 31");
        }
        let page = request.page.unwrap_or_default();
        let limit = v.page_limit(page.limit);
        v.finish()?;
        let (ids, more) = facts::customers_on(
            self.db.conn(),
            &ctx.tenant_id,
            column,
            &format!("{:02}-{:02}", request.month, request.day),
            joined_before,
            &page.starting_after,
            limit,
        )
        .await?;
        let page = page_response(more, ids.last().map(String::as_str));
        Ok(Response::new(pb::ListCustomersByOccasionResponse {
            customer_ids: ids,
            page,
        }))
    }

    async fn record_order(
        &self,
        request: Request<pb::RecordOrderRequest>,
    ) -> Result<Response<pb::RecordOrderResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let settings = facts::settings(self.db.conn(), &ctx.tenant_id).await?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        facts::check_order(&mut v, request.order.as_ref(), &settings);
        v.finish()?;
        let (order, tenant) = (
            request.order.clone().unwrap_or_default(),
            ctx.tenant_id.clone(),
        );
        let now = now_micros();
        let source = earning::Source::Order(&order).id();
        let effects = if order.status() == pb::OrderStatus::Paid {
            earning::evaluate(
                self,
                &ctx,
                &earning::Source::Order(&order),
                now,
                Some(&settings),
            )
            .await?
        } else {
            earning::triggers::Effects::default()
        };
        let earned_from = source.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.RecordOrder",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let version = facts::record_order(txn, &tenant, &order, now).await?;
                        earning::record(txn, &tenant, &earned_from, effects.grants, now).await?;
                        earning::triggers::record(
                            txn,
                            &tenant,
                            &earned_from,
                            &effects.firings,
                            now,
                        )
                        .await?;
                        if order.status() == pb::OrderStatus::Returned {
                            earning::mark_returned(txn, &tenant, &order).await?;
                        }
                        let (total, spend, _) = facts::order_spend(&order);
                        outbox::enqueue(
                            txn,
                            &tenant,
                            "order.recorded",
                            &json!({
                                "order_id": order.id,
                                "customer_id": order.customer_id,
                                "status": order.status().as_str_name(),
                                "currency": order.currency,
                                "total": total,
                                "spend": spend,
                            }),
                        )
                        .await?;
                        Ok(pb::RecordOrderResponse {
                            order: Some(order),
                            facts_version: version,
                        })
                    })
                },
            )
            .await?;
        let customer = request.order.map(|o| o.customer_id).unwrap_or_default();
        self.facts_changed(&ctx.tenant_id, &customer).await;
        Ok(Response::new(response))
    }

    async fn put_event_schema(
        &self,
        request: Request<pb::PutEventSchemaRequest>,
    ) -> Result<Response<pb::PutEventSchemaResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        facts::check_schema(&mut v, request.schema.as_ref());
        v.finish()?;
        let (schema, tenant) = (
            request.schema.clone().unwrap_or_default(),
            ctx.tenant_id.clone(),
        );
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.PutEventSchema",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        facts::put_event_schema(txn, &tenant, &schema).await?;
                        Ok(pb::PutEventSchemaResponse {
                            schema: Some(schema),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn record_event(
        &self,
        request: Request<pb::RecordEventRequest>,
    ) -> Result<Response<pb::RecordEventResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let event_type = request
            .event
            .as_ref()
            .map(|e| e.r#type.clone())
            .unwrap_or_default();
        let schema = facts::event_schema(self.db.conn(), &ctx.tenant_id, &event_type).await?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        facts::check_event(
            &mut v,
            "event",
            request.event.as_ref(),
            schema.as_ref(),
            true,
        );
        v.finish()?;
        let (event, tenant) = (
            request.event.clone().unwrap_or_default(),
            ctx.tenant_id.clone(),
        );
        let now = now_micros();
        let source = earning::Source::Event(&event).id();
        let effects =
            earning::evaluate(self, &ctx, &earning::Source::Event(&event), now, None).await?;
        let earned_from = source.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.RecordEvent",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let version = facts::record_event(txn, &tenant, &event, now).await?;
                        earning::record(txn, &tenant, &earned_from, effects.grants, now).await?;
                        earning::triggers::record(
                            txn,
                            &tenant,
                            &earned_from,
                            &effects.firings,
                            now,
                        )
                        .await?;
                        Ok(pb::RecordEventResponse {
                            event: Some(event),
                            facts_version: version,
                        })
                    })
                },
            )
            .await?;
        let customer = request.event.map(|e| e.customer_id).unwrap_or_default();
        self.facts_changed(&ctx.tenant_id, &customer).await;
        Ok(Response::new(response))
    }

    async fn check_rule(
        &self,
        request: Request<pb::CheckRuleRequest>,
    ) -> Result<Response<pb::CheckRuleResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let attributes = facts::attributes(self.db.conn(), &ctx.tenant_id).await?;
        let rule = rules::compile(
            &request.expression,
            &Schema::new(&attributes, Scope::Campaign),
        )
        .map_err(|e| Error::invalid_field("expression", e.to_string()))?;
        Ok(Response::new(pb::CheckRuleResponse { reads: rule.reads }))
    }

    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let (key, input) = (&request.idempotency_key, request.segment.as_ref());
        let segment = self
            .save_segment(
                &ctx,
                "eligibility.CreateSegment",
                key,
                &request,
                input,
                true,
            )
            .await?;
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(segment),
        }))
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::UpdateSegmentResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let (key, input) = (&request.idempotency_key, request.segment.as_ref());
        let segment = self
            .save_segment(
                &ctx,
                "eligibility.UpdateSegment",
                key,
                &request,
                input,
                false,
            )
            .await?;
        Ok(Response::new(pb::UpdateSegmentResponse {
            segment: Some(segment),
        }))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        segments::check_segment_id(&mut v, "id", &id);
        v.finish()?;
        let segment = segments::get(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetSegmentResponse {
            segment: Some(segment),
        }))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let ctx = context_of(&request)?;
        let segments = segments::list(self.db.conn(), &ctx.tenant_id).await?;
        Ok(Response::new(pb::ListSegmentsResponse { segments }))
    }

    async fn edit_static_segment(
        &self,
        request: Request<pb::EditStaticSegmentRequest>,
    ) -> Result<Response<pb::EditStaticSegmentResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        segments::check_segment_id(&mut v, "id", &request.id);
        for (field, list) in [("add", &request.add), ("remove", &request.remove)] {
            if list.len() > 10_000 {
                v.add(field, "must hold at most 10,000 customers");
            }
            for (i, c) in list.iter().enumerate() {
                check_customer_id(&mut v, &format!("{field}.{i}"), c);
            }
        }
        if request.add.is_empty() && request.remove.is_empty() {
            v.add("add", "or remove must name a customer");
        }
        v.finish()?;
        let tenant = ctx.tenant_id.clone();
        let (id, add, remove) = (
            request.id.clone(),
            request.add.clone(),
            request.remove.clone(),
        );
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.EditStaticSegment",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let segment =
                            segments::edit_static(txn, &tenant, &id, &add, &remove).await?;
                        Ok(pb::EditStaticSegmentResponse {
                            segment: Some(segment),
                        })
                    })
                },
            )
            .await?;
        self.segments.forget(&ctx.tenant_id);
        Ok(Response::new(response))
    }

    async fn recompute_segment(
        &self,
        request: Request<pb::RecomputeSegmentRequest>,
    ) -> Result<Response<pb::RecomputeSegmentResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        segments::check_segment_id(&mut v, "id", &request.id);
        v.finish()?;
        let (id, tenant) = (request.id.clone(), ctx.tenant_id.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.RecomputeSegment",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let job = segments::create_job(txn, &tenant, &id).await?;
                        Ok(pb::RecomputeSegmentResponse { job: Some(job) })
                    })
                },
            )
            .await?;
        if let Some(job) = response.job.clone()
            && job.status() == pb::JobStatus::Running
            && job.processed == 0
        {
            tokio::spawn(segments::run_job(self.segments.clone(), ctx.clone(), job));
        }
        Ok(Response::new(response))
    }

    async fn get_segment_job(
        &self,
        request: Request<pb::GetSegmentJobRequest>,
    ) -> Result<Response<pb::GetSegmentJobResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        tessera_store::api::check_id(&mut v, "id", &id);
        v.finish()?;
        let job = segments::get_job(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetSegmentJobResponse { job: Some(job) }))
    }

    async fn list_segment_members(
        &self,
        request: Request<pb::ListSegmentMembersRequest>,
    ) -> Result<Response<pb::ListSegmentMembersResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        segments::check_segment_id(&mut v, "id", &request.id);
        let page = request.page.unwrap_or_default();
        let limit = v.page_limit(page.limit);
        v.finish()?;
        let (ids, more) = segments::members(
            self.db.conn(),
            &ctx.tenant_id,
            &request.id,
            limit,
            &page.starting_after,
        )
        .await?;
        let last = ids.last().cloned();
        Ok(Response::new(pb::ListSegmentMembersResponse {
            customer_ids: ids,
            page: page_response(more, last.as_deref()),
        }))
    }

    async fn get_customer_segments(
        &self,
        request: Request<pb::GetCustomerSegmentsRequest>,
    ) -> Result<Response<pb::GetCustomerSegmentsResponse>, Status> {
        let ctx = context_of(&request)?;
        let customer = request.into_inner().customer_id;
        let mut v = Violations::new();
        check_customer_id(&mut v, "customer_id", &customer);
        v.finish()?;
        let conn = self.db.conn();
        let now = now_micros();
        let settings = facts::settings(conn, &ctx.tenant_id).await?;
        let facts = facts::load(conn, &ctx, &customer, now).await?;
        let (ids, cached) = self
            .segments
            .membership(&ctx, &facts, now, &settings)
            .await?;
        Ok(Response::new(pb::GetCustomerSegmentsResponse {
            segment_ids: ids.into_iter().collect(),
            cached,
            facts_version: facts.facts_version,
        }))
    }

    async fn sync_catalog_codes(
        &self,
        request: Request<pb::SyncCatalogCodesRequest>,
    ) -> Result<Response<pb::SyncCatalogCodesResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&["system"])?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.codes.len() > 5_000 || request.switches.len() > 1_000 {
            v.add("codes", "at most 5000 codes and 1000 switches a call");
        }
        for (i, c) in request.codes.iter().enumerate() {
            if c.code.is_empty()
                || c.code.len() > 64
                || c.code != pool_codes::core::normalize(&c.code)
            {
                v.add(
                    format!("codes.{i}.code"),
                    "must be 1 to 64 characters, upper case",
                );
            }
            if c.pool_id.is_empty() || c.pool_id.len() > 128 {
                v.add(format!("codes.{i}.pool_id"), "must be 1 to 128 characters");
            }
            if c.rev < 1 {
                v.add(format!("codes.{i}.rev"), "must be positive");
            }
        }
        for (i, s) in request.switches.iter().enumerate() {
            if s.kind() == pb::CatalogSwitchKind::Unspecified {
                v.add(format!("switches.{i}.kind"), "must be POOL or REWARD");
            }
            if s.id.is_empty() || s.id.len() > 128 {
                v.add(format!("switches.{i}.id"), "must be 1 to 128 characters");
            }
        }
        v.finish()?;
        let response = pool_codes::sync(&self.db, &ctx.tenant_id, &request).await?;
        Ok(Response::new(response))
    }

    async fn put_campaign(
        &self,
        request: Request<pb::PutCampaignRequest>,
    ) -> Result<Response<pb::PutCampaignResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let conn = self.db.conn();
        let attributes = facts::attributes(conn, &ctx.tenant_id).await?;
        let known = self.segments.set(&ctx.tenant_id).await?;
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        match &request.campaign {
            // A snapshot from the scheduler was checked there; a segment deleted since only
            // means nobody is in it. One that switches the campaign off is stored even if it
            // no longer compiles (a stored campaign that does not compile is not applied):
            // a kill must never be refused.
            Some(c) if request.source_version > 0 => {
                let mut checks = Violations::new();
                let off = c.status() != pb::CampaignStatus::Active;
                let v = if off { &mut checks } else { &mut v };
                campaigns::compile(v, c, 0, &attributes, None, now_micros());
            }
            Some(c) => {
                campaigns::compile(&mut v, c, 0, &attributes, Some(&known.ids), now_micros());
            }
            None => v.add("campaign", "is required"),
        }
        if request.source_version < 0 {
            v.add("source_version", "must not be negative");
        }
        v.finish()?;
        let (campaign, tenant) = (
            request.campaign.clone().unwrap_or_default(),
            ctx.tenant_id.clone(),
        );
        if request.source_version == 0 || request.validate_only {
            campaigns::check_budget_not_below_usage(conn, &tenant, &campaign).await?;
        }
        if request.validate_only {
            let version = campaigns::feed_version(conn, &tenant).await?;
            return Ok(Response::new(pb::PutCampaignResponse {
                version,
                applied: false,
            }));
        }
        let source_version = request.source_version;
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.PutCampaign",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        match campaigns::put(txn, &tenant, &campaign, source_version).await? {
                            Some(version) => Ok(pb::PutCampaignResponse {
                                version,
                                applied: true,
                            }),
                            None => Ok(pb::PutCampaignResponse {
                                version: campaigns::feed_version(txn, &tenant).await?,
                                applied: false,
                            }),
                        }
                    })
                },
            )
            .await?;
        self.campaigns.forget(&ctx.tenant_id);
        Ok(Response::new(response))
    }

    async fn remove_campaign(
        &self,
        request: Request<pb::RemoveCampaignRequest>,
    ) -> Result<Response<pb::RemoveCampaignResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_campaign_id(&mut v, &request.id);
        v.finish()?;
        let (id, tenant) = (request.id.clone(), ctx.tenant_id.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "eligibility.RemoveCampaign",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let version = campaigns::remove(txn, &tenant, &id).await?;
                        Ok(pb::RemoveCampaignResponse { version })
                    })
                },
            )
            .await?;
        self.campaigns.forget(&ctx.tenant_id);
        Ok(Response::new(response))
    }

    async fn qualify(
        &self,
        request: Request<pb::QualifyRequest>,
    ) -> Result<Response<pb::QualifyResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let conn = self.db.conn();
        let tenant = ctx.tenant_id.as_str();
        let settings = facts::settings(conn, tenant).await?;
        let mut v = Violations::new();
        check_customer_id(&mut v, "customer_id", &request.customer_id);
        let cart = qualify::check_cart(&mut v, "cart", request.cart.as_ref(), &settings);
        if request.codes.len() > 20 {
            v.add("codes", "must hold at most 20 codes");
        }
        if let Some(event) = &request.event {
            let schema = facts::event_schema(conn, tenant, &event.r#type).await?;
            facts::check_event(&mut v, "event", Some(event), schema.as_ref(), false);
        }
        if request.program_id.len() > 64 {
            v.add("program_id", "must be at most 64 characters");
        }
        v.finish()?;
        let now = now_micros();
        let facts = facts::load(conn, &ctx, &request.customer_id, now).await?;
        let (segments, cached) = self
            .segments
            .membership(&ctx, &facts, now, &settings)
            .await?;
        let index = self.campaigns.index(tenant).await?;
        let keys = campaigns::cart_keys(&cart);
        let segment_set: campaigns::FastSet = segments.iter().cloned().collect();
        let event_type = request.event.as_ref().map(|e| e.r#type.as_str());
        let mut candidates = index.candidates(&segment_set, &keys, &request.codes, event_type);
        let pooled = pool_codes::usable(
            &self.db,
            tenant,
            &index,
            &request.codes,
            &request.customer_id,
            now,
        )
        .await?;
        for p in &pooled {
            candidates.extend_from_slice(index.pool_owners(&p.pool_id));
        }
        candidates.sort_unstable();
        candidates.dedup();
        let customer = (request.customer_id.as_str(), now, &settings);
        let usage = qualify::usage_for(conn, tenant, &index, &candidates, customer).await?;
        let tier = if !request.program_id.is_empty() && qualify::reads_tier(&index, &candidates) {
            self.tier(&ctx, &request.customer_id, &request.program_id)
                .await
        } else {
            None
        };
        let currency = request
            .cart
            .as_ref()
            .map(|c| c.currency.as_str())
            .unwrap_or_default();
        let input = Input {
            facts: &facts,
            segments: &segments,
            cart: &cart,
            currency,
            codes: &request.codes,
            pool_codes: &pooled,
            event: request.event.as_ref(),
            tier: tier.as_deref(),
            now,
            settings: &settings,
        };
        let explain = match request.explain() {
            pb::Explain::Counts => pb::Explain::Counts,
            _ => pb::Explain::All,
        };
        let mut response = qualify::qualify(&index, &candidates, &input, &usage, explain);
        response.segments_cached = cached;
        Ok(Response::new(response))
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let ctx = context_of(&request)?;
        Ok(Response::new(
            self.do_validate(&ctx, request.into_inner()).await?,
        ))
    }

    async fn redeem(
        &self,
        request: Request<pb::RedeemRequest>,
    ) -> Result<Response<pb::RedeemResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let checkout = request.checkout.as_ref();
        let (settings, cart) = self
            .check_checkout(&ctx, Some(&request.idempotency_key), checkout, |_| {})
            .await?;
        let call = CheckoutCall {
            scope: "eligibility.Redeem",
            key: &request.idempotency_key,
            request: &request,
            checkout,
            hold: None,
        };
        let redemption = self.commit_checkout(&ctx, call, settings, cart).await?;
        Ok(Response::new(pb::RedeemResponse {
            redemption: Some(redemption),
        }))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let checkout = request.checkout.as_ref();
        let hold = match request.hold_seconds {
            0 => crate::checkout::commit::DEFAULT_HOLD_SECONDS,
            s => s,
        };
        let (settings, cart) = self
            .check_checkout(&ctx, Some(&request.idempotency_key), checkout, |v| {
                if hold > 3600 {
                    v.add("hold_seconds", "must be 1 to 3600");
                }
            })
            .await?;
        let call = CheckoutCall {
            scope: "eligibility.Reserve",
            key: &request.idempotency_key,
            request: &request,
            checkout,
            hold: Some(hold),
        };
        let redemption = self.commit_checkout(&ctx, call, settings, cart).await?;
        Ok(Response::new(pb::ReserveResponse {
            redemption: Some(redemption),
        }))
    }

    async fn confirm(
        &self,
        request: Request<pb::ConfirmRequest>,
    ) -> Result<Response<pb::ConfirmResponse>, Status> {
        let ctx = context_of(&request)?;
        Ok(Response::new(
            self.do_confirm(&ctx, request.into_inner()).await?,
        ))
    }

    async fn rollback_redemption(
        &self,
        request: Request<pb::RollbackRedemptionRequest>,
    ) -> Result<Response<pb::RollbackRedemptionResponse>, Status> {
        let ctx = context_of(&request)?;
        Ok(Response::new(
            self.do_rollback(&ctx, request.into_inner()).await?,
        ))
    }

    async fn get_redemption(
        &self,
        request: Request<pb::GetRedemptionRequest>,
    ) -> Result<Response<pb::GetRedemptionResponse>, Status> {
        let ctx = context_of(&request)?;
        Ok(Response::new(
            self.do_get_redemption(&ctx, request.into_inner()).await?,
        ))
    }
}
