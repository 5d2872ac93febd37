//! The durable work queue: `ITEMS` items pushed in transactions of 1,000, then drained by 3
//! workers claiming batches of 200 with a handler that does nothing: items claimed and
//! completed per second (the queue's own cost, on the service's database).

use std::sync::Arc;
use std::time::Instant;

use tessera_store::queue::{
    Failure, Handler, Item, NewItem, Queue, RetryPolicy, Worker, WorkerConfig, push,
};
use tessera_tests::{TENANT, TestSuite, scalar};

const ITEMS: usize = 60_000;
const WORKERS: usize = 3;

struct Nothing;

#[async_trait::async_trait]
impl Handler for Nothing {
    async fn handle(&self, _item: &Item) -> Result<(), Failure> {
        Ok(())
    }
}

pub async fn queue(suite: &TestSuite, label: &str) {
    let db = suite.db("wallet").await;
    let started = Instant::now();
    for chunk in 0..ITEMS / 1_000 {
        let txn = db.begin_write().await.expect("begin");
        push(
            &txn,
            (0..1_000).map(|i| NewItem {
                queue: "bench",
                tenant: TENANT.into(),
                key: format!("bench-{chunk}-{i}"),
                kind: "bench".into(),
                payload: vec![0u8; 200],
                not_before: None,
                group: String::new(),
            }),
        )
        .await
        .expect("push");
        txn.commit().await.expect("commit");
    }
    let pushed = started.elapsed();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let queue = Queue::new(db.clone(), "bench", "bench", RetryPolicy::default());
        let worker = Worker::new(queue, Arc::new(Nothing), WorkerConfig::default());
        workers.push(tokio::spawn(async move {
            while worker.run_once().await.expect("pass") > 0 {}
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let drained = started.elapsed();
    let left = scalar(
        &db,
        "SELECT COUNT(*) FROM work_queue WHERE queue = 'bench'",
        vec![],
    )
    .await;
    println!(
        "  {label:<28} Queue: {ITEMS} items pushed {:>8.0}/s; claimed+completed by {WORKERS} workers {:>8.0}/s ({left} left)",
        ITEMS as f64 / pushed.as_secs_f64(),
        ITEMS as f64 / drained.as_secs_f64(),
    );
}
