//! API keys: no key → 401, unknown or revoked key → 401, wrong role → 403, and a tenant
//! never sees another tenant's data.

use serde_json::json;
use tessera_gateway::{ApiKeys, Role};
use tessera_tests::{TestSuite, backend_tests};

use crate::points;

backend_tests!(keys_roles_and_tenants);

async fn keys_roles_and_tenants(suite: TestSuite) {
    let url = format!("{}/v1/customers/kim/points", suite.base_url);
    let body = json!({"amount": 5});
    let no_key = suite
        .http
        .post(&url)
        .json(&body)
        .header("Idempotency-Key", "a1")
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let bad_key = suite
        .http
        .post(&url)
        .bearer_auth("tsk_not_a_key")
        .json(&body)
        .header("Idempotency-Key", "a2")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 401);

    let keys = ApiKeys::new(suite.db("gateway").await);
    let touchpoint = "tsk_touchpoint_of_the_default_tenant_0001";
    keys.insert("default", "web shop", Role::Touchpoint, touchpoint)
        .await
        .unwrap();
    let forbidden = suite
        .http
        .post(&url)
        .bearer_auth(touchpoint)
        .json(&body)
        .header("Idempotency-Key", "a3")
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let read = suite
        .http
        .get(format!("{}/v1/customers/kim/wallet", suite.base_url))
        .header("X-Api-Key", touchpoint)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200, "touchpoints may read a wallet");

    // Tenant isolation: acme's key sees nothing of default's customer kim.
    assert_eq!(
        suite
            .post("/v1/customers/kim/points", Some("a4"), &body)
            .await
            .status(),
        201
    );
    let acme = "tsk_admin_of_tenant_acme_000000000001";
    let acme_id = keys
        .insert("acme", "acme admin", Role::Admin, acme)
        .await
        .unwrap();
    let seen: serde_json::Value = suite
        .http
        .get(format!("{}/v1/customers/kim/wallet", suite.base_url))
        .bearer_auth(acme)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["balances"], json!([]));
    assert_eq!(points(&suite, "kim").await, 5);

    // A revoked key stops working at once.
    assert!(keys.revoke("acme", &acme_id).await.unwrap());
    let revoked = suite
        .http
        .get(format!("{}/v1/customers/kim/wallet", suite.base_url))
        .bearer_auth(acme)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 401);
    assert!(
        !keys.revoke("default", &acme_id).await.unwrap(),
        "revocation is tenant-scoped"
    );

    let unknown = suite.get("/v1/nothing-here").await;
    assert_eq!(unknown.status(), 404);
    suite.cleanup().await;
}
