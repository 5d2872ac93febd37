//! `just bench`: the wallet, the catalog and qualification through gRPC against the whole suite in this
//! process, on SQLite (embedded) and on PostgreSQL (when `TESSERA_TEST_DATABASE_URL` and
//! `TESSERA_TEST_REDIS_URL` are set). Prints throughput and latency percentiles of single
//! credits, batch credits and debits, how long a 100,000-code generation job takes,
//! qualification against the peer dataset, and redemption beside a bare SQL transaction. A
//! benchmark, not a test: nothing here asserts a speed. Telemetry is the production path
//! without a collector.

#![allow(clippy::print_stdout)]

/// The allocator the `tessera` binary ships with, so the figures are the shipped ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod pool_codes;
mod qualify;
mod queue;
mod redeem;
mod retention;
mod webhooks;

use std::future::Future;
use std::time::{Duration, Instant};

use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::RequestContext;
use tessera_runtime::grpc::Channel;
use tessera_tests::{Backend, TENANT, TestSuite};

const CONCURRENCY: usize = 16;
const CREDITS: usize = 4_000;
const DEBITS: usize = 4_000;
const BATCH: usize = 500;
const BATCHES: usize = 40;
const BATCH_CLIENTS: usize = 4;

type Client = WalletServiceClient<Channel>;

pub(crate) fn points() -> Option<pb::Asset> {
    Some(pb::Asset {
        kind: pb::AssetKind::Points as i32,
        code: "default".into(),
    })
}

