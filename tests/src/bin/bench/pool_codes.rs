//! Catalog codes at checkout: a pool of `TESSERA_BENCH_POOL_CODES` codes (default
//! 1,000,000) generated in the catalog and synced to eligibility through the command
//! outbox (both timed), then `Redeem` at 32 clients with a campaign code (one code, no use
//! limit) and with single-use pool codes drawn at random from the pool, beside each other.
//! The process's resident memory is printed before the pool and after it reached
//! eligibility (the whole suite runs in this process).

use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_store::stmt;
use tessera_tests::{TENANT, TestSuite, scalar};

use crate::redeem::{CLIENTS, PER_CLIENT, cart};
use crate::{drive, generate, new_pool, report};

/// Resident memory of this process, MiB (Linux).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percent_off() -> Option<cpb::Effect> {
    Some(cpb::Effect {
        kind: Some(cpb::effect::Kind::PercentOff(cpb::PercentOff {
            percent_bp: 1_000,
            ..Default::default()
        })),
    })
}

pub async fn pool_codes(suite: &TestSuite, label: &str) {
    let size: i64 = std::env::var("TESSERA_BENCH_POOL_CODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let before = rss_mib();
    let pool = new_pool(
        suite,
        "bench-pool",
        percent_off().expect("effect"),
        "PB-******-****",
    )
    .await;
    let started = Instant::now();
    let job = generate(suite, "bench-pool", &pool.id, size).await;
    assert_eq!(job.status(), cpb::JobStatus::Succeeded);
    let generated = started.elapsed();
    let eligibility_db = suite.db("eligibility").await;
    loop {
        let synced = scalar(
            &eligibility_db,
            "SELECT COUNT(*) FROM catalog_codes WHERE tenant_id = $1 AND pool_id = $2",
            vec![TENANT.into(), pool.id.clone().into()],
        )
        .await;
        if synced >= size {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let synced = started.elapsed();
    println!(
        "  {label:<28} pool of {size} codes: generated in {:.1} s, all at eligibility after {:.1} s; \
         process RSS {before:.0} -> {:.0} MiB",
        generated.as_secs_f64(),
        synced.as_secs_f64(),
        rss_mib()
    );

    let mut eligibility = EligibilityServiceClient::new(suite.channel());
    for (id, codes, pools) in [
        ("bench-campaign-code", vec!["BENCHCODE".to_string()], vec![]),
        ("bench-pool-code", vec![], vec![pool.id.clone()]),
    ] {
        eligibility
            .put_campaign(suite.ctx(TENANT).request(pb::PutCampaignRequest {
                idempotency_key: format!("bench-{id}"),
                campaign: Some(pb::Campaign {
                    id: id.into(),
                    name: id.into(),
                    status: pb::CampaignStatus::Active.into(),
                    effect: percent_off(),
                    codes,
                    pool_ids: pools,
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await
            .expect("campaign");
    }
    // The codes the pool-code run redeems, drawn at random from the whole pool.
    let catalog_db = suite.db("catalog").await;
    let conn = catalog_db.conn();
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT code FROM codes WHERE tenant_id = $1 AND pool_id = $2 ORDER BY random() LIMIT $3",
            [
                TENANT.into(),
                pool.id.clone().into(),
                ((CLIENTS * PER_CLIENT) as i64).into(),
            ],
        ))
        .await
        .expect("codes");
    let codes: std::sync::Arc<Vec<String>> = std::sync::Arc::new(
        rows.iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("code"))
            .collect(),
    );
    let client = EligibilityServiceClient::new(suite.channel());
    let mut rates = Vec::new();
    for (what, pooled) in [
        (format!("Redeem campaign code ({CLIENTS})"), false),
        (format!("Redeem pool code ({CLIENTS})"), true),
    ] {
        let codes = codes.clone();
        let (latencies, elapsed) = drive(
            suite,
            client.clone(),
            CLIENTS,
            PER_CLIENT,
            move |mut client: EligibilityServiceClient<_>, ctx, worker, i| {
                let codes = codes.clone();
                async move {
                    let n = worker * PER_CLIENT + i;
                    let code = if pooled {
                        codes[n].clone()
                    } else {
                        "BENCHCODE".to_string()
                    };
                    let checkout = pb::Checkout {
                        customer_id: format!("bench-code-{pooled}-{n}"),
                        order_id: format!("bench-code-order-{pooled}-{n}"),
                        codes: vec![code],
                        cart: Some(cart()),
                        ..Default::default()
                    };
                    let request = pb::RedeemRequest {
                        idempotency_key: format!("bench-code-{pooled}-{n}"),
                        checkout: Some(checkout),
                    };
                    client.redeem(ctx.request(request)).await.expect("redeem");
                }
            },
        )
        .await;
        report(label, &what, latencies.len(), &latencies, elapsed);
        rates.push(latencies.len() as f64 / elapsed.as_secs_f64());
    }
    println!(
        "  {label:<28} pool code / campaign code: {:.0}%",
        100.0 * rates[1] / rates[0]
    );
}
