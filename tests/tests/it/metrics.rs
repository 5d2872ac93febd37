//! Prometheus metrics: after a points request the gateway's `/metrics` shows the HTTP and
//! gRPC RED series, the outbox delivery counter and the pool and lag gauges.

use std::time::Duration;

use serde_json::json;
use tessera_tests::{TestSuite, backend_tests, eventually};

backend_tests!(metrics_cover_http_grpc_outbox_and_pools);

async fn metrics_cover_http_grpc_outbox_and_pools(suite: TestSuite) {
    let response = suite
        .post(
            "/v1/customers/mia/points",
            Some("metrics-1"),
            &json!({"amount": 3}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let url = format!("{}/metrics", suite.base_url);
    let body = eventually(Duration::from_secs(15), "metrics series", || async {
        let body = suite.http.get(&url).send().await.ok()?.text().await.ok()?;
        let expected = [
            r#"tessera_http_requests_total{method="POST",route="/v1/customers/{id}/points",status="201"}"#,
            r#"tessera_http_request_duration_seconds_bucket{method="POST",route="/v1/customers/{id}/points""#,
            r#"tessera_grpc_server_requests_total{service="tessera.wallet.v1.WalletService",method="Credit",code="Ok"}"#,
            r#"tessera_grpc_server_request_duration_seconds_bucket{service="tessera.wallet.v1.WalletService",method="Credit""#,
            r#"tessera_outbox_deliveries_total{service="wallet",outcome="delivered"}"#,
            r#"tessera_outbox_pending{service="wallet"}"#,
            r#"tessera_outbox_lag_seconds{service="wallet"}"#,
            r#"tessera_db_pool_connections{service="wallet",state="idle"}"#,
            r#"tessera_queue_depth{service="eligibility",queue="commands"}"#,
            r#"tessera_queue_oldest_seconds{service="catalog",queue="commands"}"#,
            r#"tessera_queue_dead{service="catalog",queue="commands"}"#,
        ];
        expected.iter().all(|line| body.contains(line)).then_some(body)
    })
    .await;
    assert!(body.contains("# TYPE tessera_grpc_server_requests_total counter"));
    suite.cleanup().await;
}
