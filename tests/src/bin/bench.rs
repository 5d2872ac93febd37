//! `just bench`: wallet credits through gRPC against the whole suite in this process, on
//! SQLite (embedded) and on PostgreSQL (when `TESSERA_TEST_DATABASE_URL` and
//! `TESSERA_TEST_REDIS_URL` are set). Prints throughput and latency percentiles.
//! A benchmark, not a test: nothing here asserts a speed.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_tests::{Backend, TENANT, TestSuite};

const REQUESTS: usize = 4_000;
const CONCURRENCY: usize = 16;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn credits(suite: &TestSuite, label: &str) {
    let client = WalletServiceClient::new(suite.channel());
    let ctx = suite.ctx(TENANT);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CONCURRENCY {
        let mut client = client.clone();
        let ctx = ctx.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(REQUESTS / CONCURRENCY);
            for i in 0..REQUESTS / CONCURRENCY {
                let request = pb::CreditRequest {
                    idempotency_key: format!("bench-{worker}-{i}"),
                    customer_id: format!("customer-{}", i % 500),
                    asset: Some(pb::Asset {
                        kind: pb::AssetKind::Points as i32,
                        code: "default".into(),
                    }),
                    amount: 10,
                    reason: "bench".into(),
                    expires_at: None,
                    pending: None,
                };
                let t = Instant::now();
                client.credit(ctx.request(request)).await.expect("credit");
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
    println!(
        "{label:<28} {:>6} credits  {:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({CONCURRENCY} clients)",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    println!(
        "wallet Credit via gRPC (idempotency key + ledger postings + outbox event per credit)"
    );
    for (backend, label) in [
        (Backend::Embedded, "SQLite + in-process cache"),
        (Backend::Production, "PostgreSQL + Redis"),
    ] {
        match TestSuite::start(backend).await {
            Some(suite) => {
                credits(&suite, label).await;
                suite.cleanup().await;
            }
            None => println!("{label:<28} skipped (backend not configured)"),
        }
    }
}
