//! Idempotency-Key semantics, end to end: replay, reuse with another body, in flight,
//! takeover after the owner died, and concurrent duplicates.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_proto::wallet::v1 as pb;
use tessera_store::idempotency::{Begin, Idempotency};
use tessera_tests::{TENANT, TestSuite, backend_tests};

use crate::points;

backend_tests!(
    replay_returns_the_stored_response,
    reuse_with_another_body_is_refused,
    duplicate_in_flight_is_aborted,
    key_of_a_dead_request_is_taken_over,
    concurrent_duplicates_credit_once,
);

/// The wallet request the gateway builds for `POST /v1/customers/{customer}/points`.
fn credit_request(key: &str, customer: &str, amount: i64) -> pb::CreditRequest {
    pb::CreditRequest {
        idempotency_key: key.into(),
        customer_id: customer.into(),
        asset: Some(pb::Asset {
            kind: pb::AssetKind::Points as i32,
            code: "default".into(),
        }),
        amount,
        reason: String::new(),
        expires_at: None,
        pending: None,
        spent_amount: 0,
        apply_tier_multiplier: false,
    }
}

async fn replay_returns_the_stored_response(suite: TestSuite) {
    let first = suite
        .post(
            "/v1/customers/carol/points",
            Some("idem-1"),
            &json!({"amount": 10}),
        )
        .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = suite
        .post(
            "/v1/customers/carol/points",
            Some("idem-1"),
            &json!({"amount": 10}),
        )
        .await;
    assert_eq!(again.status(), 201);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again, "a replay returns the identical response");
    assert_eq!(points(&suite, "carol").await, 10, "credited once");
    suite.cleanup().await;
}

async fn reuse_with_another_body_is_refused(suite: TestSuite) {
    let first = suite
        .post(
            "/v1/customers/dan/points",
            Some("idem-2"),
            &json!({"amount": 10}),
        )
        .await;
    assert_eq!(first.status(), 201);
    let other = suite
        .post(
            "/v1/customers/dan/points",
            Some("idem-2"),
            &json!({"amount": 11}),
        )
        .await;
    assert_eq!(other.status(), 422);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["code"], "failed_precondition");
    assert_eq!(body["error"]["reason"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(points(&suite, "dan").await, 10);
    suite.cleanup().await;
}

async fn duplicate_in_flight_is_aborted(suite: TestSuite) {
    // Hold the key as a request that is still running would.
    let idem = Idempotency::new(suite.db("wallet").await, Duration::from_secs(60));
    let begun = idem
        .begin::<pb::CreditResponse>(
            &suite.ctx(TENANT),
            "wallet.Credit",
            "idem-3",
            &credit_request("idem-3", "erin", 5),
        )
        .await
        .unwrap();
    assert!(matches!(begun, Begin::Fresh(_)));
    let response = suite
        .post(
            "/v1/customers/erin/points",
            Some("idem-3"),
            &json!({"amount": 5}),
        )
        .await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "aborted");
    assert_eq!(body["error"]["reason"], "IDEMPOTENCY_KEY_IN_FLIGHT");
    assert_eq!(points(&suite, "erin").await, 0);
    suite.cleanup().await;
}

async fn key_of_a_dead_request_is_taken_over(suite: TestSuite) {
    // A claim whose lease has already run out: its owner died mid-request.
    let idem = Idempotency::new(suite.db("wallet").await, Duration::ZERO);
    let begun = idem
        .begin::<pb::CreditResponse>(
            &suite.ctx(TENANT),
            "wallet.Credit",
            "idem-4",
            &credit_request("idem-4", "fay", 7),
        )
        .await
        .unwrap();
    let Begin::Fresh(stale_claim) = begun else {
        panic!("fresh claim expected")
    };
    let response = suite
        .post(
            "/v1/customers/fay/points",
            Some("idem-4"),
            &json!({"amount": 7}),
        )
        .await;
    assert_eq!(response.status(), 201, "a retry takes the key over");
    // The dead owner's late completion is fenced off.
    let db = suite.db("wallet").await;
    let txn = db.begin_write().await.unwrap();
    let late = idem
        .complete(&txn, &stale_claim, &pb::CreditResponse::default())
        .await;
    assert_eq!(late.unwrap_err().code, tessera_runtime::Code::Aborted);
    drop(txn);
    assert_eq!(points(&suite, "fay").await, 7);
    suite.cleanup().await;
}

async fn concurrent_duplicates_credit_once(suite: TestSuite) {
    let responses = futures::future::join_all((0..20).map(|_| {
        let suite = &suite;
        async move {
            let r = suite
                .post(
                    "/v1/customers/gus/points",
                    Some("idem-5"),
                    &json!({"amount": 25}),
                )
                .await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    }))
    .await;
    let created: Vec<&Value> = responses
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    assert!(!created.is_empty());
    assert!(
        responses.iter().all(|(s, _)| *s == 201 || *s == 409),
        "only success or in-flight: {responses:?}"
    );
    let id = &created[0]["transaction"]["id"];
    assert!(
        created.iter().all(|b| &b["transaction"]["id"] == id),
        "one transaction"
    );
    assert_eq!(points(&suite, "gus").await, 25);
    suite.cleanup().await;
}
