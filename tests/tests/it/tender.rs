//! Points and gift cards as tender: what a checkout spends comes from the customer's wallet
//! (held by Redeem and Reserve, captured when redeemed, released when a reservation ends,
//! given back by rollbacks), and concurrent spends of one balance never overdraw it.

// Amounts are written dollars_cents (`150_00` is $150.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::time::Duration;

use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::eligibility::{campaign, client, key, put_campaign, violations};
use crate::redemption::{checkout, reason, redeem, rollback};

backend_tests!(
    points_and_gift_cards_pay_from_the_wallet,
    wallet_holds_follow_reservations,
    concurrent_spends_never_overdraw,
);

pub(crate) type Wallet = WalletServiceClient<Channel>;

pub(crate) fn points() -> wpb::Asset {
    wpb::Asset {
        kind: wpb::AssetKind::Points as i32,
        code: "default".into(),
    }
}

fn card(code: &str) -> wpb::Asset {
    wpb::Asset {
        kind: wpb::AssetKind::GiftCard as i32,
        code: code.into(),
    }
}

/// Pay with points: 100 points are worth $1, up to `max_share_bp` of the order.
pub(crate) fn pay_with_points(max_share_bp: u32) -> pb::Campaign {
    campaign(
        "pwp",
        Some(cpb::Effect {
            kind: Some(Kind::PayWithPoints(cpb::PayWithPoints {
                points: 100,
                amount: 1_00,
                min_share_bp: 0,
                max_share_bp,
            })),
        }),
    )
}

/// A $50 multi-use gift card, unlocked by its code.
fn gift_card(code: &str) -> pb::Campaign {
    pb::Campaign {
        codes: vec![code.into()],
        ..campaign(
            "gift",
            Some(cpb::Effect {
                kind: Some(Kind::GiftCard(cpb::GiftCard {
                    value: 50_00,
                    multi_use: true,
                })),
            }),
        )
    }
}

pub(crate) async fn load(
    wallet: &mut Wallet,
    suite: &TestSuite,
    customer: &str,
    asset: wpb::Asset,
    n: i64,
) {
    wallet
        .credit(suite.ctx(TENANT).request(wpb::CreditRequest {
            idempotency_key: key(),
            customer_id: customer.into(),
            asset: Some(asset),
            amount: n,
            reason: "test".into(),
            ..Default::default()
        }))
        .await
        .expect("credit");
}

/// `(available, held)` of one asset.
pub(crate) async fn balance(
    wallet: &mut Wallet,
    suite: &TestSuite,
    customer: &str,
    asset: &wpb::Asset,
) -> (i64, i64) {
    wallet
        .get_balance(suite.ctx(TENANT).request(wpb::GetBalanceRequest {
            customer_id: customer.into(),
        }))
        .await
        .expect("balance")
        .into_inner()
        .balances
        .into_iter()
        .find(|b| b.asset.as_ref() == Some(asset))
        .map_or((0, 0), |b| (b.available, b.held))
}

/// Waits until the asset's `(available, held)` is `want` (captures, releases and refunds
/// land right after the call, or by the sweep).
async fn settles(
    wallet: &Wallet,
    suite: &TestSuite,
    customer: &str,
    asset: wpb::Asset,
    want: (i64, i64),
) {
    eventually(Duration::from_secs(10), "the wallet to settle", || {
        let (mut wallet, asset) = (wallet.clone(), asset.clone());
        async move { (balance(&mut wallet, suite, customer, &asset).await == want).then_some(()) }
    })
    .await;
}

fn spent(r: &pb::Redemption, asset: &wpb::Asset) -> pb::WalletSpend {
    r.spends
        .iter()
        .find(|s| s.asset.as_ref() == Some(asset))
        .cloned()
        .unwrap_or_else(|| panic!("{asset:?} is spent in {r:?}"))
}

pub(crate) fn with_tender(customer: &str, order: &str, codes: &[&str]) -> pb::Checkout {
    pb::Checkout {
        program_id: "default".into(),
        ..checkout(customer, order, codes, &["pwp"])
    }
}

