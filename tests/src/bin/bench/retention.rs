//! Retention: 1,000,000 (`TESSERA_BENCH_ROWS`) settled idempotency keys past their window seeded in the wallet's
//! database, then purged by the wallet's own rules while wallet Credits run: the purge's
//! rate, and Credit latency beside the same load without it, twice: at `CLIENTS` clients
//! (saturating the machine: every cycle the purge takes is one the Credits lack), and sent
//! on a clock at half the rate those clients reached (a service with headroom).

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

/// Rows seeded (`TESSERA_BENCH_ROWS` to try fewer).
fn rows() -> i64 {
    std::env::var("TESSERA_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The retention settings purged with: the defaults, or `TESSERA_RETENTION__BATCH_ROWS` and
/// `TESSERA_RETENTION__BUSY_PERCENT` to compare others.
fn settings() -> RetentionConfig {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let d = RetentionConfig::default();
    RetentionConfig {
        batch_rows: var("TESSERA_RETENTION__BATCH_ROWS", d.batch_rows),
        busy_percent: var("TESSERA_RETENTION__BUSY_PERCENT", d.busy_percent),
        ..d
    }
}
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

/// Credits sent at `rate` per second until `stop` (at least `min` of them), each timed from
/// when it was due: an open loop, so a slow answer does not slow the sender and waiting in
/// a queue counts. Their latencies, sorted.
async fn paced_load(
    suite: &TestSuite,
    tag: &str,
    rate: f64,
    min: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let (client, ctx) = (wallet(suite), suite.ctx(TENANT));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut sent = Vec::new();
    for i in 0.. {
        let due = start + interval * i;
        tokio::time::sleep_until(due).await;
        if i as usize >= min && stop.load(Ordering::Relaxed) {
            break;
        }
        let (mut client, ctx) = (client.clone(), ctx.clone());
        let request = pb::CreditRequest {
            idempotency_key: format!("{tag}-{i}"),
            customer_id: format!("kept-{}", i % 200),
            asset: points(),
            amount: 1,
            reason: "bench".into(),
            ..Default::default()
        };
        sent.push(tokio::spawn(async move {
            client.credit(ctx.request(request)).await.expect("credit");
            due.elapsed()
        }));
    }
    let mut all = Vec::new();
    for s in sent {
        all.push(s.await.expect("load"));
    }
    all.sort();
    all
}

/// Seeds `rows()` settled idempotency keys past their window, a microsecond apart (as keys
/// made over time are), vacuumed and analysed as old rows are by then; how long it took.
async fn seed(db: &tessera_store::Db) -> Duration {
    let old = now_micros() - 10 * 86_400 * 1_000_000;
    let seeded = Instant::now();
    let select = "SELECT $1, 'bench.Seed', 'old-' || n, '', 'done', '', 0, 0, NULL, $2 - n FROM g";
    let sql = match db.backend() {
        Backend::Postgres => format!(
            "INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, owner, \
             locked_until, response_code, response, created_at) \
             {} ",
            select.replace(
                "FROM g",
                &format!("FROM generate_series(1, {}) AS g(n)", rows())
            )
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {}) \
             INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, owner, \
             locked_until, response_code, response, created_at) {select}",
            rows()
        ),
    };
    let conn = db.conn();
    conn.execute_raw(stmt(conn, &sql, [TENANT.into(), old.into()]))
        .await
        .expect("seed");
    let settle = match db.backend() {
        Backend::Postgres => "VACUUM ANALYZE idempotency_keys",
        Backend::Sqlite => "ANALYZE idempotency_keys",
    };
    conn.execute_unprepared(settle).await.expect("vacuum");
    seeded.elapsed()
}

/// Purges the seeded rows while `load` runs (it stops when told); the purge's time and the
/// load's latencies.
async fn purge_under<F>(
    db: &tessera_store::Db,
    load: impl FnOnce(Arc<AtomicBool>) -> F,
) -> (Duration, Vec<Duration>)
where
    F: std::future::Future<Output = Vec<Duration>>,
{
    let purger = Purger::new(db.clone(), "wallet", Vec::new(), &settings());
    let stop = Arc::new(AtomicBool::new(false));
    let (busy, purged_in) = tokio::join!(load(stop.clone()), async {
        let started = Instant::now();
        while !purger.purge().await.expect("purge") {}
        stop.store(true, Ordering::Relaxed);
        started.elapsed()
    });
    let left = scalar(
        db,
        "SELECT COUNT(*) FROM idempotency_keys WHERE scope = 'bench.Seed'",
        vec![],
    )
    .await;
    assert_eq!(left, 0, "the purge left rows");
    (purged_in, busy)
}

pub async fn purge(suite: &TestSuite, label: &str) {
    let db = suite.db("wallet").await;
    let p = |l: &[Duration], q: f64| percentile(l, q).as_secs_f64() * 1e3;
    let line = |what: String, idle: &[Duration], busy: &[Duration]| {
        println!(
            "  {label:<28} {what:<22} p50 {:>6.2} ms  p99 {:>6.2} ms idle;  p50 {:>6.2} ms  \
             p99 {:>6.2} ms while purging ({:+.0} % p99)",
            p(idle, 0.5),
            p(idle, 0.99),
            p(busy, 0.5),
            p(busy, 0.99),
            (p(busy, 0.99) / p(idle, 0.99) - 1.0) * 100.0,
        );
    };

    // Saturated: as many Credits as `CLIENTS` clients get through, without a purge, then
    // with one.
    let seeded = seed(&db).await;
    let started = Instant::now();
    let idle = credit_load(suite, "idle", 4_000, Arc::new(AtomicBool::new(true))).await;
    let capacity = idle.len() as f64 / started.elapsed().as_secs_f64();
    let (purged_in, busy) = purge_under(&db, |stop| credit_load(suite, "busy", 4_000, stop)).await;
    println!(
        "  {label:<28} {:<22} {:>8.0}/s  ({} rows seeded in {:.1} s, purged in {:.1} s; \
         batches of {}, busy {} %)",
        "Retention purge",
        rows() as f64 / purged_in.as_secs_f64(),
        rows(),
        seeded.as_secs_f64(),
        purged_in.as_secs_f64(),
        settings().batch_rows,
        settings().busy_percent,
    );
    line(format!("Credit ({CLIENTS} clients)"), &idle, &busy);

    // Half that rate, sent on a clock (a service with headroom, as one is run).
    let rate = capacity / 2.0;
    seed(&db).await;
    // A minute without the purge: at this rate one stall of the machine (seen with and
    // without a purge) moves a short run's p99 by tens of per cent.
    let min = (rate * 15.0) as usize;
    let idle = paced_load(
        suite,
        "paced-idle",
        rate,
        min * 4,
        Arc::new(AtomicBool::new(true)),
    )
    .await;
    let (purged_in, busy) =
        purge_under(&db, |stop| paced_load(suite, "paced-busy", rate, min, stop)).await;
    println!(
        "  {label:<28} {:<22} {:>8.0}/s  (under {rate:.0} Credits/s, purged in {:.1} s)",
        "Retention purge",
        rows() as f64 / purged_in.as_secs_f64(),
        purged_in.as_secs_f64(),
    );
    line(format!("Credit ({rate:.0}/s paced)"), &idle, &busy);
}
