//! gRPC handlers: read the request context, validate the whole request (all field
//! violations at once), then run the ledger operation under its idempotency key.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tessera_proto::scheduler::v1 as spb;
use tessera_proto::wallet::v1::{self as pb, wallet_service_server::WalletService};
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::api::{self, check_id, check_idempotency_key, page_response};
use tessera_store::idempotency::{Idempotency, derived_key};
use tessera_store::outbox::timestamp_to_micros;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{Db, now_micros};
use tonic::{Request, Response, Status};

use crate::ledger::{self, Asset, Credit, Debit};
use crate::programs::{self, Program};
use crate::{batch, holds, liability, pending, reversal, rules, tiers};

pub struct Wallet {
    pub db: Db,
    pub idempotency: Idempotency,
    pub sweeps: Sweeps,
}

/// Has the campaign scheduler run the wallet's sweeps (points expiry, tier re-evaluation)
/// for every tenant and programme the wallet credits. The first credit of a tenant and
/// programme in this process sends `EnsureWalletSweeps` through the command outbox, in the
/// credit's transaction (the queue retries it; the scheduler makes it idempotent); later
/// credits send nothing.
#[derive(Clone, Default)]
pub struct Sweeps {
    told: Arc<Mutex<HashSet<(String, String)>>>,
}

const ENSURE_SWEEPS: &str = "/tessera.scheduler.v1.SchedulerService/EnsureWalletSweeps";

impl Sweeps {
    /// The programmes of `assets` this process has not told the scheduler about yet.
    fn untold(&self, tenant: &str, assets: &[Asset]) -> Vec<String> {
        let told = self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut programs: Vec<String> = assets
            .iter()
            .map(|a| {
                if a.kind == pb::AssetKind::Points {
                    a.code.clone()
                } else {
                    String::new()
                }
            })
            .filter(|p| !told.contains(&(tenant.to_string(), p.clone())))
            .collect();
        programs.sort();
        programs.dedup();
        programs
    }

    /// Sends the scheduler `programs` in `txn`.
    async fn tell(
        txn: &sea_orm::DatabaseTransaction,
        tenant: &str,
        programs: &[String],
    ) -> Result<(), Error> {
        if programs.is_empty() {
            return Ok(());
        }
        let sent: Vec<Command<spb::EnsureWalletSweepsRequest>> = programs
            .iter()
            .map(|program| {
                let key = derived_key("wallet-sweeps", &[program]);
                Command {
                    path: ENSURE_SWEEPS,
                    key: key.clone(),
                    request: spb::EnsureWalletSweepsRequest {
                        idempotency_key: key,
                        program_id: program.clone(),
                    },
                }
            })
            .collect();
        commands::send(txn, tenant, sent).await?;
        Ok(())
    }

    /// The credit that sent `programs` committed.
    fn told(&self, tenant: &str, programs: Vec<String>) {
        let mut told = self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        told.extend(programs.into_iter().map(|p| (tenant.to_string(), p)));
    }
}

