//! Test harness: starts the whole suite in this process on port 0, on one of two backends.
//!
//! * [`Backend::Embedded`]: SQLite files in a fresh directory + the in-process cache.
//! * [`Backend::Production`]: PostgreSQL (`TESSERA_TEST_DATABASE_URL`, fresh schemas per
//!   test) + Redis (`TESSERA_TEST_REDIS_URL`, fresh key prefix per test). Without those
//!   variables the production run is skipped, unless `TESSERA_REQUIRE_BACKENDS=1`, which
//!   turns a missing backend into a failure.
//!
//! [`backend_tests!`] writes each test once and runs it on both.

use std::time::Duration;

use tessera::Suite;
use tessera_runtime::{Config, RequestContext};
use tessera_store::Db;
use tokio_util::sync::CancellationToken;

/// Where a test suite keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite + in-process cache.
    Embedded,
    /// PostgreSQL + Redis.
    Production,
}

/// Tenant of the bootstrap admin key.
pub const TENANT: &str = "default";

/// A running suite plus what a test needs to talk to it.
pub struct TestSuite {
    pub backend: Backend,
    pub config: Config,
    pub base_url: String,
    pub grpc_url: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    suite: Option<Suite>,
    shutdown: CancellationToken,
    /// Set once [`TestSuite::cleanup`] removed the data; otherwise dropping the suite does.
    cleaned: bool,
}

/// Whether the benchmark-sized cases run at full size (`TESSERA_TEST_FULL=1`, as
/// `just verify-full` sets): the 2,000-way budget race and 1,000 ledger property cases.
/// By default (CI, `cargo test`) they run at a size that still races and still explores,
/// in a fraction of the time.
pub fn full_size() -> bool {
    std::env::var("TESSERA_TEST_FULL").as_deref() == Ok("1")
}

fn required() -> bool {
    std::env::var("TESSERA_REQUIRE_BACKENDS").as_deref() == Ok("1")
}

/// The configuration for a fresh, isolated suite on `backend`, or None to skip.
pub fn test_config(backend: Backend) -> Option<Config> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut config = Config {
        data_dir: std::env::temp_dir().join(format!("tessera-test-{id}")),
        bootstrap_admin_key: Some(format!("tsk_test_admin_{id}")),
        ..Config::default()
    };
    config.outbox.poll_interval_ms = 50;
    // Test sinks listen on loopback.
    config.webhooks.allowed_hosts = vec!["127.0.0.1".into()];
    // Four attempts a second apart: a dead letter within seconds.
    config.webhooks.retry_schedule_secs = vec![0, 1, 1, 1];
    config.database.connect_timeout_secs = 5;
    // Tests drive many requests per key and customer; the rate-limit test turns them on.
    config.gateway.rate_limit_per_key_per_minute = 0;
    config.gateway.rate_limit_per_customer_per_minute = 0;
    if backend == Backend::Production {
        // A shared database needs the master key configured (SQLite suites keep theirs in
        // their data directory).
        config.secrets.master_key = Some(tessera_runtime::sealing::new_key_text("test"));
        let (Ok(db), Ok(redis)) = (
            std::env::var("TESSERA_TEST_DATABASE_URL"),
            std::env::var("TESSERA_TEST_REDIS_URL"),
        ) else {
            assert!(
                !required(),
                "TESSERA_REQUIRE_BACKENDS=1 but TESSERA_TEST_DATABASE_URL / TESSERA_TEST_REDIS_URL are not set"
            );
            eprintln!(
                "skipped: PostgreSQL/Redis not configured (set TESSERA_TEST_DATABASE_URL and TESSERA_TEST_REDIS_URL)"
            );
            return None;
        };
        config.database.url = Some(db);
        config.database.schema_prefix = format!("t{}_", &id[..12]);
        config.database.max_connections = 5;
        config.cache.redis_url = Some(redis);
        config.cache.key_prefix = format!("tessera-test-{id}");
    }
    config.validate().expect("test config is valid");
    Some(config)
}

async fn listen() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0")
}

impl TestSuite {
    /// Starts a fresh suite, or returns None when the backend is not configured (skip).
    pub async fn start(backend: Backend) -> Option<Self> {
        let config = test_config(backend)?;
        Some(Self::start_with(backend, config, false).await)
    }

    /// Starts a suite on `config` (a fresh one from [`test_config`], or the config of a
    /// stopped suite to restart on its data). With `notification_down`, the services are
    /// told notification lives on a port where nothing listens.
    pub async fn start_with(backend: Backend, config: Config, notification_down: bool) -> Self {
        tessera_runtime::telemetry::init_for_tests();
        let shutdown = CancellationToken::new();
        let (grpc, http) = (listen().await, listen().await);
        let mut config = config.with_all_peers_at(grpc.local_addr().expect("bound"));
        if notification_down {
            config.peers.notification_url = "http://127.0.0.1:1".into();
        }
        let suite = tessera::start_with_peers(config.clone(), grpc, http, shutdown.clone())
            .await
            .expect("suite starts");
        Self {
            backend,
            base_url: format!("http://{}", suite.http_addr),
            grpc_url: format!("http://{}", suite.grpc_addr),
            admin_key: config.bootstrap_admin_key.clone().expect("test key"),
            http: reqwest::Client::new(),
            config,
            suite: Some(suite),
            shutdown,
            cleaned: false,
        }
    }

