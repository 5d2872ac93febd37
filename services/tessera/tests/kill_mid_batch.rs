//! A wallet process killed (SIGKILL) in the middle of a stream of `BatchCredit` calls loses no
//! acknowledged posting and leaves no half transaction: every batch it answered is fully in
//! the ledger, every ledger transaction has its balanced postings and lot, balances equal
//! their postings. After a restart an acknowledged batch replays to the same answer, and a
//! batch that was cut off can be retried once its idempotency lease runs out. On SQLite and,
//! when configured, PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::Config;
use tessera_store::{Db, stmt};
use tonic::transport::Channel;

mod common;

use common::{free_port, serve};

const ENTRIES: usize = 100;
const CLIENTS: usize = 6;

async fn connect(port: u16) -> WalletServiceClient<Channel> {
    WalletServiceClient::new(common::channel(port).await)
}

fn batch(key: &str) -> tonic::Request<pb::BatchCreditRequest> {
    let entries = (0..ENTRIES)
        .map(|i| pb::BatchCreditEntry {
            customer_id: format!("m{}", i % 37),
            asset: Some(pb::Asset {
                kind: pb::AssetKind::Points as i32,
                code: "default".into(),
            }),
            amount: 1 + i as i64,
            reason: "kill test".into(),
            expires_at: None,
        })
        .collect();
    common::request(
        "system",
        pb::BatchCreditRequest {
            idempotency_key: key.into(),
            entries,
        },
    )
}

async fn count(db: &Db, sql: &str) -> i64 {
    let conn = db.conn();
    sea_orm::ConnectionTrait::query_one_raw(conn, stmt(conn, sql, Vec::<sea_orm::Value>::new()))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap()
}

async fn run(backend: &str, mut env: HashMap<String, String>, config: Config) {
    let port = free_port();
    env.insert("TESSERA_GRPC_ADDR".into(), format!("127.0.0.1:{port}"));
    env.insert(
        "TESSERA_IDEMPOTENCY__IN_FLIGHT_LEASE_SECS".into(),
        "1".into(),
    );
    env.insert("TESSERA_TELEMETRY__LOG_FILTER".into(), "off".into());
    // Events are kept in the outbox: notification is not running.
    env.insert(
        "TESSERA_PEERS__NOTIFICATION_URL".into(),
        format!("http://127.0.0.1:{}", free_port()),
    );
    let mut wallet = serve("wallet", &env);
    let client = connect(port).await;

    // Clients send batches until the process dies; each records what was acknowledged.
    let acknowledged: Arc<Mutex<Vec<(String, pb::BatchCreditResponse)>>> = Arc::default();
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let (mut client, acknowledged, sent) = (client.clone(), acknowledged.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("{worker}-{i}");
                sent.lock().unwrap().push(key.clone());
                match client.batch_credit(batch(&key)).await {
                    Ok(r) => acknowledged.lock().unwrap().push((key, r.into_inner())),
                    Err(_) => break,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < 10 {
        assert!(
            Instant::now() < deadline,
            "{backend}: no batch acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-stream: batches are in flight on every client.
    wallet.kill();
    for w in workers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();

    let db = Db::connect(&config, "wallet").await.expect("db");
    let ids: Vec<String> = acknowledged
        .iter()
        .flat_map(|(_, r)| r.transaction_ids.clone())
        .collect();
    let stored: HashSet<String> = {
        let conn = db.conn();
        sea_orm::ConnectionTrait::query_all_raw(
            conn,
            stmt(
                conn,
                "SELECT id FROM transactions WHERE tenant_id = 'default'",
                Vec::<sea_orm::Value>::new(),
            ),
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect()
    };
    let lost = ids.iter().filter(|id| !stored.contains(*id)).count();
    assert_eq!(lost, 0, "{backend}: acknowledged credits lost");
    assert_eq!(
        stored.len() % ENTRIES,
        0,
        "{backend}: a batch was partly written"
    );
    for (what, sql) in [
        (
            "transactions without exactly two balanced postings",
            "SELECT COUNT(*) FROM transactions t WHERE (SELECT COUNT(*) FROM postings p \
             WHERE p.tenant_id = t.tenant_id AND p.transaction_id = t.id) <> 2 \
             OR (SELECT COALESCE(SUM(p.amount), 0) FROM postings p WHERE p.tenant_id = t.tenant_id \
             AND p.transaction_id = t.id) <> 0",
        ),
        (
            "transactions without their lot",
            "SELECT COUNT(*) FROM transactions t WHERE NOT EXISTS (SELECT 1 FROM lots l \
             WHERE l.tenant_id = t.tenant_id AND l.transaction_id = t.id)",
        ),
        (
            "postings without a transaction",
            "SELECT COUNT(*) FROM postings p WHERE NOT EXISTS (SELECT 1 FROM transactions t \
             WHERE t.tenant_id = p.tenant_id AND t.id = p.transaction_id)",
        ),
        (
            "balances off their postings",
            "SELECT COUNT(*) FROM accounts a WHERE a.owner_kind = 'customer' AND a.balance <> \
             (SELECT CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) FROM postings p \
              WHERE p.tenant_id = a.tenant_id AND p.account_id = a.id)",
        ),
        (
            "events missing for written credits",
            "SELECT (SELECT COUNT(*) FROM transactions) - (SELECT COUNT(*) FROM outbox)",
        ),
    ] {
        assert_eq!(count(&db, sql).await, 0, "{backend}: {what}");
    }

    // Restarted: an acknowledged batch replays to the same answer; a batch that was cut off
    // completes once its lease has run out, exactly once.
    let _restarted = serve("wallet", &env);
    let mut client = connect(port).await;
    let (key, first) = &acknowledged[0];
    let replay = client.batch_credit(batch(key)).await.unwrap().into_inner();
    assert_eq!(&replay, first, "{backend}: replay after the crash");
    let acked: HashSet<&String> = acknowledged.iter().map(|(k, _)| k).collect();
    let cut_off = sent
        .iter()
        .find(|k| !acked.contains(k))
        .expect("some batch was cut off");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let retried = client
        .batch_credit(batch(cut_off))
        .await
        .expect("retry of a cut-off batch")
        .into_inner();
    let again = client
        .batch_credit(batch(cut_off))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried, again);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM transactions").await as usize,
        stored.len()
            + if stored.contains(&retried.transaction_ids[0]) {
                0
            } else {
                ENTRIES
            },
        "{backend}: the retry posted exactly once"
    );
    db.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_wallet_loses_no_acknowledged_posting() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("tessera-kill-{id}"));
    let mut sqlite = Config {
        data_dir: dir.clone(),
        ..Config::default()
    };
    sqlite.database.url = None;
    run(
        "sqlite",
        HashMap::from([("TESSERA_DATA_DIR".to_string(), dir.display().to_string())]),
        sqlite,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);

    let Ok(database) = std::env::var("TESSERA_TEST_DATABASE_URL") else {
        assert!(
            std::env::var("TESSERA_REQUIRE_BACKENDS").as_deref() != Ok("1"),
            "TESSERA_REQUIRE_BACKENDS=1 but TESSERA_TEST_DATABASE_URL is not set"
        );
        return;
    };
    let prefix = format!("k{}_", &id[..12]);
    let mut postgres = Config::default();
    postgres.database.url = Some(database.clone());
    postgres.database.schema_prefix = prefix.clone();
    run(
        "postgres",
        HashMap::from([
            ("TESSERA_DATABASE__URL".to_string(), database),
            ("TESSERA_DATABASE__SCHEMA_PREFIX".to_string(), prefix),
        ]),
        postgres,
    )
    .await;
}
