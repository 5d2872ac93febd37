//! One request is one trace: the points request produces spans for the gateway, the wallet
//! and notification, linked parent to child across the gRPC hops and the outbox.

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::SpanData;
use serde_json::json;
use tessera_tests::{TestSuite, backend_tests, eventually};

backend_tests!(points_request_is_one_trace_across_services);

fn find<'a>(spans: &'a [SpanData], name: &str) -> Option<&'a SpanData> {
    spans.iter().find(|s| s.name == name)
}

fn parent_of(span: &SpanData) -> SpanId {
    span.parent_span_id
}

async fn points_request_is_one_trace_across_services(suite: TestSuite) {
    let exporter = tessera_runtime::telemetry::init_for_tests();
    let response = suite
        .post(
            "/v1/customers/lee/points",
            Some("trace-1"),
            &json!({"amount": 1}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let traceparent = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let trace_id = TraceId::from_hex(traceparent.split('-').nth(1).unwrap()).unwrap();

    let spans = eventually(Duration::from_secs(10), "the whole trace", || {
        let exporter = exporter.clone();
        async move {
            let spans: Vec<SpanData> = exporter
                .get_finished_spans()
                .unwrap()
                .into_iter()
                .filter(|s| s.span_context.trace_id() == trace_id)
                .collect();
            let complete = [
                "POST /v1/customers/{id}/points",
                "tessera.wallet.v1.WalletService/Credit",
                "outbox.publish",
                "tessera.notification.v1.NotificationService/PublishEvents",
            ]
            .iter()
            .all(|n| find(&spans, n).is_some());
            complete.then_some(spans)
        }
    })
    .await;
    let gateway = find(&spans, "POST /v1/customers/{id}/points").unwrap();
    let wallet = find(&spans, "tessera.wallet.v1.WalletService/Credit").unwrap();
    let publish = find(&spans, "outbox.publish").expect("relay span");
    let notification = find(
        &spans,
        "tessera.notification.v1.NotificationService/PublishEvents",
    )
    .unwrap();
    assert_eq!(
        parent_of(wallet),
        gateway.span_context.span_id(),
        "wallet is the gateway's child"
    );
    assert_eq!(
        parent_of(publish),
        wallet.span_context.span_id(),
        "the relay continues the wallet's trace"
    );
    assert_eq!(
        parent_of(notification),
        publish.span_context.span_id(),
        "notification is the relay's child"
    );
    // The server span carries the call's status code, as a number (OpenTelemetry's rpc.*).
    let status = wallet
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
        .map(|kv| kv.value.clone());
    assert_eq!(
        status,
        Some(opentelemetry::Value::I64(0)),
        "{:?}",
        wallet.attributes
    );
    suite.cleanup().await;
}
