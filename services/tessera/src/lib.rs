//! The suite as one program. [`start`] runs every service in one process — all gRPC services
//! on one listener, the gateway on another, each service on its own SQLite file (or
//! PostgreSQL schema) — calling each other over real loopback gRPC, exactly as they do when
//! deployed apart. [`serve`] runs a single service; [`migrate`] applies migrations.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_runtime::Config;
use tessera_runtime::component::{self, PROBE_INTERVAL};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The deployable services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Catalog,
    Eligibility,
    Wallet,
    CampaignScheduler,
    Notification,
    Gateway,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Catalog,
        Service::Eligibility,
        Service::Wallet,
        Service::CampaignScheduler,
        Service::Notification,
        Service::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Catalog => tessera_catalog::SERVICE,
            Service::Eligibility => tessera_eligibility::SERVICE,
            Service::Wallet => tessera_wallet::SERVICE,
            Service::CampaignScheduler => tessera_scheduler::SERVICE,
            Service::Notification => tessera_notification::SERVICE,
            Service::Gateway => tessera_gateway::SERVICE,
        }
    }
}

/// The running suite.
pub struct Suite {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The bootstrap admin key, when it was created by this start.
    pub new_admin_key: Option<String>,
    shutdown: CancellationToken,
    grpc: JoinHandle<anyhow::Result<()>>,
    http: JoinHandle<anyhow::Result<()>>,
}

impl Suite {
    /// Stops everything gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the suite stops (its shutdown token fired, or a server failed).
    pub async fn wait(self) -> anyhow::Result<()> {
        let (grpc, http) = tokio::join!(self.grpc, self.http);
        grpc??;
        http??;
        Ok(())
    }
}

/// Starts every service in this process on the given listeners. Peers are pointed at the
/// gRPC listener, whatever `config.peers` says.
pub async fn start(
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Suite> {
    let config = config.with_all_peers_at(grpc.local_addr()?);
    start_with_peers(config, grpc, http, shutdown).await
}

/// Like [`start`], but keeps `config.peers` as given (tests point a peer elsewhere to
/// simulate it being down).
pub async fn start_with_peers(
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Suite> {
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    tessera_runtime::auth::install_secret(config.internal_secret.as_deref())?;
    if let Some(addr) = config.metrics_addr {
        tessera_runtime::metrics::spawn(addr, shutdown.clone()).await?;
    }
    // The services share nothing while they start (each connects to and migrates its own
    // database), so they start together: a suite is up in the time of its slowest service.
    let (catalog, eligibility, wallet, scheduler, notification, gateway) = tokio::try_join!(
        tessera_catalog::build(&config, shutdown.clone()),
        tessera_eligibility::build(&config, shutdown.clone()),
        tessera_wallet::build(&config, shutdown.clone()),
        tessera_scheduler::build(&config, shutdown.clone()),
        tessera_notification::build(&config, shutdown.clone()),
        tessera_gateway::Gateway::build(&config),
    )?;
    let components = vec![
        catalog,
        eligibility,
        wallet,
        scheduler,
        notification,
        gateway.component(),
    ];
    let new_admin_key = gateway.new_admin_key.clone();
    let drain = Duration::from_secs(config.shutdown_drain_secs);
    let grpc = tokio::spawn(component::serve(
        grpc,
        components,
        Some(gateway.key_verifier()),
        drain,
        PROBE_INTERVAL,
        shutdown.clone(),
    ));
    let http = tokio::spawn(gateway.serve(http, shutdown.clone()));
    Ok(Suite {
        grpc_addr,
        http_addr,
        new_admin_key,
        shutdown,
        grpc,
        http,
    })
}

/// Runs one service alone: a gRPC service on `grpc_addr`; the gateway on `http_addr` (REST)
/// and `grpc_addr` (its erasure jobs over gRPC).
pub async fn serve(
    service: Service,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Services running apart trust each other's calls by the shared secret: every process
    // must be given the same one.
    let Some(secret) = config.internal_secret.as_deref() else {
        anyhow::bail!(
            "internal_secret (TESSERA_INTERNAL_SECRET) is required when a service runs alone"
        );
    };
    tessera_runtime::auth::install_secret(Some(secret))?;
    let listener = tessera_runtime::bin::bind(config.grpc_addr).await?;
    // With `metrics_addr` set, metrics are served on their own port (the gateway's then
    // leave its public port); without it, a gRPC service has none and the gateway serves
    // them on its HTTP port.
    if let Some(addr) = config.metrics_addr {
        tessera_runtime::metrics::spawn(addr, shutdown.clone()).await?;
    }
    match service {
        Service::Catalog => tessera_catalog::run(config, listener, shutdown).await,
        Service::Eligibility => tessera_eligibility::run(config, listener, shutdown).await,
        Service::Wallet => tessera_wallet::run(config, listener, shutdown).await,
        Service::CampaignScheduler => tessera_scheduler::run(config, listener, shutdown).await,
        Service::Notification => tessera_notification::run(config, listener, shutdown).await,
        Service::Gateway => {
            let http = tessera_runtime::bin::bind(config.http_addr).await?;
            tessera_gateway::run(config, http, listener, shutdown).await
        }
    }
}

/// Applies the migrations of `service`.
pub async fn migrate(service: Service, config: &Config) -> anyhow::Result<()> {
    match service {
        Service::Catalog => tessera_catalog::migrate(config).await,
        Service::Eligibility => tessera_eligibility::migrate(config).await,
        Service::Wallet => tessera_wallet::migrate(config).await,
        Service::CampaignScheduler => tessera_scheduler::migrate(config).await,
        Service::Notification => tessera_notification::migrate(config).await,
        Service::Gateway => tessera_gateway::migrate(config).await,
    }
}
