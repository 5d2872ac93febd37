//! Access on every route: no key → 401; a role the route does not serve → 403 (before
//! anything is read or written); another tenant's object → 404. The public routes
//! (`/healthz`, `/readyz`, `/metrics`, the signed `/v1/unsubscribe` link) are not listed;
//! a new route belongs in [`routes`].

use serde_json::{Value, json};
use tessera_gateway::{ApiKeys, Role};
use tessera_tests::{TestSuite, backend_tests};

backend_tests!(every_route_checks_key_role_and_tenant);

/// Every route and method, with a body that passes parsing, and a role it refuses (None:
/// every role may call it).
fn routes() -> Vec<(&'static str, &'static str, Value, Option<Role>)> {
    use Role::{Analyst, Marketer, Touchpoint};
    let empty = json!({});
    vec![
        ("POST", "/v1/campaigns", empty.clone(), Some(Analyst)),
        ("GET", "/v1/campaigns", Value::Null, None),
        ("GET", "/v1/campaigns/c1", Value::Null, None),
        ("PUT", "/v1/campaigns/c1", empty.clone(), Some(Analyst)),
        ("GET", "/v1/campaigns/c1/history", Value::Null, None),
        ("GET", "/v1/campaigns/c1/jobs", Value::Null, None),
        (
            "POST",
            "/v1/campaigns/c1/pause",
            empty.clone(),
            Some(Analyst),
        ),
        (
            "POST",
            "/v1/campaigns/c1/distributions",
            json!({"segment_id": "s"}),
            Some(Analyst),
        ),
        ("GET", "/v1/campaigns/c1/codes.csv", Value::Null, None),
        ("GET", "/v1/distributions/d1", Value::Null, None),
        ("POST", "/v1/rewards", empty.clone(), Some(Analyst)),
        ("GET", "/v1/rewards", Value::Null, None),
        ("POST", "/v1/rewards/preview", empty.clone(), None),
        ("GET", "/v1/rewards/r1", Value::Null, None),
        ("PUT", "/v1/rewards/r1", empty.clone(), Some(Analyst)),
        (
            "POST",
            "/v1/rewards/r1/status",
            empty.clone(),
            Some(Analyst),
        ),
        ("POST", "/v1/code-pools", empty.clone(), Some(Analyst)),
        ("GET", "/v1/code-pools", Value::Null, None),
        ("GET", "/v1/code-pools/jobs/j1", Value::Null, None),
        ("GET", "/v1/code-pools/p1", Value::Null, None),
        ("PUT", "/v1/code-pools/p1", empty.clone(), Some(Analyst)),
        (
            "POST",
            "/v1/code-pools/p1/status",
            empty.clone(),
            Some(Analyst),
        ),
        (
            "POST",
            "/v1/code-pools/p1/generate",
            empty.clone(),
            Some(Analyst),
        ),
        (
            "GET",
            "/v1/code-pools/p1/codes.csv",
            Value::Null,
            Some(Analyst),
        ),
        // (A CSV body: the role check follows the content type's; 401 only here.)
        ("POST", "/v1/code-pools/p1/codes.csv", Value::Null, None),
        ("GET", "/v1/codes/C1", Value::Null, None),
        ("POST", "/v1/codes/C1/status", empty.clone(), Some(Analyst)),
        ("GET", "/v1/customers/u1/rewards", Value::Null, None),
        (
            "POST",
            "/v1/customers/u1/rewards",
            empty.clone(),
            Some(Analyst),
        ),
        (
            "POST",
            "/v1/customers/u1/rewards/p1/shown",
            empty.clone(),
            Some(Analyst),
        ),
        ("POST", "/v1/qualify", empty.clone(), Some(Analyst)),
        (
            "PUT",
            "/v1/customers/u1/profile",
            empty.clone(),
            Some(Analyst),
        ),
        ("GET", "/v1/customers/u1/profile", Value::Null, None),
        (
            "DELETE",
            "/v1/customers/u1/profile",
            Value::Null,
            Some(Marketer),
        ),
        ("GET", "/v1/customers/u1/segments", Value::Null, None),
        ("POST", "/v1/orders", empty.clone(), Some(Analyst)),
        ("POST", "/v1/events", empty.clone(), Some(Analyst)),
        ("POST", "/v1/validate", empty.clone(), Some(Analyst)),
        ("POST", "/v1/redemptions", empty.clone(), Some(Analyst)),
        ("GET", "/v1/redemptions/x1", Value::Null, None),
        (
            "POST",
            "/v1/redemptions/x1/rollback",
            empty.clone(),
            Some(Analyst),
        ),
        ("POST", "/v1/reservations", empty.clone(), Some(Analyst)),
        (
            "POST",
            "/v1/reservations/x1/confirm",
            empty.clone(),
            Some(Analyst),
        ),
        ("GET", "/v1/brand", Value::Null, Some(Touchpoint)),
        ("PUT", "/v1/brand", empty.clone(), Some(Analyst)),
        ("GET", "/v1/templates", Value::Null, Some(Touchpoint)),
        ("PUT", "/v1/templates", empty.clone(), Some(Analyst)),
        ("DELETE", "/v1/templates?name=t", Value::Null, Some(Analyst)),
        (
            "POST",
            "/v1/customers/u1/messages",
            json!({"channel": "email", "template": "t"}),
            Some(Analyst),
        ),
        (
            "GET",
            "/v1/customers/u1/messages",
            Value::Null,
            Some(Touchpoint),
        ),
        (
            "PUT",
            "/v1/customers/u1/subscriptions/email",
            json!({"subscribed": true}),
            Some(Analyst),
        ),
        ("GET", "/v1/event-types", Value::Null, None),
        (
            "POST",
            "/v1/customers/u1/points",
            json!({"amount": 5}),
            Some(Analyst),
        ),
        ("GET", "/v1/customers/u1/wallet", Value::Null, None),
        (
            "GET",
            "/v1/customers/u1/wallet/transactions",
            Value::Null,
            None,
        ),
        (
            "POST",
            "/v1/customers/u1/wallet/adjustments",
            json!({"amount": 5, "reason": "r"}),
            Some(Analyst),
        ),
        (
            "POST",
            "/v1/customers/u1/wallet/refunds",
            json!({"transaction_id": "t", "reason": "r"}),
            Some(Analyst),
        ),
        ("GET", "/v1/customers/u1/wallet/cashback", Value::Null, None),
        ("GET", "/v1/customers/u1/wallet/tier", Value::Null, None),
        ("GET", "/v1/customers/u1/cockpit", Value::Null, None),
        ("GET", "/v1/audit-log", Value::Null, Some(Touchpoint)),
        (
            "POST",
            "/v1/webhook-endpoints",
            empty.clone(),
            Some(Marketer),
        ),
        ("GET", "/v1/webhook-endpoints", Value::Null, Some(Marketer)),
        (
            "GET",
            "/v1/webhook-endpoints/w1",
            Value::Null,
            Some(Marketer),
        ),
        (
            "PUT",
            "/v1/webhook-endpoints/w1",
            empty.clone(),
            Some(Marketer),
        ),
        (
            "POST",
            "/v1/webhook-endpoints/w1/rotate-secret",
            empty.clone(),
            Some(Marketer),
        ),
        ("GET", "/v1/deliveries", Value::Null, Some(Marketer)),
        (
            "POST",
            "/v1/deliveries/replay",
            empty.clone(),
            Some(Marketer),
        ),
        ("GET", "/v1/deliveries/x1", Value::Null, Some(Marketer)),
    ]
}

