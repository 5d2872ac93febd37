//! Checkout: Validate, Redeem, Reserve, Confirm and Rollback as use cases. A checkout is
//! planned without storage ([`plan`]), committed in one transaction ([`commit`]), later
//! confirmed, rolled back or expired ([`lifecycle`]), behind a brute-force guard
//! ([`guard`]).

pub(crate) mod commit;
pub(crate) mod guard;
pub(crate) mod lifecycle;
pub(crate) mod plan;

use std::collections::HashMap;

use tessera_effects::Cart;
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::api::check_idempotency_key;
use tessera_store::now_micros;
use tonic::Status;

use self::commit::Commit;
use crate::app::Eligibility;
use crate::facts::{self, Settings};
use crate::qualify::{self, Input};
use crate::spends;
use crate::{campaigns, pool_codes};

/// Who a failed code attempt counts against: the customer and the calling principal.
fn subjects(ctx: &RequestContext, checkout: &pb::Checkout) -> Vec<String> {
    let mut out = vec![format!("customer:{}", checkout.customer_id)];
    if !ctx.principal.is_empty() {
        out.push(format!("principal:{}", ctx.principal));
    }
    out
}

/// What a Redeem or Reserve call carries.
pub struct CheckoutCall<'a, Req> {
    pub scope: &'static str,
    pub key: &'a str,
    pub request: &'a Req,
    pub checkout: Option<&'a pb::Checkout>,
    /// Reservation hold, seconds.
    pub hold: Option<u32>,
}

impl Eligibility {
    /// Checks a checkout: the tenant's settings and the engine's cart.
    pub async fn check_checkout(
        &self,
        ctx: &RequestContext,
        key: Option<&str>,
        checkout: Option<&pb::Checkout>,
        extra: impl FnOnce(&mut Violations),
    ) -> Result<(Settings, Cart), Status> {
        let settings = facts::settings(self.db.conn(), &ctx.tenant_id).await?;
        let mut v = Violations::new();
        if let Some(key) = key {
            check_idempotency_key(&mut v, key);
        }
        let cart = plan::check_checkout(&mut v, checkout, &settings);
        extra(&mut v);
        v.finish()?;
        Ok((settings, cart))
    }

    /// Plans a checkout on the current facts, segments and campaigns (the index at the
    /// feed's current version when `current`: a kill switch lands on the next redemption).
    pub async fn plan(
        &self,
        ctx: &RequestContext,
        checkout: &pb::Checkout,
        cart: &Cart,
        settings: &Settings,
        now: i64,
        current: bool,
    ) -> Result<plan::Plan, Error> {
        let conn = self.db.conn();
        let tenant = ctx.tenant_id.as_str();
        if !checkout.codes.is_empty() {
            guard::check_attempts(conn, tenant, &subjects(ctx, checkout), now).await?;
        }
        let facts = facts::load(conn, ctx, &checkout.customer_id, now).await?;
        let (segments, _) = self.segments.membership(ctx, &facts, now, settings).await?;
        let index = if current {
            self.campaigns.current(tenant).await?
        } else {
            self.campaigns.index(tenant).await?
        };
        let segment_set: campaigns::FastSet = segments.iter().cloned().collect();
        let keys = campaigns::cart_keys(cart);
        let customer = checkout.customer_id.as_str();
        let pooled =
            pool_codes::resolve(&self.db, tenant, &index, &checkout.codes, customer, now).await?;
        let (candidates, unlocked) = plan::candidates(&index, checkout, &pooled, || {
            index.candidates(&segment_set, &keys, &[], None)
        })?;
        // What the wallet holds for the incentives that spend from it: the programme's
        // points, the value of the gift cards entered.
        let spends_points = !checkout.program_id.is_empty()
            && candidates
                .iter()
                .any(|&i| index.campaigns[i as usize].spends_points());
        let cards = unlocked
            .iter()
            .any(|(&i, _)| index.campaigns[i as usize].is_gift_card());
        let mut card_balances = HashMap::new();
        let with_points;
        let mut cart = cart;
        if spends_points || cards {
            let held = spends::balances(
                &self.wallet,
                ctx,
                &checkout.customer_id,
                &checkout.program_id,
            )
            .await?;
            if spends_points {
                let points_balance = if cart.points_balance > 0 {
                    cart.points_balance.min(held.points)
                } else {
                    held.points
                };
                with_points = Cart {
                    points_balance,
                    ..cart.clone()
                };
                cart = &with_points;
            }
            card_balances = held.cards;
        }
        let customer = (checkout.customer_id.as_str(), now, settings);
        let usage = qualify::usage_for(conn, tenant, &index, &candidates, customer).await?;
        let tier = if !checkout.program_id.is_empty() && qualify::reads_tier(&index, &candidates) {
            self.tier(ctx, &checkout.customer_id, &checkout.program_id)
                .await
        } else {
            None
        };
        let currency = checkout
            .cart
            .as_ref()
            .map(|c| c.currency.as_str())
            .unwrap_or_default();
        let input = Input {
            facts: &facts,
            segments: &segments,
            cart,
            currency,
            codes: &checkout.codes,
            pool_codes: &pooled,
            event: None,
            tier: tier.as_deref(),
            now,
            settings,
        };
        plan::plan(
            &index,
            &candidates,
            &unlocked,
            !checkout.campaign_ids.is_empty(),
            &input,
            &usage,
            &card_balances,
        )
    }

