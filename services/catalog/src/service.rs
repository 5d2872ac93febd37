//! gRPC handlers: read the request context, validate the whole request (all field
//! violations at once), then run the change under its idempotency key, in one transaction
//! with its outbox event.

use std::pin::Pin;

use futures::Stream;
use tessera_effects::{Application, wire};
use tessera_proto::catalog::v1::{self as pb, catalog_service_server::CatalogService};
use tessera_runtime::Error;
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_store::api::{self, check_customer_id, check_id, check_idempotency_key, page_response};
use tessera_store::idempotency::Idempotency;
use tessera_store::{Db, now_micros};
use tonic::{Request, Response, Status, Streaming};

use crate::jobs;
use crate::publications::{self, Publish};
use crate::{codes, rewards};
use crate::{pattern, policy};

pub struct Catalog {
    pub db: Db,
    pub idempotency: Idempotency,
}

/// A channel name: 1 to 64 of a-z, 0-9, `_`, `-`.
fn check_channel(v: &mut Violations, field: &str, channel: &str, required: bool) {
    if channel.is_empty() {
        if required {
            v.add(field, "is required");
        }
    } else if channel.len() > 64
        || !channel
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        v.add(field, "must be 1 to 64 of a-z, 0-9, _ and -");
    }
}

fn check_code(v: &mut Violations, field: &str, code: &str) {
    if !pattern::is_code(&pattern::normalize(code)) {
        v.add(field, "must be 1 to 64 of A-Z, 0-9, - and _");
    }
}

fn reward_status(v: &mut Violations, status: i32, filter: bool) -> Option<&'static str> {
    match pb::RewardStatus::try_from(status) {
        Ok(pb::RewardStatus::Active) => Some(rewards::ACTIVE),
        Ok(pb::RewardStatus::Disabled) => Some(rewards::DISABLED),
        Ok(pb::RewardStatus::Unspecified) if filter => None,
        _ => {
            v.add("status", "must be ACTIVE or DISABLED");
            None
        }
    }
}

