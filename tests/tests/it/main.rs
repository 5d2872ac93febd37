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

use serde_json::Value;
use tessera_proto::notification::v1 as npb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_tests::TestSuite;

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
