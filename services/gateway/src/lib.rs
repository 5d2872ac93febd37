//! The HTTP gateway: REST/JSON for touchpoints and consoles, translated to the services'
//! gRPC APIs. Thin by design: it authenticates API keys (tenant + role), checks the role,
//! validates and parses JSON strictly, passes the `Idempotency-Key`, request id and trace
//! context on, and renders errors in one JSON shape. Business rules live in the services.

mod api;
mod audit;
mod campaigns;
mod catalog;
mod eligibility;
mod erasure_grpc;
mod erasures;
mod error;
mod extract;
mod key_routes;
mod keys;
mod messages;
mod migrations;
mod observe;
mod privacy;
mod query;
mod queues;
mod ratelimit;
mod readiness;
mod routes;
mod transcode;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::{Config, grpc};
use tessera_store::Db;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use keys::{ApiKeys, Role};
pub use migrations::Migrator;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "gateway";

/// The gRPC service the gateway serves (health name).
pub const ERASURE_GRPC_NAME: &str = "tessera.ops.v1.ErasureService";

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub(crate) keys: ApiKeys,
    pub(crate) db: Db,
    pub(crate) wallet: WalletServiceClient<grpc::Channel>,
    /// The services the gateway calls, for readiness.
    pub(crate) peers: Vec<Peer>,
    pub(crate) catalog: CatalogServiceClient<grpc::Channel>,
    pub(crate) eligibility: EligibilityServiceClient<grpc::Channel>,
    pub(crate) scheduler: SchedulerServiceClient<grpc::Channel>,
    pub(crate) notification: NotificationServiceClient<grpc::Channel>,
    /// The dead letters of the services that keep work queues, by service name.
    pub(crate) queues: std::collections::BTreeMap<
        &'static str,
        tessera_proto::ops::v1::queue_service_client::QueueServiceClient<grpc::Channel>,
    >,
    /// The personal data of each service (export), by service name.
    pub(crate) privacy: std::collections::BTreeMap<
        &'static str,
        tessera_proto::ops::v1::privacy_service_client::PrivacyServiceClient<grpc::Channel>,
    >,
    /// Erasure jobs (GDPR).
    pub(crate) erasures: erasures::Erasures,
    /// The gateway's own dead letters (erasure commands the services refused), answered
    /// in process.
    pub(crate) own_queues: Arc<tessera_runtime::ops::Queues>,
    /// Set on shutdown: `/readyz` answers 503 while the listener drains.
    pub(crate) draining: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) max_body_bytes: usize,
    pub(crate) limits: Arc<ratelimit::Limits>,
    /// `/openapi.json`, rendered once when the routes are built.
    pub(crate) openapi: std::sync::OnceLock<axum::body::Bytes>,
}

/// A service the gateway calls: its name, its entry on the gRPC health service, its channel.
#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) name: &'static str,
    pub(crate) health: &'static str,
    pub(crate) channel: grpc::Channel,
}

