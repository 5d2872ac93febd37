//! The notification service. This part is the event intake: every service's outbox relay
//! publishes here, and each event is stored once (de-duplicated by tenant and event id, since
//! relays deliver at least once) in the event log that webhooks and channels will consume.

mod service;

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_proto::notification::v1::notification_service_server::NotificationServiceServer;
use tessera_runtime::Config;
use tessera_runtime::component::{self, Component};
use tessera_store::Db;
use tessera_store::migrate::{Migration, col, index, plumbing, table};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "notification";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.notification.v1.NotificationService";

/// Notification's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(Migration {
            name: "m0100_events",
            tables: || {
                vec![table(
                    "events",
                    vec![
                        col::serial("seq"),
                        col::text("tenant_id"),
                        col::text("event_id"),
                        col::text("event_type"),
                        col::text("source"),
                        col::big("occurred_at"),
                        col::big("received_at"),
                        col::blob("data"),
                        col::text("traceparent"),
                    ],
                    &[],
                )]
            },
            indexes: || {
                vec![
                    index(
                        "events_tenant_event",
                        "events",
                        &["tenant_id", "event_id"],
                        true,
                    ),
                    index(
                        "events_tenant_type",
                        "events",
                        &["tenant_id", "event_type", "seq"],
                        false,
                    ),
                ]
            },
        }));
        all
    }
}

/// Applies notification's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// Connects, migrates and assembles the notification service.
pub async fn build(config: &Config, _shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let service = service::Notification { db: db.clone() };
    Ok(Component::new(SERVICE)
        .grpc(GRPC_NAME, move |routes| {
            routes.add_service(NotificationServiceServer::new(service));
        })
        .probe(db.probe()))
}

/// Runs notification alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
