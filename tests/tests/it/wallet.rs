//! The wallet's lots: debits spend first-to-expire value first and never overdraw (also under
//! 200 concurrent debits), expired value is never spendable and the sweep moves it to the
//! expiry account, programmes validate their calendar. After each scenario the ledger's
//! invariants hold: postings sum to zero, and every customer balance equals its postings and
//! the remaining value of its lots.

use std::time::Duration;

use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::{assert_ledger_invariants, events};

backend_tests!(
    debits_spend_first_to_expire_and_never_overdraw,
    concurrent_debits_never_overspend,
    expired_value_is_never_spendable_and_is_swept,
    programmes_are_validated,
    adjustments_and_history,
);

pub(crate) fn points() -> Option<pb::Asset> {
    Some(pb::Asset {
        kind: pb::AssetKind::Points as i32,
        code: "default".into(),
    })
}

pub(crate) fn in_future(d: Duration) -> prost_types::Timestamp {
    let t = std::time::SystemTime::now() + d;
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

pub(crate) async fn credit(
    wallet: &mut WalletServiceClient<Channel>,
    suite: &TestSuite,
    key: &str,
    customer: &str,
    amount: i64,
    expires_at: Option<prost_types::Timestamp>,
) -> pb::CreditResponse {
    wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: key.into(),
            customer_id: customer.into(),
            asset: points(),
            amount,
            reason: "test".into(),
            expires_at,
            pending: None,
            spent_amount: 0,
            apply_tier_multiplier: false,
        }))
        .await
        .expect("credit")
        .into_inner()
}

pub(crate) fn debit_request(key: &str, customer: &str, amount: i64) -> pb::DebitRequest {
    pb::DebitRequest {
        idempotency_key: key.into(),
        customer_id: customer.into(),
        asset: points(),
        amount,
        reason: "spend".into(),
    }
}

