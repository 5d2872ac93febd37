//! gRPC handlers: read the request context, validate the whole request (all field
//! violations at once), then run the ledger operation under its idempotency key.

use std::sync::Arc;

use futures::future::BoxFuture;
use sea_orm::DatabaseTransaction;
use tessera_proto::wallet::v1::{self as pb, wallet_service_server::WalletService};
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_runtime::{Error, RequestContext};
use tessera_store::idempotency::Idempotency;
use tessera_store::outbox::timestamp_to_micros;
use tessera_store::{Db, now_micros};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::ledger::{self, Credit, Debit};
use crate::programs::{self, Program};

pub struct Wallet {
    pub db: Db,
    pub idempotency: Idempotency,
    pub relay_wake: Arc<Notify>,
}

impl Wallet {
    /// Runs a ledger mutation at most once per idempotency key, then wakes the outbox relay
    /// so the events it wrote leave at once.
    async fn mutate<Req, R, F>(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &Req,
        work: F,
    ) -> Result<R, Status>
    where
        Req: prost::Message,
        R: prost::Message + Default,
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<R, Error>>,
    {
        let response = self.idempotency.run(ctx, scope, key, request, work).await?;
        self.relay_wake.notify_one();
        Ok(response)
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
        check_reason(&mut v, &request.reason, false);
        let expires_at = request.expires_at.as_ref().map(timestamp_to_micros);
        if expires_at.is_some_and(|t| t <= now_micros()) {
            v.add("expires_at", "must be in the future");
        }
        v.finish()?;
        Ok(Credit {
            movement: ledger::CREDIT,
            customer_id: request.customer_id.clone(),
            asset: asset.ok_or_else(|| Status::internal("asset validated but missing"))?,
            amount: request.amount,
            reason: request.reason.clone(),
            expires_at,
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
        check_reason(&mut v, &request.reason, false);
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

/// At most 500 characters; `required` also refuses a blank reason.
fn check_reason(v: &mut Violations, reason: &str, required: bool) {
    if reason.chars().count() > 500 {
        v.add("reason", "must be at most 500 characters");
    } else if required && reason.trim().is_empty() {
        v.add("reason", "is required");
    }
}

fn check_idempotency_key(v: &mut Violations, key: &str) {
    if let Err(e) = tessera_store::idempotency::validate_key(key) {
        for violation in e.field_violations {
            v.add(violation.field, violation.description);
        }
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
        let work_ctx = ctx.clone();
        let response = self
            .mutate(
                &ctx,
                "wallet.Credit",
                &request.idempotency_key,
                &request,
                move |txn| Box::pin(async move { ledger::credit(txn, &work_ctx, &credit).await }),
            )
            .await?;
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
            .mutate(
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
            .mutate(
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
            .mutate(
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
        check_reason(&mut v, reason, true);
        v.finish()?;
        let asset = asset.ok_or_else(|| Status::internal("asset validated but missing"))?;
        let (customer_id, amount, reason) = (
            request.customer_id.clone(),
            request.amount,
            reason.to_string(),
        );
        let (work_ctx, backend) = (ctx.clone(), self.db.backend());
        let response = self
            .mutate(
                &ctx,
                "wallet.Adjust",
                &request.idempotency_key,
                &request,
                move |txn| {
                    Box::pin(async move {
                        if amount > 0 {
                            let credit = Credit {
                                movement: ledger::ADJUSTMENT,
                                customer_id,
                                asset,
                                amount,
                                reason,
                                expires_at: None,
                            };
                            let r = ledger::credit(txn, &work_ctx, &credit).await?;
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
        if !["", "credit", "debit", "expiry", "adjustment"].contains(&request.kind.as_str()) {
            v.add("kind", "must be credit, debit, expiry or adjustment");
        }
        let page = request.page.unwrap_or_default();
        let limit = v.page_limit(page.limit);
        if !page.starting_after.is_empty() && uuid::Uuid::parse_str(&page.starting_after).is_err() {
            v.add(
                "page.starting_after",
                "is not a cursor returned by this API",
            );
        }
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
            starting_after: page.starting_after,
            limit,
        };
        let (transactions, has_more) =
            ledger::transactions(self.db.conn(), &ctx.tenant_id, &filter).await?;
        let next_cursor = if has_more {
            transactions
                .last()
                .map(|t| t.id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions,
            page: Some(tessera_proto::common::v1::PageResponse {
                next_cursor,
                has_more,
            }),
        }))
    }
}
