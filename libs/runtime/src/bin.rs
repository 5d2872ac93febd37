//! The `main` of a single-service binary (`tessera-wallet`, …), in the order the house style
//! asks for: config → telemetry guard → signal handling → bind early → serve until shutdown
//! → flush telemetry (guard dropped last).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Config, shutdown, telemetry};

/// Environment variable naming an optional TOML configuration file.
pub const CONFIG_FILE_ENV: &str = "TESSERA_CONFIG_FILE";

/// Loads the configuration from `file` or, when absent, from `TESSERA_CONFIG_FILE`.
pub fn load_config(file: Option<PathBuf>) -> anyhow::Result<Config> {
    let file = file.or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
    Ok(Config::load(file.as_deref())?)
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Runs one service binary. `http` selects the HTTP address (gateway) over the gRPC one.
pub fn service_main<F, Fut>(service: &'static str, http: bool, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = load_config(None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let _telemetry = telemetry::init(&config.telemetry, service)?;
        let shutdown = shutdown::on_signal();
        let listener = bind(if http {
            config.http_addr
        } else {
            config.grpc_addr
        })
        .await?;
        if let (Some(addr), false) = (config.metrics_addr, http) {
            crate::metrics::spawn(addr, shutdown.clone()).await?;
        }
        run(config, listener, shutdown).await
    })
}
