//! Tiers: members move up by points earned in a rolling window (never by balance), earn at
//! their tier's rate when a credit asks for it, keep points longer at higher tiers, and move
//! down only after the window has moved on and the grace period has passed. Every change is
//! in the history and emitted as `tier.changed`. There is no controllable clock yet, so the
//! test moves time by back-dating the stored activity and grace dates.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_store::stmt;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually, scalar};

use crate::{assert_ledger_invariants, events};

backend_tests!(tiers_move_by_activity_with_grace);

const DAY: i64 = 86_400 * 1_000_000;

fn level(id: &str, threshold: i64, permille: u32, extension_days: u32) -> pb::Tier {
    pb::Tier {
        id: id.into(),
        name: id.to_uppercase(),
        threshold,
        earn_multiplier_permille: permille,
        expiry_extension_days: extension_days,
    }
}

fn club(levels: Vec<pb::Tier>) -> pb::Program {
    pb::Program {
        id: "club".into(),
        time_zone: "UTC".into(),
        expiry: Some(pb::ExpiryPolicy {
            policy: Some(pb::expiry_policy::Policy::AfterDays(365)),
        }),
        tiers: Some(pb::TierPolicy {
            basis: pb::TierBasis::PointsEarned as i32,
            window_days: 365,
            grace_days: 30,
            levels,
        }),
    }
}

async fn earn(
    wallet: &mut WalletServiceClient<Channel>,
    suite: &TestSuite,
    key: &str,
    amount: i64,
    multiplied: bool,
) -> pb::Transaction {
    wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: key.into(),
            customer_id: "tom".into(),
            asset: Some(pb::Asset {
                kind: pb::AssetKind::Points as i32,
                code: "club".into(),
            }),
            amount,
            reason: "purchase".into(),
            apply_tier_multiplier: multiplied,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap()
}

async fn tier(wallet: &mut WalletServiceClient<Channel>, suite: &TestSuite) -> pb::GetTierResponse {
    wallet
        .get_tier(suite.ctx(TENANT).request(pb::GetTierRequest {
            customer_id: "tom".into(),
            program_id: "club".into(),
        }))
        .await
        .unwrap()
        .into_inner()
}

async fn evaluate(
    wallet: &mut WalletServiceClient<Channel>,
    suite: &TestSuite,
    key: &str,
) -> pb::EvaluateTiersResponse {
    wallet
        .evaluate_tiers(suite.ctx(TENANT).request(pb::EvaluateTiersRequest {
            idempotency_key: key.into(),
            program_id: "club".into(),
        }))
        .await
        .unwrap()
        .into_inner()
}

