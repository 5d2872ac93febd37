//! Retention on a real database: the rules each service configures purge what is past its
//! time (settled idempotency keys after their replay window, dead letters, received events
//! none of whose deliveries is pending, the audit log) and keep everything else, in bounded
//! batches that leave other tenants' and recent rows alone; a tenant with periods of its own
//! keeps its rows by them.

use sea_orm::ConnectionTrait;
use tessera_proto::notification::v1 as pb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::RequestContext;
use tessera_runtime::config::RetentionConfig;
use tessera_store::queue::{NewItem, push};
use tessera_store::retention::Purger;
use tessera_store::{Db, now_micros, stmt};
use tessera_tests::{TENANT, TestSuite, backend_tests};

use crate::wallet::credit;

backend_tests!(
    each_service_purges_what_is_past_its_time,
    small_batches_go_oldest_first_and_miss_nothing
);

const DAY: i64 = 86_400 * 1_000_000;
/// The ids of the test's events: `PREFIX` and a 12-digit number (a UUID).
const PREFIX: &str = "00000000-0000-7000-8000-";

async fn count(db: &Db, sql: &str) -> i64 {
    let conn = db.conn();
    let row = conn
        .query_one_raw(stmt(conn, sql, []))
        .await
        .expect("count")
        .expect("a row");
    row.try_get_by_index(0).expect("a number")
}

async fn exec(db: &Db, sql: &str, values: Vec<sea_orm::Value>) {
    let conn = db.conn();
    conn.execute_raw(stmt(conn, sql, values))
        .await
        .expect("statement");
}

async fn each_service_purges_what_is_past_its_time(suite: TestSuite) {
    let config = RetentionConfig::default();
    let now = now_micros();

    // Wallet: settled idempotency keys older than their window go, a recent one stays (a
    // retry of it still gets its answer); an old dead letter goes, a recent one stays.
    let mut wallet = WalletServiceClient::new(suite.channel());
    for (key, customer) in [("old-1", "ana"), ("old-2", "bo"), ("fresh", "cy")] {
        credit(&mut wallet, &suite, key, customer, 10, None).await;
    }
    let db = suite.db("wallet").await;
    exec(
        &db,
        "UPDATE idempotency_keys SET created_at = $1 WHERE key IN ('old-1', 'old-2')",
        vec![(now - 4 * DAY).into()],
    )
    .await;
    let item = |key: &str| NewItem {
        queue: "test",
        tenant: TENANT.into(),
        key: key.into(),
        kind: "test".into(),
        payload: Vec::new(),
        not_before: None,
        group: String::new(),
    };
    push(db.conn(), [item("dead-old"), item("dead-new")])
        .await
        .unwrap();
    exec(
        &db,
        "UPDATE work_queue SET dead_at = $1 WHERE dedupe_key = 'dead-old'",
        vec![(now - 31 * DAY).into()],
    )
    .await;
    exec(
        &db,
        "UPDATE work_queue SET dead_at = $1 WHERE dedupe_key = 'dead-new'",
        vec![now.into()],
    )
    .await;
    let keys = "SELECT COUNT(*) FROM idempotency_keys WHERE key IN ('old-1', 'old-2', 'fresh')";
    assert_eq!(count(&db, keys).await, 3);
    let purger = Purger::new(db.clone(), "wallet", Vec::new(), &config);
    assert!(
        purger.purge().await.unwrap(),
        "a small purge ends in one slice"
    );
    assert_eq!(count(&db, keys).await, 1);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM idempotency_keys WHERE key = 'fresh'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM work_queue WHERE queue = 'test'").await,
        1
    );
    // The ledger is not a retention class: the credits stand.
    let b = crate::wallet::balance(&mut wallet, &suite, "ana").await;
    assert_eq!(b.available, 10);

    // Notification: old events go unless a delivery of theirs is pending; recent ones stay.
    let mut notification = NotificationServiceClient::new(suite.channel());
    let events: Vec<pb::Event> = (0..1_203)
        .map(|i| pb::Event {
            id: format!("{PREFIX}{i:012}"),
            tenant_id: TENANT.into(),
            r#type: "points.credited".into(),
            source: "tests".into(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            data: br#"{"amount": 1}"#.to_vec(),
            traceparent: String::new(),
        })
        .collect();
    for chunk in events.chunks(500) {
        notification
            .publish_events(RequestContext::system(TENANT, "tests").request(
                pb::PublishEventsRequest {
                    events: chunk.to_vec(),
                },
            ))
            .await
            .expect("publish");
    }
    let db = suite.db("notification").await;
    // All but the last three are old; one old one has a delivery still pending.
    exec(
        &db,
        "UPDATE events SET received_at = $1 WHERE event_id < $2",
        vec![
            (now - 31 * DAY).into(),
            format!("{PREFIX}000000001200").into(),
        ],
    )
    .await;
    exec(
        &db,
        "INSERT INTO deliveries (id, tenant_id, endpoint_id, event_id, event_type, status, \
         attempts, next_attempt_at, created_at) \
         VALUES ('msg_pending', $1, 'ep-gone', $4, 'points.credited', 'pending', \
         3, $2, $3)",
        vec![
            TENANT.into(),
            (now + 365 * DAY).into(),
            (now - 31 * DAY).into(),
            format!("{PREFIX}000000000007").into(),
        ],
    )
    .await;
    let all = "SELECT COUNT(*) FROM events WHERE event_id LIKE '00000000-0000-7000-8000-%'";
    assert_eq!(count(&db, all).await, 1_203);
    let purger = Purger::new(
        db.clone(),
        "notification",
        tessera_notification::retention_rules(),
        &config,
    );
    // 1,199 rows in batches of 1,000: bounded statements, one purge.
    let mut slices = 0;
    while !purger.purge().await.unwrap() {
        slices += 1;
        assert!(slices < 20, "the purge never ends");
    }
    assert_eq!(
        count(&db, all).await,
        4,
        "three recent, one with a pending delivery"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM events WHERE event_id = '00000000-0000-7000-8000-000000000007'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM deliveries WHERE id = 'msg_pending'"
        )
        .await,
        1,
        "a pending delivery is never purged"
    );

    // Gateway: the audit log keeps 400 days, except for a tenant that keeps it ten years.
    let reward = serde_json::json!({
        "name": "Ten percent off",
        "currency": "EUR",
        "effect": {"percent_off": {"percent_bp": 1000}},
    });
    for key in ["retention-audit-1", "retention-audit-2"] {
        let created = suite.post("/v1/rewards", Some(key), &reward).await;
        assert_eq!(created.status().as_u16(), 201);
    }
    let db = suite.db("gateway").await;
    let logged = "SELECT COUNT(*) FROM audit_log";
    let entries = count(&db, logged).await;
    assert!(entries >= 2);
    exec(
        &db,
        "UPDATE audit_log SET at = $1",
        vec![(now - 401 * DAY).into()],
    )
    .await;
    exec(
        &db,
        "UPDATE audit_log SET tenant_id = 'bank' WHERE id = (SELECT MAX(id) FROM audit_log)",
        vec![],
    )
    .await;
    let mut config = config;
    config.tenants.insert(
        "bank".into(),
        tessera_runtime::config::TenantRetention {
            audit_days: Some(3_650),
            ..Default::default()
        },
    );
    let purger = Purger::new(
        db.clone(),
        "gateway",
        tessera_gateway::retention_rules(),
        &config,
    );
    assert!(purger.purge().await.unwrap());
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM audit_log WHERE tenant_id = 'bank'"
        )
        .await,
        1,
        "the tenant keeping its log longer keeps it"
    );
    assert_eq!(count(&db, logged).await, 1);
    suite.cleanup().await;
}

