//! Eligibility II: validation and redemption with stacking, race-safe budgets and limits
//! (real concurrent requests), rollbacks in full and for returned lines, two-phase checkout
//! with expiring holds, the kill switch, and refusals that never reveal another tenant's
//! codes.

// Amounts are written dollars_cents (`150_00` is $150.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::collections::BTreeSet;
use std::time::Duration;

use prost_types::Timestamp;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::eligibility::v1 as pb;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually, scalar};

use crate::eligibility::{
    Client, amount_off, campaign, cart, client, key, percent_off, put_campaign, violations,
};
use crate::{data, events};

backend_tests!(
    redemption_stacks_counts_and_rolls_back,
    codes_are_refused_with_reasons_and_guessing_is_limited,
    budgets_and_limits_hold_under_concurrent_redeems,
    a_budget_set_later_counts_what_was_redeemed_before,
    counts_saturate_instead_of_overflowing,
    sliced_budgets_refuse_only_what_does_not_fit,
    reservations_hold_until_confirmed_or_expired,
    touchpoints_check_out_over_http,
);

pub(crate) fn checkout(
    customer: &str,
    order: &str,
    codes: &[&str],
    campaigns: &[&str],
) -> pb::Checkout {
    pb::Checkout {
        customer_id: customer.into(),
        order_id: order.into(),
        cart: Some(shoes_and_socks()),
        codes: codes.iter().map(|c| (*c).into()).collect(),
        campaign_ids: campaigns.iter().map(|c| (*c).into()).collect(),
        ..Default::default()
    }
}

/// Two shoes at $50 (line l0) and socks at $10 (line l1).
pub(crate) fn shoes_and_socks() -> cpb::Cart {
    cart(&[("SHOE", "shoes", 2, 50_00), ("SOCK", "socks", 1, 10_00)])
}

pub(crate) async fn redeem(
    c: &mut Client,
    suite: &TestSuite,
    key: &str,
    checkout: pb::Checkout,
) -> Result<pb::Redemption, tonic::Status> {
    c.redeem(suite.ctx(TENANT).request(pb::RedeemRequest {
        idempotency_key: key.into(),
        checkout: Some(checkout),
    }))
    .await
    .map(|r| r.into_inner().redemption.expect("redemption"))
}

pub(crate) async fn rollback(
    c: &mut Client,
    suite: &TestSuite,
    id: &str,
    lines: Vec<pb::ReturnedLine>,
) -> Result<pb::Redemption, tonic::Status> {
    c.rollback_redemption(suite.ctx(TENANT).request(pb::RollbackRedemptionRequest {
        idempotency_key: key(),
        redemption_id: id.into(),
        lines,
        reason: "returned".into(),
    }))
    .await
    .map(|r| r.into_inner().redemption.expect("redemption"))
}

fn applied(r: &pb::Redemption) -> BTreeSet<&str> {
    r.applied.iter().map(|a| a.campaign_id.as_str()).collect()
}

fn not_applied<'a>(r: &'a pb::Redemption, id: &str) -> &'a pb::Rejected {
    r.not_applied
        .iter()
        .find(|x| x.campaign_id == id)
        .unwrap_or_else(|| panic!("{id} is reported as not applied"))
}

pub(crate) fn reason(status: &tonic::Status) -> String {
    tessera_runtime::Error::from_status(status)
        .reason
        .unwrap_or_default()
}

async fn counter(suite: &TestSuite, sql: &str, values: Vec<sea_orm::Value>) -> i64 {
    scalar(&suite.db("eligibility").await, sql, values).await
}

async fn usage(suite: &TestSuite, campaign: &str, column: &str) -> i64 {
    counter(
        suite,
        &format!(
            "SELECT CAST(COALESCE(SUM({column}), 0) AS BIGINT) FROM (SELECT {column} \
             FROM campaign_usage WHERE tenant_id = $1 AND campaign_id = $2 \
             UNION ALL SELECT {column} FROM campaign_usage_shards \
             WHERE tenant_id = $1 AND campaign_id = $2) u"
        ),
        vec![TENANT.into(), campaign.into()],
    )
    .await
}

async fn set_max_per_order(c: &mut Client, suite: &TestSuite, max: u32) {
    c.put_settings(suite.ctx(TENANT).request(pb::PutSettingsRequest {
        idempotency_key: key(),
        settings: Some(pb::Settings {
            time_zone: "Europe/Rome".into(),
            currency: "USD".into(),
            max_incentives_per_order: max,
        }),
    }))
    .await
    .expect("put settings");
}

fn limited(id: &str, limits: pb::Limits) -> pb::Campaign {
    pb::Campaign {
        limits: Some(limits),
        ..campaign(id, amount_off(1_00))
    }
}