async fn tiers_move_by_activity_with_grace(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let bad = wallet
        .upsert_program(suite.ctx(TENANT).request(pb::UpsertProgramRequest {
            idempotency_key: "p0".into(),
            program: Some(club(vec![
                level("base", 5, 1000, 0),
                level("silver", 5, 900, 0),
            ])),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    for field in [
        "program.tiers.levels[0].threshold",
        "program.tiers.levels[1].threshold",
        "program.tiers.levels[1].earn_multiplier_permille",
    ] {
        assert!(bad.message().contains(field), "{field}: {bad:?}");
    }
    wallet
        .upsert_program(suite.ctx(TENANT).request(pb::UpsertProgramRequest {
            idempotency_key: "p1".into(),
            program: Some(club(vec![
                level("base", 0, 1000, 0),
                level("silver", 100, 1500, 30),
                level("gold", 300, 2000, 90),
            ])),
        }))
        .await
        .unwrap();

    earn(&mut wallet, &suite, "e1", 60, false).await;
    let t = tier(&mut wallet, &suite).await;
    assert_eq!(t.tier.unwrap().id, "base");
    assert_eq!((t.qualifying, t.to_next_tier), (60, 40));
    assert_eq!(t.next_tier.unwrap().id, "silver");

    // 110 earned in the window: silver, at once.
    earn(&mut wallet, &suite, "e2", 50, false).await;
    let t = tier(&mut wallet, &suite).await;
    assert_eq!(t.tier.unwrap().id, "silver");
    assert!(t.since.is_some() && t.grace_until.is_none());

    // Silver earns x1.5 when asked, and its points live 30 days longer.
    let boosted = earn(&mut wallet, &suite, "e3", 10, true).await;
    assert_eq!(boosted.amount, 15);
    let db = suite.db("wallet").await;
    let extension = scalar(
        &db,
        "SELECT MAX(expires_at) - MIN(expires_at) FROM lots WHERE tenant_id = $1",
        vec![TENANT.into()],
    )
    .await;
    // Expiry ends at the close of a day: lots earned seconds apart share their base day.
    assert_eq!(extension, 30 * DAY);

    // A year later nothing qualifies any more: silver is kept through the grace period...
    db.conn()
        .execute_raw(stmt(
            db.conn(),
            "UPDATE tier_activity SET at = at - $1 WHERE tenant_id = $2",
            [(400 * DAY).into(), TENANT.into()],
        ))
        .await
        .unwrap();
    let run = evaluate(&mut wallet, &suite, "ev1").await;
    assert_eq!((run.evaluated, run.changed), (1, 0));
    let t = tier(&mut wallet, &suite).await;
    assert_eq!((t.tier.unwrap().id.as_str(), t.qualifying), ("silver", 0));
    assert!(t.grace_until.is_some());

    // ...and lost once it has passed.
    db.conn()
        .execute_raw(stmt(
            db.conn(),
            "UPDATE member_tiers SET grace_until = 1 WHERE tenant_id = $1",
            [TENANT.into()],
        ))
        .await
        .unwrap();
    let run = evaluate(&mut wallet, &suite, "ev2").await;
    assert_eq!((run.evaluated, run.changed), (1, 1));
    assert_eq!(tier(&mut wallet, &suite).await.tier.unwrap().id, "base");

    let history = wallet
        .list_tier_history(suite.ctx(TENANT).request(pb::ListTierHistoryRequest {
            customer_id: "tom".into(),
            program_id: "club".into(),
            page: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .changes;
    let moves: Vec<(&str, &str, &str)> = history
        .iter()
        .map(|c| {
            (
                c.from_tier.as_str(),
                c.to_tier.as_str(),
                c.direction.as_str(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        [
            ("silver", "base", "downgrade"),
            ("base", "silver", "upgrade")
        ]
    );
    let changed = eventually(Duration::from_secs(10), "tier events", || async {
        let found = events(&suite, TENANT, "tier.changed").await;
        (found.len() == 2).then_some(found)
    })
    .await;
    let mut moves: Vec<String> = changed
        .iter()
        .map(|e| {
            let d = crate::data(e);
            format!(
                "{}->{}",
                d["from_tier"].as_str().unwrap_or_default(),
                d["to_tier"].as_str().unwrap_or_default()
            )
        })
        .collect();
    moves.sort();
    assert_eq!(moves, ["base->silver", "silver->base"]);

    let over_http: serde_json::Value = suite
        .get("/v1/customers/tom/wallet/tier?program=club")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(over_http["tier"]["id"], "base");
    assert_eq!(over_http["next_tier"]["id"], "silver");
    assert_eq!(over_http["history"][0]["direction"], "downgrade");
    let missing = suite.get("/v1/customers/tom/wallet/tier").await;
    assert_eq!(missing.status(), 404, "the default programme has no tiers");

    let untiered = wallet
        .get_tier(suite.ctx(TENANT).request(pb::GetTierRequest {
            customer_id: "tom".into(),
            program_id: "default".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(untiered.code(), tonic::Code::NotFound);
    let cashback_spend = wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: "e4".into(),
            customer_id: "tom".into(),
            asset: Some(pb::Asset {
                kind: pb::AssetKind::Cashback as i32,
                code: "EUR".into(),
            }),
            amount: 5,
            spent_amount: 100,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        cashback_spend.message().contains("spent_amount"),
        "{cashback_spend:?}"
    );
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}
