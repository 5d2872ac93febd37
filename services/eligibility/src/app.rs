//! The eligibility service's state, shared by its use cases (checkout, earning) and its
//! gRPC adapter ([`crate::grpc`]).

use std::sync::Arc;

use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::{RequestContext, grpc};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;

use crate::campaigns::Campaigns;
use crate::segments::Segments;

pub struct Eligibility {
    pub db: Db,
    pub idempotency: Idempotency,
    pub campaigns: Arc<Campaigns>,
    pub segments: Arc<Segments>,
    pub wallet: WalletServiceClient<grpc::Channel>,
    /// Gathers redemptions' wallet holds into batches.
    pub holds: crate::spends::HoldBatcher,
    /// Wakes the spend settler: a redemption committed spends to capture.
    /// The command outbox's worker, run at once after a confirmation or a rollback.
    pub commands: tessera_store::queue::Worker,
}

impl Eligibility {
    /// Customers' cached memberships carry their facts version, so a facts change needs no
    /// invalidation for correctness; this frees the entry at once.
    pub(crate) async fn facts_changed(&self, tenant: &str, customer: &str) {
        self.segments.invalidate(tenant, customer).await;
    }

    pub(crate) async fn tier(
        &self,
        ctx: &RequestContext,
        customer: &str,
        program: &str,
    ) -> Option<String> {
        let request = ctx.request(tessera_proto::wallet::v1::GetTierRequest {
            customer_id: customer.to_string(),
            program_id: program.to_string(),
        });
        match self.wallet.clone().get_tier(request).await {
            Ok(r) => Some(r.into_inner().tier.map(|t| t.id).unwrap_or_default()),
            Err(e) if e.code() == tonic::Code::NotFound => Some(String::new()),
            Err(e) => {
                tracing::warn!(error = %e, "tier unavailable to rules");
                None
            }
        }
    }
}
