//! `tessera.ops.v1.QueueService`: the dead letters of the services a process runs, listed
//! and replayed per tenant. Each service hands its queues over as [`DeadLetters`]
//! (implemented by the storage crate); one server answers for all services of the process,
//! whether it runs one service or the whole suite.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use tessera_proto::ops::v1 as pb;
use tessera_proto::ops::v1::queue_service_server::{QueueService, QueueServiceServer};
use tonic::{Request, Response, Status};

use crate::context::context_of;
use crate::error::{Error, Violations};

/// A service's dead-lettered work, per tenant.
pub trait DeadLetters: Send + Sync {
    /// Dead items of `queue` after id `after`, oldest first.
    fn list<'a>(
        &'a self,
        tenant: &'a str,
        queue: &'a str,
        after: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<pb::DeadItem>, Error>>;
    /// Puts the items of `ids` (all when empty) back; returns how many.
    fn replay<'a>(
        &'a self,
        tenant: &'a str,
        queue: &'a str,
        ids: &'a [i64],
    ) -> BoxFuture<'a, Result<u64, Error>>;
}

/// The queue every service has.
pub const DEFAULT_QUEUE: &str = "commands";
/// Roles that may see and replay dead letters.
const ROLES: [&str; 2] = ["admin", "system"];

/// Serves the dead letters of `services` (service name → its queues).
pub fn server(
    services: BTreeMap<&'static str, Arc<dyn DeadLetters>>,
) -> QueueServiceServer<Queues> {
    QueueServiceServer::new(Queues { services })
}

pub struct Queues {
    services: BTreeMap<&'static str, Arc<dyn DeadLetters>>,
}

impl Queues {
    fn find(&self, v: &mut Violations, service: &str) -> Option<&Arc<dyn DeadLetters>> {
        let found = self.services.get(service);
        if found.is_none() {
            let known: Vec<&str> = self.services.keys().copied().collect();
            v.add("service", format!("must be one of {}", known.join(", ")));
        }
        found
    }
}

fn queue_of(v: &mut Violations, queue: &str) -> String {
    match queue {
        "" => DEFAULT_QUEUE.to_string(),
        q if q.len() <= 64 && q.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
            q.to_string()
        }
        _ => {
            v.add("queue", "must be 1 to 64 of a-z and _");
            String::new()
        }
    }
}

#[tonic::async_trait]
impl QueueService for Queues {
    async fn list_dead_items(
        &self,
        request: Request<pb::ListDeadItemsRequest>,
    ) -> Result<Response<pb::ListDeadItemsResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&ROLES)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let service = self.find(&mut v, &request.service);
        let queue = queue_of(&mut v, &request.queue);
        if request.limit > 500 {
            v.add("limit", "must be 1 to 500");
        }
        if request.after_id < 0 {
            v.add("after_id", "must not be negative");
        }
        v.finish()?;
        let service = service.ok_or_else(|| Status::internal("service"))?;
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit
        };
        let items = service
            .list(&ctx.tenant_id, &queue, request.after_id, limit)
            .await?;
        let next_after_id = if items.len() == limit as usize {
            items.last().map_or(0, |i| i.id)
        } else {
            0
        };
        Ok(Response::new(pb::ListDeadItemsResponse {
            items,
            next_after_id,
        }))
    }

    async fn replay_dead_items(
        &self,
        request: Request<pb::ReplayDeadItemsRequest>,
    ) -> Result<Response<pb::ReplayDeadItemsResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&ROLES)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        if request.idempotency_key.is_empty() || request.idempotency_key.len() > 255 {
            v.add("idempotency_key", "must be 1 to 255 characters");
        }
        let service = self.find(&mut v, &request.service);
        let queue = queue_of(&mut v, &request.queue);
        if request.ids.len() > 1_000 {
            v.add("ids", "must hold at most 1000 ids");
        }
        v.finish()?;
        let service = service.ok_or_else(|| Status::internal("service"))?;
        let replayed = service.replay(&ctx.tenant_id, &queue, &request.ids).await?;
        Ok(Response::new(pb::ReplayDeadItemsResponse {
            replayed: i64::try_from(replayed).unwrap_or(i64::MAX),
        }))
    }
}
