//! GDPR across the suite, through the REST gateway: a customer's data from every service in
//! one export; an erasure that every service carries out through the gateway's command
//! outbox (profile, facts, messages and audit bodies gone; the ledger kept under a
//! pseudonym with its sums whole); and a service that is down during the erasure catching
//! up once it is back.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_proto::ops::v1 as opb;
use tessera_proto::ops::v1::erasure_service_client::ErasureServiceClient;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually, scalar};

backend_tests!(
    a_customer_is_exported_and_erased_everywhere,
    an_erasure_waits_for_a_service_that_is_down,
    an_erasure_is_started_and_followed_over_grpc,
);

async fn json_of(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// The tenant's liability report (gRPC).
async fn liability(suite: &TestSuite) -> Vec<wpb::Liability> {
    WalletServiceClient::new(suite.channel())
        .get_liability(
            suite
                .ctx(TENANT)
                .request(wpb::GetLiabilityRequest::default()),
        )
        .await
        .expect("liability")
        .into_inner()
        .assets
}

async fn a_customer_is_exported_and_erased_everywhere(suite: TestSuite) {
    // A customer known to eligibility (profile, an order), the wallet (points) and
    // notification (a message).
    let (status, _) = suite
        .call(
            "PUT",
            "/v1/customers/gus/profile",
            &json!({"email": "gus@example.com", "country": "NL", "consents": {"marketing_email": true}}),
            Some(&suite.admin_key),
        )
        .await;
    assert_eq!(status, 200);
    let order = json!({
        "id": "g1", "customer_id": "gus", "status": "ORDER_STATUS_PAID", "currency": "USD",
        "lines": [{"sku": "TV", "quantity": 1, "unit_amount": 60000}]
    });
    json_of(suite.post("/v1/orders", Some("g1"), &order).await, 200).await;
    for (key, customer, amount) in [("p1", "gus", 120), ("p2", "ida", 80)] {
        json_of(
            suite
                .post(
                    &format!("/v1/customers/{customer}/points"),
                    Some(key),
                    &json!({"amount": amount, "reason": "welcome"}),
                )
                .await,
            201,
        )
        .await;
    }
    let liability_before = liability(&suite).await;
    json_of(
        suite
            .post(
                "/v1/customers/gus/messages",
                Some("m1"),
                &json!({"channel": "email", "template": "welcome", "variables": {}}),
            )
            .await,
        202,
    )
    .await;

    // The export gathers every service's part.
    let export = json_of(suite.get("/v1/customers/gus/export").await, 200).await;
    let services = &export["services"];
    assert_eq!(
        services["eligibility"]["profile"]["email"],
        "gus@example.com"
    );
    assert_eq!(services["eligibility"]["orders"][0]["id"], "g1");
    assert_eq!(services["wallet"]["transactions"][0]["amount"], 120);
    assert_eq!(
        services["notification"]["messages"][0]["template"],
        "welcome"
    );
    assert!(
        !services["gateway"]["audit_log"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the requests about the customer are in the audit log"
    );

    // The erasure answers a job at once; every part gets done.
    let job = json_of(
        suite
            .post("/v1/customers/gus/erasure", Some("erase-gus"), &Value::Null)
            .await,
        202,
    )
    .await;
    let id = job["id"].as_str().expect("job id").to_string();
    assert_eq!(job["parts"].as_array().unwrap().len(), 6);
    let again = json_of(
        suite
            .post("/v1/customers/gus/erasure", Some("erase-gus"), &Value::Null)
            .await,
        202,
    )
    .await;
    assert_eq!(again["id"], id.as_str(), "a retry answers the same job");
    let reused = suite
        .post("/v1/customers/ida/erasure", Some("erase-gus"), &Value::Null)
        .await;
    assert_eq!(reused.status().as_u16(), 422);
    let done = eventually(Duration::from_secs(20), "every part done", || async {
        let job = json_of(suite.get(&format!("/v1/erasures/{id}")).await, 200).await;
        (job["status"] == "done").then_some(job)
    })
    .await;
    assert!(
        done["parts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "done")
    );

    // Nothing about the customer is left under their id.
    let export = json_of(suite.get("/v1/customers/gus/export").await, 200).await;
    for service in [
        "catalog",
        "eligibility",
        "wallet",
        "campaign-scheduler",
        "notification",
    ] {
        assert_eq!(
            export["services"][service],
            json!({}),
            "{service} still holds data about the customer"
        );
    }
    let profile = suite.get("/v1/customers/gus/profile").await;
    assert_eq!(profile.status().as_u16(), 404);
    let audit = suite.db("gateway").await;
    let named = scalar(
        &audit,
        "SELECT COUNT(*) FROM audit_log WHERE path LIKE '%/customers/gus%' \
         AND path NOT LIKE '%/erasure'",
        vec![],
    )
    .await;
    assert_eq!(named, 0, "the audit log no longer names the customer");
    // The events notification received about the customer keep their facts, not the id.
    let notification = suite.db("notification").await;
    let events: Vec<String> = {
        use sea_orm::ConnectionTrait;
        let conn = notification.conn();
        let rows = conn
            .query_all_raw(tessera_store::stmt(conn, "SELECT data FROM events", []))
            .await
            .expect("events");
        rows.iter()
            .map(|r| String::from_utf8(r.try_get_by_index(0).expect("data")).expect("JSON"))
            .collect()
    };
    assert!(
        !events.iter().any(|e| e.contains("\"gus\"")),
        "an event still names the customer"
    );
    assert!(
        events.iter().any(|e| e.contains("\"erased-")),
        "the customer's events were kept"
    );
    // The ledger's sums are whole: the points stay, under the pseudonym.
    assert_eq!(liability_before, liability(&suite).await);
    let wallet = suite.db("wallet").await;
    let kept = scalar(
        &wallet,
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM transactions \
         WHERE customer_id LIKE 'erased-%'",
        vec![],
    )
    .await;
    assert_eq!(kept, 120);
    // Another customer is untouched.
    let ida = json_of(suite.get("/v1/customers/ida/export").await, 200).await;
    assert_eq!(ida["services"]["wallet"]["transactions"][0]["amount"], 80);
    suite.cleanup().await;
}

async fn an_erasure_waits_for_a_service_that_is_down(suite: TestSuite) {
    let (backend, config) = (suite.backend, suite.config.clone());
    json_of(
        suite
            .post(
                "/v1/customers/hue/messages",
                Some("m1"),
                &json!({"channel": "email", "template": "welcome", "variables": {}}),
            )
            .await,
        202,
    )
    .await;
    let mut first = suite;
    first.stop().await;

    // Notification is unreachable while the erasure is asked for: its part waits.
    let mut down = TestSuite::start_with(backend, config.clone(), true).await;
    let job = json_of(
        down.post("/v1/customers/hue/erasure", Some("erase-hue"), &Value::Null)
            .await,
        202,
    )
    .await;
    let id = job["id"].as_str().expect("job id").to_string();
    let waiting = eventually(Duration::from_secs(15), "the others done", || async {
        let job = json_of(down.get(&format!("/v1/erasures/{id}")).await, 200).await;
        let parts = job["parts"].as_array().cloned().unwrap_or_default();
        let others_done = parts
            .iter()
            .filter(|p| p["service"] != "notification")
            .all(|p| p["status"] == "done");
        let notification = parts
            .iter()
            .find(|p| p["service"] == "notification")
            .cloned();
        (others_done
            && notification
                .as_ref()
                .is_some_and(|n| n["error"].is_string()))
        .then_some(job)
    })
    .await;
    assert_eq!(waiting["status"], "pending");
    down.stop().await;

    // Back up: the part is delivered and the message log is gone.
    let up = TestSuite::start_with(backend, config, false).await;
    eventually(Duration::from_secs(30), "the erasure caught up", || async {
        let job = json_of(up.get(&format!("/v1/erasures/{id}")).await, 200).await;
        (job["status"] == "done").then_some(())
    })
    .await;
    let export = json_of(up.get("/v1/customers/hue/export").await, 200).await;
    assert_eq!(export["services"]["notification"], json!({}));
    up.cleanup().await;
}

/// `message` sent with API key `key` (as a brand's own service calls the suite).
fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("metadata"),
    );
    request
}

async fn an_erasure_is_started_and_followed_over_grpc(suite: TestSuite) {
    let (status, _) = suite
        .call(
            "PUT",
            "/v1/customers/rex/profile",
            &json!({"email": "rex@example.com"}),
            Some(&suite.admin_key),
        )
        .await;
    assert_eq!(status, 200);
    let mut erasures = ErasureServiceClient::new(suite.channel());
    let start = |key: &str, customer: &str| {
        with_key(
            &suite.admin_key,
            opb::StartErasureRequest {
                idempotency_key: key.into(),
                customer_id: customer.into(),
            },
        )
    };

    // Bad input names its field; nothing is started.
    let refused = erasures
        .start_erasure(start("", "not a customer id!"))
        .await
        .expect_err("invalid");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("customer_id"), "{refused:?}");

    let job = erasures
        .start_erasure(start("erase-rex", "rex"))
        .await
        .expect("started")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.parts.len(), 6, "{job:?}");
    // A retry answers the same job; the same key for someone else is refused.
    let again = erasures
        .start_erasure(start("erase-rex", "rex"))
        .await
        .expect("retried")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(again.id, job.id);
    let reused = erasures
        .start_erasure(start("erase-rex", "ann"))
        .await
        .expect_err("key reused");
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition);

    let done = eventually(Duration::from_secs(15), "every part done", || async {
        let job = ErasureServiceClient::new(suite.channel())
            .get_erasure(with_key(
                &suite.admin_key,
                opb::GetErasureRequest { id: job.id.clone() },
            ))
            .await
            .expect("get")
            .into_inner()
            .job
            .expect("job");
        (job.status == "done").then_some(job)
    })
    .await;
    assert!(
        done.parts
            .iter()
            .all(|p| p.status == "done" && p.error.is_empty())
    );
    // The same job over REST; the profile is gone.
    let rest = json_of(suite.get(&format!("/v1/erasures/{}", job.id)).await, 200).await;
    assert_eq!(rest["status"], "done");
    let export = json_of(suite.get("/v1/customers/rex/export").await, 200).await;
    assert_eq!(export["services"]["eligibility"], json!({}), "{export}");
    let profile = suite.get("/v1/customers/rex/profile").await;
    assert_eq!(profile.status().as_u16(), 404);

    // Erasing is for admins: a touchpoint key is refused, whatever it claims.
    let touchpoint = "tsk_privacy_grpc_touchpoint_00000000001";
    tessera_gateway::ApiKeys::new(suite.db("gateway").await)
        .insert(
            TENANT,
            "shop",
            tessera_gateway::Role::Touchpoint,
            touchpoint,
        )
        .await
        .expect("key");
    let mut forged = with_key(
        touchpoint,
        opb::StartErasureRequest {
            idempotency_key: "erase-ann".into(),
            customer_id: "ann".into(),
        },
    );
    forged
        .metadata_mut()
        .insert("x-tessera-role", "admin".parse().expect("metadata"));
    let denied = erasures.start_erasure(forged).await.expect_err("denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // The gateway's own queue (erasure commands) is listed like the services'.
    let dead = json_of(suite.get("/v1/queues/gateway/dead").await, 200).await;
    assert!(dead.get("items").is_none_or(|i| i == &json!([])), "{dead}");
    suite.cleanup().await;
}
