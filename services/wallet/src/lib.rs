//! The wallet service: where money-like value lives. Every change is a balanced ledger
//! transaction (postings summing to zero per asset) between a customer account and a tenant
//! system account, written together with its balance update, its idempotency record and its
//! outbox event in one database transaction.

mod batch;
mod expiry;
mod holds;
mod ledger;
mod liability;
mod migrations;
mod pending;
mod programs;
mod reversal;
mod rules;
mod service;
mod tiers;

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::wallet::v1::wallet_service_server::WalletServiceServer;
use tessera_runtime::component::{self, Component};
use tessera_runtime::{Config, grpc};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tessera_store::outbox::{NotificationPublisher, Relay};
use tessera_store::queue::commands;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use migrations::Migrator;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "wallet";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.wallet.v1.WalletService";

/// Applies the wallet's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the wallet; its relay stops when `shutdown` fires.
pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let publisher = NotificationPublisher::new(grpc::channel(
        &config.peers.notification_url,
        config.peer_timeout(),
    )?);
    let relay = Relay::new(
        db.clone(),
        SERVICE,
        Arc::new(publisher),
        config.outbox.clone(),
    );
    let commands = commands::worker(db.clone(), SERVICE, config)?;
    let service = service::Wallet {
        db: db.clone(),
        idempotency: Idempotency::new(
            db.clone(),
            Duration::from_secs(config.idempotency.in_flight_lease_secs),
        )
        .waking(relay.waker())
        .waking(commands.waker()),
        sweeps: service::Sweeps::default(),
    };
    let retention = tessera_store::retention::Purger::start(
        db.clone(),
        SERVICE,
        tessera_store::retention::plumbing(&config.retention),
        &config.retention,
    )
    .await?;
    Ok(Component::new(SERVICE)
        .dead_letters(Arc::new(tessera_store::queue::DeadLetters::new(
            db.clone(),
            SERVICE,
        )))
        .grpc(GRPC_NAME, move |routes| {
            routes.add_service(WalletServiceServer::new(service));
        })
        .task(tokio::spawn(retention.run(shutdown.clone())))
        .task(tokio::spawn(commands.run(shutdown.clone())))
        .task(tokio::spawn(relay.run(shutdown)))
        .probe(db.probe()))
}

/// Runs the wallet alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