async fn redemption_stacks_counts_and_rolls_back(suite: TestSuite) {
    let mut c = client(&suite);
    // "A general 15% off never combines with the 20% loyalty discount."
    let general = pb::Campaign {
        priority: 1,
        not_combinable_with: vec!["loyalty20".into()],
        ..campaign("general15", percent_off(1500, &[]))
    };
    let loyalty = pb::Campaign {
        priority: 2,
        ..campaign("loyalty20", percent_off(2000, &["shoes"]))
    };
    let tenner = pb::Campaign {
        stacking_group: "cash".into(),
        ..campaign("tenner", amount_off(10_00))
    };
    let fiver = pb::Campaign {
        stacking_group: "cash".into(),
        ..campaign("fiver", amount_off(5_00))
    };
    let spring = pb::Campaign {
        codes: vec!["SPRING".into()],
        limits: Some(pb::Limits {
            max_uses_per_code: 1,
            ..Default::default()
        }),
        ..campaign("spring", percent_off(1000, &[]))
    };
    for x in [general, loyalty, tenner, fiver, spring] {
        put_campaign(&mut c, &suite, x).await;
    }

    // Validate: the loyalty discount outranks the general one it excludes; one of the cash
    // group (the larger); nothing is written.
    let dry = c
        .validate(suite.ctx(TENANT).request(pb::ValidateRequest {
            checkout: Some(checkout("ann", "", &[], &[])),
        }))
        .await
        .expect("validate")
        .into_inner()
        .redemption
        .expect("redemption");
    assert_eq!(applied(&dry), BTreeSet::from(["loyalty20", "tenner"]));
    let general = not_applied(&dry, "general15");
    assert_eq!(general.reason(), pb::Reason::ExcludedByStacking);
    assert!(general.detail.contains("not combinable with 'loyalty20'"));
    let fiver = not_applied(&dry, "fiver");
    assert_eq!(fiver.reason(), pb::Reason::ExcludedByStacking);
    assert!(fiver.detail.contains("stacking group 'cash'"), "{fiver:?}");
    let outcome = dry.outcome.clone().expect("outcome");
    assert_eq!(outcome.discount, 20_00 + 10_00);
    assert_eq!(outcome.subtotal, 110_00);
    assert!(dry.id.is_empty());
    assert_eq!(
        counter(
            &suite,
            "SELECT COUNT(*) FROM redemptions WHERE tenant_id = $1",
            vec![TENANT.into()]
        )
        .await,
        0
    );

    // Redeem with a code, at most two incentives per order: the code first.
    set_max_per_order(&mut c, &suite, 2).await;
    let k1 = key();
    let first = redeem(
        &mut c,
        &suite,
        &k1,
        checkout("ann", "ord-1", &["SPRING"], &[]),
    )
    .await
    .expect("redeem");
    assert_eq!(first.status(), pb::RedemptionStatus::Redeemed);
    assert_eq!(applied(&first), BTreeSet::from(["loyalty20", "spring"]));
    let max = not_applied(&first, "tenner");
    assert!(max.detail.contains("already has 2 incentives"), "{max:?}");
    let outcome = first.outcome.clone().expect("outcome");
    let per_campaign: i64 = first.applied.iter().map(|a| a.discount).sum();
    assert_eq!(outcome.discount, per_campaign);
    assert_eq!(
        outcome.total_due,
        outcome.subtotal - outcome.discount + shoes_and_socks().shipping
    );
    let spring_code = first.applied.iter().find(|a| a.campaign_id == "spring");
    assert_eq!(spring_code.map(|a| a.code.as_str()), Some("SPRING"));

    // Idempotent by key and by order id.
    let replay = redeem(
        &mut c,
        &suite,
        &k1,
        checkout("ann", "ord-1", &["SPRING"], &[]),
    )
    .await
    .expect("replay");
    assert_eq!(replay.id, first.id);
    let same_order = redeem(&mut c, &suite, &key(), checkout("ann", "ord-1", &[], &[]))
        .await
        .expect("same order");
    assert_eq!(same_order.id, first.id);
    let got = c
        .get_redemption(suite.ctx(TENANT).request(pb::GetRedemptionRequest {
            redemption_id: first.id.clone(),
        }))
        .await
        .expect("get")
        .into_inner()
        .redemption;
    assert_eq!(got.as_ref(), Some(&first));

    // The single-use code is spent.
    let again = redeem(
        &mut c,
        &suite,
        &key(),
        checkout("bob", "ord-2", &["SPRING"], &[]),
    )
    .await
    .expect_err("single use");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&again), "BUDGET_EXHAUSTED");
    assert_eq!(usage(&suite, "spring", "redemptions").await, 1);
    assert_eq!(
        usage(&suite, "loyalty20", "order_value_total").await,
        110_00
    );
    let loyalty_discount = first
        .applied
        .iter()
        .find(|a| a.campaign_id == "loyalty20")
        .map(|a| a.discount)
        .expect("loyalty applied");
    assert_eq!(loyalty_discount, 20_00);
    assert_eq!(usage(&suite, "loyalty20", "discount_total").await, 20_00);

    // One shoe of two comes back: half of the shoe discounts and $50 of order value are
    // released; the code stays used.
    let partial = rollback(
        &mut c,
        &suite,
        &first.id,
        vec![pb::ReturnedLine {
            line_id: "l0".into(),
            quantity: 1,
        }],
    )
    .await
    .expect("partial rollback");
    assert_eq!(partial.status(), pb::RedemptionStatus::Redeemed);
    let released = partial
        .applied
        .iter()
        .find(|a| a.campaign_id == "loyalty20")
        .map(|a| a.released_discount);
    assert_eq!(released, Some(10_00));
    assert_eq!(usage(&suite, "loyalty20", "discount_total").await, 10_00);
    assert_eq!(usage(&suite, "loyalty20", "order_value_total").await, 60_00);
    assert_eq!(usage(&suite, "loyalty20", "redemptions").await, 1);
    // More than is left of the line is refused, naming the field; nothing changes.
    let too_many = rollback(
        &mut c,
        &suite,
        &first.id,
        vec![pb::ReturnedLine {
            line_id: "l0".into(),
            quantity: 2,
        }],
    )
    .await
    .expect_err("only one shoe is left");
    assert_eq!(violations(&too_many), ["lines.0.quantity"]);
    assert_eq!(usage(&suite, "loyalty20", "discount_total").await, 10_00);

    // The rest: everything is given back, and the code can be used again.
    let full = rollback(&mut c, &suite, &first.id, Vec::new())
        .await
        .expect("full rollback");
    assert_eq!(full.status(), pb::RedemptionStatus::RolledBack);
    for id in ["loyalty20", "spring"] {
        assert_eq!(usage(&suite, id, "redemptions").await, 0, "{id}");
        assert_eq!(usage(&suite, id, "discount_total").await, 0, "{id}");
        assert_eq!(usage(&suite, id, "order_value_total").await, 0, "{id}");
    }
    assert_eq!(
        counter(
            &suite,
            "SELECT uses FROM code_usage WHERE tenant_id = $1 AND code = 'SPRING'",
            vec![TENANT.into()]
        )
        .await,
        0
    );
    let twice = rollback(&mut c, &suite, &first.id, Vec::new())
        .await
        .expect_err("rolled back already");
    assert_eq!(reason(&twice), "NOT_ROLLBACKABLE");
    redeem(
        &mut c,
        &suite,
        &key(),
        checkout("bob", "ord-2", &["SPRING"], &[]),
    )
    .await
    .expect("the code is free again");

    let succeeded = eventually(Duration::from_secs(10), "redemption events", || {
        let suite = &suite;
        async move {
            let found = events(suite, TENANT, "redemption.succeeded").await;
            (found.len() >= 2).then_some(found)
        }
    })
    .await;
    assert!(
        succeeded
            .iter()
            .any(|e| data(e)["redemption_id"] == first.id.as_str())
    );
    let rolled = eventually(Duration::from_secs(10), "rollback events", || {
        let suite = &suite;
        async move {
            let found = events(suite, TENANT, "redemption.rolled_back").await;
            (found.len() >= 2).then_some(found)
        }
    })
    .await;
    assert!(rolled.iter().any(|e| data(e)["partial"] == true));
    crate::check_catalogue(&suite, TENANT).await;
}

