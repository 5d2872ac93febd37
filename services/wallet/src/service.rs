//! gRPC handlers: read the request context, validate the whole request (all field
//! violations at once), then run the ledger operation under its idempotency key.

use std::sync::Arc;

use tessera_proto::wallet::v1::{self as pb, wallet_service_server::WalletService};
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::ledger::{self, Credit};

pub struct Wallet {
    pub db: Db,
    pub idempotency: Idempotency,
    pub relay_wake: Arc<Notify>,
}

impl Wallet {
    fn validate_credit(request: &pb::CreditRequest) -> Result<Credit, Status> {
        let mut v = Violations::new();
        if let Err(e) = tessera_store::idempotency::validate_key(&request.idempotency_key) {
            for violation in e.field_violations {
                v.add(violation.field, violation.description);
            }
        }
        ledger::check_customer_id(&mut v, "customer_id", &request.customer_id);
        let asset = ledger::check_asset(&mut v, "asset", request.asset.as_ref());
        ledger::check_amount(&mut v, "amount", request.amount);
        if request.reason.chars().count() > 500 {
            v.add("reason", "must be at most 500 characters");
        }
        v.finish()?;
        Ok(Credit {
            customer_id: request.customer_id.clone(),
            asset: asset.ok_or_else(|| Status::internal("asset validated but missing"))?,
            amount: request.amount,
            reason: request.reason.clone(),
        })
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
            .idempotency
            .run(
                &ctx,
                "wallet.Credit",
                &request.idempotency_key,
                &request,
                move |txn| Box::pin(async move { ledger::credit(txn, &work_ctx, &credit).await }),
            )
            .await?;
        self.relay_wake.notify_one();
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
        let balances =
            ledger::balances(self.db.conn(), &ctx.tenant_id, &request.customer_id).await?;
        Ok(Response::new(pb::GetBalanceResponse {
            customer_id: request.customer_id,
            balances,
        }))
    }
}
