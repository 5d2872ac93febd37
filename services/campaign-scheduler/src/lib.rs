//! The campaign-scheduler service: campaigns, their state machine and durable time-based jobs. It boots with its own tables (the plumbing tables so
//! far), serves health and reflection and registers `tessera.scheduler.v1.SchedulerService`; the domain RPCs
//! arrive with the issue that builds them.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_proto::scheduler::v1::scheduler_service_server::{
    SchedulerService, SchedulerServiceServer,
};
use tessera_runtime::Config;
use tessera_runtime::component::{self, Component};
use tessera_store::Db;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "campaign-scheduler";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.scheduler.v1.SchedulerService";

/// The campaign-scheduler's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        tessera_store::migrate::plumbing()
    }
}

struct Service;

impl SchedulerService for Service {}

/// Applies the campaign-scheduler's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the campaign-scheduler.
pub async fn build(config: &Config, _shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    Ok(Component::new(SERVICE)
        .grpc(GRPC_NAME, |routes| {
            routes.add_service(SchedulerServiceServer::new(Service));
        })
        .probe(db.probe()))
}

/// Runs the campaign-scheduler alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