async fn codes_are_refused_with_reasons_and_guessing_is_limited(suite: TestSuite) {
    let mut c = client(&suite);
    let past = |days: i64| {
        Some(Timestamp {
            seconds: (chrono::Utc::now() - chrono::Duration::days(days)).timestamp(),
            nanos: 0,
        })
    };
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            codes: vec!["OLD".into()],
            starts_at: past(30),
            ends_at: past(1),
            ..campaign("old", amount_off(5_00))
        },
    )
    .await;
    let live = pb::Campaign {
        codes: vec!["LIVE".into()],
        ..campaign("live", amount_off(5_00))
    };
    put_campaign(&mut c, &suite, live.clone()).await;
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            limits: Some(pb::Limits {
                max_redemptions_per_customer_per_period: 1,
                period: pb::Period::Day.into(),
                ..Default::default()
            }),
            ..campaign("daily", amount_off(1_00))
        },
    )
    .await;
    // Another tenant's code.
    c.put_campaign(suite.ctx("other").request(pb::PutCampaignRequest {
        idempotency_key: key(),
        campaign: Some(pb::Campaign {
            codes: vec!["THEIRS".into()],
            ..campaign("theirs", amount_off(5_00))
        }),
        ..Default::default()
    }))
    .await
    .expect("other tenant's campaign");

    let unknown = redeem(&mut c, &suite, &key(), checkout("ann", "", &["NOPE"], &[]))
        .await
        .expect_err("unknown code");
    let theirs = redeem(
        &mut c,
        &suite,
        &key(),
        checkout("ann", "", &["THEIRS"], &[]),
    )
    .await
    .expect_err("another tenant's code");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(theirs.code(), tonic::Code::NotFound);
    assert_eq!(
        theirs.message().replace("THEIRS", "X"),
        unknown.message().replace("NOPE", "X"),
        "never reveals that the code exists elsewhere"
    );
    let ended = redeem(&mut c, &suite, &key(), checkout("ann", "", &["OLD"], &[]))
        .await
        .expect_err("ended");
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&ended), "ENDED");

    // Kill switch: the very next redemption is refused.
    redeem(&mut c, &suite, &key(), checkout("ann", "", &["LIVE"], &[]))
        .await
        .expect("live code");
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            status: pb::CampaignStatus::Disabled.into(),
            ..live
        },
    )
    .await;
    let killed = redeem(&mut c, &suite, &key(), checkout("bob", "", &["LIVE"], &[]))
        .await
        .expect_err("killed");
    assert_eq!(reason(&killed), "DISABLED");

    // Once a day per customer, in the tenant's time zone.
    redeem(&mut c, &suite, &key(), checkout("cy", "", &[], &["daily"]))
        .await
        .expect("first today");
    let second = redeem(&mut c, &suite, &key(), checkout("cy", "", &[], &["daily"]))
        .await
        .expect_err("second today");
    assert_eq!(reason(&second), "CUSTOMER_LIMIT_REACHED");
    // Qualification says so too.
    let asked = c
        .qualify(suite.ctx(TENANT).request(pb::QualifyRequest {
            customer_id: "cy".into(),
            cart: Some(shoes_and_socks()),
            ..Default::default()
        }))
        .await
        .expect("qualify")
        .into_inner();
    let daily = asked
        .rejected
        .iter()
        .find(|r| r.campaign_id == "daily")
        .expect("daily is rejected");
    assert_eq!(daily.reason(), pb::Reason::CustomerLimitReached);
    assert!(daily.detail.contains("this day"), "{daily:?}");
    redeem(&mut c, &suite, &key(), checkout("dee", "", &[], &["daily"]))
        .await
        .expect("another customer");

    // Bad input names the field and writes nothing.
    let before = counter(
        &suite,
        "SELECT COUNT(*) FROM redemptions WHERE tenant_id = $1",
        vec![TENANT.into()],
    )
    .await;
    let mut bad = checkout("", "", &[""], &[]);
    if let Some(cart) = bad.cart.as_mut() {
        cart.currency = "EUR".into();
        cart.lines[0].quantity = -1;
    }
    let refused = redeem(&mut c, &suite, &key(), bad)
        .await
        .expect_err("bad checkout");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let fields = violations(&refused);
    for field in [
        "checkout.customer_id",
        "checkout.cart.currency",
        "checkout.codes.0",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }
    assert!(
        fields
            .iter()
            .any(|f| f.starts_with("checkout.cart.lines.0")),
        "{fields:?}"
    );
    let missing = redeem_without_checkout(&mut c, &suite).await;
    assert_eq!(violations(&missing), ["checkout"]);
    assert_eq!(
        counter(
            &suite,
            "SELECT COUNT(*) FROM redemptions WHERE tenant_id = $1",
            vec![TENANT.into()]
        )
        .await,
        before
    );

    // Guessing: ten unknown codes, then the customer is refused even a real one.
    for i in 0..10 {
        let guess = format!("GUESS{i}");
        let e = redeem(
            &mut c,
            &suite,
            &key(),
            checkout("mallory", "", &[&guess], &[]),
        )
        .await
        .expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
    let limited = redeem(
        &mut c,
        &suite,
        &key(),
        checkout("mallory", "", &["OLD"], &[]),
    )
    .await
    .expect_err("rate limited");
    assert_eq!(limited.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&limited), "CODE_ATTEMPTS_EXCEEDED");
    assert_eq!(
        counter(
            &suite,
            "SELECT COUNT(*) FROM code_failures WHERE tenant_id = $1 AND subject = $2",
            vec![TENANT.into(), "customer:mallory".into()]
        )
        .await,
        10,
        "every failed attempt is on record"
    );
    // Another customer is not affected.
    let other = redeem(&mut c, &suite, &key(), checkout("erin", "", &["OLD"], &[]))
        .await
        .expect_err("ended, not limited");
    assert_eq!(reason(&other), "ENDED");
    let failed = eventually(Duration::from_secs(10), "failure events", || {
        let suite = &suite;
        async move {
            let found = events(suite, TENANT, "redemption.failed").await;
            (found.len() >= 10).then_some(found)
        }
    })
    .await;
    assert!(failed.iter().any(|e| data(e)["reason"] == "CODE_NOT_FOUND"));
    crate::check_catalogue(&suite, TENANT).await;
}

