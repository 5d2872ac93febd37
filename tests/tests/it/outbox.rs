//! The transactional outbox: events survive a restart while notification is down, a relay
//! that dies mid-batch loses nothing (its lease runs out and another relay delivers), failed
//! deliveries are retried, and notification stores a redelivered event once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::ConnectionTrait;
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use serde_json::json;
use tessera_proto::notification::v1 as npb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_runtime::config::OutboxConfig;
use tessera_runtime::{Error, RequestContext};
use tessera_store::outbox::{self, OutboxEvent, Publisher, Relay};
use tessera_store::{Db, stmt};
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually, scalar};

use crate::events;

backend_tests!(
    events_survive_a_restart_while_notification_is_down,
    a_crashed_relay_loses_nothing,
    notification_stores_a_redelivered_event_once,
);

async fn undelivered(db: &Db) -> i64 {
    scalar(
        db,
        "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL",
        vec![],
    )
    .await
}

async fn events_survive_a_restart_while_notification_is_down(suite: TestSuite) {
    let (backend, config) = (suite.backend, suite.config.clone());
    // Replace the suite the macro started with one whose notification is unreachable.
    let mut first = suite;
    first.stop().await;
    let mut down = TestSuite::start_with(backend, config.clone(), true).await;
    let response = down
        .post(
            "/v1/customers/ivy/points",
            Some("ob-1"),
            &json!({"amount": 30}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let wallet_db = down.db("wallet").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        undelivered(&wallet_db).await,
        1,
        "the event waits in the outbox"
    );
    down.stop().await;

    // Restart on the same data with notification reachable: the event is delivered, once.
    let up = TestSuite::start_with(backend, config, false).await;
    let delivered = eventually(
        Duration::from_secs(15),
        "the event after restart",
        || async {
            let found = events(&up, TENANT, "points.credited").await;
            (!found.is_empty()).then_some(found)
        },
    )
    .await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(crate::data(&delivered[0])["amount"], 30);
    eventually(Duration::from_secs(5), "outbox drained", || async {
        (undelivered(&wallet_db).await == 0).then_some(())
    })
    .await;
    up.cleanup().await;
}

/// Plumbing tables only, in a database of its own.
struct PlumbingOnly;

impl MigratorTrait for PlumbingOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        tessera_store::migrate::plumbing()
    }
}

/// Records what it is asked to publish; hangs or fails on demand.
#[derive(Default)]
struct Recorder {
    published: Mutex<Vec<String>>,
    hang: bool,
    fail: bool,
}

#[async_trait::async_trait]
impl Publisher for Recorder {
    async fn publish(&self, _source: &str, events: &[OutboxEvent]) -> Result<(), Error> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.fail {
            return Err(Error::new(tessera_runtime::Code::Unavailable, "down"));
        }
        let mut published = self.published.lock().unwrap();
        published.extend(events.iter().map(|e| e.event_id.clone()));
        Ok(())
    }
}

fn relay(db: &Db, publisher: Arc<Recorder>) -> Relay {
    let config = OutboxConfig {
        poll_interval_ms: 10,
        batch_size: 100,
        lease_secs: 1,
    };
    Relay::new(db.clone(), "test", publisher, config)
}

async fn a_crashed_relay_loses_nothing(suite: TestSuite) {
    let db = Db::open::<PlumbingOnly>(&suite.config, "outbox_test")
        .await
        .unwrap();
    let txn = db.begin_write().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            outbox::enqueue(&txn, TENANT, "test.happened", &json!({ "i": i }))
                .await
                .unwrap(),
        );
    }
    txn.commit().await.unwrap();

    // Relay 1 claims the batch and "dies" while publishing.
    let hanging = Arc::new(Recorder {
        hang: true,
        ..Default::default()
    });
    let crashed =
        tokio::time::timeout(Duration::from_millis(200), relay(&db, hanging).run_once()).await;
    assert!(crashed.is_err(), "relay 1 never finishes");

    // While its lease lasts, nobody else takes the batch; afterwards relay 2 delivers it all.
    let recorder = Arc::new(Recorder::default());
    let second = relay(&db, recorder.clone());
    assert_eq!(second.run_once().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(second.run_once().await.unwrap(), 3);
    assert_eq!(
        second.run_once().await.unwrap(),
        0,
        "delivered events are not sent again"
    );
    assert_eq!(*recorder.published.lock().unwrap(), ids);

    // A failing publisher leaves events pending with the error recorded, for a later retry.
    let txn = db.begin_write().await.unwrap();
    outbox::enqueue(&txn, TENANT, "test.failed", &json!({}))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let failing = relay(
        &db,
        Arc::new(Recorder {
            fail: true,
            ..Default::default()
        }),
    );
    assert_eq!(failing.run_once().await.unwrap(), 0);
    assert_eq!(undelivered(&db).await, 1);
    let conn = db.conn();
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT attempts, last_error FROM outbox WHERE delivered_at IS NULL",
            [],
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get_by_index::<i32>(0).unwrap(), 1);
    assert!(row.try_get_by_index::<String>(1).unwrap().contains("down"));
    assert_eq!(
        second.run_once().await.unwrap(),
        0,
        "not before its backoff"
    );
    db.drop_schema().await.unwrap();
    suite.cleanup().await;
}

async fn notification_stores_a_redelivered_event_once(suite: TestSuite) {
    let mut client = NotificationServiceClient::new(suite.channel());
    let event = npb::Event {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: TENANT.into(),
        r#type: "customer.joined".into(),
        source: "test".into(),
        occurred_at: Some(outbox::micros_to_timestamp(tessera_store::now_micros())),
        data: br#"{"customer_id":"jo"}"#.to_vec(),
        traceparent: String::new(),
    };
    let system = RequestContext::system(TENANT, "test");
    let publish = |event: npb::Event| npb::PublishEventsRequest {
        events: vec![event],
    };
    let first = client
        .publish_events(system.request(publish(event.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.accepted, first.duplicates), (1, 0));
    let again = client
        .publish_events(system.request(publish(event.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    assert_eq!(events(&suite, TENANT, "customer.joined").await.len(), 1);

    // Only services publish, and only for their own tenant.
    let denied = client
        .publish_events(suite.ctx(TENANT).request(publish(event.clone())))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let other = RequestContext::system("other", "test");
    let wrong = client
        .publish_events(other.request(publish(event)))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    assert!(
        wrong.message().contains("events[0].tenant_id"),
        "{}",
        wrong.message()
    );
    suite.cleanup().await;
}
