//! The eligibility service: customer facts, rules, segments, qualification and redemption. It boots with its own tables (the plumbing tables so
//! far) and connects the segment cache (Redis or in-process), serves health and reflection and registers `tessera.eligibility.v1.EligibilityService`; the domain RPCs
//! arrive with the issue that builds them.

use std::sync::Arc;
use std::time::Duration;

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_proto::eligibility::v1::eligibility_service_server::{
    EligibilityService, EligibilityServiceServer,
};
use tessera_runtime::Config;
use tessera_runtime::component::{self, Component};
use tessera_store::Db;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "eligibility";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.eligibility.v1.EligibilityService";

/// The eligibility's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        tessera_store::migrate::plumbing()
    }
}

struct Service;

impl EligibilityService for Service {}

/// Applies the eligibility's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the eligibility.
pub async fn build(config: &Config, _shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let cache = tessera_cache::open(
        config.cache.redis_url.as_deref(),
        &config.cache.key_prefix,
        Duration::from_secs(config.cache.ttl_secs),
        Duration::from_secs(config.database.connect_timeout_secs),
    )
    .await?;
    tracing::info!(cache = cache.kind(), "segment cache ready");
    Ok(Component::new(SERVICE)
        .grpc(GRPC_NAME, |routes| {
            routes.add_service(EligibilityServiceServer::new(Service));
        })
        .probe(db.probe())
        .probe(Arc::new(move || {
            let cache = cache.clone();
            Box::pin(async move { cache.ping().await.map_err(|e| e.to_string()) })
        })))
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