async fn redeem_without_checkout(c: &mut Client, suite: &TestSuite) -> tonic::Status {
    c.redeem(suite.ctx(TENANT).request(pb::RedeemRequest {
        idempotency_key: key(),
        checkout: None,
    }))
    .await
    .expect_err("no checkout")
}

/// Sends all `checkouts` at once; their answers, in the same order.
async fn at_once(
    suite: &TestSuite,
    checkouts: impl IntoIterator<Item = pb::Checkout>,
) -> Vec<Result<pb::Redemption, tonic::Status>> {
    let c = pb::eligibility_service_client::EligibilityServiceClient::new(
        suite.channel_with_deadline(Duration::from_secs(300)),
    );
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, checkout) in checkouts.into_iter().enumerate() {
        let mut c = c.clone();
        let request = suite.ctx(TENANT).request(pb::RedeemRequest {
            idempotency_key: key(),
            checkout: Some(checkout),
        });
        tasks.spawn(async move {
            let answer = c.redeem(request).await;
            (
                i,
                answer.map(|r| r.into_inner().redemption.expect("redemption")),
            )
        });
    }
    let mut answers = Vec::new();
    while let Some(result) = tasks.join_next().await {
        answers.push(result.expect("task"));
    }
    eprintln!(
        "{} concurrent redeems in {:?}",
        answers.len(),
        started.elapsed()
    );
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, answer)| answer).collect()
}

