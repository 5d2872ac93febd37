//! Catalog codes at checkout, as a marketer and a shop would use them: a pool generated in
//! the catalog, a campaign that issues it, a code published to a customer and typed at
//! checkout through the gateway; the catalog shows who redeemed it; rollbacks give it back;
//! the kill switches of a code and a pool refuse the next checkout on every replica within a
//! second; concurrent redemptions of a single-use (and an N-use) code; other tenants; and
//! a cashback incentive's redemption becoming a pending wallet credit, cancelled by a
//! rollback.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

backend_tests!(
    pool_codes_work_end_to_end,
    a_single_use_code_is_redeemed_once_under_a_race,
    a_kill_switch_reaches_every_replica_within_a_second,
    redemption_cashback_is_a_pending_wallet_credit,
    a_multi_use_gift_card_code_is_spent_until_its_value_is_gone,
);

async fn json_of(r: reqwest::Response, status: u16) -> Value {
    let got = r.status();
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(got, status, "{body}");
    body
}

fn idem() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// $5 off the order.
fn five_off() -> Value {
    json!({"amount_off": {"amount": 500}})
}

/// A reward with `effect`, a pool of `count` generated codes (plus `imported` CSV rows), and
/// an active campaign `id` with that effect whose incentive is the pool. Returns the pool's
/// id.
async fn pool_campaign(
    suite: &TestSuite,
    id: &str,
    effect: Value,
    count: u32,
    imported: &str,
) -> String {
    let reward = json_of(
        suite
            .post(
                "/v1/rewards",
                Some(&idem()),
                &json!({"name": id, "currency": "USD", "effect": effect}),
            )
            .await,
        201,
    )
    .await;
    let reward_id = reward["id"].as_str().unwrap().to_string();
    let pool = json_of(
        suite
            .post(
                "/v1/code-pools",
                Some(&idem()),
                &json!({"reward_id": reward_id, "name": id, "pattern": {"pattern": "P-#####-??"}}),
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
                Some(&idem()),
                &json!({"count": count}),
            )
            .await,
        202,
    )
    .await;
    let job_id = job["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(30), "generation done", || async {
        let job = json_of(
            suite.get(&format!("/v1/code-pools/jobs/{job_id}")).await,
            200,
        )
        .await;
        (job["status"] == "JOB_STATUS_SUCCEEDED").then_some(())
    })
    .await;
    if !imported.is_empty() {
        let response = suite
            .http
            .post(format!(
                "{}/v1/code-pools/{pool_id}/codes.csv",
                suite.base_url
            ))
            .bearer_auth(&suite.admin_key)
            .header("Idempotency-Key", idem())
            .header("Content-Type", "text/csv")
            .body(format!("code,max_uses\n{imported}"))
            .send()
            .await
            .unwrap();
        json_of(response, 200).await;
    }
    start_campaign(
        suite,
        json!({
            "id": id, "name": id, "type": "CAMPAIGN_TYPE_DISCOUNT",
            "definition": {"reward_id": reward_id, "effect": effect},
            "incentive": {"pool_id": pool_id, "channel": "email"},
        }),
    )
    .await;
    pool_id
}

/// Publishes the pool's next free code to `customer`; returns it.
async fn give(suite: &TestSuite, customer: &str, pool: &str) -> String {
    let given = json_of(
        suite
            .post(
                &format!("/v1/customers/{customer}/rewards"),
                Some(&idem()),
                &json!({"pool_id": pool, "channel": "email"}),
            )
            .await,
        201,
    )
    .await;
    given["code"].as_str().expect("a code").to_string()
}

/// Creates a campaign and starts it.
async fn start_campaign(suite: &TestSuite, campaign: Value) {
    let id = campaign["id"].as_str().expect("an id").to_string();
    json_of(
        suite.post("/v1/campaigns", Some(&idem()), &campaign).await,
        201,
    )
    .await;
    json_of(
        suite
            .post(
                &format!("/v1/campaigns/{id}/start"),
                Some(&idem()),
                &json!({}),
            )
            .await,
        200,
    )
    .await;
}

