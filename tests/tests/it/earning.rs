//! Earning rules: orders and custom events earn points through the wallet, once per order or
//! event, with tier rates, conditions on the order, happy-hour windows, referrals that count
//! on the friend's first order only, per-period caps, and returned orders taken back. The
//! issue's examples, verbatim.

// Amounts are written dollars_cents (`150_00` is $150.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::time::Duration;

use chrono::Datelike;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::eligibility::{Client, client, key, put_campaign, upsert};
use crate::events;

backend_tests!(
    orders_earn_by_tier_condition_and_hour_and_returns_take_back,
    referrals_count_on_the_first_order_and_caps_hold,
);

type Wallet = WalletServiceClient<Channel>;

async fn programme(wallet: &mut Wallet, suite: &TestSuite, id: &str) {
    let level = |id: &str, threshold: i64| wpb::Tier {
        id: id.into(),
        name: id.to_uppercase(),
        threshold,
        earn_multiplier_permille: 1000,
        expiry_extension_days: 0,
    };
    wallet
        .upsert_program(suite.ctx(TENANT).request(wpb::UpsertProgramRequest {
            idempotency_key: key(),
            program: Some(wpb::Program {
                id: id.into(),
                time_zone: "UTC".into(),
                expiry: Some(wpb::ExpiryPolicy {
                    policy: Some(wpb::expiry_policy::Policy::Never(wpb::NeverExpires {})),
                }),
                tiers: Some(wpb::TierPolicy {
                    basis: wpb::TierBasis::PointsEarned as i32,
                    window_days: 365,
                    grace_days: 30,
                    levels: vec![level("base", 0), level("silver", 100), level("vip", 1000)],
                }),
            }),
        }))
        .await
        .expect("programme");
}

fn asset(program: &str) -> Option<wpb::Asset> {
    Some(wpb::Asset {
        kind: wpb::AssetKind::Points as i32,
        code: program.into(),
    })
}

async fn balance(wallet: &mut Wallet, suite: &TestSuite, customer: &str, program: &str) -> i64 {
    let asset = asset(program).unwrap_or_default();
    crate::tender::balance(wallet, suite, customer, &asset)
        .await
        .0
}

/// Waits until the wallet shows `expected` (earnings are credited right after the fact is
/// recorded, or by the sweep).
async fn expect_balance(suite: &TestSuite, customer: &str, program: &str, expected: i64) {
    let wallet = WalletServiceClient::new(suite.channel());
    eventually(
        Duration::from_secs(10),
        &format!("{customer} to hold {expected} {program} points"),
        || {
            let mut wallet = wallet.clone();
            async move {
                (balance(&mut wallet, suite, customer, program).await == expected).then_some(())
            }
        },
    )
    .await;
}

fn rule(id: &str, trigger: pb::EarningTrigger, program: &str) -> pb::EarningRule {
    pb::EarningRule {
        id: id.into(),
        trigger: trigger.into(),
        program_id: program.into(),
        ..Default::default()
    }
}

fn loyalty(id: &str, rules: Vec<pb::EarningRule>) -> pb::Campaign {
    pb::Campaign {
        id: id.into(),
        name: id.into(),
        status: pb::CampaignStatus::Active.into(),
        earning_rules: rules,
        ..Default::default()
    }
}

async fn order(c: &mut Client, suite: &TestSuite, id: &str, customer: &str, total: i64) {
    record(c, suite, id, customer, total, pb::OrderStatus::Paid).await;
}

async fn record(
    c: &mut Client,
    suite: &TestSuite,
    id: &str,
    customer: &str,
    total: i64,
    status: pb::OrderStatus,
) {
    c.record_order(suite.ctx(TENANT).request(pb::RecordOrderRequest {
        idempotency_key: key(),
        order: Some(pb::Order {
            id: id.into(),
            customer_id: customer.into(),
            status: status.into(),
            currency: "USD".into(),
            lines: vec![pb::OrderLine {
                sku: "SKU-1".into(),
                quantity: 1,
                unit_amount: total,
                ..Default::default()
            }],
            ..Default::default()
        }),
    }))
    .await
    .expect("record order");
}

