//! API keys: no key → 401, unknown or revoked key → 401, wrong role → 403, and a tenant
//! never sees another tenant's data.

use serde_json::{Value, json};
use tessera_gateway::{ApiKeys, Role};
use tessera_tests::{TestSuite, backend_tests};

use crate::points;

backend_tests!(
    keys_roles_and_tenants,
    console_mutations_are_audited,
    keys_are_managed_over_http
);

mod rate_limits {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::rate_limits_per_key_and_customer(tessera_tests::Backend::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::rate_limits_per_key_and_customer(tessera_tests::Backend::Production).await;
    }
}

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// A key may make so many requests a minute, and so many about one customer; the headers
/// say how many are left, a refusal is 429 with `Retry-After`.
async fn rate_limits_per_key_and_customer(backend: tessera_tests::Backend) {
    let Some(mut config) = tessera_tests::test_config(backend) else {
        return;
    };
    config.gateway.rate_limit_per_key_per_minute = 8;
    config.gateway.rate_limit_per_customer_per_minute = 3;
    let suite = TestSuite::start_with(backend, config, false).await;
    for remaining in [2, 1, 0] {
        let r = suite.get("/v1/customers/kim/wallet").await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            (
                header(&r, "ratelimit-limit"),
                header(&r, "ratelimit-remaining")
            ),
            (Some(3), Some(remaining))
        );
        assert!(header(&r, "ratelimit-reset").is_some_and(|s| s <= 60));
    }
    let refused = suite.get("/v1/customers/kim/wallet").await;
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "retry-after").is_some_and(|s| (1..=20).contains(&s)));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "resource_exhausted");
    assert_eq!(body["error"]["reason"], "RATE_LIMITED");
    // Another customer is not held up by kim's limit; the key's own limit (8) still counts.
    for remaining in [3, 2, 1, 0] {
        let r = suite.get("/v1/campaigns").await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-remaining"), Some(remaining));
    }
    let refused = suite.get("/v1/customers/lea/wallet").await;
    assert_eq!(refused.status(), 429, "the key is spent");
    // Health checks carry no key and no limit.
    let health = suite
        .http
        .get(format!("{}/healthz", suite.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().get("ratelimit-limit").is_none());
    suite.cleanup().await;
}

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

