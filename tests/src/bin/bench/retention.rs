//! Retention: `ROWS` settled idempotency keys past their window seeded in the wallet's
//! database, then purged by the wallet's own rules while wallet Credits run at
//! `CLIENTS` clients: the purge's rate, and Credit latency beside the same load without it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::config::RetentionConfig;
use tessera_store::retention::Purger;
use tessera_store::{Backend, now_micros, stmt};
use tessera_tests::{TENANT, TestSuite, scalar};

use crate::{percentile, points, wallet};

const ROWS: i64 = 1_000_000;
const CLIENTS: usize = 8;

/// Credits at `CLIENTS` clients until `stop`, at least `min` of them; their latencies, sorted.
async fn credit_load(
    suite: &TestSuite,
    tag: &str,
    min: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let (mut client, ctx, stop, tag) = (
            wallet(suite),
            suite.ctx(TENANT),
            stop.clone(),
            tag.to_string(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while latencies.len() < min / CLIENTS || !stop.load(Ordering::Relaxed) {
                let request = pb::CreditRequest {
                    idempotency_key: format!("{tag}-{worker}-{i}"),
                    customer_id: format!("kept-{}", i % 200),
                    asset: points(),
                    amount: 1,
                    reason: "bench".into(),
                    ..Default::default()
                };
                let t = Instant::now();
                client.credit(ctx.request(request)).await.expect("credit");
                latencies.push(t.elapsed());
                i += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("load"));
    }
    all.sort();
    all
}

pub async fn purge(suite: &TestSuite, label: &str) {
    let db = suite.db("wallet").await;
    let old = now_micros() - 10 * 86_400 * 1_000_000;
    let seeded = Instant::now();
    let select = "SELECT $1, 'bench.Seed', 'old-' || n, '', 'done', '', 0, 0, NULL, $2 FROM g";
    let sql = match db.backend() {
        Backend::Postgres => format!(
            "INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, owner, \
             locked_until, response_code, response, created_at) \
             {} ",
            select.replace(
                "FROM g",
                &format!("FROM generate_series(1, {ROWS}) AS g(n)")
            )
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {ROWS}) \
             INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, owner, \
             locked_until, response_code, response, created_at) {select}"
        ),
    };
    let conn = db.conn();
    conn.execute_raw(stmt(conn, &sql, [TENANT.into(), old.into()]))
        .await
        .expect("seed");
    let seeded = seeded.elapsed();

    // The same load without a purge, then with one.
    let idle = credit_load(suite, "idle", 4_000, Arc::new(AtomicBool::new(true))).await;
    let config = RetentionConfig::default();
    let purger = Purger::new(db.clone(), "wallet", Vec::new(), &config);
    let stop = Arc::new(AtomicBool::new(false));
    let (busy, purged_in) = tokio::join!(credit_load(suite, "busy", 4_000, stop.clone()), async {
        let started = Instant::now();
        while !purger.purge().await.expect("purge") {}
        stop.store(true, Ordering::Relaxed);
        started.elapsed()
    });
    let left = scalar(
        &db,
        "SELECT COUNT(*) FROM idempotency_keys WHERE scope = 'bench.Seed'",
        vec![],
    )
    .await;
    assert_eq!(left, 0, "the purge left rows");
    let p = |l: &[Duration], q: f64| percentile(l, q).as_secs_f64() * 1e3;
    println!(
        "  {label:<28} {:<22} {:>8.0}/s  ({ROWS} rows seeded in {:.1} s, purged in {:.1} s)",
        "Retention purge",
        ROWS as f64 / purged_in.as_secs_f64(),
        seeded.as_secs_f64(),
        purged_in.as_secs_f64(),
    );
    println!(
        "  {label:<28} {:<22} p50 {:>6.2} ms  p99 {:>6.2} ms idle;  p50 {:>6.2} ms  p99 {:>6.2} ms \
         while purging ({:+.0} % p99)",
        format!("Credit ({CLIENTS} clients)"),
        p(&idle, 0.5),
        p(&idle, 0.99),
        p(&busy, 0.5),
        p(&busy, 0.99),
        (p(&busy, 0.99) / p(&idle, 0.99) - 1.0) * 100.0,
    );
}
