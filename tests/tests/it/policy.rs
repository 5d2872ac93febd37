//! The tenant's access policy, enforced by the services themselves: a junior marketer's
//! rewards and campaigns give at most the tenant's ceiling (403 with the field named, nothing
//! written); a support agent publishes only the listed "sorry" rewards; a service refuses a
//! role the gateway would have refused even when called directly over gRPC.

use serde_json::{Value, json};
use tessera_gateway::{ApiKeys, Role};
use tessera_proto::catalog::v1 as pb;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_tests::{TestSuite, backend_tests};

backend_tests!(roles_below_marketer_act_within_the_tenant_policy);

fn percent_off(bp: u32) -> Value {
    json!({"name": format!("{bp} bp off"), "currency": "EUR",
           "effect": {"percent_off": {"percent_bp": bp}}})
}

fn amount_off(amount: i64) -> Value {
    json!({"name": format!("{amount} off"), "currency": "EUR",
           "effect": {"amount_off": {"amount": amount}}})
}

fn campaign(id: &str, bp: u32) -> Value {
    json!({"id": id, "name": id, "type": "CAMPAIGN_TYPE_PROMOTION",
           "definition": {"effect": {"percent_off": {"percent_bp": bp}}}})
}

/// The one field a refusal names, and its reason.
fn refusal(answer: &Value) -> (String, String) {
    let violations = answer["error"]["field_violations"]
        .as_array()
        .expect("field violations");
    assert_eq!(violations.len(), 1, "{answer}");
    (
        violations[0]["field"].as_str().expect("field").to_string(),
        answer["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

async fn roles_below_marketer_act_within_the_tenant_policy(suite: TestSuite) {
    let keys = ApiKeys::new(suite.db("gateway").await);
    let junior = "tsk_policy_test_junior_marketer_key_0001";
    let agent = "tsk_policy_test_support_agent_key_000001";
    keys.insert("default", "junior", Role::JuniorMarketer, junior)
        .await
        .expect("junior key");
    keys.insert("default", "agent", Role::SupportAgent, agent)
        .await
        .expect("agent key");
    let admin = suite.admin_key.clone();
    let admin = Some(admin.as_str());

    // Without a policy: up to 50 %, nothing amount-based.
    let (status, policy) = suite
        .call("GET", "/v1/access-policy", &Value::Null, Some(junior))
        .await;
    assert_eq!(status, 200, "{policy}");
    assert_eq!(policy["junior_max_percent_bp"], 5000);
    assert!(policy.get("updated_at").is_none(), "{policy}");
    let (status, forty) = suite
        .call("POST", "/v1/rewards", &percent_off(4000), Some(junior))
        .await;
    assert_eq!(status, 201, "{forty}");
    let (status, answer) = suite
        .call("POST", "/v1/rewards", &percent_off(6000), Some(junior))
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        refusal(&answer),
        (
            "reward.effect.percent_off.percent_bp".to_string(),
            "ROLE_LIMIT_EXCEEDED".to_string()
        )
    );
    let (status, answer) = suite
        .call("POST", "/v1/rewards", &amount_off(500), Some(junior))
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(refusal(&answer).0, "reward.effect.amount_off.amount");
    // Marketers and admins are not capped.
    let (status, _) = suite
        .call("POST", "/v1/rewards", &percent_off(9000), admin)
        .await;
    assert_eq!(status, 201);

    // The admin sets the policy; nobody else may.
    let (status, sorry) = suite
        .call("POST", "/v1/rewards", &amount_off(500), admin)
        .await;
    assert_eq!(status, 201, "{sorry}");
    let sorry_id = sorry["id"].as_str().expect("id");
    let policy = json!({"junior_max_percent_bp": 2000, "junior_max_amount": 1000,
                        "support_reward_ids": [sorry_id]});
    let (status, answer) = suite
        .call("PUT", "/v1/access-policy", &policy, Some(junior))
        .await;
    assert_eq!(status, 403, "{answer}");
    let (status, stored) = suite.call("PUT", "/v1/access-policy", &policy, admin).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["support_reward_ids"], json!([sorry_id]));
    assert!(stored["updated_at"].is_string(), "{stored}");
    let (status, answer) = suite
        .call(
            "PUT",
            "/v1/access-policy",
            &json!({"junior_max_percent_bp": 20000}),
            admin,
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["error"]["field_violations"][0]["field"],
        "policy.junior_max_percent_bp"
    );

    // Under the new policy: 40 % is now too much, 500 off is within it.
    let (status, _) = suite
        .call("POST", "/v1/rewards", &percent_off(4000), Some(junior))
        .await;
    assert_eq!(status, 403);
    let (status, answer) = suite
        .call("POST", "/v1/rewards", &amount_off(500), Some(junior))
        .await;
    assert_eq!(status, 201, "{answer}");
    // Raising an existing reward is refused too, and leaves it as it was.
    let forty_id = forty["id"].as_str().expect("id");
    let (status, _) = suite
        .call(
            "PUT",
            &format!("/v1/rewards/{forty_id}"),
            &json!({"reward": percent_off(9000)}),
            Some(junior),
        )
        .await;
    assert_eq!(status, 403);
    let (_, kept) = suite
        .call(
            "GET",
            &format!("/v1/rewards/{forty_id}"),
            &Value::Null,
            admin,
        )
        .await;
    assert_eq!(
        kept["definition"]["effect"]["percent_off"]["percent_bp"], 4000,
        "{kept}"
    );

    // A junior marketer's campaign: the scheduler applies the same ceiling.
    let (status, answer) = suite
        .call(
            "POST",
            "/v1/campaigns",
            &campaign("too-much", 9000),
            Some(junior),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        refusal(&answer),
        (
            "campaign.definition.effect.percent_off.percent_bp".to_string(),
            "ROLE_LIMIT_EXCEEDED".to_string()
        )
    );
    let (status, _) = suite
        .call("GET", "/v1/campaigns/too-much", &Value::Null, admin)
        .await;
    assert_eq!(status, 404, "nothing was written");
    let (status, answer) = suite
        .call(
            "POST",
            "/v1/campaigns",
            &campaign("modest", 1500),
            Some(junior),
        )
        .await;
    assert_eq!(status, 201, "{answer}");

    // A support agent hands out the listed reward, and no other.
    let (status, answer) = suite
        .call(
            "POST",
            "/v1/customers/alice/rewards",
            &json!({"reward_id": sorry_id}),
            Some(agent),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = suite
        .call(
            "POST",
            "/v1/customers/alice/rewards",
            &json!({"reward_id": forty_id}),
            Some(agent),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        refusal(&answer),
        ("reward_id".to_string(), "NOT_A_SUPPORT_REWARD".to_string())
    );

    // Defence in depth: the catalog refuses an analyst's write even without the gateway.
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let mut ctx = suite.ctx("default");
    ctx.role = "analyst".into();
    let refused = catalog
        .create_reward(ctx.request(pb::CreateRewardRequest {
            idempotency_key: "analyst-1".into(),
            reward: Some(pb::RewardInput {
                name: "nope".into(),
                currency: "EUR".into(),
                ..Default::default()
            }),
        }))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // `access_policy.updated` and every other event of these flows match the catalogue.
    crate::check_catalogue(&suite, "default").await;
    suite.cleanup().await;
}
