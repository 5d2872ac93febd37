//! What the process-level tests share: free ports, `tessera serve` child processes that are
//! killed when dropped, and a channel that waits for a service to come up.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `tessera serve <service>` process, killed (if still running) when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reaped");
    }
}

/// The suite's shared secret in these tests: the processes they start sign their calls to
/// each other with it, and the test signs its own calls with it (as a service of the suite).
pub const SECRET: &str = "process-tests-internal-secret-0123456789";
/// The master key of the processes' sealed secrets (the same in every one of them, as the
/// chart's Secret makes it).
pub const MASTER_KEY: &str = "process-test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// `message` as a call on behalf of the `default` tenant with `role`, signed with
/// [`SECRET`] (so no gateway is needed to check an API key).
#[allow(dead_code)] // not every test binary sends calls of its own
pub fn request<T>(role: &str, message: T) -> tonic::Request<T> {
    tessera_runtime::auth::install_secret(Some(SECRET)).expect("one secret per test process");
    tessera_runtime::RequestContext {
        tenant_id: "default".into(),
        principal: "process-test".into(),
        role: role.into(),
        request_id: String::new(),
    }
    .request(message)
}

/// Starts `tessera serve <service>` configured only by `env` (and [`SECRET`]).
pub fn serve(service: &str, env: &HashMap<String, String>) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", service])
        .env_clear()
        .envs(env)
        .env("TESSERA_INTERNAL_SECRET", SECRET)
        .env("TESSERA_SECRETS__MASTER_KEY", MASTER_KEY)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    Process(child)
}

/// A channel to the service on `port`, once it accepts connections (within a minute).
pub async fn channel(port: u16) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .timeout(Duration::from_secs(10));
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        assert!(Instant::now() < deadline, "service on {port} never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
