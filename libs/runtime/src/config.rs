//! Configuration, loaded in layers with figment: built-in defaults, then an optional TOML
//! file, then `TESSERA_`-prefixed environment variables (`__` separates nested keys, e.g.
//! `TESSERA_DATABASE__URL`), then validated once at start. One struct serves every service
//! and the all-in-one process; each service reads only the sections it needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Environment variables with the `TESSERA_` prefix that are not configuration keys (the
/// config file path, and switches of the test suite), so the loader ignores them.
const NON_CONFIG_ENV: &[&str] = &[
    "config_file",
    "test_database_url",
    "test_redis_url",
    "require_backends",
    "test_full",
    "proptest_cases",
    "proptest_seed",
    "bench",
    "bench_on",
];

/// The whole configuration. Every field has a default suitable for `tessera up`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on (`TESSERA_GRPC_ADDR`).
    pub grpc_addr: SocketAddr,
    /// Address the HTTP gateway listens on (`TESSERA_HTTP_ADDR`).
    pub http_addr: SocketAddr,
    /// Directory for the embedded SQLite files (`TESSERA_DATA_DIR`).
    pub data_dir: PathBuf,
    /// API key to install as the bootstrap admin key of the `default` tenant
    /// (`TESSERA_BOOTSTRAP_ADMIN_KEY`). When unset, `tessera up` generates one on first start.
    pub bootstrap_admin_key: Option<String>,
    /// Where a gRPC service running alone serves Prometheus `/metrics`
    /// (`TESSERA_METRICS_ADDR`). Unset: not served. The gateway always serves `/metrics` on
    /// `http_addr`, which in `tessera up` covers the whole process.
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds between health flipping to NOT_SERVING and the listeners closing on shutdown,
    /// so load balancers stop routing before connections are refused.
    pub shutdown_drain_secs: u64,
    /// The suite's shared secret (`TESSERA_INTERNAL_SECRET`, at least 32 characters): the
    /// services sign the context of their calls to each other with it, so no API key can
    /// claim another tenant or the `system` role. Required when services run apart (one
    /// Deployment each: the chart keeps it in a Secret); `tessera up` runs every service in
    /// one process and makes up its own when unset.
    pub internal_secret: Option<String>,
    pub secrets: SecretsConfig,
    pub retention: RetentionConfig,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub telemetry: TelemetryConfig,
    pub peers: PeersConfig,
    pub outbox: OutboxConfig,
    pub scheduler: SchedulerConfig,
    pub webhooks: WebhooksConfig,
    pub channels: ChannelsConfig,
    pub idempotency: IdempotencyConfig,
    pub gateway: GatewayConfig,
}

/// Where a service keeps its tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` for production. Unset: one SQLite file per service under `data_dir`.
    pub url: Option<String>,
    /// PostgreSQL only: each service keeps its tables in the schema
    /// `<schema_prefix><service>` (e.g. `wallet`), so services sharing one database never
    /// see each other's tables.
    pub schema_prefix: String,
    /// Connection pool size per service.
    pub max_connections: u32,
    /// Seconds to keep retrying the first connection before giving up.
    pub connect_timeout_secs: u64,
}

/// The segment cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://host:port/db`. Unset: the in-process cache (embedded default).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments (or tests) can share one Redis.
    pub key_prefix: String,
    /// Seconds a cached segment membership lives.
    pub ttl_secs: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logs and traces.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// `tracing` env-filter directive, e.g. `info,tessera_wallet=debug`. `RUST_LOG` wins when set.
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`, or `https://…` (TLS,
    /// trusting the Mozilla roots and `otlp_ca_file`). Unset: no export (trace ids are still
    /// generated and propagated).
    pub otlp_endpoint: Option<String>,
    /// A PEM file of the CA that signed an `https://` collector's certificate (a private CA).
    pub otlp_ca_file: Option<std::path::PathBuf>,
}

/// Where the other services are. In the all-in-one process they all point at `grpc_addr`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PeersConfig {
    pub catalog_url: String,
    pub eligibility_url: String,
    pub wallet_url: String,
    pub scheduler_url: String,
    pub notification_url: String,
    /// The HTTP gateway, which a service running alone asks who an API key is (gRPC
    /// callers authenticate with the gateway's keys).
    pub gateway_url: String,
    /// Deadline of every service-to-service call, in milliseconds.
    pub timeout_ms: u64,
}