/// Mutations of console roles are in the audit log with who, what, the outcome and the
/// request id; touchpoints are not audited; the log only reads.
async fn console_mutations_are_audited(suite: TestSuite) {
    let keys = ApiKeys::new(suite.db("gateway").await);
    let (analyst, touchpoint) = (
        "tsk_analyst_of_the_default_tenant_000001",
        "tsk_touchpoint_of_the_default_tenant_001",
    );
    keys.insert("default", "reports", Role::Analyst, analyst)
        .await
        .unwrap();
    keys.insert("default", "web shop", Role::Touchpoint, touchpoint)
        .await
        .unwrap();
    let campaign = json!({"id": "audited", "name": "Audited", "type": "CAMPAIGN_TYPE_PROMOTION",
                          "definition": {"effect": {"amountOff": {"amount": 100}}}});
    let created = suite
        .http
        .post(format!("{}/v1/campaigns", suite.base_url))
        .bearer_auth(&suite.admin_key)
        .header("Idempotency-Key", "audit-1")
        .header("x-request-id", "req-audit-1")
        .json(&campaign)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let refused = suite
        .post("/v1/campaigns", Some("audit-2"), &json!({"id": "broken"}))
        .await;
    assert_eq!(refused.status(), 400);
    let by_touchpoint = suite
        .http
        .post(format!("{}/v1/customers/kim/points", suite.base_url))
        .bearer_auth(touchpoint)
        .header("Idempotency-Key", "audit-3")
        .json(&json!({"amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_touchpoint.status(), 403);

    let read = |key: &str, query: &str| {
        let request = suite
            .http
            .get(format!("{}/v1/audit-log{query}", suite.base_url))
            .bearer_auth(key);
        async move { request.send().await.unwrap() }
    };
    let admin = suite.admin_key.as_str();
    let log: serde_json::Value = read(admin, "").await.json().await.unwrap();
    let entries = log["data"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "touchpoint traffic is not audited: {log}");
    let (newest, first) = (&entries[0], &entries[1]);
    assert_eq!(
        (&newest["status"], &newest["route"]),
        (&json!(400), &json!("/v1/campaigns"))
    );
    assert_eq!(first["status"], 201);
    assert_eq!(first["method"], "POST");
    assert_eq!(first["role"], "admin");
    assert_eq!(first["request_id"], "req-audit-1");
    assert_eq!(first["request"]["id"], "audited");
    assert_eq!(first["after"]["state"], "CAMPAIGN_STATE_DRAFT");
    assert!(first["at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(!first["principal"].as_str().unwrap_or_default().is_empty());

    // Filters; analysts read it, touchpoints may not; nothing changes it.
    let posts: serde_json::Value = read(analyst, "?route=/v1/campaigns&method=post&limit=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (posts["data"].as_array().unwrap().len(), &posts["has_more"]),
        (1, &json!(true))
    );
    let none: serde_json::Value = read(admin, "?since=2999-01-01T00:00:00Z")
        .await
        .json()
        .await
        .unwrap();
    assert!(none["data"].as_array().unwrap().is_empty());
    assert_eq!(read(admin, "?since=yesterday").await.status(), 400);
    assert_eq!(read(touchpoint, "").await.status(), 403);
    let delete = suite
        .http
        .delete(format!("{}/v1/audit-log", suite.base_url))
        .bearer_auth(&suite.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 405);
    let again: serde_json::Value = read(admin, "").await.json().await.unwrap();
    assert_eq!(again["data"].as_array().unwrap().len(), 2);
    // A creation has nothing before it.
    assert!(again["data"][1]["before"].is_null(), "{again}");

    // A change records the object before it beside the object after it.
    let mut renamed = campaign.clone();
    renamed["name"] = json!("Renamed");
    let (status, answer) = suite
        .call("PUT", "/v1/campaigns/audited", &renamed, Some(admin))
        .await;
    assert_eq!(status, 200, "{answer}");
    let log: serde_json::Value = read(admin, "?method=put").await.json().await.unwrap();
    let change = &log["data"][0];
    assert_eq!(change["route"], "/v1/campaigns/{id}");
    assert_eq!(change["before"]["name"], "Audited", "{change}");
    assert_eq!(change["before"]["version"], 1);
    assert_eq!(change["after"]["name"], "Renamed");
    assert_eq!(change["after"]["version"], 2);
}

async fn keys_are_managed_over_http(suite: TestSuite) {
    let admin = suite.admin_key.clone();
    let admin = Some(admin.as_str());
    let new = json!({"name": "web shop", "role": "touchpoint"});
    let create = |key: &'static str, body: Value| {
        let request = suite
            .http
            .post(format!("{}/v1/api-keys", suite.base_url))
            .bearer_auth(&suite.admin_key)
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let response = request.send().await.expect("sent");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (status, created) = create("key-1", new.clone()).await;
    assert_eq!(status, 201, "{created}");
    let secret = created["secret"]
        .as_str()
        .expect("the key, once")
        .to_string();
    assert!(secret.starts_with("tsk_"));
    let id = created["info"]["id"].as_str().expect("id").to_string();
    assert_eq!(created["info"]["role"], "touchpoint");
    // The key works, with its role.
    let (status, _) = suite
        .call(
            "GET",
            "/v1/customers/bob/wallet",
            &Value::Null,
            Some(&secret),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = suite
        .call("GET", "/v1/api-keys", &Value::Null, Some(&secret))
        .await;
    assert_eq!(status, 403, "a touchpoint does not manage keys");
    // A retry finds the same key without showing it again; another body is refused.
    let (status, again) = create("key-1", new.clone()).await;
    assert_eq!((status, &again["secret"]), (200, &Value::Null), "{again}");
    assert_eq!(again["info"]["id"], id.as_str());
    let (status, reused) = create("key-1", json!({"name": "other", "role": "analyst"})).await;
    assert_eq!(status, 422, "{reused}");
    let (status, bad) = create("key-2", json!({"name": "x", "role": "root"})).await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["field_violations"][0]["field"], "role");

    // Listed without secrets; the audit log keeps none either.
    let (status, list) = suite.call("GET", "/v1/api-keys", &Value::Null, admin).await;
    assert_eq!(status, 200);
    let listed = list["data"].as_array().expect("data");
    assert!(listed.iter().any(|k| k["id"] == id.as_str()), "{list}");
    assert!(!list.to_string().contains(&secret));
    let (_, log) = suite
        .call(
            "GET",
            "/v1/audit-log?route=/v1/api-keys",
            &Value::Null,
            admin,
        )
        .await;
    assert!(!log.to_string().contains(&secret), "{log}");
    assert_eq!(
        log["data"][log["data"].as_array().unwrap().len() - 1]["after"]["secret"],
        "[redacted]"
    );

    // Revoked: the key stops working; revoking again changes nothing.
    let (status, revoked) = suite
        .call("DELETE", &format!("/v1/api-keys/{id}"), &Value::Null, admin)
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    let (status, _) = suite
        .call(
            "GET",
            "/v1/customers/bob/wallet",
            &Value::Null,
            Some(&secret),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = suite
        .call("DELETE", &format!("/v1/api-keys/{id}"), &Value::Null, admin)
        .await;
    assert_eq!(status, 200);

    // The tenant's last admin key stays.
    let own = listed
        .iter()
        .find(|k| k["role"] == "admin")
        .and_then(|k| k["id"].as_str())
        .expect("the admin key");
    let (status, answer) = suite
        .call(
            "DELETE",
            &format!("/v1/api-keys/{own}"),
            &Value::Null,
            admin,
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["reason"], "LAST_ADMIN_KEY");

    // An operator gives a new tenant its first admin key; it sees only its own tenant.
    let acme = tessera_gateway::create_key(&suite.config, "acme", "admin", "acme admin")
        .await
        .expect("key");
    let (status, acme_keys) = suite
        .call("GET", "/v1/api-keys", &Value::Null, Some(&acme))
        .await;
    assert_eq!(status, 200);
    assert_eq!(acme_keys["data"].as_array().map(Vec::len), Some(1));
    let (status, _) = suite
        .call(
            "GET",
            &format!("/v1/api-keys/{id}"),
            &Value::Null,
            Some(&acme),
        )
        .await;
    assert_eq!(status, 404, "another tenant's key");
    assert!(
        tessera_gateway::create_key(&suite.config, "Bad Tenant", "admin", "x")
            .await
            .is_err()
    );

    // Two admins revoking each other's keys at once leave the tenant one admin key.
    let (mut admin_key, mut admin_id) = (
        acme.clone(),
        acme_keys["data"][0]["id"].as_str().expect("id").to_string(),
    );
    let secret = |v: &Value| v["secret"].as_str().expect("secret").to_string();
    let id_of = |v: &Value| v["info"]["id"].as_str().expect("id").to_string();
    for round in 0..5 {
        let mut made = Vec::new();
        for name in ["a", "b"] {
            let body = json!({"name": format!("admin {name}{round}"), "role": "admin"});
            let (status, key) = suite
                .call("POST", "/v1/api-keys", &body, Some(&admin_key))
                .await;
            assert_eq!(status, 201, "{key}");
            made.push(key);
        }
        let (a, b) = (secret(&made[0]), secret(&made[1]));
        // The previous admin key goes, so the two new ones are the tenant's only admins.
        let path = format!("/v1/api-keys/{admin_id}");
        let (status, _) = suite.call("DELETE", &path, &Value::Null, Some(&a)).await;
        assert_eq!(status, 200);
        let (revoke_b, revoke_a) = (
            format!("/v1/api-keys/{}", id_of(&made[1])),
            format!("/v1/api-keys/{}", id_of(&made[0])),
        );
        let ((s1, _), (s2, _)) = tokio::join!(
            suite.call("DELETE", &revoke_b, &Value::Null, Some(&a)),
            suite.call("DELETE", &revoke_a, &Value::Null, Some(&b)),
        );
        assert!(
            matches!((s1, s2), (200, 422 | 401) | (422 | 401, 200)),
            "round {round}: {s1} {s2}"
        );
        let survivor = if s1 == 200 { 0 } else { 1 };
        admin_key = secret(&made[survivor]);
        admin_id = id_of(&made[survivor]);
        let (status, keys) = suite
            .call(
                "GET",
                "/v1/api-keys?limit=100",
                &Value::Null,
                Some(&admin_key),
            )
            .await;
        assert_eq!(status, 200, "the surviving admin key works");
        let active_admins = keys["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter(|k| k["role"] == "admin" && k["revoked_at"].is_null())
            .count();
        assert_eq!(active_admins, 1, "round {round}: {keys}");
    }
    suite.cleanup().await;
}
