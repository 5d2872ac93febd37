//! End-to-end tests of the foundation, each run on SQLite + in-process cache and on
//! PostgreSQL + Redis (see `tessera_tests::backend_tests!`).

mod auth;
mod health;
mod idempotency;
mod input;
mod metrics;
mod outbox;
mod slice;
mod trace;
mod wallet;
mod wallet_http;

use serde_json::Value;
use tessera_proto::notification::v1 as npb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_tests::{TENANT, TestSuite, scalar};

/// Events of `event_type` that notification has received for `tenant`.
pub async fn events(suite: &TestSuite, tenant: &str, event_type: &str) -> Vec<npb::Event> {
    let mut client = NotificationServiceClient::new(suite.channel());
    client
        .list_events(suite.ctx(tenant).request(npb::ListEventsRequest {
            r#type: event_type.into(),
            page: Some(tessera_proto::common::v1::PageRequest {
                limit: 100,
                starting_after: String::new(),
            }),
        }))
        .await
        .expect("list events")
        .into_inner()
        .events
}

/// The JSON payload of an event.
pub fn data(event: &npb::Event) -> Value {
    serde_json::from_slice(&event.data).expect("event data is JSON")
}

/// Points balance of `customer` in the default programme, via the gateway.
pub async fn points(suite: &TestSuite, customer: &str) -> i64 {
    let body: Value = suite
        .get(&format!("/v1/customers/{customer}/wallet"))
        .await
        .json()
        .await
        .expect("wallet JSON");
    body["balances"]
        .as_array()
        .expect("balances")
        .iter()
        .find(|b| b["asset"]["kind"] == "points" && b["asset"]["code"] == "default")
        .map_or(0, |b| b["available"].as_i64().expect("integer"))
}

/// Postings sum to zero; every customer balance equals its postings and its lots' remainder.
pub async fn assert_ledger_invariants(suite: &TestSuite) {
    let db = suite.db("wallet").await;
    let sum = scalar(
        &db,
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM postings WHERE tenant_id = $1",
        vec![TENANT.into()],
    )
    .await;
    assert_eq!(sum, 0, "postings balance");
    let wrong = scalar(
        &db,
        "SELECT COUNT(*) FROM accounts a WHERE a.tenant_id = $1 AND a.owner_kind = 'customer' AND (\
         a.balance <> (SELECT CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) FROM postings p \
                       WHERE p.tenant_id = a.tenant_id AND p.account_id = a.id) OR \
         a.balance <> (SELECT CAST(COALESCE(SUM(l.remaining), 0) AS BIGINT) FROM lots l \
                       WHERE l.tenant_id = a.tenant_id AND l.account_id = a.id) OR a.balance < 0)",
        vec![TENANT.into()],
    )
    .await;
    assert_eq!(
        wrong, 0,
        "balances equal their postings and lots, never negative"
    );
}
