//! The command outbox: a service writes "call method M of service X with this request"
//! ([`send`]) in the same transaction as the change that needs it, and the [`Relay`]
//! delivers it to X's gRPC API, as the tenant's system principal, with the trace context of
//! the request that wrote it. Delivery is at least once, so the target must be idempotent:
//! the request carries its own idempotency key, derived from what caused it.
//!
//! A refusal that retrying cannot change (the request is invalid, names something that
//! does not exist, is not allowed, or the method is unknown) is dead-lettered at once;
//! everything else (the target down, overloaded, a conflict) is retried with backoff.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use sea_orm::ConnectionTrait;
use tessera_runtime::grpc::Channel;
use tessera_runtime::{Error, RequestContext};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use super::{Failure, Handler, Item, NewItem, Queue, RetryPolicy, Worker, WorkerConfig, push};
use crate::Db;

/// The queue commands wait in.
pub const QUEUE: &str = "commands";

/// A command: `request` for the gRPC method at `path`
/// (`/tessera.catalog.v1.CatalogService/RecordCodeUses`), de-duplicated by `key` while
/// it waits.
pub struct Command<M: Message> {
    pub path: &'static str,
    pub key: String,
    pub request: M,
}

/// Writes commands in the caller's transaction.
pub async fn send<C: ConnectionTrait, M: Message>(
    txn: &C,
    tenant: &str,
    commands: impl IntoIterator<Item = Command<M>>,
) -> Result<u64, Error> {
    push(
        txn,
        commands.into_iter().map(|c| NewItem {
            queue: QUEUE,
            tenant: tenant.to_string(),
            key: c.key,
            kind: c.path.to_string(),
            payload: c.request.encode_to_vec(),
            not_before: None,
            group: String::new(),
        }),
    )
    .await
}

/// The service a method path belongs to: `/tessera.catalog.v1.X/Y` → `catalog`. A method
/// every service serves (`tessera.ops.v1`) names its target before an `@`:
/// `wallet@/tessera.ops.v1.PrivacyService/EraseCustomerData`.
pub fn target_of(path: &str) -> Option<&str> {
    match path.split_once('@') {
        Some((target, _)) => Some(target),
        None => path.strip_prefix("/tessera.")?.split('.').next(),
    }
}

/// The method path of a command's kind (without its `target@`).
fn method_of(kind: &str) -> &str {
    kind.split_once('@').map_or(kind, |(_, path)| path)
}

/// Delivers commands to the services' gRPC APIs.
pub struct Relay {
    source: &'static str,
    /// Channel per target package (`catalog`, `eligibility`, `wallet`, `scheduler`,
    /// `notification`).
    peers: HashMap<String, Channel>,
}

impl Relay {
    pub fn new(source: &'static str, peers: HashMap<String, Channel>) -> Self {
        Self { source, peers }
    }

    /// A relay to every peer of `config`.
    pub fn to_peers(
        source: &'static str,
        config: &tessera_runtime::Config,
    ) -> anyhow::Result<Self> {
        let p = &config.peers;
        let timeout = config.peer_timeout();
        let mut peers = HashMap::new();
        for (name, url) in [
            ("catalog", &p.catalog_url),
            ("eligibility", &p.eligibility_url),
            ("wallet", &p.wallet_url),
            ("scheduler", &p.scheduler_url),
            ("notification", &p.notification_url),
        ] {
            peers.insert(
                name.to_string(),
                tessera_runtime::grpc::channel(url, timeout)?,
            );
        }
        Ok(Self::new(source, peers))
    }
}

/// The worker that delivers `source`'s commands to the peers of `config`.
pub fn worker(
    db: Db,
    source: &'static str,
    config: &tessera_runtime::Config,
) -> anyhow::Result<Worker> {
    worker_with(db, source, config, |relay| std::sync::Arc::new(relay))
}

/// Like [`worker`], with the relay wrapped by `wrap` (a service that records what was
/// delivered: the scheduler notes the campaign version eligibility has).
pub fn worker_with(
    db: Db,
    source: &'static str,
    config: &tessera_runtime::Config,
    wrap: impl FnOnce(Relay) -> std::sync::Arc<dyn Handler>,
) -> anyhow::Result<Worker> {
    let queue = Queue::new(db, source, QUEUE, RetryPolicy::default());
    let relay = Relay::to_peers(source, config)?;
    Ok(Worker::new(queue, wrap(relay), WorkerConfig::default()))
}

/// Whether retrying a refused call can succeed.
pub fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
            | Code::FailedPrecondition
    )
}

#[async_trait::async_trait]
impl Handler for Relay {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        let path = http::uri::PathAndQuery::try_from(method_of(&item.kind))
            .map_err(|e| Failure::Permanent(format!("bad method path `{}`: {e}", item.kind)))?;
        let target = target_of(&item.kind)
            .ok_or_else(|| Failure::Permanent(format!("no service for `{}`", item.kind)))?;
        let channel = self
            .peers
            .get(target)
            .ok_or_else(|| Failure::Permanent(format!("no peer `{target}`")))?;
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready()
            .await
            .map_err(|e| Failure::Retry(format!("{target} not ready: {e}")))?;
        let ctx = RequestContext::system(item.tenant.clone(), self.source);
        let request = ctx.request(Bytes::from(item.payload.clone()));
        match grpc.unary(request, path, RawCodec).await {
            Ok(_) => Ok(()),
            Err(status) => {
                let text = format!("{}: {}", status.code(), status.message());
                if is_permanent(status.code()) {
                    Err(Failure::Permanent(text))
                } else {
                    Err(Failure::Retry(text))
                }
            }
        }
    }
}

/// Passes encoded protobuf through untouched: the relay does not need to know the message
/// types of the methods it calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_the_package() {
        assert_eq!(
            target_of("/tessera.catalog.v1.CatalogService/RecordCodeUses"),
            Some("catalog")
        );
        assert_eq!(
            target_of("/tessera.wallet.v1.WalletService/Credit"),
            Some("wallet")
        );
        assert_eq!(target_of("/grpc.health.v1.Health/Check"), None);
        let ops = "scheduler@/tessera.ops.v1.PrivacyService/EraseCustomerData";
        assert_eq!(target_of(ops), Some("scheduler"));
        assert_eq!(
            method_of(ops),
            "/tessera.ops.v1.PrivacyService/EraseCustomerData"
        );
    }

    #[test]
    fn refusals_that_retrying_cannot_change_are_permanent() {
        assert!(is_permanent(Code::InvalidArgument));
        assert!(is_permanent(Code::NotFound));
        assert!(!is_permanent(Code::Unavailable));
        assert!(!is_permanent(Code::Aborted));
        assert!(!is_permanent(Code::DeadlineExceeded));
        assert!(!is_permanent(Code::Internal));
    }
}
