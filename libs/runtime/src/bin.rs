//! What the `tessera` binary's `main` needs before it serves: the configuration (file or
//! environment) and listeners bound early, with errors that name the address.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::Config;
use tokio::net::TcpListener;

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