/// Webhook delivery (notification).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Hosts (names or IP addresses) an endpoint may use even though they resolve to a
    /// loopback, private, link-local or metadata address: for tests and on-premise
    /// receivers. Empty: every such address is refused (the SSRF guard).
    pub allowed_hosts: Vec<String>,
    /// Seconds an endpoint has to answer; a slower answer is a failed attempt.
    pub timeout_secs: u64,
    /// Seconds of failures without a success after which an endpoint is disabled.
    pub disable_after_failing_secs: u64,
    /// Deliveries claimed per poll.
    pub batch_size: u32,
    /// Seconds before each attempt of a delivery: the first (0: at once), then after each
    /// failure; after the last, the delivery is dead (until replayed).
    pub retry_schedule_secs: Vec<u64>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            timeout_secs: 15,
            disable_after_failing_secs: 5 * 24 * 3600,
            batch_size: 200,
            retry_schedule_secs: vec![0, 5, 300, 1800, 7200, 18000, 36000, 36000],
        }
    }
}

/// Messages to customers (notification): e-mail over SMTP, SMS and push through a
/// generic HTTP provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// SMTP server: `smtp://host:port` (plain, for a local relay), `smtp://host?tls=required`
    /// (STARTTLS) or `smtps://user:password@host` (TLS). Unset: e-mails fail with REJECTED.
    pub smtp_url: Option<String>,
    /// SMS provider. Unset: SMS fail with REJECTED.
    pub sms: Option<HttpProviderConfig>,
    /// Push provider. Unset: push messages fail with REJECTED.
    pub push: Option<HttpProviderConfig>,
    /// Public base URL of the gateway, for unsubscribe links
    /// (`{public_url}/v1/unsubscribe?token=…`).
    pub public_url: String,
    /// Seconds before each attempt of a message: the first, then after each transient
    /// failure (a refusal is not retried).
    pub retry_schedule_secs: Vec<u64>,
    /// Seconds a provider or SMTP server has to answer.
    pub timeout_secs: u64,
    /// Messages claimed per poll.
    pub batch_size: u32,
}

/// A provider reached by an HTTP POST: the body is a minijinja template rendered with
/// `to`, `subject`, `text` and `message_id` (use the `tojson` filter), sent as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    /// Endpoint URL.
    pub url: String,
    /// Extra headers, e.g. `Authorization`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Body template.
    pub body: String,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            sms: None,
            push: None,
            public_url: "http://127.0.0.1:8080".into(),
            retry_schedule_secs: vec![0, 10, 60, 600, 3600],
            timeout_secs: 15,
            batch_size: 100,
        }
    }
}

/// The campaign scheduler's job workers and campaign sync.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Seconds a worker owns a claimed job; after that another replica may take it over.
    pub job_lease_secs: u64,
    /// Milliseconds between polls for due jobs when nothing woke the worker.
    pub job_poll_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            job_lease_secs: 30,
            job_poll_ms: 500,
        }
    }
}

/// The transactional outbox relay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Milliseconds between polls when no commit has woken the relay.
    pub poll_interval_ms: u64,
    /// Events delivered per batch.
    pub batch_size: u32,
    /// Seconds a relay owns a claimed batch; after that another relay may take it over.
    pub lease_secs: u64,
}

/// Master keys of the secrets stored sealed (`crate::sealing`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// The key that seals (`TESSERA_SECRETS__MASTER_KEY`): `<id>:<base64 of 32 bytes>`, the
    /// same in every replica. Unset: an embedded installation keeps one in
    /// `data_dir/master.key`; with a shared database it is derived from `internal_secret`
    /// (or, for one process without it, kept in `data_dir/master.key` too).
    pub master_key: Option<String>,
    /// Retired keys that still open what they sealed (`TESSERA_SECRETS__RETIRED_MASTER_KEYS`,
    /// comma-separated `<id>:<base64>`): during a rotation.
    pub retired_master_keys: String,
}

