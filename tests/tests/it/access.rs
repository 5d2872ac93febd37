//! Access on every route, read from the gateway's own OpenAPI document (which is built
//! with the routes, so it lists every one): no key → 401; every role the route does not
//! document in `x-roles` → 403, before anything is read or written; every role it does
//! document → past the role check; another tenant's object → 404. Routes without `x-roles`
//! are public, and only the known public ones may be.

use serde_json::{Value, json};
use tessera_gateway::{ApiKeys, Role};
use tessera_tests::{TestSuite, backend_tests};

backend_tests!(every_route_checks_key_role_and_tenant);

/// The routes served without an API key.
const PUBLIC: [&str; 6] = [
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /openapi.json",
    "GET /v1/unsubscribe",
    "POST /v1/unsubscribe",
];

/// Every operation of the document: method, a concrete path, and its roles (None: public).
fn operations(document: &Value) -> Vec<(String, String, String, Option<Vec<String>>)> {
    let mut out = Vec::new();
    for (template, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let mut path = template.clone();
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["in"] != "path" {
                    continue;
                }
                let name = parameter["name"].as_str().expect("name");
                let value = parameter["schema"]["enum"][0].as_str().unwrap_or("x1");
                path = path.replace(&format!("{{{name}}}"), value);
            }
            let roles = operation.get("x-roles").map(|roles| {
                roles
                    .as_array()
                    .expect("x-roles")
                    .iter()
                    .map(|r| r.as_str().expect("role").to_string())
                    .collect()
            });
            out.push((method.to_uppercase(), template.clone(), path, roles));
        }
    }
    out
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
    let document: Value = suite
        .http
        .get(format!("{}/openapi.json", suite.base_url))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("the document");
    assert!(
        document["openapi"]
            .as_str()
            .expect("version")
            .starts_with("3.1")
    );
    let operations = operations(&document);
    assert!(
        operations.len() >= 70,
        "only {} operations",
        operations.len()
    );
    let body = json!({});
    let mut public = Vec::new();
    for (method, template, path, roles) in operations {
        let Some(roles) = roles else {
            public.push(format!("{method} {template}"));
            continue;
        };
        let (status, answer) = suite.call(&method, &path, &body, None).await;
        assert_eq!(status, 401, "{method} {path} without a key: {answer}");
        assert_eq!(
            answer["error"]["code"], "unauthenticated",
            "{method} {path}"
        );
        for role in Role::ALL {
            let key = &role_keys[role.as_str()];
            let (status, answer) = suite.call(&method, &path, &body, Some(key)).await;
            if roles.iter().any(|r| r == role.as_str()) {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} as {}, a role it documents: {status} {answer}",
                    role.as_str()
                );
            } else {
                assert_eq!(
                    status,
                    403,
                    "{method} {path} as {}: {answer}",
                    role.as_str()
                );
            }
        }
    }
    public.sort();
    let mut expected: Vec<String> = PUBLIC.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(public, expected, "the public routes");

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
    let json_of = |r: reqwest::Response| async move { r.json::<Value>().await.expect("json") };
    let pool = json_of(
        suite
            .post(
                "/v1/code-pools",
                Some("acc-3"),
                &json!({"reward_id": reward_id, "name": "mine", "pattern": {"pattern": "MY-####"}}),
            )
            .await,
    )
    .await;
    let pool_id = pool["id"].as_str().expect("pool id").to_string();
    let endpoint = json_of(
        suite
            .post(
                "/v1/webhook-endpoints",
                Some("acc-4"),
                &json!({"url": "http://127.0.0.1:9/hook"}),
            )
            .await,
    )
    .await;
    let endpoint_id = endpoint["endpoint"]["id"]
        .as_str()
        .expect("endpoint id")
        .to_string();
    let order = json!({"id": "acc-o1", "customer_id": "ann", "status": "ORDER_STATUS_PAID",
                       "currency": "USD", "lines": [{"sku": "TV", "quantity": 1, "unit_amount": 100}]});
    assert_eq!(
        suite
            .post("/v1/orders", Some("acc-5"), &order)
            .await
            .status(),
        200
    );
    let keys_page = json_of(suite.get("/v1/api-keys").await).await;
    let key_id = keys_page["data"][0]["id"]
        .as_str()
        .expect("key id")
        .to_string();
    let other = "tsk_admin_of_another_tenant_000000000001";
    keys.insert("other", "other admin", Role::Admin, other)
        .await
        .expect("other tenant's key");
    for path in [
        "/v1/campaigns/mine".to_string(),
        format!("/v1/rewards/{reward_id}"),
        "/v1/campaigns/mine/history".to_string(),
        format!("/v1/code-pools/{pool_id}"),
        format!("/v1/webhook-endpoints/{endpoint_id}"),
        "/v1/customers/ann/profile".to_string(),
        format!("/v1/api-keys/{key_id}"),
    ] {
        let (status, answer) = suite.call("GET", &path, &Value::Null, Some(other)).await;
        assert_eq!(status, 404, "{path} from another tenant: {answer}");
        let (status, _) = suite
            .call("GET", &path, &Value::Null, Some(&suite.admin_key))
            .await;
        assert_eq!(status, 200, "{path} from its tenant");
    }
    let (status, _) = suite
        .call("POST", "/v1/campaigns/mine/pause", &json!({}), Some(other))
        .await;
    assert_eq!(status, 404, "another tenant cannot act on it");
    suite.cleanup().await;
}