    /// Redeem or Reserve: plans on current data and commits under the key (a deterministic
    /// planning failure is stored for replays too). A refused code counts
    /// as a failed attempt; every refusal leaves a `redemption.failed` event.
    pub async fn commit_checkout<Req: prost::Message>(
        &self,
        ctx: &RequestContext,
        call: CheckoutCall<'_, Req>,
        settings: Settings,
        cart: Cart,
    ) -> Result<pb::Redemption, Status> {
        let CheckoutCall {
            scope,
            key,
            request,
            checkout,
            hold,
        } = call;
        let checkout = checkout.cloned().unwrap_or_default();
        // Planned before the key is claimed (reads outside the write transaction); a replay
        // never uses the plan: the claim finds the key settled and returns what it stored.
        let now = now_micros();
        let plan = self.plan(ctx, &checkout, &cart, &settings, now, true).await;
        let tenant = ctx.tenant_id.clone();
        let job = checkout.clone();
        let holder = spends::Holder {
            wallet: self.wallet.clone(),
            holds: self.holds.clone(),
            ctx: ctx.clone(),
        };
        // What the plan spends from the wallet is held before the transaction begins, so no
        // database connection waits on the wallet; holds the redemption does not end up with
        // (a replay, a refusal, an order redeemed already) are released below.
        let id = uuid::Uuid::now_v7().to_string();
        let deadline = commit::deadline(now, hold);
        let held = match &plan {
            Ok(p) => {
                let wanted = plan::of_plan(p, &checkout.program_id);
                spends::hold(&holder, &id, &checkout.customer_id, wanted, deadline).await
            }
            Err(_) => Ok(Vec::new()),
        };
        let mine = held.clone().unwrap_or_default();
        let inner = holder.clone();
        let outcome = self
            .idempotency
            .run(ctx, scope, key, request, move |txn| {
                Box::pin(async move {
                    let plan = plan?;
                    let held = held?;
                    let commit = Commit {
                        tenant: &tenant,
                        checkout: &job,
                        cart: &cart,
                        input_settings: &settings,
                        now,
                        hold,
                        id: &id,
                        holder: &inner,
                        held: &held,
                    };
                    commit::commit(txn, commit, plan).await
                })
            })
            .await;
        if !mine.is_empty() {
            let kept = outcome.as_ref().map(|r| r.spends.as_slice()).unwrap_or(&[]);
            let unused: Vec<_> = mine
                .into_iter()
                .filter(|s| !kept.iter().any(|k| k.hold_id == s.hold_id))
                .collect();
            spends::release_now(&holder, &unused).await;
        }
        match outcome {
            Ok(r) => {
                self.facts_changed(&ctx.tenant_id, &checkout.customer_id)
                    .await;
                Ok(r)
            }
            Err(err) => {
                if matches!(err.code, Code::NotFound | Code::FailedPrecondition)
                    && err.reason.as_deref() != Some("IDEMPOTENCY_KEY_REUSED")
                {
                    let subjects = subjects(ctx, &checkout);
                    if let Err(e) = guard::record_failure(
                        &self.db,
                        &ctx.tenant_id,
                        &subjects,
                        &checkout,
                        &err,
                        now,
                    )
                    .await
                    {
                        tracing::warn!(error = %e, "could not record a failed redemption");
                    }
                }
                Err(err.to_status())
            }
        }
    }

    pub async fn do_validate(
        &self,
        ctx: &RequestContext,
        request: pb::ValidateRequest,
    ) -> Result<pb::ValidateResponse, Status> {
        let checkout = request.checkout.as_ref();
        let (settings, cart) = self.check_checkout(ctx, None, checkout, |_| {}).await?;
        let checkout = checkout.cloned().unwrap_or_default();
        let plan = self
            .plan(ctx, &checkout, &cart, &settings, now_micros(), false)
            .await?;
        let order_value = cart.lines.iter().map(tessera_effects::Line::total).sum();
        Ok(pb::ValidateResponse {
            redemption: Some(plan::redemption(&plan, &checkout, order_value)),
        })
    }

