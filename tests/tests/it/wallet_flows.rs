//! The wallet's two-phase spends, reversals, transfers, pending credits (cashback's status
//! history), batch credits and liability report. After each scenario the ledger's invariants
//! hold (see `assert_ledger_invariants`).

use std::time::Duration;

use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::wallet::{balance, credit, debit_request, in_future, points};
use crate::{assert_ledger_invariants, events};

backend_tests!(
    holds_capture_release_and_refunds,
    batch_capture_settles_each_hold_on_its_own,
    batch_hold_places_each_hold_on_its_own,
    reversals_refund_debits_and_claw_back_credits,
    transfers_keep_the_senders_expiry,
    pending_cashback_lifecycle,
    batch_credit_posts_all_or_nothing,
    gift_card_expiry_can_be_forbidden,
    concurrent_transfers_holds_and_debits_stay_consistent,
    liability_rolls_up_past_days_and_agrees_with_the_ledger,
);

type Wallet = WalletServiceClient<Channel>;

fn cashback() -> Option<pb::Asset> {
    Some(pb::Asset {
        kind: pb::AssetKind::Cashback as i32,
        code: "EUR".into(),
    })
}

fn field_of(status: &tonic::Status) -> String {
    status.message().to_string()
}

async fn hold(
    wallet: &mut Wallet,
    suite: &TestSuite,
    key: &str,
    customer: &str,
    amount: i64,
    expires_at: Option<prost_types::Timestamp>,
) -> Result<pb::HoldResponse, tonic::Status> {
    wallet
        .hold(suite.ctx(TENANT).request(pb::HoldRequest {
            idempotency_key: key.into(),
            customer_id: customer.into(),
            asset: points(),
            amount,
            reason: "checkout".into(),
            expires_at,
        }))
        .await
        .map(tonic::Response::into_inner)
}

async fn reverse(
    wallet: &mut Wallet,
    suite: &TestSuite,
    key: &str,
    transaction_id: &str,
    amount: i64,
) -> Result<pb::ReverseResponse, tonic::Status> {
    wallet
        .reverse(suite.ctx(TENANT).request(pb::ReverseRequest {
            idempotency_key: key.into(),
            transaction_id: transaction_id.into(),
            amount,
            reason: "order returned".into(),
            customer_id: String::new(),
            ..Default::default()
        }))
        .await
        .map(tonic::Response::into_inner)
}

async fn reverse_hold(
    wallet: &mut Wallet,
    suite: &TestSuite,
    key: &str,
    hold_id: &str,
    amount: i64,
) -> Result<pb::ReverseResponse, tonic::Status> {
    wallet
        .reverse(suite.ctx(TENANT).request(pb::ReverseRequest {
            idempotency_key: key.into(),
            hold_id: hold_id.into(),
            amount,
            reason: "order returned".into(),
            ..Default::default()
        }))
        .await
        .map(tonic::Response::into_inner)
}

