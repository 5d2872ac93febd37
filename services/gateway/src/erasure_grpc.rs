//! The gateway's gRPC services: `tessera.ops.v1.ErasureService` (the same erasure jobs as
//! `POST /v1/customers/{id}/erasure`), for a brand's own services that call the suite over
//! gRPC. Callers are authenticated by the runtime's layer (`docs/security.md`); admins only.

use tessera_proto::ops::v1 as pb;
use tessera_proto::ops::v1::erasure_service_server::ErasureService;
use tessera_runtime::context::context_of;
use tessera_runtime::error::Violations;
use tessera_store::api::check_idempotency_key;
use tessera_store::outbox::micros_to_timestamp;
use tonic::{Request, Response, Status};

use crate::erasures::{self, Erasures};

/// Roles that may erase (the suite's own calls, as `system`, may too).
const ROLES: [&str; 1] = ["admin"];

pub struct Erasing(pub Erasures);

#[tonic::async_trait]
impl ErasureService for Erasing {
    async fn start_erasure(
        &self,
        request: Request<pb::StartErasureRequest>,
    ) -> Result<Response<pb::StartErasureResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&ROLES)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        check_idempotency_key(&mut v, &request.idempotency_key);
        tessera_store::api::check_customer_id(&mut v, "customer_id", &request.customer_id);
        v.finish()?;
        let job = self
            .0
            .start(
                &ctx.tenant_id,
                &request.customer_id,
                &request.idempotency_key,
            )
            .await?;
        Ok(Response::new(pb::StartErasureResponse {
            job: Some(to_pb(job)),
        }))
    }

    async fn get_erasure(
        &self,
        request: Request<pb::GetErasureRequest>,
    ) -> Result<Response<pb::GetErasureResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&ROLES)?;
        let job = self.0.get(&ctx.tenant_id, &request.get_ref().id).await?;
        Ok(Response::new(pb::GetErasureResponse {
            job: Some(to_pb(job)),
        }))
    }
}

fn to_pb(job: erasures::Job) -> pb::ErasureJob {
    pb::ErasureJob {
        id: job.id,
        status: job.status.into(),
        created_at: Some(micros_to_timestamp(job.created_at)),
        parts: job
            .parts
            .into_iter()
            .map(|p| pb::ErasurePart {
                service: p.service,
                status: p.status,
                error: p.error,
                updated_at: Some(micros_to_timestamp(p.updated_at)),
            })
            .collect(),
    }
}
