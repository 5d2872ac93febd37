//! `tessera.ops.v1.QueueService`: the dead letters of the services a process runs, listed
//! and replayed per tenant. Each service hands its queues over as [`DeadLetters`]
//! (implemented by the storage crate); one server answers for all services of the process,
//! whether it runs one service or the whole suite. `tessera.ops.v1.PrivacyService` does the
//! same for the personal data each service keeps ([`CustomerData`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use tessera_proto::ops::v1 as pb;
use tessera_proto::ops::v1::privacy_service_server::{PrivacyService, PrivacyServiceServer};
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
    QueueServiceServer::new(Queues::new(services))
}

/// The dead letters of some services, with the requests checked as `QueueService` checks
/// them; also called in process (the gateway's own queue).
pub struct Queues {
    services: BTreeMap<&'static str, Arc<dyn DeadLetters>>,
}

impl Queues {
    pub fn new(services: BTreeMap<&'static str, Arc<dyn DeadLetters>>) -> Self {
        Self { services }
    }

    fn find(&self, v: &mut Violations, service: &str) -> Option<&Arc<dyn DeadLetters>> {
        lookup(&self.services, v, service)
    }
}

/// The entry of `service`, or a violation naming the services this process serves.
fn lookup<'a, T>(
    services: &'a BTreeMap<&'static str, T>,
    v: &mut Violations,
    service: &str,
) -> Option<&'a T> {
    let found = services.get(service);
    if found.is_none() {
        let known: Vec<&str> = services.keys().copied().collect();
        v.add("service", format!("must be one of {}", known.join(", ")));
    }
    found
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

/// The personal data a service keeps about a customer of a tenant.
pub trait CustomerData: Send + Sync {
    /// Table name → the customer's rows in it.
    fn export<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, Error>>;
    /// Deletes what is only personal and moves what must stay to `pseudonym`, in one
    /// transaction; returns (deleted, pseudonymized) rows.
    fn erase<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
        pseudonym: &'a str,
    ) -> BoxFuture<'a, Result<(u64, u64), Error>>;
}

/// Serves the personal data of `services` (service name → its data).
pub fn privacy_server(
    services: BTreeMap<&'static str, Arc<dyn CustomerData>>,
) -> PrivacyServiceServer<Privacy> {
    PrivacyServiceServer::new(Privacy { services })
}

pub struct Privacy {
    services: BTreeMap<&'static str, Arc<dyn CustomerData>>,
}

impl Privacy {
    fn check(
        &self,
        v: &mut Violations,
        service: &str,
        customer: &str,
    ) -> Option<&Arc<dyn CustomerData>> {
        if customer.is_empty()
            || customer.len() > 128
            || !customer.bytes().all(|b| b.is_ascii_graphic())
        {
            v.add("customer_id", "must be 1 to 128 visible ASCII characters");
        }
        lookup(&self.services, v, service)
    }
}

#[tonic::async_trait]
impl PrivacyService for Privacy {
    async fn export_customer_data(
        &self,
        request: Request<pb::ExportCustomerDataRequest>,
    ) -> Result<Response<pb::ExportCustomerDataResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&ROLES)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let service = self.check(&mut v, &request.service, &request.customer_id);
        v.finish()?;
        let service = service.ok_or_else(|| Status::internal("service"))?;
        let data = service.export(&ctx.tenant_id, &request.customer_id).await?;
        Ok(Response::new(pb::ExportCustomerDataResponse {
            service: request.service,
            data_json: data.to_string(),
        }))
    }

    async fn erase_customer_data(
        &self,
        request: Request<pb::EraseCustomerDataRequest>,
    ) -> Result<Response<pb::EraseCustomerDataResponse>, Status> {
        let ctx = context_of(&request)?;
        ctx.require_role(&ROLES)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        if request.idempotency_key.is_empty() || request.idempotency_key.len() > 255 {
            v.add("idempotency_key", "must be 1 to 255 characters");
        }
        if !request.pseudonym.starts_with("erased-") || request.pseudonym.len() > 128 {
            v.add(
                "pseudonym",
                "must start with `erased-` (at most 128 characters)",
            );
        }
        let service = self.check(&mut v, &request.service, &request.customer_id);
        v.finish()?;
        let service = service.ok_or_else(|| Status::internal("service"))?;
        let (deleted, pseudonymized) = service
            .erase(&ctx.tenant_id, &request.customer_id, &request.pseudonym)
            .await?;
        Ok(Response::new(pb::EraseCustomerDataResponse {
            service: request.service,
            deleted: i64::try_from(deleted).unwrap_or(i64::MAX),
            pseudonymized: i64::try_from(pseudonymized).unwrap_or(i64::MAX),
        }))
    }
}