async fn points_and_gift_cards_pay_from_the_wallet(suite: TestSuite) {
    let (mut c, mut wallet) = (client(&suite), WalletServiceClient::new(suite.channel()));
    put_campaign(&mut c, &suite, pay_with_points(5000)).await;
    put_campaign(&mut c, &suite, gift_card("GC-ANN-1")).await;
    // 3,000 points ($30) and a card worth $30 of its $50 face value left.
    load(&mut wallet, &suite, "ann", points(), 3_000).await;
    load(&mut wallet, &suite, "ann", card("GC-ANN-1"), 30_00).await;

    // Validate reads the wallet and holds nothing.
    let dry = c
        .validate(suite.ctx(TENANT).request(pb::ValidateRequest {
            checkout: Some(with_tender("ann", "", &["GC-ANN-1"])),
        }))
        .await
        .expect("validate")
        .into_inner()
        .redemption
        .expect("redemption");
    assert_eq!(spent(&dry, &points()).amount, 3_000);
    assert_eq!(spent(&dry, &card("GC-ANN-1")).amount, 30_00);
    assert!(dry.spends.iter().all(|s| s.hold_id.is_empty()));
    let outcome = dry.outcome.clone().expect("outcome");
    assert_eq!(outcome.tender, 60_00);
    assert_eq!(outcome.points_spent, 3_000);
    assert_eq!(
        balance(&mut wallet, &suite, "ann", &points()).await,
        (3_000, 0)
    );

    // Redeem spends both: held, then captured; a replay spends nothing more.
    let k = key();
    let r = redeem(
        &mut c,
        &suite,
        &k,
        with_tender("ann", "ord-1", &["GC-ANN-1"]),
    )
    .await
    .expect("redeem");
    assert!(r.spends.iter().all(|s| !s.hold_id.is_empty()), "{r:?}");
    settles(&wallet, &suite, "ann", points(), (0, 0)).await;
    settles(&wallet, &suite, "ann", card("GC-ANN-1"), (0, 0)).await;
    let replay = redeem(
        &mut c,
        &suite,
        &k,
        with_tender("ann", "ord-1", &["GC-ANN-1"]),
    )
    .await
    .expect("replay");
    assert_eq!(replay, r);
    assert_eq!(balance(&mut wallet, &suite, "ann", &points()).await, (0, 0));

    // The card is empty now: the code is refused with the reason.
    let empty = redeem(
        &mut c,
        &suite,
        &key(),
        pb::Checkout {
            program_id: "default".into(),
            ..checkout("ann", "ord-2", &["GC-ANN-1"], &[])
        },
    )
    .await
    .expect_err("empty card");
    assert_eq!(empty.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&empty), "INSUFFICIENT_BALANCE");

    // Socks ($10 of $110) come back: 10/110 of each spend is given back, rounded down.
    rollback(
        &mut c,
        &suite,
        &r.id,
        vec![pb::ReturnedLine {
            line_id: "l1".into(),
            quantity: 1,
        }],
    )
    .await
    .expect("partial rollback");
    settles(&wallet, &suite, "ann", points(), (272, 0)).await;
    settles(&wallet, &suite, "ann", card("GC-ANN-1"), (2_72, 0)).await;
    // The rest: everything is back.
    rollback(&mut c, &suite, &r.id, Vec::new())
        .await
        .expect("rollback");
    settles(&wallet, &suite, "ann", points(), (3_000, 0)).await;
    settles(&wallet, &suite, "ann", card("GC-ANN-1"), (30_00, 0)).await;
    let got = c
        .get_redemption(suite.ctx(TENANT).request(pb::GetRedemptionRequest {
            redemption_id: r.id.clone(),
        }))
        .await
        .expect("get")
        .into_inner()
        .redemption
        .expect("redemption");
    assert!(got.spends.iter().all(|s| s.refunded == s.amount), "{got:?}");

    // Points spent need the programme they come from.
    let mut no_program = checkout("ann", "ord-3", &[], &["pwp"]);
    if let Some(cart) = no_program.cart.as_mut() {
        cart.points_balance = 500;
    }
    let refused = redeem(&mut c, &suite, &key(), no_program)
        .await
        .expect_err("no programme");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(violations(&refused), vec!["checkout.program_id"]);
    crate::check_catalogue(&suite, TENANT).await;
    crate::assert_ledger_invariants(&suite).await;
}

