//! Redemption: `Redeem` at 32 clients against one campaign with a redemption budget and a
//! per-customer limit (its counter row is the hot row every redemption locks), each call a
//! new customer and order with a 3-line cart. Beside it, a bare SQL transaction of the same
//! shape on the same database (claim row, lock and bump the budget row, bump the customer's
//! row, insert the redemption and the outbox event), and the ratio between the two.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, TransactionTrait};
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_store::db::Backend;
use tessera_store::stmt;
use tessera_tests::{TENANT, TestSuite};

use crate::{percentile, report};

const CLIENTS: usize = 32;
const PER_CLIENT: usize = 150;

fn cart() -> cpb::Cart {
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

pub async fn redemption(suite: &TestSuite, label: &str) {
    let client = EligibilityServiceClient::new(suite.channel());
    client
        .clone()
        .put_campaign(suite.ctx(TENANT).request(pb::PutCampaignRequest {
            idempotency_key: "bench-redeem-campaign".into(),
            campaign: Some(pb::Campaign {
                id: "bench-redeem".into(),
                name: "bench".into(),
                status: pb::CampaignStatus::Active.into(),
                effect: Some(cpb::Effect {
                    kind: Some(Kind::PercentOff(cpb::PercentOff {
                        percent_bp: 1000,
                        ..Default::default()
                    })),
                }),
                limits: Some(pb::Limits {
                    max_redemptions: 1_000_000,
                    max_redemptions_per_customer: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("campaign");
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let (mut client, ctx) = (client.clone(), suite.ctx(TENANT));
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(PER_CLIENT);
            for i in 0..PER_CLIENT {
                let request = pb::RedeemRequest {
                    idempotency_key: format!("bench-redeem-{worker}-{i}"),
                    checkout: Some(pb::Checkout {
                        customer_id: format!("bench-{worker}-{i}"),
                        order_id: format!("bench-order-{worker}-{i}"),
                        cart: Some(cart()),
                        campaign_ids: vec!["bench-redeem".into()],
                        ..Default::default()
                    }),
                };
                let t = Instant::now();
                client.redeem(ctx.request(request)).await.expect("redeem");
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
    report(
        label,
        &format!("Redeem ({CLIENTS} clients)"),
        latencies.len(),
        &latencies,
        elapsed,
    );
    let ours = latencies.len() as f64 / elapsed.as_secs_f64();
    let (bare, bare_p99) = bare_sql(suite).await;
    println!(
        "  {label:<28} bare SQL transaction     {bare:>8.0}/s  p99 {:>7.2} ms  -> Redeem does {:.0}% of it",
        bare_p99.as_secs_f64() * 1e3,
        100.0 * ours / bare
    );
}

/// The same writes as a redemption, as plain SQL from 32 tasks on the service's own pool
/// size: the floor the database sets.
async fn bare_sql(suite: &TestSuite) -> (f64, Duration) {
    let db = Arc::new(suite.db("eligibility").await);
    let lock = db.backend().row_lock();
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let db = db.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(PER_CLIENT);
            for i in 0..PER_CLIENT {
                let t = Instant::now();
                let txn = if db.backend() == Backend::Sqlite {
                    db.begin_write().await.expect("begin")
                } else {
                    db.conn().begin().await.expect("begin")
                };
                let id = format!("bare-{worker}-{i}");
                let run = |sql: &str, values: Vec<sea_orm::Value>| {
                    let statement = stmt(&txn, sql, values);
                    let txn = &txn;
                    async move { txn.execute_raw(statement).await.expect("statement") }
                };
                run(
                    "INSERT INTO idempotency_keys (tenant_id, scope, key, fingerprint, state, \
                     owner, locked_until, created_at) VALUES ($1, 'bare', $2, '', 'done', '', 0, 0)",
                    vec![TENANT.into(), id.clone().into()],
                )
                .await;
                txn.query_one_raw(stmt(
                    &txn,
                    &format!(
                        "SELECT redemptions FROM campaign_usage WHERE tenant_id = $1 \
                         AND campaign_id = 'bench-redeem'{lock}"
                    ),
                    [TENANT.into()],
                ))
                .await
                .expect("lock");
                run(
                    "UPDATE campaign_usage SET redemptions = redemptions + 1, \
                     discount_total = discount_total + 600 \
                     WHERE tenant_id = $1 AND campaign_id = 'bench-redeem'",
                    vec![TENANT.into()],
                )
                .await;
                run(
                    "INSERT INTO customer_usage (tenant_id, customer_id, campaign_id, redemptions) \
                     VALUES ($1, $2, 'bench-redeem', 1)",
                    vec![TENANT.into(), id.clone().into()],
                )
                .await;
                run(
                    "INSERT INTO redemptions (tenant_id, id, customer_id, order_id, status, \
                     created_at, expires_at, record, counted) \
                     VALUES ($1, $2, $2, $2, 'redeemed', 0, 0, $3, '{}')",
                    vec![TENANT.into(), id.clone().into(), vec![0u8; 300].into()],
                )
                .await;
                run(
                    "INSERT INTO outbox (event_id, tenant_id, event_type, payload, traceparent, \
                     occurred_at, attempts, next_attempt_at, delivered_at) \
                     VALUES ($1, $2, 'bare', $3, '', 0, 0, 0, 0)",
                    vec![id.clone().into(), TENANT.into(), vec![0u8; 300].into()],
                )
                .await;
                txn.commit().await.expect("commit");
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