fn wallet(suite: &TestSuite) -> Client {
    WalletServiceClient::new(suite.channel())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Runs `per_client` calls of `call(client, ctx, worker, i)` on each of `clients` workers
/// and returns every call's latency (sorted) plus the wall time.
async fn drive<C, F, Fut>(
    suite: &TestSuite,
    client: C,
    clients: usize,
    per_client: usize,
    call: F,
) -> (Vec<Duration>, Duration)
where
    C: Clone + Send + 'static,
    F: Fn(C, RequestContext, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let ctx = suite.ctx(TENANT);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..clients {
        let (client, ctx, call) = (client.clone(), ctx.clone(), call.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                call(client.clone(), ctx.clone(), worker, i).await;
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    (latencies, elapsed)
}

fn report(label: &str, what: &str, units: usize, latencies: &[Duration], elapsed: Duration) {
    println!(
        "  {label:<28} {what:<22} {:>8.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
        units as f64 / elapsed.as_secs_f64(),
        percentile(latencies, 0.50).as_secs_f64() * 1e3,
        percentile(latencies, 0.99).as_secs_f64() * 1e3,
    );
}

async fn credits(suite: &TestSuite, label: &str) {
    let (latencies, elapsed) = drive(
        suite,
        wallet(suite),
        CONCURRENCY,
        CREDITS / CONCURRENCY,
        |mut client, ctx, worker, i| async move {
            let request = pb::CreditRequest {
                idempotency_key: format!("credit-{worker}-{i}"),
                customer_id: format!("customer-{}", i % 500),
                asset: points(),
                amount: 10,
                reason: "bench".into(),
                expires_at: None,
                pending: None,
                spent_amount: 0,
                apply_tier_multiplier: false,
            };
            client.credit(ctx.request(request)).await.expect("credit");
        },
    )
    .await;
    report(
        label,
        &format!("Credit ({CONCURRENCY} clients)"),
        latencies.len(),
        &latencies,
        elapsed,
    );
}

async fn batch_credits(suite: &TestSuite, label: &str) {
    let (latencies, elapsed) = drive(
        suite,
        wallet(suite),
        BATCH_CLIENTS,
        BATCHES / BATCH_CLIENTS,
        |mut client, ctx, worker, i| async move {
            let entries = (0..BATCH)
                .map(|n| pb::BatchCreditEntry {
                    customer_id: format!("member-{}", (worker * 7919 + i * BATCH + n) % 20_000),
                    asset: points(),
                    amount: 5,
                    reason: "campaign".into(),
                    expires_at: None,
                })
                .collect();
            let request = pb::BatchCreditRequest {
                idempotency_key: format!("batch-{worker}-{i}"),
                entries,
            };
            client
                .batch_credit(ctx.request(request))
                .await
                .expect("batch credit");
        },
    )
    .await;
    // Two postings per credit.
    report(
        label,
        &format!("BatchCredit x{BATCH} postings"),
        latencies.len() * BATCH * 2,
        &latencies,
        elapsed,
    );
}

async fn debits(suite: &TestSuite, label: &str) {
    // Each client spends from its own member, funded up front.
    let mut client = WalletServiceClient::new(suite.channel());
    let entries = (0..CONCURRENCY)
        .map(|worker| pb::BatchCreditEntry {
            customer_id: format!("spender-{worker}"),
            asset: points(),
            amount: 1_000_000,
            reason: "funding".into(),
            expires_at: None,
        })
        .collect();
    client
        .batch_credit(suite.ctx(TENANT).request(pb::BatchCreditRequest {
            idempotency_key: "funding".into(),
            entries,
        }))
        .await
        .expect("funding");
    let (latencies, elapsed) = drive(
        suite,
        wallet(suite),
        CONCURRENCY,
        DEBITS / CONCURRENCY,
        |mut client, ctx, worker, i| async move {
            let request = pb::DebitRequest {
                idempotency_key: format!("debit-{worker}-{i}"),
                customer_id: format!("spender-{worker}"),
                asset: points(),
                amount: 3,
                reason: "bench".into(),
            };
            client.debit(ctx.request(request)).await.expect("debit");
        },
    )
    .await;
    report(
        label,
        &format!("Debit ({CONCURRENCY} clients)"),
        latencies.len(),
        &latencies,
        elapsed,
    );
}

/// Codes one generation job makes.
const CODES: i64 = 100_000;

/// A reward with `effect` and a pool of it whose codes follow `pattern`; returns the pool.
pub(crate) async fn new_pool(
    suite: &TestSuite,
    key: &str,
    effect: tessera_proto::catalog::v1::Effect,
    pattern: &str,
) -> tessera_proto::catalog::v1::CodePool {
    use tessera_proto::catalog::v1 as cpb;
    let mut catalog = cpb::catalog_service_client::CatalogServiceClient::new(suite.channel());
    let ctx = RequestContext::system(TENANT, "bench");
    let reward = catalog
        .create_reward(ctx.request(cpb::CreateRewardRequest {
            idempotency_key: format!("{key}-reward"),
            reward: Some(cpb::RewardInput {
                name: key.into(),
                currency: "USD".into(),
                effect: Some(effect),
                ..Default::default()
            }),
        }))
        .await
        .expect("reward")
        .into_inner()
        .reward
        .expect("reward");
    catalog
        .create_code_pool(ctx.request(cpb::CreateCodePoolRequest {
            idempotency_key: format!("{key}-pool"),
            pool: Some(cpb::CodePoolInput {
                reward_id: reward.id,
                name: key.into(),
                pattern: Some(cpb::CodePattern {
                    pattern: pattern.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }))
        .await
        .expect("pool")
        .into_inner()
        .pool
        .expect("pool")
}

/// Generates `count` codes into `pool` and waits for the job to finish; returns it.
pub(crate) async fn generate(
    suite: &TestSuite,
    key: &str,
    pool: &str,
    count: i64,
) -> tessera_proto::catalog::v1::GenerationJob {
    use tessera_proto::catalog::v1 as cpb;
    let mut catalog = cpb::catalog_service_client::CatalogServiceClient::new(suite.channel());
    let ctx = RequestContext::system(TENANT, "bench");
    let job = catalog
        .generate_codes(ctx.request(cpb::GenerateCodesRequest {
            idempotency_key: format!("{key}-generate"),
            pool_id: pool.into(),
            count,
        }))
        .await
        .expect("generate")
        .into_inner()
        .job
        .expect("job");
    loop {
        let job = catalog
            .get_generation_job(ctx.request(cpb::GetGenerationJobRequest { id: job.id.clone() }))
            .await
            .expect("job")
            .into_inner()
            .job
            .expect("job");
        if job.status() != cpb::JobStatus::Running {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 100,000-code generation job, from the request to the job's success.
async fn code_generation(suite: &TestSuite, label: &str) {
    use tessera_proto::catalog::v1 as cpb;
    let effect = cpb::Effect {
        kind: Some(cpb::effect::Kind::PercentOff(cpb::PercentOff {
            percent_bp: 1_000,
            ..Default::default()
        })),
    };
    let pool = new_pool(suite, "bench", effect, "BENCH-????-####").await;
    let started = Instant::now();
    let job = generate(suite, "bench", &pool.id, CODES).await;
    let elapsed = started.elapsed();
    println!(
        "  {label:<28} GenerateCodes  {} codes in {:.2} s ({:.0} codes/s), {:?}",
        job.generated,
        elapsed.as_secs_f64(),
        job.generated as f64 / elapsed.as_secs_f64(),
        job.status(),
    );
}

#[tokio::main]
async fn main() {
    // Production telemetry (spans made and propagated, no collector configured), installed
    // before the harness's test mode would install its synchronous in-memory span exporter,
    // which would measure the test tooling rather than the wallet.
    let telemetry = tessera_runtime::config::TelemetryConfig {
        log_filter: "error".into(),
        ..Default::default()
    };
    let _telemetry =
        tessera_runtime::telemetry::init(&telemetry, "tessera-bench").expect("telemetry installs");
    println!(
        "wallet via gRPC, whole suite in one process (idempotency record + ledger postings + \
         outbox event per request). Targets: BatchCredit >= 5,000 postings/s on PostgreSQL, \
         >= 3,000/s on SQLite; Debit p99 <= 20 ms at {CONCURRENCY} clients. Catalog: \
         {CODES} codes generated in <= 10 s on PostgreSQL. Redeem: >= 1,000/s, p99 <= 50 ms \
         at 32 clients on PostgreSQL; with a pool code within 20 % of a campaign code. Queue: >= \
         5,000 items/s claimed and completed with 3 workers on PostgreSQL. Webhooks: >= 1,000 signed deliveries/s, enqueue → first \
         attempt p99 <= 1 s. Retention: 1,000,000 old rows purged with request p99 within 20 %."
    );
    // `TESSERA_BENCH=wallet|catalog|qualify|redeem|codes|queue|webhooks|retention` runs one part only.
    let only = std::env::var("TESSERA_BENCH").ok();
    let only = only.as_deref();
    // `TESSERA_BENCH_ON=sqlite|postgres` runs on one backend only.
    let on = std::env::var("TESSERA_BENCH_ON").ok();
    qualify::cel_cost();
    for (backend, name, label) in [
        (Backend::Embedded, "sqlite", "SQLite + in-process cache"),
        (Backend::Production, "postgres", "PostgreSQL + Redis"),
    ] {
        if on.as_deref().is_some_and(|on| on != name) {
            continue;
        }
        // The production configuration (pool size, outbox polling), isolated like a test.
        let suite = match tessera_tests::test_config(backend) {
            Some(mut config) => {
                let defaults = tessera_runtime::Config::default();
                config.database.max_connections = defaults.database.max_connections;
                config.outbox = defaults.outbox;
                Some(TestSuite::start_with(backend, config, false).await)
            }
            None => None,
        };
        match suite {
            Some(suite) => {
                if only.is_none_or(|o| o == "wallet") {
                    credits(&suite, label).await;
                    batch_credits(&suite, label).await;
                    debits(&suite, label).await;
                }
                if only.is_none_or(|o| o == "catalog") {
                    code_generation(&suite, label).await;
                }
                if only.is_none_or(|o| o == "qualify") {
                    qualify::qualification(&suite, label).await;
                }
                if only.is_none_or(|o| o == "redeem") {
                    redeem::redemption(&suite, label).await;
                }
                if only.is_none_or(|o| o == "codes") {
                    pool_codes::pool_codes(&suite, label).await;
                }
                if only.is_none_or(|o| o == "queue") {
                    queue::queue(&suite, label).await;
                }
                if only.is_none_or(|o| o == "webhooks") {
                    webhooks::deliveries(&suite, label).await;
                }
                if only.is_none_or(|o| o == "retention") {
                    retention::purge(&suite, label).await;
                }
                suite.cleanup().await;
            }
            None => println!("  {label:<28} skipped (backend not configured)"),
        }
    }
}
