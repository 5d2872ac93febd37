//! Campaign scheduler: campaigns as the source of truth, their state machine and history,
//! their snapshots reaching eligibility (a kill observed within a second), starts and ends
//! run by durable jobs, and bad campaigns refused with the field named and nothing saved.

// Amounts are written dollars_cents (`150_00` is $150.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::time::{Duration, Instant};

use chrono::Datelike;

use prost_types::Timestamp;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::scheduler::v1 as pb;
use tessera_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::eligibility::{self, amount_off, key, percent_off, qualified_ids, reasons, violations};
use crate::redemption::{checkout, redeem};

backend_tests!(
    a_campaign_lives_through_its_states_and_eligibility_follows,
    scheduled_campaigns_start_and_end_by_their_jobs,
    bad_campaigns_name_the_field_and_save_nothing,
    campaigns_are_managed_over_http,
    triggers_issue_once_and_reminders_stop_once_redeemed,
    snapshots_never_go_back_and_a_kill_is_never_refused,
    birthday_campaigns_issue_once_a_year_to_the_days_customers,
    wallet_sweeps_run_for_a_tenant_without_campaigns,
);

type Client = SchedulerServiceClient<Channel>;

fn at(offset: Duration, ahead: bool) -> Option<Timestamp> {
    let now = chrono::Utc::now();
    let t = if ahead { now + offset } else { now - offset };
    Some(Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

fn campaign(id: &str, definition: epb::Campaign) -> pb::Campaign {
    pb::Campaign {
        id: id.into(),
        name: format!("Campaign {id}"),
        r#type: pb::CampaignType::Promotion.into(),
        channels: vec!["web".into()],
        definition: Some(definition),
        ..Default::default()
    }
}

async fn create(
    s: &mut Client,
    suite: &TestSuite,
    c: pb::Campaign,
) -> Result<pb::Campaign, tonic::Status> {
    s.create_campaign(suite.ctx(TENANT).request(pb::CreateCampaignRequest {
        idempotency_key: key(),
        campaign: Some(c),
    }))
    .await
    .map(|r| r.into_inner().campaign.expect("campaign"))
}

async fn update(
    s: &mut Client,
    suite: &TestSuite,
    c: pb::Campaign,
    expected: i64,
) -> Result<pb::Campaign, tonic::Status> {
    s.update_campaign(suite.ctx(TENANT).request(pb::UpdateCampaignRequest {
        idempotency_key: key(),
        campaign: Some(c),
        expected_version: expected,
    }))
    .await
    .map(|r| r.into_inner().campaign.expect("campaign"))
}

/// Changes a campaign's state.
async fn change(
    s: &mut Client,
    suite: &TestSuite,
    id: &str,
    action: pb::CampaignAction,
    reason: &str,
) -> Result<pb::Campaign, tonic::Status> {
    s.change_campaign_state(suite.ctx(TENANT).request(pb::ChangeCampaignStateRequest {
        idempotency_key: key(),
        id: id.into(),
        action: action.into(),
        reason: reason.into(),
    }))
    .await
    .map(|r| r.into_inner().campaign.expect("campaign"))
}

async fn get(s: &mut Client, suite: &TestSuite, id: &str) -> Result<pb::Campaign, tonic::Status> {
    s.get_campaign(
        suite
            .ctx(TENANT)
            .request(pb::GetCampaignRequest { id: id.into() }),
    )
    .await
    .map(|r| r.into_inner().campaign.expect("campaign"))
}

async fn history(s: &mut Client, suite: &TestSuite, id: &str) -> Vec<pb::Transition> {
    s.list_campaign_history(suite.ctx(TENANT).request(pb::ListCampaignHistoryRequest {
        id: id.into(),
        page: None,
    }))
    .await
    .expect("history")
    .into_inner()
    .transitions
}

/// The jobs of a campaign.
async fn jobs_of(suite: &TestSuite, campaign: &str) -> Vec<pb::Job> {
    Client::new(suite.channel())
        .list_jobs(suite.ctx(TENANT).request(pb::ListJobsRequest {
            page: None,
            campaign_id: campaign.into(),
        }))
        .await
        .expect("jobs")
        .into_inner()
        .jobs
}

/// What eligibility says of `id` for a shoe cart now: Ok(value) or Err(reason).
async fn verdict(
    e: &mut eligibility::Client,
    suite: &TestSuite,
    id: &str,
) -> Result<i64, epb::Reason> {
    let r =
        eligibility::qualify(e, suite, "alice", crate::redemption::shoes_and_socks(), &[]).await;
    if let Some(q) = r.qualified.iter().find(|q| q.campaign_id == id) {
        return Ok(q.value);
    }
    Err(reasons(&r)
        .get(id)
        .copied()
        .unwrap_or(epb::Reason::Unspecified))
}

async fn a_campaign_lives_through_its_states_and_eligibility_follows(suite: TestSuite) {
    let (mut s, mut e) = (Client::new(suite.channel()), eligibility::client(&suite));
    let definition = epb::Campaign {
        effect: percent_off(10_00, &["shoes"]),
        ..Default::default()
    };
    let created = create(&mut s, &suite, campaign("spring", definition.clone()))
        .await
        .expect("created");
    assert_eq!(created.state(), pb::CampaignState::Draft);
    assert_eq!(created.version, 1);
    // A draft never reaches eligibility.
    assert_eq!(
        verdict(&mut e, &suite, "spring").await,
        Err(epb::Reason::Unspecified)
    );

    let started = change(
        &mut s,
        &suite,
        "spring",
        pb::CampaignAction::Start,
        "launch",
    )
    .await
    .expect("start");
    assert_eq!(started.state(), pb::CampaignState::Active);
    assert_eq!(
        started.synced_version, started.version,
        "pushed before the answer"
    );
    assert_eq!(verdict(&mut e, &suite, "spring").await, Ok(10_00));

    // Illegal transitions are refused, and change nothing.
    let err = change(&mut s, &suite, "spring", pb::CampaignAction::Resume, "")
        .await
        .expect_err("an active campaign cannot be resumed");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // Pause, resume: eligibility follows.
    change(
        &mut s,
        &suite,
        "spring",
        pb::CampaignAction::Pause,
        "stock check",
    )
    .await
    .expect("pause");
    assert_eq!(
        verdict(&mut e, &suite, "spring").await,
        Err(epb::Reason::Disabled)
    );
    change(&mut s, &suite, "spring", pb::CampaignAction::Resume, "")
        .await
        .expect("resume");
    assert_eq!(verdict(&mut e, &suite, "spring").await, Ok(10_00));

    // Editing a running campaign takes effect at once; a stale version is refused.
    let mut edited = get(&mut s, &suite, "spring").await.expect("get");
    let version = edited.version;
    edited.definition = Some(epb::Campaign {
        effect: percent_off(20_00, &["shoes"]),
        ..definition.clone()
    });
    let stale = update(&mut s, &suite, edited.clone(), version - 1)
        .await
        .expect_err("stale version");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    let updated = update(&mut s, &suite, edited, version)
        .await
        .expect("update");
    assert_eq!(updated.version, version + 1);
    assert_eq!(updated.state(), pb::CampaignState::Active);
    assert_eq!(verdict(&mut e, &suite, "spring").await, Ok(20_00));

    // The kill switch: a reason is required; eligibility refuses it within a second.
    let no_reason = change(&mut s, &suite, "spring", pb::CampaignAction::Kill, " ")
        .await
        .expect_err("kill needs a reason");
    assert_eq!(violations(&no_reason), ["reason"]);
    let killed_at = Instant::now();
    let killed = change(
        &mut s,
        &suite,
        "spring",
        pb::CampaignAction::Kill,
        "pricing error",
    )
    .await
    .expect("kill");
    assert_eq!(killed.state(), pb::CampaignState::Killed);
    eventually(
        Duration::from_secs(1),
        "eligibility refuses the killed campaign",
        || async {
            let mut e = eligibility::client(&suite);
            (verdict(&mut e, &suite, "spring").await == Err(epb::Reason::Disabled)).then_some(())
        },
    )
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(1));
    // Killed is for good: no resume, no edit.
    let err = change(&mut s, &suite, "spring", pb::CampaignAction::Resume, "")
        .await
        .expect_err("killed");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = update(&mut s, &suite, killed.clone(), 0)
        .await
        .expect_err("killed campaigns do not change");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // The history names every change, who made it and why.
    let h = history(&mut s, &suite, "spring").await;
    let steps: Vec<(&str, pb::CampaignState, &str)> = h
        .iter()
        .map(|t| (t.action.as_str(), t.to(), t.reason.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("create", pb::CampaignState::Draft, ""),
            ("start", pb::CampaignState::Active, "launch"),
            ("pause", pb::CampaignState::Paused, "stock check"),
            ("resume", pb::CampaignState::Active, ""),
            ("kill", pb::CampaignState::Killed, "pricing error"),
        ]
    );
    assert!(h.iter().all(|t| !t.principal.is_empty()));
    // Each change leaves through the outbox under the type of what happened.
    for (event, count) in [
        ("campaign.created", 1),
        ("campaign.started", 1),
        ("campaign.paused", 1),
        ("campaign.resumed", 1),
        ("campaign.killed", 1),
    ] {
        let events = crate::events(&suite, TENANT, event).await;
        assert!(events.len() >= count, "{event} leaves through the outbox");
    }

    // Stop: eligibility reports it ended.
    create(
        &mut s,
        &suite,
        campaign(
            "summer",
            epb::Campaign {
                effect: amount_off(5_00),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("summer");
    change(&mut s, &suite, "summer", pb::CampaignAction::Start, "")
        .await
        .expect("start summer");
    assert_eq!(verdict(&mut e, &suite, "summer").await, Ok(5_00));
    let stopped = change(
        &mut s,
        &suite,
        "summer",
        pb::CampaignAction::Stop,
        "season over",
    )
    .await
    .expect("stop");
    assert_eq!(stopped.state(), pb::CampaignState::Ended);
    assert_eq!(
        verdict(&mut e, &suite, "summer").await,
        Err(epb::Reason::Ended)
    );

    let listed = s
        .list_campaigns(suite.ctx(TENANT).request(pb::ListCampaignsRequest {
            page: None,
            state: pb::CampaignState::Ended.into(),
        }))
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = listed.campaigns.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["summer"]);
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn scheduled_campaigns_start_and_end_by_their_jobs(suite: TestSuite) {
    let (mut s, mut e) = (Client::new(suite.channel()), eligibility::client(&suite));
    let definition = epb::Campaign {
        effect: amount_off(3_00),
        starts_at: at(Duration::from_millis(1500), true),
        ends_at: at(Duration::from_millis(3500), true),
        ..Default::default()
    };
    create(&mut s, &suite, campaign("flash", definition))
        .await
        .expect("create");
    let scheduled = change(&mut s, &suite, "flash", pb::CampaignAction::Start, "")
        .await
        .expect("start");
    assert_eq!(scheduled.state(), pb::CampaignState::Scheduled);
    assert_eq!(
        verdict(&mut e, &suite, "flash").await,
        Err(epb::Reason::NotStarted)
    );

    eventually(
        Duration::from_secs(5),
        "the start job activates it",
        || async {
            let mut s = Client::new(suite.channel());
            (get(&mut s, &suite, "flash").await.expect("get").state() == pb::CampaignState::Active)
                .then_some(())
        },
    )
    .await;
    assert_eq!(verdict(&mut e, &suite, "flash").await, Ok(3_00));
    eventually(Duration::from_secs(6), "the end job ends it", || async {
        let mut s = Client::new(suite.channel());
        (get(&mut s, &suite, "flash").await.expect("get").state() == pb::CampaignState::Ended)
            .then_some(())
    })
    .await;
    assert_eq!(
        verdict(&mut e, &suite, "flash").await,
        Err(epb::Reason::Ended)
    );
    let h = history(&mut s, &suite, "flash").await;
    let steps: Vec<(&str, &str)> = h
        .iter()
        .map(|t| (t.action.as_str(), t.principal.as_str()))
        .filter(|(_, p)| *p == "scheduler")
        .collect();
    assert_eq!(
        steps,
        [("starts_at", "scheduler"), ("ends_at", "scheduler")]
    );
    let jobs = jobs_of(&suite, "flash").await;
    let ran: Vec<(&str, &str, i64)> = jobs
        .iter()
        .map(|j| (j.kind.as_str(), j.status.as_str(), j.runs))
        .collect();
    assert_eq!(
        ran,
        [("campaign.start", "done", 1), ("campaign.end", "done", 1)]
    );
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn bad_campaigns_name_the_field_and_save_nothing(suite: TestSuite) {
    let (mut s, mut e) = (Client::new(suite.channel()), eligibility::client(&suite));
    let cases: Vec<(pb::Campaign, &str)> = vec![
        (
            campaign(
                "bad-dates",
                epb::Campaign {
                    effect: amount_off(1_00),
                    starts_at: at(Duration::from_secs(3600), true),
                    ends_at: at(Duration::from_secs(60), true),
                    ..Default::default()
                },
            ),
            "campaign.definition.ends_at",
        ),
        (
            campaign(
                "bad-zone",
                epb::Campaign {
                    effect: amount_off(1_00),
                    time_zone: "Mars/Olympus".into(),
                    ..Default::default()
                },
            ),
            "campaign.definition.time_zone",
        ),
        (
            campaign(
                "bad-rule",
                epb::Campaign {
                    effect: amount_off(1_00),
                    rule: "order.total >".into(),
                    ..Default::default()
                },
            ),
            "campaign.definition.rule",
        ),
        (
            campaign(
                "never",
                epb::Campaign {
                    effect: amount_off(1_00),
                    windows: vec![epb::TimeWindow {
                        cron: "0 12 30 2 *".into(),
                        duration_minutes: 60,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ),
            "campaign.definition.windows.0.cron",
        ),
        (
            pb::Campaign {
                r#type: 0,
                ..campaign("no-type", epb::Campaign::default())
            },
            "campaign.type",
        ),
        (
            pb::Campaign {
                definition: None,
                ..campaign("no-definition", epb::Campaign::default())
            },
            "campaign.definition",
        ),
    ];
    for (c, field) in cases {
        let id = c.id.clone();
        let err = create(&mut s, &suite, c).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{id}: {err:?}");
        assert!(
            violations(&err).iter().any(|f| f == field),
            "{id}: {:?}",
            violations(&err)
        );
        let missing = get(&mut s, &suite, &id).await.expect_err("nothing saved");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }

    // A budget below what was already used: refused, the campaign unchanged.
    let limited = campaign(
        "limited",
        epb::Campaign {
            effect: amount_off(1_00),
            limits: Some(epb::Limits {
                max_redemptions: 5,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    create(&mut s, &suite, limited.clone())
        .await
        .expect("create");
    change(&mut s, &suite, "limited", pb::CampaignAction::Start, "")
        .await
        .expect("start");
    for order in ["o1", "o2", "o3"] {
        redeem(
            &mut e,
            &suite,
            &key(),
            checkout("bob", order, &[], &["limited"]),
        )
        .await
        .expect("redeem");
    }
    let before = get(&mut s, &suite, "limited").await.expect("get");
    let mut lower = limited.clone();
    lower.definition.as_mut().expect("definition").limits = Some(epb::Limits {
        max_redemptions: 2,
        ..Default::default()
    });
    let err = update(&mut s, &suite, lower.clone(), 0)
        .await
        .expect_err("below usage");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        violations(&err),
        ["campaign.definition.limits.max_redemptions"]
    );
    assert_eq!(
        get(&mut s, &suite, "limited").await.expect("get").version,
        before.version
    );
    // At what was used, it is accepted (and exhausted).
    lower.definition.as_mut().expect("definition").limits = Some(epb::Limits {
        max_redemptions: 3,
        ..Default::default()
    });
    update(&mut s, &suite, lower, 0).await.expect("at usage");
    assert_eq!(
        verdict(&mut e, &suite, "limited").await,
        Err(epb::Reason::BudgetExhausted)
    );
    assert!(
        qualified_ids(
            &eligibility::qualify(
                &mut e,
                &suite,
                "bob",
                crate::redemption::shoes_and_socks(),
                &[]
            )
            .await
        )
        .is_empty()
    );
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn campaigns_are_managed_over_http(suite: TestSuite) {
    let body = serde_json::json!({
        "id": "weekend",
        "name": "Weekend deal",
        "type": "CAMPAIGN_TYPE_PROMOTION",
        "channels": ["web", "pos"],
        "definition": {
            "effect": {"amountOff": {"amount": 4_00}},
            "limits": {"maxRedemptions": 100}
        }
    });
    let created = suite.post("/v1/campaigns", Some(&key()), &body).await;
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.expect("json");
    assert_eq!(created["state"], "CAMPAIGN_STATE_DRAFT");

    let bad = suite
        .post(
            "/v1/campaigns",
            Some(&key()),
            &serde_json::json!({
                "id": "broken", "name": "Broken", "type": "CAMPAIGN_TYPE_PROMOTION",
                "definition": {"effect": {"amountOff": {"amount": 1}}, "timeZone": "Nowhere/City"}
            }),
        )
        .await;
    assert_eq!(bad.status(), 400);
    let bad: serde_json::Value = bad.json().await.expect("json");
    assert_eq!(
        bad["error"]["field_violations"][0]["field"], "campaign.definition.time_zone",
        "{bad}"
    );

    let started = suite
        .post(
            "/v1/campaigns/weekend/start",
            Some(&key()),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(started.status(), 200);
    let started: serde_json::Value = started.json().await.expect("json");
    assert_eq!(started["state"], "CAMPAIGN_STATE_ACTIVE");
    let illegal = suite
        .post(
            "/v1/campaigns/weekend/resume",
            Some(&key()),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(illegal.status(), 422);
    let unknown = suite
        .post(
            "/v1/campaigns/weekend/explode",
            Some(&key()),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(unknown.status(), 404);
    let killed = suite
        .post(
            "/v1/campaigns/weekend/kill",
            Some(&key()),
            &serde_json::json!({"reason": "fraud wave"}),
        )
        .await;
    assert_eq!(killed.status(), 200);

    let listed: serde_json::Value = suite
        .get("/v1/campaigns?state=killed")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed["data"][0]["id"], "weekend");
    let history: serde_json::Value = suite
        .get("/v1/campaigns/weekend/history")
        .await
        .json()
        .await
        .expect("json");
    let actions: Vec<&str> = history["data"]
        .as_array()
        .expect("transitions")
        .iter()
        .map(|t| t["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["create", "start", "kill"]);
    assert_eq!(history["data"][2]["reason"], "fraud wave");
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

/// The customers of the events of `event_type` so far.
async fn customers_of(suite: &TestSuite, event_type: &str) -> Vec<String> {
    let mut out: Vec<String> = crate::events(suite, TENANT, event_type)
        .await
        .iter()
        .map(|e| {
            crate::data(e)["customer_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    out.sort();
    out
}

async fn triggers_issue_once_and_reminders_stop_once_redeemed(suite: TestSuite) {
    let (mut s, mut e) = (Client::new(suite.channel()), eligibility::client(&suite));
    let mut catalog = tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient::new(
        suite.channel(),
    );
    let reward = crate::catalog::create_reward(
        &mut catalog,
        &suite,
        &key(),
        crate::catalog::reward_input("Thank you: 5 off", amount_off(5_00)),
    )
    .await;
    // "If a customer spent more than $500 in 30 days, give them 5 off and nudge them."
    let thanks = pb::Campaign {
        incentive: Some(pb::Incentive {
            reward_id: reward.id.clone(),
            pool_id: String::new(),
            channel: "email".into(),
        }),
        reminders: vec![
            pb::ReminderStep {
                after_seconds: 2,
                before_end_seconds: 0,
                template: "nudge".into(),
            },
            pb::ReminderStep {
                after_seconds: 0,
                before_end_seconds: 3600 - 5,
                template: "last-call".into(),
            },
        ],
        ..campaign(
            "big-spender-thanks",
            epb::Campaign {
                effect: amount_off(5_00),
                ends_at: at(Duration::from_secs(3600), true),
                triggers: vec![epb::Trigger {
                    id: "spent-500".into(),
                    on: epb::EarningTrigger::OrderPaid.into(),
                    event_type: String::new(),
                    condition: "customer.spend_30d > 50000".into(),
                }],
                ..Default::default()
            },
        )
    };
    create(&mut s, &suite, thanks).await.expect("create");
    change(
        &mut s,
        &suite,
        "big-spender-thanks",
        pb::CampaignAction::Start,
        "",
    )
    .await
    .expect("start");

    // $300 fires nothing; the next $300 (with this order, $600 in 30 days) fires once.
    eligibility::order(
        &mut e,
        &suite,
        "a1",
        "alice",
        epb::OrderStatus::Paid,
        300_00,
        0,
    )
    .await;
    eligibility::order(
        &mut e,
        &suite,
        "a2",
        "alice",
        epb::OrderStatus::Paid,
        300_00,
        0,
    )
    .await;
    eligibility::order(
        &mut e,
        &suite,
        "b1",
        "bob",
        epb::OrderStatus::Paid,
        700_00,
        0,
    )
    .await;
    eligibility::order(
        &mut e,
        &suite,
        "a3",
        "alice",
        epb::OrderStatus::Paid,
        900_00,
        0,
    )
    .await;
    eventually(Duration::from_secs(5), "both incentives issued", || async {
        (customers_of(&suite, "campaign.incentive_issued").await == ["alice", "bob"]).then_some(())
    })
    .await;
    // Published in the catalog, once each.
    let rewards = catalog
        .list_customer_rewards(suite.ctx(TENANT).request(
            tessera_proto::catalog::v1::ListCustomerRewardsRequest {
                customer_id: "alice".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("alice's rewards")
        .into_inner()
        .rewards;
    assert_eq!(rewards.len(), 1);
    // Issuing again (an integration calling in) returns the first issue.
    let again = s
        .issue_incentive(suite.ctx(TENANT).request(pb::IssueIncentiveRequest {
            idempotency_key: key(),
            campaign_id: "big-spender-thanks".into(),
            customer_id: "alice".into(),
            cause: "manual".into(),
        }))
        .await
        .expect("issue")
        .into_inner();
    assert!(!again.issued);
    let issue = again.issue.expect("issue");
    assert_eq!(issue.cause, "trigger:spent-500");
    assert_eq!(
        issue.publication_id,
        rewards[0].publication.as_ref().expect("publication").id
    );
    assert_eq!(issue.reminders, 2);

    // Alice redeems before her nudge; Bob does not.
    redeem(
        &mut e,
        &suite,
        &key(),
        checkout("alice", "a4", &[], &["big-spender-thanks"]),
    )
    .await
    .expect("alice redeems");
    eventually(Duration::from_secs(10), "bob's two reminders", || async {
        (customers_of(&suite, "campaign.reminder").await == ["bob", "bob"]).then_some(())
    })
    .await;
    // Alice's reminders ran too (their jobs are done) and sent nothing.
    let jobs = jobs_of(&suite, "big-spender-thanks").await;
    let reminders: Vec<&pb::Job> = jobs
        .iter()
        .filter(|j| j.kind == "campaign.reminder")
        .collect();
    assert_eq!(reminders.len(), 4);
    eventually(
        Duration::from_secs(5),
        "every reminder job done",
        || async {
            let jobs = jobs_of(&suite, "big-spender-thanks").await;
            jobs.iter()
                .filter(|j| j.kind == "campaign.reminder")
                .all(|j| j.status == "done")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        customers_of(&suite, "campaign.reminder").await,
        ["bob", "bob"]
    );

    // Not an active campaign: nothing to issue.
    change(
        &mut s,
        &suite,
        "big-spender-thanks",
        pb::CampaignAction::Pause,
        "",
    )
    .await
    .expect("pause");
    let refused = s
        .issue_incentive(suite.ctx(TENANT).request(pb::IssueIncentiveRequest {
            idempotency_key: key(),
            campaign_id: "big-spender-thanks".into(),
            customer_id: "carol".into(),
            cause: String::new(),
        }))
        .await
        .expect_err("paused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

/// Eligibility's side of the sync: snapshots carry the source version, so one that arrives
/// late changes nothing; a snapshot that switches a campaign off is stored even when the
/// campaign no longer compiles there (a kill must land), one that keeps it on is not.
async fn snapshots_never_go_back_and_a_kill_is_never_refused(suite: TestSuite) {
    let mut e = eligibility::client(&suite);
    let suite_ref = &suite;
    let put = |campaign: epb::Campaign, version: i64| {
        let suite = suite_ref;
        let mut e = eligibility::client(suite);
        async move {
            e.put_campaign(suite.ctx(TENANT).request(epb::PutCampaignRequest {
                idempotency_key: key(),
                campaign: Some(campaign),
                source_version: version,
                validate_only: false,
            }))
            .await
            .map(|r| r.into_inner())
        }
    };
    let on = |amount: i64| epb::Campaign {
        effect: amount_off(amount),
        ..eligibility::campaign("synced", None)
    };
    assert!(put(on(3_00), 3).await.expect("v3").applied);
    assert!(!put(on(2_00), 2).await.expect("v2 arrives late").applied);
    assert_eq!(verdict(&mut e, &suite, "synced").await, Ok(3_00));

    let broken = |status: epb::CampaignStatus| epb::Campaign {
        rule: "customer.no_such_attribute > 1".into(),
        status: status.into(),
        ..on(3_00)
    };
    let refused = put(broken(epb::CampaignStatus::Active), 4)
        .await
        .expect_err("an active campaign must compile");
    assert_eq!(violations(&refused), ["campaign.rule"]);
    assert_eq!(verdict(&mut e, &suite, "synced").await, Ok(3_00));
    let killed = put(broken(epb::CampaignStatus::Disabled), 5)
        .await
        .expect("kill lands");
    assert!(killed.applied);
    assert!(
        verdict(&mut e, &suite, "synced").await.is_err(),
        "the killed campaign no longer applies"
    );
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn birthday_campaigns_issue_once_a_year_to_the_days_customers(suite: TestSuite) {
    let (mut s, mut e) = (Client::new(suite.channel()), eligibility::client(&suite));
    let mut catalog = tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient::new(
        suite.channel(),
    );
    let reward = crate::catalog::create_reward(
        &mut catalog,
        &suite,
        &key(),
        crate::catalog::reward_input("Happy birthday: 10 off", amount_off(10_00)),
    )
    .await;
    // Birthdays a week from today (UTC, the campaign's zone): dora and eli; fay's is today.
    let today = chrono::Utc::now().date_naive();
    let born = |date: chrono::NaiveDate| format!("1990-{}", date.format("%m-%d"));
    let in_a_week = today + chrono::Days::new(7);
    for (id, birthday) in [
        ("dora", born(in_a_week)),
        ("eli", born(in_a_week)),
        ("fay", born(today)),
        ("gus", String::new()),
    ] {
        eligibility::upsert(
            &mut e,
            &suite,
            epb::CustomerInput {
                id: id.into(),
                birthday,
                ..Default::default()
            },
        )
        .await;
    }
    let bad = s
        .create_campaign(suite.ctx(TENANT).request(pb::CreateCampaignRequest {
            idempotency_key: key(),
            campaign: Some(pb::Campaign {
                occasion: Some(pb::OccasionRule {
                    occasion: epb::Occasion::Birthday.into(),
                    days_before: 45,
                }),
                ..campaign(
                    "no-incentive",
                    epb::Campaign {
                        effect: amount_off(10_00),
                        ..Default::default()
                    },
                )
            }),
        }))
        .await
        .expect_err("no incentive, too many days");
    let fields = violations(&bad);
    assert!(
        fields.iter().any(|f| f == "campaign.occasion"),
        "{fields:?}"
    );
    assert!(
        fields.iter().any(|f| f == "campaign.occasion.days_before"),
        "{fields:?}"
    );

    let birthday = pb::Campaign {
        incentive: Some(pb::Incentive {
            reward_id: reward.id.clone(),
            pool_id: String::new(),
            channel: "email".into(),
        }),
        occasion: Some(pb::OccasionRule {
            occasion: epb::Occasion::Birthday.into(),
            days_before: 7,
        }),
        ..campaign(
            "birthday",
            epb::Campaign {
                effect: amount_off(10_00),
                ..Default::default()
            },
        )
    };
    create(&mut s, &suite, birthday).await.expect("create");
    change(&mut s, &suite, "birthday", pb::CampaignAction::Start, "")
        .await
        .expect("start");
    eventually(
        Duration::from_secs(5),
        "the week-ahead birthdays issued",
        || async {
            (customers_of(&suite, "campaign.incentive_issued").await == ["dora", "eli"])
                .then_some(())
        },
    )
    .await;
    let issued = crate::events(&suite, TENANT, "campaign.incentive_issued").await;
    let year = in_a_week.format("%Y").to_string();
    assert!(
        issued
            .iter()
            .all(|e| crate::data(e)["occasion"] == format!("birthday:{year}"))
    );
    // The daily job keeps its pace: next just after midnight, one run so far.
    let jobs = jobs_of(&suite, "birthday").await;
    let daily = jobs
        .iter()
        .find(|j| j.kind == "campaign.occasion")
        .expect("daily job");
    assert_eq!((daily.status.as_str(), daily.runs), ("pending", 1));
    let next = daily.due_at.as_ref().expect("due").seconds;
    let midnight = (today + chrono::Days::new(1))
        .and_hms_opt(0, 5, 0)
        .expect("time")
        .and_utc()
        .timestamp();
    assert_eq!(next, midnight);
    // This year's birthday is issued once, however it is asked for again.
    let again = s
        .issue_incentive(suite.ctx(TENANT).request(pb::IssueIncentiveRequest {
            idempotency_key: key(),
            campaign_id: "birthday".into(),
            customer_id: "dora".into(),
            cause: "manual".into(),
        }))
        .await
        .expect("a manual issue is another occasion")
        .into_inner();
    assert!(again.issued);
    let rewards = catalog
        .list_customer_rewards(suite.ctx(TENANT).request(
            tessera_proto::catalog::v1::ListCustomerRewardsRequest {
                customer_id: "dora".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("dora's rewards")
        .into_inner()
        .rewards;
    assert_eq!(rewards.len(), 2, "the birthday's and the manual one");

    // Joining anniversaries: hal joined a year ago today, ivy today (not an anniversary).
    let year_ago = today
        .with_year(today.year() - 1)
        .unwrap_or(today - chrono::Days::new(365));
    for (id, joined) in [("hal", year_ago), ("ivy", today)] {
        eligibility::upsert(
            &mut e,
            &suite,
            epb::CustomerInput {
                id: id.into(),
                created_at: Some(Timestamp {
                    seconds: joined
                        .and_hms_opt(12, 0, 0)
                        .expect("noon")
                        .and_utc()
                        .timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            },
        )
        .await;
    }
    let anniversaries = e
        .list_customers_by_occasion(suite.ctx(TENANT).request(
            epb::ListCustomersByOccasionRequest {
                occasion: epb::Occasion::JoiningAnniversary.into(),
                month: today.month(),
                day: today.day(),
                page: None,
            },
        ))
        .await
        .expect("anniversaries")
        .into_inner()
        .customer_ids;
    assert_eq!(anniversaries, ["hal"]);
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

/// A tenant that only credits points through the API (no campaign) still gets the wallet's
/// sweeps: the wallet tells the scheduler when it first credits a programme.
async fn wallet_sweeps_run_for_a_tenant_without_campaigns(suite: TestSuite) {
    let credited = suite
        .post(
            "/v1/customers/pat/points",
            Some(&key()),
            &serde_json::json!({"amount": 40, "reason": "welcome"}),
        )
        .await;
    assert_eq!(credited.status(), 201);
    let jobs = eventually(Duration::from_secs(5), "the sweeps ran", || async {
        let jobs = jobs_of(&suite, "").await;
        let ran = |kind: &str| jobs.iter().any(|j| j.kind == kind && j.runs >= 1);
        let all = [
            "wallet.expire_due",
            "wallet.activate_due",
            "wallet.evaluate_tiers",
        ];
        all.into_iter().all(ran).then_some(jobs)
    })
    .await;
    // Recurring: pending again, for the next run.
    assert!(
        jobs.iter()
            .filter(|j| j.kind.starts_with("wallet."))
            .all(|j| j.status == "pending" && j.last_error.is_empty())
    );
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}