    pub async fn do_confirm(
        &self,
        ctx: &RequestContext,
        request: pb::ConfirmRequest,
    ) -> Result<pb::ConfirmResponse, Status> {
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_redemption_id(&mut v, &request.redemption_id);
        v.finish()?;
        let (tenant, id) = (ctx.tenant_id.clone(), request.redemption_id.clone());
        let redemption = self
            .idempotency
            .run(
                ctx,
                "eligibility.Confirm",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let r = lifecycle::confirm(txn, &tenant, &id, now_micros()).await?;
                        Ok(pb::ConfirmResponse {
                            redemption: Some(r),
                        })
                    })
                },
            )
            .await?;
        if let Some(r) = &redemption.redemption {
            self.settle_spends(r).await;
        }
        Ok(redemption)
    }

    pub async fn do_rollback(
        &self,
        ctx: &RequestContext,
        request: pb::RollbackRedemptionRequest,
    ) -> Result<pb::RollbackRedemptionResponse, Status> {
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_redemption_id(&mut v, &request.redemption_id);
        if request.reason.trim().is_empty() || request.reason.len() > 500 {
            v.add("reason", "must be 1 to 500 characters");
        }
        if request.lines.len() > 500 {
            v.add("lines", "must hold at most 500 lines");
        }
        v.finish()?;
        let tenant = ctx.tenant_id.clone();
        let req = request.clone();
        let response = self
            .idempotency
            .run(
                ctx,
                "eligibility.RollbackRedemption",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let id = &req.redemption_id;
                        let (r, counted) = commit::load(txn, &tenant, id, true)
                            .await?
                            .ok_or_else(|| Error::not_found(format!("redemption `{id}`")))?;
                        let status = r.status();
                        if !matches!(
                            status,
                            pb::RedemptionStatus::Redeemed | pb::RedemptionStatus::Reserved
                        ) {
                            return Err(Error::new(
                                Code::FailedPrecondition,
                                format!("redemption `{id}` is {}", commit::status_name(status)),
                            )
                            .with_reason("NOT_ROLLBACKABLE"));
                        }
                        let returned = if req.lines.is_empty() {
                            None
                        } else {
                            if status == pb::RedemptionStatus::Reserved {
                                return Err(Error::invalid_field(
                                    "lines",
                                    "a reservation is released whole: leave lines empty",
                                ));
                            }
                            let mut v = Violations::new();
                            let merged = lifecycle::check_returns(&mut v, &req.lines, &r, &counted);
                            v.finish()?;
                            Some(merged)
                        };
                        let r = lifecycle::rollback(
                            txn,
                            &tenant,
                            r,
                            counted,
                            returned,
                            pb::RedemptionStatus::RolledBack,
                            &req.reason,
                        )
                        .await?;
                        Ok(pb::RollbackRedemptionResponse {
                            redemption: Some(r),
                        })
                    })
                },
            )
            .await?;
        if let Some(r) = &response.redemption {
            self.facts_changed(&ctx.tenant_id, &r.customer_id).await;
            self.settle_spends(r).await;
        }
        Ok(response)
    }

    pub async fn do_get_redemption(
        &self,
        ctx: &RequestContext,
        request: pb::GetRedemptionRequest,
    ) -> Result<pb::GetRedemptionResponse, Status> {
        let mut v = Violations::new();
        check_redemption_id(&mut v, &request.redemption_id);
        v.finish()?;
        let (r, _) = commit::load(
            self.db.conn(),
            &ctx.tenant_id,
            &request.redemption_id,
            false,
        )
        .await?
        .ok_or_else(|| Error::not_found(format!("redemption `{}`", request.redemption_id)))?;
        Ok(pb::GetRedemptionResponse {
            redemption: Some(r),
        })
    }
}

impl Eligibility {
    /// Delivers at once what a redemption's wallet spends wait for (capture, release,
    /// refund), so the wallet shows it when the call returns; the command worker retries
    /// what does not go through here.
    async fn settle_spends(&self, r: &pb::Redemption) {
        if r.spends.is_empty() {
            return;
        }
        // In a task of its own: a pass cut off by the wait would leave what it claimed
        // leased (out of reach) until its lease ends.
        let commands = self.commands.clone();
        let pass = tokio::spawn(async move { commands.run_once().await });
        match tokio::time::timeout(DELIVER_WAIT, pass).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, redemption = %r.id, "wallet spends wait for the wallet");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "a delivery pass failed"),
            Err(_) => {
                tracing::info!(redemption = %r.id, "wallet spends left to the command worker")
            }
        }
    }
}

/// How long a confirmation or a rollback waits for its wallet follow-ups.
const DELIVER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn check_redemption_id(v: &mut Violations, id: &str) {
    if id.is_empty() || id.len() > 64 {
        v.add("redemption_id", "must be 1 to 64 characters");
    }
}