/// A gateway ready to serve.
pub struct Gateway {
    router: Router,
    erasures: erasures::Erasures,
    dead_letters: Arc<tessera_store::queue::DeadLetters>,
    /// The admin API key created by [`Gateway::build`] on first start, to show the operator
    /// once (it is stored hashed).
    pub new_admin_key: Option<String>,
    keys: ApiKeys,
    /// Purges the audit log and the plumbing tables past their retention.
    retention: tessera_store::queue::Worker,
    /// Delivers erasures to the services (the gateway's command outbox).
    commands: tessera_store::queue::Worker,
    /// Between shutdown and the listener closing (`shutdown_drain_secs`).
    drain: std::time::Duration,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

/// What the gateway keeps besides the plumbing tables: the audit log
/// (`retention.audit_days`).
pub fn retention_rules() -> Vec<tessera_store::retention::Rule> {
    vec![audit::retention_rule()]
}

/// Applies the gateway's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

impl Gateway {
    /// Connects, migrates, installs the bootstrap admin key and builds the router.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let db = Db::open::<Migrator>(config, SERVICE).await?;
        let keys = ApiKeys::new(db.clone());
        let new_admin_key = keys
            .bootstrap(config.bootstrap_admin_key.as_deref())
            .await
            .map_err(|e| anyhow::anyhow!("bootstrap admin key: {e}"))?;
        let retention = tessera_store::retention::Purger::start(
            db.clone(),
            SERVICE,
            retention_rules(),
            &config.retention,
        )
        .await?;
        let parts_db = db.clone();
        let commands = tessera_store::queue::commands::worker_with(
            db.clone(),
            SERVICE,
            config,
            move |relay| {
                Arc::new(erasures::Parts {
                    relay: Arc::new(relay),
                    db: parts_db,
                })
            },
        )?;
        let erasures = erasures::Erasures::new(db.clone(), commands.waker());
        let dead_letters = Arc::new(tessera_store::queue::DeadLetters::new(db.clone(), SERVICE));
        // The services the gateway calls, by the name the ops APIs and readiness use; one
        // channel each, shared by every client of that service.
        use tessera_proto::{catalog, eligibility, notification, scheduler, wallet};
        let peers = [
            (
                "catalog",
                &config.peers.catalog_url,
                catalog::v1::catalog_service_server::SERVICE_NAME,
            ),
            (
                "eligibility",
                &config.peers.eligibility_url,
                eligibility::v1::eligibility_service_server::SERVICE_NAME,
            ),
            (
                "campaign-scheduler",
                &config.peers.scheduler_url,
                scheduler::v1::scheduler_service_server::SERVICE_NAME,
            ),
            (
                "wallet",
                &config.peers.wallet_url,
                wallet::v1::wallet_service_server::SERVICE_NAME,
            ),
            (
                "notification",
                &config.peers.notification_url,
                notification::v1::notification_service_server::SERVICE_NAME,
            ),
        ]
        .into_iter()
        .map(|(name, url, health)| {
            Ok(Peer {
                name,
                health,
                channel: grpc::channel(url, config.peer_timeout())?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
        let channel = |name: &str| {
            peers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.channel.clone())
                .expect("every peer is in the table")
        };
        let services: Vec<(&'static str, grpc::Channel)> =
            peers.iter().map(|p| (p.name, p.channel.clone())).collect();
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let state = AppState {
            keys: keys.clone(),
            db,
            wallet: WalletServiceClient::new(channel("wallet")),
            catalog: CatalogServiceClient::new(channel("catalog")),
            eligibility: EligibilityServiceClient::new(channel("eligibility")),
            scheduler: SchedulerServiceClient::new(channel("campaign-scheduler")),
            notification: NotificationServiceClient::new(channel("notification")),
            queues: services
                .iter()
                .map(|(name, channel)| {
                    let client =
                        tessera_proto::ops::v1::queue_service_client::QueueServiceClient::new(
                            channel.clone(),
                        );
                    (*name, client)
                })
                .collect(),
            privacy: services
                .iter()
                .map(|(name, channel)| {
                    let client =
                        tessera_proto::ops::v1::privacy_service_client::PrivacyServiceClient::new(
                            channel.clone(),
                        );
                    (*name, client)
                })
                .collect(),
            erasures: erasures.clone(),
            own_queues: Arc::new(tessera_runtime::ops::Queues::new(
                [(
                    SERVICE,
                    dead_letters.clone() as Arc<dyn tessera_runtime::ops::DeadLetters>,
                )]
                .into(),
            )),
            draining: draining.clone(),
            max_body_bytes: config.gateway.max_body_bytes,
            limits: Arc::new(ratelimit::Limits::new(&config.gateway)),
            openapi: std::sync::OnceLock::new(),
            peers,
        };
        let router = routes::router(
            Arc::new(state),
            Duration::from_millis(config.gateway.request_timeout_ms),
            config.metrics_addr.is_none(),
        );
        Ok(Self {
            router,
            erasures,
            dead_letters,
            new_admin_key,
            keys,
            retention,
            commands,
            drain: std::time::Duration::from_secs(config.shutdown_drain_secs),
            draining,
        })
    }

    /// The gateway's gRPC services (erasure jobs) and its dead letters, served on the gRPC
    /// listener of the process (the shared one under `tessera up`).
    pub fn component(&self) -> tessera_runtime::component::Component {
        let erasing = erasure_grpc::Erasing(self.erasures.clone());
        tessera_runtime::component::Component::new(SERVICE)
            .dead_letters(self.dead_letters.clone())
            .grpc(ERASURE_GRPC_NAME, move |routes| {
                routes.add_service(
                    tessera_proto::ops::v1::erasure_service_server::ErasureServiceServer::new(
                        erasing,
                    ),
                );
            })
    }

    /// How gRPC servers in this process resolve API keys (the same store the HTTP routes use).
    pub fn key_verifier(&self) -> Arc<dyn tessera_runtime::auth::KeyVerifier> {
        self.keys.verifier()
    }

    /// Serves HTTP on `listener` until `shutdown`; in-flight requests finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "HTTP gateway listening");
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let purging = tokio::spawn(self.retention.run(shutdown.clone()));
        let erasing = tokio::spawn(self.commands.run(shutdown.clone()));
        // On shutdown `/readyz` turns 503 at once, so load balancers stop sending; the
        // listener keeps serving for the drain, then closes and in-flight requests finish.
        let (drain, draining) = (self.drain, self.draining.clone());
        axum::serve(listener, self.router)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                draining.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(?drain, "readiness 503; draining");
                tokio::time::sleep(drain).await;
            })
            .await?;
        let _ = purging.await;
        let _ = erasing.await;
        tracing::info!(%addr, "HTTP gateway stopped");
        Ok(())
    }
}

/// Creates an API key with `role` for `tenant` (an operator giving a new tenant its first
/// admin key) and returns it: it is stored only as a hash, so this is the one time it is seen.
pub async fn create_key(
    config: &Config,
    tenant: &str,
    role: &str,
    name: &str,
) -> anyhow::Result<String> {
    if !tessera_runtime::context::is_valid_tenant_id(tenant) {
        anyhow::bail!("tenant: 1 to 64 of a-z 0-9 _ -, starting with a letter or digit");
    }
    let role = Role::parse(role).ok_or_else(|| {
        let roles: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        anyhow::anyhow!("role: one of {}", roles.join(", "))
    })?;
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let key = keys::generate();
    ApiKeys::new(db)
        .insert(tenant, name, role, &key)
        .await
        .map_err(|e| anyhow::anyhow!("storing the key: {e}"))?;
    Ok(key)
}

/// Runs the gateway alone until `shutdown`: REST on `http`, its gRPC services (erasure
/// jobs, its dead letters) on `grpc`, API keys resolved from its own store.
pub async fn run(
    config: Config,
    http: TcpListener,
    grpc: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let gateway = Gateway::build(&config).await?;
    if let Some(key) = &gateway.new_admin_key {
        tracing::warn!("created bootstrap admin API key for tenant `default`: {key} (shown once)");
    }
    let grpc = tokio::spawn(tessera_runtime::component::serve(
        grpc,
        vec![gateway.component()],
        Some(gateway.key_verifier()),
        Duration::from_secs(config.shutdown_drain_secs),
        tessera_runtime::component::PROBE_INTERVAL,
        shutdown.clone(),
    ));
    let http = gateway.serve(http, shutdown.clone()).await;
    // Either listener failing stops the other.
    shutdown.cancel();
    let grpc = grpc.await.map_err(anyhow::Error::from).and_then(|r| r);
    http.and(grpc)
}