/// With batches of 3 rows, a purge steps through ages in order and misses nothing: rows of
/// equal age split across batches, an unsettled key among the old ones (kept, and stepped
/// over), and a second purge after new rows aged in behind the first one's cursor.
async fn small_batches_go_oldest_first_and_miss_nothing(suite: TestSuite) {
    let config = RetentionConfig {
        batch_rows: 3,
        busy_percent: 100,
        ..RetentionConfig::default()
    };
    let db = suite.db("wallet").await;
    let old = now_micros() - 10 * DAY;
    let insert = "INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, owner, \
                  locked_until, response_code, response, created_at) \
                  VALUES ($1, 'test.Batches', $2, '', $3, '', 0, 0, NULL, $4)";
    // Ages: 0, 0, 0, 0, 1, 2, 2, 3, …: ties across the batch edges.
    for n in 0..20i64 {
        let state = if n == 5 { "running" } else { "done" };
        let age = old + (n - 3).max(0) / 2;
        exec(
            &db,
            insert,
            vec![
                TENANT.into(),
                format!("k{n}").into(),
                state.into(),
                age.into(),
            ],
        )
        .await;
    }
    let left = "SELECT COUNT(*) FROM idempotency_keys WHERE scope = 'test.Batches'";
    let purger = Purger::new(db.clone(), "wallet", Vec::new(), &config);
    while !purger.purge().await.expect("purge") {}
    assert_eq!(count(&db, left).await, 1, "only the unsettled key stays");
    // Rows older than where the first purge stopped are found by the next one.
    for n in 20..25i64 {
        exec(
            &db,
            insert,
            vec![
                TENANT.into(),
                format!("k{n}").into(),
                "done".into(),
                (old - n).into(),
            ],
        )
        .await;
    }
    while !purger.purge().await.expect("purge") {}
    assert_eq!(count(&db, left).await, 1);
}