fn weekday(offset: u32) -> i32 {
    // Weekday enum: Monday = 1 … Sunday = 7.
    let today = chrono::Utc::now().weekday().num_days_from_monday();
    ((today + offset) % 7 + 1) as i32
}

async fn orders_earn_by_tier_condition_and_hour_and_returns_take_back(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    programme(&mut wallet, &suite, "club").await;
    // tom is silver (150 points earned), vic is VIP (1,500); bea has none (base).
    for (customer, points) in [("tom", 150), ("vic", 1500)] {
        wallet
            .credit(suite.ctx(TENANT).request(wpb::CreditRequest {
                idempotency_key: key(),
                customer_id: customer.into(),
                asset: asset("club"),
                amount: points,
                reason: "history".into(),
                ..Default::default()
            }))
            .await
            .expect("credit");
    }
    let mut c = client(&suite);
    // "1 point per $1 for the base tier, 1.5 for silver, 2 for VIP."
    let per_dollar = pb::EarningRule {
        points_per_unit_milli: 1000,
        tier_points_per_unit_milli: [("silver".to_string(), 1500), ("vip".to_string(), 2000)]
            .into(),
        ..rule("per-dollar", pb::EarningTrigger::OrderPaid, "club")
    };
    // "20 points for an order over $100."
    let big_order = pb::EarningRule {
        condition: "order.total > 10000".into(),
        points: 20,
        ..rule("big-order", pb::EarningTrigger::OrderPaid, "club")
    };
    put_campaign(
        &mut c,
        &suite,
        loyalty("points", vec![per_dollar, big_order]),
    )
    .await;
    // "Double points during a happy-hour window": half a point per $1, doubled while the
    // happy hour lasts (today and tomorrow, so the test never straddles its edge); a
    // campaign whose window is far away gives nothing.
    let extra = |id: &str, milli: i64| pb::EarningRule {
        points_per_unit_milli: milli,
        ..rule(id, pb::EarningTrigger::OrderPaid, "club")
    };
    let window = |days: Vec<i32>| pb::TimeWindow {
        days,
        start_minute: 0,
        end_minute: 1440,
        ..Default::default()
    };
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            happy_hours: vec![window(vec![weekday(0), weekday(1)])],
            happy_hour_multiplier_milli: 2000,
            ..loyalty("happy-hour", vec![extra("double", 500)])
        },
    )
    .await;
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            windows: vec![window(vec![weekday(3)])],
            ..loyalty("later", vec![extra("later", 1000)])
        },
    )
    .await;

    order(&mut c, &suite, "b1", "bea", 150_00).await;
    order(&mut c, &suite, "t1", "tom", 80_00).await;
    order(&mut c, &suite, "v1", "vic", 50_00).await;
    // bea: 150 (base rate) + 20 (over $100) + 150 (happy hour).
    expect_balance(&suite, "bea", "club", 150 + 20 + 150).await;
    // tom: 1.5 × 80 + 80; vic: 2 × 50 + 50.
    expect_balance(&suite, "tom", "club", 150 + 120 + 80).await;
    expect_balance(&suite, "vic", "club", 1500 + 100 + 50).await;

    // The same order again earns nothing more.
    order(&mut c, &suite, "b1", "bea", 150_00).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(balance(&mut wallet, &suite, "bea", "club").await, 320);

    // Returned in part: the returned share of each earning comes back; then in full.
    c.record_order(suite.ctx(TENANT).request(pb::RecordOrderRequest {
        idempotency_key: key(),
        order: Some(pb::Order {
            id: "t1".into(),
            customer_id: "tom".into(),
            status: pb::OrderStatus::Returned.into(),
            currency: "USD".into(),
            lines: vec![pb::OrderLine {
                sku: "SKU-1".into(),
                quantity: 1,
                unit_amount: 80_00,
                ..Default::default()
            }],
            returned_amount: 20_00,
            ..Default::default()
        }),
    }))
    .await
    .expect("partial return");
    // A quarter returned: 30 of 120 and 20 of 80.
    expect_balance(&suite, "tom", "club", 350 - 30 - 20).await;
    record(
        &mut c,
        &suite,
        "b1",
        "bea",
        150_00,
        pb::OrderStatus::Returned,
    )
    .await;
    expect_balance(&suite, "bea", "club", 0).await;

    // Bad rules name the field; nothing is saved.
    let bad = loyalty(
        "bad",
        vec![
            pb::EarningRule {
                points: 10,
                condition: "order.total >".into(),
                ..rule("broken", pb::EarningTrigger::OrderPaid, "club")
            },
            pb::EarningRule {
                points: 10,
                ..rule("no-trigger", pb::EarningTrigger::Unspecified, "club")
            },
            rule("nothing", pb::EarningTrigger::Event, "club"),
        ],
    );
    let refused = c
        .put_campaign(suite.ctx(TENANT).request(pb::PutCampaignRequest {
            idempotency_key: key(),
            campaign: Some(bad),
            ..Default::default()
        }))
        .await
        .expect_err("bad rules");
    let fields = crate::eligibility::violations(&refused);
    for field in [
        "campaign.earning_rules.0.condition",
        "campaign.earning_rules.1.trigger",
        "campaign.earning_rules.2.event_type",
        "campaign.earning_rules.2.points",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }

    let earned = events(&suite, TENANT, "loyalty.points_earned").await;
    assert!(earned.len() >= 7, "{} events", earned.len());
    crate::check_catalogue(&suite, TENANT).await;
}

