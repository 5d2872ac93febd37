//! The wallet through the gateway: history with cursor pagination, agent adjustments (role
//! checked, reason required), expiring amounts on the wallet read.

use serde_json::{Value, json};
use tessera_gateway::{ApiKeys, Role};
use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_tests::{TENANT, TestSuite, backend_tests};

use crate::wallet::debit_request;

backend_tests!(
    history_and_adjustments_over_http,
    refunds_and_cashback_over_http,
);

async fn history_and_adjustments_over_http(suite: TestSuite) {
    for (i, amount) in [10, 20, 30].into_iter().enumerate() {
        let r = suite
            .post(
                "/v1/customers/sam/points",
                Some(&format!("h{i}")),
                &json!({ "amount": amount }),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let adjusted = suite
        .post(
            "/v1/customers/sam/wallet/adjustments",
            Some("adj-1"),
            &json!({"amount": -15, "reason": "duplicate credit"}),
        )
        .await;
    assert_eq!(adjusted.status(), 201);
    let body: Value = adjusted.json().await.unwrap();
    assert_eq!(body["balance"]["available"], 45);
    assert_eq!(body["balance"]["expiring"]["30d"], 0);
    let cockpit: Value = suite
        .get("/v1/customers/sam/cockpit")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cockpit["balances"][0]["available"], 45, "{cockpit}");
    assert_eq!(cockpit["rewards"], json!([]), "{cockpit}");

    let no_reason = suite
        .post(
            "/v1/customers/sam/wallet/adjustments",
            Some("adj-2"),
            &json!({"amount": 5}),
        )
        .await;
    assert_eq!(no_reason.status(), 400);
    let body: Value = no_reason.json().await.unwrap();
    assert_eq!(body["error"]["field_violations"][0]["field"], "reason");

    let page: Value = suite
        .get("/v1/customers/sam/wallet/transactions?limit=3")
        .await
        .json()
        .await
        .unwrap();
    let amounts: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, vec![-15, 30, 20]);
    assert_eq!(page["has_more"], true);
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest: Value = suite
        .get(&format!(
            "/v1/customers/sam/wallet/transactions?limit=3&starting_after={cursor}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["has_more"], false);
    let bad = suite
        .get("/v1/customers/sam/wallet/transactions?limit=500")
        .await;
    assert_eq!(bad.status(), 400);
    let unknown = suite
        .get("/v1/customers/sam/wallet/transactions?colour=red")
        .await;
    assert_eq!(unknown.status(), 400);

    // Touchpoints read history but may not adjust.
    let keys = ApiKeys::new(suite.db("gateway").await);
    let touchpoint = "tsk_touchpoint_wallet_http_0000000001";
    keys.insert("default", "pos", Role::Touchpoint, touchpoint)
        .await
        .unwrap();
    let forbidden = suite
        .http
        .post(format!(
            "{}/v1/customers/sam/wallet/adjustments",
            suite.base_url
        ))
        .bearer_auth(touchpoint)
        .header("Idempotency-Key", "adj-3")
        .json(&json!({"amount": 5, "reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let history = suite
        .http
        .get(format!(
            "{}/v1/customers/sam/wallet/transactions",
            suite.base_url
        ))
        .bearer_auth(touchpoint)
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), 200);
    let anonymous = suite
        .http
        .get(format!(
            "{}/v1/customers/sam/wallet/transactions",
            suite.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn refunds_and_cashback_over_http(suite: TestSuite) {
    let r = suite
        .post(
            "/v1/customers/ula/points",
            Some("p1"),
            &json!({ "amount": 100 }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let mut wallet = WalletServiceClient::new(suite.channel());
    let spent = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d1", "ula", 40)))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap()
        .id;
    let refund = |customer: &str, key: &str, body: Value| {
        let path = format!("/v1/customers/{customer}/wallet/refunds");
        let key = key.to_string();
        let suite = &suite;
        async move { suite.post(&path, Some(&key), &body).await }
    };
    let other = refund(
        "vic",
        "r0",
        json!({"transaction_id": spent, "reason": "returned"}),
    )
    .await;
    assert_eq!(other.status(), 404, "another customer's transaction");
    let no_reason = refund("ula", "r1", json!({"transaction_id": spent})).await;
    assert_eq!(no_reason.status(), 400);
    let refunded = refund(
        "ula",
        "r2",
        json!({"transaction_id": spent, "amount": 15, "reason": "returned"}),
    )
    .await;
    assert_eq!(refunded.status(), 201);
    let body: Value = refunded.json().await.unwrap();
    assert_eq!(body["transaction"]["kind"], "refund");
    assert_eq!(body["balance"]["available"], 75);
    assert_eq!(crate::points(&suite, "ula").await, 75);

    wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: "cb1".into(),
            customer_id: "ula".into(),
            asset: Some(pb::Asset {
                kind: pb::AssetKind::Cashback as i32,
                code: "EUR".into(),
            }),
            amount: 250,
            reason: "order 7".into(),
            expires_at: None,
            pending: Some(pb::PendingOptions { activate_at: None }),
            spent_amount: 0,
            apply_tier_multiplier: false,
        }))
        .await
        .unwrap();
    let page: Value = suite
        .get("/v1/customers/ula/wallet/cashback")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"][0]["status"], "pending");
    assert_eq!(page["data"][0]["amount"], 250);
    assert_eq!(page["data"][0]["history"].as_array().unwrap().len(), 1);
    let balances: Value = suite
        .get("/v1/customers/ula/wallet")
        .await
        .json()
        .await
        .unwrap();
    let eur = balances["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"]["kind"] == "cashback")
        .unwrap();
    assert_eq!(
        (eur["available"].as_i64(), eur["pending"].as_i64()),
        (Some(0), Some(250))
    );
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}