impl Wallet {
    /// The transaction (the credit, or the pending credit) made by the Credit under
    /// idempotency key `key` (given as `field`).
    async fn credit_made_by(
        &self,
        ctx: &RequestContext,
        field: &str,
        key: &str,
    ) -> Result<String, Status> {
        if key.len() > 255 {
            return Err(Error::invalid_field(field, "must be at most 255 characters").into());
        }
        let made = self
            .idempotency
            .stored::<pb::CreditResponse>(&ctx.tenant_id, "wallet.Credit", key)
            .await?;
        match made {
            None => Err(Error::unavailable(format!(
                "no credit was made under key `{key}` yet; retry"
            ))
            .into()),
            Some(Err(refused)) => Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "the credit under key `{key}` was refused: {}",
                    refused.message
                ),
            )
            .with_reason("CREDIT_REFUSED")
            .into()),
            Some(Ok(r)) => Ok(r.transaction.map(|t| t.id).unwrap_or_default()),
        }
    }

    fn validate_credit(request: &pb::CreditRequest) -> Result<Credit, Status> {
        let mut v = Violations::new();
        let asset = check_movement(
            &mut v,
            &request.idempotency_key,
            &request.customer_id,
            request.asset.as_ref(),
        );
        ledger::check_amount(&mut v, "amount", request.amount);
        check_reason(&mut v, "reason", &request.reason, false);
        let now = now_micros();
        let expires_at = request.expires_at.as_ref().map(timestamp_to_micros);
        check_future(&mut v, "expires_at", expires_at, now, None);
        if let Some(pending) = &request.pending {
            let activate_at = pending.activate_at.as_ref().map(timestamp_to_micros);
            check_future(&mut v, "pending.activate_at", activate_at, now, None);
            // A pending credit keeps its final amount; its confirmation earns toward tiers.
            if request.apply_tier_multiplier {
                v.add(
                    "apply_tier_multiplier",
                    "is not supported for pending credits",
                );
            }
            if request.spent_amount != 0 {
                v.add("spent_amount", "is not supported for pending credits");
            }
        }
        let points = asset
            .as_ref()
            .is_some_and(|a| a.kind == pb::AssetKind::Points);
        if request.spent_amount < 0 || request.spent_amount > ledger::MAX_AMOUNT {
            v.add(
                "spent_amount",
                format!("must be 0 to {}", ledger::MAX_AMOUNT),
            );
        } else if request.spent_amount != 0 && !points {
            v.add("spent_amount", "applies to points credits only");
        }
        if request.apply_tier_multiplier && !points {
            v.add("apply_tier_multiplier", "applies to points credits only");
        }
        v.finish()?;
        Ok(Credit {
            movement: ledger::CREDIT,
            customer_id: request.customer_id.clone(),
            asset: asset.ok_or_else(|| Status::internal("asset validated but missing"))?,
            amount: request.amount,
            reason: request.reason.clone(),
            expires_at,
            spent_amount: request.spent_amount,
            apply_tier_multiplier: request.apply_tier_multiplier,
        })
    }

    fn validate_debit(request: &pb::DebitRequest) -> Result<Debit, Status> {
        let mut v = Violations::new();
        let asset = check_movement(
            &mut v,
            &request.idempotency_key,
            &request.customer_id,
            request.asset.as_ref(),
        );
        ledger::check_amount(&mut v, "amount", request.amount);
        check_reason(&mut v, "reason", &request.reason, false);
        v.finish()?;
        Ok(Debit {
            movement: ledger::DEBIT,
            customer_id: request.customer_id.clone(),
            asset: asset.ok_or_else(|| Status::internal("asset validated but missing"))?,
            amount: request.amount,
            reason: request.reason.clone(),
        })
    }
}

/// Transaction kinds, as `ListTransactions` filters them.
const KINDS: [&str; 14] = [
    "credit",
    "debit",
    "adjustment",
    "expiry",
    "hold",
    "release",
    "capture",
    "refund",
    "clawback",
    "transfer_out",
    "transfer_in",
    "pending_credit",
    "pending_cancelled",
    "payout",
];

/// The fields of a pending credit's status change: key, credit id and reason (trimmed).
fn check_credit_change(
    key: &str,
    credit_id: &str,
    reason: &str,
    reason_required: bool,
) -> Result<(String, String), Status> {
    let mut v = Violations::new();
    check_idempotency_key(&mut v, key);
    check_id(&mut v, "credit_id", credit_id);
    let reason = reason.trim();
    check_reason(&mut v, "reason", reason, reason_required);
    v.finish()?;
    Ok((credit_id.to_string(), reason.to_string()))
}

/// The fields every ledger movement has: idempotency key, customer and asset.
fn check_movement(
    v: &mut Violations,
    key: &str,
    customer_id: &str,
    asset: Option<&pb::Asset>,
) -> Option<ledger::Asset> {
    check_idempotency_key(v, key);
    ledger::check_customer_id(v, "customer_id", customer_id);
    ledger::check_asset(v, "asset", asset)
}

/// A batch of 1 to `max` entries.
fn check_batch(v: &mut Violations, field: &str, len: usize, max: usize) {
    if len == 0 || len > max {
        v.add(field, format!("must hold 1 to {max} entries"));
    }
}

