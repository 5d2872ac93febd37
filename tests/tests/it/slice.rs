//! The thin slice: points credited through the gateway land in the wallet's ledger, the
//! balance reads back, and the wallet's event reaches notification through the outbox.

use std::time::Duration;

use serde_json::json;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::{assert_ledger_invariants, data, events, points};

backend_tests!(
    credit_points_reads_back_and_reaches_notification,
    ledger_stays_balanced_under_concurrent_credits
);

async fn credit_points_reads_back_and_reaches_notification(suite: TestSuite) {
    let response = suite
        .post(
            "/v1/customers/alice/points",
            Some("slice-1"),
            &json!({"amount": 150, "reason": "welcome"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["balance"]["available"], 150);
    assert_eq!(body["transaction"]["amount"], 150);
    let transaction_id = body["transaction"]["id"].as_str().unwrap().to_string();

    let second = suite
        .post(
            "/v1/customers/alice/points",
            Some("slice-2"),
            &json!({"amount": 50}),
        )
        .await;
    assert_eq!(second.status(), 201);
    assert_eq!(points(&suite, "alice").await, 200);

    let delivered = eventually(
        Duration::from_secs(10),
        "points.credited events",
        || async {
            let found = events(&suite, TENANT, "points.credited").await;
            (found.len() == 2).then_some(found)
        },
    )
    .await;
    let first = delivered
        .iter()
        .find(|e| data(e)["transaction_id"] == transaction_id)
        .expect("event of the first credit");
    assert_eq!(data(first)["amount"], 150);
    assert_eq!(data(first)["customer_id"], "alice");
    assert_eq!(first.source, "wallet");
    assert!(
        !first.traceparent.is_empty(),
        "event carries its trace context"
    );
    suite.cleanup().await;
}

async fn ledger_stays_balanced_under_concurrent_credits(suite: TestSuite) {
    let credits = futures::future::join_all((1..=40).map(|i| {
        let suite = &suite;
        async move {
            suite
                .post(
                    "/v1/customers/bob/points",
                    Some(&format!("conc-{i}")),
                    &json!({"amount": i}),
                )
                .await
                .status()
        }
    }))
    .await;
    assert!(credits.iter().all(|s| *s == 201), "{credits:?}");
    assert_eq!(points(&suite, "bob").await, (1..=40).sum::<i64>());

    assert_ledger_invariants(&suite).await;
    suite.cleanup().await;
}