/// Runs `n` redemptions at once; returns how many succeeded, after checking every failure
/// is the expected refusal.
async fn concurrently(
    suite: &TestSuite,
    n: usize,
    expected: &str,
    checkout: impl Fn(usize) -> pb::Checkout,
) -> usize {
    let mut won = 0;
    for answer in at_once(suite, (0..n).map(checkout)).await {
        match answer {
            Ok(_) => won += 1,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                assert_eq!(reason(&e), expected, "{e:?}");
            }
        }
    }
    won
}

/// Budgets are taken from slices spread over rows; whatever the slices hold, a budget is
/// never overrun, an order is refused only when the budget truly has no room for it, and
/// a changed campaign never takes from slices cut for its earlier version.
async fn sliced_budgets_refuse_only_what_does_not_fit(suite: TestSuite) {
    let mut c = client(&suite);
    // A $500 discount budget, 10% off shoes; 200 orders at once with discounts from $1 to
    // $20.50, so some fit no slice.
    let budget = 500_00;
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            limits: Some(pb::Limits {
                max_discount_total: budget,
                ..Default::default()
            }),
            ..campaign("spend", percent_off(1000, &["shoes"]))
        },
    )
    .await;
    let price = |i: usize| (10 + 5 * (i as i64 % 40)) * 1_00;
    let answers = at_once(
        &suite,
        (0..200).map(|i| pb::Checkout {
            cart: Some(cart(&[("SHOE", "shoes", 1, price(i))])),
            ..checkout(&format!("d{i}"), &format!("do{i}"), &[], &["spend"])
        }),
    )
    .await;
    let total = usage(&suite, "spend", "discount_total").await;
    assert!(total <= budget, "{total} spent of {budget}");
    let mut granted = 0;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(r) => granted += r.outcome.as_ref().expect("outcome").discount,
            Err(e) => {
                assert_eq!(reason(e), "BUDGET_EXHAUSTED", "{e:?}");
                // Room only ever shrinks here, so what was left at the end did not fit it.
                assert!(
                    price(i) / 10 > budget - total,
                    "order {i} ({}) refused with {} left",
                    price(i) / 10,
                    budget - total
                );
            }
        }
    }
    assert_eq!(granted, total);

    // A budget lowered below what its slices were cut from: exactly what is left of it.
    let limit = |max_redemptions| {
        limited(
            "edited",
            pb::Limits {
                max_redemptions,
                ..Default::default()
            },
        )
    };
    let order = |i: usize| checkout(&format!("e{i}"), &format!("eo{i}"), &[], &["edited"]);
    put_campaign(&mut c, &suite, limit(1000)).await;
    let won = at_once(&suite, (0..10).map(order)).await;
    assert!(won.iter().all(Result::is_ok));
    put_campaign(&mut c, &suite, limit(13)).await;
    let won = concurrently(&suite, 20, "BUDGET_EXHAUSTED", |i| order(10 + i)).await;
    assert_eq!(won, 3);
    // Raised, dropped and set again to the same figure: the slices cut for the first
    // version of that budget (5 or 6 redemptions each) are not taken from.
    put_campaign(&mut c, &suite, limit(200)).await;
    assert!(at_once(&suite, [order(30)]).await[0].is_ok());
    put_campaign(&mut c, &suite, campaign("edited", amount_off(1_00))).await;
    let won = at_once(&suite, (40..220).map(order)).await;
    assert!(won.iter().all(Result::is_ok));
    assert_eq!(usage(&suite, "edited", "redemptions").await, 194);
    put_campaign(&mut c, &suite, limit(200)).await;
    let won = concurrently(&suite, 20, "BUDGET_EXHAUSTED", |i| order(300 + i)).await;
    assert_eq!(won, 6);
    assert_eq!(usage(&suite, "edited", "redemptions").await, 200);
}