    /// Stops the suite gracefully (data is kept: see [`TestSuite::cleanup`]).
    pub async fn stop(&mut self) {
        if let Some(suite) = self.suite.take() {
            self.shutdown.cancel();
            suite.wait().await.expect("suite stops cleanly");
        }
    }

    /// The shutdown token of the running suite.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Takes the running suite out (to wait for it after triggering shutdown).
    pub fn take_suite(&mut self) -> Option<Suite> {
        self.suite.take()
    }

    /// Stops the suite and removes its data (SQLite directory, PostgreSQL schemas).
    pub async fn cleanup(mut self) {
        self.stop().await;
        drop_data(&self.config, self.backend).await;
        self.cleaned = true;
    }

    /// A direct connection to one service's database (to check what was written).
    pub async fn db(&self, service: &str) -> Db {
        Db::connect(&self.config, service)
            .await
            .expect("db connects")
    }

    /// A gRPC channel to the suite.
    pub fn channel(&self) -> tessera_runtime::grpc::Channel {
        self.channel_with_deadline(Duration::from_secs(10))
    }

    /// A gRPC channel whose calls may wait `deadline` (thousands of calls at once queue).
    pub fn channel_with_deadline(&self, deadline: Duration) -> tessera_runtime::grpc::Channel {
        tessera_runtime::grpc::channel(&self.grpc_url, deadline).expect("channel")
    }

    /// A context as the gateway would send for the admin key.
    pub fn ctx(&self, tenant: &str) -> RequestContext {
        RequestContext {
            tenant_id: tenant.into(),
            principal: "test".into(),
            role: "admin".into(),
            request_id: String::new(),
        }
    }

    /// `POST {path}` with a JSON body, the admin key and an idempotency key.
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.admin_key)
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("request sent")
    }

    /// `method path` with API key `key` (none: no key), a fresh `Idempotency-Key` and, unless
    /// null, `body` as JSON; the status and the JSON answer (null when it is not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
        key: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string());
        if !body.is_null() {
            request = request.json(body);
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// `GET {path}` with the admin key.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .expect("request sent")
    }
}

/// Removes a suite's data: its SQLite directory, or its PostgreSQL schemas.
async fn drop_data(config: &Config, backend: Backend) {
    if backend == Backend::Production {
        futures::future::join_all(tessera::Service::ALL.iter().map(|service| async move {
            if let Ok(db) = Db::connect(config, service.name()).await {
                let _ = db.drop_schema().await;
            }
        }))
        .await;
    }
    let _ = std::fs::remove_dir_all(&config.data_dir);
}

/// A test that fails (or never calls [`TestSuite::cleanup`]) still leaves no schema or
/// directory behind: the suite is stopped and its data removed when it is dropped. Suites
/// restarted on the same data live until the end of the test, so none loses data early.
impl Drop for TestSuite {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.shutdown.cancel();
        let (config, backend) = (self.config.clone(), self.backend);
        // Drop cannot await; a thread with its own runtime does the async clean-up.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(drop_data(&config, backend)))
        })
        .join();
    }
}

/// Runs a query returning one integer (a count or a sum) on `db`.
pub async fn scalar(db: &Db, sql: &str, values: Vec<sea_orm::Value>) -> i64 {
    use sea_orm::ConnectionTrait;
    let conn = db.conn();
    conn.query_one_raw(tessera_store::stmt(conn, sql, values))
        .await
        .expect("query runs")
        .expect("one row")
        .try_get_by_index::<i64>(0)
        .expect("an integer")
}

/// Polls `check` every 20 ms until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes each listed `async fn name(suite: TestSuite)` as two tests, `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(suite) = $crate::TestSuite::start($crate::Backend::Embedded).await {
                        super::$name(suite).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(suite) = $crate::TestSuite::start($crate::Backend::Production).await {
                        super::$name(suite).await;
                    }
                }
            )*
        }
    };
}

/// Forwards a local port to a TCP service (Redis, PostgreSQL) until cut: what a network
/// partition looks like to the suite.
pub struct Proxy {
    pub port: u16,
    target: String,
    tasks: std::sync::Arc<tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let proxy = Self {
            port,
            target,
            tasks: std::sync::Arc::default(),
        };
        proxy.serve(listener).await;
        proxy
    }

    async fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, tasks) = (self.target.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().await.push(pipe);
            }
        });
        self.tasks.lock().await.push(accept);
    }

    /// Closes the port and every connection through it.
    pub async fn cut(&self) {
        for task in self.tasks.lock().await.drain(..) {
            task.abort();
        }
    }

    /// Opens the same port again.
    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind the proxy port");
        self.serve(listener).await;
    }
}