/// A hold's customer, asset, amount and reason, and its expiry (default: 7 days), checked
/// under the field names `field` gives.
fn check_hold(
    v: &mut Violations,
    field: &dyn Fn(&str) -> String,
    (customer_id, asset, amount, reason): (&str, Option<&pb::Asset>, i64, &str),
    expires_at: Option<&prost_types::Timestamp>,
    now: i64,
) -> Option<holds::NewHold> {
    ledger::check_customer_id(v, &field("customer_id"), customer_id);
    let asset = ledger::check_asset(v, &field("asset"), asset);
    ledger::check_amount(v, &field("amount"), amount);
    check_reason(v, &field("reason"), reason, false);
    let expires_at = expires_at.map(timestamp_to_micros);
    check_future(
        v,
        &field("expires_at"),
        expires_at,
        now,
        Some(holds::MAX_HOLD_SECS * 1_000_000),
    );
    Some(holds::NewHold {
        customer_id: customer_id.to_string(),
        asset: asset?,
        amount,
        reason: reason.to_string(),
        expires_at: expires_at.unwrap_or(now + holds::DEFAULT_HOLD_SECS * 1_000_000),
    })
}

/// At most 500 characters; `required` also refuses a blank reason.
fn check_reason(v: &mut Violations, field: &str, reason: &str, required: bool) {
    if reason.chars().count() > 500 {
        v.add(field, "must be at most 500 characters");
    } else if required && reason.trim().is_empty() {
        v.add(field, "is required");
    }
}

/// Programme ids: the code of a points asset.
fn check_program_id(v: &mut Violations, id: &str) {
    if !ledger::is_slug(id) {
        v.add(
            "program_id",
            "must be a programme id: 1 to 64 of a-z, 0-9, _ and -",
        );
    }
}

/// A future time, at most `max_ahead` µs ahead when given.
fn check_future(
    v: &mut Violations,
    field: &str,
    at: Option<i64>,
    now: i64,
    max_ahead: Option<i64>,
) {
    match at {
        Some(t) if t <= now => v.add(field, "must be in the future"),
        Some(t) if max_ahead.is_some_and(|m| t > now + m) => {
            v.add(
                field,
                format!(
                    "must be at most {} days ahead",
                    max_ahead.unwrap_or(0) / 86_400_000_000
                ),
            );
        }
        _ => {}
    }
}