async fn wallet_holds_follow_reservations(suite: TestSuite) {
    let (mut c, mut wallet) = (client(&suite), WalletServiceClient::new(suite.channel()));
    put_campaign(&mut c, &suite, pay_with_points(10_000)).await;
    load(&mut wallet, &suite, "bea", points(), 1_000).await;
    let base = c.clone();
    let reserve = |hold_seconds: u32| {
        let mut c = base.clone();
        let suite = &suite;
        async move {
            c.reserve(suite.ctx(TENANT).request(pb::ReserveRequest {
                idempotency_key: key(),
                checkout: Some(with_tender("bea", "", &[])),
                hold_seconds,
            }))
            .await
            .expect("reserve")
            .into_inner()
            .redemption
            .expect("redemption")
        }
    };
    // A reservation holds the points; confirmed, they are spent.
    let held = reserve(60).await;
    assert_eq!(spent(&held, &points()).amount, 1_000);
    assert_eq!(
        balance(&mut wallet, &suite, "bea", &points()).await,
        (0, 1_000)
    );
    c.confirm(suite.ctx(TENANT).request(pb::ConfirmRequest {
        idempotency_key: key(),
        redemption_id: held.id.clone(),
    }))
    .await
    .expect("confirm");
    settles(&wallet, &suite, "bea", points(), (0, 0)).await;

    // Released by a rollback, or by the sweep when the reservation runs out.
    load(&mut wallet, &suite, "bea", points(), 1_000).await;
    let released = reserve(60).await;
    assert_eq!(
        balance(&mut wallet, &suite, "bea", &points()).await,
        (0, 1_000)
    );
    rollback(&mut c, &suite, &released.id, Vec::new())
        .await
        .expect("rollback");
    settles(&wallet, &suite, "bea", points(), (1_000, 0)).await;
    let lapsed = reserve(1).await;
    assert_eq!(spent(&lapsed, &points()).amount, 1_000);
    settles(&wallet, &suite, "bea", points(), (1_000, 0)).await;

    // Over HTTP: the spends are in the answer; once the points are gone, 422 with the reason.
    load(&mut wallet, &suite, "bea", points(), 500).await;
    let body = serde_json::json!({"checkout": {
        "customer_id": "bea", "program_id": "default", "campaign_ids": ["pwp"],
        "cart": {"currency": "USD", "lines": [
            {"id": "l1", "sku": "SHOE", "quantity": 1, "unit_price": 50_00}]}}});
    let made = suite
        .post("/v1/redemptions", Some("tender-web-1"), &body)
        .await;
    assert_eq!(made.status(), 201);
    let made: serde_json::Value = made.json().await.expect("json");
    assert_eq!(made["spends"][0]["asset"]["kind"], "ASSET_KIND_POINTS");
    assert_eq!(made["spends"][0]["amount"], 1_500);
    assert_eq!(made["outcome"]["tender"], 15_00);
    settles(&wallet, &suite, "bea", points(), (0, 0)).await;
    let refused = suite
        .post("/v1/redemptions", Some("tender-web-2"), &body)
        .await;
    assert_eq!(refused.status(), 422);
    let refused: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(refused["error"]["reason"], "INSUFFICIENT_BALANCE");
    crate::assert_ledger_invariants(&suite).await;
}

async fn concurrent_spends_never_overdraw(suite: TestSuite) {
    let (mut c, mut wallet) = (client(&suite), WalletServiceClient::new(suite.channel()));
    put_campaign(&mut c, &suite, pay_with_points(10_000)).await;
    load(&mut wallet, &suite, "cal", points(), 1_000).await;
    // 20 checkouts at once, each wanting all 1,000 points: one gets them.
    let attempts = (0..20).map(|i| {
        let (mut c, suite) = (c.clone(), &suite);
        async move {
            redeem(
                &mut c,
                suite,
                &key(),
                with_tender("cal", &format!("race-{i}"), &[]),
            )
            .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert_eq!(reason(err), "INSUFFICIENT_BALANCE", "{err:?}");
    }
    settles(&wallet, &suite, "cal", points(), (0, 0)).await;

    // Ten customers race for a budget of one, each paying with points: the losers that held
    // their points before the budget refused them get them back.
    put_campaign(
        &mut c,
        &suite,
        pb::Campaign {
            limits: Some(pb::Limits {
                max_redemptions: 1,
                ..Default::default()
            }),
            ..campaign("first", crate::eligibility::amount_off(1_00))
        },
    )
    .await;
    for i in 0..10 {
        load(&mut wallet, &suite, &format!("r{i}"), points(), 1_000).await;
    }
    let attempts = (0..10).map(|i| {
        let (mut c, suite) = (c.clone(), &suite);
        async move {
            let checkout = pb::Checkout {
                program_id: "default".into(),
                ..checkout(&format!("r{i}"), "", &[], &["first", "pwp"])
            };
            redeem(&mut c, suite, &key(), checkout).await
        }
    });
    let results = futures::future::join_all(attempts).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for (i, r) in results.iter().enumerate() {
        let want = match r {
            Ok(_) => (0, 0),
            Err(e) => {
                assert_eq!(reason(e), "BUDGET_EXHAUSTED", "{e:?}");
                (1_000, 0)
            }
        };
        settles(&wallet, &suite, &format!("r{i}"), points(), want).await;
    }
    crate::assert_ledger_invariants(&suite).await;
}
