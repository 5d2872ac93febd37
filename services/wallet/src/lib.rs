//! The wallet service: where money-like value lives. Every change is a balanced ledger
//! transaction (postings summing to zero per asset) between a customer account and a tenant
//! system account, written together with its balance update, its idempotency record and its
//! outbox event in one database transaction.

mod allocation;
mod batch;
mod expiry;
mod holds;
mod ledger;
mod legs;
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
    let retention =
        tessera_store::retention::Purger::start(db.clone(), SERVICE, Vec::new(), &config.retention)
            .await?;
    Ok(Component::new(SERVICE)
        .customer_data(customer_data(db.clone()))
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

/// What the wallet keeps about a customer (GDPR): accounts and everything posted to them,
/// kept under the pseudonym on erasure so the ledger's sums stay whole.
fn customer_data(db: Db) -> Arc<dyn tessera_runtime::ops::CustomerData> {
    use tessera_store::privacy::{CustomerData, Erase::Pseudonymize, Personal};
    let accounts = Personal {
        when: "owner_kind = 'customer'",
        ..Personal::new(
            "accounts",
            "owner_id",
            "id, asset_kind, asset_code, balance, created_at",
            Pseudonymize,
        )
    };
    Arc::new(CustomerData::new(
        db,
        vec![
            accounts,
            Personal::new(
                "transactions",
                "customer_id",
                "id, kind, asset_kind, asset_code, amount, reason, created_at",
                Pseudonymize,
            ),
            Personal::new(
                "holds",
                "customer_id",
                "id, asset_kind, asset_code, amount, captured, status, created_at",
                Pseudonymize,
            ),
            Personal::new(
                "pending_credits",
                "customer_id",
                "id, asset_kind, asset_code, amount, reason, status, created_at",
                Pseudonymize,
            ),
            Personal::new(
                "tier_activity",
                "customer_id",
                "program_id, points, spent, at",
                Pseudonymize,
            ),
            Personal::new(
                "member_tiers",
                "customer_id",
                "program_id, tier_id, since",
                Pseudonymize,
            ),
            Personal::new(
                "tier_history",
                "customer_id",
                "id, program_id, from_tier, to_tier, direction, at",
                Pseudonymize,
            ),
        ],
    ))
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
