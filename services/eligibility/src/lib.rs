//! The eligibility service: customer facts (profiles with typed attributes, orders, custom
//! events with optional schemas, aggregates over rolling windows), rules in CEL compiled and
//! type-checked once, segments whose membership is cached in the segment cache (Redis or
//! in-process) and versioned so a stale entry never answers, and qualification of a customer
//! and cart against an indexed read model of the active campaigns, with a reason for every
//! incentive that does not apply.

mod app;
mod campaigns;
mod cashback;
pub(crate) mod checkout;
mod counters;
mod earning;
mod facts;
mod grpc;
mod migrations;
mod pool_codes;
mod privacy;
mod qualify;
mod readmodel;
pub mod rules;
mod segments;
mod spends;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tessera_proto::eligibility::v1::eligibility_service_server::EligibilityServiceServer;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::Config;
use tessera_runtime::component::{self, Component};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tessera_store::outbox::{NotificationPublisher, Relay};
use tessera_store::queue::commands;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use migrations::Migrator;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "eligibility";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.eligibility.v1.EligibilityService";
/// Health entry of the segment cache: NOT_SERVING while it fails (degraded, still exact).
pub const CACHE_HEALTH_NAME: &str = "tessera.eligibility.v1.EligibilityService/segment-cache";

/// Applies the eligibility's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the eligibility; its relay stops when `shutdown` fires.
pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let cache = tessera_cache::open(
        config.cache.redis_url.as_deref(),
        &config.cache.key_prefix,
        Duration::from_secs(config.cache.ttl_secs),
        Duration::from_secs(config.database.connect_timeout_secs),
    )
    .await?;
    tracing::info!(cache = cache.kind(), "segment cache ready");
    let publisher = NotificationPublisher::new(tessera_runtime::grpc::channel(
        &config.peers.notification_url,
        config.peer_timeout(),
    )?);
    let relay = Relay::new(
        db.clone(),
        SERVICE,
        Arc::new(publisher),
        config.outbox.clone(),
    );
    let segments = Arc::new(segments::Segments::new(db.clone(), cache.clone()));
    let wallet = WalletServiceClient::new(tessera_runtime::grpc::channel(
        &config.peers.wallet_url,
        config.peer_timeout(),
    )?);
    let captures = wallet.clone();
    let commands = commands::worker_with(db.clone(), SERVICE, config, move |relay| {
        Arc::new(spends::Captures {
            relay: Arc::new(relay),
            wallet: captures,
        })
    })?;
    let adopted = earning::adopt_waiting(&db).await? + spends::adopt_waiting(&db).await?;
    if adopted > 0 {
        tracing::info!(
            adopted,
            "earnings and spends waiting for the wallet moved onto the command outbox"
        );
    }
    let degraded = segments.degraded.clone();
    let (holds, gather_holds) = spends::HoldBatcher::start(wallet.clone(), shutdown.clone());
    let service = app::Eligibility {
        db: db.clone(),
        idempotency: Idempotency::new(
            db.clone(),
            Duration::from_secs(config.idempotency.in_flight_lease_secs),
        )
        .waking(relay.waker())
        .waking(commands.waker()),
        campaigns: Arc::new(campaigns::Campaigns::new(db.clone())),
        segments,
        wallet: wallet.clone(),
        commands: commands.clone(),
        holds,
    };
    let retention = tessera_store::retention::Purger::start(
        db.clone(),
        SERVICE,
        vec![tessera_store::retention::Rule::new(
            "code_failures",
            "at",
            "",
            tessera_runtime::config::Kept::Jobs,
        )],
        &config.retention,
    )
    .await?;
    Ok(Component::new(SERVICE)
        .customer_data(privacy::customer_data(db.clone()))
        .dead_letters(Arc::new(tessera_store::queue::DeadLetters::new(
            db.clone(),
            SERVICE,
        )))
        .grpc(GRPC_NAME, move |routes| {
            routes.add_service(
                EligibilityServiceServer::new(service).max_decoding_message_size(8 * 1024 * 1024),
            );
        })
        .task(tokio::spawn(retention.run(shutdown.clone())))
        .task(gather_holds)
        .task(tokio::spawn(sweep(db.clone(), shutdown.clone())))
        .task(tokio::spawn(commands.run(shutdown.clone())))
        .task(tokio::spawn(relay.run(shutdown)))
        .probe(db.probe())
        .degraded_when(
            CACHE_HEALTH_NAME,
            Arc::new(move || {
                let (cache, degraded) = (cache.clone(), degraded.clone());
                Box::pin(async move {
                    let result = cache.ping().await.map_err(|e| e.to_string());
                    degraded.store(result.is_err(), Ordering::Relaxed);
                    result
                })
            }),
        ))
}

/// A one-second tick that never bunches up after a slow pass.
fn each_second() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Every second: releases reservations whose hold ended (several replicas may run it: each
/// is released once, under its row lock).
async fn sweep(db: Db, shutdown: CancellationToken) {
    let mut tick = each_second();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match crate::checkout::lifecycle::expire_due(&db, tessera_store::now_micros()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "reservations expired"),
            Err(e) => tracing::warn!(error = %e, "reservation sweep failed"),
        }
    }
}

/// Runs the eligibility alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