async fn a_budget_set_later_counts_what_was_redeemed_before(suite: TestSuite) {
    let mut c = client(&suite);
    // Without a budget, 20 concurrent redemptions are counted on spread-out rows.
    put_campaign(&mut c, &suite, campaign("open", amount_off(1_00))).await;
    let attempts = (0..20).map(|i| {
        let (mut c, suite) = (c.clone(), &suite);
        async move {
            let checkout = checkout(&format!("o{i}"), "", &[], &["open"]);
            redeem(&mut c, suite, &key(), checkout).await
        }
    });
    for r in futures::future::join_all(attempts).await {
        r.expect("no budget");
    }
    assert_eq!(usage(&suite, "open", "redemptions").await, 20);
    assert_eq!(usage(&suite, "open", "discount_total").await, 20_00);
    // A budget of 22 set now leaves two.
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            limits: Some(pb::Limits {
                max_redemptions: 22,
                ..Default::default()
            }),
            ..campaign("open", amount_off(1_00))
        },
    )
    .await;
    for i in 20..22 {
        let checkout = checkout(&format!("o{i}"), "", &[], &["open"]);
        redeem(&mut c, &suite, &key(), checkout)
            .await
            .expect("within the budget");
    }
    let over = redeem(&mut c, &suite, &key(), checkout("o22", "", &[], &["open"]))
        .await
        .expect_err("budget spent");
    assert_eq!(reason(&over), "BUDGET_EXHAUSTED");
    assert_eq!(usage(&suite, "open", "redemptions").await, 22);
}

async fn counts_saturate_instead_of_overflowing(suite: TestSuite) {
    let mut c = client(&suite);
    put_campaign(&mut c, &suite, campaign("huge", amount_off(1_00))).await;
    redeem(&mut c, &suite, &key(), checkout("h0", "", &[], &["huge"]))
        .await
        .expect("first");
    // Years of orders later, the campaign's order-value count is a few units short of the
    // largest BIGINT on every shard.
    let db = suite.db("eligibility").await;
    {
        use sea_orm::ConnectionTrait;
        let conn = db.conn();
        let sql = "DELETE FROM campaign_usage_shards WHERE tenant_id = $1 AND campaign_id = $2";
        let values: [sea_orm::Value; 2] = [TENANT.into(), "huge".into()];
        conn.execute_raw(tessera_store::stmt(conn, sql, values))
            .await
            .expect("shards cleared");
        for shard in 0..32i32 {
            let values: [sea_orm::Value; 4] = [
                TENANT.into(),
                "huge".into(),
                shard.into(),
                (i64::MAX - 5).into(),
            ];
            conn.execute_raw(tessera_store::stmt(
                conn,
                "INSERT INTO campaign_usage_shards (tenant_id, campaign_id, shard, redemptions, \
                 discount_total, order_value_total) VALUES ($1, $2, $3, 0, 0, $4)",
                values,
            ))
            .await
            .expect("shard set");
        }
    }
    // The next order neither fails (PostgreSQL: out of range) nor turns the count into a
    // float (SQLite): the count saturates.
    redeem(&mut c, &suite, &key(), checkout("h1", "", &[], &["huge"]))
        .await
        .expect("a saturated count does not fail the redemption");
    let highest = "SELECT MAX(order_value_total) FROM (SELECT order_value_total \
                   FROM campaign_usage WHERE tenant_id = $1 AND campaign_id = $2 \
                   UNION ALL SELECT order_value_total FROM campaign_usage_shards \
                   WHERE tenant_id = $1 AND campaign_id = $2) u";
    assert_eq!(
        counter(&suite, highest, vec![TENANT.into(), "huge".into()]).await,
        i64::MAX
    );
    // A budget as large as an amount can be: what was counted already exceeds it (the sum
    // past the largest amount is past every budget), so the order is refused, not failed.
    put_campaign(
        &mut c,
        &suite,
        limited(
            "huge",
            pb::Limits {
                max_order_value_total: i64::MAX,
                ..Default::default()
            },
        ),
    )
    .await;
    let over = redeem(&mut c, &suite, &key(), checkout("h2", "", &[], &["huge"]))
        .await
        .expect_err("the budget is used up");
    assert_eq!(reason(&over), "BUDGET_EXHAUSTED");
}

