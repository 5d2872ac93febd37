//! `tessera up | serve <service> | migrate [<service>…] | create-key | generate-codes`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tessera::Service;
use tessera_runtime::bin::{bind, load_config};
use tessera_runtime::{shutdown, telemetry};

/// mimalloc: the services allocate and free many small buffers per request (protobuf,
/// JSON, CEL values) from many threads; glibc's malloc spent about 15 % of qualification's
/// CPU (profiled with perf) in its own bookkeeping.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where settings come from, shown under every command's `--help`.
const SETTINGS: &str = "\
Settings: built-in defaults, then the --config TOML file, then TESSERA_* environment
variables (nested keys with `__`). Every key, its variable and default: docs/configuration.md.
The ones a deployment sets most:
  TESSERA_GRPC_ADDR, TESSERA_HTTP_ADDR     listen addresses (gRPC; the gateway's REST)
  TESSERA_METRICS_ADDR                     /metrics on a port of its own
  TESSERA_DATABASE__URL                    postgres://… (unset: SQLite under TESSERA_DATA_DIR)
  TESSERA_CACHE__REDIS_URL                 redis://… (unset: in-process segment cache)
  TESSERA_PEERS__<SERVICE>_URL             http(s)://host:port of catalog, eligibility, wallet,
                                           scheduler, notification and gateway
  TESSERA_INTERNAL_SECRET                  shared secret of the services' own calls
  TESSERA_SECRETS__MASTER_KEY              master key of sealed secrets
  TESSERA_TELEMETRY__OTLP_ENDPOINT         OTLP/gRPC collector (http:// or https://)
  TESSERA_TELEMETRY__LOG_FORMAT            pretty | json";

/// Tessera: self-hostable, API-first loyalty and cashback platform.
#[derive(Debug, Parser)]
#[command(version, about, after_help = SETTINGS)]
struct Cli {
    /// TOML configuration file (defaults → this file → TESSERA_* environment).
    #[arg(long, global = true, env = "TESSERA_CONFIG_FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole suite in this process on embedded defaults (SQLite, in-process cache).
    #[command(after_help = SETTINGS)]
    Up {
        /// Directory for the SQLite files [env: TESSERA_DATA_DIR, default ./tessera-data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// gRPC listen address [env: TESSERA_GRPC_ADDR, default 127.0.0.1:50051].
        #[arg(long)]
        grpc_addr: Option<SocketAddr>,
        /// HTTP gateway listen address [env: TESSERA_HTTP_ADDR, default 127.0.0.1:8080].
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Run one service (production shape: one Deployment per service).
    #[command(after_help = SETTINGS)]
    Serve {
        #[arg(value_enum)]
        service: Service,
    },
    /// Apply database migrations (all services when none is named).
    #[command(after_help = SETTINGS)]
    Migrate {
        #[arg(value_enum)]
        services: Vec<Service>,
    },
    /// Create an API key (e.g. a new tenant's first admin key) and print it, once.
    CreateKey {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// admin, marketer, junior_marketer, support_agent, touchpoint or analyst.
        #[arg(long, default_value = "admin")]
        role: String,
        /// What the key is for.
        #[arg(long, default_value = "created by the operator")]
        name: String,
    },
    /// Generate codes into a catalog pool and show the job's progress until it ends.
    GenerateCodes {
        /// The pool's id.
        #[arg(long)]
        pool: String,
        /// How many codes.
        #[arg(long)]
        count: i64,
        /// Tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The catalog's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        grpc_url: String,
        /// Idempotency key (default: a new one; pass the same key to resume watching a job).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

/// Runs the command; a failure is one line on stderr (`tessera: …`, causes joined), then the
/// backtrace only when `RUST_BACKTRACE` asks for it.
#[allow(clippy::print_stderr)]
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("\n{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = load_config(cli.config)?;
    if let Command::Up {
        data_dir,
        grpc_addr,
        http_addr,
    } = &cli.command
    {
        if let Some(dir) = data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(addr) = grpc_addr {
            config.grpc_addr = *addr;
        }
        if let Some(addr) = http_addr {
            config.http_addr = *addr;
        }
        config.validate()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let service_name = match &cli.command {
            Command::Serve { service } => service.name(),
            _ => "tessera",
        };
        let _telemetry = telemetry::init(&config.telemetry, service_name)?;
        match cli.command {
            Command::Up { .. } => up(config).await,
            Command::Serve { service } => {
                tessera::serve(service, config, shutdown::on_signal()).await
            }
            Command::GenerateCodes {
                pool,
                count,
                tenant,
                grpc_url,
                idempotency_key,
            } => {
                let key =
                    idempotency_key.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
                generate_codes(&grpc_url, &tenant, &pool, count, key).await
            }
            Command::CreateKey { tenant, role, name } => {
                let key = tessera_gateway::create_key(&config, &tenant, &role, &name).await?;
                print_key(&key);
                Ok(())
            }
            Command::Migrate { services } => {
                let services = if services.is_empty() {
                    Service::ALL.to_vec()
                } else {
                    services
                };
                for service in services {
                    tessera::migrate(service, &config).await?;
                    tracing::info!(service = service.name(), "migrated");
                }
                Ok(())
            }
        }
    })
}

#[allow(clippy::print_stdout)]
fn print_key(key: &str) {
    println!("{key}");
}

#[allow(clippy::print_stdout)]
async fn up(config: tessera_runtime::Config) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signal();
    let grpc = bind(config.grpc_addr).await?;
    let http = bind(config.http_addr).await?;
    let data_dir = config.data_dir.clone();
    let suite = tessera::start(config, grpc, http, shutdown).await?;
    println!(
        "Tessera is up (embedded: SQLite in {}, in-process cache)",
        data_dir.display()
    );
    println!(
        "  gRPC    {}  (catalog, eligibility, wallet, scheduler, notification; health + reflection)",
        suite.grpc_addr
    );
    println!("  HTTP    http://{}", suite.http_addr);
    match &suite.new_admin_key {
        Some(key) => println!("  admin API key (tenant `default`, shown once): {key}"),
        None => {
            println!("  admin API key: created on first start (or TESSERA_BOOTSTRAP_ADMIN_KEY)")
        }
    }
    println!("Press Ctrl-C to stop.");
    suite.wait().await
}

/// Starts a generation job and prints its progress until it ends.
#[allow(clippy::print_stdout)]
async fn generate_codes(
    grpc_url: &str,
    tenant: &str,
    pool: &str,
    count: i64,
    key: String,
) -> anyhow::Result<()> {
    use tessera_proto::catalog::v1 as pb;
    let channel = tessera_runtime::grpc::channel(grpc_url, std::time::Duration::from_secs(10))?;
    let mut catalog = pb::catalog_service_client::CatalogServiceClient::new(channel);
    let ctx = tessera_runtime::RequestContext::system(tenant, "cli");
    let job = catalog
        .generate_codes(ctx.request(pb::GenerateCodesRequest {
            idempotency_key: key.clone(),
            pool_id: pool.into(),
            count,
        }))
        .await
        .map_err(|s| anyhow::anyhow!("{}", tessera_runtime::Error::from_status(&s)))?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("no job in the answer"))?;
    println!("job {} (idempotency key {key})", job.id);
    loop {
        let job = catalog
            .get_generation_job(ctx.request(pb::GetGenerationJobRequest { id: job.id.clone() }))
            .await?
            .into_inner()
            .job
            .ok_or_else(|| anyhow::anyhow!("no job in the answer"))?;
        let percent = job.generated * 100 / job.requested.max(1);
        println!("  {}/{} codes ({percent}%)", job.generated, job.requested);
        match job.status() {
            pb::JobStatus::Running => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await
            }
            pb::JobStatus::Succeeded => return Ok(()),
            _ => anyhow::bail!("the job failed: {}", job.error),
        }
    }
}