/// How long what grows with use is kept (`tessera_store::retention`); 0 keeps forever.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Minutes between purges (each service purges its own tables).
    pub interval_minutes: u64,
    /// Rows one delete statement removes at most.
    pub batch_rows: u64,
    /// The share of time (1–100 %) a purge works; it sleeps the rest, leaving the
    /// database to requests.
    pub busy_percent: u64,
    /// Hours a settled idempotency key answers a retry (at least 24).
    pub idempotency_hours: u64,
    /// Days a dead letter stays listed for replay.
    pub dead_letters_days: u64,
    /// Days received events, settled webhook deliveries and their attempts stay.
    pub events_days: u64,
    /// Days a finished message (sent, skipped, failed) stays in the customer's log.
    pub messages_days: u64,
    /// Days finished jobs (code generation, the scheduler's runs) and code-guess failures stay.
    pub jobs_days: u64,
    /// Days the audit log keeps an entry.
    pub audit_days: u64,
    /// Per-tenant overrides of the periods above, by tenant id (TOML:
    /// `[retention.tenants.acme] audit_days = 3650`).
    pub tenants: std::collections::BTreeMap<String, TenantRetention>,
}

/// One tenant's own retention periods; an unset one is the global setting.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantRetention {
    pub idempotency_hours: Option<u64>,
    pub dead_letters_days: Option<u64>,
    pub events_days: Option<u64>,
    pub messages_days: Option<u64>,
    pub jobs_days: Option<u64>,
    pub audit_days: Option<u64>,
}

/// What a retention period applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Settled idempotency keys (kept at least a day, so a retry within it gets its answer).
    IdempotencyKeys,
    DeadLetters,
    Events,
    Messages,
    Jobs,
    Audit,
}

impl RetentionConfig {
    /// How long `what` of `tenant` stays; `None`: forever. Rows of no tenant (a table
    /// without `tenant_id`) stay as long as the longest any tenant keeps.
    pub fn keep(&self, what: Kept, tenant: Option<&str>) -> Option<Duration> {
        let Some(tenant) = tenant else {
            // Forever (`None`) is the longest of all.
            let mut longest = self.keep_of(what, None)?;
            for own in self.tenants.values() {
                longest = longest.max(self.keep_of(what, Some(own))?);
            }
            return Some(longest);
        };
        self.keep_of(what, self.tenants.get(tenant))
    }

    fn keep_of(&self, what: Kept, own: Option<&TenantRetention>) -> Option<Duration> {
        let period = |global: u64, of: fn(&TenantRetention) -> Option<u64>| {
            own.and_then(of).unwrap_or(global)
        };
        let days = |n: u64| (n > 0).then(|| Duration::from_secs(n * 86_400));
        match what {
            Kept::IdempotencyKeys => {
                let hours = period(self.idempotency_hours, |t| t.idempotency_hours);
                (hours > 0).then(|| Duration::from_secs(hours.max(24) * 3_600))
            }
            Kept::DeadLetters => days(period(self.dead_letters_days, |t| t.dead_letters_days)),
            Kept::Events => days(period(self.events_days, |t| t.events_days)),
            Kept::Messages => days(period(self.messages_days, |t| t.messages_days)),
            Kept::Jobs => days(period(self.jobs_days, |t| t.jobs_days)),
            Kept::Audit => days(period(self.audit_days, |t| t.audit_days)),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            interval_minutes: 60,
            batch_rows: 500,
            busy_percent: 10,
            idempotency_hours: 72,
            dead_letters_days: 30,
            events_days: 30,
            messages_days: 90,
            jobs_days: 30,
            audit_days: 400,
            tenants: std::collections::BTreeMap::new(),
        }
    }
}

/// Idempotency keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Seconds an in-flight request owns its key; after that (the owner died) a retry may run.
    pub in_flight_lease_secs: u64,
}

/// The HTTP gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Largest accepted request body, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Per-request timeout, in milliseconds.
    pub request_timeout_ms: u64,
    /// Requests one API key may make per minute (GCRA: a burst of that many, then an even
    /// rate); 0: no limit.
    pub rate_limit_per_key_per_minute: u32,
    /// Requests about one customer (`/v1/customers/{id}/…`) per minute; 0: no limit.
    pub rate_limit_per_customer_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./tessera-data"),
            bootstrap_admin_key: None,
            metrics_addr: None,
            shutdown_drain_secs: 0,
            internal_secret: None,
            secrets: SecretsConfig::default(),
            retention: RetentionConfig::default(),
            database: DatabaseConfig::default(),
            cache: CacheConfig::default(),
            telemetry: TelemetryConfig::default(),
            peers: PeersConfig::default(),
            outbox: OutboxConfig::default(),
            scheduler: SchedulerConfig::default(),
            webhooks: WebhooksConfig::default(),
            channels: ChannelsConfig::default(),
            idempotency: IdempotencyConfig::default(),
            gateway: GatewayConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            schema_prefix: String::new(),
            max_connections: 10,
            connect_timeout_secs: 30,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "tessera".into(),
            ttl_secs: 3600,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter:
                "info,sea_orm_migration=warn,opentelemetry=warn,sqlx::postgres::notice=warn".into(),
            otlp_endpoint: None,
            otlp_ca_file: None,
        }
    }
}