async fn budgets_and_limits_hold_under_concurrent_redeems(suite: TestSuite) {
    let mut c = client(&suite);
    // "The first 500 customers", 2,000 at once; a quarter of that by default (see
    // `full_size`): still four customers at once for every place.
    let (places, customers) = if tessera_tests::full_size() {
        (500, 2000)
    } else {
        (125, 500)
    };
    put_campaign(
        &mut c,
        &suite,
        limited(
            "first500",
            pb::Limits {
                max_redemptions: places,
                ..Default::default()
            },
        ),
    )
    .await;
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            codes: vec!["ONCE".into()],
            ..limited(
                "single",
                pb::Limits {
                    max_uses_per_code: 1,
                    ..Default::default()
                },
            )
        },
    )
    .await;
    put_campaign(
        &mut c,
        &suite,
        limited(
            "once-each",
            pb::Limits {
                max_redemptions_per_customer: 1,
                ..Default::default()
            },
        ),
    )
    .await;

    // A budget that is not reached refuses nobody, even when its first redemptions race
    // to create its counter.
    put_campaign(
        &mut c,
        &suite,
        limited(
            "roomy",
            pb::Limits {
                max_redemptions: 1000,
                ..Default::default()
            },
        ),
    )
    .await;
    let won = concurrently(&suite, 100, "none expected", |i| {
        checkout(&format!("r{i}"), &format!("ro{i}"), &[], &["roomy"])
    })
    .await;
    assert_eq!(won, 100);

    // "The first 500 customers": 2,000 at once.
    let won = concurrently(&suite, customers, "BUDGET_EXHAUSTED", |i| {
        checkout(&format!("c{i}"), &format!("o{i}"), &[], &["first500"])
    })
    .await;
    assert_eq!(won as i64, places);
    assert_eq!(usage(&suite, "first500", "redemptions").await, places);
    assert_eq!(
        usage(&suite, "first500", "discount_total").await,
        places * 1_00
    );
    assert_eq!(
        counter(
            &suite,
            "SELECT COUNT(*) FROM redemptions WHERE tenant_id = $1",
            vec![TENANT.into()]
        )
        .await,
        100 + places
    );

    // One single-use code, 200 customers at once.
    let won = concurrently(&suite, 200, "BUDGET_EXHAUSTED", |i| {
        checkout(&format!("s{i}"), &format!("so{i}"), &["ONCE"], &[])
    })
    .await;
    assert_eq!(won, 1);
    assert_eq!(usage(&suite, "single", "redemptions").await, 1);

    // Automatic incentives: a budget that runs out during checkout drops out of the
    // redemptions that lose the race (the others still apply); none of them fails.
    let autos = [
        limited(
            "auto-five",
            pb::Limits {
                max_redemptions: 5,
                ..Default::default()
            },
        ),
        pb::Campaign {
            stacking_group: "other".into(),
            ..campaign("auto-free", amount_off(2_00))
        },
    ];
    for x in autos {
        put_campaign(&mut c, &suite, x).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let mut c = c.clone();
        let mut auto = checkout(&format!("a{i}"), &format!("ao{i}"), &[], &[]);
        if let Some(cart) = auto.cart.as_mut() {
            // Only the two automatic campaigns match (the others are named or coded).
            cart.lines.truncate(1);
        }
        let request = suite.ctx(TENANT).request(pb::RedeemRequest {
            idempotency_key: key(),
            checkout: Some(auto),
        });
        tasks.spawn(async move { c.redeem(request).await });
    }
    let mut with_budget = 0;
    while let Some(result) = tasks.join_next().await {
        let r = result
            .expect("task")
            .expect("automatic redemptions never fail")
            .into_inner()
            .redemption
            .expect("redemption");
        assert!(applied(&r).contains("auto-free"));
        if applied(&r).contains("auto-five") {
            with_budget += 1;
        } else {
            assert_eq!(
                not_applied(&r, "auto-five").reason(),
                pb::Reason::BudgetExhausted
            );
        }
    }
    assert_eq!(with_budget, 5);
    assert_eq!(usage(&suite, "auto-five", "redemptions").await, 5);
    assert_eq!(usage(&suite, "auto-free", "redemptions").await, 40);

    // One customer, limit 1, 50 attempts at once.
    let won = concurrently(&suite, 50, "CUSTOMER_LIMIT_REACHED", |i| {
        checkout("solo", &format!("po{i}"), &[], &["once-each"])
    })
    .await;
    assert_eq!(won, 1);
    assert_eq!(
        counter(
            &suite,
            "SELECT redemptions FROM customer_usage WHERE tenant_id = $1 AND customer_id = 'solo'",
            vec![TENANT.into()]
        )
        .await,
        1
    );
}

async fn reserve(
    c: &mut Client,
    suite: &TestSuite,
    customer: &str,
    hold_seconds: u32,
) -> Result<pb::Redemption, tonic::Status> {
    c.reserve(suite.ctx(TENANT).request(pb::ReserveRequest {
        idempotency_key: key(),
        checkout: Some(checkout(customer, "", &[], &["held"])),
        hold_seconds,
    }))
    .await
    .map(|r| r.into_inner().redemption.expect("redemption"))
}

async fn status_of(c: &mut Client, suite: &TestSuite, id: &str) -> pb::RedemptionStatus {
    c.get_redemption(suite.ctx(TENANT).request(pb::GetRedemptionRequest {
        redemption_id: id.into(),
    }))
    .await
    .expect("get")
    .into_inner()
    .redemption
    .expect("redemption")
    .status()
}

async fn confirm(
    c: &mut Client,
    suite: &TestSuite,
    id: &str,
) -> Result<pb::Redemption, tonic::Status> {
    c.confirm(suite.ctx(TENANT).request(pb::ConfirmRequest {
        idempotency_key: key(),
        redemption_id: id.into(),
    }))
    .await
    .map(|r| r.into_inner().redemption.expect("redemption"))
}

