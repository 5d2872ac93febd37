//! A Redis outage (PostgreSQL + Redis only): the suite reaches Redis through a TCP proxy the
//! test can cut. While Redis is away, segment membership is computed directly and stays
//! exact, the eligibility keeps serving and its segment-cache health entry reports the
//! degradation; when Redis comes back, the entries written before the outage are of an
//! older facts version and never answer.

use std::time::Duration;

use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_tests::{Backend, Proxy, TENANT, TestSuite, eventually, test_config};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn cache_health(suite: &TestSuite) -> ServingStatus {
    HealthClient::new(suite.channel())
        .check(HealthCheckRequest {
            service: tessera_eligibility::CACHE_HEALTH_NAME.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

async fn service_health(suite: &TestSuite) -> ServingStatus {
    HealthClient::new(suite.channel())
        .check(HealthCheckRequest {
            service: tessera_eligibility::GRPC_NAME.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_degrades_but_never_answers_wrong() {
    let Some(mut config) = test_config(Backend::Production) else {
        return;
    };
    let redis = config.cache.redis_url.clone().expect("redis url");
    let target = redis
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .expect("host:port")
        .to_string();
    let proxy = Proxy::start(target).await;
    config.cache.redis_url = Some(format!("redis://127.0.0.1:{}", proxy.port));
    let suite = TestSuite::start_with(Backend::Production, config, false).await;
    let mut c = EligibilityServiceClient::new(suite.channel());
    let ctx = suite.ctx(TENANT);
    c.create_segment(ctx.request(pb::CreateSegmentRequest {
        idempotency_key: "segment".into(),
        segment: Some(pb::SegmentInput {
            id: "buyers".into(),
            name: "Buyers".into(),
            kind: pb::SegmentKind::Dynamic.into(),
            rule: "customer.orders_total >= 1".into(),
        }),
    }))
    .await
    .expect("segment");
    c.upsert_customer(ctx.request(pb::UpsertCustomerRequest {
        idempotency_key: "cus".into(),
        customer: Some(pb::CustomerInput {
            id: "cus".into(),
            ..Default::default()
        }),
    }))
    .await
    .expect("customer");
    let segments = |c: &mut EligibilityServiceClient<_>| {
        let request = ctx.request(pb::GetCustomerSegmentsRequest {
            customer_id: "cus".into(),
        });
        let mut c = c.clone();
        async move {
            c.get_customer_segments(request)
                .await
                .expect("segments answer")
                .into_inner()
        }
    };
    assert!(segments(&mut c).await.segment_ids.is_empty());
    let warm = segments(&mut c).await;
    assert!(warm.cached && warm.segment_ids.is_empty(), "{warm:?}");
    assert_eq!(cache_health(&suite).await, ServingStatus::Serving);

    proxy.cut().await;
    // The facts change while Redis is away: the answer follows them at once.
    c.record_order(ctx.request(pb::RecordOrderRequest {
        idempotency_key: "order".into(),
        order: Some(pb::Order {
            id: "o1".into(),
            customer_id: "cus".into(),
            status: pb::OrderStatus::Paid.into(),
            currency: "USD".into(),
            lines: vec![pb::OrderLine {
                sku: "A".into(),
                quantity: 1,
                unit_amount: 100,
                ..Default::default()
            }],
            ..Default::default()
        }),
    }))
    .await
    .expect("facts are written without Redis");
    let during = segments(&mut c).await;
    assert_eq!(
        (during.segment_ids.clone(), during.cached),
        (vec!["buyers".to_string()], false)
    );
    eventually(Duration::from_secs(15), "degraded cache health", || async {
        (cache_health(&suite).await == ServingStatus::NotServing).then_some(())
    })
    .await;
    assert_eq!(service_health(&suite).await, ServingStatus::Serving);

    // Redis is back with the pre-outage entry (empty membership, older facts version):
    // it is not used, and the fresh answer is cached again.
    proxy.restore().await;
    let after = eventually(Duration::from_secs(15), "Redis answers again", || {
        let mut c = c.clone();
        async move {
            let r = segments(&mut c).await;
            assert_eq!(r.segment_ids, ["buyers"], "never the stale entry");
            r.cached.then_some(r)
        }
    })
    .await;
    assert_eq!(after.segment_ids, ["buyers"]);
    eventually(Duration::from_secs(15), "cache health back", || async {
        (cache_health(&suite).await == ServingStatus::Serving).then_some(())
    })
    .await;
    suite.cleanup().await;
}