/// The rewards of a preview as engine applications, and the ones that cannot apply.
fn applications(
    stored: Vec<pb::Reward>,
    inline: Vec<(String, i32, tessera_effects::Effect)>,
    currency: &str,
) -> (Vec<Application>, Vec<pb::Skipped>) {
    let now = now_micros();
    let mut apps = Vec::new();
    let mut skipped = Vec::new();
    for reward in stored {
        let definition = reward.definition.clone().unwrap_or_default();
        let refused = if let Err((_, message)) = rewards::usable(&reward, now) {
            Some(message)
        } else if definition.currency != currency {
            Some(format!(
                "the reward is in {}, the cart in {currency}",
                definition.currency
            ))
        } else {
            None
        };
        let effect = wire::effect(&mut Violations::new(), "effect", definition.effect.as_ref());
        match (refused, effect) {
            (None, Some(effect)) => apps.push(Application {
                reward_id: reward.id,
                priority: definition.priority,
                effect,
            }),
            (refused, _) => skipped.push(pb::Skipped {
                reward_id: reward.id,
                reason: refused.unwrap_or_else(|| "its stored effect is no longer valid".into()),
            }),
        }
    }
    apps.extend(
        inline
            .into_iter()
            .map(|(reward_id, priority, effect)| Application {
                reward_id,
                priority,
                effect,
            }),
    );
    (apps, skipped)
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportCodesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CatalogService for Catalog {
    async fn create_reward(
        &self,
        request: Request<pb::CreateRewardRequest>,
    ) -> Result<Response<pb::CreateRewardResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        let checked = rewards::check(&mut v, "reward", request.reward.as_ref(), now_micros());
        v.finish()?;
        policy::check_author(
            self.db.conn(),
            &ctx,
            "reward.effect",
            effect_of(&request.reward),
        )
        .await?;
        let (kind, starts_at, ends_at) = checked.ok_or_else(|| Status::internal("unchecked"))?;
        let (input, work_ctx) = (request.reward.clone().unwrap_or_default(), ctx.clone());
        let reward = self
            .idempotency
            .run(
                &ctx,
                "catalog.CreateReward",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let reward =
                            rewards::create(txn, &work_ctx, input, kind, starts_at, ends_at)
                                .await?;
                        Ok(pb::CreateRewardResponse {
                            reward: Some(reward),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(reward))
    }

    async fn update_reward(
        &self,
        request: Request<pb::UpdateRewardRequest>,
    ) -> Result<Response<pb::UpdateRewardResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "id", &request.id);
        let checked = rewards::check(&mut v, "reward", request.reward.as_ref(), now_micros());
        if request.expected_version < 0 {
            v.add("expected_version", "must be 0 (any) or a version");
        }
        v.finish()?;
        policy::check_author(
            self.db.conn(),
            &ctx,
            "reward.effect",
            effect_of(&request.reward),
        )
        .await?;
        let checked = checked.ok_or_else(|| Status::internal("unchecked"))?;
        let (input, work_ctx) = (request.reward.clone().unwrap_or_default(), ctx.clone());
        let (id, expected) = (request.id.clone(), request.expected_version);
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.UpdateReward",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let reward =
                            rewards::update(txn, &work_ctx, &id, input, checked, expected).await?;
                        Ok(pb::UpdateRewardResponse {
                            reward: Some(reward),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_reward(
        &self,
        request: Request<pb::GetRewardRequest>,
    ) -> Result<Response<pb::GetRewardResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        check_id(&mut v, "id", &id);
        v.finish()?;
        let reward = rewards::get(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetRewardResponse {
            reward: Some(reward),
        }))
    }

    async fn list_rewards(
        &self,
        request: Request<pb::ListRewardsRequest>,
    ) -> Result<Response<pb::ListRewardsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let (limit, starting_after) = api::page(&mut v, request.page);
        let status = reward_status(&mut v, request.status, true);
        if !(request.effect_kind.is_empty() || wire::KINDS.contains(&request.effect_kind.as_str()))
        {
            v.add(
                "effect_kind",
                format!("must be one of {}", wire::KINDS.join(", ")),
            );
        }
        v.finish()?;
        let filter = rewards::Filter {
            status,
            effect_kind: request.effect_kind,
            starting_after,
            limit,
        };
        let (rewards, has_more) = rewards::list(self.db.conn(), &ctx.tenant_id, &filter).await?;
        let page = page_response(has_more, rewards.last().map(|r| r.id.as_str()));
        Ok(Response::new(pb::ListRewardsResponse { rewards, page }))
    }

    async fn set_reward_status(
        &self,
        request: Request<pb::SetRewardStatusRequest>,
    ) -> Result<Response<pb::SetRewardStatusResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "id", &request.id);
        let status = reward_status(&mut v, request.status, false);
        if request.reason.chars().count() > 500 {
            v.add("reason", "must be at most 500 characters");
        }
        v.finish()?;
        let status = status.ok_or_else(|| Status::internal("unchecked"))?;
        let (id, reason, work_ctx) = (request.id.clone(), request.reason.clone(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.SetRewardStatus",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let reward =
                            rewards::set_status(txn, &work_ctx, &id, status, &reason).await?;
                        Ok(pb::SetRewardStatusResponse {
                            reward: Some(reward),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn preview_effects(
        &self,
        request: Request<pb::PreviewEffectsRequest>,
    ) -> Result<Response<pb::PreviewEffectsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        if request.reward_ids.is_empty() && request.effects.is_empty() {
            v.add("reward_ids", "or effects must name at least one reward");
        }
        if request.reward_ids.len() + request.effects.len() > 100 {
            v.add("reward_ids", "and effects must be at most 100 together");
        }
        for (i, id) in request.reward_ids.iter().enumerate() {
            check_id(&mut v, &format!("reward_ids.{i}"), id);
        }
        let mut inline = Vec::new();
        for (i, e) in request.effects.iter().enumerate() {
            if e.label.is_empty() || e.label.len() > 64 {
                v.add(format!("effects.{i}.label"), "must be 1 to 64 characters");
            }
            if let Some(effect) =
                wire::effect(&mut v, &format!("effects.{i}.effect"), e.effect.as_ref())
            {
                inline.push((e.label.clone(), e.priority, effect));
            }
        }
        let cart = wire::cart(&mut v, "cart", request.cart.as_ref());
        let currency = request
            .cart
            .as_ref()
            .map(|c| c.currency.clone())
            .unwrap_or_default();
        if request.cart.is_some()
            && (currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()))
        {
            v.add(
                "cart.currency",
                "must be an ISO 4217 code in upper case, e.g. EUR",
            );
        }
        v.finish()?;
        let stored = rewards::get_many(self.db.conn(), &ctx.tenant_id, &request.reward_ids).await?;
        if let Some(missing) = request
            .reward_ids
            .iter()
            .find(|id| !stored.iter().any(|r| &r.id == *id))
        {
            return Err(Error::not_found(format!("reward `{missing}`")).into());
        }
        let (apps, skipped) = applications(stored, inline, &currency);
        let mut outcome = wire::outcome(tessera_effects::apply(&apps, &cart));
        outcome.skipped.splice(0..0, skipped);
        Ok(Response::new(pb::PreviewEffectsResponse {
            outcome: Some(outcome),
        }))
    }

    async fn create_code_pool(
        &self,
        request: Request<pb::CreateCodePoolRequest>,
    ) -> Result<Response<pb::CreateCodePoolResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        codes::check_pool(&mut v, request.pool.as_ref());
        v.finish()?;
        let (input, work_ctx) = (request.pool.clone().unwrap_or_default(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.CreateCodePool",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let pool = codes::create_pool(txn, &work_ctx, input).await?;
                        Ok(pb::CreateCodePoolResponse { pool: Some(pool) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn update_code_pool(
        &self,
        request: Request<pb::UpdateCodePoolRequest>,
    ) -> Result<Response<pb::UpdateCodePoolResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "id", &request.id);
        codes::check_pool(&mut v, request.pool.as_ref());
        v.finish()?;
        let (id, input, work_ctx) = (
            request.id.clone(),
            request.pool.clone().unwrap_or_default(),
            ctx.clone(),
        );
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.UpdateCodePool",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let pool = codes::update_pool(txn, &work_ctx, &id, input).await?;
                        Ok(pb::UpdateCodePoolResponse { pool: Some(pool) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_code_pool(
        &self,
        request: Request<pb::GetCodePoolRequest>,
    ) -> Result<Response<pb::GetCodePoolResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        check_id(&mut v, "id", &id);
        v.finish()?;
        let pool = codes::get_pool(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetCodePoolResponse { pool: Some(pool) }))
    }

    async fn list_code_pools(
        &self,
        request: Request<pb::ListCodePoolsRequest>,
    ) -> Result<Response<pb::ListCodePoolsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let (limit, starting_after) = api::page(&mut v, request.page);
        if !request.reward_id.is_empty() {
            check_id(&mut v, "reward_id", &request.reward_id);
        }
        v.finish()?;
        let (pools, has_more) = codes::list_pools(
            self.db.conn(),
            &ctx.tenant_id,
            &request.reward_id,
            &starting_after,
            limit,
        )
        .await?;
        let page = page_response(has_more, pools.last().map(|p| p.id.as_str()));
        Ok(Response::new(pb::ListCodePoolsResponse { pools, page }))
    }

    async fn set_code_pool_status(
        &self,
        request: Request<pb::SetCodePoolStatusRequest>,
    ) -> Result<Response<pb::SetCodePoolStatusResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "id", &request.id);
        let status = match pb::PoolStatus::try_from(request.status) {
            Ok(pb::PoolStatus::Active) => codes::ACTIVE,
            Ok(pb::PoolStatus::Disabled) => codes::DISABLED,
            _ => {
                v.add("status", "must be ACTIVE or DISABLED");
                codes::ACTIVE
            }
        };
        v.finish()?;
        let (id, work_ctx) = (request.id.clone(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.SetCodePoolStatus",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let pool = codes::set_pool_status(txn, &work_ctx, &id, status).await?;
                        Ok(pb::SetCodePoolStatusResponse { pool: Some(pool) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn generate_codes(
        &self,
        request: Request<pb::GenerateCodesRequest>,
    ) -> Result<Response<pb::GenerateCodesResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "pool_id", &request.pool_id);
        if !(1..=jobs::MAX_COUNT).contains(&request.count) {
            v.add("count", format!("must be 1 to {}", jobs::MAX_COUNT));
        }
        v.finish()?;
        let (pool_id, count, work_ctx) = (request.pool_id.clone(), request.count, ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.GenerateCodes",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let job = jobs::create(txn, &work_ctx, &pool_id, count).await?;
                        Ok(pb::GenerateCodesResponse { job: Some(job) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_generation_job(
        &self,
        request: Request<pb::GetGenerationJobRequest>,
    ) -> Result<Response<pb::GetGenerationJobResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let mut v = Violations::new();
        check_id(&mut v, "id", &id);
        v.finish()?;
        let job = jobs::get(self.db.conn(), &ctx.tenant_id, &id).await?;
        Ok(Response::new(pb::GetGenerationJobResponse {
            job: Some(job),
        }))
    }

    async fn import_codes(
        &self,
        request: Request<Streaming<pb::ImportCodesRequest>>,
    ) -> Result<Response<pb::ImportCodesResponse>, Status> {
        use pb::import_codes_request::Part;
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|m| m.part) {
            Some(Part::Header(h)) => h,
            _ => return Err(Error::invalid_field("header", "must be the first message").into()),
        };
        let mut csv_bytes = Vec::new();
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(Part::Chunk(chunk)) => {
                    if csv_bytes.len() + chunk.len() > codes::MAX_IMPORT_BYTES {
                        return Err(Error::invalid_field(
                            "chunk",
                            format!("the CSV must be at most {} bytes", codes::MAX_IMPORT_BYTES),
                        )
                        .into());
                    }
                    csv_bytes.extend_from_slice(&chunk);
                }
                _ => return Err(Error::invalid_field("header", "must be sent once, first").into()),
            }
        }
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &header.idempotency_key);
        check_id(&mut v, "header.pool_id", &header.pool_id);
        if csv_bytes.is_empty() {
            v.add("chunk", "no CSV was sent");
        }
        v.finish()?;
        let fingerprint = codes::import_fingerprint(&header, &csv_bytes);
        let (pool_id, partial, work_ctx) =
            (header.pool_id.clone(), header.allow_partial, ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.ImportCodes",
                &header.idempotency_key,
                &fingerprint,
                move |txn| {
                    Box::pin(async move {
                        codes::import(txn, &work_ctx, &pool_id, &csv_bytes, partial).await
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    type ExportCodesStream = ExportStream;

    async fn export_codes(
        &self,
        request: Request<pb::ExportCodesRequest>,
    ) -> Result<Response<Self::ExportCodesStream>, Status> {
        let ctx = context_of(&request)?;
        let pool_id = request.into_inner().pool_id;
        let mut v = Violations::new();
        check_id(&mut v, "pool_id", &pool_id);
        v.finish()?;
        codes::get_pool(self.db.conn(), &ctx.tenant_id, &pool_id).await?;
        let db = self.db.clone();
        // State: the last code sent; `None` once the export is complete.
        let stream = futures::stream::unfold(Some(String::new()), move |after| {
            let (db, tenant, pool_id) = (db.clone(), ctx.tenant_id.clone(), pool_id.clone());
            async move {
                let after = after?;
                match codes::export_page(db.conn(), &tenant, &pool_id, &after).await {
                    Ok((chunk, next)) => Some((Ok(pb::ExportCodesResponse { chunk }), next)),
                    Err(e) => Some((Err(e.into()), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_code(
        &self,
        request: Request<pb::GetCodeRequest>,
    ) -> Result<Response<pb::GetCodeResponse>, Status> {
        let ctx = context_of(&request)?;
        let code = request.into_inner().code;
        let mut v = Violations::new();
        check_code(&mut v, "code", &code);
        v.finish()?;
        let code = codes::get_code(self.db.conn(), &ctx.tenant_id, &code, "").await?;
        Ok(Response::new(pb::GetCodeResponse { code: Some(code) }))
    }

    async fn set_code_status(
        &self,
        request: Request<pb::SetCodeStatusRequest>,
    ) -> Result<Response<pb::SetCodeStatusResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::AUTHORS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_code(&mut v, "code", &request.code);
        let disabled = match pb::CodeStatus::try_from(request.status) {
            Ok(pb::CodeStatus::Active) => false,
            Ok(pb::CodeStatus::Disabled) => true,
            _ => {
                v.add("status", "must be ACTIVE or DISABLED");
                false
            }
        };
        v.finish()?;
        let (code, work_ctx) = (request.code.clone(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.SetCodeStatus",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let code = codes::set_code_status(txn, &work_ctx, &code, disabled).await?;
                        Ok(pb::SetCodeStatusResponse { code: Some(code) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn record_code_uses(
        &self,
        request: Request<pb::RecordCodeUsesRequest>,
    ) -> Result<Response<pb::RecordCodeUsesResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&["system"])?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.uses.is_empty() || request.uses.len() > 100 {
            v.add("uses", "must hold 1 to 100 uses");
        }
        for (i, u) in request.uses.iter().enumerate() {
            check_code(&mut v, &format!("uses.{i}.code"), &u.code);
            if u.delta != 1 && u.delta != -1 {
                v.add(format!("uses.{i}.delta"), "must be 1 or -1");
            }
        }
        v.finish()?;
        // An unknown code is refused before the key is claimed, so the refusal is not
        // stored: once the code exists, a replay of the dead-lettered command succeeds.
        for u in &request.uses {
            codes::get_code(self.db.conn(), &ctx.tenant_id, &u.code, "").await?;
        }
        let (uses, tenant) = (request.uses.clone(), ctx.tenant_id.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.RecordCodeUses",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let codes = codes::record_uses(txn, &tenant, &uses).await?;
                        Ok(pb::RecordCodeUsesResponse { codes })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn publish_reward(
        &self,
        request: Request<pb::PublishRewardRequest>,
    ) -> Result<Response<pb::PublishRewardResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::PUBLISHERS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_customer_id(&mut v, "customer_id", &request.customer_id);
        check_channel(&mut v, "channel", &request.channel, false);
        match (
            request.reward_id.is_empty(),
            request.code.is_empty(),
            request.pool_id.is_empty(),
        ) {
            (_, false, false) => v.add("code", "cannot be combined with pool_id"),
            (true, true, true) => v.add("reward_id", "is required (or code, or pool_id)"),
            _ => {}
        }
        if !request.reward_id.is_empty() {
            check_id(&mut v, "reward_id", &request.reward_id);
        }
        if !request.code.is_empty() {
            check_code(&mut v, "code", &request.code);
        }
        if !request.pool_id.is_empty() {
            check_id(&mut v, "pool_id", &request.pool_id);
        }
        v.finish()?;
        policy::check_publisher(self.db.conn(), &ctx, &request).await?;
        let publish = Publish {
            customer_id: request.customer_id.clone(),
            reward_id: request.reward_id.clone(),
            code: request.code.clone(),
            pool_id: request.pool_id.clone(),
            channel: request.channel.clone(),
        };
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.PublishReward",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let publication =
                            publications::publish(txn, &work_ctx, backend, publish).await?;
                        Ok(pb::PublishRewardResponse {
                            publication: Some(publication),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_customer_rewards(
        &self,
        request: Request<pb::ListCustomerRewardsRequest>,
    ) -> Result<Response<pb::ListCustomerRewardsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_customer_id(&mut v, "customer_id", &request.customer_id);
        let (limit, starting_after) = api::page(&mut v, request.page);
        if pb::CustomerRewardStatus::try_from(request.status).is_err() {
            v.add("status", "is not a customer reward status");
        }
        v.finish()?;
        let (rewards, has_more) = publications::list_for_customer(
            self.db.conn(),
            &ctx.tenant_id,
            &request.customer_id,
            request.status,
            &starting_after,
            limit,
        )
        .await?;
        let last = rewards
            .last()
            .and_then(|r| r.publication.as_ref())
            .map(|p| p.id.as_str());
        let page = page_response(has_more, last);
        Ok(Response::new(pb::ListCustomerRewardsResponse {
            rewards,
            page,
        }))
    }

    async fn mark_shown(
        &self,
        request: Request<pb::MarkShownRequest>,
    ) -> Result<Response<pb::MarkShownResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&policy::PUBLISHERS)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "publication_id", &request.publication_id);
        check_channel(&mut v, "channel", &request.channel, true);
        if !request.customer_id.is_empty() {
            check_customer_id(&mut v, "customer_id", &request.customer_id);
        }
        v.finish()?;
        let (id, channel, customer, work_ctx) = (
            request.publication_id.clone(),
            request.channel.clone(),
            request.customer_id.clone(),
            ctx.clone(),
        );
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.MarkShown",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let publication =
                            publications::mark_shown(txn, &work_ctx, &id, &channel, &customer)
                                .await?;
                        Ok(pb::MarkShownResponse {
                            publication: Some(publication),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_access_policy(
        &self,
        request: Request<pb::GetAccessPolicyRequest>,
    ) -> Result<Response<pb::GetAccessPolicyResponse>, Status> {
        let ctx = context_of(&request)?;
        let policy = policy::get(self.db.conn(), &ctx.tenant_id).await?;
        Ok(Response::new(pb::GetAccessPolicyResponse {
            policy: Some(policy),
        }))
    }

    async fn put_access_policy(
        &self,
        request: Request<pb::PutAccessPolicyRequest>,
    ) -> Result<Response<pb::PutAccessPolicyResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&["admin"])?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        policy::check(&mut v, "policy", request.policy.as_ref());
        v.finish()?;
        let (input, work_ctx) = (request.policy.clone().unwrap_or_default(), ctx.clone());
        let response = self
            .idempotency
            .run(
                &ctx,
                "catalog.PutAccessPolicy",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let policy = policy::put(txn, &work_ctx, input, now_micros()).await?;
                        Ok(pb::PutAccessPolicyResponse {
                            policy: Some(policy),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }
}

fn effect_of(reward: &Option<pb::RewardInput>) -> Option<&pb::Effect> {
    reward.as_ref().and_then(|r| r.effect.as_ref())
}