impl Default for PeersConfig {
    fn default() -> Self {
        let local = "http://127.0.0.1:50051".to_string();
        Self {
            catalog_url: local.clone(),
            eligibility_url: local.clone(),
            wallet_url: local.clone(),
            scheduler_url: local.clone(),
            notification_url: local,
            gateway_url: "http://127.0.0.1:8080".into(),
            timeout_ms: 5_000,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 500,
            batch_size: 100,
            lease_secs: 30,
        }
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            in_flight_lease_secs: 30,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            rate_limit_per_key_per_minute: 60_000,
            rate_limit_per_customer_per_minute: 600,
        }
    }
}

/// A configuration that failed to load or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: `{field}` {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl Config {
    /// Defaults → optional TOML file → `TESSERA_*` environment, validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed("TESSERA_").split("__").filter(|key| {
            !NON_CONFIG_ENV
                .iter()
                .any(|k| key.as_str().eq_ignore_ascii_case(k))
        }));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that cannot be expressed in the types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: &str| {
            Err(ConfigError::Invalid {
                field,
                problem: problem.to_string(),
            })
        };
        if let Some(secret) = &self.internal_secret
            && secret.len() < crate::auth::MIN_SECRET_LEN
        {
            return invalid("internal_secret", "must be at least 32 characters");
        }
        if let Some(key) = &self.secrets.master_key
            && let Err(problem) = crate::sealing::parse_key(key)
        {
            return invalid("secrets.master_key", &problem);
        }
        for key in self.secrets.retired_master_keys.split(',') {
            if !key.trim().is_empty()
                && let Err(problem) = crate::sealing::parse_key(key)
            {
                return invalid("secrets.retired_master_keys", &problem);
            }
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
        {
            return invalid(
                "database.url",
                "must start with postgres://, postgresql:// or sqlite:",
            );
        }
        if !self
            .database
            .schema_prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return invalid("database.schema_prefix", "may contain only a-z, 0-9 and _");
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if let Some(url) = &self.cache.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return invalid("cache.redis_url", "must start with redis:// or rediss://");
        }
        if self.cache.key_prefix.is_empty() {
            return invalid("cache.key_prefix", "must not be empty");
        }
        let p = &self.peers;
        for (key, url) in [
            ("peers.catalog_url", &p.catalog_url),
            ("peers.eligibility_url", &p.eligibility_url),
            ("peers.wallet_url", &p.wallet_url),
            ("peers.scheduler_url", &p.scheduler_url),
            ("peers.notification_url", &p.notification_url),
            ("peers.gateway_url", &p.gateway_url),
        ]
        .into_iter()
        .chain(
            self.telemetry
                .otlp_endpoint
                .as_ref()
                .map(|u| ("telemetry.otlp_endpoint", u)),
        ) {
            let host = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
                return invalid(
                    key,
                    &format!("must be an http:// or https:// URL with a host, not {url:?}"),
                );
            }
        }
        if self.outbox.batch_size == 0 || self.outbox.batch_size > 1000 {
            return invalid("outbox.batch_size", "must be within 1..=1000");
        }
        if self.webhooks.timeout_secs == 0 || self.webhooks.timeout_secs > 60 {
            return invalid("webhooks.timeout_secs", "must be within 1..=60");
        }
        if self.webhooks.retry_schedule_secs.is_empty()
            || self.webhooks.retry_schedule_secs.len() > 20
        {
            return invalid("webhooks.retry_schedule_secs", "must hold 1 to 20 delays");
        }
        if self.webhooks.batch_size == 0 || self.webhooks.batch_size > 1000 {
            return invalid("webhooks.batch_size", "must be within 1..=1000");
        }
        if self.channels.timeout_secs == 0 || self.channels.timeout_secs > 60 {
            return invalid("channels.timeout_secs", "must be within 1..=60");
        }
        if self.channels.retry_schedule_secs.is_empty()
            || self.channels.retry_schedule_secs.len() > 20
        {
            return invalid("channels.retry_schedule_secs", "must hold 1 to 20 delays");
        }
        if self.channels.batch_size == 0 || self.channels.batch_size > 1000 {
            return invalid("channels.batch_size", "must be within 1..=1000");
        }
        if let Some(url) = &self.channels.smtp_url
            && !(url.starts_with("smtp://") || url.starts_with("smtps://"))
        {
            return invalid("channels.smtp_url", "must start with smtp:// or smtps://");
        }
        if !(self.channels.public_url.starts_with("http://")
            || self.channels.public_url.starts_with("https://"))
        {
            return invalid("channels.public_url", "must be an http(s) URL");
        }
        if self.scheduler.job_lease_secs == 0 {
            return invalid("scheduler.job_lease_secs", "must be at least 1");
        }
        if self.scheduler.job_poll_ms == 0 {
            return invalid("scheduler.job_poll_ms", "must be at least 1");
        }
        if self.outbox.poll_interval_ms == 0 {
            return invalid("outbox.poll_interval_ms", "must be at least 1");
        }
        if self.gateway.max_body_bytes < 1024 {
            return invalid("gateway.max_body_bytes", "must be at least 1024");
        }
        if let Some(key) = &self.bootstrap_admin_key {
            // A key the gateway could never accept would lock the operator out.
            if !key.starts_with("tsk_") {
                return invalid(
                    "bootstrap_admin_key",
                    "must start with `tsk_` (API keys are `tsk_…`; this one could never authenticate)",
                );
            }
            if key.len() < 24 || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid(
                    "bootstrap_admin_key",
                    "must be 24 to 128 visible ASCII characters",
                );
            }
        }
        for (field, url) in [
            ("peers.catalog_url", &self.peers.catalog_url),
            ("peers.eligibility_url", &self.peers.eligibility_url),
            ("peers.wallet_url", &self.peers.wallet_url),
            ("peers.scheduler_url", &self.peers.scheduler_url),
            ("peers.notification_url", &self.peers.notification_url),
        ] {
            if url
                .parse::<http::Uri>()
                .map(|u| u.host().is_none())
                .unwrap_or(true)
            {
                return invalid(field, "must be an absolute URL such as http://wallet:50051");
            }
        }
        Ok(())
    }

    /// Points every peer URL at one local gRPC address (the all-in-one process).
    pub fn with_all_peers_at(mut self, addr: SocketAddr) -> Self {
        let url = format!("http://{addr}");
        self.peers.catalog_url = url.clone();
        self.peers.eligibility_url = url.clone();
        self.peers.wallet_url = url.clone();
        self.peers.scheduler_url = url.clone();
        self.peers.notification_url = url;
        self
    }

    /// Deadline for service-to-service calls.
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peers.timeout_ms)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn env_overrides_nested_keys_and_ignores_test_switches() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TESSERA_DATABASE__MAX_CONNECTIONS", "3");
            jail.set_env("TESSERA_GRPC_ADDR", "0.0.0.0:6000");
            jail.set_env("TESSERA_TEST_DATABASE_URL", "postgres://x");
            let config = Config::load(None).expect("loads");
            assert_eq!(config.database.max_connections, 3);
            assert_eq!(config.grpc_addr.port(), 6000);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected_with_the_field() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[database]\nurll = \"x\"\n")?;
            let err = Config::load(Some(Path::new("t.toml"))).unwrap_err();
            assert!(err.to_string().contains("urll"), "{err}");
            jail.create_file("u.toml", "[database]\nurl = \"mysql://x\"\n")?;
            let err = Config::load(Some(Path::new("u.toml"))).unwrap_err();
            assert!(err.to_string().contains("database.url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_bootstrap_key_that_could_never_authenticate_is_refused() {
        let with = |key: &str| Config {
            bootstrap_admin_key: Some(key.into()),
            ..Config::default()
        };
        let err = with("admin-key-without-the-prefix-0000")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`tsk_`"), "{err}");
        assert!(with("tsk_short").validate().is_err());
        assert!(with("tsk_has a space in it 000000000").validate().is_err());
        with("tsk_a_good_bootstrap_key_0000000")
            .validate()
            .expect("valid");
    }

    #[test]
    fn urls_need_a_scheme_and_a_host() {
        let mut config = Config::default();
        config.peers.wallet_url = "wallet:50051".into();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("peers.wallet_url"), "{err}");
        assert!(err.to_string().contains("wallet:50051"), "{err}");
        config.peers.wallet_url = "http://wallet:50051".into();
        config.telemetry.otlp_endpoint = Some("https://".into());
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("telemetry.otlp_endpoint"), "{err}");
        config.telemetry.otlp_endpoint = Some("https://collector:4317".into());
        config.validate().expect("valid");
    }

    #[test]
    fn master_keys_are_checked() {
        let mut config = Config::default();
        config.secrets.master_key = Some("no-key".into());
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("secrets.master_key"), "{err}");
        config.secrets.master_key = Some(crate::sealing::new_key_text("k1"));
        config.secrets.retired_master_keys = format!("{},bad", crate::sealing::new_key_text("k0"));
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("retired_master_keys"), "{err}");
    }
    #[test]
    fn a_tenant_keeps_its_own_periods_and_the_rest_the_global_ones() {
        let mut config = RetentionConfig {
            audit_days: 400,
            idempotency_hours: 1,
            ..RetentionConfig::default()
        };
        config.tenants.insert(
            "bank".into(),
            TenantRetention {
                audit_days: Some(3_650),
                events_days: Some(0),
                ..TenantRetention::default()
            },
        );
        let day = Duration::from_secs(86_400);
        assert_eq!(config.keep(Kept::Audit, Some("bank")), Some(day * 3_650));
        assert_eq!(config.keep(Kept::Audit, Some("shop")), Some(day * 400));
        assert_eq!(
            config.keep(Kept::Events, Some("bank")),
            None,
            "0 keeps forever"
        );
        assert_eq!(config.keep(Kept::Events, Some("shop")), Some(day * 30));
        assert_eq!(config.keep(Kept::Jobs, None), Some(day * 30));
        assert_eq!(
            config.keep(Kept::Audit, None),
            Some(day * 3_650),
            "rows of no tenant stay as long as any tenant keeps them"
        );
        assert_eq!(config.keep(Kept::Events, None), None);
        assert_eq!(
            config.keep(Kept::IdempotencyKeys, Some("bank")),
            Some(day),
            "idempotency keys stay at least a day"
        );
    }

    /// `docs/configuration.md` stays current: every key of the configuration has a row with
    /// its environment variable, and the default the row shows is the code's.
    #[test]
    fn the_configuration_page_lists_every_key_with_its_default() {
        fn leaves(
            prefix: &str,
            value: &serde_json::Value,
            out: &mut Vec<(String, serde_json::Value)>,
        ) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        leaves(&key, v, out);
                    }
                }
                v => out.push((prefix.to_string(), v.clone())),
            }
        }
        let doc = include_str!("../../../docs/configuration.md");
        let rows: Vec<Vec<&str>> = doc
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                l.split(" | ")
                    .map(|c| c.trim_matches(|c| c == '|' || c == ' '))
                    .collect()
            })
            .collect();
        let mut all = Vec::new();
        leaves(
            "",
            &serde_json::to_value(Config::default()).expect("serializes"),
            &mut all,
        );
        assert!(all.len() > 50, "{} keys", all.len());
        let mut problems = Vec::new();
        for (key, default) in &all {
            let row = rows.iter().find(|r| r[0] == format!("`{key}`"));
            let Some(row) = row else {
                // Keys documented as a group: `peers.<name>_url`, `channels.sms` / `channels.push`.
                let grouped = (key.starts_with("peers.")
                    && key.ends_with("_url")
                    && doc.contains("`peers.<name>_url`"))
                    || ["channels.sms", "channels.push"].iter().any(|p| {
                        key.starts_with(p) && doc.contains("`channels.sms` / `channels.push`")
                    });
                if !grouped {
                    problems.push(format!("`{key}` has no row"));
                }
                continue;
            };
            let env = format!("`TESSERA_{}`", key.to_uppercase().replace('.', "__"));
            if row.get(1) != Some(&env.as_str()) {
                problems.push(format!(
                    "`{key}`: env should be {env}, not {:?}",
                    row.get(1)
                ));
            }
            let shown = match default {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) if s.is_empty() => "`\"\"`".to_string(),
                serde_json::Value::String(s) => format!("`{s}`"),
                other => format!("`{other}`"),
            };
            let written = row.get(2).copied().unwrap_or_default();
            // A default built from other settings is described in words instead.
            if written.starts_with('`') && written != shown && !written.contains('…') {
                problems.push(format!(
                    "`{key}`: default is {shown}, the page says {written}"
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "docs/configuration.md is out of date:\n{}",
            problems.join("\n")
        );
    }
}