#[tonic::async_trait]
impl WalletService for Wallet {
    async fn credit(
        &self,
        request: Request<pb::CreditRequest>,
    ) -> Result<Response<pb::CreditResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let credit = Self::validate_credit(&request)?;
        let asset = credit.asset.clone();
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        // Some(None): pending until confirmed; Some(Some(t)): pending until `t`.
        let activate_at = request
            .pending
            .as_ref()
            .map(|p| p.activate_at.as_ref().map(timestamp_to_micros));
        let untold = self
            .sweeps
            .untold(&ctx.tenant_id, std::slice::from_ref(&asset));
        let tell = untold.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Credit",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        Sweeps::tell(txn, &work_ctx.tenant_id, &tell).await?;
                        match activate_at {
                            Some(activate_at) => {
                                pending::create(txn, &work_ctx, &credit, activate_at).await
                            }
                            None => ledger::credit(txn, &work_ctx, backend, &credit).await,
                        }
                    })
                },
            )
            .await?;
        self.sweeps.told(&ctx.tenant_id, untold);
        Ok(Response::new(response))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        v.finish()?;
        let balances = ledger::balances(
            self.db.conn(),
            &ctx.tenant_id,
            &request.customer_id,
            now_micros(),
        )
        .await?;
        Ok(Response::new(pb::GetBalanceResponse {
            customer_id: request.customer_id,
            balances,
        }))
    }

    async fn debit(
        &self,
        request: Request<pb::DebitRequest>,
    ) -> Result<Response<pb::DebitResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let debit = Self::validate_debit(&request)?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Debit",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move { ledger::debit(txn, &work_ctx, backend, &debit).await })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn expire_due(
        &self,
        request: Request<pb::ExpireDueRequest>,
    ) -> Result<Response<pb::ExpireDueResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        v.finish()?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.ExpireDue",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move { ledger::expire_due(txn, &work_ctx, backend).await })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn upsert_program(
        &self,
        request: Request<pb::UpsertProgramRequest>,
    ) -> Result<Response<pb::UpsertProgramResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        v.finish()?;
        let program = Program::from_proto(request.program.as_ref())?;
        let tenant = ctx.tenant_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.UpsertProgram",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        programs::upsert(txn, &tenant, &program).await?;
                        Ok(pb::UpsertProgramResponse {
                            program: Some(program.to_proto()),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_program(
        &self,
        request: Request<pb::GetProgramRequest>,
    ) -> Result<Response<pb::GetProgramResponse>, Status> {
        let ctx = context_of(&request)?;
        let id = request.into_inner().id;
        let program = programs::find(self.db.conn(), &ctx.tenant_id, &id)
            .await?
            .ok_or_else(|| Error::not_found(format!("programme `{id}`")))?;
        Ok(Response::new(pb::GetProgramResponse {
            program: Some(program.to_proto()),
        }))
    }

    async fn adjust(
        &self,
        request: Request<pb::AdjustRequest>,
    ) -> Result<Response<pb::AdjustResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let asset = check_movement(
            &mut v,
            &request.idempotency_key,
            &request.customer_id,
            request.asset.as_ref(),
        );
        if request.amount == 0 {
            v.add("amount", "must not be zero");
        } else {
            ledger::check_amount(&mut v, "amount", request.amount.saturating_abs());
        }
        let reason = request.reason.trim();
        check_reason(&mut v, "reason", reason, true);
        v.finish()?;
        let asset = asset.ok_or_else(|| Status::internal("asset validated but missing"))?;
        let (customer_id, amount, reason) = (
            request.customer_id.clone(),
            request.amount,
            reason.to_string(),
        );
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Adjust",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        if amount > 0 {
                            let credit = Credit::plain(
                                ledger::ADJUSTMENT,
                                customer_id,
                                asset,
                                amount,
                                reason,
                                None,
                            );
                            let r = ledger::credit(txn, &work_ctx, backend, &credit).await?;
                            Ok(pb::AdjustResponse {
                                transaction: r.transaction,
                                balance: r.balance,
                            })
                        } else {
                            let debit = Debit {
                                movement: ledger::ADJUSTMENT,
                                customer_id,
                                asset,
                                amount: -amount,
                                reason,
                            };
                            let r = ledger::debit(txn, &work_ctx, backend, &debit).await?;
                            Ok(pb::AdjustResponse {
                                transaction: r.transaction,
                                balance: r.balance,
                            })
                        }
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        let asset = match &request.asset {
            Some(_) => ledger::check_asset(&mut v, "asset", request.asset.as_ref()),
            None => None,
        };
        if !(request.kind.is_empty() || KINDS.contains(&request.kind.as_str())) {
            v.add("kind", format!("must be one of {}", KINDS.join(", ")));
        }
        let (limit, starting_after) = api::page(&mut v, request.page);
        let from = request.from.as_ref().map_or(i64::MIN, timestamp_to_micros);
        let until = request.until.as_ref().map_or(i64::MAX, timestamp_to_micros);
        if from >= until {
            v.add("until", "must be after `from`");
        }
        v.finish()?;
        let filter = ledger::TransactionFilter {
            customer_id: request.customer_id,
            asset_kind: asset.as_ref().map_or(0, |a| a.kind as i32),
            asset_code: asset.map(|a| a.code).unwrap_or_default(),
            kind: request.kind,
            from,
            until,
            starting_after,
            limit,
        };
        let (transactions, has_more) =
            ledger::transactions(self.db.conn(), &ctx.tenant_id, &filter).await?;
        let page = page_response(has_more, transactions.last().map(|t| t.id.as_str()));
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions,
            page,
        }))
    }

    async fn batch_credit(
        &self,
        request: Request<pb::BatchCreditRequest>,
    ) -> Result<Response<pb::BatchCreditResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_batch(&mut v, "entries", request.entries.len(), batch::MAX_ENTRIES);
        let now = now_micros();
        let mut credits = Vec::with_capacity(request.entries.len());
        for (i, e) in request.entries.iter().enumerate() {
            let f = |name: &str| format!("entries[{i}].{name}");
            ledger::check_customer_id(&mut v, &f("customer_id"), &e.customer_id);
            let asset = ledger::check_asset(&mut v, &f("asset"), e.asset.as_ref());
            ledger::check_amount(&mut v, &f("amount"), e.amount);
            check_reason(&mut v, &f("reason"), &e.reason, false);
            let expires_at = e.expires_at.as_ref().map(timestamp_to_micros);
            check_future(&mut v, &f("expires_at"), expires_at, now, None);
            if let Some(asset) = asset {
                credits.push(Credit::plain(
                    ledger::CREDIT,
                    e.customer_id.clone(),
                    asset,
                    e.amount,
                    e.reason.clone(),
                    expires_at,
                ));
            }
        }
        v.finish()?;
        let mut assets: Vec<Asset> = credits.iter().map(|c| c.asset.clone()).collect();
        assets.dedup();
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let untold = self.sweeps.untold(&ctx.tenant_id, &assets);
        let tell = untold.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.BatchCredit",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        Sweeps::tell(txn, &work_ctx.tenant_id, &tell).await?;
                        batch::batch_credit(txn, &work_ctx, backend, &credits).await
                    })
                },
            )
            .await?;
        self.sweeps.told(&ctx.tenant_id, untold);
        Ok(Response::new(response))
    }

    async fn hold(
        &self,
        request: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::HoldResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        let fields = (
            request.customer_id.as_str(),
            request.asset.as_ref(),
            request.amount,
            request.reason.as_str(),
        );
        let plain = |name: &str| name.to_string();
        let new = check_hold(
            &mut v,
            &plain,
            fields,
            request.expires_at.as_ref(),
            now_micros(),
        );
        v.finish()?;
        let new = new.ok_or_else(|| Status::internal("hold validated but missing"))?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Hold",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move { holds::hold(txn, &work_ctx, backend, &new).await })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn batch_hold(
        &self,
        request: Request<pb::BatchHoldRequest>,
    ) -> Result<Response<pb::BatchHoldResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_batch(&mut v, "holds", request.holds.len(), holds::MAX_HOLDS);
        let now = now_micros();
        let mut wanted = Vec::with_capacity(request.holds.len());
        for (i, h) in request.holds.iter().enumerate() {
            let f = |name: &str| format!("holds[{i}].{name}");
            let fields = (
                h.customer_id.as_str(),
                h.asset.as_ref(),
                h.amount,
                h.reason.as_str(),
            );
            if let Some(new) = check_hold(&mut v, &f, fields, h.expires_at.as_ref(), now) {
                wanted.push(new);
            }
        }
        v.finish()?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.BatchHold",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(
                        async move { holds::batch_hold(txn, &work_ctx, backend, &wanted).await },
                    )
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn capture(
        &self,
        request: Request<pb::CaptureRequest>,
    ) -> Result<Response<pb::CaptureResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "hold_id", &request.hold_id);
        if request.amount != 0 {
            ledger::check_amount(&mut v, "amount", request.amount);
        }
        v.finish()?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let (hold_id, amount) = (request.hold_id.clone(), request.amount);
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Capture",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        holds::capture(txn, &work_ctx, backend, &hold_id, amount).await
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn batch_capture(
        &self,
        request: Request<pb::BatchCaptureRequest>,
    ) -> Result<Response<pb::BatchCaptureResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_batch(
            &mut v,
            "captures",
            request.captures.len(),
            holds::MAX_CAPTURES,
        );
        let mut seen = std::collections::HashSet::new();
        for (i, c) in request.captures.iter().enumerate() {
            let field = format!("captures[{i}].hold_id");
            check_id(&mut v, &field, &c.hold_id);
            if !seen.insert(c.hold_id.as_str()) {
                v.add(&field, "names a hold captured earlier in this batch");
            }
            if c.amount != 0 {
                ledger::check_amount(&mut v, &format!("captures[{i}].amount"), c.amount);
            }
        }
        v.finish()?;
        let wanted: Vec<holds::CaptureOf> = request
            .captures
            .iter()
            .map(|c| holds::CaptureOf {
                hold_id: c.hold_id.clone(),
                amount: c.amount,
            })
            .collect();
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.BatchCapture",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(
                        async move { holds::batch_capture(txn, &work_ctx, backend, &wanted).await },
                    )
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "hold_id", &request.hold_id);
        v.finish()?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let hold_id = request.hold_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Release",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move { holds::release(txn, &work_ctx, backend, &hold_id).await })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let ctx = context_of(&request)?;
        let mut request = request.into_inner();
        if request.transaction_id.is_empty() && !request.transaction_key.is_empty() {
            request.transaction_id = self
                .credit_made_by(&ctx, "transaction_key", &request.transaction_key)
                .await?;
        } else if request.transaction_id.is_empty() && !request.hold_id.is_empty() {
            let mut v = Violations::new();
            check_id(&mut v, "hold_id", &request.hold_id);
            v.finish()?;
            request.transaction_id =
                holds::capture_of(self.db.conn(), &ctx.tenant_id, &request.hold_id).await?;
        }
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_id(&mut v, "transaction_id", &request.transaction_id);
        if request.amount != 0 {
            ledger::check_amount(&mut v, "amount", request.amount);
        }
        let reason = request.reason.trim().to_string();
        check_reason(&mut v, "reason", &reason, true);
        if !request.customer_id.is_empty() {
            ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        }
        v.finish()?;
        let reversal = reversal::Reversal {
            transaction_id: request.transaction_id.clone(),
            customer_id: Some(request.customer_id.clone()).filter(|c| !c.is_empty()),
            amount: request.amount,
            reason,
        };
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Reverse",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(
                        async move { reversal::reverse(txn, &work_ctx, backend, &reversal).await },
                    )
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn transfer(
        &self,
        request: Request<pb::TransferRequest>,
    ) -> Result<Response<pb::TransferResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        ledger::check_customer_id(&mut v, "from_customer_id", &request.from_customer_id);
        ledger::check_customer_id(&mut v, "to_customer_id", &request.to_customer_id);
        if !request.to_customer_id.is_empty() && request.to_customer_id == request.from_customer_id
        {
            v.add("to_customer_id", "must differ from from_customer_id");
        }
        let asset = ledger::check_asset(&mut v, "asset", request.asset.as_ref());
        ledger::check_amount(&mut v, "amount", request.amount);
        check_reason(&mut v, "reason", &request.reason, false);
        v.finish()?;
        let transfer = reversal::Transfer {
            from: request.from_customer_id.clone(),
            to: request.to_customer_id.clone(),
            asset: asset.ok_or_else(|| Status::internal("asset validated but missing"))?,
            amount: request.amount,
            reason: request.reason.clone(),
        };
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.Transfer",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(
                        async move { reversal::transfer(txn, &work_ctx, backend, &transfer).await },
                    )
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn activate_pending(
        &self,
        request: Request<pb::ActivatePendingRequest>,
    ) -> Result<Response<pb::ActivatePendingResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let (id, reason) = check_credit_change(
            &request.idempotency_key,
            &request.credit_id,
            &request.reason,
            false,
        )?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let reason = if reason.is_empty() {
            "confirmed".to_string()
        } else {
            reason
        };
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.ActivatePending",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let credit =
                            pending::activate(txn, &work_ctx, backend, &id, &reason).await?;
                        Ok(pb::ActivatePendingResponse {
                            credit: Some(credit),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn cancel_pending(
        &self,
        request: Request<pb::CancelPendingRequest>,
    ) -> Result<Response<pb::CancelPendingResponse>, Status> {
        let ctx = context_of(&request)?;
        let mut request = request.into_inner();
        if request.credit_id.is_empty() && !request.credit_key.is_empty() {
            request.credit_id = self
                .credit_made_by(&ctx, "credit_key", &request.credit_key)
                .await?;
        }
        let (id, reason) = check_credit_change(
            &request.idempotency_key,
            &request.credit_id,
            &request.reason,
            true,
        )?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.CancelPending",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let credit = pending::cancel(txn, &work_ctx, backend, &id, &reason).await?;
                        Ok(pb::CancelPendingResponse {
                            credit: Some(credit),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn activate_due(
        &self,
        request: Request<pb::ActivateDueRequest>,
    ) -> Result<Response<pb::ActivateDueResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        v.finish()?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.ActivateDue",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let activated = pending::activate_due(txn, &work_ctx, backend).await?;
                        Ok(pb::ActivateDueResponse { activated })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn pay_out_cashback(
        &self,
        request: Request<pb::PayOutCashbackRequest>,
    ) -> Result<Response<pb::PayOutCashbackResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let (id, reason) = check_credit_change(
            &request.idempotency_key,
            &request.credit_id,
            &request.reason,
            false,
        )?;
        let reason = if reason.is_empty() {
            "paid out".to_string()
        } else {
            reason
        };
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.PayOutCashback",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        let credit =
                            pending::pay_out(txn, &work_ctx, backend, &id, &reason).await?;
                        Ok(pb::PayOutCashbackResponse {
                            credit: Some(credit),
                        })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_cashback_status(
        &self,
        request: Request<pb::GetCashbackStatusRequest>,
    ) -> Result<Response<pb::GetCashbackStatusResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        if !request.credit_id.is_empty() {
            check_id(&mut v, "credit_id", &request.credit_id);
        }
        let (limit, starting_after) = api::page(&mut v, request.page);
        v.finish()?;
        let credit_id = Some(request.credit_id.as_str()).filter(|id| !id.is_empty());
        let (credits, has_more) = pending::list(
            self.db.conn(),
            &ctx.tenant_id,
            Some(&request.customer_id),
            credit_id,
            &starting_after,
            limit,
        )
        .await?;
        let page = page_response(has_more, credits.last().map(|c| c.id.as_str()));
        Ok(Response::new(pb::GetCashbackStatusResponse {
            credits,
            page,
        }))
    }

    async fn get_liability(
        &self,
        request: Request<pb::GetLiabilityRequest>,
    ) -> Result<Response<pb::GetLiabilityResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let from = request.from.as_ref().map_or(i64::MIN, timestamp_to_micros);
        let until = request
            .until
            .as_ref()
            .map_or_else(now_micros, timestamp_to_micros);
        if from >= until {
            return Err(Error::invalid_field("until", "must be after `from`").into());
        }
        let assets = liability::liability(&self.db, &ctx.tenant_id, from, until).await?;
        Ok(Response::new(pb::GetLiabilityResponse { assets }))
    }

    async fn get_tier(
        &self,
        request: Request<pb::GetTierRequest>,
    ) -> Result<Response<pb::GetTierResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        check_program_id(&mut v, &request.program_id);
        v.finish()?;
        let status = tiers::status(
            self.db.conn(),
            &ctx.tenant_id,
            &request.program_id,
            &request.customer_id,
        )
        .await?;
        Ok(Response::new(status))
    }

    async fn list_tier_history(
        &self,
        request: Request<pb::ListTierHistoryRequest>,
    ) -> Result<Response<pb::ListTierHistoryResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        check_program_id(&mut v, &request.program_id);
        let (limit, starting_after) = api::page(&mut v, request.page);
        v.finish()?;
        let (changes, has_more) = tiers::history(
            self.db.conn(),
            &ctx.tenant_id,
            &request.program_id,
            &request.customer_id,
            &starting_after,
            limit,
        )
        .await?;
        let page = page_response(has_more, changes.last().map(|c| c.id.as_str()));
        Ok(Response::new(pb::ListTierHistoryResponse { changes, page }))
    }

    async fn evaluate_tiers(
        &self,
        request: Request<pb::EvaluateTiersRequest>,
    ) -> Result<Response<pb::EvaluateTiersResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        check_program_id(&mut v, &request.program_id);
        v.finish()?;
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let program_id = request.program_id.clone();
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.EvaluateTiers",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        tiers::evaluate_all(txn, &work_ctx, backend, &program_id).await
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn set_wallet_rules(
        &self,
        request: Request<pb::SetWalletRulesRequest>,
    ) -> Result<Response<pb::SetWalletRulesResponse>, Status> {
        let ctx = context_of(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        if request.rules.is_none() {
            v.add("rules", "is required");
        }
        v.finish()?;
        let (tenant, rules) = (ctx.tenant_id.clone(), request.rules.unwrap_or_default());
        let response = self
            .idempotency
            .run(
                &ctx,
                "wallet.SetWalletRules",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        rules::set(txn, &tenant, &rules).await?;
                        Ok(pb::SetWalletRulesResponse { rules: Some(rules) })
                    })
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn get_wallet_rules(
        &self,
        request: Request<pb::GetWalletRulesRequest>,
    ) -> Result<Response<pb::GetWalletRulesResponse>, Status> {
        let ctx = context_of(&request)?;
        let rules = rules::get(self.db.conn(), &ctx.tenant_id).await?;
        Ok(Response::new(pb::GetWalletRulesResponse {
            rules: Some(rules),
        }))
    }
}
