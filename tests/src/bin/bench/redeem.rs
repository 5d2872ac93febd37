//! Redemption: `Redeem` at 32 clients against one campaign with a redemption budget and a
//! per-customer limit (the budget is taken from one of its 32 slices per redemption), each
//! call a new customer and order with a 3-line cart. Beside it, a bare SQL transaction of
//! the same shape on the same database (claim row, take from one budget slice, bump the
//! customer's row, insert the redemption and the outbox event), and the ratio. Then
//! the same redemptions paying a quarter of the order with points (the wallet's balance
//! read, hold and capture on top), beside bare SQL of that shape: a wallet transaction for
//! the hold, the redemption's, a wallet transaction for the capture.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::Value;
use sea_orm::{ConnectionTrait, TransactionTrait};
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_store::Db;
use tessera_store::db::Backend;
use tessera_store::stmt;
use tessera_tests::{TENANT, TestSuite};

use crate::{drive, percentile, points, report};

pub(crate) const CLIENTS: usize = 32;
pub(crate) const PER_CLIENT: usize = 150;

pub(crate) fn cart() -> cpb::Cart {
    cpb::Cart {
        currency: "USD".into(),
        lines: (0..3)
            .map(|i| cpb::CartLine {
                id: format!("l{i}"),
                sku: format!("SKU-{i}"),
                categories: vec!["shoes".into()],
                quantity: 1,
                unit_price: 20_00,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn campaign(id: &str, kind: Kind, limits: Option<pb::Limits>) -> pb::Campaign {
    pb::Campaign {
        id: id.into(),
        name: id.into(),
        status: pb::CampaignStatus::Active.into(),
        effect: Some(cpb::Effect { kind: Some(kind) }),
        limits,
        ..Default::default()
    }
}

type Client = EligibilityServiceClient<Channel>;

/// `PER_CLIENT` redemptions on each of `CLIENTS` workers, of `checkout(worker, i)`; prints
/// the line and returns the rate.
async fn redeem_all(
    suite: &TestSuite,
    client: &Client,
    label: &str,
    what: &str,
    checkout: fn(usize, usize) -> pb::Checkout,
) -> f64 {
    let (latencies, elapsed) = drive(
        suite,
        client.clone(),
        CLIENTS,
        PER_CLIENT,
        move |mut client: Client, ctx, worker, i| async move {
            let checkout = checkout(worker, i);
            let request = pb::RedeemRequest {
                idempotency_key: format!("bench-redeem-{}", checkout.customer_id),
                checkout: Some(checkout),
            };
            client.redeem(ctx.request(request)).await.expect("redeem");
        },
    )
    .await;
    report(label, what, latencies.len(), &latencies, elapsed);
    latencies.len() as f64 / elapsed.as_secs_f64()
}

pub async fn redemption(suite: &TestSuite, label: &str) {
    let client = EligibilityServiceClient::new(suite.channel());
    let budget = pb::Limits {
        max_redemptions: 1_000_000,
        max_redemptions_per_customer: 1,
        ..Default::default()
    };
    let tenth_off = Kind::PercentOff(cpb::PercentOff {
        percent_bp: 1000,
        ..Default::default()
    });
    // 100 points pay $1, for at most a quarter of the order.
    let pay_with_points = Kind::PayWithPoints(cpb::PayWithPoints {
        points: 100,
        amount: 1_00,
        min_share_bp: 0,
        max_share_bp: 2500,
    });
    for (id, c) in [
        (
            "bench-redeem",
            campaign("bench-redeem", tenth_off, Some(budget)),
        ),
        (
            "bench-points",
            campaign("bench-points", pay_with_points, None),
        ),
    ] {
        client
            .clone()
            .put_campaign(suite.ctx(TENANT).request(pb::PutCampaignRequest {
                idempotency_key: format!("bench-campaign-{id}"),
                campaign: Some(c),
                ..Default::default()
            }))
            .await
            .expect("campaign");
    }
    let ours = redeem_all(
        suite,
        &client,
        label,
        &format!("Redeem ({CLIENTS} clients)"),
        |worker, i| pb::Checkout {
            customer_id: format!("bench-{worker}-{i}"),
            order_id: format!("bench-order-{worker}-{i}"),
            cart: Some(cart()),
            campaign_ids: vec!["bench-redeem".into()],
            ..Default::default()
        },
    )
    .await;
    compare(
        label,
        "bare SQL transaction    ",
        ours,
        bare_sql(suite, false).await,
    );
    // The same with points as tender: every customer holds 2,000 points and pays a quarter
    // of the order ($15, 1,500 points) with them, held and captured in the wallet.
    let mut wallet = WalletServiceClient::new(suite.channel());
    let customers: Vec<String> = (0..CLIENTS)
        .flat_map(|w| (0..PER_CLIENT).map(move |i| format!("bench-pts-{w}-{i}")))
        .collect();
    for (n, chunk) in customers.chunks(1000).enumerate() {
        let entries = chunk
            .iter()
            .map(|c| wpb::BatchCreditEntry {
                customer_id: c.clone(),
                asset: points(),
                amount: 2_000,
                reason: "bench".into(),
                expires_at: None,
            })
            .collect();
        wallet
            .batch_credit(suite.ctx(TENANT).request(wpb::BatchCreditRequest {
                idempotency_key: format!("bench-redeem-points-{n}"),
                entries,
            }))
            .await
            .expect("points");
    }
    let ours = redeem_all(
        suite,
        &client,
        label,
        &format!("Redeem + points ({CLIENTS} cl.)"),
        |worker, i| pb::Checkout {
            customer_id: format!("bench-pts-{worker}-{i}"),
            order_id: format!("bench-pts-order-{worker}-{i}"),
            cart: Some(cart()),
            campaign_ids: vec!["bench-redeem".into(), "bench-points".into()],
            program_id: "default".into(),
            ..Default::default()
        },
    )
    .await;
    compare(
        label,
        "bare SQL hold+txn+capture",
        ours,
        bare_sql(suite, true).await,
    );
}

/// Prints the bare SQL run beside ours.
fn compare(label: &str, what: &str, ours: f64, (bare, p99): (f64, Duration)) {
    println!(
        "  {label:<28} {what} {bare:>6.0}/s  p99 {:>7.2} ms  -> Redeem does {:.0}% of it",
        p99.as_secs_f64() * 1e3,
        100.0 * ours / bare
    );
}

/// One transaction of plain SQL statements (a write transaction on SQLite, as the services
/// take); returns what the first `SELECT` found.
async fn bare_txn(db: &Db, statements: &[(&str, Vec<Value>)]) -> Option<String> {
    let txn = if db.backend() == Backend::Sqlite {
        db.begin_write().await.expect("begin")
    } else {
        db.conn().begin().await.expect("begin")
    };
    let mut found = None;
    for (sql, values) in statements {
        let statement = stmt(&txn, sql, values.clone());
        if sql.starts_with("SELECT") {
            let row = txn.query_one_raw(statement).await.expect("statement");
            if found.is_none() {
                found = row.and_then(|r| r.try_get_by_index::<String>(0).ok());
            }
        } else {
            txn.execute_raw(statement).await.expect("statement");
        }
    }
    txn.commit().await.expect("commit");
    found
}

/// The writes of a redemption as plain SQL from 32 tasks on the services' own pools: the
/// floor the database sets. With `points`, also the wallet's hold before it and capture
/// after it, each its own transaction (one hold and one capture per redemption, unbatched),
/// spending 100 points of the customers the points run paid with.
async fn bare_sql(suite: &TestSuite, points: bool) -> (f64, Duration) {
    let db = Arc::new(suite.db("eligibility").await);
    let wallet = Arc::new(suite.db("wallet").await);
    let lock = db.backend().row_lock();
    // The statements are written once, outside the timed loop.
    let account = format!(
        "SELECT id FROM accounts WHERE tenant_id = $1 AND owner_kind = 'customer' \
         AND owner_id = $2{lock}"
    );
    let first_lot = "(SELECT id FROM lots WHERE tenant_id = $1 AND remaining >= 100 \
         AND account_id = (SELECT id FROM accounts WHERE tenant_id = $1 \
         AND owner_kind = 'customer' AND owner_id = $2) ORDER BY expires_at, id LIMIT 1)";
    let sql: Arc<[String; 5]> = Arc::new([
        account,
        format!("SELECT CAST(id AS TEXT) FROM lots WHERE id = {first_lot}"),
        format!("UPDATE lots SET remaining = remaining - 100 WHERE id = {first_lot}"),
        format!("SELECT id FROM accounts WHERE tenant_id = $1 AND id = $2{lock}"),
        format!("SELECT id FROM holds WHERE tenant_id = $1 AND id = $2{lock}"),
    ]);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let (db, wallet, sql) = (db.clone(), wallet.clone(), sql.clone());
        workers.push(tokio::spawn(async move {
            let [account, lots, take, account_lock, hold_lock] = &*sql;
            let mut latencies = Vec::with_capacity(PER_CLIENT);
            for i in 0..PER_CLIENT {
                let t = Instant::now();
                let id = format!("bare-{points}-{worker}-{i}");
                let customer = format!("bench-pts-{worker}-{i}");
                let claim = |key: &str| {
                    (
                        "INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, \
                         owner, locked_until, created_at) \
                         VALUES ($1, 'bare', $2, '', 'done', '', 0, 0)",
                        vec![TENANT.into(), key.into()],
                    )
                };
                let event = || {
                    (
                        "INSERT INTO outbox (event_id, tenant_id, event_type, payload, traceparent, \
                         occurred_at, attempts, next_attempt_at, delivered_at) \
                         VALUES ($1, $2, 'bare', $3, '', 0, 0, 0, 0)",
                        vec![
                            uuid::Uuid::now_v7().to_string().into(),
                            TENANT.into(),
                            vec![0u8; 300].into(),
                        ],
                    )
                };
                let who = || vec![TENANT.into(), customer.clone().into()];
                let entry = |kind: &str| {
                    (
                        "INSERT INTO transactions (id, tenant_id, kind, customer_id, asset_kind, \
                         asset_code, amount, reason, principal, created_at) \
                         VALUES ($1, $2, $3, $4, 1, 'default', -100, 'bare', '', 0)",
                        vec![
                            format!("{id}-{kind}").into(),
                            TENANT.into(),
                            kind.into(),
                            customer.clone().into(),
                        ],
                    )
                };
                let postings = |kind: &str| {
                    (
                        "INSERT INTO postings (tenant_id, transaction_id, account_id, amount, \
                         created_at) VALUES ($1, $2, 'bare', -100, 0), ($1, $2, 'bare', 100, 0)",
                        vec![TENANT.into(), format!("{id}-{kind}").into()],
                    )
                };
                let account_id = if points {
                    let held = bare_txn(
                        &wallet,
                        &[
                            claim(&format!("{id}-hold")),
                            (account.as_str(), who()),
                            (lots.as_str(), who()),
                            (take.as_str(), who()),
                            (
                                "INSERT INTO lot_consumptions (tenant_id, transaction_id, lot_id, \
                                 amount) VALUES ($1, $2, 0, 100)",
                                vec![TENANT.into(), format!("{id}-hold").into()],
                            ),
                            entry("hold"),
                            postings("hold"),
                            (
                                "UPDATE accounts SET balance = balance - 100, held = held + 100, \
                                 version = version + 1 WHERE tenant_id = $1 AND owner_id = $2",
                                vec![TENANT.into(), customer.clone().into()],
                            ),
                            (
                                "INSERT INTO holds (tenant_id, id, customer_id, account_id, \
                                 asset_kind, asset_code, amount, captured, status, expires_at, \
                                 created_at, updated_at) \
                                 VALUES ($1, $2, $3, '', 1, 'default', 100, 0, 'active', 0, 0, 0)",
                                vec![TENANT.into(), id.clone().into(), customer.clone().into()],
                            ),
                            event(),
                        ],
                    )
                    .await;
                    held.unwrap_or_default()
                } else {
                    String::new()
                };
                let mut redemption = vec![
                    claim(&id),
                    (
                        "UPDATE campaign_usage_shards SET redemptions = redemptions + 1, \
                         discount_total = discount_total + 600, \
                         left_redemptions = left_redemptions - 1 \
                         WHERE tenant_id = $1 AND campaign_id = 'bench-redeem' AND shard = $2 \
                         AND left_redemptions >= 1",
                        vec![
                            TENANT.into(),
                            i32::from(uuid::Uuid::new_v4().as_bytes()[0] % 32).into(),
                        ],
                    ),
                    (
                        "INSERT INTO customer_usage (tenant_id, customer_id, campaign_id, \
                         redemptions) VALUES ($1, $2, 'bench-redeem', 1)",
                        vec![TENANT.into(), id.clone().into()],
                    ),
                    (
                        "INSERT INTO redemptions (tenant_id, id, customer_id, order_id, status, \
                         created_at, expires_at, record, counted) \
                         VALUES ($1, $2, $2, $2, 'redeemed', 0, 0, $3, '{}')",
                        vec![TENANT.into(), id.clone().into(), vec![0u8; 300].into()],
                    ),
                    event(),
                ];
                if points {
                    redemption.push((
                        "INSERT INTO redemption_spends (tenant_id, redemption_id, asset_kind, \
                         asset_code, customer_id, amount, hold_id, state, capture_tx, \
                         refund_target, refunded, due, error) \
                         VALUES ($1, $2, 1, 'default', $3, 100, $2, 'capture', '', 0, 0, 1, '')",
                        vec![TENANT.into(), id.clone().into(), customer.clone().into()],
                    ));
                }
                bare_txn(&db, &redemption).await;
                if points {
                    bare_txn(
                        &wallet,
                        &[
                            claim(&format!("{id}-capture")),
                            (account_lock.as_str(), vec![TENANT.into(), account_id.into()]),
                            (hold_lock.as_str(), vec![TENANT.into(), id.clone().into()]),
                            entry("capture"),
                            postings("capture"),
                            (
                                "UPDATE accounts SET held = held - 100 \
                                 WHERE tenant_id = $1 AND owner_id = $2",
                                vec![TENANT.into(), customer.clone().into()],
                            ),
                            (
                                "UPDATE holds SET status = 'captured', captured = 100 \
                                 WHERE tenant_id = $1 AND id = $2",
                                vec![TENANT.into(), id.clone().into()],
                            ),
                            event(),
                        ],
                    )
                    .await;
                }
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    (
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.99),
    )
}