async fn holds_capture_release_and_refunds(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let ten_days = Some(in_future(Duration::from_secs(10 * 86_400)));
    credit(&mut wallet, &suite, "c1", "hana", 100, ten_days).await;
    credit(&mut wallet, &suite, "c2", "hana", 100, None).await;

    let held = hold(&mut wallet, &suite, "h1", "hana", 150, None)
        .await
        .unwrap();
    let b = held.balance.unwrap();
    assert_eq!((b.available, b.held, b.expiring_30d), (50, 150, 0));
    let h = held.hold.unwrap();
    assert_eq!(h.status, pb::HoldStatus::Active as i32);
    // Held value is not spendable.
    let refused = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d1", "hana", 60)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // Capture 120 of 150: the first-to-expire value is what is spent, 30 comes back.
    let too_much = wallet
        .capture(suite.ctx(TENANT).request(pb::CaptureRequest {
            idempotency_key: "cap0".into(),
            hold_id: h.id.clone(),
            amount: 151,
        }))
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), tonic::Code::InvalidArgument);
    assert!(field_of(&too_much).contains("amount"), "{too_much:?}");
    let captured = wallet
        .capture(suite.ctx(TENANT).request(pb::CaptureRequest {
            idempotency_key: "cap1".into(),
            hold_id: h.id.clone(),
            amount: 120,
        }))
        .await
        .unwrap()
        .into_inner();
    let settled = captured.hold.unwrap();
    assert_eq!(
        (settled.status, settled.captured),
        (pb::HoldStatus::Captured as i32, 120)
    );
    let b = captured.balance.unwrap();
    assert_eq!((b.available, b.held, b.expiring_30d), (80, 0, 0));
    let again = wallet
        .release(suite.ctx(TENANT).request(pb::ReleaseRequest {
            idempotency_key: "rel0".into(),
            hold_id: h.id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);

    // Refund 20 of the capture, then the rest: lots come back with their own expiry, the
    // latest-to-expire first.
    // The first names the hold instead of its capture (what a service's command outbox sends).
    let capture_id = settled.capture_transaction_id;
    let part = reverse_hold(&mut wallet, &suite, "r1", &h.id, 20)
        .await
        .unwrap();
    assert_eq!(part.transaction.unwrap().amount, 20);
    let b = part.balance.unwrap();
    assert_eq!((b.available, b.expiring_30d), (100, 0));
    let over = reverse(&mut wallet, &suite, "r2", &capture_id, 101)
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument, "{over:?}");
    let rest = reverse(&mut wallet, &suite, "r3", &capture_id, 0)
        .await
        .unwrap();
    let b = rest.balance.unwrap();
    assert_eq!((b.available, b.expiring_30d), (200, 100));
    assert_eq!(rest.transaction.unwrap().amount, 100);
    let done = reverse(&mut wallet, &suite, "r4", &capture_id, 0)
        .await
        .unwrap_err();
    assert_eq!(done.code(), tonic::Code::FailedPrecondition);

    // Release gives everything back; a lapsed hold is released by the sweep.
    let small = hold(&mut wallet, &suite, "h2", "hana", 10, None)
        .await
        .unwrap();
    let small = small.hold.unwrap().id;
    // Its capture cannot be reversed while it is active (the caller retries), nor once it
    // is released.
    let early = reverse_hold(&mut wallet, &suite, "r5", &small, 0)
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable, "{early:?}");
    let released = wallet
        .release(suite.ctx(TENANT).request(pb::ReleaseRequest {
            idempotency_key: "rel1".into(),
            hold_id: small.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.balance.unwrap().available, 200);
    // Releasing it again, under another key, reports it as it stands and moves nothing.
    let twice = wallet
        .release(suite.ctx(TENANT).request(pb::ReleaseRequest {
            idempotency_key: "rel2".into(),
            hold_id: small.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(twice.hold.unwrap().status, pb::HoldStatus::Released as i32);
    assert_eq!(twice.balance.unwrap().available, 200);
    let late = reverse_hold(&mut wallet, &suite, "r6", &small, 0)
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("not captured"), "{late:?}");
    hold(
        &mut wallet,
        &suite,
        "h3",
        "hana",
        30,
        Some(in_future(Duration::from_millis(600))),
    )
    .await
    .unwrap();
    assert_eq!(balance(&mut wallet, &suite, "hana").await.held, 30);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let swept = wallet
        .expire_due(suite.ctx(TENANT).request(pb::ExpireDueRequest {
            idempotency_key: "sweep".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(swept.holds_released, 1);
    let b = balance(&mut wallet, &suite, "hana").await;
    assert_eq!((b.available, b.held), (200, 0));
    let far = hold(
        &mut wallet,
        &suite,
        "h4",
        "hana",
        1,
        Some(in_future(Duration::from_secs(31 * 86_400))),
    )
    .await
    .unwrap_err();
    assert!(field_of(&far).contains("expires_at"), "{far:?}");
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

fn batch(key: &str, captures: &[(&str, i64)]) -> pb::BatchCaptureRequest {
    pb::BatchCaptureRequest {
        idempotency_key: key.into(),
        captures: captures
            .iter()
            .map(|(hold_id, amount)| pb::BatchCaptureEntry {
                hold_id: (*hold_id).into(),
                amount: *amount,
            })
            .collect(),
    }
}

async fn batch_capture_settles_each_hold_on_its_own(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    for (key, customer) in [("c1", "ivo"), ("c2", "jun"), ("c3", "kai")] {
        credit(&mut wallet, &suite, key, customer, 100, None).await;
    }
    let mut held = Vec::new();
    for (key, customer, amount) in [
        ("h1", "ivo", 40),
        ("h2", "ivo", 60),
        ("h3", "jun", 100),
        ("h4", "kai", 50),
        ("h5", "kai", 50),
    ] {
        let h = hold(&mut wallet, &suite, key, customer, amount, None)
            .await
            .unwrap();
        held.push(h.hold.unwrap().id);
    }
    wallet
        .release(suite.ctx(TENANT).request(pb::ReleaseRequest {
            idempotency_key: "rel".into(),
            hold_id: held[4].clone(),
        }))
        .await
        .unwrap();

    // The batch is checked whole: a hold named twice, a bad amount, too many captures.
    let twice = wallet
        .batch_capture(
            suite
                .ctx(TENANT)
                .request(batch("b0", &[(&held[0], 0), (&held[0], 0)])),
        )
        .await
        .unwrap_err();
    assert_eq!(twice.code(), tonic::Code::InvalidArgument);
    assert!(
        field_of(&twice).contains("captures[1].hold_id"),
        "{twice:?}"
    );
    let negative = wallet
        .batch_capture(suite.ctx(TENANT).request(batch("b0", &[(&held[0], -1)])))
        .await
        .unwrap_err();
    assert!(
        field_of(&negative).contains("captures[0].amount"),
        "{negative:?}"
    );
    let ids: Vec<String> = (0..501).map(|i| format!("h{i}")).collect();
    let many: Vec<(&str, i64)> = ids.iter().map(|id| (id.as_str(), 0)).collect();
    let too_many = wallet
        .batch_capture(suite.ctx(TENANT).request(batch("b0", &many)))
        .await
        .unwrap_err();
    assert!(field_of(&too_many).contains("captures"), "{too_many:?}");

    // Each capture stands alone: two of one account (one partial), an amount above its hold,
    // a released hold, an unknown one.
    let outcomes = wallet
        .batch_capture(suite.ctx(TENANT).request(batch(
            "b1",
            &[
                (&held[0], 0),
                (&held[1], 25),
                (&held[2], 101),
                (&held[4], 0),
                ("01900000-0000-7000-8000-000000000000", 0),
            ],
        )))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    let reasons: Vec<&str> = outcomes.iter().map(|o| o.reason.as_str()).collect();
    assert_eq!(
        reasons,
        ["", "", "AMOUNT_ABOVE_HOLD", "HOLD_NOT_ACTIVE", "NOT_FOUND"],
        "{outcomes:?}"
    );
    let captured: Vec<(i32, i64)> = outcomes[..2]
        .iter()
        .map(|o| o.hold.as_ref().map(|h| (h.status, h.captured)).unwrap())
        .collect();
    let done = pb::HoldStatus::Captured as i32;
    assert_eq!(captured, [(done, 40), (done, 25)]);
    assert!(
        outcomes[..2]
            .iter()
            .all(|o| !o.hold.as_ref().unwrap().capture_transaction_id.is_empty())
    );
    assert!(outcomes[4].hold.is_none());
    // ivo: 40 + 25 spent, 35 back; jun's hold is untouched; kai has 50 held still.
    let b = balance(&mut wallet, &suite, "ivo").await;
    assert_eq!((b.available, b.held), (35, 0));
    let b = balance(&mut wallet, &suite, "jun").await;
    assert_eq!((b.available, b.held), (0, 100));

    // Sent again (another key, as after a crash), the captured holds report their capture
    // and move nothing; the others are captured now.
    let again = wallet
        .batch_capture(suite.ctx(TENANT).request(batch(
            "b2",
            &[(&held[0], 0), (&held[1], 25), (&held[2], 0), (&held[3], 0)],
        )))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert!(again.iter().all(|o| o.reason.is_empty()), "{again:?}");
    assert_eq!(
        again[0].hold.as_ref().unwrap().capture_transaction_id,
        outcomes[0].hold.as_ref().unwrap().capture_transaction_id
    );
    assert_eq!(balance(&mut wallet, &suite, "ivo").await.available, 35);
    let b = balance(&mut wallet, &suite, "jun").await;
    assert_eq!((b.available, b.held), (0, 0));
    // A different amount for a captured hold is refused, as a single Capture of it is.
    let other = wallet
        .batch_capture(suite.ctx(TENANT).request(batch("b3", &[(&held[1], 30)])))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert_eq!(other[0].reason, "HOLD_NOT_ACTIVE");
    let single = wallet
        .capture(suite.ctx(TENANT).request(pb::CaptureRequest {
            idempotency_key: "cap".into(),
            hold_id: held[0].clone(),
            amount: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(single.code(), tonic::Code::FailedPrecondition);
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

fn entry(customer: &str, amount: i64) -> pb::BatchHoldEntry {
    pb::BatchHoldEntry {
        customer_id: customer.into(),
        asset: points(),
        amount,
        reason: "checkout".into(),
        expires_at: None,
    }
}

async fn batch_hold_places_each_hold_on_its_own(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let soon = Some(in_future(Duration::from_secs(10 * 86_400)));
    credit(&mut wallet, &suite, "c1", "lea", 50, None).await;
    credit(&mut wallet, &suite, "c2", "lea", 30, soon).await;
    credit(&mut wallet, &suite, "c3", "max", 10, None).await;
    let request = |key: &str, holds: Vec<pb::BatchHoldEntry>| {
        suite.ctx(TENANT).request(pb::BatchHoldRequest {
            idempotency_key: key.into(),
            holds,
        })
    };

    // Checked whole, each field by its place in the batch.
    let bad = wallet
        .batch_hold(request("b0", vec![entry("lea", 10), entry("", 0)]))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    for field in ["holds[1].customer_id", "holds[1].amount"] {
        assert!(field_of(&bad).contains(field), "{field}: {bad:?}");
    }
    let empty = wallet.batch_hold(request("b0", vec![])).await.unwrap_err();
    assert!(field_of(&empty).contains("holds"), "{empty:?}");

    // In order, each on its own: lea's 80 covers 45 then 35 but not 1 more; max has 10;
    // nobody has no account.
    let asked = vec![
        entry("lea", 45),
        entry("max", 11),
        entry("lea", 35),
        entry("lea", 1),
        entry("nobody", 5),
        entry("max", 10),
    ];
    let outcomes = wallet
        .batch_hold(request("b1", asked.clone()))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    let reasons: Vec<&str> = outcomes.iter().map(|o| o.reason.as_str()).collect();
    let no = "INSUFFICIENT_BALANCE";
    assert_eq!(reasons, ["", no, "", no, no, ""], "{outcomes:?}");
    let amounts: Vec<i64> = outcomes
        .iter()
        .map(|o| o.hold.as_ref().map_or(0, |h| h.amount))
        .collect();
    assert_eq!(amounts, [45, 0, 35, 0, 0, 10]);
    let b = balance(&mut wallet, &suite, "lea").await;
    assert_eq!((b.available, b.held), (0, 80));
    // The first hold took the first-to-expire lot: released, its 30 come back with their
    // expiry, and 15 from the other lot.
    let first = outcomes[0].hold.clone().unwrap();
    wallet
        .release(suite.ctx(TENANT).request(pb::ReleaseRequest {
            idempotency_key: "rel".into(),
            hold_id: first.id,
        }))
        .await
        .unwrap();
    let b = balance(&mut wallet, &suite, "lea").await;
    assert_eq!((b.available, b.held, b.expiring_30d), (45, 35, 30));
    // A replay answers the same holds, placing nothing more.
    let replay = wallet
        .batch_hold(request("b1", asked.clone()))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert_eq!(replay, outcomes);
    assert_eq!(balance(&mut wallet, &suite, "max").await.held, 10);
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn reversals_refund_debits_and_claw_back_credits(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let earned = credit(&mut wallet, &suite, "c1", "ines", 100, None).await;
    let spent = wallet
        .debit(suite.ctx(TENANT).request(debit_request("d1", "ines", 30)))
        .await
        .unwrap()
        .into_inner();
    let spent_id = spent.transaction.unwrap().id;
    let refund = reverse(&mut wallet, &suite, "r1", &spent_id, 10)
        .await
        .unwrap();
    let t = refund.transaction.unwrap();
    assert_eq!((t.kind.as_str(), t.amount), ("refund", 10));
    assert_eq!(refund.balance.unwrap().available, 80);
    // A replay returns the stored answer, not a second refund.
    let replay = reverse(&mut wallet, &suite, "r1", &spent_id, 10)
        .await
        .unwrap();
    assert_eq!(replay.transaction.unwrap().id, t.id);

    // Claw back the credit: never below zero.
    let earned_id = earned.transaction.unwrap().id;
    let short = reverse(&mut wallet, &suite, "r2", &earned_id, 0)
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::FailedPrecondition);
    let clawed = reverse(&mut wallet, &suite, "r3", &earned_id, 50)
        .await
        .unwrap();
    let t = clawed.transaction.unwrap();
    assert_eq!((t.kind.as_str(), t.amount), ("clawback", -50));
    assert_eq!(clawed.balance.unwrap().available, 30);

    let not_reversible = reverse(&mut wallet, &suite, "r4", &t.id, 0)
        .await
        .unwrap_err();
    assert_eq!(not_reversible.code(), tonic::Code::FailedPrecondition);
    let unknown = reverse(
        &mut wallet,
        &suite,
        "r5",
        &uuid::Uuid::now_v7().to_string(),
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let bad = wallet
        .reverse(suite.ctx(TENANT).request(pb::ReverseRequest {
            idempotency_key: "r6".into(),
            transaction_id: "nope".into(),
            amount: -1,
            reason: " ".into(),
            customer_id: String::new(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    for field in ["transaction_id", "amount", "reason"] {
        assert!(field_of(&bad).contains(field), "{field}: {bad:?}");
    }
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn transfers_keep_the_senders_expiry(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let ten_days = Some(in_future(Duration::from_secs(10 * 86_400)));
    credit(&mut wallet, &suite, "c1", "ivo", 50, ten_days).await;
    credit(&mut wallet, &suite, "c2", "ivo", 50, None).await;
    let transfer = |key: &str, to: &str, amount: i64| pb::TransferRequest {
        idempotency_key: key.into(),
        from_customer_id: "ivo".into(),
        to_customer_id: to.into(),
        asset: points(),
        amount,
        reason: "gift".into(),
    };
    let moved = wallet
        .transfer(suite.ctx(TENANT).request(transfer("t1", "jon", 70)))
        .await
        .unwrap()
        .into_inner();
    let (from, to) = (moved.from_balance.unwrap(), moved.to_balance.unwrap());
    assert_eq!((from.available, from.expiring_30d), (30, 0));
    assert_eq!((to.available, to.expiring_30d), (70, 50));
    assert_eq!(moved.outgoing.unwrap().kind, "transfer_out");
    assert_eq!(moved.incoming.unwrap().kind, "transfer_in");

    let short = wallet
        .transfer(suite.ctx(TENANT).request(transfer("t2", "jon", 31)))
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::FailedPrecondition);
    let to_self = wallet
        .transfer(suite.ctx(TENANT).request(transfer("t3", "ivo", 1)))
        .await
        .unwrap_err();
    assert_eq!(to_self.code(), tonic::Code::InvalidArgument);
    assert!(field_of(&to_self).contains("to_customer_id"));
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn pending_credit(
    wallet: &mut Wallet,
    suite: &TestSuite,
    key: &str,
    amount: i64,
    activate_at: Option<prost_types::Timestamp>,
) -> String {
    wallet
        .credit(suite.ctx(TENANT).request(pb::CreditRequest {
            idempotency_key: key.into(),
            customer_id: "kai".into(),
            asset: cashback(),
            amount,
            reason: "order 42".into(),
            expires_at: None,
            pending: Some(pb::PendingOptions { activate_at }),
            spent_amount: 0,
            apply_tier_multiplier: false,
        }))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap()
        .id
}

async fn pending_cashback_lifecycle(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let first = pending_credit(&mut wallet, &suite, "p1", 500, None).await;
    let eur = |b: pb::GetBalanceResponse| {
        b.balances
            .into_iter()
            .find(|b| b.asset == cashback())
            .unwrap()
    };
    let get_balance = |wallet: &mut Wallet| {
        let request = suite.ctx(TENANT).request(pb::GetBalanceRequest {
            customer_id: "kai".into(),
        });
        let mut wallet = wallet.clone();
        async move { wallet.get_balance(request).await.unwrap().into_inner() }
    };
    let b = eur(get_balance(&mut wallet).await);
    assert_eq!((b.available, b.pending), (0, 500));

    let confirmed = wallet
        .activate_pending(suite.ctx(TENANT).request(pb::ActivatePendingRequest {
            idempotency_key: "a1".into(),
            credit_id: first.clone(),
            reason: "return window over".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .credit
        .unwrap();
    assert_eq!(confirmed.status, pb::CreditStatus::Confirmed as i32);
    let b = eur(get_balance(&mut wallet).await);
    assert_eq!((b.available, b.pending), (500, 0));
    let twice = wallet
        .activate_pending(suite.ctx(TENANT).request(pb::ActivatePendingRequest {
            idempotency_key: "a2".into(),
            credit_id: first.clone(),
            reason: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition);

    let paid = wallet
        .pay_out_cashback(suite.ctx(TENANT).request(pb::PayOutCashbackRequest {
            idempotency_key: "po1".into(),
            credit_id: first.clone(),
            reason: "bank transfer".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .credit
        .unwrap();
    let history: Vec<i32> = paid.history.iter().map(|h| h.status).collect();
    assert_eq!(
        history,
        [
            pb::CreditStatus::Pending as i32,
            pb::CreditStatus::Confirmed as i32,
            pb::CreditStatus::PaidOut as i32
        ]
    );
    assert!(paid.history.iter().all(|h| !h.principal.is_empty()));
    assert_eq!(eur(get_balance(&mut wallet).await).available, 0);

    // Cancelled in the return window: the reason is mandatory.
    let second = pending_credit(&mut wallet, &suite, "p2", 300, None).await;
    let cancel = |key: &str, reason: &str| pb::CancelPendingRequest {
        idempotency_key: key.into(),
        credit_id: second.clone(),
        reason: reason.into(),
        credit_key: String::new(),
    };
    let no_reason = wallet
        .cancel_pending(suite.ctx(TENANT).request(cancel("x1", "")))
        .await
        .unwrap_err();
    assert!(field_of(&no_reason).contains("reason"), "{no_reason:?}");
    let cancelled = wallet
        .cancel_pending(suite.ctx(TENANT).request(cancel("x2", "order returned")))
        .await
        .unwrap()
        .into_inner()
        .credit
        .unwrap();
    assert_eq!(cancelled.status, pb::CreditStatus::Cancelled as i32);

    // Confirmed by the sweep once its date passes.
    pending_credit(
        &mut wallet,
        &suite,
        "p3",
        300,
        Some(in_future(Duration::from_millis(500))),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let due = wallet
        .activate_due(suite.ctx(TENANT).request(pb::ActivateDueRequest {
            idempotency_key: "due1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(due.activated, 1);
    let b = eur(get_balance(&mut wallet).await);
    assert_eq!((b.available, b.pending), (300, 0));

    let listed = wallet
        .get_cashback_status(suite.ctx(TENANT).request(pb::GetCashbackStatusRequest {
            customer_id: "kai".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let statuses: Vec<i32> = listed.credits.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [
            pb::CreditStatus::Confirmed as i32,
            pb::CreditStatus::Cancelled as i32,
            pb::CreditStatus::PaidOut as i32
        ],
        "newest first"
    );

    let liability = wallet
        .get_liability(
            suite
                .ctx(TENANT)
                .request(pb::GetLiabilityRequest::default()),
        )
        .await
        .unwrap()
        .into_inner();
    let eur = liability
        .assets
        .iter()
        .find(|l| l.asset == cashback())
        .unwrap();
    assert_eq!(
        (eur.outstanding, eur.pending, eur.issued, eur.paid_out),
        (300, 0, 800, 500)
    );
    let changes = eventually(Duration::from_secs(10), "status events", || async {
        let found = events(&suite, TENANT, "cashback.status_changed").await;
        (found.len() == 7).then_some(found)
    })
    .await;
    let mut statuses: Vec<String> = changes
        .iter()
        .map(|e| {
            crate::data(e)["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            "cancelled",
            "confirmed",
            "confirmed",
            "paid_out",
            "pending",
            "pending",
            "pending"
        ]
    );
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn batch_credit_posts_all_or_nothing(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let entry = |customer: &str, amount: i64| pb::BatchCreditEntry {
        customer_id: customer.into(),
        asset: points(),
        amount,
        reason: "campaign".into(),
        expires_at: None,
    };
    let bad = wallet
        .batch_credit(suite.ctx(TENANT).request(pb::BatchCreditRequest {
            idempotency_key: "b0".into(),
            entries: vec![entry("lea", 10), entry("max", 0)],
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(field_of(&bad).contains("entries[1].amount"), "{bad:?}");
    assert_eq!(balance(&mut wallet, &suite, "lea").await.available, 0);

    let request = pb::BatchCreditRequest {
        idempotency_key: "b1".into(),
        entries: vec![entry("lea", 10), entry("max", 20), entry("lea", 5)],
    };
    let done = wallet
        .batch_credit(suite.ctx(TENANT).request(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.transaction_ids.len(), 3);
    let replay = wallet
        .batch_credit(suite.ctx(TENANT).request(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, done);
    assert_eq!(balance(&mut wallet, &suite, "lea").await.available, 15);
    assert_eq!(balance(&mut wallet, &suite, "max").await.available, 20);
    let credited = eventually(Duration::from_secs(10), "batch events", || async {
        let found = events(&suite, TENANT, "points.credited").await;
        (found.len() == 3).then_some(found)
    })
    .await;
    let mut amounts: Vec<i64> = credited
        .iter()
        .map(|e| crate::data(e)["amount"].as_i64().unwrap_or_default())
        .collect();
    amounts.sort_unstable();
    assert_eq!(amounts, [5, 10, 20]);
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn gift_card_expiry_can_be_forbidden(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    let card = || {
        Some(pb::Asset {
            kind: pb::AssetKind::GiftCard as i32,
            code: "GC-1".into(),
        })
    };
    let load = |key: &str, expires_at| pb::CreditRequest {
        idempotency_key: key.into(),
        customer_id: "gus".into(),
        asset: card(),
        amount: 5_000,
        reason: "gift card".into(),
        expires_at,
        ..Default::default()
    };
    let ten_days = Some(in_future(Duration::from_secs(10 * 86_400)));
    let loaded = wallet
        .credit(suite.ctx(TENANT).request(load("g1", ten_days)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loaded.balance.unwrap().expiring_30d, 5_000);

    let rules = wallet
        .set_wallet_rules(suite.ctx(TENANT).request(pb::SetWalletRulesRequest {
            idempotency_key: "r1".into(),
            rules: Some(pb::WalletRules {
                forbid_gift_card_expiry: true,
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(rules.rules.unwrap().forbid_gift_card_expiry);
    // The value already held no longer expires.
    let held = wallet
        .get_balance(suite.ctx(TENANT).request(pb::GetBalanceRequest {
            customer_id: "gus".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert_eq!((held[0].available, held[0].expiring_90d), (5_000, 0));
    let refused = wallet
        .credit(suite.ctx(TENANT).request(load("g2", ten_days)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(field_of(&refused).contains("expires_at"), "{refused:?}");
    wallet
        .credit(suite.ctx(TENANT).request(load("g3", None)))
        .await
        .unwrap();
    let stored = wallet
        .get_wallet_rules(suite.ctx(TENANT).request(pb::GetWalletRulesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(stored.rules.unwrap().forbid_gift_card_expiry);
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

/// Transfers both ways between two members, holds, captures and debits, all at once: no
/// deadlock, no overspend, and the ledger balances.
async fn concurrent_transfers_holds_and_debits_stay_consistent(suite: TestSuite) {
    let mut wallet = WalletServiceClient::new(suite.channel());
    credit(&mut wallet, &suite, "c1", "ada", 1_000, None).await;
    credit(&mut wallet, &suite, "c2", "bob", 1_000, None).await;
    let calls = (0..60).map(|i| {
        let mut wallet = wallet.clone();
        let ctx = suite.ctx(TENANT);
        let (from, to) = if i % 2 == 0 {
            ("ada", "bob")
        } else {
            ("bob", "ada")
        };
        async move {
            let outcome = match i % 3 {
                0 => wallet
                    .transfer(ctx.request(pb::TransferRequest {
                        idempotency_key: format!("t{i}"),
                        from_customer_id: from.into(),
                        to_customer_id: to.into(),
                        asset: points(),
                        amount: 40,
                        reason: "race".into(),
                    }))
                    .await
                    .map(|_| ()),
                1 => {
                    let held = wallet
                        .hold(ctx.request(pb::HoldRequest {
                            idempotency_key: format!("h{i}"),
                            customer_id: from.into(),
                            asset: points(),
                            amount: 30,
                            reason: "race".into(),
                            expires_at: None,
                        }))
                        .await;
                    match held {
                        Ok(h) => wallet
                            .capture(ctx.request(pb::CaptureRequest {
                                idempotency_key: format!("cap{i}"),
                                hold_id: h.into_inner().hold.unwrap().id,
                                amount: 20,
                            }))
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    }
                }
                _ => wallet
                    .debit(ctx.request(debit_request(&format!("d{i}"), from, 25)))
                    .await
                    .map(|_| ()),
            };
            outcome.map_err(|s| s.code())
        }
    });
    let outcomes = futures::future::join_all(calls).await;
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_ok() || *o == Err(tonic::Code::FailedPrecondition)),
        "{outcomes:?}"
    );
    let total = balance(&mut wallet, &suite, "ada").await.available
        + balance(&mut wallet, &suite, "bob").await.available;
    let spent: i64 = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.is_ok())
        .map(|(i, _)| match i % 3 {
            0 => 0,
            1 => 20,
            _ => 25,
        })
        .sum();
    assert_eq!(total, 2_000 - spent, "value is conserved");
    assert_ledger_invariants(&suite).await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

/// The liability report reads rolled-up days plus live postings: over ranges that start and
/// end inside rolled days, inside the open day and at the edges, it gives what the postings
/// say, the first time (rolling up) and again (reading the rolled days).
async fn liability_rolls_up_past_days_and_agrees_with_the_ledger(suite: TestSuite) {
    use sea_orm::ConnectionTrait;
    const HOUR: i64 = 3_600 * 1_000_000;
    const DAY: i64 = 24 * HOUR;
    let mut wallet = WalletServiceClient::new(suite.channel());
    let now = tessera_store::now_micros();
    let ana = credit(&mut wallet, &suite, "l1", "ana", 100, None).await;
    let bo = credit(&mut wallet, &suite, "l2", "bo", 50, None).await;
    let spent = wallet
        .debit(suite.ctx(TENANT).request(debit_request("l3", "ana", 30)))
        .await
        .unwrap()
        .into_inner();
    credit(&mut wallet, &suite, "l4", "ana", 20, None).await;
    // Move the first three into the past: ten days, three days, two days and five hours.
    let db = suite.db("wallet").await;
    let conn = db.conn();
    for (tx, age) in [
        (ana.transaction.unwrap().id, 10 * DAY),
        (bo.transaction.unwrap().id, 3 * DAY),
        (spent.transaction.unwrap().id, 2 * DAY + 5 * HOUR),
    ] {
        conn.execute_raw(tessera_store::stmt(
            conn,
            "UPDATE postings SET created_at = created_at - $1 WHERE tenant_id = $2 \
             AND transaction_id = $3",
            [age.into(), TENANT.into(), tx.into()],
        ))
        .await
        .unwrap();
    }
    let at = |micros: i64| Some(tessera_store::outbox::micros_to_timestamp(micros));
    // (from, until) → (outstanding at until, issued, redeemed within).
    let cases = [
        (None, None, (140, 170, 30)),
        (at(now - 5 * DAY), None, (140, 70, 30)),
        (at(now - 5 * DAY / 2), at(now - DAY), (120, 0, 30)),
        (None, at(now - 4 * DAY), (100, 100, 0)),
        (
            at(now - 10 * DAY - HOUR),
            at(now - 10 * DAY + HOUR),
            (100, 100, 0),
        ),
    ];
    for round in ["rolling up", "rolled"] {
        for (from, until, want) in &cases {
            let report = wallet
                .get_liability(suite.ctx(TENANT).request(pb::GetLiabilityRequest {
                    from: *from,
                    until: *until,
                }))
                .await
                .unwrap()
                .into_inner();
            let pts = report
                .assets
                .iter()
                .find(|l| l.asset == points())
                .expect("points");
            assert_eq!(
                (pts.outstanding, pts.issued, pts.redeemed),
                *want,
                "{round}: {from:?}..{until:?}"
            );
        }
    }
    let rolled = tessera_tests::scalar(
        &db,
        "SELECT COUNT(*) FROM liability_days WHERE tenant_id = $1",
        vec![TENANT.into()],
    )
    .await;
    assert!(rolled >= 3, "past days are rolled up ({rolled})");
    assert_ledger_invariants(&suite).await;
    suite.cleanup().await;
}