async fn call(
    suite: &TestSuite,
    method: &str,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = suite
        .http
        .request(method, format!("{}{path}", suite.base_url))
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string());
    if !body.is_null() {
        request = request.json(body);
    }
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn every_route_checks_key_role_and_tenant(suite: TestSuite) {
    let keys = ApiKeys::new(suite.db("gateway").await);
    let mut role_keys = std::collections::HashMap::new();
    for (i, role) in Role::ALL.into_iter().enumerate() {
        let key = format!("tsk_access_test_key_of_role_number_{i:04}");
        keys.insert("default", "access test", role, &key)
            .await
            .expect("key");
        role_keys.insert(role.as_str(), key);
    }
    for (method, path, body, refused) in routes() {
        let (status, answer) = call(&suite, method, path, &body, None).await;
        assert_eq!(status, 401, "{method} {path} without a key: {answer}");
        assert_eq!(
            answer["error"]["code"], "unauthenticated",
            "{method} {path}"
        );
        if let Some(role) = refused {
            let key = &role_keys[role.as_str()];
            let (status, answer) = call(&suite, method, path, &body, Some(key)).await;
            assert_eq!(
                status,
                403,
                "{method} {path} as {}: {answer}",
                role.as_str()
            );
        }
    }

    // Objects of tenant `default`, asked for with another tenant's admin key.
    let created: Value = suite
        .post(
            "/v1/campaigns",
            Some("acc-1"),
            &json!({"id": "mine", "name": "Mine", "type": "CAMPAIGN_TYPE_PROMOTION",
                    "definition": {"effect": {"amountOff": {"amount": 100}}}}),
        )
        .await
        .json()
        .await
        .expect("campaign");
    assert_eq!(created["id"], "mine");
    let reward: Value = suite
        .post(
            "/v1/rewards",
            Some("acc-2"),
            &json!({"name": "Five off", "currency": "EUR", "effect": {"amount_off": {"amount": 500}}}),
        )
        .await
        .json()
        .await
        .expect("reward");
    let reward_id = reward["id"].as_str().expect("reward id").to_string();
    let other = "tsk_admin_of_another_tenant_000000000001";
    keys.insert("other", "other admin", Role::Admin, other)
        .await
        .expect("other tenant's key");
    for path in [
        "/v1/campaigns/mine".to_string(),
        format!("/v1/rewards/{reward_id}"),
        "/v1/campaigns/mine/history".to_string(),
    ] {
        let (status, answer) = call(&suite, "GET", &path, &Value::Null, Some(other)).await;
        assert_eq!(status, 404, "{path} from another tenant: {answer}");
        let (status, _) = call(&suite, "GET", &path, &Value::Null, Some(&suite.admin_key)).await;
        assert_eq!(status, 200, "{path} from its tenant");
    }
    let (status, _) = call(
        &suite,
        "POST",
        "/v1/campaigns/mine/pause",
        &json!({}),
        Some(other),
    )
    .await;
    assert_eq!(status, 404, "another tenant cannot act on it");
    suite.cleanup().await;
}