async fn reservations_hold_until_confirmed_or_expired(suite: TestSuite) {
    let mut c = client(&suite);
    put_campaign(
        &mut c,
        &suite,
        limited(
            "held",
            pb::Limits {
                max_redemptions: 1,
                ..Default::default()
            },
        ),
    )
    .await;
    // A hold takes the budget; nobody else gets it while it lasts.
    let held = reserve(&mut c, &suite, "ann", 1).await.expect("reserve");
    assert_eq!(held.status(), pb::RedemptionStatus::Reserved);
    assert!(held.expires_at.is_some());
    let blocked = reserve(&mut c, &suite, "bob", 60)
        .await
        .expect_err("budget held");
    assert_eq!(reason(&blocked), "BUDGET_EXHAUSTED");
    // Not confirmed in time: released by the sweep.
    eventually(Duration::from_secs(10), "the hold to expire", || {
        let (mut c, suite, id) = (c.clone(), &suite, held.id.clone());
        async move {
            (status_of(&mut c, suite, &id).await == pb::RedemptionStatus::Expired).then_some(())
        }
    })
    .await;
    assert_eq!(usage(&suite, "held", "redemptions").await, 0);
    let late = confirm(&mut c, &suite, &held.id)
        .await
        .expect_err("expired");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    // Reserve, confirm: a redemption that keeps the budget.
    let bob = reserve(&mut c, &suite, "bob", 60).await.expect("reserve");
    let confirmed = confirm(&mut c, &suite, &bob.id).await.expect("confirm");
    assert_eq!(confirmed.status(), pb::RedemptionStatus::Redeemed);
    assert_eq!(confirmed.id, bob.id);
    assert_eq!(usage(&suite, "held", "redemptions").await, 1);
    let after = reserve(&mut c, &suite, "cy", 60)
        .await
        .expect_err("budget used");
    assert_eq!(reason(&after), "BUDGET_EXHAUSTED");
    // A reservation released by a rollback frees the budget at once.
    rollback(&mut c, &suite, &bob.id, Vec::new())
        .await
        .expect("rollback");
    let cy = reserve(&mut c, &suite, "cy", 60)
        .await
        .expect("budget free");
    rollback(&mut c, &suite, &cy.id, Vec::new())
        .await
        .expect("release a hold");
    assert_eq!(
        status_of(&mut c, &suite, &cy.id).await,
        pb::RedemptionStatus::RolledBack
    );
    assert_eq!(usage(&suite, "held", "redemptions").await, 0);
    crate::check_catalogue(&suite, TENANT).await;
}

async fn touchpoints_check_out_over_http(suite: TestSuite) {
    let mut c = client(&suite);
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            codes: vec!["WEB10".into()],
            ..campaign("web10", percent_off(1000, &[]))
        },
    )
    .await;
    let checkout = serde_json::json!({"checkout": {
        "customer_id": "web-ann", "order_id": "web-1", "codes": ["WEB10"],
        "cart": {"currency": "USD", "lines": [
            {"id": "l1", "sku": "CASE-1", "quantity": 2, "unit_price": 20_00}]}}});
    let dry = suite.post("/v1/validate", None, &checkout).await;
    assert_eq!(dry.status(), 200);
    let dry: serde_json::Value = dry.json().await.expect("json");
    assert_eq!(dry["outcome"]["discount"], 400);
    let made = suite
        .post("/v1/redemptions", Some("web-r1"), &checkout)
        .await;
    assert_eq!(made.status(), 201);
    let made: serde_json::Value = made.json().await.expect("json");
    let id = made["id"].as_str().expect("id").to_string();
    assert_eq!(made["status"], "REDEMPTION_STATUS_REDEEMED");
    let read: serde_json::Value = suite
        .get(&format!("/v1/redemptions/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(read["id"], id.as_str());
    let back = suite
        .post(
            &format!("/v1/redemptions/{id}/rollback"),
            Some("web-rb1"),
            &serde_json::json!({"reason": "cancelled"}),
        )
        .await;
    assert_eq!(back.status(), 200);
    let back: serde_json::Value = back.json().await.expect("json");
    assert_eq!(back["status"], "REDEMPTION_STATUS_ROLLED_BACK");
    let mut unknown = checkout.clone();
    unknown["checkout"]["codes"] = serde_json::json!(["NOPE"]);
    let r = suite
        .post("/v1/redemptions", Some("web-r2"), &unknown)
        .await;
    assert_eq!(r.status(), 404);
    let held = suite
        .post(
            "/v1/reservations",
            Some("web-h1"),
            &serde_json::json!({"checkout": checkout["checkout"], "hold_seconds": 60}),
        )
        .await;
    assert_eq!(held.status(), 201);
    let held: serde_json::Value = held.json().await.expect("json");
    let hid = held["id"].as_str().expect("id");
    let confirmed = suite
        .post(
            &format!("/v1/reservations/{hid}/confirm"),
            Some("web-c1"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(confirmed.status(), 200);
    let confirmed: serde_json::Value = confirmed.json().await.expect("json");
    assert_eq!(confirmed["status"], "REDEMPTION_STATUS_REDEEMED");
}
