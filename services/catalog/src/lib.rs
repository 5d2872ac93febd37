//! The catalog service: reward definitions, code pools and publication. It boots with its own tables (the plumbing tables so
//! far), serves health and reflection and registers `tessera.catalog.v1.CatalogService`; the domain RPCs
//! arrive with the issue that builds them.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_proto::catalog::v1::catalog_service_server::{CatalogService, CatalogServiceServer};
use tessera_runtime::Config;
use tessera_runtime::component::{self, Component};
use tessera_store::Db;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "catalog";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.catalog.v1.CatalogService";

/// The catalog's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        tessera_store::migrate::plumbing()
    }
}

struct Service;

impl CatalogService for Service {}

/// Applies the catalog's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the catalog.
pub async fn build(config: &Config, _shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    Ok(Component::new(SERVICE)
        .grpc(GRPC_NAME, |routes| {
            routes.add_service(CatalogServiceServer::new(Service));
        })
        .probe(db.probe()))
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
