//! One request is one trace: the points request produces spans for the gateway, the wallet
//! and notification, linked parent to child across the gRPC hops (a CLIENT span on the
//! caller's side, the SERVER span its child) and the outbox.

use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_tests::{TestSuite, backend_tests, eventually};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::eligibility::{client, key, put_campaign};
use crate::redemption::redeem;
use crate::tender::{load, pay_with_points, points, with_tender};

backend_tests!(
    points_request_is_one_trace_across_services,
    a_redemption_paid_with_points_is_one_trace
);

fn find<'a>(spans: &'a [SpanData], name: &str) -> Option<&'a SpanData> {
    spans.iter().find(|s| s.name == name)
}

/// The span named `name` of `kind` (a gRPC call has a CLIENT and a SERVER span by its name).
pub(crate) fn find_kind<'a>(
    spans: &'a [SpanData],
    name: &str,
    kind: SpanKind,
) -> Option<&'a SpanData> {
    spans.iter().find(|s| s.name == name && s.span_kind == kind)
}

/// The finished spans of one trace.
pub(crate) fn spans_of(exporter: &InMemorySpanExporter, trace_id: TraceId) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .collect()
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
            let spans = spans_of(&exporter, trace_id);
            let calls = [
                "tessera.wallet.v1.WalletService/Credit",
                "tessera.notification.v1.NotificationService/PublishEvents",
            ];
            let complete = find(&spans, "POST /v1/customers/{id}/points").is_some()
                && find(&spans, "outbox.publish").is_some()
                && calls.iter().all(|n| {
                    find_kind(&spans, n, SpanKind::Client).is_some()
                        && find_kind(&spans, n, SpanKind::Server).is_some()
                });
            complete.then_some(spans)
        }
    })
    .await;
    let gateway = find(&spans, "POST /v1/customers/{id}/points").unwrap();
    let credit = "tessera.wallet.v1.WalletService/Credit";
    let wallet_call = find_kind(&spans, credit, SpanKind::Client).expect("client span");
    let wallet = find_kind(&spans, credit, SpanKind::Server).expect("server span");
    let publish = find(&spans, "outbox.publish").expect("relay span");
    let events = "tessera.notification.v1.NotificationService/PublishEvents";
    let notification_call = find_kind(&spans, events, SpanKind::Client).expect("client span");
    let notification = find_kind(&spans, events, SpanKind::Server).expect("server span");
    assert_eq!(
        parent_of(wallet_call),
        gateway.span_context.span_id(),
        "the gateway calls the wallet"
    );
    assert_eq!(
        parent_of(wallet),
        wallet_call.span_context.span_id(),
        "wallet is the call's child"
    );
    assert_eq!(
        parent_of(publish),
        wallet.span_context.span_id(),
        "the relay continues the wallet's trace"
    );
    assert_eq!(
        parent_of(notification_call),
        publish.span_context.span_id(),
        "the relay calls notification"
    );
    assert_eq!(
        parent_of(notification),
        notification_call.span_context.span_id(),
        "notification is the call's child"
    );
    for span in [wallet_call, notification_call] {
        let has = |key: &str| span.attributes.iter().any(|kv| kv.key.as_str() == key);
        assert!(
            has("rpc.system") && has("rpc.method") && has("server.address"),
            "{:?}",
            span.attributes
        );
    }
    // The wallet's statements are spans of its Credit, per the database conventions.
    let statement = spans
        .iter()
        .find(|s| {
            s.parent_span_id == wallet.span_context.span_id()
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "db.system.name")
        })
        .expect("a database span under the wallet's Credit");
    assert_eq!(statement.span_kind, SpanKind::Client);
    assert!(
        statement
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "db.query.text"),
        "{:?}",
        statement.attributes
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

/// The spans of `spans` other than `root` whose parent is not in `spans`: orphans (or, while
/// the trace is still being written, spans whose parent has not ended yet).
pub(crate) fn orphans(spans: &[SpanData], root: SpanId) -> Vec<String> {
    spans
        .iter()
        .filter(|s| s.span_context.span_id() != root && parent_of(s) != root)
        .filter(|s| {
            !spans
                .iter()
                .any(|p| p.span_context.span_id() == parent_of(s))
        })
        .map(|s| s.name.to_string())
        .collect()
}

/// A redemption paid with points: the eligibility's hold batcher and its queued capture
/// both continue the redeeming request's trace, down to the wallet's `BatchHold` and
/// `BatchCapture`.
async fn a_redemption_paid_with_points_is_one_trace(suite: TestSuite) {
    let exporter = tessera_runtime::telemetry::init_for_tests();
    let (mut c, mut wallet) = (client(&suite), WalletServiceClient::new(suite.channel()));
    put_campaign(&mut c, &suite, pay_with_points(5000)).await;
    load(&mut wallet, &suite, "tia", points(), 3_000).await;

    let root = tracing::info_span!("test.checkout");
    let trace_id = root.context().span().span_context().trace_id();
    let root_id = root.context().span().span_context().span_id();
    redeem(&mut c, &suite, &key(), with_tender("tia", "ord-t", &[]))
        .instrument(root.clone())
        .await
        .expect("redeem");
    drop(root);

    let wanted = [
        "tessera.eligibility.v1.EligibilityService/Redeem",
        "tessera.wallet.v1.WalletService/BatchHold",
        "tessera.wallet.v1.WalletService/BatchCapture",
    ];
    let spans = eventually(
        Duration::from_secs(10),
        "one trace down to hold and capture, no orphans",
        || {
            let exporter = exporter.clone();
            async move {
                let spans = spans_of(&exporter, trace_id);
                let complete = wanted
                    .iter()
                    .all(|n| find_kind(&spans, n, SpanKind::Server).is_some());
                // Every span's parent is in the trace (checked once it is all written: a
                // span ends, and is exported, before its parent does).
                (complete && orphans(&spans, root_id).is_empty()).then_some(spans)
            }
        },
    )
    .await;
    let hold = find(&spans, "spends.hold").expect("the batcher's span");
    let redeem = find_kind(&spans, wanted[0], SpanKind::Server).unwrap();
    let mut ancestor = parent_of(hold);
    // The batch span's parent is within the redeem call (its handler's spans).
    while ancestor != redeem.span_context.span_id() {
        let parent = spans
            .iter()
            .find(|s| s.span_context.span_id() == ancestor)
            .unwrap_or_else(|| panic!("the hold batch descends from Redeem"));
        ancestor = parent_of(parent);
    }
    suite.cleanup().await;
}
