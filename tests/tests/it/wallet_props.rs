//! Property test of the ledger: random sequences of credit, debit, hold, capture, release,
//! reverse, transfer, expire, adjust and pending credits over three members, through gRPC,
//! on SQLite and PostgreSQL. After every step the ledger's invariants hold (see
//! `assert_tenant_ledger`), and no operation fails with anything but a refusal.
//!
//! Seeded and replayable: `TESSERA_PROPTEST_SEED` (a u64) picks the sequences,
//! `TESSERA_PROPTEST_CASES` how many (default 150 per backend, 1,000 with `TESSERA_TEST_FULL=1`). A failure prints the seed
//! and the shrunk sequence. Each case runs in its own tenant, so the checks stay local.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TestSuite, backend_tests};

use crate::assert_tenant_ledger;
use crate::wallet::{in_future, points};

backend_tests!(ledger_invariants_hold_after_every_step);

const MEMBERS: [&str; 3] = ["ana", "ben", "cai"];

#[derive(Debug, Clone)]
enum Op {
    /// expiry: 0 none, 1 in ten days, 2 in 100 ms (so sweeps find due lots).
    Credit {
        who: usize,
        amount: i64,
        expiry: u8,
    },
    Debit {
        who: usize,
        amount: i64,
    },
    Hold {
        who: usize,
        amount: i64,
    },
    Capture {
        hold: usize,
        amount: i64,
    },
    Release {
        hold: usize,
    },
    Reverse {
        transaction: usize,
        amount: i64,
    },
    Transfer {
        from: usize,
        to: usize,
        amount: i64,
    },
    Expire,
    Adjust {
        who: usize,
        amount: i64,
    },
    Pending {
        who: usize,
        amount: i64,
    },
    Activate {
        credit: usize,
    },
    Cancel {
        credit: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let who = 0..MEMBERS.len();
    let amount = 1i64..150;
    prop_oneof![
        3 => (who.clone(), amount.clone(), 0u8..3)
            .prop_map(|(who, amount, expiry)| Op::Credit { who, amount, expiry }),
        2 => (who.clone(), amount.clone()).prop_map(|(who, amount)| Op::Debit { who, amount }),
        2 => (who.clone(), amount.clone()).prop_map(|(who, amount)| Op::Hold { who, amount }),
        1 => (any::<usize>(), 0i64..150).prop_map(|(hold, amount)| Op::Capture { hold, amount }),
        1 => any::<usize>().prop_map(|hold| Op::Release { hold }),
        2 => (any::<usize>(), 0i64..100)
            .prop_map(|(transaction, amount)| Op::Reverse { transaction, amount }),
        1 => (who.clone(), who.clone(), amount.clone())
            .prop_map(|(from, to, amount)| Op::Transfer { from, to, amount }),
        1 => Just(Op::Expire),
        1 => (who.clone(), -100i64..100)
            .prop_map(|(who, amount)| Op::Adjust { who, amount: if amount == 0 { 1 } else { amount } }),
        1 => (who.clone(), amount).prop_map(|(who, amount)| Op::Pending { who, amount }),
        1 => any::<usize>().prop_map(|credit| Op::Activate { credit }),
        1 => any::<usize>().prop_map(|credit| Op::Cancel { credit }),
    ]
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a case has created so far, for later operations to refer to.
#[derive(Default)]
struct Made {
    holds: Vec<String>,
    reversible: Vec<String>,
    pending: Vec<String>,
}

fn pick(list: &[String], i: usize) -> Option<String> {
    (!list.is_empty()).then(|| list[i % list.len()].clone())
}

async fn step(
    wallet: &mut WalletServiceClient<Channel>,
    suite: &TestSuite,
    tenant: &str,
    key: String,
    op: &Op,
    made: &mut Made,
) -> Result<(), tonic::Status> {
    let ctx = suite.ctx(tenant);
    match *op {
        Op::Credit {
            who,
            amount,
            expiry,
        } => {
            let expires_at = match expiry {
                0 => None,
                1 => Some(in_future(Duration::from_secs(10 * 86_400))),
                _ => Some(in_future(Duration::from_millis(100))),
            };
            let r = wallet
                .credit(ctx.request(pb::CreditRequest {
                    idempotency_key: key,
                    customer_id: MEMBERS[who].into(),
                    asset: points(),
                    amount,
                    reason: "prop".into(),
                    expires_at,
                    pending: None,
                    spent_amount: 0,
                    apply_tier_multiplier: false,
                }))
                .await?;
            made.reversible
                .push(r.into_inner().transaction.unwrap_or_default().id);
        }
        Op::Debit { who, amount } => {
            let r = wallet
                .debit(ctx.request(pb::DebitRequest {
                    idempotency_key: key,
                    customer_id: MEMBERS[who].into(),
                    asset: points(),
                    amount,
                    reason: "prop".into(),
                }))
                .await?;
            made.reversible
                .push(r.into_inner().transaction.unwrap_or_default().id);
        }
        Op::Hold { who, amount } => {
            let r = wallet
                .hold(ctx.request(pb::HoldRequest {
                    idempotency_key: key,
                    customer_id: MEMBERS[who].into(),
                    asset: points(),
                    amount,
                    reason: "prop".into(),
                    expires_at: None,
                }))
                .await?;
            made.holds.push(r.into_inner().hold.unwrap_or_default().id);
        }
        Op::Capture { hold, amount } => {
            let Some(hold_id) = pick(&made.holds, hold) else {
                return Ok(());
            };
            let r = wallet
                .capture(ctx.request(pb::CaptureRequest {
                    idempotency_key: key,
                    hold_id,
                    amount,
                }))
                .await?;
            made.reversible.push(
                r.into_inner()
                    .hold
                    .unwrap_or_default()
                    .capture_transaction_id,
            );
        }
        Op::Release { hold } => {
            let Some(hold_id) = pick(&made.holds, hold) else {
                return Ok(());
            };
            wallet
                .release(ctx.request(pb::ReleaseRequest {
                    idempotency_key: key,
                    hold_id,
                }))
                .await?;
        }
        Op::Reverse {
            transaction,
            amount,
        } => {
            let Some(transaction_id) = pick(&made.reversible, transaction) else {
                return Ok(());
            };
            wallet
                .reverse(ctx.request(pb::ReverseRequest {
                    idempotency_key: key,
                    transaction_id,
                    amount,
                    reason: "prop".into(),
                    customer_id: String::new(),
                    ..Default::default()
                }))
                .await?;
        }
        Op::Transfer { from, to, amount } => {
            if from == to {
                return Ok(());
            }
            wallet
                .transfer(ctx.request(pb::TransferRequest {
                    idempotency_key: key,
                    from_customer_id: MEMBERS[from].into(),
                    to_customer_id: MEMBERS[to].into(),
                    asset: points(),
                    amount,
                    reason: "prop".into(),
                }))
                .await?;
        }
        Op::Expire => {
            wallet
                .expire_due(ctx.request(pb::ExpireDueRequest {
                    idempotency_key: key,
                }))
                .await?;
        }
        Op::Adjust { who, amount } => {
            wallet
                .adjust(ctx.request(pb::AdjustRequest {
                    idempotency_key: key,
                    customer_id: MEMBERS[who].into(),
                    asset: points(),
                    amount,
                    reason: "prop".into(),
                }))
                .await?;
        }
        Op::Pending { who, amount } => {
            let r = wallet
                .credit(ctx.request(pb::CreditRequest {
                    idempotency_key: key,
                    customer_id: MEMBERS[who].into(),
                    asset: points(),
                    amount,
                    reason: "prop".into(),
                    expires_at: None,
                    pending: Some(pb::PendingOptions { activate_at: None }),
                    spent_amount: 0,
                    apply_tier_multiplier: false,
                }))
                .await?;
            made.pending
                .push(r.into_inner().transaction.unwrap_or_default().id);
        }
        Op::Activate { credit } => {
            let Some(credit_id) = pick(&made.pending, credit) else {
                return Ok(());
            };
            wallet
                .activate_pending(ctx.request(pb::ActivatePendingRequest {
                    idempotency_key: key,
                    credit_id,
                    reason: String::new(),
                }))
                .await?;
        }
        Op::Cancel { credit } => {
            let Some(credit_id) = pick(&made.pending, credit) else {
                return Ok(());
            };
            wallet
                .cancel_pending(ctx.request(pb::CancelPendingRequest {
                    idempotency_key: key,
                    credit_id,
                    reason: "prop".into(),
                    credit_key: String::new(),
                }))
                .await?;
        }
    }
    Ok(())
}

async fn ledger_invariants_hold_after_every_step(suite: TestSuite) {
    let seed = env_u64("TESSERA_PROPTEST_SEED", 0x7e55_e2a0);
    let default_cases = if tessera_tests::full_size() {
        1_000
    } else {
        150
    };
    let cases = env_u64("TESSERA_PROPTEST_CASES", default_cases) as u32;
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 200,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let db = suite.db("wallet").await;
    let wallet = WalletServiceClient::new(suite.channel());
    let handle = tokio::runtime::Handle::current();
    let case = std::sync::atomic::AtomicU64::new(0);
    let result = tokio::task::block_in_place(|| {
        runner.run(&prop::collection::vec(op(), 1..10), |ops| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let tenant = format!("prop-{n}");
            let (mut wallet, suite, db) = (wallet.clone(), &suite, &db);
            handle.block_on(async move {
                let mut made = Made::default();
                for (i, op) in ops.iter().enumerate() {
                    let outcome =
                        step(&mut wallet, suite, &tenant, format!("k{i}"), op, &mut made).await;
                    if let Err(status) = outcome
                        && !matches!(
                            status.code(),
                            tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                        )
                    {
                        return Err(TestCaseError::fail(format!(
                            "step {i} {op:?} failed: {status:?}"
                        )));
                    }
                    assert_tenant_ledger(db, &tenant).await;
                }
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        panic!("ledger property failed (TESSERA_PROPTEST_SEED={seed}): {e}");
    }
    suite.cleanup().await;
}
