//! The catalog through the gateway: canonical protobuf JSON in and out (unknown fields and
//! bad values refused with their path), a generation job polled to completion, CSV import
//! and export as `text/csv`, publication and the customer's rewards, roles.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_gateway::{ApiKeys, Role};
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

backend_tests!(rewards_codes_and_publication_over_http);

async fn json_of(r: reqwest::Response, status: u16) -> Value {
    let got = r.status();
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(got, status, "{body}");
    body
}

fn first_violation(body: &Value) -> &str {
    body["error"]["field_violations"][0]["field"]
        .as_str()
        .unwrap_or_default()
}

async fn rewards_codes_and_publication_over_http(suite: TestSuite) {
    let reward = json!({
        "name": "Ten percent off shoes",
        "currency": "EUR",
        "priority": 3,
        "effect": {"percent_off": {"percent_bp": 1000, "cap": 2000,
                                   "selector": {"categories": ["shoes"]}}},
        "metadata": {"campaign": "spring"},
    });
    let created = json_of(suite.post("/v1/rewards", Some("r1"), &reward).await, 201).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "REWARD_STATUS_ACTIVE");
    assert_eq!(created["definition"]["effect"]["percent_off"]["cap"], 2000);

    let mut unknown = reward.clone();
    unknown["effect"]["percent_off"]["colour"] = json!("red");
    let refused = json_of(suite.post("/v1/rewards", Some("r2"), &unknown).await, 400).await;
    assert_eq!(first_violation(&refused), "effect.percent_off");
    let mut too_much = reward.clone();
    too_much["effect"]["percent_off"]["percent_bp"] = json!(12_000);
    let refused = json_of(suite.post("/v1/rewards", Some("r3"), &too_much).await, 400).await;
    assert_eq!(
        first_violation(&refused),
        "reward.effect.percent_off.percent_bp"
    );

    let listed = json_of(
        suite
            .get("/v1/rewards?status=active&effect_kind=percent_off")
            .await,
        200,
    )
    .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let bad_status = json_of(suite.get("/v1/rewards?status=sleeping").await, 400).await;
    assert_eq!(first_violation(&bad_status), "status");

    let preview = json!({
        "reward_ids": [id],
        "cart": {"currency": "EUR", "lines": [
            {"id": "1", "sku": "RUN-42", "categories": ["shoes"], "quantity": 1, "unit_price": 8999},
            {"id": "2", "sku": "SOCK", "categories": ["socks"], "quantity": 2, "unit_price": 500}
        ]}
    });
    let outcome = json_of(suite.post("/v1/rewards/preview", None, &preview).await, 200).await;
    assert_eq!(outcome["discount"], 900); // 899.9 → 900
    assert_eq!(outcome["adjustments"][0]["line_id"], "1");

    let pool = json_of(
        suite
            .post(
                "/v1/code-pools",
                Some("p1"),
                &json!({"reward_id": id, "name": "spring", "pattern": {"pattern": "SPR-####-??"}}),
            )
            .await,
        201,
    )
    .await;
    let pool_id = pool["id"].as_str().unwrap().to_string();
    let job = json_of(
        suite
            .post(
                &format!("/v1/code-pools/{pool_id}/generate"),
                Some("g1"),
                &json!({"count": 500}),
            )
            .await,
        202,
    )
    .await;
    let job_id = job["id"].as_str().unwrap().to_string();
    let done = eventually(Duration::from_secs(30), "job done", || async {
        let job = json_of(
            suite.get(&format!("/v1/code-pools/jobs/{job_id}")).await,
            200,
        )
        .await;
        (job["status"] != "JOB_STATUS_RUNNING").then_some(job)
    })
    .await;
    assert_eq!(
        (done["status"].as_str(), done["generated"].as_i64()),
        (Some("JOB_STATUS_SUCCEEDED"), Some(500))
    );

    let imported = suite
        .http
        .post(format!(
            "{}/v1/code-pools/{pool_id}/codes.csv",
            suite.base_url
        ))
        .bearer_auth(&suite.admin_key)
        .header("Idempotency-Key", "imp-1")
        .header("Content-Type", "text/csv")
        .body("code,max_uses\nVIP-ANNA,5\nVIP-BEN,\n")
        .send()
        .await
        .unwrap();
    let imported = json_of(imported, 200).await;
    assert_eq!(imported["imported"], 2);

    let csv = suite
        .get(&format!("/v1/code-pools/{pool_id}/codes.csv"))
        .await;
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = csv.text().await.unwrap();
    assert_eq!(csv.lines().count(), 1 + 502);
    assert!(
        csv.contains("\nVIP-ANNA,active,0,5,,,,,,\n"),
        "{}",
        &csv[..200]
    );

    let published = json_of(
        suite
            .post(
                "/v1/customers/anna/rewards",
                Some("pub-1"),
                &json!({"code": "vip-anna", "channel": "email"}),
            )
            .await,
        201,
    )
    .await;
    assert_eq!(published["code"], "VIP-ANNA");
    // The customer's cockpit lists it; parts that do not exist yet are null or empty.
    let cockpit = json_of(suite.get("/v1/customers/anna/cockpit").await, 200).await;
    assert_eq!(
        cockpit["rewards"].as_array().map(Vec::len),
        Some(1),
        "{cockpit}"
    );
    assert!(
        cockpit["rewards"].to_string().contains("VIP-ANNA"),
        "{cockpit}"
    );
    assert_eq!(
        (
            &cockpit["referral"],
            cockpit["balances"].as_array().map(Vec::len)
        ),
        (&Value::Null, Some(0)),
        "{cockpit}"
    );
    let publication = published["id"].as_str().unwrap();
    let shown = json_of(
        suite
            .post(
                &format!("/v1/customers/anna/rewards/{publication}/shown"),
                Some("seen-1"),
                &json!({"channel": "app"}),
            )
            .await,
        200,
    )
    .await;
    assert_eq!(shown["shown"][0]["channel"], "app");
    // Another customer's path does not reach Anna's publication.
    let elsewhere = suite
        .post(
            &format!("/v1/customers/ben/rewards/{publication}/shown"),
            Some("seen-2"),
            &json!({"channel": "app"}),
        )
        .await;
    assert_eq!(elsewhere.status(), 404);

    let mine = json_of(
        suite
            .get("/v1/customers/anna/rewards?status=available")
            .await,
        200,
    )
    .await;
    let entry = &mine["data"][0];
    assert_eq!(entry["status"], "CUSTOMER_REWARD_STATUS_AVAILABLE");
    assert_eq!(entry["code"]["max_uses"], 5);
    assert_eq!(entry["reward"]["id"], id.as_str());

    let off = json_of(
        suite
            .post(
                "/v1/codes/VIP-ANNA/status",
                Some("off-1"),
                &json!({"status": "CODE_STATUS_DISABLED"}),
            )
            .await,
        200,
    )
    .await;
    assert_eq!(off["status"], "CODE_STATUS_DISABLED");
    let mine = json_of(
        suite
            .get("/v1/customers/anna/rewards?status=available")
            .await,
        200,
    )
    .await;
    assert!(mine["data"].as_array().unwrap().is_empty());

    // An analyst reads the catalog but may not change it.
    let keys = ApiKeys::new(suite.db("gateway").await);
    let analyst = "tsk_analyst_catalog_http_test_key_0001";
    keys.insert(TENANT, "reports", Role::Analyst, analyst)
        .await
        .unwrap();
    let denied = suite
        .http
        .post(format!("{}/v1/rewards", suite.base_url))
        .bearer_auth(analyst)
        .header("Idempotency-Key", "r9")
        .json(&reward)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    let read = suite
        .http
        .get(format!("{}/v1/rewards/{id}", suite.base_url))
        .bearer_auth(analyst)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    crate::check_catalogue(&suite, TENANT).await;
}
