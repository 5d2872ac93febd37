//! The catalog service: open-ended reward definitions (effects are a protobuf `oneof` with an
//! extension kind, stored encoded, so a new incentive needs no migration), previews through
//! the cart-effect engine, code pools with pattern generation as a background job, CSV
//! import and export, the kill switch of a reward, pool or code, and publication of rewards
//! and codes to customers (a gift-card code's value is loaded into its wallet account). Every change is idempotent and written with its outbox event.

mod codes;
mod gift_cards;
mod jobs;
mod migrations;
mod pattern;
pub mod policy;
mod publications;
mod rewards;
mod service;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::catalog::v1::catalog_service_server::CatalogServiceServer;
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
pub const SERVICE: &str = "catalog";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.catalog.v1.CatalogService";

/// Applies the catalog's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the catalog; its relay and job runners stop when
/// `shutdown` fires.
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
    let generation = jobs::Generator::worker(db.clone(), SERVICE, relay.waker());
    let commands = commands::worker(db.clone(), SERVICE, config)?;
    let adopted = jobs::adopt_running(&db).await?;
    if adopted > 0 {
        tracing::info!(adopted, "running generation jobs moved onto the queue");
    }
    let moved = gift_cards::adopt_waiting_loads(&db).await?;
    if moved > 0 {
        tracing::info!(moved, "gift-card loads moved onto the command outbox");
    }
    let service = service::Catalog {
        db: db.clone(),
        idempotency: Idempotency::new(
            db.clone(),
            Duration::from_secs(config.idempotency.in_flight_lease_secs),
        )
        .waking(relay.waker())
        .waking(commands.waker())
        .waking(generation.waker()),
    };
    let retention = tessera_store::retention::Purger::start(
        db.clone(),
        SERVICE,
        vec![tessera_store::retention::Rule::new(
            "generation_jobs",
            "finished_at",
            "status <> 'running'",
            tessera_runtime::config::Kept::Jobs,
        )],
        &config.retention,
    )
    .await?;
    Ok(Component::new(SERVICE)
        .customer_data(customer_data(db.clone()))
        .dead_letters(Arc::new(tessera_store::queue::DeadLetters::new(
            db.clone(),
            SERVICE,
        )))
        .grpc(GRPC_NAME, move |routes| {
            routes.add_service(
                CatalogServiceServer::new(service).max_decoding_message_size(8 * 1024 * 1024),
            );
        })
        .task(tokio::spawn(retention.run(shutdown.clone())))
        .task(tokio::spawn(relay.run(shutdown.clone())))
        .task(tokio::spawn(generation.run(shutdown.clone())))
        .task(tokio::spawn(backfill_sync(db.clone())))
        .task(tokio::spawn(commands.run(shutdown)))
        .probe(db.probe()))
}

/// Sends eligibility the codes created before codes were synced (once; a failure is
/// retried at the next start).
async fn backfill_sync(db: Db) {
    match sync::backfill(&db).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(codes = n, "codes sent to eligibility"),
        Err(e) => {
            tracing::warn!(error = %e, "codes not sent to eligibility; retried at the next start")
        }
    }
}

/// What the catalog keeps about a customer (GDPR): the codes given to them, publications and
/// gift-card loads, kept under the pseudonym on erasure (the codes stay counted).
fn customer_data(db: Db) -> Arc<dyn tessera_runtime::ops::CustomerData> {
    use tessera_store::privacy::{CustomerData, Erase::Pseudonymize, Personal};
    Arc::new(CustomerData::new(
        db,
        vec![
            Personal::new(
                "codes",
                "customer_id",
                "code, pool_id, reward_id, state, redemptions, created_at",
                Pseudonymize,
            ),
            Personal::new(
                "publications",
                "customer_id",
                "id, reward_id, code, channel, created_at",
                Pseudonymize,
            ),
            Personal::new(
                "wallet_commands",
                "customer_id",
                "id, card_code, amount, created_at",
                Pseudonymize,
            ),
        ],
    ))
}

/// Runs the catalog alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