fn checkout(customer: &str, order: &str, codes: &[&str]) -> Value {
    json!({"checkout": {"customer_id": customer, "order_id": order, "codes": codes,
        "cart": {"currency": "USD", "lines": [
            {"id": "l1", "sku": "TEE", "quantity": 2, "unit_price": 2000}]}}})
}

/// `POST path` with the checkout; status and body.
async fn send(suite: &TestSuite, path: &str, body: &Value) -> (u16, Value) {
    let r = suite.post(path, Some(&idem()), body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until a dry run of `code` for `customer` answers `status` (the catalog's change
/// reaches eligibility through the command outbox); returns the answer.
async fn validate_until(
    suite: &TestSuite,
    customer: &str,
    code: &str,
    status: u16,
    within: Duration,
) -> Value {
    eventually(within, &format!("validate {code} → {status}"), || async {
        let (got, body) = send(suite, "/v1/validate", &checkout(customer, "", &[code])).await;
        (got == status).then_some(body)
    })
    .await
}

async fn code_of(suite: &TestSuite, code: &str) -> Value {
    json_of(suite.get(&format!("/v1/codes/{code}")).await, 200).await
}

async fn pool_codes_work_end_to_end(suite: TestSuite) {
    let pool = pool_campaign(&suite, "welcome", five_off(), 20, "").await;
    // A customer gets the next free code of the pool.
    let code = give(&suite, "alice", &pool).await;

    let dry = validate_until(&suite, "alice", &code, 200, Duration::from_secs(5)).await;
    assert_eq!(dry["applied"][0]["campaign_id"], "welcome", "{dry}");
    // Typed in lower case, it is the same code.
    let (status, _) = send(
        &suite,
        "/v1/validate",
        &checkout("alice", "", &[&code.to_lowercase()]),
    )
    .await;
    assert_eq!(status, 200);
    // A pool campaign is not an automatic discount: without a code nothing applies.
    let (status, body) = send(&suite, "/v1/validate", &checkout("carol", "", &[])).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["reason"], "NOTHING_APPLIES");
    // Published to alice: nobody else may use it.
    let (status, body) = send(&suite, "/v1/redemptions", &checkout("bob", "b-1", &[&code])).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["reason"], "CODE_OF_ANOTHER_CUSTOMER");
    // Unknown codes are 404, whoever has them.
    let (status, body) = send(
        &suite,
        "/v1/validate",
        &checkout("alice", "", &["P-00000-ZZ"]),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let mut other = EligibilityServiceClient::new(suite.channel());
    let err = other
        .validate(suite.ctx("other").request(pb::ValidateRequest {
            checkout: Some(grpc_checkout("alice", String::new(), code.clone())),
        }))
        .await
        .expect_err("another tenant's code");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Redeemed: the catalog shows by whom, for which order.
    let (status, redeemed) = send(
        &suite,
        "/v1/redemptions",
        &checkout("alice", "a-1", &[&code]),
    )
    .await;
    assert_eq!(status, 201, "{redeemed}");
    assert_eq!(redeemed["applied"][0]["code"], code.as_str());
    assert_eq!(redeemed["outcome"]["discount"], 500);
    let shown = eventually(
        Duration::from_secs(5),
        "code redeemed in the catalog",
        || async {
            let c = code_of(&suite, &code).await;
            (c["status"] == "CODE_STATUS_REDEEMED").then_some(c)
        },
    )
    .await;
    assert_eq!(shown["redeemed_by"], "alice");
    assert_eq!(shown["order_id"], "a-1");
    assert_eq!(shown["redemption_id"], redeemed["id"]);
    assert_eq!(shown["redemptions"], 1);
    let csv = suite
        .get(&format!("/v1/code-pools/{pool}/codes.csv"))
        .await
        .text()
        .await
        .unwrap();
    let row = csv
        .lines()
        .find(|l| l.starts_with(&code))
        .expect("code row");
    assert!(
        row.contains(",redeemed,1,1,alice,") && row.contains(",alice,a-1,"),
        "{row}"
    );
    let rewards = json_of(
        suite
            .get("/v1/customers/alice/rewards?status=redeemed")
            .await,
        200,
    )
    .await;
    assert_eq!(
        rewards["data"].as_array().map(Vec::len),
        Some(1),
        "{rewards}"
    );

    // Used up: its own reason; nothing was written for the refused order.
    let (status, body) = send(
        &suite,
        "/v1/redemptions",
        &checkout("alice", "a-2", &[&code]),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["reason"], "CODE_USED");
    let db = suite.db("eligibility").await;
    let refused = tessera_tests::scalar(
        &db,
        "SELECT COUNT(*) FROM redemptions WHERE tenant_id = $1 AND order_id = $2",
        vec![TENANT.into(), "a-2".into()],
    )
    .await;
    assert_eq!(refused, 0);

    // A rollback gives the use back: usable again, shown as published again.
    let id = redeemed["id"].as_str().unwrap();
    let (status, body) = send(
        &suite,
        &format!("/v1/redemptions/{id}/rollback"),
        &json!({"reason": "returned"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(5), "code published again", || async {
        let c = code_of(&suite, &code).await;
        // Zero is left out of the JSON answer.
        let none = c["redemptions"].as_i64().unwrap_or(0) == 0;
        (c["status"] == "CODE_STATUS_PUBLISHED" && none).then_some(())
    })
    .await;
    let (status, body) = send(
        &suite,
        "/v1/redemptions",
        &checkout("alice", "a-3", &[&code]),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // The kill switch of the pool, then of the campaign.
    let other_code = give(&suite, "dan", &pool).await;
    validate_until(&suite, "dan", &other_code, 200, Duration::from_secs(5)).await;
    json_of(
        suite
            .post(
                &format!("/v1/code-pools/{pool}/status"),
                Some(&idem()),
                &json!({"status": "POOL_STATUS_DISABLED"}),
            )
            .await,
        200,
    )
    .await;
    let body = validate_until(&suite, "dan", &other_code, 422, Duration::from_secs(1)).await;
    assert_eq!(body["error"]["reason"], "DISABLED", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("pool"),
        "{body}"
    );
    json_of(
        suite
            .post(
                &format!("/v1/code-pools/{pool}/status"),
                Some(&idem()),
                &json!({"status": "POOL_STATUS_ACTIVE"}),
            )
            .await,
        200,
    )
    .await;
    validate_until(&suite, "dan", &other_code, 200, Duration::from_secs(1)).await;
    json_of(
        suite
            .post(
                "/v1/campaigns/welcome/kill",
                Some(&idem()),
                &json!({"reason": "pricing error"}),
            )
            .await,
        200,
    )
    .await;
    let body = validate_until(&suite, "dan", &other_code, 422, Duration::from_secs(1)).await;
    assert_eq!(body["error"]["reason"], "DISABLED", "{body}");
    suite.cleanup().await;
}

async fn a_single_use_code_is_redeemed_once_under_a_race(suite: TestSuite) {
    pool_campaign(&suite, "race", five_off(), 1, "MULTI-3,3\n").await;
    let single = {
        use sea_orm::ConnectionTrait;
        let db = suite.db("catalog").await;
        let conn = db.conn();
        conn.query_one_raw(tessera_store::stmt(
            conn,
            "SELECT code FROM codes WHERE tenant_id = $1 AND code <> 'MULTI-3'",
            [TENANT.into()],
        ))
        .await
        .unwrap()
        .expect("the generated code")
        .try_get_by_index::<String>(0)
        .unwrap()
    };
    validate_until(&suite, "x", &single, 200, Duration::from_secs(5)).await;
    validate_until(&suite, "x", "MULTI-3", 200, Duration::from_secs(5)).await;

    for (code, n, allowed) in [(single.as_str(), 200, 1), ("MULTI-3", 60, 3)] {
        let client =
            EligibilityServiceClient::new(suite.channel_with_deadline(Duration::from_secs(300)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut c = client.clone();
            let request = suite.ctx(TENANT).request(pb::RedeemRequest {
                idempotency_key: idem(),
                checkout: Some(grpc_checkout(
                    format!("c{i}"),
                    format!("{code}-{i}"),
                    code.to_string(),
                )),
            });
            tasks.spawn(async move { c.redeem(request).await });
        }
        let mut won = 0;
        while let Some(answer) = tasks.join_next().await {
            match answer.expect("task") {
                Ok(_) => won += 1,
                // Losers are told the code is used (or, once a caller has had too many
                // refusals, that it is guessing).
                Err(s) => assert!(
                    matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted
                    ),
                    "{s:?}"
                ),
            }
        }
        assert_eq!(won, allowed, "winners of {code}");
        let db = suite.db("eligibility").await;
        let counted = tessera_tests::scalar(
            &db,
            "SELECT COUNT(*) FROM redemptions WHERE tenant_id = $1 AND status = 'redeemed' \
             AND order_id LIKE $2",
            vec![TENANT.into(), format!("{code}-%").into()],
        )
        .await;
        assert_eq!(counted, allowed as i64);
        // The catalog counts exactly the winners, once each.
        eventually(
            Duration::from_secs(10),
            "catalog counts the uses",
            || async {
                let c = code_of(&suite, code).await;
                (c["redemptions"] == allowed).then_some(())
            },
        )
        .await;
        assert_eq!(
            code_of(&suite, code).await["status"],
            "CODE_STATUS_REDEEMED"
        );
    }
    suite.cleanup().await;
}

async fn a_kill_switch_reaches_every_replica_within_a_second(suite: TestSuite) {
    let pool = pool_campaign(&suite, "replicas", five_off(), 3, "").await;
    let code = give(&suite, "erin", &pool).await;
    validate_until(&suite, "erin", &code, 200, Duration::from_secs(5)).await;
    // A second eligibility replica on the same database.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let replica = tokio::spawn(tessera_eligibility::run(
        suite.config.clone(),
        listener,
        stop.clone(),
    ));
    let replicas = [
        suite.channel(),
        tessera_runtime::grpc::channel(&second_url, Duration::from_secs(10)).unwrap(),
    ];
    let validate = |channel: tessera_runtime::grpc::Channel| {
        let request = suite.ctx(TENANT).request(pb::ValidateRequest {
            checkout: Some(grpc_checkout("erin", String::new(), code.clone())),
        });
        async move {
            EligibilityServiceClient::new(channel)
                .validate(request)
                .await
        }
    };
    for channel in &replicas {
        eventually(Duration::from_secs(10), "replica serves", || async {
            validate(channel.clone()).await.ok()
        })
        .await;
    }
    let off = Instant::now();
    json_of(
        suite
            .post(
                &format!("/v1/codes/{code}/status"),
                Some(&idem()),
                &json!({"status": "CODE_STATUS_DISABLED"}),
            )
            .await,
        200,
    )
    .await;
    for channel in &replicas {
        let err = eventually(Duration::from_secs(1), "replica refuses", || async {
            validate(channel.clone()).await.err()
        })
        .await;
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("disabled"), "{err:?}");
    }
    assert!(
        off.elapsed() < Duration::from_secs(1),
        "{:?}",
        off.elapsed()
    );
    stop.cancel();
    replica.await.unwrap().unwrap();
    suite.cleanup().await;
}

/// A gRPC checkout of one $20 line with `code`.
fn grpc_checkout(
    customer: impl Into<String>,
    order: impl Into<String>,
    code: impl Into<String>,
) -> pb::Checkout {
    pb::Checkout {
        customer_id: customer.into(),
        order_id: order.into(),
        codes: vec![code.into()],
        cart: Some(crate::eligibility::cart(&[("l1", "tees", 1, 2000)])),
        ..Default::default()
    }
}

async fn redemption_cashback_is_a_pending_wallet_credit(suite: TestSuite) {
    let campaign = json!({
        "id": "back5", "name": "5% back", "type": "CAMPAIGN_TYPE_DISCOUNT",
        "definition": {"codes": ["BACK5"],
                       "effect": {"cashback": {"percent_bp": 500, "pending_days": 14}}},
    });
    start_campaign(&suite, campaign).await;
    let cashback = |customer: &'static str| {
        let suite = &suite;
        async move {
            json_of(
                suite
                    .get(&format!("/v1/customers/{customer}/wallet/cashback"))
                    .await,
                200,
            )
            .await
        }
    };
    let (status, redeemed) = eventually(Duration::from_secs(5), "campaign live", || async {
        let answer = send(
            &suite,
            "/v1/redemptions",
            &checkout("uma", "u-1", &["BACK5"]),
        )
        .await;
        (answer.0 == 201).then_some(answer)
    })
    .await;
    assert_eq!(status, 201);
    // 5 % of $40.
    assert_eq!(redeemed["outcome"]["cashback"], 200, "{redeemed}");
    let page = eventually(Duration::from_secs(5), "cashback credited", || async {
        let page = cashback("uma").await;
        (page["data"].as_array().map(Vec::len) == Some(1)).then_some(page)
    })
    .await;
    let credit = &page["data"][0];
    assert_eq!(
        (credit["status"].as_str(), credit["amount"].as_i64()),
        (Some("pending"), Some(200))
    );
    let activates = credit["activate_at"].as_str().expect("an activation date");
    let at = chrono::DateTime::parse_from_rfc3339(activates).unwrap();
    let days = (at.timestamp() - chrono::Utc::now().timestamp()) as f64 / 86_400.0;
    assert!((13.9..=14.0).contains(&days), "{activates}");

    // Returned: the pending cashback is cancelled, once.
    let id = redeemed["id"].as_str().unwrap();
    let (status, body) = send(
        &suite,
        &format!("/v1/redemptions/{id}/rollback"),
        &json!({"reason": "returned"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let page = eventually(Duration::from_secs(5), "cashback cancelled", || async {
        let page = cashback("uma").await;
        (page["data"][0]["status"] == "cancelled").then_some(page)
    })
    .await;
    assert_eq!(page["data"].as_array().map(Vec::len), Some(1));
    suite.cleanup().await;
}

async fn a_multi_use_gift_card_code_is_spent_until_its_value_is_gone(suite: TestSuite) {
    // One definition: the catalog's reward, which the campaign issues through its pool.
    let card = json!({"gift_card": {"value": 5000, "multi_use": true}});
    let pool = pool_campaign(&suite, "cards", card, 2, "").await;
    // Published: the card's value is loaded into the wallet.
    let code = give(&suite, "gina", &pool).await;
    validate_until(&suite, "gina", &code, 200, Duration::from_secs(5)).await;
    let mut spent = Vec::new();
    for order in ["g-1", "g-2"] {
        let (status, body) = send(
            &suite,
            "/v1/redemptions",
            &checkout("gina", order, &[&code]),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        spent.push(body["spends"][0]["amount"].as_i64().unwrap_or_default());
    }
    // $40 then the $10 left: spent twice, though the pool allows one use per code.
    assert_eq!(spent, [4000, 1000]);
    let (status, body) = send(
        &suite,
        "/v1/redemptions",
        &checkout("gina", "g-3", &[&code]),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["reason"], "INSUFFICIENT_BALANCE", "{body}");
    // The catalog counts the spends and still shows the card in use, not redeemed.
    let shown = eventually(Duration::from_secs(5), "spends counted", || async {
        let c = code_of(&suite, &code).await;
        (c["redemptions"] == 2).then_some(c)
    })
    .await;
    assert_eq!(shown["status"], "CODE_STATUS_PUBLISHED", "{shown}");
    suite.cleanup().await;
}