pub(crate) async fn balance(
    wallet: &mut WalletServiceClient<Channel>,
    suite: &TestSuite,
    customer: &str,
) -> pb::Balance {
    wallet
        .get_balance(suite.ctx(TENANT).request(pb::GetBalanceRequest {
            customer_id: customer.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balances
        .into_iter()
        .next()
        .unwrap_or_default()
}

async fn debits_spend_first_to_expire_and_never_overdraw(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    // A never-expiring lot first, then one expiring in 10 days.
    credit(&mut wallet, &suite, "c1", "nia", 100, None).await;
    credit(
        &mut wallet,
        &suite,
        "c2",
        "nia",
        100,
        Some(in_future(Duration::from_secs(10 * 86_400))),
    )
    .await;
    let before = balance(&mut wallet, &suite, "nia").await;
    assert_eq!((before.available, before.expiring_30d), (200, 100));

    let spent = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d1", "nia", 150)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spent.transaction.unwrap().amount, -150);
    let after = spent.balance.unwrap();
    // The expiring lot went first: nothing of it is left to expire.
    assert_eq!(
        (after.available, after.expiring_30d, after.expiring_90d),
        (50, 0, 0)
    );

    let refused = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d2", "nia", 51)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("insufficient"),
        "{}",
        refused.message()
    );
    let unknown = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d3", "nobody", 1)))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::FailedPrecondition);
    // A replay of the refused debit gets the same answer, not a second attempt.
    let replay = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d2", "nia", 51)))
        .await
        .unwrap_err();
    assert_eq!(replay.code(), tonic::Code::FailedPrecondition);
    assert_eq!(balance(&mut wallet, &suite, "nia").await.available, 50);
    assert_ledger_invariants(&suite).await;
    suite.cleanup().await;
}

async fn concurrent_debits_never_overspend(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    credit(&mut wallet, &suite, "c", "otto", 1_000, None).await;
    let outcomes = futures::future::join_all((0..200).map(|i| {
        let mut wallet = wallet.clone();
        let request = suite
            .ctx(TENANT)
            .request(debit_request(&format!("race-{i}"), "otto", 10));
        async move {
            wallet
                .debit(request)
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    }))
    .await;
    let succeeded = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|o| **o == Err(tonic::Code::FailedPrecondition))
        .count();
    assert_eq!((succeeded, refused), (100, 100), "{outcomes:?}");
    assert_eq!(balance(&mut wallet, &suite, "otto").await.available, 0);
    assert_ledger_invariants(&suite).await;
    suite.cleanup().await;
}

async fn expired_value_is_never_spendable_and_is_swept(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    credit(
        &mut wallet,
        &suite,
        "c1",
        "pia",
        40,
        Some(in_future(Duration::from_millis(800))),
    )
    .await;
    credit(&mut wallet, &suite, "c2", "pia", 60, None).await;
    assert_eq!(balance(&mut wallet, &suite, "pia").await.available, 100);
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // Expired but not yet swept: not available, not spendable.
    assert_eq!(balance(&mut wallet, &suite, "pia").await.available, 60);
    let refused = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d1", "pia", 61)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let swept = wallet
        .expire_due(suite.ctx(TENANT).request(pb::ExpireDueRequest {
            idempotency_key: "sweep-1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (swept.lots_expired, swept.accounts, swept.amount_expired),
        (1, 1, 40)
    );
    let again = wallet
        .expire_due(suite.ctx(TENANT).request(pb::ExpireDueRequest {
            idempotency_key: "sweep-2".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.lots_expired, 0, "a second sweep finds nothing");
    assert_eq!(balance(&mut wallet, &suite, "pia").await.available, 60);
    assert_ledger_invariants(&suite).await;
    let expired = eventually(Duration::from_secs(10), "points.expired", || async {
        let found = events(&suite, TENANT, "points.expired").await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(crate::data(&expired[0])["amount"], 40);

    // Value expiring within a week is announced once (`points.expiring`); later value not yet.
    credit(
        &mut wallet,
        &suite,
        "c4",
        "pia",
        30,
        Some(in_future(Duration::from_secs(3 * 86_400))),
    )
    .await;
    credit(
        &mut wallet,
        &suite,
        "c5",
        "pia",
        20,
        Some(in_future(Duration::from_secs(30 * 86_400))),
    )
    .await;
    for sweep in ["sweep-3", "sweep-4"] {
        wallet
            .expire_due(suite.ctx(TENANT).request(pb::ExpireDueRequest {
                idempotency_key: sweep.into(),
            }))
            .await
            .unwrap();
    }
    // (The 40 that expired above may have been announced too, by a sweep that ran in its
    // last second: only the later lots are counted here.)
    let near = |found: &[tessera_proto::notification::v1::Event]| {
        found
            .iter()
            .map(crate::data)
            .filter(|d| d["amount"] != 40)
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "points.expiring", || async {
        let found = events(&suite, TENANT, "points.expiring").await;
        (!near(&found).is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let notices = near(&events(&suite, TENANT, "points.expiring").await);
    assert_eq!(
        notices.len(),
        1,
        "announced once, the 30-day lot not yet: {notices:?}"
    );
    assert_eq!(
        (&notices[0]["amount"], &notices[0]["lots"]),
        (&serde_json::json!(30), &serde_json::json!(1))
    );
    crate::check_catalogue(&suite, TENANT).await;

    let past = wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: "c3".into(),
            customer_id: "pia".into(),
            asset: points(),
            amount: 5,
            reason: String::new(),
            expires_at: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            pending: None,
            spent_amount: 0,
            apply_tier_multiplier: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(past.code(), tonic::Code::InvalidArgument);
    assert!(past.message().contains("expires_at"), "{}", past.message());
    suite.cleanup().await;
}

async fn programmes_are_validated(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let program = |tz: &str, policy| pb::Program {
        id: "gold".into(),
        time_zone: tz.into(),
        expiry: Some(pb::ExpiryPolicy {
            policy: Some(policy),
        }),
        tiers: None,
    };
    let quarterly = pb::expiry_policy::Policy::EndOfPeriod(pb::EndOfPeriod {
        period: pb::Period::Quarter as i32,
        count: 8,
    });
    let bad = wallet
        .upsert_program(suite.ctx(TENANT).request(pb::UpsertProgramRequest {
            idempotency_key: "p1".into(),
            program: Some(program(
                "Mars/Olympus",
                pb::expiry_policy::Policy::AfterDays(0),
            )),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("program.time_zone") && bad.message().contains("program.expiry"),
        "{}",
        bad.message()
    );

    let stored = wallet
        .upsert_program(suite.ctx(TENANT).request(pb::UpsertProgramRequest {
            idempotency_key: "p2".into(),
            program: Some(program("Europe/Rome", quarterly.clone())),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stored.program,
        Some(program("Europe/Rome", quarterly.clone()))
    );
    let read = wallet
        .get_program(
            suite
                .ctx(TENANT)
                .request(pb::GetProgramRequest { id: "gold".into() }),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.program, Some(program("Europe/Rome", quarterly)));
    let missing = wallet
        .get_program(
            suite
                .ctx("other")
                .request(pb::GetProgramRequest { id: "gold".into() }),
        )
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        tonic::Code::NotFound,
        "programmes are tenant-scoped"
    );

    // A credit to the quarterly programme expires at the end of the quarter 8 quarters on:
    // well beyond 90 days, so nothing shows as expiring soon.
    let credited = wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: "c-gold".into(),
            customer_id: "quinn".into(),
            asset: Some(pb::Asset {
                kind: pb::AssetKind::Points as i32,
                code: "gold".into(),
            }),
            amount: 70,
            reason: String::new(),
            expires_at: None,
            pending: None,
            spent_amount: 0,
            apply_tier_multiplier: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let b = credited.balance.unwrap();
    assert_eq!((b.available, b.expiring_90d), (70, 0));
    suite.cleanup().await;
}

async fn adjustments_and_history(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    credit(&mut wallet, &suite, "c1", "rex", 100, None).await;
    wallet
        .debit(suite.ctx(TENANT).request(debit_request("d1", "rex", 30)))
        .await
        .unwrap();
    let adjust = |key: &str, amount: i64, reason: &str| {
        suite.ctx(TENANT).request(pb::AdjustRequest {
            idempotency_key: key.into(),
            customer_id: "rex".into(),
            asset: points(),
            amount,
            reason: reason.into(),
        })
    };
    let down = wallet
        .adjust(adjust("a1", -20, "duplicate order"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(down.balance.unwrap().available, 50);
    let up = wallet
        .adjust(adjust("a2", 5, "sorry for the delay"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.transaction.as_ref().unwrap().kind, "adjustment");
    assert_eq!(up.balance.unwrap().available, 55);
    let zero = wallet.adjust(adjust("a3", 0, "x")).await.unwrap_err();
    assert!(zero.message().contains("amount"), "{}", zero.message());
    let no_reason = wallet.adjust(adjust("a4", 5, "  ")).await.unwrap_err();
    assert_eq!(no_reason.code(), tonic::Code::InvalidArgument);
    assert!(
        no_reason.message().contains("reason"),
        "{}",
        no_reason.message()
    );
    let overdraw = wallet
        .adjust(adjust("a5", -1_000, "typo"))
        .await
        .unwrap_err();
    assert_eq!(overdraw.code(), tonic::Code::FailedPrecondition);

    let list = |kind: &str, starting_after: String| {
        suite.ctx(TENANT).request(pb::ListTransactionsRequest {
            customer_id: "rex".into(),
            asset: None,
            kind: kind.into(),
            from: None,
            until: None,
            page: Some(tessera_proto::common::v1::PageRequest {
                limit: 2,
                starting_after,
            }),
        })
    };
    let first = wallet
        .list_transactions(list("", String::new()))
        .await
        .unwrap()
        .into_inner();
    let amounts: Vec<i64> = first.transactions.iter().map(|t| t.amount).collect();
    assert_eq!(amounts, vec![5, -20], "newest first");
    let page = first.page.unwrap();
    assert!(page.has_more);
    let second = wallet
        .list_transactions(list("", page.next_cursor))
        .await
        .unwrap()
        .into_inner();
    let amounts: Vec<i64> = second.transactions.iter().map(|t| t.amount).collect();
    assert_eq!(amounts, vec![-30, 100]);
    assert!(!second.page.unwrap().has_more);
    let adjustments = wallet
        .list_transactions(list("adjustment", String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adjustments.transactions.len(), 2);
    let other_tenant = wallet
        .list_transactions(suite.ctx("other").request(pb::ListTransactionsRequest {
            customer_id: "rex".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        other_tenant.transactions.is_empty(),
        "history is tenant-scoped"
    );
    assert_ledger_invariants(&suite).await;
    suite.cleanup().await;
}