async fn referrals_count_on_the_first_order_and_caps_hold(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    programme(&mut wallet, &suite, "ref").await;
    let mut c = client(&suite);
    // "A referral counts only when the referred friend's first order is >= $50, then both
    // advocate and friend are rewarded."
    put_campaign(
        &mut c,
        &suite,
        loyalty(
            "referral",
            vec![pb::EarningRule {
                referral: true,
                condition: "order.total >= 5000".into(),
                points: 500,
                advocate_points: 1000,
                ..rule("friend", pb::EarningTrigger::OrderPaid, "ref")
            }],
        ),
    )
    .await;
    // "At most 100 points for social activity" (per day).
    put_campaign(
        &mut c,
        &suite,
        loyalty(
            "social",
            vec![pb::EarningRule {
                event_type: "social_like".into(),
                points: 30,
                max_points_per_customer_per_period: 100,
                period: pb::Period::Day.into(),
                ..rule("likes", pb::EarningTrigger::Event, "ref")
            }],
        ),
    )
    .await;
    c.define_attribute(suite.ctx(TENANT).request(pb::DefineAttributeRequest {
        idempotency_key: key(),
        attribute: Some(pb::AttributeDefinition {
            name: "referred_by".into(),
            r#type: pb::ValueType::String.into(),
        }),
    }))
    .await
    .expect("define attribute");
    for friend in ["fay", "gus"] {
        upsert(
            &mut c,
            &suite,
            pb::CustomerInput {
                id: friend.into(),
                attributes: [(
                    "referred_by".to_string(),
                    pb::Value {
                        kind: Some(pb::value::Kind::StringValue("adam".into())),
                    },
                )]
                .into(),
                ..Default::default()
            },
        )
        .await;
    }
    order(&mut c, &suite, "f1", "fay", 60_00).await;
    expect_balance(&suite, "fay", "ref", 500).await;
    expect_balance(&suite, "adam", "ref", 1000).await;
    // gus's first order is under $50: the referral never counts, not even on his second.
    order(&mut c, &suite, "g1", "gus", 40_00).await;
    order(&mut c, &suite, "g2", "gus", 60_00).await;
    for i in 0..5 {
        c.record_event(suite.ctx(TENANT).request(pb::RecordEventRequest {
            idempotency_key: key(),
            event: Some(pb::Event {
                id: format!("like-{i}"),
                customer_id: "adam".into(),
                r#type: "social_like".into(),
                ..Default::default()
            }),
        }))
        .await
        .expect("event");
    }
    // 30 + 30 + 30 + 10, then nothing.
    expect_balance(&suite, "adam", "ref", 1000 + 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(balance(&mut wallet, &suite, "gus", "ref").await, 0);
    assert_eq!(balance(&mut wallet, &suite, "adam", "ref").await, 1100);
    crate::check_catalogue(&suite, TENANT).await;
}
